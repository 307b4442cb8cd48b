//! TCP connections between workloads, whatever they carry (a database, a cache, a queue, TLS
//! that is not followed): every connect a process on this host makes, from the kernel's state
//! changes (`inet_sock_set_state`, which the data path uses anyway): established, failed
//! (closed before it was up: refused, timed out, unreachable), closed, and open now. As
//! `linkerd viz stat` shows TCP connections beside requests, and the topology then holds the
//! dependencies HTTP does not show. The connecting end is the one known (a connect runs in its
//! process); the server is named as its workload when its end is on this host (from its own
//! events), else by address.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus::{IntCounter, IntGauge};
use serde::Serialize;
use tracer_common::{TCP_CLOSE, TCP_ESTABLISHED, TCP_SYN_SENT};

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
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
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
}

struct Edge {
    established: u64,
    failed: u64,
    closed: u64,
    open: u64,
    addrs: BTreeSet<String>,
    changed: Instant,
    established_total: IntCounter,
    failed_total: IntCounter,
    open_now: IntGauge,
}

/// The edges, shared with the API.
#[derive(Default)]
pub struct TcpEdges {
    edges: BTreeMap<(Arc<str>, Arc<str>), Edge>,
}

impl TcpEdges {
    fn edge(&mut self, src: &Arc<str>, dst: &Arc<str>, metrics: &Metrics) -> &mut Edge {
        let key = if self.edges.contains_key(&(src.clone(), dst.clone()))
            || self.edges.len() < MAX_EDGES
        {
            (src.clone(), dst.clone())
        } else {
            metrics
                .series_overflow
                .with_label_values(&["tcp_edge"])
                .inc();
            (Arc::from(OTHER), Arc::from(OTHER))
        };
        self.edges.entry(key).or_insert_with_key(|(src, dst)| {
            let outcome = |o: &str| metrics.tcp_connections.with_label_values(&[src, dst, o]);
            Edge {
                established: 0,
                failed: 0,
                closed: 0,
                open: 0,
                addrs: BTreeSet::new(),
                changed: Instant::now(),
                established_total: outcome("established"),
                failed_total: outcome("failed"),
                open_now: metrics.tcp_open.with_label_values(&[src, dst]),
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
            }
            keep
        });
    }

    pub fn view(&self) -> Vec<TcpEdgeView> {
        self.edges
            .iter()
            .map(|((src, dst), e)| TcpEdgeView {
                src: src.to_string(),
                dst: dst.to_string(),
                dst_addrs: e.addrs.iter().cloned().collect(),
                established: e.established,
                failed: e.failed,
                closed: e.closed,
                open: e.open,
            })
            .collect()
    }
}

/// A connection followed from its connect: who made it, and once known, the server's name.
struct Open {
    src: Arc<str>,
    remote: std::net::SocketAddr,
    tuple: Tuple,
    /// Once counted as established on its edge.
    dst: Option<Arc<str>>,
    at: Instant,
}

/// Follows connects from the kernel's state changes (in the pipeline's thread).
#[derive(Default)]
pub struct TcpTracker {
    /// Connects not yet up, since when: one whose outcome was lost (ring buffer full) is
    /// forgotten after [`CONNECT_WAIT`].
    connecting: HashMap<u64, (Task, Instant)>,
    open: HashMap<u64, Open>,
    /// Connections to this host whose server is not named yet, oldest first.
    unnamed: VecDeque<u64>,
    last_expire: Option<Instant>,
}

impl TcpTracker {
    /// One state change. `peer` finds the other end of a connection on this host.
    pub fn on_state(
        &mut self,
        c: &Conn,
        own_pid: u32,
        edges: &mut TcpEdges,
        metrics: &Metrics,
        peer: impl Fn(&Tuple) -> Option<Peer>,
    ) {
        match (c.old_state, c.new_state) {
            (_, TCP_SYN_SENT) => {
                // The daemon's own connections (span export) are not the host's traffic.
                if c.task.tgid == own_pid || c.task.comm.0[0] == 0 {
                    return;
                }
                if self.connecting.len() >= MAX_CONNS && !self.connecting.contains_key(&c.sk) {
                    metrics
                        .series_overflow
                        .with_label_values(&["tcp_connection"])
                        .inc();
                    return;
                }
                self.connecting.insert(c.sk, (c.task, Instant::now()));
            }
            (TCP_SYN_SENT, TCP_ESTABLISHED) => {
                let Some((task, _)) = self.connecting.remove(&c.sk) else {
                    return;
                };
                if self.open.len() >= MAX_CONNS {
                    metrics
                        .series_overflow
                        .with_label_values(&["tcp_connection"])
                        .inc();
                    return;
                }
                let mut open = Open {
                    src: workload::name(&task),
                    remote: c.tuple.remote,
                    tuple: c.tuple,
                    dst: None,
                    at: Instant::now(),
                };
                if !to_this_host(&c.tuple) {
                    let dst: Arc<str> = Arc::from(c.tuple.remote.to_string());
                    established(&mut open, dst, edges, metrics);
                } else {
                    self.unnamed.push_back(c.sk);
                }
                // A socket address reused before its close was seen: the old one is gone.
                if let Some(old) = self.open.insert(c.sk, open) {
                    closed(old, edges, metrics, &peer);
                }
            }
            (TCP_SYN_SENT, TCP_CLOSE) => {
                let Some((task, _)) = self.connecting.remove(&c.sk) else {
                    return;
                };
                let src = workload::name(&task);
                let dst: Arc<str> = Arc::from(c.tuple.remote.to_string());
                let e = edges.edge(&src, &dst, metrics);
                e.failed += 1;
                e.failed_total.inc();
                note_addr(e, &c.tuple);
            }
            (_, TCP_CLOSE) => {
                self.connecting.remove(&c.sk);
                if let Some(open) = self.open.remove(&c.sk) {
                    closed(open, edges, metrics, &peer);
                }
            }
            _ => {}
        }
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
        edges: &mut TcpEdges,
        metrics: &Metrics,
        peer: impl Fn(&Tuple) -> Option<Peer>,
    ) {
        let now = Instant::now();
        let mut waiting = VecDeque::new();
        while let Some(sk) = self.unnamed.pop_front() {
            let Some(open) = self.open.get_mut(&sk).filter(|o| o.dst.is_none()) else {
                continue;
            };
            match peer(&open.tuple) {
                Some(p) => established(open, workload::name(&p.task), edges, metrics),
                None if now.duration_since(open.at) >= NAME_WAIT => {
                    let dst: Arc<str> = Arc::from(open.remote.to_string());
                    established(open, dst, edges, metrics);
                }
                None => waiting.push_back(sk),
            }
        }
        self.unnamed = waiting;
        if self
            .last_expire
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            self.last_expire = Some(now);
            self.connecting
                .retain(|_, (_, at)| now.duration_since(*at) < CONNECT_WAIT);
            edges.expire(now, metrics);
        }
    }
}

/// Whether a connection's server may be on this host (loopback, or this host's own address).
fn to_this_host(t: &Tuple) -> bool {
    t.remote.ip().is_loopback() || t.remote.ip() == t.local.ip()
}

fn note_addr(e: &mut Edge, t: &Tuple) {
    e.changed = Instant::now();
    if e.addrs.len() < MAX_ADDRS {
        e.addrs.insert(t.remote.to_string());
    }
}

/// Counts a connection as established on its edge, now that its server has a name.
fn established(open: &mut Open, dst: Arc<str>, edges: &mut TcpEdges, metrics: &Metrics) {
    let e = edges.edge(&open.src, &dst, metrics);
    e.established += 1;
    e.established_total.inc();
    e.open += 1;
    e.open_now.inc();
    note_addr(e, &open.tuple);
    open.dst = Some(dst);
}

/// A connection's close: named first if it was not yet (its server end may have closed
/// already, and is still found among the recently closed).
fn closed(
    mut open: Open,
    edges: &mut TcpEdges,
    metrics: &Metrics,
    peer: &impl Fn(&Tuple) -> Option<Peer>,
) {
    if open.dst.is_none() {
        let dst = match peer(&open.tuple) {
            Some(p) => workload::name(&p.task),
            None => Arc::from(open.remote.to_string()),
        };
        established(&mut open, dst, edges, metrics);
    }
    let Some(dst) = open.dst else { return };
    let e = edges.edge(&open.src, &dst, metrics);
    e.closed += 1;
    e.open = e.open.saturating_sub(1);
    e.open_now.set(e.open as i64);
    e.changed = Instant::now();
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
        }
    }

    struct Harness {
        tracker: TcpTracker,
        edges: TcpEdges,
        metrics: Metrics,
    }

    impl Harness {
        fn new() -> Self {
            Self {
                tracker: TcpTracker::default(),
                edges: TcpEdges::default(),
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
                .on_state(&c, 7, &mut self.edges, &self.metrics, peer);
        }

        fn edge(&self, src: &str, dst: &str) -> TcpEdgeView {
            self.edges
                .view()
                .into_iter()
                .find(|e| e.src == src && e.dst == dst)
                .unwrap_or_else(|| panic!("no edge {src} -> {dst}: {:?}", self.edges.view()))
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
        assert!(h.edges.view().is_empty());
        h.tracker.tick(&mut h.edges, &h.metrics, |_: &Tuple| {
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
        assert!(h.edges.view().is_empty(), "{:?}", h.edges.view());
    }
}
