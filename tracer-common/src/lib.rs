//! Event layout shared by the eBPF programs and the daemon.
//!
//! Every type here is `#[repr(C)]` with explicit padding so that both sides agree byte for byte;
//! the `const` asserts at the bottom fail the build if a field change moves anything.
#![no_std]

/// Bytes of payload captured from the start of each socket read/write.
///
/// 1 KiB holds the request line and headers of nearly every API request (curl sends ~80 bytes,
/// browsers 400-900) including `Host`, `Content-Length`, `Transfer-Encoding` and the trace
/// context headers, while keeping the copy per syscall small. Larger heads are still paired:
/// the request line and the first headers are parsed, and the byte count frames the rest.
/// Must be a power of two: the eBPF side masks lengths with `PAYLOAD_CAP - 1`.
pub const PAYLOAD_CAP: usize = 1024;

/// Bytes captured from the end of each single-buffer read/write that did not fit in the payload:
/// enough to see the `0\r\n\r\n` that ends a chunked body.
pub const TAIL_LEN: usize = 16;

/// Kinds of event on the ring buffer. Numbers are frozen.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Bytes a process wrote to or read from a TCP socket: [`DataEvent`].
    Data = 1,
    /// A TCP state change: [`ConnEvent`].
    Conn = 2,
    /// A process began running a new program (`sched_process_exec`): an [`EventHeader`] alone,
    /// so that the daemon looks at the program (a Go one's TLS) at once, not at its next look.
    Exec = 3,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Data),
            2 => Some(Self::Conn),
            3 => Some(Self::Exec),
            _ => None,
        }
    }
}

/// Which way the bytes went, seen from the process.
pub const DIR_EGRESS: u32 = 1;
pub const DIR_INGRESS: u32 = 2;

/// First four bytes of the HTTP/1 request lines the kernel side recognises (as little-endian
/// u32), to count requests in events it had to drop.
pub const REQUEST_STARTS: [u32; 7] = [
    u32::from_le_bytes(*b"GET "),
    u32::from_le_bytes(*b"POST"),
    u32::from_le_bytes(*b"PUT "),
    u32::from_le_bytes(*b"HEAD"),
    u32::from_le_bytes(*b"DELE"),
    u32::from_le_bytes(*b"PATC"),
    u32::from_le_bytes(*b"OPTI"),
];

/// Data event flags.
/// The 4-tuple came from reading the socket itself (the connection predates the tracer).
pub const FLAG_TUPLE_FROM_SOCK: u32 = 1 << 0;
/// The syscall used an iovec (readv/writev/sendmsg/recvmsg): its buffers are captured in order,
/// as one stream, up to PAYLOAD_CAP bytes or 16 buffers (64 on the socket data path). The tail
/// is the call's last bytes: from its first buffer when that holds them all; else (socket data
/// path, 5.17+) from the last two buffers the call moved bytes of, possibly fewer than
/// TAIL_LEN.
pub const FLAG_IOVEC: u32 = 1 << 1;
/// The header's `comm` and `cgroup_id` are left out (zero): this socket's previous event came
/// from the same thread and carried them. Read once per socket and thread (and again every
/// [`TASK_RESEND`] events), not per call.
pub const FLAG_TASK_KNOWN: u32 = 1 << 2;
/// The bytes are the plaintext a TLS library (OpenSSL's `SSL_read`/`SSL_write`) handed over or
/// returned on this socket, not what crossed the socket: its ciphertext is not sent.
pub const FLAG_TLS: u32 = 1 << 3;
/// Connection event flag: a change to CLOSE that an RST taken in caused (`tcp:tcp_receive_reset`
/// fired for the socket just before, on the same CPU), not this end's own abortive close. Set
/// only when the daemon attached that tracepoint.
pub const FLAG_PEER_RESET: u32 = 1 << 4;
/// More of this call's HTTP/2 frame segments follow, in the socket's next records
/// (`FLAG_FRAMES_CONT`): the walk filled [`FRAMES_CAP`] and sent what it had to go on copying.
pub const FLAG_FRAMES_MORE: u32 = 1 << 5;
/// This record continues the previous record of its socket and direction (the same call): only
/// its frame segments are new.
pub const FLAG_FRAMES_CONT: u32 = 1 << 6;
/// The kernel side saw this connection open in HTTP/2 (its preface, or an h2c upgrade's 101),
/// as its client's end or its server's: the daemon follows it as such even when the opening's
/// own event was lost (the ring buffer full).
pub const FLAG_H2_CLIENT: u32 = 1 << 7;
pub const FLAG_H2_SERVER: u32 = 1 << 8;
/// A socket's events carry their thread's name and cgroup again at least this often (a power of
/// two), so that a reader that lost track of a thread learns it again.
pub const TASK_RESEND: u32 = 256;

/// TCP states as the kernel numbers them (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u32 = 1;
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_SYN_RECV: u32 = 3;
pub const TCP_FIN_WAIT1: u32 = 4;
pub const TCP_FIN_WAIT2: u32 = 5;
pub const TCP_CLOSE: u32 = 7;
pub const TCP_CLOSE_WAIT: u32 = 8;
pub const TCP_LAST_ACK: u32 = 9;
pub const TCP_LISTEN: u32 = 10;
pub const TCP_CLOSING: u32 = 11;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Common header of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] as u32.
    pub kind: u32,
    pub flags: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the event was taken.
    pub ts_ns: u64,
    /// tgid << 32 | tid.
    pub pid_tgid: u64,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

/// A connection seen from one of its ends: `local` is this socket's address. 8-byte aligned
/// (it is at such offsets in every event and map value) so that the eBPF programs compare
/// tuples a word at a time: with 2-byte alignment LLVM reads them a byte at a time, each byte
/// spilled to the stack, and the programs outgrew the kernel's 512-byte stack.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    /// IPv4 addresses use the first 4 bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u16,
    /// 0, or [`TUPLE_TLS`] in the tuples of TLS plaintext events: the daemon names the
    /// connection back with the tuple it was given, so that its finding that a TLS
    /// connection's plaintext is no HTTP is not taken for its ciphertext's, nor the reverse.
    pub _pad: u16,
}

/// What the daemon knows of how one direction of a connection is framed (`BODIES`), named by
/// the connection's tuple (so that a request left for an earlier socket at the address is
/// dropped): [`BODY_SKIP`] and [`BODY_ONE_AT_A_TIME`]. Nothing reads a body's bytes (the
/// calls' counts frame it), so the kernel side sends less of the calls inside one.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyEnd {
    pub tuple: SockTuple,
    /// With [`BODY_SKIP`]: the TCP sequence number just past a body.
    pub end_seq: u32,
    pub flags: u32,
}

/// `BodyEnd::flags`: a call wholly before `end_seq` carries only body bytes, and is sent
/// without payload. The kernel side clears it once a call reaches `end_seq`.
pub const BODY_SKIP: u32 = 1;
/// `BodyEnd::flags`: messages go one at a time in this direction (the connection has not been
/// seen to pipeline), so a call that does not begin with one is inside a message (its body, in
/// practice) and holds no other's start: a long one is sent with its first [`TRIM_CAP`] bytes
/// only (a chunk's size, where a call begins with it) and its last ones.
pub const BODY_ONE_AT_A_TIME: u32 = 2;
/// The bytes kept of a call trimmed by [`BODY_ONE_AT_A_TIME`].
pub const TRIM_CAP: usize = 64;
/// The first bytes of a response (`REQUEST_STARTS` names a request's).
pub const RESPONSE_START: u32 = u32::from_le_bytes(*b"HTTP");

/// A `BODIES` key: the socket's address and the direction. Two fields, not the address with a
/// bit set for the direction: the kernel side holds the address as a typed pointer, which
/// verifiers before 6.x refuse any bitwise operation on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BodyKey {
    pub sk: u64,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub direction: u32,
    pub _pad: u32,
}

impl BodyKey {
    #[inline(always)]
    pub fn new(sk: u64, direction: u32) -> Self {
        Self {
            sk,
            direction,
            _pad: 0,
        }
    }
}

/// `SockTuple::_pad` of TLS plaintext events' tuples.
pub const TUPLE_TLS: u16 = 1;

/// Everything about one read- or write-family syscall on a TCP socket but its payload.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataMeta {
    pub hdr: EventHeader,
    /// Kernel address of the `struct sock`: the connection's identity while it lives.
    pub sk: u64,
    /// When the syscall entered (for a send on the socket data path: when the kernel began
    /// taking its bytes); `hdr.ts_ns` is when it returned, except for a send whose start is
    /// known: that start then (one clock read saved; the daemon times a send by its start).
    pub ts_enter_ns: u64,
    /// In a Go program, the goroutine the call works for (`runtime.g`); else meaningless. 0:
    /// not known (data paths without the task's registers).
    pub goroutine: u64,
    pub tuple: SockTuple,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub direction: u32,
    /// Bytes the syscall moved (its return value).
    pub bytes: u32,
    /// Bytes of `payload` that are valid.
    pub captured: u32,
    /// Bytes of `tail` that are valid: the call's last bytes, when not all in `payload` (up to
    /// TAIL_LEN; fewer when its last two iovecs hold fewer).
    pub tail_len: u32,
    /// Per-socket event number, from 1: a gap means events of this socket were lost.
    pub seq: u32,
    /// Bytes of HTTP/2 frame segments after the whole `payload` (see [`FRAMES_CAP`]); 0 for
    /// other sockets.
    pub frames_len: u32,
    /// TCP sequence number of the call's first byte, in its direction: the same number at both
    /// ends of the connection, whatever address translation lies between them. Sent for calls
    /// that begin with a request line (`REQUEST_STARTS`) and calls longer than the payload
    /// (the daemon frames long bodies by it, `BodyEnd`); 0 for the others, TLS plaintext (not
    /// the bytes TCP carried) and data paths without the socket.
    pub tcp_seq: u32,
    /// Requests lost on this socket (their call's event dropped, the ring buffer full) since
    /// its last delivered event, taken from `SockState::lost_requests`: see [`lost_requests`].
    pub lost_requests: u32,
    pub tail: [u8; TAIL_LEN],
}

/// Bytes moved by one read- or write-family syscall on a TCP socket.
///
/// Sent with only `captured` bytes of `payload`: the record on the ring buffer is
/// `DATA_EVENT_FIXED + captured` bytes long.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent {
    pub meta: DataMeta,
    pub payload: [u8; PAYLOAD_CAP],
}

/// Size of a [`DataEvent`] without its payload.
pub const DATA_EVENT_FIXED: usize = core::mem::size_of::<DataMeta>();

/// On an HTTP/2 connection (the kernel side saw its preface) a call longer than its captured
/// payload also sends, after the whole payload, segments of the frames past it: each frame's
/// 9-byte header and, for the frames that carry a header block (HEADERS, CONTINUATION,
/// PUSH_PROMISE), up to [`FRAME_KEEP_CAP`] bytes of their payload, for RST_STREAM and GOAWAY
/// its first word (an error code, a last stream id). A segment is `offset: u32` (in the
/// call's bytes), `len: u32`, then `len` bytes. At most this many bytes of segments (the
/// last one may run past it).
pub const FRAMES_CAP: usize = 16 * 1024;
/// Payload bytes kept per frame in a segment (a power of two): a header block larger than this
/// leaves its direction's HPACK table unknown. 1 KiB missed browsers' cookies; 4 KiB keeps the
/// per-CPU scratch (two of these in its spill) well under the 32 KiB a per-CPU value may be.
pub const FRAME_KEEP_CAP: usize = 4096;
/// A segment's own header: offset and length.
pub const SEGMENT_HEADER: usize = 8;
/// Steps of a call's walk, at most: a frame, or for an iovec call also a buffer or a piece of
/// a header block (node's `writev` of 300 streams' responses: ~1200 buffers).
pub const MAX_FRAMES_WALKED: u32 = 8192;

/// What the kernel side keeps per socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockState {
    pub tuple: SockTuple,
    /// Last data event number given out for this socket.
    pub seq: u32,
    /// Nonzero: its calls end in the kernel, before any copy: [`OPAQUE_NOT_HTTP`] (the daemon
    /// found this connection to carry no HTTP: set by the kernel side from the daemon's
    /// request, which names the tuple) or [`OPAQUE_TLS`]. Gone with the entry, which a new
    /// connection at this address replaces.
    pub opaque: u32,
    /// pid_tgid of the thread whose name and cgroup this socket's last delivered event carried
    /// (0: none yet).
    pub task: u64,
    /// Nonzero: the connection opened in HTTP/2 ([`H2_CLIENT`] or [`H2_SERVER`]: which end this
    /// socket is); its calls are walked frame by frame.
    pub h2: u32,
    /// Per direction (egress, ingress): bytes at the start of the next call that finish the
    /// frame the last call ended in ([`CARRY_UNKNOWN`]: the walk stopped short).
    pub h2_carry: [u32; 2],
    /// Requests lost on this socket not yet told to the daemon (an event of the socket that
    /// carries them, `DataMeta::lost_requests` or `ConnEvent::lost_requests`, takes them):
    /// [`lost_requests`]'s halves.
    pub lost_requests: u32,
}

/// Requests lost by direction, in one word: the low half counts calls that read a request
/// (this socket is a server's end), the high half calls that wrote one (a client's). Each half
/// stops at `0xffff`. Per socket, so that the daemon knows whose requests they were: a request
/// whose two ends are both traced here is counted once.
pub mod lost_requests {
    pub const INGRESS: u32 = 1;
    pub const EGRESS: u32 = 1 << 16;
    /// (requests read, requests written).
    pub const fn split(v: u32) -> (u32, u32) {
        (v & 0xffff, v >> 16)
    }
}

/// `SockState::h2`: this socket is the client's end of an HTTP/2 connection.
pub const H2_CLIENT: u32 = 1;
/// `SockState::h2`: the server's end.
pub const H2_SERVER: u32 = 2;

/// `SockState::opaque`: the daemon found no HTTP on this connection.
pub const OPAQUE_NOT_HTTP: u32 = 1;
/// `SockState::opaque`: a TLS library drives this connection; its plaintext is taken at the
/// library ([`FLAG_TLS`]), its ciphertext is of no use.
pub const OPAQUE_TLS: u32 = 2;

/// `SockState::h2_carry` when the next call's first frame is not known: it is taken to begin
/// the call, as writers' calls do.
pub const CARRY_UNKNOWN: u32 = u32::MAX;
/// `SockState::h2_carry` with this bit: the last call ended inside a frame header, after its
/// first 1 or 2 bytes (bits 24..26), which are bits 0..16 (the start of the frame's length):
/// the next call holds the rest. (A header split after 3 bytes or more has a known length, so
/// a plain carry.) Plain carries are below 2^25.
pub const CARRY_SPLIT: u32 = 1 << 31;

/// A TCP socket changed state (tracepoint `sock:inet_sock_set_state`).
///
/// The pid in the header is only meaningful for transitions made in process context
/// (connect, close); the others run in softirq. The name and cgroup are only filled for
/// SYN_SENT and ESTABLISHED (zero otherwise).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnEvent {
    pub hdr: EventHeader,
    pub sk: u64,
    pub tuple: SockTuple,
    pub old_state: u32,
    pub new_state: u32,
    /// The socket's last data event number at this change, so that losses at the very end of a
    /// connection show too.
    pub seq: u32,
    /// At this end's close: whether the peer's FIN came ([`PEER_FIN_SEEN`]) or not
    /// ([`PEER_FIN_NONE`]); 0 when not known (no BTF offset, or at other changes).
    pub peer_fin: u32,
    /// At this end's close (FIN_WAIT1, LAST_ACK, CLOSE): the bytes the connection received and
    /// the bytes it sent that the peer acknowledged (`tcp_sock`'s RFC 4898 counters; 0 when
    /// the kernel's BTF did not give their place, or at other changes).
    pub bytes_received: u64,
    pub bytes_acked: u64,
    /// At the same changes: the smoothed round-trip time in µs (`srtt_us >> 3`) and the
    /// segments retransmitted over the connection's life (`total_retrans`).
    pub srtt_us: u32,
    pub retransmits: u32,
    /// At this end's close (FIN_WAIT1, LAST_ACK, CLOSE): the socket's lost requests not yet
    /// told by a data event ([`lost_requests`]).
    pub lost_requests: u32,
    pub _pad: u32,
}

/// `ConnEvent::peer_fin`: the kernel had (`SOCK_DONE`) or had not taken in the peer's FIN.
pub const PEER_FIN_NONE: u32 = 1;
pub const PEER_FIN_SEEN: u32 = 2;

/// Counters kept by the eBPF programs, one slot each in a per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelStat {
    /// Data events lost because the ring buffer was full.
    RingbufFullData = 0,
    /// Connection events lost because the ring buffer was full.
    RingbufFullConn = 1,
    /// Syscalls whose arguments could not be stored (map full).
    ArgsMapFull = 2,
    /// Payload reads from user memory that failed.
    PayloadReadFailed = 3,
    /// Data events whose payload was cut at PAYLOAD_CAP.
    PayloadTruncated = 4,
    /// Data events emitted.
    DataEvents = 5,
    /// Connection events emitted.
    ConnEvents = 6,
    /// Socket reads that only peeked (MSG_PEEK) and so were not counted.
    Peeks = 7,
    /// Lost data events (ring buffer full) whose bytes began with an HTTP request line, read
    /// by a server (ingress) or written by a client (egress): requests lost, counted.
    LostRequestIngress = 8,
    LostRequestEgress = 9,
    /// Syscalls on sockets the daemon found not to carry HTTP, skipped in the kernel.
    SkippedOpaque = 10,
    /// TCP bytes moved by a call the socket data path cannot read (splice, io_uring, sendmmsg,
    /// a kernel thread): not captured, counted.
    OtherSyscall = 11,
    /// Socket calls made by a TLS library on a connection it drives: their ciphertext is not
    /// sent (the plaintext is, from the library).
    TlsCiphertext = 12,
    /// TLS library calls whose socket was never seen (a library that does not do its own
    /// socket I/O, such as a memory BIO, or a connection older than the tracer that has not
    /// touched its socket since): their plaintext is not sent, counted.
    TlsNoSocket = 13,
    /// Events dropped because another program built its event in the same per-CPU scratch
    /// while this one's program was preempted (uprobe programs run preemptible).
    ScratchRace = 14,
    /// Lost request events (as `LostRequestIngress`/`Egress`, which count them all) of a call
    /// with no socket state to hold the count for the daemon (TLS plaintext, a socket the
    /// kernel side had no entry for, a close whose event was lost too): counted lost by
    /// direction, whose other end may be counting them too.
    LostRequestUnheldIngress = 15,
    LostRequestUnheldEgress = 16,
    /// Calls wholly inside a message body the daemon framed (`BodyEnd`): sent without their
    /// payload, which nothing reads (only their byte count frames the stream).
    BodyPayloadSkipped = 17,
    /// Calls that do not begin a message on a connection whose messages go one at a time
    /// (`BODY_ONE_AT_A_TIME`): sent with their first bytes and their tail only.
    BodyPayloadTrimmed = 18,
}

pub const KERNEL_STAT_COUNT: u32 = 19;

impl KernelStat {
    pub const ALL: [KernelStat; KERNEL_STAT_COUNT as usize] = [
        KernelStat::RingbufFullData,
        KernelStat::RingbufFullConn,
        KernelStat::ArgsMapFull,
        KernelStat::PayloadReadFailed,
        KernelStat::PayloadTruncated,
        KernelStat::DataEvents,
        KernelStat::ConnEvents,
        KernelStat::Peeks,
        KernelStat::LostRequestIngress,
        KernelStat::LostRequestEgress,
        KernelStat::SkippedOpaque,
        KernelStat::OtherSyscall,
        KernelStat::TlsCiphertext,
        KernelStat::TlsNoSocket,
        KernelStat::ScratchRace,
        KernelStat::LostRequestUnheldIngress,
        KernelStat::LostRequestUnheldEgress,
        KernelStat::BodyPayloadSkipped,
        KernelStat::BodyPayloadTrimmed,
    ];

    /// Name used as the `reason`/`kind` label in metrics.
    pub const fn name(self) -> &'static str {
        match self {
            KernelStat::RingbufFullData => "ringbuf_full_data",
            KernelStat::RingbufFullConn => "ringbuf_full_conn",
            KernelStat::ArgsMapFull => "args_map_full",
            KernelStat::PayloadReadFailed => "payload_read_failed",
            KernelStat::PayloadTruncated => "payload_truncated",
            KernelStat::DataEvents => "data_events",
            KernelStat::ConnEvents => "conn_events",
            KernelStat::Peeks => "peeks",
            KernelStat::LostRequestIngress => "lost_request_ingress",
            KernelStat::LostRequestEgress => "lost_request_egress",
            KernelStat::SkippedOpaque => "skipped_opaque",
            KernelStat::OtherSyscall => "other_syscall",
            KernelStat::TlsCiphertext => "tls_ciphertext",
            KernelStat::TlsNoSocket => "tls_no_socket",
            KernelStat::ScratchRace => "scratch_race",
            KernelStat::LostRequestUnheldIngress => "lost_request_unheld_ingress",
            KernelStat::LostRequestUnheldEgress => "lost_request_unheld_egress",
            KernelStat::BodyPayloadSkipped => "body_payload_skipped",
            KernelStat::BodyPayloadTrimmed => "body_payload_trimmed",
        }
    }
}

/// Map sizes, in one place.
pub mod limits {
    /// Ring buffer bytes: ~16k small data events, about 150 ms of a 25k req/s load (four
    /// events a request) for the reader to fall behind before anything is lost. It is mapped
    /// into the daemon, so it counts in the daemon's RSS: 16 MiB would cost ~40 MB of RSS.
    pub const RINGBUF_BYTES: u32 = 4 * 1024 * 1024;
    /// The reader is woken each time this much more is pending (at most a quarter of the ring,
    /// so a smaller ring still wakes it well before it is full). Each wake-up is an
    /// inter-processor interrupt (an exit to the hypervisor in a VM); the reader polls besides.
    /// At an eighth (256 KiB per CPU) wrk keep-alive raised ~1,400 a second here, 1.2% of all
    /// CPU time in the interrupt's write alone; at a quarter ~330. At half, a burst of 1 MB
    /// responses dropped twice as many events as at an eighth; at a quarter, as many.
    pub const WAKEUP_BYTES: u32 = 1024 * 1024;
    /// Threads inside a traced syscall at once.
    pub const ACTIVE_SYSCALLS: u32 = 32 * 1024;
    /// Sockets whose 4-tuple is known.
    pub const SOCKETS: u32 = 64 * 1024;
    /// The daemon's findings that a socket carries no HTTP (TLS, databases, tunnels), not yet
    /// taken up by the kernel side.
    pub const OPAQUE_SOCKETS: u32 = 16 * 1024;
    /// Message bodies being skipped, by socket and direction (LRU: one whose connection closed before its end ages out,
    /// and the daemon deletes those of closed connections).
    pub const BODIES: u32 = 4 * 1024;
    /// Threads inside a TLS library call at once (LRU: a thread killed inside one leaves an
    /// entry that ages out).
    pub const TLS_CALLS: u32 = 16 * 1024;
    /// TLS sessions whose socket is known (LRU, by process and session).
    pub const TLS_SESSIONS: u32 = 64 * 1024;
}

const _: () = assert!(core::mem::size_of::<EventHeader>() == 48);
const _: () = assert!(core::mem::size_of::<SockTuple>() == 40);
const _: () = assert!(core::mem::size_of::<BodyEnd>() == 48);
const _: () = assert!(core::mem::size_of::<BodyKey>() == 16);
const _: () = assert!(core::mem::offset_of!(DataMeta, tuple) == 72);
const _: () = assert!(core::mem::offset_of!(ConnEvent, tuple) == 56);
const _: () = assert!(DATA_EVENT_FIXED == 48 + 24 + 40 + 32 + TAIL_LEN);
const _: () = assert!(core::mem::size_of::<DataEvent>() == DATA_EVENT_FIXED + PAYLOAD_CAP);
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 48 + 8 + 40 + 16 + 16 + 8 + 8);
const _: () = assert!(PAYLOAD_CAP.is_power_of_two());
const _: () = assert!(FRAMES_CAP.is_power_of_two() && FRAME_KEEP_CAP.is_power_of_two());
const _: () = assert!(TASK_RESEND.is_power_of_two());
const _: () = assert!(core::mem::size_of::<SockState>() == 40 + 8 + 8 + 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no padding (asserted above), every bit pattern valid.
    unsafe impl aya::Pod for super::SockTuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BodyEnd {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BodyKey {}
}
