//! Thread names and cgroups for data events that leave them out: the kernel side sends them
//! once per socket and thread (and again every `TASK_RESEND` events), not per call, which
//! saves it two helper calls per event.

use std::collections::HashMap;

use prometheus::IntCounter;

use crate::event::{Comm, Data};
use crate::metrics::Metrics;

/// Threads remembered per generation. When the current one is full it becomes the previous one
/// (whose threads are counted as forgotten) and a new one starts: a thread still at work is
/// found in the previous generation and carried over, so only threads idle for a whole
/// generation are forgotten, and their sockets are unnamed until their next named event.
pub const MAX_THREADS: usize = 16 * 1024;

type Known = HashMap<u64, (Comm, u64), foldhash::fast::RandomState>;

pub struct Threads {
    known: Known,
    previous: Known,
    cap: usize,
    forgotten: IntCounter,
    unknown: IntCounter,
}

impl Threads {
    pub fn new(cap: usize, metrics: &Metrics) -> Self {
        Self {
            known: HashMap::default(),
            previous: HashMap::default(),
            cap,
            forgotten: metrics.thread_names.with_label_values(&["forgotten"]),
            unknown: metrics.thread_names.with_label_values(&["unknown"]),
        }
    }

    /// Learns the thread of a named event; names one that the kernel left unnamed.
    pub fn fill(&mut self, d: &mut Data<'_>) {
        let key = (u64::from(d.task.tgid) << 32) | u64::from(d.task.tid);
        if d.task_known {
            let found = match self.known.get(&key) {
                Some(&named) => Some(named),
                None => self
                    .previous
                    .remove(&key)
                    .inspect(|&named| self.insert(key, named)),
            };
            match found {
                Some((comm, cgroup_id)) => {
                    d.task.comm = comm;
                    d.task.cgroup_id = cgroup_id;
                }
                None => self.unknown.inc(),
            }
            return;
        }
        let named = (d.task.comm, d.task.cgroup_id);
        if let Some(v) = self.known.get_mut(&key) {
            *v = named;
            return;
        }
        // Not forgotten at the next turn: it is in the current generation now.
        self.previous.remove(&key);
        self.insert(key, named);
    }

    fn insert(&mut self, key: u64, named: (Comm, u64)) {
        if self.known.len() >= self.cap {
            self.forgotten.inc_by(self.previous.len() as u64);
            self.previous = std::mem::take(&mut self.known);
        }
        self.known.insert(key, named);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Direction, Task, Tuple};

    fn data(tid: u32, comm: &[u8], known: bool) -> Data<'static> {
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm);
        let addr = "127.0.0.1:1".parse().unwrap();
        Data {
            task: Task {
                tgid: 1,
                tid,
                comm: Comm(c),
                cgroup_id: if known { 0 } else { 9 },
            },
            task_known: known,
            sk: 1,
            goroutine: 0,
            tcp_seq: None,
            tuple: Tuple {
                local: addr,
                remote: addr,
            },
            sock_tuple: Default::default(),
            ts_enter_ns: 0,
            ts_exit_ns: 0,
            direction: Direction::Egress,
            bytes: 0,
            seq: 1,
            payload: &[],
            tail: &[],
            frames: &[],
            from_sock: false,
            tls: false,
            lost_requests: (0, 0),
            h2_end: None,
        }
    }

    #[test]
    fn names_what_it_was_told_and_counts_what_it_was_not() {
        let metrics = Metrics::new();
        let mut threads = Threads::new(2, &metrics);
        threads.fill(&mut data(1, b"nginx", false));
        let mut d = data(1, b"", true);
        threads.fill(&mut d);
        assert_eq!(d.task.comm.as_str(), "nginx");
        assert_eq!(d.task.cgroup_id, 9);

        let mut d = data(2, b"", true);
        threads.fill(&mut d);
        assert_eq!(d.task.comm.as_str(), "");
        assert_eq!(
            metrics.thread_names.with_label_values(&["unknown"]).get(),
            1
        );

        // Full: a new generation; threads of the one before are still found, and carried over.
        threads.fill(&mut data(2, b"curl", false));
        threads.fill(&mut data(3, b"wrk", false));
        let mut d = data(1, b"", true);
        threads.fill(&mut d);
        assert_eq!(d.task.comm.as_str(), "nginx");
        // Thread 2 was in no generation in use: forgotten, counted.
        threads.fill(&mut data(4, b"oha", false));
        assert_eq!(
            metrics.thread_names.with_label_values(&["forgotten"]).get(),
            1
        );
        let mut d = data(2, b"", true);
        threads.fill(&mut d);
        assert_eq!(d.task.comm.as_str(), "");
        let mut d = data(3, b"", true);
        threads.fill(&mut d);
        assert_eq!(d.task.comm.as_str(), "wrk");
    }
}
