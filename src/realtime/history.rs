//! The per-room history ring: the last `history_size` events, each kept for `history_ttl`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::framing::Encoded;

/// What a `since` position yields against the history.
#[derive(Debug)]
pub enum Replay {
    /// Every event after `since` is still held; these are they, in order (possibly none).
    Recovered(Vec<Arc<Encoded>>),
    /// The history cannot fill the gap (trimmed, expired, `since` ahead of the newest seq).
    Lost,
}

/// A bounded, time-limited ring of encoded events with consecutive `seq`s.
#[derive(Debug)]
pub struct HistoryRing {
    /// Events in `seq` order, oldest first; `seq`s are consecutive.
    events: VecDeque<(u64, Instant, Arc<Encoded>)>,
    /// Most events kept.
    capacity: usize,
    /// How long an event is kept.
    ttl: Duration,
}

impl HistoryRing {
    /// An empty ring.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        HistoryRing { events: VecDeque::new(), capacity, ttl }
    }

    /// Appends the event with `seq` (one more than the last pushed), trimming to capacity.
    pub fn push(&mut self, seq: u64, event: Arc<Encoded>, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        if let Some((last, _, _)) = self.events.back() {
            if *last + 1 != seq {
                // A gap means the ring no longer holds a consecutive run: start over from here.
                self.events.clear();
            }
        }
        self.events.push_back((seq, now, event));
        while self.events.len() > self.capacity {
            self.events.pop_front();
        }
    }

    /// The oldest `seq` held.
    pub fn oldest(&self) -> Option<u64> {
        self.events.front().map(|(seq, _, _)| *seq)
    }

    /// Puts a run of older events in front, keeping the newest `capacity`. The run must have
    /// consecutive `seq`s ending right before the oldest held, or, when the ring is empty, at `head`
    /// (the room's newest); any other run is ignored, so the ring never holds a gap.
    pub fn prepend(&mut self, run: Vec<(u64, Instant, Arc<Encoded>)>, head: u64) -> bool {
        let end = self.oldest().map_or(head, |oldest| oldest.saturating_sub(1));
        let fits = run.windows(2).all(|w| w[0].0 + 1 == w[1].0) && run.last().is_some_and(|(last, _, _)| *last == end);
        if !fits || self.capacity == 0 {
            return false;
        }
        for e in run.into_iter().rev() {
            if self.events.len() >= self.capacity {
                break;
            }
            self.events.push_front(e);
        }
        true
    }

    /// Drops events older than the ttl.
    pub fn expire(&mut self, now: Instant) {
        while let Some((_, at, _)) = self.events.front() {
            if now.saturating_duration_since(*at) > self.ttl {
                self.events.pop_front();
            } else {
                break;
            }
        }
    }

    /// Events after `since`, given the room's newest seq `head`.
    pub fn since(&mut self, since: u64, head: u64, now: Instant) -> Replay {
        self.expire(now);
        if since > head {
            return Replay::Lost;
        }
        if since == head {
            return Replay::Recovered(Vec::new());
        }
        match self.events.front() {
            Some((oldest, _, _)) if *oldest <= since + 1 => {
                let skip = (since + 1 - oldest) as usize;
                Replay::Recovered(self.events.iter().skip(skip).map(|(_, _, e)| e.clone()).collect())
            }
            _ => Replay::Lost,
        }
    }

    /// Number of events held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no events are held.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Envelope, Event};

    fn ev(seq: u64) -> Arc<Encoded> {
        let mut env = Envelope::direct(Event::Info(serde_json::json!({})));
        env.seq = Some(seq);
        Arc::new(Encoded::new(&env, 1024).unwrap())
    }

    #[test]
    fn an_older_run_goes_in_front_and_the_newest_are_kept() {
        let now = Instant::now();
        let mut ring = HistoryRing::new(5, Duration::from_secs(60));
        ring.push(8, ev(8), now);
        ring.push(9, ev(9), now);
        ring.prepend((3..8).map(|s| (s, now, ev(s))).collect(), 9);
        assert_eq!(seqs(ring.since(4, 9, now)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(ring.oldest(), Some(5));
        // A run that leaves a gap is not taken.
        ring.prepend(vec![(1, now, ev(1))], 9);
        assert_eq!(ring.oldest(), Some(5));
        // Into an empty ring, only a run that reaches the room's newest event.
        let mut empty = HistoryRing::new(5, Duration::from_secs(60));
        empty.prepend((1..4).map(|s| (s, now, ev(s))).collect(), 4);
        assert_eq!(empty.oldest(), None, "a run short of the head would hide a gap");
        empty.prepend((1..5).map(|s| (s, now, ev(s))).collect(), 4);
        assert_eq!(seqs(empty.since(0, 4, now)), Some(vec![1, 2, 3, 4]));
    }

    fn seqs(r: Replay) -> Option<Vec<u64>> {
        match r {
            Replay::Recovered(v) => Some(v.iter().map(|e| e.seq.unwrap()).collect()),
            Replay::Lost => None,
        }
    }

    #[test]
    fn replays_exactly_the_events_after_since() {
        let now = Instant::now();
        let mut h = HistoryRing::new(10, Duration::from_secs(60));
        for s in 1..=5 {
            h.push(s, ev(s), now);
        }
        assert_eq!(seqs(h.since(2, 5, now)), Some(vec![3, 4, 5]));
        assert_eq!(seqs(h.since(0, 5, now)), Some(vec![1, 2, 3, 4, 5]));
        assert_eq!(seqs(h.since(5, 5, now)), Some(vec![]));
        assert_eq!(seqs(h.since(6, 5, now)), None, "since ahead of head");
    }

    #[test]
    fn trimmed_history_cannot_recover() {
        let now = Instant::now();
        let mut h = HistoryRing::new(3, Duration::from_secs(60));
        for s in 1..=6 {
            h.push(s, ev(s), now);
        }
        assert_eq!(h.len(), 3);
        assert_eq!(seqs(h.since(2, 6, now)), None);
        assert_eq!(seqs(h.since(3, 6, now)), Some(vec![4, 5, 6]));
    }

    #[test]
    fn expired_events_are_gone() {
        let t0 = Instant::now();
        let mut h = HistoryRing::new(10, Duration::from_secs(5));
        h.push(1, ev(1), t0);
        h.push(2, ev(2), t0 + Duration::from_secs(4));
        let later = t0 + Duration::from_secs(6);
        assert_eq!(seqs(h.since(0, 2, later)), None);
        assert_eq!(seqs(h.since(1, 2, later)), Some(vec![2]));
    }

    #[test]
    fn zero_capacity_keeps_nothing() {
        let now = Instant::now();
        let mut h = HistoryRing::new(0, Duration::from_secs(5));
        h.push(1, ev(1), now);
        assert!(h.is_empty());
        assert_eq!(seqs(h.since(0, 1, now)), None);
    }
}
