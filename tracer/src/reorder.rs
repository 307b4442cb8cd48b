//! Puts back in order two events of one socket that reached the daemon swapped.
//!
//! A socket's events are numbered in the kernel as each program runs, and the CPUs' rings are
//! merged by a clock read a little later in the same program. Two threads using one socket at
//! once on two CPUs (a Go server's background read while its handler writes) can take their
//! numbers in one order and their clock readings in the other: the daemon then meets number
//! n+1 before n, which reads as lost events. An event one ahead of its stream is held here
//! until the socket's next event in that stream: if that is the missing one, both go on in
//! their order; otherwise (the missing one was lost: a full ring) the held one goes on first,
//! and its gap is counted as before. One held for `STALE_AFTER` goes on at the end of a drain
//! (the merge holds a record back at most 2 ms).

use std::time::{Duration, Instant};

/// At most this many events held at once (a swap is rare; beyond, gaps count as lost).
pub const MAX_HELD: usize = 64;
/// How long a held event waits for its predecessor.
pub const STALE_AFTER: Duration = Duration::from_millis(10);
/// Buffers kept for the next held events, and the largest kept (a joined HTTP/2 call can be
/// hundreds of KiB: not kept).
const SPARES: usize = 4;
const SPARE_BYTES: usize = 4096;

/// A socket's numbering stream: TLS plaintext is numbered per direction (`ConnTable::next_seq`),
/// the rest per socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamKey {
    pub sk: u64,
    pub tls_ingress: bool,
}

struct Held {
    key: StreamKey,
    seq: u32,
    record: Vec<u8>,
    at: Instant,
}

#[derive(Default)]
pub struct Reorder {
    held: Vec<Held>,
    spare: Vec<Vec<u8>>,
}

impl Reorder {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Holds a copy of `record`, the event numbered `seq`, one ahead of its stream: false when
    /// there is no room, or one of that stream is held already.
    pub fn hold(&mut self, key: StreamKey, seq: u32, record: &[u8], now: Instant) -> bool {
        if self.held.len() >= MAX_HELD || self.held.iter().any(|h| h.key == key) {
            return false;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(record);
        self.held.push(Held {
            key,
            seq,
            record: buf,
            at: now,
        });
        true
    }

    /// The held event of `key`'s stream, if any, and whether the event numbered `seq` is the
    /// one it waited for (then it goes first).
    pub fn take(&mut self, key: StreamKey, seq: u32) -> Option<(Vec<u8>, bool)> {
        let i = self.held.iter().position(|h| h.key == key)?;
        let h = self.held.swap_remove(i);
        let predecessor = seq != 0 && seq.wrapping_add(1).max(1) == h.seq;
        Some((h.record, predecessor))
    }

    /// Any held event of socket `sk` (either stream).
    pub fn take_socket(&mut self, sk: u64) -> Option<Vec<u8>> {
        let i = self.held.iter().position(|h| h.key.sk == sk)?;
        Some(self.held.swap_remove(i).record)
    }

    /// Events held for `STALE_AFTER` or longer: what they waited for is not coming.
    pub fn take_stale(&mut self, now: Instant, out: &mut Vec<Vec<u8>>) {
        let mut i = 0;
        while i < self.held.len() {
            if now.saturating_duration_since(self.held[i].at) >= STALE_AFTER {
                out.push(self.held.swap_remove(i).record);
            } else {
                i += 1;
            }
        }
    }

    /// A held record's buffer, for the next.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < SPARES && buf.capacity() <= SPARE_BYTES {
            self.spare.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sk: u64) -> StreamKey {
        StreamKey {
            sk,
            tls_ingress: false,
        }
    }

    #[test]
    fn one_event_per_stream_is_held_until_taken_or_stale() {
        let t0 = Instant::now();
        let mut r = Reorder::default();
        assert!(r.hold(key(1), 5, b"a", t0));
        assert!(!r.hold(key(1), 6, b"b", t0), "one per stream");
        let tls_in = StreamKey {
            sk: 1,
            tls_ingress: true,
        };
        assert!(
            r.hold(tls_in, 9, b"t", t0),
            "the other stream of the socket"
        );
        assert!(r.hold(key(2), 3, b"c", t0));
        assert_eq!(r.take(key(1), 4), Some((b"a".to_vec(), true)));
        assert_eq!(r.take(key(1), 4), None);
        assert_eq!(
            r.take(tls_in, 7),
            Some((b"t".to_vec(), false)),
            "not its predecessor"
        );
        let mut stale = Vec::new();
        r.take_stale(t0 + STALE_AFTER / 2, &mut stale);
        assert!(stale.is_empty(), "still waiting");
        r.take_stale(t0 + STALE_AFTER, &mut stale);
        assert_eq!(stale, vec![b"c".to_vec()]);
        assert!(r.is_empty());
    }

    #[test]
    fn bounded() {
        let mut r = Reorder::default();
        let t0 = Instant::now();
        for sk in 0..MAX_HELD as u64 {
            assert!(r.hold(key(sk), 2, b"x", t0));
        }
        assert!(!r.hold(key(u64::MAX), 2, b"x", t0));
        for sk in 0..MAX_HELD as u64 {
            let (buf, _) = r.take(key(sk), 1).expect("held");
            r.recycle(buf);
        }
        assert_eq!(r.spare.len(), SPARES);
        r.recycle(Vec::with_capacity(SPARE_BYTES * 2));
        assert_eq!(r.spare.len(), SPARES);
    }
}
