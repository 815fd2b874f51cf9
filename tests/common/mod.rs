//! Test support: a real jobcast server on port 0 in its own thread, and a typed WebSocket client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use actix_web::web::Bytes;
use awc::ws::{self, CloseReason, Frame};
use futures_util::{SinkExt, StreamExt};
use jobcast::protocol::{ClientMessage, Envelope, EventType};
use jobcast::{Config, Shared, Shutdown};
use serde_json::{json, Value};

/// How long any single expected thing may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub shared: Shared,
    pub shutdown: Shutdown,
    pub data_dir: tempfile::TempDir,
}

/// A test configuration: fixed secret, temporary data dir, in-memory store.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    Config {
        jwt_secret: Some("integration-test-secret".into()),
        data_dir: data_dir.to_path_buf(),
        store: "memory".into(),
        ..Config::default()
    }
}

impl TestServer {
    /// Starts a server with the default test configuration.
    pub fn start() -> TestServer {
        Self::with(|_| {})
    }

    /// Starts a server after `adjust` has changed the test configuration.
    pub fn with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut config = test_config(data_dir.path());
        adjust(&mut config);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let sys = actix_rt::System::new();
            sys.block_on(async move {
                let listener = jobcast::listen("127.0.0.1:0").expect("bind");
                let running = jobcast::start(listener, config).await.expect("start");
                tx.send((running.addr, running.shared.clone(), running.shutdown.clone())).expect("send");
                let _ = running.wait().await;
            });
        });
        let (addr, shared, shutdown) = rx.recv_timeout(WAIT).expect("server started");
        TestServer { addr, shared, shutdown, data_dir }
    }

    /// An access JWT signed with the server's secret.
    pub fn token(&self, user: &str, tenant: &str, roles: &[&str]) -> String {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        self.shared.auth.mint_access(user, tenant, &roles, 3600).expect("mint")
    }

    /// An admin access JWT.
    pub fn admin_token(&self) -> String {
        self.token("root", "ops", &["admin"])
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    /// Opens a WebSocket to `path_and_query` (e.g. `/ws?token=...&format=json`).
    pub async fn connect(&self, path_and_query: &str) -> Client {
        Client::connect(&self.ws_url(path_and_query)).await
    }

    /// Connects with an access token in the URL, reads `connection_established` and `authenticated`.
    pub async fn connect_as(&self, user: &str, tenant: &str) -> Client {
        let token = self.token(user, tenant, &[]);
        let mut c = self.connect(&format!("/ws?token={token}&format=json")).await;
        c.expect(EventType::ConnectionEstablished).await;
        c.expect(EventType::Authenticated).await;
        c
    }

    /// `POST /api/v1/admin/broadcast/{room}` as admin; returns `{seq, delivered_to}`.
    pub async fn broadcast(&self, room: &str, kind: &str, data: Value) -> Value {
        let (status, body) = self
            .request(
                "POST",
                &format!("/api/v1/admin/broadcast/{room}"),
                Some(&self.admin_token()),
                Some(json!({"type": kind, "data": data})),
            )
            .await;
        assert_eq!(status, 200, "broadcast answered {body}");
        body
    }

    /// An HTTP request with an optional bearer token and JSON body; returns status and JSON body.
    pub async fn request(&self, method: &str, path: &str, bearer: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let client = awc::Client::default();
        let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = client.request(method, self.http(path)).timeout(WAIT);
        if let Some(t) = bearer {
            req = req.insert_header(("Authorization", format!("Bearer {t}")));
        }
        let mut res = match body {
            Some(b) => req.send_json(&b).await,
            None => req.send().await,
        }
        .expect("request");
        let status = res.status().as_u16();
        let bytes = res.body().limit(16 << 20).await.expect("body");
        let json =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, json)
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = self.request("GET", "/metrics", None, None).await;
        assert_eq!(status, 200);
        body.as_str().expect("metrics text").to_string()
    }
}

/// What arrives on a client socket.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Incoming {
    /// A server message, from a text or a binary frame.
    Message { env: Envelope, binary: bool },
    /// A close frame.
    Close(Option<CloseReason>),
    /// The connection ended without a close frame.
    Ended,
}

/// A real WebSocket client (awc).
pub struct Client {
    framed: actix_codec::Framed<awc::BoxedSocket, ws::Codec>,
    /// Every text frame received, as the JSON the server wrote (so a test can see which fields were
    /// present, which the typed [`Envelope`] cannot tell).
    pub raw: Vec<Value>,
}

impl Client {
    /// Connects, failing the test if the upgrade is refused.
    pub async fn connect(url: &str) -> Client {
        Self::try_connect(url, None).await.expect("websocket upgrade")
    }

    /// Connects with an optional Origin header; the error is the HTTP status of a refused upgrade.
    pub async fn try_connect(url: &str, origin: Option<&str>) -> Result<Client, u16> {
        let mut req = awc::Client::builder().timeout(WAIT).finish().ws(url).max_frame_size(64 << 20);
        if let Some(o) = origin {
            req = req.origin(o);
        }
        match req.connect().await {
            Ok((_, framed)) => Ok(Client { framed, raw: Vec::new() }),
            Err(awc::error::WsClientError::InvalidResponseStatus(s)) => Err(s.as_u16()),
            Err(e) => panic!("websocket connect failed: {e}"),
        }
    }

    /// The next thing from the server (server pings are answered and skipped).
    pub async fn next(&mut self) -> Incoming {
        loop {
            let frame = tokio::time::timeout(WAIT, self.framed.next()).await.expect("timed out waiting for the server");
            match frame {
                None | Some(Err(_)) => return Incoming::Ended,
                Some(Ok(Frame::Text(t))) => {
                    let env: Envelope = serde_json::from_slice(&t).unwrap_or_else(|e| {
                        panic!("server sent an invalid envelope {e}: {}", String::from_utf8_lossy(&t))
                    });
                    self.raw.push(serde_json::from_slice(&t).expect("JSON"));
                    return Incoming::Message { env, binary: false };
                }
                Some(Ok(Frame::Binary(b))) => {
                    let env = jobcast::decode_binary(&b).expect("binary frame decodes");
                    return Incoming::Message { env, binary: true };
                }
                Some(Ok(Frame::Ping(p))) => {
                    let _ = self.framed.send(ws::Message::Pong(p)).await;
                }
                Some(Ok(Frame::Pong(_))) | Some(Ok(Frame::Continuation(_))) => {}
                Some(Ok(Frame::Close(reason))) => return Incoming::Close(reason),
            }
        }
    }

    /// The next frame as it came (nothing answered or skipped); `None` when the connection ended.
    pub async fn frame(&mut self) -> Option<Frame> {
        let frame = tokio::time::timeout(WAIT, self.framed.next()).await.expect("timed out waiting for the server");
        frame.and_then(Result::ok)
    }

    /// The next server message; fails the test on a close.
    pub async fn recv(&mut self) -> Envelope {
        match self.next().await {
            Incoming::Message { env, .. } => env,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The next message, which must be of `kind`.
    pub async fn expect(&mut self, kind: EventType) -> Envelope {
        let env = self.recv().await;
        assert_eq!(env.event.kind(), kind, "unexpected message: {env:?}");
        env
    }

    /// The `data` of the next message, which must be of `kind`, as JSON.
    pub async fn expect_data(&mut self, kind: EventType) -> Value {
        let env = self.expect(kind).await;
        serde_json::to_value(&env).expect("json")["data"].clone()
    }

    /// Reads until a close frame arrives; returns its code and reason. Messages before it are returned too.
    pub async fn expect_close(&mut self) -> (u16, String, Vec<Envelope>) {
        let mut before = Vec::new();
        loop {
            match self.next().await {
                Incoming::Message { env, .. } => before.push(env),
                Incoming::Close(Some(r)) => return (u16::from(r.code), r.description.unwrap_or_default(), before),
                Incoming::Close(None) => return (1005, String::new(), before),
                Incoming::Ended => {
                    panic!("connection ended without a close frame; before it: {before:?}")
                }
            }
        }
    }

    /// Sends a client message.
    pub async fn send(&mut self, msg: &ClientMessage) {
        self.send_text(&serde_json::to_string(msg).expect("json")).await;
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, text: &str) {
        self.framed.send(ws::Message::Text(text.to_string().into())).await.expect("send");
    }

    /// Sends any frame.
    pub async fn send_frame(&mut self, msg: ws::Message) {
        self.framed.send(msg).await.expect("send");
    }

    /// Sends a text message cut into continuation frames of `chunk` bytes.
    pub async fn send_fragmented(&mut self, text: &str, chunk: usize) {
        let bytes = Bytes::copy_from_slice(text.as_bytes());
        let parts: Vec<Bytes> = bytes.chunks(chunk).map(Bytes::copy_from_slice).collect();
        let last = parts.len() - 1;
        for (i, p) in parts.into_iter().enumerate() {
            let item = match i {
                0 => actix_ws::Item::FirstText(p),
                i if i == last => actix_ws::Item::Last(p),
                _ => actix_ws::Item::Continue(p),
            };
            // A send may fail once the server has closed; the close frame is what the test reads.
            let _ = self.framed.send(ws::Message::Continuation(item)).await;
        }
    }

    /// Sends one message as these frames, byte for byte (a text message when `text`).
    pub async fn send_fragments(&mut self, text: bool, parts: &[&[u8]]) {
        let last = parts.len() - 1;
        for (i, p) in parts.iter().enumerate() {
            let p = Bytes::copy_from_slice(p);
            let item = match i {
                0 if text => actix_ws::Item::FirstText(p),
                0 => actix_ws::Item::FirstBinary(p),
                i if i == last => actix_ws::Item::Last(p),
                _ => actix_ws::Item::Continue(p),
            };
            // A send may fail once the server has closed; the close frame is what the test reads.
            if self.framed.send(ws::Message::Continuation(item)).await.is_err() {
                return;
            }
        }
    }

    /// Subscribes and returns the `subscribed` data.
    pub async fn subscribe(&mut self, room: &str) -> Value {
        self.send(&ClientMessage::Subscribe { room: room.into(), since: None }).await;
        self.expect_data(EventType::Subscribed).await
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.framed.send(ws::Message::Close(Some(ws::CloseCode::Normal.into()))).await;
    }
}

/// A multipart body with a `file` part (and an optional `batch_id`), as browsers send it.
pub fn multipart(filename: &str, content_type: &str, data: &[u8], batch_id: Option<uuid::Uuid>) -> (String, Vec<u8>) {
    let boundary = format!("jobcast-test-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    if let Some(id) = batch_id {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"batch_id\"\r\n\r\n{id}\r\n").as_bytes(),
        );
    }
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

impl TestServer {
    /// `POST /api/v1/uploads`; returns status and JSON body.
    pub async fn upload(
        &self,
        token: &str,
        filename: &str,
        content_type: &str,
        data: &[u8],
        batch_id: Option<uuid::Uuid>,
    ) -> (u16, Value) {
        upload_to(&self.http("/api/v1/uploads"), token, filename, content_type, data, batch_id).await
    }
}

/// `POST` a multipart upload to `url`.
pub async fn upload_to(
    url: &str,
    token: &str,
    filename: &str,
    content_type: &str,
    data: &[u8],
    batch_id: Option<uuid::Uuid>,
) -> (u16, Value) {
    let (ctype, body) = multipart(filename, content_type, data, batch_id);
    let res = awc::Client::default()
        .post(url)
        .timeout(WAIT)
        .insert_header(("Authorization", format!("Bearer {token}")))
        .insert_header(("Content-Type", ctype))
        .send_body(body)
        .await;
    let mut res = match res {
        Ok(r) => r,
        Err(e) => panic!("upload failed: {e}"),
    };
    let status = res.status().as_u16();
    let bytes = res.body().await.expect("body");
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// What a generated CSV holds, so tests can check results exactly.
pub struct GeneratedCsv {
    pub bytes: Vec<u8>,
    pub rows: u64,
    pub invalid_lines: Vec<u64>,
    pub flagged_lines: Vec<u64>,
    pub duplicates: u64,
}

impl GeneratedCsv {
    /// Rows that parse.
    pub fn valid(&self) -> u64 {
        self.rows - self.invalid_lines.len() as u64
    }
}

/// `rows` data rows: every 10th (i % 10 == 9) repeats the row before it, i % 50 == 7 has a bad date,
/// i % 100 == 3 has a formula in its description. Row i is on file line i + 2.
pub fn generate_csv(rows: u64, salt: &str) -> GeneratedCsv {
    let mut out = String::from("date,amount,description\n");
    let (mut invalid_lines, mut flagged_lines, mut duplicates) = (Vec::new(), Vec::new(), 0);
    let mut previous = String::new();
    for i in 0..rows {
        let line = if i % 10 == 9 {
            duplicates += 1;
            previous.clone()
        } else if i % 50 == 7 {
            invalid_lines.push(i + 2);
            format!("not-a-date,{i}.00,item {salt} {i}\n")
        } else if i % 100 == 3 {
            flagged_lines.push(i + 2);
            format!("2024-01-{:02},-{i}.50,\"=HYPERLINK(\"\"http://x/{salt}{i}\"\")\"\n", i % 28 + 1)
        } else {
            format!("2024-01-{:02},-{i}.25,grocery {salt} {i}\n", i % 28 + 1)
        };
        out.push_str(&line);
        previous = line;
    }
    GeneratedCsv { bytes: out.into_bytes(), rows, invalid_lines, flagged_lines, duplicates }
}

/// One request a [`Receiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    /// Header names in lower case, with their values.
    pub headers: std::collections::HashMap<String, String>,
    /// The body as sent.
    pub body: String,
    /// The status it was answered with.
    pub status: u16,
}

/// A webhook receiver: a plain HTTP/1.1 server on 127.0.0.1 that answers the first `fail` requests
/// with 500 (on purpose) and the rest with 200, and keeps what it got.
pub struct Receiver {
    pub url: String,
    got: std::sync::Arc<(std::sync::Mutex<Vec<Received>>, std::sync::Condvar)>,
    fail: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Receiver {
    pub fn start(fail: usize) -> Receiver {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let got = std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(fail));
        let (sink, failing) = (got.clone(), fail.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut headers = std::collections::HashMap::new();
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.trim_end().split_once(':') {
                        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                    }
                }
                let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let left = failing.load(std::sync::atomic::Ordering::SeqCst);
                let status = if left > 0 {
                    failing.store(left - 1, std::sync::atomic::Ordering::SeqCst);
                    500
                } else {
                    200
                };
                let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(answer.as_bytes());
                let (list, ready) = &*sink;
                let body = String::from_utf8_lossy(&body).into_owned();
                list.lock().expect("lock").push(Received { headers, body, status });
                ready.notify_all();
            }
        });
        Receiver { url, got, fail }
    }

    /// Answers 500 to the next `n` requests.
    pub fn fail_next(&self, n: usize) {
        self.fail.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits (at most [`WAIT`]) until `done` holds for the requests so far; answers them.
    pub async fn until(&self, done: impl Fn(&[Received]) -> bool + Send + 'static) -> Vec<Received> {
        let got = self.got.clone();
        let waited = actix_rt::task::spawn_blocking(move || {
            let (list, ready) = &*got;
            let deadline = std::time::Instant::now() + WAIT * 3;
            let mut seen = list.lock().expect("lock");
            while !done(&seen) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                assert!(!left.is_zero(), "the receiver never saw what was awaited; it got {:?}", *seen);
                seen = ready.wait_timeout(seen, left).expect("wait").0;
            }
            seen.clone()
        });
        waited.await.expect("waited")
    }
}

/// Checks a Standard Webhooks signature the way a receiver would: HMAC-SHA256 of
/// "id.timestamp.body" with the secret's bytes (`whsec_` base64, else UTF-8).
pub fn signature_valid(secret: &str, r: &Received) -> bool {
    use base64::Engine;
    use hmac::{Hmac, KeyInit, Mac};
    let engine = base64::engine::general_purpose::STANDARD;
    let key = match secret.strip_prefix("whsec_") {
        Some(b) => engine.decode(b).expect("whsec base64"),
        None => secret.as_bytes().to_vec(),
    };
    let (Some(id), Some(ts), Some(sig)) =
        (r.headers.get("webhook-id"), r.headers.get("webhook-timestamp"), r.headers.get("webhook-signature"))
    else {
        return false;
    };
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).expect("key");
    mac.update(format!("{id}.{ts}.{}", r.body).as_bytes());
    let expected = format!("v1,{}", engine.encode(mac.finalize().into_bytes()));
    sig.split(' ').any(|s| s == expected)
}

/// `POST http://{addr}{path}` with a bearer token and a JSON body; answers status and JSON body.
pub async fn post_json(addr: &str, path: &str, bearer: &str, body: Value) -> (u16, Value) {
    let mut res = awc::Client::default()
        .post(format!("http://{addr}{path}"))
        .timeout(WAIT)
        .insert_header(("Authorization", format!("Bearer {bearer}")))
        .send_json(&body)
        .await
        .expect("request");
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}
