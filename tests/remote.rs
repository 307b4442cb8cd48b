//! One end on another host, as a DaemonSet's tracer sees most traffic between nodes: the peer
//! is tests/fixtures/remote_peer.py behind a TUN device, speaking TCP itself, so that no probe
//! sees its side. What the end on this host sees is counted, once, against what the peer and a
//! real client measured.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
};

use common::{Daemon, Server, curl, serial, status_codes, workspace_root};
use serde_json::Value;

/// remote_peer.py on its own TUN device `dev`, the peer at `<net>.2`, this host at `<net>.1`.
fn remote_peer(dev: &str, net: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(workspace_root().join("tests/fixtures/remote_peer.py"))
        .args(["--dev", dev, "--net", net])
        .args(args)
        .stdout(Stdio::piped());
    cmd
}

/// remote_peer.py's client, run to its end: its report.
fn remote_client(dev: &str, net: &str, args: &[&str]) -> Value {
    let out = remote_peer(dev, net, &[&["client"], args].concat())
        .output()
        .expect("run remote_peer.py client");
    assert!(out.status.success(), "remote client failed");
    serde_json::from_slice(&out.stdout).expect("remote client's report")
}

/// A remote HTTP server at `<net>.2:80`, until dropped.
struct RemoteServer(Child);

impl RemoteServer {
    fn start(dev: &str, net: &str) -> Self {
        Self::start_with(dev, net, &[])
    }

    fn start_with(dev: &str, net: &str, extra: &[&str]) -> Self {
        let mut args = vec!["serve", "--port", "80"];
        args.extend(extra);
        let mut child = remote_peer(dev, net, &args)
            .spawn()
            .expect("spawn remote_peer.py serve");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("remote peer's ready line");
        assert_eq!(line.trim(), "ready", "remote peer did not start");
        Self(child)
    }
}

impl Drop for RemoteServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A client on another host, 6 connections of 30 keep-alive requests each to the fixture
/// server (every 4th a 404), then 4 more whose last request asks the server to close: the
/// server's end alone counts every request, by status, from the client's address; and each
/// connection once, with the bytes the peer itself sent and received, whichever end closed.
#[test]
fn a_client_on_another_host_is_counted_by_its_server() {
    let _serial = serial();
    let daemon = Daemon::start();
    let server = Server::fixture_on("0.0.0.0");
    let port = server.port;

    let net = "10.213.0.0";
    let port_arg = port.to_string();
    let run = |conns: &str, extra: &[&str]| -> Value {
        let mut args = vec!["--port", &port_arg, "--conns", conns, "--requests", "30"];
        args.extend(extra);
        remote_client("tr-remote-c", net, &args)
    };
    let first = run("6", &[]);
    let second = run("4", &["--server-closes"]);
    let (mut ok, mut not_found) = (0, 0);
    for got in [&first, &second] {
        ok += got["status"]["200"].as_u64().unwrap_or(0);
        not_found += got["status"]["404"].as_u64().unwrap_or(0);
    }
    // Every 4th of each connection's 30: 7 of them.
    assert_eq!(
        (ok, not_found),
        (230, 70),
        "{} {}",
        first["status"],
        second["status"]
    );

    let client = "10.213.0.2";
    let edge = daemon.wait_edge(client, port, 300);
    assert_eq!(edge["requests"], 300, "{edge}\n{}", daemon.diagnostics());
    assert_eq!(edge["dst"], "server", "{edge}");
    let codes = status_codes(&edge);
    assert_eq!(codes.get("200"), Some(&230), "{edge}");
    assert_eq!(codes.get("404"), Some(&70), "{edge}");
    assert_eq!(edge["server_latency"]["count"], 300, "{edge}");
    assert!(
        edge["client_latency"].is_null(),
        "no client end here: {edge}"
    );

    let tcp = daemon.wait_tcp_edge(client, "server", |e| e["closed"] == 10);
    assert_eq!(tcp["established"], 10, "{tcp}");
    assert_eq!(tcp["closed"], 10, "{tcp}");
    assert_eq!(tcp["open"], 0, "{tcp}");
    assert_eq!(tcp["failed"], 0, "{tcp}");
    let sum = |key: &str| first[key].as_u64().unwrap() + second[key].as_u64().unwrap();
    assert_eq!(tcp["bytes_sent"], sum("sent"), "{tcp}");
    assert_eq!(tcp["bytes_received"], sum("received"), "{tcp}");
    assert_eq!(
        daemon.metric_sum(
            "tracer_tcp_connections_total",
            &[
                ("source", client),
                ("destination", "server"),
                ("outcome", "established")
            ],
        ),
        10.0
    );
}

/// curl on this host to a server on another host: the client's end alone counts every
/// request, by status, on an edge to the server's address, with curl's own latency; the TCP
/// connections with the bytes curl moved.
#[test]
fn a_server_on_another_host_is_counted_by_its_client() {
    let _serial = serial();
    let daemon = Daemon::start();
    let _remote = RemoteServer::start("tr-remote-s", "10.214.0.0");
    let urls: Vec<String> = (0..40)
        .map(|i| {
            let kind = if i % 4 == 3 { "nf" } else { "r" };
            format!("http://10.214.0.2/{kind}/{i}")
        })
        .collect();
    // Two curl processes of 20 requests each, every one on its own keep-alive connection.
    let mut lines = Vec::new();
    for half in urls.chunks(20) {
        lines.extend(curl(
            half,
            "%{http_code} %{size_request} %{size_header} %{size_download}\n",
        ));
    }
    let (mut sent, mut received, mut not_found) = (0, 0, 0);
    for l in &lines {
        let f: Vec<u64> = l.split(' ').map(|x| x.parse().expect("number")).collect();
        not_found += u64::from(f[0] == 404);
        sent += f[1];
        received += f[2] + f[3];
    }
    assert_eq!((lines.len(), not_found), (40, 10), "{lines:?}");

    let edge = daemon.wait_edge("curl", 80, 40);
    assert_eq!(edge["requests"], 40, "{edge}\n{}", daemon.diagnostics());
    assert_eq!(edge["dst"], "10.214.0.2:80", "{edge}");
    let codes = status_codes(&edge);
    assert_eq!(codes.get("200"), Some(&30), "{edge}");
    assert_eq!(codes.get("404"), Some(&10), "{edge}");
    assert_eq!(edge["client_latency"]["count"], 40, "{edge}");
    assert!(
        edge["server_latency"].is_null(),
        "no server end here: {edge}"
    );

    let tcp = daemon.wait_tcp_edge("curl", "10.214.0.2:80", |e| e["closed"] == 2);
    assert_eq!(tcp["established"], 2, "{tcp}");
    assert_eq!(tcp["bytes_sent"], sent, "{tcp} {lines:?}");
    assert_eq!(tcp["bytes_received"], received, "{tcp} {lines:?}");
}

/// Connections from another host open before the daemon started (a pool of clients on other
/// nodes, after the daemon's rollout): found at its start at the server's end, counted open
/// (not established: their connect was not seen), then closed with the peer's bytes.
#[test]
fn connections_from_another_host_older_than_the_daemon_are_counted_open() {
    use std::io::Write as _;
    let _serial = serial();
    let server = Server::fixture_on("0.0.0.0");
    let port = server.port;
    let port_arg = port.to_string();
    let mut client = remote_peer(
        "tr-remote-o",
        "10.215.0.0",
        &[
            "client",
            "--port",
            &port_arg,
            "--conns",
            "5",
            "--requests",
            "4",
            "--hold",
        ],
    )
    .stdin(Stdio::piped())
    .spawn()
    .expect("spawn remote_peer.py client");
    let mut line = String::new();
    BufReader::new(client.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("the remote client's report");
    let got: Value = serde_json::from_str(&line).expect("the remote client's JSON");
    assert_eq!(got["status"]["200"], 15, "{}", got["status"]);

    let daemon = Daemon::start();
    let src = "10.215.0.2";
    let tcp = daemon.wait_tcp_edge(src, "server", |e| e["open"] == 5);
    assert_eq!(tcp["open"], 5, "{tcp}");
    assert_eq!(tcp["established"], 0, "their connects were not seen: {tcp}");
    client
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\n")
        .expect("release the remote client");
    assert!(client.wait().expect("remote client exits").success());
    let tcp = daemon.wait_tcp_edge(src, "server", |e| e["open"] == 0);
    assert_eq!(tcp["closed"], 5, "{tcp}");
    assert_eq!(tcp["bytes_sent"], got["sent"], "{tcp} {got}");
    assert_eq!(tcp["bytes_received"], got["received"], "{tcp}");
}

/// Requests a server closed or reset the connection on, unanswered, are failed requests
/// (status 0, as Linkerd counts them in success rates), counted once, by the end that can
/// tell: a server on this host closing with a request read (from a client on another host,
/// and from curl here), or aborting the connection (from curl here); the client's end when
/// its server, on another host, reset it. A
/// client that gives up is not the server's failure (not counted).
#[test]
fn requests_left_unanswered_are_failures() {
    let _serial = serial();
    let daemon = Daemon::start();
    let server = Server::fixture_on("0.0.0.0");
    let port = server.port;

    // A client on another host: the last of each connection's 5 requests is closed on.
    let port_arg = port.to_string();
    let got = remote_client(
        "tr-remote-u",
        "10.216.0.0",
        &[
            "--port",
            &port_arg,
            "--conns",
            "3",
            "--requests",
            "5",
            "--unanswered",
        ],
    );
    assert_eq!(got["status"]["none"], 3, "{}", got["status"]);
    let edge = daemon.wait_edge("10.216.0.2", port, 15);
    let codes = status_codes(&edge);
    assert_eq!(codes.get("0"), Some(&3), "{edge}");
    assert_eq!(codes.get("200"), Some(&9), "{edge}");
    assert_eq!(codes.get("404"), Some(&3), "{edge}");
    assert_eq!(edge["failures"], 3, "{edge}");

    // curl here, to the same server: its end closes first, once per request; counted once.
    let urls: Vec<String> = (0..4)
        .map(|i| format!("http://127.0.0.1:{port}/close/{i}"))
        .collect();
    let mut seen = Vec::new();
    for url in &urls {
        seen.extend(curl(std::slice::from_ref(url), "%{http_code}\n"));
    }
    assert_eq!(seen, vec!["000"; 4], "curl got no response");
    let edge = daemon.wait_edge("curl", port, 4);
    assert_eq!(edge["requests"], 4, "{edge}");
    assert_eq!(status_codes(&edge).get("0"), Some(&4), "{edge}");
    // The server aborting instead (SO_LINGER 0: a reset, no FIN), in its own process: told from
    // a reset taken in by the kernel's mark, counted by its end.
    let mut seen = Vec::new();
    for i in 0..3 {
        let url = format!("http://127.0.0.1:{port}/abort/{i}");
        seen.extend(curl(&[url], "%{http_code}\n"));
    }
    assert_eq!(seen, vec!["000"; 3], "curl got no response");
    let edge = daemon.wait_edge("curl", port, 7);
    assert_eq!(edge["requests"], 7, "{edge}\n{}", daemon.diagnostics());
    assert_eq!(status_codes(&edge).get("0"), Some(&7), "{edge}");

    // A server on another host resets the connection on 3 requests, answers 2.
    let _remote = RemoteServer::start("tr-remote-r", "10.217.0.0");
    let mut seen = Vec::new();
    for path in ["rst/1", "ok/1", "rst/2", "rst/3", "ok/2"] {
        seen.extend(curl(
            &[format!("http://10.217.0.2/{path}")],
            "%{http_code}\n",
        ));
    }
    assert_eq!(seen, ["000", "200", "000", "000", "200"], "{seen:?}");
    let edge = daemon.wait_edge("curl", 80, 5);
    assert_eq!(edge["requests"], 5, "{edge}");
    let codes = status_codes(&edge);
    assert_eq!(codes.get("0"), Some(&3), "{edge}");
    assert_eq!(codes.get("200"), Some(&2), "{edge}");
    assert_eq!(
        daemon.metric_sum(
            "tracer_http_requests_total",
            &[("source", "curl"), ("status", "0")]
        ),
        10.0
    );
}

/// A link that loses segments: the remote server drops the first data segment of each
/// connection, which this host's kernel sends again. The 3 connections' retransmissions are
/// counted (the kernel's own counter, read at each close), every request still counted once.
#[test]
fn retransmissions_are_counted() {
    let _serial = serial();
    let daemon = Daemon::start();
    let _remote = RemoteServer::start_with("tr-remote-l", "10.218.0.0", &["--drop-first"]);
    let mut seen = Vec::new();
    for i in 0..3 {
        seen.extend(curl(
            &[format!("http://10.218.0.2/r/{i}")],
            "%{http_code}\n",
        ));
    }
    assert_eq!(seen, ["200"; 3], "{seen:?}");
    let edge = daemon.wait_edge("curl", 80, 3);
    assert_eq!(edge["requests"], 3, "{edge}");
    let tcp = daemon.wait_tcp_edge("curl", "10.218.0.2:80", |e| e["closed"] == 3);
    assert_eq!(tcp["closed"], 3, "{tcp}");
    assert_eq!(tcp["retransmits"], 3, "{tcp}");
    assert_eq!(
        daemon.metric_sum(
            "tracer_tcp_retransmits_total",
            &[("source", "curl"), ("destination", "10.218.0.2:80")]
        ),
        3.0
    );
}

/// A stand-in for the Kubernetes API server (tests/fixtures/kube_api.py), until dropped.
struct KubeApi {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl KubeApi {
    /// Over TLS, with a certificate for 127.0.0.1 signed by the CA `cluster_ca` makes.
    fn start(dir: &std::path::Path, token: &str) -> Self {
        let (cert, key) = cluster_ca(dir);
        let mut child = Command::new("python3")
            .arg(workspace_root().join("tests/fixtures/kube_api.py"))
            .args(["--dir", &dir.to_string_lossy(), "--token", token])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn kube_api.py");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("kube_api.py's ready line");
        let port = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("kube_api.py did not start: {line:?}"));
        Self {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    /// A watch event for a resource, streamed to the daemon's open watch.
    fn event(&self, resource: &str, event: &Value) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{resource}.events")))
            .expect("events file");
        writeln!(f, "{event}").expect("append an event");
    }

    /// `(resource, list or watch, authorized)` of each request the daemon made.
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("requests.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster's CA (`dir/ca.crt`, as the service account mounts it) and the API server's
/// certificate and key it signed, for 127.0.0.1.
fn cluster_ca(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "openssl {args:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = ["req", "-x509", "-days", "2", "-subj", "/CN=kube-ca"];
    openssl(&[&ca[..], &ec, &["-keyout", "ca.key", "-out", "ca.crt"]].concat());
    let mut req = vec![
        "req",
        "-subj",
        "/CN=kube-apiserver",
        "-keyout",
        "server.key",
    ];
    req.extend(ec);
    req.extend(["-out", "server.csr"]);
    openssl(&req);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .expect("server.ext");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
    (dir.join("server.crt"), dir.join("server.key"))
}

/// A pod as the API lists it.
fn pod(name: &str, namespace: &str, ip: &str, host_network: bool) -> Value {
    serde_json::json!({
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
        "spec": {"hostNetwork": host_network, "containers": [{"name": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

/// In a cluster, peers on other nodes are pods and Services: named from the API server's list
/// (a client pod) and watch (a Service added after the daemon started), with the service
/// account's token on every request, as the DaemonSet's tracer names them; an address the
/// API gives to a pod on its node's network stays an address. Counts as the clients measured.
#[test]
fn peers_on_other_nodes_are_named_from_the_kubernetes_api() {
    let _serial = serial();
    let dir = common::scratch("kube");
    let pods = serde_json::json!([
        pod("front-7d9c8b6f5-x7k2p", "shop", "10.216.0.2", false),
        // The node's own address (as 10.218.0.2's peer is below): not a pod's.
        pod("agent-x7k2q", "kube-system", "10.218.0.2", true),
    ]);
    std::fs::write(dir.join("pods.json"), pods.to_string()).expect("pods.json");
    let token = dir.join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let api = KubeApi::start(&dir, "s3cret");
    let url = format!("https://127.0.0.1:{}", api.port);
    let receiver = common::otlp::Receiver::start(common::otlp::Protocol::Grpc, common::free_port());
    let endpoint = format!("http://{}", receiver.addr);
    let daemon = Daemon::start_with(&[
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        "grpc",
        "--kube-api",
        &url,
        "--kube-token-file",
        &token.to_string_lossy(),
        "--kube-ca-file",
        &dir.join("ca.crt").to_string_lossy(),
    ]);
    let wait_addresses = |resource: &str, want: f64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while daemon.metric_sum("tracer_kube_addresses", &[("resource", resource)]) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "{resource}: {} addresses named, not {want}; requests {:?}\n{}",
                daemon.metric_sum("tracer_kube_addresses", &[("resource", resource)]),
                api.requests(),
                daemon.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_addresses("pods", 1.0);

    // A client pod on another node, and the node itself, to a server here.
    let server = Server::fixture_on("0.0.0.0");
    let port_arg = server.port.to_string();
    let args = ["--port", &port_arg, "--conns", "2", "--requests", "10"];
    let from_pod = remote_client("tr-remote-k", "10.216.0.0", &args);
    let from_node = remote_client("tr-remote-n", "10.218.0.0", &args);
    for got in [&from_pod, &from_node] {
        assert_eq!(got["status"]["200"], 16, "{}", got["status"]);
        assert_eq!(got["status"]["404"], 4, "{}", got["status"]);
    }
    let edge = daemon.wait_edge("front.shop", server.port, 20);
    assert_eq!(edge["requests"], 20, "{edge}\n{}", daemon.diagnostics());
    assert_eq!(edge["dst"], "server", "{edge}");
    let edge = daemon.wait_edge("10.218.0.2", server.port, 20);
    assert_eq!(edge["requests"], 20, "{edge}");
    let tcp = daemon.wait_tcp_edge("front.shop", "server", |e| e["closed"] == 2);
    assert_eq!(tcp["established"], 2, "{tcp}");

    // A Service (its cluster IP: a server on another node, as this node's clients see it)
    // created after the daemon started: named from the watch.
    api.event(
        "services",
        &serde_json::json!({"type": "ADDED", "object": {
            "metadata": {"name": "backend", "namespace": "shop", "resourceVersion": "2"},
            "spec": {"clusterIP": "10.217.0.2", "clusterIPs": ["10.217.0.2"]},
        }}),
    );
    wait_addresses("services", 1.0);
    let _remote = RemoteServer::start("tr-remote-v", "10.217.0.0");
    let urls: Vec<String> = (0..12)
        .map(|i| format!("http://10.217.0.2/r/{i}"))
        .collect();
    let lines = curl(&urls, "%{http_code}\n");
    assert_eq!(lines, vec!["200"; 12]);
    let edge = daemon.wait_edge("curl", 80, 12);
    assert_eq!(edge["requests"], 12, "{edge}");
    assert_eq!(edge["dst"], "backend.shop", "{edge}");
    assert_eq!(edge["client_latency"]["count"], 12, "{edge}");
    // Spans name the peer too: the server's spans of the remote pod's requests, curl's client
    // spans of the Service's.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let peer_services = loop {
        let mut by_peer: std::collections::BTreeMap<String, u64> = Default::default();
        for span in receiver.spans() {
            if let Some(p) = span.attr_str("peer.service") {
                *by_peer.entry(p).or_default() += 1;
            }
        }
        if by_peer.values().sum::<u64>() >= 32 || std::time::Instant::now() > deadline {
            break by_peer;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(
        peer_services,
        [
            ("backend.shop".to_owned(), 12),
            ("front.shop".to_owned(), 20)
        ]
        .into(),
        "the host-network pod's address names no peer"
    );

    // Deleted: its address is an address again.
    api.event(
        "services",
        &serde_json::json!({"type": "DELETED", "object": {
            "metadata": {"name": "backend", "namespace": "shop", "resourceVersion": "3"},
            "spec": {"clusterIP": "10.217.0.2"},
        }}),
    );
    wait_addresses("services", 0.0);

    let requests = api.requests();
    assert!(
        requests.iter().all(|r| r.ends_with(" True")),
        "every request carries the token: {requests:?}"
    );
    for want in ["pods list", "pods watch", "services list", "services watch"] {
        assert!(
            requests.iter().any(|r| r.starts_with(want)),
            "{want}: {requests:?}"
        );
    }

    // The API server gone: failures counted and retried, the names known kept.
    drop(api);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let errors = || {
        daemon.metric_sum(
            "tracer_kube_errors_total",
            &[("resource", "pods"), ("reason", "request")],
        )
    };
    while errors() < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            daemon.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        daemon.metric_sum("tracer_kube_addresses", &[("resource", "pods")]),
        1.0
    );
    assert!(
        daemon.log_text().contains("retrying"),
        "{}",
        daemon.log_text()
    );
}
