//! Workload names for processes on this host. The process name (comm) says little for an
//! interpreter: two Python services are both `python3`. As Beyla and OBI do, a process's
//! `OTEL_SERVICE_NAME` wins; a process in a Kubernetes pod is named by the pod's owner and
//! namespace (`web.shop` for pod `web-5d8f7c9b4-x7k2p` in namespace `shop`), as Linkerd names
//! workloads; an interpreter is named by the script or module it runs; anything else by its
//! process name.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::event::Task;

/// Processes remembered; the cache starts over when full (names are cheap to read again).
const CAPACITY: usize = 8192;

/// Process names (or their prefixes, for versioned binaries such as `python3.11`) of
/// interpreters, whose first argument names the program.
const INTERPRETERS: &[&str] = &[
    "python", "node", "ruby", "perl", "php", "java", "bun", "deno", "dotnet",
];

/// Names by process and thread name (a thread name not seen before, as after an exec, is
/// named again).
type Cache = HashMap<(u32, [u8; 16]), Arc<str>>;

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// The workload name of a process on this host.
pub fn name(task: &Task) -> Arc<str> {
    // Not kept: the thread's name is missing (`threads`), not the process's.
    if task.comm.0[0] == 0 {
        return "[unknown]".into();
    }
    let mut guard = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    // By process and thread name: a process that exec'd another program under the same pid
    // has new thread names too.
    let key = (task.tgid, task.comm.0);
    if let Some(name) = cache.get(&key) {
        return name.clone();
    }
    let name: Arc<str> = resolve(task.tgid, &task.comm.as_str(), task.cgroup_id).into();
    if cache.len() >= CAPACITY {
        cache.clear();
    }
    cache.insert(key, name.clone());
    name
}

/// `thread_comm` is the name of the thread that moved the bytes; the process is named by its
/// own (main thread's) name: threads of one process often have names of their own (gRPC's
/// `default-executor`, Java's `http-nio-8080-exec-1`), which would split one workload into
/// many.
fn resolve(tgid: u32, thread_comm: &str, cgroup_id: u64) -> String {
    if thread_comm.is_empty() {
        return "[unknown]".to_owned();
    }
    let process_comm = std::fs::read_to_string(format!("/proc/{tgid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_owned())
        .filter(|c| !c.is_empty());
    let comm = process_comm.as_deref().unwrap_or(thread_comm);
    let env = std::fs::read(format!("/proc/{tgid}/environ")).unwrap_or_default();
    let var = |name: &[u8]| {
        env.split(|&b| b == 0)
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix(b"="))
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    if let Some(service) = var(b"OTEL_SERVICE_NAME") {
        return service;
    }
    if let Some(pod) = pod_workload(tgid, var(b"HOSTNAME")) {
        return pod;
    }
    // Gone from /proc (a short-lived client, named after its exchange): its pod's cgroup, whose
    // id the kernel side sent, outlives it.
    if env.is_empty()
        && let Some(pod) = pod_by_cgroup(cgroup_id)
    {
        return pod;
    }
    if INTERPRETERS.iter().any(|i| comm.starts_with(i))
        && let Ok(cmdline) = std::fs::read(format!("/proc/{tgid}/cmdline"))
    {
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Some(program) = program_of(&args) {
            return program;
        }
    }
    comm.to_owned()
}

/// Where the kubelet keeps each pod's container logs, in a directory named
/// `<namespace>_<pod>_<uid>`: the node's own record of its pods' names.
const POD_LOGS: &str = "/var/log/pods";

/// A process in a Kubernetes pod: `owner.namespace`, or `owner` when the pod's namespace is not
/// readable. Without asking the API server (a DaemonSet on every node would load it): the pod
/// is told by its cgroup (`kubepods`), and named by the kubelet's log directory of the pod UID
/// in that cgroup; else by the hostname the runtime gave the container (`HOSTNAME`, else its
/// `/etc/hostname`) and the service-account namespace file the kubelet mounts. Its owner comes
/// from the suffixes controllers add to the names of the pods they make (see [`owner_of`]). By
/// hostname alone, a pod on the host's network (the node's hostname) is named as any process.
fn pod_workload(tgid: u32, hostname: Option<String>) -> Option<String> {
    let cgroup = std::fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok()?;
    if !cgroup.contains("kubepods") {
        return None;
    }
    if let Some((namespace, pod)) = pod_uid(&cgroup).and_then(|uid| pod_of_uid(&uid)) {
        return Some(format!("{}.{namespace}", owner_of(&pod)));
    }
    let root = format!("/proc/{tgid}/root");
    let pod = hostname
        .or_else(|| std::fs::read_to_string(format!("{root}/etc/hostname")).ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && *h != crate::otlp::host_name())?;
    let owner = owner_of(&pod);
    // `/var/run` is often an absolute link to `/run`, which through `/proc/<pid>/root` would
    // resolve in this process's root (our own pod's namespace file): only followed when real.
    let var_run_real =
        std::fs::symlink_metadata(format!("{root}/var/run")).is_ok_and(|m| m.is_dir());
    let dirs: &[&str] = if var_run_real {
        &["/run", "/var/run"]
    } else {
        &["/run"]
    };
    let namespace = dirs.iter().find_map(|dir| {
        let path = format!("{root}{dir}/secrets/kubernetes.io/serviceaccount/namespace");
        let ns = std::fs::read_to_string(path).ok()?;
        let ns = ns.trim();
        let label = !ns.is_empty()
            && ns.len() <= 63
            && ns
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
        label.then(|| ns.to_owned())
    });
    Some(match namespace {
        Some(ns) => format!("{owner}.{ns}"),
        None => owner.to_owned(),
    })
}

/// Pod UIDs by cgroup id (a cgroup v2 directory's inode number), from the last look through
/// the host's cgroup hierarchy, and when that look was.
type CgroupPods = (std::time::Instant, HashMap<u64, String>);

static CGROUP_PODS: Mutex<Option<CgroupPods>> = Mutex::new(None);

/// Most cgroups remembered (a node's pods and their containers).
const MAX_CGROUPS: usize = 16 * 1024;

/// `owner.namespace` of the pod whose cgroup (or a container's below it) has this id.
fn pod_by_cgroup(cgroup_id: u64) -> Option<String> {
    if cgroup_id == 0 {
        return None;
    }
    let uid = {
        let mut guard = CGROUP_PODS.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = guard
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < std::time::Duration::from_secs(1));
        if !fresh
            && !guard
                .as_ref()
                .is_some_and(|(_, m)| m.contains_key(&cgroup_id))
        {
            *guard = Some((std::time::Instant::now(), scan_pod_cgroups()));
        }
        guard.as_ref()?.1.get(&cgroup_id)?.clone()
    };
    let (namespace, pod) = pod_of_uid(&uid)?;
    Some(format!("{}.{namespace}", owner_of(&pod)))
}

/// The host's cgroup v2 hierarchy (through init's root: the daemon's own view may be a cgroup
/// namespace), looked through for pod cgroups and the containers below them.
fn scan_pod_cgroups() -> HashMap<u64, String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut pods = HashMap::new();
    // `<id> <parent> <dev> <root> <mount point> <options> ... - <fstype> ...`
    let roots = |process: &str, prefix: &str| -> Vec<String> {
        let mountinfo = std::fs::read_to_string(format!("/proc/{process}/mountinfo"));
        mountinfo
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (before, after) = l.split_once(" - ")?;
                let mount = before.split(' ').nth(4)?;
                after
                    .starts_with("cgroup2 ")
                    .then(|| format!("{prefix}{mount}"))
            })
            .filter(|r| std::fs::read_dir(r).is_ok())
            .collect()
    };
    // Through init's root where it can be read (the host's view), else this process's own.
    let mut found = roots("1", "/proc/1/root");
    if found.is_empty() {
        found = roots("self", "");
    }
    // (directory, depth, under a kubepods cgroup, pod UID of an ancestor)
    let mut stack: Vec<(std::path::PathBuf, u32, bool, Option<String>)> = found
        .into_iter()
        .map(|r| (r.into(), 0, false, None))
        .collect();
    while let Some((dir, depth, kube, uid)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_dir() || pods.len() >= MAX_CGROUPS {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let uid = uid.clone().or_else(|| pod_uid(&name));
            if let Some(uid) = &uid {
                pods.insert(meta.ino(), uid.clone());
            }
            // Down kubepods' branches only (`kubepods.slice/...`, `kubepods/burstable/...`),
            // a few levels at most.
            let kube = kube || name.contains("kubepods");
            if depth < 6 && kube {
                stack.push((entry.path(), depth + 1, kube, uid));
            }
        }
    }
    pods
}

/// The pod UID in a kubepods cgroup path: `.../pod<uid>/...` (cgroupfs driver) or
/// `...-pod<uid, '_' for '-'>.slice` (systemd driver).
fn pod_uid(cgroup: &str) -> Option<String> {
    cgroup.split(['/', '\n']).find_map(|seg| {
        let seg = seg.strip_suffix(".slice").unwrap_or(seg);
        let uid = &seg[seg.rfind("pod")? + 3..];
        let well_formed = uid.len() == 36
            && uid
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || c == b'-' || c == b'_');
        well_formed.then(|| uid.replace('_', "-"))
    })
}

/// `(namespace, pod)` of a pod UID from the kubelet's log directories (neither a namespace
/// nor a pod name can hold `_`).
fn pod_of_uid(uid: &str) -> Option<(String, String)> {
    let suffix = format!("_{uid}");
    std::fs::read_dir(POD_LOGS).ok()?.find_map(|entry| {
        let name = entry.ok()?.file_name().into_string().ok()?;
        let (namespace, pod) = name.strip_suffix(&suffix)?.split_once('_')?;
        (!namespace.is_empty() && !pod.is_empty()).then(|| (namespace.to_owned(), pod.to_owned()))
    })
}

/// The characters of the random suffixes Kubernetes adds to generated names (no vowels, no
/// 0, 1 or 3: apimachinery's `rand.String` and `SafeEncodeString`).
fn generated(s: &str, len: std::ops::RangeInclusive<usize>) -> bool {
    len.contains(&s.len())
        && s.bytes()
            .all(|c| b"bcdfghjklmnpqrstvwxz2456789".contains(&c))
}

/// The controller a pod's name comes from: `web-5d8f7c9b4-x7k2p` (Deployment: ReplicaSet hash
/// and pod suffix) -> `web`, `backup-29012345-x7k2p` (CronJob: scheduled minute and suffix) ->
/// `backup`, `agent-x7k2p` (DaemonSet, Job) -> `agent`, `db-0` (StatefulSet) -> `db`; any
/// other name is the pod's own.
pub fn owner_of(pod: &str) -> &str {
    let Some((rest, last)) = pod
        .rsplit_once('-')
        .filter(|(r, l)| !r.is_empty() && !l.is_empty())
    else {
        return pod;
    };
    if generated(last, 5..=5) {
        if let Some((name, hash)) = rest.rsplit_once('-')
            && !name.is_empty()
            && (generated(hash, 8..=10)
                || (hash.len() >= 8 && hash.bytes().all(|c| c.is_ascii_digit())))
        {
            return name;
        }
        return rest;
    }
    if last.bytes().all(|c| c.is_ascii_digit()) {
        return rest;
    }
    pod
}

/// The program an interpreter's command line runs: `python3 -m http.server` -> `http.server`,
/// `python3 /srv/app/frontend.py 8080` -> `frontend`, `java -jar orders.jar` -> `orders`,
/// `java -cp x com.shop.Orders` -> `Orders`.
fn program_of(args: &[String]) -> Option<String> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-m" | "-jar" => {
                let target = it.next()?;
                return Some(if a == "-m" {
                    target.clone()
                } else {
                    stem(target)
                });
            }
            // Options whose value is the next argument.
            "-c" | "-e" | "--eval" => return None,
            "-cp" | "-classpath" | "--class-path" | "-W" | "-X" | "-r" | "--require" => {
                it.next();
            }
            _ if a.starts_with('-') => {}
            _ => {
                let s = stem(a);
                // A Java main class: its last component.
                return Some(match s.rsplit_once('.') {
                    Some((_, class)) if !a.contains('/') && !class.is_empty() => class.to_owned(),
                    _ => s,
                });
            }
        }
    }
    None
}

/// A path's file name without its extension.
fn stem(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    match file.rsplit_once('.') {
        Some((stem, ext))
            if !stem.is_empty()
                && matches!(
                    ext,
                    "py" | "js" | "mjs" | "cjs" | "ts" | "rb" | "pl" | "php" | "jar"
                ) =>
        {
            stem.to_owned()
        }
        _ => file.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{owner_of, pod_uid, program_of};

    #[test]
    fn finds_the_pod_uid_in_either_cgroup_driver() {
        let uid = "0f3c2a4e-6b1d-4c8e-9a7f-2d5e8b1c3a90";
        assert_eq!(
            pod_uid(&format!(
                "12:memory:/kubepods/burstable/pod{uid}/3b5c0a9e1f\n"
            ))
            .as_deref(),
            Some(uid)
        );
        let systemd = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
             cri-containerd-3b5c.scope\n",
            uid.replace('-', "_")
        );
        assert_eq!(pod_uid(&systemd).as_deref(), Some(uid));
        assert_eq!(
            pod_uid("0::/kubepods.slice/kubepods-besteffort.slice\n"),
            None
        );
    }

    #[test]
    fn names_pods_by_their_controller() {
        assert_eq!(owner_of("web-5d8f7c9b4-x7k2p"), "web");
        assert_eq!(owner_of("orders-api-7c9d8b6f5d-bq4zt"), "orders-api");
        assert_eq!(owner_of("backup-29012345-x7k2p"), "backup");
        assert_eq!(owner_of("node-agent-x7k2p"), "node-agent");
        assert_eq!(owner_of("db-0"), "db");
        assert_eq!(owner_of("redis-cart-12"), "redis-cart");
        // Words are not generated suffixes: they have vowels.
        assert_eq!(owner_of("my-app-redis"), "my-app-redis");
        assert_eq!(owner_of("web-db-x7k2p"), "web-db");
        assert_eq!(owner_of("standalone"), "standalone");
        assert_eq!(owner_of("-x7k2p"), "-x7k2p");
        assert_eq!(owner_of("web-"), "web-");
    }

    fn p(args: &[&str]) -> Option<String> {
        program_of(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn names_interpreted_programs() {
        assert_eq!(
            p(&["python3", "-m", "http.server", "8000"]).as_deref(),
            Some("http.server")
        );
        assert_eq!(
            p(&["python3", "-u", "/srv/frontend.py", "8080"]).as_deref(),
            Some("frontend")
        );
        assert_eq!(p(&["node", "server.js"]).as_deref(), Some("server"));
        assert_eq!(
            p(&["java", "-Xmx1g", "-jar", "/opt/orders.jar"]).as_deref(),
            Some("orders")
        );
        assert_eq!(
            p(&["java", "-cp", "a.jar:b.jar", "com.shop.Orders"]).as_deref(),
            Some("Orders")
        );
        assert_eq!(p(&["python3", "-c", "print(1)"]), None);
        assert_eq!(p(&["python3"]), None);
    }
}
