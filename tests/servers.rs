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
    let completed = wrk_completed(&out.stdout);
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

/// The requests wrk completed, from its summary ("N requests in Ts").
fn wrk_completed(stdout: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(stdout);
    text.lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .and_then(|(n, _)| n.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("wrk output: {text}"))
}

/// A process in a fake Kubernetes pod: a cgroup under `kubepods`, the pod's name as its
/// hostname, and the service-account namespace file in a mount namespace of its own, as the
/// kubelet and the container runtime set them up.
fn in_pod(
    pod: &str,
    namespace: Option<&str>,
    cgroup: &std::path::Path,
    program: &[&str],
) -> Command {
    std::fs::create_dir_all(cgroup).expect("create the pod's cgroup");
    let secrets = namespace.map_or(String::new(), |ns| {
        format!(
            "mount -t tmpfs pod /run && mkdir -p /run/secrets/kubernetes.io/serviceaccount \
             && echo {ns} > /run/secrets/kubernetes.io/serviceaccount/namespace && "
        )
    });
    let script = format!(
        "{secrets}echo $$ > {}/cgroup.procs && exec \"$@\"",
        cgroup.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script, "pod"])
        .args(program)
        .env("HOSTNAME", pod);
    cmd
}

/// tests/fixtures/server.py in a fake pod (see `in_pod`).
fn fixture_in_pod(pod: &str, namespace: Option<&str>, cgroup: &std::path::Path) -> common::Server {
    let port = common::free_port();
    let fixture = common::workspace_root().join("tests/fixtures/server.py");
    let fixture = fixture.to_str().expect("utf-8 path");
    let child = in_pod(
        pod,
        namespace,
        cgroup,
        &["python3", fixture, &port.to_string()],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("spawn the server in its pod");
    common::Server::adopt(child, port)
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
    let server = fixture_in_pod("orders-0", Some("shop"), &server_cg);
    let port = server.port;
    let url = format!("http://127.0.0.1:{port}/ok");
    let mut curl = vec!["curl", "-s", "-w", "%{http_code}\n"];
    for _ in 0..3 {
        curl.extend(["-o", "/dev/null", url.as_str()]);
    }
    let out = in_pod("frontend-7c9d8b6f5d-bq4zt", Some("shop"), &client_cg, &curl)
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

    // The CLI, as `linkerd viz stat -n`: only the namespace's workloads and edges.
    let cli = |args: &[&str]| -> serde_json::Value {
        let addr = daemon.addr.to_string();
        let out = std::process::Command::new(common::tracer_bin())
            .args(args)
            .args(["--addr", &addr, "-o", "json"])
            .output()
            .expect("run the CLI");
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).expect("the CLI's JSON")
    };
    let names = |v: &serde_json::Value, list: &str, key: &str| -> Vec<String> {
        v[list]
            .as_array()
            .expect("a list")
            .iter()
            .map(|x| x[key].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let stat = cli(&["stat", "-n", "shop"]);
    assert_eq!(names(&stat, "workloads", "name"), ["orders.shop"], "{stat}");
    let edges = cli(&["edges", "--namespace", "shop"]);
    assert_eq!(names(&edges, "edges", "src"), ["frontend.shop"], "{edges}");
    assert!(
        names(&edges, "tcp", "src")
            .iter()
            .all(|s| s == "frontend.shop"),
        "{edges}"
    );
    let other = cli(&["stat", "-n", "sho"]);
    assert_eq!(
        names(&other, "workloads", "name"),
        Vec::<String>::new(),
        "{other}"
    );
}

/// A pod on the host's network has the node's hostname and, here, no service-account token:
/// it is named from the kubelet's log directory of the pod UID its cgroup carries
/// (`/var/log/pods/<namespace>_<pod>_<uid>`, systemd cgroup driver's path).
#[test]
fn a_pod_on_the_hosts_network_is_named_from_the_kubelets_pod_logs() {
    let _serial = serial();
    let daemon = Daemon::start();
    let uid = format!("0f3c2a4e-6b1d-4c8e-9a7f-{:012x}", std::process::id());
    let cgroup = cgroup2_root().join(format!(
        "kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    ));
    let logs = std::path::Path::new("/var/log/pods");
    let made_logs = !logs.exists();
    let pod_logs = logs.join(format!("payments_ledger-7d4b9c8f6b-qw2zx_{uid}"));
    std::fs::create_dir_all(&pod_logs).expect("create the pod's log directory");
    let mut dirs = vec![cgroup.clone(), pod_logs];
    if made_logs {
        dirs.push(logs.to_path_buf());
    }
    let _dirs = RemoveDirs(dirs);
    let host = String::from_utf8(Command::new("hostname").output().expect("hostname").stdout)
        .expect("utf-8 hostname");
    let server = fixture_in_pod(host.trim(), None, &cgroup);
    let port = server.port;
    let url = format!("http://127.0.0.1:{port}/ok");
    let codes = curl(&[&url, &url], "%{http_code}\n");
    assert_eq!(codes, ["200", "200"]);
    let edge = daemon.wait_edge("curl", port, 2);
    assert_eq!(edge["dst"], "ledger.payments", "edge: {edge}");
    assert_eq!(edge["requests"], 2, "edge: {edge}");
}

/// A client in a pod that has exited by the time its exchange is recorded (curl, a job): no
/// /proc entry is left to read, but its pod's cgroup is, and the kernel side sent its id (the
/// cgroup directory's inode number): the process is named by that pod all the same.
#[test]
fn a_process_gone_from_proc_is_named_by_its_pods_cgroup() {
    use std::os::unix::fs::MetadataExt as _;
    let _serial = serial();
    let uid = format!("5a1e2b3c-4d5e-4f60-8a9b-{:012x}", std::process::id());
    let pod_cg = cgroup2_root().join(format!(
        "kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    ));
    let container = pod_cg.join("cri-containerd-5ca1ab1e.scope");
    std::fs::create_dir_all(&container).expect("create the pod's cgroups");
    let logs = std::path::Path::new("/var/log/pods");
    let made_logs = !logs.exists();
    let pod_logs = logs.join(format!("batch_report-29012345-x7k2p_{uid}"));
    std::fs::create_dir_all(&pod_logs).expect("create the pod's log directory");
    let mut dirs = vec![container.clone(), pod_cg, pod_logs];
    if made_logs {
        dirs.push(logs.to_path_buf());
    }
    let _dirs = RemoveDirs(dirs);
    let cgroup_id = std::fs::metadata(&container).expect("cgroup").ino();
    // A process id no process has (pid_max is at most 2^22).
    let task = tracer::event::Task {
        tgid: u32::MAX - 7,
        tid: u32::MAX - 7,
        comm: tracer::event::Comm(*b"curl\0\0\0\0\0\0\0\0\0\0\0\0"),
        cgroup_id,
    };
    assert_eq!(&*tracer::workload::name(&task), "report.batch");
}

struct RemoveDirs(Vec<std::path::PathBuf>);

impl Drop for RemoveDirs {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Clients that write a request and close without reading the response (one that gave up, a
/// health check, fire-and-forget): nginx still serves each one (its access log says so), and
/// the client's kernel answers the response with a reset that, on loopback, nginx's socket
/// handles inside nginx's own send. Each request is counted by its server end all the same.
#[test]
fn requests_whose_client_closed_first_are_counted() {
    let _serial = serial();
    let daemon = Daemon::start();
    let dir = scratch("nginx-gone");
    let log = dir.join("gone.log");
    let nginx = Nginx::start(
        &dir,
        &format!(
            "location = /gone {{ access_log {}; return 200 \"ok\\n\"; }}",
            log.display()
        ),
    );
    const N: usize = 100;
    let client = format!(
        "import socket\nfor _ in range({N}):\n    s = socket.create_connection(('127.0.0.1', {}))\n    \
         s.sendall(b'GET /gone HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n    s.close()\n",
        nginx.port
    );
    let status = Command::new("python3")
        .args(["-c", &client])
        .status()
        .expect("run the client");
    assert!(status.success());
    // What nginx served, by its own account.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let served = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let n = text
            .lines()
            .filter(|l| l.contains("\"GET /gone HTTP/1.1\" 200"))
            .count();
        if n == N || std::time::Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        served > 0,
        "nginx served none: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let edge = daemon.wait_edge("python3", nginx.port, served as u64);
    assert_eq!(
        edge["requests"],
        served as u64,
        "edge: {edge}; {}",
        daemon.diagnostics()
    );
    assert_eq!(edge["status_codes"]["200"], served as u64, "edge: {edge}");
}

/// wrk with HTTP/1.1 pipelining (a Lua script sends `DEPTH` requests per write), as
/// TechEmpower's plaintext test does: the server end's count is exact (plus what was in flight
/// when wrk stopped), at a depth past the old per-connection queue of 16 — which silently
/// lost a fifth of the requests at 30 deep and paired responses with the wrong requests.
#[test]
fn wrk_pipelining_is_counted() {
    let _serial = serial();
    let daemon = Daemon::start();
    let dir = scratch("nginx-pipe");
    let nginx = Nginx::start(&dir, "");
    const CONNECTIONS: u64 = 4;
    const DEPTH: u64 = 20;
    let script = dir.join("pipe.lua");
    std::fs::write(
        &script,
        format!(
            "init = function(args)\n  local r = {{}}\n  for i = 1, {DEPTH} do r[i] = \
             wrk.format(nil, \"/tiny\") end\n  req = table.concat(r)\nend\n\
             request = function() return req end\n"
        ),
    )
    .expect("write the wrk script");
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{CONNECTIONS}"), "-d2s", "-s"])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/tiny", nginx.port))
        .output()
        .expect("wrk (apt install wrk)");
    let completed = wrk_completed(&out.stdout);
    let edge = daemon.wait_edge("wrk", nginx.port, completed);
    let seen = edge["requests"].as_u64().expect("requests");
    let ring_lost = daemon.metric_sum(
        "tracer_kernel_events_total",
        &[("reason", "ringbuf_full_data")],
    );
    eprintln!("wrk completed {completed} pipelined {DEPTH} deep, tracer counted {seen}");
    assert!(
        ring_lost > 0.0 || (completed..=completed + CONNECTIONS * DEPTH).contains(&seen),
        "wrk completed {completed}, tracer counted {seen}; {}",
        daemon.diagnostics()
    );
    assert_eq!(
        edge["status_codes"]["200"], seen,
        "every response paired: {edge}"
    );
}
