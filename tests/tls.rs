//! TLS: plaintext taken at OpenSSL's and GnuTLS's read and write calls and Go's crypto/tls
//! (uprobes), against real TLS servers and clients: nginx and curl, wget (GnuTLS), python's ssl module on both ends (and
//! a connection older than the daemon), h2load speaking HTTP/2 over TLS (ALPN), Apache httpd,
//! a Go server and client. Counts checked against what the clients reported.

mod common;

use std::{
    collections::{BTreeMap, HashSet},
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    Daemon, Nginx, Server, build_gotls, h2load, hooked, scratch, self_signed, serial, status_codes,
    wait_hooked, workspace_root,
};
use serde_json::Value;

/// Requests counted by one end (`observer` client or server) from `src`.
fn observed(daemon: &Daemon, src: &str, observer: &str) -> f64 {
    daemon.metric_sum(
        "tracer_http_request_duration_seconds_count",
        &[("source", src), ("observer", observer)],
    )
}

/// Waits (10 s at most) until both ends of `src`'s requests have counted `n`: one end's
/// exchange can finish a ring-buffer read after the other's.
fn wait_both_ends(daemon: &Daemon, src: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while (observed(daemon, src, "client") < n as f64 || observed(daemon, src, "server") < n as f64)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A counter of the daemon's that must be 0 (summed over its series).
fn assert_zero(daemon: &Daemon, metric: &str) {
    assert_eq!(
        daemon.metric_sum(metric, &[]),
        0.0,
        "{metric}: {}",
        daemon.diagnostics()
    );
}

/// Asserts that the edge from `src` to the server on `port` counted the requests whose
/// statuses the client got (`codes`), all over TLS, each by both ends.
fn assert_tls_edge(daemon: &Daemon, src: &str, port: u16, codes: &BTreeMap<String, u64>) {
    let total: u64 = codes.values().sum();
    let edge = daemon.wait_edge(src, port, total);
    assert_eq!(edge["requests"], total, "{}", daemon.diagnostics());
    assert_eq!(status_codes(&edge), *codes, "{}", daemon.diagnostics());
    assert_eq!(edge["tls_requests"], total, "every request went over TLS");
    wait_both_ends(daemon, src, total);
    assert_eq!(observed(daemon, src, "client"), total as f64);
    assert_eq!(observed(daemon, src, "server"), total as f64);
}

/// A fixture's TLS server (`program fixture server PORT CERT KEY`), once it listens.
fn tls_fixture_server(program: &str, fixture: &str, dir: &std::path::Path) -> Server {
    let (cert, key) = self_signed(dir);
    let port = common::free_port();
    let child = Command::new(program)
        .arg(workspace_root().join("tests/fixtures").join(fixture))
        .args(["server", &port.to_string()])
        .arg(&cert)
        .arg(&key)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program} {fixture}: {e}"));
    Server::adopt(child, port)
}

/// curl over TLS to nginx: one curl fetching many URLs over one connection (keep-alive) and
/// one curl per request (a handshake each), 200/404/503 and 100 KB bodies. Both ends count
/// every request with the status curl got, nothing is lost, and each server span is the child
/// of its client span.
#[test]
fn curl_and_nginx_over_tls_are_counted_by_both_ends() {
    let _serial = serial();
    let daemon = Daemon::start();
    let status = daemon.json("/api/status");
    assert!(
        status["tls_libraries"].as_i64().unwrap_or(0) >= 1,
        "libssl hooked: {status}"
    );
    let nginx = Nginx::start_tls(&scratch("nginx-tls"), false, "");
    let base = format!("https://127.0.0.1:{}", nginx.port);
    let mut urls = Vec::new();
    for i in 0..60 {
        urls.push(match i % 6 {
            0 => format!("{base}/missing/{i}"),
            1 => format!("{base}/fail/{i}"),
            2 => format!("{base}/big.bin"),
            _ => format!("{base}/tiny"),
        });
    }
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut curl = |urls: &[String]| {
        let mut cmd = Command::new("curl");
        cmd.args(["-sk", "-w", "%{http_code}\n"]);
        for url in urls {
            cmd.args(["-o", "/dev/null", url]);
        }
        let out = cmd.output().expect("run curl");
        for code in String::from_utf8_lossy(&out.stdout).lines() {
            *codes.entry(code.to_owned()).or_default() += 1;
        }
    };
    curl(&urls);
    for url in urls.iter().take(20) {
        curl(std::slice::from_ref(url));
    }
    let total: u64 = codes.values().sum();
    assert_eq!(total, 80, "curl's answers: {codes:?}");
    assert!(!codes.contains_key("000"), "curl reached nginx: {codes:?}");
    let edge = daemon.wait_edge("curl", nginx.port, total);
    assert_eq!(edge["requests"], total, "{}", daemon.diagnostics());
    assert_eq!(status_codes(&edge), codes, "{}", daemon.diagnostics());
    assert_eq!(edge["tls_requests"], total, "every request went over TLS");
    wait_both_ends(&daemon, "curl", total);
    assert_eq!(observed(&daemon, "curl", "client"), total as f64);
    assert_eq!(observed(&daemon, "curl", "server"), total as f64);
    assert_zero(&daemon, "tracer_requests_lost_total");

    let spans = daemon.json("/api/spans?limit=1000");
    let ours: Vec<&Value> = spans["spans"]
        .as_array()
        .expect("spans")
        .iter()
        .filter(|s| {
            s["server"]
                .as_str()
                .is_some_and(|a| a.ends_with(&format!(":{}", nginx.port)))
        })
        .collect();
    let clients: HashSet<&str> = ours
        .iter()
        .filter(|s| s["kind"] == "CLIENT")
        .filter_map(|s| s["span_id"].as_str())
        .collect();
    let servers: Vec<&&Value> = ours.iter().filter(|s| s["kind"] == "SERVER").collect();
    assert_eq!(clients.len() as u64, total);
    assert_eq!(servers.len() as u64, total);
    for s in servers {
        assert!(
            s["parent_span_id"]
                .as_str()
                .is_some_and(|p| clients.contains(p)),
            "server span without its client span: {s}"
        );
    }
}

/// wget, which encrypts with GnuTLS (`gnutls_record_send`/`gnutls_record_recv`), to nginx
/// (OpenSSL): one wget fetching many URLs over one kept-alive connection, and one wget per
/// request. Every response wget printed is counted by both ends with its status, as TLS.
#[test]
fn wget_over_gnutls_is_counted_by_both_ends() {
    let _serial = serial();
    let daemon = Daemon::start();
    let nginx = Nginx::start_tls(&scratch("nginx-gnutls"), false, "");
    let base = format!("https://127.0.0.1:{}", nginx.port);
    let urls: Vec<String> = (0..24)
        .map(|i| match i % 4 {
            0 => format!("{base}/missing/{i}"),
            1 => format!("{base}/big.bin"),
            _ => format!("{base}/tiny"),
        })
        .collect();
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut wget = |urls: &[String]| {
        let out = Command::new("wget")
            .args(["-S", "-O", "/dev/null", "--no-check-certificate", "-t", "1"])
            .args(urls)
            .output()
            .expect("run wget");
        // -S prints each response's head, its status line indented: "  HTTP/1.1 200 OK".
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            if let Some(code) = line
                .trim_start()
                .strip_prefix("HTTP/1.1 ")
                .and_then(|rest| rest.split(' ').next())
            {
                *codes.entry(code.to_owned()).or_default() += 1;
            }
        }
    };
    wget(&urls);
    for url in urls.iter().take(8) {
        wget(std::slice::from_ref(url));
    }
    assert_eq!(codes.values().sum::<u64>(), 32, "wget's answers: {codes:?}");
    assert_eq!(codes.get("404"), Some(&8), "wget's answers: {codes:?}");
    assert_tls_edge(&daemon, "wget", nginx.port, &codes);
    assert_zero(&daemon, "tracer_requests_lost_total");
}

/// Python's ssl module on both ends (SSL_read_ex/SSL_write_ex), one keep-alive connection: the
/// requests made while the daemon runs are counted by the client end exactly, with their
/// statuses; the connection was opened (and used) before the daemon started, so its server
/// end, whose thread was already waiting inside a read, may miss the first.
#[test]
fn python_tls_connection_older_than_the_daemon_is_followed() {
    let _serial = serial();
    let dir = scratch("py-tls");
    let (cert, key) = self_signed(&dir);
    let server = Server::script(
        "tls_server.py",
        &[cert.display().to_string(), key.display().to_string()],
    );
    let go = dir.join("go");
    let mut client = Command::new("python3")
        .arg(workspace_root().join("tests/fixtures/tls_client.py"))
        .args([&server.port.to_string(), "10"])
        .arg(&go)
        .arg("200")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tls_client.py");
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("first phase").expect("line");
    assert!(first.contains("before"), "{first}");

    let daemon = Daemon::start();
    std::fs::write(&go, b"").expect("go");
    let second: Value =
        serde_json::from_str(&lines.next().expect("second phase").expect("line")).expect("json");
    let _ = client.wait();
    let codes: BTreeMap<String, u64> = second["after"]
        .as_object()
        .expect("after")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("n")))
        .collect();
    let total: u64 = codes.values().sum();
    assert_eq!(total, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while observed(&daemon, "tls_client", "client") < total as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        observed(&daemon, "tls_client", "client"),
        total as f64,
        "{}",
        daemon.diagnostics()
    );
    for (code, n) in &codes {
        assert_eq!(
            daemon.metric_sum(
                "tracer_http_request_duration_seconds_count",
                &[
                    ("source", "tls_client"),
                    ("observer", "client"),
                    ("status", code)
                ],
            ),
            *n as f64,
            "status {code}: {}",
            daemon.diagnostics()
        );
    }
    let at_server = observed(&daemon, "tls_client", "server");
    assert!(
        at_server == total as f64 || at_server == total as f64 - 1.0,
        "server end {at_server} of {total}: {}",
        daemon.diagnostics()
    );
    let before = daemon.metric_sum(
        "tracer_http_request_duration_seconds_count",
        &[("route", "/before/{id}")],
    );
    assert_eq!(
        before, 0.0,
        "nothing made up for the requests before the daemon"
    );
    // The client has gone: the server end's close is numbered by the socket (whose only event
    // was the read it was waiting in), its plaintext by the library session; no loss made up.
    std::thread::sleep(Duration::from_millis(500));
    assert_zero(&daemon, "tracer_connections_desynced_total");
    assert_zero(&daemon, "tracer_requests_lost_total");
}

/// h2load over TLS (HTTP/2 by ALPN) against nginx, several streams in flight per connection,
/// tiny and 100 KB responses (frames past what is copied of each read: walked in the kernel as
/// on a cleartext socket) and 404s: every request counted with its status, by both ends.
#[test]
fn h2load_over_tls_is_counted() {
    let _serial = serial();
    let daemon = Daemon::start();
    let nginx = Nginx::start_tls(&scratch("nginx-h2-tls"), true, "");
    let mut done = 0u64;
    let mut ok = 0u64;
    let mut not_found = 0u64;
    for (path, n, rps) in [
        ("/tiny", 3000, 300),
        ("/big.bin", 400, 25),
        ("/missing/3", 1000, 100),
    ] {
        let url = format!("https://127.0.0.1:{}{path}", nginx.port);
        let (n_done, classes) = h2load(
            &["-c4", "-m10", &format!("-n{n}"), &format!("--rps={rps}")],
            &url,
            "h2",
        );
        done += n_done;
        ok += classes[0];
        not_found += classes[2];
    }
    assert_eq!(done, 4400, "h2load completed every request");
    let edge = daemon.wait_edge("h2load", nginx.port, done);
    assert_eq!(edge["requests"], done, "{}", daemon.diagnostics());
    let codes = status_codes(&edge);
    assert_eq!(codes.get("200").copied().unwrap_or(0), ok, "{codes:?}");
    assert_eq!(
        codes.get("404").copied().unwrap_or(0),
        not_found,
        "{codes:?}"
    );
    wait_both_ends(&daemon, "h2load", done);
    assert_eq!(observed(&daemon, "h2load", "client"), done as f64);
    assert_eq!(
        observed(&daemon, "h2load", "server"),
        done as f64,
        "{}",
        daemon.diagnostics()
    );
    assert_zero(&daemon, "tracer_requests_lost_total");
}

/// A process that loads its own copy of libssl (as a container brings its own) after the daemon
/// started: the copy is found in the process's memory map and hooked within seconds, and the
/// requests its server answers are counted by that end too.
#[test]
fn a_library_copy_loaded_later_is_hooked() {
    let _serial = serial();
    let daemon = Daemon::start();
    let before = hooked(&daemon);
    let dir = scratch("libssl-copy");
    let (cert, key) = self_signed(&dir);
    let lib = dir.join("lib");
    std::fs::create_dir_all(&lib).expect("lib dir");
    let system = [
        "/usr/lib/x86_64-linux-gnu",
        "/lib/x86_64-linux-gnu",
        "/usr/lib64",
    ]
    .iter()
    .map(|d| std::path::Path::new(d).join("libssl.so.3"))
    .find(|p| p.exists())
    .expect("libssl.so.3 on this host");
    std::fs::copy(&system, lib.join("libssl.so.3")).expect("copy libssl");
    let port = common::free_port();
    let child = Command::new(common::system_python())
        .arg(workspace_root().join("tests/fixtures/tls_server.py"))
        .arg(port.to_string())
        .arg(&cert)
        .arg(&key)
        .env("LD_LIBRARY_PATH", &lib)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tls_server.py");
    let server = Server::adopt(child, port);
    wait_hooked(&daemon, before, "the copy");
    let mut answered = 0u64;
    for i in 0..20 {
        let out = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("https://127.0.0.1:{}/items/{i}", server.port))
            .output()
            .expect("curl");
        if out.stdout == b"200" {
            answered += 1;
        }
    }
    assert_eq!(answered, 20);
    wait_both_ends(&daemon, "curl", answered);
    assert_eq!(
        observed(&daemon, "curl", "server"),
        answered as f64,
        "{}",
        daemon.diagnostics()
    );
    assert_eq!(observed(&daemon, "curl", "client"), answered as f64);
}

/// Apache httpd with mod_ssl, whose BIO hands ciphertext to its own output filters: the socket
/// writes happen outside `SSL_write` (the session's socket is learnt from its reads). Every
/// request curl and h2load made is counted by both ends with its status.
#[test]
fn apache_mod_ssl_is_counted_by_both_ends() {
    let _serial = serial();
    let daemon = Daemon::start();
    let apache = Apache::start(&scratch("apache-tls"));
    let base = format!("https://127.0.0.1:{}", apache.port);
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..30 {
        let out = Command::new("curl")
            .args(["-sk", "-w", "%{http_code}\n"])
            .args(["-o", "/dev/null", &format!("{base}/index.html")])
            .args(["-o", "/dev/null", &format!("{base}/big.txt")])
            .args(["-o", "/dev/null", &format!("{base}/missing/{i}")])
            .output()
            .expect("curl");
        for code in String::from_utf8_lossy(&out.stdout).lines() {
            *codes.entry(code.to_owned()).or_default() += 1;
        }
    }
    assert_eq!(codes.values().sum::<u64>(), 90, "{codes:?}");
    let (done, classes) = h2load(
        &["--h1", "-c4", "-n2000", "--rps=100"],
        &format!("{base}/index.html"),
        "http/1.1",
    );
    assert_eq!(done, 2000);
    assert_eq!(classes[0], 2000);
    let edge = daemon.wait_edge("curl", apache.port, 90);
    assert_eq!(status_codes(&edge), codes, "{}", daemon.diagnostics());
    wait_both_ends(&daemon, "curl", 90);
    wait_both_ends(&daemon, "h2load", done);
    for src in ["curl", "h2load"] {
        let n = if src == "curl" { 90 } else { done };
        assert_eq!(observed(&daemon, src, "client"), n as f64, "{src}");
        assert_eq!(
            observed(&daemon, src, "server"),
            n as f64,
            "{src}: {}",
            daemon.diagnostics()
        );
    }
    assert_zero(&daemon, "tracer_requests_lost_total");
}

/// `apache2` in the foreground with mod_ssl on a port of its own, stopped gracefully on drop
/// (SIGTERM: its worker processes go with it).
struct Apache {
    child: std::process::Child,
    port: u16,
}

impl Apache {
    fn start(dir: &std::path::Path) -> Self {
        let (cert, key) = self_signed(dir);
        let www = dir.join("www");
        std::fs::create_dir_all(&www).expect("www");
        std::fs::create_dir_all(dir.join("logs")).expect("logs");
        std::fs::write(www.join("index.html"), "<h1>apache</h1>\n").expect("index");
        std::fs::write(www.join("big.txt"), vec![b'a'; 50_000]).expect("big");
        let port = common::free_port();
        let modules = "/usr/lib/apache2/modules";
        let conf = format!(
            "ServerRoot {dir}\nServerName localhost\nListen 127.0.0.1:{port}\n\
             DefaultRuntimeDir {dir}\nPidFile {dir}/httpd.pid\nErrorLog {dir}/logs/error.log\n\
             LoadModule mpm_event_module {modules}/mod_mpm_event.so\n\
             LoadModule authz_core_module {modules}/mod_authz_core.so\n\
             LoadModule socache_shmcb_module {modules}/mod_socache_shmcb.so\n\
             LoadModule ssl_module {modules}/mod_ssl.so\n\
             User www-data\nGroup www-data\nDocumentRoot {www}\nMaxKeepAliveRequests 0\n\
             <Directory {www}>\n  Require all granted\n</Directory>\n\
             SSLEngine on\nSSLCertificateFile {cert}\nSSLCertificateKeyFile {key}\n",
            dir = dir.display(),
            www = www.display(),
            cert = cert.display(),
            key = key.display(),
        );
        let conf_path = dir.join("httpd.conf");
        std::fs::write(&conf_path, conf).expect("conf");
        // The workers (www-data) read the documents.
        let _ = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&www)
            .status();
        let _ = Command::new("chmod").arg("a+x").arg(dir).status();
        let bin = ["/usr/sbin/apache2", "/usr/bin/apache2"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("apache2");
        let child = Command::new(bin)
            .arg("-f")
            .arg(&conf_path)
            .arg("-DFOREGROUND")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("apache2 (apt install apache2)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "apache2 did not start: {}",
                std::fs::read_to_string(dir.join("logs/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }
}

impl Drop for Apache {
    fn drop(&mut self) {
        common::stop_gracefully(&mut self.child);
    }
}

/// Go's own crypto/tls (no libssl): a Go HTTPS server started after the daemon is hooked
/// within its look at new processes; a Go client (the same program) speaking HTTP/2 (ALPN h2,
/// 16 streams at once on one connection, 100 KB answers among them) and HTTP/1.1 (4
/// connections), and curl (libssl) to the Go server: every request counted by both ends with
/// the status the client got, all as TLS, nothing lost.
#[test]
fn go_crypto_tls_is_counted_by_both_ends() {
    let _serial = serial();
    let dir = scratch("gotls");
    let bin = build_gotls(&dir, "");
    let daemon = Daemon::start();
    let (server, url) = go_server_hooked(&daemon, &bin, &dir);
    let port = server.port;
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    for (n, conns, proto) in [("2000", "16", "h2"), ("1000", "4", "http/1.1")] {
        fixture_client(Command::new(&bin), &url, n, conns, proto, &mut codes);
    }
    let total: u64 = codes.values().sum();
    assert_eq!(total, 3000, "the client's answers: {codes:?}");
    assert_tls_edge(&daemon, "gotls", port, &codes);

    // A libssl client to the Go server.
    let mut answered = 0u64;
    for path in ["/ok", "/big", "/missing/3", "/fail"]
        .iter()
        .cycle()
        .take(20)
    {
        let out = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{url}{path}"))
            .output()
            .expect("curl");
        answered += u64::from(!out.stdout.is_empty() && out.stdout != b"000");
    }
    assert_eq!(answered, 20);
    wait_both_ends(&daemon, "curl", answered);
    assert_eq!(
        observed(&daemon, "curl", "server"),
        answered as f64,
        "{}",
        daemon.diagnostics()
    );
    assert_eq!(observed(&daemon, "curl", "client"), answered as f64);
    assert_zero(&daemon, "tracer_requests_lost_total");
}

/// A Go client the host never ran before, living about a second: hooked at its exec (the kernel
/// tells the daemon of each program a process begins running), not at the daemon's next look at
/// new processes a second later, by when it is done. Over HTTP/1.1 on 4 connections: the server
/// end counts every request with its status; the client end those made after the hook, tens of
/// milliseconds into the run (with the look alone, none: the TLS calls before the hook are not
/// seen, and an HTTP/2 connection opened before it would not be followed at all).
#[test]
fn a_go_client_new_to_the_host_is_hooked_at_its_exec() {
    let _serial = serial();
    let dir = scratch("gotls-exec");
    let bin = build_gotls(&dir, "");
    let daemon = Daemon::start();
    let (server, url) = go_server_hooked(&daemon, &bin, &dir);
    // The same program as a file of its own: an executable the daemon never looked at.
    let client = dir.join("goclient");
    std::fs::copy(&bin, &client).expect("copy the Go program");
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    fixture_client(
        Command::new(&client),
        &url,
        "3000",
        "4",
        "http/1.1",
        &mut codes,
    );
    let took = started.elapsed();
    let total: u64 = codes.values().sum();
    assert_eq!(total, 3000, "the client's answers: {codes:?}");
    let edge = daemon.wait_edge("goclient", server.port, total);
    assert_eq!(edge["requests"], total, "{}", daemon.diagnostics());
    assert_eq!(status_codes(&edge), codes, "{}", daemon.diagnostics());
    // The client end's exchanges settle with the server end's.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = observed(&daemon, "goclient", "client");
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = observed(&daemon, "goclient", "client");
        if now == seen || Instant::now() > deadline {
            break;
        }
        seen = now;
    }
    assert!(
        seen >= 0.8 * total as f64,
        "the client end counted {seen} of {total} requests in a run of {took:?}: {}",
        daemon.log_text()
    );
}

/// The gotls server, started after the daemon, once the daemon has hooked it; its URL.
fn go_server_hooked(
    daemon: &Daemon,
    bin: &std::path::Path,
    dir: &std::path::Path,
) -> (Server, String) {
    let (cert, key) = self_signed(dir);
    let before = hooked(daemon);
    let port = common::free_port();
    let child = Command::new(bin)
        .args(["server", &port.to_string()])
        .arg(&cert)
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gotls server");
    let server = Server::adopt(child, port);
    wait_hooked(daemon, before, "the Go program");
    (server, format!("https://127.0.0.1:{port}"))
}

/// `n` requests of a fixture's client (`client URL N CONNS PROTO`, printing
/// `{"status": {..}, "proto": {..}}`: the gotls program, node_tls.js) over `conns`
/// connections speaking `proto`; checks that every one did, and adds the statuses it got to
/// `codes`.
fn fixture_client(
    mut client: Command,
    url: &str,
    n: &str,
    conns: &str,
    proto: &str,
    codes: &mut BTreeMap<String, u64>,
) {
    let out = client
        .args(["client", url, n, conns, proto])
        .output()
        .expect("the fixture's client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("client's JSON");
    let spoke = if proto == "h2" {
        "HTTP/2.0"
    } else {
        "HTTP/1.1"
    };
    assert_eq!(got["proto"][spoke], n.parse::<u64>().expect("n"), "{got}");
    add_codes(&got["status"], codes);
}

/// A Go program built stripped (`-ldflags=-s -w`, as many images are: no symbol table) is
/// hooked from the runtime's function table: its client and server over HTTP/2 counted by
/// both ends.
#[test]
fn stripped_go_program_is_hooked() {
    let _serial = serial();
    let dir = scratch("gotls-stripped");
    let bin = build_gotls(&dir, "-s -w");
    let daemon = Daemon::start();
    let (server, url) = go_server_hooked(&daemon, &bin, &dir);
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    fixture_client(Command::new(&bin), &url, "400", "4", "h2", &mut codes);
    let total: u64 = codes.values().sum();
    assert_eq!(total, 400, "the client's answers: {codes:?}");
    let edge = daemon.wait_edge("gotls", server.port, total);
    assert_eq!(edge["requests"], total, "{}", daemon.diagnostics());
    assert_eq!(status_codes(&edge), codes, "{}", daemon.diagnostics());
    wait_both_ends(&daemon, "gotls", total);
    assert_eq!(observed(&daemon, "gotls", "client"), total as f64);
    assert_eq!(observed(&daemon, "gotls", "server"), total as f64);
    assert_zero(&daemon, "tracer_requests_lost_total");
}

/// Sends curl requests to `url` (one at a time, at most 15 s) until the server end has counted
/// one: a server whose executable links OpenSSL in (official Node.js builds) is hooked at the
/// daemon's next look at new processes, one linking libssl at start.
fn wait_server_end(daemon: &Daemon, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while observed(daemon, "curl", "server") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the server end never counted curl's requests: {}",
            daemon.log_text()
        );
        let _ = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", url])
            .status();
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The statuses a fixture client printed as JSON (`{"code": count}`), added to `codes`.
fn add_codes(got: &Value, codes: &mut BTreeMap<String, u64>) {
    for (code, c) in got.as_object().expect("statuses") {
        *codes.entry(code.clone()).or_default() += c.as_u64().expect("count");
    }
}

/// Node.js over TLS (tests/fixtures/node_tls.js, node's own modules): its OpenSSL is driven
/// through a memory BIO, so no socket call happens inside a TLS call (the session's socket is
/// the one the thread sends the call's records on right after), and official builds link
/// OpenSSL into the executable. A Node HTTPS server (HTTP/1.1 and HTTP/2 by ALPN) and a Node
/// client: every request counted by both ends with the status the client got, as TLS.
#[test]
fn node_tls_is_counted_by_both_ends() {
    let _serial = serial();
    let fixture = workspace_root().join("tests/fixtures/node_tls.js");
    let daemon = Daemon::start();
    let server = tls_fixture_server("node", "node_tls.js", &scratch("node-tls"));
    let url = format!("https://127.0.0.1:{}", server.port);
    wait_server_end(&daemon, &url);
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    for (n, conns, proto) in [("1000", "16", "h2"), ("600", "4", "http/1.1")] {
        let mut node = Command::new("node");
        node.arg(&fixture);
        fixture_client(node, &url, n, conns, proto, &mut codes);
    }
    let total: u64 = codes.values().sum();
    assert_eq!(total, 1600, "the client's answers: {codes:?}");
    assert_tls_edge(&daemon, "node_tls", server.port, &codes);
    assert_zero(&daemon, "tracer_requests_lost_total");
    // Finding OpenSSL's calls in the 100 MB executable reads its symbol hash table, not every
    // symbol: the daemon's peak stays near its usual ~28 MB (it was 55 MB).
    let peak = daemon.status_mb("VmHWM");
    eprintln!("daemon peak RSS {peak:.1} MB");
    assert!(peak > 0.0 && peak <= 40.0, "daemon peak RSS {peak:.1} MB");
}

/// Python's asyncio over TLS (tests/fixtures/aio_tls.py): the ssl module's memory BIO
/// (`SSLObject`), asyncio writing each call's records to the socket itself. A server and a
/// client on 6 keep-alive connections: every request counted by both ends with its status.
#[test]
fn python_asyncio_tls_is_counted_by_both_ends() {
    let _serial = serial();
    let fixture = workspace_root().join("tests/fixtures/aio_tls.py");
    let daemon = Daemon::start();
    let server = tls_fixture_server("python3", "aio_tls.py", &scratch("aio-tls"));
    let port = server.port.to_string();
    wait_server_end(&daemon, &format!("https://127.0.0.1:{port}"));
    let out = Command::new("python3")
        .arg(&fixture)
        .args(["client", &port, "600", "6"])
        .output()
        .expect("aio_tls.py client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    add_codes(
        &serde_json::from_slice(&out.stdout).expect("client's JSON"),
        &mut codes,
    );
    let total: u64 = codes.values().sum();
    assert_eq!(total, 600, "the client's answers: {codes:?}");
    assert_tls_edge(&daemon, "aio_tls", server.port, &codes);
    assert_zero(&daemon, "tracer_requests_lost_total");
}

/// Long bodies over TLS on a connection that does not pipeline (python's http.client, OpenSSL's
/// SSL_read_ex): once the daemon has seen a long message, the plaintext reads that begin none
/// come trimmed (TLS plaintext has no sequence numbers to tell a body's end by, but its
/// messages go one at a time all the same). Every response counted at both ends; nearly every
/// read after the first body trimmed (OpenSSL hands over at most one 16 KiB record's plaintext
/// per read: at least 62 reads per 1 MB body).
#[test]
fn long_bodies_over_tls_come_trimmed() {
    let _serial = serial();
    let dir = scratch("py-tls-long");
    let (cert, key) = self_signed(&dir);
    let server = Server::script(
        "tls_server.py",
        &[cert.display().to_string(), key.display().to_string()],
    );
    let daemon = Daemon::start();
    let trimmed = || {
        daemon.metric_sum(
            "tracer_kernel_events_total",
            &[("reason", "body_payload_trimmed")],
        )
    };
    let n = 20;
    let script = format!(
        "import http.client, ssl, time\n\
         c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ssl._create_unverified_context())\n\
         def get():\n    c.request('GET', '/big?size=1000000')\n    r = c.getresponse()\n    \
         assert r.status == 200 and len(r.read()) == 1000000\n\
         get()\n\
         time.sleep(0.5)\n\
         print('framed', flush=True)\n\
         input()\n\
         for _ in range({n}): get()\n\
         print('done')\n",
        port = server.port
    );
    let mut client = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("line").expect("line"), "framed");
    // The first body's count read, once the daemon has had it a second.
    std::thread::sleep(Duration::from_millis(1500));
    let before = trimmed();
    writeln!(client.stdin.as_mut().expect("stdin")).expect("go on");
    assert_eq!(lines.next().expect("line").expect("line"), "done");
    let _ = client.wait();
    assert_tls_edge(
        &daemon,
        "python3",
        server.port,
        &BTreeMap::from([("200".to_owned(), n + 1)]),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let trimmed = trimmed() - before;
    eprintln!("{trimmed} plaintext reads trimmed");
    assert!(
        trimmed >= (n * 62) as f64 * 0.8,
        "{trimmed} reads trimmed of at least {}",
        n * 62
    );
    assert_zero(&daemon, "tracer_parse_failures_total");
}
