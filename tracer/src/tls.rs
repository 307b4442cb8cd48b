//! TLS libraries: finding the OpenSSL and GnuTLS builds processes on this host load
//! (`libssl.so*`, `libgnutls.so*`, in the host's root or a container's), and hooking their read,
//! write and handshake calls with the kernel side's uprobes (`tracer-ebpf/src/probes/tls.rs`).
//! A uprobe hooks a file, so one attachment per library file covers every process that maps
//! it, now and later. Go programs link their own crypto/tls: each new process's executable is
//! looked at once (by inode), and a Go one's `(*Conn).Write` and `(*Conn).Read` are hooked at
//! entry and at each RET.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    time::Instant,
};

use aya::{
    Ebpf,
    programs::{
        RawTracePoint, UProbe,
        raw_trace_point::RawTracePointLink,
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeScope},
    },
    sys::UProbeMultiFeature,
};

use crate::elfsym;

/// Entry programs (as uprobe-multi, and as single uprobes for kernels before 6.6) and the
/// functions they hook; the return program hooks the return of each. GnuTLS's record calls
/// take (session, buffer, size) and return the bytes moved or a negative error, as `SSL_write`
/// and `SSL_read` do: the same programs serve them.
const ENTRIES: &[(&str, &str, &[&str])] = &[
    (
        "ssl_write_entry",
        "ssl_write_entry_1",
        // gnutls_record_send tail-calls gnutls_record_send2: the inner return sends the
        // plaintext and ends the call, the outer finds it ended.
        &["SSL_write", "gnutls_record_send", "gnutls_record_send2"],
    ),
    (
        "ssl_write_ex_entry",
        "ssl_write_ex_entry_1",
        &["SSL_write_ex"],
    ),
    (
        "ssl_read_entry",
        "ssl_read_entry_1",
        &["SSL_read", "gnutls_record_recv"],
    ),
    ("ssl_read_ex_entry", "ssl_read_ex_entry_1", &["SSL_read_ex"]),
    (
        "ssl_handshake_entry",
        "ssl_handshake_entry_1",
        &[
            "SSL_do_handshake",
            "SSL_connect",
            "SSL_accept",
            "gnutls_handshake",
        ],
    ),
];
const RETURN: (&str, &str) = ("ssl_call_return", "ssl_call_return_1");

/// The single-uprobe programs that send plaintext, and their copies for kernels without
/// `bpf_loop` (before 5.17), which carry no reference to its callbacks: 5.10's verifier
/// refuses a program with one, reached or not.
const FLAT: &[(&str, &str)] = &[
    ("ssl_call_return_1", "ssl_call_return_1_flat"),
    ("go_tls_write_entry_1", "go_tls_write_entry_1_flat"),
    ("go_tls_read_return_1", "go_tls_read_return_1_flat"),
];

/// Go's crypto/tls, linked into each Go program: per function, its entry and return programs
/// (uprobe-multi, single) and the symbols it may have (the first found); the return programs
/// hook each RET instruction. The handshake names the session's socket before the first write
/// (whose plaintext is sent at its entry).
struct GoHook {
    entry: (&'static str, &'static str),
    /// None: the entry only.
    ret: Option<(&'static str, &'static str)>,
    symbols: &'static [&'static str],
}

const GO_HOOKS: &[GoHook] = &[
    GoHook {
        entry: ("go_tls_write_entry", "go_tls_write_entry_1"),
        ret: Some(("go_tls_write_return", "go_tls_write_return_1")),
        symbols: &["crypto/tls.(*Conn).Write"],
    },
    GoHook {
        entry: ("go_tls_read_entry", "go_tls_read_entry_1"),
        ret: Some(("go_tls_read_return", "go_tls_read_return_1")),
        symbols: &["crypto/tls.(*Conn).Read"],
    },
    GoHook {
        entry: ("go_tls_handshake_entry", "go_tls_handshake_entry_1"),
        ret: Some(("go_tls_handshake_return", "go_tls_handshake_return_1")),
        // Go 1.17+ has the first, which the exported ones call; before it, `Handshake`.
        symbols: &[
            "crypto/tls.(*Conn).handshakeContext",
            "crypto/tls.(*Conn).Handshake",
        ],
    },
];
/// Go's HTTP/1 client, for joining spans (not TLS): a connection's requests are written by its
/// write loop's goroutine, for the goroutine in its round trip; hooked where both are found.
const GO_HTTP_HOOKS: &[GoHook] = &[
    GoHook {
        entry: ("go_http_write_loop_entry", "go_http_write_loop_entry_1"),
        ret: Some(("go_http_write_loop_return", "go_http_write_loop_return_1")),
        symbols: &["net/http.(*persistConn).writeLoop"],
    },
    GoHook {
        entry: ("go_http_round_trip_entry", "go_http_round_trip_entry_1"),
        ret: None,
        symbols: &["net/http.(*persistConn).roundTrip"],
    },
];
/// The programs of a hook list: (uprobe-multi, single uprobe).
fn go_programs(hooks: &[GoHook]) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
    hooks
        .iter()
        .flat_map(|h| std::iter::once(h.entry).chain(h.ret))
}
/// Go programs hooked, at most (each: 3 links, or a uprobe per entry and RET).
const MAX_GO_PROGRAMS: usize = 64;
/// RET instructions hooked per function, at most (Go 1.19's Write has 4, Read 6).
const MAX_RETS: usize = 32;
/// Ends the calls of threads that exit inside one (raw tracepoint `sched_process_exit`).
const THREAD_EXIT: (&str, &str) = ("tls_thread_exit", "sched_process_exit");
/// Tells the daemon of each program a process begins running (raw tracepoint
/// `sched_process_exec`).
const PROCESS_EXEC: (&str, &str) = ("tls_process_exec", "sched_process_exec");

/// Library files looked at, at most: each hooked costs 6 links (uprobe-multi) or 14 uprobes.
const MAX_LIBRARIES: usize = 64;

/// New processes whose memory maps are read per look.
const SCAN_PER_LOOK: usize = 512;

/// Where distributions put libssl and libgnutls, looked in at start whether or not a process maps it yet
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

/// Whether a file name is a TLS library hooked: OpenSSL's libssl (`libssl.so`, `libssl.so.3`,
/// `libssl.so.1.1`) or GnuTLS (`libgnutls.so.30`; not its `libgnutls-openssl` shim, which
/// calls the real one).
fn is_libssl(name: &str) -> bool {
    ["libssl.so", "libgnutls.so"].iter().any(|lib| {
        name.strip_prefix(lib)
            .is_some_and(|v| v.is_empty() || v.starts_with('.'))
    })
}

/// The hooks, and what has been looked at.
pub struct TlsHooks {
    /// Library files looked at, by (device, inode): the same file under two paths (a symlink,
    /// /lib and /usr/lib, a container sharing the host's layer) is hooked once, and one that
    /// cannot be is not tried again.
    tried: HashSet<(u64, u64)>,
    /// Of those, the files hooked.
    hooked: usize,
    /// Executables looked at (for Go's crypto/tls, or an OpenSSL linked in), by (device, inode).
    exe_tried: HashSet<(u64, u64)>,
    /// Of those, the Go programs (1.18+, whose goroutine is in R14).
    go_exes: HashSet<(u64, u64)>,
    /// Live processes running one, and whether that changed since `go_processes` was asked.
    go_pids: HashSet<u32>,
    go_changed: bool,
    /// Of those, the programs hooked.
    go_hooked: usize,
    /// Processes whose maps have been read (and that were alive at the last look).
    scanned: HashSet<u32>,
    /// Executables that export OpenSSL's calls, not hooked yet: hooked through a process
    /// running one once it has run HOOK_AFTER (`hook_waiting`).
    waiting: HashSet<(u64, u64)>,
    /// Processes running one of those, and since when they were known to.
    deferred: HashMap<u32, Instant>,
    links: Vec<UProbeLink>,
    exit_link: Option<RawTracePointLink>,
    /// `sched_process_exec`, which tells the daemon of a new program at once.
    exec_link: Option<RawTracePointLink>,
    /// Programs attached as uprobe-multi (else one uprobe per function).
    multi: bool,
    /// Single uprobes take `FLAT`'s copies (no `bpf_loop` here).
    flat: bool,
    /// Programs loaded and TLS followed (not with `--no-tls`, nor where they would not load).
    enabled: bool,
}

impl TlsHooks {
    /// Not hooking anything (`--no-tls`).
    pub fn off() -> Self {
        Self {
            tried: HashSet::new(),
            hooked: 0,
            exe_tried: HashSet::new(),
            go_exes: HashSet::new(),
            go_pids: HashSet::new(),
            go_changed: false,
            go_hooked: 0,
            scanned: HashSet::new(),
            waiting: HashSet::new(),
            deferred: HashMap::new(),
            links: Vec::new(),
            exit_link: None,
            exec_link: None,
            multi: false,
            flat: false,
            enabled: false,
        }
    }

    /// Single-uprobe program `name`, or its copy without `bpf_loop` where the kernel lacks it.
    fn single(&self, name: &'static str) -> &'static str {
        FLAT.iter()
            .find(|&&(walk, _)| self.flat && walk == name)
            .map_or(name, |&(_, copy)| copy)
    }

    /// Loads the programs: uprobe-multi where the kernel has it (6.6+), else single uprobes;
    /// on a kernel without uprobes TLS is not followed, said once.
    pub fn load(ebpf: &mut Ebpf, has_bpf_loop: bool) -> Self {
        let mut hooks = Self {
            multi: true,
            enabled: true,
            flat: !has_bpf_loop,
            ..Self::off()
        };
        let multi = ENTRIES.iter().map(|&(m, _, _)| m).chain([RETURN.0]).chain(
            go_programs(GO_HOOKS)
                .chain(go_programs(GO_HTTP_HOOKS))
                .map(|p| p.0),
        );
        // TRACER_TLS_SINGLE_UPROBES=1 takes the older kernels' way here (to test it).
        let forced = std::env::var_os("TRACER_TLS_SINGLE_UPROBES").is_some_and(|v| v == "1");
        // The programs load on kernels before 6.6 too; only their links would fail.
        let supported = aya::sys::is_uprobe_multi_supported(UProbeMultiFeature::LinkCreation);
        let loaded = if forced {
            Err("TRACER_TLS_SINGLE_UPROBES=1".to_owned())
        } else if !matches!(supported, Ok(true)) {
            Err(format!("not supported by this kernel ({supported:?})"))
        } else {
            load_all(ebpf, multi)
        };
        if let Err(e) = loaded {
            tracing::info!("TLS: uprobe-multi unavailable ({e}); single uprobes");
            hooks.multi = false;
            let single = ENTRIES
                .iter()
                .map(|&(_, s, _)| s)
                .chain([RETURN.1])
                .chain(
                    go_programs(GO_HOOKS)
                        .chain(go_programs(GO_HTTP_HOOKS))
                        .map(|p| p.1),
                )
                .map(|p| hooks.single(p));
            if let Err(e) = load_all(ebpf, single) {
                tracing::warn!("TLS plaintext not followed: {e}");
                hooks.enabled = false;
                return hooks;
            }
        }
        // Without it, a thread killed inside a call leaves socket calls looking for TLS calls
        // (slower, not wrong).
        match attach_raw(ebpf, THREAD_EXIT) {
            Ok(link) => hooks.exit_link = Some(link),
            Err(e) => tracing::info!("TLS: {} not attached: {e}", THREAD_EXIT.1),
        }
        // Without it, a new Go program is hooked at the next look at new processes.
        match attach_raw(ebpf, PROCESS_EXEC) {
            Ok(link) => hooks.exec_link = Some(link),
            Err(e) => tracing::info!("TLS: {} not attached: {e}", PROCESS_EXEC.1),
        }
        hooks
    }

    /// The hooks, to be dropped (which detaches them: a uprobe's detach waits for an RCU grace
    /// period, so the caller drops them in parallel).
    pub fn take_links(&mut self) -> (Vec<UProbeLink>, Vec<RawTracePointLink>) {
        let raw = [self.exit_link.take(), self.exec_link.take()];
        (
            std::mem::take(&mut self.links),
            raw.into_iter().flatten().collect(),
        )
    }

    /// Looks at the programs processes began running (`sched_process_exec`) at once: a Go
    /// program's TLS is hooked before it is far into its work. Their libraries are mapped later,
    /// and looked for at the next look.
    pub fn executed(&mut self, ebpf: &mut Ebpf, pids: &[u32]) {
        if !self.enabled {
            return;
        }
        let t = std::time::Instant::now();
        for &pid in pids {
            self.program(ebpf, pid);
        }
        if !pids.is_empty() {
            tracing::debug!("{} new programs looked at in {:?}", pids.len(), t.elapsed());
        }
    }

    /// Whether the kernel reports each program that begins (the exec hook is attached).
    pub fn execs_reported(&self) -> bool {
        self.exec_link.is_some()
    }

    /// Library files hooked, and Go programs whose crypto/tls is.
    pub fn libraries(&self) -> usize {
        self.hooked + self.go_hooked
    }

    /// Hooks the libraries in the host's usual places and those mapped by processes not looked
    /// at yet. Cheap when no process is new.
    pub fn refresh(&mut self, ebpf: &mut Ebpf, with_system_dirs: bool) {
        if !self.enabled {
            return;
        }
        let mut found = Vec::new();
        if with_system_dirs {
            // Ours, and the host's through init's root: in a DaemonSet (hostPID) the daemon's
            // own root is its image's; on a host both are the same files (deduplicated below).
            let dirs = SYSTEM_DIRS
                .iter()
                .flat_map(|d| [PathBuf::from(d), PathBuf::from(format!("/proc/1/root{d}"))]);
            for dir in dirs {
                let Ok(entries) = fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    if e.file_name().to_str().is_some_and(is_libssl) {
                        found.push(e.path());
                    }
                }
            }
        }
        // At most SCAN_PER_LOOK new processes a look (a host that forks thousands a second
        // would otherwise keep this thread reading /proc): the rest wait for the next look.
        let alive = processes();
        self.scanned.retain(|pid| alive.contains(pid));
        let before = self.go_pids.len();
        self.go_pids.retain(|pid| alive.contains(pid));
        self.go_changed |= self.go_pids.len() != before;
        let new: Vec<u32> = alive
            .iter()
            .filter(|pid| !self.scanned.contains(pid))
            .take(SCAN_PER_LOOK)
            .copied()
            .collect();
        for pid in new {
            found.extend(mapped_libssl(pid));
            self.program(ebpf, pid);
            self.scanned.insert(pid);
        }
        self.hook_waiting(ebpf);
        for path in found {
            if self.tried.len() >= MAX_LIBRARIES {
                break;
            }
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if !self.tried.insert((meta.dev(), meta.ino())) {
                continue;
            }
            self.attach(ebpf, &path, &path);
        }
    }

    /// Attaches every entry and the return to the functions `path` exports, and logs it under
    /// `name` (the file `path` reaches through /proc).
    fn attach(&mut self, ebpf: &mut Ebpf, path: &Path, name: &Path) {
        let found = elfsym::exported(path, &entry_names());
        match found.and_then(|found| self.attach_found(ebpf, path, &found)) {
            Ok(n) => {
                tracing::info!("TLS: hooked {n} calls in {}", name.display());
                self.hooked += 1;
            }
            Err(e) => tracing::warn!("TLS: cannot hook {}: {e}", name.display()),
        }
    }

    /// Attaches every entry and the return to `found`, the functions of `path` among ENTRIES'
    /// (name, file offset); how many.
    fn attach_found(
        &mut self,
        ebpf: &mut Ebpf,
        path: &Path,
        found: &[(&str, u64)],
    ) -> Result<usize, String> {
        if found.is_empty() {
            return Err("exports none of OpenSSL's or GnuTLS's read and write calls".into());
        }
        // Each offset once: two names of one function (an alias) would run a program twice.
        let offsets = |fns: &[&str]| -> Vec<u64> {
            let mut o: Vec<u64> = found
                .iter()
                .filter(|(n, _)| fns.is_empty() || fns.contains(n))
                .map(|&(_, o)| o)
                .collect();
            o.sort_unstable();
            o.dedup();
            o
        };
        // Returns first: an entry without its return would leave its call in the map.
        let mut links = Vec::new();
        if self.multi {
            links.push(attach_points(ebpf, RETURN.0, offsets(&[]), path)?);
            for &(prog, _, fns) in ENTRIES {
                let fns = offsets(fns);
                if !fns.is_empty() {
                    links.push(attach_points(ebpf, prog, fns, path)?);
                }
            }
        } else {
            let mut returns = Vec::new();
            for &(_, prog, fns) in ENTRIES {
                for f in offsets(fns) {
                    if !returns.contains(&f) {
                        returns.push(f);
                        links.push(attach_points(ebpf, self.single(RETURN.1), [f], path)?);
                    }
                    links.push(attach_points(ebpf, prog, [f], path)?);
                }
            }
        }
        self.links.extend(links);
        Ok(found.len())
    }

    /// Hooks the TLS of process `pid`'s executable if it has not been looked at yet (through
    /// `/proc/<pid>/exe`, which names the file in the process's own root): a Go program's
    /// crypto/tls, or the OpenSSL an executable links statically and exports (Node.js).
    fn program(&mut self, ebpf: &mut Ebpf, pid: u32) {
        let Some(id) = exe_id(pid) else {
            return;
        };
        if self.go_exes.contains(&id) {
            self.go_pids.insert(pid);
            self.go_changed = true;
        }
        if self.waiting.contains(&id) {
            self.defer(pid);
            return;
        }
        if self.exe_tried.len() >= MAX_GO_PROGRAMS * 16 || !self.exe_tried.insert(id) {
            return;
        }
        // Parsed and attached to through a descriptor of ours: a program that runs for less
        // than its parse (a Go CLI run again and again) is hooked all the same, for its next
        // runs, rather than failing as its /proc entry goes and never being tried again.
        let Some((_file, path)) = open_exe(pid, id) else {
            self.exe_tried.remove(&id);
            return;
        };
        let program = match go_program(&path) {
            Ok(Some(program)) => program,
            Ok(None) => {
                self.openssl_program(&path, id, pid);
                return;
            }
            Err(e) => {
                let name = fs::read_link(&path).unwrap_or_default();
                tracing::info!("TLS: Go program {} not hooked: {e}", name.display());
                return;
            }
        };
        let name = fs::read_link(&path).unwrap_or_default();
        self.go_exes.insert(id);
        self.go_pids.insert(pid);
        self.go_changed = true;
        if self.go_hooked >= MAX_GO_PROGRAMS {
            return;
        }
        if let Some(points) = &program.http {
            match self.attach_go(ebpf, &path, GO_HTTP_HOOKS, points) {
                Ok(()) => tracing::info!("Go net/http client hooked in {}", name.display()),
                Err(e) => {
                    tracing::info!("Go net/http client not hooked in {}: {e}", name.display())
                }
            }
        }
        let Some(points) = &program.tls else {
            return;
        };
        match self.attach_go(ebpf, &path, GO_HOOKS, points) {
            Ok(()) => {
                tracing::info!(
                    "TLS: hooked Go crypto/tls in {} (pid {pid})",
                    name.display()
                );
                self.go_hooked += 1;
            }
            Err(e) => tracing::warn!("TLS: cannot hook Go program {}: {e}", name.display()),
        }
    }

    /// Hooks an executable that exports OpenSSL's calls (linked in statically, as Node.js
    /// does) as a library is hooked.
    fn openssl_program(&mut self, path: &Path, id: (u64, u64), pid: u32) {
        let Ok(found) = elfsym::exported(path, &entry_names()) else {
            return;
        };
        if !found
            .iter()
            .any(|(f, _)| ["SSL_write", "SSL_write_ex", "gnutls_record_send"].contains(f))
            || self.tried.len() + self.waiting.len() >= MAX_LIBRARIES
            || self.tried.contains(&id)
        {
            return;
        }
        // Hooked while the process that runs it is starting, a program can crash: rustup's
        // proxies (OpenSSL's calls exported, aws-lc inside) died of SIGSEGV in 3 of 4 `cargo`
        // runs, each hooked at its exec, and never once hooked before they started (a kernel
        // race of uprobe registration with a process's start or next exec, not found yet). So
        // the file is hooked through a process running it once that has run HOOK_AFTER since
        // it was seen (at its exec, or at a look), looked at every second meanwhile.
        self.waiting.insert(id);
        self.defer(pid);
    }

    fn defer(&mut self, pid: u32) {
        if self.deferred.len() < SCAN_PER_LOOK {
            self.deferred.entry(pid).or_insert_with(Instant::now);
        }
    }

    /// Whether executables wait to be hooked (`hook_waiting`, every second meanwhile).
    pub fn waiting(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Hooks each waiting executable through a process seen running it HOOK_AFTER ago and
    /// running it still; forgets processes gone or running another program.
    pub fn hook_waiting(&mut self, ebpf: &mut Ebpf) {
        let mut ready = Vec::new();
        self.deferred.retain(|&pid, since| {
            let Some(id) = exe_id(pid) else {
                return false;
            };
            if !self.waiting.contains(&id) {
                return false;
            }
            if since.elapsed() < HOOK_AFTER {
                return true;
            }
            ready.push((id, pid));
            false
        });
        for (id, pid) in ready {
            // Once per file, through the first of its processes ready and still running it
            // (else the file waits for its next process): opened and checked, then read and
            // hooked through our descriptor, whatever the pid runs by then.
            if !self.waiting.contains(&id) {
                continue;
            }
            let Some((_file, path)) = open_exe(pid, id) else {
                continue;
            };
            self.waiting.remove(&id);
            self.tried.insert(id);
            let name = fs::read_link(&path).unwrap_or_default();
            self.attach(ebpf, &path, &name);
        }
    }

    /// The Go programs among live processes, when that changed since the last call.
    pub fn go_processes(&mut self) -> Option<HashSet<u32>> {
        std::mem::take(&mut self.go_changed).then(|| self.go_pids.clone())
    }

    fn attach_go(
        &mut self,
        ebpf: &mut Ebpf,
        path: &Path,
        hooks: &[GoHook],
        points: &GoPoints,
    ) -> Result<(), String> {
        // Returns first: an entry without its returns would leave its call in the map.
        let mut links = Vec::new();
        for (hook, (&entry, rets)) in hooks.iter().zip(points.entries.iter().zip(&points.rets)) {
            if self.multi {
                if let Some(ret) = hook.ret {
                    links.push(attach_points(ebpf, ret.0, rets.iter().copied(), path)?);
                }
                links.push(attach_points(ebpf, hook.entry.0, [entry], path)?);
            } else {
                if let Some(ret) = hook.ret {
                    for &r in rets {
                        links.push(attach_points(ebpf, self.single(ret.1), [r], path)?);
                    }
                }
                links.push(attach_points(
                    ebpf,
                    self.single(hook.entry.1),
                    [entry],
                    path,
                )?);
            }
        }
        self.links.extend(links);
        Ok(())
    }
}

/// Where to hook one list of functions (`GO_HOOKS`, `GO_HTTP_HOOKS`) in a Go program: file
/// offsets of each function's entry and of its RET instructions (none for a hook without a
/// return program).
#[derive(Debug, PartialEq)]
struct GoPoints {
    entries: Vec<u64>,
    rets: Vec<Vec<u64>>,
}

/// A Go 1.18+ program: where its crypto/tls and its HTTP/1 client can be hooked (None: not all
/// of the list's functions are in it).
#[derive(Debug, PartialEq)]
struct GoProgram {
    tls: Option<GoPoints>,
    http: Option<GoPoints>,
}

/// Per hook of a list, the function found (name's rank in the hook's list, lower preferred;
/// address; size).
type Found = Vec<Option<(usize, u64, u64)>>;

fn note_function(hooks: &[GoHook], found: &mut Found, name: &str, addr: u64, size: u64) {
    for (hook, slot) in hooks.iter().zip(found.iter_mut()) {
        if let Some(rank) = hook.symbols.iter().position(|&f| f == name)
            && slot.is_none_or(|(r, ..)| rank < r)
        {
            *slot = Some((rank, addr, size));
        }
    }
}

/// `Ok(None)` for a file that is not a Go 1.18+ program; functions are found in its symbol
/// table or, stripped, in the runtime's own table.
fn go_program(path: &Path) -> Result<Option<GoProgram>, String> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let file = fs::File::open(path).map_err(|e| e.to_string())?;
    // Read lazily: most executables are not Go, and a Go one's sections are tens of MB.
    let cache = object::ReadCache::new(file);
    let Ok(obj) = object::File::parse(&cache) else {
        return Ok(None);
    };
    if obj.architecture() != object::Architecture::X86_64 {
        return Ok(None);
    }
    let Some(info) = obj
        .section_by_name(".go.buildinfo")
        .and_then(|s| s.data_range(s.address(), s.size().min(64)).ok().flatten())
    else {
        return Ok(None);
    };
    if go_version(info).is_none() {
        return Err("Go before 1.18 (its calls pass arguments on the stack)".into());
    }
    let mut tls: Found = vec![None; GO_HOOKS.len()];
    let mut http: Found = vec![None; GO_HTTP_HOOKS.len()];
    let mut note = |name: &str, addr: u64, size: u64| {
        if name.starts_with("crypto/tls.(*Conn).") {
            note_function(GO_HOOKS, &mut tls, name, addr, size);
        } else if name.starts_with("net/http.(*persistConn).") {
            note_function(GO_HTTP_HOOKS, &mut http, name, addr, size);
        }
    };
    for sym in obj.symbols() {
        if let Ok(name) = sym.name() {
            note(name, sym.address(), sym.size());
        }
    }
    if obj.symbols().next().is_none() {
        // A stripped program (`-ldflags=-s`) has no symbol table, but the runtime's own table
        // of functions (for stack traces) is always there.
        if let Some(tab) = obj
            .section_by_name(".gopclntab")
            .and_then(|s| s.data().ok())
        {
            for (name, addr, size) in pclntab_functions(tab) {
                note(name, addr, size);
            }
        }
    }
    let text = obj.section_by_name(".text").ok_or("no .text section")?;
    let (file_start, _) = text.file_range().ok_or("no .text in the file")?;
    let points = |hooks: &[GoHook], found: Found| -> Result<Option<GoPoints>, String> {
        let mut points = GoPoints {
            entries: Vec::new(),
            rets: Vec::new(),
        };
        for (hook, f) in hooks.iter().zip(found) {
            let Some((_, addr, size)) = f else {
                return Ok(None);
            };
            let to_file = |a: u64| a - text.address() + file_start;
            let rets: Vec<u64> = if hook.ret.is_some() {
                let code = text
                    .data_range(addr, size)
                    .map_err(|e| e.to_string())?
                    .ok_or("function outside its section")?;
                let rets: Vec<u64> = ret_offsets(code, addr).into_iter().map(to_file).collect();
                if rets.is_empty() || rets.len() > MAX_RETS {
                    return Err(format!(
                        "{} RET instructions in a hooked function",
                        rets.len()
                    ));
                }
                rets
            } else {
                Vec::new()
            };
            points.entries.push(to_file(addr));
            points.rets.push(rets);
        }
        Ok(Some(points))
    };
    Ok(Some(GoProgram {
        tls: points(GO_HOOKS, tls)?,
        http: points(GO_HTTP_HOOKS, http)?,
    }))
}

/// The functions a Go 1.18+ `.gopclntab` lists: name, entry address and size (to the next
/// function's entry). Nothing for another layout or a table that does not hold together.
fn pclntab_functions(tab: &[u8]) -> impl Iterator<Item = (&str, u64, u64)> {
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(
            tab.get(o..o.checked_add(4)?)?.try_into().ok()?,
        ))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            tab.get(o..o.checked_add(8)?)?.try_into().ok()?,
        ))
    };
    // runtime.pcHeader: magic (Go 1.18-1.19, 1.20+), two pads, minLC, ptrSize, then words:
    // nfunc, nfiles, textStart, funcnameOffset, cuOffset, filetabOffset, pctabOffset, pclnOffset.
    let header = (|| {
        let magic = u32_at(0)?;
        if !(magic == 0xffff_fff0 || magic == 0xffff_fff1) || *tab.get(7)? != 8 {
            return None;
        }
        let nfunc = usize::try_from(u64_at(8)?).ok()?;
        let text = u64_at(24)?;
        let names = usize::try_from(u64_at(32)?).ok()?;
        let pcln = usize::try_from(u64_at(64)?).ok()?;
        Some((nfunc, text, names, pcln))
    })();
    let (nfunc, text, names, pcln) = header.unwrap_or((0, 0, 0, 0));
    (0..nfunc).map_while(move |i| {
        // functab: (entryoff, funcoff) per function, and one more entry at the end of text.
        let at = pcln.checked_add(i.checked_mul(8)?)?;
        let (entry, func) = (u32_at(at)?, u32_at(at + 4)?);
        let next = u32_at(at + 8)?;
        // runtime._func: entryOff, nameOff.
        let name_off = u32_at(pcln.checked_add(func as usize)?.checked_add(4)?)?;
        let start = names.checked_add(name_off as usize)?;
        let rest = tab.get(start..)?;
        let name = std::str::from_utf8(&rest[..rest.iter().position(|&b| b == 0)?]).ok()?;
        Some((
            name,
            text + u64::from(entry),
            u64::from(next.checked_sub(entry)?),
        ))
    })
}

/// The Go version (`go1.19.8`) at the start of a `.go.buildinfo` section, in the layout of Go
/// 1.18 and later (the version inline); `None` for an older one. The hooks read arguments from
/// registers, Go's register ABI since 1.17.
fn go_version(info: &[u8]) -> Option<&str> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if !info.starts_with(MAGIC) || info.get(15)? & 2 == 0 {
        return None;
    }
    let len = usize::from(*info.get(32)?);
    let v = std::str::from_utf8(info.get(33..33 + len)?).ok()?;
    v.starts_with("go1.").then_some(v)
}

/// Addresses of the RET instructions of x86_64 `code` loaded at `addr`, decoded instruction by
/// instruction (a byte 0xC3 inside another instruction is not one; Go puts no data in code).
fn ret_offsets(code: &[u8], addr: u64) -> Vec<u64> {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let mut rets = Vec::new();
    while decoder.can_decode() {
        let ins = decoder.decode();
        if ins.mnemonic() == Mnemonic::Ret {
            rets.push(ins.ip());
        }
    }
    rets
}

/// Loads each program; the first error, said with the program's name.
fn load_all<'a>(ebpf: &mut Ebpf, names: impl Iterator<Item = &'a str>) -> Result<(), String> {
    for name in names {
        let loaded = match ebpf.program_mut(name).map(<&mut UProbe>::try_from) {
            Some(Ok(p)) if p.fd().is_ok() => Ok(()),
            Some(Ok(p)) => p.load().map_err(|e| format!("{e:#}")),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("not in the object".into()),
        };
        loaded.map_err(|e| format!("uprobe {name} will not load: {e}"))?;
    }
    Ok(())
}

/// How long after a process was seen running an executable that exports OpenSSL's calls the
/// file is hooked (`TlsHooks::hook_waiting`).
const HOOK_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// The file (device, inode) process `pid` runs, if it is there.
fn exe_id(pid: u32) -> Option<(u64, u64)> {
    let meta = fs::metadata(format!("/proc/{pid}/exe")).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Process `pid`'s executable if it is file `id` still: the open file, and the path that
/// reaches it through our descriptor (for as long as the file is open), whatever the process
/// does meanwhile.
fn open_exe(pid: u32, id: (u64, u64)) -> Option<(fs::File, PathBuf)> {
    let file = fs::File::open(format!("/proc/{pid}/exe")).ok()?;
    let meta = file.metadata().ok()?;
    if (meta.dev(), meta.ino()) != id {
        return None;
    }
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Some((file, path))
}

/// The functions ENTRIES hooks.
fn entry_names() -> Vec<&'static str> {
    ENTRIES
        .iter()
        .flat_map(|&(_, _, fns)| fns.iter().copied())
        .collect()
}

/// One link of `prog` on the functions `fns` of `path`.
fn attach_points<'a, L>(
    ebpf: &mut Ebpf,
    prog: &str,
    points: impl IntoIterator<Item = L>,
    path: &Path,
) -> Result<UProbeLink, String>
where
    L: Into<UProbeAttachLocation<'a>> + std::fmt::Debug + Copy,
{
    let p: &mut UProbe = ebpf
        .program_mut(prog)
        .ok_or("program not in the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    let points: Vec<L> = points.into_iter().collect();
    let id = p
        .attach(
            points.iter().map(|&l| l.into()),
            path,
            UProbeScope::AllProcesses,
        )
        .map_err(|e| format!("{points:?}: {e}"))?;
    p.take_link(id).map_err(|e| format!("{points:?}: {e}"))
}

fn attach_raw(ebpf: &mut Ebpf, (prog, tp): (&str, &str)) -> Result<RawTracePointLink, String> {
    let p: &mut RawTracePoint = ebpf
        .program_mut(prog)
        .ok_or("program not in the object")?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    p.load().map_err(|e| format!("{e:#}"))?;
    let id = p.attach(tp).map_err(|e| e.to_string())?;
    p.take_link(id).map_err(|e| e.to_string())
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
/// found through `/proc/<pid>/root`); a file replaced since it was mapped (a package upgrade:
/// "(deleted)") through `/proc/<pid>/map_files`, which still names the mapped file.
fn mapped_libssl(pid: u32) -> Vec<PathBuf> {
    let Ok(maps) = fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    for (range, path, deleted) in libssl_mappings(&maps) {
        let p = if deleted {
            PathBuf::from(format!("/proc/{pid}/map_files/{range}"))
        } else {
            PathBuf::from(format!("/proc/{pid}/root{path}"))
        };
        if !paths.contains(&p) {
            paths.push(p);
        }
    }
    paths
}

/// The libssl mappings of a `/proc/<pid>/maps` text: address range, path, and whether the file
/// was deleted since. Paths may hold spaces: the path is the rest of the line.
fn libssl_mappings(maps: &str) -> impl Iterator<Item = (&str, &str, bool)> {
    maps.lines().filter_map(|line| {
        // address perms offset dev inode path
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let path = fields.nth(4)?.trim_start();
        let (path, deleted) = match path.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (path, false),
        };
        let name = path.rsplit('/').next().unwrap_or(path);
        (path.starts_with('/') && is_libssl(name)).then_some((range, path, deleted))
    })
}

#[cfg(test)]
mod tests {
    use super::{is_libssl, libssl_mappings};

    #[test]
    fn finds_libssl_in_maps() {
        let maps = "\
55d0c0a00000-55d0c0a2a000 r--p 00000000 fd:01 1234   /usr/sbin/nginx
7f11c0a00000-7f11c0a1f000 r--p 00000000 fd:01 5678   /usr/lib/x86_64-linux-gnu/libssl.so.3
7f11c0a1f000-7f11c0a7d000 r-xp 0001f000 fd:01 5678   /usr/lib/x86_64-linux-gnu/libssl.so.3
7f11c0b00000-7f11c0b10000 r-xp 00000000 fd:01 9999   /opt/my app/lib/libssl.so.1.1 (deleted)
7f11c0c00000-7f11c0c10000 r-xp 00000000 fd:01 4444   /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f11c0d00000-7f11c0d21000 rw-p 00000000 00:00 0      [heap]
7f11c0e00000-7f11c0e21000 rw-p 00000000 00:00 0 ";
        let found: Vec<_> = libssl_mappings(maps).collect();
        assert_eq!(
            found,
            vec![
                (
                    "7f11c0a00000-7f11c0a1f000",
                    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                    false
                ),
                (
                    "7f11c0a1f000-7f11c0a7d000",
                    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                    false
                ),
                (
                    "7f11c0b00000-7f11c0b10000",
                    "/opt/my app/lib/libssl.so.1.1",
                    true
                ),
            ]
        );
    }

    /// RETs are found by decoding: a 0xC3 byte inside another instruction is not one.
    #[test]
    fn finds_ret_instructions_by_decoding() {
        let code = [
            0xb8, 0xc3, 0x00, 0x00, 0x00, // mov eax, 0xc3
            0x48, 0x83, 0xc4, 0x18, // add rsp, 0x18
            0x5d, // pop rbp
            0xc3, // ret
            0x48, 0x8d, 0x05, 0xc3, 0x00, 0x00, 0x00, // lea rax, [rip + 0xc3]
            0xc3, // ret
        ];
        assert_eq!(super::ret_offsets(&code, 0x1000), [0x100a, 0x1012]);
    }

    /// A Go 1.18 function table: two functions, their names, entries and sizes (to the next
    /// entry); a table of another layout gives nothing.
    #[test]
    fn reads_the_go_function_table() {
        let mut tab = Vec::new();
        tab.extend_from_slice(&0xffff_fff0u32.to_le_bytes());
        tab.extend_from_slice(&[0, 0, 1, 8]);
        let (names, pcln) = (72u64, 96u64);
        // nfunc, nfiles, textStart, funcnameOffset, cuOffset, filetabOffset, pctabOffset, pcln
        for w in [2, 0, 0x40_1000, names, 0, 0, 0, pcln] {
            tab.extend_from_slice(&u64::to_le_bytes(w));
        }
        tab.extend_from_slice(b"a.b\0c.(*T).D\0");
        tab.resize(pcln as usize, 0);
        // functab: (entryoff, funcoff) twice, then the end of text; then the two _func.
        for w in [0u32, 24, 0x100, 32, 0x180, 0, 0, 0, 0x100, 4] {
            tab.extend_from_slice(&w.to_le_bytes());
        }
        let found: Vec<_> = super::pclntab_functions(&tab).collect();
        assert_eq!(
            found,
            [("a.b", 0x40_1000, 0x100), ("c.(*T).D", 0x40_1100, 0x80)]
        );
        tab[0] = 0xfa; // Go 1.16's magic
        assert_eq!(super::pclntab_functions(&tab).count(), 0);
        assert_eq!(super::pclntab_functions(&tab[..20]).count(), 0);
    }

    #[test]
    fn reads_the_go_version() {
        let mut info = b"\xff Go buildinf:\x08\x02".to_vec();
        info.resize(32, 0);
        info.push(8);
        info.extend_from_slice(b"go1.19.8rest");
        assert_eq!(super::go_version(&info), Some("go1.19.8"));
        // Go 1.17's layout: pointers to the version, not the version.
        info[15] = 0;
        assert_eq!(super::go_version(&info), None);
        assert_eq!(super::go_version(b"\x7fELF"), None);
    }

    #[test]
    fn names_libssl() {
        assert!(is_libssl("libssl.so.3"));
        assert!(is_libssl("libssl.so.1.1"));
        assert!(is_libssl("libssl.so"));
        assert!(!is_libssl("libssl3.so"));
        assert!(!is_libssl("libcrypto.so.3"));
        assert!(is_libssl("libgnutls.so.30"));
        assert!(!is_libssl("libgnutls-openssl.so.27"));
        assert!(!is_libssl("libgnutlsxx.so.30"));
    }
}
