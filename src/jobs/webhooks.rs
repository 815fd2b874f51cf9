//! The `Webhooks` actor: delivers job terminal events (`job.completed`, `job.failed`,
//! `job.cancelled`, `job.stalled`) to the endpoints of the job's tenant, from the durable outbox of
//! `db::outbox`, signed as the Standard Webhooks specification describes:
//! `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">`. A message is retried on a non-2xx answer or a timeout (10 s) with
//! exponential backoff (`webhook_backoff_initial_ms`, doubling up to `webhook_backoff_max_s`), at
//! most `webhook_max_attempts` times, with the same `webhook-id` on every attempt. The outbox is in
//! the store, so messages survive restarts; every attempt is logged.

use std::time::Duration;

use actix::prelude::*;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;

pub use crate::config::PrivateAllow;
use crate::db::outbox::{Attempted, ClaimDue, Due, Enqueue};
use crate::db::sqlite::now_ms;
use crate::db::StoreAddr;
use crate::protocol::{now_rfc3339, JobSnapshot};

/// Attempts in flight at once, across endpoints.
const IN_FLIGHT: usize = 8;
/// How long an endpoint has to answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How often the outbox is looked at (and at once when a message is enqueued).
const POLL: Duration = Duration::from_millis(500);

/// The event types a webhook may take.
pub const EVENTS: [&str; 4] = ["job.completed", "job.failed", "job.cancelled", "job.stalled"];

/// Checks where `url` leads: every address its host resolves to must be public or allowed.
pub async fn check_target(url: &str, allow: &PrivateAllow) -> Result<(), TargetError> {
    let uri: awc::http::Uri = url.parse().map_err(|e| TargetError::Refused(format!("not a URL: {e}")))?;
    let host = uri.host().ok_or(TargetError::Refused("no host".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
    let lookup = tokio::time::timeout(TIMEOUT, tokio::net::lookup_host((host.as_str(), port)));
    let addrs: Vec<std::net::SocketAddr> = match lookup.await {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => return Err(TargetError::Unresolved(format!("{host} does not resolve: {e}"))),
        Err(_) => return Err(TargetError::Unresolved(format!("{host} did not resolve within 10 s"))),
    };
    if addrs.is_empty() {
        return Err(TargetError::Unresolved(format!("{host} does not resolve")));
    }
    match addrs.iter().find(|a| !allow.allows(a.ip())) {
        Some(a) => Err(TargetError::Refused(format!(
            "{host} is {}, a private address (webhook_private_allow does not name it)",
            a.ip()
        ))),
        None => Ok(()),
    }
}

/// Why a webhook URL was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetError {
    /// It leads to a private address not allowed, or is no URL: for good.
    Refused(String),
    /// Its host did not resolve (now): an attempt is tried again later.
    Unresolved(String),
}

impl std::fmt::Display for TargetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetError::Refused(why) | TargetError::Unresolved(why) => f.write_str(why),
        }
    }
}

/// The webhook event of a job that reached `status`, if it is terminal.
pub fn webhook_event(status: &crate::protocol::JobStatus) -> Option<&'static str> {
    use crate::protocol::JobStatus;
    match status {
        JobStatus::Completed => Some("job.completed"),
        JobStatus::Failed => Some("job.failed"),
        JobStatus::Cancelled => Some("job.cancelled"),
        _ => None,
    }
}

/// The retry settings.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// `webhook_backoff_initial_ms`.
    pub initial: Duration,
    /// `webhook_backoff_max_s`.
    pub max: Duration,
    /// `webhook_max_attempts`.
    pub attempts: u32,
}

impl Backoff {
    /// The wait after failed attempt `n` (1 for the first): initial × 2^(n-1), at most `max`.
    pub fn after(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1));
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// The bytes of a webhook secret: a `whsec_<base64>` secret is that base64's bytes, any other its
/// UTF-8 bytes.
pub fn secret_bytes(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    // HMAC takes keys of any length.
    let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(&secret_bytes(secret)) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body.as_bytes());
    let tag = mac.finalize().into_bytes();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag))
}

/// A new secret: `whsec_` and 24 random bytes in base64.
pub fn new_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Why an attempt was not answered.
enum Refused {
    /// The URL leads to a private address not allowed: given up at once.
    Target(String),
    /// The request failed (refused connection, timeout, ...): tried again.
    Send(String),
}

/// A job ended (or stalled): its tenant's webhooks that take `event` get its snapshot.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct JobEvent {
    /// `job.completed`, `job.failed`, `job.cancelled` or `job.stalled`.
    pub event: &'static str,
    /// The job as it is now.
    pub snapshot: JobSnapshot,
}

/// The delivery actor.
pub struct Webhooks {
    store: StoreAddr,
    backoff: Backoff,
    allow: PrivateAllow,
    client: awc::Client,
    in_flight: usize,
    /// The messages being sent now: never claimed again by this node meanwhile.
    sending: std::collections::HashSet<(String, uuid::Uuid)>,
    claiming: bool,
}

impl Webhooks {
    /// Delivers from `store`'s outbox.
    pub fn new(store: StoreAddr, backoff: Backoff, allow: PrivateAllow) -> Webhooks {
        let client = awc::Client::builder().timeout(TIMEOUT).disable_redirects().finish();
        Webhooks { store, backoff, allow, client, in_flight: 0, sending: Default::default(), claiming: false }
    }

    fn claim(&mut self, ctx: &mut Context<Self>) {
        if self.claiming || self.in_flight >= IN_FLIGHT {
            return;
        }
        self.claiming = true;
        let claim = self.store.send(ClaimDue { now_ms: now_ms(), limit: (IN_FLIGHT - self.in_flight) as i64 });
        ctx.spawn(claim.into_actor(self).map(|answer, hooks, ctx| {
            hooks.claiming = false;
            let due = match answer {
                Ok(Ok(due)) => due,
                Ok(Err(e)) => return tracing::warn!(error = %e, "webhook outbox unreadable; retried shortly"),
                Err(e) => return tracing::warn!(error = %e, "webhook outbox unreachable; retried shortly"),
            };
            for d in due {
                if !hooks.sending.contains(&(d.msg_id.clone(), d.webhook_id)) {
                    hooks.deliver(d, ctx);
                }
            }
        }));
    }

    fn deliver(&mut self, d: Due, ctx: &mut Context<Self>) {
        self.in_flight += 1;
        self.sending.insert((d.msg_id.clone(), d.webhook_id));
        let attempt = d.attempts + 1;
        let timestamp = now_ms() / 1000;
        let signed = signature(&d.secret, &d.msg_id, timestamp, &d.body);
        let client = self.client.clone();
        let (url, allow) = (d.url.clone(), self.allow.clone());
        let (id, body) = (d.msg_id.clone(), d.body.clone());
        // Where the URL leads now (DNS may have changed since it was registered) is checked first.
        let request = async move {
            check_target(&url, &allow).await.map_err(|e| match e {
                TargetError::Refused(why) => Refused::Target(why),
                TargetError::Unresolved(why) => Refused::Send(why),
            })?;
            client
                .post(&url)
                .insert_header(("content-type", "application/json"))
                .insert_header(("webhook-id", id))
                .insert_header(("webhook-timestamp", timestamp.to_string()))
                .insert_header(("webhook-signature", signed))
                .insert_header(("user-agent", concat!("jobcast/", env!("CARGO_PKG_VERSION"))))
                .send_body(body)
                .await
                .map_err(|e| Refused::Send(e.to_string()))
        };
        let span = tracing::info_span!("webhook", msg = %d.msg_id, webhook = %d.webhook_id, attempt);
        let at_ms = now_ms();
        ctx.spawn(request.into_actor(self).map(move |answer, hooks, ctx| {
            hooks.in_flight -= 1;
            let _g = span.enter();
            let (status, error, refused) = match answer {
                Ok(res) if res.status().is_success() => (Some(res.status().as_u16()), None, false),
                Ok(res) => (Some(res.status().as_u16()), Some(format!("answered {}", res.status())), false),
                Err(Refused::Send(e)) => (None, Some(e), false),
                Err(Refused::Target(e)) => (None, Some(format!("refused: {e}")), true),
            };
            let next_at_ms = match &error {
                None => None,
                Some(_) if refused => {
                    tracing::warn!(error = ?error, "webhook refused: its URL leads to a private address");
                    None
                }
                Some(_) if attempt >= i64::from(hooks.backoff.attempts) => {
                    tracing::warn!(?status, error = ?error, "webhook given up after its last attempt");
                    None
                }
                Some(_) => {
                    let wait = hooks.backoff.after(attempt as u32);
                    tracing::info!(?status, error = ?error, retry_in_ms = wait.as_millis() as u64, "webhook attempt failed");
                    Some(now_ms() + wait.as_millis() as i64)
                }
            };
            if error.is_none() {
                tracing::info!(?status, "webhook delivered");
            }
            let key = (d.msg_id.clone(), d.webhook_id);
            let record = Attempted { msg_id: d.msg_id, webhook_id: d.webhook_id, attempt, at_ms, status, error, next_at_ms };
            // Unrecorded (the store away), the claim runs out and the attempt is made again. This
            // node does not claim it again before the record is written.
            let recorded = hooks.store.send(record);
            ctx.spawn(recorded.into_actor(hooks).map(move |answer, hooks, ctx| {
                if let Ok(Err(e)) | Err(e) = answer.map_err(|e| crate::db::sqlite::StoreError::new(e.to_string())) {
                    tracing::warn!(error = %e, "a webhook attempt was not recorded; it is made again");
                }
                hooks.sending.remove(&key);
                hooks.claim(ctx);
            }));
        }));
    }
}

impl Actor for Webhooks {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(POLL, |hooks, ctx| hooks.claim(ctx));
    }
}

/// A [`JobEvent`] the store could not take yet, and how many times it was tried.
#[derive(Message)]
#[rtype(result = "()")]
struct Retry(JobEvent, u32);

/// How many times an event is offered to a store that is away (once a second) before it is
/// dropped with an error in the log.
const ENQUEUE_TRIES: u32 = 600;

impl Handler<JobEvent> for Webhooks {
    type Result = ();
    fn handle(&mut self, m: JobEvent, ctx: &mut Context<Self>) {
        self.enqueue(m, 1, ctx);
    }
}

impl Handler<Retry> for Webhooks {
    type Result = ();
    fn handle(&mut self, Retry(m, tries): Retry, ctx: &mut Context<Self>) {
        self.enqueue(m, tries, ctx);
    }
}

impl Webhooks {
    fn enqueue(&mut self, m: JobEvent, tries: u32, ctx: &mut Context<Self>) {
        // One id per job and outcome (a stall per silence), so the same outcome enqueued twice (a
        // takeover, a retried save) is one message, and a receiver can drop repeats by id.
        let since = match m.event {
            "job.stalled" => m.snapshot.reported_at.as_deref().unwrap_or("").replace([':', '.', '-'], ""),
            _ => String::new(),
        };
        let msg_id = format!("msg_{}_{}{since}", m.snapshot.job_id.simple(), m.event.trim_start_matches("job."));
        let body = json!({ "type": m.event, "timestamp": now_rfc3339(), "data": m.snapshot }).to_string();
        let tenant = m.snapshot.tenant.clone();
        let enqueue = self.store.send(Enqueue { tenant, event: m.event.to_string(), msg_id, body, now_ms: now_ms() });
        ctx.spawn(enqueue.into_actor(self).map(move |answer, hooks, ctx| {
            let failed = match answer {
                Ok(Ok(0)) => return,
                Ok(Ok(_)) => return hooks.claim(ctx),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            if tries >= ENQUEUE_TRIES {
                return tracing::error!(error = %failed, job = %m.snapshot.job_id, event = m.event,
                    "a webhook message was dropped: the store did not take it for {ENQUEUE_TRIES} s");
            }
            tracing::warn!(error = %failed, job = %m.snapshot.job_id, "a webhook message waits for the store");
            ctx.run_later(Duration::from_secs(1), move |_, ctx| ctx.notify(Retry(m, tries + 1)));
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::is_private;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification's reference libraries.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = r#"{"test": 2432232314}"#;
        let sig = signature(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_plain_secret_is_its_utf8_bytes() {
        assert_eq!(secret_bytes("hello"), b"hello");
        assert_eq!(secret_bytes("whsec_aGVsbG8="), b"hello");
    }

    #[test]
    fn private_addresses_are_named_and_public_ones_are_not() {
        let private = [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd12::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::",
        ];
        for ip in private {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
        let allow = PrivateAllow::parse("127.0.0.1, ::1").unwrap();
        assert!(allow.allows("127.0.0.1".parse().unwrap()) && !allow.allows("10.0.0.1".parse().unwrap()));
        assert!(PrivateAllow::parse("*").unwrap().allows("10.0.0.1".parse().unwrap()));
        assert!(PrivateAllow::parse("nope").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let b = Backoff { initial: Duration::from_millis(1000), max: Duration::from_secs(5), attempts: 8 };
        let waits: Vec<u128> = (1..=5).map(|n| b.after(n).as_millis()).collect();
        assert_eq!(waits, [1000, 2000, 4000, 5000, 5000]);
    }
}
