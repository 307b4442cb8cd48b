//! The live request stream (`tracer tap`, `tracer top`, the dashboard's tap view): one event per
//! counted request, broadcast to subscribers. Nothing is built while nobody listens.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{
    conn::{Exchange, Side},
    edges::Recorded,
    otlp,
};

/// Requests buffered per subscriber before a slow one skips (and is told how many).
pub const BUFFER: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TapEvent {
    /// When the request started, unix milliseconds.
    pub ts_ms: f64,
    pub src: String,
    pub dst: String,
    pub src_addr: String,
    pub dst_addr: String,
    pub method: String,
    pub path: String,
    pub route: String,
    pub status: u16,
    /// gRPC's status, for gRPC.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grpc_status: Option<u32>,
    /// A 5xx, or a gRPC status other than OK.
    #[serde(default)]
    pub failed: bool,
    /// Seen as a TLS library's plaintext: the connection is encrypted.
    #[serde(default)]
    pub tls: bool,
    pub latency_ms: f64,
    /// Which end measured it: the server when it is on this host.
    pub observer: String,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
}

impl TapEvent {
    pub fn of(ex: &Exchange, rec: &Recorded<'_>) -> Self {
        let (client, server, observer) = match ex.side {
            Side::Server => (ex.tuple.remote, ex.tuple.local, "server"),
            Side::Client => (ex.tuple.local, ex.tuple.remote, "client"),
        };
        Self {
            ts_ms: otlp::wall_ns(ex.start_ns) as f64 / 1e6,
            src: rec.src.to_owned(),
            dst: rec.dst.to_owned(),
            src_addr: client.to_string(),
            dst_addr: server.to_string(),
            method: ex.method.as_str().to_owned(),
            path: ex.path.to_string(),
            route: rec.route.to_string(),
            status: ex.status,
            grpc_status: ex.grpc_status,
            failed: ex.failed(),
            tls: ex.tls,
            latency_ms: ex.end_ns.saturating_sub(ex.start_ns) as f64 / 1e6,
            observer: observer.to_owned(),
            trace_id: None,
            span_id: ex.span.map(|s| format!("{s:016x}")),
        }
    }
}

/// What a subscriber asked to see; empty fields match everything.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Filter {
    pub to: Option<String>,
    pub from: Option<String>,
    /// Path prefix.
    pub path: Option<String>,
    pub method: Option<String>,
}

impl Filter {
    pub fn matches(&self, e: &TapEvent) -> bool {
        let is = |want: &Option<String>, have: &str| {
            want.as_deref()
                .is_none_or(|w| w.is_empty() || w.eq_ignore_ascii_case(have))
        };
        is(&self.to, &e.dst)
            && is(&self.from, &e.src)
            && is(&self.method, &e.method)
            && self.path.as_deref().is_none_or(|p| e.path.starts_with(p))
    }

    /// As a query string for `/api/tap`.
    pub fn query(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("to", &self.to),
            ("from", &self.from),
            ("path", &self.path),
            ("method", &self.method),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k}={}", encode(v)));
            }
        }
        parts.join("&")
    }
}

/// Percent-encodes a query value.
pub fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub type Sender = broadcast::Sender<Arc<TapEvent>>;

pub fn channel() -> Sender {
    broadcast::channel(BUFFER).0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> TapEvent {
        TapEvent {
            ts_ms: 0.0,
            src: "curl".into(),
            dst: "nginx".into(),
            src_addr: String::new(),
            dst_addr: String::new(),
            method: "GET".into(),
            path: "/api/users/1".into(),
            route: "/api/users/{id}".into(),
            status: 200,
            grpc_status: None,
            failed: false,
            tls: false,
            latency_ms: 1.0,
            observer: "server".into(),
            trace_id: None,
            span_id: None,
        }
    }

    #[test]
    fn filters() {
        assert!(Filter::default().matches(&ev()));
        let f = Filter {
            to: Some("nginx".into()),
            path: Some("/api/".into()),
            method: Some("get".into()),
            ..Default::default()
        };
        assert!(f.matches(&ev()));
        assert!(
            !Filter {
                from: Some("python3".into()),
                ..Default::default()
            }
            .matches(&ev())
        );
        assert!(
            !Filter {
                path: Some("/other".into()),
                ..Default::default()
            }
            .matches(&ev())
        );
        assert_eq!(f.query(), "to=nginx&path=/api/&method=get");
    }
}
