//! OTLP export of synthesised spans, over gRPC or HTTP/protobuf, configured by the standard
//! `OTEL_EXPORTER_OTLP_*` variables (or flags).
//!
//! Spans are built with the official protocol types (opentelemetry-proto) rather than through
//! the SDK's span pipeline: the SDK exporter carries one resource and generates its own ids,
//! while a passive tracer reports for many processes at once (one resource each) with ids it
//! derived itself. A bounded queue sits between capture and export: a collector that is down or
//! slow costs dropped spans (counted), never a stalled capture.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span as ProtoSpan, Status, span::SpanKind, status},
};
use prost::Message as _;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    conn::Side,
    metrics::Metrics,
    spans::{Parent, Span, span_name},
};

/// Spans waiting for export; beyond it they are dropped (and counted).
pub const QUEUE: usize = 8192;
/// Spans per export request.
const BATCH: usize = 512;
/// Longest wait before a partial batch is sent.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Longest an export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub protocol: Protocol,
    /// Where requests go: the gRPC endpoint, or the full URL of the HTTP traces path.
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("unknown OTLP protocol {0:?}: use grpc or http/protobuf")]
    Protocol(String),
    #[error("bad OTLP header {0:?}: use key=value pairs separated by commas")]
    Header(String),
}

/// Reads the standard variables, flags taking precedence; None when no endpoint is set
/// (export is off unless configured).
pub fn config(
    endpoint_flag: Option<&str>,
    protocol_flag: Option<&str>,
    header_flags: &[String],
) -> Result<Option<Config>, ConfigError> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let protocol = match protocol_flag
        .map(str::to_owned)
        .or_else(|| var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .as_deref()
        .map(str::trim)
    {
        None | Some("http/protobuf") => Protocol::HttpProtobuf,
        Some("grpc") => Protocol::Grpc,
        Some(other) => return Err(ConfigError::Protocol(other.to_owned())),
    };
    // A traces-specific endpoint is used as is; the generic one gets /v1/traces over HTTP.
    let endpoint = if let Some(e) = endpoint_flag.map(str::to_owned) {
        e
    } else if let Some(e) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        e
    } else if let Some(e) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        match protocol {
            Protocol::Grpc => e,
            Protocol::HttpProtobuf => format!("{}/v1/traces", e.trim_end_matches('/')),
        }
    } else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    let env_headers = var("OTEL_EXPORTER_OTLP_HEADERS")
        .into_iter()
        .chain(var("OTEL_EXPORTER_OTLP_TRACES_HEADERS"));
    for list in env_headers.chain(header_flags.iter().cloned()) {
        for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| ConfigError::Header(pair.to_owned()))?;
            headers.push((k.trim().to_lowercase(), percent_decode(v.trim())));
        }
    }
    Ok(Some(Config {
        protocol,
        endpoint,
        headers,
    }))
}

/// Header values in the variables are URL-encoded (W3C Baggage octet rules).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `service.name` per process, with overrides (`--service name=service`, by process name or
/// workload name).
#[derive(Clone, Debug, Default)]
pub struct ServiceNames {
    overrides: HashMap<String, String>,
}

impl ServiceNames {
    pub fn parse(pairs: &[String]) -> Result<Self, String> {
        let mut overrides = HashMap::new();
        for p in pairs {
            let (comm, name) = p
                .split_once('=')
                .ok_or_else(|| format!("bad --service {p:?}: use process=service"))?;
            overrides.insert(comm.trim().to_owned(), name.trim().to_owned());
        }
        Ok(Self { overrides })
    }

    /// The service of a process: an override for its process name or its workload name, else
    /// its workload name (see [`crate::workload`]).
    pub fn of(&self, task: &crate::event::Task) -> String {
        if let Some(name) = self.overrides.get(&*task.comm.as_str()) {
            return name.clone();
        }
        let workload = crate::workload::name(task);
        self.overrides
            .get(&*workload)
            .cloned()
            .unwrap_or_else(|| workload.to_string())
    }
}

pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".to_owned();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Wall-clock nanoseconds of a CLOCK_MONOTONIC timestamp from the kernel.
///
/// The offset between the clocks is taken once, so that spans converted at different times
/// keep their exact relative positions (a child never leaves its parent's window).
pub fn wall_ns(mono_ns: u64) -> u64 {
    static OFFSET: std::sync::OnceLock<i128> = std::sync::OnceLock::new();
    let offset = *OFFSET.get_or_init(|| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128;
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        wall - mono
    });
    (mono_ns as i128 + offset).max(0) as u64
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(v: impl Into<String>) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

fn i(v: i64) -> any_value::Value {
    any_value::Value::IntValue(v)
}

/// Attributes of a span by the stable HTTP semantic conventions.
pub fn attributes(span: &Span) -> Vec<KeyValue> {
    let mut a = Vec::with_capacity(12);
    let server = span.server_addr();
    let client = span.client_addr();
    if let Some(f) = &span.finished {
        a.push(kv("http.request.method", s(f.method.as_str())));
        a.push(kv("url.path", s(f.path.to_string())));
        a.push(kv("url.scheme", s(if span.tls { "https" } else { "http" })));
        a.push(kv("http.route", s(f.route.to_string())));
        if f.status == crate::conn::NO_RESPONSE {
            // Closed or reset by the server with the request unanswered.
            a.push(kv("error.type", s("no_response")));
        } else {
            a.push(kv("http.response.status_code", i(i64::from(f.status))));
        }
        if let Some(g) = f.grpc_status {
            a.push(kv("rpc.system", s("grpc")));
            a.push(kv("rpc.grpc.status_code", i(i64::from(g))));
        }
        // Whole messages, head included (the experimental *.size attributes).
        a.push(kv("http.request.size", i(f.req_bytes as i64)));
        a.push(kv("http.response.size", i(f.resp_bytes as i64)));
    }
    a.push(kv("server.address", s(server.ip().to_string())));
    a.push(kv("server.port", i(i64::from(server.port()))));
    let peer = match span.kind {
        Side::Server => {
            a.push(kv("client.address", s(client.ip().to_string())));
            a.push(kv("client.port", i(i64::from(client.port()))));
            client
        }
        Side::Client => server,
    };
    // The peer on another node, as the Kubernetes API named it: tracing backends draw an
    // uninstrumented peer of their service graph from it.
    if let Some(name) = crate::kube::name_of(peer.ip()) {
        a.push(kv("peer.service", s(name.to_string())));
    }
    a.push(kv("network.peer.address", s(peer.ip().to_string())));
    a.push(kv("network.peer.port", i(i64::from(peer.port()))));
    a.push(kv("network.transport", s("tcp")));
    a.push(kv("network.protocol.name", s("http")));
    a.push(kv("network.protocol.version", s(span.version)));
    a
}

/// Error for 5xx at servers, for 4xx and 5xx at clients, and for no response at all; for gRPC,
/// by the RPC conventions: any status but OK at clients, UNKNOWN, DEADLINE_EXCEEDED,
/// UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS at servers.
pub fn is_error(kind: Side, status: u16, grpc_status: Option<u32>) -> bool {
    if status == crate::conn::NO_RESPONSE {
        return true;
    }
    match (kind, grpc_status) {
        (Side::Server, Some(g)) => status >= 500 || matches!(g, 2 | 4 | 12 | 13 | 14 | 15),
        (Side::Client, Some(g)) => status >= 400 || g != 0,
        (Side::Server, None) => status >= 500,
        (Side::Client, None) => status >= 400,
    }
}

fn proto_span(span: &Span) -> ProtoSpan {
    let f = span.finished.as_ref();
    let status_code = f.map_or(0, |f| f.status);
    ProtoSpan {
        trace_id: span.trace_id.to_be_bytes().to_vec(),
        span_id: span.span_id.to_be_bytes().to_vec(),
        trace_state: span.tracestate.clone().unwrap_or_default(),
        parent_span_id: span
            .parent
            .id()
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        // W3C sampled flag, and the "has is-remote" / "is remote" bits of the parent.
        flags: 0x01
            | match span.parent {
                Parent::Remote(_) => 0x300,
                Parent::Local(_) => 0x100,
                Parent::None => 0,
            },
        name: f.map_or_else(|| "HTTP".to_owned(), span_name),
        kind: match span.kind {
            Side::Server => SpanKind::Server as i32,
            Side::Client => SpanKind::Client as i32,
        },
        start_time_unix_nano: wall_ns(span.start_ns),
        end_time_unix_nano: wall_ns(f.map_or(span.start_ns, |f| f.end_ns)),
        attributes: attributes(span),
        status: Some(
            if f.is_some_and(|f| is_error(span.kind, status_code, f.grpc_status)) {
                Status {
                    code: status::StatusCode::Error as i32,
                    message: String::new(),
                }
            } else {
                Status::default()
            },
        ),
        ..Default::default()
    }
}

/// One OTLP request: spans grouped under one resource per process.
pub fn request(spans: &[Span], names: &ServiceNames, host: &str) -> ExportTraceServiceRequest {
    let mut by_process: BTreeMap<(u32, String), (String, Vec<ProtoSpan>)> = BTreeMap::new();
    for span in spans {
        let comm = span.task.comm.as_str().into_owned();
        by_process
            .entry((span.task.tgid, comm))
            .or_insert_with(|| (names.of(&span.task), Vec::new()))
            .1
            .push(proto_span(span));
    }
    let resource_spans = by_process
        .into_iter()
        .map(|((pid, comm), (service, spans))| ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", s(service)),
                    kv("process.pid", i(i64::from(pid))),
                    kv("process.executable.name", s(comm)),
                    kv("host.name", s(host)),
                    kv("telemetry.sdk.name", s("tracer")),
                    kv("telemetry.sdk.language", s("rust")),
                ],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "tracer".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

enum Client {
    Grpc(TraceServiceClient<tonic::transport::Channel>),
    Http(ureq::Agent),
}

async fn send(
    client: &mut Client,
    cfg: &Config,
    req: ExportTraceServiceRequest,
) -> anyhow::Result<()> {
    match client {
        Client::Grpc(c) => {
            let mut r = tonic::Request::new(req);
            for (k, v) in &cfg.headers {
                if let (Ok(k), Ok(v)) = (
                    tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
                    v.parse(),
                ) {
                    r.metadata_mut().insert(k, v);
                }
            }
            tokio::time::timeout(EXPORT_TIMEOUT, c.export(r)).await??;
            Ok(())
        }
        Client::Http(agent) => {
            let agent = agent.clone();
            let url = cfg.endpoint.clone();
            let headers = cfg.headers.clone();
            let body = req.encode_to_vec();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let mut r = agent
                    .post(&url)
                    .header("content-type", "application/x-protobuf");
                for (k, v) in &headers {
                    r = r.header(k, v);
                }
                r.send(&body[..])?;
                Ok(())
            })
            .await??;
            Ok(())
        }
    }
}

/// Sends queued spans until cancelled; failures drop the batch and are counted.
pub async fn run(
    cfg: Config,
    names: ServiceNames,
    mut rx: mpsc::Receiver<Span>,
    metrics: Metrics,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut client = match cfg.protocol {
        Protocol::Grpc => Client::Grpc(TraceServiceClient::new(
            tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())?
                .connect_timeout(EXPORT_TIMEOUT)
                .connect_lazy(),
        )),
        Protocol::HttpProtobuf => Client::Http(
            ureq::Agent::config_builder()
                .timeout_global(Some(EXPORT_TIMEOUT))
                .http_status_as_error(true)
                .build()
                .into(),
        ),
    };
    let host = host_name();
    let exported = metrics.spans.with_label_values(&["exported"]);
    let failed = metrics.spans.with_label_values(&["dropped_export_failed"]);
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    let mut last_error: Option<std::time::Instant> = None;
    loop {
        // Send when a batch is full, once a second, and on the way out.
        let room = BATCH - batch.len();
        let (closed, due) = tokio::select! {
            n = rx.recv_many(&mut batch, room) => (n == 0, n == room),
            _ = tick.tick() => (false, true),
            _ = token.cancelled() => (true, true),
        };
        if (due || closed) && !batch.is_empty() {
            let n = batch.len() as u64;
            let req = request(&batch, &names, &host);
            batch.clear();
            match send(&mut client, &cfg, req).await {
                Ok(()) => exported.inc_by(n),
                Err(e) => {
                    failed.inc_by(n);
                    // One line per 10 s at most: a down collector must not flood the log.
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!("OTLP export to {} failed: {e:#}", cfg.endpoint);
                        last_error = Some(std::time::Instant::now());
                    }
                }
            }
        }
        if closed {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("Basic%20abc%3D"), "Basic abc=");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("k=%aé"), "k=%aé");
        assert_eq!(percent_decode("end%4"), "end%4");
    }

    #[test]
    fn error_status_by_side() {
        assert!(is_error(Side::Server, 503, None));
        assert!(!is_error(Side::Server, 404, None));
        assert!(is_error(Side::Client, 404, None));
        assert!(!is_error(Side::Client, 302, None));
        assert!(is_error(Side::Server, 200, Some(13)));
        // Closed or reset by the server, unanswered.
        assert!(is_error(Side::Server, crate::conn::NO_RESPONSE, None));
        assert!(is_error(Side::Client, crate::conn::NO_RESPONSE, None));
        assert!(!is_error(Side::Server, 200, Some(5)));
        assert!(is_error(Side::Client, 200, Some(5)));
        assert!(!is_error(Side::Client, 200, Some(0)));
    }
}
