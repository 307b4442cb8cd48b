//! Every map and global of the eBPF side, with their sizes from `tracer_common::limits`.
use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    BodyEnd, BodyKey, DataEvent, FRAME_KEEP_CAP, FRAMES_CAP, KERNEL_STAT_COUNT, KernelStat,
    PAYLOAD_CAP, SEGMENT_HEADER, SockState, SockTuple, limits,
};

/// What `sys_enter_*` learnt, completed by `sock_*_length` and consumed by `sys_exit_*`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SyscallArgs {
    /// User buffer, iovec array or msghdr, per `kind`.
    pub buf: u64,
    /// Buffer length or iovec count.
    pub len: u64,
    pub ts_enter: u64,
    /// Socket named by `sock_*_length`; 0 while unknown or not TCP.
    pub sk: u64,
    pub kind: u32,
    pub direction: u32,
    /// A Go program's goroutine (`runtime.g`, R14 under Go's register ABI) the call works for;
    /// whatever R14 held in other programs (the daemon reads it only for Go processes); 0 where
    /// the registers are not at hand.
    pub goroutine: u64,
    /// The call's descriptor and, for recvfrom and recvmsg, its flags: the syscall paths find
    /// the socket from them where no tracepoint names it (`probes::fd`).
    pub fd: u32,
    pub flags: u32,
}

pub const KIND_BUF: u32 = 0;
pub const KIND_IOV: u32 = 1;
pub const KIND_MSG: u32 = 2;
/// No user buffer (sendfile): only the byte count is known.
pub const KIND_NONE: u32 = 3;

/// The ring buffers, one per CPU (`cpu & RING_MASK`, so CPUs share them on hosts with more
/// than four): CPUs producing into one ring contend for its lock and positions, which was
/// ~30% of the data path's time with two busy CPUs. The daemon merges them by timestamp.
/// Rings past `RING_MASK` are a page each, unused.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(limits::RINGBUF_BYTES, 0);
#[map]
pub static EVENTS_1: RingBuf = RingBuf::with_byte_size(limits::RINGBUF_BYTES, 0);
#[map]
pub static EVENTS_2: RingBuf = RingBuf::with_byte_size(limits::RINGBUF_BYTES, 0);
#[map]
pub static EVENTS_3: RingBuf = RingBuf::with_byte_size(limits::RINGBUF_BYTES, 0);

/// Rings used less one (a power of two less one, at most 3), set by the loader.
#[unsafe(no_mangle)]
static RING_MASK: u32 = 0;

/// This CPU's ring buffer.
#[inline(always)]
pub fn ring() -> &'static RingBuf {
    // SAFETY: helper without preconditions; a read-only global patched by the loader.
    let i = unsafe {
        aya_ebpf::helpers::generated::bpf_get_smp_processor_id()
            & core::ptr::read_volatile(&RING_MASK)
    };
    match i {
        0 => &EVENTS,
        1 => &EVENTS_1,
        2 => &EVENTS_2,
        _ => &EVENTS_3,
    }
}

/// Keyed by pid_tgid: one traced syscall per thread at a time. A plain hash map, not LRU: when
/// it is full a new syscall is not traced and counted (args_map_full), rather than an older
/// blocked read (an idle keep-alive connection) being forgotten without a trace.
#[map]
pub static ACTIVE: HashMap<u64, SyscallArgs> =
    HashMap::with_max_entries(limits::ACTIVE_SYSCALLS, 0);

/// Socket address -> the socket's state (4-tuple from `inet_sock_set_state`, event counter, ...),
/// for the raw and classic tracepoint paths; the BTF path keeps it in `SOCK_STATES`.
#[map]
pub static SOCKS: LruHashMap<u64, SockState> = LruHashMap::with_max_entries(limits::SOCKETS, 0);

/// The same state in the socket itself (`BPF_MAP_TYPE_SK_STORAGE`), for the BTF tracepoints,
/// whose socket is a typed pointer: found through `sk->sk_bpf_storage` rather than a hash
/// lookup (which was a tenth of the data path's time), unbounded by a table size, and freed with
/// the socket, so that a socket the kernel puts at a freed one's address starts without state.
#[btf_map]
pub static SOCK_STATES: SkStorage<SockState> = SkStorage::new();

/// The daemon's findings that a connection carries no HTTP, keyed by socket, with the
/// connection's tuple: taken into the socket's state by the data path, which checks the tuple
/// and drops a request left by an earlier socket at the address. LRU, so that a full table only
/// means tracing some opaque sockets again, and requests never looked at age out.
#[map]
pub static OPAQUE: LruHashMap<u64, SockTuple> =
    LruHashMap::with_max_entries(limits::OPAQUE_SOCKETS, 0);

/// One slot, nonzero while the daemon may have requests in `OPAQUE` (it lowers it once the map
/// is empty): looked at before `OPAQUE`, whose lookup in each new connection's first events
/// costs more than the rest of them on a host that never asks.
#[map]
pub static OPAQUE_ASKED: Array<u32> = Array::with_max_entries(1, 0);

/// Message bodies the daemon framed, by socket and direction: a call wholly inside one is sent
/// without its payload (`sock::inside_body`). The kernel side deletes an entry once a call
/// reaches its end, or when it names another connection.
#[map]
pub static BODIES: LruHashMap<BodyKey, BodyEnd> = LruHashMap::with_max_entries(limits::BODIES, 0);

/// One slot, nonzero while `BODIES` may hold an entry (as `OPAQUE_ASKED`): a host whose
/// daemon never framed a long body pays no lookup.
#[map]
pub static BODIES_ASKED: Array<u32> = Array::with_max_entries(1, 0);

/// A data event being built, and room past its payload that is never written but lets the
/// verifier accept a copy at a variable offset: it sees offset < PAYLOAD_CAP and length <=
/// PAYLOAD_CAP, not that their sum stays within the payload.
#[repr(C)]
pub struct Scratch {
    pub ev: DataEvent,
    /// An HTTP/2 call's frame segments, sent right after the whole payload.
    pub frames: [u8; FRAMES_CAP],
    /// Room for the last segment past FRAMES_CAP (and for the payload's variable-offset copies,
    /// which may run through `frames`, written after them).
    pub spill: [u8; SEGMENT_HEADER + 9 + 2 * FRAME_KEEP_CAP + PAYLOAD_CAP],
    /// The frame walk (`data::walk_frames`), kept here for its `bpf_loop` callback: where it
    /// is, what it wrote, and the call it walks.
    pub walk: Walk,
    pub gather: Gather,
    pub tail: TailFind,
    /// Bumped by each event built here: uprobe programs run preemptible (migration disabled,
    /// not preemption), so another program on this CPU may build its event here meanwhile; the
    /// builder finds the number changed and drops its event, counted (`scratch_race`).
    pub generation: u64,
}

/// The socket path's iovec copy (`data::gather_loop`), kept here for its `bpf_loop` callback.
#[repr(C)]
pub struct Gather {
    /// Where the next bytes go in the payload, and where it stops.
    pub off: u64,
    pub limit: u64,
    /// The iovec array, its length, and the next iovec to copy.
    pub iov: u64,
    pub count: u64,
    pub next: u64,
}

/// The socket path's search for where an iovec call's bytes end (`data::iov_tail`), kept here
/// for its `bpf_loop` callback.
#[repr(C)]
pub struct TailFind {
    /// The iovec array, its length, and the next iovec to look at.
    pub iov: u64,
    pub count: u64,
    pub next: u64,
    /// The call's bytes before iovec `next`, and the call's length.
    pub before: u64,
    pub ret: u64,
    /// The last non-empty iovec before `next`: its address and length.
    pub prev_base: u64,
    pub prev_len: u64,
    /// The iovec the call's bytes end in: its address, and its bytes up to that end (0: not
    /// found).
    pub end_base: u64,
    pub end_len: u64,
}

#[repr(C)]
pub struct Walk {
    pub at: u64,
    pub len: u64,
    pub buf: u64,
    pub ret: u64,
    pub captured: u64,
    /// 1: the walk reached the call's end; 2: it ended in a frame header split across this
    /// call and the next, whose carry is `split`.
    pub done: u64,
    pub split: u64,
    /// The frame header being looked at.
    pub hdr: [u8; 16],
    /// Over an iovec call (`data::iov_step`): the iovec array and its length, the buffer being
    /// read (its index, where it starts in the call's bytes, its address and length), and a
    /// header block being copied into the segment at `keep_seg` (`keep_n` bytes so far, the
    /// next at `keep_at`, up to `keep_to`; 0: none).
    pub iov: u64,
    pub count: u64,
    pub i: u64,
    pub start: u64,
    pub base: u64,
    pub blen: u64,
    pub keep_seg: u64,
    pub keep_n: u64,
    pub keep_at: u64,
    pub keep_to: u64,
    /// The scratch generation of the event being built: `data::flush_segments` stops when it
    /// changed.
    pub generation: u64,
}

/// Per-CPU scratch space for building a data event: too big for the 512-byte stack.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// When this CPU's current TCP send began (`tcp_send_start`), for the send's data event.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SendStart {
    pub pid_tgid: u64,
    pub ts_ns: u64,
    /// The thread's context switches (voluntary + involuntary) when stamped: a send that slept
    /// or was preempted since (and may have ended on another CPU) does not use the stamp.
    pub switches: u64,
}

/// Per CPU, not per thread: a hash map per send cost more than the rest of this program.
#[map]
pub static SEND_START: PerCpuArray<SendStart> = PerCpuArray::with_max_entries(1, 0);

/// The socket the last RST taken in on this CPU was for, and when (`tcp:tcp_receive_reset`
/// fires in `tcp_reset`, right before the change to CLOSE it makes, on the same CPU).
#[map]
pub static RESET_IN: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(KERNEL_STAT_COUNT, 0);

/// The daemon's own tgid, set at load time: its scrape and API traffic is never traced.
#[unsafe(no_mangle)]
static TRACER_TGID: u32 = 0;

/// Whether the kernel has `bpf_loop` (5.17+), set at load time. Where it has not, the code
/// that calls it is behind a test of this frozen global, so the verifier never walks it (an
/// unknown helper is refused only on a path it walks).
#[unsafe(no_mangle)]
static HAS_BPF_LOOP: u32 = 1;

#[inline(always)]
pub fn has_bpf_loop() -> bool {
    // SAFETY: as for `TRACER_TGID`.
    unsafe { core::ptr::read_volatile(&HAS_BPF_LOOP) != 0 }
}

#[inline(always)]
pub fn tracer_tgid() -> u32 {
    // SAFETY: a read-only global patched by the loader; volatile so LLVM does not fold the 0.
    unsafe { core::ptr::read_volatile(&TRACER_TGID) }
}

#[inline(always)]
pub fn count(stat: KernelStat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 }
    }
}

/// `count` by `n`.
#[inline(always)]
pub fn count_n(stat: KernelStat, n: u32) {
    if n == 0 {
        return;
    }
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: as in `count`.
        unsafe { *slot += u64::from(n) }
    }
}

/// Ring buffer output flags (include/uapi/linux/bpf.h).
pub const BPF_RB_NO_WAKEUP: u64 = 1;
pub const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// log2 of the pending bytes past which the reader is woken (set by the loader from a ring's
/// size: a quarter of it, at most 1 MiB; 512 KiB with the default two 2 MiB rings); below, the reader finds
/// the data on its own 20 ms poll. Each wake-up is an interrupt (a VM exit in a VM) and a
/// context switch of the reader: waking per event cost more than the rest of the program, and
/// waking every 256 KiB with a 10 ms poll, rather than 512 KiB and 20 ms, was a tenth of the
/// daemon's CPU at 20k req/s.
#[unsafe(no_mangle)]
static WAKEUP_SHIFT: u64 = 19;

/// This CPU's records since it last looked at the ring's fill, and the fill it saw then.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WakeState {
    pub records: u64,
    pub pending: u64,
    /// When this CPU last woke the reader for a connect (`connect_wakeup_flags`).
    pub connect_ns: u64,
}

#[map]
static WAKE: PerCpuArray<WakeState> = PerCpuArray::with_max_entries(1, 0);

/// Records a CPU adds between two looks at the ring's fill (a power of two): the look is a
/// helper call that reads the producer's and consumer's positions, which other CPUs write.
const LOOK_EVERY: u64 = 16;

/// Wakes the reader when the pending bytes have passed a multiple of the wake-up size since
/// this CPU last looked, not with every record past the first: until the woken reader has drained,
/// each of those raised an interrupt of its own (measured: 1 in 10 ring-buffer samples at
/// saturation was that IPI). A CPU looks every `LOOK_EVERY` records (a few KiB late at most),
/// so wake-ups are at most one per CPU per wake-up size; the reader's poll covers what they
/// miss.
#[inline(always)]
pub fn wakeup_flags(ring: &RingBuf) -> u64 {
    let Some(w) = WAKE.get_ptr_mut(0) else {
        return BPF_RB_NO_WAKEUP;
    };
    // SAFETY: per-CPU slot; a program that interrupts this one on the same CPU can at worst
    // skew one look.
    unsafe {
        (*w).records = (*w).records.wrapping_add(1);
        if (*w).records & (LOOK_EVERY - 1) != 0 {
            return BPF_RB_NO_WAKEUP;
        }
        let pending = ring.query(BPF_RB_AVAIL_DATA);
        let shift = core::ptr::read_volatile(&WAKEUP_SHIFT) & 63;
        let crossed = pending >> shift > (*w).pending >> shift;
        (*w).pending = pending;
        if crossed {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        }
    }
}

/// The least time between two wake-ups of the reader for a connect, per CPU.
const CONNECT_WAKE_NS: u64 = 100_000_000;

/// A process's connect wakes the reader (at most every `CONNECT_WAKE_NS` per CPU): the reader
/// names the client from /proc when it reads the connect, and a short-lived one (curl, a job)
/// is gone if that waits for a quiet daemon's slow poll (up to 100 ms). After it reads one, the
/// reader polls every 20 ms for a second: the next connects are read in time without a wake.
#[inline(always)]
pub fn connect_wakeup_flags(ring: &RingBuf, now: u64) -> u64 {
    let Some(w) = WAKE.get_ptr_mut(0) else {
        return BPF_RB_FORCE_WAKEUP;
    };
    // SAFETY: per-CPU slot, as in `wakeup_flags`.
    unsafe {
        if now.wrapping_sub((*w).connect_ns) >= CONNECT_WAKE_NS {
            (*w).connect_ns = now;
            return BPF_RB_FORCE_WAKEUP;
        }
    }
    wakeup_flags(ring)
}

/// A thread inside a TLS library call (`probes::tls`), from its entry to its return.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    /// The library's session (`SSL *`).
    pub ssl: u64,
    /// The plaintext buffer, its length, and for the `_ex` calls where the byte count goes.
    pub buf: u64,
    pub num: u64,
    pub out: u64,
    pub ts_enter: u64,
    /// [`DIR_EGRESS`](tracer_common::DIR_EGRESS) (a write), `DIR_INGRESS` (a read), or 0 (a
    /// handshake).
    pub direction: u32,
    /// Nonzero for `SSL_read_ex`/`SSL_write_ex` (1 on success, bytes in `*out`).
    pub ex: u32,
    /// Nonzero once the call moved bytes on a socket (`claim`): else the library is driven
    /// through a memory BIO, or had nothing to move.
    pub sock_io: u32,
    pub _pad: u32,
    /// Go's calls: the goroutine the call works for (`go_on_behalf`); 0 for OpenSSL's.
    pub goroutine: u64,
}

/// Keyed by pid_tgid, or for Go's crypto/tls by `go_key` (a goroutine moves between threads).
#[map]
pub static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(limits::TLS_CALLS, 0);

/// A TLS session of a process: which socket it drives.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsKey {
    pub ssl: u64,
    pub tgid: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsSession {
    pub sk: u64,
    /// The plaintext stream's own state, as a socket's is kept for its bytes: the tuple (marked
    /// `TUPLE_TLS`), the last plaintext event number given out (the socket's own numbering is
    /// not used: its ciphertext calls send nothing), the thread last named, HTTP/2's mark and
    /// carries. `opaque` is not used (`flags` says it).
    pub state: SockState,
    /// `TLS_SEEN_HANDSHAKE`, `TLS_OPAQUE`.
    pub flags: u32,
    /// The last plaintext event number given out for reads (`state.seq` numbers writes): a
    /// session's reads and writes can be two threads at once (Go's HTTP client and server),
    /// whose events may reach the ring in either order, so each direction is numbered on its
    /// own.
    pub seq_in: u32,
}

/// The session's socket was first seen in a handshake (else the connection may be older than
/// the tracer).
pub const TLS_SEEN_HANDSHAKE: u32 = 1;
/// The daemon found no HTTP in the plaintext.
pub const TLS_OPAQUE: u32 = 2;

#[map]
pub static TLS_SESSIONS: LruHashMap<TlsKey, TlsSession> =
    LruHashMap::with_max_entries(limits::TLS_SESSIONS, 0);

/// One slot: how many threads are inside a TLS library call (entries in `TLS_CALLS`). While it
/// is 0 (no TLS library in use, or none attached), socket calls do not look in `TLS_CALLS`.
/// A thread killed inside a call leaves it above 0: calls are then looked up, which is only
/// slower.
/// Slot `BUSY_GO`: how many of them are Go goroutines (`TLS_CALLS` keyed by goroutine), so
/// that only then is a socket call's goroutine looked up too.
/// Slot `BUSY_GO_LOOPS`: Go HTTP/1 client connections whose write loop runs (entries in
/// `GO_WRITE_LOOPS`): only then is a send's goroutine looked up there.
#[map]
pub static TLS_BUSY: Array<u64> = Array::with_max_entries(3, 0);

pub const BUSY_ALL: u32 = 0;
pub const BUSY_GO: u32 = 1;
pub const BUSY_GO_LOOPS: u32 = 2;

/// Go's HTTP/1 client writes each connection's requests from a goroutine of its own
/// (`(*persistConn).writeLoop`), not from the caller's: that goroutine, by `go_key(tgid, g)`,
/// and the connection's `*persistConn`.
#[map]
pub static GO_WRITE_LOOPS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16 * 1024, 0);

/// The goroutine that last entered `(*persistConn).roundTrip`, by `go_key(tgid, pc)`: the one
/// whose request that connection's write loop writes next (one request at a time on an HTTP/1
/// connection).
#[map]
pub static GO_ROUND_TRIPS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16 * 1024, 0);

/// The goroutine a Go program's write works for: its own, or for the write loop of a Go
/// HTTP/1 client connection, the goroutine whose round trip it carries (which may be serving a
/// request: the daemon joins the two spans).
#[inline(always)]
pub fn go_on_behalf(tgid: u64, g: u64) -> u64 {
    if TLS_BUSY.get(BUSY_GO_LOOPS).is_none_or(|n| *n == 0) {
        return g;
    }
    // SAFETY: values copied out at once.
    let Some(pc) = (unsafe { GO_WRITE_LOOPS.get(&go_key(tgid, g)) }).copied() else {
        return g;
    };
    // SAFETY: as above.
    unsafe { GO_ROUND_TRIPS.get(&go_key(tgid, pc)) }
        .copied()
        .unwrap_or(g)
}

/// The last OpenSSL call of a thread that found no socket for its session: a library driven
/// through a memory BIO (Node.js, Python's asyncio) moves no bytes on a socket inside its
/// calls, but the thread sends what the call produced right after it returns, so the thread's
/// next send of a TLS record names the session's socket (`probes::tls::bind_after`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsAfter {
    pub pid_tgid: u64,
    pub ssl: u64,
    pub ts_ns: u64,
}

#[map]
pub static TLS_AFTER: PerCpuArray<TlsAfter> = PerCpuArray::with_max_entries(1, 0);

/// The `TLS_CALLS` key of a goroutine of process `tgid` (`g`: its `runtime.g`, which Go's
/// register ABI keeps in R14): the top bit set, which no pid_tgid has.
#[inline(always)]
pub fn go_key(tgid: u64, g: u64) -> u64 {
    (1 << 63) | ((tgid & 0x7f_ffff) << 40) | (g & 0xff_ffff_ffff)
}

/// Values `probes::tls::claim` writes to maps, built here rather than on the data path's
/// stack, which has no room left for them.
#[repr(C)]
pub struct TlsScratch {
    pub state: SockState,
    pub session: TlsSession,
}

#[map]
pub static TLS_SCRATCH: PerCpuArray<TlsScratch> = PerCpuArray::with_max_entries(1, 0);
