//! Progress arithmetic for jobs: stage bands, monotonic progress, a smoothed ETA, and the
//! coalescer that limits `processing_progress` to `progress_max_rate_per_s` per job.

use std::time::{Duration, Instant};

use crate::protocol::Stage;

/// The CSV import's stages in order, each a band of 20 points of progress (contract §6).
const STAGES: [Stage; 5] = [Stage::Validation, Stage::Scanning, Stage::Parsing, Stage::Database, Stage::Categorization];

/// The stage whose band holds `progress`.
pub fn stage_at(progress: f64) -> Stage {
    let i = ((progress / 20.0).floor().max(0.0) as usize).min(STAGES.len() - 1);
    STAGES[i].clone()
}

/// Overall progress during validation: `done` of `total` bytes checked.
pub fn validation_progress(done: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    20.0 * (done.min(total) as f64 / total as f64)
}

/// Overall progress once validation is over: a zone scans, parses, stores and categorizes its rows
/// in one piece of work, so each stored zone moves progress by its share of the 20–100 band; the
/// stage bands then tell how far through the file the job is, not which step a zone is at.
pub fn zone_progress(zones_done: u64, zones: u64) -> f64 {
    if zones == 0 {
        return 100.0;
    }
    20.0 + 80.0 * (zones_done.min(zones) as f64 / zones as f64)
}

/// A progress value that never goes down and stays below 100 until the job completes.
#[derive(Debug, Clone, Default)]
pub struct Monotonic {
    value: f64,
}

impl Monotonic {
    /// Raises the value to `p` (capped at 99.9); returns the current value.
    pub fn raise(&mut self, p: f64) -> f64 {
        let p = (p.clamp(0.0, 99.9) * 10.0).floor() / 10.0;
        if p > self.value {
            self.value = p;
        }
        self.value
    }

    /// The value now.
    pub fn get(&self) -> f64 {
        self.value
    }
}

/// Estimated time to completion from an exponentially smoothed rate of progress.
#[derive(Debug, Clone)]
pub struct Eta {
    started: Instant,
    last: Option<(Instant, f64)>,
    /// Smoothed progress points per second.
    rate: Option<f64>,
    samples: u32,
}

impl Eta {
    /// Smoothing factor of the rate.
    const ALPHA: f64 = 0.3;

    /// A fresh estimator.
    pub fn new(now: Instant) -> Self {
        Eta { started: now, last: None, rate: None, samples: 0 }
    }

    /// Records that progress was `p` at `now`.
    pub fn update(&mut self, now: Instant, p: f64) {
        if let Some((t, prev)) = self.last {
            let dt = now.saturating_duration_since(t).as_secs_f64();
            if dt < 0.05 {
                return;
            }
            let r = ((p - prev) / dt).max(0.0);
            self.rate = Some(match self.rate {
                Some(old) => Self::ALPHA * r + (1.0 - Self::ALPHA) * old,
                None => r,
            });
            self.samples += 1;
        }
        self.last = Some((now, p));
    }

    /// Seconds left at progress `p`; `None` until there are three samples over at least a second.
    pub fn seconds_left(&self, now: Instant, p: f64) -> Option<f64> {
        let rate = self.rate?;
        if self.samples < 3 || now.saturating_duration_since(self.started) < Duration::from_secs(1) || rate <= 0.0 {
            return None;
        }
        Some(((100.0 - p).max(0.0) / rate * 10.0).round() / 10.0)
    }
}

/// Lets at most one value through per interval; the latest value waiting wins.
#[derive(Debug, Clone)]
pub struct Coalescer<T> {
    interval: Duration,
    last_emit: Option<Instant>,
    pending: Option<T>,
}

impl<T> Coalescer<T> {
    /// At most `rate_per_s` values a second (0 means no limit).
    pub fn new(rate_per_s: u32) -> Self {
        let interval =
            if rate_per_s == 0 { Duration::ZERO } else { Duration::from_secs_f64(1.0 / f64::from(rate_per_s)) };
        Coalescer { interval, last_emit: None, pending: None }
    }

    /// Offers a value: returns it when it may go now, else keeps it (replacing an older one).
    pub fn offer(&mut self, now: Instant, value: T) -> Option<T> {
        match self.last_emit {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.pending = Some(value);
                None
            }
            _ => {
                self.last_emit = Some(now);
                self.pending = None;
                Some(value)
            }
        }
    }

    /// How long until the waiting value may go, if one waits.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.pending.as_ref()?;
        let since = self.last_emit.map(|t| now.saturating_duration_since(t)).unwrap_or(self.interval);
        Some(self.interval.saturating_sub(since))
    }

    /// The waiting value, if its time has come.
    pub fn take_due(&mut self, now: Instant) -> Option<T> {
        if self.wait(now)? > Duration::ZERO {
            return None;
        }
        self.last_emit = Some(now);
        self.pending.take()
    }

    /// Drops the waiting value (a later event supersedes it).
    pub fn clear(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_bands() {
        assert_eq!(stage_at(0.0), Stage::Validation);
        assert_eq!(stage_at(19.9), Stage::Validation);
        assert_eq!(stage_at(20.0), Stage::Scanning);
        assert_eq!(stage_at(40.0), Stage::Parsing);
        assert_eq!(stage_at(65.0), Stage::Database);
        assert_eq!(stage_at(100.0), Stage::Categorization);
    }

    #[test]
    fn weighted_progress() {
        assert_eq!(validation_progress(50, 100), 10.0);
        assert_eq!(validation_progress(200, 100), 20.0);
        assert_eq!(zone_progress(0, 10), 20.0);
        assert_eq!(zone_progress(5, 10), 60.0);
        assert_eq!(zone_progress(10, 10), 100.0);
        assert_eq!(zone_progress(12, 10), 100.0);
        assert_eq!(zone_progress(0, 0), 100.0);
    }

    #[test]
    fn progress_never_goes_down_and_waits_for_completion_to_reach_100() {
        let mut m = Monotonic::default();
        assert_eq!(m.raise(30.0), 30.0);
        assert_eq!(m.raise(25.0), 30.0);
        assert_eq!(m.raise(100.0), 99.9);
        assert_eq!(m.get(), 99.9);
    }

    #[test]
    fn eta_appears_once_the_rate_is_known() {
        let t0 = Instant::now();
        let mut eta = Eta::new(t0);
        eta.update(t0, 0.0);
        assert_eq!(eta.seconds_left(t0, 0.0), None);
        for i in 1..=4u64 {
            eta.update(t0 + Duration::from_millis(500 * i), 5.0 * i as f64);
        }
        // 10 points a second, 80 left.
        let left = eta.seconds_left(t0 + Duration::from_secs(2), 20.0).unwrap();
        assert!((left - 8.0).abs() < 0.01, "{left}");
    }

    #[test]
    fn eta_stays_absent_when_nothing_moves() {
        let t0 = Instant::now();
        let mut eta = Eta::new(t0);
        for i in 0..5u64 {
            eta.update(t0 + Duration::from_secs(i), 10.0);
        }
        assert_eq!(eta.seconds_left(t0 + Duration::from_secs(5), 10.0), None);
    }

    #[test]
    fn coalescer_lets_the_latest_value_through_per_interval() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(4); // 250 ms
        assert_eq!(c.offer(t0, 1), Some(1));
        assert_eq!(c.offer(t0 + Duration::from_millis(10), 2), None);
        assert_eq!(c.offer(t0 + Duration::from_millis(20), 3), None);
        assert_eq!(c.wait(t0 + Duration::from_millis(50)), Some(Duration::from_millis(200)));
        assert_eq!(c.take_due(t0 + Duration::from_millis(100)), None);
        assert_eq!(c.take_due(t0 + Duration::from_millis(250)), Some(3), "latest wins");
        assert_eq!(c.wait(t0 + Duration::from_millis(260)), None);
        assert_eq!(c.offer(t0 + Duration::from_millis(600), 4), Some(4));
        let mut unlimited = Coalescer::new(0);
        assert_eq!(unlimited.offer(t0, 1), Some(1));
        assert_eq!(unlimited.offer(t0, 2), Some(2));
    }
}
