//! TLS plaintext from OpenSSL (and libraries with its API): uprobes on `SSL_write`/`SSL_read`
//! (and their `_ex` forms) note each call's buffer at entry; the socket call the library makes
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
    AF_INET, AF_INET6, DIR_EGRESS, DIR_INGRESS, FLAG_TLS, FLAG_TUPLE_FROM_SOCK, KernelStat,
    OPAQUE_TLS, SockState, TUPLE_TLS,
};

use super::{
    data::emit,
    sock::{IPPROTO_TCP, NextEvent, Record, Store, opaque_requested, same_tuple},
};
use crate::maps::{
    KIND_BUF, SyscallArgs, TLS_BUSY, TLS_CALLS, TLS_OPAQUE, TLS_SCRATCH, TLS_SEEN_HANDSHAKE,
    TLS_SESSIONS, TlsCall, TlsKey, count, tracer_tgid,
};

/// Adds `delta` (wrapping) to the count of threads inside a library call. The result is not
/// used: an atomic add without fetch, which BPF before v3 has.
#[inline(always)]
fn busy_add(delta: u64) {
    if let Some(p) = TLS_BUSY.get_ptr_mut(0) {
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
    };
    // A handshake entered from another (SSL_connect calling SSL_do_handshake) replaces the
    // entry: counted once, as it is removed once.
    let fresh = TLS_CALLS.get_ptr(&id).is_none();
    if TLS_CALLS.insert(&id, &call, 0).is_ok() && fresh {
        busy_add(1);
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
    on_return(&ctx);
    0
}

#[uretprobe]
pub fn ssl_call_return_1(ctx: RetProbeContext) -> u32 {
    on_return(&ctx);
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
        busy_add(u64::MAX);
    }
    0
}

/// The return of every hooked call: a read or write that moved plaintext sends it.
#[inline(always)]
fn on_return(ctx: &RetProbeContext) {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(call) = (unsafe { TLS_CALLS.get(&id) }).copied() else {
        return;
    };
    if TLS_CALLS.remove(&id).is_ok() {
        busy_add(u64::MAX);
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
    // SAFETY: a live map value; one session is driven by one thread at a time.
    let (sk, tuple, seq, flags) = unsafe {
        let s = &mut *session;
        let seq = s.state.seq.wrapping_add(1);
        if s.flags & TLS_OPAQUE == 0 && opaque_requested(s.sk, &s.state.tuple, seq) {
            s.flags |= TLS_OPAQUE;
        }
        if s.flags & TLS_OPAQUE != 0 {
            count(KernelStat::SkippedOpaque);
            return;
        }
        s.state.seq = seq;
        (s.sk, s.state.tuple, seq, s.flags)
    };
    let args = SyscallArgs {
        buf: call.buf,
        len: call.num,
        ts_enter: call.ts_enter,
        sk,
        kind: KIND_BUF,
        direction: call.direction,
    };
    // With the session's state: HTTP/2 over TLS is walked frame by frame as on a socket, and
    // the thread's name is sent only when it changes.
    let next = NextEvent {
        tuple,
        seq,
        from_sock: false,
        // SAFETY: as above.
        state: Some(unsafe { &raw mut (*session).state }),
    };
    let mut event_flags = FLAG_TLS;
    if flags & TLS_SEEN_HANDSHAKE == 0 {
        event_flags |= FLAG_TUPLE_FROM_SOCK;
    }
    emit::<true>(&args, bytes, id, next, event_flags);
}

/// Called by the data path for each socket call: if the thread is inside a TLS library call,
/// notes which socket the session drives, marks the socket (its other calls are not sent
/// either) and says so: the call is not sent.
#[inline(always)]
pub fn claim<S: Store>(id: u64, r: &Record) -> bool {
    if TLS_BUSY.get(0).is_none_or(|busy| *busy == 0) {
        return false;
    }
    let Some(call) = TLS_CALLS.get_ptr(&id) else {
        return false;
    };
    if r.protocol != IPPROTO_TCP || (r.family != AF_INET && r.family != AF_INET6) {
        return false;
    }
    // SAFETY: this thread's own entry, live while this program runs.
    let (ssl, handshake) = unsafe { ((*call).ssl, (*call).direction == 0) };
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
        let seen = if handshake { TLS_SEEN_HANDSHAKE } else { 0 };
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
                let _ = TLS_SESSIONS.insert(&key, session, 0);
            }
        }
    }
    count(KernelStat::TlsCiphertext);
    true
}
