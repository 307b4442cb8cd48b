//! Joins exchanges seen at either end of a connection into edges (client workload -> server
//! workload) and per-workload golden metrics, and feeds the request metrics.
//!
//! A request is counted once: by its server end when the server is on this host, else by its
//! client end. When both ends are here, the client's view only adds its own latency.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    time::Instant,
};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{
    conn::{Exchange, Peer, Side},
    metrics::Metrics,
    route,
};

/// Edges kept; requests on further edges are folded into `[other]` (and counted).
const MAX_EDGES: usize = 1024;
/// Routes kept per destination workload in the metrics; further ones become `[other]`.
const MAX_ROUTES_PER_DST: usize = 256;
/// Addresses and pids listed per edge.
const MAX_LISTED: usize = 16;
/// Seconds over which RPS is computed.
const RATE_WINDOW_S: usize = 60;
/// Histograms record microseconds, up to an hour, to 3 significant figures.
const HIST_MAX_US: u64 = 3_600_000_000;

pub const OTHER: &str = "[other]";

/// Requests per second over the last [`RATE_WINDOW_S`] seconds.
#[derive(Debug, Clone)]
struct RateWindow {
    slots: [u32; RATE_WINDOW_S],
    /// Second (since the aggregator started) that `slots[sec % N]` holds.
    secs: [u64; RATE_WINDOW_S],
}

impl RateWindow {
    fn new() -> Self {
        Self {
            slots: [0; RATE_WINDOW_S],
            secs: [u64::MAX; RATE_WINDOW_S],
        }
    }

    fn add(&mut self, sec: u64) {
        let i = (sec % RATE_WINDOW_S as u64) as usize;
        if self.secs[i] != sec {
            self.secs[i] = sec;
            self.slots[i] = 0;
        }
        self.slots[i] += 1;
    }

    /// Rate over the window ending at `now_sec`, over less time when the daemon is younger.
    fn rate(&self, now_sec: u64, elapsed_s: f64) -> f64 {
        let lo = now_sec.saturating_sub(RATE_WINDOW_S as u64 - 1);
        let n: u64 = self
            .secs
            .iter()
            .zip(self.slots.iter())
            .filter(|(s, _)| **s != u64::MAX && **s >= lo && **s <= now_sec)
            .map(|(_, c)| *c as u64)
            .sum();
        let span = elapsed_s.clamp(1.0, RATE_WINDOW_S as f64);
        n as f64 / span
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone)]
struct Golden {
    requests: u64,
    failures: u64,
    by_status: BTreeMap<u16, u64>,
    latency: Histogram<u64>,
    window: RateWindow,
}

impl Golden {
    fn new() -> Self {
        Self {
            requests: 0,
            failures: 0,
            by_status: BTreeMap::new(),
            latency: histogram(),
            window: RateWindow::new(),
        }
    }

    fn count(&mut self, status: u16, sec: u64) {
        self.requests += 1;
        if status >= 500 {
            self.failures += 1;
        }
        *self.by_status.entry(status).or_default() += 1;
        self.window.add(sec);
    }
}

struct Edge {
    golden: Golden,
    client_latency: Histogram<u64>,
    req_bytes: u64,
    resp_bytes: u64,
    dst_addrs: BTreeSet<SocketAddr>,
    src_pids: BTreeSet<u32>,
    dst_pids: BTreeSet<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EdgeKey {
    src: String,
    dst: String,
}

pub struct Aggregator {
    started: Instant,
    edges: HashMap<EdgeKey, Edge>,
    /// Inbound golden metrics per server workload.
    workloads: HashMap<String, Golden>,
    routes: HashMap<String, BTreeSet<String>>,
}

/// Latency quantiles in milliseconds.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct Quantiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Quantiles {
    fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        })
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct EdgeView {
    pub src: String,
    pub dst: String,
    pub dst_addrs: Vec<String>,
    pub src_pids: Vec<u32>,
    pub dst_pids: Vec<u32>,
    pub requests: u64,
    pub failures: u64,
    pub success_rate: f64,
    pub rps: f64,
    pub status_codes: BTreeMap<u16, u64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// As the server measured it (absent when the server is not on this host).
    pub server_latency: Option<Quantiles>,
    /// As the client measured it (absent when the client is not on this host).
    pub client_latency: Option<Quantiles>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WorkloadView {
    pub name: String,
    pub requests: u64,
    pub failures: u64,
    pub success_rate: f64,
    pub rps: f64,
    pub status_codes: BTreeMap<u16, u64>,
    pub latency: Option<Quantiles>,
}

fn success_rate(requests: u64, failures: u64) -> f64 {
    if requests == 0 {
        1.0
    } else {
        (requests - failures) as f64 / requests as f64
    }
}

/// Name of a workload on this host: its process name.
fn local_name(peer_comm: &str) -> String {
    if peer_comm.is_empty() {
        "[unknown]".to_owned()
    } else {
        peer_comm.to_owned()
    }
}

impl Aggregator {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            edges: HashMap::new(),
            workloads: HashMap::new(),
            routes: HashMap::new(),
        }
    }

    fn now_sec(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn route_for(&mut self, dst: &str, path: &str, metrics: &Metrics) -> String {
        let template = route::template(path);
        let routes = self.routes.entry(dst.to_owned()).or_default();
        if routes.contains(&template) {
            return template;
        }
        if routes.len() >= MAX_ROUTES_PER_DST {
            metrics.series_overflow.with_label_values(&["route"]).inc();
            return OTHER.to_owned();
        }
        routes.insert(template.clone());
        template
    }

    /// Takes one exchange and what is known of the process at the other end. `server_seen`:
    /// for a client's exchange, whether its server end (when on this host) saw the request too.
    pub fn record(
        &mut self,
        ex: &Exchange,
        peer: Option<Peer>,
        server_seen: bool,
        metrics: &Metrics,
    ) {
        let own = local_name(&ex.task.comm.as_str());
        let latency_us = (ex.end_ns.saturating_sub(ex.start_ns) / 1000).max(1);
        let (src, dst, counts) = match ex.side {
            Side::Server => {
                let src = match peer {
                    Some(p) => local_name(&p.task.comm.as_str()),
                    None => ex.tuple.remote.ip().to_string(),
                };
                (src, own, true)
            }
            Side::Client => match peer {
                // The server end is here and counts the request (unless it missed it: e.g. its
                // read began before the daemon started).
                Some(p) if p.side == Some(Side::Server) => {
                    (own, local_name(&p.task.comm.as_str()), !server_seen)
                }
                Some(p) => (own, local_name(&p.task.comm.as_str()), true),
                None => (own, ex.tuple.remote.to_string(), true),
            },
        };
        let sec = self.now_sec();
        let key = EdgeKey { src, dst };
        let key = if self.edges.contains_key(&key) || self.edges.len() < MAX_EDGES {
            key
        } else {
            metrics.series_overflow.with_label_values(&["edge"]).inc();
            EdgeKey {
                src: OTHER.to_owned(),
                dst: OTHER.to_owned(),
            }
        };
        let route = self.route_for(&key.dst, &ex.path, metrics);
        let status = ex.status.to_string();
        let labels = [
            key.src.as_str(),
            key.dst.as_str(),
            ex.method.as_str(),
            route.as_str(),
            status.as_str(),
        ];
        let seconds = latency_us as f64 / 1e6;
        metrics
            .latency
            .with_label_values(&[
                labels[0],
                labels[1],
                labels[2],
                labels[3],
                labels[4],
                ex.side.as_str(),
            ])
            .observe(seconds);
        if counts {
            metrics.requests.with_label_values(&labels).inc();
        }

        let edge = self.edges.entry(key.clone()).or_insert_with(|| Edge {
            golden: Golden::new(),
            client_latency: histogram(),
            req_bytes: 0,
            resp_bytes: 0,
            dst_addrs: BTreeSet::new(),
            src_pids: BTreeSet::new(),
            dst_pids: BTreeSet::new(),
        });
        let server_addr = match ex.side {
            Side::Server => ex.tuple.local,
            Side::Client => ex.tuple.remote,
        };
        if edge.dst_addrs.len() < MAX_LISTED {
            edge.dst_addrs.insert(server_addr);
        }
        let (src_pid, dst_pid) = match (ex.side, peer) {
            (Side::Server, p) => (p.map(|p| p.task.tgid), Some(ex.task.tgid)),
            (Side::Client, p) => (Some(ex.task.tgid), p.map(|p| p.task.tgid)),
        };
        for (set, pid) in [(&mut edge.src_pids, src_pid), (&mut edge.dst_pids, dst_pid)] {
            if let Some(pid) = pid
                && set.len() < MAX_LISTED
            {
                set.insert(pid);
            }
        }
        match ex.side {
            Side::Server => {
                let _ = edge.golden.latency.record(latency_us);
            }
            Side::Client => {
                let _ = edge.client_latency.record(latency_us);
            }
        }
        if counts {
            edge.golden.count(ex.status, sec);
            edge.req_bytes += ex.req_bytes;
            edge.resp_bytes += ex.resp_bytes;
            let w = self
                .workloads
                .entry(key.dst.clone())
                .or_insert_with(Golden::new);
            w.count(ex.status, sec);
            // Server-side latency when the server is here, else the client's.
            let _ = w.latency.record(latency_us);
        }
    }

    pub fn edges(&self) -> Vec<EdgeView> {
        let now = self.now_sec();
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut out: Vec<EdgeView> = self
            .edges
            .iter()
            .map(|(k, e)| EdgeView {
                src: k.src.clone(),
                dst: k.dst.clone(),
                dst_addrs: e.dst_addrs.iter().map(ToString::to_string).collect(),
                src_pids: e.src_pids.iter().copied().collect(),
                dst_pids: e.dst_pids.iter().copied().collect(),
                requests: e.golden.requests,
                failures: e.golden.failures,
                success_rate: success_rate(e.golden.requests, e.golden.failures),
                rps: e.golden.window.rate(now, elapsed),
                status_codes: e.golden.by_status.clone(),
                request_bytes: e.req_bytes,
                response_bytes: e.resp_bytes,
                server_latency: Quantiles::of(&e.golden.latency),
                client_latency: Quantiles::of(&e.client_latency),
            })
            .collect();
        out.sort_by(|a, b| (&a.src, &a.dst).cmp(&(&b.src, &b.dst)));
        out
    }

    pub fn workloads(&self) -> Vec<WorkloadView> {
        let now = self.now_sec();
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut out: Vec<WorkloadView> = self
            .workloads
            .iter()
            .map(|(name, g)| WorkloadView {
                name: name.clone(),
                requests: g.requests,
                failures: g.failures,
                success_rate: success_rate(g.requests, g.failures),
                rps: g.window.rate(now, elapsed),
                status_codes: g.by_status.clone(),
                latency: Quantiles::of(&g.latency),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

impl Default for Aggregator {
    fn default() -> Self {
        Self::new()
    }
}
