//! Per-connection state: follows the HTTP/1 messages in each direction of a socket and pairs
//! every request with its response, in order (keep-alive and pipelining), across messages split
//! over many syscalls and syscalls holding several messages.
//!
//! Each socket is followed on its own: a connection with both ends on this host is followed twice,
//! once as client and once as server, and `edges` joins the two.

// Hot-path tables: foldhash is several times cheaper per lookup than SipHash and still
// seeded per process.
use foldhash::HashMap;
use std::{collections::VecDeque, net::SocketAddr};

use tracer_common::{
    BODY_ONE_AT_A_TIME, BODY_SKIP, BodyEnd, BodyKey, DIR_EGRESS, DIR_INGRESS, SockTuple, TCP_CLOSE,
    TCP_CLOSE_WAIT, TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_LAST_ACK, TCP_SYN_SENT,
};

use crate::{
    event::{self, Data, Direction, Task, Tuple},
    heads::{Head, Heads},
    http1::{self, BodyLen, Chunked, Method, Path, Start},
    http2::{self, Opening},
    metrics::Metrics,
    spans::{self, Linker, SpanId},
    streams::{self, Streams},
};

/// Requests awaiting their response on one connection; beyond it a request is not kept (its
/// place is, as a count: see `Pending::gap_before`) and is counted as lost. Load generators
/// pipeline 16 to 32 deep (wrk scripts, TechEmpower's 16); a queue grows only as deep as its
/// connection pipelines.
pub const MAX_IN_FLIGHT: usize = 64;
/// Largest head gathered across syscalls before giving up on it.
const MAX_HEAD: usize = 16 * 1024;
/// Bytes of an undecidable message start kept until the next syscall decides it (the HTTP/2
/// preface is 24).
const MAX_UNDECIDED: usize = 24;
/// HTTP/2 connections followed at once: each keeps two HPACK tables (4 KiB each by default, 16
/// KiB at most: ~80 KiB a connection at worst, with its buffers). Past it a new one is not
/// followed, counted as `parse_failures{reason="h2_connections_full"}`.
pub const MAX_H2_CONNS: usize = 4096;
/// Connections followed at once.
pub const MAX_CONNS: usize = 64 * 1024;
/// A connection with no traffic for this long is forgotten when room is needed.
const IDLE_NS: u64 = 60 * 1_000_000_000;
/// Closed connections remembered (this many to twice this many), so that the other end's last
/// exchange can still name this end's process after its socket is gone.
const RECENTLY_CLOSED: usize = 4096;
/// How long a connection reset by its peer is kept after the reset (see `ConnTable::closing`):
/// longer than the reader's poll, so that the events the reset came before are read by then.
const RESET_GRACE: std::time::Duration = std::time::Duration::from_millis(40);

/// Which end of the connection this socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Unknown,
    Http(Side),
    /// HTTP/2 with prior knowledge: its streams are in `Conn::h2`.
    Http2(Side),
    /// Not HTTP (or lost sync for good): ignored until closed.
    Opaque,
    /// Upgraded (WebSocket) or tunnelled (CONNECT): ignored until closed, as `Opaque`, but its
    /// end stays known: its peer's exchange of the upgrade is this end's to count.
    Tunnel(Side),
}

impl Role {
    fn side(self) -> Option<Side> {
        match self {
            Role::Http(side) | Role::Http2(side) | Role::Tunnel(side) => Some(side),
            _ => None,
        }
    }

    /// Whether its bytes are not followed (the kernel can stop sending them).
    fn opaque(self) -> bool {
        matches!(self, Role::Opaque | Role::Tunnel(_))
    }
}

/// One request and its response, as one end of the connection saw them.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub side: Side,
    /// The process on this end.
    pub task: Task,
    /// This end's view of the connection.
    pub tuple: Tuple,
    /// The other end's socket when it was seen here (0: not seen).
    pub peer_sk: u64,
    pub method: Method,
    pub path: Path,
    pub status: u16,
    /// gRPC's status (HTTP/2 trailers), when the response carried one.
    pub grpc_status: Option<u32>,
    /// First byte of the request as this end saw it.
    pub start_ns: u64,
    /// Last byte of the response as this end saw it.
    pub end_ns: u64,
    pub req_bytes: u64,
    pub resp_bytes: u64,
    /// The span this end opened for the request.
    pub span: Option<SpanId>,
    /// Seen as a TLS library's plaintext (the connection is encrypted).
    pub tls: bool,
    /// Responses on this connection went by uncaptured or out of sync before this one: this
    /// end's pairs may be wrong (a client that pipelines responses past the capture).
    pub unsure: bool,
}

/// `Exchange::status` of a request its server never answered: it closed or reset the
/// connection with the request read (see `ConnTable::on_state`).
pub const NO_RESPONSE: u16 = 0;

impl Exchange {
    /// A failure for success rates: no response (the server closed or reset the connection
    /// instead), a 5xx, or a gRPC status other than OK (as Linkerd counts them).
    pub fn failed(&self) -> bool {
        self.status == NO_RESPONSE || self.status >= 500 || self.grpc_status.is_some_and(|g| g != 0)
    }
}

#[derive(Debug)]
struct Pending {
    method: Method,
    path: Path,
    start_ns: u64,
    bytes: u64,
    task: Task,
    span: Option<SpanId>,
    /// Requests not kept (the queue was full) just before this one: the next responses are
    /// theirs, not this one's.
    gap_before: u32,
    /// It offered to go on in HTTP/2 (`Upgrade: h2c`).
    h2c: bool,
}

#[derive(Debug)]
struct InFlight {
    request: Option<Pending>,
    status: u16,
}

#[derive(Debug, Default)]
enum ReadState {
    #[default]
    Idle,
    Head,
    Body(Body),
    /// Lost the message boundary: skip until something that starts a message.
    Resync,
}

#[derive(Debug)]
enum Body {
    Length(u64),
    Chunked(Chunked),
    /// Chunk framing passed through bytes that were not captured: watch ends only.
    ChunkedBlind,
    /// Ends at close, or (framing unknown) at the next message.
    Open,
}

/// One direction of a connection: a stream of requests or of responses.
#[derive(Debug, Default)]
struct Reader {
    state: ReadState,
    head: Vec<u8>,
    /// Some bytes of the head being gathered were not captured.
    head_lost: bool,
    start_ns: u64,
    /// TCP sequence number of the message's first byte, when the kernel side gave it.
    start_seq: Option<u32>,
    last_ns: u64,
    bytes: u64,
    /// Where the kernel side was last told this message's body (or chunk) ends.
    told_end: Option<u32>,
}

impl Reader {
    fn begin(&mut self, start_ns: u64, start_seq: Option<u32>) {
        self.state = ReadState::Head;
        self.head.clear();
        self.head_lost = false;
        self.start_ns = start_ns;
        self.start_seq = start_seq;
        self.bytes = 0;
        self.told_end = None;
    }
}

struct Conn {
    tuple: Tuple,
    task: Task,
    role: Role,
    requests: Reader,
    responses: Reader,
    pending: VecDeque<Pending>,
    current: Option<InFlight>,
    undecided: Vec<u8>,
    /// When the first undecided byte crossed.
    undecided_ns: u64,
    undecided_seq: Option<u32>,
    /// Followed from its middle: its first event came with no state in the kernel (a
    /// connection older than the tracer, a TLS session whose handshake went unseen).
    from_middle: bool,
    /// Calls of such a connection that began no message (the rest of a body), skipped while its
    /// role is looked for (MAX_MIDSTREAM_SKIPS).
    midstream_skips: u8,
    last_ns: u64,
    /// The event number expected next from the kernel for this socket (a TLS session's
    /// writes).
    next_seq: u32,
    /// A TLS session's reads' (numbered apart from its writes).
    next_seq_in: u32,
    /// Requests seen on this connection so far.
    requests_seen: u64,
    /// The other end may be a socket on this host (whose events may lag this one's).
    peer_local: bool,
    /// The other end's socket, once seen here (0: not yet): its exchanges name their peer
    /// without a lookup by addresses.
    peer_sk: u64,
    /// The client's address (this end's own, or its peer's), once the role says which it is:
    /// its key in `ConnTable::by_client`.
    client_addr: Option<SocketAddr>,
    /// When it was reset by its peer (its entry in `ConnTable::closing`), until it ends.
    reset: Option<std::time::Instant>,
    /// The reset came from the other end (it was not this end's own abortive close).
    reset_by_peer: bool,
    /// Its reset was this end's own abortive close (told only where resets are marked).
    aborted_here: bool,
    /// The last response said the server would close (`Connection: close`, HTTP/1.0): requests
    /// pipelined after it are not processed, by design, rather than failed.
    close_announced: bool,
    /// Bytes this end wrote, and the kernel's count of bytes the peer acknowledged at this
    /// end's reset (SYN included; 0: not known).
    sent: u64,
    acked_at_reset: u64,
    /// Requests not kept (the queue was full) since the last one queued: the responses after
    /// the queue's are theirs.
    overflow_gap: u32,
    /// Response bytes went by past the capture or out of sync (see `Exchange::unsure`).
    responses_unsure: bool,
    /// Request bytes went by past the capture (a head longer than it, or pipelined requests
    /// after it): a response with no request to pair is then one of those requests, lost.
    requests_beyond_capture: bool,
    /// An HTTP/2 connection's streams.
    h2: Option<Box<Streams>>,
    /// Its events are a TLS library's plaintext (`Data::tls`).
    tls: bool,
    /// A request came while an earlier one awaited its response.
    pipelined: bool,
    /// The kernel side was told this socket's messages go one at a time (`BODY_ONE_AT_A_TIME`).
    framed: bool,
}

impl Conn {
    /// The number expected next in `d`'s stream (0: none yet, or unnumbered).
    fn next_seq(&self, d: &Data) -> u32 {
        if d.tls && d.direction == Direction::Ingress {
            self.next_seq_in
        } else {
            self.next_seq
        }
    }

    fn peer(&self) -> Peer {
        Peer {
            task: self.task,
            side: self.role.side(),
        }
    }

    /// This end as its lost requests are counted.
    fn end(&self, side: Side) -> End {
        End::new(side, &self.tuple, self.peer_sk != 0, self.peer_local)
    }

    fn new(tuple: Tuple, task: Task, now: u64, spare: Buffers) -> Self {
        let Buffers {
            pending,
            request_head,
            response_head,
        } = spare;
        Self {
            tuple,
            task,
            role: Role::Unknown,
            requests: Reader {
                head: request_head,
                ..Reader::default()
            },
            responses: Reader {
                head: response_head,
                ..Reader::default()
            },
            pending,
            current: None,
            undecided: Vec::new(),
            undecided_ns: 0,
            undecided_seq: None,
            from_middle: false,
            midstream_skips: 0,
            last_ns: now,
            next_seq: 0,
            next_seq_in: 0,
            requests_seen: 0,
            peer_local: local_peer(&tuple),
            peer_sk: 0,
            client_addr: None,
            reset: None,
            reset_by_peer: false,
            aborted_here: false,
            close_announced: false,
            sent: 0,
            acked_at_reset: 0,
            overflow_gap: 0,
            responses_unsure: false,
            requests_beyond_capture: false,
            h2: None,
            tls: false,
            pipelined: false,
            framed: false,
        }
    }
}

/// Whether `d` is on the connection `tuple` names. A socket's event after its close carries the
/// tuple read from the socket then, whose local port the kernel has cleared when it unbound
/// the closed socket (`inet_num`).
fn same_connection(tuple: &Tuple, d: &Data<'_>) -> bool {
    *tuple == d.tuple
        || (d.seq == 0
            && d.tuple.local.port() == 0
            && d.tuple.local.ip() == tuple.local.ip()
            && d.tuple.remote == tuple.remote)
}

/// A closed connection's buffers, emptied, for the next one: a connection per request would
/// otherwise allocate and free them each time. (Undecided bytes are not among them: they are
/// always a fresh copy.)
#[derive(Default)]
struct Buffers {
    pending: VecDeque<Pending>,
    request_head: Vec<u8>,
    response_head: Vec<u8>,
}

/// Closed connections' buffers kept for new ones, and the largest buffer kept.
const SPARE_BUFFERS: usize = 256;
const SPARE_BUFFER_BYTES: usize = 4096;

impl Buffers {
    /// What `conn` had, if small enough to keep.
    fn of(conn: &mut Conn) -> Option<Self> {
        let heads = [&conn.requests.head, &conn.responses.head];
        if heads.iter().any(|b| b.capacity() > SPARE_BUFFER_BYTES)
            || conn.pending.capacity() > MAX_IN_FLIGHT
        {
            return None;
        }
        let mut b = Self {
            pending: std::mem::take(&mut conn.pending),
            request_head: std::mem::take(&mut conn.requests.head),
            response_head: std::mem::take(&mut conn.responses.head),
        };
        b.pending.clear();
        b.request_head.clear();
        b.response_head.clear();
        Some(b)
    }
}

/// Everything one data event is processed with.
struct Ctx<'a, 'b> {
    d: &'a Data<'b>,
    /// When the first of the bytes fed began, if earlier than `d` (kept undecided bytes).
    first_ns: Option<u64>,
    metrics: &'a Metrics,
    linker: &'a mut Linker,
    out: &'a mut Vec<Exchange>,
    heads: &'a mut Heads,
    /// HTTP/2 connections followed.
    h2_conns: &'a mut usize,
    bodies: &'a mut Vec<(BodyKey, BodyEnd)>,
}

/// All followed connections, keyed by socket address.
pub struct ConnTable {
    /// Boxed: a connection is ~430 bytes, and a connection per request moved it in and out of
    /// the table (cold memory) at every open and close.
    conns: HashMap<u64, Box<Conn>>,
    /// Sockets in connect(), with the process that called it.
    connecting: HashMap<u64, Task>,
    by_tuple: HashMap<Tuple, u64>,
    /// Connections by their client's address, [client end, server end]: the two ends of a
    /// connection whose server address was translated on the way (a Kubernetes Service's
    /// DNAT: the client dialled the Service, the server sees its own address) do not have
    /// reversed tuples, but the client's address is the same at both.
    by_client: HashMap<SocketAddr, [u64; 2]>,
    /// Recently closed sockets by their tuple's hash, in two generations: the newer fills, then
    /// replaces the older wholesale. Removing the oldest entry one by one was a cache miss or
    /// two per closed socket, the largest cost with a connection per request.
    closed: HashMap<u64, Peer>,
    closed_old: HashMap<u64, Peer>,
    /// Hashes tuples into `closed` keys: one seed for both generations, which swap.
    closed_hasher: foldhash::fast::RandomState,
    /// Buffers of closed connections, for new ones.
    spare: Vec<Buffers>,
    cap: usize,
    /// See `mark_resets`.
    resets_marked: bool,
    /// Sockets that became opaque, for [`ConnTable::take_opaque`].
    opaque: Vec<(u64, SockTuple)>,
    /// Long bodies' ends, for [`ConnTable::take_bodies`].
    bodies: Vec<(BodyKey, BodyEnd)>,
    /// Heads parsed by one end of a connection on this host, for the other.
    heads: Heads,
    /// Connections whose `h2` is set.
    h2_conns: usize,
    /// Connections reset by their peer, ended only after RESET_GRACE: a reset that answers this
    /// end's send (the peer had closed without reading: a client that gave up, a health check)
    /// arrives, on loopback and veth, inside that send, so the socket's close is reported
    /// before the send that caused it; ended at once, the connection lost the response it was
    /// about to pair.
    closing: VecDeque<(u64, std::time::Instant)>,
}

/// Where an end is in a `ConnTable::by_client` entry.
fn end_slot(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Server => 1,
    }
}

/// Opaque sockets remembered between two hand-overs to the kernel.
const MAX_OPAQUE_PENDING: usize = 4096;
/// Body ends remembered between two hand-overs to the kernel (more only wait for their next
/// long call).
const MAX_BODIES_PENDING: usize = 1024;
/// The rest of a body (or of its chunk) that makes its end worth telling the kernel side: a
/// map update from here, a lookup there per long call, against a copy of the capture's 1 KiB
/// (and its room in the ring) for each call inside it.
const SKIP_BODY_MIN: u64 = 64 * 1024;
/// The longest stretch told at once: sequence numbers are compared within half their range.
const SKIP_BODY_MAX: u64 = 1 << 30;

/// What is known of the process at the other end of a connection, when it is on this host.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub task: Task,
    pub side: Option<Side>,
}

impl ConnTable {
    pub fn new(cap: usize) -> Self {
        Self {
            conns: HashMap::default(),
            connecting: HashMap::default(),
            by_tuple: HashMap::default(),
            by_client: HashMap::default(),
            closed: HashMap::default(),
            closed_old: HashMap::default(),
            closed_hasher: Default::default(),
            spare: Vec::new(),
            opaque: Vec::new(),
            bodies: Vec::new(),
            heads: Heads::new(),
            h2_conns: 0,
            closing: VecDeque::new(),
            cap,
            resets_marked: false,
        }
    }

    /// The capture marks the changes to CLOSE that an RST taken in caused: a reset is told
    /// from this end's own abortive close by that, not by the process it ran in.
    pub fn mark_resets(&mut self) {
        self.resets_marked = true;
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    fn closed_key(&self, tuple: &Tuple) -> u64 {
        use std::hash::BuildHasher;
        self.closed_hasher.hash_one(tuple)
    }

    /// The local socket at the other end of `tuple`, if this host has it; `peer_sk` is where
    /// the exchange's connection last saw it (0: unknown).
    pub fn peer_of(&self, tuple: &Tuple, peer_sk: u64) -> Option<Peer> {
        let other = tuple.reversed();
        if peer_sk != 0
            && let Some(c) = self.conns.get(&peer_sk)
            && (c.tuple == other
                || c.client_addr
                    .is_some_and(|a| a == tuple.local || a == tuple.remote))
        {
            return Some(c.peer());
        }
        // A client's tuple whose server address was translated: its server end by the client's
        // address.
        let translated = || {
            let sk = self.by_client.get(&tuple.local)?[end_slot(Side::Server)];
            self.conns.get(&sk).filter(|_| sk != 0)
        };
        match self
            .by_tuple
            .get(&other)
            .and_then(|sk| self.conns.get(sk))
            .or_else(translated)
        {
            Some(c) => Some(c.peer()),
            None => {
                let key = self.closed_key(&other);
                self.closed
                    .get(&key)
                    .or_else(|| self.closed_old.get(&key))
                    .copied()
            }
        }
    }

    /// Whether `d` comes one past the number its connection expects: the missing one may be
    /// on its way (see `reorder`).
    pub fn one_ahead(&self, d: &Data) -> bool {
        let next = self.conns.get(&d.sk).map_or(0, |conn| conn.next_seq(d));
        d.seq != 0 && next != 0 && d.seq == next.wrapping_add(1).max(1)
    }

    pub fn on_data(
        &mut self,
        d: &Data<'_>,
        metrics: &Metrics,
        linker: &mut Linker,
        out: &mut Vec<Exchange>,
    ) {
        let now = d.ts_exit_ns;
        if d.lost_requests != (0, 0) {
            self.lost_requests(d.sk, &d.tuple, d.lost_requests, metrics, linker);
        }
        // Whether this event starts a new connection at its socket address, and whether the
        // old one there was reset.
        let restart = match self.conns.get_mut(&d.sk) {
            None => (false, false),
            Some(c) => {
                let same = same_connection(&c.tuple, d);
                if same && c.tls && !d.tls {
                    // Ciphertext of a connection whose plaintext is followed: a call that
                    // began before the library's hooks were in place.
                    metrics
                        .pairing_drops
                        .with_label_values(&["tls_ciphertext"])
                        .inc();
                    return;
                }
                // The socket address was reused by a new connection: the old one was reset
                // (and is ending now; a numbered event after a reset is a new socket's, a
                // closed one's go unnumbered), or its close was missed. Or the first plaintext
                // event of a connection whose ciphertext was seen (one older than the tracer,
                // found opaque): it starts again, as TLS.
                let restart = !same || (c.reset.is_some() && d.seq != 0) || (d.tls && !c.tls);
                (restart, c.reset.is_some())
            }
        };
        match restart {
            (true, true) => self.end_reset(d.sk, metrics, linker, out),
            (true, false) => self.remove(d.sk, metrics, linker),
            _ => {}
        }
        if !self.conns.contains_key(&d.sk) {
            if d.bytes == 0 {
                return;
            }
            // Read after its socket closed (and after its close was handled here): nothing it
            // could pair with is left, and a connection made for it would never see a close.
            if d.seq == 0 {
                metrics
                    .pairing_drops
                    .with_label_values(&["read_after_close"])
                    .inc();
                return;
            }
            if self.conns.len() >= self.cap {
                self.evict(now, metrics, linker);
            }
            let spare = self.spare.pop().unwrap_or_default();
            let mut conn = Box::new(Conn::new(d.tuple, d.task, now, spare));
            conn.tls = d.tls;
            conn.from_middle = d.from_sock;
            self.conns.insert(d.sk, conn);
            self.by_tuple.insert(d.tuple, d.sk);
            metrics.conns_tracked.set(self.conns.len() as i64);
        }
        let Some(conn) = self.conns.get_mut(&d.sk) else {
            return;
        };
        conn.last_ns = now;
        conn.task = d.task;
        if d.direction == Direction::Egress {
            conn.sent += u64::from(d.bytes);
        }
        // Unnumbered events (0) are neither checked nor a base for the next check. TLS
        // plaintext is numbered per direction (a session's reader and writer can be two
        // threads at once).
        let next_seq = conn.next_seq(d);
        if d.seq != 0 && next_seq != 0 && d.seq != next_seq {
            lost_events(conn, metrics, linker);
        }
        // Looked for until found when the other end could be anywhere, and in a connection's
        // first requests when it is on this host (its socket's first event can come later).
        if conn.peer_sk == 0
            && (!conn.peer_local || conn.requests_seen < 4 || d.seq < 16)
            && let Some(peer) = self.by_tuple.get(&d.tuple.reversed()).copied().or_else(|| {
                // Through an address translation: the other end by the client's address, which
                // registers at its first event (looked for in the first ones only: a remote
                // peer is never found).
                if conn.requests_seen >= 4 && d.seq >= 16 {
                    return None;
                }
                let (addr, side) = (conn.client_addr?, conn.role.side()?);
                let other = match side {
                    Side::Client => Side::Server,
                    Side::Server => Side::Client,
                };
                let peer = self.by_client.get(&addr)?[end_slot(other)];
                (peer != 0 && peer != d.sk).then_some(peer)
            })
        {
            conn.peer_local = true;
            conn.peer_sk = peer;
        }
        let next_seq = if d.seq == 0 {
            0
        } else {
            d.seq.wrapping_add(1).max(1)
        };
        if d.tls && d.direction == Direction::Ingress {
            conn.next_seq_in = next_seq;
        } else {
            conn.next_seq = next_seq;
        }
        let mut ctx = Ctx {
            d,
            first_ns: None,
            metrics,
            linker,
            out,
            heads: &mut self.heads,
            h2_conns: &mut self.h2_conns,
            bodies: &mut self.bodies,
        };
        let was_opaque = conn.role.opaque();
        process(conn, &mut ctx);
        if conn.client_addr.is_none()
            && let Some(side) = conn.role.side()
        {
            let addr = match side {
                Side::Client => conn.tuple.local,
                Side::Server => conn.tuple.remote,
            };
            conn.client_addr = Some(addr);
            self.by_client.entry(addr).or_default()[end_slot(side)] = d.sk;
        }
        // Asked again now and then while events keep coming: the request can be lost (LRU) or
        // the kernel's entry evicted and made again.
        let ask = if was_opaque {
            d.seq != 0 && d.seq & 63 == 0
        } else {
            conn.role.opaque()
        };
        if ask && self.opaque.len() < MAX_OPAQUE_PENDING {
            self.opaque.push((d.sk, d.sock_tuple));
        }
    }

    /// Requests the kernel side lost on socket `sk` (their events dropped, the ring buffer
    /// full), told by a later event of the socket: those it read (it is a server's end) and
    /// those it wrote (a client's). Counted as any loss of that end's (`count_lost`), now that
    /// the socket says whose they were: once, when both ends are traced here.
    fn lost_requests(
        &mut self,
        sk: u64,
        tuple: &Tuple,
        (read, written): (u32, u32),
        metrics: &Metrics,
        linker: &mut Linker,
    ) {
        let conn = self.conns.get(&sk).filter(|c| c.tuple == *tuple);
        // The other end, open or closed (a client's last events can be told at its close,
        // after its server end's).
        let peer_here = conn.is_some_and(|c| c.peer_sk != 0) || self.peer_of(tuple, 0).is_some();
        let peer_local = conn.map_or_else(|| local_peer(tuple), |c| c.peer_local);
        for (side, n) in [(Side::Server, read), (Side::Client, written)] {
            let end = End::new(side, tuple, peer_here, peer_local);
            count_lost(&end, "ringbuf_full", u64::from(n), metrics, linker);
        }
    }

    /// Whether `sk` is a connection this table follows (not yet closed).
    pub fn is_open(&self, sk: u64) -> bool {
        self.conns.contains_key(&sk)
    }

    /// Heads one end took from the other since the last call, rather than parsed.
    pub fn take_heads_shared(&mut self) -> u64 {
        std::mem::take(&mut self.heads.hits)
    }

    /// Sockets found not to carry HTTP since the last call: the kernel can stop sending their
    /// data.
    pub fn take_opaque(&mut self) -> std::vec::Drain<'_, (u64, SockTuple)> {
        self.opaque.drain(..)
    }

    /// Where long bodies end since the last call, by socket and direction: the
    /// kernel can send the calls inside them without payload.
    pub fn take_bodies(&mut self) -> std::vec::Drain<'_, (BodyKey, BodyEnd)> {
        self.bodies.drain(..)
    }

    pub fn on_state(
        &mut self,
        c: &event::Conn,
        metrics: &Metrics,
        linker: &mut Linker,
        out: &mut Vec<Exchange>,
    ) {
        // A socket changes state no more once it is closed: a change at the address of one reset
        // (and waiting out RESET_GRACE) is a new socket's there, whose own connection may not be
        // followed (the daemon's, one that carried no data): the reset one ends first.
        if self.conns.get(&c.sk).is_some_and(|old| old.reset.is_some()) {
            self.end_reset(c.sk, metrics, linker, out);
        }
        if c.lost_requests != (0, 0) {
            self.lost_requests(c.sk, &c.tuple, c.lost_requests, metrics, linker);
        }
        match (c.old_state, c.new_state) {
            // connect() runs in the calling process: remember who it is.
            (_, TCP_SYN_SENT) => {
                if self.connecting.len() < self.cap {
                    self.connecting.insert(c.sk, c.task);
                }
                return;
            }
            // A client connection is up: follow it from now, so that its server end (which may
            // be on this host, and whose events can come first) can name this process.
            (TCP_SYN_SENT, TCP_ESTABLISHED) => {
                let task = self.connecting.remove(&c.sk).unwrap_or(c.task);
                if !self.conns.contains_key(&c.sk) {
                    if self.conns.len() >= self.cap {
                        self.evict(c.ts_ns, metrics, linker);
                    }
                    let spare = self.spare.pop().unwrap_or_default();
                    self.conns
                        .insert(c.sk, Box::new(Conn::new(c.tuple, task, c.ts_ns, spare)));
                    self.by_tuple.insert(c.tuple, c.sk);
                    metrics.conns_tracked.set(self.conns.len() as i64);
                }
                return;
            }
            (_, TCP_CLOSE) => {
                self.connecting.remove(&c.sk);
            }
            _ => {}
        }
        let Some(conn) = self.conns.get_mut(&c.sk) else {
            return;
        };
        if c.new_state == TCP_CLOSE
            && matches!(c.old_state, TCP_ESTABLISHED | TCP_CLOSE_WAIT)
            && conn.reset.is_none()
        {
            // Reset (or aborted) while open: the send it may have come in answer to is still to
            // be read. Ended by `reap_resets`. An abortive close runs in the closing process;
            // a reset taken in runs wherever the packet is (softirq, or on loopback the
            // sender's process).
            let at = std::time::Instant::now();
            conn.reset = Some(at);
            conn.reset_by_peer = if self.resets_marked {
                c.peer_reset
            } else {
                c.task.tgid != conn.task.tgid
            };
            // This end's own abort runs in its process; a timeout, an ICMP error or a socket
            // destroyed from outside (`ss -K`) is neither end's doing.
            conn.aborted_here =
                self.resets_marked && !c.peer_reset && c.task.tgid == conn.task.tgid;
            conn.acked_at_reset = c.bytes_acked;
            self.closing.push_back((c.sk, at));
            return;
        }
        // This end closing (FIN_WAIT1 from ESTABLISHED, LAST_ACK after the peer's FIN) happens in
        // the closing process, after all its reads and writes: whatever was open ends here.
        // The peer's FIN (CLOSE_WAIT) is not used: it arrives before this end has read the last
        // bytes, whose end of stream (a 0-byte read) ends open messages instead.
        let local_close = (c.old_state == TCP_ESTABLISHED && c.new_state == TCP_FIN_WAIT1)
            || c.new_state == TCP_LAST_ACK
            || c.new_state == TCP_CLOSE;
        if local_close {
            // Events lost at the very end show as a gap against the socket's last number
            // (this end closes in its own process, after its last read or write was numbered).
            // A TLS connection's events are numbered by its library session, not its socket.
            let gap = c.new_state != TCP_CLOSE
                && !conn.tls
                && c.seq != 0
                && conn.next_seq != 0
                && c.seq.wrapping_add(1) != conn.next_seq;
            if gap {
                lost_events(conn, metrics, linker);
            }
            finish_all(conn, metrics, out);
            // A server that closes first with requests read and unanswered failed them; so
            // did, as its client saw it, one whose close came first (this end's LAST_ACK).
            let server_closed = match conn.role.side() {
                Some(Side::Server) => {
                    c.old_state == TCP_ESTABLISHED && c.new_state == TCP_FIN_WAIT1
                }
                Some(Side::Client) => c.new_state == TCP_LAST_ACK && all_acked(conn, c.bytes_acked),
                _ => false,
            };
            if server_closed && !conn.close_announced && has_unanswered(conn) {
                let (tuple, peer_sk) = (conn.tuple, conn.peer_sk);
                if self.counts_unanswered(&tuple, peer_sk, c.sk)
                    && let Some(conn) = self.conns.get_mut(&c.sk)
                {
                    unanswered(conn, c.ts_ns, out);
                }
            }
        }
        if c.new_state == TCP_CLOSE {
            self.remove(c.sk, metrics, linker);
        }
    }

    /// Ends the connections reset more than RESET_GRACE before `now`, as their close would
    /// have: what they left open is finished or counted.
    pub fn reap_resets(
        &mut self,
        now: std::time::Instant,
        metrics: &Metrics,
        linker: &mut Linker,
        out: &mut Vec<Exchange>,
    ) {
        while let Some(&(sk, at)) = self.closing.front() {
            if now.duration_since(at) < RESET_GRACE {
                break;
            }
            self.closing.pop_front();
            // Unless the socket address is another connection's by now (reset or not).
            if self.conns.get(&sk).is_some_and(|c| c.reset == Some(at)) {
                self.end_reset(sk, metrics, linker, out);
            }
        }
    }

    /// Ends a connection that was reset, as its close would have: what it left open is
    /// finished or counted.
    fn end_reset(
        &mut self,
        sk: u64,
        metrics: &Metrics,
        linker: &mut Linker,
        out: &mut Vec<Exchange>,
    ) {
        let Some(conn) = self.conns.get_mut(&sk) else {
            return;
        };
        finish_all(conn, metrics, out);
        // The server reset it with requests unanswered, as the client saw it; or, as the
        // server's end saw it, it aborted the connection itself (SO_LINGER 0, a crash with
        // bytes unread), when resets taken in are told from that.
        let server_reset = match conn.role.side() {
            Some(Side::Client) => conn.reset_by_peer && all_acked(conn, conn.acked_at_reset),
            Some(Side::Server) => conn.aborted_here,
            None => false,
        };
        if server_reset && !conn.close_announced && has_unanswered(conn) {
            let (tuple, peer_sk) = (conn.tuple, conn.peer_sk);
            if self.counts_unanswered(&tuple, peer_sk, sk)
                && let Some(conn) = self.conns.get_mut(&sk)
            {
                unanswered(conn, conn.last_ns, out);
            }
        }
        self.remove(sk, metrics, linker);
    }

    /// Whether the end `sk` counts its requests left unanswered as failed: a server's end
    /// always; a client's when its server's end is not on this host (that end counts them, or
    /// its client cancelled them).
    fn counts_unanswered(&self, tuple: &Tuple, peer_sk: u64, sk: u64) -> bool {
        match self.conns.get(&sk).and_then(|c| c.role.side()) {
            Some(Side::Server) => true,
            Some(Side::Client) => self
                .peer_of(tuple, peer_sk)
                .is_none_or(|p| p.side != Some(Side::Server)),
            _ => false,
        }
    }

    fn remove(&mut self, sk: u64, metrics: &Metrics, linker: &mut Linker) {
        if let Some(mut conn) = self.conns.remove(&sk) {
            if !conn.pending.is_empty() {
                metrics
                    .pairing_drops
                    .with_label_values(&["no_response"])
                    .inc_by(conn.pending.len() as u64);
            }
            let current = conn.current.as_ref().and_then(|c| c.request.as_ref());
            if current.is_some() {
                metrics
                    .pairing_drops
                    .with_label_values(&["response_unfinished"])
                    .inc();
            }
            for span in conn.pending.iter().chain(current).filter_map(|p| p.span) {
                linker.abandon(span);
            }
            if let Some(mut h2) = conn.h2.take() {
                self.h2_conns -= 1;
                let side = conn.role.side().unwrap_or(Side::Client);
                h2.unpair_all(&conn.end(side), metrics, linker, "no_response");
            }
            if self.by_tuple.get(&conn.tuple) == Some(&sk) {
                self.by_tuple.remove(&conn.tuple);
            }
            if let Some(addr) = conn.client_addr
                && let Some(ends) = self.by_client.get_mut(&addr)
            {
                for end in ends.iter_mut().filter(|e| **e == sk) {
                    *end = 0;
                }
                if *ends == [0, 0] {
                    self.by_client.remove(&addr);
                }
            }
            if self.closed.len() >= RECENTLY_CLOSED {
                // Keeps both tables' capacity: no allocation, a memset of control bytes.
                std::mem::swap(&mut self.closed, &mut self.closed_old);
                self.closed.clear();
            }
            let key = self.closed_key(&conn.tuple);
            self.closed.insert(key, conn.peer());
            metrics.conns_tracked.set(self.conns.len() as i64);
            if self.spare.len() < SPARE_BUFFERS
                && let Some(b) = Buffers::of(&mut conn)
            {
                self.spare.push(b);
            }
        }
    }

    /// Makes room: forgets connections idle for a while, or else the longest idle one.
    fn evict(&mut self, now: u64, metrics: &Metrics, linker: &mut Linker) {
        let idle: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| now.saturating_sub(c.last_ns) > IDLE_NS)
            .map(|(sk, _)| *sk)
            .collect();
        let victims = if idle.is_empty() {
            self.conns
                .iter()
                .min_by_key(|(_, c)| c.last_ns)
                .map(|(sk, _)| vec![*sk])
                .unwrap_or_default()
        } else {
            idle
        };
        metrics.conn_evictions.inc_by(victims.len() as u64);
        for sk in victims {
            self.remove(sk, metrics, linker);
        }
    }
}

/// Calls skipped on a connection followed from its middle before it is found to carry no known
/// protocol (a few reads of a long body's rest, by a reader of 4 KiB at a time).
const MAX_MIDSTREAM_SKIPS: u8 = 32;

/// Some of this connection's events never arrived (ring buffer full): what was in flight cannot be
/// paired truthfully any more, so it is dropped (and counted) and both streams look for the next
/// message start.
fn lost_events(conn: &mut Conn, metrics: &Metrics, linker: &mut Linker) {
    metrics.connections_desynced.inc();
    if let Some(side) = conn.role.side() {
        let end = conn.end(side);
        if let Some(h2) = &mut conn.h2 {
            h2.lost_events(&end, metrics, linker);
            return;
        }
    }
    unpair_all(conn, metrics, linker, "events_lost");
    conn.undecided.clear();
    for reader in [&mut conn.requests, &mut conn.responses] {
        reader.state = ReadState::Resync;
        reader.head.clear();
    }
}

fn process(conn: &mut Conn, ctx: &mut Ctx<'_, '_>) {
    let d = ctx.d;
    if d.bytes == 0 {
        // End of stream on a read: what the peer left open ends here.
        let side = match conn.role {
            Role::Http(side) => side,
            _ => return,
        };
        let requests = (side == Side::Server) == (d.direction == Direction::Ingress);
        finish_reader(conn, requests, ctx.metrics, ctx.out);
        return;
    }
    if conn.role == Role::Unknown {
        // Bytes of a start too short to tell are kept and fed with what follows them.
        let joined = (!conn.undecided.is_empty()).then(|| {
            let mut j = std::mem::take(&mut conn.undecided);
            j.extend_from_slice(d.payload);
            j
        });
        let head = joined.as_deref().unwrap_or(d.payload);
        let egress = d.direction == Direction::Egress;
        // A SETTINGS frame first on a connection older than the tracer is one from its middle.
        let h2 = match http2::opening(head) {
            Opening::ServerSettings if d.from_sock => Opening::Neither,
            h2 => h2,
        };
        // The client writes the preface; a server may write its SETTINGS first, which its
        // client then reads first.
        let h2_side = match h2 {
            Opening::Preface | Opening::ServerSettings if egress == (h2 == Opening::Preface) => {
                Some(Side::Client)
            }
            Opening::Preface | Opening::ServerSettings => Some(Side::Server),
            Opening::Undecided | Opening::Neither => None,
        };
        // The opening's own event was lost (ring buffer full), but the kernel side saw it and
        // says which end this is: followed from here, as after a loss (the header tables'
        // start went by; the streams skipped are counted at the next one seen).
        let (h2_side, opening_lost) = match (h2_side, d.h2_end) {
            (None, Some(side)) => (Some(side), true),
            (side, _) => (side, false),
        };
        if let Some(side) = h2_side {
            if *ctx.h2_conns >= MAX_H2_CONNS {
                ctx.metrics
                    .parse_failures
                    .with_label_values(&["h2_connections_full"])
                    .inc();
                conn.role = Role::Opaque;
                return;
            }
            *ctx.h2_conns += 1;
            conn.role = Role::Http2(side);
            let mut h2 = Box::<Streams>::default();
            if opening_lost {
                conn.undecided.clear();
                h2.lost_events(&conn.end(side), ctx.metrics, ctx.linker);
                ctx.metrics.connections_desynced.inc();
            }
            conn.h2 = Some(h2);
            let data = Data {
                payload: head,
                bytes: d.bytes + (head.len() - d.payload.len()) as u32,
                ..*d
            };
            feed_h2(conn, side, &data, ctx);
            return;
        }
        let start = match http1::classify(head) {
            Start::Neither if h2 == Opening::Undecided => Start::Undecided,
            start => start,
        };
        conn.role = match (start, d.direction) {
            (Start::Request, Direction::Egress) | (Start::Response, Direction::Ingress) => {
                Role::Http(Side::Client)
            }
            (Start::Request, Direction::Ingress) | (Start::Response, Direction::Egress) => {
                Role::Http(Side::Server)
            }
            (Start::Undecided, _) if d.complete() && head.len() < MAX_UNDECIDED => {
                if joined.is_none() {
                    conn.undecided_ns = d.boundary_ns();
                    conn.undecided_seq = d.tcp_seq;
                }
                conn.undecided = head.to_vec();
                return;
            }
            // A connection followed from its middle (older than the tracer, or a TLS session
            // whose handshake went by before its library was hooked) may first show the rest
            // of a body: its next calls begin the next message.
            _ if conn.from_middle
                && !tls_record(head)
                && conn.midstream_skips < MAX_MIDSTREAM_SKIPS =>
            {
                conn.midstream_skips += 1;
                conn.undecided.clear();
                ctx.metrics
                    .pairing_drops
                    .with_label_values(&["midstream"])
                    .inc();
                return;
            }
            _ => {
                let reason = if tls_record(head) {
                    "encrypted"
                } else {
                    "unknown_protocol"
                };
                ctx.metrics
                    .parse_failures
                    .with_label_values(&[reason])
                    .inc();
                Role::Opaque
            }
        };
        if let (Some(joined), Role::Http(side)) = (&joined, conn.role) {
            let data = Data {
                payload: joined,
                bytes: d.bytes + (joined.len() - d.payload.len()) as u32,
                // The joined bytes begin with the earlier call's.
                tcp_seq: conn.undecided_seq,
                ..*d
            };
            let requests = (side == Side::Server) == (d.direction == Direction::Ingress);
            let mut ctx = Ctx {
                d: &data,
                first_ns: Some(conn.undecided_ns),
                metrics: ctx.metrics,
                linker: &mut *ctx.linker,
                out: &mut *ctx.out,
                heads: &mut *ctx.heads,
                h2_conns: &mut *ctx.h2_conns,
                bodies: &mut *ctx.bodies,
            };
            feed(conn, requests, &mut ctx);
            return;
        }
    }
    if let Role::Http2(side) = conn.role {
        feed_h2(conn, side, d, ctx);
        return;
    }
    let Role::Http(side) = conn.role else {
        return;
    };
    let requests = (side == Side::Server) == (d.direction == Direction::Ingress);
    feed(conn, requests, ctx);
}

/// One syscall's bytes on an HTTP/2 connection.
fn feed_h2(conn: &mut Conn, side: Side, d: &Data<'_>, ctx: &mut Ctx<'_, '_>) {
    let Some(h2) = conn.h2.as_mut() else {
        return;
    };
    let requests = (side == Side::Server) == (d.direction == Direction::Ingress);
    h2.feed(
        requests,
        &mut streams::Env {
            d,
            side,
            tuple: conn.tuple,
            task: conn.task,
            peer_local: conn.peer_local,
            peer_sk: conn.peer_sk,
            metrics: ctx.metrics,
            linker: ctx.linker,
            out: ctx.out,
        },
    );
}

/// The requests waiting for a response can no longer be paired truthfully with what comes:
/// they are dropped, counted as lost with `reason`, and their spans abandoned.
fn unpair_all(conn: &mut Conn, metrics: &Metrics, linker: &mut Linker, reason: &'static str) {
    let current = conn.current.take().and_then(|c| c.request);
    let n = conn.pending.len() as u64 + u64::from(current.is_some());
    // Requests not kept are already counted as lost; their places go with the queue, and the
    // responses that come without a request are now these ones' (not uncaptured requests').
    conn.overflow_gap = 0;
    conn.requests_beyond_capture = false;
    let end = conn.role.side().map(|side| conn.end(side));
    for p in conn.pending.drain(..).chain(current) {
        match end {
            Some(end) => give_up(&end, p.span, false, reason, linker, metrics),
            None => {
                if let Some(span) = p.span {
                    linker.abandon(span);
                }
            }
        }
    }
    if n > 0 {
        metrics.pairing_drops.with_label_values(&[reason]).inc_by(n);
    }
}

/// A request this end will not count (`span`: the one it opened for it), counted lost by the
/// end whose it is when both are traced here. A server end's span that gives its client span
/// back (or a stream `released` to it) leaves the request to that end; else the server end
/// counts it (`count_lost`). A client span its server end claimed is that end's; one not
/// claimed is counted here, and settles its server end's loss of it, unless that end gave it
/// back (it counts neither way).
pub(crate) fn give_up(
    end: &End,
    span: Option<SpanId>,
    released: bool,
    reason: &'static str,
    linker: &mut Linker,
    metrics: &Metrics,
) {
    match (end.side, span) {
        (Side::Server, Some(span)) if linker.abandon(span) => {}
        (Side::Server, _) if released => {}
        (Side::Server, _) => count_lost(end, reason, 1, metrics, linker),
        (Side::Client, Some(span)) => {
            let (claimed, handed_back) = (linker.claimed(span), linker.handed_back(span));
            linker.abandon(span);
            if !claimed {
                metrics
                    .requests_lost
                    .with_label_values(&[end.side.as_str(), reason])
                    .inc();
                if (end.peer_here || end.peer_local) && !handed_back {
                    linker.client_counted(end.client, metrics);
                }
            }
        }
        (Side::Client, None) => count_lost(end, reason, 1, metrics, linker),
    }
}

/// Consumes one syscall's bytes on the request or response stream.
fn feed(conn: &mut Conn, requests: bool, ctx: &mut Ctx<'_, '_>) {
    let d = ctx.d;
    let total = d.bytes as u64;
    let shown = d.payload;
    let at_ns = d.boundary_ns();
    let mut off: u64 = 0;
    while off < total {
        let at = &shown[(off as usize).min(shown.len())..];
        let reader = if requests {
            &mut conn.requests
        } else {
            &mut conn.responses
        };
        reader.last_ns = at_ns;
        match &mut reader.state {
            ReadState::Idle | ReadState::Resync => {
                let resync = matches!(reader.state, ReadState::Resync);
                if at.is_empty() {
                    // The start of this message was not captured.
                    let failure = (!resync).then_some("uncaptured_start");
                    lose_sync(conn, requests, ctx, failure, "response_unseen");
                    return;
                }
                let expect = if requests {
                    Start::Request
                } else {
                    Start::Response
                };
                let start = http1::classify(at);
                if start != expect && start != Start::Undecided {
                    let failure = (!resync).then_some("unexpected_start");
                    lose_sync(conn, requests, ctx, failure, "response_unparsed");
                    return;
                }
                let seq = d.tcp_seq.map(|s| s.wrapping_add(off as u32));
                reader.begin(ctx.first_ns.take().unwrap_or(at_ns), seq);
            }
            ReadState::Head => {
                let prev = reader.head.len();
                let room = MAX_HEAD - prev;
                let add = &at[..at.len().min(room)];
                // Bytes of this syscall past what was captured belong to this head or after it.
                if (at.len() as u64) < total - off {
                    reader.head_lost = true;
                }
                // Most heads come whole in one syscall: parsed where they lie, copied only
                // when the rest is still to come.
                let in_place = prev == 0;
                if !in_place {
                    reader.head.extend_from_slice(add);
                }
                let head: &[u8] = if in_place { add } else { &reader.head };
                let parsed = ctx
                    .heads
                    .parse(requests, head, conn.peer_local)
                    .map(|p| p.map(|h| (h.head_len(), h)));
                match parsed {
                    Ok(Some((head_len, info))) => {
                        let used = (head_len - prev) as u64;
                        off += used;
                        reader.bytes += used;
                        on_head(conn, requests, info, ctx);
                        if let Role::Http2(side) = conn.role {
                            // Upgraded to h2c: the rest of this call is HTTP/2 frames.
                            if off < total {
                                let rest = Data {
                                    payload: &shown[(off as usize).min(shown.len())..],
                                    bytes: (total - off) as u32,
                                    frames: &[],
                                    ..*d
                                };
                                feed_h2(conn, side, &rest, ctx);
                            }
                            return;
                        }
                    }
                    Ok(None) if !reader.head_lost && head.len() < MAX_HEAD => {
                        // Wait for the rest of the head.
                        if in_place {
                            reader.head.extend_from_slice(add);
                        }
                        reader.bytes += total - off;
                        return;
                    }
                    Ok(None) => {
                        // The head outgrew the capture: salvage its first line.
                        let info = if requests {
                            http1::parse_request_line(head).map(|(method, path)| {
                                Head::Request(http1::RequestHead {
                                    method,
                                    path,
                                    head_len: 0,
                                    body: BodyLen::UntilClose,
                                    context: None,
                                    minor_version: 1,
                                    upgrade_h2c: false,
                                })
                            })
                        } else {
                            http1::parse_status_line(head).map(|status| {
                                Head::Response(http1::ResponseHead {
                                    status,
                                    head_len: 0,
                                    body: BodyLen::UntilClose,
                                    closes: false,
                                })
                            })
                        };
                        reader.bytes += total - off;
                        // Cut by the capture (else by MAX_HEAD).
                        let cut = reader.head_lost;
                        conn.requests_beyond_capture |= requests;
                        conn.responses_unsure |= !requests;
                        ctx.metrics
                            .parse_failures
                            .with_label_values(&["head_beyond_capture"])
                            .inc();
                        match info {
                            Some(info) => {
                                on_head(conn, requests, info, ctx);
                                // Pipelined: the uncaptured rest of this call may hold the
                                // responses of the requests after this one (wrk's pipelining
                                // reads 16 at once), and how many is not known: this one ends
                                // here, and those cannot be paired truthfully.
                                if !requests && !conn.pending.is_empty() && conn.current.is_some() {
                                    complete(conn, false, at_ns, ctx);
                                    lose_sync(conn, false, ctx, None, "response_beyond_capture");
                                }
                            }
                            None => {
                                let reason = if cut {
                                    "response_beyond_capture"
                                } else {
                                    "response_unparsed"
                                };
                                lose_sync(conn, requests, ctx, None, reason);
                            }
                        }
                        return;
                    }
                    Err(e) => {
                        lose_sync(conn, requests, ctx, Some(e.reason()), "response_unparsed");
                        return;
                    }
                }
            }
            ReadState::Body(body) => {
                let n = total - off;
                let one = (!conn.pipelined, conn.framed);
                // A request whose body was not all seen has ended when its response is done
                // and a new request line begins a syscall.
                if requests
                    && off == 0
                    && !matches!(body, Body::Open)
                    && conn.pending.is_empty()
                    && conn.current.is_none()
                    && http1::classify(at) == Start::Request
                {
                    ctx.metrics
                        .parse_failures
                        .with_label_values(&["request_body_unseen"])
                        .inc();
                    conn.requests.state = ReadState::Idle;
                    continue;
                }
                let reader = if requests {
                    &mut conn.requests
                } else {
                    &mut conn.responses
                };
                let ReadState::Body(body) = &mut reader.state else {
                    continue;
                };
                match body {
                    Body::Length(rem) => {
                        let take = (*rem).min(n);
                        *rem -= take;
                        off += take;
                        reader.bytes += take;
                        if *rem == 0 {
                            complete(conn, requests, d.boundary_ns(), ctx);
                        } else {
                            let left = Some(*rem);
                            conn.framed |= tell_framing(reader, d, left, one, ctx.bodies);
                        }
                    }
                    Body::Chunked(chunks) => {
                        let (used, done, broken) = match chunks.feed(at) {
                            Ok(Some(k)) => (k as u64, true, false),
                            Ok(None) => {
                                let blind = n - at.len() as u64;
                                if blind == 0 || chunks.skip(blind) {
                                    (n, false, false)
                                } else if http1::tail_ends_chunked(d.tail) {
                                    (n, true, false)
                                } else {
                                    (n, false, true)
                                }
                            }
                            Err(_) => {
                                ctx.metrics
                                    .parse_failures
                                    .with_label_values(&["bad_chunk"])
                                    .inc();
                                (n, true, false)
                            }
                        };
                        off += used;
                        reader.bytes += used;
                        // Where a chunk ends is known only while its framing is followed.
                        let left = chunks.data_left().filter(|_| !broken);
                        if broken {
                            reader.state = ReadState::Body(Body::ChunkedBlind);
                        }
                        if done {
                            complete(conn, requests, d.boundary_ns(), ctx);
                        } else {
                            conn.framed |= tell_framing(reader, d, left, one, ctx.bodies);
                        }
                    }
                    Body::ChunkedBlind => {
                        off = total;
                        reader.bytes += n;
                        let ends = if d.complete() {
                            http1::ends_chunked(shown)
                        } else {
                            http1::tail_ends_chunked(d.tail)
                        };
                        if ends {
                            complete(conn, requests, d.boundary_ns(), ctx);
                        } else {
                            conn.framed |= tell_framing(reader, d, None, one, ctx.bodies);
                        }
                    }
                    Body::Open => {
                        // A new message start ends a message of unknown length.
                        let expect = if requests {
                            Start::Request
                        } else {
                            Start::Response
                        };
                        if off == 0 && http1::classify(at) == expect {
                            let end = reader.last_ns;
                            complete(conn, requests, end, ctx);
                            continue;
                        }
                        off = total;
                        reader.bytes += n;
                        conn.framed |= tell_framing(reader, d, None, one, ctx.bodies);
                    }
                }
            }
        }
    }
}

/// After a call wholly inside a message body, of which `left` more bytes (or of its chunk) are
/// known to come. When that is long, the kernel side is told where they end, so that the calls
/// wholly inside them come without their payload, which nothing here reads. And on a
/// connection that has not pipelined (`one_at_a_time`), once a message is long (or with an end
/// told again), that its messages go one at a time in this direction, so that the long calls
/// inside later ones come trimmed, before this side could tell their ends or where it never
/// could (bodies of small chunks, or of a length not told, TLS plaintext). Told by TCP sequence
/// number (the kernel side gives it for long calls), from this call's end. Whether it told the
/// second.
fn tell_framing(
    reader: &mut Reader,
    d: &Data<'_>,
    left: Option<u64>,
    (one_at_a_time, framed): (bool, bool),
    bodies: &mut Vec<(BodyKey, BodyEnd)>,
) -> bool {
    // TLS plaintext has no sequence numbers: only the second can be told of it.
    if (d.tcp_seq.is_none() && !d.tls) || bodies.len() >= MAX_BODIES_PENDING {
        return false;
    }
    let left = left.unwrap_or(0);
    let end = d
        .tcp_seq
        .filter(|_| left >= SKIP_BODY_MIN)
        .map(|seq| {
            seq.wrapping_add(d.bytes)
                .wrapping_add(left.min(SKIP_BODY_MAX) as u32)
        })
        .filter(|&e| reader.told_end != Some(e));
    let one = one_at_a_time && (end.is_some() || (!framed && reader.bytes + left >= SKIP_BODY_MIN));
    if end.is_none() && !one {
        return false;
    }
    if end.is_some() {
        reader.told_end = end;
    }
    let skip = if end.is_some() { BODY_SKIP } else { 0 };
    let flags = skip | if one { BODY_ONE_AT_A_TIME } else { 0 };
    bodies.push((
        BodyKey::new(d.sk, d.direction.raw()),
        BodyEnd {
            tuple: d.sock_tuple,
            end_seq: end.unwrap_or(0),
            flags,
        },
    ));
    one
}

/// The connection pipelined (or turned to HTTP/2) after its socket was told its messages go one
/// at a time: told otherwise, both directions (the kernel side drops what it holds for them).
fn unframe(d: &Data<'_>, bodies: &mut Vec<(BodyKey, BodyEnd)>) {
    for direction in [DIR_EGRESS, DIR_INGRESS] {
        bodies.push((
            BodyKey::new(d.sk, direction),
            BodyEnd {
                tuple: d.sock_tuple,
                ..Default::default()
            },
        ));
    }
}

/// A stream lost its message boundary: count `failure` (if not already counted), look for the
/// next message start, and on the response side drop what can no longer be paired truthfully.
fn lose_sync(
    conn: &mut Conn,
    requests: bool,
    ctx: &mut Ctx<'_, '_>,
    failure: Option<&str>,
    unpair_reason: &'static str,
) {
    if let Some(reason) = failure {
        ctx.metrics
            .parse_failures
            .with_label_values(&[reason])
            .inc();
    }
    reader_mut(conn, requests).state = ReadState::Resync;
    if !requests {
        conn.responses_unsure = true;
        unpair_all(conn, ctx.metrics, ctx.linker, unpair_reason);
    }
}

fn reader_mut(conn: &mut Conn, requests: bool) -> &mut Reader {
    if requests {
        &mut conn.requests
    } else {
        &mut conn.responses
    }
}

/// One end of a connection, as counting its lost requests needs it.
#[derive(Clone, Copy, Debug)]
pub struct End {
    pub side: Side,
    /// The connection's client address (this end's own, or its peer's): where a server end's
    /// loss and its client end's count of the same request meet (`ledger`).
    pub client: SocketAddr,
    /// The other end was seen here.
    pub peer_here: bool,
    /// The other end may be on this host.
    pub peer_local: bool,
}

impl End {
    pub fn new(side: Side, tuple: &Tuple, peer_here: bool, peer_local: bool) -> Self {
        End {
            side,
            client: match side {
                Side::Server => tuple.remote,
                Side::Client => tuple.local,
            },
            peer_here,
            peer_local,
        }
    }
}

/// Whether the other end of `tuple` may be on this host: its address is loopback or this
/// end's own.
pub fn local_peer(tuple: &Tuple) -> bool {
    tuple.remote.ip().is_loopback() || tuple.remote.ip() == tuple.local.ip()
}

/// `n` requests this end will not count: lost, unless they are a client's whose server end is
/// traced here (that end counts them). A server end's losses wait for its client end's count
/// when that end may be here (`ledger`): a request that end counted is not lost.
pub(crate) fn count_lost(
    end: &End,
    reason: &'static str,
    n: u64,
    metrics: &Metrics,
    linker: &mut Linker,
) {
    let n = match end.side {
        _ if n == 0 => return,
        Side::Client if end.peer_here => return,
        Side::Client => n,
        Side::Server if end.peer_here || end.peer_local => {
            linker.server_lost(end.client, reason, n, metrics)
        }
        Side::Server => n,
    };
    if n > 0 {
        metrics
            .requests_lost
            .with_label_values(&[end.side.as_str(), reason])
            .inc_by(n);
    }
}

fn on_head(conn: &mut Conn, requests: bool, info: Head, ctx: &mut Ctx<'_, '_>) {
    let d = ctx.d;
    let body = match info {
        Head::Request(h) => 'request: {
            let side = match conn.role {
                Role::Http(side) => side,
                _ => Side::Client,
            };
            if conn.pending.len() >= MAX_IN_FLIGHT {
                // Not kept, but its place is: dropping the oldest instead paired every later
                // response with the request after its own.
                conn.requests_seen += 1;
                conn.overflow_gap = conn.overflow_gap.saturating_add(1);
                ctx.metrics
                    .pairing_drops
                    .with_label_values(&["pending_overflow"])
                    .inc();
                count_lost(
                    &conn.end(side),
                    "pending_overflow",
                    1,
                    ctx.metrics,
                    ctx.linker,
                );
                break 'request h.body;
            }
            let span = ctx.linker.start(spans::Start {
                kind: side,
                task: d.task,
                tuple: conn.tuple,
                context: h.context.as_ref(),
                index: conn.requests_seen,
                start_ns: conn.requests.start_ns,
                version: if h.minor_version == 0 { "1.0" } else { "1.1" },
                tls: d.tls,
                peer_local: conn.peer_local,
                goroutine: d.goroutine,
                seq: conn.requests.start_seq,
            });
            if !conn.pending.is_empty() && !conn.pipelined {
                conn.pipelined = true;
                if std::mem::take(&mut conn.framed) {
                    unframe(d, ctx.bodies);
                }
            }
            conn.requests_seen += 1;
            conn.pending.push_back(Pending {
                method: h.method,
                path: h.path,
                start_ns: conn.requests.start_ns,
                bytes: 0,
                task: d.task,
                span,
                gap_before: std::mem::take(&mut conn.overflow_gap),
                h2c: h.upgrade_h2c,
            });
            // A response still open when the next request begins has ended: by design when its
            // length is unknown; otherwise some of its bytes were not seen (sent by a syscall
            // that is not traced, or lost), and waiting for them would stall the connection.
            // Pipelined requests are rare enough that ending early is the better trade.
            if let ReadState::Body(body) = &conn.responses.state
                && conn.current.is_some()
            {
                if !matches!(body, Body::Open) {
                    ctx.metrics
                        .parse_failures
                        .with_label_values(&["response_body_unseen"])
                        .inc();
                }
                let end = conn.responses.last_ns;
                complete(conn, false, end, ctx);
            }
            h.body
        }
        Head::Response(h) => {
            if (100..200).contains(&h.status) && h.status != 101 {
                // Interim response: the final one follows.
                conn.responses.state = ReadState::Idle;
                return;
            }
            conn.close_announced = h.closes;
            // The response of a request that was not kept (queue full) pairs with nothing: that
            // request is already counted as lost.
            let unkept = match conn.pending.front_mut() {
                Some(front) if front.gap_before > 0 => {
                    front.gap_before -= 1;
                    true
                }
                None if conn.overflow_gap > 0 => {
                    conn.overflow_gap -= 1;
                    true
                }
                _ => false,
            };
            let request = if unkept {
                None
            } else {
                conn.pending.pop_front()
            };
            let request_method = request.as_ref().map(|r| r.method);
            if request.is_none() && !unkept {
                ctx.metrics
                    .pairing_drops
                    .with_label_values(&["response_without_request"])
                    .inc();
                // Its request was in bytes not captured (pipelined past the capture): a request
                // that happened and is not counted.
                if conn.requests_beyond_capture
                    && let Role::Http(side) = conn.role
                {
                    count_lost(
                        &conn.end(side),
                        "request_beyond_capture",
                        1,
                        ctx.metrics,
                        ctx.linker,
                    );
                }
            }
            let body = h.body_for(request.as_ref().map(|r| r.method));
            if let Some(span) = request.as_ref().and_then(|r| r.span) {
                ctx.linker.responding(span);
            }
            conn.current = Some(InFlight {
                request,
                status: h.status,
            });
            let tunnel = h.status == 101
                || (request_method == Some(Method::Connect) && (200..300).contains(&h.status));
            if h.status == 101 && upgrade_h2c(conn, ctx) {
                return;
            }
            if tunnel {
                // Upgraded (WebSocket) or tunnelled (CONNECT): the rest is not HTTP/1.
                let end = d.boundary_ns();
                complete(conn, false, end, ctx);
                conn.role = conn.role.side().map_or(Role::Opaque, Role::Tunnel);
                return;
            }
            body
        }
    };
    let reader = reader_mut(conn, requests);
    reader.state = ReadState::Body(match body {
        BodyLen::Empty => {
            complete(conn, requests, d.boundary_ns(), ctx);
            return;
        }
        BodyLen::Length(n) => Body::Length(n),
        BodyLen::Chunked => Body::Chunked(Chunked::default()),
        BodyLen::UntilClose => Body::Open,
    });
}

/// A 101 answering a request that offered `Upgrade: h2c`: the connection goes on in HTTP/2,
/// the request becoming stream 1, whose response comes in HTTP/2 frames (RFC 7540 §3.2).
/// False (the connection is then left as a tunnel) when the request did not offer h2c or no
/// more HTTP/2 connections can be followed.
fn upgrade_h2c(conn: &mut Conn, ctx: &mut Ctx<'_, '_>) -> bool {
    let Role::Http(side) = conn.role else {
        return false;
    };
    let offered = conn
        .current
        .as_ref()
        .and_then(|c| c.request.as_ref())
        .is_some_and(|r| r.h2c);
    if !offered {
        return false;
    }
    if *ctx.h2_conns >= MAX_H2_CONNS {
        ctx.metrics
            .parse_failures
            .with_label_values(&["h2_connections_full"])
            .inc();
        return false;
    }
    let Some(req) = conn.current.take().and_then(|c| c.request) else {
        return false;
    };
    *ctx.h2_conns += 1;
    conn.role = Role::Http2(side);
    // HTTP/2 frames from here: what was said of its HTTP/1 messages no longer holds.
    if std::mem::take(&mut conn.framed) {
        unframe(ctx.d, ctx.bodies);
    }
    conn.responses.state = ReadState::Idle;
    conn.h2 = Some(Box::new(Streams::upgraded(streams::Upgraded {
        method: req.method,
        path: req.path,
        start_ns: req.start_ns,
        req_bytes: req.bytes,
        task: req.task,
        span: req.span,
    })));
    true
}

/// The message being read on a stream is complete at `end_ns`.
fn complete(conn: &mut Conn, requests: bool, end_ns: u64, ctx: &mut Ctx<'_, '_>) {
    complete_message(conn, requests, end_ns, ctx.out);
}

fn complete_message(conn: &mut Conn, requests: bool, end_ns: u64, out: &mut Vec<Exchange>) {
    let Role::Http(side) = conn.role else {
        return;
    };
    if requests {
        let bytes = conn.requests.bytes;
        // Unless this request was not kept (the last one queued is another's). One whose
        // response has begun (before its body was all read: a 401 to an upload) is in
        // `current`.
        if conn.overflow_gap == 0 {
            match conn.pending.back_mut() {
                Some(p) => p.bytes = bytes,
                None => {
                    if let Some(InFlight {
                        request: Some(r), ..
                    }) = conn.current.as_mut()
                        && r.bytes == 0
                    {
                        r.bytes = bytes;
                    }
                }
            }
        }
        conn.requests.state = ReadState::Idle;
        return;
    }
    conn.responses.state = ReadState::Idle;
    let resp_bytes = conn.responses.bytes;
    let Some(InFlight {
        request: Some(mut req),
        status,
    }) = conn.current.take()
    else {
        return;
    };
    // Answered, response and all, before its body was all read (a 413 to an upload, a server
    // that discards the body): its bytes until then.
    if req.bytes == 0
        && conn.pending.is_empty()
        && conn.overflow_gap == 0
        && matches!(conn.requests.state, ReadState::Body(_))
    {
        req.bytes = conn.requests.bytes;
    }
    out.push(exchange(conn, side, req, status, end_ns, resp_bytes));
}

/// An HTTP/1 request of `conn` and what answered it.
fn exchange(
    conn: &Conn,
    side: Side,
    req: Pending,
    status: u16,
    end_ns: u64,
    resp_bytes: u64,
) -> Exchange {
    Exchange {
        side,
        task: if side == Side::Server {
            req.task
        } else {
            conn.task
        },
        tuple: conn.tuple,
        peer_sk: conn.peer_sk,
        unsure: conn.responses_unsure,
        method: req.method,
        path: req.path,
        status,
        grpc_status: None,
        start_ns: req.start_ns,
        end_ns: end_ns.max(req.start_ns),
        req_bytes: req.bytes,
        resp_bytes,
        span: req.span,
        tls: conn.tls,
    }
}

/// Whether the server's kernel acknowledged every byte this client end wrote (`acked`, the
/// kernel's count, counts the SYN too): its requests reached the server. A request that
/// crossed a server's close of an idle connection is not acknowledged (it is answered by a
/// reset): the server never had it, and the client retries it; not the server's failure. Not
/// known (no BTF, or TLS, whose writes are not the bytes on the wire): not counted.
fn all_acked(conn: &Conn, acked: u64) -> bool {
    !conn.tls && acked > conn.sent
}

/// The requests of an HTTP/1 connection left unanswered when its server closed or reset it:
/// failed, without a status (`NO_RESPONSE`), ended at `end_ns`.
fn unanswered(conn: &mut Conn, end_ns: u64, out: &mut Vec<Exchange>) {
    let Some(side) = conn.role.side() else {
        return;
    };
    if conn.h2.is_some() {
        let ends = h2_ends(conn, side);
        if let Some(h2) = conn.h2.as_mut() {
            h2.unanswered(&ends, end_ns, out);
        }
        return;
    }
    // Popped, not taken: the queue's buffer goes to the next connection.
    while let Some(req) = conn.pending.pop_front() {
        out.push(exchange(conn, side, req, NO_RESPONSE, end_ns, 0));
    }
}

/// Whether requests were read (by a server) or written (by a client) and not answered.
fn has_unanswered(conn: &Conn) -> bool {
    match &conn.h2 {
        Some(h2) => h2.has_unanswered(),
        None => !conn.pending.is_empty(),
    }
}

/// Ends what is open on one stream because no more bytes will come.
fn finish_reader(conn: &mut Conn, requests: bool, metrics: &Metrics, out: &mut Vec<Exchange>) {
    let reader = reader_mut(conn, requests);
    let end = reader.last_ns;
    match reader.state {
        ReadState::Head => {
            metrics
                .parse_failures
                .with_label_values(&["truncated_head"])
                .inc();
            reader.state = ReadState::Idle;
        }
        ReadState::Body(Body::Open) => complete_message(conn, requests, end, out),
        ReadState::Body(_) => {
            metrics
                .parse_failures
                .with_label_values(&["truncated_body"])
                .inc();
            complete_message(conn, requests, end, out);
        }
        ReadState::Idle | ReadState::Resync => {}
    }
}

/// What an HTTP/2 connection's exchanges say of it, as this end (`side`) saw it.
fn h2_ends(conn: &Conn, side: Side) -> streams::Ends {
    streams::Ends {
        side,
        task: conn.task,
        tuple: conn.tuple,
        peer_sk: conn.peer_sk,
        tls: conn.tls,
    }
}

fn finish_all(conn: &mut Conn, metrics: &Metrics, out: &mut Vec<Exchange>) {
    if conn.h2.is_some()
        && let Some(side) = conn.role.side()
    {
        let ends = h2_ends(conn, side);
        if let Some(h2) = conn.h2.as_mut() {
            h2.finish_answered(&ends, out);
        }
        return;
    }
    finish_reader(conn, true, metrics, out);
    finish_reader(conn, false, metrics, out);
}

/// Whether bytes begin with a TLS record header (content type change_cipher_spec, alert,
/// handshake or application data; version 3.x): ciphertext, from a library whose calls are not
/// followed, or seen before its session was (a Node.js server's ClientHello).
fn tls_record(b: &[u8]) -> bool {
    matches!(b, [20..=23, 3, 0..=4, ..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Comm, Conn as ConnEvent};

    const SK: u64 = 0xffff_8880_0000_1000;

    /// Another process's thread.
    fn other_task() -> Task {
        Task {
            tgid: 7,
            tid: 7,
            ..task()
        }
    }

    fn task() -> Task {
        Task {
            tgid: 42,
            tid: 42,
            comm: Comm(*b"server\0\0\0\0\0\0\0\0\0\0"),
            cgroup_id: 1,
        }
    }

    fn tuple() -> Tuple {
        Tuple {
            local: "127.0.0.1:8080".parse().unwrap(),
            remote: "127.0.0.1:50000".parse().unwrap(),
        }
    }

    struct Harness {
        table: ConnTable,
        linker: Linker,
        metrics: Metrics,
        out: Vec<Exchange>,
        ts: u64,
        /// The last event number given out (a TLS session's writes).
        seq: u32,
        /// A TLS session's reads' (numbered apart, as the kernel side does).
        seq_in: u32,
        /// The next events are TLS plaintext.
        tls: bool,
        /// The next events come with no kernel state for their socket (`Data::from_sock`).
        from_sock: bool,
        /// The kernel side saw the connection open in HTTP/2 (`Data::h2_end`).
        h2_end: Option<Side>,
        /// The next event's TCP sequence number (advanced by its bytes), as the kernel side
        /// gives it for long calls.
        tcp_seq: Option<u32>,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                table: ConnTable::new(16),
                linker: Linker::new(crate::spans::Sampler::ratio(1.0)),
                metrics: Metrics::new(),
                out: Vec::new(),
                ts: 1_000_000,
                seq: 0,
                seq_in: 0,
                tls: false,
                from_sock: false,
                h2_end: None,
                tcp_seq: None,
            }
        }

        /// One syscall moving `bytes` of which `shown` were captured.
        fn io(&mut self, direction: Direction, shown: &[u8], bytes: usize, tail: &[u8]) {
            self.ts += 1000;
            let seq = if self.tls && direction == Direction::Ingress {
                self.seq_in = self.seq_in.wrapping_add(1);
                self.seq_in
            } else {
                self.seq = self.seq.wrapping_add(1);
                self.seq
            };
            let d = Data {
                task: task(),
                task_known: false,
                sk: SK,
                goroutine: 0,
                tcp_seq: self.tcp_seq,
                tuple: tuple(),
                sock_tuple: Default::default(),
                ts_enter_ns: self.ts - 500,
                ts_exit_ns: self.ts,
                direction,
                bytes: bytes as u32,
                seq,
                payload: shown,
                tail,
                frames: &[],
                from_sock: self.from_sock,
                tls: self.tls,
                lost_requests: (0, 0),
                h2_end: self.h2_end,
            };
            self.table
                .on_data(&d, &self.metrics, &mut self.linker, &mut self.out);
            if let Some(s) = &mut self.tcp_seq {
                *s = s.wrapping_add(bytes as u32);
            }
        }

        fn read(&mut self, b: &[u8]) {
            self.io(Direction::Ingress, b, b.len(), &[]);
        }

        /// A response head for a body of `length`, written from TCP sequence number `seq` on in
        /// a call of 2 KiB (the body's first bytes with it, not captured).
        fn long_head(&mut self, seq: u32, length: usize) {
            self.tcp_seq = Some(seq);
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n");
            self.io(Direction::Egress, head.as_bytes(), 2048, &[]);
        }

        /// `left` bytes written inside a body, 64 KiB a call, as the kernel side sends such
        /// calls once told where the body ends: without payload.
        fn body_calls(&mut self, mut left: usize) {
            while left > 0 {
                let n = left.min(65536);
                self.io(Direction::Egress, &[], n, &[]);
                left -= n;
            }
        }

        fn write(&mut self, b: &[u8]) {
            self.io(Direction::Egress, b, b.len(), &[]);
        }

        fn state(&mut self, old: u32, new: u32) {
            self.state_in(old, new, task(), 0);
        }

        /// A state change that ran in `by`'s context (a reset taken in runs in another's), the
        /// kernel's count of acknowledged bytes then `bytes_acked`.
        fn state_in(&mut self, old: u32, new: u32, by: Task, bytes_acked: u64) {
            self.change(old, new, by, bytes_acked, false);
        }

        /// As `state_in`, marked (or not) as caused by an RST taken in.
        fn change(&mut self, old: u32, new: u32, by: Task, bytes_acked: u64, peer_reset: bool) {
            let c = ConnEvent {
                task: by,
                ts_ns: self.ts,
                sk: SK,
                tuple: tuple(),
                old_state: old,
                new_state: new,
                seq: 0,
                peer_fin: None,
                peer_reset,
                bytes_received: 0,
                bytes_acked,
                srtt_us: 0,
                retransmits: 0,
                lost_requests: (0, 0),
            };
            self.table
                .on_state(&c, &self.metrics, &mut self.linker, &mut self.out);
        }

        /// The reader's periodic look at reset connections, `later` after now.
        fn reap(&mut self, later: std::time::Duration) {
            self.table.reap_resets(
                std::time::Instant::now() + later,
                &self.metrics,
                &mut self.linker,
                &mut self.out,
            );
        }

        fn statuses(&self) -> Vec<(String, u16)> {
            self.out
                .iter()
                .map(|e| (e.path.to_string(), e.status))
                .collect()
        }

        fn failures(&self, reason: &str) -> u64 {
            self.metrics
                .parse_failures
                .with_label_values(&[reason])
                .get()
        }

        fn drops(&self, reason: &str) -> u64 {
            self.metrics
                .pairing_drops
                .with_label_values(&[reason])
                .get()
        }

        /// Requests counted lost, once those waiting for a client end (`ledger`) gave up.
        fn lost(&mut self, side: &str, reason: &str) -> u64 {
            let later = std::time::Instant::now() + std::time::Duration::from_secs(60);
            self.linker.expire_losses(later, &self.metrics);
            self.metrics
                .requests_lost
                .with_label_values(&[side, reason])
                .get()
        }
    }

    /// A server that closes first with a request read and unanswered failed it (status 0); one
    /// whose client closed first did not (the client cancelled), nor one whose last response
    /// announced the close (a request pipelined after it is not processed, by design).
    #[test]
    fn requests_a_server_closes_on_are_failures() {
        let mut h = Harness::new();
        h.read(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        h.read(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n");
        h.state(TCP_ESTABLISHED, TCP_FIN_WAIT1);
        assert_eq!(
            h.statuses(),
            [("/a".to_owned(), 200), ("/b".to_owned(), NO_RESPONSE)]
        );
        assert!(h.out[1].failed() && h.out[1].side == Side::Server);

        let mut h = Harness::new();
        h.read(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n");
        h.state(TCP_ESTABLISHED, TCP_CLOSE_WAIT);
        h.state(TCP_CLOSE_WAIT, TCP_LAST_ACK);
        h.state(TCP_LAST_ACK, TCP_CLOSE);
        assert!(h.out.is_empty(), "{:?}", h.statuses());
        assert_eq!(h.drops("no_response"), 1);

        let mut h = Harness::new();
        h.read(b"GET /d HTTP/1.1\r\nHost: x\r\n\r\nGET /e HTTP/1.1\r\nHost: x\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        h.state(TCP_ESTABLISHED, TCP_FIN_WAIT1);
        assert_eq!(h.statuses(), [("/d".to_owned(), 200)]);
    }

    /// A client whose server (not on this host) reset the connection with its request
    /// unanswered: failed, once the server's kernel acknowledged the request; not when it did
    /// not (a request that crossed the server's close of an idle connection: the client retries
    /// it), nor for the client's own abortive close (in its own process).
    #[test]
    fn requests_a_server_resets_are_failures_at_the_client() {
        const REQ: &[u8] = b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n";
        let peer = other_task();
        let all = 1 + REQ.len() as u64;
        for (by, acked, failed) in [(peer, all, true), (peer, 1, false), (task(), all, false)] {
            let mut h = Harness::new();
            h.write(REQ);
            h.state_in(TCP_ESTABLISHED, TCP_CLOSE, by, acked);
            h.reap(RESET_GRACE * 2);
            let want: &[(String, u16)] = if failed {
                &[("/f".to_owned(), NO_RESPONSE)]
            } else {
                &[]
            };
            assert_eq!(h.statuses(), want, "reset in {}, {acked} acked", by.tgid);
            assert_eq!(h.drops("no_response"), u64::from(!failed));
        }
    }

    /// With resets marked by the capture, which end aborted tells: a server's own abortive
    /// close (SO_LINGER 0, a crash: in its own process) with a request read and unanswered
    /// failed it; a reset its client sent did not (the client gave up), wherever it ran, nor
    /// an unmarked change to CLOSE in another context (a timeout, an ICMP error, a socket
    /// destroyed from outside); at a client, its server's reset failed the request, its own
    /// abortive close did not.
    #[test]
    fn marked_resets_tell_which_end_aborted() {
        const REQ: &[u8] = b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n";
        let other = other_task();
        let all = 1 + REQ.len() as u64;
        // (server's end, change ran in, RST taken in, failed)
        for (server, by, peer_reset, failed) in [
            (true, task(), false, true),
            (true, other, false, false),
            (true, task(), true, false),
            (true, other, true, false),
            (false, task(), true, true),
            (false, other, false, false),
        ] {
            let mut h = Harness::new();
            h.table.mark_resets();
            if server {
                h.read(REQ);
            } else {
                h.write(REQ);
            }
            h.change(TCP_ESTABLISHED, TCP_CLOSE, by, all, peer_reset);
            h.reap(RESET_GRACE * 2);
            let want: &[(String, u16)] = if failed {
                &[("/f".to_owned(), NO_RESPONSE)]
            } else {
                &[]
            };
            let case = (server, by.tgid, peer_reset);
            assert_eq!(h.statuses(), want, "{case:?}");
            assert_eq!(h.drops("no_response"), u64::from(!failed), "{case:?}");
        }
    }

    /// A server that aborted with a request read fails it even when, within the reset's grace,
    /// its socket's address is a new socket's whose own connection is not followed (it carried
    /// no data: the daemon's own API, here): that socket's changes end the aborted one first.
    #[test]
    fn an_aborted_connection_ends_when_its_address_is_reused() {
        const REQ: &[u8] = b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n";
        let other = other_task();
        let mut h = Harness::new();
        h.table.mark_resets();
        h.read(REQ);
        h.change(
            TCP_ESTABLISHED,
            TCP_CLOSE,
            task(),
            1 + REQ.len() as u64,
            false,
        );
        // The new socket closes in its own process, long before the grace is over.
        h.state_in(TCP_CLOSE_WAIT, TCP_LAST_ACK, other, 0);
        h.state_in(TCP_LAST_ACK, TCP_CLOSE, other, 0);
        assert_eq!(h.statuses(), [("/f".to_owned(), NO_RESPONSE)]);
        assert_eq!(h.drops("no_response"), 0);
        assert!(!h.table.is_open(SK));
        h.reap(RESET_GRACE * 2);
        assert_eq!(h.out.len(), 1);
    }

    /// `Upgrade: h2c` answered by 101 (curl --http2 to hypercorn, bytes as they were): the
    /// upgrading request is stream 1, answered in the frames that follow the 101 in the same
    /// read; the next streams are HTTP/2's. At both ends, nothing counted as 101.
    #[test]
    fn h2c_upgrade_goes_on_in_http2() {
        use crate::http2::testing::*;
        let request = b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
            Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n";
        for side in [Side::Client, Side::Server] {
            let (mut client, mut server) = (Encoder::new(), Encoder::new());
            let mut h = Harness::new();
            let (to_server, to_client) = match side {
                Side::Client => (Direction::Egress, Direction::Ingress),
                Side::Server => (Direction::Ingress, Direction::Egress),
            };
            let io = |h: &mut Harness, dir: Direction, b: &[u8]| h.io(dir, b, b.len(), &[]);
            io(&mut h, to_server, request);
            let mut answer =
                b"HTTP/1.1 101 \r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n".to_vec();
            answer.extend(frame(SETTINGS, 0, 0, &[]));
            answer.extend(headers(&mut server, 1, 0, &[(b":status", b"200")]));
            answer.extend(frame(DATA, END_STREAM, 1, b"ok\n"));
            io(&mut h, to_client, &answer);
            let mut opening = crate::http2::PREFACE.to_vec();
            opening.extend(frame(SETTINGS, 0, 0, &[]));
            opening.extend(headers(
                &mut client,
                3,
                END_STREAM,
                &[(b":method", b"GET"), (b":path", b"/missing")],
            ));
            io(&mut h, to_server, &opening);
            let mut answer = headers(&mut server, 3, 0, &[(b":status", b"404")]);
            answer.extend(frame(DATA, END_STREAM, 3, b"no"));
            io(&mut h, to_client, &answer);
            assert_eq!(
                h.statuses(),
                [("/ok".to_owned(), 200), ("/missing".to_owned(), 404)],
                "{side:?}"
            );
            assert!(h.out.iter().all(|e| e.side == side));
            assert_eq!(h.failures("h2_connections_full"), 0);
        }
    }

    /// The server end's first events, its client's preface and first streams, were lost (ring
    /// buffer full); the kernel side saw the preface and says this is an HTTP/2 server's end:
    /// followed as such, its header tables' start unknown. The streams skipped are counted
    /// lost at the next one seen, whose header block cannot be read (counted lost at its end):
    /// none silently missed, none counted as HTTP/1 nor found "unknown protocol".
    #[test]
    fn h2_server_end_whose_opening_was_lost_counts_what_it_missed() {
        use crate::http2::testing::*;
        let (mut client, mut server) = (Encoder::new(), Encoder::new());
        let mut h = Harness::new();
        h.h2_end = Some(Side::Server);
        // Streams 1 and 3 went by in the lost events (their header blocks fill the client's
        // table).
        for id in [1, 3] {
            headers(
                &mut client,
                id,
                END_STREAM,
                &[(b":method", b"GET"), (b":path", b"/a")],
            );
            headers(&mut server, id, 0, &[(b":status", b"200")]);
        }
        h.seq = 4;
        let request = headers(
            &mut client,
            5,
            END_STREAM,
            &[(b":method", b"GET"), (b":path", b"/a")],
        );
        h.read(&request);
        let mut answer = headers(&mut server, 5, 0, &[(b":status", b"200")]);
        answer.extend(frame(DATA, END_STREAM, 5, b"ok"));
        h.write(&answer);
        assert_eq!(h.failures("unknown_protocol"), 0);
        assert_eq!(h.lost("server", "h2_stream_unseen"), 2);
        assert_eq!(
            h.lost("server", "h2_stream_unseen")
                + h.lost("server", "h2_headers_unreadable")
                + h.out.len() as u64,
            3
        );
    }

    /// An HTTP/2 client that closes once it has the body's length (curl) never reads the
    /// server's END_STREAM: the stream, answered, counts at the close with what was seen; a
    /// stream without an answer does not.
    #[test]
    fn h2_answer_without_its_end_counts_at_the_close() {
        use crate::http2::testing::*;
        let (mut client, mut server) = (Encoder::new(), Encoder::new());
        let mut h = Harness::new();
        let mut opening = crate::http2::PREFACE.to_vec();
        opening.extend(frame(SETTINGS, 0, 0, &[]));
        for (id, path) in [(1, &b"/answered"[..]), (3, b"/waiting")] {
            opening.extend(headers(
                &mut client,
                id,
                END_STREAM,
                &[(b":method", b"GET"), (b":path", path)],
            ));
        }
        h.write(&opening);
        let mut answer = headers(&mut server, 1, 0, &[(b":status", b"200")]);
        answer.extend(frame(DATA, 0, 1, b"ok\n"));
        h.read(&answer);
        assert!(h.out.is_empty());
        h.state(TCP_ESTABLISHED, TCP_FIN_WAIT1);
        assert_eq!(h.statuses(), [("/answered".to_owned(), 200)]);
        assert_eq!(h.out[0].resp_bytes, 3);
        h.state(TCP_FIN_WAIT1, TCP_CLOSE);
        assert_eq!(h.out.len(), 1);
        assert_eq!(h.drops("no_response"), 1, "the stream not answered");
    }

    /// An HTTP/2 connection's opening: the preface, SETTINGS and GETs of `/a`, `/b`, `/c` on
    /// streams 1, 3 and 5.
    fn three_requests() -> Vec<u8> {
        use crate::http2::testing::*;
        let mut client = Encoder::new();
        let mut opening = crate::http2::PREFACE.to_vec();
        opening.extend(frame(SETTINGS, 0, 0, &[]));
        for (id, path) in [(1, &b"/a"[..]), (3, b"/b"), (5, b"/c")] {
            opening.extend(headers(
                &mut client,
                id,
                END_STREAM,
                &[(b":method", b"GET"), (b":path", path)],
            ));
        }
        opening
    }

    /// An HTTP/2 server that closes with streams read and unanswered failed them (status 0),
    /// as an HTTP/1 one does; not the streams after its GOAWAY's last stream id (not
    /// processed: the client retries them), and none when the GOAWAY's payload went unseen.
    #[test]
    fn h2_streams_a_server_closes_on_are_failures() {
        use crate::http2::testing::*;
        // (GOAWAY's payload: Some(last stream id), None: not captured; no GOAWAY at all)
        for goaway in [Some(Some(3u32)), Some(None), None] {
            let mut server = Encoder::new();
            let mut h = Harness::new();
            h.read(&three_requests());
            let mut answer = headers(&mut server, 1, END_STREAM, &[(b":status", b"200")]);
            match goaway {
                Some(Some(last)) => {
                    let mut payload = last.to_be_bytes().to_vec();
                    payload.extend([0, 0, 0, 0]);
                    payload.extend(b"shutting down");
                    answer.extend(frame(GOAWAY, 0, 0, &payload));
                    h.write(&answer);
                }
                Some(None) => {
                    // The frame's header captured, its payload not.
                    answer.extend(frame(GOAWAY, 0, 0, &[0; 8]));
                    h.io(
                        Direction::Egress,
                        &answer[..answer.len() - 8],
                        answer.len(),
                        &[],
                    );
                }
                None => h.write(&answer),
            }
            h.state(TCP_ESTABLISHED, TCP_FIN_WAIT1);
            h.state(TCP_FIN_WAIT1, TCP_CLOSE);
            let want: &[(&str, u16)] = match goaway {
                Some(Some(_)) => &[("/a", 200), ("/b", 0)],
                Some(None) => &[("/a", 200)],
                None => &[("/a", 200), ("/b", 0), ("/c", 0)],
            };
            let mut got = h.statuses();
            got.sort();
            let want: Vec<(String, u16)> =
                want.iter().map(|(p, s)| ((*p).to_owned(), *s)).collect();
            assert_eq!(got, want, "{goaway:?}");
            assert_eq!(
                h.drops("no_response"),
                3 - want.len() as u64,
                "{goaway:?}: the streams not counted"
            );
        }
    }

    /// At a client whose server is not followed here: a stream the server reset is a failed
    /// request (status 0) unless it was refused (not processed); one the client cancelled is
    /// not counted.
    #[test]
    fn h2_streams_a_server_resets_are_failures_unless_refused() {
        use crate::http2::testing::*;
        let mut h = Harness::new();
        h.write(&three_requests());
        // INTERNAL_ERROR on 1, REFUSED_STREAM on 3, from the server.
        let mut resets = frame(RST_STREAM, 0, 1, &2u32.to_be_bytes());
        resets.extend(frame(RST_STREAM, 0, 3, &7u32.to_be_bytes()));
        h.read(&resets);
        // The client cancels 5 (CANCEL).
        h.write(&frame(RST_STREAM, 0, 5, &8u32.to_be_bytes()));
        assert_eq!(h.statuses(), [("/a".to_owned(), 0)]);
        assert_eq!(h.drops("stream_reset"), 2);
    }

    /// A 101 to a request that did not offer h2c (WebSocket) is the request's answer, and the
    /// connection is left alone after it.
    #[test]
    fn websocket_upgrade_is_answered_by_its_101() {
        let mut h = Harness::new();
        h.read(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        h.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n");
        h.read(b"\x81\x85GET / HTTP/1.1");
        h.write(b"\x81\x05hello");
        assert_eq!(h.statuses(), [("/ws".to_owned(), 101)]);
        // Its end stays known to its client's end (which then leaves the count to it), and the
        // kernel is asked to stop sending its bytes.
        let peer = h.table.peer_of(&tuple().reversed(), SK);
        assert_eq!(peer.and_then(|p| p.side), Some(Side::Server));
        assert_eq!(h.table.take_opaque().count(), 1);
    }

    /// HTTP/2 at a server: streams answered out of order pair by id; a gRPC status in the
    /// trailers makes a failure under HTTP 200; a stream reset before its answer is no request
    /// counted.
    #[test]
    fn http2_streams_pair_by_id() {
        use crate::http2::testing::*;
        let (mut client, mut server) = (Encoder::new(), Encoder::new());
        let mut h = Harness::new();
        let mut opening = crate::http2::PREFACE.to_vec();
        opening.extend(frame(SETTINGS, 0, 0, &[]));
        opening.extend(headers(
            &mut client,
            1,
            END_STREAM,
            &[(b":method", b"GET"), (b":path", b"/a/1")],
        ));
        opening.extend(headers(
            &mut client,
            3,
            0,
            &[(b":method", b"POST"), (b":path", b"/b")],
        ));
        // Split in the middle of a frame header: read as it comes.
        h.read(&opening[..40]);
        h.read(&opening[40..]);
        h.read(&frame(DATA, END_STREAM, 3, b"body"));
        h.write(&headers(
            &mut server,
            3,
            END_STREAM,
            &[(b":status", b"201")],
        ));
        let mut answer = headers(&mut server, 1, 0, &[(b":status", b"200")]);
        answer.extend(frame(DATA, END_STREAM, 1, b"hello"));
        h.write(&answer);
        assert_eq!(
            h.statuses(),
            [("/b".to_owned(), 201), ("/a/1".to_owned(), 200)]
        );
        assert_eq!((h.out[0].req_bytes, h.out[1].resp_bytes), (4, 5));

        h.read(&headers(
            &mut client,
            5,
            END_STREAM,
            &[(b":method", b"POST"), (b":path", b"/shop.Catalog/Get")],
        ));
        h.read(&headers(
            &mut client,
            7,
            END_STREAM,
            &[(b":method", b"GET"), (b":path", b"/slow")],
        ));
        h.read(&frame(RST_STREAM, 0, 7, &[0, 0, 0, 8]));
        let mut grpc = headers(
            &mut server,
            5,
            0,
            &[(b":status", b"200"), (b"content-type", b"application/grpc")],
        );
        grpc.extend(frame(DATA, 0, 5, &[0; 5]));
        grpc.extend(headers(
            &mut server,
            5,
            END_STREAM,
            &[(b"grpc-status", b"14")],
        ));
        h.write(&grpc);
        assert_eq!(h.out.len(), 3, "{:?}", h.statuses());
        assert_eq!((h.out[2].status, h.out[2].grpc_status), (200, Some(14)));
        assert!(h.out[2].failed());
        assert_eq!(h.drops("stream_reset"), 1);
    }

    #[test]
    fn server_pairs_split_request_and_response() {
        let mut h = Harness::new();
        h.read(b"GET /a HTTP/1.1\r\nHo");
        h.read(b"st: x\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        assert!(h.out.is_empty(), "body still to come");
        h.write(b"01234");
        h.write(b"56789");
        assert_eq!(h.statuses(), vec![("/a".to_owned(), 200)]);
        let ex = &h.out[0];
        assert_eq!(ex.side, Side::Server);
        assert_eq!(ex.resp_bytes, 49);
        assert_eq!(
            ex.start_ns, 1_001_000,
            "server sees the request when its read returns"
        );
        assert_eq!(ex.end_ns, 1_004_500, "when the last write began");
    }

    #[test]
    fn pipelined_requests_pair_in_order() {
        let mut h = Harness::new();
        h.write(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nHEAD /3 HTTP/1.1\r\n\r\n");
        h.read(
            b"HTTP/1.1 404 NF\r\nContent-Length: 2\r\n\r\nnoHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
        );
        assert_eq!(
            h.statuses(),
            vec![
                ("/1".to_owned(), 404),
                ("/2".to_owned(), 200),
                ("/3".to_owned(), 200)
            ]
        );
        assert!(h.out.iter().all(|e| e.side == Side::Client));
    }

    /// A long body's end is told to the kernel side once, from the first long call with a
    /// sequence number, in the direction it goes (the kernel side then sends the calls inside
    /// it without payload, which the body's count alone frames): a Content-Length body and a
    /// chunk, across the sequence numbers' wrap; a short body's is not.
    #[test]
    fn a_long_body_s_end_is_told_to_the_kernel_side() {
        let mut h = Harness::new();
        let x = [b'x'; 1024];
        h.read(b"GET /big HTTP/1.1\r\n\r\n");
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
        let start = u32::MAX - 100;
        h.tcp_seq = Some(start);
        // The head and 8 KiB of the body in one call, its first KiB captured.
        h.io(Direction::Egress, head, head.len() + 8192, &[]);
        let told: Vec<_> = h.table.take_bodies().collect();
        assert_eq!(told.len(), 1);
        let (key, end) = told[0];
        assert_eq!(key, BodyKey::new(SK, DIR_EGRESS));
        assert_eq!(
            end.end_seq,
            start.wrapping_add((head.len() + 1_000_000) as u32)
        );
        assert_eq!(end.flags, BODY_SKIP | BODY_ONE_AT_A_TIME, "not pipelined");
        // The calls inside it (as the kernel side sends them, without payload) tell nothing
        // more; the body ends by its count.
        h.body_calls(1_000_000 - 8192);
        assert_eq!(h.table.take_bodies().count(), 0);
        assert_eq!(h.statuses(), vec![("/big".to_owned(), 200)]);

        // One chunk of 1 MiB: its end, from the call that holds its size.
        h.tcp_seq = None;
        h.read(b"GET /chunk HTTP/1.1\r\n\r\n");
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n";
        let mut shown = head.to_vec();
        shown.extend_from_slice(&x[..1024 - head.len()]);
        h.tcp_seq = Some(7);
        h.io(Direction::Egress, &shown, 4096, &[]);
        let told: Vec<_> = h.table.take_bodies().collect();
        assert_eq!(told.len(), 1);
        assert_eq!(told[0].1.end_seq, 7 + (head.len() + 0x10_0000) as u32);
        h.body_calls(0x10_0000 - (4096 - head.len()));
        h.io(Direction::Egress, b"\r\n0\r\n\r\n", 7, &[]);
        assert_eq!(h.table.take_bodies().count(), 0);
        assert_eq!(h.statuses().len(), 2, "{:?}", h.statuses());

        // A short body: nothing told.
        h.tcp_seq = None;
        h.read(b"GET /small HTTP/1.1\r\n\r\n");
        h.long_head(1, 60000);
        assert_eq!(h.table.take_bodies().count(), 0);

        // Two requests in one read, the second before the first's answer: pipelined. What was
        // said of the socket's messages going one at a time is taken back, both directions,
        // once.
        h.tcp_seq = None;
        h.read(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n");
        let told: Vec<_> = h.table.take_bodies().collect();
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(told.iter().all(|(k, e)| k.sk == SK && e.flags == 0));
        assert_ne!(told[0].0.direction, told[1].0.direction);
        h.read(b"GET /c HTTP/1.1\r\n\r\n");
        assert_eq!(h.table.take_bodies().count(), 0);
        // A long body now: its end is told, not that messages go one at a time.
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        h.long_head(1, 100000);
        let told: Vec<_> = h.table.take_bodies().collect();
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].1.flags, BODY_SKIP);
    }

    /// A body whose rest is never long (chunks of 16 KiB, their framing lost past the capture):
    /// once the message is long, the kernel side is told, once, that the connection's messages
    /// go one at a time (no end to skip to); not on TLS plaintext (no sequence numbers).
    #[test]
    fn a_long_message_of_small_chunks_tells_one_at_a_time() {
        let mut h = Harness::new();
        h.read(b"GET /stream HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        h.tcp_seq = Some(1);
        let mut chunk = b"4000\r\n".to_vec();
        chunk.resize(1024, b'x');
        for _ in 0..8 {
            h.io(Direction::Egress, &chunk, 6 + 0x4000 + 2, &[]);
        }
        let told: Vec<_> = h.table.take_bodies().collect();
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].1.flags, BODY_ONE_AT_A_TIME);
        h.io(Direction::Egress, b"0\r\n\r\n", 5, &[]);
        assert_eq!(h.statuses(), vec![("/stream".to_owned(), 200)]);
        assert_eq!(h.table.take_bodies().count(), 0);
    }

    /// A connection told to go one message at a time, then upgraded to h2c: taken back.
    #[test]
    fn an_h2c_upgrade_takes_back_one_message_at_a_time() {
        let mut h = Harness::new();
        h.read(b"GET /big HTTP/1.1\r\n\r\n");
        h.tcp_seq = Some(1);
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
        h.io(Direction::Egress, head, 4096, &[]);
        assert_eq!(
            h.table.take_bodies().next().unwrap().1.flags & BODY_ONE_AT_A_TIME,
            BODY_ONE_AT_A_TIME
        );
        h.io(Direction::Egress, &[], 100_000 + head.len() - 4096, &[]);
        h.tcp_seq = None;
        h.read(
            b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
            Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
        );
        assert_eq!(h.table.take_bodies().count(), 0);
        h.write(b"HTTP/1.1 101 \r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n");
        let told: Vec<_> = h.table.take_bodies().collect();
        assert_eq!(told.len(), 2, "{told:?}");
        assert!(told.iter().all(|(_, e)| e.flags == 0));
    }

    #[test]
    fn chunked_body_beyond_capture_ends_by_its_tail() {
        let mut h = Harness::new();
        h.read(b"GET /c HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        // 4 chunks of 0x1000 in one write, only the start captured.
        let mut body = Vec::new();
        for _ in 0..4 {
            body.extend_from_slice(b"1000\r\n");
            body.extend_from_slice(&[b'x'; 0x1000]);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        let tail = &body[body.len() - 16..];
        h.io(Direction::Egress, &body[..1024], body.len(), tail);
        assert_eq!(h.statuses(), vec![("/c".to_owned(), 200)]);
        // And the connection goes on.
        h.read(b"GET /d HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(h.out.len(), 2);
    }

    /// A short tail (an iovec call's last two buffers, or fewer) ends a chunked body only with
    /// the CRLF before its last chunk: "0\r\n\r\n" alone may follow a size's first digit.
    #[test]
    fn a_short_tail_ends_a_chunked_body_only_with_its_crlf() {
        let mut h = Harness::new();
        h.read(b"GET /c HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        let mut body = b"3000\r\n".to_vec();
        body.extend_from_slice(&[b'x'; 0x3000]);
        body.extend_from_slice(b"\r\n5");
        // Ends with "5" and "0\r\n\r\n" as buffers of their own: a chunk of 0x50 follows.
        body.extend_from_slice(b"0\r\n\r\n");
        h.io(Direction::Egress, &body[..1024], body.len(), b"0\r\n\r\n");
        assert!(h.statuses().is_empty(), "not ended by a bare last chunk");
        let mut rest = vec![b'y'; 0x50];
        rest.extend_from_slice(b"\r\n");
        rest.extend_from_slice(b"0\r\n\r\n");
        h.io(Direction::Egress, &rest[..16], rest.len(), b"\r\n0\r\n\r\n");
        assert_eq!(h.statuses(), vec![("/c".to_owned(), 200)]);
    }

    #[test]
    fn until_close_response_ends_at_end_of_stream() {
        let mut h = Harness::new();
        h.write(b"GET /old HTTP/1.0\r\n\r\n");
        h.read(b"HTTP/1.0 200 OK\r\n\r\nsome");
        h.read(b" more");
        assert!(h.out.is_empty());
        h.io(Direction::Ingress, b"", 0, &[]);
        assert_eq!(h.statuses(), vec![("/old".to_owned(), 200)]);
        assert_eq!(
            h.out[0].end_ns, 1_003_000,
            "the last byte, not the end of stream"
        );
    }

    #[test]
    fn interim_continue_is_not_the_response() {
        let mut h = Harness::new();
        h.read(b"POST /up HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n");
        h.write(b"HTTP/1.1 100 Continue\r\n\r\n");
        h.read(b"abc");
        h.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.statuses(), vec![("/up".to_owned(), 201)]);
        assert_eq!(h.out[0].req_bytes, 65);
    }

    #[test]
    fn a_response_before_the_request_body_ends_keeps_the_requests_size() {
        let head = b"POST /up HTTP/1.1\r\nContent-Length: 1000\r\n\r\n";
        let mut h = Harness::new();
        h.read(head);
        h.read(&[b'x'; 100]);
        // Refused while the body is still coming (its bytes until then); the rest of it
        // arrives after.
        h.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n");
        h.read(&[b'x'; 900]);
        // Answered when the head was read, completed after the body: its size all the same.
        h.read(head);
        h.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\n");
        h.read(&[b'x'; 1000]);
        h.write(b"nope");
        h.read(b"GET /next HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            h.statuses(),
            vec![
                ("/up".to_owned(), 413),
                ("/up".to_owned(), 401),
                ("/next".to_owned(), 200)
            ]
        );
        assert_eq!(h.out[0].req_bytes, head.len() as u64 + 100);
        assert_eq!(h.out[1].req_bytes, head.len() as u64 + 1000);
        assert_eq!(h.out[2].req_bytes, 22);
    }

    #[test]
    fn a_connection_followed_from_a_body_is_followed_from_its_next_message() {
        // A TLS session hooked after its handshake, its client in the middle of a long body.
        let mut h = Harness::new();
        (h.tls, h.from_sock) = (true, true);
        h.read(&[b'z'; 4096]);
        h.read(&[b'z'; 4096]);
        h.write(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
        h.read(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.statuses(), vec![("/next".to_owned(), 404)]);
        assert_eq!(h.drops("midstream"), 2);
        assert_eq!(h.failures("unknown_protocol"), 0);
        // A connection seen from its start that begins with no message is opaque at once.
        let mut h = Harness::new();
        h.read(&[b'z'; 4096]);
        assert_eq!(h.failures("unknown_protocol"), 1);
        // Followed from its middle, one that never begins a message is opaque in the end.
        let mut h = Harness::new();
        h.from_sock = true;
        for _ in 0..=MAX_MIDSTREAM_SKIPS {
            h.read(b"\x00\x01binary protocol");
        }
        assert_eq!(h.failures("unknown_protocol"), 1);
    }

    #[test]
    fn tls_plaintext_starts_a_connection_seen_as_ciphertext_again() {
        let mut h = Harness::new();
        // A connection older than the tracer: its ciphertext was seen first.
        h.read(b"\x17\x03\x03\x00\x20\x9a\x01\xfe\x33");
        assert_eq!(h.failures("encrypted"), 1);
        // Then its plaintext, numbered by the library's session from 1.
        (h.tls, h.seq) = (true, 0);
        h.read(b"GET /a HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        // A ciphertext call that began before the hooks: not bytes of the exchange (numbered
        // by the socket, not the session).
        let seq = h.seq;
        (h.tls, h.seq) = (false, 7);
        h.read(b"\x17\x03\x03\x00\x20\x9a\x01\xfe\x33");
        (h.tls, h.seq) = (true, seq);
        h.read(b"GET /b HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            h.statuses(),
            vec![("/a".to_owned(), 200), ("/b".to_owned(), 404)]
        );
        assert!(h.out.iter().all(|e| e.tls));
        assert_eq!(h.drops("tls_ciphertext"), 1);
        assert_eq!(h.metrics.connections_desynced.get(), 0);
    }

    #[test]
    fn garbage_makes_no_request() {
        let mut h = Harness::new();
        h.read(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03");
        h.read(b"GET / HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n");
        assert!(h.out.is_empty());
        assert_eq!(h.failures("encrypted"), 1);
        // Bytes of no protocol known.
        let mut h = Harness::new();
        h.read(b"\x00\x01garbage\r\n");
        h.write(b"HTTP/1.1 400 Bad\r\nContent-Length: 0\r\n\r\n");
        assert!(h.out.is_empty());
        assert_eq!(h.failures("unknown_protocol"), 1);
    }

    #[test]
    fn half_a_request_then_close_is_a_truncated_head() {
        let mut h = Harness::new();
        h.read(b"GET /half-a-re");
        h.io(Direction::Ingress, b"", 0, &[]);
        h.state(TCP_ESTABLISHED, TCP_CLOSE);
        h.reap(RESET_GRACE);
        assert!(h.out.is_empty());
        assert_eq!(h.failures("truncated_head"), 1);
        assert_eq!(h.table.len(), 0);
    }

    /// Pipelined deeper than the queue: the requests past it are counted as lost, and the
    /// responses stay paired with their own requests (before, the oldest was dropped and every
    /// later response went to the request after its own).
    #[test]
    fn pipelining_past_the_queue_keeps_pairs_right() {
        let mut h = Harness::new();
        let get = |i: usize| format!("GET /p/{i} HTTP/1.1\r\nHost: x\r\n\r\n");
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let n = MAX_IN_FLIGHT + 6;
        for i in 0..n {
            h.read(get(i).as_bytes());
        }
        for _ in 0..10 {
            h.write(ok);
        }
        for i in n..n + 5 {
            h.read(get(i).as_bytes());
        }
        for _ in 0..n - 10 + 5 {
            h.write(ok);
        }
        let paths: Vec<String> = h.out.iter().map(|e| e.path.to_string()).collect();
        let want: Vec<String> = (0..MAX_IN_FLIGHT)
            .chain(n..n + 5)
            .map(|i| format!("/p/{i}"))
            .collect();
        assert_eq!(paths, want);
        let lost = h.lost("server", "pending_overflow");
        assert_eq!(lost, 6);
        let unpaired = h.drops("response_without_request");
        assert_eq!(unpaired, 0);
    }

    /// Pipelined requests past the capture (wrk with a pipeline depth of 40): those whose
    /// bytes were not captured are not made up, but each is counted as lost when its response
    /// comes, so that counted + lost is every request.
    #[test]
    fn pipelined_requests_past_the_capture_are_counted_lost() {
        let mut h = Harness::new();
        let batch = b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n".repeat(40);
        h.io(
            Direction::Ingress,
            &batch[..1024],
            batch.len(),
            &batch[batch.len() - 16..],
        );
        for _ in 0..40 {
            h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
        let lost = h.lost("server", "request_beyond_capture");
        assert!(lost > 0);
        assert_eq!(h.out.len() as u64 + lost, 40);
    }

    /// Pipelined responses past the capture (wrk's pipeline.lua with 16 requests: each read
    /// returns all 16 answers, 1 KiB of them captured): the responses seen pair with their own
    /// requests, those not seen are counted lost, never paired with a later request.
    #[test]
    fn pipelined_responses_past_the_capture_are_not_mispaired() {
        let mut h = Harness::new();
        let mut sent = 0u64;
        for batch in 0..4 {
            let requests: Vec<u8> = (0..16)
                .flat_map(|i| format!("GET /p{i} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes())
                .collect();
            h.write(&requests);
            sent += 16;
            // Answer i has status 210 + i (none of the bodiless 204 and 205): a response
            // paired with another request shows.
            let answers: Vec<u8> = (0..16)
                .flat_map(|i| {
                    format!(
                        "HTTP/1.1 {} OK\r\nServer: test-{batch}\r\nDate: Sun, 29 Nov 2026 10:00:00 GMT\r\nContent-Length: 2\r\n\r\nok",
                        210 + i
                    )
                        .into_bytes()
                })
                .collect();
            assert!(answers.len() > 1024);
            h.io(
                Direction::Ingress,
                &answers[..1024],
                answers.len(),
                &answers[answers.len() - 16..],
            );
        }
        for e in &h.out {
            assert_eq!(
                e.path.to_string(),
                format!("/p{}", e.status - 210),
                "a response paired with its own request"
            );
        }
        let lost = h.lost("client", "response_beyond_capture");
        assert!(
            h.out.len() >= 4 * 10,
            "the captured answers count: {}",
            h.out.len()
        );
        assert_eq!(h.out.len() as u64 + lost, sent);
        assert_eq!(h.drops("pending_overflow"), 0);
    }

    /// A client that writes its request and closes without reading (it gave up, or a health
    /// check): the server's response makes the client's kernel reset the connection, and on
    /// loopback that reset is handled inside the server's send, so the close is reported
    /// before the send. The response still pairs; the connection ends after the grace.
    #[test]
    fn a_response_reported_after_the_reset_it_caused_pairs() {
        let mut h = Harness::new();
        h.read(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n");
        h.state(TCP_CLOSE_WAIT, TCP_CLOSE);
        // A look from before the reset: within the grace whatever the scheduler does.
        let before = std::time::Instant::now() - std::time::Duration::from_secs(1);
        h.table
            .reap_resets(before, &h.metrics, &mut h.linker, &mut h.out);
        assert_eq!(h.table.len(), 1, "kept for the grace");
        // The kernel side's state for the socket went with the close: unnumbered.
        h.seq = u32::MAX;
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!(h.statuses(), vec![("/gone".to_owned(), 200)]);
        h.reap(RESET_GRACE);
        assert_eq!(h.table.len(), 0);
        let drops = h.drops("no_response");
        assert_eq!(drops, 0);
    }

    #[test]
    fn response_with_unseen_body_ends_at_the_next_request() {
        let mut h = Harness::new();
        h.read(b"GET /file HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
        // sendfile: counted, not shown.
        h.io(Direction::Egress, b"", 60000, &[]);
        h.read(b"GET /next HTTP/1.1\r\n\r\n");
        assert_eq!(h.statuses(), vec![("/file".to_owned(), 200)]);
        assert_eq!(h.failures("response_body_unseen"), 1);
        h.write(b"HTTP/1.1 304 Not Modified\r\n\r\n");
        assert_eq!(h.out.len(), 2);
        assert_eq!(h.out[1].status, 304);
    }

    #[test]
    fn sendfile_body_completes_by_count() {
        let mut h = Harness::new();
        h.read(b"GET /file HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n");
        h.io(Direction::Egress, b"", 5000, &[]);
        assert_eq!(h.statuses(), vec![("/file".to_owned(), 200)]);
        assert_eq!(h.failures("response_body_unseen"), 0);
    }

    #[test]
    fn lost_events_drop_what_was_in_flight_and_resync() {
        let mut h = Harness::new();
        h.read(b"GET /1 HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        h.read(b"GET /2 HTTP/1.1\r\n\r\n");
        // The response to /2 and the request /3 were lost.
        h.seq += 2;
        h.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
        h.read(b"GET /4 HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n");
        // /2 is not paired with /3's response; /4 is paired right.
        assert_eq!(
            h.statuses(),
            vec![("/1".to_owned(), 200), ("/4".to_owned(), 201)]
        );
        let lost = h.drops("events_lost");
        assert_eq!(lost, 1);
    }

    #[test]
    fn client_known_from_connect_before_its_data_arrives() {
        let mut h = Harness::new();
        let client_sk = SK + 1;
        let client = Task {
            tgid: 7,
            tid: 7,
            comm: Comm(*b"curl\0\0\0\0\0\0\0\0\0\0\0\0"),
            cgroup_id: 1,
        };
        for (old, new) in [(TCP_CLOSE, TCP_SYN_SENT), (TCP_SYN_SENT, TCP_ESTABLISHED)] {
            let c = ConnEvent {
                task: client,
                ts_ns: 1,
                sk: client_sk,
                tuple: tuple().reversed(),
                old_state: old,
                new_state: new,
                seq: 0,
                peer_fin: None,
                peer_reset: false,
                bytes_received: 0,
                bytes_acked: 0,
                srtt_us: 0,
                retransmits: 0,
                lost_requests: (0, 0),
            };
            h.table.on_state(&c, &h.metrics, &mut h.linker, &mut h.out);
        }
        // The server's side of the exchange completes before any client data event.
        h.read(b"GET /a HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.out.len(), 1);
        let peer = h
            .table
            .peer_of(&h.out[0].tuple, h.out[0].peer_sk)
            .expect("client end known");
        assert_eq!(peer.task.comm.as_str(), "curl");
        assert_eq!(peer.task.tgid, 7);
    }

    #[test]
    fn unparsable_response_does_not_shift_later_pairs() {
        let mut h = Harness::new();
        h.read(b"GET /1 HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12, 13\r\n\r\n");
        h.read(b"GET /2 HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 404 NF\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.statuses(), vec![("/2".to_owned(), 404)]);
        let lost = h.lost("server", "response_unparsed");
        assert_eq!(lost, 1);
    }

    #[test]
    fn start_split_into_tiny_reads_is_kept() {
        let mut h = Harness::new();
        h.read(b"G");
        h.read(b"E");
        h.read(b"T /a HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.statuses(), vec![("/a".to_owned(), 200)]);
        assert_eq!(h.out[0].start_ns, 1_001_000, "from the first byte");
    }

    #[test]
    fn request_body_not_seen_ends_at_the_next_request() {
        let mut h = Harness::new();
        h.read(b"POST /up HTTP/1.1\r\nContent-Length: 100000\r\n\r\n");
        h.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n");
        h.read(b"GET /b HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(
            h.statuses(),
            vec![("/up".to_owned(), 413), ("/b".to_owned(), 200)]
        );
    }

    #[test]
    fn connect_tunnel_is_not_http_after_its_answer() {
        let mut h = Harness::new();
        h.write(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n");
        h.read(b"HTTP/1.1 200 Connection established\r\n\r\n");
        h.read(b"\x16\x03\x03 tls bytes");
        assert_eq!(h.out.len(), 1);
        assert_eq!(h.out[0].resp_bytes, 39);
    }

    #[test]
    fn head_longer_than_capture_is_still_counted() {
        let mut h = Harness::new();
        let mut req = b"GET /big/7 HTTP/1.1\r\nCookie: ".to_vec();
        req.extend_from_slice(&[b'c'; 3000]);
        req.extend_from_slice(b"\r\n\r\n");
        h.io(Direction::Ingress, &req[..1024], req.len(), &[]);
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.statuses(), vec![("/big/7".to_owned(), 200)]);
        h.read(b"GET /next HTTP/1.1\r\n\r\n");
        h.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(h.out.len(), 2);
    }
}
