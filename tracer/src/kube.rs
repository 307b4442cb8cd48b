//! Names for peers on other nodes, from the Kubernetes API. A DaemonSet's tracer names the
//! processes of its own node from /proc and the kubelet's files (`workload`), but a client or
//! server on another node is only an address to it: pod IPs and Service cluster IPs are named
//! here, as Linkerd's and Beyla's views name them, by listing and then watching pods and
//! services (one list and one long-lived watch per resource per node; the list is served from
//! the API server's cache, `resourceVersion=0`).
//!
//! A pod is named as `workload` names one on this node (`owner.namespace`, the owner from the
//! pod's name), so that both ends of an edge agree; a Service as `name.namespace` (usually the
//! name of the workload behind it). Pods on their node's network are not named: their address
//! is the node's. The directory is bounded (addresses past [`MAX_ADDRESSES`] are counted, not
//! kept); until the first list, and when the API cannot be reached, peers keep their addresses.

use std::{
    collections::HashMap,
    io::Read,
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Deserialize;

use crate::metrics::Metrics;

/// Where a pod finds the API server's CA and its own token (the service account's mount).
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Most addresses kept (pods and services of a large cluster).
pub const MAX_ADDRESSES: usize = 100_000;

/// A watch ends after this (the API server's own limit is similar) and starts again from the
/// last version seen.
const WATCH_SECS: u64 = 300;

/// How to reach the API server.
#[derive(Clone, Debug)]
pub struct Config {
    /// `https://host:port` (or `http://` for a local proxy such as `kubectl proxy`).
    pub api: String,
    /// Bearer token file, read again for each request (service-account tokens rotate).
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the API server's certificate.
    pub ca_file: Option<PathBuf>,
}

impl Config {
    /// In a pod: the API server the kubelet names in the environment, with the service
    /// account's token and CA. `None` outside a cluster.
    pub fn in_cluster() -> Option<Self> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok()?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{host}]"),
            _ => host,
        };
        let file = |name: &str| {
            let p = PathBuf::from(SERVICE_ACCOUNT).join(name);
            p.exists().then_some(p)
        };
        Some(Self {
            api: format!("https://{host}:{port}"),
            token_file: file("token"),
            ca_file: file("ca.crt"),
        })
    }
}

/// The two resources whose addresses are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Pods,
    Services,
}

impl Resource {
    fn path(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Services => "services",
        }
    }
}

/// Whose an address is: the object (to forget it only when that object goes) and its name.
struct Owner {
    resource: Resource,
    key: Arc<str>,
    name: Arc<str>,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static DIRECTORY: RwLock<Option<HashMap<IpAddr, Owner>>> = RwLock::new(None);

/// The workload or service at this address on another node, when the API said.
pub fn name_of(ip: IpAddr) -> Option<Arc<str>> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let guard = DIRECTORY.read().unwrap_or_else(|p| p.into_inner());
    guard.as_ref()?.get(&ip).map(|o| o.name.clone())
}

/// Starts listing and watching pods and services, each on a thread of its own (blocking
/// reads of a long-lived response; nothing else runs there).
pub fn start(cfg: Config, metrics: &Metrics) -> anyhow::Result<()> {
    let agent = agent(&cfg)?;
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(
        "naming peers on other nodes from the Kubernetes API at {}",
        cfg.api
    );
    for resource in [Resource::Pods, Resource::Services] {
        let (cfg, agent, metrics) = (cfg.clone(), agent.clone(), metrics.clone());
        std::thread::Builder::new()
            .name(format!("kube-{}", resource.path()))
            .spawn(move || follow(resource, &cfg, &agent, &metrics))
            .context("starting the Kubernetes watch")?;
    }
    Ok(())
}

fn agent(cfg: &Config) -> anyhow::Result<ureq::Agent> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let mut tls = TlsConfig::builder();
    if let Some(ca) = &cfg.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let certs = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<Certificate<'static>>, _>>()
            .with_context(|| format!("parsing {}", ca.display()))?;
        anyhow::ensure!(!certs.is_empty(), "no certificate in {}", ca.display());
        tls = tls.root_certs(RootCerts::Specific(Arc::new(certs)));
    }
    Ok(ureq::Agent::config_builder()
        .tls_config(tls.build())
        .timeout_connect(Some(Duration::from_secs(10)))
        // A watch's body lasts as long as the watch; the server ends it first.
        .timeout_recv_body(Some(Duration::from_secs(WATCH_SECS + 60)))
        .http_status_as_error(true)
        .build()
        .into())
}

/// Lists, then watches from the list's version; again after an error (with a pause) or when
/// the version is too old to watch from (410 Gone).
fn follow(resource: Resource, cfg: &Config, agent: &ureq::Agent, metrics: &Metrics) {
    let errors = |reason: &str| {
        metrics
            .kube_errors
            .with_label_values(&[resource.path(), reason])
    };
    let mut objects: HashMap<Arc<str>, Vec<IpAddr>> = HashMap::new();
    let mut pause = Duration::from_secs(1);
    let mut last_warning: Option<Instant> = None;
    // A watch the server ends at once (a proxy that does not stream) is not asked again in a
    // loop: the next waits this long.
    const SHORT: Duration = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let result = list(resource, cfg, agent, metrics, &mut objects).and_then(|version| {
            let mut version = version;
            loop {
                let at = Instant::now();
                match watch(resource, cfg, agent, metrics, &mut objects, &version)? {
                    Some(v) => version = v,
                    // Too old: list again.
                    None => return Ok(()),
                }
                if at.elapsed() < SHORT {
                    std::thread::sleep(SHORT);
                }
            }
        });
        if let Err(e) = &result {
            errors("request").inc();
            if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(
                    "Kubernetes API, {}: {e:#} (peers on other nodes keep their addresses; \
                     retrying)",
                    resource.path()
                );
                last_warning = Some(Instant::now());
            }
        }
        // Failed, or listed again at once: back off (up to 30 s), so that the API server is
        // never asked in a loop.
        if result.is_err() || started.elapsed() < SHORT {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(30));
        } else {
            pause = SHORT;
        }
    }
}

fn get(cfg: &Config, agent: &ureq::Agent, query: &str, path: &str) -> anyhow::Result<impl Read> {
    let url = format!("{}/api/v1/{path}?{query}", cfg.api.trim_end_matches('/'));
    let mut req = agent.get(&url).header("Accept", "application/json");
    if let Some(file) = &cfg.token_file {
        let token = std::fs::read_to_string(file)
            .with_context(|| format!("reading the token {}", file.display()))?;
        req = req.header("Authorization", format!("Bearer {}", token.trim()));
    }
    let resp = req.call().with_context(|| format!("GET {url}"))?;
    Ok(resp.into_body().into_with_config().limit(u64::MAX).reader())
}

/// Replaces what is known of the resource with a fresh list; its version, to watch from.
fn list(
    resource: Resource,
    cfg: &Config,
    agent: &ureq::Agent,
    metrics: &Metrics,
    objects: &mut HashMap<Arc<str>, Vec<IpAddr>>,
) -> anyhow::Result<String> {
    let body = get(cfg, agent, "resourceVersion=0", resource.path())?;
    // Streamed: only the fields below are kept of each object.
    let list: List =
        serde_json::from_reader(std::io::BufReader::new(body)).context("decoding the list")?;
    let mut directory = DIRECTORY.write().unwrap_or_else(|p| p.into_inner());
    let map = directory.get_or_insert_with(HashMap::new);
    map.retain(|_, o| o.resource != resource);
    objects.clear();
    for object in &list.items {
        upsert(resource, object, map, objects, metrics);
    }
    let n = map.values().filter(|o| o.resource == resource).count();
    metrics
        .kube_addresses
        .with_label_values(&[resource.path()])
        .set(i64::try_from(n).unwrap_or(i64::MAX));
    tracing::info!("Kubernetes API: {n} {} addresses", resource.path());
    Ok(list.metadata.resource_version)
}

/// Follows one watch to its end: the version to go on from, or `None` when the API says the
/// version is gone.
fn watch(
    resource: Resource,
    cfg: &Config,
    agent: &ureq::Agent,
    metrics: &Metrics,
    objects: &mut HashMap<Arc<str>, Vec<IpAddr>>,
    version: &str,
) -> anyhow::Result<Option<String>> {
    let query = format!(
        "watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECS}&resourceVersion={version}"
    );
    let body = get(cfg, agent, &query, resource.path())?;
    let mut version = version.to_owned();
    let events = serde_json::Deserializer::from_reader(std::io::BufReader::new(body))
        .into_iter::<WatchEvent>();
    for event in events {
        let event = event.context("decoding a watch event")?;
        if event.kind == "ERROR" {
            // 410 Gone: the version is too old; anything else, list again too.
            return Ok(None);
        }
        if !event.object.metadata.resource_version.is_empty() {
            version.clone_from(&event.object.metadata.resource_version);
        }
        if event.kind == "BOOKMARK" {
            continue;
        }
        let mut directory = DIRECTORY.write().unwrap_or_else(|p| p.into_inner());
        let map = directory.get_or_insert_with(HashMap::new);
        // Only this resource's addresses change here (pod and cluster IPs are apart).
        let before = map.len();
        if event.kind == "DELETED" {
            forget(&event.object.key(), map, objects);
        } else {
            upsert(resource, &event.object, map, objects, metrics);
        }
        let delta = i64::try_from(map.len()).unwrap_or(0) - i64::try_from(before).unwrap_or(0);
        metrics
            .kube_addresses
            .with_label_values(&[resource.path()])
            .add(delta);
    }
    Ok(Some(version))
}

/// Takes an object's addresses as they are now (it may have none yet, or none any more).
fn upsert(
    resource: Resource,
    object: &Object,
    map: &mut HashMap<IpAddr, Owner>,
    objects: &mut HashMap<Arc<str>, Vec<IpAddr>>,
    metrics: &Metrics,
) {
    let key = object.key();
    forget(&key, map, objects);
    let Some((name, ips)) = object.named(resource) else {
        return;
    };
    let key: Arc<str> = key.into();
    let name: Arc<str> = name.into();
    let mut kept = Vec::new();
    for ip in ips {
        if map.len() >= MAX_ADDRESSES && !map.contains_key(&ip) {
            metrics
                .kube_errors
                .with_label_values(&[resource.path(), "full"])
                .inc();
            continue;
        }
        map.insert(
            ip,
            Owner {
                resource,
                key: key.clone(),
                name: name.clone(),
            },
        );
        kept.push(ip);
    }
    if !kept.is_empty() {
        objects.insert(key, kept);
    }
}

/// Forgets an object's addresses, unless another object has taken them since (a pod IP given
/// to a new pod before the old one's deletion was seen).
fn forget(
    key: &str,
    map: &mut HashMap<IpAddr, Owner>,
    objects: &mut HashMap<Arc<str>, Vec<IpAddr>>,
) {
    for ip in objects.remove(key).unwrap_or_default() {
        if map.get(&ip).is_some_and(|o| &*o.key == key) {
            map.remove(&ip);
        }
    }
}

#[derive(Deserialize)]
struct List {
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<Object>,
}

#[derive(Deserialize)]
struct ListMeta {
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: Object,
}

/// The fields of a pod or a service that name it and give its addresses.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Object {
    metadata: Meta,
    spec: Spec,
    status: Status,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Meta {
    name: String,
    namespace: String,
    #[serde(rename = "resourceVersion")]
    resource_version: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct Spec {
    // Pods.
    host_network: bool,
    // Services.
    #[serde(rename = "clusterIP")]
    cluster_ip: String,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Status {
    phase: String,
    #[serde(rename = "podIP")]
    pod_ip: String,
    #[serde(rename = "podIPs")]
    pod_ips: Vec<PodIp>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PodIp {
    ip: String,
}

impl Object {
    fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }

    /// The name peers at its addresses get, and those addresses; `None` for an object whose
    /// addresses are not its own (a pod on its node's network, a finished pod whose address
    /// goes to the next pod, a headless Service).
    fn named(&self, resource: Resource) -> Option<(String, Vec<IpAddr>)> {
        let Meta {
            name, namespace, ..
        } = &self.metadata;
        if name.is_empty() || namespace.is_empty() {
            return None;
        }
        let (name, addresses): (&str, Vec<&str>) = match resource {
            Resource::Pods => {
                if self.spec.host_network || matches!(&*self.status.phase, "Succeeded" | "Failed") {
                    return None;
                }
                let mut ips: Vec<&str> = self.status.pod_ips.iter().map(|p| &*p.ip).collect();
                ips.push(&self.status.pod_ip);
                (crate::workload::owner_of(name), ips)
            }
            Resource::Services => {
                let mut ips: Vec<&str> = self.spec.cluster_ips.iter().map(|s| &**s).collect();
                ips.push(&self.spec.cluster_ip);
                (name, ips)
            }
        };
        let mut ips: Vec<IpAddr> = addresses.iter().filter_map(|a| a.parse().ok()).collect();
        ips.sort_unstable();
        ips.dedup();
        (!ips.is_empty()).then(|| (format!("{name}.{namespace}"), ips))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: &str) -> Object {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn pods_are_named_by_owner_and_services_by_name() {
        let pod = object(
            r#"{"metadata":{"name":"web-5d8f7c9b4-x7k2p","namespace":"shop"},
                "spec":{"containers":[{"name":"c"}]},
                "status":{"phase":"Running","podIP":"10.1.2.3",
                          "podIPs":[{"ip":"10.1.2.3"},{"ip":"fd00::3"}]}}"#,
        );
        let ips: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap(), "fd00::3".parse().unwrap()];
        assert_eq!(
            pod.named(Resource::Pods),
            Some(("web.shop".to_owned(), ips))
        );
        let svc = object(
            r#"{"metadata":{"name":"web","namespace":"shop"},
                "spec":{"clusterIP":"10.96.0.15","clusterIPs":["10.96.0.15"],"ports":[]}}"#,
        );
        assert_eq!(
            svc.named(Resource::Services),
            Some(("web.shop".to_owned(), vec!["10.96.0.15".parse().unwrap()]))
        );
    }

    #[test]
    fn addresses_that_are_not_the_objects_own_are_not_named() {
        for (resource, json) in [
            (
                Resource::Pods,
                r#"{"metadata":{"name":"agent-x7k2p","namespace":"kube-system"},
                    "spec":{"hostNetwork":true},"status":{"podIP":"192.168.1.10"}}"#,
            ),
            (
                Resource::Pods,
                r#"{"metadata":{"name":"job-x7k2p","namespace":"a"},
                    "status":{"phase":"Succeeded","podIP":"10.1.2.4"}}"#,
            ),
            (
                Resource::Pods,
                r#"{"metadata":{"name":"new-x7k2p","namespace":"a"},"status":{"phase":"Pending"}}"#,
            ),
            (
                Resource::Services,
                r#"{"metadata":{"name":"db","namespace":"a"},"spec":{"clusterIP":"None"}}"#,
            ),
        ] {
            assert_eq!(object(json).named(resource), None, "{json}");
        }
    }

    #[test]
    fn an_address_taken_by_a_new_pod_survives_the_old_pods_deletion() {
        let metrics = Metrics::new();
        let (mut map, mut objects) = (HashMap::new(), HashMap::new());
        let pod = |name: &str| {
            object(&format!(
                r#"{{"metadata":{{"name":"{name}","namespace":"a"}},
                    "status":{{"phase":"Running","podIP":"10.1.2.3"}}}}"#
            ))
        };
        let (old, new) = (pod("api-5d8f7c9b4-aaaaa"), pod("web-5d8f7c9b4-bbbbb"));
        upsert(Resource::Pods, &old, &mut map, &mut objects, &metrics);
        upsert(Resource::Pods, &new, &mut map, &mut objects, &metrics);
        forget(&old.key(), &mut map, &mut objects);
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(map.get(&ip).map(|o| &*o.name), Some("web.a"));
        forget(&new.key(), &mut map, &mut objects);
        assert!(map.is_empty());
    }
}
