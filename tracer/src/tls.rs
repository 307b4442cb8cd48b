//! TLS libraries: finding the OpenSSL builds processes on this host load (`libssl.so*`, in the
//! host's root or a container's), and hooking their read, write and handshake calls with the
//! kernel side's uprobes (`tracer-ebpf/src/probes/tls.rs`). A uprobe hooks a file, so one
//! attachment per library file covers every process that maps it, now and later.

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{UProbe, uprobe::UProbeLink, uprobe::UProbeScope},
};

/// Entry programs and the functions they hook; `RETURN` hooks the return of each.
const ENTRIES: &[(&str, &str)] = &[
    ("ssl_write_entry", "SSL_write"),
    ("ssl_write_ex_entry", "SSL_write_ex"),
    ("ssl_read_entry", "SSL_read"),
    ("ssl_read_ex_entry", "SSL_read_ex"),
    ("ssl_handshake_entry", "SSL_do_handshake"),
    ("ssl_handshake_entry", "SSL_connect"),
    ("ssl_handshake_entry", "SSL_accept"),
];
const RETURN: &str = "ssl_call_return";

/// Library files hooked at most: each costs 14 attachments.
const MAX_LIBRARIES: usize = 64;

/// Where distributions put libssl, looked in at start whether or not a process maps it yet
/// (a client started later maps the host's own).
const SYSTEM_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/local/lib",
    "/usr/local/lib64",
];

/// Whether a file name is an OpenSSL libssl (`libssl.so`, `libssl.so.3`, `libssl.so.1.1`).
fn is_libssl(name: &str) -> bool {
    name == "libssl.so" || name.starts_with("libssl.so.")
}

/// The hooks, and what has been looked at.
pub struct TlsHooks {
    /// Library files hooked, by (device, inode): the same file under two paths (a symlink,
    /// /lib and /usr/lib, a container sharing the host's layer) is hooked once.
    hooked: HashSet<(u64, u64)>,
    /// Processes whose maps have been read (the ones alive at the last look).
    scanned: HashSet<u32>,
    links: Vec<UProbeLink>,
    /// Why TLS is not followed, when the programs would not load.
    pub unavailable: Option<String>,
}

impl TlsHooks {
    /// Loads the programs; on a kernel without uprobes TLS is not followed, said once.
    pub fn load(ebpf: &mut Ebpf) -> Self {
        let mut hooks = Self {
            hooked: HashSet::new(),
            scanned: HashSet::new(),
            links: Vec::new(),
            unavailable: None,
        };
        let names = ENTRIES.iter().map(|&(p, _)| p).chain([RETURN]);
        for name in names {
            let loaded = match ebpf.program_mut(name).map(<&mut UProbe>::try_from) {
                Some(Ok(p)) if p.fd().is_ok() => Ok(()),
                Some(Ok(p)) => p.load().map_err(|e| format!("{e:#}")),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("not in the object".into()),
            };
            if let Err(e) = loaded {
                tracing::warn!("TLS plaintext not followed: uprobe {name} will not load: {e}");
                hooks.unavailable = Some(format!("uprobe {name}: {e}"));
                return hooks;
            }
        }
        hooks
    }

    /// Detaches every hook.
    pub fn detach(&mut self) {
        self.links.clear();
    }

    /// Library files hooked.
    pub fn libraries(&self) -> usize {
        self.hooked.len()
    }

    /// Hooks the libraries in the host's usual places and those mapped by processes not looked
    /// at yet; returns how many were added. Cheap when no process is new.
    pub fn refresh(&mut self, ebpf: &mut Ebpf, with_system_dirs: bool) -> usize {
        if self.unavailable.is_some() {
            return 0;
        }
        let mut found = Vec::new();
        if with_system_dirs {
            for dir in SYSTEM_DIRS {
                let Ok(entries) = fs::read_dir(dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    if e.file_name().to_str().is_some_and(is_libssl) {
                        found.push(e.path());
                    }
                }
            }
        }
        let alive = processes();
        for &pid in &alive {
            if !self.scanned.contains(&pid) {
                found.extend(mapped_libssl(pid));
            }
        }
        self.scanned = alive;
        let mut added = 0;
        for path in found {
            if self.hooked.len() >= MAX_LIBRARIES {
                break;
            }
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let id = (meta.dev(), meta.ino());
            if self.hooked.contains(&id) {
                continue;
            }
            // Marked whether or not it works: a file that cannot be hooked is not tried again.
            self.hooked.insert(id);
            match self.attach(ebpf, &path) {
                Ok(n) => {
                    tracing::info!("TLS: hooked {n} calls in {}", path.display());
                    added += 1;
                }
                Err(e) => tracing::warn!("TLS: cannot hook {}: {e}", path.display()),
            }
        }
        added
    }

    /// Attaches every entry and the return to the functions `path` has; how many it has.
    fn attach(&mut self, ebpf: &mut Ebpf, path: &Path) -> Result<usize, String> {
        let mut hooked = 0;
        let mut last_err = String::new();
        for &(prog, symbol) in ENTRIES {
            match attach_one(ebpf, prog, symbol, path) {
                // The return first would leave a call without entry: harmless (nothing
                // found); an entry without return would leave the call's entry in the map.
                Ok(entry) => match attach_one(ebpf, RETURN, symbol, path) {
                    Ok(ret) => {
                        self.links.extend([entry, ret]);
                        hooked += 1;
                    }
                    Err(e) => last_err = e,
                },
                // Older libraries lack the `_ex` calls.
                Err(e) => last_err = e,
            }
        }
        if hooked == 0 {
            return Err(last_err);
        }
        Ok(hooked)
    }
}

fn attach_one(
    ebpf: &mut Ebpf,
    prog: &str,
    symbol: &str,
    path: &Path,
) -> Result<UProbeLink, String> {
    let p: &mut UProbe = ebpf
        .program_mut(prog)
        .ok_or("program not in the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    let id = p
        .attach([symbol], path, UProbeScope::AllProcesses)
        .map_err(|e| format!("{symbol}: {e}"))?;
    p.take_link(id).map_err(|e| format!("{symbol}: {e}"))
}

/// Pids of the processes alive now.
fn processes() -> HashSet<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// The libssl files a process maps, as paths in its own root (so that a container's library is
/// found through `/proc/<pid>/root`).
fn mapped_libssl(pid: u32) -> Vec<PathBuf> {
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let name = path.rsplit('/').next().unwrap_or(path);
        if !path.starts_with('/') || !is_libssl(name) {
            continue;
        }
        let p = PathBuf::from(format!("/proc/{pid}/root{path}"));
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::is_libssl;

    #[test]
    fn names_libssl() {
        assert!(is_libssl("libssl.so.3"));
        assert!(is_libssl("libssl.so.1.1"));
        assert!(is_libssl("libssl.so"));
        assert!(!is_libssl("libssl3.so"));
        assert!(!is_libssl("libcrypto.so.3"));
    }
}
