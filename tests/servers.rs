//! Other servers and clients than python and curl: nginx (static files through sendfile,
//! keep-alive) and wrk at full speed. Counts checked against what the clients reported.

mod common;

use std::{collections::BTreeMap, process::Command};

use common::{Daemon, Nginx, curl, scratch, serial};

/// nginx serves files with sendfile (bytes the probes count but never see), small bodies with
/// writev, errors from memory; one keep-alive connection carries them all.
#[test]
fn nginx_keep_alive_with_sendfile() {
    nginx_keep_alive(&[]);
}

/// The same through the classic syscall tracepoints (sendfile64, writev, read).
#[test]
fn nginx_keep_alive_through_syscall_tracepoints() {
    nginx_keep_alive(&["--attach", "tracepoint"]);
}

fn nginx_keep_alive(flags: &[&str]) {
    let _serial = serial();
    let daemon = Daemon::start_with(flags);
    let nginx = Nginx::start(&scratch("nginx-ka"), "");
    let mut urls = Vec::new();
    for i in 0..60 {
        let path = match i % 6 {
            0 | 1 => "/index.html".to_owned(),
            2 => "/big.bin".to_owned(),
            3 => format!("/missing/{i}"),
            4 => "/tiny".to_owned(),
            _ => format!("/fail/{i}"),
        };
        urls.push(format!("http://127.0.0.1:{}{path}", nginx.port));
    }
    let out = curl(&urls, "%{http_code} %{num_connects}\n");
    let mut want: BTreeMap<u16, u64> = BTreeMap::new();
    let mut connects = 0;
    for line in &out {
        let (code, n) = line.split_once(' ').expect("curl -w");
        *want.entry(code.parse().expect("code")).or_default() += 1;
        connects += n.parse::<u64>().expect("num_connects");
    }
    assert_eq!(connects, 1, "one keep-alive connection");
    let edge = daemon.wait_edge("curl", nginx.port, 60);
    assert_eq!(edge["requests"], 60, "edge: {edge}");
    let got: BTreeMap<u16, u64> = edge["status_codes"]
        .as_object()
        .expect("status_codes")
        .iter()
        .map(|(k, v)| (k.parse().expect("code"), v.as_u64().expect("n")))
        .collect();
    assert_eq!(got, want);
    assert_eq!(edge["failures"], want[&503], "5xx are failures");
    assert_eq!(edge["client_latency"]["count"], 60);
}

/// wrk at full speed for a few seconds: every request wrk completed is counted (plus at most the
/// ones still in flight when wrk stopped, which the server answered but wrk did not count), and
/// any loss is counted, not silent.
#[test]
fn wrk_saturation_is_counted() {
    let _serial = serial();
    let daemon = Daemon::start();
    let nginx = Nginx::start(&scratch("nginx-wrk"), "");
    const CONNECTIONS: u64 = 8;
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{CONNECTIONS}"), "-d3s"])
        .arg(format!("http://127.0.0.1:{}/tiny", nginx.port))
        .output()
        .expect("wrk (apt install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let completed: u64 = text
        .lines()
        .find_map(|l| {
            let l = l.trim();
            l.split_once(" requests in ")
                .and_then(|(n, _)| n.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("wrk output: {text}"));
    std::thread::sleep(std::time::Duration::from_secs(1));
    let edge = daemon.wait_edge("wrk", nginx.port, completed);
    let seen = edge["requests"].as_u64().expect("requests");
    let lost = daemon.metric_sum(
        "tracer_kernel_events_total",
        &[("reason", "ringbuf_full_data")],
    ) + daemon.metric_sum(
        "tracer_kernel_events_total",
        &[("reason", "ringbuf_full_conn")],
    );
    eprintln!("wrk completed {completed}, tracer counted {seen}, ring-buffer losses {lost}");
    assert!(
        lost > 0.0 || (completed..=completed + CONNECTIONS).contains(&seen),
        "wrk completed {completed}, tracer counted {seen}, and no loss was counted"
    );
    assert!(
        seen <= completed + CONNECTIONS,
        "over-count: {seen} > {completed} + {CONNECTIONS}"
    );
}

/// A process in a fake Kubernetes pod: a cgroup under `kubepods`, the pod's name as its
/// hostname, and the service-account namespace file in a mount namespace of its own, as the
/// kubelet and the container runtime set them up.
fn in_pod(pod: &str, namespace: &str, cgroup: &std::path::Path, program: &[&str]) -> Command {
    std::fs::create_dir_all(cgroup).expect("create the pod's cgroup");
    let script = format!(
        "mount -t tmpfs pod /run && mkdir -p /run/secrets/kubernetes.io/serviceaccount \
         && echo {namespace} > /run/secrets/kubernetes.io/serviceaccount/namespace \
         && echo $$ > {}/cgroup.procs && exec \"$@\"",
        cgroup.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script, "pod"])
        .args(program)
        .env("HOSTNAME", pod);
    cmd
}

/// Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup` or, on hybrid hosts such as this
/// one, `/sys/fs/cgroup/unified`).
fn cgroup2_root() -> std::path::PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.get(2) == Some(&"cgroup2")).then(|| std::path::PathBuf::from(f[1]))
        })
        .expect("a cgroup2 mount")
}

/// On a Kubernetes node (the DaemonSet in deploy/), a pod's processes are named by the pod's
/// owner and namespace, as Linkerd names workloads, not by their process names: a curl in a
/// Deployment's pod calling a python server in a StatefulSet's pod is `frontend.shop ->
/// orders.shop`.
#[test]
fn pods_are_named_by_owner_and_namespace() {
    let _serial = serial();
    let daemon = Daemon::start();
    let root = cgroup2_root().join(format!("kubepods-tracer-test-{}", std::process::id()));
    let (server_cg, client_cg) = (root.join("pod-orders"), root.join("pod-frontend"));
    // Removed once their processes are gone (servers are dropped first: declared after).
    let _cgroups = RemoveDirs(vec![server_cg.clone(), client_cg.clone(), root.clone()]);
    let port = common::free_port();
    let fixture = common::workspace_root().join("tests/fixtures/server.py");
    let server = in_pod(
        "orders-0",
        "shop",
        &server_cg,
        &[
            "python3",
            fixture.to_str().expect("utf-8 path"),
            &port.to_string(),
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("spawn the server in its pod");
    let _server = common::Server::adopt(server, port);
    let url = format!("http://127.0.0.1:{port}/ok");
    let out = in_pod(
        "frontend-7c9d8b6f5d-bq4zt",
        "shop",
        &client_cg,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            &url,
            &url,
            &url,
        ],
    )
    .output()
    .expect("run curl in its pod");
    let codes = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        3,
        "curl: {codes} {out:?}"
    );

    let edge = daemon.wait_edge("frontend.shop", port, 3);
    assert_eq!(edge["dst"], "orders.shop", "edge: {edge}");
    assert_eq!(
        edge["requests"],
        3,
        "edge: {edge}; {}",
        daemon.diagnostics()
    );
}

struct RemoveDirs(Vec<std::path::PathBuf>);

impl Drop for RemoveDirs {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}
