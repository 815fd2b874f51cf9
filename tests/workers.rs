//! Jobs that run elsewhere (contract §7), end to end: a publisher creates a job, a worker holding
//! only its job token reports into it over HTTP while WebSocket clients watch the room.

mod common;

use common::{Client, TestServer};
use jobcast::protocol::{ClientMessage, Envelope, Event, EventType, Since};
use serde_json::{json, Value};

/// Creates a job as a publisher of `tenant`; answers the 201 body (`job_id`, `room`, `token`).
async fn create(server: &TestServer, tenant: &str, body: Value) -> Value {
    let publisher = server.token("svc", tenant, &["publisher"]);
    let (status, created) = server.request("POST", "/api/v1/jobs", Some(&publisher), Some(body)).await;
    assert_eq!(status, 201, "{created}");
    created
}

/// `POST /api/v1/jobs/{id}/{action}` with `token`.
async fn call(server: &TestServer, created: &Value, action: &str, token: &str, body: Value) -> (u16, Value) {
    let id = created["job_id"].as_str().expect("job_id");
    server.request("POST", &format!("/api/v1/jobs/{id}/{action}"), Some(token), Some(body)).await
}

fn token_of(created: &Value) -> String {
    created["token"].as_str().expect("token").to_string()
}

/// A watcher of the job's room, after its `subscribed`.
async fn watch(server: &TestServer, created: &Value, tenant: &str) -> (Client, Value) {
    let mut c = server.connect_as("alice", tenant).await;
    let sub = c.subscribe(created["room"].as_str().expect("room")).await;
    (c, sub)
}

/// An envelope's `data` as JSON.
fn data(env: &Envelope) -> Value {
    serde_json::to_value(env).expect("json")["data"].clone()
}

/// Reads events until one of `kind`; answers it with every event read on the way.
async fn until(c: &mut Client, kind: EventType) -> (Envelope, Vec<Envelope>) {
    let mut seen = Vec::new();
    loop {
        let env = c.recv().await;
        if env.event.kind() == kind {
            return (env, seen);
        }
        seen.push(env);
    }
}

#[actix_rt::test]
async fn a_worker_reports_stage_weighted_progress_and_completes_while_watchers_see_it_in_order() {
    let server = TestServer::with(|c| c.progress_max_rate_per_s = 0);
    let created = create(
        &server,
        "acme",
        json!({"kind": "thumbnails", "title": "Resize 3 photos", "total": 3,
               "stages": [{"name": "download", "weight": 1}, {"name": "resize", "weight": 3}],
               "metadata": {"album": "summer"}}),
    )
    .await;
    assert_eq!(created["room"], format!("job:{}", created["job_id"].as_str().expect("id")));
    let (mut a, sub) = watch(&server, &created, "acme").await;
    assert_eq!(sub["snapshot"]["kind"], "thumbnails");
    assert_eq!(sub["snapshot"]["title"], "Resize 3 photos");
    assert_eq!(sub["snapshot"]["metadata"]["album"], "summer");
    let token = token_of(&created);
    // The download stage half done: 0.5 of a quarter of the bar.
    let (status, answer) =
        call(&server, &created, "report", &token, json!({"stage": "download", "progress": 0.5})).await;
    assert_eq!((status, answer["cancel_requested"].clone()), (200, json!(false)), "{answer}");
    let (progress, _) = until(&mut a, EventType::ProcessingProgress).await;
    assert_eq!(answer["seq"], json!(progress.seq), "the answer names the event's seq");
    let Event::ProcessingProgress(p) = progress.event else { unreachable!() };
    assert_eq!((p.stage.as_str(), p.progress), ("download", 12.5));
    // The resize stage, by units: 2 of 3 photos, with a step and metadata.
    let (status, _) = call(
        &server,
        &created,
        "report",
        &token,
        json!({"stage": "resize", "done": 2, "total": 3, "message": "photo 2 of 3",
               "metadata": {"last": "b.jpg"},
               "step": {"id": "b.jpg", "index": 1, "status": "completed", "duration_ms": 40}}),
    )
    .await;
    assert_eq!(status, 200);
    let (step, _) = until(&mut a, EventType::ZoneCompleted).await;
    assert_eq!(data(&step)["zone_id"], "b.jpg");
    let (progress, _) = until(&mut a, EventType::ProcessingProgress).await;
    let p = data(&progress);
    assert_eq!(p["progress"], 75.0, "a quarter for download, then 2/3 of three quarters");
    assert_eq!(p["current_operation"], "photo 2 of 3");
    assert_eq!(p["metadata"], json!({"album": "summer", "last": "b.jpg"}), "merged");
    // An earlier stage does not move the bar back.
    call(&server, &created, "report", &token, json!({"stage": "download", "progress": 0.1})).await;
    let (progress, _) = until(&mut a, EventType::ProcessingProgress).await;
    assert_eq!(data(&progress)["progress"], 75.0);
    let (status, ended) = call(&server, &created, "complete", &token, json!({"results": {"resized": 3}})).await;
    assert_eq!((status, ended["status"].clone()), (200, json!("completed")), "{ended}");
    let (done, _) = until(&mut a, EventType::ProcessingCompleted).await;
    assert_eq!(data(&done)["results"]["resized"], 3);
    assert_eq!(json!(done.seq), ended["seq"]);
    // A second watcher resuming from the first event sees the same events in the same order.
    let first = progress.seq.expect("seq") - 3;
    let mut b = server.connect_as("bob", "acme").await;
    b.send(&ClientMessage::Subscribe {
        room: created["room"].as_str().expect("room").into(),
        since: Some(Since { seq: first, epoch: progress.epoch.clone().expect("epoch") }),
    })
    .await;
    let resumed = b.expect_data(EventType::Subscribed).await;
    assert_eq!(resumed["recovered"], true);
    assert_eq!(resumed["snapshot"]["status"], "completed");
    assert_eq!(resumed["snapshot"]["progress"], 100.0);
    let replayed = b.recv().await;
    assert_eq!(replayed.seq, Some(first + 1));
    // The job ended, and its token with it.
    let (status, body) = call(&server, &created, "report", &token, json!({"progress": 1.0})).await;
    assert_eq!(status, 401, "{body}");
}

#[actix_rt::test]
async fn a_job_token_works_for_its_own_job_only_and_nowhere_else() {
    let server = TestServer::start();
    let one = create(&server, "acme", json!({"kind": "etl"})).await;
    let other = create(&server, "acme", json!({"kind": "etl"})).await;
    let token = token_of(&one);
    let (status, _) = call(&server, &other, "report", &token, json!({"progress": 0.5})).await;
    assert_eq!(status, 403, "another job's report");
    let (status, _) = call(&server, &other, "complete", &token, json!({})).await;
    assert_eq!(status, 403, "another job's completion");
    for (method, path) in [
        ("GET", "/api/v1/jobs".to_string()),
        ("GET", format!("/api/v1/jobs/{}", one["job_id"].as_str().expect("id"))),
        ("POST", format!("/api/v1/jobs/{}/cancel", one["job_id"].as_str().expect("id"))),
        ("POST", format!("/api/v1/jobs/{}/events", one["job_id"].as_str().expect("id"))),
        ("POST", "/api/v1/jobs".to_string()),
        ("POST", "/api/v1/auth/websocket-token".to_string()),
        ("GET", "/api/v1/admin/stats".to_string()),
    ] {
        let (status, body) = server.request(method, &path, Some(&token), Some(json!({"kind": "x"}))).await;
        assert_eq!(status, 401, "{method} {path}: {body}");
    }
    // Nor does it open a WebSocket.
    let mut c = server.connect(&format!("/ws?token={token}&format=json")).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::AuthFailure).await;
    assert_eq!(c.expect_close().await.0, 4001);
    // And an access token, even a publisher's, does not report.
    let publisher = server.token("svc", "acme", &["publisher"]);
    let (status, _) = call(&server, &one, "report", &publisher, json!({"progress": 0.5})).await;
    assert_eq!(status, 401);
    // Creating needs the publisher role.
    let plain = server.token("alice", "acme", &[]);
    let (status, _) = server.request("POST", "/api/v1/jobs", Some(&plain), Some(json!({"kind": "x"}))).await;
    assert_eq!(status, 403);
    // Another tenant cannot see the job.
    let (c, _) = watch(&server, &one, "acme").await;
    c.close().await;
    let evil = server.token("mallory", "evil", &[]);
    let path = format!("/api/v1/jobs/{}", one["job_id"].as_str().expect("id"));
    assert_eq!(server.request("GET", &path, Some(&evil), None).await.0, 404);
}

#[actix_rt::test]
async fn bad_reports_are_refused_with_a_reason_and_change_nothing() {
    let server = TestServer::start();
    let created =
        create(&server, "acme", json!({"kind": "etl", "stages": [{"name": "load"}], "metadata": {"kept": true}})).await;
    let token = token_of(&created);
    for body in [
        json!({"progress": 1.5}),
        json!({"progress": -0.1}),
        json!({"stage": "nope", "progress": 0.1}),
        json!({"done": 5, "total": 3}),
        json!({"progress": "half"}),
        json!({"metadata": "not an object"}),
        json!({"step": {"id": "a", "index": 0, "status": "exploded"}}),
        json!({"message": "x".repeat(2000)}),
    ] {
        let (status, answer) = call(&server, &created, "report", &token, body.clone()).await;
        assert_eq!(status, 400, "{body} answered {answer}");
        assert_eq!(answer["error"]["code"], "bad_request");
    }
    let big = json!({"metadata": {"blob": "x".repeat(70 * 1024)}});
    assert_eq!(call(&server, &created, "report", &token, big).await.0, 413);
    for body in
        [json!({"kind": ""}), json!({"kind": "a b"}), json!({"kind": "k", "stages": [{"name": "a"}, {"name": "a"}]})]
    {
        let publisher = server.token("svc", "acme", &["publisher"]);
        let (status, _) = server.request("POST", "/api/v1/jobs", Some(&publisher), Some(body.clone())).await;
        assert_eq!(status, 400, "{body}");
    }
    let path = format!("/api/v1/jobs/{}", created["job_id"].as_str().expect("id"));
    let (_, snapshot) = server.request("GET", &path, Some(&server.token("alice", "acme", &[])), None).await;
    assert_eq!(snapshot["progress"], 0.0);
    assert_eq!(snapshot["status"], "queued");
    assert_eq!(snapshot["metadata"], json!({"kept": true}), "a refused report leaves the metadata as it was");
}

#[actix_rt::test]
async fn before_any_stage_is_named_a_fraction_is_the_first_stages() {
    let server = TestServer::with(|c| c.progress_max_rate_per_s = 0);
    let created = create(
        &server,
        "acme",
        json!({"kind": "etl", "stages": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}),
    )
    .await;
    let token = token_of(&created);
    let (mut watcher, _) = watch(&server, &created, "acme").await;
    call(&server, &created, "report", &token, json!({"progress": 0.5})).await;
    let (first, _) = until(&mut watcher, EventType::ProcessingProgress).await;
    assert_eq!(data(&first)["progress"], 12.5, "half of the first stage's quarter");
    // Naming the next stage starts the bar where the stages before it end.
    call(&server, &created, "report", &token, json!({"stage": "b"})).await;
    let (second, _) = until(&mut watcher, EventType::ProcessingProgress).await;
    assert_eq!((data(&second)["progress"].clone(), data(&second)["stage"].clone()), (json!(25.0), json!("b")));
}

#[actix_rt::test]
async fn a_cancel_reaches_an_http_only_worker_at_its_next_report() {
    let server = TestServer::start();
    let created = create(&server, "acme", json!({"kind": "etl"})).await;
    let token = token_of(&created);
    let (mut watcher, _) = watch(&server, &created, "acme").await;
    assert_eq!(call(&server, &created, "report", &token, json!({"progress": 0.2})).await.1["cancel_requested"], false);
    let id = created["job_id"].as_str().expect("id");
    let alice = server.token("alice", "acme", &[]);
    let (status, _) = server.request("POST", &format!("/api/v1/jobs/{id}/cancel"), Some(&alice), None).await;
    assert_eq!(status, 202);
    let (requested, _) = until(&mut watcher, EventType::CancelRequested).await;
    assert_eq!(data(&requested)["by"], "alice");
    // Every later report says so.
    for _ in 0..2 {
        let (status, answer) = call(&server, &created, "report", &token, json!({"progress": 0.3})).await;
        assert_eq!((status, answer["cancel_requested"].clone()), (200, json!(true)));
    }
    // The worker stops and says it failed: the job is cancelled, not failed.
    let (status, ended) = call(&server, &created, "fail", &token, json!({"error": "stopped on request"})).await;
    assert_eq!((status, ended["status"].clone()), (200, json!("cancelled")), "{ended}");
    let (cancelled, seen) = until(&mut watcher, EventType::JobCancelled).await;
    assert_eq!(data(&cancelled)["by"], "alice");
    assert!(seen.iter().all(|e| e.event.kind() != EventType::ProcessingFailed));
    let (_, snapshot) = server.request("GET", &format!("/api/v1/jobs/{id}"), Some(&alice), None).await;
    assert_eq!(snapshot["status"], "cancelled");
}

#[actix_rt::test]
async fn a_worker_that_ignores_a_cancel_is_cancelled_after_the_grace_period() {
    let server = TestServer::with(|c| c.job_cancel_grace_s = 1);
    let created = create(&server, "acme", json!({"kind": "etl"})).await;
    let (mut watcher, _) = watch(&server, &created, "acme").await;
    let id = created["job_id"].as_str().expect("id");
    let alice = server.token("alice", "acme", &[]);
    assert_eq!(server.request("POST", &format!("/api/v1/jobs/{id}/cancel"), Some(&alice), None).await.0, 202);
    until(&mut watcher, EventType::CancelRequested).await;
    until(&mut watcher, EventType::JobCancelled).await;
    let (status, _) = call(&server, &created, "report", &token_of(&created), json!({"progress": 0.9})).await;
    assert_eq!(status, 401, "the job ended");
}

#[actix_rt::test]
async fn a_silent_worker_stalls_then_fails_recoverable() {
    let server = TestServer::with(|c| c.job_stall_timeout_s = 1);
    let created = create(&server, "acme", json!({"kind": "etl"})).await;
    let (mut watcher, _) = watch(&server, &created, "acme").await;
    call(&server, &created, "report", &token_of(&created), json!({"progress": 0.63})).await;
    let (stalled, _) = until(&mut watcher, EventType::JobStalled).await;
    assert!(data(&stalled)["since"].as_str().is_some_and(|s| s.ends_with('Z')));
    let (failed, _) = until(&mut watcher, EventType::ProcessingFailed).await;
    assert_eq!(data(&failed)["recoverable"], true);
    let id = created["job_id"].as_str().expect("id");
    let alice = server.token("alice", "acme", &[]);
    let (_, snapshot) = server.request("GET", &format!("/api/v1/jobs/{id}"), Some(&alice), None).await;
    assert_eq!(snapshot["status"], "failed");
    assert_eq!(snapshot["error"]["recoverable"], true);
}

#[actix_rt::test]
async fn reports_are_coalesced_but_the_terminal_event_never_is() {
    let server = TestServer::with(|c| c.progress_max_rate_per_s = 1);
    let created = create(&server, "acme", json!({"kind": "etl"})).await;
    let token = token_of(&created);
    let (mut watcher, _) = watch(&server, &created, "acme").await;
    let mut coalesced = 0;
    for i in 1..=20 {
        let (status, answer) =
            call(&server, &created, "report", &token, json!({"progress": f64::from(i) / 40.0})).await;
        assert_eq!(status, 200);
        coalesced += usize::from(answer["seq"].is_null());
    }
    assert!(coalesced >= 15, "{coalesced} of 20 reports were coalesced at 1 per second");
    let (status, _) = call(&server, &created, "complete", &token, json!({})).await;
    assert_eq!(status, 200);
    let (_, seen) = until(&mut watcher, EventType::ProcessingCompleted).await;
    let progress: Vec<f64> = seen
        .iter()
        .filter(|e| e.event.kind() == EventType::ProcessingProgress)
        .map(|e| data(e)["progress"].as_f64().expect("progress"))
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "monotonic: {progress:?}");
    assert!(progress.len() < 20, "coalesced: {progress:?}");
}

#[actix_rt::test]
async fn a_workers_job_takes_posted_info_but_not_posted_progress() {
    let server = TestServer::start();
    let created = create(&server, "acme", json!({"kind": "etl"})).await;
    let id = created["job_id"].as_str().expect("id");
    let publisher = server.token("svc", "acme", &["publisher"]);
    let path = format!("/api/v1/jobs/{id}/events");
    let info = json!({"type": "info", "data": {"note": "warming up"}});
    assert_eq!(server.request("POST", &path, Some(&publisher), Some(info)).await.0, 201);
    let status = json!({"type": "status", "data": {"job_id": id, "status": "completed", "message": "x"}});
    let (code, body) = server.request("POST", &path, Some(&publisher), Some(status)).await;
    assert_eq!(code, 409, "{body}");
    let (_, snapshot) = server.request("GET", &format!("/api/v1/jobs/{id}"), Some(&publisher), None).await;
    assert_eq!(snapshot["status"], "queued");
}

#[actix_rt::test]
async fn the_older_publisher_events_still_work() {
    let server = TestServer::start();
    let id = uuid::Uuid::new_v4();
    let publisher = server.token("svc", "acme", &["publisher"]);
    let body = json!({"type": "info", "data": {"hello": 1}});
    let (status, answer) =
        server.request("POST", &format!("/api/v1/jobs/{id}/events"), Some(&publisher), Some(body)).await;
    assert_eq!((status, answer["seq"].clone()), (201, json!(1)));
}
