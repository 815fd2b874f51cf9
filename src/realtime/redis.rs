//! The Redis engine of the broker (cluster mode, `redis_url`): how several nodes share rooms.
//!
//! Per room, under `cluster_prefix`, a hash `<prefix>:room:{<room>}` holds its `epoch` and last `seq`,
//! and a stream `<prefix>:hist:{<room>}` its history, one entry per event with the id `<seq>-0`
//! (fields `t`: created ms, `j`: the envelope's JSON), trimmed to about `history_size` entries; both
//! expire `history_ttl_s` after the room's last event. One Lua script numbers, stores and fans out an
//! event atomically ([`PUBLISH`]): `seq` comes from `HINCRBY` on the room's hash, the envelope gets its
//! `seq` and `epoch`, goes into the stream and is published on `<prefix>:events`, so every node sees
//! a room's events in `seq` order, and an event is in the history before any node can deliver it.
//! When Redis lost a room's hash (a flush, a restart without persistence) the script starts a new
//! epoch at `seq` 1 and drops what is left of the stream, so a resume from the old epoch answers
//! `recovered: false` rather than a silent gap. A resume reads only the entries after its `seq`
//! (`XRANGE` from an exclusive id: a seek, never a scan of the stream).
//!
//! Publishes of one node go out through one task, pipelined in arrival order; the subscriber task
//! reconnects by itself and then tells the broker to let every room catch up from its stream.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot, OnceCell};

/// Numbers, stores and publishes one event, once: a retry of an event Redis already took (its answer
/// was lost) answers the `seq` it got then. Also answers how many connections the room has on the
/// nodes alive (its members hash: a count per node). KEYS: room hash, stream, the event's marker,
/// members hash. ARGV: epoch for a new room, envelope JSON without `seq`/`epoch`, stream length, ttl
/// seconds, channel, room key, created ms, this node, presence key prefix.
const PUBLISH: &str = r#"
local members = 0
local counts = redis.call('HGETALL', KEYS[4])
for i = 1, #counts, 2 do
  if counts[i] == ARGV[8] or redis.call('EXISTS', ARGV[9] .. counts[i]) == 1 then
    members = members + math.max(tonumber(counts[i + 1]), 0)
  else
    redis.call('HDEL', KEYS[4], counts[i])
  end
end
local done = redis.call('GET', KEYS[3])
if done then
  local cut = string.find(done, ':', 1, true)
  return {tonumber(string.sub(done, 1, cut - 1)), string.sub(done, cut + 1), members}
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local env = string.sub(ARGV[2], 1, -2) .. ',"seq":' .. seq .. ',"epoch":"' .. epoch .. '"}'
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 't', ARGV[7], 'j', env)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('SET', KEYS[3], seq .. ':' .. epoch, 'EX', 600)
redis.call('PUBLISH', ARGV[5], ARGV[6] .. '\n' .. env)
return {seq, epoch, members}
"#;

/// A room's epoch and last `seq`, creating the room (so every node names the same epoch for a room
/// that has no event yet). KEYS: room hash, stream. ARGV: epoch for a new room, ttl seconds.
const CURSOR: &str = r#"
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'seq', 0)
  redis.call('DEL', KEYS[2])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return redis.call('HMGET', KEYS[1], 'epoch', 'seq')
"#;

/// Counts a connection of a user cluster-wide, refusing past the limit. Connections are counted per
/// node in a hash; a node whose presence key has expired (it died) is dropped from the count.
/// KEYS: the user's hash. ARGV: this node, the limit, the presence key prefix, ttl seconds.
const CLAIM_USER: &str = r#"
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local node, n = fields[i], tonumber(fields[i + 1])
  if node == ARGV[1] or redis.call('EXISTS', ARGV[3] .. node) == 1 then
    total = total + n
  else
    redis.call('HDEL', KEYS[1], node)
  end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"#;

/// Gives a user's connection back. KEYS: the user's hash. ARGV: this node.
const RELEASE_USER: &str = r#"
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"#;

/// Spends a WebSocket token once, in the generation it was minted in. KEYS: the generation, the
/// token's id. ARGV: the token's generation, seconds to remember the id. Answers 1 (spent now), 0
/// (spent before) or -1 (minted in a generation Redis no longer has: it lost the used ids).
const SPEND: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('SET', KEYS[2], 1, 'NX', 'EX', ARGV[2]) then return 1 end
return 0
"#;

/// The cluster's generation, created when Redis has none (first start, or after it lost its data).
/// KEYS: the generation. ARGV: a new one.
const GENERATION: &str = r#"
local g = redis.call('GET', KEYS[1])
if not g then
  g = ARGV[1]
  redis.call('SET', KEYS[1], g)
end
return g
"#;

/// Which cluster-wide quota an upload would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaPassed {
    /// `max_queued_jobs_per_tenant`.
    Jobs,
    /// `max_upload_bytes_per_tenant`.
    Bytes,
}

/// What [`RedisEngine::spend_token`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// First use, on any node.
    Spent,
    /// Used before.
    Reused,
    /// Minted before Redis lost the used ids: refused, a new token works.
    Stale,
}

/// A tenant's uploads and jobs across the cluster: one field per upload, `<node>|<upload id>` = its
/// bytes, so giving one back is an `HDEL` that is safe to repeat, and a dead node's fields are dropped.
/// Sums the fields of live nodes into `jobs` (their number) and `bytes`, leaving out `ARGV[2]`.
/// KEYS: the tenant's hash. ARGV: this node, this upload, presence key prefix.
const QUOTA_SUM: &str = r#"
local jobs, bytes = 0, 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local cut = string.find(fields[i], '|', 1, true)
  local node = cut and string.sub(fields[i], 1, cut - 1)
  if node and (node == ARGV[1] or redis.call('EXISTS', ARGV[3] .. node) == 1) then
    if string.sub(fields[i], cut + 1) ~= ARGV[2] then
      jobs = jobs + 1
      bytes = bytes + tonumber(fields[i + 1])
    end
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
"#;

/// Counts (or re-counts, at `ARGV[6]` bytes) an upload against the tenant's quotas. ARGV after
/// [`QUOTA_SUM`]'s: max jobs (0: not checked, for a job resumed after a restart), max bytes, bytes,
/// ttl. Answers 0 (counted), 1 (jobs) or 2 (bytes).
const CLAIM_QUOTA: &str = r#"
if tonumber(ARGV[4]) > 0 then
  if jobs + 1 > tonumber(ARGV[4]) then return 1 end
  if bytes + tonumber(ARGV[6]) > tonumber(ARGV[5]) then return 2 end
end
redis.call('HSET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 0
"#;

/// How long a node's presence lasts without a heartbeat (it beats every second).
pub const PRESENCE_TTL_S: u64 = 5;

/// A command for every node, off `<prefix>:control`: close connections (admin disconnects), or
/// cancel a job (the node running it does).
#[derive(Message, Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[rtype(result = "()")]
pub struct Control {
    /// Request id: each node answers with how many it closed (or cancelled), on `<prefix>:reply:<id>`.
    pub id: String,
    /// The connection to close, by id.
    pub connection: Option<uuid::Uuid>,
    /// Or every connection of this user (in `tenant`, or in every tenant).
    pub user: Option<String>,
    /// The user's tenant.
    pub tenant: Option<String>,
    /// Or cancel this job, where it runs.
    #[serde(default)]
    pub cancel: Option<RemoteCancel>,
    /// Or a call for one node only (a worker's report for the job whose lease it holds).
    #[serde(default)]
    pub call: Option<Forwarded>,
}

/// A call another node forwarded to this one (its `node`): the body is the jobs layer's, and so is
/// the answer; `None` sends no answer (the caller's wait runs out).
#[derive(Message, Debug, Clone, serde::Serialize, serde::Deserialize)]
#[rtype(result = "Option<String>")]
pub struct Forwarded {
    /// The node the call is for.
    pub node: String,
    /// What to do, as JSON.
    pub body: String,
}

/// A cancel from another node, for the job if it runs here; answers whether it did.
#[derive(Message, Debug, Clone, serde::Serialize, serde::Deserialize)]
#[rtype(result = "bool")]
pub struct RemoteCancel {
    /// The job.
    pub job_id: uuid::Uuid,
    /// Who asked.
    pub by: String,
}

/// An event another node (or this one) published, as it came off `<prefix>:events`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteEvent {
    /// The room's key.
    pub room: String,
    /// The envelope's JSON, with its `seq` and `epoch`.
    pub json: String,
}

/// The subscriber reconnected: events may have been missed meanwhile; rooms catch up from Redis.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resync;

/// Why Redis could not do something.
#[derive(Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct RedisFailure(String);

impl From<redis::RedisError> for RedisFailure {
    fn from(e: redis::RedisError) -> Self {
        RedisFailure(e.to_string())
    }
}

/// A stream entry as `XRANGE` answers it: its id and its field-value pairs.
type StreamEntry = (String, Vec<(String, String)>);

/// One event to publish, with where its answer goes.
struct Outgoing {
    room: String,
    /// The envelope's id: the script takes each event once.
    id: String,
    body: String,
    /// Kept and tried again while Redis is away (else answered with the failure at once).
    retry: bool,
    reply: oneshot::Sender<Result<Taken, RedisFailure>>,
}

/// What Redis answered for a published event: its `seq`, the room's epoch, and how many connections
/// the room had across the cluster.
pub type Taken = (u64, String, usize);

/// The shared handle on the Redis engine (cheap to clone).
#[derive(Clone)]
pub struct RedisEngine {
    inner: Arc<Inner>,
}

struct Inner {
    /// This node's id in the cluster (random per start).
    node: String,
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    history_size: usize,
    ttl_s: u64,
    publish: mpsc::UnboundedSender<Outgoing>,
    queue: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
    /// Set while Redis refuses publishes: API publishes and uploads are refused at once meanwhile.
    down: std::sync::atomic::AtomicBool,
    /// Where the control channel's commands go (the presence actor).
    control: std::sync::Mutex<Option<Recipient<Control>>>,
    /// Member counts per room, to the writer task.
    members: mpsc::UnboundedSender<(String, usize)>,
    member_changes: std::sync::Mutex<Option<mpsc::UnboundedReceiver<(String, usize)>>>,
}

/// Runs `attempt` in the background until it succeeds, 8 times at most over about half a minute (a
/// Redis blip must not leave a count high); logs `what` when it never did. Outside a runtime (nothing
/// to run on) it does nothing.
pub fn retry_in_background<F, Fut>(what: &'static str, attempt: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), RedisFailure>> + Send + 'static,
{
    let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
    rt.spawn(async move {
        let mut wait = Duration::from_millis(200);
        for n in 1..=8 {
            match attempt().await {
                Ok(()) => return,
                Err(e) if n == 8 => tracing::warn!(error = %e, "{what}"),
                Err(_) => {
                    actix_rt::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    });
}

fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl RedisEngine {
    /// An engine for `url` (checked here, connected on first use) under `prefix`.
    pub fn new(url: &str, prefix: &str, history_size: usize, ttl_s: u64) -> Result<Self, RedisFailure> {
        let client = redis::Client::open(url)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (members, member_changes) = mpsc::unbounded_channel();
        Ok(RedisEngine {
            inner: Arc::new(Inner {
                node: uuid::Uuid::new_v4().simple().to_string(),
                client,
                conn: OnceCell::new(),
                prefix: prefix.to_string(),
                history_size: history_size.max(1),
                ttl_s: ttl_s.max(1),
                publish: tx,
                queue: std::sync::Mutex::new(Some(rx)),
                down: std::sync::atomic::AtomicBool::new(false),
                control: std::sync::Mutex::new(None),
                members,
                member_changes: std::sync::Mutex::new(Some(member_changes)),
            }),
        })
    }

    fn room_key(&self, room: &str) -> String {
        format!("{}:room:{{{room}}}", self.inner.prefix)
    }

    fn stream_key(&self, room: &str) -> String {
        format!("{}:hist:{{{room}}}", self.inner.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:events", self.inner.prefix)
    }

    fn members_key(&self, room: &str) -> String {
        format!("{}:members:{{{room}}}", self.inner.prefix)
    }

    /// This node now has `count` connections in `room` (for `delivered_to` across the cluster). Written
    /// in the background, in order, the latest count per room of each round.
    pub fn members_changed(&self, room: &str, count: usize) {
        let _ = self.inner.members.send((room.to_string(), count));
    }

    /// Writes member counts as they change, coalesced per room.
    async fn member_writer(self, mut changes: mpsc::UnboundedReceiver<(String, usize)>) {
        while let Some((room, count)) = changes.recv().await {
            let mut latest = std::collections::HashMap::from([(room, count)]);
            while let Ok((room, count)) = changes.try_recv() {
                latest.insert(room, count);
            }
            let Ok(mut conn) = self.conn().await else { continue };
            let mut pipe = redis::pipe();
            for (room, count) in &latest {
                let key = self.members_key(room);
                if *count == 0 {
                    pipe.cmd("HDEL").arg(&key).arg(&self.inner.node).ignore();
                } else {
                    pipe.cmd("HSET").arg(&key).arg(&self.inner.node).arg(*count).ignore();
                    pipe.cmd("EXPIRE").arg(&key).arg(self.inner.ttl_s).ignore();
                }
            }
            if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                tracing::debug!(error = %e, "room member counts not written");
            }
        }
    }

    fn control_channel(&self) -> String {
        format!("{}:control", self.inner.prefix)
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// Says this node is alive, with its counts (`stats`, JSON), for [`PRESENCE_TTL_S`].
    pub async fn heartbeat(&self, stats: &serde_json::Value) -> Result<(), RedisFailure> {
        let mut conn = self.conn().await?;
        let key = format!("{}:node:{}", self.inner.prefix, self.inner.node);
        redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(stats.to_string())
            .arg("EX")
            .arg(PRESENCE_TTL_S)
            .ignore()
            .cmd("SADD")
            .arg(format!("{}:nodes", self.inner.prefix))
            .arg(&self.inner.node)
            .ignore()
            .cmd("PUBLISH")
            .arg(self.channel())
            .arg(self.beat_payload())
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Which of `rooms` have members on another live node (for releasing reservations: a job id
    /// someone watches anywhere stays reserved).
    pub async fn occupied_elsewhere(&self, rooms: &[String]) -> Result<Vec<String>, RedisFailure> {
        let mut conn = self.conn().await?;
        let mut out = Vec::new();
        for room in rooms {
            let counts: Vec<(String, i64)> =
                redis::cmd("HGETALL").arg(self.members_key(room)).query_async(&mut conn).await?;
            for (node, count) in counts {
                if node == self.inner.node || count <= 0 {
                    continue;
                }
                if self.alive(&mut conn, &node).await? {
                    out.push(room.clone());
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Whether `node`'s heartbeat is current (as far as the cluster can tell, it is alive).
    pub async fn is_alive(&self, node: &str) -> Result<bool, RedisFailure> {
        let mut conn = self.conn().await?;
        self.alive(&mut conn, node).await
    }

    async fn alive(&self, conn: &mut ConnectionManager, node: &str) -> Result<bool, RedisFailure> {
        let key = format!("{}:node:{node}", self.inner.prefix);
        Ok(redis::cmd("EXISTS").arg(key).query_async(conn).await?)
    }

    /// Every live node's last heartbeat; nodes whose presence expired are forgotten.
    pub async fn nodes(&self) -> Result<Vec<serde_json::Value>, RedisFailure> {
        let mut conn = self.conn().await?;
        let set = format!("{}:nodes", self.inner.prefix);
        let ids: Vec<String> = redis::cmd("SMEMBERS").arg(&set).query_async(&mut conn).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| format!("{}:node:{id}", self.inner.prefix)).collect();
        let beats: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, beat) in ids.into_iter().zip(beats) {
            match beat.and_then(|b| serde_json::from_str(&b).ok()) {
                Some(v) => out.push(v),
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _: Result<(), _> = redis::cmd("SREM").arg(&set).arg(gone).query_async(&mut conn).await;
        }
        Ok(out)
    }

    fn quota_key(&self, tenant: &str) -> String {
        format!("{}:quota:{{{tenant}}}", self.inner.prefix)
    }

    /// Counts upload `upload` of `bytes` against the tenant's quotas across the cluster (again, with
    /// its final size, when called a second time); answers which limit it would pass, if any. With
    /// `max_jobs` 0 nothing is checked (a job resumed after a restart is counted whatever the totals).
    pub async fn claim_quota(
        &self,
        tenant: &str,
        upload: &str,
        max_jobs: usize,
        max_bytes: u64,
        bytes: u64,
    ) -> Result<Option<QuotaPassed>, RedisFailure> {
        let mut conn = self.conn().await?;
        let answer: i64 = redis::cmd("EVAL")
            .arg(format!("{QUOTA_SUM}{CLAIM_QUOTA}"))
            .arg(1)
            .arg(self.quota_key(tenant))
            .arg(&self.inner.node)
            .arg(upload)
            .arg(format!("{}:node:", self.inner.prefix))
            .arg(max_jobs)
            .arg(max_bytes)
            .arg(bytes)
            .arg(86_400)
            .query_async(&mut conn)
            .await?;
        Ok(match answer {
            1 => Some(QuotaPassed::Jobs),
            2 => Some(QuotaPassed::Bytes),
            _ => None,
        })
    }

    /// Gives upload `upload` back (safe to repeat).
    pub async fn release_quota(&self, tenant: &str, upload: &str) -> Result<(), RedisFailure> {
        let mut conn = self.conn().await?;
        let field = format!("{}|{upload}", self.inner.node);
        redis::cmd("HDEL").arg(self.quota_key(tenant)).arg(field).query_async::<i64>(&mut conn).await?;
        Ok(())
    }

    /// Makes `admission` give its cluster share (upload `upload` of `tenant`) back when dropped,
    /// retrying for about half a minute. Attach it before claiming: a claim whose answer was lost is
    /// given back too.
    pub fn release_with(&self, admission: &mut crate::quota::Admission, tenant: &str, upload: &str) {
        let (redis, tenant, upload) = (self.clone(), tenant.to_string(), upload.to_string());
        admission.on_release(Box::new(move |_| {
            retry_in_background("a cluster quota share was not given back", move || {
                let (redis, tenant, upload) = (redis.clone(), tenant.clone(), upload.clone());
                async move { redis.release_quota(&tenant, &upload).await }
            });
        }));
    }

    fn user_key(&self, tenant: &str, user: &str) -> String {
        format!("{}:users:{{{tenant}/{user}}}", self.inner.prefix)
    }

    /// Counts one more connection of `user` across the cluster; false when it has `max` already.
    pub async fn claim_user(&self, tenant: &str, user: &str, max: usize) -> Result<bool, RedisFailure> {
        let mut conn = self.conn().await?;
        let ok: i64 = redis::cmd("EVAL")
            .arg(CLAIM_USER)
            .arg(1)
            .arg(self.user_key(tenant, user))
            .arg(&self.inner.node)
            .arg(max)
            .arg(format!("{}:node:", self.inner.prefix))
            .arg(86_400)
            .query_async(&mut conn)
            .await?;
        Ok(ok == 1)
    }

    /// Gives back a connection [`RedisEngine::claim_user`] counted.
    pub async fn release_user(&self, tenant: &str, user: &str) -> Result<(), RedisFailure> {
        let mut conn = self.conn().await?;
        redis::cmd("EVAL")
            .arg(RELEASE_USER)
            .arg(1)
            .arg(self.user_key(tenant, user))
            .arg(&self.inner.node)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    /// Sends `control` to every node (this one too) and answers how many connections they closed,
    /// counting the answers of the nodes alive now, for at most a second.
    pub async fn control(&self, control: &Control) -> Result<u64, RedisFailure> {
        let mut conn = self.conn().await?;
        let expected = self.nodes().await?.len().max(1);
        let payload = serde_json::to_string(control).map_err(|e| RedisFailure(e.to_string()))?;
        redis::cmd("PUBLISH").arg(self.control_channel()).arg(payload).query_async::<i64>(&mut conn).await?;
        let reply = format!("{}:reply:{}", self.inner.prefix, control.id);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let answers: Vec<u64> = redis::cmd("LRANGE").arg(&reply).arg(0).arg(-1).query_async(&mut conn).await?;
            if answers.len() >= expected || tokio::time::Instant::now() >= deadline {
                let _: Result<(), _> = redis::cmd("DEL").arg(&reply).query_async(&mut conn).await;
                return Ok(answers.iter().sum());
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `body` to `node` alone (a [`Forwarded`] call) and answers the first reply `answers`
    /// takes, or `None` when none came within `wait` (the node died, or nobody listens).
    pub async fn call(
        &self,
        node: &str,
        body: String,
        wait: Duration,
        answers: impl Fn(&str) -> bool,
    ) -> Result<Option<String>, RedisFailure> {
        let mut conn = self.conn().await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let call = Some(Forwarded { node: node.to_string(), body });
        let payload = serde_json::to_string(&Control { id: id.clone(), call, ..Default::default() })
            .map_err(|e| RedisFailure(e.to_string()))?;
        let listening: i64 =
            redis::cmd("PUBLISH").arg(self.control_channel()).arg(payload).query_async(&mut conn).await?;
        if listening == 0 {
            return Ok(None);
        }
        let reply = format!("{}:reply:{id}", self.inner.prefix);
        let deadline = tokio::time::Instant::now() + wait;
        // Looked at often at first: the answer usually takes a round trip or two. What is not an
        // answer to this call (a node of an older version answers every command with a count) is
        // passed over.
        let mut pause = Duration::from_millis(1);
        loop {
            let answer: Option<String> = redis::cmd("LPOP").arg(&reply).query_async(&mut conn).await?;
            match answer {
                Some(a) if answers(&a) => {
                    let _: Result<(), _> = redis::cmd("DEL").arg(&reply).query_async(&mut conn).await;
                    return Ok(Some(a));
                }
                Some(_) => continue,
                None if tokio::time::Instant::now() >= deadline => return Ok(None),
                None => {}
            }
            actix_rt::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// This node's answer to a [`Control`]: how many connections it closed.
    pub async fn answer(&self, id: &str, closed: u64) -> Result<(), RedisFailure> {
        self.answer_with(id, closed.to_string()).await
    }

    /// This node's answer to a [`Control`], as text (a [`Forwarded`] call's).
    pub async fn answer_with(&self, id: &str, answer: String) -> Result<(), RedisFailure> {
        let mut conn = self.conn().await?;
        let reply = format!("{}:reply:{id}", self.inner.prefix);
        redis::pipe()
            .cmd("RPUSH")
            .arg(&reply)
            .arg(answer)
            .ignore()
            .cmd("EXPIRE")
            .arg(&reply)
            .arg(10)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    async fn conn(&self) -> Result<ConnectionManager, RedisFailure> {
        let conn = self
            .inner
            .conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(Duration::from_secs(5)));
                self.inner.client.get_connection_manager_with_config(config).await
            })
            .await?;
        Ok(conn.clone())
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> bool {
        let Ok(mut conn) = self.conn().await else { return false };
        redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
    }

    /// Spends a WebSocket token id cluster-wide (`SET NX`, kept until the token expires), in the
    /// generation `run` it was minted in.
    pub async fn spend_token(&self, jti: &str, exp: u64, run: &str) -> Result<Spend, RedisFailure> {
        let mut conn = self.conn().await?;
        let ttl = exp.saturating_sub(crate::auth::unix_now()).max(1) + 60;
        let answer: i64 = redis::cmd("EVAL")
            .arg(SPEND)
            .arg(2)
            .arg(self.generation_key())
            .arg(format!("{}:wstoken:{jti}", self.inner.prefix))
            .arg(run)
            .arg(ttl)
            .query_async(&mut conn)
            .await?;
        Ok(match answer {
            1 => Spend::Spent,
            0 => Spend::Reused,
            _ => Spend::Stale,
        })
    }

    fn generation_key(&self) -> String {
        format!("{}:generation", self.inner.prefix)
    }

    /// The cluster's generation (made when Redis has none): WebSocket tokens carry it.
    pub async fn generation(&self) -> Result<String, RedisFailure> {
        let mut conn = self.conn().await?;
        let g: String = redis::cmd("EVAL")
            .arg(GENERATION)
            .arg(1)
            .arg(self.generation_key())
            .arg(new_epoch())
            .query_async(&mut conn)
            .await?;
        Ok(g)
    }

    /// Numbers, stores and publishes an event of `room` (the envelope's JSON without `seq` and
    /// `epoch`); answers its `seq` and the room's epoch once Redis has it.
    /// With `retry`, an event Redis cannot take now is kept, in order, and tried again until it can;
    /// without, one is refused at once while Redis is known to be away. Queued in the call itself, so
    /// the order of calls is the order of publishes.
    pub fn publish(
        &self,
        room: String,
        id: String,
        body: String,
        retry: bool,
    ) -> impl std::future::Future<Output = Result<Taken, RedisFailure>> {
        let (reply, answer) = oneshot::channel();
        let queued = if !retry && self.is_down() {
            Err(RedisFailure("Redis is not answering".into()))
        } else {
            self.inner
                .publish
                .send(Outgoing { room, id, body, retry, reply })
                .map_err(|_| RedisFailure("the publisher stopped".into()))
        };
        async move {
            queued?;
            answer.await.map_err(|_| RedisFailure("the publisher stopped".into()))?
        }
    }

    /// Whether Redis refused the last publishes (until one goes through again).
    pub fn is_down(&self) -> bool {
        self.inner.down.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What a node's heartbeat publishes on the events channel (an empty room name): each node hears
    /// its own every second, so a subscription that went silent is known to be dead.
    fn beat_payload(&self) -> String {
        format!("\n{}", self.inner.node)
    }

    /// The room's epoch and last `seq` (creating the room's epoch when it has none).
    pub async fn cursor(&self, room: &str) -> Result<(String, u64), RedisFailure> {
        let mut conn = self.conn().await?;
        let (epoch, seq): (Option<String>, Option<u64>) = redis::cmd("EVAL")
            .arg(CURSOR)
            .arg(2)
            .arg(self.room_key(room))
            .arg(self.stream_key(room))
            .arg(new_epoch())
            .arg(self.inner.ttl_s)
            .query_async(&mut conn)
            .await?;
        Ok((epoch.unwrap_or_default(), seq.unwrap_or(0)))
    }

    /// The room's epoch and its stored events after `after`, at most `limit`, not older than
    /// `min_created_ms`: `(seq, created ms, envelope JSON)`, in order.
    pub async fn events_after(
        &self,
        room: &str,
        after: u64,
        limit: usize,
        min_created_ms: i64,
    ) -> Result<(String, Vec<(u64, i64, String)>), RedisFailure> {
        let mut conn = self.conn().await?;
        let (epoch, entries): (Option<String>, Vec<StreamEntry>) = redis::pipe()
            .cmd("HGET")
            .arg(self.room_key(room))
            .arg("epoch")
            .cmd("XRANGE")
            .arg(self.stream_key(room))
            .arg(format!("({after}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .query_async(&mut conn)
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            let Some(seq) = id.split('-').next().and_then(|s| s.parse::<u64>().ok()) else { continue };
            let mut created = 0i64;
            let mut json = None;
            for (k, v) in fields {
                match k.as_str() {
                    "t" => created = v.parse().unwrap_or(0),
                    "j" => json = Some(v),
                    _ => {}
                }
            }
            if created < min_created_ms {
                continue;
            }
            if let Some(json) = json {
                out.push((seq, created, json));
            }
        }
        Ok((epoch.unwrap_or_default(), out))
    }

    /// Starts the publisher task (once) and the subscriber task, which hands every event on the events
    /// channel to `events` and, after each reconnection, sends `resync`.
    pub fn run(&self, events: Recipient<RemoteEvent>, resync: Recipient<Resync>) {
        let queue = self.inner.queue.lock().ok().and_then(|mut q| q.take());
        if let Some(queue) = queue {
            actix_rt::spawn(self.clone().publisher(queue));
        }
        if let Some(changes) = self.inner.member_changes.lock().ok().and_then(|mut c| c.take()) {
            actix_rt::spawn(self.clone().member_writer(changes));
        }
        actix_rt::spawn(self.clone().subscriber(events, resync));
    }

    /// Hands the cluster's admin commands (off `<prefix>:control`, on the same subscription as the
    /// events) to `control` from now on.
    pub fn run_control(&self, control: Recipient<Control>) {
        if let Ok(mut c) = self.inner.control.lock() {
            *c = Some(control);
        }
    }

    /// Sends queued publishes in arrival order, as many per round trip as are waiting. Each event's
    /// answer is its own (a refused one does not fail the others). Events to retry that Redis refused
    /// stay at the front, in order, and go again after a pause that grows to 2 s (the script takes each
    /// event once, so a retry of one Redis did take answers its first `seq`); the others are answered
    /// with the failure. While events are kept, [`RedisEngine::is_down`] holds.
    async fn publisher(self, mut queue: mpsc::UnboundedReceiver<Outgoing>) {
        let mut batch: Vec<Outgoing> = Vec::new();
        let mut wait = Duration::from_millis(50);
        loop {
            if batch.is_empty() {
                match queue.recv().await {
                    Some(first) => batch.push(first),
                    None => return,
                }
            }
            // Kept events first, then whatever arrived meanwhile (a bounded number per round).
            for _ in 0..256 {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let answers = self.publish_batch(&batch).await;
            let mut kept = Vec::new();
            for (item, answer) in batch.drain(..).zip(answers) {
                match answer {
                    Err(_) if item.retry && !item.reply.is_closed() => kept.push(item),
                    answer => {
                        let _ = item.reply.send(answer);
                    }
                }
            }
            self.inner.down.store(!kept.is_empty(), std::sync::atomic::Ordering::Relaxed);
            if kept.is_empty() {
                wait = Duration::from_millis(50);
                continue;
            }
            tracing::warn!(waiting = kept.len(), "redis refused events; they are kept and tried again");
            batch = kept;
            actix_rt::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    async fn publish_batch(&self, batch: &[Outgoing]) -> Vec<Result<Taken, RedisFailure>> {
        let failed = |e: &RedisFailure| batch.iter().map(|_| Err(RedisFailure(e.0.clone()))).collect();
        let mut conn = match self.conn().await {
            Ok(c) => c,
            Err(e) => return failed(&e),
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let now = crate::db::sqlite::now_ms();
        let channel = self.channel();
        for item in batch {
            pipe.cmd("EVAL")
                .arg(PUBLISH)
                .arg(4)
                .arg(self.room_key(&item.room))
                .arg(self.stream_key(&item.room))
                .arg(format!("{}:pub:{{{}}}:{}", self.inner.prefix, item.room, item.id))
                .arg(self.members_key(&item.room))
                .arg(new_epoch())
                .arg(&item.body)
                .arg(self.inner.history_size)
                .arg(self.inner.ttl_s)
                .arg(&channel)
                .arg(&item.room)
                .arg(now)
                .arg(&self.inner.node)
                .arg(format!("{}:node:", self.inner.prefix));
        }
        match pipe.query_async::<Vec<redis::RedisResult<Taken>>>(&mut conn).await {
            Ok(answers) if answers.len() == batch.len() => {
                answers.into_iter().map(|a| a.map_err(RedisFailure::from)).collect()
            }
            Ok(_) => failed(&RedisFailure("a short answer to a pipelined publish".into())),
            Err(e) => failed(&RedisFailure(e.to_string())),
        }
    }

    /// A command off the control channel, to the presence actor (once it is there).
    fn to_control(&self, payload: &[u8]) {
        match serde_json::from_slice::<Control>(payload) {
            Ok(c) => {
                if let Some(control) = self.inner.control.lock().ok().and_then(|r| r.clone()) {
                    control.do_send(c);
                }
            }
            Err(e) => tracing::warn!(error = %e, "unreadable cluster control message"),
        }
    }

    /// Listens on the events and control channels for as long as the node runs, reconnecting with
    /// backoff.
    async fn subscriber(self, events: Recipient<RemoteEvent>, resync: Recipient<Resync>) {
        let mut wait = Duration::from_millis(100);
        let mut first = true;
        loop {
            match self.inner.client.get_async_pubsub().await {
                Ok(mut pubsub) => {
                    let subscribed = pubsub.subscribe(self.channel()).await.is_ok()
                        && pubsub.subscribe(self.control_channel()).await.is_ok();
                    if subscribed {
                        wait = Duration::from_millis(100);
                        // Whatever was published while no subscription was open, rooms read from
                        // their streams (nothing to read on the first one, unless Redis was late).
                        if !first {
                            tracing::info!("redis subscriber reconnected; rooms catch up");
                        }
                        resync.do_send(Resync);
                        first = false;
                        let mut stream = pubsub.into_on_message();
                        // Every node's heartbeat passes here each second: silence means a dead
                        // connection (a partition sends no FIN), so it is dropped and made again.
                        let silence = Duration::from_secs(PRESENCE_TTL_S);
                        let control = self.control_channel();
                        while let Ok(Some(msg)) = tokio::time::timeout(silence, stream.next()).await {
                            let payload = msg.get_payload_bytes();
                            if msg.get_channel_name() == control {
                                self.to_control(payload);
                                continue;
                            }
                            let Some(cut) = payload.iter().position(|b| *b == b'\n') else { continue };
                            if cut == 0 {
                                continue;
                            }
                            let (Ok(room), Ok(json)) =
                                (std::str::from_utf8(&payload[..cut]), std::str::from_utf8(&payload[cut + 1..]))
                            else {
                                continue;
                            };
                            events.do_send(RemoteEvent { room: room.to_string(), json: json.to_string() });
                        }
                        tracing::warn!("redis subscriber lost its connection");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "redis subscriber cannot connect"),
            }
            actix_rt::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Redis on 127.0.0.1:6379, or `None` (the test is then skipped, except under CI).
    fn engine(prefix: &str) -> Option<RedisEngine> {
        if std::net::TcpStream::connect("127.0.0.1:6379").is_err() {
            assert!(std::env::var("CI").is_err(), "CI=true: this test needs Redis on 127.0.0.1:6379");
            return None;
        }
        RedisEngine::new("redis://127.0.0.1:6379", prefix, 100, 60).ok()
    }

    #[actix_rt::test]
    async fn an_event_published_twice_is_stored_and_numbered_once() {
        let prefix = format!("jobcast-unit-{}", uuid::Uuid::new_v4().simple());
        let Some(engine) = engine(&prefix) else { return };
        let queue = engine.inner.queue.lock().ok().and_then(|mut q| q.take()).expect("queue");
        actix_rt::spawn(engine.clone().publisher(queue));
        let body = r#"{"type":"info","data":{},"id":"x","ts":"t"}"#.to_string();
        let first = engine.publish("tenant:t".into(), "id-1".into(), body.clone(), false).await.expect("first");
        // The same event again, as after a lost answer: the same seq, nothing stored twice.
        let again = engine.publish("tenant:t".into(), "id-1".into(), body.clone(), false).await.expect("again");
        let other = engine.publish("tenant:t".into(), "id-2".into(), body, false).await.expect("other");
        assert_eq!((first.0, again.0, other.0), (1, 1, 2));
        assert_eq!(first.1, again.1);
        let (_, stored) = engine.events_after("tenant:t", 0, 10, 0).await.expect("read");
        assert_eq!(stored.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
        let mut conn = engine.conn().await.expect("conn");
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.expect("keys");
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await.expect("del");
    }
}
