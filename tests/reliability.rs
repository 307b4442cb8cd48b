//! Reliability under load and faults (issue 5): connection storms, overload, restarts, and
//! connections older than the daemon. Real probes, real servers and load generators.

mod common;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Daemon, Nginx, Server, scratch, serial, workspace_root};

/// wrk against `port`: requests it completed.
fn wrk(port: u16, secs: u64, conns: u64, close: bool) -> u64 {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", &format!("-c{conns}"), &format!("-d{secs}s")]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd
        .arg(format!("http://127.0.0.1:{port}/tiny"))
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().split_once(" requests in ")?.0.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk output: {text}"))
}

/// Waits until none of our programs is loaded; fails with `what` after `within`.
fn wait_no_programs(within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while !our_programs().is_empty() {
        assert!(Instant::now() < deadline, "{what}: {:?}", our_programs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Names of loaded eBPF programs that are ours (kernel names are cut at 15 bytes).
fn our_programs() -> Vec<String> {
    const OURS: &[&str] = &[
        "inet_sock_set_state",
        "raw_inet_sock_set_state",
        "sock_send_length",
        "sock_recv_length",
        "sock_send_data",
        "sock_recv_data",
        "raw_sock_send",
        "raw_sock_recv",
        "btf_sock_send",
        "btf_sock_recv",
        "btf_inet_sock_set_state",
        "tcp_send_start",
        "sys_enter_write",
        "sys_exit_write",
        "sys_enter_recvfrom",
        "sys_exit_recvfrom",
        "raw_sys_enter",
        "raw_sys_exit",
    ];
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_owned))
        .filter(|n| {
            OURS.iter()
                .any(|o| o.starts_with(n.as_str()) && n.len() >= 12)
        })
        .collect()
}

/// Short connections, one request each, at full speed: the connection table stays bounded and
/// drains, memory stays in budget, and every request wrk completed is counted.
#[test]
fn connection_storm_stays_bounded_and_exact() {
    let _serial = serial();
    let daemon = Daemon::start();
    let nginx = Nginx::start(&scratch("storm"), "");
    const CONNS: u64 = 16;
    let mut completed = 0;
    let start = Instant::now();
    // Up to 100k connections, or a minute.
    while completed < 100_000 && start.elapsed() < Duration::from_secs(50) {
        completed += wrk(nginx.port, 5, CONNS, true);
    }
    std::thread::sleep(Duration::from_secs(2));
    // Only wrk calls this nginx.
    let seen = daemon.wait_requests_to(nginx.port, completed);
    let lost = daemon.metric_sum("tracer_requests_lost_total", &[("side", "server")]);
    let rss = daemon.status_mb("VmRSS");
    let tracked = daemon.metric_sum("tracer_connections_tracked", &[]);
    eprintln!(
        "storm: {completed} connections in {:.0} s, counted {seen} (+{lost} lost, counted), rss {rss:.1} MB, tracked now {tracked}",
        start.elapsed().as_secs_f64()
    );
    assert!(
        seen <= completed + 4 * CONNS && seen as f64 + lost >= completed as f64,
        "completed {completed}, counted {seen}, lost {lost}: {}",
        daemon.diagnostics()
    );
    assert!(
        tracked < 1000.0,
        "closed connections are forgotten: {tracked} still tracked"
    );
    assert!(rss <= 30.0, "daemon RSS {rss:.1} MB over the 30 MB budget");
}

/// Past what the daemon can follow (a ring buffer of 64 KiB): the application is not held back
/// (a full ring buffer drops, it never makes the application wait: throughput is no lower than
/// with a tracer that keeps up), the daemon stays up, and requests seen plus requests counted as
/// lost (by either end) account for every request wrk completed, each once: both ends of each
/// connection are traced here, and most requests lose an event at one end or both. The
/// tracer's cost itself (throughput with the tracer against without) is measured by `cargo
/// xtask bench`.
#[test]
fn overload_is_counted_never_silent() {
    let _serial = serial();
    let nginx = Nginx::start(&scratch("overload"), "");
    const CONNS: u64 = 16;
    let without = wrk(nginx.port, 3, CONNS, false);
    let keeping_up = {
        let _daemon = Daemon::start();
        wrk(nginx.port, 3, CONNS, false)
    };
    let mut daemon = Daemon::start_with(&["--ringbuf-bytes", "65536"]);
    let completed = wrk(nginx.port, 3, CONNS, false);
    // A server end's loss waits 2 s for its client end's count (`ledger`).
    std::thread::sleep(Duration::from_secs(4));
    assert!(daemon.alive(), "daemon died: {}", daemon.log_text());
    // Only wrk calls this nginx.
    let seen = daemon.requests_to(nginx.port);
    let lost = daemon.metric_sum("tracer_requests_lost_total", &[]);
    let drops = daemon.metric_sum(
        "tracer_kernel_events_total",
        &[("reason", "ringbuf_full_data")],
    );
    eprintln!(
        "overload: wrk without tracer {without}, with a tracer keeping up {keeping_up}, with an \
         overloaded one {completed}; counted {seen}, lost (counted) {lost}, events dropped {drops}"
    );
    assert!(drops > 0.0, "the test did not overload the tracer");
    // wrk on this 2-core machine varies by about 20% from run to run; a tracer that made the
    // application wait for it would cut throughput several-fold.
    assert!(
        completed as f64 >= keeping_up as f64 * 0.6,
        "the application was held back: {completed} with an overloaded tracer vs {keeping_up}"
    );
    let accounted = seen as f64 + lost;
    // Requests in flight when wrk stopped are answered but not counted by wrk. A request lost
    // at a close whose own record was dropped too is counted by direction, at both ends
    // (`lost_request_unheld_*`): a few hundred in ~400k here.
    let slack = (4 * CONNS) as f64;
    let over = slack + completed as f64 * 0.002;
    assert!(
        accounted + slack >= completed as f64
            && accounted <= completed as f64 + over
            && seen <= completed + 4 * CONNS,
        "completed {completed}, counted {seen} + lost {lost}: {}",
        daemon.diagnostics()
    );
}

/// SIGKILL under load, start again: nothing of the old daemon stays in the kernel, the new one
/// attaches and counts from zero; SIGTERM ends it cleanly.
#[test]
fn restart_after_sigkill_is_clean() {
    let _serial = serial();
    let nginx = Nginx::start(&scratch("restart"), "");
    let daemon = Daemon::start();
    assert!(!our_programs().is_empty(), "programs visible while running");
    let port = nginx.port;
    let load = std::thread::spawn(move || wrk(port, 3, 8, false));
    std::thread::sleep(Duration::from_secs(1));
    daemon.kill();
    wait_no_programs(Duration::from_secs(5), "programs left behind");
    let pins: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !pins.iter().any(|p| p.to_string_lossy().contains("tracer")),
        "pins left behind: {pins:?}"
    );
    load.join().expect("wrk");

    let daemon = Daemon::start();
    let completed = wrk(nginx.port, 2, 4, false);
    let edge = daemon.wait_edge("wrk", nginx.port, completed);
    let seen = edge["requests"].as_u64().expect("requests");
    assert!(
        (completed..=completed + 16).contains(&seen),
        "completed {completed}, counted {seen}"
    );
    // SIGTERM: a clean exit within a second that leaves nothing behind. (Detaching a classic
    // tracepoint waits for RCU grace periods; the default data path has none where BTF is
    // complete, and detaches the rest in parallel.)
    let attach = daemon.json("/api/status")["attach"].clone();
    let exit = daemon.terminate();
    eprintln!("SIGTERM exit took {exit:?} (data path {attach})");
    // Raw tracepoints detach at once; the kernel frees their programs a moment after the
    // process is gone (after an RCU grace period).
    wait_no_programs(Duration::from_secs(2), "programs left after SIGTERM");
    assert!(
        exit < Duration::from_secs(1),
        "SIGTERM exit took {exit:?} (data path {attach})"
    );
}

/// A keep-alive connection opened before the daemon started is followed from its next request.
#[test]
fn connection_older_than_the_daemon_is_followed() {
    older_connection_followed(Server::fixture(), "127.0.0.1");
}

/// The same over IPv6: the addresses of a socket the daemon never saw connect are read from
/// the socket (at offsets from the kernel's BTF), so the edge shows the real peer address.
#[test]
fn ipv6_connection_older_than_the_daemon_is_followed() {
    let edge = older_connection_followed(Server::fixture_v6(), "::1");
    let addrs = edge["dst_addrs"].to_string();
    assert!(addrs.contains("[::1]:"), "dst_addrs {addrs}");
}

fn older_connection_followed(server: Server, host: &str) -> serde_json::Value {
    let _serial = serial();
    let go = scratch(&format!("longconn-{}", host.replace(':', "_"))).join("go");
    let mut client = Command::new("python3")
        .arg(workspace_root().join("tests/fixtures/longconn.py"))
        .args([
            &server.port.to_string(),
            go.to_str().expect("path"),
            "10",
            host,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("client");
    let mut lines = BufReader::new(client.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("line").expect("read"), "connected");
    let daemon = Daemon::start();
    std::fs::write(&go, "").expect("go");
    let codes = lines.next().expect("codes line").expect("read");
    client.wait().expect("client exit");
    let want_404 = codes.split(' ').filter(|c| *c == "404").count() as f64;
    let edge = daemon.wait_edge("longconn", server.port, 10);
    assert_eq!(edge["requests"], 10, "edge: {edge}");
    let not_found = daemon.metric_sum(
        "tracer_http_requests_total",
        &[("status", "404"), ("route", "/nf/{id}")],
    );
    assert_eq!(
        not_found, want_404,
        "paired right from the first request seen"
    );
    edge
}
