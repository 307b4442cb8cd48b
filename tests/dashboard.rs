//! Issue 6: what a person sees. Real traffic (curl -> Python frontend -> Python backend, curl ->
//! nginx), the real daemon, and the views read by real clients: headless Chromium for the
//! dashboard, tmux for `tracer top`, and `tracer tap` itself. Numbers are compared with what
//! curl saw.

mod common;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Daemon, Nginx, Server, curl, scratch, serial, tracer_bin, workspace_root};
use serde_json::Value;

/// Where the test run leaves its screenshots.
fn artifacts() -> PathBuf {
    let dir = workspace_root().join("target/dashboard");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

fn chromium_bin() -> &'static str {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("chromium (apt install chromium)")
}

/// Opens `url` in headless Chromium (driven over the DevTools protocol by
/// tests/fixtures/headless-page.py: `--dump-dom` with a virtual-time budget never returns while
/// the page holds an event stream open), waits until `ready` (a JS expression) holds, and writes
/// the DOM and/or a screenshot. Returns whether `ready` held within 20 s.
fn headless(
    url: &str,
    ready: &str,
    dom: Option<&std::path::Path>,
    png: Option<&std::path::Path>,
) -> bool {
    let mut cmd = Command::new("python3");
    cmd.arg(workspace_root().join("tests/fixtures/headless-page.py"))
        .arg(url)
        .args(["--wait", ready, "--timeout", "20", "--size", "1440x900"])
        .args(["--chromium", chromium_bin()]);
    if let Some(d) = dom {
        cmd.arg("--dom").arg(d);
    }
    if let Some(p) = png {
        cmd.arg("--png").arg(p);
    }
    let out = cmd.output().expect("run headless-page.py");
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!(
            "headless chromium on {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The page's DOM once `ready` holds (or after 20 s).
fn dump_dom(url: &str, ready: &str) -> String {
    let path = scratch("chromium-dom").join("page.html");
    let held = headless(url, ready, Some(&path), None);
    let html = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        held,
        "{url}: `{ready}` never held; DOM: {}",
        &html[..html.len().min(3000)]
    );
    html
}

fn screenshot(url: &str, ready: &str, name: &str) -> PathBuf {
    let path = artifacts().join(name);
    let _ = std::fs::remove_file(&path);
    assert!(
        headless(url, ready, None, Some(&path)),
        "{url}: `{ready}` never held"
    );
    let len = std::fs::metadata(&path).map_or(0, |m| m.len());
    assert!(
        len > 10_000,
        "screenshot {} is empty ({len} bytes)",
        path.display()
    );
    path
}

/// `<tr ...>` elements whose attributes include `marker`, as their attributes and cell texts.
fn rows(html: &str, marker: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find("<tr ") {
        rest = &rest[i..];
        let end = rest.find("</tr>").unwrap_or(rest.len());
        let row = &rest[..end];
        rest = &rest[end.min(rest.len())..];
        if rest.len() > 5 {
            rest = &rest[5..];
        }
        let attrs_end = row.find('>').unwrap_or(row.len());
        let attrs = &row[..attrs_end];
        if !attrs.contains(marker) {
            continue;
        }
        let cells = row
            .split("<td")
            .skip(1)
            .map(|c| {
                let c = &c[c.find('>').map_or(0, |i| i + 1)..];
                let c = c.split("</td>").next().unwrap_or("");
                strip_tags(c).trim().to_owned()
            })
            .collect();
        out.push((attrs.to_owned(), cells));
    }
    out
}

fn strip_tags(s: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for ch in s.chars() {
        match ch {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
}

fn attr(attrs: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let i = attrs.find(&key)? + key.len();
    let v = &attrs[i..];
    Some(strip_tags(&v[..v.find('"')?]))
}

/// Requests by status class as curl saw them: (total, 5xx).
fn send(urls: &[String]) -> (u64, u64) {
    let codes = curl(urls, "%{http_code}\n");
    let total = codes.len() as u64;
    let failed = codes.iter().filter(|c| c.starts_with('5')).count() as u64;
    assert!(
        codes.iter().all(|c| c != "000"),
        "curl could not reach a server: {codes:?}"
    );
    (total, failed)
}

fn pct(total: u64, failed: u64) -> String {
    format!("{:.2}%", (total - failed) as f64 * 100.0 / total as f64)
}

/// Issue 6, check 1 (and 4): the dashboard on loopback shows the topology of the traffic sent,
/// with the counts and success rates curl saw; its tap view receives requests.
#[test]
fn dashboard_shows_the_topology_and_tap() {
    let _serial = serial();
    let daemon = Daemon::start();
    let started = Instant::now();
    assert!(
        daemon.addr.ip().is_loopback(),
        "the tests' daemon listens on loopback"
    );
    let backend = Server::fixture();
    let frontend = Server::script("frontend.py", &[backend.port.to_string()]);
    let nginx = Nginx::start(&scratch("dash-nginx"), "");

    let front_urls: Vec<String> = (0..20)
        .map(|i| format!("http://127.0.0.1:{}/page/{i}", frontend.port))
        .collect();
    let mut nginx_urls: Vec<String> = (0..30)
        .map(|_| format!("http://127.0.0.1:{}/tiny", nginx.port))
        .collect();
    nginx_urls.extend((0..6).map(|i| format!("http://127.0.0.1:{}/fail/{i}", nginx.port)));
    let (front_total, front_failed) = send(&front_urls);
    let (nginx_total, nginx_failed) = send(&nginx_urls);
    // Each frontend request makes two backend requests, which all succeed.
    let backend_total = 2 * front_total;

    daemon.wait_edge("curl", frontend.port, front_total);
    daemon.wait_edge("frontend", backend.port, backend_total);
    daemon.wait_edge("curl", nginx.port, nginx_total);
    let elapsed = started.elapsed().as_secs_f64();
    assert!(elapsed < 50.0, "traffic must fit the 1m window");

    let url = format!("http://{}/", daemon.addr);
    let html = dump_dom(
        &format!("{url}#/"),
        "document.querySelectorAll('#edges tbody tr[data-src]').length >= 3",
    );
    let edges = rows(&html, "data-src=");
    let by_pair: BTreeMap<(String, String), Vec<String>> = edges
        .iter()
        .map(|(a, cells)| {
            (
                (
                    attr(a, "data-src").unwrap_or_default(),
                    attr(a, "data-dst").unwrap_or_default(),
                ),
                cells.clone(),
            )
        })
        .collect();
    let want = [
        ("curl", "frontend", front_total, front_failed),
        ("frontend", "server", backend_total, 0),
        ("curl", "nginx", nginx_total, nginx_failed),
    ];
    for (src, dst, total, failed) in want {
        let cells = by_pair
            .get(&(src.to_owned(), dst.to_owned()))
            .unwrap_or_else(|| panic!("no edge {src} -> {dst} in the dashboard: {by_pair:?}"));
        // Cells: source, destination, RPS, success rate, p50, p99, requests.
        assert_eq!(cells.len(), 7, "edge row {cells:?}");
        assert_eq!(cells[6], total.to_string(), "{src} -> {dst}: {cells:?}");
        assert_eq!(cells[3], pct(total, failed), "{src} -> {dst}: {cells:?}");
        // RPS over the 1m window, which covers all of the daemon's life so far.
        let rps: f64 = cells[2].parse().expect("rps");
        let expect = total as f64 / started.elapsed().as_secs_f64();
        let early = total as f64 / elapsed;
        assert!(
            rps >= expect * 0.8 - 0.1 && rps <= early * 1.2 + 0.1,
            "{src} -> {dst}: dashboard {rps} rps; sent {total} in the daemon's first {elapsed:.1} s"
        );
    }
    let shot = screenshot(
        &format!("{url}#/"),
        "document.querySelector('#graph[data-rendered]')",
        "topology.png",
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    screenshot(
        &format!("{url}#/workload/frontend"),
        "document.querySelectorAll('#routes tr[data-route]').length > 0",
        "workload.png",
    );

    // Tap: requests sent while the page listens show up in it.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let url = format!("http://127.0.0.1:{}/tiny", nginx.port);
        std::thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) {
                send(&vec![url.clone(); 5]);
                sent += 5;
                std::thread::sleep(Duration::from_millis(100));
            }
            sent
        })
    };
    let rows_arrived = "document.querySelectorAll('#tap tr.tap-row').length >= 5";
    let tap_html = dump_dom(&format!("{url}#/tap?to=nginx"), rows_arrived);
    screenshot(&format!("{url}#/tap?to=nginx"), rows_arrived, "tap.png");
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().expect("load");
    let tapped = rows(&tap_html, "tap-row");
    assert!(
        !tapped.is_empty(),
        "the tap view received none of {sent} requests: {}",
        &tap_html[..tap_html.len().min(3000)]
    );
    for (attrs, cells) in &tapped {
        assert_eq!(
            attr(attrs, "data-status").as_deref(),
            Some("200"),
            "{cells:?}"
        );
        assert!(
            cells.iter().any(|c| c == "nginx") && cells.iter().any(|c| c == "/tiny"),
            "a tap row for nginx /tiny: {cells:?}"
        );
    }
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux (apt install tmux)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue 6, check 2: `tracer top` in a terminal shows the busiest paths with the counts sent;
/// `tracer tap -o json` prints one line per request with its fields.
#[test]
fn top_and_tap_follow_the_requests() {
    let _serial = serial();
    let daemon = Daemon::start();
    let server = Server::fixture();
    let addr = daemon.addr.to_string();

    // tap first, so that it is listening before the traffic starts.
    let n_ok = 12;
    let n_err = 4;
    let tap = Command::new(tracer_bin())
        .args([
            "tap", "--addr", &addr, "--to", "server", "-o", "json", "--max",
        ])
        .arg((n_ok + n_err).to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tracer tap");
    let session = format!("tracer-top-{}", std::process::id());
    let _ = tmux(&["kill-session", "-t", &session]);
    tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "200",
        "-y",
        "40",
        &format!("{} top --addr {addr}", tracer_bin()),
    ]);
    std::thread::sleep(Duration::from_millis(1500));

    let mut urls: Vec<String> = (0..n_ok)
        .map(|_| format!("http://127.0.0.1:{}/ok/top", server.port))
        .collect();
    urls.extend((0..n_err).map(|_| format!("http://127.0.0.1:{}/err/top", server.port)));
    let codes = curl(&urls, "%{http_code}\n");
    assert_eq!(codes.len(), n_ok + n_err);
    daemon.wait_edge("curl", server.port, (n_ok + n_err) as u64);

    // top: the two paths with their counts and success rates.
    let deadline = Instant::now() + Duration::from_secs(10);
    let screen = loop {
        let screen = tmux(&["capture-pane", "-p", "-t", &session]);
        let done = screen
            .lines()
            .any(|l| l.contains("/ok/top") && l.contains(&format!(" {n_ok} ")));
        if done || Instant::now() > deadline {
            break screen;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = tmux(&["send-keys", "-t", &session, "q"]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = tmux(&["kill-session", "-t", &session]);
    std::fs::write(artifacts().join("top.txt"), &screen).expect("write top.txt");
    let row = |path: &str| -> Vec<String> {
        screen
            .lines()
            .find(|l| l.contains(path))
            .unwrap_or_else(|| panic!("no {path} row in tracer top:\n{screen}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let ok = row("/ok/top");
    let err = row("/err/top");
    // Source, destination, method, path, count, best, worst, last, success rate.
    assert_eq!(
        &ok[..5],
        ["curl", "server", "GET", "/ok/top", &n_ok.to_string()],
        "{screen}"
    );
    assert_eq!(ok[8], "100.00%", "{screen}");
    assert_eq!(
        &err[..5],
        ["curl", "server", "GET", "/err/top", &n_err.to_string()],
        "{screen}"
    );
    assert_eq!(err[8], "0.00%", "{screen}");

    // tap: one JSON line per request, as curl saw them. (Stopped after 30 s if it never saw
    // them all, so that a miss fails the test instead of hanging it.)
    let mut tap = tap;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tap.try_wait().expect("wait tap").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = tap.kill();
    let out = tap.wait_with_output().expect("tap output");
    assert!(
        out.status.success(),
        "tracer tap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), n_ok + n_err);
    let mut statuses = BTreeMap::new();
    for l in &lines {
        assert_eq!(l["src"], "curl", "{l}");
        assert_eq!(l["dst"], "server", "{l}");
        assert_eq!(l["method"], "GET", "{l}");
        assert_eq!(l["dst_addr"], format!("127.0.0.1:{}", server.port), "{l}");
        assert!(l["latency_ms"].as_f64().is_some_and(|v| v > 0.0), "{l}");
        assert!(l["ts_ms"].as_f64().is_some_and(|v| v > 1.6e12), "{l}");
        *statuses
            .entry((
                l["path"].as_str().unwrap_or("").to_owned(),
                l["status"].as_u64().unwrap_or(0),
            ))
            .or_insert(0) += 1;
    }
    let mut want = BTreeMap::new();
    for (url, code) in urls.iter().zip(&codes) {
        let path = url
            .split_once(&format!(":{}", server.port))
            .expect("url")
            .1
            .to_owned();
        *want
            .entry((path, code.parse::<u64>().expect("code")))
            .or_insert(0) += 1;
    }
    assert_eq!(statuses, want);

    // The table verbs read the same API: their last column is the request count curl made.
    let table = |args: &[&str]| -> Vec<Vec<String>> {
        let out = Command::new(tracer_bin())
            .args(args)
            .args(["--addr", &addr])
            .output()
            .expect("tracer CLI");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    };
    let last = |rows: &[Vec<String>], first: &[&str]| -> String {
        rows.iter()
            .find(|r| r.len() > first.len() && r[..first.len()] == *first)
            .and_then(|r| r.last().cloned())
            .unwrap_or_else(|| panic!("no row {first:?} in {rows:?}"))
    };
    let total = (n_ok + n_err).to_string();
    assert_eq!(last(&table(&["stat", "server"]), &["server"]), total);
    assert_eq!(
        last(&table(&["edges", "-t", "10m"]), &["curl", "server"]),
        total
    );
    let routes = table(&["routes", "server"]);
    assert_eq!(last(&routes, &["/ok/top", "GET"]), n_ok.to_string());
    assert_eq!(last(&routes, &["/err/top", "GET"]), n_err.to_string());
}

/// Issue 6, check 3: 10,000 distinct paths on one service stay within the route table's cap
/// (the rest counted under `[other]`), every request is counted, and the dashboard and API
/// keep answering during the burst.
#[test]
fn a_burst_of_distinct_paths_is_capped() {
    let _serial = serial();
    let daemon = Daemon::start();
    let dir = scratch("burst");
    // nginx answers at once (Python's server pays a delayed ACK per keep-alive request).
    let server = Nginx::start(&dir, "location /burst/ { return 200 \"ok\\n\"; }");
    let n = 10_000;
    // One keep-alive connection, from a curl config file (the command line would be too long).
    let config: String = (0..n)
        .map(|i| {
            format!(
                "url = \"http://127.0.0.1:{}/burst/p{i}x\"\noutput = \"/dev/null\"\n",
                server.port
            )
        })
        .collect();
    std::fs::write(dir.join("urls"), config).expect("curl config");
    let mut burst = Command::new("curl")
        .args(["-s", "-w", "%{http_code}\n", "-K"])
        .arg(dir.join("urls"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");

    // While it runs: the dashboard and the API answer promptly.
    let mut slowest = Duration::ZERO;
    let t = Instant::now();
    let base = format!("http://{}", daemon.addr);
    while burst.try_wait().expect("wait").is_none() && t.elapsed() < Duration::from_secs(120) {
        for path in [
            "/",
            "/api/topology",
            "/api/routes?workload=nginx",
            "/api/stat",
        ] {
            let t0 = Instant::now();
            let _ = ureq::get(&format!("{base}{path}")).call();
            slowest = slowest.max(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = burst.wait_with_output().expect("curl output");
    let codes = String::from_utf8_lossy(&out.stdout);
    let ok = codes.lines().filter(|c| *c == "200").count() as u64;
    assert_eq!(ok, n, "curl got {ok} answers of 200");
    daemon.wait_edge("curl", server.port, n);

    let routes = daemon.json("/api/routes?workload=nginx&window=10m");
    let routes = routes["routes"].as_array().expect("routes");
    let total: u64 = routes
        .iter()
        .map(|r| r["requests"].as_u64().unwrap_or(0))
        .sum();
    let other = routes
        .iter()
        .find(|r| r["route"] == "[other]")
        .and_then(|r| r["requests"].as_u64())
        .unwrap_or(0);
    eprintln!(
        "{} routes kept, {other} requests under [other]; slowest API answer during the burst {slowest:?}",
        routes.len()
    );
    assert!(routes.len() <= 257, "route table grew to {}", routes.len());
    assert_eq!(total, n, "every request counted under some route");
    assert!(other >= n - 256, "the rest is under [other]: {other}");
    assert!(
        daemon.metric_sum("tracer_series_overflow_total", &[("table", "route")])
            >= (n - 256) as f64
    );
    assert!(
        slowest < Duration::from_secs(2),
        "the API took {slowest:?} to answer during the burst"
    );
    // And the dashboard's workload page renders the capped table.
    let html = dump_dom(
        &format!("{base}/#/workload/nginx"),
        "document.querySelectorAll('#routes tr[data-route]').length > 0",
    );
    let shown = rows(&html, "data-route=");
    assert!(
        !shown.is_empty() && shown.len() <= 257,
        "{} route rows on the workload page",
        shown.len()
    );
}

/// Issue 6, check 4: loopback unless told otherwise; the CLI says plainly when no daemon runs.
#[test]
fn binds_loopback_by_default_and_cli_errors_are_clear() {
    let help = Command::new(tracer_bin())
        .args(["run", "--help"])
        .output()
        .expect("tracer run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("[default: 127.0.0.1:9464]"), "{help}");
    let port = common::free_port();
    for verb in [
        &["stat"][..],
        &["edges"],
        &["routes", "x"],
        &["tap"],
        &["top"],
    ] {
        let out = Command::new(tracer_bin())
            .args(verb)
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .output()
            .expect("run the CLI");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{verb:?} without a daemon must fail");
        assert!(
            err.contains("no tracer daemon answers at"),
            "{verb:?}: {err}"
        );
    }
    // Metrics only with an OTLP endpoint set is a contradiction, said before anything loads.
    let out = Command::new(tracer_bin())
        .args(["run", "--no-spans", "--otlp-endpoint", "http://127.0.0.1:1"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .output()
        .expect("tracer run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--no-spans with OTLP must fail");
    assert!(err.contains("--no-spans builds no spans"), "{err}");
}
