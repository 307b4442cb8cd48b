//! HTTP/2 without TLS: h2load against nginx and node and gRPC (python grpcio) with prior
//! knowledge, and
//! curl upgrading HTTP/1.1 connections to h2c. Counts checked against what the clients
//! reported; spans against the gRPC status they returned.

mod common;

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use common::{
    Daemon, Nginx, Server, assert_both_ends, curl_with, free_port, h2load,
    otlp::{Protocol, Receiver},
    scratch, serial, status_codes, system_python, workspace_root,
};

/// Requests whose header block is larger than 1 KiB (a browser's cookie): each block must be
/// copied whole by the kernel side, or HPACK's table is no longer the sender's and every later
/// request of the connection is unreadable (they were all `h2_headers_unreadable` with a
/// 1,300-byte cookie). A 3,000-character cookie of random base64 (Huffman coding barely
/// shortens it), its value new on every connection, then indexed by the encoder.
#[test]
fn h2_requests_with_a_large_cookie_are_counted() {
    let _serial = serial();
    let daemon = Daemon::start();
    let nginx = Nginx::start_h2(&scratch("nginx-h2-cookie"), "");
    // A fixed pseudo-random cookie (an LCG over base64's alphabet): reproducible, not
    // compressible.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let cookie: String = (0..3000)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ALPHABET[(x >> 58) as usize] as char
        })
        .collect();
    let header = format!("cookie: session={cookie}");
    let url = format!("http://127.0.0.1:{}/tiny", nginx.port);
    let args = ["-c4", "-m10", "-n2000", "--rps=100", "-H", &header];
    let (done, _) = h2load(&args, &url, "h2c");
    assert_eq!(done, 2000, "h2load completed every request");
    let edge = daemon.wait_edge("h2load", nginx.port, done);
    assert_eq!(edge["requests"], done, "{}", daemon.diagnostics());
    let unreadable = daemon.metric_sum(
        "tracer_requests_lost_total",
        &[("reason", "h2_headers_unreadable")],
    );
    assert_eq!(unreadable, 0.0, "{}", daemon.diagnostics());
}

/// h2load with many streams in flight on each connection, against nginx: tiny responses (many
/// frames per read), 100 KB ones (DATA frames past the capture, read 8 KiB at a time), and 404s.
/// Every request h2load completed is counted, with its status.
#[test]
fn h2load_streams_are_counted() {
    let _serial = serial();
    let daemon = Daemon::start();
    let nginx = Nginx::start_h2(&scratch("nginx-h2"), "");
    let mut done = 0;
    let mut classes = [0u64; 4];
    // At a fixed rate: a saturating h2load leaves no CPU to the tracer on 2 cores (what it then
    // misses is counted as lost: the reliability tests' business, not this one's). 100 streams
    // in flight per connection: more than an HTTP/1 pipeline's depth anywhere in the daemon.
    for (conns, streams, path, n, rps) in [
        (4, 10, "/tiny", 4000, 250),
        (2, 100, "/tiny", 20_000, 2000),
        (4, 10, "/big.bin", 400, 25),
        (4, 10, "/missing/7", 1000, 100),
    ] {
        let url = format!("http://127.0.0.1:{}{path}", nginx.port);
        let args = [
            format!("-c{conns}"),
            format!("-m{streams}"),
            format!("-n{n}"),
            format!("--rps={rps}"),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, c) = h2load(&args, &url, "h2c");
        done += ok;
        for (a, b) in classes.iter_mut().zip(c) {
            *a += b;
        }
    }
    assert_eq!(done, 25_400, "h2load completed every request");
    let edge = daemon.wait_edge("h2load", nginx.port, done);
    assert_eq!(edge["requests"], done, "{}", daemon.diagnostics());
    let codes = status_codes(&edge);
    assert_eq!(
        codes.get("200").copied().unwrap_or(0),
        classes[0],
        "{codes:?}"
    );
    assert_eq!(
        codes.get("404").copied().unwrap_or(0),
        classes[2],
        "{codes:?}"
    );
    let routes = daemon.json("/api/routes?workload=nginx&window=10m");
    let route = |name: &str| {
        routes["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .filter(|r| r["route"] == name)
            .map(|r| r["requests"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(route("/tiny"), 24_000, "{routes}");
    assert_eq!(route("/big.bin"), 400, "{routes}");
    assert_eq!(route("/missing/{id}"), 1000, "{routes}");
    assert_eq!(
        daemon.metric_sum("tracer_requests_lost_total", &[]),
        0.0,
        "{}",
        daemon.diagnostics()
    );
}

/// gRPC over one HTTP/2 connection: every call counted on its method's route, by both ends
/// (5 KB responses included: frames past what the kernel side copies of a `sendmsg`), the
/// calls that failed (grpc-status not OK, under HTTP 200) counted as failures, and spans that
/// carry the gRPC status and are errors as the RPC conventions say.
#[test]
fn grpc_calls_are_counted_with_their_status() {
    let _serial = serial();
    let receiver = Receiver::start(Protocol::Grpc, free_port());
    let daemon = Daemon::exporting_to(&receiver);
    let port = free_port();
    let fixtures = workspace_root().join("tests/fixtures");
    let child = Command::new(system_python())
        .arg(fixtures.join("grpc_server.py"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn grpc_server.py");
    let _server = Server::adopt(child, port);
    const ROUNDS: u64 = 50;
    let out = Command::new(system_python())
        .arg(fixtures.join("grpc_client.py"))
        .args([port.to_string(), ROUNDS.to_string()])
        .output()
        .expect("grpc_client.py (apt install python3-grpcio)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client's JSON");
    assert_eq!(got["Get"]["OK"], 2 * ROUNDS, "{got}");
    assert_eq!(got["Missing"]["NOT_FOUND"], ROUNDS, "{got}");
    assert_eq!(got["Boom"]["INTERNAL"], ROUNDS, "{got}");
    assert_eq!(got["Big"]["OK"], ROUNDS, "{got}");

    let total = 5 * ROUNDS;
    let edge = daemon.wait_edge("grpc_client", port, total);
    assert_eq!(edge["requests"], total, "{}", daemon.diagnostics());
    assert_both_ends(&edge, total);
    assert_eq!(edge["dst"], "grpc_server", "{edge}");
    assert_eq!(
        edge["failures"],
        2 * ROUNDS,
        "NOT_FOUND and INTERNAL: {edge}"
    );
    // In /metrics, by gRPC status (NOT_FOUND 5, INTERNAL 13), all under HTTP 200.
    for (grpc, n) in [("0", 3 * ROUNDS), ("5", ROUNDS), ("13", ROUNDS)] {
        let counted = daemon.metric_sum(
            "tracer_http_requests_total",
            &[
                ("destination", "grpc_server"),
                ("status", "200"),
                ("grpc_status", grpc),
            ],
        );
        assert_eq!(counted, n as f64, "grpc_status {grpc}");
    }
    let routes = daemon.json("/api/routes?workload=grpc_server&window=10m");
    for (route, n) in [
        ("/shop.Catalog/Get", 2 * ROUNDS),
        ("/shop.Catalog/Missing", ROUNDS),
        ("/shop.Catalog/Boom", ROUNDS),
        ("/shop.Catalog/Big", ROUNDS),
    ] {
        let seen: u64 = routes["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .filter(|r| r["route"] == route && r["method"] == "POST")
            .map(|r| r["requests"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(seen, n, "{route}: {routes}");
    }

    // Spans: one server and one client span per call, with the gRPC status.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let spans = loop {
        let spans: Vec<_> = receiver
            .spans()
            .into_iter()
            .filter(|s| {
                s.attr_str("url.path")
                    .is_some_and(|p| p.starts_with("/shop.Catalog/"))
            })
            .collect();
        if spans.len() as u64 >= 2 * total || std::time::Instant::now() > deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(spans.len() as u64, 2 * total, "{}", daemon.diagnostics());
    let is_error =
        |s: &common::otlp::Received| s.span.status.as_ref().is_some_and(|st| st.code == 2);
    for s in &spans {
        assert_eq!(s.attr_str("network.protocol.version").as_deref(), Some("2"));
        assert_eq!(s.attr_str("rpc.system").as_deref(), Some("grpc"));
        let code = s
            .attr_int("rpc.grpc.status_code")
            .expect("rpc.grpc.status_code");
        let path = s.attr_str("url.path").expect("url.path");
        let want = match path.as_str() {
            "/shop.Catalog/Get" | "/shop.Catalog/Big" => 0,
            "/shop.Catalog/Missing" => 5,
            "/shop.Catalog/Boom" => 13,
            other => panic!("unexpected path {other}"),
        };
        assert_eq!(code, want, "{path}");
        // Servers err on INTERNAL, not on NOT_FOUND (the caller's problem); clients on both.
        let server = s.span.kind == 2;
        let want_error = if server { code == 13 } else { code != 0 };
        assert_eq!(is_error(s), want_error, "{path} server={server}");
    }
    // Client and server spans of a call are one trace: each server span's parent is a client
    // span.
    let clients: std::collections::HashSet<String> = spans
        .iter()
        .filter(|s| s.span.kind == 3)
        .map(|s| s.span_id())
        .collect();
    let linked = spans
        .iter()
        .filter(|s| s.span.kind == 2 && clients.contains(&s.parent_id()))
        .count() as u64;
    assert_eq!(linked, total, "every server span under its client span");
}

/// Hundreds of streams in flight on one connection, against node's HTTP/2 server (no limit on
/// concurrent streams, as Envoy's and grpc-js's): h2load writes a thousand requests' frames in
/// one call and node answers as many in one, more frame segments than one ring-buffer record
/// holds (the kernel side sends a call's segments in parts, the daemon joins them), and nghttp2
/// writes from a chain of 16 KiB buffers (frame headers across two iovecs). Every request
/// h2load completed is counted by both ends with its status, nothing lost.
#[test]
fn a_thousand_streams_in_flight_are_counted_by_both_ends() {
    let _serial = serial();
    let daemon = Daemon::start();
    let port = free_port();
    let child = Command::new("node")
        .arg(workspace_root().join("tests/fixtures/node_h2c.js"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn node node_h2c.js");
    let server = Server::adopt(child, port);
    let mut done = 0;
    let mut classes = [0u64; 4];
    for (path, n) in [("/item/1", "-n20000"), ("/missing/3", "-n4000")] {
        let url = format!("http://127.0.0.1:{}{path}", server.port);
        let (ok, c) = h2load(&["-c2", "-m1000", n], &url, "h2c");
        done += ok;
        for (a, b) in classes.iter_mut().zip(c) {
            *a += b;
        }
    }
    assert_eq!(done, 24_000, "h2load completed every request");
    let edge = daemon.wait_edge("h2load", server.port, done);
    assert_eq!(edge["requests"], done, "{}", daemon.diagnostics());
    assert_both_ends(&edge, done);
    let codes = status_codes(&edge);
    assert_eq!(codes.get("200").copied(), Some(classes[0]), "{codes:?}");
    assert_eq!(codes.get("404").copied(), Some(classes[2]), "{codes:?}");
    assert_eq!(
        daemon.metric_sum("tracer_requests_lost_total", &[]),
        0.0,
        "{}",
        daemon.diagnostics()
    );
}

/// `curl --http2` on plain HTTP asks to upgrade (`Upgrade: h2c`); a server that accepts answers
/// 101 and goes on in HTTP/2, the upgrading request answered on stream 1. One connection of 40
/// requests (the first upgrades, the rest are streams 3 to 79, 100 KB answers among them) and
/// 20 connections of one request each (stream 1 alone, 100 KB answers written before the
/// client's preface is read): every request counted by both ends with the status curl got, and
/// none as a 101.
/// tests/fixtures/h2c_server.py (python3-h2) on a port of its own.
fn h2c_server() -> Server {
    let port = free_port();
    let child = Command::new(system_python())
        .arg(workspace_root().join("tests/fixtures/h2c_server.py"))
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn h2c_server.py");
    Server::adopt(child, port)
}

#[test]
fn h2c_upgrade_is_followed() {
    let _serial = serial();
    let daemon = Daemon::start();
    let server = h2c_server();
    let port = server.port;
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    let mut count = |lines: Vec<String>| {
        for line in lines {
            let (code, version) = line.split_once(' ').expect("code and version");
            assert_eq!(version, "2", "curl upgraded to h2c: {line}");
            *got.entry(code.to_owned()).or_default() += 1;
        }
    };
    let mixed: Vec<String> = ["/ok", "/missing/1", "/big", "/fail"]
        .iter()
        .cycle()
        .take(40)
        .map(|p| url(p))
        .collect();
    count(curl_with(
        &["--http2"],
        &mixed,
        "%{http_code} %{http_version}\n",
    ));
    for path in ["/big", "/ok", "/missing/2", "/fail"]
        .iter()
        .cycle()
        .take(20)
    {
        count(curl_with(
            &["--http2"],
            &[url(path)],
            "%{http_code} %{http_version}\n",
        ));
    }
    let total: u64 = got.values().sum();
    assert_eq!(total, 60, "curl's answers: {got:?}");
    let edge = daemon.wait_edge("curl", port, total);
    assert_eq!(edge["requests"], total, "{}", daemon.diagnostics());
    assert_both_ends(&edge, total);
    let codes = status_codes(&edge);
    assert_eq!(codes, got, "statuses as curl got them, no 101");
    assert_eq!(
        daemon.metric_sum("tracer_requests_lost_total", &[]),
        0.0,
        "{}",
        daemon.diagnostics()
    );
}

/// Streams an HTTP/2 server took and did not answer (tests/fixtures/h2c_server.py): `/reset`,
/// reset by the server (RST_STREAM INTERNAL_ERROR), and `/hang`, left when the server went
/// away (the first `/shutdown`: a GOAWAY whose last stream is the one before, then the
/// close): failed requests, status 0, counted once, as the client saw them. Streams the
/// server did not process (`/refuse`, reset REFUSED_STREAM; `/shutdown`, after the GOAWAY's
/// last) were sent again by the client on a new connection and answered there: counted once,
/// with that answer. Both ends are here; the server's counts the failures.
#[test]
fn h2_requests_a_server_went_away_on_are_failures() {
    let _serial = serial();
    let daemon = Daemon::start();
    let server = h2c_server();
    let port = server.port;
    // Five streams on one connection at once; the client's own report.
    let out = Command::new(system_python())
        .arg(workspace_root().join("tests/fixtures/h2_client.py"))
        .arg(port.to_string())
        .args(["/ok", "/reset", "/refuse", "/hang", "/shutdown"])
        .output()
        .expect("run h2_client.py");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!(
        got,
        serde_json::json!({"answered": {"/ok": 200, "/refuse": 200, "/shutdown": 200},
                           "failed": ["/reset", "/hang"], "retried": ["/refuse", "/shutdown"]}),
    );
    // The client is gone before its exchanges are recorded: named by its process name or its
    // script, whichever the daemon read; the server's port tells the edge.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let src = loop {
        if let Some(e) = ["h2_client", "python3"]
            .iter()
            .find_map(|src| daemon.edge(src, port))
        {
            break e["src"].as_str().unwrap_or_default().to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no edge to :{port}: {}",
            daemon.get("/api/edges")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let edge = daemon.wait_edge(&src, port, 5);
    assert_eq!(edge["requests"], 5, "{edge}\n{}", daemon.diagnostics());
    assert_eq!(edge["dst"], "h2c_server", "{edge}");
    let codes = status_codes(&edge);
    assert_eq!(
        codes,
        BTreeMap::from([("0".to_owned(), 2), ("200".to_owned(), 3)]),
        "{edge}"
    );
    assert_eq!(edge["failures"], 2, "{edge}");
    // Both ends saw the answered ones; the unanswered ones count at the server's end alone.
    assert_eq!(edge["server_latency"]["count"], 5, "{edge}");
    assert_eq!(edge["client_latency"]["count"], 3, "{edge}");
}
