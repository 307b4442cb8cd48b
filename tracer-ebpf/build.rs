use which::which;

/// The eBPF build links with `bpf-linker` (installed by `cargo xtask setup`): rebuild when it
/// changes, and say how to get it when it is missing.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!("bpf-linker not found on PATH: run `cargo xtask setup`"),
    }
}
