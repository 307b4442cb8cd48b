//! `syscalls:sys_enter_*` / `sys_exit_*` for the read/write/send/recv/readv/writev/sendmsg/recvmsg
//! family: enter stores the user buffer, exit copies its first bytes once `sock_*_length` has
//! named a TCP socket (so files, pipes and UDP cost one map write and one delete).
use core::hint::black_box;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns, bpf_probe_read_user},
    },
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use tracer_common::{
    DATA_EVENT_FIXED, DIR_EGRESS, DIR_INGRESS, DataEvent, EventKind, FLAG_IOVEC,
    FLAG_TUPLE_FROM_SOCK, KernelStat, PAYLOAD_CAP, REQUEST_STARTS, TAIL_LEN,
};

use crate::maps::{
    ACTIVE, EVENTS, KIND_BUF, KIND_IOV, KIND_MSG, KIND_NONE, SCRATCH, SyscallArgs, count,
    tracer_tgid, wakeup_flags,
};

use super::sock::next_event;

/// Offsets in the syscall tracepoint records (`.../syscalls/sys_enter_*/format`): every
/// argument is 8 bytes wide after the 16-byte header.
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

/// Offset of `msg_iov` and `msg_iovlen` in `struct user_msghdr` (x86_64 and arm64 alike).
const MSGHDR_IOV: u64 = 16;
const MSGHDR_IOVLEN: u64 = 24;

macro_rules! enter_exit {
    ($enter:ident, $exit:ident, $kind:expr, $dir:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            enter_tp(&ctx, $kind, $dir);
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
enter_exit!(sys_enter_recvfrom, sys_exit_recvfrom, KIND_BUF, DIR_INGRESS);
enter_exit!(sys_enter_readv, sys_exit_readv, KIND_IOV, DIR_INGRESS);
enter_exit!(sys_enter_recvmsg, sys_exit_recvmsg, KIND_MSG, DIR_INGRESS);

/// x86_64 numbers of the traced syscalls (arch/x86/entry/syscalls/syscall_64.tbl).
const NR_READ: u64 = 0;
const NR_WRITE: u64 = 1;
const NR_READV: u64 = 19;
const NR_WRITEV: u64 = 20;
const NR_SENDFILE: u64 = 40;
const NR_SENDTO: u64 = 44;
const NR_RECVFROM: u64 = 45;
const NR_SENDMSG: u64 = 46;
const NR_RECVMSG: u64 = 47;

/// Offsets in x86_64 `struct pt_regs` (part of the user ABI: ptrace's `user_regs_struct`):
/// the second and third syscall arguments, and the syscall number.
const REGS_SI: u64 = 13 * 8;
const REGS_DX: u64 = 12 * 8;
const REGS_ORIG_AX: u64 = 15 * 8;

/// What a syscall number is to the tracer: its kind of buffer and direction.
#[inline(always)]
fn traced(nr: u64) -> Option<(u32, u32)> {
    match nr {
        NR_WRITE | NR_SENDTO => Some((KIND_BUF, DIR_EGRESS)),
        NR_WRITEV => Some((KIND_IOV, DIR_EGRESS)),
        NR_SENDMSG => Some((KIND_MSG, DIR_EGRESS)),
        NR_SENDFILE => Some((KIND_NONE, DIR_EGRESS)),
        NR_READ | NR_RECVFROM => Some((KIND_BUF, DIR_INGRESS)),
        NR_READV => Some((KIND_IOV, DIR_INGRESS)),
        NR_RECVMSG => Some((KIND_MSG, DIR_INGRESS)),
        _ => None,
    }
}

/// `raw_tp/sys_enter` (x86_64): one attachment for every syscall instead of eighteen
/// tracepoints, and no perf record built per call. Untraced syscalls return after a compare.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn raw_sys_enter(ctx: RawTracePointContext) -> i32 {
    // TP_PROTO(struct pt_regs *regs, long id)
    let Some((kind, direction)) = traced(ctx.arg::<u64>(1)) else {
        return 0;
    };
    let regs: u64 = ctx.arg(0);
    // SAFETY: `regs` is the kernel's pt_regs of this syscall; reads are checked.
    let (buf, len) = unsafe {
        (
            bpf_probe_read_kernel((regs + REGS_SI) as *const u64).unwrap_or(0),
            bpf_probe_read_kernel((regs + REGS_DX) as *const u64).unwrap_or(0),
        )
    };
    enter(buf, len, kind, direction);
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
fn enter_tp(ctx: &TracePointContext, kind: u32, direction: u32) {
    // SAFETY: offsets from the tracepoint's format; read_at copies with probe_read_kernel.
    let (buf, len) = unsafe {
        (
            ctx.read_at::<u64>(ARG1).unwrap_or(0),
            ctx.read_at::<u64>(ARG2).unwrap_or(0),
        )
    };
    enter(buf, len, kind, direction);
}

#[inline(always)]
fn exit_tp(ctx: &TracePointContext) {
    // SAFETY: `ret` is at a fixed offset in every sys_exit record.
    exit(unsafe { ctx.read_at::<i64>(RET).unwrap_or(-1) });
}

#[inline(always)]
fn enter(buf: u64, len: u64, kind: u32, direction: u32) {
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
    };
    if ACTIVE.insert(&id, &args, 0).is_err() {
        count(KernelStat::ArgsMapFull);
    }
}

#[inline(always)]
fn exit(ret: i64) {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let args = match unsafe { ACTIVE.get(&id) } {
        Some(args) => *args,
        None => return,
    };
    let _ = ACTIVE.remove(&id);
    if args.sk == 0 {
        return;
    }
    // A read of 0 bytes is end of stream: sent (without payload) so that responses framed by
    // the connection's close can end.
    if ret < 0 || (ret == 0 && args.direction != DIR_INGRESS) {
        return;
    }
    emit_data(&args, ret as u64, id);
}

/// First user buffer of the call and its length.
#[inline(always)]
fn first_buffer(args: &SyscallArgs) -> Option<(u64, u64)> {
    match args.kind {
        KIND_BUF => Some((args.buf, args.len)),
        KIND_IOV => {
            if args.len == 0 {
                return None;
            }
            read_iovec(args.buf)
        }
        KIND_MSG => {
            // SAFETY: reads of user memory through the checked helper.
            let iov = unsafe {
                aya_ebpf::helpers::bpf_probe_read_user((args.buf + MSGHDR_IOV) as *const u64)
            }
            .ok()?;
            let iovlen = unsafe {
                aya_ebpf::helpers::bpf_probe_read_user((args.buf + MSGHDR_IOVLEN) as *const u64)
            }
            .ok()?;
            if iovlen == 0 {
                return None;
            }
            read_iovec(iov)
        }
        _ => None,
    }
}

#[inline(always)]
fn read_iovec(iov: u64) -> Option<(u64, u64)> {
    // SAFETY: `struct iovec { void *base; size_t len; }` read through the checked helper.
    let base = unsafe { aya_ebpf::helpers::bpf_probe_read_user(iov as *const u64) }.ok()?;
    let len = unsafe { aya_ebpf::helpers::bpf_probe_read_user((iov + 8) as *const u64) }.ok()?;
    Some((base, len))
}

#[inline(always)]
fn emit_data(args: &SyscallArgs, ret: u64, id: u64) {
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU scratch slot is ours until this program returns.
    let ev: &mut DataEvent = unsafe { &mut *ev };
    let (tuple, seq, from_sock) = next_event(args.sk);
    let (meta, payload) = (&mut ev.meta, &mut ev.payload);

    meta.hdr.kind = EventKind::Data as u32;
    meta.hdr.flags = 0;
    // SAFETY: helpers without preconditions.
    meta.hdr.ts_ns = unsafe { bpf_ktime_get_ns() };
    meta.hdr.pid_tgid = id;
    meta.hdr.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    meta.hdr.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    meta.sk = args.sk;
    meta.ts_enter_ns = args.ts_enter;
    meta.direction = args.direction;
    meta.bytes = if ret > u32::MAX as u64 {
        u32::MAX
    } else {
        ret as u32
    };

    meta.tuple = tuple;
    meta.seq = seq;
    if from_sock {
        meta.hdr.flags |= FLAG_TUPLE_FROM_SOCK;
    }
    if args.kind == KIND_IOV || args.kind == KIND_MSG {
        meta.hdr.flags |= FLAG_IOVEC;
    }

    let mut captured: u64 = 0;
    meta.tail_len = 0;
    if let Some((src, avail)) = first_buffer(args) {
        let avail = if avail < ret { avail } else { ret };
        let want = if avail < PAYLOAD_CAP as u64 {
            avail
        } else {
            PAYLOAD_CAP as u64
        };
        if want > 0 {
            // Provably in [1, PAYLOAD_CAP] for the verifier; black_box keeps LLVM from
            // dropping the mask it cannot see a use for.
            let n = black_box(((want - 1) & (PAYLOAD_CAP as u64 - 1)) + 1);
            // SAFETY: n <= PAYLOAD_CAP bytes into the payload array; src is user memory read
            // through the checked helper.
            let rc = unsafe {
                bpf_probe_read_user(payload.as_mut_ptr().cast(), n as u32, src as *const _)
            };
            if rc == 0 {
                captured = n;
            } else {
                count(KernelStat::PayloadReadFailed);
            }
        }
        if ret > captured && args.kind != KIND_NONE {
            count(KernelStat::PayloadTruncated);
            // The end of a single buffer shows whether a chunked body ended in it.
            if args.kind == KIND_BUF && captured > 0 && ret >= TAIL_LEN as u64 && avail == ret {
                // SAFETY: TAIL_LEN bytes into the tail array, from inside the user's buffer.
                let rc = unsafe {
                    bpf_probe_read_user(
                        meta.tail.as_mut_ptr().cast(),
                        TAIL_LEN as u32,
                        (src + ret - TAIL_LEN as u64) as *const _,
                    )
                };
                if rc == 0 {
                    meta.tail_len = TAIL_LEN as u32;
                }
            }
        }
    }
    meta.captured = captured as u32;

    let starts_request = captured >= 4 && {
        let head = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let mut found = false;
        let mut i = 0;
        while i < REQUEST_STARTS.len() {
            found |= head == REQUEST_STARTS[i];
            i += 1;
        }
        found
    };
    let size = black_box(DATA_EVENT_FIXED as u64 + (captured & (2 * PAYLOAD_CAP as u64 - 1)));
    let size = if size > core::mem::size_of::<DataEvent>() as u64 {
        core::mem::size_of::<DataEvent>() as u64
    } else {
        size
    };
    // SAFETY: `size` bytes from the start of the scratch event, which is at least that long.
    let bytes = unsafe {
        core::slice::from_raw_parts((ev as *const DataEvent).cast::<u8>(), size as usize)
    };
    if EVENTS.output::<[u8]>(bytes, wakeup_flags()).is_ok() {
        count(KernelStat::DataEvents);
    } else {
        count(KernelStat::RingbufFullData);
        // Say how many requests went with it: a lost event that starts a request line.
        if starts_request {
            count(if args.direction == DIR_INGRESS {
                KernelStat::LostRequestIngress
            } else {
                KernelStat::LostRequestEgress
            });
        }
    }
}
