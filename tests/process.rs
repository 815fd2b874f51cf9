//! The `jobcast` binary as a newcomer runs it: no configuration, signals, the token command, logs.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use common::Client;
use jobcast::protocol::{ClientMessage, EventType};

const BIN: &str = env!("CARGO_BIN_EXE_jobcast");

/// A running `jobcast serve` child with its stdout lines and everything it logged.
struct Proc {
    child: Child,
    addr: String,
    stdout: Vec<String>,
    logs: Arc<Mutex<String>>,
}

impl Proc {
    fn serve(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").args(args).current_dir(cwd).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.env("JOBCAST_LOG", "debug");
        let mut child = cmd.spawn().expect("spawn jobcast");
        let logs = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = Vec::new();
        let mut addr = None;
        while stdout.len() < 3 {
            let line = lines.next().expect("jobcast printed its banner").expect("utf-8");
            if let Some(a) = line.strip_prefix("jobcast listening on http://") {
                addr = Some(a.to_string());
            }
            stdout.push(line);
        }
        Proc { child, addr: addr.expect("listening line"), stdout, logs }
    }

    fn admin_token(&self) -> String {
        let line = self.stdout.iter().find(|l| l.starts_with("development admin token")).expect("admin token line");
        line.rsplit(' ').next().unwrap().to_string()
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
        self.child.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get_status(url: &str, bearer: &str) -> u16 {
    let res = awc::Client::default().get(url).insert_header(("Authorization", format!("Bearer {bearer}"))).send().await;
    res.expect("request").status().as_u16()
}

#[actix_rt::test]
async fn serve_needs_no_configuration_and_keeps_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::serve(dir.path(), &["--bind", "127.0.0.1:0"], &[]);
    let demo = format!("demo page: http://{}/?token={}", p.addr, p.admin_token());
    assert!(p.stdout.contains(&demo), "{:?}", p.stdout);
    let secret =
        std::fs::read_to_string(dir.path().join("jobcast-data/jwt_secret")).expect("secret kept in ./jobcast-data");
    assert!(secret.len() >= 32);
    let token = p.admin_token();
    assert_eq!(get_status(&format!("http://{}/api/v1/admin/stats", p.addr), &token).await, 200);
    assert!(p.terminate().success());
    // A restart on the same data dir keeps the secret, so earlier tokens stay valid.
    let p2 = Proc::serve(dir.path(), &["--bind", "127.0.0.1:0"], &[]);
    assert_eq!(std::fs::read_to_string(dir.path().join("jobcast-data/jwt_secret")).unwrap(), secret);
    assert_eq!(get_status(&format!("http://{}/api/v1/admin/stats", p2.addr), &token).await, 200);
}

#[actix_rt::test]
async fn token_command_mints_what_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::serve(dir.path(), &["--bind", "127.0.0.1:0"], &[]);
    let out = Command::new(BIN)
        .args(["token", "--user", "ops", "--tenant", "acme", "--role", "admin", "--ttl", "600"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(get_status(&format!("http://{}/api/v1/admin/stats", p.addr), &token).await, 200);
    let bad = Command::new(BIN)
        .args(["token", "--user", "x", "--tenant", "y", "--role", "root"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[actix_rt::test]
async fn flag_beats_env_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    // 192.0.2.1 (TEST-NET-1) is no address of this machine, so binding it fails at once; whichever
    // layer wins must be the one with 127.0.0.1:0.
    std::fs::write(dir.path().join("jobcast.toml"), "bind = \"192.0.2.1:8080\"\n").unwrap();
    let env_wins = Proc::serve(dir.path(), &["--config", "jobcast.toml"], &[("JOBCAST_BIND", "127.0.0.1:0")]);
    assert!(env_wins.addr.starts_with("127.0.0.1:"));
    let flag_wins = Proc::serve(
        dir.path(),
        &["--config", "jobcast.toml", "--bind", "127.0.0.1:0"],
        &[("JOBCAST_BIND", "192.0.2.1:8080")],
    );
    assert!(flag_wins.addr.starts_with("127.0.0.1:"));
    let file_only =
        Command::new(BIN).args(["serve", "--config", "jobcast.toml"]).current_dir(dir.path()).output().unwrap();
    assert!(!file_only.status.success(), "the file's address was used");
    assert!(String::from_utf8_lossy(&file_only.stderr).contains("192.0.2.1:8080"));
}

#[actix_rt::test]
async fn sigterm_closes_every_socket_with_1001_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::serve(dir.path(), &["--bind", "127.0.0.1:0"], &[]);
    let token = p.admin_token();
    let mut c = Client::connect(&format!("ws://{}/ws?token={token}", p.addr)).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    let status = p.terminate();
    let (code, reason, _) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (1001, "server shutting down"));
    assert!(status.success(), "{status:?}");
}

#[actix_rt::test]
async fn tokens_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::serve(dir.path(), &["--bind", "127.0.0.1:0"], &[]);
    let token = p.admin_token();
    let mut c = Client::connect(&format!("ws://{}/ws?token={token}&format=json", p.addr)).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    // A bad token in the query, one in an authenticate message, and one in a refresh.
    let mut bad = Client::connect(&format!("ws://{}/ws?token=SECRET-BAD-TOKEN-1", p.addr)).await;
    bad.expect_close().await;
    let mut late = Client::connect(&format!("ws://{}/ws", p.addr)).await;
    late.expect(EventType::ConnectionEstablished).await;
    late.send(&ClientMessage::Authenticate { token: "SECRET-BAD-TOKEN-2".into() }).await;
    late.expect_close().await;
    c.send(&ClientMessage::Refresh { token: "SECRET-BAD-TOKEN-3".into() }).await;
    c.expect(EventType::Error).await;
    c.close().await;
    // The access log line for the upgrade is written when the request completes; wait for it.
    let deadline = std::time::Instant::now() + common::WAIT;
    while !p.logs().contains("query=token=[redacted]") {
        assert!(std::time::Instant::now() < deadline, "no redacted access log line:\n{}", p.logs());
        actix_rt::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let logs = p.logs();
    assert!(logs.contains("event=\"auth_failure\"") || logs.contains("auth_failure"), "audit lines are there:\n{logs}");
    for secret in [token.as_str(), "SECRET-BAD-TOKEN-1", "SECRET-BAD-TOKEN-2", "SECRET-BAD-TOKEN-3"] {
        assert!(!logs.contains(secret), "a token reached the log:\n{logs}");
    }
    // Only one of the three JWT parts would still be a leak.
    let signature = token.rsplit('.').next().unwrap();
    assert!(!logs.contains(signature));
}

fn mint(dir: &Path, user: &str, tenant: &str) -> String {
    let out = Command::new(BIN).args(["token", "--user", user, "--tenant", tenant]).current_dir(dir).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[actix_rt::test]
async fn kill_9_mid_job_then_restart_loses_nothing_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--bind", "127.0.0.1:0", "--zone-rows", "10"];
    let mut p = Proc::serve(dir.path(), &args, &[]);
    let token = mint(dir.path(), "alice", "acme");
    let csv = common::generate_csv(30_000, "crash");
    let batch = uuid::Uuid::new_v4();
    let room = format!("job:{batch}");
    let mut c = Client::connect(&format!("ws://{}/ws?token={token}&format=json", p.addr)).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    let epoch = c.subscribe(&room).await["epoch"].as_str().unwrap().to_string();
    let (status, _) = common::upload_to(
        &format!("http://{}/api/v1/uploads", p.addr),
        &token,
        "big.csv",
        "text/csv",
        &csv.bytes,
        Some(batch),
    )
    .await;
    assert_eq!(status, 202);
    let mut last_seq = 0;
    let mut zones_seen = 0;
    while zones_seen < 20 {
        let env = c.recv().await;
        assert_eq!(env.seq, Some(last_seq + 1));
        last_seq += 1;
        if env.event.kind() == EventType::ZoneCompleted {
            zones_seen += 1;
        }
    }
    p.child.kill().unwrap(); // SIGKILL: no shutdown of any kind
    p.child.wait().unwrap();
    drop(c);

    let p2 = Proc::serve(dir.path(), &args, &[]);
    let mut c = Client::connect(&format!("ws://{}/ws?token={token}&format=json", p2.addr)).await;
    c.expect(EventType::ConnectionEstablished).await;
    c.expect(EventType::Authenticated).await;
    c.send(&ClientMessage::Subscribe {
        room: room.clone(),
        since: Some(jobcast::protocol::Since { seq: last_seq, epoch: epoch.clone() }),
    })
    .await;
    let joined = c.expect_data(EventType::Subscribed).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["epoch"], epoch.as_str(), "history survived, so the epoch did");
    assert!(joined["seq"].as_u64().unwrap() >= last_seq, "no event the client saw was lost");
    // Every later event, replayed then live, with no gap, until the resumed job completes.
    let mut resumed = false;
    let results = loop {
        let env = c.recv().await;
        assert_eq!(env.seq, Some(last_seq + 1), "gap after restart: {env:?}");
        last_seq += 1;
        match env.event {
            jobcast::protocol::Event::Status(s) if s.message == "resuming after a restart" => resumed = true,
            jobcast::protocol::Event::ProcessingCompleted(done) => break done.results,
            _ => {}
        }
    };
    assert!(resumed, "the job was interrupted and resumed, not finished before the kill");
    assert_eq!(results["processed_rows"], 30_000);
    assert_eq!(results["inserted"].as_u64(), Some(csv.valid() - csv.duplicates), "every row stored exactly once");
    assert_eq!(results["duplicates"].as_u64(), Some(csv.duplicates));
    assert_eq!(results["invalid_count"].as_u64(), Some(csv.invalid_lines.len() as u64));
    let res = awc::Client::default()
        .get(format!("http://{}/api/v1/jobs/{batch}", p2.addr))
        .insert_header(("Authorization", format!("Bearer {token}")))
        .send()
        .await;
    let snap: serde_json::Value = res.unwrap().json().await.unwrap();
    assert_eq!(snap["status"], "completed");
    assert_eq!(snap["zones_completed"], 3000);
}

#[actix_rt::test]
async fn import_command_shows_the_job_and_its_results() {
    let dir = tempfile::tempdir().unwrap();
    let p = Proc::serve(dir.path(), &["--bind", "127.0.0.1:0"], &[]);
    let csv = common::generate_csv(500, "cli");
    std::fs::write(dir.path().join("bank.csv"), &csv.bytes).unwrap();
    let out = Command::new(BIN)
        .args(["import", "bank.csv", "--server", &format!("http://{}", p.addr)])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let want = format!(
        "completed: 500 rows, {} inserted, {} duplicates, {} invalid",
        csv.valid() - csv.duplicates,
        csv.duplicates,
        csv.invalid_lines.len()
    );
    assert!(stdout.contains(&want), "{stdout}");
    assert!(stdout.contains(&format!("invalid line {}", csv.invalid_lines[0])), "{stdout}");
    assert!(stdout.contains("status: validating"), "{stdout}");
    // A file that is not there is a clear error.
    let out = Command::new(BIN)
        .args(["import", "nope.csv", "--server", &format!("http://{}", p.addr)])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read nope.csv"));
}

#[actix_rt::test]
async fn import_command_reconnects_and_resumes_when_dropped_mid_job() {
    let dir = tempfile::tempdir().unwrap();
    // 3,000 zones send over 6,000 events, most of them in the half second the importer is away: the
    // history must hold them all for the resume to be a recovery (the default keeps 1,000 per room).
    let p = Proc::serve(dir.path(), &["--bind", "127.0.0.1:0", "--zone-rows", "10", "--history-size", "20000"], &[]);
    let admin = p.admin_token();
    let csv = common::generate_csv(30_000, "drop");
    std::fs::write(dir.path().join("big.csv"), &csv.bytes).unwrap();
    let child = Command::new(BIN)
        .args(["import", "big.csv", "--server", &format!("http://{}", p.addr)])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the job is under way, then cut the importer's connection from the server side.
    let http = awc::Client::default();
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let mut res = http
            .get(format!("http://{}/api/v1/jobs", p.addr))
            .insert_header(("Authorization", format!("Bearer {admin}")))
            .send()
            .await
            .unwrap();
        let list: serde_json::Value = res.json().await.unwrap();
        if list["jobs"][0]["zones_completed"].as_u64().unwrap_or(0) > 0 {
            assert_eq!(
                list["jobs"][0]["status"].as_str().map(|s| s != "completed"),
                Some(true),
                "the job finished too soon"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the job never started");
        actix_rt::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let res = http
        .delete(format!("http://{}/api/v1/admin/users/cli/connections", p.addr))
        .insert_header(("Authorization", format!("Bearer {admin}")))
        .send()
        .await;
    let closed: serde_json::Value = res.unwrap().json().await.unwrap();
    assert_eq!(closed["closed"], 1);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("reconnected; resuming"), "{stdout}");
    assert!(stdout.contains("resumed (recovered: true"), "{stdout}");
    assert!(stdout.contains(&format!("completed: 30000 rows, {} inserted", csv.valid() - csv.duplicates)), "{stdout}");
}

/// The server's peak resident memory in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[actix_rt::test]
async fn a_million_row_import_runs_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut csv = String::with_capacity(60 << 20);
    csv.push_str("date,amount,description\n");
    for i in 0..1_000_000u64 {
        use std::fmt::Write;
        let _ = writeln!(
            csv,
            "2024-{:02}-{:02},-{}.{:02},card payment {i} grocery store",
            i % 12 + 1,
            i % 28 + 1,
            i % 9973,
            i % 100
        );
    }
    std::fs::write(dir.path().join("million.csv"), &csv).unwrap();
    let size = csv.len() as u64;
    drop(csv);
    let p = Proc::serve(
        dir.path(),
        &["--bind", "127.0.0.1:0", "--max-upload-bytes", &(size + 1024 * 1024).to_string()],
        &[],
    );
    let out = Command::new(BIN)
        .args(["import", "million.csv", "--server", &format!("http://{}", p.addr)])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("completed: 1000000 rows, 1000000 inserted"), "{stdout}");
    // The file is ~54 MB; the server streams it and holds at most 64 zones (64,000 rows) in flight,
    // page caches of 32 MiB (rows) and 8 MiB (events, jobs) and fixed overhead: 67 MiB measured in a
    // release build. Holding the file or its rows would pass 96 MiB.
    let peak_mib = peak_rss_kib(p.child.id()) / 1024;
    assert!(peak_mib < 96, "peak RSS {peak_mib} MiB");
}

#[actix_rt::test]
async fn sigterm_stops_the_server_even_when_its_output_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--bind", "127.0.0.1:0"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("jobcast listening on"), "{first}");
    // Whoever read its output is gone: every log line now fails to write.
    drop(child.stdout.take());
    drop(child.stderr.take());
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let deadline = std::time::Instant::now() + common::WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "jobcast ignored SIGTERM");
        actix_rt::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}
