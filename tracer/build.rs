use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// The toolchain that builds the eBPF object: the pinned nightly whose libLLVM bpf-linker was
/// built against (see rust-toolchain.toml and `cargo xtask setup`).
const EBPF_TOOLCHAIN: &str = "nightly-2026-10-15";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let ebpf_package = aya_build::Package {
        name: name.as_str(),
        root_dir: manifest_path
            .parent()
            .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
            .as_str(),
        ..Default::default()
    };
    // The eBPF object also depends on the shared types.
    println!("cargo:rerun-if-changed=../tracer-common/src");
    aya_build::build_ebpf([ebpf_package], Toolchain::Custom(EBPF_TOOLCHAIN))
}
