//! The HTTP endpoints against a real server: admin, health, metrics, errors.

mod common;

use common::TestServer;
use jobcast::protocol::EventType;
use serde_json::json;

#[actix_rt::test]
async fn health_ready_and_metrics() {
    let s = TestServer::start();
    assert_eq!(s.request("GET", "/healthz", None, None).await, (200, json!({"status": "ok"})));
    let (status, ready) = s.request("GET", "/readyz", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(ready["status"], "ready");
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe("tenant:acme").await;
    s.broadcast("tenant:acme", "info", json!({"x": 1})).await;
    c.recv().await;
    let m = s.metrics().await;
    for needle in [
        "jobcast_connections 1",
        "jobcast_rooms 1",
        "jobcast_subscriptions 1",
        "jobcast_messages_sent_total{type=\"info\"} 1",
        "jobcast_messages_sent_total{type=\"subscribed\"} 1",
        "jobcast_bytes_sent_total{type=\"info\"}",
        "jobcast_delivery_latency_seconds_count 1",
        "jobcast_closes_total{code=\"4000\"} 0",
        "# TYPE jobcast_delivery_latency_seconds histogram",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
}

#[actix_rt::test]
async fn api_needs_a_bearer_token_and_the_right_role() {
    let s = TestServer::start();
    for (method, path) in [
        ("GET", "/api/v1/admin/stats"),
        ("GET", "/api/v1/admin/connections"),
        ("DELETE", "/api/v1/admin/users/alice/connections"),
        ("POST", "/api/v1/auth/websocket-token"),
    ] {
        let (status, body) = s.request(method, path, None, None).await;
        assert_eq!(status, 401, "{method} {path}");
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, _) = s.request(method, path, Some("garbage"), None).await;
        assert_eq!(status, 401, "{method} {path}");
    }
    let user = s.token("alice", "acme", &["publisher"]);
    for (method, path) in [("GET", "/api/v1/admin/stats"), ("GET", "/api/v1/admin/connections")] {
        let (status, body) = s.request(method, path, Some(&user), None).await;
        assert_eq!(status, 403, "{method} {path}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    let (status, _) = s
        .request("POST", "/api/v1/admin/broadcast/tenant:acme", Some(&user), Some(json!({"type": "info", "data": {}})))
        .await;
    assert_eq!(status, 403);
    let (status, body) = s.request("GET", "/api/v1/nothing-here", None, None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
}

#[actix_rt::test]
async fn admin_lists_and_disconnects_connections() {
    let s = TestServer::start();
    let admin = s.admin_token();
    let mut a = s.connect_as("alice", "acme").await;
    a.subscribe("tenant:acme").await;
    let mut b1 = s.connect_as("bob", "acme").await;
    let mut b2 = s.connect_as("bob", "acme").await;
    let (status, list) = s.request("GET", "/api/v1/admin/connections", Some(&admin), None).await;
    assert_eq!(status, 200);
    let conns = list["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 3);
    let alice = conns.iter().find(|c| c["user_id"] == "alice").unwrap();
    assert_eq!(alice["tenant"], "acme");
    assert_eq!(alice["rooms"], json!(["tenant:acme"]));
    assert_eq!(alice["format"], "json");
    let (status, stats) = s.request("GET", "/api/v1/admin/stats", Some(&admin), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        (stats["connections"].as_u64(), stats["rooms"].as_u64(), stats["subscriptions"].as_u64()),
        (Some(3), Some(1), Some(1))
    );

    let id = alice["connection_id"].as_str().unwrap();
    let (status, _) = s.request("DELETE", &format!("/api/v1/admin/connections/{id}"), Some(&admin), None).await;
    assert_eq!(status, 200);
    let (code, reason, _) = a.expect_close().await;
    assert_eq!((code, reason.as_str()), (4000, "disconnected by an admin"));
    let (status, body) =
        s.request("DELETE", &format!("/api/v1/admin/connections/{}", uuid::Uuid::new_v4()), Some(&admin), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, _) = s.request("DELETE", "/api/v1/admin/connections/not-a-uuid", Some(&admin), None).await;
    assert_eq!(status, 404);

    let (status, body) = s.request("DELETE", "/api/v1/admin/users/bob/connections", Some(&admin), None).await;
    assert_eq!((status, body), (200, json!({"closed": 2})));
    assert_eq!(b1.expect_close().await.0, 4000);
    assert_eq!(b2.expect_close().await.0, 4000);
}

#[actix_rt::test]
async fn broadcast_validates_room_and_event() {
    let s = TestServer::start();
    let admin = s.admin_token();
    let post = |room: &str, body: serde_json::Value| {
        let (room, admin) = (room.to_string(), admin.clone());
        let s = &s;
        async move { s.request("POST", &format!("/api/v1/admin/broadcast/{room}"), Some(&admin), Some(body)).await }
    };
    let (status, body) = post("lobby", json!({"type": "info", "data": {}})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")));
    let (status, _) = post("tenant:acme", json!({"type": "authenticated", "data": {}})).await;
    assert_eq!(status, 400, "connection-level types cannot be broadcast");
    let (status, _) = post("tenant:acme", json!({"type": "zone_completed", "data": {"job_id": 5}})).await;
    assert_eq!(status, 400, "typed data is checked");
    let (status, body) = post("tenant:acme", json!({"nope": true})).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")));
    let (status, body) = s.request("POST", "/api/v1/admin/broadcast/tenant:acme", Some(&admin), None).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        post("tenant:acme", json!({"type": "status", "data": {"status": "maintenance", "message": "soon"}})).await;
    assert_eq!((status, body), (200, json!({"seq": 1, "delivered_to": 0})));
    // It is in the history: a late subscriber replays it.
    let mut first = s.connect_as("alice", "acme").await;
    let joined = first.subscribe("tenant:acme").await;
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    // (A repeated subscribe on one connection replays nothing: resume on a new one.)
    let mut c = s.connect_as("alice", "acme").await;
    c.send(&jobcast::protocol::ClientMessage::Subscribe {
        room: "tenant:acme".into(),
        since: Some(jobcast::protocol::Since { seq: 0, epoch }),
    })
    .await;
    assert_eq!(c.expect_data(EventType::Subscribed).await["replayed"], 1);
    assert_eq!(c.expect_data(EventType::Status).await["status"], "maintenance");
}
