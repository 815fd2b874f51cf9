//! Resumable uploads (contract §11, the tus 1.0 core protocol and its creation extension) against the
//! real server: a connection dropped mid-PATCH, the offset asked with HEAD, the rest appended, and the
//! finished upload run as a CSV job exactly like a multipart one; and every refusal with its status.

mod common;

use std::io::Write;

use base64::Engine;
use common::{generate_csv, TestServer, WAIT};
use jobcast::protocol::Event;

const TUS: (&str, &str) = ("Tus-Resumable", "1.0.0");

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A tus request; answers the status, the headers and the body.
async fn tus(
    server: &TestServer,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, awc::http::header::HeaderMap, String) {
    let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = awc::Client::default().request(method, server.http(path)).timeout(WAIT);
    if let Some(token) = bearer {
        req = req.insert_header(("Authorization", format!("Bearer {token}")));
    }
    for (k, v) in headers {
        req = req.insert_header((*k, v.clone()));
    }
    let mut res = req.send_body(body).await.expect("request");
    let body = res.body().await.map(|b| String::from_utf8_lossy(&b).to_string()).unwrap_or_default();
    (res.status().as_u16(), res.headers().clone(), body)
}

fn header(h: &awc::http::header::HeaderMap, name: &str) -> String {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// Creates an upload of `length` bytes; answers its path.
async fn create(server: &TestServer, token: &str, length: usize, metadata: &str) -> String {
    let headers =
        [(TUS.0, TUS.1.to_string()), ("Upload-Length", length.to_string()), ("Upload-Metadata", metadata.to_string())];
    let (status, h, body) = tus(server, "POST", "/api/v1/uploads/tus", Some(token), &headers, Vec::new()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(header(&h, "tus-resumable"), "1.0.0");
    assert!(!header(&h, "upload-expires").is_empty());
    let location = header(&h, "location");
    assert!(location.starts_with("/api/v1/uploads/tus/"), "{location}");
    location
}

async fn offset_of(server: &TestServer, token: &str, path: &str) -> (u16, u64) {
    let (status, h, _) = tus(server, "HEAD", path, Some(token), &[(TUS.0, TUS.1.into())], Vec::new()).await;
    (status, header(&h, "upload-offset").parse().unwrap_or(u64::MAX))
}

fn patch_headers(offset: u64) -> Vec<(&'static str, String)> {
    vec![
        (TUS.0, TUS.1.into()),
        ("Content-Type", "application/offset+octet-stream".into()),
        ("Upload-Offset", offset.to_string()),
    ]
}

#[actix_rt::test]
async fn a_resumable_upload_outlives_a_dropped_connection_and_becomes_a_job() {
    let server = TestServer::start();
    let token = server.token("alice", "acme", &[]);
    let csv = generate_csv(3000, "tus");
    let batch = uuid::Uuid::new_v4();
    let mut watcher = server.connect_as("alice", "acme").await;
    watcher.subscribe(&format!("job:{batch}")).await;
    let metadata = format!("filename {},batch_id {}", b64("statement.csv"), b64(&batch.to_string()));
    let path = create(&server, &token, csv.bytes.len(), &metadata).await;
    assert_eq!(offset_of(&server, &token, &path).await, (200, 0));

    // A PATCH whose connection drops after a third of the file: what arrived is kept.
    let third = csv.bytes.len() / 3;
    let mut raw = std::net::TcpStream::connect(server.addr).expect("connect");
    write!(
        raw,
        "PATCH {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\n\
         Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: {}\r\n\r\n",
        csv.bytes.len()
    )
    .expect("headers");
    raw.write_all(&csv.bytes[..third]).expect("a third");
    raw.flush().expect("flush");
    drop(raw);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, at) = offset_of(&server, &token, &path).await;
        assert_eq!(status, 200);
        if at == third as u64 {
            break;
        }
        assert!(at < third as u64, "more than was sent: {at}");
        assert!(std::time::Instant::now() < deadline, "the upload never held the {third} bytes sent (it holds {at})");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // A PATCH at the wrong offset changes nothing.
    let (status, _, body) = tus(&server, "PATCH", &path, Some(&token), &patch_headers(0), b"x".to_vec()).await;
    assert_eq!(status, 409, "{body}");
    // The rest, from where the upload is: it becomes the job.
    let rest = csv.bytes[third..].to_vec();
    let (status, h, body) = tus(&server, "PATCH", &path, Some(&token), &patch_headers(third as u64), rest).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(header(&h, "tus-resumable"), "1.0.0");
    assert_eq!(header(&h, "upload-offset"), csv.bytes.len().to_string());
    assert_eq!(header(&h, "jobcast-job-id"), batch.to_string());
    let results = loop {
        let env = watcher.recv().await;
        match env.event {
            Event::ProcessingCompleted(done) => break done.results,
            Event::ProcessingFailed(f) => panic!("the job failed: {}", f.error),
            _ => {}
        }
    };
    assert_eq!(results["processed_rows"], 3000);
    assert_eq!(results["inserted"].as_u64(), Some(csv.valid() - csv.duplicates));
    let (_, job) = server.request("GET", &format!("/api/v1/jobs/{batch}"), Some(&token), None).await;
    assert_eq!((job["filename"].as_str(), job["status"].as_str()), (Some("statement.csv"), Some("completed")));
    // A finished upload is gone: it is a job now.
    assert_eq!(offset_of(&server, &token, &path).await.0, 404);
}

#[actix_rt::test]
async fn tus_requests_are_authenticated_tenant_scoped_and_checked() {
    let server = TestServer::with(|c| c.max_upload_bytes = 10_000);
    let token = server.token("alice", "acme", &[]);
    let name = format!("filename {}", b64("a.csv"));
    let post = |len: usize, metadata: &str| {
        vec![(TUS.0, TUS.1.to_string()), ("Upload-Length", len.to_string()), ("Upload-Metadata", metadata.to_string())]
    };
    let url = "/api/v1/uploads/tus";
    // No token: 401, still in the protocol.
    let (status, h, _) = tus(&server, "POST", url, None, &post(10, &name), Vec::new()).await;
    assert_eq!((status, header(&h, "tus-resumable").as_str()), (401, "1.0.0"));
    // Another protocol version: 412.
    let v2 = vec![("Tus-Resumable", "2.0.0".to_string()), ("Upload-Length", "10".to_string())];
    assert_eq!(tus(&server, "POST", url, Some(&token), &v2, Vec::new()).await.0, 412);
    let none = vec![("Upload-Length", "10".to_string())];
    assert_eq!(tus(&server, "POST", url, Some(&token), &none, Vec::new()).await.0, 412);
    // Too large, no length, not a CSV, another kind, metadata that is not base64: refused up front.
    assert_eq!(tus(&server, "POST", url, Some(&token), &post(10_001, &name), Vec::new()).await.0, 413);
    let no_length = vec![(TUS.0, TUS.1.to_string())];
    assert_eq!(tus(&server, "POST", url, Some(&token), &no_length, Vec::new()).await.0, 400);
    let png = format!("filename {}", b64("a.png"));
    assert_eq!(tus(&server, "POST", url, Some(&token), &post(10, &png), Vec::new()).await.0, 415);
    let pdf = format!("{name},kind {}", b64("pdf_extract"));
    assert_eq!(tus(&server, "POST", url, Some(&token), &post(10, &pdf), Vec::new()).await.0, 415);
    assert_eq!(tus(&server, "POST", url, Some(&token), &post(10, "filename not*base64"), Vec::new()).await.0, 400);
    let (status, h, _) = tus(&server, "OPTIONS", url, Some(&token), &[], Vec::new()).await;
    assert_eq!((status, header(&h, "tus-version").as_str()), (204, "1.0.0"));
    assert_eq!(header(&h, "tus-max-size"), "10000");

    let body = b"date,amount,description\n2024-01-01,1.00,x\n".to_vec();
    let path = create(&server, &token, body.len(), &name).await;
    // Another tenant does not see it; a token of the same tenant does.
    let other = server.token("mallory", "globex", &[]);
    assert_eq!(offset_of(&server, &other, &path).await.0, 404);
    let (status, _, _) = tus(&server, "PATCH", &path, Some(&other), &patch_headers(0), body.clone()).await;
    assert_eq!(status, 404);
    // A PATCH of another content type, or past the length, changes nothing.
    let mut wrong_type = patch_headers(0);
    wrong_type[1].1 = "text/csv".into();
    assert_eq!(tus(&server, "PATCH", &path, Some(&token), &wrong_type, body.clone()).await.0, 415);
    let mut longer = body.clone();
    longer.extend_from_slice(b"2024-01-02,2.00,y\n");
    assert_eq!(tus(&server, "PATCH", &path, Some(&token), &patch_headers(0), longer).await.0, 413);
    let (status, at) = offset_of(&server, &token, &path).await;
    assert_eq!(status, 200);
    assert!(at < body.len() as u64, "a refused PATCH did not complete the upload");
    // DELETE gives the upload up.
    let delete = vec![(TUS.0, TUS.1.to_string())];
    assert_eq!(tus(&server, "DELETE", &path, Some(&token), &delete, Vec::new()).await.0, 204);
    assert_eq!(offset_of(&server, &token, &path).await.0, 404);
    // An unknown upload id, and one that is no id.
    assert_eq!(offset_of(&server, &token, &format!("{url}/{}", uuid::Uuid::new_v4())).await.0, 404);
    assert_eq!(offset_of(&server, &token, &format!("{url}/..%2Fetc")).await.0, 404);
}

#[actix_rt::test]
async fn an_upload_that_cannot_become_a_job_stays_whole_and_unfinished_ones_count_against_the_quota() {
    let server = TestServer::with(|c| {
        c.max_upload_bytes = 1000;
        c.max_upload_bytes_per_tenant = 1000;
    });
    let token = server.token("alice", "acme", &[]);
    let body = b"date,amount,description\n2024-01-01,1.00,x\n".to_vec();
    // A job holds this id already: the finished upload cannot become that job.
    let taken = uuid::Uuid::new_v4();
    let (status, _) = server.upload(&token, "a.csv", "text/csv", &body, Some(taken)).await;
    assert_eq!(status, 202);
    let metadata = format!("filename {},batch_id {}", b64("a.csv"), b64(&taken.to_string()));
    let path = create(&server, &token, body.len(), &metadata).await;
    let (status, _, answer) = tus(&server, "PATCH", &path, Some(&token), &patch_headers(0), body.clone()).await;
    assert_eq!(status, 409, "{answer}");
    // Nothing was lost: the upload is whole, and says so.
    assert_eq!(offset_of(&server, &token, &path).await, (200, body.len() as u64));
    let delete = vec![(TUS.0, TUS.1.to_string())];
    assert_eq!(tus(&server, "DELETE", &path, Some(&token), &delete, Vec::new()).await.0, 204);
    // Unfinished uploads hold their length of the tenant's 1000 bytes.
    let name = format!("filename {}", b64("b.csv"));
    create(&server, &token, 600, &name).await;
    let headers = vec![(TUS.0, TUS.1.to_string()), ("Upload-Length", "600".to_string()), ("Upload-Metadata", name)];
    let (status, _, answer) = tus(&server, "POST", "/api/v1/uploads/tus", Some(&token), &headers, Vec::new()).await;
    assert_eq!(status, 429, "{answer}");
}
