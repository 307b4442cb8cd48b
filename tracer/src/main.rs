use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use tracer::{
    cli::{self, Cli, Command},
    otlp, pipeline, top,
};

fn run_config(
    listen: std::net::SocketAddr,
    otlp_endpoint: Option<String>,
    otlp_protocol: Option<String>,
    otlp_headers: &[String],
    sample_ratio: f64,
    services: &[String],
) -> anyhow::Result<pipeline::RunConfig> {
    if !(0.0..=1.0).contains(&sample_ratio) {
        anyhow::bail!("--sample-ratio must be between 0 and 1, not {sample_ratio}");
    }
    Ok(pipeline::RunConfig {
        listen,
        otlp: otlp::config(
            otlp_endpoint.as_deref(),
            otlp_protocol.as_deref(),
            otlp_headers,
        )?,
        sample_ratio,
        services: otlp::ServiceNames::parse(services).map_err(anyhow::Error::msg)?,
        bpf_stats: false,
        ringbuf_bytes: None,
        attach: tracer::capture::AttachMode::Auto,
        spans: true,
        tls: true,
        kube: None,
    })
}

/// The Kubernetes API to name remote peers from: `off`, the URL given, or the cluster's own
/// when in a pod; the token and CA given, else the service account's.
fn kube_config(
    api: Option<String>,
    token_file: Option<std::path::PathBuf>,
    ca_file: Option<std::path::PathBuf>,
) -> Option<tracer::kube::Config> {
    let in_cluster = tracer::kube::Config::in_cluster();
    let mut cfg = match api.as_deref() {
        Some("off") => return None,
        Some(url) => tracer::kube::Config {
            api: url.to_owned(),
            ..in_cluster.unwrap_or(tracer::kube::Config {
                api: String::new(),
                token_file: None,
                ca_file: None,
            })
        },
        None => in_cluster?,
    };
    if token_file.is_some() {
        cfg.token_file = token_file;
    }
    if ca_file.is_some() {
        cfg.ca_file = ca_file;
    }
    Some(cfg)
}

/// One malloc arena for the whole process: the capture path is one thread, and with an arena
/// per thread glibc kept ~7 MB more resident under load (31 MB against 25 MB measured).
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run {
            listen,
            otlp_endpoint,
            otlp_protocol,
            otlp_headers,
            sample_ratio,
            services,
            bpf_stats,
            ringbuf_bytes,
            attach,
            no_spans,
            no_tls,
            kube_api,
            kube_token_file,
            kube_ca_file,
        } => run_config(
            listen,
            otlp_endpoint,
            otlp_protocol,
            &otlp_headers,
            sample_ratio,
            &services,
        )
        .and_then(|cfg| {
            if no_spans && cfg.otlp.is_some() {
                anyhow::bail!(
                    "--no-spans builds no spans, so there is nothing to export to the OTLP \
                     endpoint that is set (--otlp-endpoint or OTEL_EXPORTER_OTLP_*)"
                );
            }
            Ok(pipeline::RunConfig {
                bpf_stats,
                ringbuf_bytes,
                attach,
                spans: !no_spans,
                tls: !no_tls,
                kube: kube_config(kube_api, kube_token_file, kube_ca_file),
                ..cfg
            })
        })
        .and_then(|cfg| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(pipeline::run(cfg)))
        }),
        Command::Spans { limit, client } => cli::spans(limit, &client),
        Command::Edges {
            namespace,
            window,
            client,
        } => cli::edges(&namespace, window.window, &client),
        Command::Stat {
            workload,
            namespace,
            window,
            client,
        } => cli::stat(workload.as_deref(), &namespace, window.window, &client),
        Command::Routes {
            workload,
            window,
            client,
        } => cli::routes(&workload, window.window, &client),
        Command::Tap {
            filter,
            max,
            client,
        } => cli::tap(&filter.filter(), max, &client),
        Command::Top { filter, addr } => top::run(&addr, &filter.filter()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
