//! Wires the stages of `tracer run`: ring buffer -> decode -> connection table and pairing ->
//! edges and metrics -> API. One reader task owns the capture state; the API reads snapshots.

use std::{
    collections::{HashSet, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    net::TcpListener,
    signal::unix::SignalKind,
    sync::mpsc::{self, error::TrySendError},
};
use tokio_util::sync::CancellationToken;

use tracer_common::{KernelStat, TCP_SYN_SENT};

use crate::{
    api,
    capture::{AttachMode, Capture, Requests},
    conn::{ConnTable, Exchange, MAX_CONNS, Side},
    edges::Aggregator,
    event::{self, Event, Tuple},
    metrics::Metrics,
    otlp::{self, ServiceNames},
    parts::{Joiner, Part},
    reorder::{Reorder, StreamKey},
    ring::{Rings, Waiter, Woken},
    spans::{self, GoProcesses, LinkStats, Linker, Sampler, Span},
    tap,
    tcp::{self, TcpEdges, TcpTracker},
    threads::{self, Threads},
    workload,
};

/// How often finished spans are looked at for export: often, so that few are held at a time
/// and those still in the CPU's caches (at 120k req/s, every 50 ms held ~12k spans and the
/// daemon took 1.9-2.1 us of CPU per request; every 5 ms, 1.5-1.65 us).
const SPAN_DRAIN: Duration = Duration::from_millis(5);
/// How often idle edges and routes are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);
/// How often server ends' losses waiting for their client ends (`ledger`) are looked at.
const LOSSES_EVERY: Duration = Duration::from_millis(250);
/// Spans kept for `/api/spans` and `tracer spans`.
const RECENT_SPANS: usize = 1024;

/// Where finished spans go: the recent list for the API, and the OTLP queue when configured.
pub struct SpanSink {
    pub recent: Mutex<VecDeque<Box<Span>>>,
    pub names: ServiceNames,
    tx: Option<mpsc::Sender<Span>>,
    reported: Mutex<LinkStats>,
}

impl SpanSink {
    /// Spans that fall off the recent list go back to the linker for new spans.
    #[allow(clippy::vec_box, reason = "boxes are recycled into new spans")]
    fn publish(&self, ready: &mut Vec<Box<Span>>, linker: &mut Linker, metrics: &Metrics) {
        let stats = linker.stats;
        {
            let mut last = self.reported.lock().unwrap_or_else(|p| p.into_inner());
            for (outcome, now, before) in [
                ("not_recorded", stats.not_recorded, last.not_recorded),
                ("unfinished", stats.unfinished, last.unfinished),
                ("late_link", stats.late_links, last.late_links),
            ] {
                if now > before {
                    metrics
                        .spans
                        .with_label_values(&[outcome])
                        .inc_by(now - before);
                }
            }
            *last = stats;
        }
        if ready.is_empty() {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for span in ready.drain(..) {
            if !span.sampled {
                metrics.spans.with_label_values(&["unsampled"]).inc();
            } else if let Some(tx) = &self.tx {
                match tx.try_send(Span::clone(&span)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_) | TrySendError::Closed(_)) => {
                        metrics
                            .spans
                            .with_label_values(&["dropped_queue_full"])
                            .inc();
                    }
                }
            }
            if recent.len() >= RECENT_SPANS
                && let Some(old) = recent.pop_front()
            {
                linker.recycle(old);
            }
            recent.push_back(span);
        }
    }
}

/// What the API serves from.
pub struct Shared {
    pub metrics: Metrics,
    pub aggregator: Mutex<Aggregator>,
    pub started: Instant,
    pub programs: usize,
    pub sampler: Sampler,
    pub spans_out: SpanSink,
    pub tap: tap::Sender,
    /// How the syscall probes attached.
    pub attach: &'static str,
    /// Whether spans are built (off with `--no-spans`).
    pub spans: bool,
    /// TCP connections between workloads, whatever they carry.
    pub tcp: Mutex<TcpEdges>,
    /// The Go programs among the host's processes (their requests are run by goroutines).
    pub go_procs: GoProcs,
    /// Processes that just began running a new program, from the reader to the TLS look.
    pub execs: Execs,
}

/// Pids of processes that began running a new program (`EventKind::Exec`), handed from the
/// reader to the task that hooks TLS: at most MAX_EXECS waiting (past that, an exec storm, the
/// next look at new processes finds the rest).
#[derive(Default)]
pub struct Execs {
    pids: Mutex<Vec<u32>>,
    ready: tokio::sync::Notify,
}

const MAX_EXECS: usize = 256;

impl Execs {
    fn push(&self, pid: u32) {
        let mut pids = self.pids.lock().unwrap_or_else(|p| p.into_inner());
        if pids.len() < MAX_EXECS {
            pids.push(pid);
            self.ready.notify_one();
        }
    }

    fn take(&self, into: &mut Vec<u32>) {
        into.clear();
        into.append(&mut self.pids.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// The Go programs among the host's processes as the TLS look last found them, handed from
/// that task to the reader, which looks at `version` once per drain.
#[derive(Default)]
pub struct GoProcs {
    version: AtomicU64,
    set: Mutex<Arc<GoProcesses>>,
}

impl GoProcs {
    pub fn publish(&self, set: HashSet<u32>) {
        *self.set.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(set.into_iter().collect());
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The set, if its version is not `seen` (which becomes the current one).
    fn changed(&self, seen: &mut u64) -> Option<Arc<GoProcesses>> {
        let v = self.version.load(Ordering::Acquire);
        if v == *seen {
            return None;
        }
        *seen = v;
        Some(self.set.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

impl Shared {
    /// The aggregator, even if a panicking holder poisoned the lock (its state stays usable).
    pub fn aggregator(&self) -> std::sync::MutexGuard<'_, Aggregator> {
        self.aggregator.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The TCP edges, as `aggregator`.
    pub fn tcp(&self) -> std::sync::MutexGuard<'_, TcpEdges> {
        self.tcp.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new(
        metrics: Metrics,
        programs: usize,
        sampler: Sampler,
        names: ServiceNames,
        tx: Option<mpsc::Sender<Span>>,
    ) -> Self {
        Self {
            metrics,
            aggregator: Mutex::new(Aggregator::new()),
            started: Instant::now(),
            programs,
            sampler,
            spans_out: SpanSink {
                recent: Mutex::new(VecDeque::new()),
                names,
                tx,
                reported: Mutex::new(LinkStats::default()),
            },
            tap: tap::channel(),
            attach: "none",
            spans: true,
            tcp: Mutex::new(TcpEdges::default()),
            go_procs: GoProcs::default(),
            execs: Execs::default(),
        }
    }
}

/// The stages after the ring buffer, fed with records from elsewhere: the pipeline benchmark
/// replays recorded or synthesised events through exactly what `tracer run` runs.
pub struct Replay {
    reader: Reader,
}

impl Replay {
    pub fn new() -> Self {
        Self::with_spans(true)
    }

    /// As `tracer run`, or `tracer run --no-spans` when `spans` is false.
    pub fn with_spans(spans: bool) -> Self {
        let shared = Arc::new(Shared {
            spans,
            ..Shared::new(
                Metrics::new(),
                0,
                Sampler::ratio(1.0),
                ServiceNames::default(),
                None,
            )
        });
        shared.aggregator().tick();
        Self {
            reader: Reader::new(shared, SocketAddr::from(([127, 0, 0, 1], 9))),
        }
    }

    /// One ring-buffer record.
    /// One record, as if read from the ring buffer; the clock is read per `flush`, as the reader
    /// reads it per drain.
    pub fn feed(&mut self, item: &[u8]) {
        self.reader.handle(item);
    }

    /// Hands finished spans on, as the reader does every 50 ms.
    pub fn flush(&mut self) {
        self.reader.release_stale();
        if !self.reader.exchanges.is_empty() {
            self.reader.record_exchanges();
        }
        self.reader.drain_spans();
        self.reader.shared.aggregator().tick();
    }

    /// Requests counted on every edge so far.
    pub fn requests(&self) -> u64 {
        let agg = self.reader.shared.aggregator();
        agg.edges(crate::window::Window::M1)
            .iter()
            .map(|e| e.requests)
            .sum()
    }
}

impl Default for Replay {
    fn default() -> Self {
        Self::new()
    }
}

pub struct RunConfig {
    pub listen: SocketAddr,
    pub otlp: Option<otlp::Config>,
    pub sample_ratio: f64,
    pub services: ServiceNames,
    /// Have the kernel account eBPF run time while the daemon runs (kernel.bpf_stats_enabled).
    pub bpf_stats: bool,
    /// Ring buffer size, when not the default.
    pub ringbuf_bytes: Option<u32>,
    pub attach: AttachMode,
    /// Build spans (else metrics, edges and tap only).
    pub spans: bool,
    /// Hook TLS libraries for their plaintext.
    pub tls: bool,
    /// Name peers on other nodes from this Kubernetes API.
    pub kube: Option<crate::kube::Config>,
}

/// A socket bound to `addr`, not yet listening (as tokio's own bind: address reuse, not
/// blocking).
fn bind(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    // Bound first: a wrong address, or one another program listens on, fails before anything
    // is loaded into the kernel (two daemons starting at once both bind; the second fails at
    // its listen, after its attach).
    // Listening only once the probes are attached: a client that connected before (a readiness
    // probe) would have written its request unseen and read the answer seen, a response
    // without its request in the daemon's first figures.
    let cannot_listen = || format!("cannot listen on {}", cfg.listen);
    let api_socket = bind(cfg.listen).with_context(cannot_listen)?;
    let (capture, ring, requests) =
        Capture::start(cfg.bpf_stats, cfg.ringbuf_bytes, cfg.attach, cfg.tls)?;
    api_socket.listen(1024).with_context(cannot_listen)?;
    let listener = TcpListener::from_std(api_socket.into()).with_context(cannot_listen)?;
    // Optional: without it, peers on other nodes keep their addresses.
    if let Some(kube) = cfg.kube.clone()
        && let Err(e) = crate::kube::start(kube, &metrics)
    {
        tracing::warn!("not naming peers from the Kubernetes API: {e:#}");
    }
    let mode = capture.mode;
    let token = CancellationToken::new();
    let (tx, exporter) = match cfg.otlp.clone() {
        Some(otlp_cfg) => {
            tracing::info!(
                "exporting spans over OTLP ({:?}) to {}",
                otlp_cfg.protocol,
                otlp_cfg.endpoint
            );
            let (tx, rx) = mpsc::channel(otlp::QUEUE);
            let task = tokio::spawn(otlp::run(
                otlp_cfg,
                cfg.services.clone(),
                rx,
                metrics.clone(),
                token.clone(),
            ));
            (Some(tx), Some(task))
        }
        None => (None, None),
    };
    let shared = Arc::new(Shared {
        attach: match mode {
            AttachMode::Socket | AttachMode::SocketRaw | AttachMode::SocketClassic => "socket",
            AttachMode::Fentry => "fentry",
            AttachMode::RawTracepoint | AttachMode::RawTracepointFd => "raw-tracepoint",
            AttachMode::Tracepoint | AttachMode::Auto => "tracepoint",
        },
        spans: cfg.spans,
        ..Shared::new(
            metrics.clone(),
            capture.programs(),
            Sampler::ratio(cfg.sample_ratio),
            cfg.services.clone(),
            tx,
        )
    });

    capture.log_verified();
    let resets_marked = capture.resets_marked;
    let (waiter, stopper) = Waiter::new(&ring).context("polling the ring buffer")?;
    let (done, reader) = tokio::sync::oneshot::channel();
    let (reader_shared, reader_token) = (shared.clone(), token.clone());
    std::thread::Builder::new()
        .name("tracer-reader".into())
        .spawn(move || {
            let r = read_events(
                ring,
                waiter,
                requests,
                reader_shared,
                cfg.listen,
                resets_marked,
                reader_token.clone(),
            );
            // A reader that failed captures nothing more: the daemon stops with its error.
            if r.is_err() {
                reader_token.cancel();
            }
            let _ = done.send(r);
        })
        .context("starting the reader")?;
    let stop_reader = token.clone();
    tokio::spawn(async move {
        stop_reader.cancelled().await;
        stopper.stop();
    });
    let reader = async { reader.await.context("the reader thread ended")? };
    let stats = tokio::spawn(export_kernel_stats(capture, shared.clone(), token.clone()));
    let server = tokio::spawn(api::serve(listener, shared.clone(), token.clone()));
    tracing::info!(
        "tracer attached {} programs (data path: {:?}); dashboard at http://{}/, /metrics and /api",
        shared.programs,
        mode,
        cfg.listen
    );

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
        r = &mut Box::pin(token.cancelled()) => r,
    }
    tracing::info!("shutting down");
    token.cancel();
    // Idle keep-alive API connections would hold a graceful shutdown open: give them a moment.
    let server = async {
        match tokio::time::timeout(Duration::from_millis(200), server).await {
            Ok(r) => r,
            Err(_) => Ok(Ok(())),
        }
    };
    let t = Instant::now();
    let (r, _, s) = tokio::join!(reader, stats, server);
    tracing::debug!("tasks stopped in {:?}", t.elapsed());
    if let Some(exporter) = exporter {
        // Bounded: a collector that does not answer must not hold up shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(2), exporter).await;
    }
    r?;
    s??;
    Ok(())
}

/// How often the ring buffer is read without being woken while many records come (down to
/// every `POLL_SLOWEST` when few do, `next_poll`): the kernel side wakes the reader only when a
/// lot is pending (batched wake-ups: each wake-up costs an interrupt, dearer still in a VM, and
/// a context switch), so this bounds how late an event is seen.
const POLL_EVERY: Duration = Duration::from_millis(20);
/// The longest wait between reads, when few records come or none: well under the half second
/// a connection waits for its server's first read or write to name it.
const POLL_SLOWEST: Duration = Duration::from_millis(100);
/// A read that found fewer records than this waits twice as long for the next (at 1k
/// requests/s, ~4 records each, reads settle at 80 ms); one that found more than
/// `MANY_RECORDS` goes back to `POLL_EVERY`.
const FEW_RECORDS: usize = 256;
const MANY_RECORDS: usize = 1024;
/// The wait after a wake-up whose records the merge held back (`ring::HOLD_NS`, 2 ms).
const HELD_WAIT: Duration = Duration::from_millis(3);
/// After a process here connected, reads come every `POLL_EVERY` for this long: a client is
/// named from /proc when its connect is read, and a short-lived one must still be there. (The
/// kernel side wakes the reader for a connect when it has not for 100 ms.)
const FAST_AFTER_CONNECT: Duration = Duration::from_secs(1);

/// The capture state, owned by the reader thread.
struct Reader {
    shared: Arc<Shared>,
    listen: SocketAddr,
    conns: ConnTable,
    threads: Threads,
    linker: Linker,
    exchanges: Vec<Exchange>,
    #[allow(clippy::vec_box, reason = "boxes are recycled into new spans")]
    ready: Vec<Box<Span>>,
    last_drain: Instant,
    last_expire: Instant,
    last_losses: Instant,
    /// Where sockets found not to carry HTTP, and long bodies, are handed to the kernel (none
    /// when replaying).
    requests: Option<Requests>,
    data_events: prometheus::IntCounter,
    conn_events: prometheus::IntCounter,
    own_pid: u32,
    tcp: TcpTracker,
    /// `GoProcs` version the linker has.
    go_version: u64,
    joiner: Joiner,
    reorder: Reorder,
    stale: Vec<Vec<u8>>,
    /// A process here connected since the last drain (see `FAST_AFTER_CONNECT`).
    connected: bool,
}

impl Reader {
    /// Requests to the daemon itself (CLI, scrapes) are its own business, not the host's
    /// traffic; its own end is already skipped in the kernel.
    fn to_self(&self, ex: &Exchange) -> bool {
        self.to_api(&ex.tuple)
    }

    /// Whether a connection goes to the daemon's own API.
    fn to_api(&self, tuple: &Tuple) -> bool {
        let (listen, remote) = (self.listen, tuple.remote);
        remote == listen
            || (listen.ip().is_unspecified()
                && remote.port() == listen.port()
                && (remote.ip().is_loopback() || remote.ip() == tuple.local.ip()))
    }

    fn new(shared: Arc<Shared>, listen: SocketAddr) -> Self {
        Self {
            listen,
            conns: ConnTable::new(MAX_CONNS),
            threads: Threads::new(threads::MAX_THREADS, &shared.metrics),
            linker: Linker::with_spans(shared.sampler, shared.spans),
            exchanges: Vec::with_capacity(256),
            ready: Vec::new(),
            last_drain: Instant::now(),
            last_expire: Instant::now(),
            last_losses: Instant::now(),
            requests: None,
            data_events: shared.metrics.events.with_label_values(&["data"]),
            conn_events: shared.metrics.events.with_label_values(&["conn"]),
            own_pid: std::process::id(),
            tcp: TcpTracker::default(),
            go_version: 0,
            joiner: Joiner::default(),
            reorder: Reorder::default(),
            stale: Vec::new(),
            connected: false,
            shared,
        }
    }

    /// Takes every record there is, and returns how many there were.
    fn drain(&mut self, ring: &mut Rings) -> usize {
        self.shared.aggregator().tick();
        self.linker.tick(Instant::now());
        if let Some(go) = self.shared.go_procs.changed(&mut self.go_version) {
            self.linker.set_go(&go);
        }
        let mut n = 0u32;
        ring.drain(|item| {
            self.handle(item);
            n += 1;
            // A long batch (a reader catching up) must not age its spans: their holds are
            // measured from this clock.
            if n.is_multiple_of(4096) {
                self.linker.tick(Instant::now());
            }
        });
        self.release_stale();
        self.conns.reap_resets(
            Instant::now(),
            &self.shared.metrics,
            &mut self.linker,
            &mut self.exchanges,
        );
        if !self.exchanges.is_empty() {
            self.record_exchanges();
        }
        if self.tcp.wants_tick() {
            let conns = &self.conns;
            self.tcp.tick(&self.shared.tcp, &self.shared.metrics, |t| {
                conns.peer_of(t, 0)
            });
        }
        let shared = self.conns.take_heads_shared();
        if shared > 0 {
            self.shared.metrics.heads_shared.inc_by(shared);
        }
        if let Some(requests) = &mut self.requests {
            for (sk, tuple) in self.conns.take_opaque() {
                requests.opaque.ask(sk, &tuple);
            }
            requests.opaque.tidy(|&sk| self.conns.is_open(sk));
            for (key, end) in self.conns.take_bodies() {
                requests.bodies.ask(key, &end);
            }
            requests.bodies.tidy(|key| self.conns.is_open(key.sk));
        }
        if self.last_drain.elapsed() >= SPAN_DRAIN {
            self.drain_spans();
        }
        n as usize
    }

    /// Takes in the TCP client connections open when the daemon started.
    fn adopt_tcp(&mut self, found: Vec<tcp::Existing>) {
        let found = found
            .into_iter()
            .filter(|x| !self.to_api(&x.tuple))
            .collect();
        self.tcp
            .adopt(found, &self.shared.tcp, &self.shared.metrics);
    }

    /// One ring-buffer record: a call the kernel sent in parts is joined first.
    fn handle(&mut self, item: &[u8]) {
        match self.joiner.offer(item) {
            Part::Whole => self.handle_record(item),
            Part::Held => self.data_events.inc(),
            Part::Joined(buf) => {
                let truncated = self.joiner.take_truncated();
                if truncated > 0 {
                    let metrics = &self.shared.metrics;
                    metrics
                        .decode_errors
                        .with_label_values(&["joined_call_truncated"])
                        .inc_by(truncated);
                }
                self.handle_record(&buf);
                self.joiner.recycle(buf);
            }
            Part::Unjoined => {
                self.data_events.inc();
                let metrics = &self.shared.metrics;
                metrics
                    .decode_errors
                    .with_label_values(&["unjoined_part"])
                    .inc();
            }
        }
    }

    /// One whole ring-buffer record, through every stage.
    fn handle_record(&mut self, item: &[u8]) {
        let metrics = &self.shared.metrics;
        match event::decode(item) {
            Ok(Event::Data(d)) => self.on_data(d, item),
            Ok(Event::Conn(c)) => {
                self.conn_events.inc();
                // A client is named (from /proc) at its connect, a read interval after it: one
                // that exits as soon as a long exchange ends (a CLI tool, a job in a pod) is
                // gone by the time that exchange is recorded, and would be named by its process
                // name alone. (One that exits within the interval still is.)
                if c.new_state == TCP_SYN_SENT && c.task.comm.0[0] != 0 {
                    workload::name(&c.task);
                    self.connected = true;
                }
                // A data event held for its predecessor: that is not coming before the close.
                while !self.reorder.is_empty()
                    && let Some(held) = self.reorder.take_socket(c.sk)
                {
                    self.held_data(held);
                }
                let metrics = &self.shared.metrics;
                if !self.to_api(&c.tuple) {
                    let conns = &self.conns;
                    self.tcp
                        .on_state(&c, self.own_pid, &self.shared.tcp, metrics, |t| {
                            conns.peer_of(t, 0)
                        });
                }
                self.conns
                    .on_state(&c, metrics, &mut self.linker, &mut self.exchanges);
            }
            Ok(Event::Exec(pid)) => {
                if pid != self.own_pid {
                    self.shared.execs.push(pid);
                }
            }
            Err(e) => metrics.decode_errors.with_label_values(&[e.reason()]).inc(),
        }
        if !self.exchanges.is_empty() {
            self.record_exchanges();
        }
    }

    /// A data event, put back in order with its stream's previous one when the two came
    /// swapped (`reorder`).
    fn on_data(&mut self, d: event::Data<'_>, item: &[u8]) {
        let key = StreamKey {
            sk: d.sk,
            tls_ingress: d.tls && d.direction == event::Direction::Ingress,
        };
        if !self.reorder.is_empty()
            && let Some((held, predecessor)) = self.reorder.take(key, d.seq)
        {
            if predecessor {
                self.shared.metrics.events_reordered.inc();
                self.data(d);
                self.held_data(held);
            } else {
                self.held_data(held);
                self.data(d);
            }
            return;
        }
        if self.conns.one_ahead(&d) && self.reorder.hold(key, d.seq, item, Instant::now()) {
            return;
        }
        self.data(d);
    }

    /// A held data event goes on (its record was whole and decoded once already).
    fn held_data(&mut self, record: Vec<u8>) {
        if let Ok(Event::Data(d)) = event::decode(&record) {
            self.data(d);
        }
        self.reorder.recycle(record);
    }

    fn data(&mut self, mut d: event::Data<'_>) {
        self.data_events.inc();
        self.threads.fill(&mut d);
        self.conns.on_data(
            &d,
            &self.shared.metrics,
            &mut self.linker,
            &mut self.exchanges,
        );
    }

    /// Held events whose predecessor did not come in time: lost, counted as such.
    fn release_stale(&mut self) {
        if self.reorder.is_empty() {
            return;
        }
        let mut stale = std::mem::take(&mut self.stale);
        self.reorder.take_stale(Instant::now(), &mut stale);
        for record in stale.drain(..) {
            self.held_data(record);
        }
        self.stale = stale;
    }

    fn record_exchanges(&mut self) {
        let shared = self.shared.clone();
        let metrics = &shared.metrics;
        let mut agg = shared.aggregator();
        let mut exchanges = std::mem::take(&mut self.exchanges);
        for ex in exchanges.drain(..) {
            if self.to_self(&ex) {
                if let Some(span) = ex.span {
                    self.linker.abandon(span);
                }
                continue;
            }
            let peer = self.conns.peer_of(&ex.tuple, ex.peer_sk);
            // The other end is this daemon (its span export to a collector on this host):
            // counting it would make spans of spans, without end.
            if peer.is_some_and(|p| p.task.tgid == self.own_pid) {
                if let Some(span) = ex.span {
                    self.linker.abandon(span);
                }
                continue;
            }
            // A client span the server end claimed: that end counts the request. Without spans,
            // a server end traced here counts every request of its connection.
            // A client end whose pairs may be wrong (responses went by uncaptured) leaves the
            // count to its server end when that is traced here: its unclaimed exchanges may be
            // requests paired with another's response, which that end counts too.
            // A request its server end gave back (`Linker::abandon`) that end counts neither
            // way.
            let peer_server = peer.is_some_and(|p| p.side == Some(Side::Server));
            let handed_back = ex.span.is_some_and(|s| self.linker.handed_back(s));
            let server_seen = ex.side == Side::Server
                || ex.span.is_some_and(|s| self.linker.claimed(s))
                || ((!self.linker.enabled() || (ex.unsure && !handed_back)) && peer_server);
            // Counted here, unclaimed or its server end not seen yet: that end's loss of it is
            // not one.
            if !server_seen
                && !handed_back
                && (peer_server || (peer.is_none() && crate::conn::local_peer(&ex.tuple)))
            {
                self.linker.client_counted(ex.tuple.local, metrics);
            }
            let rec = agg.record(&ex, peer, server_seen, metrics);
            let mut tapped = (rec.counted && self.shared.tap.receiver_count() > 0)
                .then(|| tap::TapEvent::of(&ex, &rec));
            // The route as the metrics templated it: computed once.
            let route = ex.span.map(|_| rec.route.clone());
            if let (Some(span), Some(route)) = (ex.span, route) {
                self.linker.finish(
                    span,
                    spans::Finished {
                        method: ex.method,
                        path: ex.path,
                        route,
                        status: ex.status,
                        grpc_status: ex.grpc_status,
                        end_ns: ex.end_ns,
                        req_bytes: ex.req_bytes,
                        resp_bytes: ex.resp_bytes,
                    },
                );
                // After finish: a late link may have moved the span into its caller's trace.
                if let Some(t) = &mut tapped {
                    t.trace_id = self.linker.trace_of(span).map(|id| format!("{id:032x}"));
                }
            }
            if let Some(t) = tapped {
                // Nobody listening any more is not an error.
                let _ = self.shared.tap.send(Arc::new(t));
            }
        }
        self.exchanges = exchanges;
    }

    /// Spans become ready with time too, not only with new events.
    fn drain_spans(&mut self) {
        self.last_drain = Instant::now();
        if self.last_expire.elapsed() >= EXPIRE_EVERY {
            self.last_expire = Instant::now();
            let shared = self.shared.clone();
            let mut agg = shared.aggregator();
            agg.expire(&shared.metrics);
        }
        if self.last_losses.elapsed() >= LOSSES_EVERY {
            self.last_losses = self.last_drain;
            self.linker
                .expire_losses(self.last_drain, &self.shared.metrics);
        }
        self.linker.drain_ready(&mut self.ready);
        self.shared
            .spans_out
            .publish(&mut self.ready, &mut self.linker, &self.shared.metrics);
    }
}

/// The reader's own thread: waits for the rings (woken by the kernel side when a lot is
/// pending, else at the poll interval), drains them, until stopped. Off the async runtime:
/// a wait is one syscall, not a timer wheel, a waker and a worker woken on the other CPU.
fn read_events(
    mut ring: Rings,
    waiter: Waiter,
    requests: Requests,
    shared: Arc<Shared>,
    listen: SocketAddr,
    resets_marked: bool,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut reader = Reader::new(shared, listen);
    reader.requests = Some(requests);
    if resets_marked {
        reader.conns.mark_resets();
    }
    // The TCP connections open before the daemon started: read from /proc on another thread
    // (the ring buffer is read meanwhile), taken in when the look is done.
    reader.tcp.scan_started();
    let own_pid = reader.own_pid;
    let (found_tx, found_rx) = std::sync::mpsc::sync_channel(1);
    // Stopped at shutdown: SIGTERM must end the daemon at once.
    let stop = token;
    std::thread::Builder::new()
        .name("tracer-scan".into())
        .spawn(move || {
            let _ = found_tx.send(tcp::scan(own_pid, || stop.is_cancelled()));
        })
        .context("starting the look at open connections")?;
    let mut scanned = false;
    let mut every = POLL_EVERY;
    let mut wait = every;
    let mut fast_until = Instant::now();
    let mut priority =
        crate::priority::Priority::of_this_thread(reader.shared.metrics.reader_raises.clone());
    loop {
        let woken = waiter.wait(wait).context("waiting for the ring buffer")?;
        if woken == Woken::Stop {
            return Ok(());
        }
        priority.note(ring.fill());
        let n = reader.drain(&mut ring);
        if std::mem::take(&mut reader.connected) {
            fast_until = Instant::now() + FAST_AFTER_CONNECT;
        }
        if woken == Woken::Data && n <= MANY_RECORDS && ring.held() {
            // Woken as a record was written (a connect, when little else comes): the merge
            // holds records back 2 ms, so that one is read a moment later, not a poll later.
            wait = HELD_WAIT;
            continue;
        }
        every = if Instant::now() < fast_until {
            POLL_EVERY
        } else {
            next_poll(every, n)
        };
        wait = every;
        if !scanned && let Ok(found) = found_rx.try_recv() {
            scanned = true;
            tracing::debug!("{} TCP client connections open at start", found.len());
            reader.adopt_tcp(found);
            // The look read every process's descriptors (on another thread, whose allocator
            // arena keeps what it freed): give it back.
            // SAFETY: only asks the allocator to release free memory.
            unsafe { libc::malloc_trim(0) };
        }
    }
}

/// The wait before the next read, from how many records the last one found: little traffic
/// (or none) is read less often, down to POLL_SLOWEST, so that a quiet host does not wake the
/// daemon 50 times a second; a read that found many goes back to POLL_EVERY.
fn next_poll(every: Duration, records: usize) -> Duration {
    if records < FEW_RECORDS {
        (every * 2).min(POLL_SLOWEST)
    } else if records > MANY_RECORDS {
        POLL_EVERY
    } else {
        every
    }
}

/// Seconds between looks for TLS libraries in new processes when the kernel reported no new
/// program (the tick after one did, there is a look). Each look lists /proc and reads only the
/// processes it has not seen.
const TLS_FULL_LOOK_EVERY: u64 = 10;

/// Hands the reader the Go programs among live processes, when the set changed.
fn publish_go(capture: &mut Capture, shared: &Shared) {
    if let Some(go) = capture.go_processes() {
        shared.go_procs.publish(go);
    }
}

/// Copies the kernel-side counters into the metrics once a second, and hooks the TLS libraries
/// of new processes.
async fn export_kernel_stats(
    mut capture: Capture,
    shared: Arc<Shared>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = &shared.metrics;
    let mut last = capture.kernel_stats().map(|(_, v)| v);
    let mut last_programs: std::collections::HashMap<String, (std::time::Duration, u64)> = capture
        .program_stats()
        .into_iter()
        .map(|(n, t, c)| (n, (t, c)))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    // The start-up look was made by `Capture::start`.
    metrics.tls_libraries.set(capture.tls_libraries() as i64);
    let mut execs = Vec::new();
    // A program began since the last look at new processes.
    let mut executed = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = shared.execs.ready.notified() => {
                // A new program: a Go one's TLS hooked now, not at the next look.
                shared.execs.take(&mut execs);
                executed |= !execs.is_empty();
                capture.executed(&execs);
                publish_go(&mut capture, &shared);
                continue;
            }
            _ = token.cancelled() => break,
        }
        ticks += 1;
        // New processes (a container's own libssl, a Go program) are looked at every second
        // after a program began (the kernel tells of each), and every TLS_FULL_LOOK_EVERY
        // seconds anyway (a fork that maps another library; an exec lost to a full ring): a
        // look lists /proc, ~13% of an idle daemon's time when made every second.
        // Executables waiting to be hooked need only their own processes looked at.
        let due =
            executed || !capture.execs_reported() || ticks.is_multiple_of(TLS_FULL_LOOK_EVERY);
        if due {
            executed = false;
            capture.refresh_tls();
        } else if capture.tls_waiting() {
            capture.hook_tls_waiting();
        }
        if due || capture.tls_waiting() {
            metrics.tls_libraries.set(capture.tls_libraries() as i64);
            publish_go(&mut capture, &shared);
        }
        for (i, (stat, value)) in capture.kernel_stats().into_iter().enumerate() {
            let delta = value.saturating_sub(last[i]);
            if delta > 0 {
                metrics
                    .kernel
                    .with_label_values(&[stat.name()])
                    .inc_by(delta);
                // The others go with their socket's events (`ConnTable::lost_requests`).
                let side = match stat {
                    KernelStat::LostRequestUnheldIngress => Some("server"),
                    KernelStat::LostRequestUnheldEgress => Some("client"),
                    _ => None,
                };
                if let Some(side) = side {
                    metrics
                        .requests_lost
                        .with_label_values(&[side, "ringbuf_full"])
                        .inc_by(delta);
                }
            }
            last[i] = value;
        }
        for (name, time, runs) in capture.program_stats() {
            let (t0, r0) = last_programs.get(&name).copied().unwrap_or_default();
            if runs > r0 {
                metrics
                    .bpf_runs
                    .with_label_values(&[&name])
                    .inc_by(runs - r0);
                metrics
                    .bpf_run_seconds
                    .with_label_values(&[&name])
                    .inc_by(time.saturating_sub(t0).as_secs_f64());
            }
            last_programs.insert(name, (time, runs));
        }
    }
    // Dropping the capture here detaches the programs.
    drop(capture);
    Ok(())
}

#[cfg(test)]
mod tests {
    use tracer_common::{
        AF_INET, DATA_EVENT_FIXED, DIR_EGRESS, DIR_INGRESS, DataMeta, EventHeader, EventKind,
        SockTuple, TAIL_LEN,
    };

    use super::*;

    /// A server socket's data record numbered `seq`, as the kernel side emits it.
    fn server_record(seq: u32, direction: u32, bytes: &[u8]) -> Vec<u8> {
        record(&SERVER, seq, direction, bytes, 0)
    }

    /// One end of a connection on this host: its socket, process and address.
    struct End {
        sk: u64,
        pid: u32,
        comm: &'static [u8],
        local: ([u8; 4], u16),
        remote: ([u8; 4], u16),
    }

    const SERVER: End = End {
        sk: 0xffff_0000_0900_0000,
        pid: 4_100_002,
        comm: b"orders",
        local: ([10, 0, 0, 2], 8080),
        remote: ([10, 0, 0, 1], 40_000),
    };

    /// Both ends of one connection on loopback.
    const LOOP_SERVER: End = End {
        sk: 0xffff_0000_0a00_0000,
        pid: 4_100_003,
        comm: b"orders",
        local: ([127, 0, 0, 1], 8080),
        remote: ([127, 0, 0, 1], 40_001),
    };
    const LOOP_CLIENT: End = End {
        sk: 0xffff_0000_0b00_0000,
        pid: 4_100_004,
        comm: b"checkout",
        local: ([127, 0, 0, 1], 40_001),
        remote: ([127, 0, 0, 1], 8080),
    };

    /// A data record of `end`'s socket numbered `seq`, as the kernel side emits it, telling
    /// `lost_requests` (`tracer_common::lost_requests`).
    fn record(end: &End, seq: u32, direction: u32, bytes: &[u8], lost_requests: u32) -> Vec<u8> {
        let mut tuple = SockTuple {
            family: AF_INET,
            local_port: end.local.1,
            remote_port: end.remote.1,
            ..Default::default()
        };
        tuple.local_addr[..4].copy_from_slice(&end.local.0);
        tuple.remote_addr[..4].copy_from_slice(&end.remote.0);
        let mut comm = [0u8; 16];
        comm[..end.comm.len()].copy_from_slice(end.comm);
        let ts = 1_000_000_000 + u64::from(seq) * 1_000;
        let meta = DataMeta {
            hdr: EventHeader {
                kind: EventKind::Data as u32,
                flags: 0,
                ts_ns: ts,
                pid_tgid: (u64::from(end.pid) << 32) | u64::from(end.pid),
                cgroup_id: 1,
                comm,
            },
            sk: end.sk,
            ts_enter_ns: ts - 500,
            goroutine: 0,
            tcp_seq: 0,
            lost_requests,
            tuple,
            direction,
            bytes: bytes.len() as u32,
            captured: bytes.len() as u32,
            tail_len: 0,
            seq,
            frames_len: 0,
            tail: [0; TAIL_LEN],
        };
        // SAFETY: DataMeta is plain old data (repr(C), integers and byte arrays).
        let raw =
            unsafe { std::slice::from_raw_parts((&raw const meta).cast::<u8>(), DATA_EVENT_FIXED) };
        [raw, bytes].concat()
    }

    const REQ: &[u8] = b"GET /a HTTP/1.1\r\nHost: orders\r\n\r\n";
    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    /// After the events: held ones released (`reorder`), losses waiting for a client end
    /// (`ledger`) given up; then requests counted, and lost by the server and client ends
    /// (every reason).
    fn settled(replay: &mut Replay) -> (u64, u64, u64) {
        replay.flush();
        std::thread::sleep(crate::reorder::STALE_AFTER);
        replay.flush();
        let later = Instant::now() + Duration::from_secs(60);
        let metrics = replay.reader.shared.metrics.clone();
        replay.reader.linker.expire_losses(later, &metrics);
        use prometheus::core::Collector;
        let families = metrics.requests_lost.collect();
        let sum = |side: &str| {
            families
                .iter()
                .flat_map(|f| f.get_metric())
                .filter(|m| m.get_label().iter().any(|l| l.value() == side))
                .map(|m| m.get_counter().get_value() as u64)
                .sum::<u64>()
        };
        (replay.requests(), sum("server"), sum("client"))
    }

    /// The server end's read of a request was dropped (the kernel tells it with the socket's
    /// next event); its client end, traced too, saw the whole exchange and counts it: the
    /// request is counted once, not also lost. Without spans the server end counts every
    /// request of its connection: lost there, not counted by the client end.
    #[test]
    fn a_request_the_server_end_lost_and_its_client_end_counted_is_counted_once() {
        for spans in [true, false] {
            let mut replay = Replay::with_spans(spans);
            replay.feed(&record(&LOOP_CLIENT, 1, DIR_EGRESS, REQ, 0));
            // The server's read (its event 1) is lost.
            let one_read = tracer_common::lost_requests::INGRESS;
            replay.feed(&record(&LOOP_SERVER, 2, DIR_EGRESS, RESP, one_read));
            replay.feed(&record(&LOOP_CLIENT, 2, DIR_INGRESS, RESP, 0));
            assert_eq!(
                settled(&mut replay),
                if spans { (1, 0, 0) } else { (0, 1, 0) },
                "spans {spans}"
            );
        }
    }

    /// The server end's events of a first request all dropped: its client end counts the
    /// exchange before the server's socket is seen at all; the server's loss, told with its
    /// next event, is then that one: counted once.
    #[test]
    fn a_request_counted_before_its_server_end_was_seen_is_not_also_lost() {
        for spans in [true, false] {
            let mut replay = Replay::with_spans(spans);
            replay.feed(&record(&LOOP_CLIENT, 1, DIR_EGRESS, REQ, 0));
            replay.feed(&record(&LOOP_CLIENT, 2, DIR_INGRESS, RESP, 0));
            replay.flush();
            let one_read = tracer_common::lost_requests::INGRESS;
            replay.feed(&record(&LOOP_CLIENT, 3, DIR_EGRESS, REQ, 0));
            replay.feed(&record(&LOOP_SERVER, 3, DIR_INGRESS, REQ, one_read));
            replay.feed(&record(&LOOP_SERVER, 4, DIR_EGRESS, RESP, 0));
            replay.feed(&record(&LOOP_CLIENT, 4, DIR_INGRESS, RESP, 0));
            assert_eq!(settled(&mut replay), (2, 0, 0), "spans {spans}");
        }
    }

    /// Both ends' events of a request dropped: counted lost once, by its server end.
    #[test]
    fn a_request_both_ends_lost_is_counted_lost_once() {
        for spans in [true, false] {
            let mut replay = Replay::with_spans(spans);
            replay.feed(&record(&LOOP_CLIENT, 1, DIR_EGRESS, REQ, 0));
            replay.feed(&record(&LOOP_SERVER, 1, DIR_INGRESS, REQ, 0));
            replay.feed(&record(&LOOP_SERVER, 2, DIR_EGRESS, RESP, 0));
            replay.feed(&record(&LOOP_CLIENT, 2, DIR_INGRESS, RESP, 0));
            // The second request's write and read are lost; both ends' next events say so.
            let (read, written) = (
                tracer_common::lost_requests::INGRESS,
                tracer_common::lost_requests::EGRESS,
            );
            replay.feed(&record(&LOOP_SERVER, 4, DIR_EGRESS, RESP, read));
            replay.feed(&record(&LOOP_CLIENT, 4, DIR_INGRESS, RESP, written));
            assert_eq!(settled(&mut replay), (1, 1, 0), "spans {spans}");
        }
    }

    /// A Go server reads the next request on one thread while its handler's write of the last
    /// response is under way on another: the read takes the lower event number, the write's
    /// record comes first. Both requests count, nothing is lost.
    #[test]
    fn two_events_of_a_socket_that_came_swapped_are_put_back_in_order() {
        let req = |n: u32| format!("GET /item/{n} HTTP/1.1\r\nHost: orders\r\n\r\n");
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let mut replay = Replay::with_spans(false);
        for r in [
            server_record(1, DIR_INGRESS, req(1).as_bytes()),
            server_record(3, DIR_INGRESS, req(2).as_bytes()),
            server_record(2, DIR_EGRESS, resp),
            server_record(4, DIR_EGRESS, resp),
        ] {
            replay.feed(&r);
        }
        replay.flush();
        let metrics = &replay.reader.shared.metrics;
        assert_eq!(metrics.events_reordered.get(), 1);
        assert_eq!(metrics.connections_desynced.get(), 0);
        assert_eq!(replay.requests(), 2);
    }

    /// When the missing event never comes (lost to a full ring), the held one goes on at the
    /// end of a drain once it has waited long enough, and the gap is counted as before.
    #[test]
    fn a_held_event_whose_predecessor_is_lost_goes_on_as_a_gap() {
        let req = b"GET /a HTTP/1.1\r\nHost: orders\r\n\r\n";
        let mut replay = Replay::with_spans(false);
        replay.feed(&server_record(1, DIR_INGRESS, req));
        replay.feed(&server_record(3, DIR_INGRESS, req));
        replay.flush();
        assert_eq!(replay.reader.shared.metrics.connections_desynced.get(), 0);
        std::thread::sleep(crate::reorder::STALE_AFTER);
        replay.flush();
        let metrics = &replay.reader.shared.metrics;
        assert_eq!(metrics.connections_desynced.get(), 1);
        assert_eq!(metrics.events_reordered.get(), 0);
    }

    #[test]
    fn quiet_reads_slow_down_and_busy_ones_speed_up() {
        let mut every = POLL_EVERY;
        for _ in 0..10 {
            every = next_poll(every, 0);
        }
        assert_eq!(every, POLL_SLOWEST);
        // Moderate traffic keeps the pace it reached.
        assert_eq!(
            next_poll(Duration::from_millis(80), 320),
            Duration::from_millis(80)
        );
        assert_eq!(next_poll(POLL_SLOWEST, MANY_RECORDS + 1), POLL_EVERY);
        assert_eq!(next_poll(POLL_EVERY, 40), POLL_EVERY * 2);
    }
}
