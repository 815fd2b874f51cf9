//! `jobcast import FILE`: uploads a CSV and shows the job live in the terminal, reconnecting and
//! resuming with `since` when the connection drops. A client of the public protocol, nothing more.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use awc::ws;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use uuid::Uuid;

use crate::framing::decode_binary;
use crate::protocol::{ClientMessage, Envelope, Event, JobStatus, Since};

/// How an import ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `processing_completed`, with its results.
    Completed(Value),
    /// `processing_failed`, with its error.
    Failed(String),
    /// `job_cancelled`.
    Cancelled,
}

/// Why the import could not be followed to its end.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {0}: {1}")]
    File(String, std::io::Error),
    #[error("upload refused ({0}): {1}")]
    Upload(u16, String),
    #[error("cannot reach the server: {0}")]
    Connect(String),
    #[error("the server refused the connection: {0}")]
    Refused(String),
}

/// Uploads `file` to `server` (`http://host:port`) with `token` and follows the job to its end.
pub async fn run(file: &Path, server: &str, token: &str) -> Result<Outcome, ImportError> {
    let server = server.trim_end_matches('/');
    let ws_base = server.replacen("http", "ws", 1);
    let batch = Uuid::new_v4();
    let room = format!("job:{batch}");
    let mut view = View::new();
    // Subscribe before uploading so no event is missed: the room is joined (the id reserved) once
    // `subscribed` arrives, and only then does the upload begin.
    let mut conn = Conn::open(&ws_base, token, &room, None).await?;
    let mut early = Vec::new();
    loop {
        let env = conn.next().await.ok_or_else(|| ImportError::Connect("closed before subscribing".into()))?;
        match &env.event {
            Event::AuthFailure(a) => return Err(ImportError::Refused(a.reason.clone())),
            Event::Error(e) => return Err(ImportError::Refused(format!("{}: {}", e.code, e.message))),
            Event::Subscribed(s) if s.room == room => break,
            _ => early.push(env),
        }
    }
    upload(file, server, token, batch).await?;
    view.line(&format!("uploaded {} as job {batch}", file.display()));
    for env in &early {
        view.show(env);
    }
    let mut attempt = 0u32;
    loop {
        match conn.next().await {
            Some(env) => {
                attempt = 0;
                if let Event::AuthFailure(a) = &env.event {
                    return Err(ImportError::Refused(a.reason.clone()));
                }
                if let Some(outcome) = view.show(&env) {
                    view.finish();
                    return Ok(outcome);
                }
            }
            None => {
                // Dropped: back off, reconnect, resume after the last event seen.
                attempt += 1;
                let delay = Duration::from_millis((200u64 << attempt.min(5)).min(5000));
                view.line(&format!("connection lost; reconnecting in {} ms", delay.as_millis()));
                actix_rt::time::sleep(delay).await;
                if attempt > 20 {
                    return Err(ImportError::Connect("gave up after 20 attempts".into()));
                }
                match Conn::open(&ws_base, token, &room, conn.position()).await {
                    Ok(c) => {
                        view.line("reconnected; resuming");
                        conn = c;
                    }
                    Err(ImportError::Refused(why)) => return Err(ImportError::Refused(why)),
                    Err(_) => {}
                }
            }
        }
    }
}

/// One WebSocket connection following a job room.
struct Conn {
    framed: actix_codec::Framed<awc::BoxedSocket, ws::Codec>,
    room: String,
    /// Last `seq` seen and the room's epoch.
    seq: u64,
    epoch: Option<String>,
}

impl Conn {
    async fn open(ws_base: &str, token: &str, room: &str, since: Option<Since>) -> Result<Conn, ImportError> {
        let url = format!("{ws_base}/ws?token={token}");
        let (_, framed) = awc::Client::builder()
            .timeout(Duration::from_secs(10))
            .finish()
            .ws(url)
            .max_frame_size(64 << 20)
            .connect()
            .await
            .map_err(|e| ImportError::Connect(e.to_string()))?;
        let (seq, epoch) = since.as_ref().map(|s| (s.seq, Some(s.epoch.clone()))).unwrap_or((0, None));
        let mut conn = Conn { framed, room: room.to_string(), seq, epoch };
        let subscribe = ClientMessage::Subscribe { room: room.to_string(), since };
        let text = serde_json::to_string(&subscribe).unwrap_or_default();
        conn.framed.send(ws::Message::Text(text.into())).await.map_err(|e| ImportError::Connect(e.to_string()))?;
        Ok(conn)
    }

    fn position(&self) -> Option<Since> {
        self.epoch.clone().map(|epoch| Since { seq: self.seq, epoch })
    }

    /// The next message for the viewer; `None` when the connection is gone.
    async fn next(&mut self) -> Option<Envelope> {
        loop {
            let frame = self.framed.next().await?.ok()?;
            let env = match frame {
                ws::Frame::Text(t) => serde_json::from_slice::<Envelope>(&t).ok(),
                ws::Frame::Binary(b) => decode_binary(&b).ok(),
                ws::Frame::Ping(p) => {
                    self.framed.send(ws::Message::Pong(p)).await.ok()?;
                    None
                }
                ws::Frame::Close(_) => return None,
                _ => None,
            };
            let Some(env) = env else { continue };
            if let Event::Subscribed(s) = &env.event {
                if s.room == self.room {
                    self.epoch = Some(s.epoch.clone());
                    if !s.recovered {
                        self.seq = s.seq;
                    }
                }
            }
            if env.room.as_deref() == Some(self.room.as_str()) {
                match env.seq {
                    Some(seq) if seq <= self.seq => continue, // already shown
                    Some(seq) => self.seq = seq,
                    None => {}
                }
            }
            return Some(env);
        }
    }
}

/// Streams the file as a multipart upload (the file is never read whole into memory).
async fn upload(file: &Path, server: &str, token: &str, batch: Uuid) -> Result<(), ImportError> {
    let name = file.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "upload.csv".into());
    let f = tokio::fs::File::open(file).await.map_err(|e| ImportError::File(file.display().to_string(), e))?;
    let boundary = format!("jobcast-{}", Uuid::new_v4().simple());
    let head = Bytes::from(format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"batch_id\"\r\n\r\n{batch}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: text/csv\r\n\r\n"
    ));
    let tail = Bytes::from(format!("\r\n--{boundary}--\r\n"));
    let chunks = futures_util::stream::unfold(Some(f), |f| async move {
        use tokio::io::AsyncReadExt;
        let mut f = f?;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let body = futures_util::stream::once(async { Ok(head) })
        .chain(chunks)
        .chain(futures_util::stream::once(async { Ok(tail) }));
    let mut res = awc::Client::builder()
        .timeout(Duration::from_secs(600))
        .finish()
        .post(format!("{server}/api/v1/uploads"))
        .insert_header(("Authorization", format!("Bearer {token}")))
        .insert_header(("Content-Type", format!("multipart/form-data; boundary={boundary}")))
        .send_stream(body)
        .await
        .map_err(|e| ImportError::Connect(e.to_string()))?;
    if res.status().as_u16() != 202 {
        let body = res.body().await.map(|b| String::from_utf8_lossy(&b).to_string()).unwrap_or_default();
        return Err(ImportError::Upload(res.status().as_u16(), body));
    }
    Ok(())
}

/// The terminal view: a redrawn progress line on a terminal, plain lines otherwise.
struct View {
    tty: bool,
    /// A progress line is on screen and must be cleared before other output.
    dirty: bool,
    last_plain: Option<std::time::Instant>,
}

impl View {
    fn new() -> Self {
        View { tty: std::io::stdout().is_terminal(), dirty: false, last_plain: None }
    }

    fn line(&mut self, text: &str) {
        let mut out = std::io::stdout().lock();
        if self.dirty {
            let _ = write!(out, "\r\x1b[2K");
            self.dirty = false;
        }
        let _ = writeln!(out, "{text}");
    }

    fn bar(&mut self, text: String) {
        if self.tty {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[2K{text}");
            let _ = out.flush();
            self.dirty = true;
        } else if self.last_plain.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            self.last_plain = Some(std::time::Instant::now());
            self.line(&text);
        }
    }

    fn finish(&mut self) {
        if self.dirty {
            self.line("");
        }
    }

    /// Shows one message; returns the outcome once the job has ended.
    fn show(&mut self, env: &Envelope) -> Option<Outcome> {
        match &env.event {
            Event::Subscribed(s) => {
                if let Some(status) = s.snapshot.as_ref().map(|v| &v.status) {
                    if *status != JobStatus::Pending {
                        self.line(&format!("resumed (recovered: {}, status {status})", s.recovered));
                    }
                }
            }
            Event::Status(s) => self.line(&format!(
                "status: {}{}",
                s.status,
                if s.message.is_empty() { String::new() } else { format!(" ({})", s.message) }
            )),
            Event::ProcessingStarted(p) => {
                self.line(&format!("processing {} ({} bytes, {} zones)", p.filename, p.size_bytes, p.zones_total))
            }
            Event::ProcessingProgress(p) => {
                let width = 30;
                let filled = ((p.progress / 100.0) * width as f64).round() as usize;
                let eta = p.eta_seconds.map(|s| format!("  ETA {s:.0}s")).unwrap_or_default();
                self.bar(format!(
                    "[{}{}] {:5.1}% {:<14} zones {}/{}  rows {}/{}{eta}",
                    "#".repeat(filled.min(width)),
                    "-".repeat(width - filled.min(width)),
                    p.progress,
                    p.stage,
                    p.zones_completed,
                    p.zones_total,
                    p.processed,
                    p.total
                ));
            }
            Event::ProcessingCompleted(c) => {
                self.finish();
                let r = &c.results;
                self.line(&format!(
                    "completed: {} rows, {} inserted, {} duplicates, {} invalid, {} flagged cells",
                    r["processed_rows"], r["inserted"], r["duplicates"], r["invalid_count"], r["flagged_count"]
                ));
                for row in r["invalid_rows"].as_array().into_iter().flatten().take(10) {
                    self.line(&format!("  invalid line {}: {}", row["line"], row["reason"].as_str().unwrap_or("")));
                }
                if let Some(cats) = r["categories"].as_object() {
                    let list: Vec<String> = cats.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    self.line(&format!("  categories: {}", list.join(", ")));
                }
                return Some(Outcome::Completed(c.results.clone()));
            }
            Event::ProcessingFailed(f) => {
                self.line(&format!("failed: {}", f.error));
                return Some(Outcome::Failed(f.error.clone()));
            }
            Event::JobCancelled(c) => {
                self.line(&format!("cancelled by {}", c.by));
                return Some(Outcome::Cancelled);
            }
            Event::AuthFailure(a) => self.line(&format!("authentication failed: {}", a.reason)),
            Event::Error(e) => self.line(&format!("error {}: {}", e.code, e.message)),
            _ => {}
        }
        None
    }
}
