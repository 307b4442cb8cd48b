//! HTTP API of the daemon: Prometheus `/metrics`, the JSON and event streams the CLI and the
//! dashboard read, and the dashboard itself.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use futures_util::{Stream, StreamExt as _, future};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{BroadcastStream, IntervalStream, errors::BroadcastStreamRecvError};
use tokio_util::sync::CancellationToken;

use crate::{
    conn::Side,
    dashboard,
    edges::{Aggregator, EdgeView, NodeView, RouteView, TopologyEdge, WorkloadView},
    otlp,
    pipeline::Shared,
    spans::{Span, span_name},
    tap,
    tcp::TcpEdgeView,
    window::Window,
};

/// How often `/api/stream` sends a topology snapshot.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(2);

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
            service: names.of(&span.task),
            pid: span.task.tgid,
            start_unix_nano: otlp::wall_ns(span.start_ns),
            duration_ms: f.map_or(0.0, |f| f.end_ns.saturating_sub(span.start_ns) as f64 / 1e6),
            status_code: status,
            error: f.is_some_and(|f| otlp::is_error(span.kind, status, f.grpc_status)),
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
    trace_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WindowQuery {
    window: Option<String>,
    workload: Option<String>,
}

impl WindowQuery {
    fn window(&self) -> Result<Window, ApiError> {
        self.window
            .as_deref()
            .map_or(Ok(Window::default()), Window::parse)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))
    }
}

/// An error answered as `{"error": ...}`.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// An answer about a window: which one, how long it really covers (less when the daemon is
/// younger), and the figures (flattened beside them in JSON).
#[derive(Debug, Serialize, Deserialize)]
pub struct InWindow<T> {
    pub window: String,
    pub window_seconds: f64,
    #[serde(flatten)]
    pub body: T,
}

impl<T> InWindow<T> {
    fn of(agg: &Aggregator, w: Window, body: T) -> Self {
        Self {
            window: w.as_str().to_owned(),
            window_seconds: agg.clock().window_seconds(w),
            body,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Edges {
    pub edges: Vec<EdgeView>,
    /// TCP connections between workloads, whatever they carry (counted since the daemon
    /// started, not over the window).
    #[serde(default)]
    pub tcp: Vec<TcpEdgeView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Stat {
    pub workloads: Vec<WorkloadView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Topology {
    pub nodes: Vec<NodeView>,
    pub edges: Vec<TopologyEdge>,
    /// As in [`Edges`].
    #[serde(default)]
    pub tcp: Vec<TcpEdgeView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Routes {
    pub workload: String,
    pub routes: Vec<RouteView>,
}

pub type EdgesResponse = InWindow<Edges>;
pub type StatResponse = InWindow<Stat>;
pub type TopologyResponse = InWindow<Topology>;
pub type RoutesResponse = InWindow<Routes>;

#[derive(Debug, Serialize, Deserialize)]
pub struct StatusResponse {
    pub ready: bool,
    /// The data path that attached: socket, raw-tracepoint or tracepoint.
    pub attach: String,
    /// Whether spans are built (false with `tracer run --no-spans`).
    #[serde(default = "yes")]
    pub spans: bool,
    pub uptime_seconds: f64,
    pub programs: usize,
    /// TLS library files whose calls are hooked (their plaintext is followed).
    #[serde(default)]
    pub tls_libraries: i64,
    pub version: String,
}

fn yes() -> bool {
    true
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
        .route("/api/routes", get(routes))
        .route("/api/topology", get(topology))
        .route("/api/stream", get(stream))
        .route("/api/tap", get(tap_stream))
        .route("/api/status", get(status))
        .route("/api/spans", get(spans))
        .merge(dashboard::router())
        .with_state(AppState {
            shared,
            token: token.clone(),
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await?;
    Ok(())
}

#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
    /// Ends the event streams at shutdown.
    token: CancellationToken,
}

async fn metrics(State(AppState { shared, .. }): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}

async fn edges(
    State(AppState { shared, .. }): State<AppState>,
    Query(q): Query<WindowQuery>,
) -> Result<Json<EdgesResponse>, ApiError> {
    let w = q.window()?;
    let tcp = shared.tcp().view();
    let agg = shared.aggregator();
    Ok(Json(InWindow::of(
        &agg,
        w,
        Edges {
            edges: agg.edges(w),
            tcp,
        },
    )))
}

async fn stat(
    State(AppState { shared, .. }): State<AppState>,
    Query(q): Query<WindowQuery>,
) -> Result<Json<StatResponse>, ApiError> {
    let w = q.window()?;
    let agg = shared.aggregator();
    let mut workloads = agg.workloads(w);
    {
        let tcp = shared.tcp();
        for x in &mut workloads {
            x.tcp_open = tcp.open_to(&x.name);
        }
    }
    Ok(Json(InWindow::of(&agg, w, Stat { workloads })))
}

async fn routes(
    State(AppState { shared, .. }): State<AppState>,
    Query(q): Query<WindowQuery>,
) -> Result<Json<RoutesResponse>, ApiError> {
    let w = q.window()?;
    let Some(workload) = q.workload.clone().filter(|w| !w.is_empty()) else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "workload= is required".to_owned(),
        ));
    };
    let agg = shared.aggregator();
    let routes = agg.routes(&workload, w).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no request to workload {workload:?} seen"),
        )
    })?;
    Ok(Json(InWindow::of(&agg, w, Routes { workload, routes })))
}

fn topology_of(shared: &Shared, w: Window) -> TopologyResponse {
    let tcp = shared.tcp().view();
    let agg = shared.aggregator();
    let (nodes, edges) = agg.topology(w);
    InWindow::of(&agg, w, Topology { nodes, edges, tcp })
}

async fn topology(
    State(AppState { shared, .. }): State<AppState>,
    Query(q): Query<WindowQuery>,
) -> Result<Json<TopologyResponse>, ApiError> {
    Ok(Json(topology_of(&shared, q.window()?)))
}

/// The topology as server-sent events, a `snapshot` every [`SNAPSHOT_EVERY`].
async fn stream(
    State(AppState { shared, token }): State<AppState>,
    Query(q): Query<WindowQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let w = q.window()?;
    let ticks = IntervalStream::new(tokio::time::interval(SNAPSHOT_EVERY));
    let events = ticks
        .map(move |_| {
            let snap = topology_of(&shared, w);
            Ok(Event::default()
                .event("snapshot")
                .json_data(snap)
                .unwrap_or_else(|_| Event::default().comment("unserialisable")))
        })
        .take_until(token.cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// The live request stream, filtered: a `request` event per request, and `dropped` when this
/// subscriber fell behind and skipped some.
async fn tap_stream(
    State(AppState { shared, token }): State<AppState>,
    Query(filter): Query<tap::Filter>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = shared.tap.subscribe();
    let events = BroadcastStream::new(rx)
        .filter_map(move |r| {
            let ev = match r {
                Ok(ev) if filter.matches(&ev) => {
                    Event::default().event("request").json_data(&*ev).ok()
                }
                Ok(_) => None,
                Err(BroadcastStreamRecvError::Lagged(n)) => {
                    shared.metrics.tap_dropped.inc_by(n);
                    Event::default()
                        .event("dropped")
                        .json_data(serde_json::json!({ "dropped": n }))
                        .ok()
                }
            };
            future::ready(ev.map(Ok))
        })
        .take_until(token.cancelled_owned());
    Sse::new(events).keep_alive(KeepAlive::default())
}

async fn status(State(AppState { shared, .. }): State<AppState>) -> Json<StatusResponse> {
    Json(StatusResponse {
        ready: true,
        attach: shared.attach.to_owned(),
        spans: shared.spans,
        uptime_seconds: shared.started.elapsed().as_secs_f64(),
        programs: shared.programs,
        tls_libraries: shared.metrics.tls_libraries.get(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn spans(
    State(AppState { shared, .. }): State<AppState>,
    Query(q): Query<SpansQuery>,
) -> Result<Json<SpansResponse>, ApiError> {
    let limit = q.limit.unwrap_or(500);
    let trace = match q.trace_id.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => Some(u128::from_str_radix(t, 16).map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("trace_id {t:?} is not hexadecimal"),
            )
        })?),
        None => None,
    };
    let recent = shared
        .spans_out
        .recent
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let mut spans: Vec<SpanView> = recent
        .iter()
        .rev()
        .filter(|s| trace.is_none_or(|t| s.trace_id == t))
        .take(limit)
        .map(|s| SpanView::of(s, &shared.spans_out.names))
        .collect();
    spans.reverse();
    Ok(Json(SpansResponse { spans }))
}
