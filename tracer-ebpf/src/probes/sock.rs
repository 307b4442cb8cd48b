//! `sock:*` tracepoints: which TCP socket a syscall touched, and connection lifecycle.
use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{
            bpf_get_current_cgroup_id, bpf_ktime_get_ns, bpf_sk_storage_delete, bpf_sk_storage_get,
        },
    },
    macros::{btf_tracepoint, raw_tracepoint, tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use tracer_common::{
    AF_INET, AF_INET6, BODY_ONE_AT_A_TIME, BODY_SKIP, BodyKey, ConnEvent, DIR_EGRESS, DIR_INGRESS,
    EventHeader, EventKind, FLAG_PEER_RESET, KernelStat, OPAQUE_NOT_HTTP, OPAQUE_TLS,
    PEER_FIN_NONE, PEER_FIN_SEEN, SockState, SockTuple, TCP_CLOSE, TCP_ESTABLISHED, TCP_FIN_WAIT1,
    TCP_LAST_ACK, TCP_SYN_RECV, TCP_SYN_SENT,
};

use crate::maps::{
    ACTIVE, BODIES, BODIES_ASKED, OPAQUE, OPAQUE_ASKED, RESET_IN, SOCK_STATES, SOCKS, SyscallArgs,
    connect_wakeup_flags, count, count_n, ring, wakeup_flags,
};

/// Where a socket's state is kept.
pub trait Store {
    fn get(sk: u64) -> Option<*mut SockState>;
    /// Sets the socket's state, whatever was there.
    fn put(sk: u64, state: &SockState);
    fn remove(sk: u64);
    /// A field of the socket at byte `off`, zero when it cannot be read: a checked helper
    /// read by default, a plain load where the socket is a typed pointer.
    #[inline(always)]
    fn load<T: Copy + Default>(sk: u64, off: u64) -> T {
        // SAFETY: `sk` is a live `struct sock *` handed to us by a tracepoint; reads are checked.
        unsafe { bpf_probe_read_kernel((sk + off) as *const T) }.unwrap_or_default()
    }
    /// The socket's 4-tuple, read from the socket itself.
    #[inline(always)]
    fn tuple(sk: u64) -> SockTuple {
        tuple_from_sock::<Self>(sk)
    }
}

/// In `SOCKS`, by the socket's address: for programs whose socket is a plain number (classic
/// and raw tracepoints).
pub struct ByAddress;

impl Store for ByAddress {
    #[inline(always)]
    fn get(sk: u64) -> Option<*mut SockState> {
        SOCKS.get_ptr_mut(&sk)
    }
    #[inline(always)]
    fn put(sk: u64, state: &SockState) {
        let _ = SOCKS.insert(&sk, state, 0);
    }
    #[inline(always)]
    fn remove(sk: u64) {
        let _ = SOCKS.remove(&sk);
    }
}

/// In the socket (`SOCK_STATES`): for BTF tracepoints, where `sk` is the typed pointer the
/// tracepoint gave (the verifier checks it is one).
pub struct InSocket;

/// `BPF_SK_STORAGE_GET_F_CREATE`.
const SK_STORAGE_CREATE: u64 = 1;

impl InSocket {
    #[inline(always)]
    fn storage(sk: u64, init: *const SockState, flags: u64) -> Option<*mut SockState> {
        // SAFETY: the map is a socket storage map of `SockState`; `sk` is a `struct sock *`
        // from the tracepoint and `init` null or a whole `SockState`.
        let p = unsafe {
            bpf_sk_storage_get(
                (&raw const SOCK_STATES).cast_mut().cast(),
                sk as *mut _,
                init.cast_mut().cast(),
                flags,
            )
        };
        (!p.is_null()).then_some(p.cast())
    }
}

impl Store for InSocket {
    #[inline(always)]
    fn get(sk: u64) -> Option<*mut SockState> {
        Self::storage(sk, core::ptr::null(), 0)
    }
    #[inline(always)]
    fn put(sk: u64, state: &SockState) {
        // Created with `state`, or already there: then overwritten. A create can lose a race
        // with another CPU creating it at the same moment: then it is there to be found.
        if let Some(p) = Self::storage(sk, state, SK_STORAGE_CREATE).or_else(|| Self::get(sk)) {
            // SAFETY: the socket's own storage, live while this program runs.
            unsafe { *p = *state };
        }
    }
    #[inline(always)]
    fn remove(sk: u64) {
        // SAFETY: as in `storage`.
        unsafe { bpf_sk_storage_delete((&raw const SOCK_STATES).cast_mut().cast(), sk as *mut _) };
    }
    /// Plain loads through the typed socket (the verifier checks each against `struct sock`
    /// and guards it), not a helper call per field: three tuples are read per connection.
    #[inline(always)]
    fn load<T: Copy + Default>(sk: u64, off: u64) -> T {
        // SAFETY: `sk` is the tracepoint's typed `struct sock *`; `off` is a constant or a
        // read-only global patched by the loader (frozen: the verifier knows it).
        unsafe { read_volatile((sk as *const u8).add(off as usize).cast::<T>()) }
    }
}

pub const IPPROTO_TCP: u16 = 6;
pub const MSG_PEEK: i32 = 2;

/// `sock:sock_send_length` / `sock_recv_length` record: sk, family, protocol, ret, flags.
pub const LEN_SK: usize = 8;
pub const LEN_FAMILY: usize = 16;
pub const LEN_PROTOCOL: usize = 18;
pub const LEN_RET: usize = 20;
pub const LEN_FLAGS: usize = 24;

/// `sock:inet_sock_set_state` record.
const SS_SKADDR: usize = 8;
const SS_OLDSTATE: usize = 16;
const SS_NEWSTATE: usize = 20;
const SS_SPORT: usize = 24;
const SS_DPORT: usize = 26;
const SS_FAMILY: usize = 28;
const SS_PROTOCOL: usize = 30;
const SS_SADDR: usize = 32;
const SS_DADDR: usize = 36;
const SS_SADDR_V6: usize = 40;
const SS_DADDR_V6: usize = 56;

/// `struct sock_common` fields that have not moved since Linux 2.6: used for sockets opened
/// before the tracer started, whose `inet_sock_set_state` it never saw.
const SKC_DADDR: u64 = 0;
const SKC_RCV_SADDR: u64 = 4;
const SKC_DPORT: u64 = 12;
const SKC_NUM: u64 = 14;
pub const SKC_FAMILY: u64 = 16;
const SKC_STATE: u64 = 18;

/// Byte offset of `sk_protocol` in `struct sock`, from the kernel's BTF (set by the loader;
/// the raw programs are only attached when it is known).
#[unsafe(no_mangle)]
pub static SK_PROTOCOL_OFFSET: u32 = 0;

/// Byte offsets of `bytes_received` and `bytes_acked` in `struct tcp_sock`, from the kernel's
/// BTF (0: unknown, and then no byte counts are sent).
#[unsafe(no_mangle)]
static TCP_BYTES_RECEIVED_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TCP_BYTES_ACKED_OFFSET: u32 = 0;

/// Byte offsets of `write_seq` (the sequence number after the last byte queued to send) and
/// `copied_seq` (after the last byte read) in `struct tcp_sock` (0: unknown).
#[unsafe(no_mangle)]
static TCP_WRITE_SEQ_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TCP_COPIED_SEQ_OFFSET: u32 = 0;

/// The TCP sequence number of the first of the `ret` bytes a send or receive on `sk` just
/// moved (the send queued them, the receive consumed them: peeks are not traced), or 0 when
/// not known.
#[inline(always)]
pub fn first_seq(sk: u64, direction: u32, ret: u64) -> u32 {
    let at = if direction == DIR_EGRESS {
        &TCP_WRITE_SEQ_OFFSET
    } else {
        &TCP_COPIED_SEQ_OFFSET
    };
    // SAFETY: a read-only global patched by the loader; volatile so LLVM does not fold the 0.
    let off = unsafe { read_volatile(at) } as u64;
    if off == 0 || sk == 0 {
        return 0;
    }
    // SAFETY: `sk` is the call's live TCP socket; the read is checked.
    match unsafe { bpf_probe_read_kernel((sk + off) as *const u32) } {
        Ok(end) => end.wrapping_sub(ret as u32),
        Err(_) => 0,
    }
}

/// Byte offset of `sk_flags` in `struct sock` (0: unknown).
#[unsafe(no_mangle)]
static SK_FLAGS_OFFSET: u32 = 0;

/// `SOCK_DONE`, which only `tcp_fin` sets: whether a closing socket took in its peer's FIN. The
/// state it closes from does not say (an orphan's FIN_WAIT2 ends before the FIN comes).
#[inline(always)]
fn peer_fin(sk: u64) -> u32 {
    const SOCK_DONE: u64 = 1 << 1;
    // SAFETY: a read-only global patched by the loader; volatile so LLVM does not fold the 0.
    let off = unsafe { read_volatile(&SK_FLAGS_OFFSET) } as u64;
    if off == 0 {
        return 0;
    }
    // SAFETY: `sk` is the tracepoint's live socket; the read is checked.
    match unsafe { bpf_probe_read_kernel((sk + off) as *const u64) } {
        Ok(f) if f & SOCK_DONE != 0 => PEER_FIN_SEEN,
        Ok(_) => PEER_FIN_NONE,
        Err(_) => 0,
    }
}

/// Byte offsets of `srtt_us` and `total_retrans` in `struct tcp_sock` (0: unknown).
#[unsafe(no_mangle)]
static TCP_SRTT_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static TCP_RETRANS_OFFSET: u32 = 0;

/// Two fields of a closing TCP socket at the offsets the loader patched into `a` and `b` (zeros
/// when BTF did not give them).
#[inline(always)]
fn tcp_fields<T: Default>(sk: u64, a: &u32, b: &u32) -> (T, T) {
    // SAFETY: read-only globals patched by the loader; volatile so LLVM does not fold the 0.
    let (a, b) = unsafe { (read_volatile(a) as u64, read_volatile(b) as u64) };
    if a == 0 || b == 0 {
        return (T::default(), T::default());
    }
    // SAFETY: `sk` is the tracepoint's live TCP socket; reads are checked.
    unsafe {
        (
            bpf_probe_read_kernel((sk + a) as *const T).unwrap_or_default(),
            bpf_probe_read_kernel((sk + b) as *const T).unwrap_or_default(),
        )
    }
}

/// Offsets of `skc_v6_rcv_saddr` and `skc_v6_daddr` in `struct sock_common`, from the kernel's
/// BTF (set by the loader; 0 when unknown): for IPv6 sockets older than the daemon.
#[unsafe(no_mangle)]
static SKC_V6_RCV_SADDR_OFFSET: u32 = 0;
#[unsafe(no_mangle)]
static SKC_V6_DADDR_OFFSET: u32 = 0;

/// What `sock_{send,recv}_length` says about one call, read once its return value shows that
/// it moved bytes.
pub struct Record {
    pub sk: u64,
    pub flags: i32,
    pub family: u16,
    pub protocol: u16,
}

/// The classic tracepoint's record: the kernel already read family and protocol.
#[inline(always)]
pub fn from_tracepoint(ctx: &TracePointContext) -> Record {
    // SAFETY: offsets from the tracepoint's format, checked by the loader.
    unsafe {
        Record {
            sk: ctx.read_at::<u64>(LEN_SK).unwrap_or(0),
            flags: ctx.read_at::<i32>(LEN_FLAGS).unwrap_or(0),
            family: ctx.read_at::<u16>(LEN_FAMILY).unwrap_or(0),
            protocol: ctx.read_at::<u16>(LEN_PROTOCOL).unwrap_or(0),
        }
    }
}

/// A socket's state, as far as it was looked up.
#[derive(Clone, Copy)]
pub enum Lookup {
    Found(*mut SockState),
    Missing,
    NotYet,
}

/// Whether the data path follows this call, and the socket's state: TCP over IPv4/IPv6, not a
/// peek, not a socket the daemon found to carry no HTTP. Peeks and opaque sockets are counted.
/// One lookup of the socket's state serves both the opaque test and the event.
#[inline(always)]
pub fn traced_socket<S: Store>(r: &Record, direction: u32) -> Option<Lookup> {
    if r.protocol != IPPROTO_TCP || (r.family != AF_INET && r.family != AF_INET6) {
        return None;
    }
    if direction == DIR_INGRESS && r.flags & MSG_PEEK != 0 {
        count(KernelStat::Peeks);
        return None;
    }
    let Some(state) = S::get(r.sk) else {
        return Some(Lookup::Missing);
    };
    // SAFETY: a live map value, used while this program runs.
    unsafe {
        if (*state).opaque == 0 && !take_opaque_mark(r.sk, &mut *state) {
            return Some(Lookup::Found(state));
        }
        count(if (*state).opaque == OPAQUE_TLS {
            KernelStat::TlsCiphertext
        } else {
            KernelStat::SkippedOpaque
        });
    }
    None
}

/// Whether two tuples are the same, word by word (`SockTuple` is 8-byte aligned).
#[inline(always)]
pub fn same_tuple(a: &SockTuple, b: &SockTuple) -> bool {
    let (a, b) = (
        (a as *const SockTuple).cast::<u64>(),
        (b as *const SockTuple).cast::<u64>(),
    );
    let mut i = 0;
    let mut same = true;
    while i < core::mem::size_of::<SockTuple>() / 8 {
        // SAFETY: within both tuples, at 8-byte aligned offsets of 8-byte aligned values.
        same &= unsafe { a.add(i).read() == b.add(i).read() };
        i += 1;
    }
    same
}

/// Applies the daemon's finding that this connection carries no HTTP, if it has made one (in
/// `OPAQUE`, with the connection's tuple). Looked for in a connection's first events, when the
/// daemon classifies it, and every 16th after, not on every event. The kernel sets the mark
/// in its own state: the daemon never writes it, and a request for an earlier socket at
/// this address (another tuple) is dropped, not applied.
#[inline(always)]
fn take_opaque_mark(sk: u64, state: &mut SockState) -> bool {
    let applies = opaque_requested(sk, &state.tuple, state.seq);
    if applies {
        state.opaque = OPAQUE_NOT_HTTP;
    }
    applies
}

/// Whether the daemon asked that the connection `sk` with `tuple`, at event `seq`, be no longer
/// followed (the request is taken: removed).
#[inline(always)]
pub fn opaque_requested(sk: u64, tuple: &SockTuple, seq: u32) -> bool {
    if seq >= 8 && seq & 15 != 0 {
        return false;
    }
    if OPAQUE_ASKED.get(0).is_none_or(|asked| *asked == 0) {
        return false;
    }
    let Some(wanted) = OPAQUE.get_ptr(&sk) else {
        return false;
    };
    // SAFETY: a live map value.
    let applies = same_tuple(unsafe { &*wanted }, tuple);
    let _ = OPAQUE.remove(&sk);
    applies
}

/// Drops a request the daemon made for an earlier socket at this address. Looked up first: a
/// delete takes the bucket's lock even when there is nothing to delete, as for nearly every
/// new connection.
#[inline(always)]
fn forget_opaque_request(sk: u64) {
    if OPAQUE.get_ptr(&sk).is_some() {
        let _ = OPAQUE.remove(&sk);
    }
}

/// What the daemon's framing of this direction of the connection (`BODIES`) makes of a call
/// moving `ret` bytes from TCP sequence number `start` on: (wholly inside a body: no payload;
/// messages go one at a time: a call that begins none is trimmed). An entry naming another
/// connection (an earlier socket's) goes; a body's end, once a call reaches it.
#[inline(always)]
pub fn framing(sk: u64, direction: u32, tuple: &SockTuple, start: u32, ret: u64) -> (bool, bool) {
    if BODIES_ASKED.get(0).is_none_or(|asked| *asked == 0) {
        return (false, false);
    }
    let key = BodyKey::new(sk, direction);
    let Some(body) = BODIES.get_ptr_mut(&key) else {
        return (false, false);
    };
    // SAFETY: a live map value, written in place (the daemon rewrites it whole).
    unsafe {
        let flags = (*body).flags;
        // No flags: the daemon took back what it had said (the connection pipelined).
        if flags == 0 || !same_tuple(&(*body).tuple, tuple) {
            let _ = BODIES.remove(&key);
            return (false, false);
        }
        let mut skip = false;
        if flags & BODY_SKIP != 0 {
            // Sequence numbers wrap: the distance to the end is signed.
            let left = i64::from((*body).end_seq.wrapping_sub(start) as i32);
            let ret = ret as i64;
            skip = left >= ret;
            if left <= ret {
                if flags & BODY_ONE_AT_A_TIME == 0 {
                    let _ = BODIES.remove(&key);
                } else {
                    (*body).flags = flags & !BODY_SKIP;
                }
            }
        }
        (skip, !skip && flags & BODY_ONE_AT_A_TIME != 0)
    }
}

/// Whether the daemon said this direction of the connection carries its messages one at a
/// time, for TLS plaintext (no place in the TCP stream, so no body end): a lookup and a test,
/// all the TLS return programs have room for under 6.1's verifier (`framing` is too much).
/// An entry left by an earlier socket at the address went when this connection began.
#[inline(always)]
pub fn one_at_a_time(sk: u64, direction: u32) -> bool {
    if BODIES_ASKED.get(0).is_none_or(|asked| *asked == 0) {
        return false;
    }
    // SAFETY: a live map value.
    BODIES
        .get_ptr(&BodyKey::new(sk, direction))
        .is_some_and(|body| unsafe { (*body).flags } & BODY_ONE_AT_A_TIME != 0)
}

/// Drops what the daemon framed for an earlier socket at this address (a new connection's
/// sequence numbers could fall inside it).
#[inline(always)]
fn forget_bodies(sk: u64) {
    if BODIES_ASKED.get(0).is_none_or(|asked| *asked == 0) {
        return;
    }
    let (sent, received) = (BodyKey::new(sk, DIR_EGRESS), BodyKey::new(sk, DIR_INGRESS));
    if BODIES.get_ptr(&sent).is_some() {
        let _ = BODIES.remove(&sent);
    }
    if BODIES.get_ptr(&received).is_some() {
        let _ = BODIES.remove(&received);
    }
}

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    on_length(&ctx, DIR_EGRESS);
    0
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    on_length(&ctx, DIR_INGRESS);
    0
}

#[inline(always)]
fn on_length(ctx: &TracePointContext, direction: u32) {
    let id = bpf_get_current_pid_tgid();
    let Some(args) = ACTIVE.get_ptr_mut(&id) else {
        return;
    };
    // SAFETY: the entry is this thread's own; offsets from the tracepoint's format.
    unsafe {
        let args = &mut *args;
        if args.direction != direction {
            return;
        }
        let r = from_tracepoint(ctx);
        if !syscall_follows(id, &r, args) {
            let _ = ACTIVE.remove(&id);
            return;
        }
        args.sk = r.sk;
    }
}

/// Whether the syscall data paths follow this call on socket `r`: not a TLS library's
/// ciphertext, TCP, not opaque. Without the task's registers here: Go's crypto/tls is not
/// followed on these paths.
#[inline(always)]
pub fn syscall_follows(id: u64, r: &Record, args: &SyscallArgs) -> bool {
    !(super::tls::claim::<ByAddress>(id, r, || 0)
        || (args.direction == DIR_EGRESS
            && super::tls::bind_after::<ByAddress>(id, r, || super::data::first_bytes::<3>(args)))
        || traced_socket::<ByAddress>(r, args.direction).is_none())
}

/// A socket's record read from the socket itself (family, and protocol at its BTF offset).
#[inline(always)]
pub fn from_sk(sk: u64, flags: i32) -> Record {
    // SAFETY: a read-only global patched by the loader; volatile so LLVM does not fold the 0.
    let off = unsafe { read_volatile(&SK_PROTOCOL_OFFSET) } as u64;
    // SAFETY: `sk` is a kernel socket; reads are checked.
    unsafe {
        Record {
            sk,
            flags,
            family: bpf_probe_read_kernel((sk + SKC_FAMILY) as *const u16).unwrap_or(0),
            protocol: bpf_probe_read_kernel((sk + off) as *const u16).unwrap_or(0),
        }
    }
}

/// What the data path learns of a socket for its next event.
pub struct NextEvent {
    pub tuple: SockTuple,
    pub seq: u32,
    /// The tuple had to be read from the socket itself.
    pub from_sock: bool,
    /// The socket's state, if it has one: its `task` says whose name and cgroup the
    /// last delivered event carried.
    pub state: Option<*mut SockState>,
    /// When not null, `seq` is only the number this event will likely get: it takes this
    /// counter's next one when it is sent (TLS plaintext, numbered per direction: a uprobe
    /// program can be preempted while it builds its event, which would then reach the ring
    /// after a later one).
    pub late: *mut u32,
}

/// The 4-tuple of `sk` and its next event number.
#[inline(always)]
pub fn next_event<S: Store>(sk: u64, lookup: Lookup) -> NextEvent {
    let state = match lookup {
        Lookup::Found(state) => Some(state),
        Lookup::Missing => None,
        Lookup::NotYet => S::get(sk),
    };
    if let Some(state) = state {
        // SAFETY: a live map value. Two threads writing one socket from two CPUs at once can
        // race here (and their events can reach the ring in either order); userspace then sees
        // a gap and restarts the connection's pairing, counted. Atomic fetch-add would need
        // BPF v3 codegen.
        unsafe {
            let seq = (*state).seq.wrapping_add(1);
            (*state).seq = seq;
            return NextEvent {
                tuple: (*state).tuple,
                seq,
                from_sock: false,
                state: Some(state),
                late: core::ptr::null_mut(),
            };
        }
    }
    // SAFETY: `sk` is a live `struct sock *` handed to us by the tracepoint; reads are checked.
    let closed = unsafe { bpf_probe_read_kernel((sk + SKC_STATE) as *const u8) }
        .is_ok_and(|s| u32::from(s) == TCP_CLOSE);
    let t = S::tuple(sk);
    // A socket already closed (reset, or a half-closed one whose peer finished) is read to its
    // end without an entry: one made now by address would outlive it and pass its state (an
    // opaque mark above all) to the next socket at this address, and the daemon, which has
    // handled its close, would not follow it anyway. Its events go unnumbered (0).
    if closed {
        return NextEvent {
            tuple: t,
            seq: 0,
            from_sock: true,
            state: None,
            late: core::ptr::null_mut(),
        };
    }
    let state = SockState {
        tuple: t,
        seq: 1,
        opaque: 0,
        task: 0,
        h2: 0,
        h2_carry: [0; 2],
        lost_requests: 0,
    };
    S::put(sk, &state);
    NextEvent {
        tuple: t,
        seq: 1,
        from_sock: true,
        state: None,
        late: core::ptr::null_mut(),
    }
}

/// `sk`'s 4-tuple, read from `struct sock_common`.
#[inline(always)]
fn tuple_from_sock<S: Store + ?Sized>(sk: u64) -> SockTuple {
    let mut t = SockTuple::default();
    let family: u16 = S::load(sk, SKC_FAMILY);
    t.family = family;
    t.local_port = S::load(sk, SKC_NUM);
    t.remote_port = u16::from_be(S::load(sk, SKC_DPORT));
    if family == AF_INET {
        t.local_addr[..4].copy_from_slice(&S::load::<[u8; 4]>(sk, SKC_RCV_SADDR));
        t.remote_addr[..4].copy_from_slice(&S::load::<[u8; 4]>(sk, SKC_DADDR));
    } else if family == AF_INET6 {
        // SAFETY: read-only globals patched by the loader.
        let (local, remote) = unsafe {
            (
                read_volatile(&SKC_V6_RCV_SADDR_OFFSET) as u64,
                read_volatile(&SKC_V6_DADDR_OFFSET) as u64,
            )
        };
        // Zero when the kernel's BTF did not say where they are: addresses stay unknown.
        if local != 0 && remote != 0 {
            t.local_addr = S::load(sk, local);
            t.remote_addr = S::load(sk, remote);
        }
    }
    t
}

/// The changes the daemon acts on: a connect (who connects), a client connection up, a
/// server's connection up from a client that may be on another host (not loopback: a client
/// on this host is known by its connect), this end closing, and the end. The rest
/// (FIN_WAIT2, CLOSE_WAIT, SYN_RECV) only kept the map above and would cost a ring-buffer
/// record each.
#[inline(always)]
fn wanted(old_state: u32, new_state: u32, tuple: &SockTuple) -> bool {
    match new_state {
        TCP_SYN_SENT | TCP_LAST_ACK | TCP_CLOSE => true,
        TCP_ESTABLISHED => {
            old_state == TCP_SYN_SENT || (old_state == TCP_SYN_RECV && !loopback_peer(tuple))
        }
        TCP_FIN_WAIT1 => old_state == TCP_ESTABLISHED,
        _ => false,
    }
}

/// 127.0.0.0/8, ::1 or ::ffff:127.0.0.0/104.
#[inline(always)]
fn loopback_peer(t: &SockTuple) -> bool {
    let a = &t.remote_addr;
    if t.family != AF_INET6 {
        return a[0] == 127;
    }
    let zero10 = a[..10].iter().all(|b| *b == 0);
    (zero10 && a[10] == 0xff && a[11] == 0xff && a[12] == 127)
        || (zero10 && a[10..15].iter().all(|b| *b == 0) && a[15] == 1)
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: offsets from the tracepoint's format.
    unsafe { on_state_record(&ctx) };
    0
}

/// The same, as a raw tracepoint, `(const struct sock *sk, int oldstate, int newstate)`: no
/// trace record is built for it (about 10 per connection); protocol and tuple are read from
/// the socket, as for sockets older than the daemon. Attached when BTF gives `sk_protocol`.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn raw_inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    state_change::<ByAddress>(sk, ctx.arg::<u64>(1), ctx.arg::<u64>(2), || {
        // SAFETY: a read-only global patched by the loader; `sk` is the kernel's live socket.
        unsafe {
            let off = read_volatile(&SK_PROTOCOL_OFFSET) as u64;
            bpf_probe_read_kernel((sk + off) as *const u16).unwrap_or(0)
        }
    });
    0
}

/// The same as a BTF tracepoint: the socket is a typed pointer, so its protocol is a plain
/// load and its state is in the socket (`InSocket`), as the BTF data path keeps it.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk = ctx.arg::<*const u8>(0);
    state_change::<InSocket>(sk as u64, ctx.arg::<u64>(1), ctx.arg::<u64>(2), || {
        // SAFETY: a read-only global patched by the loader (frozen: the verifier knows it); the
        // load through the BTF-typed socket is checked and guarded.
        unsafe {
            let off = read_volatile(&SK_PROTOCOL_OFFSET) as usize;
            read_volatile(sk.add(off).cast::<u16>())
        }
    });
    0
}

/// A state change from a tracepoint that gives the socket and both states: the wanted ones of
/// TCP sockets (the protocol read only for those), with the tuple read from the socket.
#[inline(always)]
fn state_change<S: Store>(sk: u64, old_state: u64, new_state: u64, protocol: impl FnOnce() -> u16) {
    let (old_state, new_state) = (old_state as u32, new_state as u32);
    if state_wanted(new_state) && protocol() == IPPROTO_TCP {
        // SAFETY: `sk` is the tracepoint's live socket.
        unsafe { on_state::<S>(sk, old_state, new_state, None) };
    }
}

/// SYN_RECV, FIN_WAIT2, CLOSE_WAIT, CLOSING, LISTEN: nothing to keep or send (3 of about 10
/// changes per connection end before reading anything else).
#[inline(always)]
fn state_wanted(new_state: u32) -> bool {
    matches!(
        new_state,
        TCP_SYN_SENT | TCP_ESTABLISHED | TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_CLOSE
    )
}

/// The classic tracepoint's record.
#[inline(always)]
unsafe fn on_state_record(ctx: &TracePointContext) {
    unsafe {
        if ctx.read_at::<u16>(SS_PROTOCOL).unwrap_or(0) != IPPROTO_TCP {
            return;
        }
        let sk = ctx.read_at::<u64>(SS_SKADDR).unwrap_or(0);
        let old_state = ctx.read_at::<i32>(SS_OLDSTATE).unwrap_or(0) as u32;
        let new_state = ctx.read_at::<i32>(SS_NEWSTATE).unwrap_or(0) as u32;
        if !state_wanted(new_state) {
            return;
        }
        let mut tuple = SockTuple {
            local_port: ctx.read_at::<u16>(SS_SPORT).unwrap_or(0),
            remote_port: ctx.read_at::<u16>(SS_DPORT).unwrap_or(0),
            family: ctx.read_at::<u16>(SS_FAMILY).unwrap_or(0),
            ..SockTuple::default()
        };
        if tuple.family == AF_INET6 {
            tuple.local_addr = ctx.read_at::<[u8; 16]>(SS_SADDR_V6).unwrap_or([0; 16]);
            tuple.remote_addr = ctx.read_at::<[u8; 16]>(SS_DADDR_V6).unwrap_or([0; 16]);
        } else {
            tuple.local_addr[..4]
                .copy_from_slice(&ctx.read_at::<[u8; 4]>(SS_SADDR).unwrap_or([0; 4]));
            tuple.remote_addr[..4]
                .copy_from_slice(&ctx.read_at::<[u8; 4]>(SS_DADDR).unwrap_or([0; 4]));
        }
        on_state::<ByAddress>(sk, old_state, new_state, Some(tuple));
    }
}

/// A state change of `sk`, with its tuple as the classic tracepoint gives it, or None to read it
/// (the raw tracepoint): from the socket's entry once it is up (at close the kernel has
/// already released the local port, which then reads 0), else from the socket.
#[inline(always)]
unsafe fn on_state<S: Store>(sk: u64, old_state: u32, new_state: u32, tuple: Option<SockTuple>) {
    unsafe {
        // A connect starts clean, whatever an earlier socket at this address left: no lookup.
        if new_state == TCP_SYN_SENT {
            let tuple = match tuple {
                Some(t) => t,
                None => S::tuple(sk),
            };
            S::put(sk, &fresh(tuple));
            forget_opaque_request(sk);
            forget_bodies(sk);
            emit_conn(sk, tuple, old_state, new_state, 0, core::ptr::null_mut());
            return;
        }
        let existing = S::get(sk);
        let tuple = match (tuple, existing) {
            (Some(t), _) => t,
            (None, Some(s)) if matches!(new_state, TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_CLOSE) => {
                (*s).tuple
            }
            (None, _) => S::tuple(sk),
        };
        // SAFETY: a live map value, read while this program runs.
        let seq = existing.map_or(0, |s| (*s).seq);
        let fresh = fresh(tuple);
        match (new_state, existing) {
            // A server's new connection starts clean, whatever an earlier socket at this
            // address left: its state, and an opaque request made for it (a lookup per
            // connection, which keeps such a request from waiting for a later socket with the
            // same 4-tuple).
            (TCP_ESTABLISHED, None) => {
                S::put(sk, &fresh);
                forget_opaque_request(sk);
                forget_bodies(sk);
            }
            // A client's: keep the numbering (data may already have gone out, TCP Fast Open);
            // the local port may only now be known.
            (TCP_ESTABLISHED, Some(state)) if old_state == TCP_SYN_SENT => {
                (*state).tuple = tuple;
            }
            // A server's: an entry with another tuple is an earlier socket's.
            (TCP_ESTABLISHED, Some(state)) if !same_tuple(&(*state).tuple, &tuple) => {
                S::put(sk, &fresh);
                forget_opaque_request(sk);
                forget_bodies(sk);
            }
            _ => {}
        }
        if wanted(old_state, new_state, &tuple) {
            let state = existing.unwrap_or(core::ptr::null_mut());
            emit_conn(sk, tuple, old_state, new_state, seq, state);
        }
        // After the close's event, which tells the requests the socket lost and held.
        if new_state == TCP_CLOSE {
            S::remove(sk);
        }
    }
}

/// A new connection's state: no events numbered yet, no opaque mark, no name sent.
#[inline(always)]
fn fresh(tuple: SockTuple) -> SockState {
    SockState {
        tuple,
        seq: 0,
        opaque: 0,
        task: 0,
        h2: 0,
        h2_carry: [0; 2],
        lost_requests: 0,
    }
}

/// `tcp:tcp_receive_reset`: the socket an RST was taken in for, for the change to CLOSE that
/// follows in the same call.
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_reset_in(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    if let Some(slot) = RESET_IN.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; the change it is for runs next on this CPU.
        unsafe { *slot = [sk, bpf_ktime_get_ns()] };
    }
    0
}

/// Whether this socket's change to CLOSE comes from an RST taken in just before: the slot
/// names it and is fresh (an RST for a socket already closed leaves it set; a later socket at
/// the same address must not read it).
#[inline(always)]
fn reset_taken_in(sk: u64, now: u64) -> bool {
    let Some(slot) = RESET_IN.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, as above.
    unsafe {
        let [at_sk, at] = *slot;
        if at_sk != sk {
            return false;
        }
        *slot = [0, 0];
        now.wrapping_sub(at) < 1_000_000
    }
}

/// The record of a state change the daemon acts on. At this end's close it tells the requests
/// the socket lost and held (`state`, null when it has none); read last, so that the
/// verifier's paths through the rest are not doubled.
#[inline(always)]
fn emit_conn(
    sk: u64,
    tuple: SockTuple,
    old_state: u32,
    new_state: u32,
    seq: u32,
    state: *mut SockState,
) {
    // SAFETY: helpers without preconditions; the reserved record is written whole.
    unsafe {
        // Who connects is known at the connect (and, should that event be lost, nearly so when
        // the connection is up); the other changes only need the time: two helper calls each
        // saved, four changes per connection.
        let connecting = new_state == TCP_SYN_SENT
            || (new_state == TCP_ESTABLISHED && old_state == TCP_SYN_SENT);
        // A server's connection comes up in softirq: whoever runs then is not its process.
        let (cgroup_id, comm) = if connecting {
            (
                bpf_get_current_cgroup_id(),
                bpf_get_current_comm().unwrap_or([0; 16]),
            )
        } else {
            (0, [0; 16])
        };
        // Once per connection end, where the daemon counts its bytes.
        let closing = matches!(new_state, TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_CLOSE);
        let (bytes_received, bytes_acked) = if closing {
            tcp_fields(sk, &TCP_BYTES_RECEIVED_OFFSET, &TCP_BYTES_ACKED_OFFSET)
        } else {
            (0, 0)
        };
        let (srtt, retransmits) = if closing {
            tcp_fields(sk, &TCP_SRTT_OFFSET, &TCP_RETRANS_OFFSET)
        } else {
            (0u32, 0)
        };
        let fin = if closing { peer_fin(sk) } else { 0 };
        let ts_ns = bpf_ktime_get_ns();
        let flags = if new_state == TCP_CLOSE && reset_taken_in(sk, ts_ns) {
            FLAG_PEER_RESET
        } else {
            0
        };
        // `srtt_us` holds 8 times the smoothed RTT.
        let srtt_us = srtt >> 3;
        let ring = ring();
        let wakeup = if new_state == TCP_SYN_SENT {
            connect_wakeup_flags(ring, ts_ns)
        } else {
            wakeup_flags(ring)
        };
        let held = if closing && !state.is_null() {
            (*state).lost_requests
        } else {
            0
        };
        let Some(mut entry) = ring.reserve::<ConnEvent>(0) else {
            count(KernelStat::RingbufFullConn);
            // Their last chance was this close: counted apart.
            if held != 0 && new_state == TCP_CLOSE {
                let (ingress, egress) = tracer_common::lost_requests::split(held);
                count_n(KernelStat::LostRequestUnheldIngress, ingress);
                count_n(KernelStat::LostRequestUnheldEgress, egress);
            }
            return;
        };
        entry.write(ConnEvent {
            hdr: EventHeader {
                kind: EventKind::Conn as u32,
                flags,
                ts_ns,
                pid_tgid: bpf_get_current_pid_tgid(),
                cgroup_id,
                comm,
            },
            sk,
            tuple,
            old_state,
            new_state,
            seq,
            peer_fin: fin,
            bytes_received,
            bytes_acked,
            srtt_us,
            retransmits,
            lost_requests: held,
            _pad: 0,
        });
        entry.submit(wakeup);
        count(KernelStat::ConnEvents);
        if held != 0 {
            super::data::take_lost_requests(state, held);
        }
    }
}
