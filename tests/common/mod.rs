//! Test harness: the real daemon (real eBPF programs) and real servers and clients on loopback.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod otlp;

/// An edge's requests by status code (`/api/edges`).
pub fn status_codes(edge: &Value) -> BTreeMap<String, u64> {
    edge["status_codes"]
        .as_object()
        .expect("status_codes")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().expect("n")))
        .collect()
}

/// The edge from `src` whose server listens on `port`, in an `/api/edges` answer.
pub fn edge_in(edges: &Value, src: &str, port: u16) -> Option<Value> {
    edges["edges"]
        .as_array()
        .expect("edges array")
        .iter()
        .find(|e| e["src"] == src && serves_on(e, port))
        .cloned()
}

/// Whether an edge's server listens on `port`.
fn serves_on(edge: &Value, port: u16) -> bool {
    edge["dst_addrs"].as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x.as_str().is_some_and(|s| s.ends_with(&format!(":{port}"))))
    })
}

/// Asserts that both ends of an edge (its server and its client, both on this host) saw `n`
/// requests.
pub fn assert_both_ends(edge: &Value, n: u64) {
    assert_eq!(
        edge["server_latency"]["count"], n,
        "the server end saw every request"
    );
    assert_eq!(
        edge["client_latency"]["count"], n,
        "the client end saw every request"
    );
}

/// Every daemon sees all traffic on the host: tests that run one take turns.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A fresh directory for this test process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn tracer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tracer")
}

/// A running `tracer run`, stopped on drop.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra `tracer run` flags.
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let log = std::env::temp_dir().join(format!("tracer-test-{port}.log"));
        let child = Command::new(tracer_bin())
            .args(["run", "--listen", &addr.to_string()])
            .args(extra)
            // TRACER_TEST_LOG sets another filter (say info,tracer::conn=debug) to look into a run.
            .env(
                "RUST_LOG",
                std::env::var("TRACER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn tracer run");
        let mut d = Self { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = d.child.try_wait().expect("wait") {
                panic!("tracer run exited with {status}: {}", d.log_text());
            }
            if d.try_get("/api/status").is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "tracer run not ready after 30 s: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    /// A daemon exporting its spans to `receiver` over OTLP/gRPC.
    pub fn exporting_to(receiver: &otlp::Receiver) -> Self {
        let endpoint = format!("http://{}", receiver.addr);
        Self::start_with(&["--otlp-endpoint", &endpoint, "--otlp-protocol", "grpc"])
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_get(&self, path: &str) -> Option<String> {
        let mut resp = ureq::get(&format!("http://{}{path}", self.addr))
            .call()
            .ok()?;
        resp.body_mut().read_to_string().ok()
    }

    pub fn get(&self, path: &str) -> String {
        self.try_get(path)
            .unwrap_or_else(|| panic!("GET {path} from the daemon failed: {}", self.log_text()))
    }

    pub fn json(&self, path: &str) -> Value {
        serde_json::from_str(&self.get(path)).expect("daemon answers JSON")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A memory figure of the daemon's `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in MB.
    pub fn status_mb(&self, field: &str) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }

    /// SIGKILL, no clean-up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; how long the daemon took to exit.
    pub fn terminate(mut self) -> Duration {
        let t = Instant::now();
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        t.elapsed()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// The edge whose server listens on `port`, from `src`.
    pub fn edge(&self, src: &str, port: u16) -> Option<Value> {
        edge_in(&self.json("/api/edges"), src, port)
    }

    /// Requests to the server on `port`, from any client, over every edge they were counted
    /// under: a connection whose events were partly lost to a full ring buffer names the end
    /// the daemon did not see by its address (`127.0.0.1 -> nginx`, `wrk -> 127.0.0.1:port`),
    /// apart from the edge between the named ends.
    pub fn requests_to(&self, port: u16) -> u64 {
        let edges = self.json("/api/edges");
        edges["edges"]
            .as_array()
            .expect("edges array")
            .iter()
            .filter(|e| serves_on(e, port))
            .map(|e| e["requests"].as_u64().unwrap_or(0))
            .sum()
    }

    /// `requests_to(port)` once it reaches `want`, or after 10 s (and a little longer, so that
    /// an over-count would show too).
    pub fn wait_requests_to(&self, port: u16, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.requests_to(port) < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(300));
        self.requests_to(port)
    }

    /// The TCP edge `src -> dst` (`/api/edges`' `tcp`) once `done` holds, or after 10 s.
    pub fn wait_tcp_edge(&self, src: &str, dst: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tcp = self.json("/api/edges")["tcp"].clone();
            let edge = tcp
                .as_array()
                .expect("tcp edges")
                .iter()
                .find(|e| e["src"] == src && e["dst"] == dst)
                .cloned();
            if edge.as_ref().is_some_and(&done) || Instant::now() > deadline {
                return edge.unwrap_or_else(|| panic!("no TCP edge {src} -> {dst}: {tcp}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the edge has `want` requests (or the timeout), and returns it.
    pub fn wait_edge(&self, src: &str, port: u16, want: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let edge = self.edge(src, port);
            let n = edge
                .as_ref()
                .map_or(0, |e| e["requests"].as_u64().unwrap_or(0));
            if n >= want || Instant::now() > deadline {
                // A little longer, so that an over-count would show too.
                std::thread::sleep(Duration::from_millis(300));
                return self.edge(src, port).unwrap_or_else(|| {
                    panic!(
                        "no edge {src} -> :{port}; edges: {}",
                        self.get("/api/edges")
                    )
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The daemon's own non-zero loss and failure counters, for assertion messages.
    pub fn diagnostics(&self) -> String {
        self.get("/metrics")
            .lines()
            .filter(|l| {
                !l.starts_with('#')
                    && (l.contains("reason=") || l.contains("tracer_events_total"))
                    && !l.ends_with(" 0")
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\nedges: "
            + &self.get("/api/edges")
    }

    /// Sum of a counter over the series whose labels include all of `labels`.
    pub fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.get("/metrics");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = series.split_once('{').unwrap_or((series, ""));
                if n != name {
                    return None;
                }
                labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                    .then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        stop_gracefully(&mut self.child);
    }
}

/// SIGTERM, then SIGKILL if the process is still there 5 s later.
pub fn stop_gracefully(child: &mut Child) {
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A server process, killed on drop.
pub struct Server {
    child: Child,
    pub port: u16,
}

impl Server {
    fn wait_listening(child: Child, port: u16) -> Self {
        Self::wait_listening_on(child, "127.0.0.1", port)
    }

    fn wait_listening_on(mut child: Child, host: &str, port: u16) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((host, port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("server exited early with {status}");
            }
            assert!(Instant::now() < deadline, "server not listening on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }

    /// A server started elsewhere, listening on `port` on loopback once it is up.
    pub fn adopt(child: Child, port: u16) -> Self {
        Self::wait_listening(child, port)
    }

    /// `python3 -m http.server` serving `dir` (HTTP/1.0, one connection per request).
    pub fn python_http_server(dir: &Path) -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(dir)
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3 -m http.server");
        Self::wait_listening(child, port)
    }

    /// tests/fixtures/server.py: HTTP/1.1 keep-alive, status and framing chosen by path.
    pub fn fixture() -> Self {
        Self::script("server.py", &[])
    }

    /// The same on IPv6 loopback, `[::1]`.
    pub fn fixture_v6() -> Self {
        Self::fixture_on("::1")
    }

    /// The same on `host` (`0.0.0.0`: every address, for clients on other hosts).
    pub fn fixture_on(host: &str) -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .arg(workspace_root().join("tests/fixtures/server.py"))
            .arg(port.to_string())
            .env("FIXTURE_HOST", host)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fixture server");
        let reach = if host == "0.0.0.0" { "127.0.0.1" } else { host };
        Self::wait_listening_on(child, reach, port)
    }

    /// A Python script from tests/fixtures, given its port first and then `args`.
    pub fn script(name: &str, args: &[String]) -> Self {
        let port = free_port();
        let child = Command::new("python3")
            .arg(workspace_root().join("tests/fixtures").join(name))
            .arg(port.to_string())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fixture server");
        Self::wait_listening(child, port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The system's python3 (where apt's python3-grpcio is), rather than one earlier on PATH.
pub fn system_python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// One curl invocation fetching `urls` in order (bodies discarded); returns curl's `-w` output
/// lines, one per URL.
pub fn curl<S: AsRef<str>>(urls: &[S], write_out: &str) -> Vec<String> {
    curl_with(&[], urls, write_out)
}

/// `curl` with `args` (`--http2`, ...) before the URLs.
pub fn curl_with<S: AsRef<str>>(args: &[&str], urls: &[S], write_out: &str) -> Vec<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", write_out]).args(args);
    for url in urls {
        cmd.args(["-o", "/dev/null", url.as_ref()]);
    }
    let out = cmd.output().expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn read_all(mut s: TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf
}

/// nginx with its own prefix and config, killed on drop.
pub struct Nginx {
    child: Child,
    pub port: u16,
}

impl Nginx {
    /// `locations`: extra `location` blocks for the server, e.g. a proxy_pass.
    pub fn start(dir: &Path, locations: &str) -> Self {
        Self::start_listening(dir, "", locations)
    }

    /// HTTP/2 without TLS (prior knowledge, as gRPC and h2load speak it).
    pub fn start_h2(dir: &Path, locations: &str) -> Self {
        Self::start_listening(dir, " http2", locations)
    }

    /// Over TLS (a self-signed certificate made here), with HTTP/2 offered by ALPN when
    /// `http2`.
    pub fn start_tls(dir: &Path, http2: bool, locations: &str) -> Self {
        let (cert, key) = self_signed(dir);
        let listen = if http2 { " ssl http2" } else { " ssl" };
        let locations = format!(
            "ssl_certificate {};\n    ssl_certificate_key {};\n    {locations}",
            cert.display(),
            key.display()
        );
        Self::start_listening(dir, listen, &locations)
    }

    fn start_listening(dir: &Path, listen: &str, locations: &str) -> Self {
        let port = free_port();
        let www = dir.join("www");
        std::fs::create_dir_all(&www).expect("www");
        std::fs::write(www.join("index.html"), "<h1>nginx</h1>\n").expect("index");
        std::fs::write(www.join("big.bin"), vec![b'n'; 100_000]).expect("big");
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\n\
             error_log {dir}/error.log;\npid {dir}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  keepalive_requests 1000000;\n\
               client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
               fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n\
               scgi_temp_path {dir}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port}{listen};\n    root {www};\n\
                 location = /tiny {{ return 200 \"ok\\n\"; }}\n\
                 location /fail/ {{ return 503; }}\n    {locations}\n  }}\n}}\n",
            dir = dir.display(),
            www = www.display(),
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("conf");
        let child = Command::new(nginx_bin())
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx (apt install nginx)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Self { child, port }
    }
}

/// What h2load reported: requests done (answered, whatever the status), and responses by
/// status class (2xx..5xx); panics unless it spoke `protocol` ("h2", "http/1.1").
pub fn h2load(args: &[&str], url: &str, protocol: &str) -> (u64, [u64; 4]) {
    let out = Command::new("h2load")
        .args(args)
        .arg(url)
        .output()
        .expect("h2load (apt install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("Application protocol: {protocol}")),
        "h2load spoke {protocol}: {text}"
    );
    let numbers = |prefix: &str| -> Vec<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in h2load's output:\n{text}"));
        line[prefix.len()..]
            .split(',')
            .map(|f| {
                f.split_whitespace()
                    .next()
                    .expect("count")
                    .parse()
                    .expect("number")
            })
            .collect()
    };
    let requests = numbers("requests:");
    let codes = numbers("status codes:");
    // "requests: N total, N started, N done, N succeeded, ...": succeeded leaves out 4xx/5xx.
    (requests[2], [codes[0], codes[1], codes[2], codes[3]])
}

/// A self-signed certificate for `localhost` and its key, made in `dir` with the openssl tool.
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (apt install openssl)");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

fn nginx_bin() -> PathBuf {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nginx"))
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TLS library files and Go programs the daemon has hooked.
pub fn hooked(daemon: &Daemon) -> i64 {
    daemon.json("/api/status")["tls_libraries"]
        .as_i64()
        .expect("tls_libraries")
}

/// Waits (15 s at most) until the daemon has hooked more than `before` (`what`: the file or
/// program expected).
pub fn wait_hooked(daemon: &Daemon, before: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while hooked(daemon) == before {
        assert!(
            Instant::now() < deadline,
            "{what} was not hooked: {}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// tests/fixtures/gotls built with the host's Go toolchain into `dir`, with `ldflags`.
pub fn build_gotls(dir: &std::path::Path, ldflags: &str) -> std::path::PathBuf {
    let bin = dir.join("gotls");
    let out = Command::new("go")
        .args(["build", "-ldflags", ldflags, "-o"])
        .arg(&bin)
        .arg(".")
        .current_dir(workspace_root().join("tests/fixtures/gotls"))
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GOFLAGS", "-mod=mod")
        .output()
        .expect("go (apt install golang-go)");
    assert!(
        out.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}
