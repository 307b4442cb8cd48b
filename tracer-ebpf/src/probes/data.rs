//! What both data paths share: which syscalls are traced, where their user buffers are, and
//! building and sending a data event.
use core::{
    hint::black_box,
    ptr::{read_unaligned, read_volatile, write_unaligned, write_volatile},
};

use aya_ebpf::{
    cty::c_void,
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_ktime_get_ns, bpf_loop,
        bpf_probe_read_user,
    },
};
use tracer_common::{
    CARRY_SPLIT, CARRY_UNKNOWN, DATA_EVENT_FIXED, DIR_EGRESS, DIR_INGRESS, DataEvent, EventKind,
    FLAG_FRAMES_CONT, FLAG_FRAMES_MORE, FLAG_H2_CLIENT, FLAG_H2_SERVER, FLAG_IOVEC,
    FLAG_TASK_KNOWN, FLAG_TLS, FLAG_TUPLE_FROM_SOCK, FRAME_KEEP_CAP, FRAMES_CAP, H2_CLIENT,
    H2_SERVER, KernelStat, MAX_FRAMES_WALKED, PAYLOAD_CAP, REQUEST_STARTS, RESPONSE_START,
    SEGMENT_HEADER, SockState, TAIL_LEN, TASK_RESEND, TRIM_CAP, lost_requests,
};

use crate::maps::{
    BPF_RB_NO_WAKEUP, KIND_BUF, KIND_IOV, KIND_MSG, KIND_NONE, SCRATCH, Scratch, SyscallArgs,
    TailFind, count, has_bpf_loop, ring, wakeup_flags,
};

use super::sock::{Lookup, NextEvent, Store, first_seq, framing, next_event, one_at_a_time};

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
pub const NR_RECVFROM: u64 = 45;
const NR_SENDMSG: u64 = 46;
pub const NR_RECVMSG: u64 = 47;

/// Offsets in x86_64 `struct pt_regs` (part of the user ABI: ptrace's `user_regs_struct`):
/// the second and third syscall arguments, the syscall number, the code segment (whose low
/// two bits are 3 when the registers are a user program's), and R14 (Go's goroutine).
pub const REGS_SI: u64 = 13 * 8;
/// The first and fourth syscall arguments (the descriptor; recvfrom's flags).
pub const REGS_DI: u64 = 14 * 8;
pub const REGS_R10: u64 = 7 * 8;
pub const REGS_R14: u64 = 8;
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

/// The first `N` bytes a call's buffers hold (from its first buffer only).
#[inline(always)]
pub fn first_bytes<const N: usize>(args: &SyscallArgs) -> Option<[u8; N]> {
    let b = buffers(args)?;
    if b.len < N as u64 {
        return None;
    }
    // SAFETY: user memory read through the checked helper.
    unsafe { aya_ebpf::helpers::bpf_probe_read_user(b.base as *const [u8; N]) }.ok()
}

#[inline(always)]
fn read_iovec(iov: u64) -> Option<(u64, u64)> {
    // SAFETY: `struct iovec` read through the checked helper, in one call.
    let [base, len] =
        unsafe { aya_ebpf::helpers::bpf_probe_read_user(iov as *const [u64; 2]) }.ok()?;
    Some((base, len))
}

/// Copies the iovecs after the first into `payload` from `off` (where the first ended), until
/// `limit` bytes (the call's bytes, at most PAYLOAD_CAP) or MAX_IOVECS; returns the new end and
/// the iovec it stopped at. A body written in pieces (node.js writes a chunk's size, data and
/// CRLF as three) is then seen as the stream the peer reads, up to its end.
///
/// Unrolled by hand rather than a loop: verifiers before 6.3 refuse a loop LLVM lays out to be
/// entered by falling through, and a kernel before 5.17 has no `bpf_loop`.
// The last step's read of a next iovec is never used.
#[allow(unused_assignments)]
#[inline(always)]
fn gather(payload: *mut u8, b: &Buffers, off: u64, limit: u64) -> (u64, u64) {
    let (mut base, mut len) = b.second;
    let mut off = off;
    // Iovec `i` (in `base`, `len`): copied, then the next one read.
    macro_rules! step {
        ($i:expr) => {
            if off >= limit {
                return (off, $i);
            }
            if len > 0 {
                let want = if len < limit - off { len } else { limit - off };
                // The masks are no-ops (off < limit <= PAYLOAD_CAP, want in [1, PAYLOAD_CAP])
                // that the verifier needs; black_box keeps LLVM from proving them so.
                let o = black_box(off) & (PAYLOAD_CAP as u64 - 1);
                let n = ((black_box(want) - 1) & (PAYLOAD_CAP as u64 - 1)) + 1;
                // SAFETY: at most 2 * PAYLOAD_CAP - 1 bytes past the payload's start, inside
                // the scratch (payload then spill); `base` is user memory read through the
                // checked helper.
                let rc = unsafe {
                    bpf_probe_read_user(payload.add(o as usize).cast(), n as u32, base as *const _)
                };
                if rc != 0 {
                    return (off, $i);
                }
                off = o + n;
            }
            if $i + 1 >= b.count || $i + 1 >= MAX_IOVECS || off >= limit {
                return (off, $i + 1);
            }
            let Some((nb, nl)) = read_iovec(b.iov + 16 * ($i + 1)) else {
                return (off, $i + 1);
            };
            (base, len) = (nb, nl);
        };
    }
    step!(1);
    step!(2);
    step!(3);
    step!(4);
    step!(5);
    step!(6);
    step!(7);
    step!(8);
    step!(9);
    step!(10);
    step!(11);
    step!(12);
    step!(13);
    step!(14);
    step!(15);
    (off, MAX_IOVECS)
}

/// The first 8 bytes of the HTTP/2 client preface, as a little-endian u64.
const PREFACE_START: u64 = u64::from_le_bytes(*b"PRI * HT");
/// The whole preface's length: the first frame follows it.
const PREFACE_LEN: u64 = 24;
/// `HTTP/1.1 101`, as a little-endian u64 and u32, and its length.
const SWITCHING_START: u64 = u64::from_le_bytes(*b"HTTP/1.1");
const SWITCHING_CODE: u32 = u32::from_le_bytes(*b" 101");
const SWITCHING_LEN: u64 = 12;
/// HTTP/2 frame header length, and the frame types that carry a header block.
const FRAME_HEADER: u64 = 9;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_PUSH_PROMISE: u8 = 0x5;
const FRAME_CONTINUATION: u8 = 0x9;
const FRAME_RST_STREAM: u8 = 0x3;
const FRAME_GOAWAY: u8 = 0x7;
/// Highest frame type taken for one while walking (RFC 9113's ten, and the extensions up to
/// PRIORITY_UPDATE, 0x10).
const FRAME_TYPE_MAX: u8 = 0x10;

/// Walks an HTTP/2 call's frames (a single buffer of `ret` bytes at `buf`; the first frame
/// header at `start`) and writes a segment for each frame that ends past the `captured`
/// payload: its header, and the start of its header block if it has one. A read of 16 KiB of
/// responses holds many frames whose headers the payload alone would miss, and HPACK needs
/// every header block. Returns the segments' length and where the next call's first frame
/// begins (`CARRY_UNKNOWN` when the walk stopped short: frame header split across calls, too
/// many frames, or no room).
///
/// A `bpf_loop` whose callback keeps its state in the scratch: the verifier checks one step,
/// not every turn of an unrolled loop (which took it past its million instructions).
#[inline(always)]
fn walk_frames(s: *mut Scratch, buf: u64, ret: u64, start: u64, captured: u64) -> (u64, u32) {
    // SAFETY: the per-CPU scratch is ours until this program returns; the helper takes a
    // callback of the signature it expects.
    unsafe {
        write_volatile(&mut (*s).walk.buf, buf);
        bpf_loop(
            MAX_FRAMES_WALKED,
            begin_walk(s, start, ret, captured, walk_step as *mut c_void),
            core::ptr::null_mut(),
            0,
        );
        end_walk(s, ret)
    }
}

/// Sets up a walk of a call of `ret` bytes from `start`; returns `step`, for `bpf_loop`.
#[inline(always)]
fn begin_walk(
    s: *mut Scratch,
    start: u64,
    ret: u64,
    captured: u64,
    step: *mut c_void,
) -> *mut c_void {
    // SAFETY: the per-CPU scratch is ours until this program returns.
    unsafe {
        let w = &mut (*s).walk;
        write_volatile(&mut w.at, start);
        write_volatile(&mut w.len, 0);
        write_volatile(&mut w.ret, ret);
        write_volatile(&mut w.captured, captured);
        write_volatile(&mut w.done, 0);
    }
    step
}

/// What a walk left: the segments' length, and where the next call's first frame begins
/// (`CARRY_UNKNOWN` unless the walk reached the call's end).
#[inline(always)]
fn end_walk(s: *mut Scratch, ret: u64) -> (u64, u32) {
    // SAFETY: as in `begin_walk`.
    unsafe {
        let w = &(*s).walk;
        let o = read_volatile(&w.at);
        let done = read_volatile(&w.done);
        let carry = if done == 2 {
            read_volatile(&w.split) as u32
        } else if done != 0 && o - ret < CARRY_SPLIT as u64 {
            (o - ret) as u32
        } else {
            CARRY_UNKNOWN
        };
        (read_volatile(&w.len), carry)
    }
}

/// One frame of `walk_frames`: 0 to go on, 1 to stop. Out of room for segments, it goes on
/// without writing, so that where the next call's first frame begins stays known.
extern "C" fn walk_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: the per-CPU scratch is ours until this program returns; every offset into it is
    // masked below its array's size, and the arrays after it (spill) take what a copy may run
    // past; user memory is read through the checked helper.
    unsafe {
        let walk = &raw mut (*s).walk;
        let (o, w) = (
            read_volatile(&raw const (*walk).at),
            read_volatile(&raw const (*walk).len),
        );
        if w >= FRAMES_CAP as u64 {
            // The segments so far go out, and this frame is looked at again at the next step
            // (going on here would double the paths the verifier walks after this point).
            return if flush_segments(s, w) { 0 } else { 1 };
        }
        let (buf, ret, captured) = (
            read_volatile(&raw const (*walk).buf),
            read_volatile(&raw const (*walk).ret),
            read_volatile(&raw const (*walk).captured),
        );
        if o >= ret {
            write_volatile(&raw mut (*walk).done, 1);
            return 1;
        }
        if o + FRAME_HEADER > ret {
            split_header(s, o, ret, captured, buf + o);
            return 1;
        }
        let Some((len, kind)) = frame_header(s, o, captured, buf + o) else {
            return 1;
        };
        let body = o + FRAME_HEADER;
        let end = body + len;
        let in_call = if end < ret { end } else { ret };
        if in_call > captured && w < FRAMES_CAP as u64 {
            let w = black_box(w) & (FRAMES_CAP as u64 - 1);
            let seg = begin_segment(s, w, o);
            let mut keep = 0;
            if keeps_payload(kind) && len > 0 && body < ret {
                let avail = if len < ret - body { len } else { ret - body };
                let cap = keep_cap(kind);
                let want = if avail < cap { avail } else { cap };
                // In [1, FRAME_KEEP_CAP] for the verifier, as in `emit_data`.
                let n = black_box(((want - 1) & (FRAME_KEEP_CAP as u64 - 1)) + 1);
                if bpf_probe_read_user(
                    seg.add(SEGMENT_HEADER + FRAME_HEADER as usize).cast(),
                    n as u32,
                    (buf + body) as *const _,
                ) == 0
                {
                    keep = n;
                }
            }
            write_unaligned(seg.add(4).cast::<u32>(), (FRAME_HEADER + keep) as u32);
            write_volatile(
                &raw mut (*walk).len,
                w + SEGMENT_HEADER as u64 + FRAME_HEADER + keep,
            );
        }
        write_volatile(&raw mut (*walk).at, end);
        0
    }
}

/// The call ends inside the frame header at offset `o` (a writer that flushes a buffer, as
/// Go's bufio does, splits frames anywhere): its bytes here go in a segment of their own when
/// they are past the payload (the daemon joins them to the rest, at the next call's start),
/// and the carry says where the next call's first frame begins: known when this call holds
/// the frame's length, else from the length bytes it holds (`CARRY_SPLIT`).
#[inline(always)]
unsafe fn split_header(s: *mut Scratch, o: u64, ret: u64, captured: u64, src: u64) {
    // SAFETY: the scratch as in `walk_step`; `k` is masked to [1, 8] and the payload offset
    // below PAYLOAD_CAP, with the arrays after it to read past; user memory through the checked
    // helper.
    unsafe {
        let walk = &raw mut (*s).walk;
        let hdr = (*walk).hdr.as_mut_ptr();
        let k = black_box(((ret - o - 1) & 7) + 1);
        if o + k <= captured {
            let p = (*s)
                .ev
                .payload
                .as_ptr()
                .add((o & (PAYLOAD_CAP as u64 - 1)) as usize);
            let mut i = 0;
            while i < 8 {
                *hdr.add(i) = *p.add(i);
                i += 1;
            }
        } else {
            if bpf_probe_read_user(hdr.cast(), k as u32, src as *const _) != 0 {
                return;
            }
            let w = read_volatile(&raw const (*walk).len);
            if w < FRAMES_CAP as u64 {
                let w = black_box(w) & (FRAMES_CAP as u64 - 1);
                let seg = (*s).frames.as_mut_ptr().add(w as usize);
                let mut i = 0;
                while i < 8 {
                    *seg.add(SEGMENT_HEADER + i) = *hdr.add(i);
                    i += 1;
                }
                write_unaligned(seg.cast::<u32>(), o as u32);
                write_unaligned(seg.add(4).cast::<u32>(), k as u32);
                write_volatile(&raw mut (*walk).len, w + SEGMENT_HEADER as u64 + k);
            }
        }
        let (b0, b1, b2) = (
            u64::from(*hdr),
            u64::from(*hdr.add(1)),
            u64::from(*hdr.add(2)),
        );
        if k >= 3 {
            write_volatile(
                &raw mut (*walk).at,
                o + FRAME_HEADER + ((b0 << 16) | (b1 << 8) | b2),
            );
            write_volatile(&raw mut (*walk).done, 1);
        } else {
            let held = if k == 2 { (b0 << 8) | b1 } else { b0 };
            write_volatile(
                &raw mut (*walk).split,
                u64::from(CARRY_SPLIT) | (k << 24) | held,
            );
            write_volatile(&raw mut (*walk).done, 2);
        }
    }
}

/// Where the first frame begins in a call whose previous one ended after `k` (1 or 2) bytes of
/// a frame header (`carry`, `CARRY_SPLIT`): the rest of its length is in this call's first
/// captured bytes. 0 (taken as a frame start) when they were not captured.
#[inline(always)]
unsafe fn after_split(s: *mut Scratch, carry: u32, captured: u64) -> u64 {
    let k = u64::from((carry >> 24) & 3);
    let held = u64::from(carry & 0xffff);
    if captured < 3 || k == 0 || k > 2 {
        return 0;
    }
    // SAFETY: the first bytes of the scratch's payload.
    let p = unsafe { (*s).ev.payload.as_ptr() };
    let (p0, p1) = unsafe { (u64::from(*p), u64::from(*p.add(1))) };
    let len = if k == 1 {
        (held << 16) | (p0 << 8) | p1
    } else {
        (held << 8) | p0
    };
    FRAME_HEADER - k + len
}

/// Reads the frame header at call offset `o` into the walk's `hdr`: from the payload when it
/// was captured, else from `src`, the process's address of that byte. Its length and type, or
/// None to stop the walk: unreadable, or no frame header (the walk began inside a frame).
#[inline(always)]
unsafe fn frame_header(s: *mut Scratch, o: u64, captured: u64, src: u64) -> Option<(u64, u8)> {
    // SAFETY: the scratch as in `walk_step`; the payload offset is masked below PAYLOAD_CAP,
    // with the arrays after it to read past; user memory through the checked helper.
    unsafe {
        let hdr = (*s).walk.hdr.as_mut_ptr();
        if o + FRAME_HEADER <= captured {
            // In the payload already: copied, not read from the process again.
            let p = (*s)
                .ev
                .payload
                .as_ptr()
                .add((o & (PAYLOAD_CAP as u64 - 1)) as usize);
            let mut k = 0;
            while k < FRAME_HEADER as usize {
                *hdr.add(k) = *p.add(k);
                k += 1;
            }
        } else if bpf_probe_read_user(hdr.cast(), FRAME_HEADER as u32, src as *const _) != 0 {
            return None;
        }
        parsed_header(s)
    }
}

/// The length and type of the frame header in the walk's `hdr`, or None when it is none.
#[inline(always)]
unsafe fn parsed_header(s: *mut Scratch) -> Option<(u64, u8)> {
    // SAFETY: the scratch's 16-byte `hdr`.
    unsafe {
        let hdr = (*s).walk.hdr.as_ptr();
        let len = (u64::from(*hdr) << 16) | (u64::from(*hdr.add(1)) << 8) | u64::from(*hdr.add(2));
        let kind = *hdr.add(3);
        (kind <= FRAME_TYPE_MAX && *hdr.add(5) & 0x80 == 0).then_some((len, kind))
    }
}

/// `frame_header` for a header at call offset `o` that begins in the iovec `(start, base,
/// blen)` and ends in the next one: its first bytes from the one, the rest from the other (the
/// walk moves on to that iovec itself, at its next step).
#[inline(always)]
unsafe fn split_iov_header(
    s: *mut Scratch,
    o: u64,
    (start, base, blen): (u64, u64, u64),
    captured: u64,
) -> Option<(u64, u8)> {
    if o + FRAME_HEADER <= captured {
        // SAFETY: as in `frame_header`, which reads it from the payload.
        return unsafe { frame_header(s, o, captured, 0) };
    }
    // SAFETY: the scratch as in `iov_step`: both lengths are masked to [1, 8] and the second
    // starts at most 8 bytes into the 16-byte `hdr`; user memory through the checked helper.
    unsafe {
        let walk = &raw mut (*s).walk;
        let i = read_volatile(&raw const (*walk).i) + 1;
        if i >= read_volatile(&raw const (*walk).count) {
            return None;
        }
        let (next, next_len) = read_iovec(read_volatile(&raw const (*walk).iov) + 16 * i)?;
        let k = black_box(((start + blen - o - 1) & 7) + 1);
        let rest = black_box(((FRAME_HEADER - k - 1) & 7) + 1);
        if k + rest != FRAME_HEADER || next_len < rest {
            return None;
        }
        let hdr = (*walk).hdr.as_mut_ptr();
        if bpf_probe_read_user(hdr.cast(), k as u32, (base + (o - start)) as *const _) != 0
            || bpf_probe_read_user(hdr.add(k as usize).cast(), rest as u32, next as *const _) != 0
        {
            return None;
        }
        parsed_header(s)
    }
}

/// Room past FRAMES_CAP a flushed record may take: a segment begun below FRAMES_CAP ends
/// within it (a power of two no larger than the spill, at least a whole kept frame).
const SPILL_PAST_FRAMES: u64 = 8192;
const _: () = assert!(
    SPILL_PAST_FRAMES as usize >= SEGMENT_HEADER + 9 + FRAME_KEEP_CAP
        && SPILL_PAST_FRAMES as usize <= SEGMENT_HEADER + 9 + 2 * FRAME_KEEP_CAP + PAYLOAD_CAP
);

/// Sends the walk's `w` bytes of segments, which filled FRAMES_CAP, as a record of their own so
/// that the walk goes on copying (a read of hundreds of streams' small frames): the first with
/// the call's event and payload (`FLAG_FRAMES_MORE`), the next ones for their segments only
/// (`FLAG_FRAMES_CONT`); the daemon joins them back into one call. False stops the walk: the
/// scratch was taken over (`Scratch::generation`) or the ring buffer is full (the daemon then
/// finds frames missing from the call, as past any walk that stopped short).
#[inline(always)]
unsafe fn flush_segments(s: *mut Scratch, w: u64) -> bool {
    // SAFETY: the scratch as in `walk_step`; the record is `size` bytes from its start, which
    // it holds.
    unsafe {
        let walk = &raw mut (*s).walk;
        if read_volatile(&raw const (*s).generation) != read_volatile(&raw const (*walk).generation)
        {
            return false;
        }
        let flags = read_volatile(&raw const (*s).ev.meta.hdr.flags);
        write_volatile(&raw mut (*s).ev.meta.hdr.flags, flags | FLAG_FRAMES_MORE);
        write_volatile(&raw mut (*s).ev.meta.frames_len, w as u32);
        // `w` is FRAMES_CAP and at most one segment past it, in the spill (no branch: this
        // runs in the walk's callback, whose paths the verifier walks at every call).
        let size = black_box(
            (DATA_EVENT_FIXED + PAYLOAD_CAP + FRAMES_CAP) as u64
                + ((w - FRAMES_CAP as u64) & (SPILL_PAST_FRAMES - 1)),
        );
        let bytes = core::slice::from_raw_parts(s.cast::<u8>().cast_const(), size as usize);
        // No wake-up of its own: the call's last record decides that.
        if ring().output::<[u8]>(bytes, BPF_RB_NO_WAKEUP).is_err() {
            count(KernelStat::RingbufFullData);
            write_volatile(&raw mut (*s).ev.meta.hdr.flags, flags);
            return false;
        }
        count(KernelStat::DataEvents);
        write_volatile(&raw mut (*s).ev.meta.hdr.flags, flags | FLAG_FRAMES_CONT);
        write_volatile(&raw mut (*walk).len, 0);
        true
    }
}

/// Starts the segment at `w` (below FRAMES_CAP) for the frame at call offset `o`: its offset,
/// a length of the frame header alone, and the header the walk read. Returns the segment.
#[inline(always)]
unsafe fn begin_segment(s: *mut Scratch, w: u64, o: u64) -> *mut u8 {
    // SAFETY: `w` masked below FRAMES_CAP: the segment's header and the frame header lie
    // inside `frames` and the spill after it.
    unsafe {
        let seg = (*s)
            .frames
            .as_mut_ptr()
            .add((w & (FRAMES_CAP as u64 - 1)) as usize);
        let hdr = (*s).walk.hdr.as_ptr();
        let mut k = 0;
        while k < FRAME_HEADER as usize {
            *seg.add(SEGMENT_HEADER + k) = *hdr.add(k);
            k += 1;
        }
        write_unaligned(seg.cast::<u32>(), o as u32);
        write_unaligned(seg.add(4).cast::<u32>(), FRAME_HEADER as u32);
        seg
    }
}

/// Payload bytes kept of such a frame: a header block's up to the cap, the first word of an
/// RST_STREAM or a GOAWAY (whose debug data may be long).
#[inline(always)]
fn keep_cap(kind: u8) -> u64 {
    if kind == FRAME_RST_STREAM || kind == FRAME_GOAWAY {
        4
    } else {
        FRAME_KEEP_CAP as u64
    }
}

/// Frames whose payload the parser reads: a header block (or its beginning), and the word
/// that says which streams an RST_STREAM (its error code: refused or failed) or a GOAWAY (its
/// last stream) ends.
#[inline(always)]
fn keeps_payload(kind: u8) -> bool {
    kind == FRAME_HEADERS
        || kind == FRAME_PUSH_PROMISE
        || kind == FRAME_CONTINUATION
        || kind == FRAME_RST_STREAM
        || kind == FRAME_GOAWAY
}

/// `walk_frames` over an iovec call (`count` buffers at `iov`; nginx's `writev` of DATA frames,
/// gRPC's `sendmsg` of a response's frames): the same segments, a header block copied across
/// the buffers it spans (gRPC writes one buffer per name and value).
#[inline(always)]
fn walk_iov_frames(
    s: *mut Scratch,
    (iov, count): (u64, u64),
    ret: u64,
    start: u64,
    captured: u64,
) -> (u64, u32) {
    // SAFETY: as in `walk_frames`.
    unsafe {
        let Some((base, blen)) = read_iovec(iov) else {
            return (0, CARRY_UNKNOWN);
        };
        let w = &mut (*s).walk;
        write_volatile(&mut w.iov, iov);
        write_volatile(&mut w.count, count);
        write_volatile(&mut w.i, 0);
        write_volatile(&mut w.start, 0);
        write_volatile(&mut w.base, base);
        write_volatile(&mut w.blen, blen);
        write_volatile(&mut w.keep_to, 0);
        bpf_loop(
            MAX_FRAMES_WALKED,
            begin_walk(s, start, ret, captured, iov_step as *mut c_void),
            core::ptr::null_mut(),
            0,
        );
        end_walk(s, ret)
    }
}

/// One step of `walk_iov_frames`: a piece of a header block copied, the next buffer taken, or
/// a frame header read. 0 to go on, 1 to stop.
extern "C" fn iov_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: as in `walk_step`; the block copy's destination is masked below FRAMES_CAP plus
    // FRAME_KEEP_CAP, its length below FRAME_KEEP_CAP, inside the spill.
    unsafe {
        let walk = &raw mut (*s).walk;
        let (start, base, blen) = (
            read_volatile(&raw const (*walk).start),
            read_volatile(&raw const (*walk).base),
            read_volatile(&raw const (*walk).blen),
        );
        let keep_to = read_volatile(&raw const (*walk).keep_to);
        if keep_to != 0 {
            let (seg, n, at) = (
                read_volatile(&raw const (*walk).keep_seg) & (FRAMES_CAP as u64 - 1),
                read_volatile(&raw const (*walk).keep_n) & (FRAME_KEEP_CAP as u64 - 1),
                read_volatile(&raw const (*walk).keep_at),
            );
            let seg_ptr = (*s).frames.as_mut_ptr().add(seg as usize);
            if at >= keep_to || n >= FRAME_KEEP_CAP as u64 - 1 {
                // The block's segment is done.
                write_unaligned(seg_ptr.add(4).cast::<u32>(), (FRAME_HEADER + n) as u32);
                write_volatile(
                    &raw mut (*walk).len,
                    seg + SEGMENT_HEADER as u64 + FRAME_HEADER + n,
                );
                write_volatile(&raw mut (*walk).keep_to, 0);
                return 0;
            }
            if at >= start + blen {
                return next_iovec(walk, start, blen);
            }
            let end = if keep_to < start + blen {
                keep_to
            } else {
                start + blen
            };
            let room = FRAME_KEEP_CAP as u64 - 1 - n;
            let want = if end - at < room { end - at } else { room };
            let m = black_box(((want - 1) & (FRAME_KEEP_CAP as u64 - 1)) + 1);
            let dst = seg_ptr.add(SEGMENT_HEADER + FRAME_HEADER as usize + n as usize);
            if bpf_probe_read_user(dst.cast(), m as u32, (base + (at - start)) as *const _) != 0 {
                write_volatile(&raw mut (*walk).keep_at, keep_to);
                return 0;
            }
            write_volatile(&raw mut (*walk).keep_n, n + m);
            write_volatile(&raw mut (*walk).keep_at, at + m);
            return 0;
        }
        let (o, w, ret, captured) = (
            read_volatile(&raw const (*walk).at),
            read_volatile(&raw const (*walk).len),
            read_volatile(&raw const (*walk).ret),
            read_volatile(&raw const (*walk).captured),
        );
        // No header block is being copied here: the segments so far are whole.
        if w >= FRAMES_CAP as u64 {
            return if flush_segments(s, w) { 0 } else { 1 };
        }
        if o >= ret {
            write_volatile(&raw mut (*walk).done, 1);
            return 1;
        }
        if o >= start + blen {
            return next_iovec(walk, start, blen);
        }
        let header = if o + FRAME_HEADER > start + blen {
            // A frame header across two buffers (nghttp2 writes from a chain of 16 KiB ones).
            split_iov_header(s, o, (start, base, blen), captured)
        } else {
            frame_header(s, o, captured, base + (o - start))
        };
        let Some((len, kind)) = header else {
            return 1;
        };
        let body = o + FRAME_HEADER;
        let end = body + len;
        let in_call = if end < ret { end } else { ret };
        if in_call > captured && w < FRAMES_CAP as u64 {
            let w = black_box(w) & (FRAMES_CAP as u64 - 1);
            begin_segment(s, w, o);
            if keeps_payload(kind) && len > 0 && body < ret {
                // Copied over the next steps, buffer by buffer.
                write_volatile(&raw mut (*walk).keep_seg, w);
                write_volatile(&raw mut (*walk).keep_n, 0);
                write_volatile(&raw mut (*walk).keep_at, body);
                let cap_end = body + keep_cap(kind);
                let to = if in_call < cap_end { in_call } else { cap_end };
                write_volatile(&raw mut (*walk).keep_to, to);
            } else {
                write_volatile(
                    &raw mut (*walk).len,
                    w + SEGMENT_HEADER as u64 + FRAME_HEADER,
                );
            }
        }
        write_volatile(&raw mut (*walk).at, end);
        0
    }
}

/// The iovec after the one that starts at `start` and is `blen` long; 1 (stop) when there is
/// none.
#[inline(always)]
fn next_iovec(walk: *mut crate::maps::Walk, start: u64, blen: u64) -> i64 {
    // SAFETY: fields of the scratch, as in `iov_step`.
    unsafe {
        let i = read_volatile(&raw const (*walk).i) + 1;
        if i >= read_volatile(&raw const (*walk).count) {
            return 1;
        }
        let Some((base, len)) = read_iovec(read_volatile(&raw const (*walk).iov) + 16 * i) else {
            return 1;
        };
        write_volatile(&raw mut (*walk).i, i);
        write_volatile(&raw mut (*walk).start, start + blen);
        write_volatile(&raw mut (*walk).base, base);
        write_volatile(&raw mut (*walk).blen, len);
        0
    }
}

/// HTTP/2 on the socket data path: a connection whose first bytes are the client preface is
/// marked, and its single-buffer calls are walked frame by frame (`walk_frames`). Returns the
/// segments' length.
#[inline(always)]
fn http2_frames(
    s: *mut Scratch,
    state: *mut SockState,
    args: &SyscallArgs,
    seq: u32,
    (ret, captured): (u64, u64),
    (base, len): (u64, u64),
    iovecs: (u64, u64),
) -> u64 {
    // SAFETY: a live map value, and the scratch as in `walk_frames`.
    unsafe {
        let first = read_unaligned((*s).ev.payload.as_ptr().cast::<u64>());
        let preface = captured >= PREFACE_LEN && first == PREFACE_START;
        // A 101 (the connection's second message: its first answer) may be h2c's upgrade,
        // after which the server writes frames at once, before it reads the client's preface:
        // they are walked from the next call on. (A WebSocket's 101 too, until the daemon finds
        // its frames opaque.)
        let switching = captured >= SWITCHING_LEN
            && first == SWITCHING_START
            && read_unaligned((*s).ev.payload.as_ptr().add(8).cast::<u32>()) == SWITCHING_CODE;
        if (preface || switching) && seq <= 4 {
            // The client writes the preface and reads the 101.
            let client = preface == (args.direction == DIR_EGRESS);
            (*state).h2 = if client { H2_CLIENT } else { H2_SERVER };
        }
        if (*state).h2 == 0 {
            return 0;
        }
        // Which end saw the opening, for a daemon that lost its event.
        (*s).ev.meta.hdr.flags |= if (*state).h2 == H2_SERVER {
            FLAG_H2_SERVER
        } else {
            FLAG_H2_CLIENT
        };
        let dir = ((args.direction - 1) & 1) as usize;
        if base == 0 {
            (*state).h2_carry[dir] = CARRY_UNKNOWN;
            return 0;
        }
        let carry = (*state).h2_carry[dir];
        let start = if preface {
            PREFACE_LEN
        } else if carry == CARRY_UNKNOWN {
            0
        } else if carry & CARRY_SPLIT != 0 {
            after_split(s, carry, captured)
        } else {
            u64::from(carry)
        };
        // A single buffer (or an iovec call's first buffer holding all its bytes, as a
        // recvmsg's does), or buffer by buffer.
        let (segments, next) = if len >= ret {
            walk_frames(s, base, ret, start, captured)
        } else {
            walk_iov_frames(s, iovecs, ret, start, captured)
        };
        (*state).h2_carry[dir] = next;
        segments
    }
}

/// Iovecs the socket data path copies from one call past the first MAX_IOVECS: gRPC writes a
/// header block as one buffer per name and value (28 for its first request).
const MAX_IOVECS_LOOPED: u32 = 48;

/// `gather` on from iovec `next`, on the socket data path: a `bpf_loop` (one iovec per step,
/// its state in the scratch) up to MAX_IOVECS_LOOPED buffers, where the unrolled loop stops at
/// MAX_IOVECS.
#[inline(always)]
fn gather_loop(s: *mut Scratch, b: &Buffers, off: u64, limit: u64, next: u64) -> u64 {
    // SAFETY: the per-CPU scratch is ours until this program returns; the helper takes a
    // callback of the signature it expects.
    unsafe {
        let g = &mut (*s).gather;
        write_volatile(&mut g.off, off);
        write_volatile(&mut g.limit, limit);
        write_volatile(&mut g.iov, b.iov);
        write_volatile(&mut g.count, b.count);
        write_volatile(&mut g.next, next);
        bpf_loop(
            MAX_IOVECS_LOOPED,
            gather_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        read_volatile(&(*s).gather.off)
    }
}

/// One iovec of `gather_loop`: 0 to go on, 1 to stop.
extern "C" fn gather_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: as in `gather`: offsets masked below PAYLOAD_CAP, the copy's overrun inside the
    // scratch; user memory through the checked helper.
    unsafe {
        let g = &mut (*s).gather;
        let (off, limit, next) = (
            read_volatile(&g.off),
            read_volatile(&g.limit),
            read_volatile(&g.next),
        );
        if next >= read_volatile(&g.count) || off >= limit {
            return 1;
        }
        let Some((base, len)) = read_iovec(read_volatile(&g.iov) + 16 * next) else {
            return 1;
        };
        write_volatile(&mut g.next, next + 1);
        if len == 0 {
            return 0;
        }
        let want = if len < limit - off { len } else { limit - off };
        let o = black_box(off) & (PAYLOAD_CAP as u64 - 1);
        let n = ((black_box(want) - 1) & (PAYLOAD_CAP as u64 - 1)) + 1;
        let payload = (*s).ev.payload.as_mut_ptr();
        if bpf_probe_read_user(payload.add(o as usize).cast(), n as u32, base as *const _) != 0 {
            return 1;
        }
        write_volatile(&mut g.off, o + n);
        0
    }
}

/// Iovecs `iov_tail` looks through for where a call's bytes end.
const MAX_IOVECS_TAIL: u32 = 64;

/// The last bytes (up to TAIL_LEN, from the last two buffers) an iovec call of `ret` bytes
/// moved, into the event's tail: where it ends is found by adding up the iovecs' lengths (a
/// `bpf_loop`, one iovec per step), so a partial write or a short read gives its own end.
#[inline(always)]
fn iov_tail(s: *mut Scratch, b: &Buffers, ret: u64) {
    // SAFETY: the per-CPU scratch is ours until this program returns; the helper takes a
    // callback of the signature it expects; user memory is read through the checked helper,
    // into the tail array at offsets masked below TAIL_LEN (a copy running past it stays inside
    // the event: the payload follows).
    unsafe {
        let t = &raw mut (*s).tail;
        write_volatile(
            t,
            TailFind {
                iov: b.iov,
                count: b.count,
                next: 0,
                before: 0,
                ret,
                prev_base: 0,
                prev_len: 0,
                end_base: 0,
                end_len: 0,
            },
        );
        bpf_loop(
            MAX_IOVECS_TAIL,
            tail_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        let end_len = read_volatile(&(*t).end_len);
        if end_len == 0 {
            return;
        }
        let end_base = read_volatile(&(*t).end_base);
        let last = if end_len < TAIL_LEN as u64 {
            end_len
        } else {
            TAIL_LEN as u64
        };
        // What the last buffer leaves of the tail comes from the one before it.
        let prev_len = read_volatile(&(*t).prev_len);
        let want = TAIL_LEN as u64 - last;
        let first = if prev_len < want { prev_len } else { want };
        let tail = (*s).ev.meta.tail.as_mut_ptr();
        let mut got = 0u64;
        if first > 0 {
            let n = ((black_box(first) - 1) & (TAIL_LEN as u64 - 1)) + 1;
            let src = read_volatile(&(*t).prev_base) + prev_len - n;
            // No tail rather than the last buffer alone: "0\r\n\r\n" after an unknown byte
            // is not a chunked body's end.
            if bpf_probe_read_user(tail.cast(), n as u32, src as *const _) != 0 {
                return;
            }
            got = n;
        }
        let o = black_box(got) & (TAIL_LEN as u64 - 1);
        let n = ((black_box(last) - 1) & (TAIL_LEN as u64 - 1)) + 1;
        let src = end_base + end_len - n;
        if bpf_probe_read_user(tail.add(o as usize).cast(), n as u32, src as *const _) == 0 {
            (*s).ev.meta.tail_len = (o + n) as u32;
        }
    }
}

/// One iovec of `iov_tail`: 0 to go on, 1 to stop.
extern "C" fn tail_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: the scratch's search state; user memory through the checked helper.
    unsafe {
        let t = &mut (*s).tail;
        let next = read_volatile(&t.next);
        if next >= read_volatile(&t.count) {
            return 1;
        }
        let Some((base, len)) = read_iovec(read_volatile(&t.iov) + 16 * next) else {
            return 1;
        };
        write_volatile(&mut t.next, next + 1);
        if len == 0 {
            return 0;
        }
        let (before, ret) = (read_volatile(&t.before), read_volatile(&t.ret));
        if ret - before <= len {
            write_volatile(&mut t.end_base, base);
            write_volatile(&mut t.end_len, ret - before);
            return 1;
        }
        write_volatile(&mut t.before, before + len);
        write_volatile(&mut t.prev_base, base);
        write_volatile(&mut t.prev_len, len);
        0
    }
}

#[inline(always)]
pub fn emit_data<S: Store, const WALK: bool>(
    args: &SyscallArgs,
    ret: u64,
    id: u64,
    lookup: Lookup,
) {
    emit::<WALK>(args, ret, id, next_event::<S>(args.sk, lookup), 0);
}

/// Builds and sends the event of a call whose socket's tuple and event number are known
/// (`next`), with `flags` besides those it finds itself. `WALK`: HTTP/2 frames are walked and
/// iovecs past MAX_IOVECS gathered, with `bpf_loop` where the kernel has it (5.17+).
#[inline(always)]
pub fn emit<const WALK: bool>(args: &SyscallArgs, ret: u64, id: u64, next: NextEvent, flags: u32) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU scratch slot is ours until this program returns (but for a uprobe
    // program, which can be preempted: `Scratch::generation`).
    let generation = unsafe {
        let g = read_volatile(&(*scratch).generation).wrapping_add(1);
        write_volatile(&mut (*scratch).generation, g);
        g
    };
    let ev: &mut DataEvent = unsafe { &mut (*scratch).ev };
    let (meta, payload) = (&mut ev.meta, &mut ev.payload);

    meta.hdr.kind = EventKind::Data as u32;
    meta.hdr.flags = flags;
    // Now, right after the socket's event number was taken, even for a send stamped when it
    // began (the daemon times a send by that, `ts_enter_ns`): the daemon merges the CPUs' rings
    // by this stamp, and must meet a socket's events in their numbers' order. A send's start
    // would put it before a read of the same socket, by another thread, that returned while the
    // send was under way and took the lower number (a Go server's background read): a false gap.
    // (TLS plaintext is numbered later, per direction: each direction's calls come from one
    // thread at a time.)
    // SAFETY: helper without preconditions.
    meta.hdr.ts_ns = unsafe { bpf_ktime_get_ns() };
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
        meta.hdr.flags |= FLAG_TASK_KNOWN;
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
    meta.goroutine = args.goroutine;
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

    // Requests this socket lost since its last delivered event go with this one (a load and a
    // test per event; taken off the socket's count once delivered, below).
    // SAFETY: a live map value, as below.
    meta.lost_requests = next.state.map_or(0, |s| unsafe { (*s).lost_requests });
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
    // A call longer than the capture: where its first byte is in the TCP stream, by which the
    // daemon frames long bodies, and whether it lies wholly inside one (then no payload).
    // TLS plaintext has no place in the TCP stream: only what the daemon said of its messages
    // going one at a time applies to it.
    let tls = flags & FLAG_TLS != 0;
    let long = args.kind != KIND_NONE && ret > PAYLOAD_CAP as u64;
    let long_seq = if long && !tls {
        first_seq(args.sk, args.direction, ret)
    } else {
        0
    };
    let (in_body, trim) = if long_seq != 0 {
        framing(args.sk, args.direction, &next.tuple, long_seq, ret)
    } else if long && tls {
        (false, one_at_a_time(args.sk, args.direction))
    } else {
        (false, false)
    };
    if in_body {
        count(KernelStat::BodyPayloadSkipped);
    }
    // The call's first buffer, where an HTTP/2 walk reads when it holds all the bytes.
    let (mut first, mut iovecs) = ((0, 0), (0, 0));
    if let Some(b) = buffers(args).filter(|_| !in_body) {
        first = (b.base, b.len);
        iovecs = (b.iov, b.count);
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
            let (end, next) = gather(payload.as_mut_ptr(), &b, captured, limit);
            captured = end;
            if WALK && next == MAX_IOVECS && b.count > MAX_IOVECS && end < limit && has_bpf_loop() {
                captured = gather_loop(scratch, &b, end, limit, next);
            }
        }
        if ret > captured && args.kind != KIND_NONE {
            count(KernelStat::PayloadTruncated);
            // The end of the call's bytes shows whether a chunked body ended in them: read
            // from its first buffer when that holds them all.
            if captured > 0 && ret >= TAIL_LEN as u64 && avail == ret {
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
            } else if WALK && b.count > 1 && captured > 0 && has_bpf_loop() {
                // node.js writes a chunked body as [head and size, CRLF, data, CRLF,
                // "0\r\n\r\n"]: the data fills the payload, its end is in the last buffers.
                iov_tail(scratch, &b, ret);
            }
        }
    }
    meta.captured = captured as u32;
    // Before the walk, which may send the event's first part: the daemon takes the payload and
    // the rest of the event from its last part.
    meta.frames_len = 0;
    // SAFETY: as above.
    unsafe { write_volatile(&mut (*scratch).walk.generation, generation) };
    let frames_len = match next.state {
        Some(state) if WALK && has_bpf_loop() => http2_frames(
            scratch,
            state,
            args,
            next.seq,
            (ret, captured),
            first,
            iovecs,
        ),
        _ => 0,
    };
    meta.frames_len = frames_len as u32;

    let head = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    let starts_request = captured >= 4 && {
        let mut found = false;
        let mut i = 0;
        while i < REQUEST_STARTS.len() {
            found |= head == REQUEST_STARTS[i];
            i += 1;
        }
        found
    };
    // Inside a message on a connection whose messages go one at a time: its first bytes (a
    // chunk's size) and its tail are all the daemon reads of it. Not HTTP/2 frames (a
    // connection upgraded to h2c after it was framed), walked above.
    if trim
        && frames_len == 0
        && captured > TRIM_CAP as u64
        && !starts_request
        && head != RESPONSE_START
    {
        captured = TRIM_CAP as u64;
        meta.captured = captured as u32;
        count(KernelStat::BodyPayloadTrimmed);
    }
    // Where a request begins (the daemon names requests by it): not for the other calls, nor
    // TLS plaintext, which is not the bytes TCP carried.
    meta.tcp_seq = if long {
        long_seq
    } else if starts_request && flags & FLAG_TLS == 0 {
        first_seq(args.sk, args.direction, ret)
    } else {
        0
    };
    let size = if frames_len > 0 {
        // Segments follow the whole payload.
        let max = core::mem::size_of::<Scratch>() as u64 - 16;
        let size = black_box(
            (DATA_EVENT_FIXED + PAYLOAD_CAP) as u64 + (frames_len & (2 * FRAMES_CAP as u64 - 1)),
        );
        if size > max { max } else { size }
    } else {
        let size = black_box(DATA_EVENT_FIXED as u64 + (captured & (2 * PAYLOAD_CAP as u64 - 1)));
        if size > core::mem::size_of::<DataEvent>() as u64 {
            core::mem::size_of::<DataEvent>() as u64
        } else {
            size
        }
    };
    if !next.late.is_null() {
        // SAFETY: a live map value, as above.
        unsafe {
            let seq = (*next.late).wrapping_add(1);
            *next.late = seq;
            meta.seq = seq;
        }
    }
    // SAFETY: as above.
    if unsafe { read_volatile(&(*scratch).generation) } != generation {
        count(KernelStat::ScratchRace);
        return;
    }
    // Bounded again on the value the helper gets: a bound set before a spill does not reach
    // the reload on older verifiers (6.1 refused the output when this program's registers
    // were laid out otherwise). Never true.
    let size = black_box(size);
    if size > core::mem::size_of::<Scratch>() as u64 - 16 {
        return;
    }
    // SAFETY: `size` bytes from the start of the scratch (the event first), which is at least
    // that long.
    let bytes =
        unsafe { core::slice::from_raw_parts(scratch.cast::<u8>().cast_const(), size as usize) };
    let ring = ring();
    if ring.output::<[u8]>(bytes, wakeup_flags(ring)).is_ok() {
        count(KernelStat::DataEvents);
        // Read back from the scratch, not kept in a register across the output: the size's
        // bound above must reach the helper call intact on older verifiers.
        // SAFETY: as above.
        let told = unsafe { read_volatile(&(*scratch).ev.meta.lost_requests) };
        if told != 0
            && let Some(state) = next.state
        {
            // SAFETY: as above.
            unsafe { take_lost_requests(state, told) };
        }
        // Only a delivered event teaches the reader the thread's name.
        if let Some(state) = next.state.filter(|_| !task_known) {
            // SAFETY: as above.
            unsafe { (*state).task = id };
        }
    } else {
        count(KernelStat::RingbufFullData);
        // Say how many requests went with it: a lost event that starts a request line.
        if starts_request {
            let ingress = args.direction == DIR_INGRESS;
            count(if ingress {
                KernelStat::LostRequestIngress
            } else {
                KernelStat::LostRequestEgress
            });
            // Held by the socket for its next delivered event, which tells the daemon whose
            // request it was. TLS plaintext's session state is not the socket's, whose close
            // would tell the rest: counted apart.
            match next.state.filter(|_| flags & FLAG_TLS == 0) {
                // SAFETY: as above.
                Some(state) => unsafe { hold_lost_request(state, ingress) },
                None => count(if ingress {
                    KernelStat::LostRequestUnheldIngress
                } else {
                    KernelStat::LostRequestUnheldEgress
                }),
            }
        }
    }
}

/// One more lost request on the socket (`lost_requests`' half for `ingress`), held until an
/// event of the socket tells it; a full half counts it apart rather than carry into the other.
///
/// # Safety
/// `state` is a live map value.
#[inline(always)]
unsafe fn hold_lost_request(state: *mut SockState, ingress: bool) {
    let (one, half) = if ingress {
        (lost_requests::INGRESS, 0)
    } else {
        (lost_requests::EGRESS, 16)
    };
    // SAFETY: per the contract.
    unsafe {
        let v = (*state).lost_requests;
        if (v >> half) & 0xffff == 0xffff {
            count(if ingress {
                KernelStat::LostRequestUnheldIngress
            } else {
                KernelStat::LostRequestUnheldEgress
            });
        } else {
            (*state).lost_requests = v + one;
        }
    }
}

/// Takes `told` (delivered with an event) off the socket's held lost requests, half by half
/// and never below 0: two threads of one socket on two CPUs may both tell the same count (a
/// small double count), which must not wrap into a huge one.
///
/// # Safety
/// `state` is a live map value.
#[inline(always)]
pub unsafe fn take_lost_requests(state: *mut SockState, told: u32) {
    // SAFETY: per the contract.
    unsafe {
        let (held_in, held_out) = lost_requests::split((*state).lost_requests);
        let (told_in, told_out) = lost_requests::split(told);
        (*state).lost_requests =
            held_in.saturating_sub(told_in) | (held_out.saturating_sub(told_out) << 16);
    }
}
