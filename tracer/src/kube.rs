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

/// Most addresses kept per resource (pods, Services) of a large cluster.
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
    fn index(self) -> usize {
        self as usize
    }

    fn path(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Services => "services",
        }
    }
}

/// Whose an address is: the object (by a hash of `namespace/name`, to forget the address
/// only when that object goes) and its name (shared by an owner's pods listed together).
struct Owner {
    key: u64,
    name: Arc<str>,
}

/// Addresses by resource (pods, Services): a list builds its resource's table aside and swaps
/// it in, so that lookups wait on no list.
type Directory = [Addresses; 2];

/// Owners by address (looked up per exchange with a peer elsewhere: a fast hash).
type Addresses = foldhash::HashMap<IpAddr, Owner>;

static ENABLED: AtomicBool = AtomicBool::new(false);
static DIRECTORY: RwLock<Option<Directory>> = RwLock::new(None);

/// The workload or service at this address on another node, when the API said.
pub fn name_of(ip: IpAddr) -> Option<Arc<str>> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let guard = DIRECTORY.read().unwrap_or_else(|p| p.into_inner());
    guard
        .as_ref()?
        .iter()
        .find_map(|m| m.get(&ip))
        .map(|o| o.name.clone())
}

/// A peer on another host: its pod or Service when the API named it, else its address (a
/// client's alone: its port changes per connection; a server's with its port).
pub fn peer_name(ip: IpAddr, port: Option<u16>) -> Arc<str> {
    if let Some(name) = name_of(ip) {
        return name;
    }
    match port {
        Some(port) => std::net::SocketAddr::new(ip, port).to_string().into(),
        None => ip.to_string().into(),
    }
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
        .build()
        .into())
}

/// Lists, then watches from the list's version, and again. After a failure, an ERROR event
/// (410 Gone: the version is too old) or a watch the server ended at once (a proxy that does
/// not stream), the next request waits, twice as long each time up to 30 s: the API server is
/// never asked in a loop. A watch that ran its course resets the wait.
fn follow(resource: Resource, cfg: &Config, agent: &ureq::Agent, metrics: &Metrics) {
    const FIRST: Duration = Duration::from_secs(1);
    let failed = metrics
        .kube_errors
        .with_label_values(&[resource.path(), "request"]);
    let mut names = Names::default();
    let mut pause = FIRST;
    let mut last_warning: Option<Instant> = None;
    let mut version: Option<String> = None;
    loop {
        let at = Instant::now();
        let watching = version.is_some();
        let step = match version.take() {
            None => list(resource, cfg, agent, metrics, &mut names).map(Some),
            Some(v) => watch(resource, cfg, agent, metrics, &mut names, &v),
        };
        let ran_its_course = match step {
            Ok(Some(v)) => {
                version = Some(v);
                // A list goes on to its watch at once.
                if !watching {
                    continue;
                }
                at.elapsed() >= FIRST
            }
            // An ERROR event: list again.
            Ok(None) => {
                failed.inc();
                false
            }
            Err(e) => {
                failed.inc();
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(
                        "Kubernetes API, {}: {e:#} (peers on other nodes keep their addresses; \
                         retrying)",
                        resource.path()
                    );
                    last_warning = Some(Instant::now());
                }
                false
            }
        };
        if ran_its_course {
            pause = FIRST;
        } else {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(30));
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

/// Replaces what is known of the resource with a fresh list; its version, to watch from. The
/// list is decoded object by object into compact entries (a large cluster's list is never held
/// whole), then swapped in under the lock.
fn list(
    resource: Resource,
    cfg: &Config,
    agent: &ureq::Agent,
    metrics: &Metrics,
    names: &mut Names,
) -> anyhow::Result<String> {
    use serde::de::DeserializeSeed as _;
    let body = get(cfg, agent, "resourceVersion=0", resource.path())?;
    names.clear();
    let mut fresh = Addresses::default();
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(body));
    let version = ListSeed {
        each: &mut |o: Object| {
            if let Some(e) = o.entry(resource, names).filter(|e| e.name.is_some()) {
                upsert(resource, e, &mut fresh, metrics);
            }
        },
    }
    .deserialize(&mut de)
    .context("decoding the list")?;
    let n = fresh.len();
    let old = {
        let mut directory = DIRECTORY.write().unwrap_or_else(|p| p.into_inner());
        let maps = directory.get_or_insert_with(Default::default);
        std::mem::replace(&mut maps[resource.index()], fresh)
    };
    drop(old);
    metrics
        .kube_addresses
        .with_label_values(&[resource.path()])
        .set(i64::try_from(n).unwrap_or(i64::MAX));
    tracing::info!("Kubernetes API: {n} {} addresses", resource.path());
    // The list's bytes passed through the allocator: given back rather than kept in its free
    // lists.
    // SAFETY: only asks the allocator to release free memory.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
    Ok(version)
}

/// Follows one watch to its end: the version to go on from, or `None` when the API says the
/// version is gone.
fn watch(
    resource: Resource,
    cfg: &Config,
    agent: &ureq::Agent,
    metrics: &Metrics,
    names: &mut Names,
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
        let Some(mut entry) = event.object.entry(resource, names) else {
            continue;
        };
        if event.kind == "DELETED" {
            entry.name = None;
        }
        let mut directory = DIRECTORY.write().unwrap_or_else(|p| p.into_inner());
        let map = &mut directory.get_or_insert_with(Default::default)[resource.index()];
        upsert(resource, entry, map, metrics);
        metrics
            .kube_addresses
            .with_label_values(&[resource.path()])
            .set(i64::try_from(map.len()).unwrap_or(i64::MAX));
    }
    Ok(Some(version))
}

/// An object's addresses as they are now: named, or (no name: gone, finished, not its own)
/// forgotten unless another object has taken them since (a pod IP given to a new pod before
/// the old one's deletion was seen). A pod's IP and a Service's cluster IP do not change once
/// set, so the object's addresses now are the ones it was named at.
fn upsert(resource: Resource, entry: Entry, map: &mut Addresses, metrics: &Metrics) {
    let Entry { key, name, ips } = entry;
    for ip in ips {
        match &name {
            Some(name) => {
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
                        key,
                        name: name.clone(),
                    },
                );
            }
            None => {
                if map.get(&ip).is_some_and(|o| o.key == key) {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// Names shared by the objects of one list (an owner's replicas), and by later ones while the
/// table is small.
#[derive(Default)]
struct Names(HashMap<String, Arc<str>>);

impl Names {
    const MAX: usize = 16 * 1024;

    fn clear(&mut self) {
        self.0.clear();
    }

    fn get(&mut self, name: String) -> Arc<str> {
        if let Some(n) = self.0.get(&name) {
            return n.clone();
        }
        let n: Arc<str> = name.as_str().into();
        if self.0.len() < Self::MAX {
            self.0.insert(name, n.clone());
        }
        n
    }
}

/// What one object says of its addresses, compactly.
#[derive(Debug)]
struct Entry {
    key: u64,
    /// `None`: its addresses are not its own (or no longer).
    name: Option<Arc<str>>,
    ips: smallvec::SmallVec<[IpAddr; 2]>,
}

/// A list's `metadata.resourceVersion`, its items handed to `each` one by one as decoded.
struct ListSeed<'a, F> {
    each: &'a mut F,
}

impl<'de, F: FnMut(Object)> serde::de::DeserializeSeed<'de> for ListSeed<'_, F> {
    type Value = String;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(Object)> serde::de::Visitor<'de> for ListSeed<'_, F> {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Kubernetes list")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        let mut version = String::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "metadata" => version = map.next_value::<ListMeta>()?.resource_version,
                "items" => map.next_value_seed(Items {
                    each: &mut *self.each,
                })?,
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(version)
    }
}

/// A list's items, handed on one by one.
struct Items<'a, F> {
    each: &'a mut F,
}

impl<'de, F: FnMut(Object)> serde::de::DeserializeSeed<'de> for Items<'_, F> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: FnMut(Object)> serde::de::Visitor<'de> for Items<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list's items")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(o) = seq.next_element::<Object>()? {
            (self.each)(o);
        }
        Ok(())
    }
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
    /// A hash of `namespace/name`: which object an address is.
    fn key(&self) -> u64 {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::hash::DefaultHasher::new();
        self.metadata.namespace.hash(&mut h);
        self.metadata.name.hash(&mut h);
        h.finish()
    }

    /// Its addresses and the name peers at them get: `None` for an object whose addresses are
    /// not its own (a pod on its node's network, a finished pod whose address goes to the next
    /// pod); no entry without a name or addresses (a headless Service's `None`, a pending
    /// pod).
    fn entry(&self, resource: Resource, names: &mut Names) -> Option<Entry> {
        let Meta {
            name, namespace, ..
        } = &self.metadata;
        if name.is_empty() || namespace.is_empty() {
            return None;
        }
        let (name, addresses, own): (&str, smallvec::SmallVec<[&str; 3]>, bool) = match resource {
            Resource::Pods => {
                let mut ips: smallvec::SmallVec<[&str; 3]> =
                    self.status.pod_ips.iter().map(|p| &*p.ip).collect();
                ips.push(&self.status.pod_ip);
                let own = !self.spec.host_network
                    && !matches!(&*self.status.phase, "Succeeded" | "Failed");
                (crate::workload::owner_of(name), ips, own)
            }
            Resource::Services => {
                let mut ips: smallvec::SmallVec<[&str; 3]> =
                    self.spec.cluster_ips.iter().map(|s| &**s).collect();
                ips.push(&self.spec.cluster_ip);
                (name, ips, true)
            }
        };
        let mut ips: smallvec::SmallVec<[IpAddr; 2]> =
            addresses.iter().filter_map(|a| a.parse().ok()).collect();
        ips.sort_unstable();
        ips.dedup();
        if ips.is_empty() {
            return None;
        }
        Some(Entry {
            key: self.key(),
            name: own.then(|| names.get(format!("{name}.{namespace}"))),
            ips,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: &str) -> Object {
        serde_json::from_str(json).unwrap()
    }

    fn named(json: &str, resource: Resource) -> Option<(String, Vec<IpAddr>)> {
        let e = object(json).entry(resource, &mut Names::default())?;
        Some((e.name?.to_string(), e.ips.to_vec()))
    }

    #[test]
    fn pods_are_named_by_owner_and_services_by_name() {
        let pod = r#"{"metadata":{"name":"web-5d8f7c9b4-x7k2p","namespace":"shop"},
            "spec":{"containers":[{"name":"c"}]},
            "status":{"phase":"Running","podIP":"10.1.2.3",
                      "podIPs":[{"ip":"10.1.2.3"},{"ip":"fd00::3"}]}}"#;
        let ips: Vec<IpAddr> = vec!["10.1.2.3".parse().unwrap(), "fd00::3".parse().unwrap()];
        assert_eq!(
            named(pod, Resource::Pods),
            Some(("web.shop".to_owned(), ips))
        );
        let svc = r#"{"metadata":{"name":"web","namespace":"shop"},
            "spec":{"clusterIP":"10.96.0.15","clusterIPs":["10.96.0.15"],"ports":[]}}"#;
        assert_eq!(
            named(svc, Resource::Services),
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
            assert_eq!(named(json, resource), None, "{json}");
        }
    }

    #[test]
    fn an_address_taken_by_a_new_pod_survives_the_old_pods_deletion() {
        let metrics = Metrics::new();
        let (mut map, mut names) = (Addresses::default(), Names::default());
        let mut pod = |name: &str, phase: &str| {
            object(&format!(
                r#"{{"metadata":{{"name":"{name}","namespace":"a"}},
                    "status":{{"phase":"{phase}","podIP":"10.1.2.3"}}}}"#
            ))
            .entry(Resource::Pods, &mut names)
            .unwrap()
        };
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        upsert(
            Resource::Pods,
            pod("api-5d8f7c9b4-aaaaa", "Running"),
            &mut map,
            &metrics,
        );
        upsert(
            Resource::Pods,
            pod("web-5d8f7c9b4-bbbbb", "Running"),
            &mut map,
            &metrics,
        );
        // The old pod's deletion (or its finishing) leaves the new pod's name.
        let mut gone = pod("api-5d8f7c9b4-aaaaa", "Running");
        gone.name = None;
        upsert(Resource::Pods, gone, &mut map, &metrics);
        upsert(
            Resource::Pods,
            pod("api-5d8f7c9b4-aaaaa", "Succeeded"),
            &mut map,
            &metrics,
        );
        assert_eq!(map.get(&ip).map(|o| &*o.name), Some("web.a"));
        // The new pod finishing frees it.
        upsert(
            Resource::Pods,
            pod("web-5d8f7c9b4-bbbbb", "Failed"),
            &mut map,
            &metrics,
        );
        assert!(map.is_empty());
    }

    /// A list is decoded object by object: its version, and each item, whatever else it holds.
    #[test]
    fn lists_are_decoded_item_by_item() {
        use serde::de::DeserializeSeed as _;
        let json = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"42"},
            "items":[{"metadata":{"name":"a-x7k2p","namespace":"n"},"status":{"podIP":"10.0.0.1"}},
                     {"metadata":{"name":"b-x7k2q","namespace":"n"},"status":{"podIP":"10.0.0.2"}}]}"#;
        let mut seen = Vec::new();
        let mut de = serde_json::Deserializer::from_str(json);
        let version = ListSeed {
            each: &mut |o: Object| seen.push(o.metadata.name),
        }
        .deserialize(&mut de)
        .unwrap();
        assert_eq!(
            (version.as_str(), seen),
            ("42", vec!["a-x7k2p".into(), "b-x7k2q".into()])
        );
        let mut de = serde_json::Deserializer::from_str(r#"{"metadata":{},"items":null}"#);
        let version = ListSeed {
            each: &mut |_: Object| {},
        }
        .deserialize(&mut de);
        assert_eq!(version.unwrap(), "");
    }
}
