//! Who counts a request lost at its server end when its client end is traced here too.
//!
//! With spans, a request both of whose ends are on this host is counted by its server end when
//! that end read it (its span claims the client's), else by its client end (its span not
//! claimed); without spans, by its server end, or by its client end when the server's socket
//! was not seen yet. A request the server end lost (its read dropped with the ring buffer
//! full, its header block unreadable) may then be counted by the client end too: once as a
//! request and once as lost. So such a loss waits here, by the connection's client address,
//! for its client end: a client exchange that end counts settles one (the request is counted,
//! not lost); one left after `SETTLE` is counted lost. A client exchange that comes first
//! leaves a credit for the loss to come.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// How long a server end's loss waits for its client end's count. The client end counts when
/// it reads the response's end, which for a short response is by the time the server end
/// learns of its loss (its next delivered event): well within a drain or two. (A response
/// streamed for longer is counted twice: lost here, then by its client end.)
const SETTLE: Duration = Duration::from_secs(2);
/// How long a client end's count waits for the loss it stands for: the server end learns of a
/// loss at its socket's next delivered event.
const CREDIT_TTL: Duration = Duration::from_secs(5);
/// Connections with losses or credits waiting; past this a loss is counted at once.
const MAX_ENTRIES: usize = 16 * 1024;
/// Losses of one reason told this close together wait as one.
const MERGE_WITHIN: Duration = Duration::from_millis(20);
/// Losses and credits kept per connection, each with its own time (past this a loss is counted
/// at once, a credit dropped).
const MAX_PER_CONN: usize = 1024;

#[derive(Default)]
struct Entry {
    /// Losses waiting, oldest first: since when, why, how many.
    waiting: VecDeque<(Instant, &'static str, u32)>,
    /// Client exchanges counted for want of a claim, not yet matched with a loss: when.
    credits: VecDeque<Instant>,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.credits.is_empty()
    }
}

#[derive(Default)]
pub struct Ledger {
    /// By the connection's client address: both ends know it, whatever address translation
    /// lies between them, and the server end's socket may not be known to the client's yet.
    entries: HashMap<SocketAddr, Entry>,
}

impl Ledger {
    /// `n` requests the server end of the connection from `client` lost (`reason`): how many
    /// to count lost now (the rest wait for the client end).
    pub fn server_lost(
        &mut self,
        client: SocketAddr,
        reason: &'static str,
        n: u64,
        now: Instant,
        metrics: &Metrics,
    ) -> u64 {
        let full = self.entries.len() >= MAX_ENTRIES;
        let entry = match self.entries.get_mut(&client) {
            Some(e) => e,
            None if full => {
                metrics.lost_deferred.with_label_values(&["full"]).inc_by(n);
                return n;
            }
            None => self.entries.entry(client).or_default(),
        };
        let settled = n.min(entry.credits.len() as u64);
        entry.credits.drain(..settled as usize);
        if settled > 0 {
            metrics
                .lost_deferred
                .with_label_values(&["settled"])
                .inc_by(settled);
        }
        let mut now_counted = 0;
        let wait = n - settled;
        if wait > 0 {
            // Losses told within a few ms of each other (a burst, an HTTP/2 connection's
            // streams) wait as one.
            if let Some(last) = entry.waiting.back_mut()
                && last.1 == reason
                && now.duration_since(last.0) < MERGE_WITHIN
            {
                last.2 = last
                    .2
                    .saturating_add(u32::try_from(wait).unwrap_or(u32::MAX));
            } else if entry.waiting.len() >= MAX_PER_CONN {
                metrics
                    .lost_deferred
                    .with_label_values(&["full"])
                    .inc_by(wait);
                now_counted = wait;
            } else {
                entry
                    .waiting
                    .push_back((now, reason, u32::try_from(wait).unwrap_or(u32::MAX)));
            }
        }
        if entry.is_empty() {
            self.entries.remove(&client);
        }
        now_counted
    }

    /// The client end at `client` counted a request its server end did not (it did not claim
    /// it, or was not seen yet): it settles one of that end's losses (the oldest), or stands
    /// for one to come.
    pub fn client_counted(&mut self, client: SocketAddr, now: Instant, metrics: &Metrics) {
        let full = self.entries.len() >= MAX_ENTRIES;
        let entry = match self.entries.get_mut(&client) {
            Some(e) => e,
            None if full => {
                // The loss it stands for, if one comes, will be counted too: said so.
                metrics
                    .lost_deferred
                    .with_label_values(&["credit_dropped"])
                    .inc();
                return;
            }
            None => self.entries.entry(client).or_default(),
        };
        if let Some(oldest) = entry.waiting.front_mut() {
            oldest.2 -= 1;
            if oldest.2 == 0 {
                entry.waiting.pop_front();
            }
            metrics.lost_deferred.with_label_values(&["settled"]).inc();
            if entry.is_empty() {
                self.entries.remove(&client);
            }
            return;
        }
        if entry.credits.len() < MAX_PER_CONN {
            entry.credits.push_back(now);
        } else {
            metrics
                .lost_deferred
                .with_label_values(&["credit_dropped"])
                .inc();
        }
    }

    /// Counts the losses that waited long enough as lost (server end), forgets old credits.
    pub fn expire(&mut self, now: Instant, metrics: &Metrics) {
        if self.entries.is_empty() {
            return;
        }
        self.entries.retain(|_, e| {
            while let Some(&(since, reason, n)) = e.waiting.front() {
                if now.duration_since(since) < SETTLE {
                    break;
                }
                e.waiting.pop_front();
                metrics
                    .requests_lost
                    .with_label_values(&["server", reason])
                    .inc_by(u64::from(n));
                metrics
                    .lost_deferred
                    .with_label_values(&["counted"])
                    .inc_by(u64::from(n));
            }
            while e
                .credits
                .front()
                .is_some_and(|t| now.duration_since(*t) >= CREDIT_TTL)
            {
                e.credits.pop_front();
            }
            !e.is_empty()
        });
    }

    /// Losses waiting now (tests).
    #[cfg(test)]
    fn waiting(&self) -> u64 {
        self.entries
            .values()
            .flat_map(|e| e.waiting.iter())
            .map(|(_, _, n)| u64::from(*n))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn lost(m: &Metrics, reason: &str) -> u64 {
        m.requests_lost.with_label_values(&["server", reason]).get()
    }

    #[test]
    fn a_loss_its_client_end_counted_is_not_counted_lost() {
        let (m, mut l, t) = (Metrics::new(), Ledger::default(), Instant::now());
        assert_eq!(l.server_lost(addr(7), "ringbuf_full", 2, t, &m), 0);
        l.client_counted(addr(7), t, &m);
        l.expire(t + SETTLE, &m);
        // One settled, one counted lost after waiting.
        assert_eq!(lost(&m, "ringbuf_full"), 1);
        assert_eq!(l.waiting(), 0);
        assert!(l.entries.is_empty());
    }

    #[test]
    fn a_client_count_first_stands_for_the_loss_to_come() {
        let (m, mut l, t) = (Metrics::new(), Ledger::default(), Instant::now());
        l.client_counted(addr(7), t, &m);
        l.client_counted(addr(8), t, &m);
        assert_eq!(l.server_lost(addr(7), "events_lost", 3, t, &m), 0);
        assert_eq!(l.waiting(), 2);
        l.expire(t + SETTLE, &m);
        assert_eq!(lost(&m, "events_lost"), 2);
        // Socket 8's credit goes with time, uncounted.
        l.expire(t + CREDIT_TTL, &m);
        assert!(l.entries.is_empty());
        assert_eq!(
            l.server_lost(addr(8), "events_lost", 1, t + CREDIT_TTL, &m),
            0
        );
        assert_eq!(l.waiting(), 1);
    }

    /// Each loss waits its own time: one that came late is not counted with the first.
    #[test]
    fn each_loss_waits_its_own_time() {
        let (m, mut l, t) = (Metrics::new(), Ledger::default(), Instant::now());
        l.server_lost(addr(7), "ringbuf_full", 1, t, &m);
        let late = t + SETTLE - Duration::from_millis(10);
        l.server_lost(addr(7), "ringbuf_full", 1, late, &m);
        l.expire(t + SETTLE, &m);
        assert_eq!(lost(&m, "ringbuf_full"), 1);
        l.client_counted(addr(7), t + SETTLE, &m);
        l.expire(late + SETTLE, &m);
        assert_eq!(lost(&m, "ringbuf_full"), 1);
        assert!(l.entries.is_empty());
    }

    /// Credits go with their own age, however many come after them.
    #[test]
    fn credits_age_one_by_one() {
        let (m, mut l, t) = (Metrics::new(), Ledger::default(), Instant::now());
        l.client_counted(addr(7), t, &m);
        l.client_counted(addr(7), t + CREDIT_TTL - Duration::from_millis(10), &m);
        l.expire(t + CREDIT_TTL, &m);
        assert_eq!(
            l.server_lost(addr(7), "ringbuf_full", 2, t + CREDIT_TTL, &m),
            0
        );
        // One settled by the younger credit, one waits.
        assert_eq!(l.waiting(), 1);
    }

    #[test]
    fn a_full_ledger_counts_at_once() {
        let (m, mut l, t) = (Metrics::new(), Ledger::default(), Instant::now());
        for i in 0..MAX_ENTRIES as u32 {
            let a = SocketAddr::from(([127, 0, (i >> 16) as u8, 1], i as u16));
            l.server_lost(a, "ringbuf_full", 1, t, &m);
        }
        let other = SocketAddr::from(([10, 0, 0, 1], 1));
        assert_eq!(l.server_lost(other, "ringbuf_full", 5, t, &m), 5);
        assert_eq!(l.entries.len(), MAX_ENTRIES);
        // A client count that cannot wait is said so.
        l.client_counted(other, t, &m);
        let dropped = m.lost_deferred.with_label_values(&["credit_dropped"]).get();
        assert_eq!(dropped, 1);
    }
}
