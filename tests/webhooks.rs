//! Webhooks (contract §7) end to end: a real receiving HTTP server on 127.0.0.1 that fails on
//! purpose, signatures checked as a receiver would, retries with backoff, the delivery log.

mod common;

use common::{signature_valid, Receiver, TestServer};
use serde_json::{json, Value};

/// Registers a webhook for `tenant` as admin; answers the 201 body (`id`, `secret`).
async fn register(server: &TestServer, tenant: &str, url: &str, events: Value) -> Value {
    let body = json!({"url": url, "events": events, "tenant": tenant});
    let (status, created) =
        server.request("POST", "/api/v1/admin/webhooks", Some(&server.admin_token()), Some(body)).await;
    assert_eq!(status, 201, "{created}");
    created
}

/// A worker's job of `tenant`, ended with `action` (`complete` or `fail`).
async fn job_ending(server: &TestServer, tenant: &str, action: &str, body: Value) -> String {
    let publisher = server.token("svc", tenant, &["publisher"]);
    let (_, created) = server.request("POST", "/api/v1/jobs", Some(&publisher), Some(json!({"kind": "etl"}))).await;
    let id = created["job_id"].as_str().expect("job_id").to_string();
    let token = created["token"].as_str().expect("token").to_string();
    let (status, _) = server.request("POST", &format!("/api/v1/jobs/{id}/{action}"), Some(&token), Some(body)).await;
    assert_eq!(status, 200);
    id
}

#[actix_rt::test]
async fn a_terminal_event_is_signed_retried_after_500s_and_logged() {
    let server = TestServer::with(|c| {
        c.webhook_backoff_initial_ms = 50;
        c.webhook_private_allow = "127.0.0.1".into();
    });
    let receiver = Receiver::start(2);
    let hook = register(&server, "acme", &receiver.url, json!(["job.completed", "job.failed"])).await;
    let secret = hook["secret"].as_str().expect("secret");
    assert!(secret.starts_with("whsec_"), "{secret}");
    // Another tenant's webhook must get nothing of acme's jobs.
    let other = Receiver::start(0);
    register(&server, "globex", &other.url, json!(["job.completed"])).await;
    let job = job_ending(&server, "acme", "complete", json!({"results": {"rows": 3}})).await;
    let got = receiver.until(|r| r.iter().any(|x| x.status == 200)).await;
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), [500, 500, 200], "two failures, then delivered");
    let id = &got[0].headers["webhook-id"];
    assert!(got.iter().all(|r| &r.headers["webhook-id"] == id), "the same webhook-id on every attempt");
    assert!(got.iter().all(|r| signature_valid(secret, r)), "every attempt signed");
    assert!(got.iter().all(|r| r.body == got[0].body), "the same body on every attempt");
    let body: Value = serde_json::from_str(&got[2].body).expect("json body");
    assert_eq!(body["type"], "job.completed");
    assert_eq!(body["data"]["job_id"], job);
    assert_eq!(body["data"]["status"], "completed");
    assert_eq!(body["data"]["results"]["rows"], 3);
    assert!(body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
    // A receiver with the wrong secret would refuse it.
    assert!(!signature_valid("whsec_d3Jvbmcgc2VjcmV0", &got[2]));
    // The log: newest first, each attempt's status.
    let path = format!("/api/v1/admin/webhooks/{}/deliveries", hook["id"].as_str().expect("id"));
    let log = wait_for_log(&server, &path, 3).await;
    let statuses: Vec<Value> = log.iter().map(|d| d["status"].clone()).collect();
    assert_eq!(statuses, [json!(200), json!(500), json!(500)]);
    assert_eq!(log[0]["attempt"], 3);
    assert!(log[1]["error"].as_str().is_some_and(|e| e.contains("500")), "{log:?}");
    assert!(other.until(|_| true).await.is_empty(), "globex's webhook got nothing");
}

/// The deliveries log once it has `n` attempts (the last is recorded a moment after it was sent).
async fn wait_for_log(server: &TestServer, path: &str, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let (status, body) = server.request("GET", path, Some(&server.admin_token()), None).await;
        assert_eq!(status, 200, "{body}");
        let log = body["deliveries"].as_array().cloned().unwrap_or_default();
        if log.len() >= n {
            return log;
        }
        assert!(std::time::Instant::now() < deadline, "the log never had {n} attempts: {log:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[actix_rt::test]
async fn a_message_is_given_up_after_the_last_attempt() {
    let server = TestServer::with(|c| {
        c.webhook_backoff_initial_ms = 20;
        c.webhook_max_attempts = 3;
        c.webhook_private_allow = "127.0.0.1".into();
    });
    let receiver = Receiver::start(usize::MAX);
    let hook = register(&server, "acme", &receiver.url, json!(["job.failed"])).await;
    job_ending(&server, "acme", "fail", json!({"error": "disk full", "recoverable": true})).await;
    let got = receiver.until(|r| r.len() >= 3).await;
    let body: Value = serde_json::from_str(&got[0].body).expect("json");
    assert_eq!(body["type"], "job.failed");
    assert_eq!(body["data"]["error"]["message"], "disk full");
    let path = format!("/api/v1/admin/webhooks/{}/deliveries", hook["id"].as_str().expect("id"));
    let log = wait_for_log(&server, &path, 3).await;
    assert_eq!(log.len(), 3, "three attempts, no fourth: {log:?}");
}

#[actix_rt::test]
async fn webhooks_are_admin_only_and_checked() {
    let server = TestServer::with(|c| c.webhook_private_allow = "127.0.0.1".into());
    let plain = server.token("alice", "acme", &[]);
    let body = json!({"url": "http://127.0.0.1:9/x", "events": ["job.completed"]});
    assert_eq!(server.request("POST", "/api/v1/admin/webhooks", Some(&plain), Some(body.clone())).await.0, 403);
    assert_eq!(server.request("GET", "/api/v1/admin/webhooks", Some(&plain), None).await.0, 403);
    let admin = server.admin_token();
    for bad in [
        json!({"url": "ftp://127.0.0.1/x", "events": ["job.completed"]}),
        json!({"url": "not a url", "events": ["job.completed"]}),
        json!({"url": "http://127.0.0.1:9/x", "events": []}),
        json!({"url": "http://127.0.0.1:9/x", "events": ["job.exploded"]}),
        json!({"url": "http://127.0.0.1:9/x", "events": ["job.completed"], "secret": "short"}),
    ] {
        let (status, answer) = server.request("POST", "/api/v1/admin/webhooks", Some(&admin), Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {answer}");
    }
    let mine = json!({"url": "http://127.0.0.1:9/x", "events": ["job.completed"], "secret": "a-secret-of-my-own"});
    let (status, created) = server.request("POST", "/api/v1/admin/webhooks", Some(&admin), Some(mine)).await;
    assert_eq!((status, created["secret"].clone()), (201, json!("a-secret-of-my-own")));
    let (_, listed) = server.request("GET", "/api/v1/admin/webhooks", Some(&admin), None).await;
    assert_eq!(listed["webhooks"][0]["url"], "http://127.0.0.1:9/x");
    assert!(listed["webhooks"][0].get("secret").is_none(), "the secret is shown once, at creation");
    let id = created["id"].as_str().expect("id");
    let path = format!("/api/v1/admin/webhooks/{id}");
    assert_eq!(server.request("DELETE", &path, Some(&admin), None).await.0, 200);
    assert_eq!(server.request("DELETE", &path, Some(&admin), None).await.0, 404);
    assert_eq!(server.request("GET", &format!("{path}/deliveries"), Some(&admin), None).await.0, 404);
}

#[actix_rt::test]
async fn a_webhook_cannot_be_aimed_at_a_private_address_unless_allowed() {
    let server = TestServer::start();
    let admin = server.admin_token();
    for url in [
        "http://127.0.0.1:9/x",
        "http://10.1.2.3/x",
        "http://192.168.0.1/x",
        "http://169.254.169.254/latest",
        "http://[::1]:9/x",
        "http://[fd00::1]/x",
        "http://localhost:9/x",
        "http://0.0.0.0:9/x",
    ] {
        let body = json!({"url": url, "events": ["job.completed"]});
        let (status, answer) = server.request("POST", "/api/v1/admin/webhooks", Some(&admin), Some(body)).await;
        assert_eq!(status, 400, "{url}: {answer}");
        assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains("private")), "{answer}");
    }
}

/// An HTTPS receiver on 127.0.0.1 (`openssl s_server`) whose certificate is self-signed, so no
/// public root vouches for it; answers its URL, or `None` when `openssl` is not installed.
struct SelfSignedReceiver {
    url: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl SelfSignedReceiver {
    fn start() -> Option<SelfSignedReceiver> {
        use std::process::{Command, Stdio};
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !made.is_ok_and(|s| s.success()) {
            assert!(std::env::var("CI").is_err(), "CI=true: this test needs the openssl command");
            eprintln!("skipped: no openssl command to make a certificate with");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept", &format!("127.0.0.1:{port}")])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let deadline = std::time::Instant::now() + common::WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "openssl s_server never listened");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(SelfSignedReceiver { url: format!("https://127.0.0.1:{port}/hook"), child, _dir: dir })
    }
}

impl Drop for SelfSignedReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[actix_rt::test]
async fn an_https_receiver_is_reached_over_tls_and_an_untrusted_certificate_is_refused() {
    let Some(receiver) = SelfSignedReceiver::start() else { return };
    let server = TestServer::with(|c| {
        c.webhook_backoff_initial_ms = 20;
        c.webhook_max_attempts = 2;
        c.webhook_private_allow = "127.0.0.1".into();
    });
    let hook = register(&server, "acme", &receiver.url, json!(["job.completed"])).await;
    job_ending(&server, "acme", "complete", json!({})).await;
    let path = format!("/api/v1/admin/webhooks/{}/deliveries", hook["id"].as_str().expect("id"));
    let log = wait_for_log(&server, &path, 2).await;
    // The TLS handshake was made, and the certificate no public root signed was not trusted: the
    // body (and its signature) never reached the receiver.
    for attempt in &log {
        let error = attempt["error"].as_str().unwrap_or_default().to_ascii_lowercase();
        assert!(error.contains("certificate"), "{log:?}");
        assert_eq!(attempt["status"], Value::Null, "{log:?}");
    }
}
