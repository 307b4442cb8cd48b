//! The reader thread's scheduling priority, raised while a ring buffer backs up. At its usual
//! pace the reader competes for the CPUs as any thread does; in a burst (large bodies moved at
//! full speed on busy CPUs: a Go client fetching 1 MB responses from Node.js on two cores) the
//! applications' threads ran ahead of it and the rings overflowed: ~2,200 events dropped of a
//! burst, ~900 with the reader at nice -10 (3 alternating runs each).
use std::io;

use prometheus::IntCounter;

/// Raised at this fill of the fullest ring (per mille)...
const RAISE_AT: u64 = 500;
/// ...and lowered again below this one.
const LOWER_BELOW: u64 = 250;
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
        let raise = if self.raised {
            fill >= LOWER_BELOW
        } else {
            fill >= RAISE_AT
        };
        if raise == self.raised || self.refused {
            return;
        }
        let nice = if raise { RAISED_NICE } else { self.base };
        // SAFETY: a plain syscall about this thread.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, nice) } != 0 {
            tracing::info!(
                "the reader's priority cannot be raised as its ring buffers fill ({}): left as it is",
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

#[cfg(test)]
mod tests {
    use super::Priority;

    fn nice() -> i32 {
        // SAFETY: a plain syscall about this thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn raised_at_half_full_and_lowered_under_a_quarter() {
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
            p.note(249);
            assert_eq!(nice(), base);
            p.note(600);
            assert_eq!((nice(), raises.get()), (-10, 2));
        })
        .join()
        .unwrap();
    }
}
