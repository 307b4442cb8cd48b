//! Decoding ring-buffer records into typed views, without copying payloads.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;
use tracer_common::{
    AF_INET6, ConnEvent, DATA_EVENT_FIXED, DIR_EGRESS, DataMeta, EventHeader, EventKind,
    FLAG_TASK_KNOWN, FLAG_TLS, FLAG_TUPLE_FROM_SOCK, PAYLOAD_CAP, SockTuple, TAIL_LEN,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("payload length {0} exceeds the record")]
    BadLength(u32),
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Short(_) => "short_record",
            Self::UnknownKind(_) => "unknown_kind",
            Self::BadLength(_) => "bad_length",
        }
    }
}

/// A process name as the kernel keeps it: at most 15 bytes, NUL padded.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm(pub [u8; 16]);

impl Comm {
    pub fn as_str(&self) -> std::borrow::Cow<'_, str> {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.0[..end])
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Who did something: process and thread, name, cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    pub tgid: u32,
    pub tid: u32,
    pub comm: Comm,
    pub cgroup_id: u64,
}

impl Task {
    fn from_header(h: &EventHeader) -> Self {
        Self {
            tgid: (h.pid_tgid >> 32) as u32,
            tid: h.pid_tgid as u32,
            comm: Comm(h.comm),
            cgroup_id: h.cgroup_id,
        }
    }
}

/// Both ends of a connection, from one socket's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Two words per end: `SocketAddr`'s own hash feeds the hasher field by field (variant, a
/// length-prefixed byte slice, port), and tuples are hashed a few times per event.
impl std::hash::Hash for Tuple {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        for a in [&self.local, &self.remote] {
            match a.ip() {
                IpAddr::V4(ip) => h.write_u32(u32::from(ip)),
                IpAddr::V6(ip) => h.write_u128(u128::from(ip)),
            }
            h.write_u16(a.port());
        }
    }
}

impl Tuple {
    pub fn from_sock(t: &SockTuple) -> Self {
        let ip = |a: [u8; 16]| -> IpAddr {
            if t.family == AF_INET6 {
                let v6 = Ipv6Addr::from(a);
                // v4-mapped addresses are the same peer as the plain v4 one.
                match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(v6),
                }
            } else {
                IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
            }
        };
        Self {
            local: SocketAddr::new(ip(t.local_addr), t.local_port),
            remote: SocketAddr::new(ip(t.remote_addr), t.remote_port),
        }
    }

    /// The same connection seen from the other end.
    pub fn reversed(&self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    /// As the kernel side names it (`DIR_EGRESS`, `DIR_INGRESS`).
    pub fn raw(self) -> u32 {
        match self {
            Direction::Egress => DIR_EGRESS,
            Direction::Ingress => tracer_common::DIR_INGRESS,
        }
    }
}

/// Bytes a process moved on a TCP socket.
#[derive(Debug)]
pub struct Data<'a> {
    /// `comm` and `cgroup_id` are empty when `task_known`, until `threads::Threads` fills them.
    pub task: Task,
    /// The kernel left the thread's name and cgroup out: an earlier event of this socket had
    /// them.
    pub task_known: bool,
    pub sk: u64,
    /// In a Go program, the goroutine the call was made for; else meaningless (0: unknown).
    pub goroutine: u64,
    /// TCP sequence number of the call's first byte (the same at both ends of the connection).
    pub tcp_seq: Option<u32>,
    pub tuple: Tuple,
    /// The tuple as the kernel side keeps it: how the daemon names the connection to it.
    pub sock_tuple: SockTuple,
    pub ts_enter_ns: u64,
    pub ts_exit_ns: u64,
    pub direction: Direction,
    /// Bytes the syscall moved; 0 is end of stream on a read.
    pub bytes: u32,
    /// Per-socket event number: a gap means this socket's events were lost. 0: unnumbered
    /// (read after the socket closed).
    pub seq: u32,
    /// The first bytes moved (at most PAYLOAD_CAP).
    pub payload: &'a [u8],
    /// The last bytes moved, when not all of them are in `payload`.
    pub tail: &'a [u8],
    /// HTTP/2 frame segments past `payload` (`tracer_common::FRAMES_CAP`), when the kernel side
    /// walked the call's frames.
    pub frames: &'a [u8],
    /// The kernel side had no state for the socket: a connection older than the tracer,
    /// followed from the middle.
    pub from_sock: bool,
    /// The bytes are a TLS library's plaintext (`FLAG_TLS`), not what crossed the socket.
    pub tls: bool,
    /// Requests this socket lost (their events dropped, the ring buffer full) since its last
    /// delivered event: (read, written).
    pub lost_requests: (u32, u32),
    /// The kernel side saw the connection open in HTTP/2, with this socket as that end.
    pub h2_end: Option<crate::conn::Side>,
}

impl Data<'_> {
    /// When the bytes crossed between the process and the kernel: a writer hands them over when
    /// its call begins, a reader has them when its call returns. Taking these moments keeps
    /// cause before effect across the two ends of a connection (the reader can return before
    /// the writer's call does).
    pub fn boundary_ns(&self) -> u64 {
        match self.direction {
            Direction::Egress => self.ts_enter_ns,
            Direction::Ingress => self.ts_exit_ns,
        }
    }

    /// Whether every byte the syscall moved is in `payload`.
    pub fn complete(&self) -> bool {
        self.payload.len() == self.bytes as usize
    }
}

/// A TCP state change.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    /// Meaningful only for transitions made in process context (connect, close).
    pub task: Task,
    pub ts_ns: u64,
    pub sk: u64,
    pub tuple: Tuple,
    pub old_state: u32,
    pub new_state: u32,
    /// The socket's last data event number (0: unknown).
    pub seq: u32,
    /// At this end's close: whether the peer's FIN came (None: not known).
    pub peer_fin: Option<bool>,
    /// A change to CLOSE that an RST taken in caused (only when the capture marks them).
    pub peer_reset: bool,
    /// At this end's close: bytes received, and bytes sent that the peer acknowledged.
    pub bytes_received: u64,
    pub bytes_acked: u64,
    /// At the same changes: smoothed RTT (µs) and segments retransmitted.
    pub srtt_us: u32,
    pub retransmits: u32,
    /// At this end's close: requests the socket lost that no data event told, (read, written).
    pub lost_requests: (u32, u32),
}

#[derive(Debug)]
pub enum Event<'a> {
    Data(Data<'a>),
    Conn(Conn),
    /// This process began running a new program.
    Exec(u32),
}

pub(crate) fn read<T: Copy>(buf: &[u8]) -> Result<T, DecodeError> {
    if buf.len() < size_of::<T>() {
        return Err(DecodeError::Short(buf.len()));
    }
    // SAFETY: length checked; T is a repr(C) plain-old-data type from tracer-common, valid for
    // any bit pattern; read_unaligned because ring-buffer records are only 8-byte aligned.
    Ok(unsafe { buf.as_ptr().cast::<T>().read_unaligned() })
}

pub fn decode(buf: &[u8]) -> Result<Event<'_>, DecodeError> {
    let hdr: EventHeader = read(buf)?;
    match EventKind::from_u32(hdr.kind) {
        Some(EventKind::Data) => {
            let ev: DataMeta = read(buf)?;
            let captured = ev.captured as usize;
            if captured > PAYLOAD_CAP || DATA_EVENT_FIXED + captured > buf.len() {
                return Err(DecodeError::BadLength(ev.captured));
            }
            let tail_len = (ev.tail_len as usize).min(TAIL_LEN);
            let frames = match ev.frames_len as usize {
                0 => &[][..],
                n => {
                    let at = DATA_EVENT_FIXED + PAYLOAD_CAP;
                    buf.get(at..at + n)
                        .ok_or(DecodeError::BadLength(ev.frames_len))?
                }
            };
            Ok(Event::Data(Data {
                task: Task::from_header(&hdr),
                task_known: hdr.flags & FLAG_TASK_KNOWN != 0,
                sk: ev.sk,
                goroutine: ev.goroutine,
                tcp_seq: (ev.tcp_seq != 0).then_some(ev.tcp_seq),
                tuple: Tuple::from_sock(&ev.tuple),
                sock_tuple: ev.tuple,
                ts_enter_ns: ev.ts_enter_ns,
                ts_exit_ns: hdr.ts_ns,
                direction: if ev.direction == DIR_EGRESS {
                    Direction::Egress
                } else {
                    Direction::Ingress
                },
                bytes: ev.bytes,
                seq: ev.seq,
                payload: &buf[DATA_EVENT_FIXED..DATA_EVENT_FIXED + captured],
                tail: &buf[std::mem::offset_of!(DataMeta, tail)..][..tail_len],
                frames,
                from_sock: hdr.flags & FLAG_TUPLE_FROM_SOCK != 0,
                tls: hdr.flags & FLAG_TLS != 0,
                lost_requests: tracer_common::lost_requests::split(ev.lost_requests),
                h2_end: if hdr.flags & tracer_common::FLAG_H2_SERVER != 0 {
                    Some(crate::conn::Side::Server)
                } else if hdr.flags & tracer_common::FLAG_H2_CLIENT != 0 {
                    Some(crate::conn::Side::Client)
                } else {
                    None
                },
            }))
        }
        Some(EventKind::Exec) => Ok(Event::Exec((hdr.pid_tgid >> 32) as u32)),
        Some(EventKind::Conn) => {
            let ev: ConnEvent = read(buf)?;
            Ok(Event::Conn(Conn {
                task: Task::from_header(&hdr),
                ts_ns: hdr.ts_ns,
                sk: ev.sk,
                tuple: Tuple::from_sock(&ev.tuple),
                old_state: ev.old_state,
                new_state: ev.new_state,
                seq: ev.seq,
                peer_fin: match ev.peer_fin {
                    tracer_common::PEER_FIN_SEEN => Some(true),
                    tracer_common::PEER_FIN_NONE => Some(false),
                    _ => None,
                },
                peer_reset: hdr.flags & tracer_common::FLAG_PEER_RESET != 0,
                bytes_received: ev.bytes_received,
                bytes_acked: ev.bytes_acked,
                srtt_us: ev.srtt_us,
                retransmits: ev.retransmits,
                lost_requests: tracer_common::lost_requests::split(ev.lost_requests),
            }))
        }
        None => Err(DecodeError::UnknownKind(hdr.kind)),
    }
}
