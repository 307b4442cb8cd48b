//! The reader thread's scheduling priority, raised while a ring buffer backs up. At its usual
//! pace the reader competes for the CPUs as any thread does; in a burst (large bodies moved at
//! full speed on busy CPUs: a Go client fetching 1 MB responses from Node.js on two cores) the
//! applications' threads ran ahead of it and the rings overflowed: 3,829-12,981 events dropped
//! of a burst, 522-4,096 with the reader raised (4 alternating runs each). A nice value ranks
//! a thread among those of its own scheduling group: where the daemon has a cgroup of its own
//! with the cpu controller (a pod, a systemd unit), its cgroup's weight decides its share
//! against the applications, and this only puts the reader ahead of the daemon's other threads.
use std::io;

use prometheus::IntCounter;

/// Raised at this fill of the fullest ring (per mille)...
const RAISE_AT: u64 = 500;
/// ...and lowered again below this one: under the fill the reader is woken at (a quarter of a
/// ring, or 1 MiB of a larger one, up to 8 MiB), so that a wake-up in a burst keeps it raised.
const LOWER_BELOW: u64 = 125;
/// The nice value while raised (never above the thread's own).
const RAISED_NICE: i32 = -10;

pub struct Priority {
    tid: libc::id_t,
    /// The thread's nice value as it started.
    base: i32,
    raised: bool,
    /// The kernel refused (no CAP_SYS_NICE): not tried again.
    refused: bool,
    raises: IntCounter,
}

impl Priority {
    /// For the calling thread.
    pub fn of_this_thread(raises: IntCounter) -> Self {
        // SAFETY: plain syscalls about this thread; errno is this thread's (-1 is a nice value
        // too: only errno tells a failure).
        let (tid, base) = unsafe {
            let tid = libc::gettid() as libc::id_t;
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
            (tid, (*libc::__errno_location() == 0).then_some(nice))
        };
        Self {
            tid,
            base: base.unwrap_or(0),
            raised: false,
            refused: base.is_none_or(|nice| nice <= RAISED_NICE),
            raises,
        }
    }

    /// Raises or lowers the priority for the fullest ring's fill (per mille), as it was before
    /// a drain.
    pub fn note(&mut self, fill: u64) {
        let raise = raised_at(self.raised, fill);
        if raise == self.raised || self.refused {
            return;
        }
        let nice = if raise { RAISED_NICE } else { self.base };
        // SAFETY: a plain syscall about this thread.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, nice) } != 0 {
            tracing::info!(
                "the reader's priority cannot be {} ({}): left at it from now on",
                if raise {
                    "raised as its ring buffers fill"
                } else {
                    "lowered back"
                },
                io::Error::last_os_error()
            );
            self.refused = true;
            return;
        }
        self.raised = raise;
        if raise {
            self.raises.inc();
        }
    }
}

/// Whether the reader should be raised, given whether it is and the fullest ring's fill.
fn raised_at(raised: bool, fill: u64) -> bool {
    fill >= if raised { LOWER_BELOW } else { RAISE_AT }
}

#[cfg(test)]
mod tests {
    use super::{Priority, raised_at};

    #[test]
    fn raised_at_half_full_and_lowered_under_an_eighth() {
        assert!(!raised_at(false, 499));
        assert!(raised_at(false, 500));
        assert!(
            raised_at(true, 250),
            "a wake-up at a quarter keeps it raised"
        );
        assert!(raised_at(true, 125));
        assert!(!raised_at(true, 124));
        assert!(!raised_at(false, 300));
    }

    fn nice() -> i32 {
        // SAFETY: a plain syscall about this thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn the_threads_nice_value_follows() {
        // On a thread of its own: the harness's threads keep their priority.
        std::thread::spawn(|| {
            let raises = prometheus::IntCounter::new("raises", "raises").unwrap();
            let mut p = Priority::of_this_thread(raises.clone());
            let base = nice();
            p.note(499);
            assert_eq!(nice(), base);
            p.note(500);
            if p.refused {
                return; // Not permitted here (no CAP_SYS_NICE).
            }
            assert_eq!((nice(), raises.get()), (-10, 1));
            p.note(250);
            assert_eq!(nice(), -10, "still raised at a quarter");
            p.note(124);
            assert_eq!(nice(), base);
            p.note(600);
            assert_eq!((nice(), raises.get()), (-10, 2));
        })
        .join()
        .unwrap();
    }
}
