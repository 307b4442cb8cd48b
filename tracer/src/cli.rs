//! Command line: `tracer run` starts the daemon; the other verbs read a running daemon's API and
//! print tables in the manner of `linkerd viz`.

use std::{net::SocketAddr, ops::ControlFlow};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;

use std::io::BufRead as _;

use crate::{
    api::{EdgesResponse, RoutesResponse, SpanView, SpansResponse, StatResponse},
    capture::AttachMode,
    edges::Quantiles,
    tap::{Filter, TapEvent},
    window::{Window, WindowStats},
};

pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";

#[derive(Parser)]
#[command(
    name = "tracer",
    version,
    about = "Passive eBPF network tracer: service topology, golden metrics and spans without a sidecar"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the probes and serve /metrics and the API (needs root or CAP_BPF+CAP_PERFMON).
    Run {
        /// Address for /metrics and /api. Loopback by default; anything else is explicit.
        #[arg(long, env = "TRACER_LISTEN", default_value = DEFAULT_ADDR)]
        listen: SocketAddr,
        /// OTLP traces endpoint; else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
        /// OTEL_EXPORTER_OTLP_ENDPOINT. Span export is off when none is set.
        #[arg(long)]
        otlp_endpoint: Option<String>,
        /// grpc or http/protobuf; else OTEL_EXPORTER_OTLP_PROTOCOL (default http/protobuf).
        #[arg(long)]
        otlp_protocol: Option<String>,
        /// Extra OTLP request header, key=value (repeatable); adds to OTEL_EXPORTER_OTLP_HEADERS.
        #[arg(long = "otlp-header")]
        otlp_headers: Vec<String>,
        /// Share of traces sampled (0..1) where the caller did not decide; a propagated sampled
        /// flag is always honoured.
        #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0)]
        sample_ratio: f64,
        /// service.name for a process name, process=service (repeatable); default: the name.
        #[arg(long = "service")]
        services: Vec<String>,
        /// Account the time spent in each eBPF program (tracer_bpf_run_seconds_total); costs a
        /// little per run, so off by default.
        #[arg(long)]
        bpf_stats: bool,
        /// Ring buffer between kernel and daemon, in bytes: a power of two, at least 4096
        /// (default 4 MiB). Smaller loses events (counted) sooner under bursts.
        #[arg(long, value_parser = parse_ringbuf)]
        ringbuf_bytes: Option<u32>,
        /// Where the data path hooks in: auto takes the first of socket, raw-tracepoint,
        /// tracepoint that works here.
        #[arg(long, env = "TRACER_ATTACH", value_enum, default_value_t = AttachMode::Auto)]
        attach: AttachMode,
        /// Metrics, edges, routes and tap only: no spans are built (cheaper per request), so
        /// there is nothing for OTLP or /api/spans.
        #[arg(long, env = "TRACER_NO_SPANS", value_parser = clap::builder::BoolishValueParser::new())]
        no_spans: bool,
        /// Do not hook TLS libraries (OpenSSL's, GnuTLS's, Go's crypto/tls): HTTPS is then not seen.
        /// Each hooked call traps into the kernel, which costs TLS-heavy processes throughput.
        #[arg(long, env = "TRACER_NO_TLS", value_parser = clap::builder::BoolishValueParser::new())]
        no_tls: bool,
        /// Kubernetes API server whose pods and services name peers on other nodes (read-only:
        /// list and watch), or `off`. Default: in a pod, the cluster's own (the service
        /// account's token and CA); elsewhere off.
        #[arg(long, env = "TRACER_KUBE_API")]
        kube_api: Option<String>,
        /// Bearer token file for the Kubernetes API (default: the service account's).
        #[arg(long, env = "TRACER_KUBE_TOKEN_FILE")]
        kube_token_file: Option<std::path::PathBuf>,
        /// CA certificate (PEM) of the Kubernetes API server (default: the service account's).
        #[arg(long, env = "TRACER_KUBE_CA_FILE")]
        kube_ca_file: Option<std::path::PathBuf>,
    },
    /// Edges between workloads: who calls whom, with success rate, RPS and latency.
    Edges {
        #[command(flatten)]
        namespace: NamespaceArg,
        #[command(flatten)]
        window: WindowArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Recent spans of a running daemon, as a tree per trace.
    Spans {
        /// Most recent spans to show.
        #[arg(long, default_value_t = 200)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Golden metrics per server workload.
    Stat {
        /// Only this workload.
        workload: Option<String>,
        #[command(flatten)]
        namespace: NamespaceArg,
        #[command(flatten)]
        window: WindowArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Golden metrics per route (templated path) of a server workload.
    Routes {
        workload: String,
        #[command(flatten)]
        window: WindowArg,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The live stream of requests, one line each (Ctrl-C to stop).
    Tap {
        #[command(flatten)]
        filter: FilterArgs,
        /// Stop after this many requests.
        #[arg(long)]
        max: Option<usize>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// A live view of the busiest paths, updated as requests arrive (q to quit).
    Top {
        #[command(flatten)]
        filter: FilterArgs,
        /// Address of a running `tracer run`.
        #[arg(long, env = "TRACER_ADDR", default_value = DEFAULT_ADDR)]
        addr: String,
    },
}

#[derive(clap::Args)]
pub struct NamespaceArg {
    /// Only workloads in this Kubernetes namespace (pods and Services are named
    /// `name.namespace`); for edges, those with either end in it.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

impl NamespaceArg {
    /// Whether a workload name is in the namespace asked for (all are when none was); a peer
    /// named by its address is in none.
    pub fn holds(&self, name: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| {
            name.parse::<std::net::IpAddr>().is_err()
                && name.parse::<std::net::SocketAddr>().is_err()
                && name
                    .rsplit_once('.')
                    .is_some_and(|(owner, n)| n == ns && !owner.is_empty())
        })
    }
}

#[derive(clap::Args)]
pub struct WindowArg {
    /// Window the metrics cover: 10s, 1m or 10m.
    #[arg(short = 't', long = "time-window", default_value = "1m", value_parser = Window::parse)]
    pub window: Window,
}

#[derive(clap::Args, Clone)]
pub struct FilterArgs {
    /// Only requests to this workload.
    #[arg(long)]
    pub to: Option<String>,
    /// Only requests from this workload.
    #[arg(long)]
    pub from: Option<String>,
    /// Only paths starting with this.
    #[arg(long)]
    pub path: Option<String>,
    /// Only this method.
    #[arg(long)]
    pub method: Option<String>,
}

impl FilterArgs {
    pub fn filter(&self) -> Filter {
        Filter {
            to: self.to.clone(),
            from: self.from.clone(),
            path: self.path.clone(),
            method: self.method.clone(),
        }
    }
}

fn parse_ringbuf(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n >= 4096 && n.is_power_of_two() {
        Ok(n)
    } else {
        Err("must be a power of two of at least 4096".to_owned())
    }
}

#[derive(clap::Args)]
pub struct ClientArgs {
    /// Address of a running `tracer run`.
    #[arg(long, env = "TRACER_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

fn url_of(addr: &str, path: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        format!("{}{path}", addr.trim_end_matches('/'))
    } else {
        format!("http://{addr}{path}")
    }
}

/// GET with the daemon's errors made plain: nothing listening, or an API error message.
fn call(addr: &str, path: &str) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
    let url = url_of(addr, path);
    let resp = ureq::get(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .map_err(|e| match e {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                anyhow::anyhow!(
                    "no tracer daemon answers at {addr} ({e}); start one with `sudo tracer run`, \
                     or pass --addr"
                )
            }
            e => anyhow::anyhow!("{url}: {e}"),
        })?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.into_body().read_to_string().unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body);
        bail!("{url}: {status}: {msg}");
    }
    Ok(resp)
}

/// Reads a server-sent event stream, calling `f(event, data)` for each event until it breaks.
pub fn events(
    addr: &str,
    path: &str,
    mut f: impl FnMut(&str, &str) -> ControlFlow<()>,
) -> anyhow::Result<()> {
    let resp = call(addr, path)?;
    let reader = std::io::BufReader::new(resp.into_body().into_reader());
    let (mut event, mut data) = (String::new(), String::new());
    for line in reader.lines() {
        let line = line.context("reading the event stream")?;
        if line.is_empty() {
            if !data.is_empty() && f(&event, &data).is_break() {
                return Ok(());
            }
            event.clear();
            data.clear();
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim_start().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    bail!("the daemon at {addr} closed the stream")
}

/// Fails with a clear message when no daemon answers at `addr`.
pub fn check_daemon(addr: &str) -> anyhow::Result<()> {
    let _: (crate::api::StatusResponse, _) = fetch(addr, "/api/status")?;
    Ok(())
}

fn fetch<T: DeserializeOwned>(addr: &str, path: &str) -> anyhow::Result<(T, String)> {
    let url = url_of(addr, path);
    let body = call(addr, path)?
        .into_body()
        .read_to_string()
        .with_context(|| format!("reading {url}"))?;
    let value = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not answer like a tracer daemon"))?;
    Ok((value, body))
}

fn pct(rate: f64) -> String {
    format!("{:.2}%", rate * 100.0)
}

fn ms(q: Option<&Quantiles>, f: fn(&Quantiles) -> f64) -> String {
    q.map_or("-".to_owned(), |q| format!("{:.2}ms", f(q)))
}

/// Prints rows under a header, columns padded to their widest cell.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("   ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// Window columns: success rate, RPS and latency quantiles.
fn window_cells(w: &WindowStats) -> [String; 5] {
    let lat = w.latency.as_ref();
    [
        if w.requests == 0 {
            "-".to_owned()
        } else {
            pct(w.success_rate)
        },
        format!("{:.1}", w.rps),
        ms(lat, |q| q.p50_ms),
        ms(lat, |q| q.p95_ms),
        ms(lat, |q| q.p99_ms),
    ]
}

const WINDOW_HEADER: [&str; 5] = [
    "SUCCESS",
    "RPS",
    "LATENCY_P50",
    "LATENCY_P95",
    "LATENCY_P99",
];

pub fn edges(ns: &NamespaceArg, w: Window, args: &ClientArgs) -> anyhow::Result<()> {
    let (mut resp, raw): (EdgesResponse, _) =
        fetch(&args.addr, &format!("/api/edges?window={}", w.as_str()))?;
    if ns.namespace.is_some() {
        resp.body
            .edges
            .retain(|e| ns.holds(&e.src) || ns.holds(&e.dst));
        resp.body
            .tcp
            .retain(|e| ns.holds(&e.src) || ns.holds(&e.dst));
    }
    if args.output == Output::Json {
        if ns.namespace.is_none() {
            println!("{raw}");
        } else {
            println!("{}", serde_json::to_string(&resp)?);
        }
        return Ok(());
    }
    if resp.body.edges.is_empty() && resp.body.tcp.is_empty() {
        println!("No edges seen yet.");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = resp
        .body
        .edges
        .iter()
        .map(|e| {
            // As linkerd viz edges' SECURED: whether the edge's requests went encrypted.
            let tls = match e.tls_requests {
                0 => "-",
                n if n == e.requests => "yes",
                _ => "partly",
            };
            let mut row = vec![
                e.src.clone(),
                e.dst.clone(),
                e.dst_addrs.join(","),
                tls.to_owned(),
            ];
            row.extend(window_cells(&e.window));
            row.push(e.requests.to_string());
            row
        })
        .collect();
    if !rows.is_empty() {
        let mut header = vec!["SRC", "DST", "DST_ADDR", "TLS"];
        header.extend(WINDOW_HEADER);
        header.push("REQUESTS");
        print_table(&header, &rows);
    }
    if !resp.body.tcp.is_empty() {
        // Every TCP connection a process here made, whatever it carries (HTTP or not), since
        // the daemon started.
        if !rows.is_empty() {
            println!();
        }
        let rows: Vec<Vec<String>> = resp
            .body
            .tcp
            .iter()
            .map(|e| {
                vec![
                    e.src.clone(),
                    e.dst.clone(),
                    e.dst_addrs.join(","),
                    e.open.to_string(),
                    e.established.to_string(),
                    e.failed.to_string(),
                    e.closed.to_string(),
                    e.bytes_sent.to_string(),
                    e.bytes_received.to_string(),
                    e.retransmits.to_string(),
                    e.rtt_ms
                        .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.3}ms")),
                ]
            })
            .collect();
        print_table(
            &[
                "TCP_SRC",
                "TCP_DST",
                "DST_ADDR",
                "OPEN",
                "ESTABLISHED",
                "FAILED",
                "CLOSED",
                "BYTES_SENT",
                "BYTES_RECEIVED",
                "RETRANSMITS",
                "RTT",
            ],
            &rows,
        );
    }
    Ok(())
}

pub fn stat(
    workload: Option<&str>,
    ns: &NamespaceArg,
    w: Window,
    args: &ClientArgs,
) -> anyhow::Result<()> {
    let (mut resp, raw): (StatResponse, _) =
        fetch(&args.addr, &format!("/api/stat?window={}", w.as_str()))?;
    if let Some(w) = workload {
        resp.body.workloads.retain(|x| x.name == w);
        if resp.body.workloads.is_empty() {
            bail!("no traffic to workload {w:?} seen yet");
        }
    }
    resp.body.workloads.retain(|x| ns.holds(&x.name));
    if args.output == Output::Json {
        if workload.is_none() && ns.namespace.is_none() {
            println!("{raw}");
        } else {
            println!("{}", serde_json::to_string(&resp)?);
        }
        return Ok(());
    }
    if resp.body.workloads.is_empty() {
        println!("No traffic seen yet.");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = resp
        .body
        .workloads
        .iter()
        .map(|x| {
            let mut row = vec![x.name.clone()];
            row.extend(window_cells(&x.window));
            row.push(x.tcp_open.to_string());
            row.push(x.requests.to_string());
            row
        })
        .collect();
    let mut header = vec!["NAME"];
    header.extend(WINDOW_HEADER);
    header.push("TCP_CONN");
    header.push("REQUESTS");
    print_table(&header, &rows);
    Ok(())
}

pub fn routes(workload: &str, w: Window, args: &ClientArgs) -> anyhow::Result<()> {
    let path = format!(
        "/api/routes?window={}&workload={}",
        w.as_str(),
        crate::tap::encode(workload)
    );
    let (resp, raw): (RoutesResponse, _) = fetch(&args.addr, &path)?;
    if args.output == Output::Json {
        println!("{raw}");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = resp
        .body
        .routes
        .iter()
        .map(|r| {
            let mut row = vec![r.route.clone(), r.method.clone()];
            row.extend(window_cells(&r.window));
            row.push(r.requests.to_string());
            row
        })
        .collect();
    let mut header = vec!["ROUTE", "METHOD"];
    header.extend(WINDOW_HEADER);
    header.push("REQUESTS");
    print_table(&header, &rows);
    Ok(())
}

/// Prints the live request stream until `max` requests or the stream ends.
pub fn tap(filter: &Filter, max: Option<usize>, args: &ClientArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut seen = 0usize;
    let stdout = std::io::stdout();
    let path = format!("/api/tap?{}", filter.query());
    events(&args.addr, &path, |event, data| {
        let mut out = stdout.lock();
        let written = match event {
            "request" if args.output == Output::Json => writeln!(out, "{data}"),
            "request" => match serde_json::from_str::<TapEvent>(data) {
                Ok(e) => writeln!(
                    out,
                    "{} {} -> {} {} {} {} {:.3}ms{}{}",
                    clock_time(e.ts_ms),
                    e.src,
                    e.dst,
                    e.method,
                    e.path,
                    e.status,
                    e.latency_ms,
                    if e.tls { " tls" } else { "" },
                    e.trace_id
                        .as_deref()
                        .map(|t| format!(" trace={t}"))
                        .unwrap_or_default()
                ),
                Err(_) => Ok(()),
            },
            "dropped" => {
                eprintln!("tracer: tap fell behind, skipped {data}");
                Ok(())
            }
            _ => Ok(()),
        };
        let _ = out.flush();
        if written.is_err() {
            // Reader gone (a closed pipe): stop.
            return ControlFlow::Break(());
        }
        if event == "request" {
            seen += 1;
        }
        if max.is_some_and(|m| seen >= m) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
}

/// `HH:MM:SS.mmm` (UTC) of a unix-millisecond time.
pub fn clock_time(ts_ms: f64) -> String {
    let ms = ts_ms as u64;
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

pub fn spans(limit: usize, args: &ClientArgs) -> anyhow::Result<()> {
    let (resp, raw): (SpansResponse, _) = fetch(&args.addr, &format!("/api/spans?limit={limit}"))?;
    if args.output == Output::Json {
        println!("{raw}");
        return Ok(());
    }
    if resp.spans.is_empty() {
        println!("No spans yet.");
        return Ok(());
    }
    // Traces in order of their first span; within one, children under their parent.
    let mut order: Vec<&str> = Vec::new();
    let mut by_trace: std::collections::HashMap<&str, Vec<&SpanView>> = Default::default();
    for s in &resp.spans {
        by_trace
            .entry(s.trace_id.as_str())
            .or_insert_with(|| {
                order.push(s.trace_id.as_str());
                Vec::new()
            })
            .push(s);
    }
    for trace in order {
        let spans = &by_trace[trace];
        println!("trace {trace} ({} spans)", spans.len());
        let ids: std::collections::HashSet<&str> =
            spans.iter().map(|s| s.span_id.as_str()).collect();
        let roots: Vec<&&SpanView> = spans
            .iter()
            .filter(|s| s.parent_span_id.as_deref().is_none_or(|p| !ids.contains(p)))
            .collect();
        for root in roots {
            print_span(root, spans, 1);
        }
    }
    Ok(())
}

fn print_span(span: &SpanView, all: &[&SpanView], depth: usize) {
    if depth > 32 {
        return;
    }
    println!(
        "{}{} {} {} {} {:.2}ms  [{} pid {}]{}",
        "  ".repeat(depth),
        span.kind,
        span.name,
        span.status_code,
        if span.error { "ERROR" } else { "ok" },
        span.duration_ms,
        span.service,
        span.pid,
        span.parent_span_id
            .as_deref()
            .filter(|_| depth == 1)
            .map(|p| format!(" parent {p}"))
            .unwrap_or_default(),
    );
    for child in all
        .iter()
        .filter(|c| c.parent_span_id.as_deref() == Some(span.span_id.as_str()))
    {
        print_span(child, all, depth + 1);
    }
}
