//! Puts back in order two events of one socket that reached the daemon swapped.
//!
//! A socket's events are numbered in the kernel as each program runs, and the CPUs' rings are
//! merged by a clock read a little later in the same program. Two threads using one socket at
//! once on two CPUs (a Go server's background read while its handler writes) can take their
//! numbers in one order and their clock readings in the other: the daemon then meets number
//! n+1 before n, which reads as lost events. An event one ahead of its connection is held here
//! until the socket's next event: if that is the missing one, both go on in their order;
//! otherwise (the missing one was lost: a full ring) the held one goes on first, and its gap
//! is counted as before. Held events left at the end of the drain after the one they came in
//! go on then (a merge holds a record back for milliseconds, a drain comes every 20-100 ms).

/// At most this many sockets' events held at once (a swap is rare; beyond, gaps count as lost).
pub const MAX_HELD: usize = 64;

struct Held {
    sk: u64,
    record: Vec<u8>,
    /// Drains ended since it was held.
    drains: u8,
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

    /// Holds a copy of `record`, the event of `sk` one ahead of its connection: false when
    /// there is no room, or one of `sk` is held already.
    pub fn hold(&mut self, sk: u64, record: &[u8]) -> bool {
        if self.held.len() >= MAX_HELD || self.held.iter().any(|h| h.sk == sk) {
            return false;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(record);
        self.held.push(Held {
            sk,
            record: buf,
            drains: 0,
        });
        true
    }

    /// The held event of `sk`, if any.
    pub fn take(&mut self, sk: u64) -> Option<Vec<u8>> {
        let i = self.held.iter().position(|h| h.sk == sk)?;
        Some(self.held.swap_remove(i).record)
    }

    /// Events held since before the drain that just ended: what they waited for is not coming.
    pub fn take_stale(&mut self, out: &mut Vec<Vec<u8>>) {
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].drains >= 1 {
                out.push(self.held.swap_remove(i).record);
            } else {
                self.held[i].drains += 1;
                i += 1;
            }
        }
    }

    /// A held record's buffer, for the next.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_HELD {
            self.spare.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_socket_is_held_until_taken_or_stale() {
        let mut r = Reorder::default();
        assert!(r.hold(1, b"a"));
        assert!(!r.hold(1, b"b"), "one per socket");
        assert!(r.hold(2, b"c"));
        assert_eq!(r.take(1).as_deref(), Some(&b"a"[..]));
        assert_eq!(r.take(1), None);
        let mut stale = Vec::new();
        r.take_stale(&mut stale);
        assert!(stale.is_empty(), "held through the drain it came in");
        r.take_stale(&mut stale);
        assert_eq!(stale, vec![b"c".to_vec()]);
        assert!(r.is_empty());
    }

    #[test]
    fn bounded() {
        let mut r = Reorder::default();
        for sk in 0..MAX_HELD as u64 {
            assert!(r.hold(sk, b"x"));
        }
        assert!(!r.hold(u64::MAX, b"x"));
    }
}
