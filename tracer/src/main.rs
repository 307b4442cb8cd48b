mod api;
mod capture;
mod cli;
mod conn;
mod edges;
mod event;
mod http1;
mod metrics;
mod pipeline;
mod route;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run { listen } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(pipeline::run(pipeline::RunConfig { listen }))),
        Command::Edges(args) => cli::edges(&args),
        Command::Stat { workload, client } => cli::stat(workload.as_deref(), &client),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tracer: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
