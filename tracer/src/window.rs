//! Golden metrics over sliding windows (10s, 1m, 10m, as `linkerd viz stat -t`) and the
//! history behind sparklines: a ring of 10-second slots covering 10 minutes, each with its
//! request and failure counts and a log-scale latency histogram.
//!
//! Memory is bounded per series: 60 slots of 24 bytes, plus a 512-byte histogram for each slot
//! that saw a request (allocated once and reused as the ring turns).

use serde::{Deserialize, Serialize};

use crate::edges::Quantiles;

pub const SLOT_SECS: u64 = 10;
/// 10 minutes of 10-second slots.
pub const SLOTS: usize = 60;
/// Latency buckets per octave: each bucket spans 19%, so a quantile is within ~9%.
const SUB: u32 = 4;
/// 32 octaves from 1 µs: up to ~71 minutes.
const BUCKETS: usize = 32 * SUB as usize;

/// A window a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Window {
    S10,
    #[default]
    M1,
    M10,
}

impl Window {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "10s" => Ok(Self::S10),
            "1m" | "60s" => Ok(Self::M1),
            "10m" | "600s" => Ok(Self::M10),
            _ => Err(format!("unknown window {s:?}: use 10s, 1m or 10m")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::S10 => "10s",
            Self::M1 => "1m",
            Self::M10 => "10m",
        }
    }

    fn slots(self) -> u64 {
        match self {
            Self::S10 => 1,
            Self::M1 => 6,
            Self::M10 => 60,
        }
    }
}

fn bucket(us: u64) -> usize {
    let v = us.clamp(1, (1 << 32) - 1);
    let octave = 63 - v.leading_zeros();
    let sub = if octave >= 2 {
        (v >> (octave - 2)) & 3
    } else {
        (v << (2 - octave)) & 3
    };
    (octave * SUB + sub as u32) as usize
}

/// Middle of a bucket, in µs.
fn bucket_value(i: usize) -> f64 {
    let (octave, sub) = (i as u32 / SUB, i as u32 % SUB);
    let lo = f64::from(SUB + sub) * 2f64.powi(octave as i32) / f64::from(SUB);
    let hi = f64::from(SUB + sub + 1) * 2f64.powi(octave as i32) / f64::from(SUB);
    ((lo + hi) / 2.0).max(1.0)
}

#[derive(Clone, Default)]
struct Slot {
    /// Which 10-second slot since the epoch this holds.
    index: u64,
    requests: u32,
    failures: u32,
    max_us: u32,
    hist: Option<Box<[u32; BUCKETS]>>,
}

/// One series' slots.
#[derive(Clone)]
pub struct Windowed {
    slots: Box<[Slot]>,
    /// Slot index of the newest request.
    pub last: u64,
}

/// Counts and latencies summed over some slots.
pub struct Sum {
    requests: u64,
    failures: u64,
    max_us: u32,
    hist: [u64; BUCKETS],
}

impl Sum {
    fn new() -> Self {
        Self {
            requests: 0,
            failures: 0,
            max_us: 0,
            hist: [0; BUCKETS],
        }
    }

    fn add(&mut self, s: &Slot) {
        self.requests += u64::from(s.requests);
        self.failures += u64::from(s.failures);
        self.max_us = self.max_us.max(s.max_us);
        if let Some(h) = &s.hist {
            for (a, b) in self.hist.iter_mut().zip(h.iter()) {
                *a += u64::from(*b);
            }
        }
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        let n: u64 = self.hist.iter().sum();
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n.max(1));
        let mut seen = 0;
        for (i, c) in self.hist.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return (bucket_value(i) / 1000.0).min(f64::from(self.max_us) / 1000.0);
            }
        }
        f64::from(self.max_us) / 1000.0
    }

    fn quantiles(&self) -> Option<Quantiles> {
        let count: u64 = self.hist.iter().sum();
        (count > 0).then(|| Quantiles {
            count,
            p50_ms: self.quantile_ms(0.5),
            p95_ms: self.quantile_ms(0.95),
            p99_ms: self.quantile_ms(0.99),
            max_ms: f64::from(self.max_us) / 1000.0,
        })
    }

    fn stats(&self, seconds: f64) -> WindowStats {
        WindowStats {
            requests: self.requests,
            failures: self.failures,
            success_rate: crate::edges::success_rate(self.requests, self.failures),
            rps: self.requests as f64 / seconds.max(1.0),
            latency: self.quantiles(),
        }
    }
}

/// Golden metrics over a window.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct WindowStats {
    pub requests: u64,
    pub failures: u64,
    pub success_rate: f64,
    pub rps: f64,
    pub latency: Option<Quantiles>,
}

/// One 10-second slot of history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// Start of the slot, unix seconds.
    pub t: u64,
    pub requests: u64,
    pub failures: u64,
    pub rps: f64,
    pub success_rate: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The time a query is answered at, and since when the daemon has been counting.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now_s: f64,
    pub started_s: f64,
}

impl Clock {
    pub fn now(started_s: f64) -> Self {
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self { now_s, started_s }
    }

    pub fn slot(&self) -> u64 {
        self.now_s as u64 / SLOT_SECS
    }

    /// Seconds a window covers: its whole slots plus the current one, less any time before
    /// the daemon started.
    pub fn window_seconds(&self, w: Window) -> f64 {
        let first = self.slot().saturating_sub(w.slots()) * SLOT_SECS;
        self.now_s - (first as f64).max(self.started_s)
    }

    fn slot_seconds(&self, index: u64) -> f64 {
        let start = ((index * SLOT_SECS) as f64).max(self.started_s);
        let end = (((index + 1) * SLOT_SECS) as f64).min(self.now_s);
        end - start
    }
}

impl Windowed {
    pub fn new() -> Self {
        Self {
            slots: vec![Slot::default(); SLOTS].into_boxed_slice(),
            last: 0,
        }
    }

    fn slot_mut(&mut self, index: u64) -> &mut Slot {
        let s = &mut self.slots[(index % SLOTS as u64) as usize];
        if s.index != index {
            s.index = index;
            s.requests = 0;
            s.failures = 0;
            s.max_us = 0;
            if let Some(h) = &mut s.hist {
                h.fill(0);
            }
        }
        s
    }

    /// Counts a request finished in slot `index`.
    pub fn record(&mut self, index: u64, failed: bool, latency_us: Option<u64>) {
        self.last = self.last.max(index);
        let s = self.slot_mut(index);
        s.requests += 1;
        s.failures += u32::from(failed);
        if let Some(us) = latency_us {
            s.max_us = s.max_us.max(us.min(u64::from(u32::MAX)) as u32);
            s.hist.get_or_insert_with(|| Box::new([0; BUCKETS]))[bucket(us)] += 1;
        }
    }

    /// Adds another series' slots into this one (for sums over edges).
    pub fn add(&mut self, other: &Windowed) {
        for s in other.slots.iter().filter(|s| s.requests > 0) {
            let d = self.slot_mut(s.index);
            d.requests += s.requests;
            d.failures += s.failures;
            d.max_us = d.max_us.max(s.max_us);
            if let Some(h) = &s.hist {
                let dh = d.hist.get_or_insert_with(|| Box::new([0; BUCKETS]));
                for (a, b) in dh.iter_mut().zip(h.iter()) {
                    *a += b;
                }
            }
        }
        self.last = self.last.max(other.last);
    }

    /// No request for the whole history.
    pub fn idle(&self, clock: &Clock) -> bool {
        self.last + (SLOTS as u64) <= clock.slot()
    }

    fn sum(&self, from: u64, to: u64) -> Sum {
        let mut sum = Sum::new();
        for s in &self.slots {
            if s.requests > 0 && s.index >= from && s.index <= to {
                sum.add(s);
            }
        }
        sum
    }

    pub fn stats(&self, clock: &Clock, w: Window) -> WindowStats {
        let now = clock.slot();
        self.sum(now.saturating_sub(w.slots()), now)
            .stats(clock.window_seconds(w))
    }

    /// One point per slot over the last 10 minutes, from the daemon's start, oldest first.
    pub fn history(&self, clock: &Clock) -> Vec<Point> {
        let now = clock.slot();
        let first = (now + 1)
            .saturating_sub(SLOTS as u64)
            .max(clock.started_s as u64 / SLOT_SECS);
        (first..=now)
            .map(|i| {
                let sum = self.sum(i, i);
                let q = sum.quantiles();
                Point {
                    t: i * SLOT_SECS,
                    requests: sum.requests,
                    failures: sum.failures,
                    rps: sum.requests as f64 / clock.slot_seconds(i).max(1.0),
                    success_rate: crate::edges::success_rate(sum.requests, sum.failures),
                    p50_ms: q.as_ref().map(|q| q.p50_ms),
                    p99_ms: q.as_ref().map(|q| q.p99_ms),
                }
            })
            .collect()
    }
}

impl Default for Windowed {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_close() {
        let mut last = 0;
        for us in [1u64, 2, 3, 4, 5, 7, 8, 100, 1000, 1234, 65_536, 1 << 31] {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            last = b;
            let v = bucket_value(b);
            assert!((v - us as f64).abs() / us as f64 <= 0.25, "{us} -> {v}");
        }
        assert!(bucket(u64::MAX) < BUCKETS);
    }

    #[test]
    fn windows_and_history() {
        let started = 1_000_000.0;
        let mut w = Windowed::new();
        let slot0 = 1_000_000 / SLOT_SECS;
        for i in 0..100 {
            w.record(slot0, i % 10 == 0, Some(1000 + i));
        }
        for _ in 0..50 {
            w.record(slot0 + 3, false, Some(5000));
        }
        let clock = Clock {
            now_s: started + 35.0,
            started_s: started,
        };
        let m1 = w.stats(&clock, Window::M1);
        assert_eq!(m1.requests, 150);
        assert_eq!(m1.failures, 10);
        assert!((m1.rps - 150.0 / 35.0).abs() < 1e-9);
        let s10 = w.stats(&clock, Window::S10);
        assert_eq!(s10.requests, 50);
        let q = m1.latency.expect("latency");
        assert!((q.p50_ms - 1.05).abs() < 0.15, "{q:?}");
        assert!((q.p99_ms - 5.0).abs() < 0.6, "{q:?}");
        let h = w.history(&clock);
        assert_eq!(h.len(), 4);
        assert_eq!(h[0].requests, 100);
        assert_eq!(h[3].requests, 50);
        assert!((h[3].rps - 10.0).abs() < 1e-9);
        // Ten minutes later it is idle and shows nothing.
        let later = Clock {
            now_s: started + 700.0,
            started_s: started,
        };
        assert!(w.idle(&later));
        assert_eq!(w.stats(&later, Window::M10).requests, 0);
    }
}
