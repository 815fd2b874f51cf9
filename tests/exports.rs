//! Export jobs and downloads (contract §8) against the real server: a tenant's imported rows written
//! to CSV and JSON lines with their events, fetched through the signed link without a header,
//! filtered, refused when the link is altered or expired, and removed after `retention_s`.

mod common;

use common::{generate_csv, Client, TestServer, WAIT};
use jobcast::protocol::{Event, EventType};
use serde_json::{json, Value};

/// Imports `rows` generated rows for alice of acme and waits for the job's end; answers its id
/// and the rows it inserted.
async fn import(server: &TestServer, rows: u64) -> (uuid::Uuid, u64) {
    let token = server.token("alice", "acme", &[]);
    let batch = uuid::Uuid::new_v4();
    let mut watcher = server.connect_as("alice", "acme").await;
    watcher.subscribe(&format!("job:{batch}")).await;
    let csv = generate_csv(rows, &batch.simple().to_string()[..8]);
    let (status, body) = server.upload(&token, "rows.csv", "text/csv", &csv.bytes, Some(batch)).await;
    assert_eq!(status, 202, "{body}");
    loop {
        match watcher.recv().await.event {
            Event::ProcessingCompleted(done) => return (batch, done.results["inserted"].as_u64().expect("inserted")),
            Event::ProcessingFailed(f) => panic!("the import failed: {}", f.error),
            _ => {}
        }
    }
}

/// Starts an export as alice, watching its room from before it starts; answers the room's events
/// up to its end and the `export_completed` data.
async fn export(server: &TestServer, body: Value) -> (Vec<EventType>, Value) {
    let id = uuid::Uuid::new_v4();
    let mut watcher: Client = server.connect_as("alice", "acme").await;
    watcher.subscribe(&format!("job:{id}")).await;
    let mut body = body;
    body["id"] = json!(id.to_string());
    let (status, answer) =
        server.request("POST", "/api/v1/exports", Some(&server.token("alice", "acme", &[])), Some(body)).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["job_id"], id.to_string());
    let (mut kinds, mut completed) = (Vec::new(), Value::Null);
    loop {
        let env = watcher.recv().await;
        kinds.push(env.event.kind());
        match env.event {
            Event::ExportCompleted(c) => completed = serde_json::to_value(c).expect("json"),
            Event::Status(s) if s.status.is_terminal() => return (kinds, completed),
            Event::ExportFailed(f) => panic!("the export failed: {}", f.error),
            _ => {}
        }
    }
}

/// `GET` a download link with no header at all; answers status, content type and body.
async fn fetch(server: &TestServer, url: &str) -> (u16, String, String) {
    let mut res = awc::Client::default().get(server.http(url)).timeout(WAIT).send().await.expect("download");
    let ctype = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = res.body().limit(64 << 20).await.expect("body");
    (res.status().as_u16(), ctype, String::from_utf8(body.to_vec()).expect("utf-8"))
}

#[actix_rt::test]
async fn a_tenants_rows_export_to_csv_and_json_lines_and_download_through_the_signed_link() {
    let server = TestServer::start();
    let (job, inserted) = import(&server, 5000).await;
    let (kinds, done) = export(&server, json!({"format": "csv"})).await;
    assert_eq!(kinds.first(), Some(&EventType::Status), "{kinds:?}");
    assert!(kinds.contains(&EventType::ExportStarted) && kinds.contains(&EventType::ProcessingCompleted), "{kinds:?}");
    assert!(kinds.contains(&EventType::ExportProgress), "5000 rows are more than one page: {kinds:?}");
    assert_eq!(done["rows"].as_u64(), Some(inserted));
    let url = done["download_url"].as_str().expect("download_url").to_string();
    assert!(url.starts_with("/api/v1/downloads/"), "{url}");
    let (status, ctype, csv) = fetch(&server, &url).await;
    assert_eq!((status, ctype.as_str()), (200, "text/csv; charset=utf-8"));
    assert_eq!(done["bytes"].as_u64(), Some(csv.len() as u64));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "date,amount,description,category,job_id,line");
    assert_eq!(lines.len() as u64, inserted + 1);
    assert!(lines[1..].iter().all(|l| l.contains(&job.to_string())), "every row names its import");
    // A cell a spreadsheet would run as a formula is written inert.
    assert!(csv.contains("'=HYPERLINK("), "the formula cells are there, neutralised");
    assert!(!csv.contains(",=") && !csv.contains(",\"="), "no cell starts a formula");

    // Filtered, as JSON lines: the rows of the first five days, the same ones the CSV holds.
    let in_range = lines[1..].iter().filter(|l| ("2024-01-01".."2024-01-06").contains(&&l[..10])).count();
    let filters = json!({"from": "2024-01-01", "to": "2024-01-05", "job_id": job.to_string()});
    let (_, done) = export(&server, json!({"format": "jsonl", "filters": filters})).await;
    assert_eq!(done["rows"].as_u64(), Some(in_range as u64));
    let (status, ctype, jsonl) = fetch(&server, done["download_url"].as_str().expect("url")).await;
    assert_eq!((status, ctype.as_str()), (200, "application/x-ndjson"));
    let rows: Vec<Value> = jsonl.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(rows.len(), in_range);
    assert!(rows.iter().all(|r| r["date"].as_str().is_some_and(|d| ("2024-01-01"..="2024-01-05").contains(&d))));
    assert!(rows.iter().all(|r| r["amount_cents"].is_i64() && r["description"].is_string()));

    // Another tenant sees neither the export job nor its rows.
    let (status, _) = server
        .request(
            "GET",
            &format!("/api/v1/jobs/{}", done["job_id"].as_str().expect("id")),
            Some(&server.token("m", "globex", &[])),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (_, theirs) = {
        let mut watcher = server.connect_as("mallory", "globex").await;
        let id = uuid::Uuid::new_v4();
        watcher.subscribe(&format!("job:{id}")).await;
        let body = json!({"format": "csv", "id": id.to_string()});
        let (status, _) =
            server.request("POST", "/api/v1/exports", Some(&server.token("mallory", "globex", &[])), Some(body)).await;
        assert_eq!(status, 202);
        loop {
            if let Event::ExportCompleted(c) = watcher.recv().await.event {
                break ((), c);
            }
        }
    };
    assert_eq!(theirs.rows, 0, "globex has no rows of acme's");
}

#[actix_rt::test]
async fn a_download_link_altered_or_expired_is_refused_and_the_file_goes_after_retention() {
    let server = TestServer::with(|c| c.retention_s = 2);
    import(&server, 100).await;
    let (_, done) = export(&server, json!({"format": "csv"})).await;
    let url = done["download_url"].as_str().expect("url").to_string();
    let job: uuid::Uuid = done["job_id"].as_str().and_then(|s| s.parse().ok()).expect("job_id");
    // One byte changed anywhere in the token: refused.
    let (head, token) = url.rsplit_once('/').expect("token");
    for at in [10, token.len() / 2, token.len() - 2] {
        let mut altered = token.as_bytes().to_vec();
        altered[at] = if altered[at] == b'A' { b'B' } else { b'A' };
        let altered = format!("{head}/{}", String::from_utf8(altered).expect("ascii"));
        assert_eq!(fetch(&server, &altered).await.0, 401, "{altered}");
    }
    // Expired: refused. An access token is no download token either.
    let past = jobcast::unix_now() - 10;
    let expired = server.shared.auth.mint_download("acme", job, "export.csv", past).expect("mint");
    assert_eq!(fetch(&server, &format!("/api/v1/downloads/{expired}")).await.0, 401);
    let access = server.token("alice", "acme", &[]);
    assert_eq!(fetch(&server, &format!("/api/v1/downloads/{access}")).await.0, 401);
    // A link naming another tenant than the job's: as if there were no file.
    let crossed = server.shared.auth.mint_download("globex", job, "export.csv", past + 3600).expect("mint");
    assert_eq!(fetch(&server, &format!("/api/v1/downloads/{crossed}")).await.0, 404);
    // The snapshot carries a fresh link.
    let (_, snapshot) = server.request("GET", &format!("/api/v1/jobs/{job}"), Some(&access), None).await;
    let fresh = snapshot["results"]["download_url"].as_str().expect("download_url").to_string();
    assert_eq!(fetch(&server, &fresh).await.0, 200);
    // After retention_s the file is removed.
    let deadline = std::time::Instant::now() + WAIT;
    while fetch(&server, &fresh).await.0 != 404 {
        assert!(std::time::Instant::now() < deadline, "the file outlived retention_s");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn a_bad_export_request_is_refused_with_a_reason() {
    let server = TestServer::start();
    let token = server.token("alice", "acme", &[]);
    for body in [
        json!({"format": "xml"}),
        json!({}),
        json!({"format": "csv", "filters": {"from": "2024-13-01"}}),
        json!({"format": "csv", "filters": {"from": "2024-02-01", "to": "2024-01-01"}}),
        json!({"format": "csv", "filters": {"job_id": "nope"}}),
        json!({"format": "csv", "filters": {"colour": "red"}}),
        json!({"format": "csv", "id": "not-a-uuid"}),
    ] {
        let (status, answer) = server.request("POST", "/api/v1/exports", Some(&token), Some(body.clone())).await;
        assert_eq!(status, 400, "{body} → {answer}");
        assert!(answer["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(server.request("POST", "/api/v1/exports", None, Some(json!({"format": "csv"}))).await.0, 401);
    // An id in use (by a job of any tenant) is refused.
    let (job, _) = import(&server, 10).await;
    let body = json!({"format": "csv", "id": job.to_string()});
    assert_eq!(server.request("POST", "/api/v1/exports", Some(&token), Some(body)).await.0, 409);
}

#[actix_rt::test]
async fn an_export_cancelled_mid_run_stops_and_leaves_no_file() {
    let server = TestServer::start();
    import(&server, 50_000).await;
    let token = server.token("alice", "acme", &[]);
    let id = uuid::Uuid::new_v4();
    let mut watcher = server.connect_as("alice", "acme").await;
    watcher.subscribe(&format!("job:{id}")).await;
    let body = json!({"format": "csv", "id": id.to_string()});
    assert_eq!(server.request("POST", "/api/v1/exports", Some(&token), Some(body)).await.0, 202);
    while watcher.recv().await.event.kind() != EventType::ExportStarted {}
    // 50,000 rows are 25 pages: the cancel arrives while they are being written.
    let (status, answer) = server.request("POST", &format!("/api/v1/jobs/{id}/cancel"), Some(&token), None).await;
    assert_eq!(status, 202, "{answer}");
    let mut kinds = Vec::new();
    loop {
        let env = watcher.recv().await;
        kinds.push(env.event.kind());
        if let Event::Status(s) = &env.event {
            if s.status.is_terminal() {
                assert_eq!(s.status.as_str(), "cancelled", "{kinds:?}");
                break;
            }
        }
    }
    assert!(kinds.contains(&EventType::JobCancelled) && !kinds.contains(&EventType::ExportCompleted), "{kinds:?}");
    let dir = server.data_dir.path().join("downloads").join(id.to_string());
    let left: Vec<_> =
        std::fs::read_dir(&dir).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "nothing of the cancelled export is kept: {left:?}");
    let (_, snapshot) = server.request("GET", &format!("/api/v1/jobs/{id}"), Some(&token), None).await;
    assert_eq!(snapshot["status"], "cancelled");
    // Cancelling it again: it is not running.
    assert_eq!(server.request("POST", &format!("/api/v1/jobs/{id}/cancel"), Some(&token), None).await.0, 409);
}
