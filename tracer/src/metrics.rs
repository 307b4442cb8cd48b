//! Prometheus metrics: request totals and latencies per edge and route, and the daemon's own
//! health (events, losses, parse failures, connections).

use prometheus::{
    CounterVec, Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency bucket bounds in seconds: from 100 µs (loopback, in-memory handlers) to 10 s, about
/// 2.5x apart so that p50/p99 interpolation stays within a bucket's width of the truth.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Labels of request series, in order.
/// `grpc_status` is gRPC's own (`0` OK, `14` UNAVAILABLE...), empty for other requests: a gRPC
/// call that failed is answered with HTTP status 200.
pub const REQUEST_LABELS: &[&str] = &[
    "source",
    "destination",
    "method",
    "route",
    "status",
    "grpc_status",
];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub events: IntCounterVec,
    pub decode_errors: IntCounterVec,
    pub kernel: IntCounterVec,
    pub parse_failures: IntCounterVec,
    pub pairing_drops: IntCounterVec,
    pub conns_tracked: IntGauge,
    pub tls_libraries: IntGauge,
    pub conn_evictions: IntCounter,
    pub connections_desynced: IntCounter,
    pub events_reordered: IntCounter,
    pub reader_raises: IntCounter,
    pub thread_names: IntCounterVec,
    pub series_overflow: IntCounterVec,
    pub series_expired: IntCounterVec,
    pub tap_dropped: IntCounter,
    pub heads_shared: IntCounter,
    pub spans: IntCounterVec,
    pub requests_lost: IntCounterVec,
    pub lost_deferred: IntCounterVec,
    pub bpf_run_seconds: CounterVec,
    pub bpf_runs: IntCounterVec,
    pub tcp_connections: IntCounterVec,
    pub tcp_open: IntGaugeVec,
    pub tcp_bytes: IntCounterVec,
    pub tcp_retransmits: IntCounterVec,
    pub tcp_rtt: HistogramVec,
    pub kube_addresses: IntGaugeVec,
    pub kube_errors: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tracer_http_requests_total",
                "HTTP requests seen, by client and server workload, method, route, status code \
                 and gRPC status.",
            ),
            REQUEST_LABELS,
        )
        .expect("valid metric");
        let mut latency_labels = REQUEST_LABELS.to_vec();
        latency_labels.push("observer");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "tracer_http_request_duration_seconds",
                "From the request's first byte to the response's last byte, as the server \
                 (observer=server) or the client (observer=client) saw it.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &latency_labels,
        )
        .expect("valid metric");
        let events = IntCounterVec::new(
            Opts::new(
                "tracer_events_total",
                "Events read from the ring buffer, by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let decode_errors = IntCounterVec::new(
            Opts::new(
                "tracer_decode_errors_total",
                "Ring-buffer records that could not be decoded, or parts of a call sent in several records that could not be joined (unjoined_part: its first part was lost; joined_call_truncated: past 256 KiB).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let kernel = IntCounterVec::new(
            Opts::new(
                "tracer_kernel_events_total",
                "Counters kept by the eBPF programs: ringbuf_full_* are events lost because the \
                 ring buffer was full.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let parse_failures = IntCounterVec::new(
            Opts::new(
                "tracer_parse_failures_total",
                "Bytes on a connection that could not be followed as HTTP/1.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let pairing_drops = IntCounterVec::new(
            Opts::new(
                "tracer_pairing_drops_total",
                "Requests or responses that could not be paired.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let conns_tracked = IntGauge::new(
            "tracer_connections_tracked",
            "Connections whose HTTP state is followed now.",
        )
        .expect("valid metric");
        let kube_addresses = IntGaugeVec::new(
            Opts::new(
                "tracer_kube_addresses",
                "Addresses of pods and services on any node named from the Kubernetes API, by \
                 resource.",
            ),
            &["resource"],
        )
        .expect("valid metric");
        let kube_errors = IntCounterVec::new(
            Opts::new(
                "tracer_kube_errors_total",
                "Kubernetes API requests that failed (reason=request; retried) and addresses not \
                 kept because the directory was full (reason=full), by resource.",
            ),
            &["resource", "reason"],
        )
        .expect("valid metric");
        let tls_libraries = IntGauge::new(
            "tracer_tls_libraries",
            "TLS library files (libssl, libgnutls) whose read, write and handshake calls are hooked, and Go programs whose crypto/tls reads and writes are.",
        )
        .expect("valid metric");
        let conn_evictions = IntCounter::new(
            "tracer_connection_evictions_total",
            "Connections forgotten to make room in the connection table.",
        )
        .expect("valid metric");
        let connections_desynced = IntCounter::new(
            "tracer_connections_desynced_total",
            "Times a connection's events were lost (ring buffer full) and its pairing restarted.",
        )
        .expect("valid metric");
        let reader_raises = IntCounter::new(
            "tracer_reader_priority_raises_total",
            "Times the reader thread's priority was raised (nice -10) because a ring buffer was \
             half full; lowered again once under an eighth.",
        )
        .expect("valid metric");
        let events_reordered = IntCounter::new(
            "tracer_events_reordered_total",
            "A socket's events that reached the daemon after the socket's next one (two threads \
             using one socket at once on two CPUs) and were put back in order.",
        )
        .expect("valid metric");
        let thread_names = IntCounterVec::new(
            Opts::new(
                "tracer_thread_names_total",
                "The kernel names a socket's thread (and its cgroup) once, not per event; the \
                 daemon remembers them. forgotten: threads dropped to keep that table bounded; \
                 unknown: events whose thread the daemon did not know, shown unnamed (until \
                 that socket's next named event, at most 256 events on).",
            ),
            &["event"],
        )
        .expect("valid metric");
        let spans = IntCounterVec::new(
            Opts::new(
                "tracer_spans_total",
                "Spans by outcome: exported; dropped_queue_full / dropped_export_failed (collector \
                 slow or down); unsampled; not_recorded (span table full); unfinished (the \
                 request was never answered); late_link (joined to its client end at finish).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let requests_lost = IntCounterVec::new(
            Opts::new(
                "tracer_requests_lost_total",
                "Requests that happened but are not in tracer_http_requests_total: their events \
                 were dropped in the kernel (ring buffer full), or they were in flight on a \
                 connection whose events were lost. By the end that would have counted them.",
            ),
            &["side", "reason"],
        )
        .expect("valid metric");
        let lost_deferred = IntCounterVec::new(
            Opts::new(
                "tracer_requests_lost_deferred_total",
                "Requests a server end lost whose client end is traced on this host, by what \
                 became of them: settled (the client end counted the request: not counted \
                 lost), counted (in tracer_requests_lost_total after waiting for the client \
                 end), full (counted at once: too many waiting).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let bpf_run_seconds = CounterVec::new(
            Opts::new(
                "tracer_bpf_run_seconds_total",
                "Time spent in each eBPF program (only while `tracer run --bpf-stats`).",
            ),
            &["program"],
        )
        .expect("valid metric");
        let bpf_runs = IntCounterVec::new(
            Opts::new(
                "tracer_bpf_runs_total",
                "Runs of each eBPF program (only while `tracer run --bpf-stats`).",
            ),
            &["program"],
        )
        .expect("valid metric");
        let series_overflow = IntCounterVec::new(
            Opts::new(
                "tracer_series_overflow_total",
                "Requests folded into an [other] route or edge because a table was full.",
            ),
            &["table"],
        )
        .expect("valid metric");
        let series_expired = IntCounterVec::new(
            Opts::new(
                "tracer_series_expired_total",
                "Edges and routes forgotten after 10 minutes without a request.",
            ),
            &["table"],
        )
        .expect("valid metric");
        let tap_dropped = IntCounter::new(
            "tracer_tap_dropped_total",
            "Requests a tap stream skipped because its client read too slowly.",
        )
        .expect("valid metric");
        let heads_shared = IntCounter::new(
            "tracer_http_heads_shared_total",
            "HTTP heads taken as the other end of their connection, on this host, parsed them \
             (the same bytes) rather than parsed again.",
        )
        .expect("valid metric");
        let tcp_connections = IntCounterVec::new(
            Opts::new(
                "tracer_tcp_connections_total",
                "TCP connects made by processes on this host, whatever the connection carries, by \
                 client and server workload (or address) and outcome: established, or failed \
                 (refused, timed out, unreachable).",
            ),
            &["source", "destination", "outcome"],
        )
        .expect("valid metric");
        let tcp_open = IntGaugeVec::new(
            Opts::new(
                "tracer_tcp_connections_open",
                "TCP connections open now, of those whose connect was seen, by client and server.",
            ),
            &["source", "destination"],
        )
        .expect("valid metric");
        let tcp_bytes = IntCounterVec::new(
            Opts::new(
                "tracer_tcp_bytes_total",
                "Bytes of TCP connections made on this host, by client and server, counted at each \
                 connection's close from the client's end: sent (and acknowledged) or received.",
            ),
            &["source", "destination", "direction"],
        )
        .expect("valid metric");
        let tcp_retransmits = IntCounterVec::new(
            Opts::new(
                "tracer_tcp_retransmits_total",
                "Segments the client's end of TCP connections made on this host retransmitted, \
                 by client and server, counted at each connection's close.",
            ),
            &["source", "destination"],
        )
        .expect("valid metric");
        let tcp_rtt = HistogramVec::new(
            HistogramOpts::new(
                "tracer_tcp_rtt_seconds",
                "The kernel's smoothed round-trip time of each TCP connection made on this host, \
                 at its close, by client and server.",
            )
            .buckets(vec![
                0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0,
            ]),
            &["source", "destination"],
        )
        .expect("valid metric");
        for c in [
            Box::new(series_expired.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(tcp_retransmits.clone()),
            Box::new(tcp_rtt.clone()),
            Box::new(kube_addresses.clone()),
            Box::new(kube_errors.clone()),
            Box::new(tcp_bytes.clone()),
            Box::new(tcp_connections.clone()),
            Box::new(tcp_open.clone()),
            Box::new(tap_dropped.clone()),
            Box::new(heads_shared.clone()),
            Box::new(requests.clone()),
            Box::new(latency.clone()),
            Box::new(events.clone()),
            Box::new(decode_errors.clone()),
            Box::new(kernel.clone()),
            Box::new(parse_failures.clone()),
            Box::new(pairing_drops.clone()),
            Box::new(conns_tracked.clone()),
            Box::new(tls_libraries.clone()),
            Box::new(conn_evictions.clone()),
            Box::new(connections_desynced.clone()),
            Box::new(events_reordered.clone()),
            Box::new(reader_raises.clone()),
            Box::new(thread_names.clone()),
            Box::new(series_overflow.clone()),
            Box::new(spans.clone()),
            Box::new(requests_lost.clone()),
            Box::new(lost_deferred.clone()),
            Box::new(bpf_run_seconds.clone()),
            Box::new(bpf_runs.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        // Series that exist from the start, so that a zero is visible rather than absent.
        for reason in [
            "ringbuf_full_data",
            "ringbuf_full_conn",
            "args_map_full",
            "payload_read_failed",
        ] {
            kernel.with_label_values(&[reason]);
        }
        for reason in [
            "unknown_protocol",
            "encrypted",
            "invalid_head",
            "truncated_head",
        ] {
            parse_failures.with_label_values(&[reason]);
        }
        for event in ["forgotten", "unknown"] {
            thread_names.with_label_values(&[event]);
        }
        for outcome in ["exported", "dropped_queue_full", "dropped_export_failed"] {
            spans.with_label_values(&[outcome]);
        }
        for side in ["server", "client"] {
            for reason in [
                "ringbuf_full",
                "events_lost",
                "request_beyond_capture",
                "response_beyond_capture",
            ] {
                requests_lost.with_label_values(&[side, reason]);
            }
        }
        Self {
            registry,
            requests,
            latency,
            events,
            decode_errors,
            kernel,
            parse_failures,
            pairing_drops,
            conns_tracked,
            tls_libraries,
            conn_evictions,
            connections_desynced,
            events_reordered,
            reader_raises,
            thread_names,
            series_overflow,
            series_expired,
            tap_dropped,
            heads_shared,
            spans,
            requests_lost,
            lost_deferred,
            bpf_run_seconds,
            bpf_runs,
            tcp_connections,
            tcp_open,
            tcp_bytes,
            tcp_retransmits,
            tcp_rtt,
            kube_addresses,
            kube_errors,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!("encoding metrics: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
