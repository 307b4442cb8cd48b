//! Loading and attaching the eBPF programs, after checking that this host can run them; and
//! access to what they share with us (the event ring buffer, the kernel-side counters).

use std::{
    fs, io,
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Map, MapData, PerCpuArray},
    programs::{
        BtfTracePoint, FEntry, FExit, ProgramType, RawTracePoint, TracePoint, fentry::FEntryLink,
        fexit::FExitLink, raw_trace_point::RawTracePointLink, tp_btf::BtfTracePointLink,
        trace_point::TracePointLink,
    },
    sys::BpfHelper,
};
use thiserror::Error;
use tracer_common::{BodyEnd, BodyKey, KERNEL_STAT_COUNT, KernelStat, SockTuple, limits};

use crate::{
    ring::{Ring, Rings},
    tls::TlsHooks,
};

/// Capability bits (include/uapi/linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

const TRACEFS: &str = "/sys/kernel/tracing";
const TRACEFS_DEBUG: &str = "/sys/kernel/debug/tracing";
const BPFFS: &str = "/sys/fs/bpf";

/// Connection lifecycle, whatever the data path.
const LIFECYCLE: (&str, &str, &str) = ("inet_sock_set_state", "sock", "inet_sock_set_state");
/// The same as a raw tracepoint (no trace record per state change), where BTF gives
/// `sk_protocol`: (program, raw tracepoint).
const LIFECYCLE_RAW: (&str, &str) = ("raw_inet_sock_set_state", "inet_sock_set_state");

/// The socket data path on BTF tracepoints: as the raw ones, with the socket a typed pointer
/// (family and protocol are plain loads, not helper calls), and each socket's state kept in the
/// socket (socket storage) rather than in a hash table: (program, tracepoint). The lifecycle
/// program comes with them, as it keeps the same state.
const SOCK_DATA_BTF: &[(&str, &str)] = &[
    ("btf_inet_sock_set_state", "inet_sock_set_state"),
    ("btf_sock_send", "sock_send_length"),
    ("btf_sock_recv", "sock_recv_length"),
];

/// The socket data path on raw tracepoints (no trace record built per call): (program, raw
/// tracepoint). Needs `sk_protocol`'s offset from the kernel's BTF.
const SOCK_DATA_RAW: &[(&str, &str)] = &[
    ("raw_sock_send", "sock_send_length"),
    ("raw_sock_recv", "sock_recv_length"),
];

/// The socket data path on the classic tracepoints, whose records carry family and protocol:
/// (program, category, tracepoint).
const SOCK_DATA: &[(&str, &str, &str)] = &[
    ("sock_send_data", "sock", "sock_send_length"),
    ("sock_recv_data", "sock", "sock_recv_length"),
];

/// Where a send began, for the socket data path; without it sends are stamped at their end.
const SEND_START: (&str, &str) = ("tcp_send_start", "tcp_sendmsg_locked");

/// The fentry data path, for kernels without `sock_*_length` (before 6.3): the socket path's
/// programs at the exit of `tcp_sendmsg` and `tcp_recvmsg`, the send-start stamp at
/// `tcp_sendmsg`'s entry, and the lifecycle as a BTF tracepoint: (program, kernel function).
const FENTRY_SEND: (&str, &str) = ("fexit_tcp_send", "tcp_sendmsg");
const FENTRY_SEND_START: (&str, &str) = ("fentry_tcp_send_start", "tcp_sendmsg");
/// `tcp_recvmsg` whatever its arguments (`flags` found in BTF; the argument helpers, 5.17+),
/// and as it was until 5.19, `(sk, msg, len, nonblock, flags, addr_len)`, read directly.
const FENTRY_RECV: (&str, &str) = ("fexit_tcp_recv", "tcp_recvmsg");
const FENTRY_RECV_NONBLOCK: (&str, &str) = ("fexit_tcp_recv_nonblock", "tcp_recvmsg");
/// sendfile's bytes (splice to a socket went through `tcp_sendpage` until 6.5).
const FENTRY_SENDPAGE: (&str, &str) = ("fexit_tcp_sendpage", "tcp_sendpage");

/// The syscall data paths name the socket with these.
const SOCK_LENGTH: &[(&str, &str, &str)] = &[
    ("sock_send_length", "sock", "sock_send_length"),
    ("sock_recv_length", "sock", "sock_recv_length"),
];

/// The syscall programs as raw tracepoints: (program, raw tracepoint).
const RAW_SYSCALLS: &[(&str, &str)] =
    &[("raw_sys_enter", "sys_enter"), ("raw_sys_exit", "sys_exit")];

/// The syscall programs as classic tracepoints, one per syscall and direction.
const SYSCALL_TRACEPOINTS: &[(&str, &str)] = &[
    ("syscalls", "sys_enter_write"),
    ("syscalls", "sys_exit_write"),
    ("syscalls", "sys_enter_sendto"),
    ("syscalls", "sys_exit_sendto"),
    ("syscalls", "sys_enter_writev"),
    ("syscalls", "sys_exit_writev"),
    ("syscalls", "sys_enter_sendmsg"),
    ("syscalls", "sys_exit_sendmsg"),
    ("syscalls", "sys_enter_sendfile64"),
    ("syscalls", "sys_exit_sendfile64"),
    ("syscalls", "sys_enter_read"),
    ("syscalls", "sys_exit_read"),
    ("syscalls", "sys_enter_recvfrom"),
    ("syscalls", "sys_exit_recvfrom"),
    ("syscalls", "sys_enter_readv"),
    ("syscalls", "sys_exit_readv"),
    ("syscalls", "sys_enter_recvmsg"),
    ("syscalls", "sys_exit_recvmsg"),
];

/// Record offsets the programs read at fixed positions, checked against the running kernel's
/// tracepoint formats before loading: a mismatch is a clear error, not wrong numbers.
const EXPECTED_FIELDS: &[(&str, &str, &str, usize)] = &[
    ("sock", "sock_send_length", "sk", 8),
    ("sock", "sock_send_length", "family", 16),
    ("sock", "sock_send_length", "protocol", 18),
    ("sock", "sock_recv_length", "ret", 20),
    ("sock", "sock_recv_length", "flags", 24),
    ("sock", "sock_send_length", "ret", 20),
    ("sock", "inet_sock_set_state", "skaddr", 8),
    ("sock", "inet_sock_set_state", "newstate", 20),
    ("sock", "inet_sock_set_state", "sport", 24),
    ("sock", "inet_sock_set_state", "protocol", 30),
    ("sock", "inet_sock_set_state", "saddr_v6", 40),
    ("sock", "inet_sock_set_state", "daddr_v6", 56),
    ("syscalls", "sys_enter_recvfrom", "ubuf", 24),
    // The descriptor and flags, read where no tracepoint names the socket (`probes::fd`).
    ("syscalls", "sys_enter_read", "fd", 16),
    ("syscalls", "sys_enter_sendfile64", "out_fd", 16),
    ("syscalls", "sys_enter_recvfrom", "flags", 40),
    ("syscalls", "sys_enter_recvmsg", "flags", 32),
    ("syscalls", "sys_enter_writev", "vec", 24),
    ("syscalls", "sys_enter_sendmsg", "msg", 24),
    ("syscalls", "sys_exit_read", "ret", 16),
];

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(
        "missing privileges: loading eBPF programs needs root, or CAP_BPF and CAP_PERFMON \
         (effective capabilities: {0:#x}); run it with sudo, or grant them with \
         `setcap cap_bpf,cap_perfmon+ep <tracer binary>`"
    )]
    Privileges(u64),
    #[error(
        "tracefs is not available at {TRACEFS} and could not be mounted ({0}); mount it with \
         `mount -t tracefs tracefs {TRACEFS}`"
    )]
    NoTracefs(io::Error),
    #[error("this kernel has no tracepoint {0}/{1}: {2}")]
    MissingTracepoint(&'static str, &'static str, String),
    #[error(
        "tracepoint {0}/{1} has field {2} at offset {3:?}, not {4}: this kernel's layout is not \
         supported"
    )]
    Layout(
        &'static str,
        &'static str,
        &'static str,
        Option<usize>,
        usize,
    ),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("loading program {0} failed (verifier or kernel refused it): {1}")]
    Program(&'static str, String),
    #[error("attaching {0}/{1} failed: {2}")]
    Attach(&'static str, &'static str, String),
    #[error("eBPF map {0} missing or of the wrong type: {1}")]
    Map(&'static str, String),
}

/// Where the data path hooks in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// The first of `socket`, `fentry`, `raw-tracepoint`, `tracepoint` that loads and attaches
    /// here.
    Auto,
    /// Only `sock:sock_{send,recv}_length`, reading the syscall's registers through BTF
    /// (x86_64): nothing runs for the host's other syscalls, and no per-call state.
    Socket,
    /// The same programs at the exit of `tcp_sendmsg` and `tcp_recvmsg` (fexit: kernels before
    /// 6.3, which have no `sock_*_length`; x86_64, kernel BTF, BPF trampolines).
    Fentry,
    /// `raw_tp/sys_enter` and `sys_exit`: two attachments, cheaper per call (x86_64 only).
    RawTracepoint,
    /// One `syscalls:sys_{enter,exit}_*` tracepoint per traced syscall: works everywhere.
    Tracepoint,
    /// `socket` as it runs where BTF tracepoints do not load: raw tracepoints, per-socket state
    /// by address (for tests of that fallback).
    #[value(hide = true)]
    SocketRaw,
    /// `socket` as it runs where BTF does not give `sk_protocol`: the classic tracepoints (for
    /// tests of that fallback).
    #[value(hide = true)]
    SocketClassic,
    /// `raw-tracepoint` as it runs where no `sock_*_length` names the socket (before 6.3):
    /// each call's socket found from its descriptor (for tests of that path on newer kernels).
    #[value(hide = true)]
    RawTracepointFd,
}

/// What the daemon asks of the kernel side, per socket: [`Requests::opaque`], sockets to stop
/// sending data for (they carry no HTTP), and [`Requests::bodies`], where long message bodies
/// end (calls wholly inside one are sent without payload). The daemon only asks, naming the
/// connection's tuple; the kernel side applies a request only if the socket at that address is
/// still that connection, so a request that arrives after the connection closed never reaches
/// the next socket at the same address.
pub struct Requests {
    pub opaque: Asks<u64, SockTuple>,
    pub bodies: Asks<BodyKey, BodyEnd>,
}

/// One kind of request: a map the kernel side takes requests from (and deletes them), and a
/// flag it looks at first.
pub struct Asks<K: aya::Pod, V: aya::Pod> {
    name: &'static str,
    requests: aya::maps::HashMap<MapData, K, V>,
    /// Raised before the kernel side is asked anything, lowered once it has taken every request
    /// (it deletes what it applies or drops), so that a host that never asks pays no lookup.
    asked: aya::maps::Array<MapData, u32>,
    raised: bool,
    /// A request may be in the map: false once a look found it empty. Looking at an empty
    /// hash map still walks all its buckets in the kernel (~100 us here).
    marked: bool,
    looked: Instant,
}

impl<K: aya::Pod + std::fmt::Debug, V: aya::Pod> Asks<K, V> {
    fn new(ebpf: &mut Ebpf, name: &'static str, flag: &'static str) -> Result<Self, CaptureError> {
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| CaptureError::Map(name, "missing".into()))
        };
        let (requests, asked) = (take(name)?, take(flag)?);
        Ok(Self {
            name,
            requests: aya::maps::HashMap::try_from(requests)
                .map_err(|e| CaptureError::Map(name, e.to_string()))?,
            asked: aya::maps::Array::try_from(asked)
                .map_err(|e| CaptureError::Map(flag, e.to_string()))?,
            raised: false,
            marked: false,
            looked: Instant::now(),
        })
    }

    pub fn ask(&mut self, key: K, value: &V) {
        // An LRU map: inserting never fails for want of room.
        if let Err(e) = self.requests.insert(&key, value, 0) {
            tracing::debug!("{} request for {key:x?}: {e}", self.name);
            return;
        }
        self.marked = true;
        if !self.raised {
            self.raise();
        }
    }

    fn raise(&mut self) {
        match self.asked.set(0, &1, 0) {
            Ok(()) => self.raised = true,
            Err(e) => tracing::warn!("raising the {} flag (retried each second): {e}", self.name),
        }
    }

    /// Lowers the flag once no request is left (and raises it again if that failed while some
    /// are), looked at once a second at most. A request for a connection that ended before the
    /// kernel side took it up would stay (and the flag with it) until a new socket at its
    /// address: those of sockets that are no longer `open` are deleted, 256 looked at each
    /// time. Only this thread adds requests, so none can come between the look and the
    /// lowering.
    pub fn tidy(&mut self, open: impl Fn(&K) -> bool) {
        if !self.marked || self.looked.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.looked = Instant::now();
        const LOOK: usize = 256;
        let (mut seen, mut gone) = (0, Vec::new());
        for key in self.requests.keys().take(LOOK) {
            seen += 1;
            if let Ok(key) = key
                && !open(&key)
            {
                gone.push(key);
            }
        }
        for key in &gone {
            let _ = self.requests.remove(key);
        }
        let empty = seen < LOOK && gone.len() == seen;
        if self.raised && empty {
            if self.asked.set(0, &0, 0).is_ok() {
                self.raised = false;
            }
        } else if !self.raised && !empty {
            self.raise();
        }
        // Looked at again while requests are left or the flag could not be lowered.
        self.marked = !empty || self.raised;
    }
}

/// An owned attachment: held only to be dropped (which detaches it).
enum Link {
    Tp(#[allow(dead_code)] TracePointLink),
    Raw(#[allow(dead_code)] RawTracePointLink),
    Btf(#[allow(dead_code)] BtfTracePointLink),
    FEntry(#[allow(dead_code)] FEntryLink),
    FExit(#[allow(dead_code)] FExitLink),
}

/// The loaded programs; dropping it detaches them.
pub struct Capture {
    /// Owned attachments: detached in parallel on drop (detaching a classic tracepoint waits
    /// for RCU grace periods; one after the other, 21 of them take seconds).
    links: Vec<Link>,
    /// How the syscall programs were attached.
    pub mode: AttachMode,
    /// Changes to CLOSE caused by an RST taken in are marked (`FLAG_PEER_RESET`).
    pub resets_marked: bool,
    ebpf: Ebpf,
    /// The TLS libraries' hooks.
    tls: TlsHooks,
    stats: PerCpuArray<MapData, u64>,
    /// Keeps the kernel's run-time accounting on while held.
    bpf_stats: Option<std::os::fd::OwnedFd>,
}

/// The ring buffer maps, one per CPU up to their number (`maps::ring` on the eBPF side).
const RING_MAPS: [&str; 4] = ["EVENTS", "EVENTS_1", "EVENTS_2", "EVENTS_3"];

/// Rings used: one per online CPU, at most RING_MAPS, a power of two (the eBPF side masks
/// the CPU number).
fn ring_count() -> usize {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let n = cpus.min(RING_MAPS.len());
    1 << n.ilog2()
}

/// Each ring's share of `total` bytes: a power of two, at least 64 KiB.
fn ring_bytes(total: u32, rings: usize) -> u32 {
    let share = (total / rings as u32).max(64 * 1024);
    1 << share.ilog2()
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

fn check_privileges() -> Result<(), CaptureError> {
    let caps = effective_caps();
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(CaptureError::Privileges(caps))
    }
}

fn mount(fstype: &str, target: &str) -> io::Result<()> {
    use std::ffi::CString;
    fs::create_dir_all(target)?;
    let src = CString::new(fstype).map_err(io::Error::other)?;
    let dst = CString::new(target).map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where tracefs is, mounting it when it is nowhere.
fn ensure_tracefs() -> Result<&'static str, CaptureError> {
    for dir in [TRACEFS, TRACEFS_DEBUG] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(dir);
        }
    }
    mount("tracefs", TRACEFS).map_err(CaptureError::NoTracefs)?;
    tracing::info!("mounted tracefs at {TRACEFS}");
    Ok(TRACEFS)
}

fn ensure_bpffs() {
    let is_bpffs = fs::read_to_string("/proc/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(BPFFS)))
        .unwrap_or(false);
    if !is_bpffs {
        match mount("bpf", BPFFS) {
            Ok(()) => tracing::info!("mounted bpffs at {BPFFS}"),
            Err(e) => tracing::warn!("bpffs is not mounted at {BPFFS} and mounting it failed: {e}"),
        }
    }
}

fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        // Kernels since 5.11 account BPF memory to the cgroup instead, so this is usually fine.
        tracing::warn!(
            "could not raise RLIMIT_MEMLOCK ({}); continuing",
            io::Error::last_os_error()
        );
    }
}

/// Offset of `field` in a tracepoint's format file.
fn field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.rsplit([' ', '*']).next()?.split('[').next()?;
        if name != field {
            return None;
        }
        rest.trim()
            .strip_prefix("offset:")?
            .split(';')
            .next()?
            .parse()
            .ok()
    })
}

/// What is wrong with the tracepoints some data paths need, found at start: those paths fail
/// with it, the others go on.
#[derive(Default)]
struct Layouts {
    /// `syscalls:sys_{enter,exit}_*` (read only by the `tracepoint` path).
    syscalls: Option<CaptureError>,
    /// `sock:sock_{send,recv}_length` (Linux 6.3+; every path but `fentry`).
    sock: Option<CaptureError>,
}

/// Checks the record layouts the programs read. Only the lifecycle's is needed by every data
/// path; problems with the others are returned for the paths that need them.
fn check_layouts(tracefs: &str) -> Result<Layouts, CaptureError> {
    let mut layouts = Layouts::default();
    let (_, lc, ln) = LIFECYCLE;
    let sock = SOCK_DATA.iter().map(|&(_, c, n)| (c, n));
    for (category, name) in [(lc, ln)].into_iter().chain(sock) {
        let path = Path::new(tracefs).join("events").join(category).join(name);
        if !path.is_dir() {
            let e = CaptureError::MissingTracepoint(
                category,
                name,
                format!("{} does not exist", path.display()),
            );
            if name == ln {
                return Err(e);
            }
            layouts.sock.get_or_insert(e);
        }
    }
    for &(category, name, field, want) in EXPECTED_FIELDS {
        let path = Path::new(tracefs)
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let problem = match fs::read_to_string(&path) {
            Ok(format) => {
                let got = field_offset(&format, field);
                (got != Some(want)).then(|| CaptureError::Layout(category, name, field, got, want))
            }
            Err(e) => Some(CaptureError::MissingTracepoint(
                category,
                name,
                format!("{}: {e}", path.display()),
            )),
        };
        match problem {
            Some(p) if category == "syscalls" => {
                layouts.syscalls.get_or_insert(p);
            }
            Some(p) if name == ln => return Err(p),
            Some(p) => {
                layouts.sock.get_or_insert(p);
            }
            None => {}
        }
    }
    Ok(layouts)
}

/// A program of the object, as its kind (tracepoint, raw or BTF tracepoint).
fn program_of<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| CaptureError::Program(name, "not in the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| CaptureError::Program(name, e.to_string()))
}

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    (prog, category, name): (&'static str, &'static str, &'static str),
) -> Result<Link, CaptureError> {
    let program: &mut TracePoint = program_of(ebpf, prog)?;
    if program.fd().is_err() {
        program
            .load()
            .map_err(|e| CaptureError::Program(prog, format!("{e:#}")))?;
    }
    let link = program
        .attach(category, name)
        .map_err(|e| CaptureError::Attach(category, name, e.to_string()))?;
    program
        .take_link(link)
        .map(Link::Tp)
        .map_err(|e| CaptureError::Attach(category, name, e.to_string()))
}

fn attach_btf(
    ebpf: &mut Ebpf,
    btf: &Btf,
    program: &'static str,
    tracepoint: &'static str,
) -> Result<Link, CaptureError> {
    let p: &mut BtfTracePoint = program_of(ebpf, program)?;
    if p.fd().is_err() {
        p.load(tracepoint, btf)
            .map_err(|e| CaptureError::Program(program, format!("{e:#}")))?;
    }
    let link = p
        .attach()
        .map_err(|e| CaptureError::Attach("tp_btf", tracepoint, e.to_string()))?;
    p.take_link(link)
        .map(Link::Btf)
        .map_err(|e| CaptureError::Attach("tp_btf", tracepoint, e.to_string()))
}

fn attach_fexit(
    ebpf: &mut Ebpf,
    btf: &Btf,
    (program, function): (&'static str, &'static str),
) -> Result<Link, CaptureError> {
    let p: &mut FExit = program_of(ebpf, program)?;
    if p.fd().is_err() {
        p.load(function, btf)
            .map_err(|e| CaptureError::Program(program, format!("{e:#}")))?;
    }
    let link = p
        .attach()
        .map_err(|e| CaptureError::Attach("fexit", function, e.to_string()))?;
    p.take_link(link)
        .map(Link::FExit)
        .map_err(|e| CaptureError::Attach("fexit", function, e.to_string()))
}

fn attach_fentry(
    ebpf: &mut Ebpf,
    btf: &Btf,
    (program, function): (&'static str, &'static str),
) -> Result<Link, CaptureError> {
    let p: &mut FEntry = program_of(ebpf, program)?;
    if p.fd().is_err() {
        p.load(function, btf)
            .map_err(|e| CaptureError::Program(program, format!("{e:#}")))?;
    }
    let link = p
        .attach()
        .map_err(|e| CaptureError::Attach("fentry", function, e.to_string()))?;
    p.take_link(link)
        .map(Link::FEntry)
        .map_err(|e| CaptureError::Attach("fentry", function, e.to_string()))
}

fn attach_raw(
    ebpf: &mut Ebpf,
    program: &'static str,
    tracepoint: &'static str,
) -> Result<Link, CaptureError> {
    let p: &mut RawTracePoint = program_of(ebpf, program)?;
    if p.fd().is_err() {
        p.load()
            .map_err(|e| CaptureError::Program(program, format!("{e:#}")))?;
    }
    let link = p
        .attach(tracepoint)
        .map_err(|e| CaptureError::Attach("raw_tp", tracepoint, e.to_string()))?;
    p.take_link(link)
        .map(Link::Raw)
        .map_err(|e| CaptureError::Attach("raw_tp", tracepoint, e.to_string()))
}

/// Where fields of `struct sock` are in the running kernel, from its BTF: what the programs
/// cannot take from a fixed offset. None where BTF does not say.
#[derive(Clone, Copy, Debug, Default)]
struct SockOffsets {
    /// `sk_protocol`, when a plain 16-bit field (Linux 5.6 and later; a bitfield before).
    sk_protocol: Option<u32>,
    /// `__sk_common.skc_v6_rcv_saddr` and `skc_v6_daddr` (16 bytes each).
    v6_rcv_saddr: Option<u32>,
    v6_daddr: Option<u32>,
    /// `task_struct.flags`, to tell io_uring workers and kernel threads.
    task_flags: Option<u32>,
    /// `task_struct.nvcsw`, when `nivcsw` directly follows it.
    task_switches: Option<u32>,
    /// `tcp_sock.bytes_received` and `bytes_acked`.
    tcp_bytes: Option<(u32, u32)>,
    /// `tcp_sock.write_seq` and `copied_seq`.
    tcp_seq: Option<(u32, u32)>,
    /// `tcp_sock.srtt_us` and `total_retrans`.
    tcp_path: Option<(u32, u32)>,
    /// `sock.sk_flags`.
    sk_flags: Option<u32>,
    /// `tcp_recvmsg`'s arguments, and which is `flags` (6 and 4 until 5.19, then 5 and 3,
    /// then 4 and 3 without `addr_len`).
    tcp_recvmsg: Option<(usize, u32)>,
    /// How many arguments `tcp_sendmsg` and `tcp_sendpage` (until 6.5) take: the programs
    /// read the return value after 3 and 5.
    tcp_sendmsg_args: Option<usize>,
    tcp_sendpage: Option<usize>,
    /// From a descriptor to its socket, for the syscall paths where no tracepoint names it.
    fd_walk: Option<FdWalk>,
}

/// `task_struct.files`, `files_struct.fdt`, `fdtable.max_fds`, `fdtable.fd`,
/// `file.private_data`, `socket.file`, `socket.sk` (`probes::fd`).
#[derive(Debug, Clone, Copy)]
struct FdWalk([u32; 7]);

impl FdWalk {
    const GLOBALS: [&str; 7] = [
        "TASK_FILES_OFFSET",
        "FILES_FDT_OFFSET",
        "FDT_MAX_FDS_OFFSET",
        "FDT_FD_OFFSET",
        "FILE_PRIVATE_DATA_OFFSET",
        "SOCKET_FILE_OFFSET",
        "SOCKET_SK_OFFSET",
    ];

    fn from_btf(btf: &btf_rs::Btf) -> Option<Self> {
        Some(Self([
            member(btf, "task_struct", "files", 8)?,
            member(btf, "files_struct", "fdt", 8)?,
            member(btf, "fdtable", "max_fds", 4)?,
            member(btf, "fdtable", "fd", 8)?,
            member(btf, "file", "private_data", 8)?,
            member(btf, "socket", "file", 8)?,
            member(btf, "socket", "sk", 8)?,
        ]))
    }
}

impl SockOffsets {
    fn from_btf() -> Self {
        use btf_rs::{Backend, Btf};
        const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
        // Mapped where the kernel allows it; else parsed (more memory, briefly).
        let Ok(btf) = Btf::from_file_with_backend(VMLINUX, Backend::Mmap)
            .or_else(|_| Btf::from_file(VMLINUX))
        else {
            return Self::default();
        };
        let offsets = Self {
            sk_protocol: member(&btf, "sock", "sk_protocol", 2),
            v6_rcv_saddr: member(&btf, "sock_common", "skc_v6_rcv_saddr", 16),
            v6_daddr: member(&btf, "sock_common", "skc_v6_daddr", 16),
            task_flags: member(&btf, "task_struct", "flags", 4),
            task_switches: member(&btf, "task_struct", "nvcsw", 8)
                .filter(|&v| member(&btf, "task_struct", "nivcsw", 8) == Some(v + 8)),
            tcp_bytes: member(&btf, "tcp_sock", "bytes_received", 8).zip(member(
                &btf,
                "tcp_sock",
                "bytes_acked",
                8,
            )),
            tcp_seq: member(&btf, "tcp_sock", "write_seq", 4).zip(member(
                &btf,
                "tcp_sock",
                "copied_seq",
                4,
            )),
            tcp_path: member(&btf, "tcp_sock", "srtt_us", 4).zip(member(
                &btf,
                "tcp_sock",
                "total_retrans",
                4,
            )),
            // Moved into `sock_common` (first in `struct sock`) by newer kernels.
            sk_flags: member(&btf, "sock", "sk_flags", 8)
                .or_else(|| member(&btf, "sock_common", "skc_flags", 8)),
            tcp_recvmsg: arity(&btf, "tcp_recvmsg").zip(parameter(&btf, "tcp_recvmsg", "flags")),
            tcp_sendmsg_args: arity(&btf, "tcp_sendmsg"),
            tcp_sendpage: arity(&btf, "tcp_sendpage"),
            fd_walk: FdWalk::from_btf(&btf),
        };
        tracing::debug!("struct sock offsets from BTF: {offsets:?}");
        offsets
    }
}

/// The BTF prototype of kernel function `name`.
fn prototype(btf: &btf_rs::Btf, name: &str) -> Option<btf_rs::FuncProto> {
    use btf_rs::Type;
    btf.resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Func(f) => match btf.resolve_chained_type(&f).ok()? {
                Type::FuncProto(p) => Some(p),
                _ => None,
            },
            _ => None,
        })
}

/// How many arguments kernel function `name` takes.
fn arity(btf: &btf_rs::Btf, name: &str) -> Option<usize> {
    prototype(btf, name).map(|p| p.parameters.len())
}

/// Which of kernel function `name`'s arguments is called `param`.
fn parameter(btf: &btf_rs::Btf, name: &str, param: &str) -> Option<u32> {
    let p = prototype(btf, name)?;
    let i = p
        .parameters
        .iter()
        .position(|a| btf.resolve_name(a).is_ok_and(|n| n == param))?;
    u32::try_from(i).ok()
}

/// Byte offset of `field` in struct `name` (or in an anonymous struct or union in it, as
/// `struct sock` nests some of its fields), if it is byte-aligned, not a bitfield, and `size`
/// bytes long.
fn member(btf: &btf_rs::Btf, name: &str, field: &str, size: usize) -> Option<u32> {
    use btf_rs::Type;
    btf.resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => member_in(btf, &s, field, size, 0, 0),
            _ => None,
        })
}

fn member_in(
    btf: &btf_rs::Btf,
    s: &btf_rs::Struct,
    field: &str,
    size: usize,
    base_bits: u32,
    depth: u32,
) -> Option<u32> {
    use btf_rs::Type;
    for m in &s.members {
        let bits = base_bits + m.bit_offset();
        let name = btf.resolve_name(m).unwrap_or_default();
        if name.is_empty() && depth < 4 {
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
                && let Some(off) = member_in(btf, &inner, field, size, bits, depth + 1)
            {
                return Some(off);
            }
            continue;
        }
        if name != field {
            continue;
        }
        if m.bitfield_size().unwrap_or(0) != 0 || !bits.is_multiple_of(8) {
            return None;
        }
        // Through typedefs and qualifiers to what has a size.
        let mut ty = btf.resolve_chained_type(m).ok()?;
        for _ in 0..8 {
            ty = match ty {
                Type::Int(i) => return (i.size() == size).then_some(bits / 8),
                Type::Struct(s) | Type::Union(s) => {
                    return (s.size() == size).then_some(bits / 8);
                }
                Type::Ptr(_) => return (size == 8).then_some(bits / 8),
                Type::Typedef(t) => btf.resolve_chained_type(&t).ok()?,
                Type::Volatile(t) => btf.resolve_chained_type(&t).ok()?,
                Type::Const(t) => btf.resolve_chained_type(&t).ok()?,
                Type::TypeTag(t) => btf.resolve_chained_type(&t).ok()?,
                _ => return None,
            };
        }
        return None;
    }
    None
}

/// The links of one data path, all attached, or the first error (what did attach is dropped,
/// which detaches it).
fn attach_path(
    ebpf: &mut Ebpf,
    path: AttachMode,
    offsets: &SockOffsets,
    btf: Option<&Btf>,
    layouts: &Layouts,
) -> Result<Vec<Link>, CaptureError> {
    let mut links = Vec::new();
    let sk_protocol = offsets.sk_protocol;
    let syscalls = matches!(
        path,
        AttachMode::RawTracepoint
            | AttachMode::RawTracepointFd
            | AttachMode::Tracepoint
            | AttachMode::Auto
    );
    // The syscall paths go without it where they can find sockets from descriptors.
    let walks_fds = syscalls && walks_fds(layouts, offsets, path);
    if path == AttachMode::RawTracepointFd && !walks_fds {
        return Err(CaptureError::Attach(
            "raw_syscalls",
            "sys_exit",
            "descriptors' sockets or sk_protocol are not in the kernel's BTF".into(),
        ));
    }
    if path != AttachMode::Fentry
        && !walks_fds
        && let Some(e) = &layouts.sock
    {
        let e = match (syscalls, offsets.fd_walk) {
            (true, None) => format!("{e}; nor are descriptors' sockets in the kernel's BTF"),
            _ => e.to_string(),
        };
        return Err(CaptureError::Attach("sock", "sock_*_length", e));
    }
    let sock_length = if walks_fds {
        tracing::info!(
            "no sock_*_length tracepoints here (before 6.3): each call's socket is found from its \
             descriptor"
        );
        &[][..]
    } else {
        SOCK_LENGTH
    };
    match path {
        AttachMode::Fentry => links.extend(attach_fentry_path(ebpf, offsets, btf)?),
        AttachMode::Socket | AttachMode::SocketRaw | AttachMode::SocketClassic => {
            let (sk_protocol, btf) = match path {
                AttachMode::SocketRaw => (sk_protocol, None),
                AttachMode::SocketClassic => (None, None),
                _ => (sk_protocol, btf),
            };
            links.extend(attach_sock_data(ebpf, sk_protocol, btf)?);
            let (prog, tp) = SEND_START;
            match attach_raw(ebpf, prog, tp) {
                Ok(link) => links.push(link),
                Err(e) => {
                    tracing::warn!("{e}: sends are stamped when they end rather than begin")
                }
            }
        }
        AttachMode::RawTracepoint | AttachMode::RawTracepointFd => {
            links.push(attach_lifecycle(ebpf, sk_protocol)?);
            for &p in sock_length {
                links.push(attach_tracepoint(ebpf, p)?);
            }
            for &(prog, tp) in RAW_SYSCALLS {
                links.push(attach_raw(ebpf, prog, tp)?);
            }
        }
        AttachMode::Tracepoint | AttachMode::Auto => {
            if let Some(e) = &layouts.syscalls {
                return Err(CaptureError::Attach(
                    "syscalls",
                    "sys_enter_*",
                    e.to_string(),
                ));
            }
            links.push(attach_lifecycle(ebpf, sk_protocol)?);
            for &p in sock_length {
                links.push(attach_tracepoint(ebpf, p)?);
            }
            for &(category, name) in SYSCALL_TRACEPOINTS {
                links.push(attach_tracepoint(ebpf, (name, category, name))?);
            }
        }
    }
    Ok(links)
}

/// Whether the syscall paths find each call's socket from its descriptor (`probes::fd`): where
/// `sock_*_length` is missing (before 6.3) and BTF gives the offsets of the walk and of
/// `sk_protocol` (to tell TCP); or wherever `mode` asks for it.
fn walks_fds(layouts: &Layouts, offsets: &SockOffsets, mode: AttachMode) -> bool {
    (layouts.sock.is_some() || mode == AttachMode::RawTracepointFd)
        && offsets.fd_walk.is_some()
        && offsets.sk_protocol.is_some()
}

/// The fentry data path: needs BTF (typed arguments, socket storage), `sk_protocol`'s offset
/// and a `tcp_recvmsg` of a known arity.
fn attach_fentry_path(
    ebpf: &mut Ebpf,
    offsets: &SockOffsets,
    btf: Option<&Btf>,
) -> Result<Vec<Link>, CaptureError> {
    let unavailable = |why: &str| CaptureError::Attach("fexit", "tcp_{send,recv}msg", why.into());
    let btf = btf.ok_or_else(|| unavailable("the kernel's BTF did not load"))?;
    if offsets.sk_protocol.is_none() {
        return Err(unavailable("sk_protocol is not in the kernel's BTF"));
    }
    // The verifier bounds the argument a program reads by the function's arity, not by what
    // the program takes it for: an argument more would be read as the return value.
    if offsets.tcp_sendmsg_args != Some(3) {
        return Err(unavailable(&format!(
            "tcp_sendmsg takes {:?} arguments in this kernel's BTF, not 3",
            offsets.tcp_sendmsg_args
        )));
    }
    // Before 5.19 (so wherever the argument helpers are missing), `nonblock` came before
    // `flags`: read directly.
    let recv = match offsets.tcp_recvmsg {
        Some((6, 4)) => FENTRY_RECV_NONBLOCK,
        Some((_, 3)) => FENTRY_RECV,
        found => {
            return Err(unavailable(&format!(
                "tcp_recvmsg's (arguments, flags) in this kernel's BTF: {found:?}"
            )));
        }
    };
    let (prog, tp) = SOCK_DATA_BTF[0];
    let mut links = vec![
        attach_btf(ebpf, btf, prog, tp)?,
        attach_fexit(ebpf, btf, FENTRY_SEND)?,
        attach_fexit(ebpf, btf, recv)?,
    ];
    // Missing since 6.5, where splice goes through `tcp_sendmsg`.
    if let Some(n) = offsets.tcp_sendpage.filter(|&n| n != 5) {
        tracing::warn!("tcp_sendpage takes {n} arguments, not 5: sendfile's bytes are not seen");
    } else if offsets.tcp_sendpage.is_some() {
        match attach_fexit(ebpf, btf, FENTRY_SENDPAGE) {
            Ok(link) => links.push(link),
            Err(e) => tracing::warn!("{e}: sendfile's bytes are not seen"),
        }
    }
    match attach_fentry(ebpf, btf, FENTRY_SEND_START) {
        Ok(link) => links.push(link),
        Err(e) => tracing::warn!("{e}: sends are stamped when they end rather than begin"),
    }
    Ok(links)
}

/// `sock_{send,recv}_length` for the socket data path: as BTF tracepoints (with the lifecycle
/// on one too: they share the state in the socket), else raw ones, when BTF gave
/// `sk_protocol`'s offset, else as the classic tracepoints, whose records carry it (these two
/// with the lifecycle program that keeps state by socket address).
fn attach_sock_data(
    ebpf: &mut Ebpf,
    sk_protocol: Option<u32>,
    btf: Option<&Btf>,
) -> Result<Vec<Link>, CaptureError> {
    if let (Some(_), Some(btf)) = (sk_protocol, btf) {
        let typed: Result<Vec<Link>, CaptureError> = SOCK_DATA_BTF
            .iter()
            .map(|&(prog, tp)| attach_btf(ebpf, btf, prog, tp))
            .collect();
        match typed {
            Ok(links) => {
                tracing::info!("socket data path: sock_*_length as BTF tracepoints");
                return Ok(links);
            }
            Err(e) => tracing::info!("{e}; trying raw tracepoints"),
        }
    }
    if sk_protocol.is_some() {
        let raw: Result<Vec<Link>, CaptureError> = SOCK_DATA_RAW
            .iter()
            .map(|&(prog, tp)| attach_raw(ebpf, prog, tp))
            .collect();
        match raw {
            Ok(mut links) => {
                tracing::info!("socket data path: sock_*_length as raw tracepoints");
                links.push(attach_lifecycle(ebpf, sk_protocol)?);
                return Ok(links);
            }
            Err(e) => tracing::info!("{e}; socket data path on the classic tracepoints"),
        }
    } else {
        tracing::info!(
            "sk_protocol not in the kernel's BTF: socket data path on the classic tracepoints"
        );
    }
    let mut links: Vec<Link> = SOCK_DATA
        .iter()
        .map(|&p| attach_tracepoint(ebpf, p))
        .collect::<Result<_, _>>()?;
    links.push(attach_lifecycle(ebpf, sk_protocol)?);
    Ok(links)
}

/// Connection lifecycle keeping each socket's state by its address, for the data paths that
/// do too: the raw tracepoint where it loads, else the classic one.
fn attach_lifecycle(ebpf: &mut Ebpf, sk_protocol: Option<u32>) -> Result<Link, CaptureError> {
    if sk_protocol.is_some() {
        let (prog, tp) = LIFECYCLE_RAW;
        match attach_raw(ebpf, prog, tp) {
            Ok(link) => return Ok(link),
            Err(e) => tracing::info!("{e}; connection lifecycle on the classic tracepoint"),
        }
    }
    attach_tracepoint(ebpf, LIFECYCLE)
}

/// Attaches the first data path of `mode` that works here; which one it was.
fn attach_data_path(
    ebpf: &mut Ebpf,
    links: &mut Vec<Link>,
    mode: AttachMode,
    offsets: &SockOffsets,
    btf: Option<&Btf>,
    layouts: &Layouts,
) -> Result<AttachMode, CaptureError> {
    let x86 = cfg!(target_arch = "x86_64");
    if !matches!(mode, AttachMode::Auto | AttachMode::Tracepoint) && !x86 {
        return Err(CaptureError::Attach(
            "data path",
            "x86_64",
            "the socket and raw-tracepoint paths read x86_64 registers; use --attach tracepoint"
                .into(),
        ));
    }
    let auto = mode == AttachMode::Auto;
    let candidates: &[AttachMode] = match mode {
        AttachMode::Auto if x86 => &[
            AttachMode::Socket,
            AttachMode::Fentry,
            AttachMode::RawTracepoint,
            AttachMode::Tracepoint,
        ],
        AttachMode::Auto => &[AttachMode::Tracepoint],
        AttachMode::Socket => &[AttachMode::Socket],
        AttachMode::Fentry => &[AttachMode::Fentry],
        AttachMode::SocketRaw => &[AttachMode::SocketRaw],
        AttachMode::SocketClassic => &[AttachMode::SocketClassic],
        AttachMode::RawTracepoint => &[AttachMode::RawTracepoint],
        AttachMode::RawTracepointFd => &[AttachMode::RawTracepointFd],
        AttachMode::Tracepoint => &[AttachMode::Tracepoint],
    };
    for &path in candidates {
        match attach_path(ebpf, path, offsets, btf, layouts) {
            Ok(new) => {
                links.extend(new);
                return Ok(path);
            }
            Err(e) if auto => {
                tracing::warn!("{path:?} data path unavailable here ({e}); trying the next");
            }
            Err(e) => return Err(e),
        }
    }
    Err(CaptureError::Attach(
        "data path",
        "any",
        "no data path attached (see the warnings above)".into(),
    ))
}

impl Capture {
    /// Checks the host, loads every program and attaches it.
    pub fn start(
        bpf_stats: bool,
        ringbuf_bytes: Option<u32>,
        mode: AttachMode,
        tls: bool,
    ) -> Result<(Self, Rings, Requests), CaptureError> {
        check_privileges()?;
        let tracefs = ensure_tracefs()?;
        ensure_bpffs();
        raise_memlock();
        let layouts = check_layouts(tracefs)?;

        let tgid = std::process::id();
        let offsets = SockOffsets::from_btf();
        // Without it (before 5.17) HTTP/2 frames are not walked past each call's first KiB.
        let probe = aya::sys::is_helper_supported(ProgramType::KProbe, BpfHelper::BPF_FUNC_loop);
        let has_bpf_loop = matches!(probe, Ok(true));
        if !has_bpf_loop {
            tracing::warn!(
                "no bpf_loop here (before 5.17; probe: {probe:?}): HTTP/2 frames past the first \
                 KiB of each call, and iovecs past the 16th, are not followed"
            );
        }
        // For the BTF tracepoints; dropped once they are attached.
        let btf = Btf::from_sys_fs().ok();
        // Borrowed by the loader until it loads.
        let fd_walk = u32::from(walks_fds(&layouts, &offsets, mode));
        let walk = offsets.fd_walk.map(|FdWalk(w)| w).unwrap_or_default();
        let mut loader = EbpfLoader::new();
        // One ring per CPU, up to RING_MAPS (CPUs share them past that), splitting the size asked.
        let total = ringbuf_bytes.unwrap_or(limits::RINGBUF_BYTES);
        let rings = ring_count();
        let ring = ring_bytes(total, rings);
        let ring_mask = rings as u32 - 1;
        for (i, name) in RING_MAPS.iter().enumerate() {
            loader.map_max_entries(name, if i < rings { ring } else { page_size() });
        }
        loader.override_global("RING_MASK", &ring_mask, true);
        loader.override_global("FD_WALK", &fd_walk, true);
        for (global, off) in FdWalk::GLOBALS.into_iter().zip(&walk) {
            loader.override_global(global, off, true);
        }
        let wakeup_shift = u64::from(limits::WAKEUP_BYTES.min(ring / 4).max(1).ilog2());
        let mut ebpf = loader
            .override_global("TRACER_TGID", &tgid, true)
            .override_global("WAKEUP_SHIFT", &wakeup_shift, true)
            .override_global(
                "SK_PROTOCOL_OFFSET",
                &offsets.sk_protocol.unwrap_or(0),
                true,
            )
            .override_global(
                "SKC_V6_RCV_SADDR_OFFSET",
                &offsets.v6_rcv_saddr.unwrap_or(0),
                true,
            )
            .override_global("SKC_V6_DADDR_OFFSET", &offsets.v6_daddr.unwrap_or(0), true)
            .override_global("TASK_FLAGS_OFFSET", &offsets.task_flags.unwrap_or(0), true)
            .override_global(
                "TASK_SWITCHES_OFFSET",
                &offsets.task_switches.unwrap_or(0),
                true,
            )
            .override_global(
                "TCP_BYTES_RECEIVED_OFFSET",
                &offsets.tcp_bytes.map_or(0, |(rx, _)| rx),
                true,
            )
            .override_global(
                "TCP_BYTES_ACKED_OFFSET",
                &offsets.tcp_bytes.map_or(0, |(_, acked)| acked),
                true,
            )
            .override_global(
                "TCP_WRITE_SEQ_OFFSET",
                &offsets.tcp_seq.map_or(0, |(w, _)| w),
                true,
            )
            .override_global(
                "TCP_COPIED_SEQ_OFFSET",
                &offsets.tcp_seq.map_or(0, |(_, c)| c),
                true,
            )
            .override_global(
                "TCP_SRTT_OFFSET",
                &offsets.tcp_path.map_or(0, |(srtt, _)| srtt),
                true,
            )
            .override_global(
                "TCP_RETRANS_OFFSET",
                &offsets.tcp_path.map_or(0, |(_, r)| r),
                true,
            )
            .override_global("SK_FLAGS_OFFSET", &offsets.sk_flags.unwrap_or(0), true)
            .override_global("HAS_BPF_LOOP", &u32::from(has_bpf_loop), true)
            .override_global(
                "TCP_RECVMSG_FLAGS_ARG",
                &offsets.tcp_recvmsg.map_or(3, |(_, flags)| flags),
                true,
            )
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/tracer"
            )))
            .map_err(CaptureError::Load)?;
        let mut links = Vec::new();
        let mode = attach_data_path(
            &mut ebpf,
            &mut links,
            mode,
            &offsets,
            btf.as_ref(),
            &layouts,
        )?;
        drop(btf);
        // Which end reset a connection (an RST taken in, or this end's abortive close): without
        // it, told by the process the change ran in, which only counts a client's.
        let resets_marked = match attach_raw(&mut ebpf, "tcp_reset_in", "tcp_receive_reset") {
            Ok(link) => {
                links.push(link);
                true
            }
            Err(e) => {
                tracing::warn!("resets taken in are not told apart from abortive closes: {e}");
                false
            }
        };
        let mut tls = if tls {
            TlsHooks::load(&mut ebpf, has_bpf_loop)
        } else {
            TlsHooks::off()
        };
        tls.refresh(&mut ebpf, true);
        // Parsing the kernel's BTF took ~7 MB for a moment: give it back now rather than keep
        // it in the allocator's free lists.
        // SAFETY: only asks the allocator to release free memory.
        unsafe { libc::malloc_trim(0) };
        let mut events = Vec::with_capacity(rings);
        for name in &RING_MAPS[..rings] {
            let map = ebpf
                .take_map(name)
                .ok_or_else(|| CaptureError::Map(name, "missing".into()))?;
            let Map::RingBuf(map) = map else {
                return Err(CaptureError::Map(name, "not a ring buffer".into()));
            };
            events.push(Ring::new(map).map_err(|e| CaptureError::Map(name, e.to_string()))?);
        }
        let events = Rings::new(events).map_err(|e| CaptureError::Map("EVENTS", e.to_string()))?;
        tracing::debug!("{rings} ring buffers of {ring} bytes");
        let requests = Requests {
            opaque: Asks::new(&mut ebpf, "OPAQUE", "OPAQUE_ASKED")?,
            bodies: Asks::new(&mut ebpf, "BODIES", "BODIES_ASKED")?,
        };
        let stats = ebpf
            .take_map("STATS")
            .ok_or_else(|| CaptureError::Map("STATS", "missing".into()))?;
        let stats =
            PerCpuArray::try_from(stats).map_err(|e| CaptureError::Map("STATS", e.to_string()))?;
        let bpf_stats = bpf_stats
            .then(|| match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!("cannot enable eBPF run-time statistics: {e}");
                    None
                }
            })
            .flatten();
        Ok((
            Self {
                links,
                mode,
                resets_marked,
                ebpf,
                tls,
                stats,
                bpf_stats,
            },
            events,
            requests,
        ))
    }

    /// Kernel-side counters, summed over CPUs.
    pub fn kernel_stats(&self) -> [(KernelStat, u64); KERNEL_STAT_COUNT as usize] {
        KernelStat::ALL.map(|s| {
            let total = self
                .stats
                .get(&(s as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (s, total)
        })
    }

    /// Run time and run count of each program, with `--bpf-stats` only: each program's info is
    /// a syscall that also copies its BTF, ~8% of an idle daemon's time when asked every second.
    pub fn program_stats(&self) -> Vec<(String, std::time::Duration, u64)> {
        if self.bpf_stats.is_none() {
            return Vec::new();
        }
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some((name.to_owned(), info.run_time(), info.run_count()))
            })
            .collect()
    }

    /// Hooks the TLS libraries of processes started since the last call (containers bring
    /// their own).
    pub fn refresh_tls(&mut self) {
        self.tls.refresh(&mut self.ebpf, false);
    }

    /// Whether executables wait to be hooked (`TlsHooks::waiting`).
    pub fn tls_waiting(&self) -> bool {
        self.tls.waiting()
    }

    /// Hooks the waiting executables whose processes have run long enough, without a look at
    /// new processes.
    pub fn hook_tls_waiting(&mut self) {
        self.tls.hook_waiting(&mut self.ebpf);
    }

    /// Whether the kernel reports each program that begins (`sched_process_exec`).
    pub fn execs_reported(&self) -> bool {
        self.tls.execs_reported()
    }

    /// Looks at the programs these processes just began running (a Go program's TLS).
    pub fn executed(&mut self, pids: &[u32]) {
        self.tls.executed(&mut self.ebpf, pids);
    }

    /// The Go programs among live processes, when that changed since the last call.
    pub fn go_processes(&mut self) -> Option<std::collections::HashSet<u32>> {
        self.tls.go_processes()
    }

    /// TLS library files hooked.
    pub fn tls_libraries(&self) -> usize {
        self.tls.libraries()
    }

    /// Detaches every program, all at once.
    pub fn detach(&mut self) {
        let t = std::time::Instant::now();
        let (uprobes, raw) = self.tls.take_links();
        std::thread::scope(|scope| {
            for link in self.links.drain(..) {
                scope.spawn(move || drop(link));
            }
            for link in uprobes {
                scope.spawn(move || drop(link));
            }
            for link in raw {
                scope.spawn(move || drop(link));
            }
        });
        tracing::debug!("programs detached in {:?}", t.elapsed());
    }

    /// Number of programs attached.
    pub fn programs(&self) -> usize {
        self.links.len()
    }

    /// Logs (debug) how many instructions the kernel's verifier walked for each loaded program:
    /// its limit is a million, which a kernel's own verifier reaches sooner or later than this
    /// one's (the headroom of the frame walk's callbacks, on the tests' older kernels).
    pub fn log_verified(&self) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        for (name, prog) in self.ebpf.programs() {
            if let Some(n) = prog
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count())
            {
                tracing::debug!("program {name}: {n} instructions verified");
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::{arity, field_offset, parameter};

    #[test]
    fn reads_format_offsets() {
        let f = "format:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                 \tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
                 \tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n";
        assert_eq!(field_offset(f, "skaddr"), Some(8));
        assert_eq!(field_offset(f, "saddr_v6"), Some(40));
        assert_eq!(field_offset(f, "common_type"), Some(0));
        assert_eq!(field_offset(f, "nope"), None);
    }

    /// The fentry path reads `tcp_recvmsg`'s flags by the index this finds: checked against
    /// this host's BTF (6.18: `tcp_recvmsg(sk, msg, len, flags)`, `addr_len` gone).
    #[test]
    fn reads_function_arguments_from_btf() {
        let btf = btf_rs::Btf::from_file("/sys/kernel/btf/vmlinux").expect("kernel BTF");
        assert_eq!(arity(&btf, "tcp_sendmsg"), Some(3));
        // Whichever of its three forms this kernel has, `flags` is where the programs read it.
        let form = (
            arity(&btf, "tcp_recvmsg"),
            parameter(&btf, "tcp_recvmsg", "flags"),
            parameter(&btf, "tcp_recvmsg", "nonblock"),
        );
        assert!(
            matches!(
                form,
                (Some(4 | 5), Some(3), None) | (Some(6), Some(4), Some(3))
            ),
            "{form:?}"
        );
        assert_eq!(arity(&btf, "no_such_function_here"), None);
    }
}
