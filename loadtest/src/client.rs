//! The scenarios: WebSocket clients (tokio-tungstenite) and publishers (keep-alive HTTP).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use jobcast::protocol::{ClientMessage, Envelope, Event, Since};
use serde_json::{json, Map, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::report::{histogram, p99_ms, percentiles, print, progress, progress_done};
use crate::server::{Http, Server};
use crate::Fanout;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the harness waits for stragglers after publishing ends.
const DRAIN: Duration = Duration::from_secs(10);

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Parses one frame into an envelope (text JSON or gzip(msgpack) binary).
fn envelope(msg: &Message) -> Option<Envelope> {
    match msg {
        Message::Text(t) => serde_json::from_str(t).ok(),
        Message::Binary(b) => jobcast::decode_binary(b).ok(),
        _ => None,
    }
}

/// Connects, authenticates and joins `room`; returns the socket, the connect+authenticate time and
/// the room's epoch.
async fn join(
    s: &Server,
    token: &str,
    room: &str,
    ack: bool,
    since: Option<Since>,
) -> Result<(Ws, Duration, Value), String> {
    let started = Instant::now();
    let url = format!("ws://{}/ws?token={token}&format=auto{}", s.addr, if ack { "&ack=1" } else { "" });
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| format!("connect: {e}"))?;
    let mut connected = None;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| "no authenticated within 30 s".to_string())?
            .ok_or("closed before authenticated")?
            .map_err(|e| e.to_string())?;
        if let Some(env) = envelope(&msg) {
            match env.event {
                Event::Authenticated(_) => {
                    connected = Some(started.elapsed());
                    let sub = ClientMessage::Subscribe { room: room.into(), since: since.clone() };
                    let text = serde_json::to_string(&sub).map_err(|e| e.to_string())?;
                    ws.send(Message::Text(text)).await.map_err(|e| e.to_string())?;
                }
                Event::Subscribed(sub) => {
                    let d = serde_json::to_value(&sub).unwrap_or(Value::Null);
                    return Ok((ws, connected.unwrap_or_default(), d));
                }
                Event::AuthFailure(f) => return Err(format!("auth failure: {}", f.reason)),
                Event::Error(e) => return Err(format!("error: {}", e.message)),
                _ => {}
            }
        }
    }
}

/// What one reader saw.
#[derive(Default)]
struct Seen {
    received: u64,
    duplicates: u64,
    gaps: u64,
    last_seq: u64,
}

/// Reads room events until `expected` (read once publishing stops) is reached or the drain ends.
async fn read_room(
    mut ws: Ws,
    ack: bool,
    room: String,
    delivered: Arc<AtomicU64>,
    expected: Arc<tokio::sync::watch::Receiver<Option<u64>>>,
    mut hist: Histogram<u64>,
    joined_at: u64,
) -> (Seen, Histogram<u64>) {
    // Events up to `joined_at` came before the reader joined.
    let mut seen = Seen { last_seq: joined_at, ..Seen::default() };
    let mut rx = (*expected).clone();
    loop {
        let target = *rx.borrow();
        if let Some(t) = target {
            if seen.last_seq >= t {
                break;
            }
        }
        let next = tokio::select! {
            m = ws.next() => m,
            _ = rx.changed() => continue,
            _ = tokio::time::sleep(DRAIN), if target.is_some() => break,
        };
        let Some(Ok(msg)) = next else { break };
        let Some(env) = envelope(&msg) else { continue };
        let (Some(seq), Some(r)) = (env.seq, env.room.as_deref()) else { continue };
        if r != room || env.redelivered {
            continue;
        }
        // Publish time: in an `info`'s data, or in a worker report's metadata.
        let sent = match &env.event {
            Event::Info(data) => data.get("t").and_then(Value::as_u64),
            Event::ProcessingProgress(p) => p.metadata.as_ref().and_then(|m| m.get("t")).and_then(Value::as_u64),
            _ => None,
        };
        if let Some(t) = sent {
            let _ = hist.record((unix_nanos().saturating_sub(t) / 1000).max(1));
        }
        if seq <= seen.last_seq {
            seen.duplicates += 1;
            continue;
        }
        if seq > seen.last_seq + 1 {
            seen.gaps += seq - seen.last_seq - 1;
        }
        seen.last_seq = seq;
        seen.received += 1;
        delivered.fetch_add(1, Relaxed);
        if ack && seq % 64 == 0 {
            let text = serde_json::to_string(&ClientMessage::Ack { room: room.clone(), seq }).unwrap_or_default();
            if ws.send(Message::Text(text)).await.is_err() {
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    (seen, hist)
}

/// Publishes `rate` events/s over `rooms` for `duration`; returns the last seq of each room.
async fn publish(
    s: &Server,
    rooms: &[String],
    rate: f64,
    bytes: usize,
    duration: Duration,
    label: &str,
    delivered: &AtomicU64,
) -> Result<HashMap<String, u64>, String> {
    let admin = s.token("loadtest-admin", "ops", &["admin"]);
    let publisher = s.token("loadtest-publisher", JOB_TENANT, &["publisher"]);
    // Each publisher waits for its answer, so a loaded server (answers in tens of ms) must not hold the
    // offered rate down: one publisher per 20 events/s.
    let publishers = ((rate / 20.0).ceil() as usize).clamp(16, 256);
    let pad = "x".repeat(bytes.saturating_sub(40));
    let last: Arc<tokio::sync::Mutex<HashMap<String, u64>>> = Arc::default();
    let start = Instant::now();
    let published = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (addr, admin, publisher, pad, rooms, last, published) = (
            s.publish_addr.clone(),
            admin.clone(),
            publisher.clone(),
            pad.clone(),
            rooms.to_vec(),
            last.clone(),
            published.clone(),
        );
        let per = rate / publishers as f64;
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(&addr).await?;
            let mut n = 0u64;
            while start.elapsed() < duration {
                // Pace: event n of this publisher is due at n / per seconds.
                let due = start + Duration::from_secs_f64(n as f64 / per);
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                }
                let room = &rooms[(n as usize * publishers + p) % rooms.len()];
                let body = json!({"type": "info", "data": {"t": unix_nanos(), "pad": pad}});
                // A job room gets publisher events (201), a tenant room admin broadcasts (200).
                let (path, token, ok) = match room.strip_prefix("job:") {
                    Some(id) => (format!("/api/v1/jobs/{id}/events"), &publisher, 201),
                    None => (format!("/api/v1/admin/broadcast/{room}"), &admin, 200),
                };
                let (status, answer) = http.json("POST", &path, token, &body).await?;
                if status != ok {
                    return Err(format!("{path} answered {status}: {answer}"));
                }
                let seq = answer["seq"].as_u64().unwrap_or(0);
                let mut l = last.lock().await;
                let e = l.entry(room.clone()).or_insert(0);
                *e = (*e).max(seq);
                drop(l);
                published.fetch_add(1, Relaxed);
                n += 1;
            }
            Ok::<(), String>(())
        }));
    }
    run_ticking(tasks, start, duration, |secs| {
        format!(
            "[{label}] {:>5.1}/{} s  published {}  delivered {}  ({:.0}/s)",
            secs,
            duration.as_secs(),
            published.load(Relaxed),
            delivered.load(Relaxed),
            delivered.load(Relaxed) as f64 / secs
        )
    })
    .await?;
    let out = last.lock().await.clone();
    Ok(out)
}

/// Waits for the publishing `tasks`, printing `line(seconds since start)` every half second until
/// `duration` has passed; answers the first task's error.
async fn run_ticking(
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    start: Instant,
    duration: Duration,
    line: impl Fn(f64) -> String,
) -> Result<(), String> {
    let ticker = async {
        while start.elapsed() < duration {
            tokio::time::sleep(Duration::from_millis(500)).await;
            progress(&line(start.elapsed().as_secs_f64()));
        }
    };
    let (results, _) = futures_util::future::join(futures_util::future::join_all(tasks), ticker).await;
    progress_done();
    for r in results {
        r.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Connects `n` clients spread over `rooms`, a few at a time; returns sockets, rooms and connect times.
async fn connect_many(
    s: &Server,
    n: usize,
    rooms: &[String],
    ack: bool,
    user: &str,
) -> Result<(Vec<(Ws, String)>, Histogram<u64>), String> {
    let mut connect_hist = histogram();
    let mut out = Vec::with_capacity(n);
    let tokens: Vec<String> = rooms.iter().map(|r| s.token(user, tenant_of(r), &[])).collect();
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let joins = chunk.iter().map(|i| {
            let room = rooms[i % rooms.len()].clone();
            let token = tokens[i % rooms.len()].clone();
            async move { join(s, &token, &room, ack, None).await.map(|(ws, t, _)| (ws, room, t)) }
        });
        for r in futures_util::future::join_all(joins).await {
            let (ws, room, t) = r?;
            let _ = connect_hist.record(t.as_micros().max(1) as u64);
            out.push((ws, room));
        }
        progress(&format!("[connect] {}/{n} in {:.1} s", out.len(), started.elapsed().as_secs_f64()));
    }
    progress_done();
    Ok((out, connect_hist))
}

/// The tenant of the harness's job rooms.
const JOB_TENANT: &str = "load";

/// The tenant whose members may join `room`: `tenant:<id>` for tenant rooms, [`JOB_TENANT`] for job rooms.
fn tenant_of(room: &str) -> &str {
    room.strip_prefix("tenant:").unwrap_or(JOB_TENANT)
}

/// `n` rooms no earlier run on this server has used, so every run's `seq`s start at 1: `tenant:` rooms,
/// or `job:` rooms of fresh ids (joined first, they are reserved for [`JOB_TENANT`]).
fn rooms(n: usize, job_rooms: bool) -> Vec<String> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Relaxed);
    (0..n.max(1))
        .map(|i| match job_rooms {
            true => format!("job:{}", uuid::Uuid::new_v4()),
            false => format!("tenant:load{run}-{i}"),
        })
        .collect()
}

/// The outcome of one fanout run.
struct FanoutRun {
    fields: Map<String, Value>,
    p99_ms: f64,
    lost: u64,
}

async fn fanout_run(s: &Server, f: &Fanout, ack: bool, label: &str) -> Result<FanoutRun, String> {
    let rooms = rooms(f.rooms, f.job_rooms);
    let (conns, connect_hist) = connect_many(s, f.connections, &rooms, ack, "loadtest-watcher").await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let before = s.figures();
    let (tx, rx) = tokio::sync::watch::channel(None::<u64>);
    let rx = Arc::new(rx);
    // One expected count per room: each reader waits for its room's last seq.
    let mut per_room_tx: HashMap<String, tokio::sync::watch::Sender<Option<u64>>> = HashMap::new();
    let mut readers = Vec::with_capacity(conns.len());
    for (ws, room) in conns {
        let rrx = per_room_tx.entry(room.clone()).or_insert_with(|| tokio::sync::watch::channel(None).0).subscribe();
        readers.push(tokio::spawn(read_room(ws, ack, room, delivered.clone(), Arc::new(rrx), histogram(), 0)));
    }
    drop(rx);
    let started = Instant::now();
    let last = publish(s, &rooms, f.rate, f.bytes, Duration::from_secs(f.duration), label, &delivered).await?;
    for (room, tx) in &per_room_tx {
        let _ = tx.send(Some(last.get(room).copied().unwrap_or(0)));
    }
    let _ = tx.send(Some(0));
    let mut latency = histogram();
    let (mut received, mut dups, mut gaps, mut expected) = (0u64, 0u64, 0u64, 0u64);
    for r in readers {
        let (seen, h) = r.await.map_err(|e| e.to_string())?;
        latency.add(h).map_err(|e| e.to_string())?;
        received += seen.received;
        dups += seen.duplicates;
        gaps += seen.gaps;
    }
    for room in &rooms {
        let members = f.connections / rooms.len()
            + usize::from(rooms.iter().position(|r| r == room).unwrap_or(0) < f.connections % rooms.len());
        expected += last.get(room).copied().unwrap_or(0) * members as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let after = s.figures();
    let lost = expected.saturating_sub(received);
    let mut fields = Map::new();
    fields.insert("connections".into(), f.connections.into());
    fields.insert("rooms".into(), f.rooms.into());
    fields.insert("room_kind".into(), (if f.job_rooms { "job" } else { "tenant" }).into());
    fields.insert("rate_per_s".into(), f.rate.into());
    fields.insert("payload_bytes".into(), f.bytes.into());
    fields.insert("ack".into(), ack.into());
    fields.insert("published".into(), last.values().sum::<u64>().into());
    fields.insert("delivered".into(), received.into());
    fields.insert("expected".into(), expected.into());
    fields.insert("lost".into(), lost.into());
    fields.insert("duplicates".into(), dups.into());
    fields.insert("gaps".into(), gaps.into());
    fields.insert("delivered_per_s".into(), ((received as f64 / elapsed).round()).into());
    fields.insert("latency".into(), percentiles(&latency));
    fields.insert("connect_auth".into(), percentiles(&connect_hist));
    if let (Some(b), Some(a)) = (before, after) {
        fields.insert("server_peak_rss_mib".into(), (a.peak_kib / 1024).into());
        fields.insert("server_cpu_s".into(), (((a.cpu_s - b.cpu_s) * 100.0).round() / 100.0).into());
    }
    Ok(FanoutRun { p99_ms: p99_ms(&latency), lost: lost + gaps, fields })
}

/// `fanout` and `ack`.
pub async fn fanout(s: &Server, f: &Fanout, ack: bool) -> Result<(), String> {
    let label = if ack { "ack" } else { "fanout" };
    let run = fanout_run(s, f, ack, label).await?;
    print(label, run.fields);
    Ok(())
}

/// `step`: raises the rate until p99 passes the bound or an event is lost.
pub async fn step(s: &Server, f: &Fanout, bound_ms: f64, factor: f64, steps: u32) -> Result<(), String> {
    let mut rate = f.rate;
    let mut held: Option<(f64, Map<String, Value>)> = None;
    let mut tried = Vec::new();
    for i in 0..steps {
        let shape = Fanout { rate, ..f.clone() };
        let run = fanout_run(s, &shape, false, &format!("step {}: {rate:.0}/s", i + 1)).await?;
        let ok = run.p99_ms <= bound_ms && run.lost == 0;
        tried.push(json!({"rate_per_s": rate, "p99_ms": run.p99_ms, "lost": run.lost,
            "delivered_per_s": run.fields.get("delivered_per_s").cloned(), "held": ok}));
        if !ok {
            break;
        }
        held = Some((rate, run.fields));
        rate *= factor;
    }
    let mut fields = Map::new();
    fields.insert("p99_bound_ms".into(), bound_ms.into());
    fields.insert("steps".into(), Value::Array(tried));
    match held {
        Some((rate, best)) => {
            fields.insert("highest_rate_held_per_s".into(), rate.into());
            fields.insert("at_highest".into(), Value::Object(best));
        }
        None => {
            fields.insert("highest_rate_held_per_s".into(), Value::Null);
        }
    }
    print("step", fields);
    Ok(())
}

/// `idle`: memory per held connection.
pub async fn idle(s: &Server, n: usize, hold: Duration) -> Result<(), String> {
    let before = s.figures().ok_or("idle needs the server's pid (start it from the harness or pass --server-pid)")?;
    let (conns, connect_hist) = connect_many(s, n, &rooms(10, false), false, "loadtest-idle").await?;
    let started = Instant::now();
    let mut sockets: Vec<Ws> = conns.into_iter().map(|(ws, _)| ws).collect();
    // Hold them, answering the server's pings (tungstenite queues pongs when reading).
    while started.elapsed() < hold {
        for ws in sockets.iter_mut() {
            while let Ok(Some(_)) = tokio::time::timeout(Duration::from_micros(1), ws.next()).await {}
        }
        progress(&format!(
            "[idle] holding {n} connections {:.0}/{} s",
            started.elapsed().as_secs_f64(),
            hold.as_secs()
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    progress_done();
    let after = s.figures().ok_or("the server went away")?;
    let per_conn = (after.rss_kib.saturating_sub(before.rss_kib)) as f64 * 1024.0 / n as f64;
    let mut fields = Map::new();
    fields.insert("connections".into(), n.into());
    fields.insert("server_rss_before_mib".into(), (before.rss_kib / 1024).into());
    fields.insert("server_rss_after_mib".into(), (after.rss_kib / 1024).into());
    fields.insert("bytes_per_connection".into(), (per_conn.round() as u64).into());
    fields.insert("connect_auth".into(), percentiles(&connect_hist));
    for ws in sockets.iter_mut() {
        let _ = ws.close(None).await;
    }
    print("idle", fields);
    Ok(())
}

/// `storm`: every client dropped at once (by an admin disconnect, or with `cut` by the harness dropping
/// its sockets without a close handshake), then resuming with fresh tokens and `since`.
pub async fn storm(s: &Server, n: usize, room_count: usize, cut: bool) -> Result<(), String> {
    let rooms = rooms(room_count, false);
    let (conns, connect_hist) = connect_many(s, n, &rooms, false, "storm").await?;
    let admin = s.token("loadtest-admin", "ops", &["admin"]);
    let mut http = Http::connect(&s.addr).await?;
    // Ten events per room before the storm, ten during it.
    let mut last: HashMap<String, u64> = HashMap::new();
    let body = json!({"type": "info", "data": {"phase": "before"}});
    for _ in 0..10 {
        for room in &rooms {
            let (_, a) = http.json("POST", &format!("/api/v1/admin/broadcast/{room}"), &admin, &body).await?;
            last.insert(room.clone(), a["seq"].as_u64().unwrap_or(0));
        }
    }
    // Every client reads what it has, then waits for the server to drop it (or for the cut).
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for (mut ws, room) in conns {
        let want = last[&room];
        let mut cut_rx = cut_rx.clone();
        readers.push(tokio::spawn(async move {
            let mut seq = 0;
            let mut epoch = String::new();
            loop {
                let msg = tokio::select! {
                    m = ws.next() => m,
                    // Dropping the socket closes it without a WebSocket close frame.
                    _ = cut_rx.wait_for(|cut| *cut) => break,
                };
                let Some(Ok(msg)) = msg else { break };
                if let Some(env) = envelope(&msg) {
                    if env.room.as_deref() == Some(room.as_str()) {
                        seq = env.seq.unwrap_or(seq);
                        epoch = env.epoch.unwrap_or(epoch);
                    }
                }
                if let Message::Close(_) = msg {
                    break;
                }
            }
            drop(ws);
            (room, seq, epoch, want)
        }));
    }
    // Wait until every client has read the events before the storm (their readers hold them).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let storm_at = Instant::now();
    let closed = if cut {
        let _ = cut_tx.send(true);
        Value::Null
    } else {
        let (status, answer) =
            http.json("DELETE", "/api/v1/admin/users/storm/connections", &admin, &Value::Null).await?;
        if status != 200 {
            return Err(format!("admin disconnect answered {status}"));
        }
        answer["closed"].clone()
    };
    // Events during the storm, published while the clients come back.
    let during_pub = {
        let (addr, admin, rooms, mut last) = (s.addr.clone(), admin.clone(), rooms.clone(), last.clone());
        tokio::spawn(async move {
            let mut http = Http::connect(&addr).await?;
            let during = json!({"type": "info", "data": {"phase": "during"}});
            for _ in 0..10 {
                for room in &rooms {
                    let (_, a) = http.json("POST", &format!("/api/v1/admin/broadcast/{room}"), &admin, &during).await?;
                    last.insert(room.clone(), a["seq"].as_u64().unwrap_or(0));
                }
            }
            Ok::<HashMap<String, u64>, String>(last)
        })
    };
    let (final_tx, final_rx) = tokio::sync::watch::channel(None::<Arc<HashMap<String, u64>>>);
    let mut positions = Vec::new();
    for r in readers {
        positions.push(r.await.map_err(|e| e.to_string())?);
    }
    let lost_before: u64 = positions.iter().map(|(_, seq, _, want)| want.saturating_sub(*seq)).sum();
    // Every client reconnects with a fresh token and `since`. It has resumed once it holds every event
    // up to the room's position at its `subscribed`; then it reads on until the last event published.
    let resumed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (room, seq, epoch, _) in positions {
        let token = s.token("storm", tenant_of(&room), &[]);
        let resumed = resumed.clone();
        let s_addr = s.addr.clone();
        let mut final_rx = final_rx.clone();
        tasks.push(tokio::spawn(async move {
            let since = Some(Since { seq, epoch });
            let url = format!("ws://{s_addr}/ws?token={token}&format=auto");
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(url).await else {
                return Err("reconnect failed".to_string());
            };
            let sub =
                serde_json::to_string(&ClientMessage::Subscribe { room: room.clone(), since }).unwrap_or_default();
            let mut at = seq;
            let mut caught_up_to: Option<u64> = None;
            let mut resumed_after = None;
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let (Some(c), None) = (caught_up_to, resumed_after) {
                    if at >= c {
                        resumed_after = Some(storm_at.elapsed());
                        resumed.fetch_add(1, Relaxed);
                    }
                }
                let target = final_rx.borrow().as_ref().map(|m| m.get(&room).copied().unwrap_or(0));
                if resumed_after.is_some() && target.is_some_and(|t| at >= t) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("stuck at {at} (target {target:?})"));
                }
                let msg = tokio::select! {
                    m = ws.next() => m,
                    _ = final_rx.changed() => continue,
                };
                let Some(Ok(msg)) = msg else { return Err(format!("connection ended at {at}")) };
                let Some(env) = envelope(&msg) else { continue };
                match &env.event {
                    Event::Authenticated(_) => {
                        let _ = ws.send(Message::Text(sub.clone())).await;
                    }
                    Event::Subscribed(s) => {
                        if !s.recovered {
                            return Err("not recovered".into());
                        }
                        caught_up_to = Some(s.seq);
                    }
                    _ if env.room.as_deref() == Some(room.as_str()) => {
                        let got = env.seq.unwrap_or(0);
                        if got != at + 1 {
                            return Err(format!("gap: expected {} got {got}", at + 1));
                        }
                        at = got;
                    }
                    _ => {}
                }
            }
            let _ = ws.close(None).await;
            resumed_after.ok_or_else(|| "never resumed".to_string())
        }));
    }
    let last = during_pub.await.map_err(|e| e.to_string())??;
    let _ = final_tx.send(Some(Arc::new(last)));
    let mut resume_hist = histogram();
    let mut failures = Vec::new();
    for t in tasks {
        match t.await.map_err(|e| e.to_string())? {
            Ok(d) => {
                let _ = resume_hist.record(d.as_micros().max(1) as u64);
            }
            Err(e) => failures.push(e),
        }
    }
    let mut fields = Map::new();
    fields.insert("connections".into(), n.into());
    fields.insert("dropped_by".into(), (if cut { "harness" } else { "server" }).into());
    fields.insert("closed_by_server".into(), closed);
    fields.insert("resumed".into(), resumed.load(Relaxed).into());
    fields.insert("all_resumed_s".into(), ((resume_hist.max() as f64 / 1e4).round() / 100.0).into());
    fields.insert("resume".into(), percentiles(&resume_hist));
    fields.insert("lost".into(), (lost_before + failures.len() as u64).into());
    fields.insert("failures".into(), json!(failures.iter().take(5).collect::<Vec<_>>()));
    fields.insert("connect_auth".into(), percentiles(&connect_hist));
    if let Some(f) = s.figures() {
        fields.insert("server_peak_rss_mib".into(), (f.peak_kib / 1024).into());
    }
    print("storm", fields);
    Ok(())
}

/// `jobs`: concurrent uploads, each watched; progress latency from the event's `ts` to receipt.
pub async fn jobs(s: &Server, uploads: usize, rows: usize, watchers: usize) -> Result<(), String> {
    let token = s.token("loadtest-jobs", "load", &[]);
    let mut csv = String::with_capacity(rows * 48 + 32);
    csv.push_str("date,amount,description\n");
    let mut batches = Vec::new();
    let mut watch_tasks = Vec::new();
    let started = Instant::now();
    for u in 0..uploads {
        let batch = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), u);
        let room = format!("job:{batch}");
        for _ in 0..watchers {
            let (ws, _, _) = join(s, &token, &room, false, None).await?;
            watch_tasks.push(tokio::spawn(watch_job(ws, room.clone())));
        }
        batches.push(batch);
    }
    let mut upload_tasks = Vec::new();
    for (u, batch) in batches.iter().enumerate() {
        let mut body = String::with_capacity(rows * 48 + 512);
        body.push_str(&format!("--B\r\nContent-Disposition: form-data; name=\"batch_id\"\r\n\r\n{batch}\r\n"));
        body.push_str("--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"load.csv\"\r\nContent-Type: text/csv\r\n\r\n");
        body.push_str("date,amount,description\n");
        for i in 0..rows {
            body.push_str(&format!(
                "2024-{:02}-{:02},-{}.{:02},load {u} row {i} grocery\n",
                i % 12 + 1,
                i % 28 + 1,
                i % 997,
                i % 100
            ));
        }
        body.push_str("\r\n--B--\r\n");
        let (addr, token) = (s.addr.clone(), token.clone());
        upload_tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(&addr).await?;
            let (status, answer) = http
                .request("POST", "/api/v1/uploads", &token, "multipart/form-data; boundary=B", body.as_bytes())
                .await?;
            if status != 202 {
                return Err(format!("upload answered {status}: {}", String::from_utf8_lossy(&answer)));
            }
            Ok::<(), String>(())
        }));
    }
    drop(csv);
    for t in upload_tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let mut progress_hist = histogram();
    let mut completed = 0;
    for t in watch_tasks {
        let (done, h) = t.await.map_err(|e| e.to_string())?;
        completed += usize::from(done);
        progress_hist.add(h).map_err(|e| e.to_string())?;
    }
    let secs = started.elapsed().as_secs_f64();
    let mut fields = Map::new();
    fields.insert("uploads".into(), uploads.into());
    fields.insert("rows_per_upload".into(), rows.into());
    fields.insert("watchers_per_job".into(), watchers.into());
    fields.insert("watchers_completed".into(), completed.into());
    fields.insert("seconds".into(), ((secs * 100.0).round() / 100.0).into());
    fields.insert("rows_per_s".into(), (((uploads * rows) as f64 / secs).round()).into());
    fields.insert("event_latency".into(), percentiles(&progress_hist));
    if let Some(f) = s.figures() {
        fields.insert("server_peak_rss_mib".into(), (f.peak_kib / 1024).into());
        fields.insert("server_cpu_s".into(), ((f.cpu_s * 100.0).round() / 100.0).into());
    }
    print("jobs", fields);
    Ok(())
}

/// Follows a job room to its end; the latency of each event is receipt time minus its `ts`.
async fn watch_job(mut ws: Ws, room: String) -> (bool, Histogram<u64>) {
    let mut h = histogram();
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(60), ws.next()).await else { break };
        let Some(env) = envelope(&msg) else { continue };
        if env.room.as_deref() != Some(room.as_str()) {
            continue;
        }
        if let Ok(ts) = humantime::parse_rfc3339(&env.ts) {
            let now = SystemTime::now();
            // `ts` has millisecond precision: the latency is known to within 1 ms.
            let lat = now.duration_since(ts).unwrap_or_default();
            let _ = h.record(lat.as_micros().max(1) as u64);
        }
        match env.event {
            Event::ProcessingCompleted(_) => return (true, h),
            Event::ProcessingFailed(_) | Event::JobCancelled(_) => return (false, h),
            _ => {}
        }
    }
    (false, h)
}

/// `reports`: workers reporting into `jobs` jobs that run elsewhere, each watched by `watchers`
/// clients. Every report carries its send time in `metadata.t`; the server coalesces progress to
/// `progress_max_rate_per_s` (pass `--server-arg=--progress-max-rate-per-s=0` to have every report
/// become an event). Each job is completed at the end, so every watcher knows the last `seq`.
pub async fn reports(s: &Server, jobs: usize, watchers: usize, rate: f64, duration: Duration) -> Result<(), String> {
    let publisher = s.token("loadtest-publisher", JOB_TENANT, &["publisher"]);
    let mut http = Http::connect(&s.publish_addr).await?;
    let mut created = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let (status, answer) = http.json("POST", "/api/v1/jobs", &publisher, &json!({"kind": "loadtest"})).await?;
        if status != 201 {
            return Err(format!("POST /api/v1/jobs answered {status}: {answer}"));
        }
        let id = answer["job_id"].as_str().ok_or("no job_id")?.to_string();
        created.push((id, answer["token"].as_str().ok_or("no token")?.to_string()));
    }
    let rooms: Vec<String> = created.iter().map(|(id, _)| format!("job:{id}")).collect();
    let (conns, connect_hist) = connect_many(s, jobs * watchers, &rooms, false, "loadtest-watcher").await?;
    let delivered = Arc::new(AtomicU64::new(0));
    let before = s.figures();
    let mut per_room_tx: HashMap<String, tokio::sync::watch::Sender<Option<u64>>> = HashMap::new();
    let mut readers = Vec::with_capacity(conns.len());
    for (ws, room) in conns {
        let rrx = per_room_tx.entry(room.clone()).or_insert_with(|| tokio::sync::watch::channel(None).0).subscribe();
        // Each job's room had one event before anyone joined: its `status` queued.
        readers.push(tokio::spawn(read_room(ws, false, room, delivered.clone(), Arc::new(rrx), histogram(), 1)));
    }
    // 32 keep-alive connections report, each on an even schedule offset by its share of the interval.
    let senders = 32usize.min(jobs.max(1));
    let per = rate / senders as f64;
    let (accepted, coalesced) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let refused = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..senders {
        let mine: Vec<(String, String)> = created.iter().skip(k).step_by(senders).cloned().collect();
        let (addr, accepted, coalesced, refused) =
            (s.publish_addr.clone(), accepted.clone(), coalesced.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(&addr).await?;
            let mut n = 0u64;
            let offset = k as f64 / senders as f64 / per;
            while start.elapsed() < duration {
                let due = start + Duration::from_secs_f64(offset + n as f64 / per);
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                }
                let (id, token) = &mine[n as usize % mine.len()];
                // Progress creeps up to 0.9 over the run; the job completes afterwards.
                let fraction = (start.elapsed().as_secs_f64() / duration.as_secs_f64()).min(1.0) * 0.9;
                let body = json!({"progress": fraction, "metadata": {"t": unix_nanos()}});
                let (status, answer) = http.json("POST", &format!("/api/v1/jobs/{id}/report"), token, &body).await?;
                match status {
                    200 if answer["seq"].is_null() => coalesced.fetch_add(1, Relaxed),
                    200 => accepted.fetch_add(1, Relaxed),
                    _ => refused.fetch_add(1, Relaxed),
                };
                n += 1;
            }
            Ok::<(), String>(())
        }));
    }
    run_ticking(tasks, start, duration, |secs| {
        let done = accepted.load(Relaxed) + coalesced.load(Relaxed);
        format!(
            "[reports] {secs:>5.1}/{} s  reports {done} ({:.0}/s)  delivered {}",
            duration.as_secs(),
            done as f64 / secs,
            delivered.load(Relaxed)
        )
    })
    .await?;
    let elapsed = start.elapsed().as_secs_f64();
    // Each job ends: its terminal event's seq is every watcher's last. (A new connection: the
    // one that created the jobs has idled past the server's keep-alive.)
    let mut http = Http::connect(&s.publish_addr).await?;
    let mut expected = 0u64;
    for ((id, token), room) in created.iter().zip(&rooms) {
        let (status, answer) = http.json("POST", &format!("/api/v1/jobs/{id}/complete"), token, &json!({})).await?;
        if status != 200 {
            return Err(format!("complete answered {status}: {answer}"));
        }
        // The `status` completed follows the terminal event in the room.
        let last = answer["seq"].as_u64().unwrap_or(0) + 1;
        expected += last.saturating_sub(1) * watchers as u64;
        if let Some(tx) = per_room_tx.get(room) {
            let _ = tx.send(Some(last));
        }
    }
    let mut latency = histogram();
    let (mut received, mut dups, mut gaps) = (0u64, 0u64, 0u64);
    for r in readers {
        let (seen, h) = r.await.map_err(|e| e.to_string())?;
        latency.add(h).map_err(|e| e.to_string())?;
        received += seen.received;
        dups += seen.duplicates;
        gaps += seen.gaps;
    }
    let after = s.figures();
    let reports = accepted.load(Relaxed) + coalesced.load(Relaxed);
    let mut fields = Map::new();
    fields.insert("jobs".into(), jobs.into());
    fields.insert("watchers".into(), (jobs * watchers).into());
    fields.insert("rate_per_s".into(), rate.into());
    fields.insert("reports".into(), reports.into());
    fields.insert("reports_per_s".into(), ((reports as f64 / elapsed).round()).into());
    fields.insert("reports_coalesced".into(), coalesced.load(Relaxed).into());
    fields.insert("reports_refused".into(), refused.load(Relaxed).into());
    fields.insert("delivered".into(), received.into());
    fields.insert("expected".into(), expected.into());
    fields.insert("lost".into(), expected.saturating_sub(received).into());
    fields.insert("duplicates".into(), dups.into());
    fields.insert("gaps".into(), gaps.into());
    fields.insert("latency".into(), percentiles(&latency));
    fields.insert("connect_auth".into(), percentiles(&connect_hist));
    if let (Some(b), Some(a)) = (before, after) {
        fields.insert("server_peak_rss_mib".into(), (a.peak_kib / 1024).into());
        fields.insert("server_cpu_s".into(), (((a.cpu_s - b.cpu_s) * 100.0).round() / 100.0).into());
    }
    print("reports", fields);
    Ok(())
}

/// What the receiver got: each `webhook-id`'s count, and the latencies.
type Received = Arc<tokio::sync::Mutex<(HashMap<String, u32>, Histogram<u64>)>>;

/// A webhook receiver for `webhooks`: HTTP/1.1 keep-alive on 127.0.0.1, 200 to everything; records
/// each message's `webhook-id` and the latency from the send time in its job's results.
struct Receiver {
    url: String,
    got: Received,
    count: Arc<AtomicU64>,
}

impl Receiver {
    async fn start() -> Result<Receiver, String> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let url = format!("http://{}/hook", listener.local_addr().map_err(|e| e.to_string())?);
        let got: Received = Arc::new(tokio::sync::Mutex::new((HashMap::new(), histogram())));
        let count = Arc::new(AtomicU64::new(0));
        let (sink, counter) = (got.clone(), count.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (sink, counter) = (sink.clone(), counter.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = BufReader::new(read);
                    loop {
                        let (mut line, mut len, mut id) = (String::new(), 0usize, String::new());
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            let lower = line.to_ascii_lowercase();
                            if let Some(v) = lower.strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                            if lower.starts_with("webhook-id:") {
                                id = line[11..].trim().to_string();
                            }
                        }
                        let mut body = vec![0; len];
                        if reader.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let sent = serde_json::from_slice::<Value>(&body)
                            .ok()
                            .and_then(|v| v["data"]["results"]["t"].as_u64());
                        {
                            let mut g = sink.lock().await;
                            *g.0.entry(id).or_insert(0) += 1;
                            if let Some(t) = sent {
                                let _ = g.1.record((unix_nanos().saturating_sub(t) / 1000).max(1));
                            }
                        }
                        counter.fetch_add(1, Relaxed);
                        if write.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Receiver { url, got, count })
    }
}

/// `webhooks`: `jobs` jobs that run elsewhere are completed as fast as 32 connections can; their
/// tenant's webhook (a receiver in the harness answering 200 at once) gets each `job.completed`.
/// Measures the outbox's delivery rate (first completion to last receipt) and the latency from each
/// completion to its receipt.
pub async fn webhooks(s: &Server, jobs: usize) -> Result<(), String> {
    let receiver = Receiver::start().await?;
    let admin = s.token("loadtest-admin", JOB_TENANT, &["admin"]);
    let publisher = s.token("loadtest-publisher", JOB_TENANT, &["publisher"]);
    let mut http = Http::connect(&s.publish_addr).await?;
    let hook = json!({"url": receiver.url, "events": ["job.completed"]});
    let (status, answer) = http.json("POST", "/api/v1/admin/webhooks", &admin, &hook).await?;
    if status != 201 {
        return Err(format!("POST /api/v1/admin/webhooks answered {status}: {answer}"));
    }
    let mut created = Vec::with_capacity(jobs);
    for i in 0..jobs {
        let (status, answer) = http.json("POST", "/api/v1/jobs", &publisher, &json!({"kind": "loadtest"})).await?;
        if status != 201 {
            return Err(format!("POST /api/v1/jobs answered {status}: {answer}"));
        }
        let id = answer["job_id"].as_str().ok_or("no job_id")?.to_string();
        created.push((id, answer["token"].as_str().ok_or("no token")?.to_string()));
        if i % 500 == 0 {
            progress(&format!("[webhooks] created {i}/{jobs} jobs"));
        }
    }
    progress_done();
    let before = s.figures();
    let start = Instant::now();
    let senders = 32usize.min(jobs.max(1));
    let mut tasks = Vec::new();
    for k in 0..senders {
        let mine: Vec<(String, String)> = created.iter().skip(k).step_by(senders).cloned().collect();
        let addr = s.publish_addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(&addr).await?;
            for (id, token) in mine {
                let body = json!({"results": {"t": unix_nanos()}});
                let (status, answer) = http.json("POST", &format!("/api/v1/jobs/{id}/complete"), &token, &body).await?;
                if status != 200 {
                    return Err(format!("complete answered {status}: {answer}"));
                }
            }
            Ok::<(), String>(())
        }));
    }
    for r in futures_util::future::join_all(tasks).await {
        r.map_err(|e| e.to_string())??;
    }
    let completed_in = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.count.load(Relaxed) < jobs as u64 && Instant::now() < deadline {
        progress(&format!("[webhooks] received {}/{jobs}", receiver.count.load(Relaxed)));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress_done();
    let elapsed = start.elapsed().as_secs_f64();
    let after = s.figures();
    let g = receiver.got.lock().await;
    let distinct = g.0.len() as u64;
    let received = receiver.count.load(Relaxed);
    let mut fields = Map::new();
    fields.insert("jobs".into(), jobs.into());
    fields.insert("completed_in_s".into(), ((completed_in * 100.0).round() / 100.0).into());
    fields.insert("received".into(), received.into());
    fields.insert("distinct_messages".into(), distinct.into());
    fields.insert("lost".into(), (jobs as u64).saturating_sub(distinct).into());
    fields.insert("repeats".into(), received.saturating_sub(distinct).into());
    fields.insert("deliveries_per_s".into(), ((distinct as f64 / elapsed).round()).into());
    fields.insert("latency".into(), percentiles(&g.1));
    if let (Some(b), Some(a)) = (before, after) {
        fields.insert("server_peak_rss_mib".into(), (a.peak_kib / 1024).into());
        fields.insert("server_cpu_s".into(), (((a.cpu_s - b.cpu_s) * 100.0).round() / 100.0).into());
    }
    print("webhooks", fields);
    Ok(())
}
