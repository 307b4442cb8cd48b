//! Wires the stages of `tracer run`: ring buffer -> decode -> connection table and pairing ->
//! edges and metrics -> API. One reader task owns the capture state; the API reads snapshots.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, net::TcpListener, signal::unix::SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{
    api,
    capture::Capture,
    conn::{ConnTable, Exchange, MAX_CONNS},
    edges::Aggregator,
    event::{self, Event},
    metrics::Metrics,
};

/// What the API serves from.
pub struct Shared {
    pub metrics: Metrics,
    pub aggregator: Mutex<Aggregator>,
    pub started: Instant,
    pub programs: usize,
}

pub struct RunConfig {
    pub listen: SocketAddr,
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    // Bind first: a wrong address fails before anything is loaded into the kernel.
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let (capture, ring) = Capture::start()?;
    let shared = Arc::new(Shared {
        metrics: metrics.clone(),
        aggregator: Mutex::new(Aggregator::new()),
        started: Instant::now(),
        programs: capture.programs(),
    });
    let token = CancellationToken::new();

    let reader = tokio::spawn(read_events(ring, shared.clone(), cfg.listen, token.clone()));
    let stats = tokio::spawn(export_kernel_stats(capture, metrics.clone(), token.clone()));
    let server = tokio::spawn(api::serve(listener, shared.clone(), token.clone()));
    tracing::info!(
        "tracer attached {} programs; serving http://{}/metrics and /api",
        shared.programs,
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
    let (r, _, s) = tokio::join!(reader, stats, server);
    r??;
    s??;
    Ok(())
}

async fn read_events(
    ring: RingBuf<MapData>,
    shared: Arc<Shared>,
    listen: SocketAddr,
    token: CancellationToken,
) -> anyhow::Result<()> {
    // Requests to the daemon itself (CLI, scrapes) are its own business, not the host's traffic;
    // its own end is already skipped in the kernel.
    let to_self = |ex: &Exchange| {
        ex.tuple.remote == listen
            || (listen.ip().is_unspecified() && ex.tuple.remote.port() == listen.port())
    };
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged while the AsyncFd
    // holds it.
    let mut fd = unsafe { AsyncFd::register(ring) }
        .map_err(std::io::Error::from)
        .context("polling the ring buffer")?;
    let metrics = &shared.metrics;
    let mut conns = ConnTable::new(MAX_CONNS);
    let mut exchanges: Vec<Exchange> = Vec::with_capacity(256);
    let data_events = metrics.events.with_label_values(&["data"]);
    let conn_events = metrics.events.with_label_values(&["conn"]);
    loop {
        let mut guard = tokio::select! {
            g = fd.readable_mut() => g.context("polling the ring buffer")?,
            _ = token.cancelled() => return Ok(()),
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match event::decode(&item) {
                Ok(Event::Data(d)) => {
                    data_events.inc();
                    conns.on_data(&d, metrics, &mut exchanges);
                }
                Ok(Event::Conn(c)) => {
                    conn_events.inc();
                    conns.on_state(&c, metrics, &mut exchanges);
                }
                Err(e) => metrics.decode_errors.with_label_values(&[e.reason()]).inc(),
            }
            if !exchanges.is_empty() {
                let mut agg = shared.aggregator.lock().unwrap_or_else(|p| p.into_inner());
                for ex in exchanges.drain(..).filter(|ex| !to_self(ex)) {
                    let peer = conns.peer_of(&ex.tuple);
                    agg.record(&ex, peer, metrics);
                }
            }
        }
        guard.clear_ready();
    }
}

/// Copies the kernel-side counters into the metrics once a second.
async fn export_kernel_stats(
    capture: Capture,
    metrics: Metrics,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut last = capture.kernel_stats().map(|(_, v)| v);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = token.cancelled() => break,
        }
        for (i, (stat, value)) in capture.kernel_stats().into_iter().enumerate() {
            let delta = value.saturating_sub(last[i]);
            if delta > 0 {
                metrics
                    .kernel
                    .with_label_values(&[stat.name()])
                    .inc_by(delta);
            }
            last[i] = value;
        }
    }
    // Dropping the capture here detaches the programs.
    drop(capture);
    Ok(())
}
