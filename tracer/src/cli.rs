//! Command line: `tracer run` starts the daemon; the other verbs read a running daemon's API and
//! print tables in the manner of `linkerd viz`.

use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;

use crate::{
    api::{EdgesResponse, SpanView, SpansResponse, StatResponse},
    edges::Quantiles,
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
        /// (default 16 MiB). Smaller loses events (counted) sooner under bursts.
        #[arg(long, value_parser = parse_ringbuf)]
        ringbuf_bytes: Option<u32>,
    },
    /// Edges between workloads: who calls whom, with success rate, RPS and latency.
    Edges(ClientArgs),
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
        client: ClientArgs,
    },
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

fn fetch<T: DeserializeOwned>(addr: &str, path: &str) -> anyhow::Result<(T, String)> {
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        format!("{}{path}", addr.trim_end_matches('/'))
    } else {
        format!("http://{addr}{path}")
    };
    let body = ureq::get(&url)
        .call()
        .map_err(|e| match e {
            ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                anyhow::anyhow!(
                    "no tracer daemon answers at {addr} ({e}); start one with `sudo tracer run`, \
                     or pass --addr"
                )
            }
            e => anyhow::anyhow!("{url}: {e}"),
        })?
        .body_mut()
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

pub fn edges(args: &ClientArgs) -> anyhow::Result<()> {
    let (resp, raw): (EdgesResponse, _) = fetch(&args.addr, "/api/edges")?;
    if args.output == Output::Json {
        println!("{raw}");
        return Ok(());
    }
    if resp.edges.is_empty() {
        println!("No edges seen yet.");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = resp
        .edges
        .iter()
        .map(|e| {
            let lat = e.server_latency.as_ref().or(e.client_latency.as_ref());
            vec![
                e.src.clone(),
                e.dst.clone(),
                e.dst_addrs.join(","),
                e.requests.to_string(),
                pct(e.success_rate),
                format!("{:.1}", e.rps),
                ms(lat, |q| q.p50_ms),
                ms(lat, |q| q.p95_ms),
                ms(lat, |q| q.p99_ms),
            ]
        })
        .collect();
    print_table(
        &[
            "SRC",
            "DST",
            "DST_ADDR",
            "REQUESTS",
            "SUCCESS",
            "RPS",
            "LATENCY_P50",
            "LATENCY_P95",
            "LATENCY_P99",
        ],
        &rows,
    );
    Ok(())
}

pub fn stat(workload: Option<&str>, args: &ClientArgs) -> anyhow::Result<()> {
    let (mut resp, raw): (StatResponse, _) = fetch(&args.addr, "/api/stat")?;
    if let Some(w) = workload {
        resp.workloads.retain(|x| x.name == w);
        if resp.workloads.is_empty() {
            bail!("no traffic to workload {w:?} seen yet");
        }
    }
    if args.output == Output::Json {
        if workload.is_none() {
            println!("{raw}");
        } else {
            println!("{}", serde_json::to_string(&resp)?);
        }
        return Ok(());
    }
    if resp.workloads.is_empty() {
        println!("No traffic seen yet.");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = resp
        .workloads
        .iter()
        .map(|w| {
            vec![
                w.name.clone(),
                pct(w.success_rate),
                format!("{:.1}", w.rps),
                ms(w.latency.as_ref(), |q| q.p50_ms),
                ms(w.latency.as_ref(), |q| q.p95_ms),
                ms(w.latency.as_ref(), |q| q.p99_ms),
                w.requests.to_string(),
            ]
        })
        .collect();
    print_table(
        &[
            "NAME",
            "SUCCESS",
            "RPS",
            "LATENCY_P50",
            "LATENCY_P95",
            "LATENCY_P99",
            "REQUESTS",
        ],
        &rows,
    );
    Ok(())
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
