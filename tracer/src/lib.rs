//! The daemon's stages, as a library so that benchmarks can drive them (`benches/`); the
//! binary is `src/main.rs`. The data path, in order: `capture` (load and attach the eBPF
//! programs) -> `event` (decode ring-buffer records) -> `threads` (name their threads) -> `conn` and `http1` (follow each
//! connection, pair requests with responses) -> `edges`, `window` and `route` (golden metrics)
//! and `spans` (joined into traces) -> `metrics`, `api`, `dashboard`, `tap` and `otlp` (out).

pub mod api;
#[cfg(test)]
mod bpf_stack;
pub mod capture;
pub mod cli;
pub mod conn;
pub mod dashboard;
pub mod edges;
mod elfsym;
pub mod event;
pub mod heads;
pub mod hpack;
pub mod http1;
pub mod http2;
pub mod kube;
pub mod ledger;
pub mod metrics;
pub mod otlp;
pub mod parts;
pub mod pipeline;
mod priority;
pub mod reorder;
pub mod ring;
pub mod route;
pub mod spans;
pub mod streams;
pub mod tap;
pub mod tcp;
pub mod threads;
pub mod tls;
pub mod top;
pub mod window;
pub mod workload;
