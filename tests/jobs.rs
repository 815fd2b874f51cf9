//! CSV import jobs against a real server: uploads, the live event stream, results, cancel, tenancy.

mod common;

use common::{generate_csv, Client, TestServer};
use jobcast::protocol::{ClientMessage, Envelope, Event, EventType, Since};
use serde_json::{json, Value};
use uuid::Uuid;

/// Reads a job room until an event of `last` kind arrives; returns every room event in order.
async fn collect_until(c: &mut Client, last: EventType) -> Vec<Envelope> {
    let mut events = Vec::new();
    loop {
        let env = c.recv().await;
        if env.room.is_none() {
            panic!("unexpected connection message while watching a job: {env:?}");
        }
        let done = env.event.kind() == last;
        events.push(env);
        if done {
            return events;
        }
    }
}

fn data(env: &Envelope) -> Value {
    serde_json::to_value(env).unwrap()["data"].clone()
}

#[actix_rt::test]
async fn a_multi_zone_import_streams_every_zone_with_monotonic_progress_and_exact_results() {
    let s = TestServer::with(|c| c.zone_rows = 100);
    let csv = generate_csv(1050, "a");
    let token = s.token("alice", "acme", &[]);
    // Subscribe first with a batch id, then upload.
    let batch = Uuid::new_v4();
    let mut c = s.connect_as("alice", "acme").await;
    let joined = c.subscribe(&format!("job:{batch}")).await;
    assert_eq!(joined["snapshot"]["status"], "pending");
    let (status, body) = s.upload(&token, "bank.csv", "text/csv", &csv.bytes, Some(batch)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["job_id"], batch.to_string());
    assert_eq!(body["room"], format!("job:{batch}"));
    assert_eq!(body["ws_url"], format!("/ws/jobs/{batch}"));

    let events = collect_until(&mut c, EventType::ProcessingCompleted).await;
    // seq rises by exactly one, from the first event of the room.
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, Some(i as u64 + 1), "gap or duplicate at {e:?}");
    }
    let kinds: Vec<EventType> = events.iter().map(|e| e.event.kind()).collect();
    let statuses: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::Status(s) => Some(s.status.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(statuses.first().map(String::as_str), Some("queued"));
    for want in ["validating", "scanning", "processing", "finalizing"] {
        assert!(statuses.iter().any(|s| s == want), "no {want} status in {statuses:?}");
    }
    let started = events.iter().find(|e| e.event.kind() == EventType::ProcessingStarted).expect("processing_started");
    assert_eq!(data(started)["zones_total"], 11);
    assert_eq!(data(started)["filename"], "bank.csv");
    // Every zone reported exactly once, started before it completed.
    let mut completed: Vec<u64> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::ZoneCompleted(z) => Some(z.zone_index),
            _ => None,
        })
        .collect();
    completed.sort();
    assert_eq!(completed, (0..11).collect::<Vec<_>>());
    assert_eq!(kinds.iter().filter(|k| **k == EventType::ZoneProcessing).count(), 11);
    let rows: u64 = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::ZoneCompleted(z) => Some(z.rows),
            _ => None,
        })
        .sum();
    assert_eq!(rows, 1050);
    // Progress never goes down and reaches 100 only right before processing_completed.
    let progress: Vec<f64> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::ProcessingProgress(p) => Some(p.progress),
            _ => None,
        })
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(progress.last(), Some(&100.0));
    assert!(progress[..progress.len() - 1].iter().all(|p| *p < 100.0));
    assert_eq!(kinds[kinds.len() - 2], EventType::ProcessingProgress);
    // Every progress event carries `eta_seconds` (a number or null), 0 on the final one.
    let etas: Vec<&Value> = c
        .raw
        .iter()
        .filter(|v| v["type"] == "processing_progress")
        .map(|v| v["data"].get("eta_seconds").unwrap_or_else(|| panic!("no eta_seconds in {v}")))
        .collect();
    assert_eq!(etas.len(), progress.len());
    assert!(etas.iter().all(|e| e.is_null() || e.as_f64().is_some_and(|s| s >= 0.0)), "{etas:?}");
    assert_eq!(etas.last().and_then(|e| e.as_f64()), Some(0.0));

    let results = data(events.last().unwrap())["results"].clone();
    assert_eq!(results["processed_rows"], 1050);
    assert_eq!(results["invalid_count"].as_u64(), Some(csv.invalid_lines.len() as u64));
    let invalid: Vec<u64> =
        results["invalid_rows"].as_array().unwrap().iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert_eq!(invalid, csv.invalid_lines);
    assert!(results["invalid_rows"][0]["reason"].as_str().unwrap().contains("date"));
    let flagged: Vec<u64> =
        results["flagged_cells"].as_array().unwrap().iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert_eq!(flagged, csv.flagged_lines);
    assert_eq!(results["flagged_cells"][0]["column"], "description");
    assert_eq!(results["flagged_cells"][0]["reason"], "formula_injection");
    assert_eq!(results["duplicates"].as_u64(), Some(csv.duplicates));
    assert_eq!(results["inserted"].as_u64(), Some(csv.valid() - csv.duplicates));
    let categorized: u64 = results["categories"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(categorized, csv.valid());
    assert!(results["categories"]["groceries"].as_u64().unwrap() > 900);

    // The snapshot agrees, and the job is listed for its tenant only.
    let (status, snap) = s.request("GET", &format!("/api/v1/jobs/{batch}"), Some(&token), None).await;
    assert_eq!(status, 200);
    assert_eq!((snap["status"].as_str(), snap["progress"].as_f64()), (Some("completed"), Some(100.0)));
    assert_eq!(snap["results"], results);
    assert!(snap.get("spec").is_none(), "server paths stay inside");
    let (_, list) = s.request("GET", "/api/v1/jobs", Some(&token), None).await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    let (_, other) = s.request("GET", "/api/v1/jobs", Some(&s.token("gus", "globex", &[])), None).await;
    assert_eq!(other["jobs"], json!([]));

    // Re-importing the same file inserts nothing new.
    let (status, body) = s.upload(&token, "bank.csv", "text/csv", &csv.bytes, None).await;
    assert_eq!(status, 202);
    let mut w = s.connect(&format!("/ws/jobs/{}?token={token}&format=json", body["job_id"].as_str().unwrap())).await;
    w.expect(EventType::ConnectionEstablished).await;
    w.expect(EventType::Authenticated).await;
    let sub = w.expect_data(EventType::Subscribed).await;
    assert!(sub["snapshot"].is_object());
    let events = collect_until(&mut w, EventType::ProcessingCompleted).await;
    let again = data(events.last().unwrap())["results"].clone();
    assert_eq!(again["inserted"], 0);
    assert_eq!(again["duplicates"].as_u64(), Some(csv.valid()));
}

#[actix_rt::test]
async fn upload_errors_are_clear() {
    let s = TestServer::with(|c| c.max_upload_bytes = 2000);
    let token = s.token("alice", "acme", &[]);
    let big = generate_csv(200, "big");
    let (status, body) = s.upload(&token, "big.csv", "text/csv", &big.bytes, None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("payload_too_large")));
    let (status, body) = s.upload(&token, "photo.png", "image/png", b"\x89PNG\r\n\x1a\n", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (415, Some("unsupported_media_type")));
    let (status, _) = s.upload(&token, "sneaky.csv", "text/csv", b"date,amount\0\x01\x02", None).await;
    assert_eq!(status, 415, "binary content is not CSV text");
    let (status, body) = s.upload("bad-token", "a.csv", "text/csv", b"date,amount,description\n", None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")));
    let (status, body) = s.request("POST", "/api/v1/uploads", Some(&token), Some(json!({}))).await;
    assert_eq!(status, 400, "{body}");
    // A header without the required columns: accepted upload, the job fails naming what is missing.
    let batch = Uuid::new_v4();
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe(&format!("job:{batch}")).await;
    let (status, _) =
        s.upload(&token, "wrong.csv", "text/csv", b"when,how much,memo\n2024-01-01,1,x\n", Some(batch)).await;
    assert_eq!(status, 202);
    let job = batch.to_string();
    let events = collect_until(&mut c, EventType::ProcessingFailed).await;
    let failed = data(events.last().unwrap());
    assert!(failed["error"].as_str().unwrap().contains("lacks the columns date, amount, description"), "{failed}");
    assert_eq!(failed["recoverable"], false);
    // A watcher arriving later finds the outcome in the snapshot.
    let mut late = s.connect(&format!("/ws/jobs/{job}?token={token}&format=json")).await;
    late.expect(EventType::ConnectionEstablished).await;
    late.expect(EventType::Authenticated).await;
    let joined = late.expect_data(EventType::Subscribed).await;
    assert_eq!(joined["snapshot"]["status"], "failed");
    assert!(joined["snapshot"]["error"]["message"].as_str().unwrap().contains("lacks the columns"));
    let (_, snap) = s.request("GET", &format!("/api/v1/jobs/{job}"), Some(&token), None).await;
    assert_eq!(snap["status"], "failed");
    // A batch id another job has is refused.
    let (status, _) = s
        .upload(&token, "again.csv", "text/csv", b"date,amount,description\n", Some(Uuid::parse_str(&job).unwrap()))
        .await;
    assert_eq!(status, 409);
}

/// Uploads a file big enough to take a while (about 3 s with 10-row zones in a debug build, so a
/// test has time to act on a running job), waits for its first zone, and returns the watcher.
async fn running_job(s: &TestServer, token: &str) -> (String, Client) {
    let csv = generate_csv(100_000, &Uuid::new_v4().to_string());
    let batch = Uuid::new_v4();
    let mut c = s.connect(&format!("/ws?token={token}&format=json")).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    c.subscribe(&format!("job:{batch}")).await;
    let (status, _) = s.upload(token, "long.csv", "text/csv", &csv.bytes, Some(batch)).await;
    assert_eq!(status, 202);
    collect_until(&mut c, EventType::ZoneCompleted).await;
    (batch.to_string(), c)
}

/// After `job_cancelled`, nothing but the final status follows.
async fn assert_cancelled(c: &mut Client, by: &str) {
    let events = collect_until(c, EventType::JobCancelled).await;
    assert!(events.iter().all(|e| e.event.kind() != EventType::ProcessingCompleted));
    // Stopping between zones: every zone that began also completed before `job_cancelled`.
    let zones = |kind| events.iter().filter(move |e| e.event.kind() == kind).map(|e| data(e)["zone_index"].clone());
    let completed: Vec<_> = zones(EventType::ZoneCompleted).collect();
    assert!(zones(EventType::ZoneProcessing).all(|z| completed.contains(&z)), "a zone began and never ended");
    assert_eq!(data(events.last().unwrap())["by"], by);
    let status = c.expect_data(EventType::Status).await;
    assert_eq!(status["status"], "cancelled");
    c.send(&ClientMessage::Ping { ts: None }).await;
    assert_eq!(c.recv().await.event.kind(), EventType::Pong, "no zone event after job_cancelled");
}

#[actix_rt::test]
async fn cancel_over_http_stops_between_zones() {
    let s = TestServer::with(|c| c.zone_rows = 10);
    let token = s.token("alice", "acme", &[]);
    let (job, mut c) = running_job(&s, &token).await;
    let (status, body) = s.request("POST", &format!("/api/v1/jobs/{job}/cancel"), Some(&token), None).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("cancelling")));
    assert_cancelled(&mut c, "alice").await;
    let (_, snap) = s.request("GET", &format!("/api/v1/jobs/{job}"), Some(&token), None).await;
    assert_eq!(snap["status"], "cancelled");
    assert!(snap["zones_completed"].as_u64().unwrap() < snap["zones_total"].as_u64().unwrap());
    let (status, _) = s.request("POST", &format!("/api/v1/jobs/{job}/cancel"), Some(&token), None).await;
    assert_eq!(status, 409, "a cancelled job cannot be cancelled again");
    let (status, _) = s.request("POST", &format!("/api/v1/jobs/{}/cancel", Uuid::new_v4()), Some(&token), None).await;
    assert_eq!(status, 404);
}

#[actix_rt::test]
async fn cancel_over_websocket_stops_between_zones() {
    let s = TestServer::with(|c| c.zone_rows = 10);
    let token = s.token("alice", "acme", &[]);
    let (job, mut c) = running_job(&s, &token).await;
    c.send(&ClientMessage::Cancel { job_id: job.clone() }).await;
    assert_cancelled(&mut c, "alice").await;
    c.send(&ClientMessage::Cancel { job_id: job }).await;
    assert_eq!(c.expect_data(EventType::Error).await["code"], "job_finished");
    c.send(&ClientMessage::Cancel { job_id: Uuid::new_v4().to_string() }).await;
    assert_eq!(c.expect_data(EventType::Error).await["code"], "unknown_job");
}

#[actix_rt::test]
async fn other_tenants_cannot_see_or_touch_a_job() {
    let s = TestServer::start();
    let token = s.token("alice", "acme", &[]);
    let (status, body) = s.upload(&token, "a.csv", "text/csv", &generate_csv(20, "t").bytes, None).await;
    assert_eq!(status, 202);
    let job = body["job_id"].as_str().unwrap().to_string();
    let mallory = s.token("mallory", "globex", &["publisher"]);
    for (method, path) in [("GET", format!("/api/v1/jobs/{job}")), ("POST", format!("/api/v1/jobs/{job}/cancel"))] {
        let (status, body) = s.request(method, &path, Some(&mallory), None).await;
        assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")), "{method} {path}");
    }
    let (status, _) = s
        .request(
            "POST",
            &format!("/api/v1/jobs/{job}/events"),
            Some(&mallory),
            Some(json!({"type": "info", "data": {}})),
        )
        .await;
    assert_eq!(status, 404);
    let mut m = s.connect_as("mallory", "globex").await;
    m.send(&ClientMessage::Subscribe { room: format!("job:{job}"), since: None }).await;
    assert_eq!(m.expect_data(EventType::Error).await["code"], "forbidden");
    m.send(&ClientMessage::Cancel { job_id: job.clone() }).await;
    assert_eq!(m.expect_data(EventType::Error).await["code"], "forbidden");
    let mut direct = s.connect(&format!("/ws/jobs/{job}?token={mallory}")).await;
    let (code, _, _) = direct.expect_close().await;
    assert_eq!(code, 4003);
    // The admin sees it.
    let (status, _) = s.request("GET", &format!("/api/v1/jobs/{job}"), Some(&s.admin_token()), None).await;
    assert_eq!(status, 200);
}

#[actix_rt::test]
async fn publishers_report_their_own_work_into_a_job_room() {
    let s = TestServer::start();
    let publisher = s.token("etl", "acme", &["publisher"]);
    let job = Uuid::new_v4();
    let post = |body: Value| {
        let (s, publisher) = (&s, publisher.clone());
        async move { s.request("POST", &format!("/api/v1/jobs/{job}/events"), Some(&publisher), Some(body)).await }
    };
    let (status, body) =
        post(json!({"type": "status", "data": {"job_id": job, "status": "processing", "message": "pages"}})).await;
    assert_eq!((status, body), (201, json!({"seq": 1})));
    // Now the job exists for its tenant: a member can watch it and sees what comes next.
    let mut c = s.connect_as("alice", "acme").await;
    let joined = c.subscribe(&format!("job:{job}")).await;
    assert_eq!(joined["seq"], 1);
    assert_eq!(joined["snapshot"]["kind"], "external");
    let progress = json!({"type": "processing_progress", "data": {"job_id": job, "stage": "parsing", "progress": 42.5,
        "zones_completed": 1, "zones_total": 4, "processed": 10, "total": 40, "errors": 0, "current_operation": "page 2"}});
    assert_eq!(post(progress).await, (201, json!({"seq": 2})));
    let env = c.expect(EventType::ProcessingProgress).await;
    assert_eq!(env.seq, Some(2));
    let (_, snap) = s.request("GET", &format!("/api/v1/jobs/{job}"), Some(&publisher), None).await;
    assert_eq!(snap["progress"], 42.5);
    // An `info` is published but leaves the snapshot as it was (no store write for it)...
    assert_eq!(post(json!({"type": "info", "data": {"note": "page 3"}})).await, (201, json!({"seq": 3})));
    assert_eq!(c.expect(EventType::Info).await.seq, Some(3));
    let (_, after) = s.request("GET", &format!("/api/v1/jobs/{job}"), Some(&publisher), None).await;
    assert_eq!(after, snap);
    // ...except that an event of any type creates the external job of an unknown id.
    let other = Uuid::new_v4();
    let path = format!("/api/v1/jobs/{other}/events");
    let (status, _) = s.request("POST", &path, Some(&publisher), Some(json!({"type": "info", "data": {}}))).await;
    assert_eq!(status, 201);
    let (status, created) = s.request("GET", &format!("/api/v1/jobs/{other}"), Some(&publisher), None).await;
    assert_eq!((status, created["kind"].as_str(), created["tenant"].as_str()), (200, Some("external"), Some("acme")));
    // A plain user may not publish; a bad type is refused.
    let (status, _) = s
        .request(
            "POST",
            &format!("/api/v1/jobs/{job}/events"),
            Some(&s.token("alice", "acme", &[])),
            Some(json!({"type": "info", "data": {}})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = post(json!({"type": "pong", "data": {}})).await;
    assert_eq!(status, 400);
}

#[actix_rt::test]
async fn concurrent_publisher_events_for_one_job_lose_no_update() {
    let s = TestServer::start();
    let publisher = s.token("etl", "acme", &["publisher"]);
    let job = Uuid::new_v4();
    let path = format!("/api/v1/jobs/{job}/events");
    // Forty progress reports at once: the snapshot keeps the highest, whatever order they are stored in.
    let posts = (1..=40).map(|i| {
        let body = json!({"type": "processing_progress", "data": {"job_id": job, "stage": "parsing",
            "progress": i as f64, "zones_completed": i, "zones_total": 40, "processed": i, "total": 40,
            "errors": 0, "current_operation": format!("page {i}")}});
        let (s, publisher, path) = (&s, publisher.clone(), path.clone());
        async move { s.request("POST", &path, Some(&publisher), Some(body)).await.0 }
    });
    let statuses = futures_util::future::join_all(posts).await;
    assert!(statuses.iter().all(|&st| st == 201), "{statuses:?}");
    let (_, snap) = s.request("GET", &format!("/api/v1/jobs/{job}"), Some(&publisher), None).await;
    assert_eq!((snap["progress"].as_f64(), snap["kind"].as_str()), (Some(40.0), Some("external")), "{snap}");
}

#[actix_rt::test]
async fn jobs_beyond_the_concurrency_limit_wait_as_queued() {
    let s = TestServer::with(|c| {
        c.max_concurrent_jobs = 1;
        c.zone_rows = 10;
    });
    let token = s.token("alice", "acme", &[]);
    let (first_job, _c) = running_job(&s, &token).await;
    let batch = Uuid::new_v4();
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe(&format!("job:{batch}")).await;
    let (status, _) = s.upload(&token, "second.csv", "text/csv", &generate_csv(10, "q").bytes, Some(batch)).await;
    assert_eq!(status, 202);
    let first = c.expect_data(EventType::Status).await;
    assert_eq!(first["status"], "queued");
    let second = c.expect_data(EventType::Status).await;
    assert_eq!(
        (second["status"].as_str(), second["message"].as_str()),
        (Some("queued"), Some("position 1 in the queue"))
    );
    // It runs once the first is done: cancelled here, since 100,000 rows may take longer than a test
    // waits for one event on a loaded machine (the second job's room is silent until then).
    let (status, _) = s.request("POST", &format!("/api/v1/jobs/{first_job}/cancel"), Some(&token), None).await;
    assert_eq!(status, 202);
    collect_until(&mut c, EventType::ProcessingCompleted).await;
}

#[actix_rt::test]
async fn a_late_watcher_resumes_a_job_room_with_since() {
    let s = TestServer::with(|c| c.zone_rows = 5);
    let token = s.token("alice", "acme", &[]);
    let batch = Uuid::new_v4();
    let mut c = s.connect_as("alice", "acme").await;
    let epoch = c.subscribe(&format!("job:{batch}")).await["epoch"].as_str().unwrap().to_string();
    s.upload(&token, "a.csv", "text/csv", &generate_csv(40, "late").bytes, Some(batch)).await;
    let all = collect_until(&mut c, EventType::ProcessingCompleted).await;
    let mut late = s.connect_as("alice", "acme").await;
    late.send(&ClientMessage::Subscribe { room: format!("job:{batch}"), since: Some(Since { seq: 3, epoch }) }).await;
    let joined = late.expect_data(EventType::Subscribed).await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(joined["snapshot"]["status"], "completed");
    for want in &all[3..] {
        assert_eq!(&late.recv().await, want);
    }
}

#[actix_rt::test]
async fn a_watcher_dropped_mid_job_resumes_with_every_zone() {
    let s = TestServer::with(|c| c.zone_rows = 10);
    let token = s.token("alice", "acme", &[]);
    let batch = Uuid::new_v4();
    let room = format!("job:{batch}");
    let mut c = s.connect_as("alice", "acme").await;
    let epoch = c.subscribe(&room).await["epoch"].as_str().unwrap().to_string();
    let csv = generate_csv(5_000, "drop");
    s.upload(&token, "a.csv", "text/csv", &csv.bytes, Some(batch)).await;
    let mut seen = collect_until(&mut c, EventType::ZoneCompleted).await;
    drop(c); // the TCP connection goes away without a close frame
    let mut c = s.connect_as("alice", "acme").await;
    let last = seen.last().unwrap().seq.unwrap();
    c.send(&ClientMessage::Subscribe { room, since: Some(Since { seq: last, epoch }) }).await;
    assert_eq!(c.expect_data(EventType::Subscribed).await["recovered"], true);
    seen.extend(collect_until(&mut c, EventType::ProcessingCompleted).await);
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq.unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no gap, no duplicate");
    let mut zones: Vec<u64> = seen
        .iter()
        .filter_map(|e| match &e.event {
            Event::ZoneCompleted(z) => Some(z.zone_index),
            _ => None,
        })
        .collect();
    zones.sort();
    assert_eq!(zones, (0..500).collect::<Vec<_>>());
}

#[actix_rt::test]
async fn a_file_that_is_not_utf8_fails_with_its_line() {
    let s = TestServer::start();
    let token = s.token("alice", "acme", &[]);
    let batch = Uuid::new_v4();
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe(&format!("job:{batch}")).await;
    let body = b"date,amount,description\n2024-01-01,1.00,ok\n2024-01-02,2.00,caf\xe9 latin-1\n";
    assert_eq!(s.upload(&token, "latin1.csv", "text/csv", body, Some(batch)).await.0, 202);
    let events = collect_until(&mut c, EventType::ProcessingFailed).await;
    let failed = data(events.last().unwrap());
    assert_eq!(failed["error"], "line 3 is not valid UTF-8");
    assert_eq!(c.expect_data(EventType::Status).await["status"], "failed");
    // An unterminated quote swallows the rest of the file into one field: that row is invalid, not a crash.
    let batch = Uuid::new_v4();
    c.subscribe(&format!("job:{batch}")).await;
    let body = b"date,amount,description\n2024-01-01,1.00,ok\n2024-01-02,2.00,\"never closed\n2024-01-03,3.00,x\n";
    assert_eq!(s.upload(&token, "quote.csv", "text/csv", body, Some(batch)).await.0, 202);
    let events = collect_until(&mut c, EventType::ProcessingCompleted).await;
    let results = data(events.last().unwrap())["results"].clone();
    assert_eq!((results["processed_rows"].as_u64(), results["inserted"].as_u64()), (Some(2), Some(2)));
}

#[actix_rt::test]
async fn a_finished_job_leaves_no_upload_behind() {
    let s = TestServer::start();
    let token = s.token("alice", "acme", &[]);
    let batch = Uuid::new_v4();
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe(&format!("job:{batch}")).await;
    s.upload(&token, "a.csv", "text/csv", &generate_csv(30, "gone").bytes, Some(batch)).await;
    collect_until(&mut c, EventType::ProcessingCompleted).await;
    let uploads = s.data_dir.path().join("uploads");
    let deadline = std::time::Instant::now() + common::WAIT;
    while std::fs::read_dir(&uploads).unwrap().count() > 0 {
        assert!(std::time::Instant::now() < deadline, "the upload is still there");
        actix_rt::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[actix_rt::test]
async fn a_zone_larger_than_the_rows_in_flight_budget_still_runs() {
    // One zone of 70,000 rows, more than jobcast lets wait for the store at once (65,536).
    let s = TestServer::with(|c| c.zone_rows = 100_000);
    let csv = generate_csv(70_000, "one big zone");
    let token = s.token("alice", "acme", &[]);
    let batch = Uuid::new_v4();
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe(&format!("job:{batch}")).await;
    let (status, body) = s.upload(&token, "big.csv", "text/csv", &csv.bytes, Some(batch)).await;
    assert_eq!(status, 202, "{body}");
    let events = collect_until(&mut c, EventType::ProcessingCompleted).await;
    assert_eq!(events.iter().filter(|e| e.event.kind() == EventType::ZoneCompleted).count(), 1);
    let results = data(events.last().unwrap())["results"].clone();
    assert_eq!(results["processed_rows"], 70_000);
    assert_eq!(results["inserted"].as_u64(), Some(csv.valid() - csv.duplicates));
}

#[actix_rt::test]
async fn a_job_whose_file_vanishes_mid_job_fails_after_its_last_zone_event() {
    let s = TestServer::with(|c| c.zone_rows = 10);
    let token = s.token("alice", "acme", &[]);
    let (job, mut c) = running_job(&s, &token).await;
    // Zones open the upload when they begin: the zones after this cannot read their rows.
    std::fs::remove_file(s.data_dir.path().join("uploads").join(format!("{job}.csv"))).unwrap();
    let events = collect_until(&mut c, EventType::ProcessingFailed).await;
    assert!(events.iter().all(|e| e.event.kind() != EventType::ProcessingCompleted));
    let failed = data(events.last().unwrap());
    assert!(failed["error"].as_str().unwrap().contains("failed"), "{failed}");
    let status = c.expect_data(EventType::Status).await;
    assert_eq!(status["status"], "failed");
    // `failed` is final: no zone that was still running sends anything after it.
    c.send(&ClientMessage::Ping { ts: None }).await;
    assert_eq!(c.recv().await.event.kind(), EventType::Pong, "a zone event followed failed");
    let (_, snap) = s.request("GET", &format!("/api/v1/jobs/{job}"), Some(&token), None).await;
    assert_eq!(snap["status"], "failed");
    assert!(snap["zones_completed"].as_u64().unwrap() < snap["zones_total"].as_u64().unwrap());
}
