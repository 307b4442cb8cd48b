//! The daemon on production kernels older than this host's (scripts/test-kernel.sh), booted in
//! qemu with this host's root read-only over 9p (tests/fixtures/vm/boot.sh): Debian 12's Linux
//! 6.1, Ubuntu 22.04's 5.15 and Debian 11's 5.10. None has `sock_*_length` tracepoints (6.3+),
//! which the socket data path needs, nor uprobe-multi links (6.6+); 5.15 and 5.10 have no
//! `bpf_loop` (5.17+); 5.10 has neither `bpf_task_pt_regs` nor socket storage for tracing
//! programs (so no fentry path: the syscall tracepoints find sockets from descriptors); their
//! verifiers refuse what newer ones take. All have kprobes and fentry, which this host's
//! kernel refuses. Inside (tests/fixtures/vm/http.sh), curl's requests to the fixture server
//! and to nginx are counted against what curl got.

mod common;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use common::{
    assert_both_ends, edge_in, scratch, serial, status_codes, tracer_bin, workspace_root,
};
use serde_json::Value;

/// Where scripts/test-kernel.sh put kernel `name`.
fn kernel_dir(name: &str) -> PathBuf {
    let dir = Path::new("/var/cache/tracer/kernels").join(name);
    assert!(
        dir.join("vmlinuz").is_file(),
        "no kernel at {}: run scripts/test-kernel.sh (make test does)",
        dir.display()
    );
    dir
}

/// Boots kernel `name` with `script` as the guest's work; the console's text.
fn boot(name: &str, share: &Path, script: &str) -> String {
    fs::write(share.join("guest.sh"), script).expect("write guest.sh");
    let out = Command::new(workspace_root().join("tests/fixtures/vm/boot.sh"))
        .arg(kernel_dir(name))
        .arg(share)
        .arg("900")
        .output()
        .expect("run boot.sh");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "boot.sh failed ({}): {}\n{console}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    console
}

/// curl's status codes, one per line, counted.
fn codes(path: &Path) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for line in fs::read_to_string(path).expect("codes").lines() {
        *counts.entry(line.trim().to_owned()).or_default() += 1;
    }
    counts
}

/// The edge from `src` to the server on `port` in `/api/edges`.
fn edge(edges: &Value, src: &str, port: u16) -> Value {
    edge_in(edges, src, port).unwrap_or_else(|| panic!("no edge {src} -> :{port}: {edges}"))
}

/// On kernel `name` (whose release starts with `release`): the daemon picks data path `attach`
/// and counts curl's requests (OpenSSL's plaintext included), by status, at both ends.
fn counts_exactly_on(name: &str, release: &str, attach: &str) {
    let _serial = serial();
    let share = scratch(name);
    let console = boot(
        name,
        &share,
        &format!(
            "exec sh {root}/tests/fixtures/vm/http.sh {bin} {root}\n",
            root = workspace_root().display(),
            bin = tracer_bin()
        ),
    );
    let read = |name: &str| fs::read_to_string(share.join(name)).unwrap_or_default();
    let context = || {
        format!(
            "console:\n{console}\nerror: {}\ndaemon log:\n{}",
            read("error"),
            read("daemon.log")
        )
    };
    assert!(
        read("kernel").starts_with(release),
        "not {name}: {}",
        context()
    );
    let status: Value = serde_json::from_str(&read("status.json"))
        .unwrap_or_else(|e| panic!("no /api/status ({e}): {}", context()));
    assert_eq!(status["attach"], attach, "{}", context());
    assert_eq!(read("daemon.rc").trim(), "0", "SIGTERM: {}", context());

    let edges: Value = serde_json::from_str(&read("edges.json")).expect("edges.json");
    // One edge per client and server workload: nginx's plain and TLS ports share one.
    let tls = codes(&share.join("tls.codes"));
    for (port, files) in [
        (18081, &["server.codes"][..]),
        (18082, &["nginx.codes", "tls.codes"][..]),
    ] {
        let mut want = BTreeMap::new();
        for file in files {
            for (code, k) in codes(&share.join(file)) {
                *want.entry(code).or_default() += k;
            }
        }
        let n: u64 = want.values().sum();
        assert!(want.len() >= 2 && n >= 6, "{files:?}: {want:?}");
        let e = edge(&edges, "curl", port);
        assert_eq!(
            status_codes(&e),
            want,
            "requests to :{port} by status: {e}\n{}",
            context()
        );
        assert_both_ends(&e, n);
        let over_tls: u64 = if port == 18082 { tls.values().sum() } else { 0 };
        assert_eq!(e["tls_requests"], over_tls, "over TLS to :{port}: {e}");
    }
    // What the long bodies' framing did there (not asserted: when the daemon hears of a body
    // under emulation varies).
    let metrics = read("metrics.txt");
    let framing: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("reason=\"body_payload_"))
        .collect();
    eprintln!("{name}: {framing:?}");
    // h2load's own count: "requests: 40 total, 40 started, 40 done, 40 succeeded, ...".
    let h2load = read("h2load.txt");
    let succeeded: u64 = h2load
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|f| f.strip_suffix(" succeeded")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("h2load's report: {h2load}"));
    assert_eq!(succeeded, 40, "{h2load}");
    let e = edge(&edges, "h2load", 18083);
    assert_eq!(
        status_codes(&e),
        BTreeMap::from([("200".to_owned(), succeeded)]),
        "HTTP/2 requests (bodies by sendfile): {e}\n{}",
        context()
    );
    let _ = fs::remove_dir_all(&share);
}

#[test]
fn linux_6_1_takes_the_fentry_data_path_and_counts_exactly() {
    counts_exactly_on("linux-6.1", "6.1.", "fentry");
}

/// Without `bpf_loop`: the same programs, whose calls of it the verifier never walks there.
#[test]
fn linux_5_15_takes_the_fentry_data_path_without_bpf_loop_and_counts_exactly() {
    counts_exactly_on("linux-5.15", "5.15.", "fentry");
}

/// Debian 11's 5.10 (and Amazon Linux 2's): the syscall raw tracepoints, each call's socket
/// found from its descriptor; OpenSSL by single uprobes whose programs carry no `bpf_loop`.
#[test]
fn linux_5_10_takes_the_syscall_path_with_sockets_from_descriptors_and_counts_exactly() {
    counts_exactly_on("linux-5.10", "5.10.", "raw-tracepoint");
}
