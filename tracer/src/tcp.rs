//! TCP connections between workloads, whatever they carry (a database, a cache, a queue, TLS
//! that is not followed): every connect a process on this host makes, from the kernel's state
//! changes (`inet_sock_set_state`, which the data path uses anyway): established, failed
//! (closed before it was up: refused, timed out, unreachable), closed, open now, and at each
//! close the kernel's byte, retransmission and RTT counters. As `linkerd viz stat` shows TCP
//! connections beside requests, and the topology then holds the dependencies HTTP does not
//! show. The connecting end is the one known (a connect runs in its process); the server is
//! named as its workload when its end is on this host (from its own events), else by address.
//! Connections already open when the daemon starts are read from /proc (`scan`).

use std::{
    collections::{BTreeSet, HashSet, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

// Looked up several times per connection: foldhash, as the connection table.
use foldhash::HashMap;

use prometheus::{IntCounter, IntGauge};
use serde::Serialize;
use tracer_common::{
    TCP_CLOSE, TCP_CLOSE_WAIT, TCP_CLOSING, TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2,
    TCP_LAST_ACK, TCP_SYN_RECV, TCP_SYN_SENT,
};

use crate::{
    conn::Peer,
    event::{Conn, Task, Tuple},
    metrics::Metrics,
    workload,
};

/// Connects in progress and connections open followed, at most each (a connect or connection
/// past it is not counted: `tracer_series_overflow_total{table="tcp_connection"}`).
const MAX_CONNS: usize = 65_536;
/// Edges kept; connections past it count on `[other] -> [other]`.
const MAX_EDGES: usize = 1024;
/// Addresses listed per edge.
const MAX_ADDRS: usize = 8;
/// How long a connection to this host waits for its server end to be seen before the server
/// is named by its address.
const NAME_WAIT: Duration = Duration::from_millis(500);
/// Longer than the kernel tries a connect (its SYN retries end after about 127 s).
const CONNECT_WAIT: Duration = Duration::from_secs(180);
/// An edge with nothing open and no change for this long is forgotten (with its series).
const EDGE_IDLE: Duration = Duration::from_secs(3600);

const OTHER: &str = "[other]";

/// A connection as the API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct TcpEdgeView {
    pub src: String,
    pub dst: String,
    /// Server addresses connected to (up to 8).
    pub dst_addrs: Vec<String>,
    /// Connects that came up, since the daemon started.
    pub established: u64,
    /// Connects that never came up (refused, timed out, unreachable).
    pub failed: u64,
    /// Connections closed (of those established while the daemon ran, or before).
    pub closed: u64,
    /// Open now.
    pub open: u64,
    /// Bytes the client sent (acknowledged by the server) and received, over the connections
    /// closed so far (counted at their close).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Segments retransmitted, and the mean of the kernel's smoothed round-trip time at each
    /// close (null before one), over the connections closed so far.
    pub retransmits: u64,
    pub rtt_ms: Option<f64>,
}

struct Edge {
    established: u64,
    failed: u64,
    closed: u64,
    open: u64,
    addrs: BTreeSet<std::net::SocketAddr>,
    changed: Instant,
    bytes_sent: u64,
    bytes_received: u64,
    retransmits: u64,
    rtt_us_sum: u64,
    rtt_count: u64,
    established_total: IntCounter,
    failed_total: IntCounter,
    open_now: IntGauge,
    sent_total: IntCounter,
    received_total: IntCounter,
    retransmits_total: IntCounter,
    rtt: prometheus::Histogram,
}

impl Edge {
    /// A connection of this edge closed, with the kernel's counters of the end seen here: the
    /// client's, or the server's when the client is on another host (`inbound`).
    fn close(&mut self, c: &Conn, inbound: bool) {
        self.closed += 1;
        self.open = self.open.saturating_sub(1);
        self.open_now.set(self.open as i64);
        self.changed = Instant::now();
        let (sent, received) = match data_bytes(c, inbound) {
            (out, into) if inbound => (into, out),
            both => both,
        };
        self.bytes_sent += sent;
        self.bytes_received += received;
        self.sent_total.inc_by(sent);
        self.received_total.inc_by(received);
        self.retransmits += u64::from(c.retransmits);
        self.retransmits_total.inc_by(u64::from(c.retransmits));
        if c.srtt_us > 0 {
            self.rtt_us_sum += u64::from(c.srtt_us);
            self.rtt_count += 1;
            self.rtt.observe(f64::from(c.srtt_us) / 1e6);
        }
    }
}

/// The data bytes of a closing connection end: the kernel's counters follow the sequence
/// numbers, which a SYN and a FIN take one each. A connecting end's SYN was acknowledged (the
/// connection was up; a server's end counts from after its SYN, `passive`); its FIN was when
/// it closes from FIN_WAIT2, CLOSING or LAST_ACK; the peer's FIN came as the kernel says
/// (`SOCK_DONE`), else, without BTF, when it went through CLOSE_WAIT (LAST_ACK), CLOSING or
/// TIME_WAIT (from FIN_WAIT2: an orphan whose FIN_WAIT2 ended before the FIN then counts a
/// byte too many).
fn data_bytes(c: &Conn, passive: bool) -> (u64, u64) {
    if c.bytes_acked == 0 && !passive {
        return (0, c.bytes_received);
    }
    let closing_after = |states: &[u32]| c.new_state == TCP_CLOSE && states.contains(&c.old_state);
    let our_fin = closing_after(&[TCP_FIN_WAIT2, TCP_CLOSING, TCP_LAST_ACK]);
    let peer_fin = c.peer_fin.unwrap_or_else(|| {
        c.new_state == TCP_LAST_ACK
            || closing_after(&[TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING, TCP_FIN_WAIT2])
    });
    (
        c.bytes_acked
            .saturating_sub(u64::from(!passive) + u64::from(our_fin)),
        c.bytes_received.saturating_sub(u64::from(peer_fin)),
    )
}

/// The edges, shared with the API.
#[derive(Default)]
pub struct TcpEdges {
    edges: HashMap<(Arc<str>, Arc<str>), Edge>,
}

impl TcpEdges {
    fn edge(&mut self, src: &Arc<str>, dst: &Arc<str>, metrics: &Metrics) -> &mut Edge {
        let mut key = (src.clone(), dst.clone());
        if self.edges.len() >= MAX_EDGES && !self.edges.contains_key(&key) {
            metrics
                .series_overflow
                .with_label_values(&["tcp_edge"])
                .inc();
            key = (Arc::from(OTHER), Arc::from(OTHER));
        }
        self.edges.entry(key).or_insert_with_key(|(src, dst)| {
            let outcome = |o: &str| metrics.tcp_connections.with_label_values(&[src, dst, o]);
            Edge {
                established: 0,
                failed: 0,
                closed: 0,
                open: 0,
                addrs: BTreeSet::new(),
                changed: Instant::now(),
                bytes_sent: 0,
                bytes_received: 0,
                retransmits: 0,
                rtt_us_sum: 0,
                rtt_count: 0,
                established_total: outcome("established"),
                failed_total: outcome("failed"),
                open_now: metrics.tcp_open.with_label_values(&[src, dst]),
                sent_total: metrics.tcp_bytes.with_label_values(&[src, dst, "sent"]),
                received_total: metrics.tcp_bytes.with_label_values(&[src, dst, "received"]),
                retransmits_total: metrics.tcp_retransmits.with_label_values(&[src, dst]),
                rtt: metrics.tcp_rtt.with_label_values(&[src, dst]),
            }
        })
    }

    /// Forgets the edges idle past [`EDGE_IDLE`] with nothing open, and their series.
    fn expire(&mut self, now: Instant, metrics: &Metrics) {
        self.edges.retain(|(src, dst), e| {
            let keep = e.open > 0 || now.duration_since(e.changed) < EDGE_IDLE;
            if !keep {
                for o in ["established", "failed"] {
                    let _ = metrics.tcp_connections.remove_label_values(&[src, dst, o]);
                }
                let _ = metrics.tcp_open.remove_label_values(&[src, dst]);
                let _ = metrics.tcp_retransmits.remove_label_values(&[src, dst]);
                let _ = metrics.tcp_rtt.remove_label_values(&[src, dst]);
                for d in ["sent", "received"] {
                    let _ = metrics.tcp_bytes.remove_label_values(&[src, dst, d]);
                }
            }
            keep
        });
    }

    /// Connections open now to `dst`, from every client.
    pub fn open_to(&self, dst: &str) -> u64 {
        self.edges
            .iter()
            .filter(|((_, d), _)| &**d == dst)
            .map(|(_, e)| e.open)
            .sum()
    }

    pub fn view(&self) -> Vec<TcpEdgeView> {
        let mut out: Vec<TcpEdgeView> = self
            .edges
            .iter()
            .map(|((src, dst), e)| TcpEdgeView {
                src: src.to_string(),
                dst: dst.to_string(),
                dst_addrs: e.addrs.iter().map(ToString::to_string).collect(),
                established: e.established,
                failed: e.failed,
                closed: e.closed,
                open: e.open,
                bytes_sent: e.bytes_sent,
                bytes_received: e.bytes_received,
                retransmits: e.retransmits,
                rtt_ms: (e.rtt_count > 0)
                    .then(|| e.rtt_us_sum as f64 / e.rtt_count as f64 / 1000.0),
            })
            .collect();
        out.sort_by(|a, b| (&a.src, &a.dst).cmp(&(&b.src, &b.dst)));
        out
    }
}

/// A connection followed from its connect (or, for a client on another host, from its server
/// end's establishment): who made it, and once known, the server's name.
struct Open {
    src: Arc<str>,
    /// As the end seen here has it.
    tuple: Tuple,
    /// Seen from its server's end: the client is on another host.
    inbound: bool,
    /// Once counted as established on its edge.
    dst: Option<Arc<str>>,
    /// When it came up (the kernel's monotonic clock, ns).
    at_ns: u64,
}

/// Names given to processes and addresses, kept here so that a connection takes no global lock
/// and makes no string (at most [`NAME_CACHE`] each; started over when full).
#[derive(Default)]
struct Names {
    workloads: HashMap<(u32, [u8; 16]), Arc<str>>,
    addrs: HashMap<std::net::SocketAddr, Arc<str>>,
}

const NAME_CACHE: usize = 8192;

/// The daemon's own connections remembered (span export: a handful).
const MAX_OWN: usize = 1024;

impl Names {
    fn workload(&mut self, task: &Task) -> Arc<str> {
        if self.workloads.len() >= NAME_CACHE {
            self.workloads.clear();
        }
        self.workloads
            .entry((task.tgid, task.comm.0))
            .or_insert_with(|| workload::name(task))
            .clone()
    }

    /// A client on another host, by its address alone (its port changes per connection), as
    /// the requests' edges name it.
    fn host(&mut self, ip: std::net::IpAddr) -> Arc<str> {
        self.peer(ip, None)
    }

    fn addr(&mut self, a: std::net::SocketAddr) -> Arc<str> {
        self.peer(a.ip(), Some(a.port()))
    }

    /// `kube::peer_name`, the address strings cached (the API's names are not: they may come
    /// later).
    fn peer(&mut self, ip: std::net::IpAddr, port: Option<u16>) -> Arc<str> {
        if let Some(name) = crate::kube::name_of(ip) {
            return name;
        }
        if self.addrs.len() >= NAME_CACHE {
            self.addrs.clear();
        }
        self.addrs
            .entry(SocketAddr::new(ip, port.unwrap_or(0)))
            .or_insert_with(|| crate::kube::peer_name(ip, port))
            .clone()
    }
}

/// The kernel's monotonic clock (`bpf_ktime_get_ns`'s), in ns.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the time into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn lock(edges: &Mutex<TcpEdges>) -> MutexGuard<'_, TcpEdges> {
    edges.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows connects from the kernel's state changes (in the pipeline's thread). The shared
/// edges are locked only where a connection changes what they count.
#[derive(Default)]
pub struct TcpTracker {
    /// Connects not yet up, since when (ns): one whose outcome was lost (ring buffer full) is
    /// forgotten after [`CONNECT_WAIT`].
    connecting: HashMap<u64, (Task, u64)>,
    open: HashMap<u64, Open>,
    /// The client sockets of this host by their address (a server end whose client is one of
    /// them is not a connection from another host), and which of them are the daemon's own.
    clients: HashMap<SocketAddr, u64>,
    own: HashMap<u64, SocketAddr>,
    /// Connections whose server is on this host and not named yet, oldest first.
    unnamed: VecDeque<u64>,
    last_expire: Option<Instant>,
    /// Client connections open when the daemon started (`adopt`), by tuple: their connect was
    /// not seen, their close is matched by addresses.
    existing: HashMap<Tuple, Existing>,
    /// While the look at existing connections runs: the tuples that closed meanwhile, which
    /// it may still list (at most [`MAX_CONNS`]).
    scanning: Option<HashSet<Tuple>>,
    names: Names,
}

impl TcpTracker {
    /// One state change. `peer` finds the other end of a connection on this host.
    pub fn on_state(
        &mut self,
        c: &Conn,
        own_pid: u32,
        edges: &Mutex<TcpEdges>,
        metrics: &Metrics,
        peer: impl Fn(&Tuple) -> Option<Peer>,
    ) {
        match (c.old_state, c.new_state) {
            (_, TCP_SYN_SENT) => {
                if c.task.comm.0[0] == 0 {
                    return;
                }
                if self.connecting.len() >= MAX_CONNS && !self.connecting.contains_key(&c.sk) {
                    metrics
                        .series_overflow
                        .with_label_values(&["tcp_connection"])
                        .inc();
                    return;
                }
                self.connecting.insert(c.sk, (c.task, c.ts_ns));
            }
            (TCP_SYN_SENT, TCP_ESTABLISHED) => {
                let Some((task, _)) = self.connecting.remove(&c.sk) else {
                    return;
                };
                // Its server end, if on this host, is not a connection from another host.
                self.clients.insert(c.tuple.local, c.sk);
                // The daemon's own connections (span export) are not the host's traffic.
                if task.tgid == own_pid {
                    if self.own.len() < MAX_OWN {
                        self.own.insert(c.sk, c.tuple.local);
                    } else {
                        self.clients.remove(&c.tuple.local);
                    }
                    return;
                }
                if self.open.len() >= MAX_CONNS {
                    self.clients.remove(&c.tuple.local);
                    metrics
                        .series_overflow
                        .with_label_values(&["tcp_connection"])
                        .inc();
                    return;
                }
                let mut open = Open {
                    src: self.names.workload(&task),
                    tuple: c.tuple,
                    inbound: false,
                    dst: None,
                    at_ns: c.ts_ns,
                };
                if !to_this_host(&c.tuple) {
                    let dst = self.names.addr(c.tuple.remote);
                    established(&mut open, dst, &mut lock(edges), metrics);
                } else {
                    self.unnamed.push_back(c.sk);
                }
                self.open_new(c, open, edges, metrics, &peer);
            }
            // A server's connection up, from a client not on loopback (the kernel side sends
            // no other): from another host unless its connect was seen here.
            (TCP_SYN_RECV, TCP_ESTABLISHED) => {
                if self.clients.contains_key(&c.tuple.remote) {
                    return;
                }
                if self.open.len() >= MAX_CONNS {
                    metrics
                        .series_overflow
                        .with_label_values(&["tcp_connection"])
                        .inc();
                    return;
                }
                let open = Open {
                    src: self.names.host(c.tuple.remote.ip()),
                    tuple: c.tuple,
                    inbound: true,
                    dst: None,
                    at_ns: c.ts_ns,
                };
                self.unnamed.push_back(c.sk);
                self.open_new(c, open, edges, metrics, &peer);
            }
            (TCP_SYN_SENT, TCP_CLOSE) => {
                let Some((task, _)) = self.connecting.remove(&c.sk) else {
                    return;
                };
                if task.tgid == own_pid {
                    return;
                }
                let (src, dst) = (self.names.workload(&task), self.names.addr(c.tuple.remote));
                let mut edges = lock(edges);
                let e = edges.edge(&src, &dst, metrics);
                e.failed += 1;
                e.failed_total.inc();
                e.changed = Instant::now();
                note_addr(e, c.tuple.remote);
            }
            (_, TCP_CLOSE) => {
                self.connecting.remove(&c.sk);
                if let Some(local) = self.own.remove(&c.sk) {
                    self.forget_client(local, c.sk);
                } else if let Some(open) = self.open.remove(&c.sk) {
                    if !open.inbound {
                        self.forget_client(open.tuple.local, c.sk);
                    }
                    self.closed(open, c, &mut lock(edges), metrics, &peer);
                } else if matches!(c.old_state, TCP_ESTABLISHED | TCP_CLOSE_WAIT) {
                    // Reset or aborted: no FIN_WAIT1 or LAST_ACK came before.
                    self.close_existing(c, edges, metrics);
                }
            }
            // This end's close, or its last ACK: the tuple is still whole (at TCP_CLOSE the
            // kernel may have released the local port already).
            (_, TCP_FIN_WAIT1 | TCP_LAST_ACK) if !self.open.contains_key(&c.sk) => {
                self.close_existing(c, edges, metrics);
            }
            _ => {}
        }
    }

    /// Follows a connection from now. A socket address reused before its close was seen: the
    /// old one is gone (its byte counts with it).
    fn open_new(
        &mut self,
        c: &Conn,
        open: Open,
        edges: &Mutex<TcpEdges>,
        metrics: &Metrics,
        peer: &impl Fn(&Tuple) -> Option<Peer>,
    ) {
        if let Some(old) = self.open.insert(c.sk, open) {
            if !old.inbound && old.tuple.local != c.tuple.local {
                self.forget_client(old.tuple.local, c.sk);
            }
            let gone = Conn {
                bytes_received: 0,
                bytes_acked: 0,
                srtt_us: 0,
                retransmits: 0,
                ..*c
            };
            self.closed(old, &gone, &mut lock(edges), metrics, peer);
        }
    }

    /// A client socket of this host closed: its address no longer names a client here.
    fn forget_client(&mut self, local: SocketAddr, sk: u64) {
        if self.clients.get(&local) == Some(&sk) {
            self.clients.remove(&local);
        }
    }

    /// Takes in the client connections that were open when the daemon started (`scan`), but
    /// those that closed since the look began.
    pub fn adopt(&mut self, found: Vec<Existing>, edges: &Mutex<TcpEdges>, metrics: &Metrics) {
        let closed = self.scanning.take().unwrap_or_default();
        let mut edges = lock(edges);
        for x in found {
            if closed.contains(&x.tuple)
                || self.existing.len() >= MAX_CONNS
                || self.existing.contains_key(&x.tuple)
            {
                continue;
            }
            let e = edges.edge(&x.src, &x.dst, metrics);
            e.open += 1;
            e.open_now.inc();
            note_addr(e, server_of(&x.tuple, x.inbound));
            self.existing.insert(x.tuple, x);
        }
    }

    /// From now until `adopt`, closes are remembered so that a connection the look lists but
    /// that is gone by then is not taken in.
    pub fn scan_started(&mut self) {
        self.scanning = Some(HashSet::new());
    }

    /// A close of a connection open before the daemon started, if it is one. At TCP_CLOSE the
    /// local port may read 0: then matched by the addresses and the remote port, if only one
    /// such connection is open.
    fn close_existing(&mut self, c: &Conn, edges: &Mutex<TcpEdges>, metrics: &Metrics) {
        let tuple = &c.tuple;
        if let Some(closed) = &mut self.scanning
            && closed.len() < MAX_CONNS
        {
            closed.insert(*tuple);
        }
        if self.existing.is_empty() {
            return;
        }
        let key = if self.existing.contains_key(tuple) {
            *tuple
        } else if tuple.local.port() == 0 {
            let mut same = self
                .existing
                .keys()
                .filter(|t| t.remote == tuple.remote && t.local.ip() == tuple.local.ip());
            match (same.next(), same.next()) {
                (Some(t), None) => *t,
                _ => return,
            }
        } else {
            return;
        };
        let Some(x) = self.existing.remove(&key) else {
            return;
        };
        lock(edges)
            .edge(&x.src, &x.dst, metrics)
            .close(c, x.inbound);
    }

    /// Whether `tick` has anything to do.
    pub fn wants_tick(&self) -> bool {
        !self.unnamed.is_empty()
            || self
                .last_expire
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
    }

    /// Names the servers of connections to this host whose end has been seen since, or that
    /// waited [`NAME_WAIT`] (then by address); forgets idle edges now and then.
    pub fn tick(
        &mut self,
        edges: &Mutex<TcpEdges>,
        metrics: &Metrics,
        peer: impl Fn(&Tuple) -> Option<Peer>,
    ) {
        let now_ns = monotonic_ns();
        let mut waiting = VecDeque::new();
        let mut guard = None;
        while let Some(sk) = self.unnamed.pop_front() {
            let Some(open) = self.open.get_mut(&sk).filter(|o| o.dst.is_none()) else {
                continue;
            };
            let dst = match server_end(open, &peer) {
                Some(p) => self.names.workload(&p.task),
                None if now_ns.saturating_sub(open.at_ns) >= NAME_WAIT.as_nanos() as u64 => {
                    self.names.addr(server_addr(open))
                }
                None => {
                    waiting.push_back(sk);
                    continue;
                }
            };
            let edges = guard.get_or_insert_with(|| lock(edges));
            established(open, dst, edges, metrics);
        }
        drop(guard);
        self.unnamed = waiting;
        let now = Instant::now();
        if self
            .last_expire
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            self.last_expire = Some(now);
            self.connecting
                .retain(|_, (_, at)| now_ns.saturating_sub(*at) < CONNECT_WAIT.as_nanos() as u64);
            lock(edges).expire(now, metrics);
        }
    }

    /// A connection's close: named first if it was not yet (its server end may have closed
    /// already, and is still found among the recently closed).
    fn closed(
        &mut self,
        mut open: Open,
        c: &Conn,
        edges: &mut TcpEdges,
        metrics: &Metrics,
        peer: &impl Fn(&Tuple) -> Option<Peer>,
    ) {
        if open.dst.is_none() {
            let dst = match server_end(&open, peer) {
                Some(p) => self.names.workload(&p.task),
                None => self.names.addr(server_addr(&open)),
            };
            established(&mut open, dst, edges, metrics);
        }
        let Some(dst) = open.dst else { return };
        edges.edge(&open.src, &dst, metrics).close(c, open.inbound);
    }
}

/// Whether a connection's server may be on this host (loopback, or this host's own address).
fn to_this_host(t: &Tuple) -> bool {
    t.remote.ip().is_loopback() || t.remote.ip() == t.local.ip()
}

/// The server end of a connection to this host: the other end of a client's, the end itself
/// when seen from the server (`peer` finds the end opposite the tuple it is given).
fn server_end(open: &Open, peer: &impl Fn(&Tuple) -> Option<Peer>) -> Option<Peer> {
    if open.inbound {
        peer(&open.tuple.reversed())
    } else {
        peer(&open.tuple)
    }
}

fn server_addr(open: &Open) -> SocketAddr {
    server_of(&open.tuple, open.inbound)
}

/// The server's address in a tuple seen from the client's end, or from the server's
/// (`inbound`).
fn server_of(tuple: &Tuple, inbound: bool) -> SocketAddr {
    if inbound { tuple.local } else { tuple.remote }
}

/// Notes the address a connection's client dialled.
fn note_addr(e: &mut Edge, server: SocketAddr) {
    if e.addrs.len() < MAX_ADDRS {
        e.addrs.insert(server);
    }
}

/// Counts a connection as established on its edge, now that its server has a name.
fn established(open: &mut Open, dst: Arc<str>, edges: &mut TcpEdges, metrics: &Metrics) {
    let e = edges.edge(&open.src, &dst, metrics);
    e.established += 1;
    e.established_total.inc();
    e.open += 1;
    e.open_now.inc();
    note_addr(e, server_addr(open));
    open.dst = Some(dst);
}

/// A connection open when the daemon started: its addresses (as the end found has them), its
/// client's workload and its server's (the workload at the other end on this host, else the
/// address); `inbound`: found at its server's end, its client on another host.
#[derive(Debug)]
pub struct Existing {
    pub tuple: Tuple,
    pub src: Arc<str>,
    pub dst: Arc<str>,
    pub inbound: bool,
}

/// Sockets looked at, at most, when the daemon starts (file descriptors read).
const MAX_SCAN_FDS: usize = 1 << 18;

/// The connections open now, from each network namespace's `/proc/<pid>/net/tcp{,6}` (a pod's
/// sockets are in its own) and each process's file descriptors (which socket is whose): the
/// client ends on this host, and the server ends whose client is on another host (no client
/// end here has its address). A connection's client end is the one whose local port is not
/// listening. Blocking: run it off the reader's thread; it gives up (nothing found) once `stop`
/// says so.
pub fn scan(own_pid: u32, stop: impl Fn() -> bool) -> Vec<Existing> {
    use std::os::unix::fs::MetadataExt as _;
    let mut owner: HashMap<u64, u32> = HashMap::default();
    let mut namespaces: HashMap<u64, u32> = HashMap::default();
    let mut fds = 0usize;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if stop() {
            return Vec::new();
        }
        if pid == own_pid {
            continue;
        }
        if let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            namespaces.entry(ns.ino()).or_insert(pid);
        }
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in dir.flatten() {
            fds += 1;
            if fds > MAX_SCAN_FDS {
                break;
            }
            if let Ok(link) = std::fs::read_link(fd.path())
                && let Some(inode) = link
                    .to_str()
                    .and_then(|l| l.strip_prefix("socket:["))
                    .and_then(|l| l.strip_suffix(']'))
                    .and_then(|l| l.parse().ok())
            {
                owner.entry(inode).or_insert(pid);
            }
        }
    }
    let task = |pid: u32| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let mut name = [0u8; 16];
        let comm = comm.trim_end().as_bytes();
        let n = comm.len().min(15);
        name[..n].copy_from_slice(&comm[..n]);
        Task {
            tgid: pid,
            tid: pid,
            comm: crate::event::Comm(name),
            cgroup_id: 0,
        }
    };
    let mut out = Vec::new();
    let mut clients: HashSet<std::net::SocketAddr> = HashSet::default();
    let mut servers = Vec::new();
    for pid in namespaces.into_values() {
        let mut socks = Vec::new();
        for file in ["tcp", "tcp6"] {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
                socks.extend(text.lines().skip(1).filter_map(proc_net_tcp_line));
            }
        }
        let listening: HashSet<(std::net::IpAddr, u16)> = socks
            .iter()
            .filter(|s| s.state == PROC_LISTEN)
            .map(|s| (s.tuple.local.ip(), s.tuple.local.port()))
            .collect();
        let serves = |a: std::net::SocketAddr| {
            listening.contains(&(a.ip(), a.port()))
                || listening.contains(&(std::net::Ipv4Addr::UNSPECIFIED.into(), a.port()))
                || listening.contains(&(std::net::Ipv6Addr::UNSPECIFIED.into(), a.port()))
        };
        let by_tuple: HashMap<Tuple, u64> = socks
            .iter()
            .filter(|s| s.state == PROC_ESTABLISHED)
            .map(|s| (s.tuple, s.inode))
            .collect();
        for s in socks.iter().filter(|s| s.state == PROC_ESTABLISHED) {
            if serves(s.tuple.local) {
                if !s.tuple.remote.ip().is_loopback()
                    && let Some(&server) = owner.get(&s.inode)
                {
                    servers.push((s.tuple, server));
                }
                continue;
            }
            clients.insert(s.tuple.local);
            let Some(&client) = owner.get(&s.inode) else {
                continue;
            };
            let server = to_this_host(&s.tuple)
                .then(|| by_tuple.get(&s.tuple.reversed()))
                .flatten()
                .and_then(|inode| owner.get(inode));
            out.push(Existing {
                tuple: s.tuple,
                src: workload::name(&task(client)),
                dst: match server {
                    Some(&pid) => workload::name(&task(pid)),
                    None => {
                        crate::kube::peer_name(s.tuple.remote.ip(), Some(s.tuple.remote.port()))
                    }
                },
                inbound: false,
            });
        }
    }
    for (tuple, server) in servers {
        if !clients.contains(&tuple.remote) {
            out.push(Existing {
                tuple,
                src: crate::kube::peer_name(tuple.remote.ip(), None),
                dst: workload::name(&task(server)),
                inbound: true,
            });
        }
    }
    out
}

/// `st` of `/proc/net/tcp`.
const PROC_ESTABLISHED: u8 = 0x01;
const PROC_LISTEN: u8 = 0x0a;

struct ProcSocket {
    tuple: Tuple,
    state: u8,
    inode: u64,
}

/// One line of `/proc/net/tcp` or `tcp6`: `sl local_address rem_address st tx:rx tr:when
/// retrnsmt uid timeout inode ...`, addresses as the kernel's 32-bit words in hex (in the
/// host's byte order), ports in hex. v4-mapped IPv6 addresses are taken as IPv4, as the
/// events' are.
fn proc_net_tcp_line(line: &str) -> Option<ProcSocket> {
    let mut f = line.split_whitespace();
    let local = proc_addr(f.nth(1)?)?;
    let remote = proc_addr(f.next()?)?;
    let state = u8::from_str_radix(f.next()?, 16).ok()?;
    let inode = f.nth(5)?.parse().ok()?;
    Some(ProcSocket {
        tuple: Tuple { local, remote },
        state,
        inode,
    })
}

fn proc_addr(s: &str) -> Option<std::net::SocketAddr> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conn::Side, event::Comm};

    fn task(tgid: u32, name: &str) -> Task {
        let mut comm = [0; 16];
        comm[..name.len()].copy_from_slice(name.as_bytes());
        Task {
            tgid,
            tid: tgid,
            comm: Comm(comm),
            cgroup_id: 0,
        }
    }

    fn change(sk: u64, task: Task, remote: &str, old_state: u32, new_state: u32) -> Conn {
        Conn {
            task,
            ts_ns: 1,
            sk,
            tuple: Tuple {
                local: "127.0.0.1:40000".parse().unwrap(),
                remote: remote.parse().unwrap(),
            },
            old_state,
            new_state,
            seq: 0,
            peer_fin: None,
            peer_reset: false,
            bytes_received: 0,
            bytes_acked: 0,
            srtt_us: 0,
            retransmits: 0,
            lost_requests: (0, 0),
        }
    }

    struct Harness {
        tracker: TcpTracker,
        edges: Mutex<TcpEdges>,
        metrics: Metrics,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                tracker: TcpTracker::default(),
                edges: Mutex::new(TcpEdges::default()),
                metrics: Metrics::new(),
            }
        }

        /// A state change; the server's end on this host (if `server`) is found by its tuple.
        fn state(&mut self, c: Conn, server: Option<&str>) {
            let peer = |_: &Tuple| {
                server.map(|name| Peer {
                    task: task(3_999_998, name),
                    side: Some(Side::Server),
                })
            };
            self.tracker
                .on_state(&c, 7, &self.edges, &self.metrics, peer);
        }

        fn view(&self) -> Vec<TcpEdgeView> {
            lock(&self.edges).view()
        }

        fn edge(&self, src: &str, dst: &str) -> TcpEdgeView {
            self.view()
                .into_iter()
                .find(|e| e.src == src && e.dst == dst)
                .unwrap_or_else(|| panic!("no edge {src} -> {dst}: {:?}", self.view()))
        }
    }

    const PID: u32 = 3_999_999;

    #[test]
    fn a_connection_to_this_host_is_named_by_its_server_end() {
        let mut h = Harness::new();
        let client = task(PID, "client");
        h.state(change(1, client, "127.0.0.1:5432", 7, TCP_SYN_SENT), None);
        h.state(
            change(1, client, "127.0.0.1:5432", TCP_SYN_SENT, TCP_ESTABLISHED),
            None,
        );
        // Not named yet: its server end has not been seen.
        assert!(h.view().is_empty());
        h.tracker.tick(&h.edges, &h.metrics, |_: &Tuple| {
            Some(Peer {
                task: task(3_999_998, "postgres"),
                side: None,
            })
        });
        let e = h.edge("client", "postgres");
        assert_eq!((e.established, e.open, e.closed), (1, 1, 0));
        h.state(change(1, client, "127.0.0.1:5432", 4, TCP_CLOSE), None);
        let e = h.edge("client", "postgres");
        assert_eq!((e.established, e.open, e.closed), (1, 0, 1));
        assert_eq!(e.dst_addrs, vec!["127.0.0.1:5432".to_owned()]);
    }

    #[test]
    fn a_connection_closed_before_it_was_named_is_named_at_its_close() {
        let mut h = Harness::new();
        let client = task(PID, "client");
        h.state(change(1, client, "127.0.0.1:6379", 7, TCP_SYN_SENT), None);
        h.state(
            change(1, client, "127.0.0.1:6379", TCP_SYN_SENT, TCP_ESTABLISHED),
            None,
        );
        h.state(
            change(1, client, "127.0.0.1:6379", 4, TCP_CLOSE),
            Some("redis"),
        );
        let e = h.edge("client", "redis");
        assert_eq!((e.established, e.open, e.closed), (1, 0, 1));
        // Nothing left waiting for a name.
        assert!(
            h.tracker
                .unnamed
                .iter()
                .all(|sk| !h.tracker.open.contains_key(sk))
        );
    }

    #[test]
    fn a_remote_server_is_its_address_and_refusals_are_failures() {
        let mut h = Harness::new();
        let client = task(PID, "client");
        h.state(change(1, client, "10.1.2.3:443", 7, TCP_SYN_SENT), None);
        h.state(
            change(1, client, "10.1.2.3:443", TCP_SYN_SENT, TCP_ESTABLISHED),
            None,
        );
        let e = h.edge("client", "10.1.2.3:443");
        assert_eq!((e.established, e.open), (1, 1));
        for sk in 2..5 {
            h.state(change(sk, client, "127.0.0.1:1", 7, TCP_SYN_SENT), None);
            h.state(
                change(sk, client, "127.0.0.1:1", TCP_SYN_SENT, TCP_CLOSE),
                None,
            );
        }
        let e = h.edge("client", "127.0.0.1:1");
        assert_eq!((e.failed, e.established, e.open), (3, 0, 0));
        let failed = h
            .metrics
            .tcp_connections
            .with_label_values(&["client", "127.0.0.1:1", "failed"])
            .get();
        assert_eq!(failed, 3);
    }

    #[test]
    fn the_daemons_own_connections_and_unseen_connects_are_not_counted() {
        let mut h = Harness::new();
        h.state(
            change(1, task(7, "tracer"), "10.0.0.9:4317", 7, TCP_SYN_SENT),
            None,
        );
        h.state(
            change(
                1,
                task(7, "tracer"),
                "10.0.0.9:4317",
                TCP_SYN_SENT,
                TCP_ESTABLISHED,
            ),
            None,
        );
        // Up without its connect seen (before the daemon started, or the event lost).
        h.state(
            change(
                2,
                task(PID, "client"),
                "10.0.0.9:80",
                TCP_SYN_SENT,
                TCP_ESTABLISHED,
            ),
            None,
        );
        h.state(
            change(2, task(PID, "client"), "10.0.0.9:80", 4, TCP_CLOSE),
            None,
        );
        assert!(h.view().is_empty(), "{:?}", h.view());
    }

    #[test]
    fn reads_proc_net_tcp_lines() {
        let v4 = "   0: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        let s = proc_net_tcp_line(v4).expect("parsed");
        assert_eq!(s.tuple.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.tuple.remote, "127.0.0.1:50000".parse().unwrap());
        assert_eq!((s.state, s.inode), (PROC_ESTABLISHED, 123456));
        // ::1 and a v4-mapped address (taken as IPv4, as the events' are).
        let v6 = "   1: 00000000000000000000000001000000:1F90 0000000000000000FFFF00000100007F:C350 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 20 4 30 10 -1";
        let s = proc_net_tcp_line(v6).expect("parsed");
        assert_eq!(s.tuple.local, "[::1]:8080".parse().unwrap());
        assert_eq!(s.tuple.remote, "127.0.0.1:50000".parse().unwrap());
        assert_eq!((s.state, s.inode), (PROC_LISTEN, 777));
        assert!(proc_net_tcp_line("  sl  local_address rem_address   st").is_none());
    }

    #[test]
    fn a_connection_older_than_the_daemon_closes_by_its_addresses() {
        let mut h = Harness::new();
        let tuple = |local: &str| Tuple {
            local: local.parse().unwrap(),
            remote: "10.0.0.9:5432".parse().unwrap(),
        };
        h.tracker.scan_started();
        // Closed while the look ran: not taken in.
        let gone = change(9, task(PID, "app"), "10.0.0.9:5432", 1, TCP_FIN_WAIT1);
        let gone = Conn {
            tuple: tuple("10.0.0.1:41000"),
            ..gone
        };
        h.state(gone, None);
        let existing = |port: u16| Existing {
            tuple: tuple(&format!("10.0.0.1:{port}")),
            src: Arc::from("app"),
            dst: Arc::from("postgres"),
            inbound: false,
        };
        h.tracker.adopt(
            vec![existing(41000), existing(41001), existing(41002)],
            &h.edges,
            &h.metrics,
        );
        let e = h.edge("app", "postgres");
        assert_eq!((e.open, e.established), (2, 0));
        // This end's close, with its whole tuple.
        let fin = Conn {
            tuple: tuple("10.0.0.1:41001"),
            ..change(1, task(PID, "app"), "10.0.0.9:5432", 1, TCP_FIN_WAIT1)
        };
        h.state(fin, None);
        // A reset: the local port already released; the one left is found by its addresses.
        let reset = Conn {
            tuple: tuple("10.0.0.1:0"),
            ..change(2, task(PID, "app"), "10.0.0.9:5432", 1, TCP_CLOSE)
        };
        h.state(reset, None);
        let e = h.edge("app", "postgres");
        assert_eq!((e.open, e.closed), (0, 2));
    }

    #[test]
    fn data_bytes_leave_out_syn_and_fin() {
        let end = |passive, old_state, new_state, bytes_received, bytes_acked| {
            data_bytes(
                &Conn {
                    bytes_received,
                    bytes_acked,
                    ..change(1, task(PID, "app"), "10.0.0.9:80", old_state, new_state)
                },
                passive,
            )
        };
        let at = |old_state, new_state, bytes_received, bytes_acked| {
            end(false, old_state, new_state, bytes_received, bytes_acked)
        };
        // This end closes first: at FIN_WAIT1 only the SYN is in; at the close (from TIME_WAIT's
        // FIN_WAIT2) both FINs are.
        assert_eq!(at(TCP_ESTABLISHED, TCP_FIN_WAIT1, 5, 7), (6, 5));
        assert_eq!(at(TCP_FIN_WAIT2, TCP_CLOSE, 6, 8), (6, 5));
        // The peer closes first.
        assert_eq!(at(TCP_CLOSE_WAIT, TCP_LAST_ACK, 6, 7), (6, 5));
        assert_eq!(at(TCP_LAST_ACK, TCP_CLOSE, 6, 8), (6, 5));
        // Reset while open: no FIN either way.
        assert_eq!(at(TCP_ESTABLISHED, TCP_CLOSE, 5, 7), (6, 5));
        // Counters unknown (no BTF).
        assert_eq!(at(TCP_ESTABLISHED, TCP_CLOSE, 0, 0), (0, 0));
        // A server's end: its SYN is not counted (measured: a remote client's 4 connections).
        assert_eq!(end(true, TCP_LAST_ACK, TCP_CLOSE, 6, 7), (6, 5));
        assert_eq!(end(true, TCP_FIN_WAIT2, TCP_CLOSE, 6, 7), (6, 5));
        assert_eq!(end(true, TCP_ESTABLISHED, TCP_CLOSE, 5, 0), (0, 5));
    }
}
