//! The server under test: started by the harness (default) or a running one, plus its /proc figures
//! and a minimal keep-alive HTTP/1.1 client for publishing and admin calls.

use std::path::PathBuf;
use std::process::Stdio;

use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Which server to test.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// A running server (`http://127.0.0.1:PORT`); by default the harness starts its own.
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// The running server's HS256 secret, to mint tokens.
    #[arg(long, global = true)]
    pub secret: Option<String>,
    /// The running server's pid, for memory and CPU figures.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// The binary to start when no `--server` is given.
    #[arg(long, global = true, default_value = "target/release/jobcast")]
    pub binary: PathBuf,
    /// Start the server(s) in cluster mode on this Redis (`redis://127.0.0.1:PORT`), under a key
    /// prefix of this run's own (deleted at the end).
    #[arg(long, global = true)]
    pub redis: Option<String>,
    /// With `--redis`: how many nodes. With 2, clients connect to the second and events are published
    /// through the first, so every delivery crosses nodes.
    #[arg(long, global = true, default_value_t = 1)]
    pub nodes: usize,
    /// An extra argument for the server(s) the harness starts (repeatable), e.g.
    /// `--server-arg=--progress-max-rate-per-s=0`.
    #[arg(long = "server-arg", global = true, allow_hyphen_values = true)]
    pub server_args: Vec<String>,
}

/// A server the harness talks to.
pub struct Server {
    /// `127.0.0.1:PORT`: where clients connect.
    pub addr: String,
    /// Where events are published (another node with `--nodes 2`).
    pub publish_addr: String,
    /// Mints tokens with the server's secret.
    pub auth: jobcast::Auth,
    /// For /proc figures.
    pub pid: Option<u32>,
    child: Option<tokio::process::Child>,
    dir: Option<PathBuf>,
    /// With `--nodes 2`: the publishing node.
    peer: Option<tokio::process::Child>,
    /// `--redis` and the run's key prefix.
    cluster: Option<(String, String)>,
}

/// Starts one node; answers it and where it listens.
async fn spawn(
    t: &Target,
    secret: &str,
    dir: &std::path::Path,
    cluster: Option<&(String, String)>,
) -> Result<(tokio::process::Child, String), String> {
    let mut cmd = tokio::process::Command::new(&t.binary);
    cmd.args(["serve", "--bind", "127.0.0.1:0", "--store", "memory", "--jwt-secret", secret])
        .arg("--data-dir")
        .arg(dir)
        .args(["--max-connections", "200000", "--max-connections-per-user", "200000"])
        .args(["--history-size", "20000", "--max-queued-messages", "20000", "--max-upload-bytes", "1000000000"])
        .args(["--max-upload-bytes-per-tenant", "100000000000", "--max-queued-jobs-per-tenant", "100000"])
        // The harness's webhook receiver is on 127.0.0.1.
        .args(["--webhook-private-allow", "127.0.0.1"])
        .args(&t.server_args);
    if let Some((url, prefix)) = cluster {
        cmd.args(["--redis-url", url, "--cluster-prefix", prefix]);
    }
    let mut child = cmd
        .env("JOBCAST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {} (build it with cargo build --release): {e}", t.binary.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                if let Some(a) = line.strip_prefix("jobcast listening on http://") {
                    break a.to_string();
                }
            }
            _ => return Err("the server exited before listening".into()),
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

/// Figures read from /proc/<pid>.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcFigures {
    /// Resident memory now, KiB.
    pub rss_kib: u64,
    /// Peak resident memory, KiB.
    pub peak_kib: u64,
    /// User + system CPU seconds.
    pub cpu_s: f64,
}

impl Server {
    /// Starts the server (or adopts the running one).
    pub async fn start(t: &Target) -> Result<Server, String> {
        if let Some(url) = &t.server {
            let addr = url.trim_start_matches("http://").trim_end_matches('/').to_string();
            if !addr.starts_with("127.") && !addr.starts_with("localhost") {
                return Err("the harness only talks to 127.0.0.1".into());
            }
            let secret = t.secret.clone().ok_or("--secret is needed with --server")?;
            return Ok(Server {
                publish_addr: addr.clone(),
                addr,
                auth: auth(&secret)?,
                pid: t.server_pid,
                child: None,
                dir: None,
                peer: None,
                cluster: None,
            });
        }
        let secret = format!("loadtest-{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("jobcast-loadtest-{}", std::process::id()));
        let cluster = t.redis.clone().map(|url| (url, format!("loadtest-{}", std::process::id())));
        if cluster.as_ref().is_some_and(|(url, _)| !url.starts_with("redis://127.")) {
            return Err("the harness only talks to 127.0.0.1 (--redis redis://127.0.0.1:PORT)".into());
        }
        let (peer, publish_addr) = match (&cluster, t.nodes) {
            (Some(_), 2) => {
                let (child, addr) = spawn(t, &secret, &dir.join("a"), cluster.as_ref()).await?;
                (Some(child), Some(addr))
            }
            (_, 1) => (None, None),
            _ => return Err("--nodes 2 needs --redis".into()),
        };
        let (child, addr) = spawn(t, &secret, &dir.join("b"), cluster.as_ref()).await?;
        let pid = child.id();
        Ok(Server {
            publish_addr: publish_addr.unwrap_or_else(|| addr.clone()),
            addr,
            auth: auth(&secret)?,
            pid,
            child: Some(child),
            dir: Some(dir),
            peer,
            cluster,
        })
    }

    /// Stops a server the harness started (and deletes its cluster keys).
    pub async fn stop(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
        if let Some(mut c) = self.peer.take() {
            let _ = c.kill().await;
        }
        if let Some((url, prefix)) = self.cluster.take() {
            let keys = tokio::process::Command::new("redis-cli")
                .args(["-u", &url, "--scan", "--pattern", &format!("{prefix}:*")])
                .output()
                .await;
            if let Ok(out) = keys {
                let keys: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
                for chunk in keys.chunks(500) {
                    let _ =
                        tokio::process::Command::new("redis-cli").args(["-u", &url, "DEL"]).args(chunk).output().await;
                }
            }
        }
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    /// An access token.
    pub fn token(&self, user: &str, tenant: &str, roles: &[&str]) -> String {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        self.auth.mint_access(user, tenant, &roles, 7200).unwrap_or_default()
    }

    /// Memory and CPU of the server, when its pid is known.
    pub fn figures(&self) -> Option<ProcFigures> {
        let pid = self.pid?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = |key: &str| {
            status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): utime is the 14th field overall.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf only reads a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some(ProcFigures {
            rss_kib: kib("VmRSS:")?,
            peak_kib: kib("VmHWM:")?,
            cpu_s: (ticks(11) + ticks(12)) / hz.max(1.0),
        })
    }
}

fn auth(secret: &str) -> Result<jobcast::Auth, String> {
    let config = jobcast::Config { jwt_secret: Some(secret.into()), ..jobcast::Config::default() };
    jobcast::Auth::new(&config, secret).map_err(|e| e.to_string())
}

/// A keep-alive HTTP/1.1 connection for JSON requests.
pub struct Http {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Http {
    /// Opens a connection.
    pub async fn connect(addr: &str) -> Result<Http, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(Http { stream: BufReader::new(stream), host: addr.to_string() })
    }

    /// Sends a request and reads the answer: status and body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
        s.write_all(body).await.map_err(|e| e.to_string())?;
        let mut status = 0u16;
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
                return Err("the server closed the connection".into());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(rest) = l.strip_prefix("HTTP/1.1 ") {
                status = rest.get(..3).and_then(|s| s.parse().ok()).unwrap_or(0);
            } else if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut out = vec![0u8; length];
        self.stream.read_exact(&mut out).await.map_err(|e| e.to_string())?;
        Ok((status, out))
    }

    /// A JSON request.
    pub async fn json(
        &mut self,
        method: &str,
        path: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value), String> {
        let (status, bytes) =
            self.request(method, path, token, "application/json", body.to_string().as_bytes()).await?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)))
    }
}
