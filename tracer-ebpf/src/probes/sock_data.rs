//! The data path without syscall tracepoints (x86_64, kernel BTF): `sock:sock_send_length` and
//! `sock_recv_length` fire once per send or receive on a socket, after the bytes moved; the
//! syscall's own registers (`bpf_task_pt_regs`) say which call it was and where its user buffer
//! is. Nothing runs for the rest of the host's syscalls, and nothing is kept between programs
//! but when each TCP send began, unlike the enter/exit path in `syscalls.rs` (kept for kernels
//! without this).
use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_task_btf, bpf_get_func_arg, bpf_ktime_get_ns, bpf_task_pt_regs,
        },
    },
    macros::{btf_tracepoint, fentry, fexit, raw_tracepoint, tracepoint},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, RawTracePointContext, TracePointContext,
    },
};
use tracer_common::{DIR_EGRESS, DIR_INGRESS, KernelStat};

use super::{
    data::{REGS_CS, REGS_DX, REGS_ORIG_AX, REGS_R14, REGS_SI, emit_data, first_bytes, traced},
    sock::{
        ByAddress, InSocket, LEN_RET, Record, SK_PROTOCOL_OFFSET, SKC_FAMILY, Store, from_sk,
        from_tracepoint, traced_socket,
    },
};
use crate::maps::{SEND_START, SendStart, SyscallArgs, count, go_on_behalf, tracer_tgid};

/// `task_struct.flags` bits (include/linux/sched.h).
const PF_IO_WORKER: u32 = 0x0000_0010;
const PF_KTHREAD: u32 = 0x0020_0000;

/// Byte offset of `flags` in `struct task_struct`, from the kernel's BTF (0: unknown).
#[unsafe(no_mangle)]
static TASK_FLAGS_OFFSET: u32 = 0;

/// Byte offset of `nvcsw` in `struct task_struct` (`nivcsw` follows), from the kernel's BTF
/// (0: unknown, and then sends are stamped when they end).
#[unsafe(no_mangle)]
static TASK_SWITCHES_OFFSET: u32 = 0;

/// How many times the current thread has been switched out.
#[inline(always)]
fn switches(task: u64) -> Option<u64> {
    // SAFETY: a read-only global patched by the loader (frozen, so the verifier knows the
    // offset); the task is a BTF-typed pointer, whose loads the verifier checks and guards.
    unsafe {
        let off = read_volatile(&TASK_SWITCHES_OFFSET) as u64;
        if off == 0 {
            return None;
        }
        let p = (task + off) as *const u64;
        Some(read_volatile(p).wrapping_add(read_volatile(p.add(1))))
    }
}

/// `tcp:tcp_sendmsg_locked` fires before a TCP send copies or transmits anything: the moment a
/// writer hands its bytes over. It fires again for each segment of a long send: the first
/// stamp stays unless the thread has been switched out since (it may be another send's, left
/// on this CPU when that send slept and ended elsewhere).
#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_send_start(_ctx: RawTracePointContext) -> i32 {
    stamp_send_start();
    0
}

/// The same stamp where that tracepoint is missing (before Linux 6.3), at `tcp_sendmsg`'s
/// entry, for the fentry data path.
#[fentry(function = "tcp_sendmsg")]
pub fn fentry_tcp_send_start(_ctx: FEntryContext) -> i32 {
    stamp_send_start();
    0
}

#[inline(always)]
fn stamp_send_start() {
    let id = bpf_get_current_pid_tgid();
    let Some(switches) = switches(current_task()) else {
        return;
    };
    if let Some(slot) = SEND_START.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; programs do not nest on one CPU for this tracepoint.
        unsafe {
            if (*slot).pid_tgid != id || (*slot).switches != switches {
                *slot = SendStart {
                    pid_tgid: id,
                    ts_ns: bpf_ktime_get_ns(),
                    switches,
                };
            }
        }
    }
}

#[inline(always)]
fn tp_ret(ctx: &TracePointContext) -> i32 {
    // SAFETY: offset from the tracepoint's format, checked by the loader.
    unsafe { ctx.read_at::<i32>(LEN_RET) }.unwrap_or(-1)
}

/// The raw tracepoint's arguments, `(struct sock *sk, int ret, int flags)`: no trace record is
/// built; family and protocol are read from the socket.
#[inline(always)]
fn from_raw(ctx: &RawTracePointContext) -> Record {
    from_sk(ctx.arg(0), ctx.arg::<u64>(2) as i32)
}

/// The BTF tracepoint's arguments: `sk` is a typed pointer, so family and protocol are plain
/// guarded loads rather than two helper calls.
#[inline(always)]
fn from_btf(ctx: &BtfTracePointContext) -> Record {
    let sk = ctx.arg::<*const u8>(0);
    // SAFETY: a read-only global patched by the loader (frozen: the verifier knows it); loads
    // through the BTF-typed socket pointer are checked against `struct sock` and guarded.
    unsafe {
        let off = read_volatile(&SK_PROTOCOL_OFFSET) as usize;
        Record {
            sk: sk as u64,
            flags: ctx.arg::<u64>(2) as i32,
            family: read_volatile(sk.add(SKC_FAMILY as usize).cast::<u16>()),
            protocol: read_volatile(sk.add(off).cast::<u16>()),
        }
    }
}

/// `tcp_sendmsg(sk, msg, size)` / `tcp_recvmsg(sk, msg, len, [nonblock,] flags, [addr_len])`
/// at their exit: `sk` is typed as for the BTF tracepoints.
#[inline(always)]
fn from_fexit(ctx: &FExitContext, flags: i32) -> Record {
    let sk = ctx.arg::<*const u8>(0);
    // SAFETY: as in `from_btf`.
    unsafe {
        let off = read_volatile(&SK_PROTOCOL_OFFSET) as usize;
        Record {
            sk: sk as u64,
            flags,
            family: read_volatile(sk.add(SKC_FAMILY as usize).cast::<u16>()),
            protocol: read_volatile(sk.add(off).cast::<u16>()),
        }
    }
}

/// Taken whatever this send turns out to be, so that it never outlives its call; used only if
/// the thread ran without a switch since it was stamped (so on this CPU, in this call). 0: none
/// (a plain value, not an Option: LLVM reads an Option's payload whether or not it is there,
/// and verifiers before 6.x refuse a read of stack never written).
#[inline(always)]
fn take_send_start(id: u64, task: u64) -> u64 {
    let Some(slot) = SEND_START.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, as above.
    unsafe {
        if (*slot).pid_tgid != id {
            return 0;
        }
        (*slot).pid_tgid = 0;
        match switches(task) {
            Some(now) if (*slot).switches == now => (*slot).ts_ns,
            _ => 0,
        }
    }
}

/// The current task, as the BTF-typed pointer the programs read it through.
#[inline(always)]
fn current_task() -> u64 {
    // SAFETY: helper without preconditions.
    unsafe { bpf_get_current_task_btf() as u64 }
}

/// A send: its start stamp is taken (whatever the send turns out to be) before its bytes.
#[inline(always)]
fn on_send<S: Store>(ret: i32, record: impl FnOnce() -> Record) {
    let (id, task) = (bpf_get_current_pid_tgid(), current_task());
    let started = take_send_start(id, task);
    on_data::<S>(ret, id, task, DIR_EGRESS, started, record);
}

/// A receive: its bytes are there when it returns.
#[inline(always)]
fn on_recv<S: Store>(ret: i32, record: impl FnOnce() -> Record) {
    let id = bpf_get_current_pid_tgid();
    on_data::<S>(ret, id, current_task(), DIR_INGRESS, 0, record);
}

#[tracepoint(category = "sock", name = "sock_send_length")]
pub fn sock_send_data(ctx: TracePointContext) -> u32 {
    on_send::<ByAddress>(tp_ret(&ctx), || from_tracepoint(&ctx));
    0
}

#[tracepoint(category = "sock", name = "sock_recv_length")]
pub fn sock_recv_data(ctx: TracePointContext) -> u32 {
    on_recv::<ByAddress>(tp_ret(&ctx), || from_tracepoint(&ctx));
    0
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn btf_sock_send(ctx: BtfTracePointContext) -> i32 {
    on_send::<InSocket>(ctx.arg::<u64>(1) as i32, || from_btf(&ctx));
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn btf_sock_recv(ctx: BtfTracePointContext) -> i32 {
    on_recv::<InSocket>(ctx.arg::<u64>(1) as i32, || from_btf(&ctx));
    0
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn raw_sock_send(ctx: RawTracePointContext) -> i32 {
    on_send::<ByAddress>(ctx.arg::<u64>(1) as i32, || from_raw(&ctx));
    0
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn raw_sock_recv(ctx: RawTracePointContext) -> i32 {
    on_recv::<ByAddress>(ctx.arg::<u64>(1) as i32, || from_raw(&ctx));
    0
}

/// Which argument of `tcp_recvmsg` is `flags`, from the kernel's BTF: its arguments changed
/// (`nonblock` went in 5.19, `addr_len` later), so the return value and flags are read through
/// the helpers (5.17+), which take the index at run time.
#[unsafe(no_mangle)]
static TCP_RECVMSG_FLAGS_ARG: u32 = 3;

/// The fentry data path (kernels before 6.3, which have no `sock_*_length`): `tcp_sendmsg` and
/// `tcp_recvmsg` at their exit, with the same work as the socket path.
#[fexit(function = "tcp_sendmsg")]
pub fn fexit_tcp_send(ctx: FExitContext) -> i32 {
    on_send::<InSocket>(ctx.arg::<u64>(3) as i32, || from_fexit(&ctx, 0));
    0
}

#[fexit(function = "tcp_recvmsg")]
pub fn fexit_tcp_recv(ctx: FExitContext) -> i32 {
    // An error of the helper (none: the program is an fexit) reads as a failed call.
    let ret = ctx.ret::<u64>().unwrap_or(u64::MAX) as i32;
    on_recv::<InSocket>(ret, || {
        let mut flags = 0u64;
        // SAFETY: the helper checks the index against the function's arity; `flags` is ours.
        unsafe {
            let n = read_volatile(&TCP_RECVMSG_FLAGS_ARG);
            bpf_get_func_arg(ctx.as_ptr(), n, &raw mut flags);
        }
        from_fexit(&ctx, flags as i32)
    });
    0
}

/// `tcp_sendpage(sk, page, offset, size, flags)` (until 6.5, when splice moved to
/// `tcp_sendmsg`): sendfile's bytes, which no user buffer holds, so that the daemon's place in
/// the stream (an HTTP/2 connection's frames above all) stays right.
#[fexit(function = "tcp_sendpage")]
pub fn fexit_tcp_sendpage(ctx: FExitContext) -> i32 {
    on_send::<InSocket>(ctx.arg::<u64>(5) as i32, || from_fexit(&ctx, 0));
    0
}

/// `tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len)`, as it was until 5.19: read
/// directly, for kernels without the argument helpers (before 5.17).
#[fexit(function = "tcp_recvmsg")]
pub fn fexit_tcp_recv_nonblock(ctx: FExitContext) -> i32 {
    on_recv::<InSocket>(ctx.arg::<u64>(6) as i32, || {
        from_fexit(&ctx, ctx.arg::<u64>(4) as i32)
    });
    0
}

/// The first bytes the current send call hands over (from its registers, as below).
#[inline(always)]
fn send_head(task: u64, sk: u64) -> Option<[u8; 3]> {
    // SAFETY: as for the registers read in `on_data`.
    let (cs, nr, buf, len) = unsafe {
        let regs = bpf_task_pt_regs(task as *mut _) as u64;
        let reg = |off: u64| read_volatile((regs + off) as *const u64);
        let cs = read_volatile((regs + REGS_CS) as *const u16);
        (cs, reg(REGS_ORIG_AX), reg(REGS_SI), reg(REGS_DX))
    };
    let (kind, direction) = traced(nr).filter(|_| cs & 3 == 3)?;
    let args = SyscallArgs {
        buf,
        len,
        ts_enter: 0,
        sk,
        kind,
        direction,
        goroutine: 0,
        fd: 0,
        flags: 0,
    };
    first_bytes::<3>(&args)
}

#[inline(always)]
fn on_data<S: Store>(
    ret: i32,
    id: u64,
    task: u64,
    direction: u32,
    started: u64,
    record: impl FnOnce() -> Record,
) {
    // A read of 0 bytes is end of stream: sent (without payload) so that responses framed by
    // the connection's close can end. Errors (EAGAIN above all) end here.
    if ret < 0 || (ret == 0 && direction == DIR_EGRESS) || (id >> 32) as u32 == tracer_tgid() {
        return;
    }
    let r = record();
    // Go's crypto/tls keys its calls by goroutine: R14 at the syscall (Go's register ABI).
    // SAFETY: as for the registers read below.
    let goroutine = || unsafe {
        let regs = bpf_task_pt_regs(task as *mut _) as u64;
        read_volatile((regs + REGS_R14) as *const u64)
    };
    if super::tls::claim::<S>(id, &r, goroutine) {
        return;
    }
    if direction == DIR_EGRESS && super::tls::bind_after::<S>(id, &r, || send_head(task, r.sk)) {
        return;
    }
    let Some(lookup) = traced_socket::<S>(&r, direction) else {
        return;
    };
    let sk = r.sk;
    // io_uring workers carry their creator's registers, kernel threads none: their bytes are
    // not a syscall's buffer. Offset 0: BTF did not say; `cs` below still catches kernel threads.
    // SAFETY: as in `switches`.
    let flags_off = unsafe { read_volatile(&TASK_FLAGS_OFFSET) } as u64;
    if flags_off != 0
        && unsafe { read_volatile((task + flags_off) as *const u32) } & (PF_IO_WORKER | PF_KTHREAD)
            != 0
    {
        count(KernelStat::OtherSyscall);
        return;
    }
    // SAFETY: `bpf_task_pt_regs` gives a BTF-typed pointer to the current task's registers:
    // the verifier checks each load against `struct pt_regs` and guards it (a plain load, not a
    // helper call per register).
    let (cs, nr, buf, len, r14) = unsafe {
        let regs = bpf_task_pt_regs(task as *mut _) as u64;
        let reg = |off: u64| read_volatile((regs + off) as *const u64);
        // `cs` is a union since 6.9 (with FRED's `csx`): its low 16 bits read the same in every
        // layout.
        let cs = read_volatile((regs + REGS_CS) as *const u16);
        (
            cs,
            reg(REGS_ORIG_AX),
            reg(REGS_SI),
            reg(REGS_DX),
            reg(REGS_R14),
        )
    };
    // Kernel threads (no user registers), io_uring, splice, sendmmsg: bytes this path cannot
    // read; counted.
    let Some((kind, dir)) = traced(nr).filter(|_| cs & 3 == 3) else {
        count(KernelStat::OtherSyscall);
        return;
    };
    if dir != direction {
        count(KernelStat::OtherSyscall);
        return;
    }
    let args = SyscallArgs {
        buf,
        len,
        // 0: stamped when the event is built (a read's bytes are there when it returns).
        ts_enter: started,
        sk,
        kind,
        direction,
        // In a Go program, the goroutine (R14 under Go's register ABI, also at its syscalls).
        goroutine: if direction == DIR_EGRESS {
            go_on_behalf(id >> 32, r14)
        } else {
            r14
        },
        fd: 0,
        flags: 0,
    };
    emit_data::<S, true>(&args, ret as u64, id, lookup);
}
