//! TLS plaintext from OpenSSL (and libraries with its API) and GnuTLS: uprobes on
//! `SSL_write`/`SSL_read` (and their `_ex` forms) and `gnutls_record_send`/`_recv` (the same
//! arguments and return) note each call's buffer at entry; the socket call the library makes
//! inside it (seen by the data path, `claim`) names the session's socket and is not sent (its
//! bytes are ciphertext); the call's return sends the plaintext as a data event of that socket,
//! flagged `FLAG_TLS`. Handshakes (`SSL_do_handshake`, `SSL_connect`, `SSL_accept`) only name
//! the socket, so that their ciphertext is never sent either.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user, generated::bpf_ktime_get_ns},
    macros::{raw_tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext},
};
use tracer_common::{
    AF_INET, AF_INET6, DIR_EGRESS, DIR_INGRESS, EventHeader, EventKind, FLAG_TLS,
    FLAG_TUPLE_FROM_SOCK, KernelStat, OPAQUE_TLS, SockState, TUPLE_TLS,
};

use super::{
    data::emit,
    sock::{IPPROTO_TCP, NextEvent, Record, Store, opaque_requested, same_tuple},
};
use crate::maps::{
    BPF_RB_FORCE_WAKEUP, BUSY_ALL, BUSY_GO, BUSY_GO_LOOPS, GO_ROUND_TRIPS, GO_WRITE_LOOPS,
    KIND_BUF, SyscallArgs, TLS_AFTER, TLS_BUSY, TLS_CALLS, TLS_OPAQUE, TLS_SCRATCH,
    TLS_SEEN_HANDSHAKE, TLS_SESSIONS, TlsAfter, TlsCall, TlsKey, count, go_key, go_on_behalf, ring,
    tracer_tgid,
};

/// Adds `delta` (wrapping) to the count of threads inside a library call. The result is not
/// used: an atomic add without fetch, which BPF before v3 has.
#[inline(always)]
fn busy_add(slot: u32, delta: u64) {
    if let Some(p) = TLS_BUSY.get_ptr_mut(slot) {
        // SAFETY: a live, aligned map value shared by all CPUs, only ever changed atomically
        // (BPF's `lock` add: core's atomics offer no fetch-less add on this target).
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({p} + 0) += {d}",
                p = in(reg) p,
                d = in(reg) delta,
                options(nostack),
            )
        };
    }
}

#[inline(always)]
fn enter(ctx: &ProbeContext, direction: u32, ex: bool) {
    let id = bpf_get_current_pid_tgid();
    if (id >> 32) as u32 == tracer_tgid() {
        return;
    }
    let call = TlsCall {
        ssl: ctx.arg(0).unwrap_or(0),
        buf: ctx.arg(1).unwrap_or(0),
        num: ctx.arg(2).unwrap_or(0),
        out: if ex { ctx.arg(3).unwrap_or(0) } else { 0 },
        // SAFETY: helper without preconditions.
        ts_enter: unsafe { bpf_ktime_get_ns() },
        direction,
        ex: ex as u32,
        sock_io: 0,
        _pad: 0,
        goroutine: 0,
    };
    // A handshake entered from another (SSL_connect calling SSL_do_handshake) replaces the
    // entry: counted once, as it is removed once.
    let fresh = TLS_CALLS.get_ptr(&id).is_none();
    if TLS_CALLS.insert(&id, &call, 0).is_ok() && fresh {
        busy_add(BUSY_ALL, 1);
    }
}

/// Each hook twice: as a uprobe-multi program (one link per program for all the library's
/// functions it hooks: detaching it waits for one RCU grace period, where single uprobes wait
/// for one each, seconds for a few libraries) and as a single uprobe, for kernels before 6.6.
macro_rules! entries {
    ($($multi:ident, $single:ident, $dir:expr, $ex:expr;)*) => {$(
        #[uprobe(multi)]
        pub fn $multi(ctx: ProbeContext) -> u32 {
            enter(&ctx, $dir, $ex);
            0
        }

        #[uprobe]
        pub fn $single(ctx: ProbeContext) -> u32 {
            enter(&ctx, $dir, $ex);
            0
        }
    )*};
}

entries! {
    ssl_write_entry, ssl_write_entry_1, DIR_EGRESS, false;
    ssl_write_ex_entry, ssl_write_ex_entry_1, DIR_EGRESS, true;
    ssl_read_entry, ssl_read_entry_1, DIR_INGRESS, false;
    ssl_read_ex_entry, ssl_read_ex_entry_1, DIR_INGRESS, true;
    ssl_handshake_entry, ssl_handshake_entry_1, 0, false;
}

#[uretprobe(multi)]
pub fn ssl_call_return(ctx: RetProbeContext) -> u32 {
    on_return::<true>(&ctx);
    0
}

#[uretprobe]
pub fn ssl_call_return_1(ctx: RetProbeContext) -> u32 {
    on_return::<true>(&ctx);
    0
}

/// The same for kernels without `bpf_loop` (before 5.17), in whose programs no reference to
/// a `bpf_loop` callback may appear at all: 5.10's verifier does not know such references
/// (5.13+) and refuses the program's function count.
#[uretprobe]
pub fn ssl_call_return_1_flat(ctx: RetProbeContext) -> u32 {
    on_return::<false>(&ctx);
    0
}

/// Go's write entry and read return (the hooks that send plaintext) for those kernels.
#[uprobe]
pub fn go_tls_write_entry_1_flat(ctx: ProbeContext) -> u32 {
    go_enter_walk::<false>(&ctx, DIR_EGRESS);
    0
}

#[uprobe]
pub fn go_tls_read_return_1_flat(ctx: ProbeContext) -> u32 {
    go_return_walk::<false>(&ctx, DIR_INGRESS);
    0
}

/// A thread that exits inside a library call (a server killed while waiting in `SSL_read`)
/// never returns from it: its entry goes here, so that the count of calls in progress drops
/// back to 0 and socket calls stop looking.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn tls_thread_exit(_ctx: RawTracePointContext) -> i32 {
    if TLS_BUSY.get(0).is_none_or(|busy| *busy == 0) {
        return 0;
    }
    if TLS_CALLS.remove(&bpf_get_current_pid_tgid()).is_ok() {
        busy_add(BUSY_ALL, u64::MAX);
    }
    0
}

/// A process began running a new program: the daemon looks at it at once (a Go program's TLS is
/// hooked from its executable), not at its next look at new processes a second later, by when
/// a short-lived client is done.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn tls_process_exec(_ctx: RawTracePointContext) -> i32 {
    let ev = EventHeader {
        kind: EventKind::Exec as u32,
        flags: 0,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        pid_tgid: bpf_get_current_pid_tgid(),
        cgroup_id: 0,
        comm: [0; 16],
    };
    // Woken at once (execs are rare next to socket calls): every millisecond counts against a
    // client that connects as soon as it starts. Lost when the ring is full: the next look
    // finds the process anyway.
    let _ = ring().output(&ev, BPF_RB_FORCE_WAKEUP);
    0
}

/// The return of every hooked call: a read or write that moved plaintext sends it.
#[inline(always)]
fn on_return<const WALK: bool>(ctx: &RetProbeContext) {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(call) = (unsafe { TLS_CALLS.get(&id) }).copied() else {
        return;
    };
    if TLS_CALLS.remove(&id).is_ok() {
        busy_add(BUSY_ALL, u64::MAX);
    }
    if call.sock_io == 0 {
        note_after(&call, id);
    }
    if call.direction == 0 {
        return;
    }
    let ret: u64 = ctx.ret();
    let bytes = if call.ex != 0 {
        if ret as i32 != 1 || call.out == 0 {
            return;
        }
        // SAFETY: the caller's `size_t *`, read through the checked helper.
        match unsafe { bpf_probe_read_user(call.out as *const u64) } {
            Ok(n) => n,
            Err(_) => return,
        }
    } else {
        let n = ret as i32;
        if n <= 0 {
            return;
        }
        n as u64
    };
    send_plaintext::<WALK>(&call, id, bytes);
}

/// Sends the `bytes` of plaintext a hooked call of thread `id` moved (or, for Go's writes, is
/// about to), as a data event of its session's socket.
#[inline(always)]
fn send_plaintext<const WALK: bool>(call: &TlsCall, id: u64, bytes: u64) {
    if bytes == 0 || bytes > call.num {
        return;
    }
    let key = TlsKey {
        ssl: call.ssl,
        tgid: id >> 32,
    };
    let Some(session) = TLS_SESSIONS.get_ptr_mut(&key) else {
        count(KernelStat::TlsNoSocket);
        return;
    };
    // Numbered when sent (`NextEvent::late`), each direction on its own.
    // SAFETY: a live map value.
    let counter = unsafe {
        if call.direction == DIR_INGRESS {
            &raw mut (*session).seq_in
        } else {
            &raw mut (*session).state.seq
        }
    };
    // SAFETY: a live map value; each direction of a session is driven by one thread at a time.
    let (sk, tuple, seq, flags) = unsafe {
        let s = &mut *session;
        let seq = (*counter).wrapping_add(1);
        if s.flags & TLS_OPAQUE == 0 && opaque_requested(s.sk, &s.state.tuple, seq) {
            s.flags |= TLS_OPAQUE;
        }
        if s.flags & TLS_OPAQUE != 0 {
            count(KernelStat::SkippedOpaque);
            return;
        }
        (s.sk, s.state.tuple, seq, s.flags)
    };
    let args = SyscallArgs {
        buf: call.buf,
        len: call.num,
        ts_enter: call.ts_enter,
        sk,
        kind: KIND_BUF,
        direction: call.direction,
        goroutine: call.goroutine,
        fd: 0,
        flags: 0,
    };
    // With the session's state: HTTP/2 over TLS is walked frame by frame as on a socket, and
    // the thread's name is sent only when it changes.
    let next = NextEvent {
        tuple,
        seq,
        from_sock: false,
        // SAFETY: as above.
        state: Some(unsafe { &raw mut (*session).state }),
        late: counter,
    };
    let mut event_flags = FLAG_TLS;
    if flags & TLS_SEEN_HANDSHAKE == 0 {
        event_flags |= FLAG_TUPLE_FROM_SOCK;
    }
    emit::<WALK>(&args, bytes, id, next, event_flags);
}

/// Called by the data path for each socket call: if the thread is inside a TLS library call,
/// notes which socket the session drives, marks the socket (its other calls are not sent
/// either) and says so: the call is not sent.
#[inline(always)]
pub fn claim<S: Store>(id: u64, r: &Record, goroutine: impl FnOnce() -> u64) -> bool {
    if TLS_BUSY.get(BUSY_ALL).is_none_or(|busy| *busy == 0) {
        return false;
    }
    let call = match TLS_CALLS.get_ptr_mut(&id) {
        Some(call) => call,
        None if TLS_BUSY.get(BUSY_GO).is_some_and(|busy| *busy != 0) => {
            match TLS_CALLS.get_ptr_mut(&go_key(id >> 32, goroutine())) {
                Some(call) => call,
                None => return false,
            }
        }
        None => return false,
    };
    // SAFETY: this thread's own entry, live while this program runs.
    let (ssl, handshake) = unsafe {
        (*call).sock_io = 1;
        ((*call).ssl, (*call).direction == 0)
    };
    bind_session::<S>(id, ssl, if handshake { TLS_SEEN_HANDSHAKE } else { 0 }, r)
}

/// Names `r`'s socket as the one session `ssl` of thread `id`'s process drives, and marks the
/// socket (its ciphertext is not sent). False for a socket that is not TCP over IP.
#[inline(always)]
fn bind_session<S: Store>(id: u64, ssl: u64, seen: u32, r: &Record) -> bool {
    if r.protocol != IPPROTO_TCP || (r.family != AF_INET && r.family != AF_INET6) {
        return false;
    }
    let Some(scratch) = TLS_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    let sk = r.sk;
    // SAFETY: live map values while this program runs (the per-CPU scratch is ours until it
    // returns; the socket's state and the session are only written by their own thread).
    unsafe {
        let tuple = match S::get(sk) {
            Some(state) => {
                (*state).opaque = OPAQUE_TLS;
                &(*state).tuple
            }
            None => {
                let init = &mut (*scratch).state;
                *init = SockState::default();
                init.tuple = S::tuple(sk);
                init.opaque = OPAQUE_TLS;
                S::put(sk, init);
                &init.tuple
            }
        };
        let key = TlsKey {
            ssl,
            tgid: id >> 32,
        };
        let session = &mut (*scratch).session;
        session.state = SockState::default();
        session.state.tuple = *tuple;
        session.state.tuple._pad = TUPLE_TLS;
        match TLS_SESSIONS.get_ptr_mut(&key) {
            Some(s) if (*s).sk == sk && same_tuple(&(*s).state.tuple, &session.state.tuple) => {
                (*s).flags |= seen
            }
            // A new session, or one at a freed one's address: numbered from 1 again.
            _ => {
                session.sk = sk;
                session.flags = seen;
                session.seq_in = 0;
                let _ = TLS_SESSIONS.insert(&key, session, 0);
            }
        }
    }
    count(KernelStat::TlsCiphertext);
    true
}

/// How long after an OpenSSL call without a socket the thread's next send may still be the
/// ciphertext that call produced.
const AFTER_NS: u64 = 50_000_000;

/// At the return of an OpenSSL call that moved nothing on a socket: the thread's next TLS
/// record sent may be what the call produced, through a memory BIO (`bind_after`).
#[inline(always)]
fn note_after(call: &TlsCall, id: u64) {
    if let Some(slot) = TLS_AFTER.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; a race with another program on this CPU only loses a hint.
        unsafe {
            *slot = TlsAfter {
                pid_tgid: id,
                ssl: call.ssl,
                ts_ns: bpf_ktime_get_ns(),
            }
        };
    }
}

/// Called by the socket data path for each send: a thread whose last OpenSSL call moved
/// nothing on a socket (a memory BIO: Node.js, Python's asyncio) and that now sends a TLS
/// record is sending what that call produced: the socket is the session's (bound again each
/// time: a session freed and its address reused for a new connection moves to that one's
/// socket at its handshake). `head` gives the send's first bytes. True if the send was bound
/// (it is ciphertext: not sent).
#[inline(always)]
pub fn bind_after<S: Store>(id: u64, r: &Record, head: impl FnOnce() -> Option<[u8; 3]>) -> bool {
    let Some(slot) = TLS_AFTER.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, as above.
    let ssl = unsafe {
        if (*slot).pid_tgid != id {
            return false;
        }
        (*slot).pid_tgid = 0;
        if bpf_ktime_get_ns().wrapping_sub((*slot).ts_ns) > AFTER_NS {
            return false;
        }
        (*slot).ssl
    };
    // A record header: content type (change_cipher_spec 20, alert, handshake 22, data 23) and
    // version 3.x.
    let Some([kind, major, minor]) = head() else {
        return false;
    };
    if !(20..=23).contains(&kind) || major != 3 || minor > 4 {
        return false;
    }
    // A handshake record: the session is seen from its start.
    let seen = if kind == 22 { TLS_SEEN_HANDSHAKE } else { 0 };
    bind_session::<S>(id, ssl, seen, r)
}

/// Go's crypto/tls (statically linked into each Go program, found by the daemon in the
/// program's symbols): `(*Conn).Write`, `(*Conn).Read` and the handshake at their entry, under
/// Go's register ABI (RAX the `*Conn`, RBX and RCX the buffer and its length, R14 the
/// goroutine). A goroutine can move to another thread inside a call (a read parked until bytes
/// come), so the call is keyed by goroutine, and the socket calls made inside it are found by
/// theirs (R14 at the syscall). Returns are uprobes on each RET instruction of the functions: a
/// uretprobe rewrites the return address on the goroutine's stack, which Go moves when it
/// grows.
///
/// A write's plaintext is sent at its entry: Go's HTTP client and server write from one
/// goroutine and read from another, and a request sent only when its write returned could
/// reach the ring after its response. Its socket is known by then from the handshake's calls.
#[inline(always)]
fn go_enter(ctx: &ProbeContext, direction: u32) {
    go_enter_walk::<true>(ctx, direction);
}

#[inline(always)]
fn go_enter_walk<const WALK: bool>(ctx: &ProbeContext, direction: u32) {
    let id = bpf_get_current_pid_tgid();
    if (id >> 32) as u32 == tracer_tgid() {
        return;
    }
    // SAFETY: the program's context is the probed registers, which it may load directly.
    let (conn, buf, len, g) = unsafe {
        let r = &*ctx.regs;
        (r.rax, r.rbx, r.rcx, r.r14)
    };
    let key = go_key(id >> 32, g);
    let prev = TLS_CALLS.get_ptr(&key);
    if let Some(p) = prev {
        // SAFETY: this goroutine's own entry, live while this program runs.
        let (dir, c, b, n) = unsafe { ((*p).direction, (*p).ssl, (*p).buf, (*p).num) };
        // The same call entered again: a Go function whose stack must grow runs its prologue,
        // copies the stack and starts over from its entry (a write sent twice was bytes the
        // connection never carried). A handshake run from inside a read or write (the first
        // one, when nobody asked for it before) leaves that call's entry: its socket calls are
        // that call's too.
        if (dir == direction && c == conn && b == buf && n == len) || direction == 0 {
            return;
        }
    }
    let fresh = prev.is_none();
    let on_behalf = if direction == DIR_EGRESS {
        go_on_behalf(id >> 32, g)
    } else {
        g
    };
    if !note_go_call(key, conn, buf, len, direction) {
        return;
    }
    if fresh {
        busy_add(BUSY_ALL, 1);
        busy_add(BUSY_GO, 1);
    }
    // Read back from the map rather than kept on the stack, which the event's building fills.
    if let Some(call) = TLS_CALLS.get_ptr_mut(&key) {
        // SAFETY: this goroutine's own entry, live while this program runs.
        unsafe { (*call).goroutine = on_behalf };
        if direction == DIR_EGRESS {
            // SAFETY: as above.
            send_plaintext::<WALK>(unsafe { &*call }, id, len);
        }
    }
}

/// Notes a goroutine's call under `key`; false if the map refused it. A function of its own
/// (a BPF subprogram), so that the call's value is not on the stack while a write's event is
/// built.
#[inline(never)]
fn note_go_call(key: u64, conn: u64, buf: u64, len: u64, direction: u32) -> bool {
    let call = TlsCall {
        ssl: conn,
        buf,
        num: len,
        out: 0,
        // SAFETY: helper without preconditions.
        ts_enter: unsafe { bpf_ktime_get_ns() },
        direction,
        ex: 0,
        sock_io: 0,
        _pad: 0,
        // Set by the caller (BPF functions take 5 arguments at most).
        goroutine: 0,
    };
    TLS_CALLS.insert(&key, &call, 0).is_ok()
}

/// At a RET of a hooked function whose entry noted a call of `direction`: RAX is a read's byte
/// count. An entry of another direction is an outer call's (a handshake inside a read).
#[inline(always)]
fn go_return(ctx: &ProbeContext, direction: u32) {
    go_return_walk::<true>(ctx, direction);
}

#[inline(always)]
fn go_return_walk<const WALK: bool>(ctx: &ProbeContext, direction: u32) {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: as in `go_enter`.
    let (n, g) = unsafe {
        let r = &*ctx.regs;
        (r.rax as i64, r.r14)
    };
    let key = go_key(id >> 32, g);
    // SAFETY: the value is copied out before the entry is removed.
    let Some(call) = (unsafe { TLS_CALLS.get(&key) }).copied() else {
        return;
    };
    if call.direction != direction {
        return;
    }
    if TLS_CALLS.remove(&key).is_ok() {
        busy_add(BUSY_ALL, u64::MAX);
        busy_add(BUSY_GO, u64::MAX);
    }
    if direction == DIR_INGRESS && n > 0 {
        send_plaintext::<WALK>(&call, id, n as u64);
    }
}

/// At the entry of a Go method: its process, its receiver (RAX under Go's register ABI) and
/// the goroutine (R14).
#[inline(always)]
fn go_receiver(ctx: &ProbeContext) -> (u64, u64, u64) {
    let tgid = bpf_get_current_pid_tgid() >> 32;
    // SAFETY: as in `go_enter`.
    let r = unsafe { &*ctx.regs };
    (tgid, r.rax, r.r14)
}

/// Entry of `net/http.(*persistConn).writeLoop` (RAX the `*persistConn`): this goroutine
/// writes that connection's requests until the function returns. Entered again after a stack
/// growth: counted once.
#[inline(always)]
fn go_write_loop_entry(ctx: &ProbeContext, _direction: u32) {
    let (tgid, pc, g) = go_receiver(ctx);
    let key = go_key(tgid, g);
    // SAFETY: value copied out at once.
    let fresh = unsafe { GO_WRITE_LOOPS.get(&key) }.is_none();
    if GO_WRITE_LOOPS.insert(&key, &pc, 0).is_ok() && fresh {
        busy_add(BUSY_GO_LOOPS, 1);
    }
}

/// At a RET of `(*persistConn).writeLoop`: the connection is closing; the goroutine (and its
/// `runtime.g`, which Go reuses) no longer writes for it.
#[inline(always)]
fn go_write_loop_return(ctx: &ProbeContext, _direction: u32) {
    let (tgid, _, g) = go_receiver(ctx);
    if GO_WRITE_LOOPS.remove(&go_key(tgid, g)).is_ok() {
        busy_add(BUSY_GO_LOOPS, u64::MAX);
    }
}

/// Entry of `net/http.(*persistConn).roundTrip` (RAX the `*persistConn`), in the goroutine
/// that asked for the request: the write loop's next request is this goroutine's.
#[inline(always)]
fn go_round_trip_entry(ctx: &ProbeContext, _direction: u32) {
    let (tgid, pc, g) = go_receiver(ctx);
    let _ = GO_ROUND_TRIPS.insert(&go_key(tgid, pc), &g, 0);
}

macro_rules! go_hooks {
    ($($multi:ident, $single:ident, $body:ident, $dir:expr;)*) => {$(
        #[uprobe(multi)]
        pub fn $multi(ctx: ProbeContext) -> u32 {
            $body(&ctx, $dir);
            0
        }

        #[uprobe]
        pub fn $single(ctx: ProbeContext) -> u32 {
            $body(&ctx, $dir);
            0
        }
    )*};
}

go_hooks! {
    go_tls_write_entry, go_tls_write_entry_1, go_enter, DIR_EGRESS;
    go_tls_read_entry, go_tls_read_entry_1, go_enter, DIR_INGRESS;
    go_tls_handshake_entry, go_tls_handshake_entry_1, go_enter, 0;
    go_tls_write_return, go_tls_write_return_1, go_return, DIR_EGRESS;
    go_tls_read_return, go_tls_read_return_1, go_return, DIR_INGRESS;
    go_tls_handshake_return, go_tls_handshake_return_1, go_return, 0;
    go_http_write_loop_entry, go_http_write_loop_entry_1, go_write_loop_entry, 0;
    go_http_write_loop_return, go_http_write_loop_return_1, go_write_loop_return, 0;
    go_http_round_trip_entry, go_http_round_trip_entry_1, go_round_trip_entry, 0;
}
