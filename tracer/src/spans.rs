//! Spans synthesised from paired exchanges, linked into whole traces without any application
//! change.
//!
//! Every request seen at an end of a connection opens a span there (SERVER at the server end,
//! CLIENT at the client end). Its parent is chosen when the request starts, in order of trust:
//! 1. trace context the request carries (W3C `traceparent`, B3);
//! 2. the CLIENT span of the same request when the other end is on this host too;
//! 3. for a CLIENT span, the one SERVER span its thread is serving (it read a request and has not
//!    answered yet) — what makes thread-per-request services trace end to end; in a Go program
//!    its goroutine rather than its thread (goroutines share threads), the goroutine a request
//!    is written for (Go's HTTP/1 client writes from a goroutine of the connection's);
//! 4. none: the span starts a trace.
//!
//! A SERVER span whose client end is on this host but was not seen yet (its event can arrive a
//! little after the server's) is linked when it finishes. Spans are held until every local
//! ancestor has finished, so that such a late link reaches their descendants before export.
//!
//! Across hosts without propagated context, ids are derived from the client's address and the
//! TCP sequence number of the request's first byte (else its position on the connection), so
//! that the daemons at the two ends name the CLIENT span alike: the remote SERVER span's parent
//! is that id and, when the CLIENT span starts its trace, the trace ids agree too. See README
//! for what cannot be joined.

// Hot-path tables: foldhash is several times cheaper per lookup than SipHash and still
// seeded per process.
use foldhash::HashMap;
use smallvec::SmallVec;
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    conn::Side,
    event::{Task, Tuple},
    http1::{Method, Path, Propagated},
    ledger::Ledger,
    metrics::Metrics,
};

pub type TraceId = u128;
pub type SpanId = u64;

/// Spans followed at once; past it new spans are not recorded (counted).
const MAX_LIVE: usize = 64 * 1024;
/// A finished span waits at most this long for its ancestors before it is exported as is.
const MAX_HOLD: Duration = Duration::from_secs(10);
/// How long a finished SERVER span waits for its client end's late event before export.
const LATE_LINK_HOLD: Duration = Duration::from_millis(200);
/// A span that never finishes (connection dropped mid-request) is forgotten after this long.
const MAX_OPEN: Duration = Duration::from_secs(120);
/// How often the whole table is looked through for spans open past MAX_OPEN.
const STALE_SCAN_EVERY: Duration = Duration::from_secs(5);
/// How often the live table may be sized down to its recent peak.
const SHRINK_EVERY: Duration = Duration::from_secs(60);
/// Spans awaiting their other end, per connection: as many as requests in flight on one, an
/// HTTP/1 pipeline's or an HTTP/2 connection's streams (a span pushed out here is never
/// linked, and its request is counted by both ends).
const MAX_PENDING_PER_CONN: usize = if crate::streams::MAX_STREAMS > crate::conn::MAX_IN_FLIGHT {
    crate::streams::MAX_STREAMS
} else {
    crate::conn::MAX_IN_FLIGHT
};
/// Connections with client spans awaiting their server end.
const MAX_PENDING_CONNS: usize = 16 * 1024;
/// Exported spans' boxes kept for new spans (a span a request: no allocation per span).
const MAX_SPARE: usize = 2048;

/// Span ids of one thread, connection or parent: nearly always 0-2, kept inline so that the
/// per-request churn of these lists allocates nothing.
type Ids = SmallVec<[SpanId; 2]>;
/// Oldest first; at most MAX_PENDING_PER_CONN.
type Queue = SmallVec<[SpanId; 4]>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parent {
    None,
    /// A span of this daemon.
    Local(SpanId),
    /// A span elsewhere: from a propagated header, or derived for the other host's end.
    Remote(SpanId),
}

impl Parent {
    pub fn id(self) -> Option<SpanId> {
        match self {
            Parent::None => None,
            Parent::Local(id) | Parent::Remote(id) => Some(id),
        }
    }
}

/// What a finished exchange adds to its span.
#[derive(Clone, Debug)]
pub struct Finished {
    pub method: Method,
    pub path: Path,
    /// Shared with the metrics' route table: no copy per span.
    pub route: Arc<str>,
    pub status: u16,
    /// gRPC's status, for gRPC.
    pub grpc_status: Option<u32>,
    pub end_ns: u64,
    pub req_bytes: u64,
    pub resp_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent: Parent,
    pub kind: Side,
    pub sampled: bool,
    pub tracestate: Option<String>,
    pub start_ns: u64,
    /// The process at this end; `tid` is the thread that read or wrote the request.
    pub task: Task,
    /// This end's view of the connection.
    pub tuple: Tuple,
    /// `network.protocol.version`: "1.0", "1.1" or "2".
    pub version: &'static str,
    /// Seen as a TLS library's plaintext (`url.scheme` https).
    pub tls: bool,
    pub finished: Option<Finished>,
    /// A CLIENT span the server end of its request took as parent.
    claimed: bool,
    /// A CLIENT span its server end claimed and gave back (`Linker::abandon`): that end will
    /// not count the request, nor its loss.
    handed_back: bool,
    /// A SERVER span's key in `serving` is (its tgid, this) (`Linker::runner`); 0: none.
    runner: u64,
    children: Ids,
    link_pending: bool,
    created: Instant,
    finished_at: Option<Instant>,
}

/// What a child takes from its parent span.
#[derive(Clone, Copy)]
struct AsParent {
    span_id: SpanId,
    trace_id: TraceId,
    sampled: bool,
}

impl Span {
    fn as_parent(&self) -> AsParent {
        AsParent {
            span_id: self.span_id,
            trace_id: self.trace_id,
            sampled: self.sampled,
        }
    }

    pub fn server_addr(&self) -> SocketAddr {
        match self.kind {
            Side::Server => self.tuple.local,
            Side::Client => self.tuple.remote,
        }
    }

    pub fn client_addr(&self) -> SocketAddr {
        match self.kind {
            Side::Server => self.tuple.remote,
            Side::Client => self.tuple.local,
        }
    }
}

/// The start of a request at one end.
pub struct Start<'a> {
    pub kind: Side,
    pub task: Task,
    pub tuple: Tuple,
    pub context: Option<&'a Propagated>,
    /// Position of the request on its connection.
    pub index: u64,
    pub start_ns: u64,
    pub version: &'static str,
    /// The request was seen as a TLS library's plaintext.
    pub tls: bool,
    /// Whether the other end of the connection is a socket on this host.
    pub peer_local: bool,
    /// In a Go program, the goroutine the request was read or written for (0: not known).
    pub goroutine: u64,
    /// TCP sequence number of the request's first byte (HTTP/1 in cleartext): the same at
    /// both ends, so that they derive the same ids from it.
    pub seq: Option<u32>,
}

/// Process ids of the Go programs (looked up once per span).
pub type GoProcesses = foldhash::HashSet<u32>;

/// What runs a request in a process: a thread (tid), or in a Go program a goroutine
/// (`runtime.g`), whose requests a thread interleaves.
type Runner = (u32, u64);

/// Counters the pipeline turns into metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkStats {
    pub started: u64,
    pub not_recorded: u64,
    pub unfinished: u64,
    pub late_links: u64,
}

/// Head sampling: a ratio of traces, decided from the trace id so that every daemon agrees,
/// and the caller's decision when the request carries one.
#[derive(Clone, Copy, Debug)]
pub struct Sampler {
    threshold: u64,
}

impl Sampler {
    pub fn ratio(ratio: f64) -> Self {
        let r = ratio.clamp(0.0, 1.0);
        Self {
            threshold: if r >= 1.0 {
                u64::MAX
            } else {
                (r * u64::MAX as f64) as u64
            },
        }
    }

    fn sample(&self, trace_id: TraceId) -> bool {
        self.threshold == u64::MAX || (trace_id as u64) < self.threshold
    }
}

pub struct Linker {
    /// Off with `--no-spans`: metrics only.
    enabled: bool,
    /// Boxed: the table moves its entries when it rehashes (also in place, to clear the
    /// tombstones that constant insert and remove leave), and a span is a few hundred bytes.
    live: HashMap<SpanId, Box<Span>>,
    /// Most spans live at once since the table was last sized down, and when that was.
    live_peak: usize,
    last_shrink: Instant,
    /// Finished spans not yet exported (an ancestor still open, or a client end awaited): a
    /// drain looks at these, not at every live span (at saturation the live table holds ~10k
    /// spans, most still open, and walking it each drain was ~10% of the daemon's time).
    finished: Vec<SpanId>,
    /// When spans open too long (MAX_OPEN) were last looked for in the whole table.
    last_stale_scan: Instant,
    /// Server spans in progress, by what read their request (`runner`).
    serving: HashMap<Runner, Ids>,
    /// Processes that are Go programs (found by the TLS look at executables): their requests
    /// are run by goroutines.
    go: GoProcesses,
    /// Client spans whose server end has not claimed them, by connection (`conn_key`).
    pending_clients: HashMap<ConnKey, Queue>,
    /// Server spans that started before their (local) client span was seen.
    pending_servers: HashMap<ConnKey, Queue>,
    /// The clock, read once per batch of events rather than per span.
    now: Instant,
    /// Boxes of exported spans, for new ones.
    #[allow(clippy::vec_box, reason = "the boxes are what is kept")]
    spare: Vec<Box<Span>>,
    sampler: Sampler,
    pub stats: LinkStats,
    /// Server ends' lost requests waiting for their client ends' counts.
    ledger: Ledger,
}

/// splitmix64's finaliser: a fixed, well-mixed 64-bit hash step shared by every daemon.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn addr_word(a: &SocketAddr) -> u64 {
    let ip = match a.ip() {
        std::net::IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        std::net::IpAddr::V6(v6) => u128::from(v6),
    };
    mix((ip as u64) ^ mix((ip >> 64) as u64) ^ (u64::from(a.port()) << 48))
}

/// A connection by its (client, server) addresses, hashed once: the pending tables are looked
/// up several times per request, and hashing two socket addresses each time was a cost.
type ConnKey = u64;

/// A connection as both ends on this host name it: by its client's address, which is the same
/// at both even when the server's was translated on the way (a Kubernetes Service's DNAT).
fn conn_key(client: &SocketAddr) -> ConnKey {
    mix(addr_word(client) ^ 0x636f_6e6e)
}

/// Identity of a request, the same at both ends: from the client's address and the TCP
/// sequence number of the request's first byte where known (random from one connection to the
/// next), else the request's position on its connection (an HTTP/2 stream id; repeats when the
/// client's port comes round again). Not the server's address, which an address translation
/// on the way (a Kubernetes Service's DNAT) makes differ between the ends.
fn request_key(client: &SocketAddr, index: u64, seq: Option<u32>) -> u64 {
    match seq {
        Some(seq) => mix(addr_word(client) ^ mix(u64::from(seq) ^ 0x7463_7073_6571)),
        None => mix(addr_word(client) ^ mix(index ^ 0x7472_6163_6572)),
    }
}

fn push_bounded(q: &mut Queue, id: SpanId) {
    if q.len() >= MAX_PENDING_PER_CONN {
        q.remove(0);
    }
    q.push(id);
}

fn pop_front(q: &mut Queue) -> Option<SpanId> {
    (!q.is_empty()).then(|| q.remove(0))
}

/// From a queue of spans awaiting their other end: `expected` (the id both ends derive for the
/// request) when it is there and `fits`, else the oldest that fits; the ones before it that do
/// not fit any more go.
fn take(q: &mut Queue, expected: SpanId, fits: impl Fn(&SpanId) -> bool) -> Option<SpanId> {
    if let Some(i) = q.iter().position(|id| *id == expected && fits(id)) {
        q.remove(i);
        return Some(expected);
    }
    loop {
        let id = pop_front(q)?;
        if fits(&id) {
            return Some(id);
        }
    }
}

fn nonzero(v: u64) -> u64 {
    if v == 0 { 1 } else { v }
}

/// The CLIENT span id of a request, as both ends derive it.
fn client_span_id(key: u64) -> SpanId {
    nonzero(mix(key ^ 0x01))
}

fn server_span_id(key: u64) -> SpanId {
    nonzero(mix(key ^ 0x02))
}

/// The trace id of a request that starts its trace, as both ends derive it.
fn derived_trace_id(key: u64) -> TraceId {
    let hi = mix(key ^ 0x03);
    let lo = mix(key ^ 0x04);
    (u128::from(hi) << 64 | u128::from(lo)).max(1)
}

impl Linker {
    pub fn new(sampler: Sampler) -> Self {
        Self::with_spans(sampler, true)
    }

    /// A linker that builds no spans at all (`tracer run --no-spans`) when `enabled` is false.
    pub fn with_spans(sampler: Sampler, enabled: bool) -> Self {
        Self {
            enabled,
            live: HashMap::default(),
            live_peak: 0,
            last_shrink: Instant::now(),
            finished: Vec::new(),
            last_stale_scan: Instant::now(),
            now: Instant::now(),
            serving: HashMap::default(),
            go: GoProcesses::default(),
            pending_clients: HashMap::default(),
            pending_servers: HashMap::default(),
            spare: Vec::new(),
            sampler,
            stats: LinkStats::default(),
            ledger: Ledger::default(),
        }
    }

    /// Opens the span of a request at one end; returns its id, or None when the table is full.
    /// The Go programs among the processes (replaced whenever the look finds one more or one
    /// fewer).
    pub fn set_go(&mut self, go: &GoProcesses) {
        // A copy held here rather than behind the shared pointer: looked at for every span,
        // and another allocation's cache line was a miss each time (4% of the replay).
        self.go.clone_from(go);
    }

    /// What runs a request: its thread, or in a Go program its goroutine; none for a Go
    /// program's request whose goroutine is not known (its thread says nothing).
    fn runner(&self, s: &Start<'_>) -> Option<Runner> {
        if self.go.is_empty() || !self.go.contains(&s.task.tgid) {
            Some((s.task.tgid, u64::from(s.task.tid)))
        } else {
            (s.goroutine != 0).then_some((s.task.tgid, s.goroutine))
        }
    }

    pub fn start(&mut self, s: Start<'_>) -> Option<SpanId> {
        if !self.enabled {
            return None;
        }
        if self.live.len() >= MAX_LIVE {
            self.stats.not_recorded += 1;
            return None;
        }
        self.stats.started += 1;
        let client = match s.kind {
            Side::Client => s.tuple.local,
            Side::Server => s.tuple.remote,
        };
        let key = request_key(&client, s.index, s.seq);
        let conn = conn_key(&client);
        let mut span_id = match s.kind {
            Side::Client => client_span_id(key),
            Side::Server => server_span_id(key),
        };
        if self.live.contains_key(&span_id) {
            // Same connection addresses reused while the old span is still held: stay unique.
            span_id = nonzero(mix(span_id ^ s.start_ns));
        }
        let header = s.context.map(|c| (c.trace_id, c.span_id, c.sampled));
        let runner = self.runner(&s);
        let mut link_pending = false;
        let (parent, trace_id, sampled) = match s.kind {
            Side::Client => {
                let thread = runner
                    .and_then(|r| self.serving.get(&r))
                    .filter(|v| v.len() == 1)
                    .and_then(|v| self.live.get(&v[0]))
                    .map(|p| p.as_parent());
                self.parent_of(thread, header).unwrap_or_else(|| {
                    let t = derived_trace_id(key);
                    (Parent::None, t, self.sampler.sample(t))
                })
            }
            Side::Server => {
                let client_span = self.claim_client(conn, client_span_id(key));
                match self.parent_of(client_span, header) {
                    Some(chosen) => chosen,
                    None => {
                        // The client's end, as its own daemon names it; if it is on this host
                        // and just not seen yet, linked for real when this span finishes.
                        link_pending = s.peer_local;
                        let t = derived_trace_id(key);
                        (
                            Parent::Remote(client_span_id(key)),
                            t,
                            self.sampler.sample(t),
                        )
                    }
                }
            }
        };
        if let Parent::Local(p) = parent
            && let Some(p) = self.live.get_mut(&p)
        {
            p.children.push(span_id);
        }
        if link_pending && self.pending_servers.len() < MAX_PENDING_CONNS {
            push_bounded(self.pending_servers.entry(conn).or_default(), span_id);
        }
        match s.kind {
            Side::Client => {
                if self.pending_clients.len() < MAX_PENDING_CONNS
                    || self.pending_clients.contains_key(&conn)
                {
                    push_bounded(self.pending_clients.entry(conn).or_default(), span_id);
                }
            }
            Side::Server => {
                if let Some(r) = runner {
                    self.serving.entry(r).or_default().push(span_id);
                }
            }
        }
        let span = Span {
            trace_id,
            span_id,
            parent,
            kind: s.kind,
            sampled,
            tracestate: s.context.and_then(|c| c.tracestate.clone()),
            start_ns: s.start_ns,
            task: s.task,
            tuple: s.tuple,
            version: s.version,
            tls: s.tls,
            finished: None,
            claimed: false,
            handed_back: false,
            runner: runner
                .filter(|_| s.kind == Side::Server)
                .map_or(0, |(_, r)| r),
            children: Ids::new(),
            link_pending,
            created: self.now,
            finished_at: None,
        };
        let boxed = match self.spare.pop() {
            Some(mut b) => {
                *b = span;
                b
            }
            None => Box::new(span),
        };
        self.live.insert(span_id, boxed);
        self.live_peak = self.live_peak.max(self.live.len());
        if s.kind == Side::Client {
            self.link_waiting_server(conn, span_id, server_span_id(key));
        }
        Some(span_id)
    }

    /// A client span that arrives after its server end: link them now, so that the client's
    /// exchange already knows its server end saw the request. The server span with the id
    /// both ends derive for this request when it is waiting (HTTP/2's streams finish in any
    /// order), else the oldest waiting one.
    fn link_waiting_server(&mut self, conn: ConnKey, client_id: SpanId, expected: SpanId) {
        let Some(q) = self.pending_servers.get_mut(&conn) else {
            return;
        };
        let server_id = take(q, expected, |id| {
            self.live.get(id).is_some_and(|s| s.link_pending)
        });
        if q.is_empty() {
            self.pending_servers.remove(&conn);
        }
        let Some(server_id) = server_id else {
            return;
        };
        if self.descends_from(client_id, server_id) {
            return;
        }
        // Not available to later servers on this connection any more.
        if let Some(q) = self.pending_clients.get_mut(&conn) {
            q.retain(|id| *id != client_id);
        }
        let Some(c) = self.live.get_mut(&client_id) else {
            return;
        };
        c.claimed = true;
        c.children.push(server_id);
        let (trace, sampled) = (c.trace_id, c.sampled);
        if let Some(s) = self.live.get_mut(&server_id) {
            s.parent = Parent::Local(client_id);
            s.link_pending = false;
        }
        self.stats.late_links += 1;
        self.retrace(server_id, trace, sampled);
    }

    /// Parent, trace and sampling from a local span and/or a propagated header: the header
    /// wins unless the local span is already in its trace. None when there is neither.
    fn parent_of(
        &self,
        local: Option<AsParent>,
        header: Option<(TraceId, SpanId, Option<bool>)>,
    ) -> Option<(Parent, TraceId, bool)> {
        match (local, header) {
            (Some(p), Some((t, _, _))) if p.trace_id == t => {
                Some((Parent::Local(p.span_id), p.trace_id, p.sampled))
            }
            (_, Some((t, parent, sampled))) => Some((
                Parent::Remote(parent),
                t,
                sampled.unwrap_or_else(|| self.sampler.sample(t)),
            )),
            (Some(p), None) => Some((Parent::Local(p.span_id), p.trace_id, p.sampled)),
            (None, None) => None,
        }
    }

    /// The client span of this request on this connection: the one with the id both ends
    /// derive when it is there (positions agree), else the oldest one no server span claimed.
    fn claim_client(&mut self, conn: ConnKey, expected: SpanId) -> Option<AsParent> {
        let q = self.pending_clients.get_mut(&conn)?;
        // A client span whose response already came back cannot be the request a server is
        // just starting to read: its own server end missed it.
        let id = take(q, expected, |id| {
            self.live.get(id).is_some_and(|s| s.finished.is_none())
        });
        let found = id.and_then(|id| self.live.get_mut(&id)).map(|span| {
            span.claimed = true;
            span.as_parent()
        });
        if q.is_empty() {
            self.pending_clients.remove(&conn);
        }
        found
    }

    /// Whether `ancestor` is `id` or one of its local ancestors.
    fn descends_from(&self, id: SpanId, ancestor: SpanId) -> bool {
        let mut cur = Some(id);
        for _ in 0..64 {
            match cur {
                Some(c) if c == ancestor => return true,
                Some(c) => {
                    cur = match self.live.get(&c).map(|s| s.parent) {
                        Some(Parent::Local(p)) => Some(p),
                        _ => None,
                    }
                }
                None => return false,
            }
        }
        false
    }

    /// Takes back the box of a span that was exported and is no longer shown, for a new span.
    pub fn recycle(&mut self, span: Box<Span>) {
        if self.spare.len() < MAX_SPARE {
            self.spare.push(span);
        }
    }

    /// The clock for spans that start or finish until the next tick: the reader ticks once per
    /// batch of events.
    pub fn tick(&mut self, now: Instant) {
        self.now = now;
    }

    /// Whether spans are built at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `n` requests a server end lost (its connection's client at `client`), whose client end
    /// may be traced here: how many to count lost now (`ledger`).
    pub fn server_lost(
        &mut self,
        client: SocketAddr,
        reason: &'static str,
        n: u64,
        m: &Metrics,
    ) -> u64 {
        self.ledger.server_lost(client, reason, n, self.now, m)
    }

    /// A client end (at `client`) counted a request its server end, on this host, did not
    /// claim (with spans), or that end was not seen yet.
    pub fn client_counted(&mut self, client: SocketAddr, m: &Metrics) {
        self.ledger.client_counted(client, self.now, m);
    }

    /// Server ends' losses that waited long enough: counted lost.
    pub fn expire_losses(&mut self, now: Instant, m: &Metrics) {
        self.ledger.expire(now, m);
    }

    /// The trace a live span is in now.
    pub fn trace_of(&self, span_id: SpanId) -> Option<TraceId> {
        self.live.get(&span_id).map(|s| s.trace_id)
    }

    pub fn is_live(&self, span_id: SpanId) -> bool {
        self.live.contains_key(&span_id)
    }

    /// Whether this SERVER span has claimed a client span on this host (`abandon` would give
    /// it back).
    pub fn holds_client(&self, span_id: SpanId) -> bool {
        self.live.get(&span_id).is_some_and(|s| {
            s.kind == Side::Server
                && matches!(s.parent, Parent::Local(c)
                    if self.live.get(&c).is_some_and(|c| c.kind == Side::Client && c.claimed))
        })
    }

    /// Whether the server end of this CLIENT span's request was seen on this host.
    pub fn claimed(&self, span_id: SpanId) -> bool {
        self.live.get(&span_id).is_some_and(|s| s.claimed)
    }

    /// Whether this CLIENT span's server end, on this host, gave it back (`abandon`).
    pub fn handed_back(&self, span_id: SpanId) -> bool {
        self.live.get(&span_id).is_some_and(|s| s.handed_back)
    }

    /// The server began its response: its thread no longer serves this request.
    pub fn responding(&mut self, span_id: SpanId) {
        let Some(key) = self
            .live
            .get(&span_id)
            .filter(|s| s.runner != 0)
            .map(|s| (s.task.tgid, s.runner))
        else {
            return;
        };
        if let Some(v) = self.serving.get_mut(&key) {
            v.retain(|id| *id != span_id);
            if v.is_empty() {
                self.serving.remove(&key);
            }
        }
    }

    /// The request will never be answered (connection gone, or its events lost), or not seen
    /// whole at this end. A server span gives back the client span it claimed: that end's
    /// exchange counts the request now. Returns whether it did (the request is then the client
    /// end's to count, or to count as lost).
    pub fn abandon(&mut self, span_id: SpanId) -> bool {
        self.responding(span_id);
        let Some(span) = self.live.remove(&span_id) else {
            return false;
        };
        let mut handed_back = false;
        if let (Side::Server, Parent::Local(client)) = (span.kind, span.parent)
            && let Some(c) = self.live.get_mut(&client)
            && c.kind == Side::Client
            && c.claimed
        {
            c.children.retain(|id| *id != span_id);
            // A client end already counted (its exchange went by as this end's) cannot take
            // the request back: this end counts it, as lost.
            if c.finished.is_none() {
                c.claimed = false;
                c.handed_back = true;
                handed_back = true;
            }
        }
        self.stats.unfinished += 1;
        self.recycle(span);
        handed_back
    }

    pub fn finish(&mut self, span_id: SpanId, f: Finished) {
        self.responding(span_id);
        let Some(span) = self.live.get_mut(&span_id) else {
            return;
        };
        span.finished = Some(f);
        if span.finished_at.is_none() {
            self.finished.push(span_id);
        }
        span.finished_at = Some(self.now);
        if span.link_pending {
            let conn = conn_key(&span.client_addr());
            let expected = match span.parent {
                Parent::Remote(id) => id,
                _ => 0,
            };
            if let Some(c) = self
                .claim_client(conn, expected)
                .filter(|c| !self.descends_from(c.span_id, span_id))
            {
                self.stats.late_links += 1;
                if let Some(span) = self.live.get_mut(&span_id) {
                    span.parent = Parent::Local(c.span_id);
                    span.link_pending = false;
                }
                if let Some(p) = self.live.get_mut(&c.span_id) {
                    p.children.push(span_id);
                }
                self.retrace(span_id, c.trace_id, c.sampled);
            }
        }
    }

    /// Moves a span and its local descendants into another trace.
    fn retrace(&mut self, root: SpanId, trace_id: TraceId, sampled: bool) {
        let mut stack = vec![root];
        let mut guard = 0;
        while let Some(id) = stack.pop() {
            guard += 1;
            if guard > 10_000 {
                break;
            }
            if let Some(s) = self.live.get_mut(&id) {
                s.trace_id = trace_id;
                s.sampled = sampled;
                stack.extend(s.children.iter().copied());
            }
        }
    }

    /// Whether every local ancestor of `span` has finished.
    fn ancestors_finished(&self, span: &Span) -> bool {
        let mut parent = span.parent;
        for _ in 0..64 {
            match parent {
                Parent::Local(id) => match self.live.get(&id) {
                    Some(p) if p.finished.is_none() || p.link_pending => return false,
                    Some(p) => parent = p.parent,
                    None => return true,
                },
                _ => return true,
            }
        }
        true
    }

    /// Takes the spans ready for export: finished, and their ancestors finished (or held long
    /// enough). Forgets spans that never finished.
    #[allow(clippy::vec_box, reason = "boxes are recycled into new spans")]
    pub fn drain_ready(&mut self, out: &mut Vec<Box<Span>>) {
        let now = Instant::now();
        self.now = now;
        // Taken with their start, so that ordering them needs no second lookup.
        let mut ready: Vec<(u64, SpanId)> = Vec::new();
        let mut finished = std::mem::take(&mut self.finished);
        finished.retain(|id| {
            let Some(span) = self.live.get(id) else {
                return false;
            };
            let is_ready = match span.finished_at {
                // Its client end's event can still come (the writer's syscall may return
                // after the reader's): wait a little for it, then go as is.
                Some(at) if span.link_pending => now.duration_since(at) >= LATE_LINK_HOLD,
                Some(at) => now.duration_since(at) >= MAX_HOLD || self.ancestors_finished(span),
                // The id was reused by a span that has not finished: listed again when it does.
                None => return false,
            };
            if is_ready {
                ready.push((span.start_ns, *id));
            }
            !is_ready
        });
        self.finished = finished;
        if now.duration_since(self.last_stale_scan) >= STALE_SCAN_EVERY {
            self.last_stale_scan = now;
            let stale: Vec<SpanId> = self
                .live
                .iter()
                .filter(|(_, s)| {
                    s.finished_at.is_none() && now.duration_since(s.created) >= MAX_OPEN
                })
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                self.responding(id);
                self.live.remove(&id);
                self.stats.unfinished += 1;
            }
        }
        // Parents first, so that the API shows trees in order.
        ready.sort_unstable();
        for (_, id) in ready {
            if let Some(span) = self.live.remove(&id) {
                out.push(span);
            }
        }
        self.pending_clients
            .retain(|_, q| q.iter().any(|id| self.live.contains_key(id)));
        // Give back what a burst grew (tables keep their peak capacity otherwise), judged on a
        // minute's peak: the table fills and empties between drains, and sizing it down to
        // each drain's low point only made it grow again, rehashing every entry.
        if self.last_shrink.elapsed() >= SHRINK_EVERY {
            if self.live.capacity() > 4096 && self.live.capacity() > 4 * self.live_peak {
                self.live.shrink_to(2 * self.live_peak);
            }
            self.live_peak = self.live.len();
            self.last_shrink = now;
        }
        self.pending_servers.retain(|_, q| {
            q.iter()
                .any(|id| self.live.get(id).is_some_and(|s| s.link_pending))
        });
    }
}

/// Span name by the HTTP semantic conventions: `METHOD route`.
pub fn span_name(f: &Finished) -> String {
    format!("{} {}", f.method.as_str(), f.route)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Comm;

    fn task(tgid: u32, tid: u32) -> Task {
        Task {
            tgid,
            tid,
            comm: Comm([0; 16]),
            cgroup_id: 0,
        }
    }

    fn tuple(local: &str, remote: &str) -> Tuple {
        Tuple {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        }
    }

    fn start<'a>(
        kind: Side,
        task: Task,
        tuple: Tuple,
        index: u64,
        ctx: Option<&'a Propagated>,
    ) -> Start<'a> {
        Start {
            kind,
            task,
            tuple,
            context: ctx,
            index,
            start_ns: 1,
            version: "1.1",
            tls: false,
            peer_local: true,
            goroutine: 0,
            seq: None,
        }
    }

    fn done(l: &mut Linker, id: SpanId) {
        l.finish(
            id,
            Finished {
                method: Method::Get,
                path: "/".into(),
                route: "/".into(),
                status: 200,
                grpc_status: None,
                end_ns: 2,
                req_bytes: 0,
                resp_bytes: 0,
            },
        );
    }

    #[test]
    fn thread_per_request_service_traces_end_to_end() {
        let mut l = Linker::new(Sampler::ratio(1.0));
        let curl = tuple("127.0.0.1:40000", "127.0.0.1:8000");
        let front_in = tuple("127.0.0.1:8000", "127.0.0.1:40000");
        let front_out = tuple("127.0.0.1:40001", "127.0.0.1:9000");
        let back_in = tuple("127.0.0.1:9000", "127.0.0.1:40001");
        let c = l
            .start(start(Side::Client, task(1, 1), curl, 0, None))
            .unwrap();
        let s = l
            .start(start(Side::Server, task(2, 20), front_in, 0, None))
            .unwrap();
        let fc = l
            .start(start(Side::Client, task(2, 20), front_out, 0, None))
            .unwrap();
        let bs = l
            .start(start(Side::Server, task(3, 30), back_in, 0, None))
            .unwrap();
        for id in [bs, fc] {
            done(&mut l, id);
        }
        let mut out = Vec::new();
        l.drain_ready(&mut out);
        assert!(out.is_empty(), "held until the ancestors finish");
        l.responding(s);
        done(&mut l, s);
        done(&mut l, c);
        l.drain_ready(&mut out);
        assert_eq!(out.len(), 4);
        let by_id: HashMap<SpanId, &Span> = out.iter().map(|s| (s.span_id, &**s)).collect();
        assert!(out.iter().all(|s| s.trace_id == by_id[&c].trace_id));
        assert_eq!(by_id[&c].parent, Parent::None);
        assert_eq!(by_id[&s].parent, Parent::Local(c));
        assert_eq!(by_id[&fc].parent, Parent::Local(s));
        assert_eq!(by_id[&bs].parent, Parent::Local(fc));
    }

    #[test]
    fn go_programs_join_by_goroutine_not_thread() {
        let mut l = Linker::new(Sampler::ratio(1.0));
        l.set_go(&[2].into_iter().collect());
        let on = |kind, tid, local: &str, remote: &str, g| Start {
            goroutine: g,
            ..start(kind, task(2, tid), tuple(local, remote), 0, None)
        };
        // Two requests read by goroutines 0xa and 0xb on one thread.
        let a = l
            .start(on(
                Side::Server,
                7,
                "127.0.0.1:8000",
                "127.0.0.1:40000",
                0xa,
            ))
            .unwrap();
        let b = l
            .start(on(
                Side::Server,
                7,
                "127.0.0.1:8000",
                "127.0.0.1:40001",
                0xb,
            ))
            .unwrap();
        // Calls written for each (from other threads), and one whose goroutine is not known.
        let ca = l
            .start(on(
                Side::Client,
                8,
                "127.0.0.1:50000",
                "127.0.0.1:9000",
                0xa,
            ))
            .unwrap();
        let cb = l
            .start(on(
                Side::Client,
                7,
                "127.0.0.1:50001",
                "127.0.0.1:9000",
                0xb,
            ))
            .unwrap();
        let unknown = l
            .start(on(Side::Client, 7, "127.0.0.1:50002", "127.0.0.1:9000", 0))
            .unwrap();
        let parent = |l: &Linker, id| l.live[&id].parent;
        assert_eq!(parent(&l, ca), Parent::Local(a));
        assert_eq!(parent(&l, cb), Parent::Local(b));
        assert!(!matches!(parent(&l, unknown), Parent::Local(_)));
        // A goroutine that answered serves nothing any more.
        l.responding(a);
        let later = l
            .start(on(
                Side::Client,
                8,
                "127.0.0.1:50003",
                "127.0.0.1:9000",
                0xa,
            ))
            .unwrap();
        assert!(!matches!(parent(&l, later), Parent::Local(_)));
    }

    #[test]
    fn late_client_event_is_linked_when_the_server_span_finishes() {
        let mut l = Linker::new(Sampler::ratio(1.0));
        let s = l
            .start(start(
                Side::Server,
                task(2, 2),
                tuple("127.0.0.1:8000", "127.0.0.1:40000"),
                0,
                None,
            ))
            .unwrap();
        let c = l
            .start(start(
                Side::Client,
                task(1, 1),
                tuple("127.0.0.1:40000", "127.0.0.1:8000"),
                0,
                None,
            ))
            .unwrap();
        done(&mut l, s);
        done(&mut l, c);
        let mut out = Vec::new();
        l.drain_ready(&mut out);
        let server = out.iter().find(|x| x.span_id == s).unwrap();
        let client = out.iter().find(|x| x.span_id == c).unwrap();
        assert_eq!(server.parent, Parent::Local(c));
        assert_eq!(server.trace_id, client.trace_id);
    }

    #[test]
    fn propagated_context_wins_and_both_ends_derive_the_same_ids() {
        let mut l = Linker::new(Sampler::ratio(1.0));
        let ctx = Propagated {
            trace_id: 0xabc,
            span_id: 0xdef,
            sampled: Some(true),
            tracestate: None,
        };
        let s = l
            .start(start(
                Side::Server,
                task(2, 2),
                tuple("10.0.0.2:80", "10.0.0.1:5555"),
                3,
                Some(&ctx),
            ))
            .unwrap();
        done(&mut l, s);
        let mut out = Vec::new();
        l.drain_ready(&mut out);
        assert_eq!(out[0].trace_id, 0xabc);
        assert_eq!(out[0].parent, Parent::Remote(0xdef));

        // No header, ends on two hosts: the server's parent is the client's span id.
        let mut a = Linker::new(Sampler::ratio(1.0));
        let mut b = Linker::new(Sampler::ratio(1.0));
        let c = a
            .start(start(
                Side::Client,
                task(1, 1),
                tuple("10.0.0.1:5555", "10.0.0.2:80"),
                7,
                None,
            ))
            .unwrap();
        let mut remote = start(
            Side::Server,
            task(2, 2),
            tuple("10.0.0.2:80", "10.0.0.1:5555"),
            7,
            None,
        );
        remote.peer_local = false;
        let s = b.start(remote).unwrap();
        assert_eq!(b.live[&s].parent, Parent::Remote(c));
        assert_eq!(b.live[&s].trace_id, a.live[&c].trace_id);
    }

    /// Ids from the request's TCP sequence number: the two daemons agree though one saw the
    /// connection from its start and the other from its 8th request, and though the client
    /// dialled an address translated on the way (a Kubernetes Service's); and a connection
    /// that comes back on the same client port starts a trace of its own.
    #[test]
    fn sequence_numbers_name_requests_alike_at_both_ends() {
        let (mut a, mut b) = (
            Linker::new(Sampler::ratio(1.0)),
            Linker::new(Sampler::ratio(1.0)),
        );
        let client = |a: &mut Linker, index, seq| {
            let mut st = start(
                Side::Client,
                task(1, 1),
                tuple("10.0.0.1:5555", "10.96.0.10:80"),
                index,
                None,
            );
            st.seq = Some(seq);
            a.start(st).unwrap()
        };
        let c = client(&mut a, 7, 0x1234_5678);
        let mut remote = start(
            Side::Server,
            task(2, 2),
            tuple("10.0.1.7:8080", "10.0.0.1:5555"),
            0,
            None,
        );
        remote.peer_local = false;
        remote.seq = Some(0x1234_5678);
        let s = b.start(remote).unwrap();
        assert_eq!(b.live[&s].parent, Parent::Remote(c));
        assert_eq!(b.live[&s].trace_id, a.live[&c].trace_id);
        // The same port, a new connection (its own initial sequence number), first request.
        let again = client(&mut a, 0, 0x9abc_def0);
        let first = client(&mut a, 0, 0x0fed_cba9);
        assert_ne!(a.live[&again].trace_id, a.live[&first].trace_id);
        assert_ne!(a.live[&again].trace_id, a.live[&c].trace_id);
    }

    #[test]
    fn unsampled_header_is_honoured() {
        let mut l = Linker::new(Sampler::ratio(1.0));
        let ctx = Propagated {
            trace_id: 5,
            span_id: 6,
            sampled: Some(false),
            tracestate: None,
        };
        let s = l
            .start(start(
                Side::Server,
                task(2, 2),
                tuple("127.0.0.1:80", "127.0.0.1:5555"),
                0,
                Some(&ctx),
            ))
            .unwrap();
        assert!(!l.live[&s].sampled);
        let none = Linker::new(Sampler::ratio(0.0));
        assert!(!none.sampler.sample(12345));
    }
}
