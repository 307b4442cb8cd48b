//! The deployment files pass flags to the daemon: they must be flags it accepts, so that the
//! manifest does not rot when the CLI changes (no cluster or container runtime is needed).

use clap::Parser as _;
use tracer::cli::{Cli, Command};

/// The JSON-style one-line list after `key:` in a manifest or Dockerfile (`args: [...]`,
/// `CMD [...]`), the one form both files use for the daemon's flags.
fn flow_list(text: &str, key: &str) -> Vec<String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no line starting with {key:?}"));
    let list = line[key.len()..].trim();
    serde_json::from_str(list).unwrap_or_else(|e| panic!("{key} {list}: {e}"))
}

/// Parses `args` as the daemon would, with Kubernetes' `$(VAR)` expanded to a plausible value.
fn parse(args: &[String]) -> Cli {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("$(NODE_IP)", "10.0.0.7"))
        .collect();
    Cli::try_parse_from(std::iter::once("tracer".to_owned()).chain(args.iter().cloned()))
        .unwrap_or_else(|e| panic!("the daemon refuses {args:?}: {e}"))
}

#[test]
fn the_daemonset_runs_the_daemon_on_the_nodes_address() {
    let manifest = include_str!("../deploy/kubernetes/tracer.yaml");
    let args = flow_list(manifest, "args:");
    let Command::Run { listen, .. } = parse(&args).command else {
        panic!("the DaemonSet does not run `tracer run`: {args:?}");
    };
    assert_eq!(listen.to_string(), "10.0.0.7:9464");
    // The port Prometheus is told to scrape is the one the daemon listens on.
    assert!(manifest.contains("prometheus.io/port: \"9464\""));
    assert!(manifest.contains("containerPort: 9464"));
    for needed in [
        "hostPID: true",
        "privileged: true",
        "fieldPath: status.hostIP",
        "mountPath: /var/log/pods",
        // Peers on other nodes named from the API server: read-only access to pods and Services.
        "serviceAccountName: tracer",
        "resources: [\"pods\", \"services\"]",
        "verbs: [\"get\", \"list\", \"watch\"]",
    ] {
        assert!(manifest.contains(needed), "manifest lacks {needed}");
    }
}

#[test]
fn the_image_runs_the_daemon_by_default() {
    let dockerfile = include_str!("../deploy/Dockerfile");
    let cmd = flow_list(dockerfile, "CMD");
    assert!(
        matches!(parse(&cmd).command, Command::Run { .. }),
        "{cmd:?}"
    );
}
