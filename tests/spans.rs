//! Spans end to end: real probes, real servers and clients, a real OTLP receiver (the official
//! protocol definitions), and traces checked for shape, ids, timing and conventions.

mod common;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use common::{
    Daemon, Nginx, Server, build_gotls, curl, curl_with, free_port, hooked, median,
    otlp::{Protocol, Received, Receiver},
    scratch, self_signed, serial, wait_hooked,
};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};

fn kind(r: &Received) -> SpanKind {
    SpanKind::try_from(r.span.kind).expect("span kind")
}

fn server_port(r: &Received) -> Option<u16> {
    r.attr_int("server.port").map(|p| p as u16)
}

/// Waits until `pred` holds for the received spans (or 15 s), and returns them.
fn wait_spans(rx: &Receiver, what: &str, pred: impl Fn(&[Received]) -> bool) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let spans = rx.spans();
        if pred(&spans) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: got {} spans",
            spans.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One trace of curl -> a front service -> 2 x a backend: checks its shape (one curl CLIENT
/// span, the root; the front's SERVER span under it; two calls under that; a backend SERVER
/// span under each call) and returns curl's span and the front's.
fn front_trace<'a>(
    trace: &str,
    spans: &[&'a Received],
    front: u16,
    backend: u16,
) -> (&'a Received, &'a Received) {
    let find = |k: SpanKind, port: u16| -> Vec<&'a Received> {
        spans
            .iter()
            .filter(|s| kind(s) == k && server_port(s) == Some(port))
            .copied()
            .collect()
    };
    let root = find(SpanKind::Client, front);
    let served = find(SpanKind::Server, front);
    let calls = find(SpanKind::Client, backend);
    let back = find(SpanKind::Server, backend);
    assert_eq!(
        (root.len(), served.len(), calls.len(), back.len()),
        (1, 1, 2, 2),
        "trace {trace} has the shape curl -> front -> 2 x backend"
    );
    let (root, served) = (root[0], served[0]);
    assert!(
        root.span.parent_span_id.is_empty(),
        "curl's span is the root"
    );
    assert_eq!(served.parent_id(), root.span_id());
    for c in &calls {
        assert_eq!(
            c.parent_id(),
            served.span_id(),
            "the front's call under its request"
        );
    }
    let call_ids: HashSet<String> = calls.iter().map(|c| c.span_id()).collect();
    let back_parents: HashSet<String> = back.iter().map(|b| b.parent_id()).collect();
    assert_eq!(
        back_parents, call_ids,
        "each backend span under its own call"
    );
    (root, served)
}

/// Issue 4, checks 1 and 4: no headers anywhere. curl -> Python ThreadingHTTPServer frontend,
/// which calls a Python backend twice per request with urllib. 20 curl requests give exactly 20
/// traces of curl CLIENT -> frontend SERVER -> 2 x (frontend CLIENT -> backend SERVER), children
/// inside their parents' windows, the root agreeing with curl's own timing; attribute names,
/// kinds and resources as the HTTP semantic conventions say.
#[test]
fn thread_per_request_service_traces_without_headers() {
    let _serial = serial();
    let receiver = Receiver::start(Protocol::Grpc, free_port());
    let _daemon = Daemon::exporting_to(&receiver);
    let backend = Server::fixture();
    let frontend = Server::script("frontend.py", &[backend.port.to_string()]);

    // curl's view of each request, by its local port.
    let mut by_port: HashMap<u16, (f64, f64)> = HashMap::new();
    for i in 0..20 {
        let url = format!("http://127.0.0.1:{}/page/{i}", frontend.port);
        let out = curl(
            &[url],
            "%{http_code} %{local_port} %{time_total} %{time_pretransfer}\n",
        );
        let f: Vec<&str> = out[0].split(' ').collect();
        assert_eq!(f[0], "200", "frontend answered");
        by_port.insert(
            f[1].parse().expect("port"),
            (
                f[2].parse().expect("total"),
                f[3].parse().expect("pretransfer"),
            ),
        );
    }
    let ports = [frontend.port, backend.port];
    let ours = |spans: &[Received]| -> Vec<Received> {
        spans
            .iter()
            .filter(|s| server_port(s).is_some_and(|p| ports.contains(&p)))
            .cloned()
            .collect()
    };
    wait_spans(&receiver, "120 spans", |s| ours(s).len() >= 120);
    // A little longer, so that extra spans would show too.
    std::thread::sleep(Duration::from_secs(1));
    let spans = ours(&receiver.spans());
    assert_eq!(spans.len(), 120, "6 spans per request, no more");

    let mut traces: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for s in &spans {
        traces.entry(s.trace_id()).or_default().push(s);
    }
    assert_eq!(traces.len(), 20, "one trace per curl request");
    let mut roots_ms = Vec::new();
    let mut transfers_ms = Vec::new();
    let mut totals_ms = Vec::new();
    for (trace, spans) in &traces {
        let by_id: HashMap<String, &Received> = spans.iter().map(|s| (s.span_id(), *s)).collect();
        let (root, front) = front_trace(trace, spans, frontend.port, backend.port);
        assert_eq!(
            root.resource_str("process.executable.name").as_deref(),
            Some("curl")
        );
        // Every child inside its parent's window.
        for s in spans.iter().filter(|s| !s.span.parent_span_id.is_empty()) {
            let p = by_id[&s.parent_id()];
            assert!(
                s.span.start_time_unix_nano >= p.span.start_time_unix_nano
                    && s.span.end_time_unix_nano <= p.span.end_time_unix_nano,
                "{} [{}, {}] outside its parent {} [{}, {}]",
                s.span.name,
                s.span.start_time_unix_nano,
                s.span.end_time_unix_nano,
                p.span.name,
                p.span.start_time_unix_nano,
                p.span.end_time_unix_nano
            );
        }
        // The root against curl's own timing for the same request (found by curl's port).
        let curl_port = front.attr_int("client.port").expect("client.port") as u16;
        let (total, pretransfer) = by_port[&curl_port];
        let root_ms = (root.span.end_time_unix_nano - root.span.start_time_unix_nano) as f64 / 1e6;
        assert!(
            root_ms <= total * 1000.0 + 0.2,
            "root {root_ms} ms longer than curl's time_total {} ms",
            total * 1000.0
        );
        roots_ms.push(root_ms);
        transfers_ms.push((total - pretransfer) * 1000.0);
        totals_ms.push(total * 1000.0);
    }
    // Medians: the root spans from curl's write of the request to its read of the last byte,
    // a part of time_total (which adds connection set-up): between curl's median
    // time_total - time_pretransfer (less 20% or 0.5 ms) and its median time_total.
    let total_p50 = median(totals_ms);
    let (root_p50, transfer_p50) = (median(roots_ms), median(transfers_ms));
    eprintln!(
        "root span median {root_p50:.3} ms; curl median time_total {total_p50:.3} ms, minus pretransfer {transfer_p50:.3} ms"
    );
    let low = transfer_p50 - (transfer_p50 * 0.2).max(0.5);
    assert!(
        (low..=total_p50 + 0.05).contains(&root_p50),
        "root median {root_p50} ms outside [{low}, {total_p50}]"
    );

    // Conventions: names, kinds, attributes, one resource per process.
    for s in &spans {
        for key in [
            "http.request.method",
            "url.path",
            "http.route",
            "server.address",
            "network.peer.address",
            "network.protocol.version",
        ] {
            assert!(s.attr_str(key).is_some(), "{} lacks {key}", s.span.name);
        }
        for key in [
            "http.response.status_code",
            "server.port",
            "network.peer.port",
        ] {
            assert!(s.attr_int(key).is_some(), "{} lacks {key}", s.span.name);
        }
        let route = s.attr_str("http.route").expect("route");
        assert_eq!(s.span.name, format!("GET {route}"));
        match kind(s) {
            SpanKind::Server => assert!(s.attr_str("client.address").is_some()),
            SpanKind::Client => assert!(s.attr_str("client.address").is_none()),
            other => panic!("unexpected kind {other:?}"),
        }
        for key in ["service.name", "process.executable.name", "host.name"] {
            assert!(s.resource_str(key).is_some(), "resource lacks {key}");
        }
        assert!(
            s.resource_int("process.pid").is_some(),
            "resource lacks process.pid"
        );
    }
    assert!(
        spans
            .iter()
            .any(|s| s.attr_str("http.route").as_deref() == Some("/page/{id}")),
        "routes are templated"
    );
    let mut resources: HashMap<(usize, i64), HashSet<usize>> = HashMap::new();
    for s in &spans {
        resources
            .entry((s.request, s.resource_int("process.pid").expect("pid")))
            .or_default()
            .insert(s.resource_index);
    }
    assert!(
        resources.values().all(|v| v.len() == 1),
        "one resource per process in each request"
    );
}

/// A Go service under concurrent load, no headers anywhere: curl (8 transfers at once) ->
/// Go net/http server (tests/fixtures/gotls `front`), whose handler calls a backend twice per
/// request with Go's HTTP/1 client: a Python one in cleartext, then a Go one over TLS (the
/// plaintext taken at crypto/tls). Goroutines share the Go program's threads, and that client
/// writes each request from a goroutine of its connection's: joining by thread put one
/// request's calls under another's. Each request (its id in the paths, chosen by the test)
/// gives exactly one trace: curl CLIENT -> Go SERVER -> 2 x (Go CLIENT -> backend SERVER),
/// every span with that request's id; no trace mixes two requests.
#[test]
fn go_service_traces_without_headers_under_concurrency() {
    let _serial = serial();
    let dir = scratch("gofront");
    let bin = build_gotls(&dir, "");
    let receiver = Receiver::start(Protocol::Grpc, free_port());
    let daemon = Daemon::exporting_to(&receiver);
    let spawn = |args: &[String]| {
        let port = free_port();
        let child = std::process::Command::new(&bin)
            .arg(&args[0])
            .arg(port.to_string())
            .args(&args[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn gotls");
        Server::adopt(child, port)
    };
    let backend = Server::fixture();
    let before = hooked(&daemon);
    let front = spawn(&["front".into(), format!("http://127.0.0.1:{}", backend.port)]);
    wait_hooked(&daemon, before, "the Go program");
    // The look that hooked it also named it a Go program; the reader takes that at its next
    // drain.
    std::thread::sleep(Duration::from_millis(500));
    check_go_front(&receiver, front.port, backend.port, 0..300);

    let (cert, key) = self_signed(&dir);
    let tls_backend = spawn(&[
        "server".into(),
        cert.display().to_string(),
        key.display().to_string(),
    ]);
    let tls_front = spawn(&[
        "front".into(),
        format!("https://127.0.0.1:{}", tls_backend.port),
    ]);
    // Same executable: known as Go at the daemon's next look at new processes.
    std::thread::sleep(Duration::from_millis(2500));
    check_go_front(&receiver, tls_front.port, tls_backend.port, 300..400);
}

/// Sends `/front/ID` for each id to the Go front on `port`, 8 at once, and checks the traces
/// of those requests (see above).
fn check_go_front(receiver: &Receiver, port: u16, backend: u16, ids: std::ops::Range<usize>) {
    let n = ids.len();
    let urls: Vec<String> = ids
        .clone()
        .map(|i| format!("http://127.0.0.1:{port}/front/{i}"))
        .collect();
    let out = curl_with(
        &["--parallel", "--parallel-max", "8"],
        &urls,
        "%{http_code}\n",
    );
    assert_eq!(out.len(), n, "curl ran every transfer");
    assert!(
        out.iter().all(|c| c == "200"),
        "the front answered: {out:?}"
    );

    let ports = [port, backend];
    let ours = |spans: &[Received]| -> Vec<Received> {
        spans
            .iter()
            .filter(|s| server_port(s).is_some_and(|p| ports.contains(&p)))
            .cloned()
            .collect()
    };
    wait_spans(receiver, "6 spans per request", |s| ours(s).len() >= 6 * n);
    std::thread::sleep(Duration::from_secs(1));
    let spans = ours(&receiver.spans());
    assert_eq!(spans.len(), 6 * n, "6 spans per request, no more");

    // The request id each span carries in its path, by trace.
    let id_of = |s: &Received| -> String {
        let path = s.attr_str("url.path").expect("url.path");
        path.rsplit('/').next().expect("id").to_owned()
    };
    let mut traces: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for s in &spans {
        traces.entry(s.trace_id()).or_default().push(s);
    }
    let mut mixed = Vec::new();
    for spans in traces.values() {
        let ids: HashSet<String> = spans.iter().map(|s| id_of(s)).collect();
        if ids.len() > 1 {
            mixed.push(ids);
        }
    }
    assert!(mixed.is_empty(), "traces mixing requests: {mixed:?}");
    assert_eq!(traces.len(), n, "one trace per curl request");
    for (trace, spans) in &traces {
        front_trace(trace, spans, port, backend);
    }
}

/// A client that connects from the same port again and again (as ephemeral ports come round
/// under a connection per request): each connection's request is a trace of its own. Ids
/// derived from the connection and the request's position repeated with the port (20 requests
/// in one trace); the TCP sequence number of the request's first byte does not.
#[test]
fn a_client_port_used_again_starts_new_traces() {
    let _serial = serial();
    let receiver = Receiver::start(Protocol::Grpc, free_port());
    let _daemon = Daemon::exporting_to(&receiver);
    let server = Server::fixture();
    const N: usize = 20;
    // HTTP/1.0: the server closes first, so its end waits in TIME_WAIT and the client's port
    // is free at once; SO_REUSEADDR lets the client bind it again.
    let script = r#"
import socket, sys
port, local, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", local))
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /again/%d HTTP/1.0\r\nHost: x\r\n\r\n" % i)
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    print(data.split(b" ")[1].decode())
"#;
    let local = free_port();
    let out = std::process::Command::new("python3")
        .args(["-c", script, &server.port.to_string(), &local.to_string()])
        .arg(N.to_string())
        .output()
        .expect("python3");
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        N,
        "every request answered from port {local}: {codes} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ours = |spans: &[Received]| -> Vec<Received> {
        spans
            .iter()
            .filter(|s| server_port(s) == Some(server.port))
            .cloned()
            .collect()
    };
    wait_spans(&receiver, "2 spans per request", |s| ours(s).len() >= 2 * N);
    std::thread::sleep(Duration::from_secs(1));
    let spans = ours(&receiver.spans());
    assert_eq!(spans.len(), 2 * N, "a client and a server span per request");
    let mut traces: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for s in &spans {
        traces.entry(s.trace_id()).or_default().push(s);
    }
    assert_eq!(traces.len(), N, "one trace per request");
    for spans in traces.values() {
        let paths: HashSet<String> = spans
            .iter()
            .map(|s| s.attr_str("url.path").expect("url.path"))
            .collect();
        assert_eq!(
            (spans.len(), paths.len()),
            (2, 1),
            "a trace holds one request's two ends: {paths:?}"
        );
        let client = spans
            .iter()
            .find(|s| kind(s) == SpanKind::Client)
            .expect("client");
        let served = spans
            .iter()
            .find(|s| kind(s) == SpanKind::Server)
            .expect("server");
        assert_eq!(served.parent_id(), client.span_id());
        assert_eq!(
            client.attr_int("network.peer.port").map(|p| p as u16),
            Some(server.port)
        );
    }
    let span_ids: HashSet<String> = spans.iter().map(|s| s.span_id()).collect();
    assert_eq!(span_ids.len(), 2 * N, "span ids do not repeat");
}

/// Issue 4, check 4 (status): Error for 5xx at servers and for 4xx/5xx at clients.
#[test]
fn span_status_follows_the_conventions() {
    let _serial = serial();
    let receiver = Receiver::start(Protocol::Http, free_port());
    let endpoint = format!("http://{}", receiver.addr);
    let daemon = Daemon::start_with(&[
        "--otlp-endpoint",
        &format!("{endpoint}/v1/traces"),
        "--otlp-protocol",
        "http/protobuf",
    ]);
    let server = Server::fixture();
    for path in ["/ok/1", "/nf/2", "/err/3"] {
        curl(
            &[format!("http://127.0.0.1:{}{path}", server.port)],
            "%{http_code}\n",
        );
    }
    let spans = wait_spans(&receiver, "6 spans", |s| {
        s.iter()
            .filter(|x| server_port(x) == Some(server.port))
            .count()
            >= 6
    });
    let _ = &daemon;
    for s in spans.iter().filter(|x| server_port(x) == Some(server.port)) {
        let status = s.attr_int("http.response.status_code").expect("status");
        let code = s.span.status.as_ref().map_or(0, |st| st.code);
        let error = code == StatusCode::Error as i32;
        let want = match kind(s) {
            SpanKind::Server => status >= 500,
            _ => status >= 400,
        };
        assert_eq!(error, want, "{:?} span for {status}", kind(s));
    }
}

fn nginx_proxy(backend: u16) -> Nginx {
    Nginx::start(
        &scratch("nginx-proxy"),
        &format!("location /api/ {{ proxy_pass http://127.0.0.1:{backend}; }}"),
    )
}

/// Follows parents from `span` through the received spans; returns the last parent id reached.
fn chain_end(span: &Received, by_id: &HashMap<String, &Received>) -> String {
    let mut cur = span;
    for _ in 0..16 {
        let parent = cur.parent_id();
        match by_id.get(&parent) {
            Some(p) => cur = p,
            None => return parent,
        }
    }
    panic!("parent chain too long")
}

fn check_propagation(headers: &[(&str, String)], trace: &str, parent: &str) {
    let receiver = Receiver::start(Protocol::Grpc, free_port());
    let _daemon = Daemon::exporting_to(&receiver);
    let backend = Server::fixture();
    let nginx = nginx_proxy(backend.port);
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}"]);
    for (k, v) in headers {
        cmd.args(["-H", &format!("{k}: {v}")]);
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{}/api/ok/1", nginx.port))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "proxied");
    let ports = [nginx.port, backend.port];
    let spans = wait_spans(&receiver, "4 spans", |s| {
        s.iter()
            .filter(|x| server_port(x).is_some_and(|p| ports.contains(&p)))
            .count()
            >= 4
    });
    let spans: Vec<&Received> = spans
        .iter()
        .filter(|x| server_port(x).is_some_and(|p| ports.contains(&p)))
        .collect();
    assert_eq!(spans.len(), 4, "curl, nginx in and out, backend");
    let by_id: HashMap<String, &Received> = spans.iter().map(|s| (s.span_id(), *s)).collect();
    for s in &spans {
        assert_eq!(s.trace_id(), trace, "{} in the header's trace", s.span.name);
        assert_eq!(
            chain_end(s, &by_id),
            parent,
            "{} leads to the header's parent",
            s.span.name
        );
    }
    let backend_span = spans
        .iter()
        .find(|s| kind(s) == SpanKind::Server && server_port(s) == Some(backend.port))
        .expect("backend span");
    let nginx_call = by_id[&backend_span.parent_id()];
    assert_eq!(
        kind(nginx_call),
        SpanKind::Client,
        "backend under nginx's call"
    );
    assert_eq!(
        nginx_call
            .resource_str("process.executable.name")
            .as_deref(),
        Some("nginx")
    );
}

/// Issue 4, check 2: a W3C traceparent chosen by the test, through nginx to a Python backend.
#[test]
fn w3c_traceparent_is_followed_through_nginx() {
    let _serial = serial();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    check_propagation(
        &[("traceparent", format!("00-{trace}-{parent}-01"))],
        trace,
        parent,
    );
}

/// Issue 4, check 2, with B3 headers (multi and single).
#[test]
fn b3_context_is_followed_through_nginx() {
    let _serial = serial();
    let trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let parent = "e457b5a2e4d86bd1";
    check_propagation(
        &[
            ("X-B3-TraceId", trace.to_owned()),
            ("X-B3-SpanId", parent.to_owned()),
            ("X-B3-Sampled", "1".to_owned()),
        ],
        trace,
        parent,
    );
    let trace = "463ac35c9f6413ad48485a3953bb6124";
    let parent = "a2fb4a1d1a96d312";
    check_propagation(&[("b3", format!("{trace}-{parent}-1"))], trace, parent);
}

/// Issue 4, check 3: the collector goes away while traffic runs and comes back: the daemon
/// stays up, keeps counting, counts the spans it dropped, and exports again afterwards.
#[test]
fn collector_down_costs_counted_spans_only() {
    let _serial = serial();
    let mut receiver = Receiver::start(Protocol::Grpc, free_port());
    let mut daemon = Daemon::exporting_to(&receiver);
    let server = Server::fixture();
    let send = |n: usize, tag: &str| {
        let urls: Vec<String> = (0..n)
            .map(|i| format!("http://127.0.0.1:{}/{tag}/{i}", server.port))
            .collect();
        curl(&urls, "%{http_code}\n");
    };
    let count = |d: &Daemon| {
        d.metric_sum(
            "tracer_http_requests_total",
            &[("source", "curl"), ("destination", "server")],
        )
    };

    send(10, "before");
    wait_spans(&receiver, "spans before the outage", |s| {
        s.iter().any(|x| {
            x.attr_str("url.path")
                .is_some_and(|p| p.starts_with("/before/"))
        })
    });

    receiver.stop();
    let counted_before = count(&daemon);
    send(10, "during");
    let deadline = Instant::now() + Duration::from_secs(15);
    while daemon.metric_sum(
        "tracer_spans_total",
        &[("outcome", "dropped_export_failed")],
    ) == 0.0
    {
        assert!(
            Instant::now() < deadline,
            "dropped spans not counted: {}",
            daemon.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(daemon.alive(), "daemon died: {}", daemon.log_text());
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&daemon) < counted_before + 10.0 {
        assert!(Instant::now() < deadline, "metrics stopped counting");
        std::thread::sleep(Duration::from_millis(100));
    }

    receiver.restart(Protocol::Grpc);
    send(10, "after");
    wait_spans(&receiver, "spans after the restart", |s| {
        s.iter().any(|x| {
            x.attr_str("url.path")
                .is_some_and(|p| p.starts_with("/after/"))
        })
    });
    assert!(daemon.alive());
}
