//! `syscalls:sys_enter_*` / `sys_exit_*` for the read/write/send/recv/readv/writev/sendmsg/recvmsg
//! family: enter stores the user buffer, exit copies its first bytes once `sock_*_length` has
//! named a TCP socket (so files, pipes and UDP cost one map write and one delete); where that
//! tracepoint is missing (before 6.3), exit finds the socket from the descriptor (`fd`).
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel, generated::bpf_ktime_get_ns},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use tracer_common::{DIR_EGRESS, DIR_INGRESS, KernelStat};

use super::{
    data::{
        NR_RECVFROM, NR_RECVMSG, REGS_DI, REGS_DX, REGS_ORIG_AX, REGS_R10, REGS_SI, emit_data,
        traced,
    },
    fd,
    sock::{ByAddress, Lookup, from_sk, syscall_follows},
};
use crate::maps::{
    ACTIVE, KIND_BUF, KIND_IOV, KIND_MSG, KIND_NONE, SyscallArgs, count, tracer_tgid,
};

/// Offsets in the syscall tracepoint records (`.../syscalls/sys_enter_*/format`): every
/// argument is 8 bytes wide after the 16-byte header.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const ARG3: usize = 40;
const RET: usize = 16;
/// No flags argument (read, readv).
const NO_FLAGS: usize = 0;

macro_rules! enter_exit {
    ($enter:ident, $exit:ident, $kind:expr, $dir:expr) => {
        enter_exit!($enter, $exit, $kind, $dir, NO_FLAGS);
    };
    ($enter:ident, $exit:ident, $kind:expr, $dir:expr, $flags:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            enter_tp(&ctx, $kind, $dir, $flags);
            0
        }

        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit_tp(&ctx);
            0
        }
    };
}

enter_exit!(sys_enter_write, sys_exit_write, KIND_BUF, DIR_EGRESS);
enter_exit!(sys_enter_sendto, sys_exit_sendto, KIND_BUF, DIR_EGRESS);
enter_exit!(sys_enter_writev, sys_exit_writev, KIND_IOV, DIR_EGRESS);
enter_exit!(sys_enter_sendmsg, sys_exit_sendmsg, KIND_MSG, DIR_EGRESS);
// File bytes sent straight to a socket (nginx static files): counted, never shown, so that the
// response framing still adds up.
enter_exit!(
    sys_enter_sendfile64,
    sys_exit_sendfile64,
    KIND_NONE,
    DIR_EGRESS
);
enter_exit!(sys_enter_read, sys_exit_read, KIND_BUF, DIR_INGRESS);
enter_exit!(
    sys_enter_recvfrom,
    sys_exit_recvfrom,
    KIND_BUF,
    DIR_INGRESS,
    ARG3
);
enter_exit!(sys_enter_readv, sys_exit_readv, KIND_IOV, DIR_INGRESS);
enter_exit!(
    sys_enter_recvmsg,
    sys_exit_recvmsg,
    KIND_MSG,
    DIR_INGRESS,
    ARG2
);

/// `raw_tp/sys_enter` (x86_64): one attachment for every syscall instead of eighteen
/// tracepoints, and no perf record built per call. Untraced syscalls return after a compare.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn raw_sys_enter(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long id)
    let nr = ctx.arg::<u64>(1);
    let Some((kind, direction)) = traced(nr) else {
        return 0;
    };
    let regs: u64 = ctx.arg(0);
    let reg = |off: u64| {
        // SAFETY: `regs` is the kernel's pt_regs of this syscall; reads are checked.
        unsafe { bpf_probe_read_kernel((regs + off) as *const u64) }.unwrap_or(0)
    };
    let (buf, len) = (reg(REGS_SI), reg(REGS_DX));
    // The descriptor and flags only where exit finds the socket from them.
    let (fd, flags) = if fd::enabled() {
        let flags = match nr {
            NR_RECVFROM => reg(REGS_R10),
            NR_RECVMSG => len,
            _ => 0,
        };
        (reg(REGS_DI), flags)
    } else {
        (0, 0)
    };
    enter(buf, len, kind, direction, fd, flags);
    0
}

/// `raw_tp/sys_exit` (x86_64).
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn raw_sys_exit(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long ret)
    let regs: u64 = ctx.arg(0);
    // SAFETY: as above.
    let nr =
        unsafe { bpf_probe_read_kernel((regs + REGS_ORIG_AX) as *const u64) }.unwrap_or(u64::MAX);
    if traced(nr).is_some() {
        exit(ctx.arg::<i64>(1));
    }
    0
}

#[inline(always)]
fn enter_tp(ctx: &TracePointContext, kind: u32, direction: u32, flags_at: usize) {
    // SAFETY: offsets from the tracepoint's format; read_at copies with probe_read_kernel.
    let arg = |at: usize| unsafe { ctx.read_at::<u64>(at) }.unwrap_or(0);
    let (fd, flags) = match (fd::enabled(), flags_at) {
        (false, _) => (0, 0),
        (true, NO_FLAGS) => (arg(ARG0), 0),
        (true, at) => (arg(ARG0), arg(at)),
    };
    enter(arg(ARG1), arg(ARG2), kind, direction, fd, flags);
}

#[inline(always)]
fn exit_tp(ctx: &TracePointContext) {
    // SAFETY: `ret` is at a fixed offset in every sys_exit record.
    exit(unsafe { ctx.read_at::<i64>(RET).unwrap_or(-1) });
}

#[inline(always)]
fn enter(buf: u64, len: u64, kind: u32, direction: u32, fd: u64, flags: u64) {
    let id = bpf_get_current_pid_tgid();
    if (id >> 32) as u32 == tracer_tgid() {
        return;
    }
    let args = SyscallArgs {
        buf,
        len,
        // SAFETY: helper without preconditions.
        ts_enter: unsafe { bpf_ktime_get_ns() },
        sk: 0,
        kind,
        direction,
        goroutine: 0,
        fd: fd as u32,
        flags: flags as u32,
    };
    if ACTIVE.insert(&id, &args, 0).is_err() {
        count(KernelStat::ArgsMapFull);
    }
}

#[inline(always)]
fn exit(ret: i64) {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let mut args = match unsafe { ACTIVE.get(&id) } {
        Some(args) => *args,
        None => return,
    };
    let _ = ACTIVE.remove(&id);
    // A read of 0 bytes is end of stream: sent (without payload) so that responses framed by
    // the connection's close can end.
    if ret < 0 || (ret == 0 && args.direction != DIR_INGRESS) {
        return;
    }
    if args.sk == 0 {
        // No `sock_*_length` here: the socket from the descriptor.
        if !fd::enabled() {
            return;
        }
        let Some(sk) = fd::socket_of(u64::from(args.fd)) else {
            return;
        };
        if !syscall_follows(id, &from_sk(sk, args.flags as i32), &args) {
            return;
        }
        args.sk = sk;
    }
    emit_data::<ByAddress, false>(&args, ret as u64, id, Lookup::NotYet);
}
