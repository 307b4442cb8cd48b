//! HTTP API of the daemon: Prometheus `/metrics` and the JSON the CLI reads.

use std::sync::Arc;

use axum::{Json, Router, extract::State, http::header, response::IntoResponse, routing::get};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    edges::{EdgeView, WorkloadView},
    pipeline::Shared,
};

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
