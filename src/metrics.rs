//! Process-wide counters and the Prometheus text rendering of `/metrics`.
//!
//! Plain atomics, shared behind an `Arc` and handed to whoever counts; no actor round-trip on the
//! hot path. Gauges that actors own (rooms, subscriptions) are set by those actors.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use crate::protocol::{close, EventType};

/// Upper bounds (seconds) of the broker-to-socket latency histogram.
const LATENCY_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Close codes counted individually (every code jobcast sends); others (a client's own) fall into
/// `other`.
const CLOSE_CODES: [u16; close::CODES.len()] = close::CODES;

/// Every counter jobcast exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: AtomicU64,
    /// WebSocket connections accepted since start.
    pub connections_total: AtomicU64,
    /// Room actors alive.
    pub rooms: AtomicU64,
    /// Room subscriptions across all connections.
    pub subscriptions: AtomicU64,
    /// Room events published.
    pub published: AtomicU64,
    /// Room messages a subscribed connection was not sent: refused past its slow-consumer bound, or
    /// left unwritten when it closed (each such connection was closed; `since` replays them).
    pub dropped: AtomicU64,
    /// Room events released by client acks (`ack=1`).
    pub acknowledged: AtomicU64,
    /// Room events sent again after `ack_timeout_ms`.
    pub redelivered: AtomicU64,
    /// Connections closed with 4008 "slow consumer".
    pub slow_consumers: AtomicU64,
    /// Connections closed with 4008 "ack timeout".
    pub ack_timeouts: AtomicU64,
    /// Upload bodies being received.
    pub uploads_in_progress: AtomicU64,
    /// Uploads refused by a per-tenant quota (429) or the free-disk floor (507).
    pub quota_refusals: AtomicU64,
    /// Messages and bytes written to sockets, by event type.
    sent: [(AtomicU64, AtomicU64); EventType::COUNT],
    /// Closes by code (index into `CLOSE_CODES`, last slot for other codes).
    closes: [AtomicU64; CLOSE_CODES.len() + 1],
    /// Authentication failures by reason.
    auth_failures: Mutex<Vec<(String, u64)>>,
    /// Broker-to-socket latency: bucket counts, then sum in microseconds and count.
    latency: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
}

impl Metrics {
    /// Counts one message of `kind` with `bytes` of payload written to a socket.
    pub fn sent(&self, kind: EventType, bytes: usize) {
        let (n, b) = &self.sent[kind.index()];
        n.fetch_add(1, Relaxed);
        b.fetch_add(bytes as u64, Relaxed);
    }

    /// Counts one close with `code`.
    pub fn closed(&self, code: u16) {
        let i = CLOSE_CODES.iter().position(|c| *c == code).unwrap_or(CLOSE_CODES.len());
        self.closes[i].fetch_add(1, Relaxed);
    }

    /// Counts one authentication failure.
    pub fn auth_failed(&self, reason: &str) {
        let Ok(mut list) = self.auth_failures.lock() else {
            return;
        };
        match list.iter_mut().find(|(r, _)| r == reason) {
            Some((_, n)) => *n += 1,
            None => list.push((reason.to_string(), 1)),
        }
    }

    /// Records one broker-to-socket latency.
    pub fn observe_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_sum_us.fetch_add(d.as_micros() as u64, Relaxed);
        self.latency_count.fetch_add(1, Relaxed);
    }

    /// Total messages written to sockets.
    pub fn messages_sent(&self) -> u64 {
        self.sent.iter().map(|(n, _)| n.load(Relaxed)).sum()
    }

    /// Total bytes written to sockets.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.iter().map(|(_, b)| b.load(Relaxed)).sum()
    }

    /// Authentication failures so far, all reasons.
    pub fn auth_failures_total(&self) -> u64 {
        self.auth_failures.lock().map(|l| l.iter().map(|(_, n)| n).sum()).unwrap_or(0)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut out, "jobcast_connections", "Open WebSocket connections.", self.connections.load(Relaxed));
        gauge(&mut out, "jobcast_rooms", "Active rooms.", self.rooms.load(Relaxed));
        gauge(&mut out, "jobcast_subscriptions", "Room subscriptions.", self.subscriptions.load(Relaxed));
        gauge(
            &mut out,
            "jobcast_uploads_in_progress",
            "Upload bodies being received.",
            self.uploads_in_progress.load(Relaxed),
        );
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            &mut out,
            "jobcast_connections_total",
            "WebSocket connections accepted.",
            self.connections_total.load(Relaxed),
        );
        counter(&mut out, "jobcast_events_published_total", "Room events published.", self.published.load(Relaxed));
        for (name, help, value) in [
            ("jobcast_messages_dropped_total", "Room messages a subscribed connection was not sent (refused past its slow-consumer bound, or unwritten when it closed); `since` replays them.", &self.dropped),
            ("jobcast_acknowledged_total", "Room events acknowledged by clients.", &self.acknowledged),
            ("jobcast_redelivered_total", "Room events sent again for want of an ack.", &self.redelivered),
            ("jobcast_slow_consumer_closes_total", "Connections closed as slow consumers.", &self.slow_consumers),
            ("jobcast_ack_timeout_closes_total", "Connections closed for unacknowledged events.", &self.ack_timeouts),
            ("jobcast_quota_refusals_total", "Uploads refused by a per-tenant quota (429) or the free-disk floor (507).", &self.quota_refusals),
        ] {
            counter(&mut out, name, help, value.load(Relaxed));
        }

        out.push_str("# HELP jobcast_messages_sent_total Messages written to sockets, by type.\n# TYPE jobcast_messages_sent_total counter\n");
        for (t, (n, _)) in EventType::ALL.iter().zip(&self.sent) {
            let _ = writeln!(out, "jobcast_messages_sent_total{{type=\"{}\"}} {}", t.as_str(), n.load(Relaxed));
        }
        out.push_str("# HELP jobcast_bytes_sent_total Payload bytes written to sockets, by type.\n# TYPE jobcast_bytes_sent_total counter\n");
        for (t, (_, b)) in EventType::ALL.iter().zip(&self.sent) {
            let _ = writeln!(out, "jobcast_bytes_sent_total{{type=\"{}\"}} {}", t.as_str(), b.load(Relaxed));
        }
        out.push_str("# HELP jobcast_auth_failures_total Authentication failures, by reason.\n# TYPE jobcast_auth_failures_total counter\n");
        if let Ok(list) = self.auth_failures.lock() {
            for (reason, n) in list.iter() {
                let _ = writeln!(out, "jobcast_auth_failures_total{{reason=\"{reason}\"}} {n}");
            }
        }
        out.push_str("# HELP jobcast_closes_total WebSocket closes, by code.\n# TYPE jobcast_closes_total counter\n");
        for (i, n) in self.closes.iter().enumerate() {
            let code = CLOSE_CODES.get(i).map(|c| c.to_string()).unwrap_or_else(|| "other".into());
            let _ = writeln!(out, "jobcast_closes_total{{code=\"{code}\"}} {}", n.load(Relaxed));
        }
        out.push_str("# HELP jobcast_delivery_latency_seconds Broker encode to socket write.\n# TYPE jobcast_delivery_latency_seconds histogram\n");
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&self.latency) {
            let _ = writeln!(out, "jobcast_delivery_latency_seconds_bucket{{le=\"{bound}\"}} {}", n.load(Relaxed));
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(out, "jobcast_delivery_latency_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ =
            writeln!(out, "jobcast_delivery_latency_seconds_sum {}", self.latency_sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "jobcast_delivery_latency_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family() {
        let m = Metrics::default();
        m.sent(EventType::Info, 10);
        m.closed(4029);
        m.closed(1234);
        m.auth_failed("expired");
        m.observe_latency(Duration::from_micros(700));
        let text = m.render();
        assert!(text.contains("jobcast_messages_sent_total{type=\"info\"} 1"));
        assert!(text.contains("jobcast_bytes_sent_total{type=\"info\"} 10"));
        assert!(text.contains("jobcast_closes_total{code=\"4029\"} 1"));
        assert!(text.contains("jobcast_closes_total{code=\"other\"} 1"));
        assert!(text.contains("jobcast_auth_failures_total{reason=\"expired\"} 1"));
        assert!(text.contains("jobcast_delivery_latency_seconds_bucket{le=\"0.0005\"} 0"));
        assert!(text.contains("jobcast_delivery_latency_seconds_bucket{le=\"0.001\"} 1"));
        assert!(text.contains("jobcast_delivery_latency_seconds_count 1"));
    }
}
