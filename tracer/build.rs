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
    aya_build::build_ebpf([ebpf_package], Toolchain::Custom(EBPF_TOOLCHAIN))?;
    strip_debug_info()
}

/// Drops the object's DWARF, which bpf-linker needs to make BTF and then keeps: 4.6 of its 6.1
/// MB, which the daemon embeds and the loader walks (its relocations too) at start, ~11 MB at
/// its peak. BTF, BTF.ext and symbols stay. With the toolchain's own llvm-objcopy (GNU objcopy
/// knows no BPF); where there is none, the object is left whole.
fn strip_debug_info() -> anyhow::Result<()> {
    use std::{path::PathBuf, process::Command};
    let object = PathBuf::from(std::env::var("OUT_DIR")?).join("tracer");
    let sysroot = std::env::var("RUSTC").ok().and_then(|rustc| {
        let out = Command::new(rustc)
            .args(["--print", "sysroot"])
            .output()
            .ok()?;
        Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
    });
    let host = std::env::var("HOST")?;
    let candidates = sysroot
        .map(|s| PathBuf::from(s).join(format!("lib/rustlib/{host}/bin/rust-objcopy")))
        .into_iter()
        .chain([PathBuf::from("llvm-objcopy")]);
    let stripped = object.with_extension("stripped");
    for objcopy in candidates {
        let ok = Command::new(&objcopy)
            .arg("--strip-debug")
            .arg(&object)
            .arg(&stripped)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            std::fs::rename(&stripped, &object)?;
            return Ok(());
        }
    }
    println!("cargo:warning=no llvm-objcopy: the eBPF object keeps its debug info");
    Ok(())
}
