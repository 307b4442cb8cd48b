//! Joins exchanges seen at either end of a connection into edges (client workload -> server
//! workload) and per-workload golden metrics, and feeds the request metrics.
//!
//! A request is counted once: by its server end when the server is on this host, else by its
//! client end. When both ends are here, the client's view only adds its own latency.

// Hot-path tables: foldhash is several times cheaper per lookup than SipHash and still
// seeded per process.
use foldhash::{HashMap, HashSet};
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use hdrhistogram::Histogram as HdrHistogram;
use prometheus::{Histogram, IntCounter};
use serde::Serialize;

use crate::{
    conn::{Exchange, Peer, Side},
    http1::Method,
    metrics::Metrics,
    route,
    window::{Clock, Point, Window, WindowStats, Windowed},
    workload,
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

fn histogram() -> HdrHistogram<u64> {
    HdrHistogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone)]
struct Golden {
    requests: u64,
    failures: u64,
    by_status: BTreeMap<u16, u64>,
    latency: HdrHistogram<u64>,
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

    fn count(&mut self, status: u16, failed: bool, sec: u64) {
        self.requests += 1;
        if failed {
            self.failures += 1;
        }
        *self.by_status.entry(status).or_default() += 1;
        self.window.add(sec);
    }
}

/// Metric handles of one (edge, method, route, status) series, resolved once: label lookups
/// by string on every request cost more than the rest of the aggregation.
struct Series {
    requests: IntCounter,
    server: Histogram,
    client: Histogram,
}

struct Edge {
    golden: Golden,
    client_latency: HdrHistogram<u64>,
    req_bytes: u64,
    resp_bytes: u64,
    /// Requests seen as a TLS library's plaintext.
    tls_requests: u64,
    dst_addrs: BTreeSet<SocketAddr>,
    src_pids: BTreeSet<u32>,
    dst_pids: BTreeSet<u32>,
    /// By method, status, gRPC status (u32::MAX: none) and route.
    series: HashMap<(Method, u16, u32, RouteId), Series>,
    window: Windowed,
}

/// One route of a destination workload, over all its callers.
struct RouteStats {
    requests: u64,
    window: Windowed,
}

type NameId = u32;
type RouteId = u32;

/// Strings stored once and named by number, so that the per-request path allocates nothing
/// for names it has seen.
#[derive(Default)]
struct Interner {
    ids: HashMap<Arc<str>, u32>,
    /// Shared: a span takes its route without a copy.
    names: Vec<Arc<str>>,
}

impl Interner {
    fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    fn id(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.names.len() as u32;
        let name: Arc<str> = s.into();
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }

    fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }

    fn len(&self) -> usize {
        self.names.len()
    }

    /// Forgets the strings interned since there were `len`.
    fn truncate(&mut self, len: usize) {
        for name in self.names.drain(len.min(self.names.len())..) {
            self.ids.remove(&name);
        }
    }

    fn shared(&self, id: u32) -> &Arc<str> {
        &self.names[id as usize]
    }

    /// Whether strings nothing names any more (of `live` still named) are worth forgetting:
    /// over half of them, and a few thousand.
    fn bloated(&self, live: usize) -> bool {
        self.names.len() > 2 * live + COMPACT_SLACK
    }

    /// Keeps only the `live` strings, renumbered: old number -> new one.
    fn compact(&mut self, live: &HashSet<u32>) -> HashMap<u32, u32> {
        let old = std::mem::take(&mut self.names);
        self.ids.clear();
        let mut renumber = HashMap::default();
        for (i, name) in old.into_iter().enumerate() {
            if live.contains(&(i as u32)) {
                renumber.insert(i as u32, self.names.len() as u32);
                self.ids.insert(name.clone(), self.names.len() as u32);
                self.names.push(name);
            }
        }
        renumber
    }
}

/// Strings an interner may hold beyond twice those still named before it is compacted.
const COMPACT_SLACK: usize = 4096;

pub struct Aggregator {
    started: Instant,
    names: Interner,
    routes: Interner,
    edges: HashMap<(NameId, NameId), Edge>,
    /// Inbound golden metrics per server workload.
    workloads: HashMap<NameId, Golden>,
    /// Routes kept per destination.
    dst_routes: HashMap<NameId, HashSet<RouteId>>,
    routes_by_dst: HashMap<(NameId, RouteId, Method), RouteStats>,
    /// Wall-clock second the aggregator started (windows do not reach before it).
    started_unix: f64,
    /// Workload name of a process (by tgid and thread name), resolved once.
    workload_ids: HashMap<(u32, [u8; 16]), NameId>,
    /// Route of a path that templates to itself (no ids in it), per destination: looked up
    /// rather than templated again. Paths with ids are templated each time (they would only
    /// churn this). Starts over when a destination's routes expire or it is full.
    route_ids: HashMap<NameId, HashMap<Box<str>, RouteId>>,
    /// Where paths are templated, kept between requests.
    route_buf: String,
    /// Wall-clock slot and seconds since start, read once per batch of records (`tick`) rather
    /// than twice per record.
    now: Option<(u64, u64)>,
}

/// Request paths whose route is remembered, per destination.
const ROUTE_CACHE: usize = 4096;

/// Processes whose workload id is remembered; the cache starts over when full.
const WORKLOAD_CACHE: usize = 8192;

/// What a request was counted as.
pub struct Recorded<'a> {
    pub route: &'a Arc<str>,
    pub src: &'a str,
    pub dst: &'a str,
    /// Whether this end's exchange counted the request (else the other end does).
    pub counted: bool,
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
    fn of(h: &HdrHistogram<u64>) -> Option<Self> {
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
    #[serde(deserialize_with = "status_keys")]
    pub status_codes: BTreeMap<u16, u64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Requests seen over TLS (their plaintext taken at the TLS library).
    #[serde(default)]
    pub tls_requests: u64,
    /// As the server measured it (absent when the server is not on this host).
    pub server_latency: Option<Quantiles>,
    /// As the client measured it (absent when the client is not on this host).
    pub client_latency: Option<Quantiles>,
    /// Over the window asked for.
    pub window: WindowStats,
    pub history: Vec<Point>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WorkloadView {
    pub name: String,
    pub requests: u64,
    pub failures: u64,
    pub success_rate: f64,
    pub rps: f64,
    #[serde(deserialize_with = "status_keys")]
    pub status_codes: BTreeMap<u16, u64>,
    pub latency: Option<Quantiles>,
    /// Over the window asked for.
    pub window: WindowStats,
    pub history: Vec<Point>,
    /// TCP connections open to it now from processes on this host (as `linkerd viz stat`'s
    /// TCP_CONN), whatever they carry.
    #[serde(default)]
    pub tcp_open: u64,
}

/// A workload in the topology: what it served and what it called, over the window.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct NodeView {
    pub name: String,
    pub inbound: Option<WindowStats>,
    pub outbound: Option<WindowStats>,
    /// Of what it served.
    pub history: Vec<Point>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TopologyEdge {
    pub src: String,
    pub dst: String,
    pub window: WindowStats,
    pub requests: u64,
    pub dst_addrs: Vec<String>,
    pub history: Vec<Point>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RouteView {
    pub route: String,
    pub method: String,
    pub requests: u64,
    pub window: WindowStats,
    pub history: Vec<Point>,
}

/// Status-code keys read back from JSON strings: inside a flattened struct (`api::InWindow`)
/// serde hands map keys over as strings, which the plain `u16` key would refuse.
fn status_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u16, u64>, D::Error> {
    let raw: BTreeMap<String, u64> = serde::Deserialize::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| k.parse().map(|k| (k, v)).map_err(serde::de::Error::custom))
        .collect()
}

pub fn success_rate(requests: u64, failures: u64) -> f64 {
    if requests == 0 {
        1.0
    } else {
        (requests - failures) as f64 / requests as f64
    }
}

impl Aggregator {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            names: Interner::default(),
            routes: Interner::default(),
            edges: HashMap::default(),
            workloads: HashMap::default(),
            dst_routes: HashMap::default(),
            routes_by_dst: HashMap::default(),
            started_unix: Clock::now(0.0).now_s,
            workload_ids: HashMap::default(),
            route_ids: HashMap::default(),
            route_buf: String::new(),
            now: None,
        }
    }

    /// Reads the clock for the records that follow, until the next tick.
    pub fn tick(&mut self) {
        self.now = Some((self.clock().slot(), self.now_sec()));
    }

    /// The interned workload name of a process on this host, without the shared resolver's lock
    /// or a string hash once it is known.
    fn workload_id(&mut self, task: &crate::event::Task) -> NameId {
        let key = (task.tgid, task.comm.0);
        if let Some(&id) = self.workload_ids.get(&key) {
            return id;
        }
        let id = self.names.id(&workload::name(task));
        if self.workload_ids.len() >= WORKLOAD_CACHE {
            self.workload_ids.clear();
        }
        self.workload_ids.insert(key, id);
        id
    }

    /// A peer on another host, as `kube::peer_name` names it.
    fn remote_id(&mut self, ip: std::net::IpAddr, port: Option<u16>) -> NameId {
        self.names.id(&crate::kube::peer_name(ip, port))
    }

    /// The time to answer a query at.
    pub fn clock(&self) -> Clock {
        Clock::now(self.started_unix)
    }

    fn now_sec(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn route_for(&mut self, dst: NameId, path: &str, metrics: &Metrics) -> RouteId {
        if let Some(&id) = self.route_ids.get(&dst).and_then(|m| m.get(path)) {
            return id;
        }
        let mut template = std::mem::take(&mut self.route_buf);
        route::template_into(path, &mut template);
        let id = self.route_of(dst, &template, metrics);
        if template == path {
            let cache = self.route_ids.entry(dst).or_default();
            if cache.len() >= ROUTE_CACHE {
                cache.clear();
            }
            cache.insert(path.into(), id);
        }
        self.route_buf = template;
        id
    }

    fn route_of(&mut self, dst: NameId, template: &str, metrics: &Metrics) -> RouteId {
        let routes = self.dst_routes.entry(dst).or_default();
        if let Some(id) = self.routes.get(template)
            && routes.contains(&id)
        {
            return id;
        }
        // Interned only when kept: a template past the limit (a path segment of unbounded
        // values that is not recognised as an id) would otherwise be kept for good.
        if routes.len() >= MAX_ROUTES_PER_DST {
            metrics.series_overflow.with_label_values(&["route"]).inc();
            return self.routes.id(OTHER);
        }
        let id = self.routes.id(template);
        routes.insert(id);
        id
    }

    /// Takes one exchange and what is known of the process at the other end. `server_seen`:
    /// for a client's exchange, whether its server end (when on this host) saw the request too.
    /// Returns the route the request was counted under.
    pub fn record(
        &mut self,
        ex: &Exchange,
        peer: Option<Peer>,
        server_seen: bool,
        metrics: &Metrics,
    ) -> Recorded<'_> {
        let latency_us = (ex.end_ns.saturating_sub(ex.start_ns) / 1000).max(1);
        let own = self.workload_id(&ex.task);
        let peer_name = peer.map(|p| self.workload_id(&p.task));
        // Names made below (peer addresses) are forgotten if the request goes to `[other]`.
        let named = self.names.len();
        let (src, dst, counts) = match (ex.side, peer, peer_name) {
            (Side::Server, _, Some(src)) => (src, own, true),
            (Side::Server, _, None) => (self.remote_id(ex.tuple.remote.ip(), None), own, true),
            // The server end is here and counts the request (unless it missed it: e.g. its
            // read began before the daemon started).
            (Side::Client, Some(p), Some(dst)) if p.side == Some(Side::Server) => {
                (own, dst, !server_seen)
            }
            (Side::Client, _, Some(dst)) => (own, dst, true),
            (Side::Client, _, None) => (
                own,
                self.remote_id(ex.tuple.remote.ip(), Some(ex.tuple.remote.port())),
                true,
            ),
        };
        let (slot, sec) = self
            .now
            .unwrap_or_else(|| (self.clock().slot(), self.now_sec()));
        let key = if self.edges.contains_key(&(src, dst)) || self.edges.len() < MAX_EDGES {
            (src, dst)
        } else {
            metrics.series_overflow.with_label_values(&["edge"]).inc();
            self.names.truncate(named);
            let other = self.names.id(OTHER);
            (other, other)
        };
        let route = self.route_for(key.1, &ex.path, metrics);
        let edge = self.edges.entry(key).or_insert_with(|| Edge {
            golden: Golden::new(),
            client_latency: histogram(),
            req_bytes: 0,
            tls_requests: 0,
            resp_bytes: 0,
            dst_addrs: BTreeSet::new(),
            src_pids: BTreeSet::new(),
            dst_pids: BTreeSet::new(),
            series: HashMap::default(),
            window: Windowed::new(),
        });
        let grpc = ex.grpc_status.unwrap_or(u32::MAX);
        let series = edge
            .series
            .entry((ex.method, ex.status, grpc, route))
            .or_insert_with(|| {
                let status = ex.status.to_string();
                let grpc = ex.grpc_status.map(|g| g.to_string()).unwrap_or_default();
                let labels = [
                    self.names.name(key.0),
                    self.names.name(key.1),
                    ex.method.as_str(),
                    self.routes.name(route),
                    status.as_str(),
                    grpc.as_str(),
                ];
                let latency = |observer: &str| {
                    let mut l = labels.to_vec();
                    l.push(observer);
                    metrics.latency.with_label_values(&l)
                };
                Series {
                    requests: metrics.requests.with_label_values(&labels),
                    server: latency("server"),
                    client: latency("client"),
                }
            });
        let seconds = latency_us as f64 / 1e6;
        match ex.side {
            Side::Server => series.server.observe(seconds),
            Side::Client => series.client.observe(seconds),
        }
        if counts {
            series.requests.inc();
        }
        // A client end that does not count the request has its server end here, which lists
        // the same address and processes.
        if counts {
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
            let failed = ex.failed();
            edge.window.record(slot, failed, Some(latency_us));
            let r = self
                .routes_by_dst
                .entry((key.1, route, ex.method))
                .or_insert_with(|| RouteStats {
                    requests: 0,
                    window: Windowed::new(),
                });
            r.requests += 1;
            r.window.record(slot, failed, Some(latency_us));
            edge.golden.count(ex.status, failed, sec);
            edge.req_bytes += ex.req_bytes;
            edge.resp_bytes += ex.resp_bytes;
            edge.tls_requests += u64::from(ex.tls);
            let w = self.workloads.entry(key.1).or_insert_with(Golden::new);
            w.count(ex.status, failed, sec);
            // Server-side latency when the server is here, else the client's.
            let _ = w.latency.record(latency_us);
        }
        Recorded {
            route: self.routes.shared(route),
            src: self.names.name(key.0),
            dst: self.names.name(key.1),
            counted: counts,
        }
    }

    /// Forgets edges and routes idle for the whole history (10 minutes), with their metric
    /// series, so that a burst of one-off names or paths does not stay forever.
    pub fn expire(&mut self, metrics: &Metrics) {
        let clock = self.clock();
        let (names, routes) = (&self.names, &self.routes);
        self.edges.retain(|(src, dst), e| {
            if !e.window.idle(&clock) {
                return true;
            }
            for ((method, status, grpc, route), _) in e.series.drain() {
                let status = status.to_string();
                let grpc = if grpc == u32::MAX {
                    String::new()
                } else {
                    grpc.to_string()
                };
                let labels = [
                    names.name(*src),
                    names.name(*dst),
                    method.as_str(),
                    routes.name(route),
                    status.as_str(),
                    grpc.as_str(),
                ];
                let _ = metrics.requests.remove_label_values(&labels);
                for observer in ["server", "client"] {
                    let mut l = labels.to_vec();
                    l.push(observer);
                    let _ = metrics.latency.remove_label_values(&l);
                }
            }
            metrics.series_expired.with_label_values(&["edge"]).inc();
            false
        });
        let route_ids = &mut self.route_ids;
        self.routes_by_dst.retain(|(dst, _, _), r| {
            if !r.window.idle(&clock) {
                return true;
            }
            // Its paths may map to this route, or to the overflow route it made room in.
            route_ids.remove(dst);
            metrics.series_expired.with_label_values(&["route"]).inc();
            false
        });
        // The routes a destination keeps are those with a series left (under any method), and
        // a destination with none is forgotten.
        let mut kept: HashMap<NameId, HashSet<RouteId>> = HashMap::default();
        for &(dst, route, _) in self.routes_by_dst.keys() {
            kept.entry(dst).or_default().insert(route);
        }
        self.dst_routes = kept;
        let edges = &self.edges;
        self.workloads
            .retain(|w, _| edges.keys().any(|(_, dst)| dst == w));
        self.compact();
    }

    /// Forgets names and routes nothing refers to any more (expired, or named only by traffic
    /// that went to an `[other]` series), renumbering what refers to the rest: without it,
    /// every peer address and route template ever seen would stay.
    fn compact(&mut self) {
        let mut names: HashSet<NameId> = HashSet::default();
        let mut routes: HashSet<RouteId> = HashSet::default();
        for (&(src, dst), e) in &self.edges {
            names.extend([src, dst]);
            routes.extend(e.series.keys().map(|k| k.3));
        }
        names.extend(self.workloads.keys().copied());
        for (&dst, set) in &self.dst_routes {
            names.insert(dst);
            routes.extend(set.iter().copied());
        }
        for &(dst, route, _) in self.routes_by_dst.keys() {
            names.insert(dst);
            routes.insert(route);
        }
        if self.names.bloated(names.len()) {
            let n = self.names.compact(&names);
            let n = |id: &NameId| n[id];
            self.edges = std::mem::take(&mut self.edges)
                .into_iter()
                .map(|((src, dst), e)| ((n(&src), n(&dst)), e))
                .collect();
            self.workloads = std::mem::take(&mut self.workloads)
                .into_iter()
                .map(|(w, g)| (n(&w), g))
                .collect();
            self.dst_routes = std::mem::take(&mut self.dst_routes)
                .into_iter()
                .map(|(dst, set)| (n(&dst), set))
                .collect();
            self.routes_by_dst = std::mem::take(&mut self.routes_by_dst)
                .into_iter()
                .map(|((dst, route, method), r)| ((n(&dst), route, method), r))
                .collect();
            // Caches of names by number: made again as traffic comes.
            self.workload_ids.clear();
            self.route_ids.clear();
        }
        if self.routes.bloated(routes.len()) {
            let r = self.routes.compact(&routes);
            let r = |id: &RouteId| r[id];
            for e in self.edges.values_mut() {
                e.series = std::mem::take(&mut e.series)
                    .into_iter()
                    .map(|((method, status, grpc, route), s)| {
                        ((method, status, grpc, r(&route)), s)
                    })
                    .collect();
            }
            for set in self.dst_routes.values_mut() {
                *set = set.iter().map(r).collect();
            }
            self.routes_by_dst = std::mem::take(&mut self.routes_by_dst)
                .into_iter()
                .map(|((dst, route, method), s)| ((dst, r(&route), method), s))
                .collect();
            self.route_ids.clear();
        }
    }

    /// Sum of the windows of the edges into (`inbound`) or out of a workload.
    fn sum_edges(&self, name: NameId, inbound: bool) -> Option<Windowed> {
        let mut sum: Option<Windowed> = None;
        for ((src, dst), e) in &self.edges {
            if (if inbound { *dst } else { *src }) == name {
                sum.get_or_insert_with(Windowed::new).add(&e.window);
            }
        }
        sum
    }

    pub fn topology(&self, w: Window) -> (Vec<NodeView>, Vec<TopologyEdge>) {
        let clock = self.clock();
        let mut ids: BTreeSet<(&str, NameId)> = BTreeSet::new();
        for (src, dst) in self.edges.keys() {
            ids.insert((self.names.name(*src), *src));
            ids.insert((self.names.name(*dst), *dst));
        }
        let nodes = ids
            .into_iter()
            .map(|(name, id)| {
                let inbound = self.sum_edges(id, true);
                NodeView {
                    name: name.to_owned(),
                    history: inbound
                        .as_ref()
                        .map_or_else(Vec::new, |i| i.history(&clock)),
                    inbound: inbound.map(|i| i.stats(&clock, w)),
                    outbound: self.sum_edges(id, false).map(|o| o.stats(&clock, w)),
                }
            })
            .collect();
        let mut edges: Vec<TopologyEdge> = self
            .edges
            .iter()
            .map(|((src, dst), e)| TopologyEdge {
                src: self.names.name(*src).to_owned(),
                dst: self.names.name(*dst).to_owned(),
                window: e.window.stats(&clock, w),
                requests: e.golden.requests,
                dst_addrs: e.dst_addrs.iter().map(ToString::to_string).collect(),
                history: e.window.history(&clock),
            })
            .collect();
        edges.sort_by(|a, b| (&a.src, &a.dst).cmp(&(&b.src, &b.dst)));
        (nodes, edges)
    }

    /// The routes of a server workload, or None when no request to it was seen.
    pub fn routes(&self, workload: &str, w: Window) -> Option<Vec<RouteView>> {
        let id = *self.names.ids.get(workload)?;
        if !self.edges.keys().any(|(_, dst)| *dst == id) {
            return None;
        }
        let clock = self.clock();
        let mut out: Vec<RouteView> = self
            .routes_by_dst
            .iter()
            .filter(|((dst, _, _), _)| *dst == id)
            .map(|((_, route, method), r)| RouteView {
                route: self.routes.name(*route).to_owned(),
                method: method.as_str().to_owned(),
                requests: r.requests,
                window: r.window.stats(&clock, w),
                history: r.window.history(&clock),
            })
            .collect();
        out.sort_by(|a, b| (&a.route, &a.method).cmp(&(&b.route, &b.method)));
        Some(out)
    }

    pub fn edges(&self, w: Window) -> Vec<EdgeView> {
        let clock = self.clock();
        let now = self.now_sec();
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut out: Vec<EdgeView> = self
            .edges
            .iter()
            .map(|((src, dst), e)| EdgeView {
                src: self.names.name(*src).to_owned(),
                dst: self.names.name(*dst).to_owned(),
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
                tls_requests: e.tls_requests,
                server_latency: Quantiles::of(&e.golden.latency),
                client_latency: Quantiles::of(&e.client_latency),
                window: e.window.stats(&clock, w),
                history: e.window.history(&clock),
            })
            .collect();
        out.sort_by(|a, b| (&a.src, &a.dst).cmp(&(&b.src, &b.dst)));
        out
    }

    pub fn workloads(&self, w: Window) -> Vec<WorkloadView> {
        let clock = self.clock();
        let now = self.now_sec();
        let elapsed = self.started.elapsed().as_secs_f64();
        let mut out: Vec<WorkloadView> = self
            .workloads
            .iter()
            .map(|(name, g)| {
                let inbound = self.sum_edges(*name, true).unwrap_or_default();
                WorkloadView {
                    name: self.names.name(*name).to_owned(),
                    requests: g.requests,
                    failures: g.failures,
                    success_rate: success_rate(g.requests, g.failures),
                    rps: g.window.rate(now, elapsed),
                    status_codes: g.by_status.clone(),
                    latency: Quantiles::of(&g.latency),
                    window: inbound.stats(&clock, w),
                    history: inbound.history(&clock),
                    tcp_open: 0,
                }
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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use super::*;
    use crate::{
        conn::{Exchange, Side},
        event::{Comm, Task, Tuple},
        http1::{Method, Path},
    };

    /// A request served by `nginx` from the client at `client`, for `path`.
    fn served(client: u32, path: &str) -> Exchange {
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"nginx");
        Exchange {
            side: Side::Server,
            task: Task {
                // No such process (pid_max is at most 2^22): named by its comm.
                tgid: 0x7fff_0010,
                tid: 10,
                comm: Comm(comm),
                cgroup_id: 0,
            },
            tuple: Tuple {
                local: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80),
                remote: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + client)), 40000),
            },
            peer_sk: 0,
            method: Method::Get,
            path: Path::new(path),
            status: 200,
            grpc_status: None,
            start_ns: 1_000,
            end_ns: 2_000_000,
            req_bytes: 100,
            resp_bytes: 100,
            span: None,
            unsure: false,
            tls: false,
        }
    }

    /// Paths whose segments are words (not ids) from many remote clients: past the limits they
    /// go to `[other]`, and neither the route templates nor the peers' names are kept.
    #[test]
    fn names_and_routes_past_the_limits_are_not_kept() {
        let metrics = Metrics::new();
        let mut agg = Aggregator::new();
        let word = |mut i: u32| {
            let mut w = String::new();
            while i > 0 || w.is_empty() {
                w.push((b'a' + (i % 26) as u8) as char);
                i /= 26;
            }
            w
        };
        for i in 0..20_000 {
            agg.record(&served(i, &format!("/p/{}", word(i))), None, true, &metrics);
        }
        // Per destination (nginx, and the `[other]` edge's), then `[other]` itself.
        assert_eq!(agg.routes.names.len(), 2 * MAX_ROUTES_PER_DST + 1);
        assert_eq!(agg.edges.len(), MAX_EDGES + 1, "kept + [other]");
        // Client addresses that went to the `[other]` edge are not kept.
        assert!(agg.names.len() <= MAX_EDGES + 2, "{}", agg.names.len());
        let before = agg.edges(Window::M1).len();
        agg.expire(&metrics);
        assert_eq!(agg.edges(Window::M1).len(), before);
        let other = agg.edges.get(&(agg.names.id(OTHER), agg.names.id(OTHER)));
        assert_eq!(
            other.map(|e| e.golden.requests),
            Some(20_000 - MAX_EDGES as u64)
        );
        // And it keeps counting under the renumbered names and routes.
        agg.record(&served(0, "/p/a"), None, true, &metrics);
        let first = agg.names.get("11.0.0.0").expect("first client kept");
        let nginx = agg.names.get("nginx").expect("server kept");
        assert_eq!(agg.edges[&(first, nginx)].golden.requests, 2);
        // Clients of remote servers at ever new addresses: each destination is forgotten with
        // its edge.
        let mut client = served(0, "/");
        client.side = Side::Client;
        for i in 0..10_000u16 {
            client.tuple.remote.set_port(1000 + i);
            agg.record(&client, None, true, &metrics);
        }
        assert_eq!(agg.names.len(), MAX_EDGES + 2);
        for e in agg.edges.values_mut() {
            e.window = Windowed::new();
        }
        for r in agg.routes_by_dst.values_mut() {
            r.window = Windowed::new();
        }
        agg.expire(&metrics);
        assert!(agg.edges.is_empty() && agg.dst_routes.is_empty());
    }

    /// Peers come and go: the names and routes of those whose edges expired are forgotten,
    /// and what stays is renumbered without losing its counts.
    #[test]
    fn expired_names_are_forgotten_and_the_rest_renumbered() {
        let metrics = Metrics::new();
        let mut agg = Aggregator::new();
        // One client stays throughout; a thousand others come for one round each.
        let keeper = served(500_000, "/keep");
        for round in 0..8u32 {
            agg.record(&keeper, None, true, &metrics);
            for i in 0..1000 {
                let path = format!("/r{round}/x");
                agg.record(&served(round * 1000 + i, &path), None, true, &metrics);
            }
            let kept = agg.names.get("11.7.161.32").expect("keeper named");
            let keep = agg.routes.get("/keep").expect("keeper's route");
            for (&(src, _), e) in agg.edges.iter_mut() {
                if src != kept {
                    e.window = Windowed::new();
                }
            }
            for (&(_, route, _), r) in agg.routes_by_dst.iter_mut() {
                if route != keep {
                    r.window = Windowed::new();
                }
            }
            agg.expire(&metrics);
        }
        // Compacted (more than once): far fewer names than the 8000 clients seen.
        assert!(agg.names.len() < 4100, "{}", agg.names.len());
        assert!(agg.routes.len() < 10, "{}", agg.routes.len());
        let client = agg.names.get("11.7.161.32").expect("keeper kept");
        let nginx = agg.names.get("nginx").expect("server kept");
        let route = agg.routes.get("/keep").expect("route kept");
        let edge = &agg.edges[&(client, nginx)];
        assert_eq!(edge.golden.requests, 8);
        assert!(edge.series.keys().all(|k| k.3 == route));
        assert_eq!(agg.dst_routes[&nginx].iter().collect::<Vec<_>>(), [&route]);
        agg.record(&keeper, None, true, &metrics);
        assert_eq!(agg.edges[&(client, nginx)].golden.requests, 9);
    }
}
