//! What both data paths share: which syscalls are traced, where their user buffers are, and
//! building and sending a data event.
use core::{hint::black_box, ptr::write_volatile};

use aya_ebpf::helpers::generated::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_ktime_get_ns, bpf_probe_read_user,
};
use tracer_common::{
    DATA_EVENT_FIXED, DIR_EGRESS, DIR_INGRESS, DataEvent, EventKind, FLAG_IOVEC, FLAG_TASK_KNOWN,
    FLAG_TUPLE_FROM_SOCK, KernelStat, PAYLOAD_CAP, REQUEST_STARTS, TAIL_LEN, TASK_RESEND,
};

use crate::maps::{
    EVENTS, KIND_BUF, KIND_IOV, KIND_MSG, KIND_NONE, SCRATCH, SyscallArgs, count, wakeup_flags,
};

use super::sock::{Lookup, Store, next_event};

/// Offset of `msg_iov` in `struct user_msghdr`, `msg_iovlen` right after it (x86_64 and arm64
/// alike).
const MSGHDR_IOV: u64 = 16;

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
/// the second and third syscall arguments, the syscall number, and the code segment (whose low
/// two bits are 3 when the registers are a user program's).
pub const REGS_SI: u64 = 13 * 8;
pub const REGS_DX: u64 = 12 * 8;
pub const REGS_ORIG_AX: u64 = 15 * 8;
pub const REGS_CS: u64 = 17 * 8;

/// What a syscall number is to the tracer: its kind of buffer and direction.
#[inline(always)]
pub fn traced(nr: u64) -> Option<(u32, u32)> {
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

/// Iovecs copied from one call, the first included: enough for the pieces a server writes a
/// chunked response in (node.js: size, CRLF, data, CRLF per chunk, then the last chunk), whose
/// end the daemon must see.
const MAX_IOVECS: u64 = 16;

/// Where a call's bytes are: its first buffer and, for the iovec calls, the second one and the
/// array they came from.
struct Buffers {
    base: u64,
    len: u64,
    second: (u64, u64),
    iov: u64,
    count: u64,
}

/// The call's first user buffers.
#[inline(always)]
fn buffers(args: &SyscallArgs) -> Option<Buffers> {
    let (iov, count) = match args.kind {
        KIND_BUF => {
            return Some(Buffers {
                base: args.buf,
                len: args.len,
                second: (0, 0),
                iov: 0,
                count: 1,
            });
        }
        KIND_IOV => (args.buf, args.len),
        KIND_MSG => {
            // SAFETY: `msg_iov` and `msg_iovlen` (adjacent) read through the checked helper.
            let [iov, iovlen] = unsafe {
                aya_ebpf::helpers::bpf_probe_read_user((args.buf + MSGHDR_IOV) as *const [u64; 2])
            }
            .ok()?;
            (iov, iovlen)
        }
        _ => return None,
    };
    if count == 0 {
        return None;
    }
    // `struct iovec { void *base; size_t len; }`: the first two read in one call when there
    // are two (a head and its body, as nginx writes them).
    let (first, second) = if count >= 2 {
        // SAFETY: user memory read through the checked helper.
        let [b0, l0, b1, l1] =
            unsafe { aya_ebpf::helpers::bpf_probe_read_user(iov as *const [u64; 4]) }.ok()?;
        ((b0, l0), (b1, l1))
    } else {
        (read_iovec(iov)?, (0, 0))
    };
    Some(Buffers {
        base: first.0,
        len: first.1,
        second,
        iov,
        count,
    })
}

#[inline(always)]
fn read_iovec(iov: u64) -> Option<(u64, u64)> {
    // SAFETY: `struct iovec` read through the checked helper, in one call.
    let [base, len] =
        unsafe { aya_ebpf::helpers::bpf_probe_read_user(iov as *const [u64; 2]) }.ok()?;
    Some((base, len))
}

/// Copies the iovecs after the first into `payload` from `off` (where the first ended), until
/// `limit` bytes (the call's bytes, at most PAYLOAD_CAP) or MAX_IOVECS; returns the new end.
/// A body written in pieces (node.js writes a chunk's size, data and CRLF as three) is then
/// seen as the stream the peer reads, up to its end.
#[inline(always)]
fn gather(payload: *mut u8, b: &Buffers, mut off: u64, limit: u64) -> u64 {
    let (mut base, mut len) = b.second;
    let mut i: u64 = 1;
    while i < MAX_IOVECS && off < limit {
        if len > 0 {
            let want = if len < limit - off { len } else { limit - off };
            // The masks are no-ops (off < limit <= PAYLOAD_CAP, want in [1, PAYLOAD_CAP]) that
            // the verifier needs; black_box keeps LLVM from proving them so.
            let o = black_box(off) & (PAYLOAD_CAP as u64 - 1);
            let n = ((black_box(want) - 1) & (PAYLOAD_CAP as u64 - 1)) + 1;
            // SAFETY: at most 2 * PAYLOAD_CAP - 1 bytes past the payload's start, inside the
            // scratch (payload then spill); `base` is user memory read through the checked
            // helper.
            let rc = unsafe {
                bpf_probe_read_user(payload.add(o as usize).cast(), n as u32, base as *const _)
            };
            if rc != 0 {
                break;
            }
            off = o + n;
        }
        i += 1;
        if i >= b.count || i >= MAX_IOVECS || off >= limit {
            break;
        }
        let Some((nb, nl)) = read_iovec(b.iov + 16 * i) else {
            break;
        };
        (base, len) = (nb, nl);
    }
    off
}

#[inline(always)]
pub fn emit_data<S: Store>(args: &SyscallArgs, ret: u64, id: u64, lookup: Lookup) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU scratch slot is ours until this program returns.
    let ev: &mut DataEvent = unsafe { &mut (*scratch).ev };
    let next = next_event::<S>(args.sk, lookup);
    let (meta, payload) = (&mut ev.meta, &mut ev.payload);

    meta.hdr.kind = EventKind::Data as u32;
    meta.hdr.flags = 0;
    // A send stamped when it began is timed by that (the daemon times a send by its start, a
    // read by its return): no second clock read, ~50 ns here.
    // SAFETY: helper without preconditions.
    meta.hdr.ts_ns = if args.ts_enter != 0 && args.direction == DIR_EGRESS {
        args.ts_enter
    } else {
        unsafe { bpf_ktime_get_ns() }
    };
    meta.hdr.pid_tgid = id;
    // Name and cgroup are two helper calls and 24 bytes per event: sent when the socket's last
    // delivered event came from another thread, and every TASK_RESEND events.
    // SAFETY: the map value stays valid while this program runs.
    let task_known =
        next.state.is_some_and(|s| unsafe { (*s).task } == id) && next.seq & (TASK_RESEND - 1) != 0;
    let comm = meta.hdr.comm.as_mut_ptr();
    // Word stores: LLVM would make these zeroings calls to a byte-at-a-time memset.
    // SAFETY: `comm` is 16 bytes at an 8-byte aligned offset of the scratch event.
    let zero_comm = || unsafe {
        write_volatile(comm.cast::<u64>(), 0);
        write_volatile(comm.cast::<u64>().add(1), 0);
    };
    if task_known {
        meta.hdr.flags = FLAG_TASK_KNOWN;
        // SAFETY: a field of the scratch event.
        unsafe { write_volatile(&mut meta.hdr.cgroup_id, 0) };
        zero_comm();
    } else {
        // SAFETY: helpers; the name is written straight into the event's 16 bytes.
        unsafe {
            meta.hdr.cgroup_id = bpf_get_current_cgroup_id();
            if bpf_get_current_comm(comm.cast(), 16) != 0 {
                zero_comm();
            }
        }
    }
    meta.sk = args.sk;
    meta.ts_enter_ns = if args.ts_enter == 0 {
        meta.hdr.ts_ns
    } else {
        args.ts_enter
    };
    meta.direction = args.direction;
    meta.bytes = if ret > u32::MAX as u64 {
        u32::MAX
    } else {
        ret as u32
    };

    meta.tuple = next.tuple;
    meta.seq = next.seq;
    if next.from_sock {
        meta.hdr.flags |= FLAG_TUPLE_FROM_SOCK;
    }
    if args.kind == KIND_IOV || args.kind == KIND_MSG {
        meta.hdr.flags |= FLAG_IOVEC;
    }

    let mut captured: u64 = 0;
    meta.tail_len = 0;
    if let Some(b) = buffers(args) {
        let src = b.base;
        let avail = if b.len < ret { b.len } else { ret };
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
        if captured == avail && captured < ret && b.count > 1 {
            let limit = if ret < PAYLOAD_CAP as u64 {
                ret
            } else {
                PAYLOAD_CAP as u64
            };
            captured = gather(payload.as_mut_ptr(), &b, captured, limit);
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
        // Only a delivered event teaches the reader the thread's name.
        if let Some(state) = next.state.filter(|_| !task_known) {
            // SAFETY: as above.
            unsafe { (*state).task = id };
        }
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
