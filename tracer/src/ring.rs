//! The reading end of the kernel's BPF ring buffer (`BPF_MAP_TYPE_RINGBUF`), mapped into the
//! daemon as the kernel lays it out (kernel/bpf/ringbuf.c): a consumer page we write, then a
//! producer page and the data pages (mapped twice in a row, so a record never wraps), read-only.
//!
//! aya's reader (like libbpf's) publishes the consumer position after every record. Every
//! producer reads that position on each reserve, so each publication costs the CPUs producing
//! at that moment a cache miss, a few thousand times per batch. Here it is published once per
//! `PUBLISH_BYTES` consumed (a quarter of a smaller ring) and when the reader has caught up: the
//! space it frees reaches the producers a little later.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{self, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::MapData;

/// A record's header: its length, with these two flags, then its page offset.
const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER_BYTES: u64 = 8;

/// How much may be consumed before the position is published within one batch (at most a
/// quarter of the ring).
const PUBLISH_BYTES: u64 = 64 * 1024;

/// One mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: libc::c_int, offset: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of the map's fd; nothing else is at the address the
        // kernel picks.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(ptr)
            .map(|ptr| Self { ptr, len })
            .ok_or_else(|| io::Error::other("mmap returned null"))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer referenced.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

pub struct Ring {
    /// Kept open: the mappings and the poller refer to it.
    map: MapData,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    mask: u64,
    publish_every: u64,
    /// Our position, and the last one published.
    pos: u64,
    published: u64,
}

// SAFETY: the mappings are owned by this value and only touched through `&mut self`.
unsafe impl Send for Ring {}

impl Ring {
    /// Maps the ring buffer `map` (its size, from the kernel, a power of two multiple of the
    /// page size).
    pub fn new(map: MapData) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("no page size"))?;
        let bytes = map.info().map_err(io::Error::other)?.max_entries() as usize;
        if !bytes.is_power_of_two() || bytes < page {
            return Err(io::Error::other(format!(
                "ring buffer of {bytes} bytes: not a power of two of at least a page"
            )));
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * bytes, libc::PROT_READ, page)?;
        let mut ring = Self {
            map,
            consumer,
            producer,
            page,
            mask: bytes as u64 - 1,
            publish_every: PUBLISH_BYTES.min(bytes as u64 / 4),
            pos: 0,
            published: 0,
        };
        ring.pos = ring.consumer_pos().load(Ordering::Acquire);
        ring.published = ring.pos;
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the consumer page starts with the kernel's `consumer_pos`, an aligned
        // unsigned long, shared with the kernel for as long as the mapping lives.
        unsafe { self.consumer.ptr.cast::<AtomicU64>().as_ref() }
    }

    fn producer_pos(&self) -> u64 {
        // SAFETY: as above, for the producer page's `producer_pos`. Acquire pairs with the
        // kernel's release store, after the record's header was written.
        unsafe { self.producer.ptr.cast::<AtomicU64>().as_ref() }.load(Ordering::Acquire)
    }

    fn publish(&mut self) {
        if self.published != self.pos {
            // Release: the records before it are read; the kernel may reuse their space.
            self.consumer_pos().store(self.pos, Ordering::Release);
            self.published = self.pos;
        }
    }

    /// How full the ring is, per mille: written and not read yet.
    pub fn fill(&self) -> u64 {
        self.producer_pos()
            .wrapping_sub(self.pos)
            .min(self.mask + 1)
            * 1000
            / (self.mask + 1)
    }

    /// Hands every committed record to `f`, in order, and returns how many there were. Stops
    /// at a record still being written (its producer commits it, and the next drain reads it).
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        let mut end = self.producer_pos();
        while let Some((record, len)) = self.next(&mut end) {
            // SAFETY: a committed record's bytes, within the double mapping (`next`).
            f(unsafe { std::slice::from_raw_parts(record.as_ptr(), len) });
            n += 1;
            self.advance(len);
        }
        self.publish();
        n
    }

    /// The committed record at our position (discarded ones and what cannot be records are
    /// skipped), without consuming it; None when caught up with the producer or at a record
    /// still being written. `end` is the producer's position as last read.
    fn next(&mut self, end: &mut u64) -> Option<(NonNull<u8>, usize)> {
        loop {
            if self.pos == *end {
                // Caught up with what we saw: publish, then look again before stopping, with a
                // full fence between, so that either this look sees a record committed
                // meanwhile or its producer sees our position (and wakes us, unless told not
                // to; the poll covers those), as aya's reader does.
                self.publish();
                atomic::fence(Ordering::SeqCst);
                *end = self.producer_pos();
                if self.pos == *end {
                    return None;
                }
            }
            let offset = (self.pos & self.mask) as usize;
            // SAFETY: the data pages follow the producer page and are mapped twice, so a record
            // at `offset` (< size) with its length (< size) lies within the mapping.
            let record = unsafe {
                self.producer
                    .ptr
                    .as_ptr()
                    .cast::<u8>()
                    .add(self.page + offset)
            };
            // SAFETY: a record header is 8-byte aligned in the data pages; Acquire pairs with
            // the kernel's commit (an ordered xchg that clears BUSY after the data is written).
            let header = unsafe { (*record.cast::<AtomicU32>()).load(Ordering::Acquire) };
            if header & BUSY_BIT != 0 {
                return None;
            }
            let len = u64::from(header & !(BUSY_BIT | DISCARD_BIT));
            if len > self.mask || end.wrapping_sub(self.pos) < HEADER_BYTES + len {
                // Not a record the kernel wrote: what is pending cannot be read as records, and
                // is skipped (rather than read past the ring, or stalled on for good).
                tracing::error!(
                    "ring buffer record of {len} bytes at {}: skipping {} bytes",
                    self.pos,
                    end.wrapping_sub(self.pos)
                );
                self.pos = *end;
                continue;
            }
            if header & DISCARD_BIT != 0 {
                self.advance(len as usize);
                continue;
            }
            // SAFETY: the record's bytes follow its header, within the double mapping.
            let data = unsafe { NonNull::new_unchecked(record.add(HEADER_BYTES as usize)) };
            return Some((data, len as usize));
        }
    }

    /// Moves past the record of `len` bytes at our position.
    fn advance(&mut self, len: usize) {
        self.pos += (HEADER_BYTES + len as u64).next_multiple_of(8);
        if self.pos - self.published >= self.publish_every {
            self.publish();
        }
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}

/// Where a record's timestamp is: every record begins with an `EventHeader`.
const TS_AT: usize = std::mem::offset_of!(tracer_common::EventHeader, ts_ns);

/// How long after its timestamp a record may still be uncommitted: records are taken in
/// timestamp order only up to this long before the drain began, the rest at the next drain,
/// so that one committed late on another CPU still comes before a later one.
const HOLD_NS: u64 = 2_000_000;

/// Every CPU's ring buffer, read as one stream in timestamp order (what one shared ring gave
/// in commit order), and the epoll instance that is readable when any of them is.
pub struct Rings {
    rings: Vec<Ring>,
    /// Each ring's next record, read once per drain and after each one taken.
    heads: Vec<Option<(NonNull<u8>, usize, u64)>>,
    ends: Vec<u64>,
    epoll: OwnedFd,
}

// SAFETY: as for `Ring`; `heads` point into the rings' own mappings.
unsafe impl Send for Rings {}

impl Rings {
    pub fn new(rings: Vec<Ring>) -> io::Result<Self> {
        // SAFETY: plain syscalls; the fds are ours and outlive their registration.
        let epoll = unsafe {
            let fd = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let epoll = OwnedFd::from_raw_fd(fd);
            for ring in &rings {
                let mut ev = libc::epoll_event {
                    events: libc::EPOLLIN as u32,
                    u64: 0,
                };
                if libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, ring.as_raw_fd(), &mut ev) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            epoll
        };
        let n = rings.len();
        Ok(Self {
            rings,
            heads: vec![None; n],
            ends: vec![0; n],
            epoll,
        })
    }

    /// How full the fullest ring is, per mille.
    pub fn fill(&self) -> u64 {
        self.rings.iter().map(Ring::fill).max().unwrap_or(0)
    }

    /// Hands every committed record to `f`, the oldest first across the rings, and returns how
    /// many there were.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        if let [ring] = self.rings.as_mut_slice() {
            return ring.drain(f);
        }
        let watermark = crate::tcp::monotonic_ns().saturating_sub(HOLD_NS);
        for (i, ring) in self.rings.iter_mut().enumerate() {
            self.ends[i] = ring.producer_pos();
            self.heads[i] = head(ring, &mut self.ends[i]);
        }
        let mut n = 0;
        loop {
            let oldest = self
                .heads
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.map(|h| (i, h)))
                .min_by_key(|&(_, (_, _, ts))| ts);
            let Some((i, (record, len, ts))) = oldest else {
                break;
            };
            if ts >= watermark {
                break;
            }
            // SAFETY: a committed record's bytes, within its ring's double mapping.
            f(unsafe { std::slice::from_raw_parts(record.as_ptr(), len) });
            n += 1;
            let ring = &mut self.rings[i];
            ring.advance(len);
            self.heads[i] = head(ring, &mut self.ends[i]);
        }
        for ring in &mut self.rings {
            ring.publish();
        }
        n
    }

    /// Whether the last drain left records for the next (too recent to be put in order yet).
    pub fn held(&self) -> bool {
        self.heads.iter().any(Option::is_some)
    }
}

/// A ring's next record with its timestamp (0 if too short to have one: taken first).
fn head(ring: &mut Ring, end: &mut u64) -> Option<(NonNull<u8>, usize, u64)> {
    let (record, len) = ring.next(end)?;
    let ts = if len >= TS_AT + 8 {
        // SAFETY: within the record; records are 8-byte aligned, the header's u64 too.
        unsafe { record.as_ptr().add(TS_AT).cast::<u64>().read_unaligned() }
    } else {
        0
    };
    Some((record, len, ts))
}

impl AsRawFd for Rings {
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// What ended a wait on the rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The kernel side woke the reader: a ring's fill crossed its wake-up mark.
    Data,
    Timeout,
    Stop,
}

/// The reader thread's wait: for the kernel side's (batched) wake-ups of the rings, a stop, or
/// a timeout. Edge-triggered, like tokio's: a ring that still holds records after a wake-up is
/// read at the next timeout, not in a busy loop.
pub struct Waiter {
    epoll: OwnedFd,
    /// Kept open: registered in `epoll`.
    _stop: Arc<OwnedFd>,
}

/// Ends the reader's waits from any thread (an eventfd).
pub struct Stopper(Arc<OwnedFd>);

const TAG_RINGS: u64 = 0;
const TAG_STOP: u64 = 1;

impl Waiter {
    pub fn new(rings: &Rings) -> io::Result<(Self, Stopper)> {
        // SAFETY: plain syscalls; the fds are ours and outlive their registration.
        unsafe {
            let fd = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let epoll = OwnedFd::from_raw_fd(fd);
            let efd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
            if efd < 0 {
                return Err(io::Error::last_os_error());
            }
            let stop = Arc::new(OwnedFd::from_raw_fd(efd));
            // The stop level-triggered (never read: readable from then on).
            let rings_ev = (libc::EPOLLIN | libc::EPOLLET) as u32;
            for (watched, events, tag) in [
                (rings.as_raw_fd(), rings_ev, TAG_RINGS),
                (efd, libc::EPOLLIN as u32, TAG_STOP),
            ] {
                let mut ev = libc::epoll_event { events, u64: tag };
                if libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, watched, &mut ev) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok((
                Self {
                    epoll,
                    _stop: stop.clone(),
                },
                Stopper(stop),
            ))
        }
    }

    /// Waits up to `timeout`. A stop, once asked, is reported by every later wait.
    pub fn wait(&self, timeout: Duration) -> io::Result<Woken> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 2];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `events` is writable for its length.
        let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), events.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Woken::Timeout)
            } else {
                Err(e)
            };
        }
        let events = &events[..n as usize];
        Ok(if events.iter().any(|e| e.u64 == TAG_STOP) {
            Woken::Stop
        } else if events.is_empty() {
            Woken::Timeout
        } else {
            Woken::Data
        })
    }
}

impl Stopper {
    pub fn stop(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes to our eventfd. It cannot fail short of a counter overflow,
        // and the reader needs only one.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}
