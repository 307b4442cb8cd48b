//! TCP connections between workloads, whatever they carry: a client of a binary protocol
//! (tests/fixtures/tcp_client.py) to its server (tcp_server.py), connections held open, and
//! connects refused, counted against what the client saw.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, Command, Stdio},
};

use common::{Daemon, Server, free_port, serial, workspace_root};
use serde_json::Value;

/// tests/fixtures/tcp_server.py on `port`, listening.
fn tcp_server(port: u16) -> Server {
    let child = Command::new("python3")
        .arg(workspace_root().join("tests/fixtures/tcp_server.py"))
        .arg(port.to_string())
        .spawn()
        .expect("spawn tcp_server.py");
    Server::adopt(child, port)
}

/// tests/fixtures/tcp_client.py with `args`, once it has reported what it did (its
/// connections held open until `release`).
fn tcp_client(args: &[&str]) -> (Child, Value) {
    let mut client = Command::new("python3")
        .arg(workspace_root().join("tests/fixtures/tcp_client.py"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn tcp_client.py");
    let mut line = String::new();
    BufReader::new(client.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("the client's report");
    let got = serde_json::from_str(&line).expect("the client's JSON");
    (client, got)
}

/// Lets a tcp_client.py close the connections it held, and waits for it.
fn release(mut client: Child) {
    client
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"\n")
        .expect("release the client");
    assert!(client.wait().expect("client exits").success());
}

/// 40 connections of one round trip each, 5 held open, 7 connects refused: the edge from the
/// client to its server (named as its workload: its end is on this host) counts 45 established
/// and 5 open while they are, then 45 closed and none open; the refused connects are failures
/// on an edge to the address; the metrics say the same.
#[test]
fn tcp_connections_are_counted_whatever_they_carry() {
    let _serial = serial();
    let daemon = Daemon::start();
    let port = free_port();
    let _server = tcp_server(port);
    let closed = free_port();
    let (client, got) = tcp_client(&[&port.to_string(), "40", "5", &closed.to_string(), "7"]);
    assert_eq!(got["established"], 45, "{got}");
    assert_eq!(got["refused"], 7, "{got}");

    let edge = daemon.wait_tcp_edge("tcp_client", "tcp_server", |e| {
        e["established"] == 45 && e["closed"] == 40
    });
    assert_eq!(edge["established"], 45, "{edge}");
    assert_eq!(edge["closed"], 40, "{edge}");
    assert_eq!(edge["open"], 5, "{edge}");
    assert_eq!(edge["failed"], 0, "{edge}");
    assert_eq!(edge["dst_addrs"][0], format!("127.0.0.1:{port}"), "{edge}");
    let refused = format!("127.0.0.1:{closed}");
    let edge = daemon.wait_tcp_edge("tcp_client", &refused, |e| e["failed"] == 7);
    assert_eq!(edge["failed"], 7, "{edge}");
    assert_eq!(edge["established"], 0, "{edge}");

    // The held connections closed.
    release(client);
    let edge = daemon.wait_tcp_edge("tcp_client", "tcp_server", |e| e["open"] == 0);
    assert_eq!(edge["open"], 0, "{edge}");
    assert_eq!(edge["closed"], 45, "{edge}");
    // Bytes, from the kernel's counters at each close, as the client moved them.
    assert_eq!(edge["bytes_sent"], got["sent"], "{edge} {got}");
    assert_eq!(edge["bytes_received"], got["received"], "{edge} {got}");
    // Loopback: a round trip of microseconds, nothing lost.
    let rtt = edge["rtt_ms"]
        .as_f64()
        .expect("an RTT once connections closed");
    assert!(rtt > 0.0 && rtt < 100.0, "{edge}");
    assert_eq!(edge["retransmits"], 0, "{edge}");

    let metric = |dst: &str, outcome: &str| {
        daemon.metric_sum(
            "tracer_tcp_connections_total",
            &[
                ("source", "tcp_client"),
                ("destination", dst),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(metric("tcp_server", "established"), 45.0);
    assert_eq!(
        daemon.metric_sum(
            "tracer_tcp_bytes_total",
            &[
                ("source", "tcp_client"),
                ("destination", "tcp_server"),
                ("direction", "sent")
            ]
        ),
        got["sent"].as_f64().expect("sent")
    );
    assert_eq!(metric(&refused, "failed"), 7.0);
    assert_eq!(
        daemon.metric_sum(
            "tracer_tcp_connections_open",
            &[("source", "tcp_client"), ("destination", "tcp_server")]
        ),
        0.0
    );
}

/// Connections opened before the daemon started (a connection pool, after the daemon's
/// restart): found at its start in /proc, counted open on their edge, then closed.
#[test]
fn tcp_connections_older_than_the_daemon_are_counted_open() {
    let _serial = serial();
    let port = free_port();
    let _server = tcp_server(port);
    let (client, got) = tcp_client(&[&port.to_string(), "0", "6", "1", "0"]);
    assert_eq!(got["established"], 6, "{got}");

    let daemon = Daemon::start();
    let edge = daemon.wait_tcp_edge("tcp_client", "tcp_server", |e| e["open"] == 6);
    assert_eq!(edge["open"], 6, "{edge}");
    assert_eq!(
        edge["established"], 0,
        "their connects were not seen: {edge}"
    );
    release(client);
    let edge = daemon.wait_tcp_edge("tcp_client", "tcp_server", |e| e["open"] == 0);
    assert_eq!(edge["open"], 0, "{edge}");
    assert_eq!(edge["closed"], 6, "{edge}");
    assert_eq!(edge["bytes_sent"], got["sent"], "{edge} {got}");
    assert_eq!(edge["bytes_received"], got["received"], "{edge} {got}");
}
