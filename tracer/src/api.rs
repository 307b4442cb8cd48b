//! HTTP API of the daemon: Prometheus `/metrics` and the JSON the CLI reads.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::header,
    response::IntoResponse,
    routing::get,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    conn::Side,
    edges::{EdgeView, WorkloadView},
    otlp,
    pipeline::Shared,
    spans::{Span, span_name},
};

/// A finished span, as `/api/spans` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpanView {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    /// SERVER or CLIENT.
    pub kind: String,
    pub name: String,
    pub service: String,
    pub pid: u32,
    pub start_unix_nano: u64,
    pub duration_ms: f64,
    pub status_code: u16,
    pub error: bool,
    pub sampled: bool,
    pub server: String,
    pub client: String,
}

impl SpanView {
    fn of(span: &Span, names: &otlp::ServiceNames) -> Self {
        let f = span.finished.as_ref();
        let status = f.map_or(0, |f| f.status);
        Self {
            trace_id: format!("{:032x}", span.trace_id),
            span_id: format!("{:016x}", span.span_id),
            parent_span_id: span.parent.id().map(|p| format!("{p:016x}")),
            kind: match span.kind {
                Side::Server => "SERVER".to_owned(),
                Side::Client => "CLIENT".to_owned(),
            },
            name: f.map_or_else(|| "HTTP".to_owned(), span_name),
            service: names.of(&span.task.comm.as_str()),
            pid: span.task.tgid,
            start_unix_nano: otlp::wall_ns(span.start_ns),
            duration_ms: f.map_or(0.0, |f| f.end_ns.saturating_sub(span.start_ns) as f64 / 1e6),
            status_code: status,
            error: otlp::is_error(span.kind, status),
            sampled: span.sampled,
            server: span.server_addr().to_string(),
            client: span.client_addr().to_string(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SpansResponse {
    pub spans: Vec<SpanView>,
}

#[derive(Debug, Deserialize)]
pub struct SpansQuery {
    limit: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EdgesResponse {
    pub edges: Vec<EdgeView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StatResponse {
    pub workloads: Vec<WorkloadView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusResponse {
    pub ready: bool,
    pub uptime_seconds: f64,
    pub programs: usize,
    pub version: String,
}

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/edges", get(edges))
        .route("/api/stat", get(stat))
        .route("/api/status", get(status))
        .route("/api/spans", get(spans))
        .with_state(shared);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await?;
    Ok(())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}

async fn edges(State(shared): State<Arc<Shared>>) -> Json<EdgesResponse> {
    let agg = shared.aggregator.lock().unwrap_or_else(|p| p.into_inner());
    Json(EdgesResponse { edges: agg.edges() })
}

async fn stat(State(shared): State<Arc<Shared>>) -> Json<StatResponse> {
    let agg = shared.aggregator.lock().unwrap_or_else(|p| p.into_inner());
    Json(StatResponse {
        workloads: agg.workloads(),
    })
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<StatusResponse> {
    Json(StatusResponse {
        ready: true,
        uptime_seconds: shared.started.elapsed().as_secs_f64(),
        programs: shared.programs,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn spans(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<SpansQuery>,
) -> Json<SpansResponse> {
    let limit = q.limit.unwrap_or(500);
    let recent = shared
        .spans_out
        .recent
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let skip = recent.len().saturating_sub(limit);
    Json(SpansResponse {
        spans: recent
            .iter()
            .skip(skip)
            .map(|s| SpanView::of(s, &shared.spans_out.names))
            .collect(),
    })
}
