//! Hostile and strict peers against a real server on port 0: what a client sends that the protocol
//! does not allow is answered with the documented error or close, at bounded cost.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::TestServer;
use jobcast::protocol::{ClientMessage, EventType, MAX_FRAGMENTS};

/// A WebSocket opened by hand over TCP, so a test can send frames no client library would write.
struct RawSocket {
    tcp: TcpStream,
}

impl RawSocket {
    fn open(s: &TestServer, token: &str) -> RawSocket {
        let mut tcp = TcpStream::connect(s.addr).expect("connect");
        tcp.set_read_timeout(Some(common::WAIT)).expect("timeout");
        let request = format!(
            "GET /ws?token={token}&format=json HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            s.addr
        );
        tcp.write_all(request.as_bytes()).expect("upgrade");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut byte).expect("upgrade answer");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        RawSocket { tcp }
    }

    /// Sends one masked frame: `fin`, `opcode`, `payload`.
    fn frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x12, 0x34, 0x56, 0x78];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&f)
    }

    /// Reads frames until a close arrives; its code and reason, and the text messages before it.
    fn close(&mut self) -> (u16, String, Vec<String>) {
        let mut texts = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.tcp.read_exact(&mut h).expect("a frame before the server closed");
            let mut len = (h[1] & 0x7f) as usize;
            if len == 126 {
                let mut l = [0u8; 2];
                self.tcp.read_exact(&mut l).expect("length");
                len = u16::from_be_bytes(l) as usize;
            } else if len == 127 {
                let mut l = [0u8; 8];
                self.tcp.read_exact(&mut l).expect("length");
                len = u64::from_be_bytes(l) as usize;
            }
            let mut payload = vec![0u8; len];
            self.tcp.read_exact(&mut payload).expect("payload");
            match h[0] & 0x0f {
                0x8 => {
                    let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])).unwrap_or(1005);
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
                    return (code, reason, texts);
                }
                0x1 => texts.push(String::from_utf8_lossy(&payload).into_owned()),
                _ => {}
            }
        }
    }
}

#[actix_rt::test]
async fn invalid_utf8_in_a_whole_text_frame_closes_1007() {
    let s = TestServer::start();
    let token = s.token("alice", "acme", &[]);
    let mut raw = RawSocket::open(&s, &token);
    raw.frame(true, 0x1, b"{\"type\":\"ping\",\"ts\":1,\"x\":\"\xff\xfe\"}").expect("send");
    let (code, reason, _) = raw.close();
    assert_eq!((code, reason.as_str()), (1007, "invalid UTF-8 in a text message"));
}

#[actix_rt::test]
async fn invalid_utf8_split_across_fragments_closes_1007_and_valid_split_characters_pass() {
    let s = TestServer::start();
    let mut c = s.connect_as("alice", "acme").await;
    // "é" is C3 A9: cut between its two bytes, it is still one valid message.
    let mut msg = br#"{"type":"ping","ts":7,"note":""#.to_vec();
    msg.extend_from_slice("é\"}".as_bytes());
    let cut = msg.len() - 3;
    c.send_fragments(true, &[&msg[..cut], &msg[cut..]]).await;
    assert_eq!(c.expect_data(EventType::Pong).await["client_ts"], 7);
    // Each frame alone could be the start or the end of UTF-8; together they are not.
    c.send_fragments(true, &[br#"{"type":"ping","ts":1,"x":""#, b"\xc3", b"\x28\"}"]).await;
    let (code, reason, _) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (1007, "invalid UTF-8 in a text message"));
    // A message that ends inside a character is invalid too.
    let mut c = s.connect_as("alice", "acme").await;
    c.send_fragments(true, &[b"\"abc", b"\xe2\x82"]).await;
    assert_eq!(c.expect_close().await.0, 1007);
    // Binary messages are not text: no UTF-8 rule, the JSON parser refuses them.
    let mut c = s.connect_as("alice", "acme").await;
    c.send_fragments(false, &[b"\xff", b"\xfe"]).await;
    assert_eq!(c.expect_data(EventType::Error).await["code"], "bad_request");
}

#[actix_rt::test]
async fn a_message_in_too_many_fragments_closes_1009() {
    let s = TestServer::start();
    let mut c = s.connect_as("alice", "acme").await;
    // At the cap, empty continuations are fine.
    let ping = br#"{"type":"ping","ts":3}"#;
    let mut parts: Vec<&[u8]> = vec![b""; MAX_FRAGMENTS];
    parts[0] = ping;
    c.send_fragments(true, &parts).await;
    assert_eq!(c.expect_data(EventType::Pong).await["client_ts"], 3);
    // One more frame and the message is refused, whatever its size.
    let mut parts: Vec<&[u8]> = vec![b""; MAX_FRAGMENTS + 1];
    parts[0] = ping;
    c.send_fragments(true, &parts).await;
    let (code, reason, _) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (1009, "too many fragments"));
}

#[actix_rt::test]
async fn wrong_field_types_are_bad_request_and_never_echoed() {
    let s = TestServer::start();
    let mut c = s.connect_as("alice", "acme").await;
    let secretish = "x".repeat(2000);
    for text in [
        format!(r#"{{"type":"ping","ts":"{secretish}"}}"#),
        r#"{"type":"ping","ts":{"a":1}}"#.to_string(),
        r#"{"type":"ack","room":"tenant:acme","seq":1.5}"#.to_string(),
        r#"{"type":"subscribe","room":"tenant:acme","since":41}"#.to_string(),
        "{\"type\":\"subscribe\",\"room\":\"tenant:acme\",\"since\":{\"seq\":\"1\",\"epoch\":\"e\\n\"}}".to_string(),
    ] {
        c.send_text(&text).await;
        let env = c.recv().await;
        assert_eq!(env.event.kind(), EventType::Error, "{text} was answered with {env:?}");
        let data = serde_json::to_value(&env.event).expect("json");
        let message = data["data"]["message"].as_str().expect("message").to_string();
        assert_eq!(data["data"]["code"], "bad_request");
        assert!(message.chars().count() < 120, "{message}");
        assert!(!message.contains('\n'), "{message}");
    }
}

#[actix_rt::test]
async fn unknown_fields_are_ignored_in_every_message_type() {
    let s = TestServer::start();
    let mut c = s.connect_as("alice", "acme").await;
    c.send_text(r#"{"type":"ping","ts":11,"client_version":"9.9","trace":{"id":[1,2]}}"#).await;
    assert_eq!(c.expect_data(EventType::Pong).await["client_ts"], 11);
    c.send_text(r#"{"type":"subscribe","room":"tenant:acme","types":["status"],"since":null,"priority":1}"#).await;
    assert_eq!(c.expect_data(EventType::Subscribed).await["room"], "tenant:acme");
    c.send_text(r#"{"type":"ack","room":"tenant:acme","seq":0,"batch":true}"#).await;
    c.send_text(r#"{"type":"unsubscribe","room":"tenant:acme","reason":"done"}"#).await;
    assert_eq!(c.expect_data(EventType::Unsubscribed).await["room"], "tenant:acme");
    // Unknown message types stay refused.
    c.send_text(r#"{"type":"subscribe_all","room":"tenant:acme"}"#).await;
    assert_eq!(c.expect_data(EventType::Error).await["code"], "bad_request");
    // And the first message may carry extra fields too.
    let token = s.token("bob", "acme", &[]);
    let mut c = s.connect("/ws?format=json").await;
    c.expect(EventType::ConnectionEstablished).await;
    c.send_text(&format!(r#"{{"type":"authenticate","token":"{token}","sdk":"py/2"}}"#)).await;
    assert_eq!(c.expect_data(EventType::Authenticated).await["user_id"], "bob");
}

#[actix_rt::test]
async fn a_refresh_that_drops_the_admin_role_leaves_the_rooms_only_an_admin_could_hold() {
    let s = TestServer::start();
    let admin = s.token("root", "ops", &["admin"]);
    let mut c = s.connect(&format!("/ws?token={admin}&format=json")).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    for room in ["tenant:ops", "tenant:acme", "user:alice", "user:root"] {
        c.subscribe(room).await;
    }
    // A job of another tenant, which the admin watches.
    let (_, job) = s.upload(&s.token("alice", "acme", &[]), "a.csv", "text/csv", b"amount\n1\n", None).await;
    let job_room = format!("job:{}", job["job_id"].as_str().expect("job id"));
    c.send(&ClientMessage::Subscribe { room: job_room.clone(), since: None }).await;
    // The job's events may come first.
    while c.recv().await.event.kind() != EventType::Subscribed {}
    c.send(&ClientMessage::Refresh { token: s.token("root", "ops", &[]) }).await;
    let mut left = Vec::new();
    let mut refreshed = false;
    while left.len() < 3 || !refreshed {
        let env = c.recv().await;
        let v = serde_json::to_value(&env.event).expect("json");
        match env.event.kind() {
            EventType::Error => assert_eq!(v["data"]["code"], "forbidden", "{v}"),
            EventType::Unsubscribed => {
                assert!(refreshed, "a room was left before the refresh was answered");
                left.push(v["data"]["room"].as_str().expect("room").to_string())
            }
            EventType::TokenRefreshed => refreshed = true,
            _ => {}
        }
    }
    left.sort();
    let mut expected = vec!["tenant:acme".to_string(), "user:alice".to_string(), job_room.clone()];
    expected.sort();
    assert_eq!(left, expected);
    // The rooms of its own tenant and user stay.
    s.broadcast("tenant:ops", "info", serde_json::json!({"message": "still here"})).await;
    let env = c.recv().await;
    assert_eq!(env.room.as_deref(), Some("tenant:ops"));
    s.broadcast("tenant:acme", "info", serde_json::json!({"message": "not for you"})).await;
    s.broadcast("user:root", "info", serde_json::json!({"message": "yours"})).await;
    let env = c.recv().await;
    assert_eq!(env.room.as_deref(), Some("user:root"), "{env:?}");
}

#[actix_rt::test]
async fn user_rooms_and_the_per_user_limit_belong_to_one_tenant() {
    let s = TestServer::with(|c| c.max_connections_per_user = 2);
    let mut acme_bob = s.connect_as("bob", "acme").await;
    let mut globex_bob = s.connect_as("bob", "globex").await;
    acme_bob.subscribe("user:bob").await;
    globex_bob.subscribe("user:bob").await;
    // One tenant's bob: only that room.
    let (status, body) = s
        .request(
            "POST",
            "/api/v1/admin/broadcast/user:bob?tenant=acme",
            Some(&s.admin_token()),
            Some(serde_json::json!({"type": "info", "data": {"for": "acme"}})),
        )
        .await;
    assert_eq!((status, body["delivered_to"].as_u64()), (200, Some(1)), "{body}");
    let env = acme_bob.recv().await;
    assert_eq!(env.room.as_deref(), Some("user:bob"));
    assert_eq!(serde_json::to_value(&env.event).expect("json")["data"]["for"], "acme");
    // No tenant named: every tenant's bob.
    let body = s.broadcast("user:bob", "info", serde_json::json!({"for": "all"})).await;
    assert_eq!(body["delivered_to"], 2, "{body}");
    for c in [&mut acme_bob, &mut globex_bob] {
        let env = c.recv().await;
        assert_eq!(serde_json::to_value(&env.event).expect("json")["data"]["for"], "all");
    }
    // Two connections per user, per tenant: acme's bob is at 1, globex's at 1.
    let _a2 = s.connect_as("bob", "acme").await;
    let _g2 = s.connect_as("bob", "globex").await;
    let mut third = s.connect(&format!("/ws?token={}", s.token("bob", "acme", &[]))).await;
    let (code, reason, _) = third.expect_close().await;
    assert_eq!((code, reason.as_str()), (4029, "too many connections for this user"));
    // A bad tenant id in the query is refused.
    let (status, _) = s
        .request(
            "POST",
            "/api/v1/admin/broadcast/user:bob?tenant=a%2Fb",
            Some(&s.admin_token()),
            Some(serde_json::json!({"type": "info", "data": {}})),
        )
        .await;
    assert_eq!(status, 400);
}

#[actix_rt::test]
async fn a_user_room_replay_is_the_tenants_own() {
    let s = TestServer::start();
    let mut acme_bob = s.connect_as("bob", "acme").await;
    let sub = acme_bob.subscribe("user:bob").await;
    let epoch = sub["epoch"].as_str().expect("epoch").to_string();
    let mut globex_bob = s.connect_as("bob", "globex").await;
    let other = globex_bob.subscribe("user:bob").await;
    assert_ne!(other["epoch"], sub["epoch"], "two tenants' bob share one room");
    s.request(
        "POST",
        "/api/v1/admin/broadcast/user:bob?tenant=globex",
        Some(&s.admin_token()),
        Some(serde_json::json!({"type": "info", "data": {"secret": "globex"}})),
    )
    .await;
    globex_bob.recv().await;
    acme_bob.close().await;
    let mut again = s.connect_as("bob", "acme").await;
    again
        .send(&ClientMessage::Subscribe {
            room: "user:bob".into(),
            since: Some(jobcast::protocol::Since { seq: 0, epoch }),
        })
        .await;
    let sub = again.expect_data(EventType::Subscribed).await;
    assert_eq!((sub["replayed"].as_u64(), sub["recovered"].as_bool()), (Some(0), Some(true)), "{sub}");
}

#[actix_rt::test]
async fn ids_that_cannot_name_a_room_are_refused_at_authentication() {
    let s = TestServer::start();
    for (user, tenant) in
        [("bøb", "acme"), ("bob", "ácme"), ("a/b", "acme"), ("bob", "x y"), (&*"u".repeat(129), "acme")]
    {
        let token = s.token(user, tenant, &[]);
        let mut c = s.connect(&format!("/ws?token={token}")).await;
        let (code, reason, _) = c.expect_close().await;
        assert_eq!((code, reason.as_str()), (4001, "invalid_identity"), "{user} / {tenant}");
        let (status, body) = s.request("GET", "/api/v1/jobs", Some(&token), None).await;
        assert_eq!(status, 401, "{body}");
    }
    // The longest id allowed works.
    let long = "u".repeat(128);
    let mut c = s.connect_as(&long, "acme").await;
    c.subscribe(&format!("user:{long}")).await;
}

#[actix_rt::test]
async fn publishers_cannot_post_lifecycle_events_into_a_job_the_server_runs() {
    let s = TestServer::start();
    let alice = s.token("alice", "acme", &[]);
    let csv = common::generate_csv(50, "p");
    let (status, body) = s.upload(&alice, "a.csv", "text/csv", &csv.bytes, None).await;
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().expect("job id").to_string();
    let publisher = s.token("etl", "acme", &["publisher"]);
    let path = format!("/api/v1/jobs/{job}/events");
    for (kind, data) in [
        ("processing_completed", serde_json::json!({"job_id": job, "results": {}})),
        ("processing_failed", serde_json::json!({"job_id": job, "error": "x", "details": {}, "recoverable": false})),
        ("job_cancelled", serde_json::json!({"job_id": job, "by": "etl"})),
        ("status", serde_json::json!({"job_id": job, "status": "completed", "message": "done"})),
    ] {
        let (status, body) =
            s.request("POST", &path, Some(&publisher), Some(serde_json::json!({"type": kind, "data": data}))).await;
        assert_eq!((status, body["error"]["code"].as_str()), (409, Some("conflict")), "{kind}: {body}");
    }
    for kind in ["info", "warning"] {
        let (status, body) = s
            .request("POST", &path, Some(&publisher), Some(serde_json::json!({"type": kind, "data": {"note": 1}})))
            .await;
        assert_eq!(status, 201, "{kind}: {body}");
    }
    // The job still ends by itself, completed, with every row.
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let (_, snap) = s.request("GET", &format!("/api/v1/jobs/{job}"), Some(&alice), None).await;
        if snap["status"] == "completed" {
            assert_eq!(snap["results"]["processed_rows"], 50, "{snap}");
            break;
        }
        assert_ne!(snap["status"], "failed", "{snap}");
        assert!(std::time::Instant::now() < deadline, "{snap}");
        actix_rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Sends a raw HTTP/1.1 request (head, then each body piece as it comes) and reads the status line.
fn raw_http(s: &TestServer, head: &str, pieces: &[&[u8]]) -> (u16, String) {
    let mut tcp = TcpStream::connect(s.addr).expect("connect");
    tcp.set_read_timeout(Some(common::WAIT)).expect("timeout");
    tcp.write_all(head.as_bytes()).expect("head");
    for p in pieces {
        // The server may answer and close before it has read everything: that is the point.
        if tcp.write_all(p).is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    // And the body, as long as the answer says it is.
    let text = String::from_utf8_lossy(&answer).into_owned();
    let head_len = text.find("\r\n\r\n").map(|i| i + 4).unwrap_or(text.len());
    let length = text
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    while answer.len() < head_len + length {
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

#[actix_rt::test]
async fn bodies_are_not_read_before_the_caller_is_known() {
    let s = TestServer::start();
    let big = format!(r#"{{"type":"info","data":{{"pad":"{}"}}}}"#, "x".repeat(3 << 20));
    for (token, want) in [(None, 401), (Some(s.token("alice", "acme", &[])), 403)] {
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let head = format!(
            "POST /api/v1/admin/broadcast/tenant:acme HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            big.len()
        );
        let (status, text) = raw_http(&s, &head, &[big.as_bytes()]);
        assert_eq!(status, want, "{text}");
    }
    // Publisher events: the role is checked before the body too.
    let head = format!(
        "POST /api/v1/jobs/{}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        uuid::Uuid::new_v4(),
        s.token("alice", "acme", &[]),
        big.len()
    );
    assert_eq!(raw_http(&s, &head, &[big.as_bytes()]).0, 403);
    // An admin's oversized body is 413, a compressed one 415.
    let (status, body) = s
        .request(
            "POST",
            "/api/v1/admin/broadcast/tenant:acme",
            Some(&s.admin_token()),
            Some(serde_json::json!({"type": "info", "data": {"pad": "x".repeat(2 << 20)}})),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    let gz = {
        use flate2::write::GzEncoder;
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(format!(r#"{{"type":"info","data":{{"pad":"{}"}}}}"#, "0".repeat(50 << 20)).as_bytes()).unwrap();
        e.finish().unwrap()
    };
    let head = format!(
        "POST /api/v1/admin/broadcast/tenant:acme HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        s.admin_token(),
        gz.len()
    );
    let (status, text) = raw_http(&s, &head, &[&gz]);
    assert_eq!(status, 415, "{text}");
    assert!(text.contains("must not be compressed"), "{text}");
}

fn upload_head(s: &TestServer, extra: &str) -> String {
    format!(
        "POST /api/v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n{extra}\r\n",
        s.token("alice", "acme", &[])
    )
}

#[actix_rt::test]
async fn a_part_header_that_never_ends_is_refused_at_its_bound() {
    let s = TestServer::start();
    let mut pieces =
        vec![chunk(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.csv\"\r\nX-Pad: ")];
    // 64 KiB of a header that never ends, in 1 KiB chunks; the server stops reading at about 8 KiB.
    for _ in 0..64 {
        pieces.push(chunk(&[b'a'; 1024]));
    }
    let pieces: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    let (status, text) = raw_http(&s, &upload_head(&s, ""), &pieces);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("part header is longer than 8192 bytes"), "{text}");
}

#[actix_rt::test]
async fn an_upload_of_too_many_parts_or_bytes_is_refused_without_content_length() {
    let s = TestServer::with(|c| c.max_upload_bytes = 10_000);
    let mut form = Vec::new();
    for i in 0..20 {
        form.extend_from_slice(
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"note{i}\"\r\n\r\nx\r\n").as_bytes(),
        );
    }
    form.extend_from_slice(b"--XyZ--\r\n");
    let (c, end) = (chunk(&form), chunk(b""));
    let (status, text) = raw_http(&s, &upload_head(&s, ""), &[&c, &end]);
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("at most 16 parts"), "{text}");
    // A chunked body (no Content-Length to check up front) past the limit: 413 once it passes it.
    let mut pieces =
        vec![chunk(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.csv\"\r\nContent-Type: text/csv\r\n\r\ndate,amount,description\n")];
    for _ in 0..200 {
        pieces.push(chunk(&b"2026-01-01,1.00,coffee\n".repeat(40)));
    }
    let pieces: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    let (status, text) = raw_http(&s, &upload_head(&s, ""), &pieces);
    assert_eq!(status, 413, "{text}");
}

#[actix_rt::test]
async fn an_upload_that_stalls_gets_408_after_upload_timeout_s() {
    let s = TestServer::with(|c| c.upload_timeout_s = 1);
    let mut tcp = TcpStream::connect(s.addr).expect("connect");
    tcp.set_read_timeout(Some(common::WAIT)).expect("timeout");
    tcp.write_all(upload_head(&s, "").as_bytes()).expect("head");
    tcp.write_all(&chunk(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.csv\"\r\n\r\ndate,"))
        .expect("start");
    // ...and nothing more.
    let started = std::time::Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = tcp.read(&mut answer).expect("an answer before the test's own timeout");
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900), "answered before the timeout: {text}");
    // Nothing of it stays behind.
    let uploads = s.data_dir.path().join("uploads");
    let left: Vec<_> = std::fs::read_dir(&uploads).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[actix_rt::test]
async fn one_batch_id_is_claimed_once_even_by_concurrent_uploads() {
    let s = TestServer::start();
    let alice = s.token("alice", "acme", &[]);
    let csv = common::generate_csv(30, "b");
    for _ in 0..5 {
        let batch = uuid::Uuid::new_v4();
        let uploads = (0..4).map(|_| s.upload(&alice, "a.csv", "text/csv", &csv.bytes, Some(batch)));
        let statuses: Vec<u16> = futures_util::future::join_all(uploads).await.into_iter().map(|(st, _)| st).collect();
        assert_eq!(statuses.iter().filter(|s| **s == 202).count(), 1, "{statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == 409).count(), 3, "{statuses:?}");
        // Another tenant cannot take it either, and hears the same answer.
        let (status, body) =
            s.upload(&s.token("mallory", "globex", &[]), "a.csv", "text/csv", &csv.bytes, Some(batch)).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["message"], format!("batch_id {batch} is already in use"));
        let (_, snap) = s.request("GET", &format!("/api/v1/jobs/{batch}"), Some(&alice), None).await;
        assert_eq!(snap["tenant"], "acme", "{snap}");
    }
}

#[actix_rt::test]
async fn csv_shapes_that_would_explode_in_memory_fail_the_job_with_their_line() {
    let s = TestServer::start();
    let alice = s.token("alice", "acme", &[]);
    let mut cells = b"date,amount,description\n2026-01-01,1.00,ok\n".to_vec();
    cells.extend(b"=,".repeat(3_000_000));
    let mut header = b"date,amount,description,".to_vec();
    header.extend(std::iter::repeat_n(b'h', 4 << 20));
    header.extend_from_slice(b"\n2026-01-01,1.00,ok\n");
    for (body, want) in [
        (cells, "line 3 has more than 1024 fields".to_string()),
        (header, "line 1 has a field of more than 65536 bytes".to_string()),
    ] {
        let (status, job) = s.upload(&alice, "big.csv", "text/csv", &body, None).await;
        assert_eq!(status, 202, "{job}");
        let id = job["job_id"].as_str().expect("job id").to_string();
        let deadline = std::time::Instant::now() + common::WAIT;
        let snap = loop {
            let (_, snap) = s.request("GET", &format!("/api/v1/jobs/{id}"), Some(&alice), None).await;
            if snap["status"] == "failed" {
                break snap;
            }
            assert!(std::time::Instant::now() < deadline, "{snap}");
            actix_rt::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert_eq!(snap["error"]["message"], want, "{snap}");
        assert_eq!(snap["error"]["recoverable"], false, "{snap}");
        assert!(snap.to_string().len() < 4096, "the snapshot grew with the input: {} bytes", snap.to_string().len());
    }
}

#[actix_rt::test]
async fn a_burst_of_anonymous_sockets_cannot_lock_out_authenticated_users() {
    let s = TestServer::with(|c| {
        c.max_unauthenticated_connections = 5;
        c.max_connections = 50;
        c.auth_timeout_s = 60;
    });
    let mut anonymous = Vec::new();
    for _ in 0..5 {
        let mut c = s.connect("/ws?format=json").await;
        c.expect(EventType::ConnectionEstablished).await;
        anonymous.push(c);
    }
    let mut sixth = s.connect("/ws?format=json").await;
    let (code, reason, _) = sixth.expect_close().await;
    assert_eq!((code, reason.as_str()), (4029, "too many unauthenticated connections"));
    // Users with a token in the URL are not held up by them.
    for i in 0..10 {
        s.connect_as(&format!("user{i}"), "acme").await;
    }
    // One anonymous socket authenticates: its place is free again.
    let token = s.token("late", "acme", &[]);
    anonymous[0].send(&ClientMessage::Authenticate { token }).await;
    anonymous[0].expect(EventType::Authenticated).await;
    let mut again = s.connect("/ws?format=json").await;
    again.expect(EventType::ConnectionEstablished).await;
}

#[actix_rt::test]
async fn one_address_gets_a_few_hundred_connections_and_no_more() {
    let s = TestServer::with(|c| {
        c.max_connections_per_ip = 300;
        c.trusted_addresses = String::new();
    });
    let mut open = Vec::new();
    for i in 0..300 {
        open.push(s.connect_as(&format!("u{i}"), "acme").await);
    }
    let token = s.token("one-more", "acme", &[]);
    let mut extra = s.connect(&format!("/ws?token={token}")).await;
    let (code, reason, _) = extra.expect_close().await;
    assert_eq!((code, reason.as_str()), (4029, "too many connections from this address"));
    // A closed one frees its place.
    open.pop().expect("a connection").close().await;
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let mut c = s.connect(&format!("/ws?token={token}&format=json")).await;
        c.expect(EventType::ConnectionEstablished).await;
        match c.next().await {
            common::Incoming::Message { env, .. } if env.event.kind() == EventType::Authenticated => break,
            other => assert!(std::time::Instant::now() < deadline, "{other:?}"),
        }
        actix_rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn trusted_addresses_are_not_capped_per_address() {
    let s = TestServer::with(|c| c.max_connections_per_ip = 3);
    let mut open = Vec::new();
    for i in 0..10 {
        open.push(s.connect_as(&format!("u{i}"), "acme").await);
    }
}

async fn subscribe_answer(c: &mut common::Client, room: &str) -> jobcast::protocol::Envelope {
    c.send(&ClientMessage::Subscribe { room: room.into(), since: None }).await;
    loop {
        let env = c.recv().await;
        if matches!(env.event.kind(), EventType::Subscribed | EventType::Error) {
            return env;
        }
    }
}

fn code_of(env: &jobcast::protocol::Envelope) -> String {
    let v = serde_json::to_value(&env.event).expect("json");
    v["data"]["code"].as_str().unwrap_or("subscribed").to_string()
}

#[actix_rt::test]
async fn a_subscribe_over_the_cap_reserves_nothing_and_reservations_are_capped_per_tenant() {
    let s = TestServer::with(|c| {
        c.max_subscriptions_per_connection = 1;
        c.max_reservations_per_tenant = 3;
    });
    let mut alice = s.connect_as("alice", "acme").await;
    alice.subscribe("tenant:acme").await;
    let x = uuid::Uuid::new_v4();
    assert_eq!(code_of(&subscribe_answer(&mut alice, &format!("job:{x}")).await), "too_many_subscriptions");
    // The id was not reserved for acme: globex can have it.
    let mut mallory = s.connect_as("mallory", "globex").await;
    assert_eq!(code_of(&subscribe_answer(&mut mallory, &format!("job:{x}")).await), "subscribed");
    // Three reservations per tenant (other connections of the tenant count too).
    let mut held = 0;
    for i in 0..4 {
        let mut c = s.connect_as(&format!("a{i}"), "acme").await;
        let answer = code_of(&subscribe_answer(&mut c, &format!("job:{}", uuid::Uuid::new_v4())).await);
        if i < 3 {
            assert_eq!(answer, "subscribed");
            held += 1;
        } else {
            assert_eq!(answer, "too_many_reservations");
        }
    }
    assert_eq!(held, 3);
    // Another tenant is not held back by acme's.
    let mut other = s.connect_as("zed", "initech").await;
    assert_eq!(code_of(&subscribe_answer(&mut other, &format!("job:{}", uuid::Uuid::new_v4())).await), "subscribed");
}

#[actix_rt::test]
async fn reservations_nobody_renews_or_watches_are_released() {
    let s = TestServer::with(|c| c.reservation_ttl_s = 1);
    let (watched, left) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let mut alice = s.connect_as("alice", "acme").await;
    alice.subscribe(&format!("job:{watched}")).await;
    let mut brief = s.connect_as("bob", "acme").await;
    brief.subscribe(&format!("job:{left}")).await;
    brief.close().await;
    // Another tenant may have the id once acme's reservation is released...
    let mut mallory = s.connect_as("mallory", "globex").await;
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let answer = code_of(&subscribe_answer(&mut mallory, &format!("job:{left}")).await);
        if answer == "subscribed" {
            break;
        }
        assert_eq!(answer, "forbidden");
        assert!(std::time::Instant::now() < deadline, "the reservation was never released");
        actix_rt::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // ...but not one that acme is still watching (it is older than the released one).
    assert_eq!(code_of(&subscribe_answer(&mut mallory, &format!("job:{watched}")).await), "forbidden");
}

#[actix_rt::test]
async fn a_membership_replays_its_history_once() {
    let s = TestServer::start();
    let mut c = s.connect_as("alice", "acme").await;
    let joined = c.subscribe("tenant:acme").await;
    let epoch = joined["epoch"].as_str().expect("epoch").to_string();
    for i in 0..20 {
        s.broadcast("tenant:acme", "info", serde_json::json!({ "i": i })).await;
    }
    for _ in 0..20 {
        c.recv().await;
    }
    // The first `since` of the membership is replayed (a client that joined without one may ask
    // for the history)...
    c.send(&ClientMessage::Subscribe {
        room: "tenant:acme".into(),
        since: Some(jobcast::protocol::Since { seq: 0, epoch: epoch.clone() }),
    })
    .await;
    assert_eq!(c.expect_data(EventType::Subscribed).await["replayed"], 20);
    for seq in 1..=20 {
        assert_eq!(c.recv().await.seq, Some(seq));
    }
    // ...later ones are not.
    for _ in 0..5 {
        c.send(&ClientMessage::Subscribe {
            room: "tenant:acme".into(),
            since: Some(jobcast::protocol::Since { seq: 0, epoch: epoch.clone() }),
        })
        .await;
        let again = c.expect_data(EventType::Subscribed).await;
        assert_eq!(again["replayed"], 0, "{again}");
    }
    // Nothing else was queued: the next message is the next live event.
    s.broadcast("tenant:acme", "info", serde_json::json!({ "i": "live" })).await;
    assert_eq!(c.recv().await.seq, Some(21));
}

#[actix_rt::test]
async fn a_replay_counts_toward_max_queued_bytes() {
    // Each replayed event alone is larger than the byte bound, so the first one crosses it whatever
    // the writer manages to drain meanwhile (a bound above one event would race the writer, which
    // runs on the HTTP worker's thread while the room pushes from its own).
    let s = TestServer::with(|c| {
        c.max_queued_bytes = 2 * 1024;
        c.compress_threshold_bytes = 1 << 20;
    });
    let mut c = s.connect_as("alice", "acme").await;
    let epoch = c.subscribe("tenant:acme").await["epoch"].as_str().expect("epoch").to_string();
    c.close().await;
    // 10 events of about 4 KiB each: 40 KiB of history, every event over the 2 KiB bound.
    for i in 0..10 {
        s.broadcast("tenant:acme", "info", serde_json::json!({ "i": i, "pad": "p".repeat(4000) })).await;
    }
    let mut c = s.connect_as("alice", "acme").await;
    c.send(&ClientMessage::Subscribe {
        room: "tenant:acme".into(),
        since: Some(jobcast::protocol::Since { seq: 0, epoch }),
    })
    .await;
    let (code, reason, before) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (4008, "slow consumer"));
    assert!(!before.iter().any(|e| e.event.kind() == EventType::Info), "no replayed event fits: {before:?}");
}

#[actix_rt::test]
async fn after_a_restart_resumes_are_served_from_the_stored_history() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().to_path_buf();
    let sqlite = |c: &mut jobcast::Config| {
        c.store = "sqlite".into();
        c.data_dir = path.clone();
    };
    let s = TestServer::with(sqlite);
    let mut c = s.connect_as("alice", "acme").await;
    let epoch = c.subscribe("tenant:acme").await["epoch"].as_str().expect("epoch").to_string();
    for i in 0..30 {
        s.broadcast("tenant:acme", "info", serde_json::json!({ "i": i })).await;
    }
    c.close().await;
    s.shutdown.shutdown().await;
    let s = TestServer::with(sqlite);
    // Several clients resume from different points, concurrently: each gets exactly what it missed.
    let mut clients = Vec::new();
    for since in [0u64, 10, 29, 30] {
        let mut c = s.connect_as("alice", "acme").await;
        c.send(&ClientMessage::Subscribe {
            room: "tenant:acme".into(),
            since: Some(jobcast::protocol::Since { seq: since, epoch: epoch.clone() }),
        })
        .await;
        clients.push((since, c));
    }
    for (since, c) in &mut clients {
        let joined = c.expect_data(EventType::Subscribed).await;
        assert_eq!((joined["recovered"].as_bool(), joined["replayed"].as_u64()), (Some(true), Some(30 - *since)));
        for seq in *since + 1..=30 {
            assert_eq!(c.recv().await.seq, Some(seq));
        }
    }
}

#[actix_rt::test]
async fn every_spelling_of_a_job_id_is_one_room() {
    let s = TestServer::start();
    let id = uuid::Uuid::new_v4();
    let mut c = s.connect_as("alice", "acme").await;
    let upper = format!("job:{}", id.to_string().to_uppercase());
    let joined = c.subscribe(&upper).await;
    assert_eq!(joined["room"], format!("job:{id}"));
    // A watcher of the lower-case room and this one are in the same room.
    s.broadcast(&format!("job:{id}"), "info", serde_json::json!({"n": 1})).await;
    assert_eq!(c.recv().await.room.as_deref(), Some(format!("job:{id}").as_str()));
    c.send(&ClientMessage::Unsubscribe { room: format!("job:{}", id.simple()) }).await;
    assert_eq!(c.expect_data(EventType::Unsubscribed).await["room"], format!("job:{id}"));
}

#[actix_rt::test]
async fn an_admin_disconnect_of_a_user_can_name_the_tenant() {
    let s = TestServer::start();
    let mut acme_bob = s.connect_as("bob", "acme").await;
    let mut globex_bob = s.connect_as("bob", "globex").await;
    let (status, body) =
        s.request("DELETE", "/api/v1/admin/users/bob/connections?tenant=acme", Some(&s.admin_token()), None).await;
    assert_eq!((status, body["closed"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(acme_bob.expect_close().await.0, 4000);
    globex_bob.send(&ClientMessage::Ping { ts: Some(1.into()) }).await;
    assert_eq!(globex_bob.expect_data(EventType::Pong).await["client_ts"], 1);
}

// Quotas: what one tenant may make the server hold (uploads in flight and queued jobs, their bytes,
// stored rows) and the free-disk floor.

/// A multipart upload head with a declared length.
fn sized_upload_head(token: &str, length: usize) -> String {
    format!(
        "POST /api/v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Waits (bounded) until `/metrics` shows `line`.
async fn until_metric(s: &TestServer, line: &str) {
    let deadline = std::time::Instant::now() + common::WAIT;
    while !s.metrics().await.lines().any(|l| l == line) {
        assert!(std::time::Instant::now() < deadline, "/metrics never showed {line:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A CSV of `rows` distinct valid rows.
fn unique_rows(rows: usize, salt: &str) -> Vec<u8> {
    let mut out = String::from("date,amount,description\n");
    for i in 0..rows {
        out.push_str(&format!("2024-02-{:02},{i}.00,{salt} item {i}\n", i % 28 + 1));
    }
    out.into_bytes()
}

#[actix_rt::test]
async fn an_upload_beyond_the_tenants_queued_jobs_is_429_before_its_body_is_read() {
    let s = TestServer::with(|c| c.max_queued_jobs_per_tenant = 1);
    let alice = s.token("alice", "acme", &[]);
    // An upload in progress counts: its head is sent, its body not finished.
    let mut first = TcpStream::connect(s.addr).expect("connect");
    first.write_all(sized_upload_head(&alice, 1 << 20).as_bytes()).expect("head");
    first
        .write_all(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.csv\"\r\n\r\n")
        .expect("part");
    until_metric(&s, "jobcast_uploads_in_progress 1").await;
    // The second declares 40 MiB and sends none of it: the answer comes without the body.
    let (status, text) = raw_http(&s, &sized_upload_head(&alice, 40 << 20), &[]);
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("quota_exceeded") && text.contains("max_queued_jobs_per_tenant"), "{text}");
    // Another tenant has its own quota.
    let bob = s.token("bob", "other", &[]);
    assert_eq!(s.upload(&bob, "b.csv", "text/csv", &unique_rows(3, "b"), None).await.0, 202);
    // The first upload goes away mid-body: its share is given back.
    drop(first);
    until_metric(&s, "jobcast_uploads_in_progress 0").await;
    assert_eq!(s.upload(&alice, "c.csv", "text/csv", &unique_rows(3, "c"), None).await.0, 202);
    assert!(s.metrics().await.lines().any(|l| l == "jobcast_quota_refusals_total 1"));
}

#[actix_rt::test]
async fn upload_bytes_beyond_the_tenants_quota_are_429_declared_or_not() {
    let s = TestServer::with(|c| {
        c.max_upload_bytes = 6000;
        c.max_upload_bytes_per_tenant = 6000;
    });
    let token = s.token("alice", "acme", &[]);
    let (status, text) = raw_http(&s, &sized_upload_head(&token, 8192), &[]);
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("max_upload_bytes_per_tenant"), "{text}");
    // One upload of the tenant holds 3000 bytes (declared, its body not sent yet)...
    let mut held = TcpStream::connect(s.addr).expect("connect");
    held.write_all(sized_upload_head(&token, 3000).as_bytes()).expect("head");
    until_metric(&s, "jobcast_uploads_in_progress 1").await;
    // ...so a chunked one, which declares nothing, is refused as soon as its file passes the other
    // 3000 (before the 6000 of max_upload_bytes would refuse it with 413).
    let mut pieces = vec![chunk(b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.csv\"\r\n\r\n")];
    pieces.push(chunk(b"date,amount,description\n"));
    for i in 0..20 {
        pieces.push(chunk(format!("2024-01-01,1.00,{}\n", format!("{i}").repeat(400)).as_bytes()));
    }
    let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    let (status, text) = raw_http(&s, &upload_head(&s, ""), &refs);
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("max_upload_bytes_per_tenant"), "{text}");
    // Nothing of the refused uploads is held: a file under the quota goes through.
    drop(held);
    until_metric(&s, "jobcast_uploads_in_progress 0").await;
    assert_eq!(s.upload(&token, "small.csv", "text/csv", &unique_rows(20, "s"), None).await.0, 202);
    let left: Vec<_> = std::fs::read_dir(s.data_dir.path().join("uploads"))
        .expect("uploads dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(left.is_empty(), "a refused upload left {left:?}");
}

#[actix_rt::test]
async fn a_job_reaching_the_tenants_row_quota_fails_and_later_uploads_are_429_even_after_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().to_path_buf();
    let config = |c: &mut jobcast::Config| {
        c.store = "sqlite".into();
        c.data_dir = path.clone();
        c.zone_rows = 10;
        c.max_stored_rows_per_tenant = 25;
    };
    let s = TestServer::with(config);
    let token = s.token("alice", "acme", &[]);
    let batch = uuid::Uuid::new_v4();
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe(&format!("job:{batch}")).await;
    assert_eq!(s.upload(&token, "a.csv", "text/csv", &unique_rows(40, "q"), Some(batch)).await.0, 202);
    let failed = loop {
        let env = c.recv().await;
        assert_ne!(env.event.kind(), EventType::ProcessingCompleted, "the job passed the row quota");
        if env.event.kind() == EventType::ProcessingFailed {
            break serde_json::to_value(&env).expect("json")["data"].clone();
        }
    };
    let error = failed["error"].as_str().unwrap_or("");
    assert!(error.contains("more than 25 rows (max_stored_rows_per_tenant)"), "{failed}");
    assert_eq!(failed["recoverable"], false);
    // Two zones of ten fitted (20 rows); the zone that would have passed 25 kept none of its rows, so
    // 5 more fit exactly, and then nothing.
    let fits = uuid::Uuid::new_v4();
    let mut c = s.connect_as("alice", "acme").await;
    c.subscribe(&format!("job:{fits}")).await;
    assert_eq!(s.upload(&token, "b.csv", "text/csv", &unique_rows(5, "r"), Some(fits)).await.0, 202);
    loop {
        let env = c.recv().await;
        assert_ne!(env.event.kind(), EventType::ProcessingFailed, "5 rows did not fit: {env:?}");
        if env.event.kind() == EventType::ProcessingCompleted {
            break;
        }
    }
    let (status, body) = s.upload(&token, "c.csv", "text/csv", &unique_rows(5, "s"), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("quota_exceeded")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or("").contains("max_stored_rows_per_tenant"), "{body}");
    let bob = s.token("bob", "other", &[]);
    assert_eq!(s.upload(&bob, "b.csv", "text/csv", &unique_rows(5, "r"), None).await.0, 202);
    // The count is stored with the rows: a restarted server knows it.
    s.shutdown.shutdown().await;
    let s = TestServer::with(config);
    let (status, _) = s.upload(&s.token("alice", "acme", &[]), "c.csv", "text/csv", &unique_rows(5, "t"), None).await;
    assert_eq!(status, 429);
}

#[actix_rt::test]
async fn an_upload_that_would_eat_the_free_disk_is_507_before_its_body_is_read() {
    let s = TestServer::with(|c| c.min_free_disk_bytes = u64::MAX / 4);
    let token = s.token("alice", "acme", &[]);
    let (status, text) = raw_http(&s, &sized_upload_head(&token, 1 << 20), &[]);
    assert_eq!(status, 507, "{text}");
    assert!(text.contains("insufficient_storage") && text.contains("min_free_disk_bytes"), "{text}");
    let (status, body) = s.upload(&token, "a.csv", "text/csv", &unique_rows(3, "d"), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (507, Some("insufficient_storage")));
}
