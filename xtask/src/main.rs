//! Tasks cargo cannot do alone: install what the eBPF build needs, then build, run and test.
//!
//! `cargo xtask setup` is idempotent and cached: the second run only checks versions.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod bench;

/// bpf-linker release known to work with the pinned nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF build prerequisites: rust-src and bpf-linker (against the toolchain's
    /// own libLLVM). Skips what is already there.
    Setup,
    /// Set up, build in release mode, and run the daemon against this host (needs root).
    Run {
        /// Arguments for `tracer run`, e.g. `-- --listen 127.0.0.1:9464`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, then run every test: unit tests and the integration tests (needs root).
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// rustfmt and clippy (-D warnings) on the userspace crates and, separately, the eBPF crate.
    Lint,
    /// Overhead, loss and accuracy against nginx, tracer off and on in alternating phases;
    /// writes target/bench/latest.json. Needs root, nginx, wrk, and oha for the fixed-rate load.
    Bench {
        /// A few seconds per phase, one round: checks that the bench runs.
        #[arg(long)]
        smoke: bool,
        /// Seconds per phase.
        #[arg(long)]
        phase_secs: Option<u64>,
        /// Off/on rounds per load (at least 3 for figures worth quoting).
        #[arg(long)]
        rounds: Option<usize>,
        /// Build and bench the daemon from the dev profile (as the tests do) instead of release.
        #[arg(long)]
        dev: bool,
        /// The daemon's data path (`tracer run --attach`), to compare them side by side.
        #[arg(long, default_value = "auto")]
        attach: String,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The toolchain pinned in rust-toolchain.toml.
fn toolchain() -> anyhow::Result<String> {
    let path = workspace_root().join("rust-toolchain.toml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    text.lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("channel")?.trim().strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .with_context(|| format!("no channel in {}", path.display()))
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// PATH with cargo's bin directory first, where bpf-linker is installed.
fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![cargo_home().join("bin")];
    if let Some(p) = env::var_os("PATH") {
        paths.extend(env::split_paths(&p));
    }
    env::join_paths(paths).unwrap_or_default()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd
        .env("PATH", path_with_cargo_bin())
        .status()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.env("PATH", path_with_cargo_bin()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// rustup, without the toolchain overrides that `cargo xtask` itself runs under.
fn rustup() -> Command {
    let mut c = Command::new("rustup");
    c.env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC");
    c
}

fn setup() -> anyhow::Result<()> {
    let toolchain = toolchain()?;
    // Installs the toolchain too if missing; no-op when everything is there.
    run(rustup().args([
        "toolchain",
        "install",
        &toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src,clippy,rustfmt",
    ]))?;

    let installed = output(Command::new("bpf-linker").arg("--version"));
    if installed
        .as_deref()
        .is_some_and(|v| v.ends_with(BPF_LINKER_VERSION))
    {
        eprintln!("xtask: {} already installed", installed.unwrap_or_default());
        return Ok(());
    }

    // bpf-linker must use the same LLVM as the rustc that emits the bitcode: link it against the
    // toolchain's own libLLVM, through a prefix directory that stays where it is (bpf-linker
    // finds the library there at run time).
    let sysroot = output(rustup().args(["run", &toolchain, "rustc", "--print", "sysroot"]))
        .context("rustc --print sysroot")?;
    let lib = Path::new(&sysroot).join("lib");
    let libllvm = std::fs::read_dir(&lib)
        .with_context(|| lib.display().to_string())?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // libLLVM.so.23.1-rust-1.101.0-nightly -> 23
    let major = libllvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let prefix = cargo_home().join("tracer-llvm").join(&toolchain);
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&libllvm), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    run(rustup()
        .args([
            "run",
            &toolchain,
            "cargo",
            "install",
            "bpf-linker",
            "--force",
        ])
        .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        .current_dir(env::temp_dir()))?;
    let v = output(Command::new("bpf-linker").arg("--version"))
        .context("bpf-linker installed but does not run")?;
    eprintln!("xtask: installed {v}");
    Ok(())
}

/// The criterion pipeline-replay bench (`tracer/benches/pipeline.rs`).
const PIPELINE_BENCH: [&str; 5] = ["bench", "--package", "tracer", "--bench", "pipeline"];

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup(),
        Task::Run { args } => {
            setup()?;
            run(cargo().args(["build", "--release", "--package", "tracer"]))?;
            let bin = workspace_root().join("target/release/tracer");
            run(Command::new(bin).arg("run").args(args))
        }
        Task::Test { args } => {
            setup()?;
            // The bench's smoke run first, so that it cannot rot (and cargo test's summary
            // stays the last thing printed).
            run(cargo().args(["build", "--package", "tracer"]))?;
            bench::run(
                &workspace_root().join("target/debug/tracer"),
                &workspace_root().join("target/bench/smoke"),
                &bench::Options {
                    smoke: true,
                    phase_secs: 2,
                    rounds: 1,
                    pipeline: serde_json::Value::Null,
                    attach: "auto".into(),
                },
            )?;
            // The pipeline bench once, in criterion's test mode (it checks its own counts).
            run(cargo()
                .args(PIPELINE_BENCH)
                .args(["--profile", "dev", "--", "--test"]))?;
            // The default members: everything but the eBPF crate, which only builds for BPF.
            run(cargo().arg("test").args(args))
        }
        Task::Bench {
            smoke,
            phase_secs,
            rounds,
            dev,
            attach,
        } => {
            setup()?;
            let profile = if dev { "debug" } else { "release" };
            let mut build = cargo();
            build.args(["build", "--package", "tracer"]);
            if !dev {
                build.arg("--release");
            }
            run(&mut build)?;
            let pipeline = if smoke {
                run(cargo().args(PIPELINE_BENCH).args(["--", "--test"]))?;
                serde_json::Value::Null
            } else {
                run(cargo().args(PIPELINE_BENCH).args(["--", "--noplot"]))?;
                bench::pipeline_result(&workspace_root().join("target"))?
            };
            bench::run(
                &workspace_root().join("target").join(profile).join("tracer"),
                &workspace_root().join("target/bench"),
                &bench::Options {
                    smoke,
                    phase_secs: phase_secs.unwrap_or(if smoke { 2 } else { 10 }),
                    rounds: rounds.unwrap_or(if smoke { 1 } else { 3 }),
                    pipeline,
                    attach,
                },
            )
        }
        Task::Lint => {
            setup()?;
            run(cargo().args(["fmt", "--all", "--check"]))?;
            run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            // The eBPF crate alone, for its own target: feature unification would pull std in.
            run(cargo()
                .current_dir(workspace_root().join("tracer-ebpf"))
                .args([
                    "clippy",
                    "-Z",
                    "build-std=core",
                    "--target",
                    "bpfel-unknown-none",
                    "--release",
                    "--",
                    "-D",
                    "warnings",
                ]))
        }
    }
}
