//! Configuration: one [`Config`], built once from flags, `JOBCAST_*` environment variables and an
//! optional TOML file (flag beats env beats file beats default), then passed down. No other module
//! reads the environment.

use std::path::{Path, PathBuf};

use serde::Deserialize;

macro_rules! settings {
    (
        required { $( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr, $env:literal; )* }
        optional { $( $(#[doc = $odoc:literal])* $oname:ident : $oty:ty, $oenv:literal; )* }
    ) => {
        /// Every setting as it may arrive from one layer (flags+env through clap, or the TOML file).
        #[derive(clap::Args, Deserialize, Default, Debug, Clone)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $( $(#[doc = $doc])* #[arg(long, env = $env)] pub $name: Option<$ty>, )*
            $( $(#[doc = $odoc])* #[arg(long, env = $oenv)] pub $oname: Option<$oty>, )*
        }

        /// The resolved configuration every part of jobcast reads.
        #[derive(Debug, Clone)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $name: $ty, )*
            $( $(#[doc = $odoc])* pub $oname: Option<$oty>, )*
            /// `serve --conformance-echo`: routes `/ws/echo` (loopback binds only). A command-line
            /// switch for protocol test suites, not a setting of files or the environment.
            pub conformance_echo: bool,
        }

        impl Settings {
            /// Fills every setting missing here from `lower`.
            pub fn or(self, lower: Settings) -> Settings {
                Settings {
                    $( $name: self.$name.or(lower.$name), )*
                    $( $oname: self.$oname.or(lower.$oname), )*
                }
            }

            /// Applies the defaults.
            pub fn resolve(self) -> Config {
                Config {
                    $( $name: self.$name.unwrap_or_else(|| $default), )*
                    $( $oname: self.$oname, )*
                    conformance_echo: false,
                }
            }
        }
    };
}

settings! {
    required {
        /// Listen address.
        bind: String = "127.0.0.1:8080".into(), "JOBCAST_BIND";
        /// Where the SQLite store and the generated secret live.
        data_dir: PathBuf = PathBuf::from("./jobcast-data"), "JOBCAST_DATA_DIR";
        /// `sqlite` or `memory`.
        store: String = "sqlite".into(), "JOBCAST_STORE";
        /// Clock skew allowed on exp/nbf, seconds.
        jwt_leeway_s: u64 = 30, "JOBCAST_JWT_LEEWAY_S";
        /// Lifetime of single-use WebSocket tokens, seconds.
        ws_token_ttl_s: u64 = 300, "JOBCAST_WS_TOKEN_TTL_S";
        /// Time to send `authenticate` when no token was in the URL, seconds.
        auth_timeout_s: u64 = 10, "JOBCAST_AUTH_TIMEOUT_S";
        /// Server ping interval, seconds.
        heartbeat_interval_s: u64 = 30, "JOBCAST_HEARTBEAT_INTERVAL_S";
        /// Silence after which a connection is closed with 4008, seconds.
        client_timeout_s: u64 = 90, "JOBCAST_CLIENT_TIMEOUT_S";
        /// Connections per node.
        max_connections: usize = 10_000, "JOBCAST_MAX_CONNECTIONS";
        /// Connections per user.
        max_connections_per_user: usize = 5, "JOBCAST_MAX_CONNECTIONS_PER_USER";
        /// Connections opened without a token that have not authenticated yet.
        max_unauthenticated_connections: usize = 1000, "JOBCAST_MAX_UNAUTHENTICATED_CONNECTIONS";
        /// Connections from one IP address (not counted for `trusted_addresses`).
        max_connections_per_ip: usize = 500, "JOBCAST_MAX_CONNECTIONS_PER_IP";
        /// Comma list of IP addresses `max_connections_per_ip` does not apply to (loopback, a
        /// reverse proxy in front of jobcast); empty for none.
        trusted_addresses: String = "127.0.0.1,::1".into(), "JOBCAST_TRUSTED_ADDRESSES";
        /// Job ids one tenant may hold reserved (subscribed to before any upload) at once.
        max_reservations_per_tenant: usize = 1000, "JOBCAST_MAX_RESERVATIONS_PER_TENANT";
        /// A reservation no one renewed (subscribed again) and no one is subscribed to is released
        /// after this many seconds.
        reservation_ttl_s: u64 = 3600, "JOBCAST_RESERVATION_TTL_S";
        /// Room subscriptions per connection.
        max_subscriptions_per_connection: usize = 100, "JOBCAST_MAX_SUBSCRIPTIONS_PER_CONNECTION";
        /// Larger client messages close the connection with 1009.
        max_inbound_message_bytes: usize = 4096, "JOBCAST_MAX_INBOUND_MESSAGE_BYTES";
        /// Client-to-server messages per second (token bucket rate).
        inbound_rate_per_s: u32 = 10, "JOBCAST_INBOUND_RATE_PER_S";
        /// Client-to-server burst (token bucket size).
        inbound_burst: u32 = 20, "JOBCAST_INBOUND_BURST";
        /// Above this many JSON bytes, `format=auto` messages go as gzip(msgpack) binary.
        compress_threshold_bytes: usize = 1024, "JOBCAST_COMPRESS_THRESHOLD_BYTES";
        /// Events kept per room.
        history_size: usize = 1000, "JOBCAST_HISTORY_SIZE";
        /// Seconds an event is kept in a room's history.
        history_ttl_s: u64 = 86_400, "JOBCAST_HISTORY_TTL_S";
        /// Acknowledgement timeout before a redelivery, milliseconds.
        ack_timeout_ms: u64 = 2000, "JOBCAST_ACK_TIMEOUT_MS";
        /// Deliveries of one event before the connection is closed with 4008.
        max_delivery_attempts: u32 = 3, "JOBCAST_MAX_DELIVERY_ATTEMPTS";
        /// Messages waiting for one connection before it counts as a slow consumer.
        max_queued_messages: usize = 1000, "JOBCAST_MAX_QUEUED_MESSAGES";
        /// Bytes waiting for one connection before it counts as a slow consumer.
        max_queued_bytes: usize = 16 << 20, "JOBCAST_MAX_QUEUED_BYTES";
        /// `processing_progress` events per job per second.
        progress_max_rate_per_s: u32 = 4, "JOBCAST_PROGRESS_MAX_RATE_PER_S";
        /// Largest upload, bytes.
        max_upload_bytes: u64 = 52_428_800, "JOBCAST_MAX_UPLOAD_BYTES";
        /// Longest an upload's body may take to arrive, seconds (then 408).
        upload_timeout_s: u64 = 600, "JOBCAST_UPLOAD_TIMEOUT_S";
        /// Per tenant: uploads being received plus jobs queued or running (then 429).
        max_queued_jobs_per_tenant: usize = 100, "JOBCAST_MAX_QUEUED_JOBS_PER_TENANT";
        /// Per tenant: bytes of uploads held at once, being received or waiting for their jobs to
        /// run (then 429).
        max_upload_bytes_per_tenant: u64 = 1 << 30, "JOBCAST_MAX_UPLOAD_BYTES_PER_TENANT";
        /// Per tenant: imported rows kept (an upload beyond is 429; a job reaching it fails).
        max_stored_rows_per_tenant: u64 = 100_000_000, "JOBCAST_MAX_STORED_ROWS_PER_TENANT";
        /// Free bytes that must remain on the data directory's file system after an upload (then 507).
        min_free_disk_bytes: u64 = 256 << 20, "JOBCAST_MIN_FREE_DISK_BYTES";
        /// Cluster mode: prefix of every Redis key of this cluster (`[A-Za-z0-9_-]`, 1 to 64).
        cluster_prefix: String = "jobcast".into(), "JOBCAST_CLUSTER_PREFIX";
        /// Cluster mode with `database_url`: seconds a node's lease on a job it runs lasts; renewed
        /// every third of it, and another node takes over a job whose lease expired.
        job_lease_s: u64 = 30, "JOBCAST_JOB_LEASE_S";
        /// Jobs that run elsewhere: seconds without a report before `job_stalled` (counted from the
        /// job's creation until its first report); as long again, and the job fails `recoverable`.
        job_stall_timeout_s: u64 = 120, "JOBCAST_JOB_STALL_TIMEOUT_S";
        /// Jobs that run elsewhere: seconds a worker has, after a cancel, to end the job itself
        /// before it is `cancelled` anyway.
        job_cancel_grace_s: u64 = 30, "JOBCAST_JOB_CANCEL_GRACE_S";
        /// Webhooks: the wait before the second attempt of a message, doubling after each failure.
        webhook_backoff_initial_ms: u64 = 1000, "JOBCAST_WEBHOOK_BACKOFF_INITIAL_MS";
        /// Webhooks: the longest wait between two attempts.
        webhook_backoff_max_s: u64 = 600, "JOBCAST_WEBHOOK_BACKOFF_MAX_S";
        /// Webhooks: comma list of private addresses (loopback, RFC 1918, link-local, unique-local,
        /// CGNAT) that webhook URLs may resolve to, or `*` for any; empty: none, so a webhook cannot
        /// be aimed at the server's own network.
        webhook_private_allow: String = String::new(), "JOBCAST_WEBHOOK_PRIVATE_ALLOW";
        /// Webhooks: attempts of one message at most (then it is given up, and logged so).
        webhook_max_attempts: u32 = 8, "JOBCAST_WEBHOOK_MAX_ATTEMPTS";
        /// Seconds a download link (`/api/v1/downloads/{token}`) works after it was made.
        download_ttl_s: u64 = 3600, "JOBCAST_DOWNLOAD_TTL_S";
        /// Seconds a job's downloadable file (an export) is kept; then it is removed.
        retention_s: u64 = 604_800, "JOBCAST_RETENTION_S";
        /// Rows per zone for CSV imports.
        zone_rows: usize = 1000, "JOBCAST_ZONE_ROWS";
        /// Jobs running at once; others wait as `queued`.
        max_concurrent_jobs: usize =
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2), "JOBCAST_MAX_CONCURRENT_JOBS";
    }
    optional {
        /// Redis URL: cluster mode, where nodes share rooms, `seq`, history and WebSocket tokens
        /// (needs `jwt_secret`, the same on every node).
        redis_url: String, "JOBCAST_REDIS_URL";
        /// PostgreSQL URL (needs `redis_url`): jobs, snapshots, uploads and rows shared by every
        /// node, in the schema named `cluster_prefix`, so any node serves and takes over any job.
        database_url: String, "JOBCAST_DATABASE_URL";
        /// HS256 secret (generated and kept in data_dir when unset).
        jwt_secret: String, "JOBCAST_JWT_SECRET";
        /// PEM public key file; switches verification to RS256/ES256.
        jwt_public_key: PathBuf, "JOBCAST_JWT_PUBLIC_KEY";
        /// Required `aud` when set.
        jwt_audience: String, "JOBCAST_JWT_AUDIENCE";
        /// Required `iss` when set.
        jwt_issuer: String, "JOBCAST_JWT_ISSUER";
        /// Comma list of allowed Origins (exact match); any Origin when unset.
        allowed_origins: String, "JOBCAST_ALLOWED_ORIGINS";
        /// TOML file of categorization rules (`category = ["keyword", ...]`); built-in rules when unset.
        rules_file: PathBuf, "JOBCAST_RULES_FILE";
    }
}

impl Default for Config {
    fn default() -> Self {
        Settings::default().resolve()
    }
}

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl Config {
    /// Builds the configuration from clap's layer (flags over env) and an optional TOML file.
    pub fn load(cli: Settings, file: Option<&Path>) -> Result<Config, ConfigError> {
        let from_file = match file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?
            }
            None => Settings::default(),
        };
        let config = cli.or(from_file).resolve();
        config.validate()?;
        Ok(config)
    }

    /// Checks the values that have a narrower range than their type.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| Err(ConfigError::Invalid { key, message: message.into() });
        if !matches!(self.store.as_str(), "sqlite" | "memory") {
            return invalid("store", "must be sqlite or memory");
        }
        if self.heartbeat_interval_s == 0 {
            return invalid("heartbeat_interval_s", "must be at least 1");
        }
        if self.client_timeout_s < self.heartbeat_interval_s {
            return invalid("client_timeout_s", "must be at least heartbeat_interval_s");
        }
        if self.inbound_burst == 0 {
            return invalid("inbound_burst", "must be at least 1");
        }
        self.trusted()?;
        if self.upload_timeout_s == 0 {
            return invalid("upload_timeout_s", "must be at least 1");
        }
        if self.max_queued_messages == 0 {
            return invalid("max_queued_messages", "must be at least 1");
        }
        if self.max_queued_jobs_per_tenant == 0 {
            return invalid("max_queued_jobs_per_tenant", "must be at least 1 (0 would refuse every upload)");
        }
        if self.max_upload_bytes_per_tenant < self.max_upload_bytes {
            return invalid(
                "max_upload_bytes_per_tenant",
                "must be at least max_upload_bytes (a largest upload would always be refused)",
            );
        }
        let prefix_ok = |p: &str| {
            (1..=64).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !prefix_ok(&self.cluster_prefix) {
            return invalid("cluster_prefix", "must be 1 to 64 characters of A-Z a-z 0-9 - _");
        }
        if self.redis_url.is_some() && self.jwt_secret.is_none() {
            return invalid(
                "redis_url",
                "cluster mode needs jwt_secret, the same on every node (WebSocket tokens minted by one node are used on another)",
            );
        }
        if self.database_url.is_some() && self.redis_url.is_none() {
            return invalid(
                "database_url",
                "needs redis_url: nodes sharing jobs also share their rooms, tokens and cancels through Redis",
            );
        }
        if !(1..=604_800).contains(&self.job_stall_timeout_s) {
            return invalid("job_stall_timeout_s", "must be 1 to 604800 seconds");
        }
        if !(1..=86_400).contains(&self.job_cancel_grace_s) {
            return invalid("job_cancel_grace_s", "must be 1 to 86400 seconds");
        }
        if !(1..=3_600_000).contains(&self.webhook_backoff_initial_ms) {
            return invalid("webhook_backoff_initial_ms", "must be 1 to 3600000 milliseconds");
        }
        if !(1..=86_400).contains(&self.webhook_backoff_max_s) {
            return invalid("webhook_backoff_max_s", "must be 1 to 86400 seconds");
        }
        if let Err(e) = PrivateAllow::parse(&self.webhook_private_allow) {
            return Err(ConfigError::Invalid { key: "webhook_private_allow", message: e });
        }
        if !(1..=100).contains(&self.webhook_max_attempts) {
            return invalid("webhook_max_attempts", "must be 1 to 100");
        }
        if !(1..=31 * 86_400).contains(&self.download_ttl_s) {
            return invalid("download_ttl_s", "must be 1 to 2678400 seconds");
        }
        if !(1..=366 * 86_400).contains(&self.retention_s) {
            return invalid("retention_s", "must be 1 to 31622400 seconds");
        }
        if !(3..=86_400).contains(&self.job_lease_s) {
            return invalid("job_lease_s", "must be 3 to 86400 seconds");
        }
        Ok(())
    }

    /// Whether `bind` names only this machine: an address in 127.0.0.0/8, `::1`, or `localhost`
    /// (what `--conformance-echo` requires).
    pub fn binds_loopback(&self) -> bool {
        let host = match self.bind.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            _ => return false,
        };
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        host.eq_ignore_ascii_case("localhost")
            || match host.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback(),
                Ok(std::net::IpAddr::V6(ip)) => ip == std::net::Ipv6Addr::LOCALHOST,
                Err(_) => false,
            }
    }

    /// `trusted_addresses`, parsed.
    pub fn trusted(&self) -> Result<Vec<std::net::IpAddr>, ConfigError> {
        self.trusted_addresses
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse().map_err(|_| ConfigError::Invalid {
                    key: "trusted_addresses",
                    message: format!("{s:?} is not an IP address"),
                })
            })
            .collect()
    }

    /// The allowed Origins, parsed from the comma list; `None` means any Origin.
    pub fn origins(&self) -> Option<Vec<String>> {
        self.allowed_origins
            .as_ref()
            .map(|list| list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        assert_eq!(c.bind, "127.0.0.1:8080");
        assert_eq!(c.max_connections_per_user, 5);
        assert_eq!(c.compress_threshold_bytes, 1024);
        assert_eq!(c.max_inbound_message_bytes, 4096);
        assert!(c.redis_url.is_none());
        assert!(c.origins().is_none());
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = std::env::temp_dir().join(format!("jobcast-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jobcast.toml");
        std::fs::write(&path, "history_size = 7\nbind = \"127.0.0.1:9\"\nallowed_origins = \"http://a, http://b\"\n")
            .unwrap();
        let cli = Settings { bind: Some("127.0.0.1:1".into()), ..Default::default() };
        let c = Config::load(cli, Some(&path)).unwrap();
        assert_eq!(c.bind, "127.0.0.1:1");
        assert_eq!(c.history_size, 7);
        assert_eq!(c.heartbeat_interval_s, 30);
        assert_eq!(c.origins().unwrap(), vec!["http://a".to_string(), "http://b".to_string()]);
        std::fs::write(&path, "no_such_key = 1\n").unwrap();
        assert!(matches!(Config::load(Settings::default(), Some(&path)), Err(ConfigError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nonsense_values_are_refused() {
        let cli = Settings { store: Some("mongo".into()), ..Default::default() };
        assert!(matches!(Config::load(cli, None), Err(ConfigError::Invalid { key: "store", .. })));
        let cli = Settings { redis_url: Some("redis://127.0.0.1:6379".into()), ..Default::default() };
        assert!(matches!(Config::load(cli, None), Err(ConfigError::Invalid { key: "redis_url", .. })), "no jwt_secret");
        let cli = Settings { max_queued_jobs_per_tenant: Some(0), ..Default::default() };
        assert!(matches!(Config::load(cli, None), Err(ConfigError::Invalid { key: "max_queued_jobs_per_tenant", .. })));
        let cli = Settings { max_upload_bytes_per_tenant: Some(1), ..Default::default() };
        assert!(matches!(
            Config::load(cli, None),
            Err(ConfigError::Invalid { key: "max_upload_bytes_per_tenant", .. })
        ));
        let cli = Settings { cluster_prefix: Some("a:b".into()), ..Default::default() };
        assert!(matches!(Config::load(cli, None), Err(ConfigError::Invalid { key: "cluster_prefix", .. })));
    }

    #[test]
    fn only_this_machine_counts_as_a_loopback_bind() {
        let binds = |bind: &str| Config { bind: bind.into(), ..Config::default() }.binds_loopback();
        for ok in ["127.0.0.1:0", "127.1.2.3:8080", "[::1]:9001", "localhost:80", "LOCALHOST:1"] {
            assert!(binds(ok), "{ok}");
        }
        for no in ["0.0.0.0:8080", "[::]:8080", "10.0.0.1:80", "example.com:80", "127.0.0.1", "[::ffff:127.0.0.1]:1"] {
            assert!(!binds(no), "{no}");
        }
    }
}

/// The private addresses webhooks may reach (`webhook_private_allow`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrivateAllow {
    any: bool,
    ips: Vec<std::net::IpAddr>,
}

impl PrivateAllow {
    /// `*`, or a comma list of IP addresses; empty for none.
    pub fn parse(text: &str) -> Result<PrivateAllow, String> {
        let mut allow = PrivateAllow::default();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "*" {
                allow.any = true;
            } else {
                allow.ips.push(item.parse().map_err(|_| format!("{item:?} is not an IP address (or *)"))?);
            }
        }
        Ok(allow)
    }

    /// Whether a webhook may reach `ip`.
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.any || self.ips.contains(&ip) || !is_private(ip)
    }
}

/// Whether `ip` is on a private network or this machine: loopback, RFC 1918, link-local,
/// unique-local, CGNAT (100.64/10), unspecified, broadcast; an IPv4-mapped IPv6 address as its IPv4.
pub fn is_private(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_private(IpAddr::V4(v4)),
            None => {
                let s = v6.segments()[0];
                v6.is_loopback() || v6.is_unspecified() || (s & 0xfe00) == 0xfc00 || (s & 0xffc0) == 0xfe80
            }
        },
    }
}
