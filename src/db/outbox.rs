//! Webhooks and their durable outbox (contract §7), in either store: the endpoints admins register,
//! one outbox row per message and endpoint until it is delivered or gives up, and the log of every
//! attempt. The messages here are answered by the SQLite `StoreActor` and by `PgStore` alike; the
//! delivery itself (HTTP, signatures, backoff) is `jobs::webhooks`.
//!
//! A due message is *claimed* for [`CLAIM_MS`] before it is sent, so with PostgreSQL two nodes never
//! send one attempt twice (`FOR UPDATE SKIP LOCKED`), and a node that dies mid-attempt leaves it to
//! be sent again once the claim runs out — at least once, never lost. With SQLite the process owns
//! its file, so its claims are dropped when it starts again.

use actix::prelude::*;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use uuid::Uuid;

use crate::db::pg_store::PgStore;
use crate::db::sqlite::StoreError;
use crate::db::store::StoreActor;

/// How long a due message is held by the attempt that claimed it (beyond the 10 s an endpoint has
/// to answer).
pub const CLAIM_MS: i64 = 30_000;
/// Attempts kept in the log per webhook (older ones are dropped).
pub const LOG_PER_WEBHOOK: i64 = 1000;

/// A registered endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Webhook {
    /// Its id.
    pub id: Uuid,
    /// Whose job events it gets.
    pub tenant: String,
    /// Where they are posted.
    pub url: String,
    /// Which (`job.completed`, `job.failed`, `job.cancelled`, `job.stalled`).
    pub events: Vec<String>,
    /// The signing secret.
    #[serde(skip)]
    pub secret: String,
    /// When it was registered (Unix ms).
    pub created_ms: i64,
}

/// Register a webhook.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct CreateWebhook(pub Webhook);

/// The webhooks of a tenant (`None`: all).
#[derive(Message)]
#[rtype(result = "Result<Vec<Webhook>, StoreError>")]
pub struct ListWebhooks {
    /// The tenant.
    pub tenant: Option<String>,
}

/// Remove a webhook with its pending messages and log; answers whether it existed.
#[derive(Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct DeleteWebhook(pub Uuid);

/// Put a message for every webhook of `tenant` that takes `event` into the outbox, due now;
/// answers how many.
#[derive(Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct Enqueue {
    /// The job's tenant.
    pub tenant: String,
    /// `job.completed` and so on.
    pub event: String,
    /// The message's id (`webhook-id`, the same on every attempt).
    pub msg_id: String,
    /// The JSON body, the same on every attempt.
    pub body: String,
    /// Now (Unix ms).
    pub now_ms: i64,
}

/// Claim up to `limit` messages due at `now_ms` (each held for [`CLAIM_MS`]).
#[derive(Message)]
#[rtype(result = "Result<Vec<Due>, StoreError>")]
pub struct ClaimDue {
    /// Now (Unix ms).
    pub now_ms: i64,
    /// At most this many.
    pub limit: i64,
}

/// A message to send now.
#[derive(Debug, Clone)]
pub struct Due {
    /// `webhook-id`.
    pub msg_id: String,
    /// The endpoint.
    pub webhook_id: Uuid,
    /// Its URL.
    pub url: String,
    /// Its secret.
    pub secret: String,
    /// The body.
    pub body: String,
    /// Attempts made before this one.
    pub attempts: i64,
}

/// The outcome of one attempt: logged, and the message either rescheduled or done.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct Attempted {
    /// `webhook-id`.
    pub msg_id: String,
    /// The endpoint.
    pub webhook_id: Uuid,
    /// This attempt's number (1 for the first).
    pub attempt: i64,
    /// When it was made (Unix ms).
    pub at_ms: i64,
    /// The answer's HTTP status, when there was one.
    pub status: Option<u16>,
    /// What went wrong (a timeout, a refused connection, a non-2xx answer).
    pub error: Option<String>,
    /// When to try again; `None`: done (delivered, or out of attempts).
    pub next_at_ms: Option<i64>,
}

/// One logged attempt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Delivery {
    /// `webhook-id` of the message.
    pub msg_id: String,
    /// Its number (1 for the first).
    pub attempt: i64,
    /// When (RFC 3339).
    pub at: String,
    /// The HTTP status answered, `null` when none was.
    pub status: Option<u16>,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The attempts logged for a webhook, newest first (at most [`LOG_PER_WEBHOOK`]).
#[derive(Message)]
#[rtype(result = "Result<Vec<Delivery>, StoreError>")]
pub struct Deliveries(pub Uuid);

fn events_of(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn events_text(events: &[String]) -> String {
    serde_json::to_string(events).unwrap_or_else(|_| "[]".into())
}

fn delivery(msg_id: String, attempt: i64, at_ms: i64, status: Option<i64>, error: Option<String>) -> Delivery {
    let at = crate::protocol::unix_ms_to_rfc3339(at_ms);
    Delivery { msg_id, attempt, at, status: status.and_then(|s| u16::try_from(s).ok()), error }
}

// ---- SQLite ----

impl Handler<CreateWebhook> for StoreActor {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, CreateWebhook(w): CreateWebhook, _: &mut SyncContext<Self>) -> Self::Result {
        self.conn().execute(
            "INSERT INTO webhooks (id, tenant, url, events, secret, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![w.id.to_string(), w.tenant, w.url, events_text(&w.events), w.secret, w.created_ms],
        )?;
        Ok(())
    }
}

impl Handler<ListWebhooks> for StoreActor {
    type Result = Result<Vec<Webhook>, StoreError>;
    fn handle(&mut self, m: ListWebhooks, _: &mut SyncContext<Self>) -> Self::Result {
        let mut stmt = self.conn().prepare_cached(
            "SELECT id, tenant, url, events, secret, created_ms FROM webhooks
             WHERE ?1 IS NULL OR tenant = ?1 ORDER BY created_ms, id",
        )?;
        let rows = stmt.query_map(params![m.tenant], |r| {
            Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get::<_, String>(3)?, r.get(4)?, r.get(5)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, tenant, url, events, secret, created_ms) = row?;
            let Ok(id) = Uuid::parse_str(&id) else { continue };
            out.push(Webhook { id, tenant, url, events: events_of(&events), secret, created_ms });
        }
        Ok(out)
    }
}

impl Handler<DeleteWebhook> for StoreActor {
    type Result = Result<bool, StoreError>;
    fn handle(&mut self, DeleteWebhook(id): DeleteWebhook, _: &mut SyncContext<Self>) -> Self::Result {
        let tx = self.conn().unchecked_transaction()?;
        let id = id.to_string();
        let n = tx.execute("DELETE FROM webhooks WHERE id = ?1", params![id])?;
        tx.execute("DELETE FROM webhook_outbox WHERE webhook_id = ?1", params![id])?;
        tx.execute("DELETE FROM webhook_attempts WHERE webhook_id = ?1", params![id])?;
        tx.commit()?;
        Ok(n == 1)
    }
}

impl Handler<Enqueue> for StoreActor {
    type Result = Result<usize, StoreError>;
    fn handle(&mut self, m: Enqueue, _: &mut SyncContext<Self>) -> Self::Result {
        let tx = self.conn().unchecked_transaction()?;
        let hooks: Vec<(String, String)> = {
            let mut stmt = tx.prepare_cached("SELECT id, events FROM webhooks WHERE tenant = ?1")?;
            let rows = stmt.query_map(params![m.tenant], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut n = 0;
        for (id, events) in hooks.iter().filter(|(_, e)| events_of(e).contains(&m.event)) {
            let _ = events;
            n += tx.execute(
                "INSERT OR IGNORE INTO webhook_outbox (msg_id, webhook_id, body, attempts, next_at_ms)
                 VALUES (?1, ?2, ?3, 0, ?4)",
                params![m.msg_id, id, m.body, m.now_ms],
            )?;
        }
        tx.commit()?;
        Ok(n)
    }
}

impl Handler<ClaimDue> for StoreActor {
    type Result = Result<Vec<Due>, StoreError>;
    fn handle(&mut self, m: ClaimDue, _: &mut SyncContext<Self>) -> Self::Result {
        let tx = self.conn().unchecked_transaction()?;
        let due: Vec<Due> = {
            let mut stmt = tx.prepare_cached(
                "SELECT o.msg_id, o.webhook_id, w.url, w.secret, o.body, o.attempts
                 FROM webhook_outbox o JOIN webhooks w ON w.id = o.webhook_id
                 WHERE o.next_at_ms <= ?1 AND (o.claimed_until_ms IS NULL OR o.claimed_until_ms <= ?1)
                 ORDER BY o.next_at_ms LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![m.now_ms, m.limit], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (msg_id, webhook_id, url, secret, body, attempts) = row?;
                let Ok(webhook_id) = Uuid::parse_str(&webhook_id) else { continue };
                out.push(Due { msg_id, webhook_id, url, secret, body, attempts });
            }
            out
        };
        for d in &due {
            tx.execute(
                "UPDATE webhook_outbox SET claimed_until_ms = ?3 WHERE msg_id = ?1 AND webhook_id = ?2",
                params![d.msg_id, d.webhook_id.to_string(), m.now_ms + CLAIM_MS],
            )?;
        }
        tx.commit()?;
        Ok(due)
    }
}

impl Handler<Attempted> for StoreActor {
    type Result = Result<(), StoreError>;
    fn handle(&mut self, m: Attempted, _: &mut SyncContext<Self>) -> Self::Result {
        let tx = self.conn().unchecked_transaction()?;
        let id = m.webhook_id.to_string();
        tx.execute(
            "INSERT OR IGNORE INTO webhook_attempts (webhook_id, msg_id, attempt, at_ms, status, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, m.msg_id, m.attempt, m.at_ms, m.status, m.error],
        )?;
        match m.next_at_ms {
            Some(next) => tx.execute(
                "UPDATE webhook_outbox SET attempts = ?3, next_at_ms = ?4, claimed_until_ms = NULL
                 WHERE msg_id = ?1 AND webhook_id = ?2",
                params![m.msg_id, id, m.attempt, next],
            )?,
            None => {
                tx.execute("DELETE FROM webhook_outbox WHERE msg_id = ?1 AND webhook_id = ?2", params![m.msg_id, id])?
            }
        };
        let cut: Option<i64> = tx
            .query_row(
                "SELECT at_ms FROM webhook_attempts WHERE webhook_id = ?1 ORDER BY at_ms DESC LIMIT 1 OFFSET ?2",
                params![id, LOG_PER_WEBHOOK],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(cut) = cut {
            tx.execute("DELETE FROM webhook_attempts WHERE webhook_id = ?1 AND at_ms <= ?2", params![id, cut])?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl Handler<Deliveries> for StoreActor {
    type Result = Result<Vec<Delivery>, StoreError>;
    fn handle(&mut self, Deliveries(id): Deliveries, _: &mut SyncContext<Self>) -> Self::Result {
        let mut stmt = self.conn().prepare_cached(
            "SELECT msg_id, attempt, at_ms, status, error FROM webhook_attempts WHERE webhook_id = ?1
             ORDER BY at_ms DESC, attempt DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![id.to_string(), LOG_PER_WEBHOOK], |r| {
            Ok(delivery(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

// ---- PostgreSQL ----

impl Handler<CreateWebhook> for PgStore {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, CreateWebhook(w): CreateWebhook, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            c.pool
                .get()
                .await?
                .execute(
                    "INSERT INTO webhooks (id, tenant, url, events, secret, created_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&w.id, &w.tenant, &w.url, &events_text(&w.events), &w.secret, &w.created_ms],
                )
                .await?;
            Ok(())
        })
    }
}

impl Handler<ListWebhooks> for PgStore {
    type Result = ResponseFuture<Result<Vec<Webhook>, StoreError>>;
    fn handle(&mut self, m: ListWebhooks, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let rows = c
                .pool
                .get()
                .await?
                .query(
                    "SELECT id, tenant, url, events, secret, created_ms FROM webhooks
                     WHERE $1::TEXT IS NULL OR tenant = $1 ORDER BY created_ms, id",
                    &[&m.tenant],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| Webhook {
                    id: r.get(0),
                    tenant: r.get(1),
                    url: r.get(2),
                    events: events_of(r.get(3)),
                    secret: r.get(4),
                    created_ms: r.get(5),
                })
                .collect())
        })
    }
}

impl Handler<DeleteWebhook> for PgStore {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, DeleteWebhook(id): DeleteWebhook, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let mut client = c.pool.get().await?;
            let tx = client.transaction().await?;
            let n = tx.execute("DELETE FROM webhooks WHERE id = $1", &[&id]).await?;
            tx.execute("DELETE FROM webhook_outbox WHERE webhook_id = $1", &[&id]).await?;
            tx.execute("DELETE FROM webhook_attempts WHERE webhook_id = $1", &[&id]).await?;
            tx.commit().await?;
            Ok(n == 1)
        })
    }
}

impl Handler<Enqueue> for PgStore {
    type Result = ResponseFuture<Result<usize, StoreError>>;
    fn handle(&mut self, m: Enqueue, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let client = c.pool.get().await?;
            let hooks = client.query("SELECT id, events FROM webhooks WHERE tenant = $1", &[&m.tenant]).await?;
            let ids: Vec<Uuid> =
                hooks.iter().filter(|r| events_of(r.get(1)).contains(&m.event)).map(|r| r.get(0)).collect();
            let n = client
                .execute(
                    "INSERT INTO webhook_outbox (msg_id, webhook_id, body, attempts, next_at_ms)
                     SELECT $1, id, $3, 0, $4 FROM unnest($2::UUID[]) AS id ON CONFLICT DO NOTHING",
                    &[&m.msg_id, &ids, &m.body, &m.now_ms],
                )
                .await?;
            Ok(n as usize)
        })
    }
}

impl Handler<ClaimDue> for PgStore {
    type Result = ResponseFuture<Result<Vec<Due>, StoreError>>;
    fn handle(&mut self, m: ClaimDue, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let rows = c
                .pool
                .get()
                .await?
                .query(
                    "WITH due AS (
                         SELECT msg_id, webhook_id FROM webhook_outbox
                         WHERE next_at_ms <= $1 AND (claimed_until_ms IS NULL OR claimed_until_ms <= $1)
                         ORDER BY next_at_ms LIMIT $2 FOR UPDATE SKIP LOCKED)
                     UPDATE webhook_outbox o SET claimed_until_ms = $3 FROM due, webhooks w
                     WHERE o.msg_id = due.msg_id AND o.webhook_id = due.webhook_id AND w.id = o.webhook_id
                     RETURNING o.msg_id, o.webhook_id, w.url, w.secret, o.body, o.attempts",
                    &[&m.now_ms, &m.limit, &(m.now_ms + CLAIM_MS)],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| Due {
                    msg_id: r.get(0),
                    webhook_id: r.get(1),
                    url: r.get(2),
                    secret: r.get(3),
                    body: r.get(4),
                    attempts: i64::from(r.get::<_, i32>(5)),
                })
                .collect())
        })
    }
}

impl Handler<Attempted> for PgStore {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, m: Attempted, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let mut client = c.pool.get().await?;
            let tx = client.transaction().await?;
            let (attempt, status) = (m.attempt as i32, m.status.map(i32::from));
            tx.execute(
                "INSERT INTO webhook_attempts (webhook_id, msg_id, attempt, at_ms, status, error)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[&m.webhook_id, &m.msg_id, &attempt, &m.at_ms, &status, &m.error],
            )
            .await?;
            match m.next_at_ms {
                Some(next) => {
                    tx.execute(
                        "UPDATE webhook_outbox SET attempts = $3, next_at_ms = $4, claimed_until_ms = NULL
                         WHERE msg_id = $1 AND webhook_id = $2",
                        &[&m.msg_id, &m.webhook_id, &attempt, &next],
                    )
                    .await?
                }
                None => {
                    tx.execute(
                        "DELETE FROM webhook_outbox WHERE msg_id = $1 AND webhook_id = $2",
                        &[&m.msg_id, &m.webhook_id],
                    )
                    .await?
                }
            };
            tx.execute(
                "DELETE FROM webhook_attempts WHERE webhook_id = $1 AND at_ms <= (
                     SELECT at_ms FROM webhook_attempts WHERE webhook_id = $1 ORDER BY at_ms DESC LIMIT 1 OFFSET $2)",
                &[&m.webhook_id, &LOG_PER_WEBHOOK],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }
}

impl Handler<Deliveries> for PgStore {
    type Result = ResponseFuture<Result<Vec<Delivery>, StoreError>>;
    fn handle(&mut self, Deliveries(id): Deliveries, _: &mut Context<Self>) -> Self::Result {
        self.run(move |c| async move {
            let rows = c
                .pool
                .get()
                .await?
                .query(
                    "SELECT msg_id, attempt, at_ms, status, error FROM webhook_attempts WHERE webhook_id = $1
                     ORDER BY at_ms DESC, attempt DESC LIMIT $2",
                    &[&id, &LOG_PER_WEBHOOK],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    let status: Option<i32> = r.get(3);
                    delivery(r.get(0), i64::from(r.get::<_, i32>(1)), r.get(2), status.map(i64::from), r.get(4))
                })
                .collect())
        })
    }
}
