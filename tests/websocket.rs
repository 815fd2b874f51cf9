//! The WebSocket protocol against a real server on port 0, with a real WebSocket client.

mod common;

use std::time::Duration;

use awc::ws;
use common::{Client, Incoming, TestServer};
use jobcast::protocol::{ClientMessage, Event, EventType, Since};
use serde_json::{json, Value};

fn sub(room: &str, since: Option<(u64, &str)>) -> ClientMessage {
    ClientMessage::Subscribe { room: room.into(), since: since.map(|(seq, epoch)| Since { seq, epoch: epoch.into() }) }
}

#[actix_rt::test]
async fn connect_with_query_token_sends_established_then_authenticated() {
    let s = TestServer::start();
    let token = s.token("alice", "acme", &[]);
    let mut c = s.connect(&format!("/ws?token={token}")).await;
    let est = c.expect_data(EventType::ConnectionEstablished).await;
    assert!(est["connection_id"].is_string());
    assert_eq!(est["heartbeat_interval_s"], 30);
    assert!(est["server_version"].as_str().unwrap().starts_with("jobcast/"));
    assert!(est["features"].as_array().unwrap().iter().any(|f| f == "history"));
    let env = c.expect(EventType::Authenticated).await;
    assert!(env.room.is_none() && env.seq.is_none() && env.epoch.is_none(), "connection-level: {env:?}");
    let Event::Authenticated(a) = env.event else { unreachable!() };
    assert_eq!((a.user_id.as_str(), a.tenant.as_str()), ("alice", "acme"));
    assert!(a.expires_at.ends_with('Z'));
}

#[actix_rt::test]
async fn authenticate_message_when_no_token_in_url() {
    let s = TestServer::start();
    let mut c = s.connect("/ws").await;
    c.expect(EventType::ConnectionEstablished).await;
    c.send(&ClientMessage::Authenticate { token: s.token("bob", "acme", &[]) }).await;
    let a = c.expect_data(EventType::Authenticated).await;
    assert_eq!(a["user_id"], "bob");
    c.send(&ClientMessage::Authenticate { token: s.token("bob", "acme", &[]) }).await;
    assert_eq!(c.expect_data(EventType::Error).await["code"], "already_authenticated");
}

#[actix_rt::test]
async fn auth_timeout_closes_4001() {
    let s = TestServer::with(|c| c.auth_timeout_s = 1);
    let mut c = s.connect("/ws").await;
    let (code, _, before) = c.expect_close().await;
    assert_eq!(code, 4001);
    let failure = before.iter().find(|e| e.event.kind() == EventType::AuthFailure).expect("auth_failure first");
    assert_eq!(serde_json::to_value(failure).unwrap()["data"]["reason"], "timeout");
}

#[actix_rt::test]
async fn other_message_before_authenticate_closes_4001() {
    let s = TestServer::start();
    let mut c = s.connect("/ws").await;
    c.expect(EventType::ConnectionEstablished).await;
    c.send(&sub("tenant:acme", None)).await;
    assert_eq!(c.expect_close().await.0, 4001);
}

/// Connects with `token` and returns the auth_failure reason and the close code.
async fn refused(s: &TestServer, token: &str) -> (String, u16) {
    let mut c = s.connect(&format!("/ws?token={token}")).await;
    let (code, _, before) = c.expect_close().await;
    let failure =
        before.iter().find(|e| e.event.kind() == EventType::AuthFailure).expect("an auth_failure before the close");
    let reason = serde_json::to_value(failure).unwrap()["data"]["reason"].as_str().unwrap().to_string();
    (reason, code)
}

fn hs256(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    jobcast::unix_now()
}

#[actix_rt::test]
async fn every_bad_token_is_refused_with_4001_and_a_reason() {
    let s = TestServer::start();
    let secret = "integration-test-secret";
    let expired = hs256(secret, json!({"sub": "u", "tenant": "t", "exp": now() - 120}));
    assert_eq!(refused(&s, &expired).await, ("expired".into(), 4001));
    let wrong = hs256("another-secret", json!({"sub": "u", "tenant": "t", "exp": now() + 600}));
    assert_eq!(refused(&s, &wrong).await, ("invalid_signature".into(), 4001));
    let no_tenant = hs256(secret, json!({"sub": "u", "exp": now() + 600}));
    assert_eq!(refused(&s, &no_tenant).await, ("missing_tenant".into(), 4001));
    let not_yet = hs256(secret, json!({"sub": "u", "tenant": "t", "exp": now() + 600, "nbf": now() + 300}));
    assert_eq!(refused(&s, &not_yet).await, ("not_yet_valid".into(), 4001));
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": "u", "tenant": "t", "exp": now() + 600}))
    );
    assert_eq!(refused(&s, &none).await, ("unsupported_algorithm".into(), 4001));
    assert_eq!(refused(&s, "not-a-jwt").await, ("malformed_token".into(), 4001));
    let metrics = s.metrics().await;
    assert!(metrics.contains("jobcast_auth_failures_total{reason=\"expired\"} 1"), "{metrics}");
    assert!(metrics.contains("jobcast_closes_total{code=\"4001\"} 6"), "{metrics}");
}

#[actix_rt::test]
async fn rs256_server_refuses_hs256_signed_with_the_public_key() {
    let s = TestServer::with(|c| c.jwt_public_key = Some("tests/fixtures/rs256_public.pem".into()));
    let private = std::fs::read("tests/fixtures/rs256_private.pem").unwrap();
    let claims = json!({"sub": "u", "tenant": "t", "exp": now() + 600});
    let good = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap(),
    )
    .unwrap();
    let mut c = s.connect(&format!("/ws?token={good}")).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    let public = std::fs::read_to_string("tests/fixtures/rs256_public.pem").unwrap();
    let confused = hs256(&public, claims);
    assert_eq!(refused(&s, &confused).await, ("unsupported_algorithm".into(), 4001));
}

#[actix_rt::test]
async fn es256_public_key_verifies_es256_tokens() {
    let s = TestServer::with(|c| c.jwt_public_key = Some("tests/fixtures/es256_public.pem".into()));
    let private = std::fs::read("tests/fixtures/es256_private.pem").unwrap();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &json!({"sub": "u", "tenant": "t", "exp": now() + 600}),
        &jsonwebtoken::EncodingKey::from_ec_pem(&private).unwrap(),
    )
    .unwrap();
    let mut c = s.connect(&format!("/ws?token={token}")).await;
    c.expect(EventType::ConnectionEstablished).await;
    assert_eq!(c.expect_data(EventType::Authenticated).await["user_id"], "u");
}

#[actix_rt::test]
async fn audience_and_issuer_are_checked_when_configured() {
    let s = TestServer::with(|c| {
        c.jwt_audience = Some("jobcast".into());
        c.jwt_issuer = Some("https://id.example".into());
    });
    let secret = "integration-test-secret";
    let ok = hs256(
        secret,
        json!({"sub": "u", "tenant": "t", "exp": now() + 600, "aud": "jobcast", "iss": "https://id.example"}),
    );
    let mut c = s.connect(&format!("/ws?token={ok}")).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    let bad_aud = hs256(
        secret,
        json!({"sub": "u", "tenant": "t", "exp": now() + 600, "aud": "other", "iss": "https://id.example"}),
    );
    assert_eq!(refused(&s, &bad_aud).await.0, "invalid_audience");
    let bad_iss =
        hs256(secret, json!({"sub": "u", "tenant": "t", "exp": now() + 600, "aud": "jobcast", "iss": "https://evil"}));
    assert_eq!(refused(&s, &bad_iss).await.0, "invalid_issuer");
    // Configured claims must be there, and be strings.
    let no_aud = hs256(secret, json!({"sub": "u", "tenant": "t", "exp": now() + 600, "iss": "https://id.example"}));
    assert_eq!(refused(&s, &no_aud).await.0, "invalid_audience");
    let no_iss = hs256(secret, json!({"sub": "u", "tenant": "t", "exp": now() + 600, "aud": "jobcast"}));
    assert_eq!(refused(&s, &no_iss).await.0, "invalid_issuer");
    let number_aud =
        hs256(secret, json!({"sub": "u", "tenant": "t", "exp": now() + 600, "aud": 7, "iss": "https://id.example"}));
    assert_eq!(refused(&s, &number_aud).await.0, "invalid_audience");
    let number_iss = hs256(secret, json!({"sub": "u", "tenant": "t", "exp": now() + 600, "aud": "jobcast", "iss": 7}));
    assert_eq!(refused(&s, &number_iss).await.0, "invalid_issuer");
}

#[actix_rt::test]
async fn an_exp_past_year_9999_is_refused_without_harm() {
    let s = TestServer::start();
    let far = hs256("integration-test-secret", json!({"sub": "u", "tenant": "t", "exp": 253_402_300_800u64}));
    assert_eq!(refused(&s, &far).await, ("malformed_token".into(), 4001));
    let last = hs256("integration-test-secret", json!({"sub": "u", "tenant": "t", "exp": 253_402_300_799u64}));
    let mut c = s.connect(&format!("/ws?token={last}")).await;
    c.expect(EventType::ConnectionEstablished).await;
    assert_eq!(c.expect_data(EventType::Authenticated).await["expires_at"], "9999-12-31T23:59:59Z");
    // Nothing leaked: the refused connection leaves the registry, only the live one stays counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, stats) = s.request("GET", "/api/v1/admin/stats", Some(&s.admin_token()), None).await;
        if stats["connections"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the refused connection is still counted: {stats}");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn websocket_tokens_are_single_use() {
    let s = TestServer::start();
    let access = s.token("carol", "acme", &[]);
    let (status, body) = s.request("POST", "/api/v1/auth/websocket-token", Some(&access), None).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["expires_in"], 300);
    let ws_token = body["token"].as_str().unwrap().to_string();
    let mut c = s.connect(&format!("/ws?token={ws_token}")).await;
    c.expect(EventType::ConnectionEstablished).await;
    assert_eq!(c.expect_data(EventType::Authenticated).await["user_id"], "carol");
    assert_eq!(refused(&s, &ws_token).await, ("token_reused".into(), 4001));
    // A WebSocket token is not an access token.
    let (status, _) = s.request("POST", "/api/v1/auth/websocket-token", Some(&ws_token), None).await;
    assert_eq!(status, 401);
    let (status, body) = s.request("POST", "/api/v1/auth/websocket-token", None, None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
}

#[actix_rt::test]
async fn rooms_of_other_tenants_and_users_are_forbidden() {
    let s = TestServer::start();
    let mut c = s.connect_as("alice", "acme").await;
    assert_eq!(c.subscribe("tenant:acme").await["room"], "tenant:acme");
    assert_eq!(c.subscribe("user:alice").await["room"], "user:alice");
    for (room, code) in [
        ("tenant:globex", "forbidden"),
        ("user:bob", "forbidden"),
        ("lobby", "unknown_room"),
        ("job:not-a-uuid", "unknown_room"),
    ] {
        c.send(&sub(room, None)).await;
        let err = c.expect_data(EventType::Error).await;
        assert_eq!(err["code"], code, "{room}: {err}");
    }
    // The room of a job not uploaded yet is reserved for the first tenant that subscribes to it
    // (subscribe first, then upload with that batch_id); other tenants are refused.
    let batch = uuid::Uuid::new_v4();
    let joined = c.subscribe(&format!("job:{batch}")).await;
    assert_eq!(joined["snapshot"]["status"], "pending");
    let mut other = s.connect_as("gus", "globex").await;
    other.send(&sub(&format!("job:{batch}"), None)).await;
    assert_eq!(other.expect_data(EventType::Error).await["code"], "forbidden");
    // Admins may join any tenant's room.
    let admin = s.admin_token();
    let mut a = s.connect(&format!("/ws?token={admin}&format=json")).await;
    a.expect(EventType::ConnectionEstablished).await;
    a.expect(EventType::Authenticated).await;
    assert_eq!(a.subscribe("tenant:globex").await["recovered"], false);
}

#[actix_rt::test]
async fn job_socket_for_an_unknown_job_closes_4004() {
    let s = TestServer::start();
    let token = s.token("alice", "acme", &[]);
    let mut c = s.connect(&format!("/ws/jobs/{}?token={token}", uuid::Uuid::new_v4())).await;
    let (code, reason, _) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (4004, "unknown job"));
}

#[actix_rt::test]
async fn malformed_and_unknown_messages_get_bad_request_and_the_connection_stays() {
    let s = TestServer::start();
    let mut c = s.connect_as("alice", "acme").await;
    for text in ["{not json", r#"{"type":"dance"}"#, r#"{"type":"subscribe"}"#, "[]", r#"{"room":"tenant:acme"}"#] {
        c.send_text(text).await;
        let err = c.expect_data(EventType::Error).await;
        assert_eq!(err["code"], "bad_request", "{text}");
        assert!(!err["message"].as_str().unwrap().is_empty());
    }
    c.send_frame(ws::Message::Binary(r#"{"type":"ping","ts":5}"#.into())).await;
    let pong = c.expect_data(EventType::Pong).await;
    assert_eq!(pong["client_ts"], 5);
    assert!(pong["ts"].as_str().unwrap().ends_with('Z'));
}

#[actix_rt::test]
async fn pong_echoes_a_fractional_ts_exactly() {
    // Clients match pongs to pings by `ts` (the TypeScript client sends `Date.now() + Math.random() / 2`),
    // so the echo must be the same number to the last bit, not the nearest parse.
    let s = TestServer::with(|c| {
        c.inbound_rate_per_s = 1000;
        c.inbound_burst = 1000;
    });
    let mut c = s.connect_as("alice", "acme").await;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let ts = 1_764_165_432_123.0 + (x % 1_000_000) as f64 / 1_000_000.0 * 0.5;
        c.send_text(&format!(r#"{{"type":"ping","ts":{ts}}}"#)).await;
        let pong = c.expect_data(EventType::Pong).await;
        assert_eq!(pong["client_ts"].as_f64().map(f64::to_bits), Some(ts.to_bits()), "sent {ts}, got {pong}");
    }
}

#[actix_rt::test]
async fn oversized_message_closes_1009() {
    let s = TestServer::with(|c| c.max_inbound_message_bytes = 256);
    let mut c = s.connect_as("alice", "acme").await;
    c.send_text(&format!(r#"{{"type":"ping","ts":1,"pad":"{}"}}"#, "x".repeat(300))).await;
    assert_eq!(c.expect_close().await.0, 1009);
}

#[actix_rt::test]
async fn fragmented_message_adding_up_past_the_limit_closes_1009() {
    let s = TestServer::with(|c| c.max_inbound_message_bytes = 256);
    let mut c = s.connect_as("alice", "acme").await;
    // Within the limit, fragments are reassembled.
    c.send_fragmented(r#"{"type":"ping","ts":12345}"#, 8).await;
    assert_eq!(c.expect_data(EventType::Pong).await["client_ts"], 12345);
    // Every frame is small, the message is not.
    c.send_fragmented(&format!(r#"{{"type":"ping","ts":1,"pad":"{}"}}"#, "y".repeat(400)), 100).await;
    assert_eq!(c.expect_close().await.0, 1009);
}

#[actix_rt::test]
async fn flooding_gets_an_error_then_4029() {
    let s = TestServer::with(|c| {
        c.inbound_rate_per_s = 1;
        c.inbound_burst = 3;
    });
    let mut c = s.connect_as("alice", "acme").await;
    for _ in 0..3 {
        c.send(&ClientMessage::Ping { ts: None }).await;
        c.expect(EventType::Pong).await;
    }
    c.send(&ClientMessage::Ping { ts: None }).await;
    assert_eq!(c.expect_data(EventType::Error).await["code"], "rate_limited");
    c.send(&ClientMessage::Ping { ts: None }).await;
    let (code, reason, _) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (4029, "too many messages"));
}

#[actix_rt::test]
async fn connection_limits_close_4029() {
    let s = TestServer::with(|c| {
        c.max_connections_per_user = 2;
        c.max_connections = 3;
    });
    let _a = s.connect_as("alice", "acme").await;
    let _b = s.connect_as("alice", "acme").await;
    let token = s.token("alice", "acme", &[]);
    let mut third = s.connect(&format!("/ws?token={token}")).await;
    let (code, reason, _) = third.expect_close().await;
    assert_eq!((code, reason.as_str()), (4029, "too many connections for this user"));
    // Wait until the refused connection is gone, then fill the node.
    wait_for_connections(&s, 2).await;
    let _c = s.connect_as("bob", "acme").await;
    let token = s.token("carol", "acme", &[]);
    let mut fourth = s.connect(&format!("/ws?token={token}")).await;
    let (code, reason, _) = fourth.expect_close().await;
    assert_eq!((code, reason.as_str()), (4029, "too many connections"));
}

async fn wait_for_connections(s: &TestServer, n: u64) {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let (_, stats) = s.request("GET", "/api/v1/admin/stats", Some(&s.admin_token()), None).await;
        if stats["connections"] == n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "connections never reached {n}: {stats}");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn subscription_limit_answers_an_error() {
    let s = TestServer::with(|c| c.max_subscriptions_per_connection = 2);
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe("tenant:acme").await;
    c.subscribe("user:alice").await;
    c.send(&sub("tenant:acme", None)).await; // re-subscribing does not count twice
    c.expect(EventType::Subscribed).await;
    let admin = s.admin_token();
    let mut a = s.connect(&format!("/ws?token={admin}&format=json")).await;
    a.expect(EventType::ConnectionEstablished).await;
    a.expect(EventType::Authenticated).await;
    a.subscribe("tenant:x").await;
    a.subscribe("tenant:y").await;
    a.send(&sub("tenant:z", None)).await;
    assert_eq!(a.expect_data(EventType::Error).await["code"], "too_many_subscriptions");
}

#[actix_rt::test]
async fn server_pings_and_closes_a_silent_client_with_4008() {
    let s = TestServer::with(|c| {
        c.heartbeat_interval_s = 1;
        c.client_timeout_s = 2;
    });
    let token = s.token("alice", "acme", &[]);
    let url = s.ws_url(&format!("/ws?token={token}"));
    let (_, mut framed) = awc::Client::new().ws(url).connect().await.unwrap();
    use futures_util::StreamExt;
    let mut pings = 0;
    let close = loop {
        match tokio::time::timeout(common::WAIT, framed.next()).await.expect("server went quiet") {
            Some(Ok(ws::Frame::Ping(_))) => pings += 1, // never answered
            Some(Ok(ws::Frame::Close(reason))) => break reason.expect("close reason"),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(pings >= 1, "the server pings");
    assert_eq!(u16::from(close.code), 4008);
    assert_eq!(close.description.as_deref(), Some("heartbeat timeout"));
}

#[actix_rt::test]
async fn a_client_answering_pings_stays_connected() {
    let s = TestServer::with(|c| {
        c.heartbeat_interval_s = 1;
        c.client_timeout_s = 2;
    });
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe("tenant:acme").await;
    // Client::next answers pings; after 3 s (past the timeout) the connection still carries events.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut seq = 0;
    while std::time::Instant::now() < deadline {
        let published = s.broadcast("tenant:acme", "info", json!({"n": seq})).await;
        seq = published["seq"].as_u64().unwrap();
        assert_eq!(c.recv().await.seq, Some(seq));
        actix_rt::time::sleep(Duration::from_millis(250)).await;
    }
}

#[actix_rt::test]
async fn admin_broadcast_reaches_exactly_the_members_with_rising_seq() {
    let s = TestServer::start();
    let mut a1 = s.connect_as("alice", "acme").await;
    let mut a2 = s.connect_as("amy", "acme").await;
    let mut g = s.connect_as("gus", "globex").await;
    a1.subscribe("tenant:acme").await;
    a2.subscribe("tenant:acme").await;
    g.subscribe("tenant:globex").await;
    let mut epoch = None;
    for i in 1..=5u64 {
        let r = s.broadcast("tenant:acme", "info", json!({"i": i})).await;
        assert_eq!(r, json!({"seq": i, "delivered_to": 2}));
        for c in [&mut a1, &mut a2] {
            let env = c.expect(EventType::Info).await;
            assert_eq!(env.room.as_deref(), Some("tenant:acme"));
            assert_eq!(env.seq, Some(i));
            assert!(!env.redelivered);
            epoch.get_or_insert(env.epoch.clone());
            assert_eq!(Some(env.epoch), epoch);
            let Event::Info(data) = env.event else { unreachable!() };
            assert_eq!(data["i"], i);
        }
    }
    // The other tenant's member got nothing of it: the next thing it sees is its own room's event.
    s.broadcast("tenant:globex", "warning", json!({"w": 1})).await;
    let env = g.expect(EventType::Warning).await;
    assert_eq!((env.room.as_deref(), env.seq), (Some("tenant:globex"), Some(1)));
}

#[actix_rt::test]
async fn replays_exactly_the_missed_events_after_reconnect() {
    let s = TestServer::start();
    let mut c = s.connect_as("alice", "acme").await;
    let joined = c.subscribe("tenant:acme").await;
    let epoch = joined["epoch"].as_str().unwrap().to_string();
    for i in 1..=3 {
        s.broadcast("tenant:acme", "info", json!({"i": i})).await;
    }
    for i in 1..=3 {
        assert_eq!(c.recv().await.seq, Some(i));
    }
    c.close().await;
    for i in 4..=8 {
        s.broadcast("tenant:acme", "info", json!({"i": i})).await;
    }
    let mut c = s.connect_as("alice", "acme").await;
    c.send(&sub("tenant:acme", Some((3, &epoch)))).await;
    let joined = c.expect_data(EventType::Subscribed).await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(joined["replayed"], 5);
    assert_eq!(joined["seq"], 8);
    assert_eq!(joined["epoch"], epoch.as_str());
    for i in 4..=8 {
        let env = c.recv().await;
        assert_eq!(env.seq, Some(i));
        let Event::Info(data) = env.event else { unreachable!() };
        assert_eq!(data["i"], i);
    }
    // Then live events continue with no gap.
    s.broadcast("tenant:acme", "info", json!({"i": 9})).await;
    assert_eq!(c.recv().await.seq, Some(9));
}

#[actix_rt::test]
async fn recovery_edges_answer_recovered_false() {
    let s = TestServer::with(|c| c.history_size = 3);
    let mut c = s.connect_as("alice", "acme").await;
    let epoch = c.subscribe("tenant:acme").await["epoch"].as_str().unwrap().to_string();
    for i in 1..=6 {
        s.broadcast("tenant:acme", "info", json!({"i": i})).await;
        c.recv().await;
    }
    let check = async |since: (u64, &str), recovered: bool, replayed: u64| {
        let mut d = s.connect_as("alice", "acme").await;
        d.send(&sub("tenant:acme", Some(since))).await;
        let joined = d.expect_data(EventType::Subscribed).await;
        assert_eq!(
            (joined["recovered"].as_bool(), joined["replayed"].as_u64()),
            (Some(recovered), Some(replayed)),
            "{since:?}"
        );
        d.close().await;
    };
    check((3, &epoch), true, 3).await; // 4, 5, 6 are still held
    check((2, &epoch), false, 0).await; // 3 was trimmed
    check((9, &epoch), false, 0).await; // ahead of the newest seq
    check((3, "another-epoch"), false, 0).await;
    check((6, &epoch), true, 0).await; // nothing missed
}

#[actix_rt::test]
async fn large_messages_are_binary_gzip_msgpack_and_decode_to_the_same_envelope() {
    let s = TestServer::start();
    let token = s.token("alice", "acme", &[]);
    let mut auto = s.connect(&format!("/ws?token={token}")).await;
    auto.expect(EventType::ConnectionEstablished).await;
    auto.expect(EventType::Authenticated).await;
    auto.subscribe("tenant:acme").await;
    let mut json_client = s.connect_as("amy", "acme").await;
    json_client.subscribe("tenant:acme").await;
    s.broadcast("tenant:acme", "info", json!({"text": "z".repeat(4000)})).await;
    let Incoming::Message { env: binary_env, binary: true } = auto.next().await else {
        panic!("expected a binary frame")
    };
    let Incoming::Message { env: text_env, binary: false } = json_client.next().await else { panic!("expected text") };
    assert_eq!(binary_env, text_env, "the same envelope, the same id");
    // Small ones stay text in auto format.
    s.broadcast("tenant:acme", "info", json!({"text": "small"})).await;
    assert!(matches!(auto.next().await, Incoming::Message { binary: false, .. }));
}

#[actix_rt::test]
async fn unsubscribe_stops_events() {
    let s = TestServer::start();
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe("tenant:acme").await;
    c.subscribe("user:alice").await;
    c.send(&ClientMessage::Unsubscribe { room: "tenant:acme".into() }).await;
    assert_eq!(c.expect_data(EventType::Unsubscribed).await["room"], "tenant:acme");
    assert_eq!(s.broadcast("tenant:acme", "info", json!({})).await["delivered_to"], 0);
    s.broadcast("user:alice", "info", json!({})).await;
    assert_eq!(c.recv().await.room.as_deref(), Some("user:alice"));
    c.send(&ClientMessage::Unsubscribe { room: "tenant:acme".into() }).await;
    assert_eq!(c.expect_data(EventType::Error).await["code"], "not_subscribed");
}

#[actix_rt::test]
async fn token_expiring_then_refresh_extends_the_connection() {
    let s = TestServer::start();
    // 62 s left: token_expiring comes ~2 s in.
    let short = s.shared.auth.mint_access("alice", "acme", &[], 62).unwrap();
    let mut c = s.connect(&format!("/ws?token={short}&format=json")).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    let expiring = c.expect_data(EventType::TokenExpiring).await;
    assert!(expiring["expires_in_s"].as_u64().unwrap() <= 60);
    // A token of another user is refused; the connection stays.
    c.send(&ClientMessage::Refresh { token: s.token("mallory", "acme", &[]) }).await;
    assert_eq!(c.expect_data(EventType::Error).await["code"], "invalid_token");
    c.send(&ClientMessage::Refresh { token: s.token("alice", "acme", &[]) }).await;
    let refreshed = c.expect_data(EventType::TokenRefreshed).await;
    let at = humantime::parse_rfc3339(refreshed["expires_at"].as_str().unwrap()).unwrap();
    assert!(at > std::time::SystemTime::now() + Duration::from_secs(3000));
}

#[actix_rt::test]
async fn an_unrefreshed_credential_closes_4001_when_it_expires() {
    let s = TestServer::start();
    let short = s.shared.auth.mint_access("alice", "acme", &[], 2).unwrap();
    let mut c = s.connect(&format!("/ws?token={short}&format=json")).await;
    let (code, reason, before) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (4001, "token expired"));
    let kinds: Vec<_> = before.iter().map(|e| e.event.kind()).collect();
    assert!(kinds.contains(&EventType::TokenExpiring), "{kinds:?}");
}

#[actix_rt::test]
async fn origins_are_matched_exactly() {
    let s = TestServer::with(|c| c.allowed_origins = Some("https://app.example.com, http://localhost:3000".into()));
    let token = s.token("alice", "acme", &[]);
    let url = s.ws_url(&format!("/ws?token={token}"));
    assert!(Client::try_connect(&url, Some("https://app.example.com")).await.is_ok());
    assert!(Client::try_connect(&url, Some("http://localhost:3000")).await.is_ok());
    for bad in
        ["https://app.example.com.evil.io", "http://app.example.com", "https://evil.io", "http://localhost:30000"]
    {
        assert_eq!(Client::try_connect(&url, Some(bad)).await.err(), Some(403), "{bad}");
    }
    assert_eq!(Client::try_connect(&url, None).await.err(), Some(403));
}

#[actix_rt::test]
async fn graceful_shutdown_closes_every_socket_with_1001() {
    let s = TestServer::start();
    let mut a = s.connect_as("alice", "acme").await;
    let mut b = s.connect_as("bob", "acme").await;
    let shutdown = s.shutdown.clone();
    actix_rt::spawn(async move { shutdown.shutdown().await });
    assert_eq!(a.expect_close().await.0, 1001);
    assert_eq!(b.expect_close().await.0, 1001);
}

#[actix_rt::test]
async fn a_client_close_is_answered_with_1000_and_counted() {
    let s = TestServer::start();
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe("tenant:acme").await;
    c.send_frame(ws::Message::Close(Some(ws::CloseCode::Normal.into()))).await;
    assert_eq!(c.expect_close().await.0, 1000);
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let m = s.metrics().await;
        // The subscription is dropped by the broker a moment after the connection's own counts.
        let counted = m.contains("jobcast_closes_total{code=\"1000\"} 1") && m.contains("jobcast_connections 0");
        if counted && m.contains("jobcast_subscriptions 0") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        actix_rt::time::sleep(Duration::from_millis(20)).await;
    }
}

// The conformance echo endpoint (`serve --conformance-echo`): the frame handling of /ws, no auth.

fn echo_server(adjust: impl FnOnce(&mut jobcast::Config)) -> TestServer {
    TestServer::with(|c| {
        c.conformance_echo = true;
        adjust(c)
    })
}

#[actix_rt::test]
async fn the_echo_endpoint_exists_only_with_conformance_echo() {
    let s = TestServer::start();
    assert_eq!(Client::try_connect(&s.ws_url("/ws/echo"), None).await.err(), Some(404));
    let s = echo_server(|_| {});
    let mut c = s.connect("/ws/echo").await;
    c.send_text("hello").await;
    assert!(matches!(c.frame().await, Some(ws::Frame::Text(t)) if t == "hello"));
}

#[actix_rt::test]
async fn the_echo_endpoint_sends_every_message_back_as_it_came() {
    let s = echo_server(|_| {});
    let mut c = s.connect("/ws/echo").await;
    c.send_frame(ws::Message::Binary(vec![0u8, 159, 146, 150].into())).await;
    assert!(matches!(c.frame().await, Some(ws::Frame::Binary(b)) if b[..] == [0u8, 159, 146, 150]));
    // A character cut between two fragments, with a ping between them: pong first, then the whole text.
    let euro = "€".as_bytes();
    c.send_frame(ws::Message::Continuation(actix_ws::Item::FirstText([b"a", &euro[..1]].concat().into()))).await;
    c.send_frame(ws::Message::Ping(b"mid".to_vec().into())).await;
    c.send_frame(ws::Message::Continuation(actix_ws::Item::Last([&euro[1..], b"b"].concat().into()))).await;
    assert!(matches!(c.frame().await, Some(ws::Frame::Pong(p)) if p[..] == b"mid"[..]));
    assert!(matches!(c.frame().await, Some(ws::Frame::Text(t)) if t == "a€b".as_bytes()));
    // 64 KiB, the largest message of Autobahn's cases 1 to 7 and 10, though /ws takes 4 KiB.
    let big = "x".repeat(64 << 10);
    c.send_text(&big).await;
    assert!(matches!(c.frame().await, Some(ws::Frame::Text(t)) if t.len() == big.len()));
    // No JSON, no envelope, no rate limit: 50 messages in a burst are 50 echoes.
    for i in 0..50 {
        c.send_text(&format!("{i}")).await;
    }
    for i in 0..50 {
        assert!(matches!(c.frame().await, Some(ws::Frame::Text(t)) if t == format!("{i}").as_bytes()));
    }
    // The client's close code comes back.
    c.send_frame(ws::Message::Close(Some(ws::CloseReason { code: 4321.into(), description: None }))).await;
    assert!(matches!(c.frame().await, Some(ws::Frame::Close(Some(r))) if u16::from(r.code) == 4321));
}

#[actix_rt::test]
async fn the_echo_endpoint_applies_the_limits_of_ws() {
    let s = echo_server(|_| {});
    let mut c = s.connect("/ws/echo").await;
    c.send_text(&"x".repeat((64 << 10) + 1)).await;
    assert_eq!(c.expect_close().await.0, 1009);
    let mut c = s.connect("/ws/echo").await;
    c.send_fragments(true, &[b"ok", b"\xed\xa0\x80", b"more"]).await;
    assert_eq!(c.expect_close().await.0, 1007);
    let mut c = s.connect("/ws/echo").await;
    let parts: Vec<&[u8]> = std::iter::repeat_n(&b"x"[..], jobcast::protocol::MAX_FRAGMENTS + 1).collect();
    c.send_fragments(false, &parts).await;
    assert_eq!(c.expect_close().await.0, 1009);
    // A close code no endpoint may send is a protocol error.
    let mut c = s.connect("/ws/echo").await;
    c.send_frame(ws::Message::Close(Some(ws::CloseReason { code: 1005.into(), description: None }))).await;
    assert_eq!(c.expect_close().await.0, 1002);
    // Echo connections never authenticate: they count against max_unauthenticated_connections.
    let s = echo_server(|c| c.max_unauthenticated_connections = 1);
    let mut held = s.connect("/ws/echo").await;
    // An echo comes only once the connection is registered (the actor waits for the registry).
    held.send_text("registered?").await;
    assert!(matches!(held.frame().await, Some(ws::Frame::Text(_))));
    let mut second = s.connect("/ws/echo").await;
    assert_eq!(second.expect_close().await.0, 4029);
}
