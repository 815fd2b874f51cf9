//! Cluster mode: several real `jobcast serve` processes sharing one real Redis (127.0.0.1:6379), each
//! run under a key prefix of its own. Without a Redis listening the tests are skipped with a printed
//! reason, except under `CI=true`, where they must run.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::Client;
use jobcast::protocol::{ClientMessage, Event, EventType, Since};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_jobcast");
const REDIS: &str = "redis://127.0.0.1:6379";
const SECRET: &str = "cluster-test-secret-shared-by-every-node";

/// Whether a Redis answers; when not, a test returns early (and fails under CI).
fn redis_up() -> bool {
    let up = std::net::TcpStream::connect("127.0.0.1:6379").is_ok();
    if !up {
        assert!(std::env::var("CI").is_err(), "CI=true: the cluster tests need Redis on 127.0.0.1:6379");
        eprintln!("skipped: no Redis on 127.0.0.1:6379");
    }
    up
}

/// One node of a cluster.
struct Node {
    child: Child,
    addr: String,
    _dir: Option<tempfile::TempDir>,
}

impl Node {
    fn start(prefix: &str) -> Node {
        Node::on(REDIS, prefix)
    }

    fn on(redis: &str, prefix: &str) -> Node {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().to_path_buf();
        Node::spawn(redis, prefix, &path, &["--store", "memory"], Some(dir))
    }

    /// A node with more settings.
    fn with(prefix: &str, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().to_path_buf();
        Node::spawn(REDIS, prefix, &path, &[&["--store", "memory"], extra].concat(), Some(dir))
    }

    /// A node keeping its SQLite store in `data` (so it can be killed and started again on it).
    fn durable(prefix: &str, data: &std::path::Path, extra: &[&str]) -> Node {
        Node::spawn(REDIS, prefix, data, &[&["--store", "sqlite"], extra].concat(), None)
    }

    fn spawn(
        redis: &str,
        prefix: &str,
        data: &std::path::Path,
        extra: &[&str],
        dir: Option<tempfile::TempDir>,
    ) -> Node {
        let mut child = Command::new(BIN)
            .args(["serve", "--bind", "127.0.0.1:0", "--redis-url", redis, "--cluster-prefix", prefix])
            .args(["--jwt-secret", SECRET])
            .args(extra)
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn jobcast");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines.next().expect("jobcast printed its banner").expect("utf-8");
            if let Some(a) = line.strip_prefix("jobcast listening on http://") {
                break a.to_string();
            }
        };
        // The banner's remaining lines go nowhere; keep the pipe drained.
        std::thread::spawn(move || lines.for_each(drop));
        Node { child, addr, _dir: dir }
    }

    fn ws(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    async fn broadcast(&self, room: &str, data: Value) -> Value {
        broadcast(&self.addr, room, data).await
    }

    async fn ws_token(&self, access: &str) -> String {
        let mut res = awc::Client::default()
            .post(format!("http://{}/api/v1/auth/websocket-token", self.addr))
            .insert_header(("Authorization", format!("Bearer {access}")))
            .send()
            .await
            .expect("token");
        let body: Value = res.json().await.expect("json");
        body["token"].as_str().expect("token").to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An admin broadcast through the node at `addr`; answers `{seq, delivered_to}`.
async fn broadcast(addr: &str, room: &str, data: Value) -> Value {
    let (status, body) = try_broadcast(addr, room, data).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn try_broadcast(addr: &str, room: &str, data: Value) -> (u16, Value) {
    let res = awc::Client::default()
        .post(format!("http://{addr}/api/v1/admin/broadcast/{room}"))
        .timeout(common::WAIT)
        .insert_header(("Authorization", format!("Bearer {}", token("ops", "acme", &["admin"]))))
        .send_json(&json!({ "type": "info", "data": data }))
        .await;
    let mut res = res.expect("broadcast");
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

async fn ready(addr: &str) -> u16 {
    let res = awc::Client::default().get(format!("http://{addr}/readyz")).timeout(common::WAIT).send().await;
    res.expect("readyz").status().as_u16()
}

/// Waits (bounded) until `/readyz` answers `want`.
async fn until_ready(addr: &str, want: u16) {
    let deadline = std::time::Instant::now() + common::WAIT;
    while ready(addr).await != want {
        assert!(std::time::Instant::now() < deadline, "/readyz never answered {want}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A Redis of this test's own, on a free port, that it can stop and start again.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start() -> Option<PrivateRedis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let mut redis = PrivateRedis { port, child: None };
        redis.restart().then_some(redis)
    }

    fn restart(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string(), "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn();
        let Ok(child) = child else { return false };
        self.child = Some(child);
        let deadline = std::time::Instant::now() + common::WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn token(user: &str, tenant: &str, roles: &[&str]) -> String {
    let config = jobcast::Config { jwt_secret: Some(SECRET.into()), ..jobcast::Config::default() };
    let auth = jobcast::Auth::new(&config, SECRET).expect("auth");
    let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
    auth.mint_access(user, tenant, &roles, 3600).expect("mint")
}

/// A key prefix of this test's own; its keys are deleted when it is dropped.
struct Prefix(String);

impl Prefix {
    fn new() -> Prefix {
        Prefix(format!("jobcast-test-{}", uuid::Uuid::new_v4().simple()))
    }
}

impl std::ops::Deref for Prefix {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(mut conn) = redis::Client::open(REDIS).and_then(|c| c.get_connection()) else { return };
        let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{}:*", self.0)).query(&mut conn).unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

fn prefix() -> Prefix {
    Prefix::new()
}

async fn member(node: &Node, user: &str, room: &str) -> (Client, Value) {
    let mut c = Client::connect(&node.ws(&format!("token={}&format=json", token(user, "acme", &[])))).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    let sub = c.subscribe(room).await;
    (c, sub)
}

/// Two nodes on the shared Redis under a prefix of their own (dropped after them), or `None` when no
/// Redis listens.
fn two_nodes() -> Option<(Node, Node, Prefix)> {
    if !redis_up() {
        return None;
    }
    let prefix = prefix();
    Some((Node::start(&prefix), Node::start(&prefix), prefix))
}

/// A client of `user` on `node` that subscribes to `room` with `since`; answers it and `subscribed`.
async fn resume(node: &Node, user: &str, room: &str, since: Since) -> (Client, Value) {
    let mut c = Client::connect(&node.ws(&format!("token={}&format=json", token(user, "acme", &[])))).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    c.send(&ClientMessage::Subscribe { room: room.into(), since: Some(since) }).await;
    let sub = c.expect_data(EventType::Subscribed).await;
    (c, sub)
}

/// The next `n` room events, as (seq, epoch, data).
async fn events(c: &mut Client, n: usize) -> Vec<(u64, String, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        let env = c.recv().await;
        if let Event::Info(data) = &env.event {
            out.push((env.seq.expect("seq"), env.epoch.clone().expect("epoch"), data.clone()));
        }
    }
    out
}

#[actix_rt::test]
async fn events_published_on_two_nodes_reach_both_in_one_gapless_seq() {
    let Some((a, b, _prefix)) = two_nodes() else { return };
    let (mut on_a, sub_a) = member(&a, "alice", "tenant:acme").await;
    let (mut on_b, sub_b) = member(&b, "bob", "tenant:acme").await;
    assert_eq!(sub_a["epoch"], sub_b["epoch"], "every node names the same epoch for a room");
    // 40 from each node, concurrently.
    let publish = |node: &Node, from: &'static str| {
        let addr = node.addr.clone();
        async move {
            for i in 0..40 {
                broadcast(&addr, "tenant:acme", json!({ "from": from, "i": i })).await;
            }
        }
    };
    futures_util::future::join(publish(&a, "a"), publish(&b, "b")).await;
    let seen_a = events(&mut on_a, 80).await;
    let seen_b = events(&mut on_b, 80).await;
    let seqs: Vec<u64> = seen_a.iter().map(|e| e.0).collect();
    assert_eq!(seqs, (1..=80).collect::<Vec<u64>>(), "seq rises by one across both nodes' publishes");
    assert_eq!(seen_a, seen_b, "both nodes deliver the same events in the same order");
    // Each node's own publishes stay in the order it made them.
    for from in ["a", "b"] {
        let order: Vec<u64> =
            seen_a.iter().filter(|e| e.2["from"] == from).map(|e| e.2["i"].as_u64().unwrap()).collect();
        assert_eq!(order, (0..40).collect::<Vec<u64>>());
    }
}

#[actix_rt::test]
async fn a_client_that_moves_to_another_node_resumes_with_no_gap() {
    let Some((a, b, _prefix)) = two_nodes() else { return };
    let (mut c, _) = member(&a, "alice", "tenant:acme").await;
    for i in 0..5 {
        a.broadcast("tenant:acme", json!({ "i": i })).await;
    }
    let seen = events(&mut c, 5).await;
    let (last, epoch) = (seen[4].0, seen[4].1.clone());
    c.close().await;
    for i in 5..12 {
        a.broadcast("tenant:acme", json!({ "i": i })).await;
    }
    // On node B, which never had this room.
    let mut c = Client::connect(&b.ws(&format!("token={}&format=json", token("alice", "acme", &[])))).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    c.send(&ClientMessage::Subscribe {
        room: "tenant:acme".into(),
        since: Some(Since { seq: last, epoch: epoch.clone() }),
    })
    .await;
    let sub = c.expect_data(EventType::Subscribed).await;
    assert_eq!((sub["recovered"].as_bool(), sub["replayed"].as_u64()), (Some(true), Some(7)), "{sub}");
    let replayed = events(&mut c, 7).await;
    assert_eq!(replayed.iter().map(|e| e.0).collect::<Vec<_>>(), (6..=12).collect::<Vec<u64>>());
    assert!(replayed.iter().all(|e| e.1 == epoch));
    // And it is live on B afterwards.
    a.broadcast("tenant:acme", json!({ "i": 12 })).await;
    assert_eq!(events(&mut c, 1).await[0].0, 13);
}

#[actix_rt::test]
async fn a_node_killed_mid_stream_loses_its_clients_nothing() {
    let Some((mut a, b, _prefix)) = two_nodes() else { return };
    let (mut c, _) = member(&a, "alice", "tenant:acme").await;
    for i in 0..4 {
        b.broadcast("tenant:acme", json!({ "i": i })).await;
    }
    let seen = events(&mut c, 4).await;
    a.child.kill().expect("kill -9");
    a.child.wait().expect("reaped");
    assert!(matches!(c.next().await, common::Incoming::Ended | common::Incoming::Close(_)), "node A is gone");
    // Published while the client was between nodes.
    for i in 4..9 {
        b.broadcast("tenant:acme", json!({ "i": i })).await;
    }
    let since = Since { seq: seen[3].0, epoch: seen[3].1.clone() };
    let (mut c, sub) = resume(&b, "alice", "tenant:acme", since).await;
    assert_eq!(sub["recovered"], true, "{sub}");
    let resumed = events(&mut c, 5).await;
    assert_eq!(resumed.iter().map(|e| e.0).collect::<Vec<_>>(), (5..=9).collect::<Vec<u64>>());
    assert_eq!(resumed.iter().map(|e| e.2["i"].as_u64().unwrap()).collect::<Vec<_>>(), (4..9).collect::<Vec<u64>>());
}

#[actix_rt::test]
async fn a_websocket_token_is_used_once_across_nodes_even_in_a_race() {
    let Some((a, b, _prefix)) = two_nodes() else { return };
    for _ in 0..5 {
        let ws = a.ws_token(&token("alice", "acme", &[])).await;
        let (on_a, on_b) = futures_util::future::join(
            Client::connect(&a.ws(&format!("token={ws}&format=json"))),
            Client::connect(&b.ws(&format!("token={ws}&format=json"))),
        )
        .await;
        let mut outcomes = Vec::new();
        for mut c in [on_a, on_b] {
            c.expect(EventType::ConnectionEstablished).await;
            let env = c.recv().await;
            outcomes.push(match env.event {
                Event::Authenticated(_) => "authenticated".to_string(),
                Event::AuthFailure(f) => f.reason,
                other => panic!("unexpected {other:?}"),
            });
        }
        outcomes.sort();
        assert_eq!(outcomes, ["authenticated", "token_reused"], "one node took the token, the other refused it");
    }
}

#[actix_rt::test]
async fn with_redis_away_a_node_says_so_and_recovers_by_itself() {
    if !redis_up() {
        return;
    }
    let Some(mut redis) = PrivateRedis::start() else {
        assert!(std::env::var("CI").is_err(), "CI=true: redis-server is needed to stop and start a Redis");
        return eprintln!("skipped: cannot start a redis-server of this test's own");
    };
    let node = Node::on(&redis.url(), "away");
    let (mut c, _) = member(&node, "alice", "tenant:acme").await;
    node.broadcast("tenant:acme", json!({ "i": 0 })).await;
    let first = events(&mut c, 1).await;
    redis.stop();
    until_ready(&node.addr, 503).await;
    let (status, body) = try_broadcast(&node.addr, "tenant:acme", json!({ "i": 1 })).await;
    assert_eq!(status, 503, "a publish Redis did not take is refused, not acknowledged: {body}");
    // Redis comes back empty (no persistence): the node recovers by itself, in a new epoch.
    assert!(redis.restart());
    until_ready(&node.addr, 200).await;
    let after = node.broadcast("tenant:acme", json!({ "i": 2 })).await;
    assert_eq!(after["seq"], 1);
    let next = events(&mut c, 1).await;
    assert_eq!((next[0].0, &next[0].2["i"]), (1, &json!(2)), "the live member gets what came after");
    assert_ne!(next[0].1, first[0].1, "in a new epoch, so a resume from the old one says recovered: false");
}

/// Deletes every key of `prefix` (as a Redis flush or a restart without persistence would lose them).
async fn lose_everything(prefix: &str) {
    let client = redis::Client::open(REDIS).expect("redis");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.expect("keys");
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query_async(&mut conn).await.expect("del");
    }
}

#[actix_rt::test]
async fn when_redis_loses_the_history_a_resume_says_so() {
    let Some((a, b, prefix)) = two_nodes() else { return };
    let (mut live, _) = member(&b, "bob", "tenant:acme").await;
    for i in 0..3 {
        a.broadcast("tenant:acme", json!({ "i": i })).await;
    }
    let before = events(&mut live, 3).await;
    lose_everything(&prefix).await;
    let after = a.broadcast("tenant:acme", json!({ "i": "after" })).await;
    assert_eq!(after["seq"], 1, "a new epoch starts at 1");
    // The live member sees the new epoch (never silence), and a resume from the old one is refused.
    let next = events(&mut live, 1).await;
    assert_eq!(next[0].0, 1);
    assert_ne!(next[0].1, before[2].1, "the epoch changed");
    let mut c = Client::connect(&a.ws(&format!("token={}&format=json", token("alice", "acme", &[])))).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    c.send(&ClientMessage::Subscribe {
        room: "tenant:acme".into(),
        since: Some(Since { seq: 2, epoch: before[2].1.clone() }),
    })
    .await;
    let sub = c.expect_data(EventType::Subscribed).await;
    assert_eq!(sub["recovered"], false, "{sub}");
    assert_eq!(sub["epoch"], next[0].1);
}

/// An admin request to the node at `addr`.
async fn admin(addr: &str, method: &str, path: &str) -> (u16, Value) {
    let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
    let res = awc::Client::default()
        .request(method, format!("http://{addr}{path}"))
        .timeout(common::WAIT)
        .insert_header(("Authorization", format!("Bearer {}", token("ops", "acme", &["admin"]))))
        .send()
        .await;
    let mut res = res.expect("admin request");
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

/// Connects `user` to `node`; answers the client and its connection id, or the close code.
async fn connect_user(node: &Node, user: &str) -> Result<(Client, String), u16> {
    let mut c = Client::connect(&node.ws(&format!("token={}&format=json", token(user, "acme", &[])))).await;
    let est = c.expect_data(EventType::ConnectionEstablished).await;
    match c.next().await {
        common::Incoming::Message { env, .. } if env.event.kind() == EventType::Authenticated => {
            Ok((c, est["connection_id"].as_str().expect("id").to_string()))
        }
        common::Incoming::Close(Some(r)) => Err(u16::from(r.code)),
        other => panic!("unexpected {other:?}"),
    }
}

#[actix_rt::test]
async fn a_users_connection_limit_holds_across_the_cluster() {
    let Some((a, b, _prefix)) = two_nodes() else { return };
    let mut held = Vec::new();
    for node in [&a, &a, &a, &b, &b] {
        held.push(connect_user(node, "alice").await.expect("within max_connections_per_user (5)"));
    }
    assert_eq!(connect_user(&b, "alice").await.err(), Some(4029), "a sixth, on either node");
    assert_eq!(connect_user(&a, "alice").await.err(), Some(4029));
    assert!(connect_user(&b, "bob").await.is_ok(), "another user has a budget of their own");
    // One closes on A: a place is free on B (its release is asynchronous: wait for it, bounded).
    held.remove(0).0.close().await;
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        match connect_user(&b, "alice").await {
            Ok(c) => break held.push(c),
            Err(code) => assert!(std::time::Instant::now() < deadline, "the place never came free ({code})"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn admin_disconnects_and_stats_reach_every_node() {
    let Some((a, mut b, _prefix)) = two_nodes() else { return };
    let (mut on_b, id) = connect_user(&b, "alice").await.expect("connect");
    let (mut on_a, _) = connect_user(&a, "alice").await.expect("connect");
    let (_other, _) = connect_user(&b, "carol").await.expect("connect");
    // Closing a connection of node B through node A.
    let (status, body) = admin(&a.addr, "DELETE", &format!("/api/v1/admin/connections/{id}")).await;
    assert_eq!((status, &body), (200, &json!({ "closed": 1 })));
    assert_eq!(on_b.expect_close().await.0, 4000);
    let (status, _) = admin(&a.addr, "DELETE", &format!("/api/v1/admin/connections/{}", uuid::Uuid::new_v4())).await;
    assert_eq!(status, 404, "on no node");
    // Both nodes are in the stats, with their counts and the totals.
    let deadline = std::time::Instant::now() + common::WAIT;
    let stats = loop {
        let (_, stats) = admin(&a.addr, "GET", "/api/v1/admin/stats").await;
        if stats["totals"]["connections"] == 2 && stats["nodes"].as_array().is_some_and(|n| n.len() == 2) {
            break stats;
        }
        assert!(std::time::Instant::now() < deadline, "stats never showed both nodes: {stats}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_ne!(stats["nodes"][0]["node_id"], stats["nodes"][1]["node_id"]);
    // Every connection of a user, on every node.
    let (status, body) = admin(&b.addr, "DELETE", "/api/v1/admin/users/alice/connections").await;
    assert_eq!((status, &body), (200, &json!({ "closed": 1 })), "alice has one left, on A");
    assert_eq!(on_a.expect_close().await.0, 4000);
    // A node killed drops out of the stats within its presence ttl.
    b.child.kill().expect("kill -9");
    b.child.wait().expect("reaped");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(jobcast_presence_ttl() + 5);
    loop {
        let (_, stats) = admin(&a.addr, "GET", "/api/v1/admin/stats").await;
        if stats["nodes"].as_array().is_some_and(|n| n.len() == 1) {
            assert_eq!(stats["totals"]["connections"], 0, "{stats}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the dead node is still listed: {stats}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// How long a dead node stays listed (`realtime::redis::PRESENCE_TTL_S`).
fn jobcast_presence_ttl() -> u64 {
    5
}

#[actix_rt::test]
async fn a_used_token_stays_used_when_redis_loses_its_data() {
    let Some((a, b, prefix)) = two_nodes() else { return };
    let ws = a.ws_token(&token("alice", "acme", &[])).await;
    let mut first = Client::connect(&a.ws(&format!("token={ws}&format=json"))).await;
    first.expect(EventType::ConnectionEstablished).await;
    first.expect(EventType::Authenticated).await;
    let unused = a.ws_token(&token("alice", "acme", &[])).await;
    // Redis forgets everything, the used token ids with it: the old token must not work again, nor
    // one minted before that was never used (its use could not be told from a reuse).
    lose_everything(&prefix).await;
    let mut c = Client::connect(&b.ws(&format!("token={unused}&format=json"))).await;
    c.expect(EventType::ConnectionEstablished).await;
    assert_eq!(c.expect_data(EventType::AuthFailure).await["reason"], "token_reused");
    let mut again = Client::connect(&b.ws(&format!("token={ws}&format=json"))).await;
    again.expect(EventType::ConnectionEstablished).await;
    let failure = again.expect_data(EventType::AuthFailure).await;
    assert_eq!(failure["reason"], "token_reused", "{failure}");
    // A token minted now works, once.
    let fresh = b.ws_token(&token("alice", "acme", &[])).await;
    let mut c = Client::connect(&a.ws(&format!("token={fresh}&format=json"))).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    let mut twice = Client::connect(&b.ws(&format!("token={fresh}&format=json"))).await;
    twice.expect(EventType::ConnectionEstablished).await;
    assert_eq!(twice.expect_data(EventType::AuthFailure).await["reason"], "token_reused");
}

#[actix_rt::test]
async fn a_watcher_on_another_node_sees_a_job_through_its_nodes_crash_and_restart() {
    if !redis_up() {
        return;
    }
    let prefix = prefix();
    let data = tempfile::tempdir().expect("dir");
    let args = ["--zone-rows", "10"];
    let mut a = Node::durable(&prefix, data.path(), &args);
    let b = Node::start(&prefix);
    let (_, csv, mut watcher, _) = start_import(&a, &b, 20_000, "cluster-crash").await;
    let mut last = 0;
    let mut zones = 0;
    while zones < 20 {
        let env = watcher.recv().await;
        assert_eq!(env.seq, Some(last + 1));
        last += 1;
        zones += u64::from(env.event.kind() == EventType::ZoneCompleted);
    }
    a.child.kill().expect("kill -9");
    a.child.wait().expect("reaped");
    // The job's node comes back on its data; the watcher on B never moved and misses nothing.
    let a2 = Node::durable(&prefix, data.path(), &args);
    let mut resumed = false;
    let results = loop {
        let env = watcher.recv().await;
        assert_eq!(env.seq, Some(last + 1), "gap across the crash: {env:?}");
        last += 1;
        match env.event {
            Event::Status(s) if s.message == "resuming after a restart" => resumed = true,
            Event::ProcessingCompleted(done) => break done.results,
            _ => {}
        }
    };
    assert!(resumed, "the job was interrupted and resumed");
    assert_eq!(results["processed_rows"], 20_000);
    assert_eq!(results["inserted"].as_u64(), Some(csv.valid() - csv.duplicates), "every row stored exactly once");
    drop(a2);
}

/// The jobs the cluster counts for `tenant` (every node's).
async fn cluster_jobs(prefix: &str, tenant: &str) -> i64 {
    let client = redis::Client::open(REDIS).expect("redis");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    // One field per upload or job.
    redis::cmd("HLEN").arg(format!("{prefix}:quota:{{{tenant}}}")).query_async(&mut conn).await.expect("hlen")
}

#[actix_rt::test]
async fn a_tenants_queued_jobs_are_counted_across_the_cluster() {
    if !redis_up() {
        return;
    }
    let prefix = prefix();
    let one = ["--max-queued-jobs-per-tenant", "1"];
    let (a, b) = (Node::with(&prefix, &one), Node::with(&prefix, &one));
    let alice = token("alice", "acme", &[]);
    // An upload in progress on A (its head sent, its body not) holds alice's tenant's one place.
    let mut held = std::net::TcpStream::connect(&a.addr).expect("connect");
    let head = format!(
        "POST /api/v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\
         Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: 100000\r\n\r\n"
    );
    std::io::Write::write_all(&mut held, head.as_bytes()).expect("head");
    let deadline = std::time::Instant::now() + common::WAIT;
    while cluster_jobs(&prefix, "acme").await != 1 {
        assert!(std::time::Instant::now() < deadline, "node A never counted the upload in Redis");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let csv = common::generate_csv(5, "quota");
    let upload = |node: &Node, token: &str| {
        let (url, token, bytes) =
            (format!("http://{}/api/v1/uploads", node.addr), token.to_string(), csv.bytes.clone());
        async move { common::upload_to(&url, &token, "q.csv", "text/csv", &bytes, None).await }
    };
    let (status, body) = upload(&b, &alice).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("quota_exceeded")), "{body}");
    assert_eq!(upload(&b, &token("bob", "other", &[])).await.0, 202, "another tenant has its own quota");
    // The upload on A goes away: its place comes free on every node.
    drop(held);
    let deadline = std::time::Instant::now() + common::WAIT;
    while cluster_jobs(&prefix, "acme").await != 0 {
        assert!(std::time::Instant::now() < deadline, "node A never gave the place back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(upload(&b, &alice).await.0, 202);
    // Its job runs to its end on B, and gives the place back.
    let deadline = std::time::Instant::now() + common::WAIT;
    while cluster_jobs(&prefix, "acme").await != 0 {
        assert!(std::time::Instant::now() < deadline, "the finished job never gave its place back");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(upload(&a, &alice).await.0, 202, "on node A too");
}

#[actix_rt::test]
async fn delivered_to_counts_the_members_on_every_node() {
    let Some((a, b, _prefix)) = two_nodes() else { return };
    let (_a1, _) = member(&a, "alice", "tenant:acme").await;
    let (b1, _) = member(&b, "bob", "tenant:acme").await;
    let (_b2, _) = member(&b, "carol", "tenant:acme").await;
    // Counts are written in the background: wait (bounded) until a publish through A sees all three.
    let until = |want: u64| {
        let addr = a.addr.clone();
        async move {
            let deadline = std::time::Instant::now() + common::WAIT;
            loop {
                let answer = broadcast(&addr, "tenant:acme", json!({})).await;
                if answer["delivered_to"] == want {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "delivered_to never reached {want}: {answer}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    };
    until(3).await;
    b1.close().await;
    until(2).await;
}

// ---- With PostgreSQL as well (`database_url`): jobs and rows shared, leases and takeover. ----

/// The PostgreSQL the shared-store tests use (each under a schema of its own).
fn postgres_url() -> String {
    std::env::var("JOBCAST_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

/// Whether Redis and PostgreSQL answer; when not, a test returns early (and fails under CI).
fn engines_up() -> bool {
    if !redis_up() {
        return false;
    }
    let up = std::net::TcpStream::connect("127.0.0.1:5432").is_ok();
    if !up {
        assert!(std::env::var("CI").is_err(), "CI=true: the cluster tests need PostgreSQL on 127.0.0.1:5432");
        eprintln!("skipped: no PostgreSQL on 127.0.0.1:5432");
    }
    up
}

/// Runs `query` on `url` (a runtime of its own, so it works from `Drop` too) and answers the first
/// column of the first row as an integer, when there is one.
fn sql(url: &str, query: &str) -> Option<i64> {
    let (url, query) = (url.to_string(), query.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.ok()?;
            tokio::spawn(conn);
            let rows = client.simple_query(&query).await.expect("query");
            rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
                _ => None,
            })
        })
    })
    .join()
    .ok()
    .flatten()
}

/// A prefix for Redis keys and the PostgreSQL schema of one test; both are removed when dropped.
struct Shared {
    prefix: Prefix,
    url: String,
}

impl Shared {
    fn new(url: String) -> Shared {
        Shared { prefix: Prefix::new(), url }
    }

    fn count(&self, query: &str) -> i64 {
        let query = query.replace("{schema}", &format!("\"{}\"", &*self.prefix));
        sql(&self.url, &query).unwrap_or(-1)
    }

    /// A node on this cluster keeping its files in `data`.
    fn node(&self, data: &std::path::Path, extra: &[&str]) -> Node {
        let lease: &[&str] = if extra.contains(&"--job-lease-s") { &[] } else { &["--job-lease-s", "3"] };
        let args = [&["--store", "sqlite", "--database-url", &self.url], lease, extra].concat();
        Node::spawn(REDIS, &self.prefix, data, &args, None)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        sql(&self.url, &format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", &*self.prefix));
    }
}

async fn job_status(addr: &str, id: uuid::Uuid) -> Value {
    let mut res = awc::Client::default()
        .get(format!("http://{addr}/api/v1/jobs/{id}"))
        .timeout(common::WAIT)
        .insert_header(("Authorization", format!("Bearer {}", token("alice", "acme", &[]))))
        .send()
        .await
        .expect("job");
    assert_eq!(res.status(), 200);
    res.json().await.expect("json")
}

/// Reads `watcher` until `processing_completed`, checking that `seq` has no gap; answers the
/// results and whether the job said it resumed.
async fn until_completed(watcher: &mut Client, last: &mut u64) -> (Value, bool) {
    let mut resumed = false;
    loop {
        let env = watcher.recv().await;
        assert_eq!(env.seq, Some(*last + 1), "gap: {env:?}");
        *last += 1;
        match env.event {
            Event::Status(s) if s.message == "resuming after a restart" => resumed = true,
            Event::ProcessingCompleted(done) => return (done.results, resumed),
            Event::ProcessingFailed(f) => panic!("the job failed: {}", f.error),
            _ => {}
        }
    }
}

/// Reads `watcher` until `n` zones completed, checking that `seq` has no gap.
async fn zones(watcher: &mut Client, last: &mut u64, n: u64) {
    let mut zones = 0;
    while zones < n {
        let env = watcher.recv().await;
        assert_eq!(env.seq, Some(*last + 1));
        *last += 1;
        zones += u64::from(env.event.kind() == EventType::ZoneCompleted);
    }
}

/// Subscribes alice (tenant acme) on `watch` to a new job's room, then uploads `rows` generated rows
/// as that job to `upload`; answers the job id, the file, the watcher and its `subscribed` data.
async fn start_import(
    upload: &Node,
    watch: &Node,
    rows: u64,
    salt: &str,
) -> (uuid::Uuid, common::GeneratedCsv, Client, Value) {
    let batch = uuid::Uuid::new_v4();
    let (watcher, joined) = member(watch, "alice", &format!("job:{batch}")).await;
    let csv = common::generate_csv(rows, salt);
    let url = format!("http://{}/api/v1/uploads", upload.addr);
    let (status, body) =
        common::upload_to(&url, &token("alice", "acme", &[]), "job.csv", "text/csv", &csv.bytes, Some(batch)).await;
    assert_eq!(status, 202, "{body}");
    (batch, csv, watcher, joined)
}

#[actix_rt::test]
async fn a_job_whose_node_is_killed_is_taken_over_and_every_row_is_stored_once() {
    if !engines_up() {
        return;
    }
    let cluster = Shared::new(postgres_url());
    let (data_a, data_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let args = ["--zone-rows", "10"];
    let mut a = cluster.node(data_a.path(), &args);
    let b = cluster.node(data_b.path(), &args);
    let (batch, csv, mut watcher, _) = start_import(&a, &b, 20_000, "takeover").await;
    let mut last = 0;
    zones(&mut watcher, &mut last, 20).await;
    // Any node answers for the job while it runs.
    let running = job_status(&b.addr, batch).await["status"].clone();
    assert!(["scanning", "parsing", "processing"].contains(&running.as_str().unwrap_or_default()), "{running}");
    a.child.kill().expect("kill -9");
    a.child.wait().expect("reaped");
    // A's disk goes with it: B reads the upload from the database.
    drop(data_a);
    let (results, resumed) = until_completed(&mut watcher, &mut last).await;
    assert!(resumed, "B took the job over");
    let expected = csv.valid() - csv.duplicates;
    assert_eq!(results["processed_rows"], 20_000);
    assert_eq!(results["inserted"].as_u64(), Some(expected), "every row counted once");
    assert_eq!(cluster.count("SELECT COUNT(*) FROM {schema}.transactions") as u64, expected, "every row stored once");
    assert_eq!(cluster.count("SELECT COUNT(*) FROM {schema}.zones"), 2000);
    assert_eq!(job_status(&b.addr, batch).await["status"], "completed");
    assert_eq!(cluster.count("SELECT COUNT(*) FROM {schema}.upload_parts"), 0, "the kept upload is gone with the job");
}

#[actix_rt::test]
async fn a_cancel_on_any_node_stops_the_job_where_it_runs() {
    if !engines_up() {
        return;
    }
    let cluster = Shared::new(postgres_url());
    let (data_a, data_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let args = ["--zone-rows", "10"];
    let a = cluster.node(data_a.path(), &args);
    let b = cluster.node(data_b.path(), &args);
    let (batch, _, mut watcher, _) = start_import(&a, &a, 20_000, "cancel-anywhere").await;
    let mut last = 0;
    zones(&mut watcher, &mut last, 5).await;
    let res = awc::Client::default()
        .post(format!("http://{}/api/v1/jobs/{batch}/cancel", b.addr))
        .timeout(common::WAIT)
        .insert_header(("Authorization", format!("Bearer {}", token("alice", "acme", &[]))))
        .send()
        .await
        .expect("cancel");
    assert_eq!(res.status(), 202, "B passed the cancel to A");
    loop {
        let env = watcher.recv().await;
        if let Event::JobCancelled(c) = env.event {
            assert_eq!(c.by, "alice");
            break;
        }
        assert_ne!(env.event.kind(), EventType::ProcessingCompleted, "the job ran to its end");
    }
    assert_eq!(job_status(&b.addr, batch).await["status"], "cancelled");
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// A PostgreSQL server of this test's own, on a free port, that it can stop and start again.
struct PrivatePostgres {
    port: u16,
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
}

impl PrivatePostgres {
    /// [`PrivatePostgres::start`] for a test: `None` (with a printed reason) lets the test return,
    /// except under CI=true, where it fails.
    fn for_test() -> Option<PrivatePostgres> {
        let pg = PrivatePostgres::start();
        if pg.is_none() {
            assert!(std::env::var("CI").is_err(), "CI=true: this test needs PostgreSQL's server programs");
            eprintln!("skipped: cannot start a private PostgreSQL");
        }
        pg
    }

    /// Initialises and starts one; `None` when the server programs are not installed.
    fn start() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|b| b.join("initdb").is_file())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let dir = tempfile::tempdir().ok()?;
        let pg = PrivatePostgres { port, dir, bin };
        // As root, the server runs as `postgres` (it refuses root), so the directory is given to it.
        if is_root() && !Command::new("chown").args(["-R", "postgres"]).arg(pg.dir.path()).status().ok()?.success() {
            return None;
        }
        let data = pg.data();
        pg.run("initdb", &["-D", &data, "-U", "root", "-A", "trust", "--no-sync"])?;
        pg.restart().then_some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) -> Option<()> {
        let path = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        let ok = cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().ok()?.success();
        ok.then_some(())
    }

    fn restart(&self) -> bool {
        let options =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let log = self.dir.path().join("log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-o", &options, "-l", &log, "-w", "start"]).is_some()
    }

    /// Stops at once, as a crash would (no checkpoint, connections cut).
    fn stop(&self) {
        let _ = self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://root@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

#[actix_rt::test]
async fn postgres_restarted_mid_job_pauses_the_job_and_loses_no_row() {
    if !engines_up() {
        return;
    }
    let Some(pg) = PrivatePostgres::for_test() else { return };
    let cluster = Shared::new(pg.url());
    let data = tempfile::tempdir().expect("dir");
    let a = cluster.node(data.path(), &["--zone-rows", "10"]);
    let batch = uuid::Uuid::new_v4();
    let (mut watcher, _) = member(&a, "alice", &format!("job:{batch}")).await;
    let csv = common::generate_csv(20_000, "pg-restart");
    let url = format!("http://{}/api/v1/uploads", a.addr);
    let alice = token("alice", "acme", &[]);
    let (status, _) = common::upload_to(&url, &alice, "big.csv", "text/csv", &csv.bytes, Some(batch)).await;
    assert_eq!(status, 202);
    let mut last = 0;
    zones(&mut watcher, &mut last, 20).await;
    pg.stop();
    until_ready(&a.addr, 503).await;
    let (status, body) =
        common::upload_to(&url, &alice, "more.csv", "text/csv", b"date,amount,description\n2024-01-01,1,x\n", None)
            .await;
    assert_eq!(status, 503, "no upload is taken while the database is away: {body}");
    assert!(pg.restart(), "PostgreSQL starts again");
    until_ready(&a.addr, 200).await;
    let (results, _) = until_completed(&mut watcher, &mut last).await;
    let expected = csv.valid() - csv.duplicates;
    assert_eq!(results["inserted"].as_u64(), Some(expected), "every row counted once");
    assert_eq!(cluster.count("SELECT COUNT(*) FROM {schema}.transactions") as u64, expected, "every row stored once");
}

#[actix_rt::test]
async fn with_postgres_a_jobs_outcome_outlives_redis() {
    if !engines_up() {
        return;
    }
    let cluster = Shared::new(postgres_url());
    let (data_a, data_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let a = cluster.node(data_a.path(), &[]);
    let b = cluster.node(data_b.path(), &[]);
    let (batch, _, mut watcher, joined) = start_import(&a, &a, 500, "outlives-redis").await;
    let epoch = joined["epoch"].as_str().expect("epoch").to_string();
    let mut last = 0;
    let (results, _) = until_completed(&mut watcher, &mut last).await;
    lose_everything(&cluster.prefix).await;
    // Node B never had the room: Redis has nothing of it now, PostgreSQL has the job.
    let mut c = Client::connect(&b.ws(&format!("token={}&format=json", token("alice", "acme", &[])))).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    c.send(&ClientMessage::Subscribe { room: format!("job:{batch}"), since: Some(Since { seq: last, epoch }) }).await;
    let sub = c.expect_data(EventType::Subscribed).await;
    assert_eq!(sub["recovered"], false, "the events are gone with Redis: {sub}");
    assert_eq!(sub["snapshot"]["status"], "completed", "the job's outcome is not: {sub}");
    assert_eq!(sub["snapshot"]["results"]["inserted"], results["inserted"]);
    assert_eq!(job_status(&b.addr, batch).await["results"]["inserted"], results["inserted"]);
}

/// Reads `watcher` until `processing_completed`, checking that `seq` has no gap, and counts the
/// events of each kind on the way.
async fn count_until_completed(watcher: &mut Client, last: &mut u64) -> HashMap<EventType, usize> {
    let mut seen = HashMap::new();
    loop {
        let env = watcher.recv().await;
        assert_eq!(env.seq, Some(*last + 1), "gap: {env:?}");
        *last += 1;
        *seen.entry(env.event.kind()).or_insert(0) += 1;
        match env.event {
            Event::ProcessingCompleted(_) => return seen,
            Event::ProcessingFailed(f) => panic!("the job failed: {}", f.error),
            _ => {}
        }
    }
}

#[actix_rt::test]
async fn a_node_stopped_gracefully_hands_its_job_to_another_at_once() {
    if !engines_up() {
        return;
    }
    let cluster = Shared::new(postgres_url());
    let (data_a, data_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    // A lease far longer than the test: only the handover can move the job.
    let args = ["--zone-rows", "10", "--job-lease-s", "3600"];
    let mut a = cluster.node(data_a.path(), &args);
    let b = cluster.node(data_b.path(), &args);
    let (_, csv, mut watcher, _) = start_import(&a, &b, 20_000, "handover").await;
    let mut last = 0;
    zones(&mut watcher, &mut last, 20).await;
    assert!(Command::new("kill").args(["-TERM", &a.child.id().to_string()]).status().expect("kill").success());
    assert!(a.child.wait().expect("reaped").success(), "A stopped cleanly");
    let (results, resumed) = until_completed(&mut watcher, &mut last).await;
    assert!(resumed, "B took the job over well before its 3600 s lease ran out");
    let expected = csv.valid() - csv.duplicates;
    assert_eq!(results["inserted"].as_u64(), Some(expected), "every row counted once");
    assert_eq!(cluster.count("SELECT COUNT(*) FROM {schema}.transactions") as u64, expected, "every row stored once");
    assert_eq!(cluster.count("SELECT COUNT(*) FROM {schema}.zones"), 2000);
}

/// This node's running jobs, from its admin stats.
async fn jobs_running(addr: &str) -> u64 {
    admin(addr, "GET", "/api/v1/admin/stats").await.1["jobs_running"].as_u64().expect("jobs_running")
}

#[actix_rt::test]
async fn a_node_that_lost_its_lease_stores_nothing_more_and_stops_silently() {
    if !engines_up() {
        return;
    }
    let cluster = Shared::new(postgres_url());
    let data = tempfile::tempdir().expect("dir");
    let a = cluster.node(data.path(), &["--zone-rows", "10"]);
    let (batch, csv, mut watcher, _) = start_import(&a, &a, 20_000, "fenced").await;
    let mut last = 0;
    zones(&mut watcher, &mut last, 20).await;
    // What a node that took the job over while A could not renew would have written.
    let far = i64::MAX / 2;
    cluster.count(&format!(
        "UPDATE {{schema}}.jobs SET lease_node = 'another-node', lease_until_ms = {far} WHERE id = '{batch}'"
    ));
    let deadline = std::time::Instant::now() + common::WAIT;
    while jobs_running(&a.addr).await > 0 {
        assert!(std::time::Instant::now() < deadline, "A went on running a job it lost");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let stored = cluster.count("SELECT COUNT(*) FROM {schema}.zones");
    assert!(stored < 2000, "A stopped before the end ({stored} zones stored)");
    assert_eq!(job_status(&a.addr, batch).await["status"].as_str().map(|s| s != "completed"), Some(true));
    // The other node "dies": its lease runs out, and A takes the job over like any other.
    cluster.count(&format!("UPDATE {{schema}}.jobs SET lease_until_ms = 0 WHERE id = '{batch}'"));
    let seen = count_until_completed(&mut watcher, &mut last).await;
    assert_eq!(seen.get(&EventType::ProcessingCompleted), Some(&1));
    let expected = csv.valid() - csv.duplicates;
    assert_eq!(cluster.count("SELECT COUNT(*) FROM {schema}.transactions") as u64, expected, "every row stored once");
    assert_eq!(cluster.count("SELECT COUNT(*) FROM {schema}.zones"), 2000);
    let results = &job_status(&a.addr, batch).await["results"];
    assert_eq!(results["inserted"].as_u64(), Some(expected), "every row counted once");
}

#[actix_rt::test]
async fn with_postgres_a_webhook_is_delivered_once_by_one_of_the_nodes() {
    if !engines_up() {
        return;
    }
    let cluster = Shared::new(postgres_url());
    let (data_a, data_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let args = ["--webhook-backoff-initial-ms", "50", "--webhook-private-allow", "127.0.0.1"];
    let a = cluster.node(data_a.path(), &args);
    let b = cluster.node(data_b.path(), &args);
    let receiver = common::Receiver::start(1);
    let admin_token = token("ops", "acme", &["admin"]);
    let hook = json!({"url": receiver.url, "events": ["job.completed"]});
    let (status, created) = common::post_json(&b.addr, "/api/v1/admin/webhooks", &admin_token, hook).await;
    assert_eq!(status, 201, "{created}");
    // The job is on A; the webhook was registered on B: both see it in PostgreSQL.
    let (_, csv, mut watcher, _) = start_import(&a, &a, 100, "webhook-pg").await;
    let mut last = 0;
    until_completed(&mut watcher, &mut last).await;
    let got = receiver.until(|r| r.iter().any(|x| x.status == 200)).await;
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 200]);
    assert!(got.iter().all(|r| common::signature_valid(created["secret"].as_str().expect("secret"), r)));
    let body: Value = serde_json::from_str(&got[1].body).expect("json");
    assert_eq!(body["data"]["results"]["inserted"].as_u64(), Some(csv.valid() - csv.duplicates));
    let id = created["id"].as_str().expect("id");
    let (status, log) = admin(&a.addr, "GET", &format!("/api/v1/admin/webhooks/{id}/deliveries")).await;
    assert_eq!(status, 200);
    assert!(log["deliveries"].as_array().is_some_and(|l| !l.is_empty()), "{log}");
}

#[actix_rt::test]
async fn a_webhook_message_waits_for_postgres_and_is_delivered_when_it_is_back() {
    if !engines_up() {
        return;
    }
    let Some(pg) = PrivatePostgres::for_test() else { return };
    let cluster = Shared::new(pg.url());
    let data = tempfile::tempdir().expect("dir");
    let a = cluster.node(data.path(), &["--webhook-backoff-initial-ms", "50", "--webhook-private-allow", "127.0.0.1"]);
    let receiver = common::Receiver::start(0);
    let hook = json!({"url": receiver.url, "events": ["job.completed"]});
    let (status, _) =
        common::post_json(&a.addr, "/api/v1/admin/webhooks", &token("ops", "acme", &["admin"]), hook).await;
    assert_eq!(status, 201);
    let publisher = token("svc", "acme", &["publisher"]);
    let (status, job) = common::post_json(&a.addr, "/api/v1/jobs", &publisher, json!({"kind": "etl"})).await;
    assert_eq!(status, 201, "{job}");
    let (id, job_token) =
        (job["job_id"].as_str().expect("id").to_string(), job["token"].as_str().expect("t").to_string());
    pg.stop();
    until_ready(&a.addr, 503).await;
    // The job's end is published through Redis; its webhook message waits for the database.
    let path = format!("/api/v1/jobs/{id}/complete");
    let (status, ended) = common::post_json(&a.addr, &path, &job_token, json!({"results": {"n": 1}})).await;
    assert_eq!(status, 200, "{ended}");
    assert!(pg.restart(), "PostgreSQL starts again");
    let got = receiver.until(|r| !r.is_empty()).await;
    let body: Value = serde_json::from_str(&got[0].body).expect("json");
    assert_eq!((body["type"].as_str(), body["data"]["job_id"].as_str()), (Some("job.completed"), Some(id.as_str())));
    // And the job's end reached the database too.
    until_ready(&a.addr, 200).await;
    job_until(&a.addr, id.parse().expect("uuid"), "status", json!("completed")).await;
}

// ---- Workers' jobs (contract §7) in a cluster: one actor, on the node holding the lease. ----

/// A worker's job created on `node` (tenant acme); answers its id and job token.
async fn worker_job(node: &Node, body: Value) -> (uuid::Uuid, String) {
    let publisher = token("svc", "acme", &["publisher"]);
    let (status, job) = common::post_json(&node.addr, "/api/v1/jobs", &publisher, body).await;
    assert_eq!(status, 201, "{job}");
    let id = job["job_id"].as_str().and_then(|s| s.parse().ok()).expect("job_id");
    (id, job["token"].as_str().expect("token").to_string())
}

/// A worker's call (`report`, `complete`, `fail`) through `node`.
async fn worker_call(node: &Node, id: uuid::Uuid, token: &str, action: &str, body: Value) -> (u16, Value) {
    common::post_json(&node.addr, &format!("/api/v1/jobs/{id}/{action}"), token, body).await
}

/// Reads `watcher` until a `processing_progress` at `at` percent, checking that `seq` has no gap
/// and that progress never went down on the way.
async fn progress_until(watcher: &mut Client, last: &mut u64, at: f64) {
    let mut seen = 0.0;
    loop {
        let env = watcher.recv().await;
        assert_eq!(env.seq, Some(*last + 1), "gap: {env:?}");
        *last += 1;
        if let Event::ProcessingProgress(p) = env.event {
            assert!(p.progress >= seen, "progress went down: {} after {seen}", p.progress);
            seen = p.progress;
            if (p.progress - at).abs() < 1e-9 {
                return;
            }
        }
    }
}

/// Waits until the job's snapshot (as `addr` reads it from the shared store) has `want` at `key`:
/// a report's snapshot is stored after its answer.
async fn job_until(addr: &str, id: uuid::Uuid, key: &str, want: Value) {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let job = job_status(addr, id).await;
        if job[key] == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{key} never became {want}: {job}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn a_workers_job_takes_reports_and_cancels_through_any_node_and_outlives_its_nodes_crash() {
    if !engines_up() {
        return;
    }
    let cluster = Shared::new(postgres_url());
    let (data_a, data_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let args = ["--progress-max-rate-per-s", "1000"];
    let mut a = cluster.node(data_a.path(), &args);
    let b = cluster.node(data_b.path(), &args);
    let (id, job_token) = worker_job(&a, json!({"kind": "etl"})).await;
    let (mut watcher, joined) = member(&b, "alice", &format!("job:{id}")).await;
    let mut last = joined["seq"].as_u64().expect("seq");
    let (status, first) = worker_call(&a, id, &job_token, "report", json!({"progress": 0.25})).await;
    assert_eq!(status, 200, "{first}");
    // B has no actor for the job: the report goes to A, which holds the lease, and is numbered in
    // the same room right after A's.
    let (status, second) = worker_call(&b, id, &job_token, "report", json!({"progress": 0.5})).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["seq"].as_u64(), first["seq"].as_u64().map(|s| s + 1), "{first} then {second}");
    assert_eq!(second["cancel_requested"], false);
    progress_until(&mut watcher, &mut last, 50.0).await;
    // One actor for the job in the cluster: a late, lower report through A moves nothing back.
    let (status, third) = worker_call(&a, id, &job_token, "report", json!({"progress": 0.3})).await;
    assert_eq!(status, 200, "{third}");
    job_until(&b.addr, id, "progress", json!(50.0)).await;
    assert_eq!(cluster.count("SELECT COUNT(*) FROM {schema}.jobs WHERE runs AND lease_node IS NOT NULL"), 1);

    a.child.kill().expect("kill -9");
    a.child.wait().expect("reaped");
    // Until the cluster sees that A is gone, B says to try again; then it takes the job over.
    let deadline = std::time::Instant::now() + common::WAIT;
    let resumed = loop {
        let (status, answer) = worker_call(&b, id, &job_token, "report", json!({"progress": 0.75})).await;
        if status == 200 {
            break answer;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(std::time::Instant::now() < deadline, "B never took the job over");
    };
    assert!(resumed["seq"].as_u64() > second["seq"].as_u64(), "{resumed}");
    progress_until(&mut watcher, &mut last, 75.0).await;
    job_until(&b.addr, id, "progress", json!(75.0)).await;

    // A cancel through B reaches the worker at its next report, then its end makes the job cancelled.
    let res = awc::Client::default()
        .post(format!("http://{}/api/v1/jobs/{id}/cancel", b.addr))
        .timeout(common::WAIT)
        .insert_header(("Authorization", format!("Bearer {}", token("alice", "acme", &[]))))
        .send()
        .await
        .expect("cancel");
    assert_eq!(res.status(), 202);
    let (status, answer) = worker_call(&b, id, &job_token, "report", json!({"progress": 0.8})).await;
    assert_eq!((status, answer["cancel_requested"].as_bool()), (200, Some(true)), "{answer}");
    let (status, ended) = worker_call(&b, id, &job_token, "complete", json!({})).await;
    assert_eq!((status, ended["status"].as_str()), (200, Some("cancelled")), "{ended}");
    assert_eq!(job_status(&b.addr, id).await["status"], "cancelled");
    assert_eq!(cluster.count("SELECT COUNT(*) FROM {schema}.jobs WHERE lease_node IS NOT NULL"), 0);
}

#[actix_rt::test]
async fn a_workers_job_whose_node_died_stalls_and_fails_on_the_node_that_took_it_over() {
    if !engines_up() {
        return;
    }
    let cluster = Shared::new(postgres_url());
    let (data_a, data_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let args = ["--job-stall-timeout-s", "2"];
    let mut a = cluster.node(data_a.path(), &args);
    let b = cluster.node(data_b.path(), &args);
    let (id, job_token) = worker_job(&a, json!({"kind": "etl"})).await;
    let (mut watcher, _) = member(&b, "alice", &format!("job:{id}")).await;
    let (status, answer) = worker_call(&a, id, &job_token, "report", json!({"progress": 0.3})).await;
    assert_eq!(status, 200, "{answer}");
    a.child.kill().expect("kill -9");
    a.child.wait().expect("reaped");
    // Nobody reports any more: the node that takes the job over when A's lease runs out watches
    // the silence, as A would have.
    let mut kinds = Vec::new();
    let failed = loop {
        let env = watcher.recv().await;
        kinds.push(env.event.kind());
        if let Event::ProcessingFailed(f) = env.event {
            break f;
        }
    };
    assert!(kinds.contains(&EventType::JobStalled), "{kinds:?}");
    assert!(failed.recoverable, "a stalled job may be tried again");
    assert_eq!(job_status(&b.addr, id).await["status"], "failed");
}

#[actix_rt::test]
async fn a_node_stopped_gracefully_hands_its_workers_jobs_over_at_once() {
    if !engines_up() {
        return;
    }
    let cluster = Shared::new(postgres_url());
    let (data_a, data_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    // A lease far longer than the test: only the handover can move the job.
    let args = ["--job-lease-s", "3600", "--progress-max-rate-per-s", "1000"];
    let mut a = cluster.node(data_a.path(), &args);
    let b = cluster.node(data_b.path(), &args);
    let (id, job_token) = worker_job(&a, json!({"kind": "etl", "stages": [{"name": "load", "weight": 1}]})).await;
    let (status, answer) = worker_call(&a, id, &job_token, "report", json!({"stage": "load", "progress": 0.4})).await;
    assert_eq!(status, 200, "{answer}");
    assert!(Command::new("kill").args(["-TERM", &a.child.id().to_string()]).status().expect("kill").success());
    assert!(a.child.wait().expect("reaped").success(), "A stopped cleanly");
    // The very next report, on B, is taken: no wait for a lease to run out.
    let (status, answer) = worker_call(&b, id, &job_token, "report", json!({"stage": "load", "progress": 0.6})).await;
    assert_eq!(status, 200, "{answer}");
    let (status, ended) = worker_call(&b, id, &job_token, "complete", json!({"results": {"n": 3}})).await;
    assert_eq!((status, ended["status"].as_str()), (200, Some("completed")), "{ended}");
    let job = job_status(&b.addr, id).await;
    assert_eq!((job["status"].as_str(), job["results"]["n"].as_u64()), (Some("completed"), Some(3)), "{job}");
}

#[actix_rt::test]
async fn an_export_on_any_node_reads_every_nodes_rows_from_postgres() {
    if !engines_up() {
        return;
    }
    let cluster = Shared::new(postgres_url());
    let (data_a, data_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let a = cluster.node(data_a.path(), &[]);
    let b = cluster.node(data_b.path(), &[]);
    let (batch, csv, mut watcher, _) = start_import(&a, &a, 5000, "export-pg").await;
    let mut last = 0;
    let (results, _) = until_completed(&mut watcher, &mut last).await;
    let inserted = results["inserted"].as_u64().expect("inserted");
    assert_eq!(inserted, csv.valid() - csv.duplicates);
    let id = uuid::Uuid::new_v4();
    let (mut exporting, _) = member(&b, "alice", &format!("job:{id}")).await;
    let body = json!({"format": "jsonl", "filters": {"job_id": batch.to_string()}, "id": id.to_string()});
    let (status, answer) = common::post_json(&b.addr, "/api/v1/exports", &token("alice", "acme", &[]), body).await;
    assert_eq!(status, 202, "{answer}");
    let done = loop {
        match exporting.recv().await.event {
            Event::ExportCompleted(done) => break done,
            Event::ExportFailed(f) => panic!("the export failed: {}", f.error),
            _ => {}
        }
    };
    assert_eq!(done.rows, inserted, "every row the import on A stored, read on B");
    let mut res = awc::Client::default()
        .get(format!("http://{}{}", b.addr, done.download_url))
        .timeout(common::WAIT)
        .send()
        .await
        .expect("download");
    assert_eq!(res.status(), 200);
    let body = res.body().limit(64 << 20).await.expect("body");
    let lines = String::from_utf8(body.to_vec()).expect("utf-8");
    assert_eq!(lines.lines().count() as u64, inserted);
    let mut seen = std::collections::HashSet::new();
    for line in lines.lines() {
        let row: Value = serde_json::from_str(line).expect("a JSON line");
        assert!(seen.insert(row["line"].as_i64().expect("line")), "a row twice: {row}");
    }
}
