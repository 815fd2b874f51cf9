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
