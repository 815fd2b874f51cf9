//! Identity: access JWT verification, single-use WebSocket tokens, and the room tenancy rules.
//!
//! Access tokens are verified with exactly one algorithm: HS256 with the secret, or RS256/ES256 with
//! the configured PEM public key. WebSocket tokens are minted by jobcast itself, always HS256 with a key
//! derived from the secret (so they work in public-key mode too), carry `typ: "ws"` and a `jti`, and
//! are accepted once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::protocol::RoomKind;

/// The claims jobcast reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Tenant id (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// `admin` and/or `publisher`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Not before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// `ws` on WebSocket tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    /// Unique id of a WebSocket token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// On WebSocket tokens: the `exp` of the access token that minted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cred_exp: Option<u64>,
    /// On WebSocket tokens: the run of the server that minted it (random per start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// On job tokens (`typ: "job"`): the one job they may report, complete or fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// On download tokens (`typ: "download"`): the job's file they let anyone holding them read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// What a download token (contract §8) names: one file of one job of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadClaim {
    /// The job.
    pub job_id: uuid::Uuid,
    /// Its tenant.
    pub tenant: String,
    /// The file's name among the job's files (`[A-Za-z0-9._-]`).
    pub file: String,
}

/// What a job token (contract §7) authorizes: reporting, completing and failing one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobClaim {
    /// The job.
    pub job_id: uuid::Uuid,
    /// Who created the job.
    pub user_id: String,
    /// Its tenant.
    pub tenant: String,
}

/// How long a job token lasts at most; it ends with its job before that.
pub const JOB_TOKEN_TTL_S: u64 = 30 * 86_400;

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// The `sub` claim.
    pub user_id: String,
    /// The `tenant` claim.
    pub tenant: String,
    /// Holds the `admin` role.
    pub admin: bool,
    /// Holds the `publisher` role.
    pub publisher: bool,
    /// When the credential ends (Unix seconds): the access token's `exp`.
    pub expires_at: u64,
}

/// A WebSocket token checked but not spent yet (cluster mode spends it in Redis).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unspent {
    /// The token's id.
    pub jti: String,
    /// Its expiry (Unix seconds).
    pub exp: u64,
    /// The generation it was minted in.
    pub run: String,
}

/// Why a token was refused; `reason()` is what `auth_failure` and the metrics carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token was given")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's signature does not verify")]
    InvalidSignature,
    #[error("the token's algorithm is not the configured one")]
    UnsupportedAlgorithm,
    #[error("the token's audience is not accepted")]
    InvalidAudience,
    #[error("the token's issuer is not accepted")]
    InvalidIssuer,
    #[error("the token has no tenant claim")]
    MissingTenant,
    #[error("the token's sub or tenant is not 1 to 128 characters of A-Z a-z 0-9 - _ . @")]
    InvalidIdentity,
    #[error("the WebSocket token was already used")]
    Reused,
    #[error("the WebSocket token was minted before this server started and may have been used; get a new one")]
    MintedBeforeStart,
    #[error("the token is malformed")]
    Malformed,
    #[error("a WebSocket token cannot be used here")]
    WebSocketTokenNotAccepted,
    #[error("authentication timed out")]
    Timeout,
    #[error("the WebSocket token cannot be checked now (the cluster's Redis does not answer); try again")]
    Unavailable,
}

impl AuthError {
    /// Stable machine-readable reason.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::InvalidSignature => "invalid_signature",
            AuthError::UnsupportedAlgorithm => "unsupported_algorithm",
            AuthError::InvalidAudience => "invalid_audience",
            AuthError::InvalidIssuer => "invalid_issuer",
            AuthError::MissingTenant => "missing_tenant",
            AuthError::InvalidIdentity => "invalid_identity",
            AuthError::Reused | AuthError::MintedBeforeStart => "token_reused",
            AuthError::Malformed => "malformed_token",
            AuthError::WebSocketTokenNotAccepted => "websocket_token_not_accepted",
            AuthError::Timeout => "timeout",
            AuthError::Unavailable => "unavailable",
        }
    }

    fn from_jwt(e: &jsonwebtoken::errors::Error) -> AuthError {
        match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::InvalidSignature,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::UnsupportedAlgorithm,
            ErrorKind::InvalidAudience => AuthError::InvalidAudience,
            ErrorKind::InvalidIssuer => AuthError::InvalidIssuer,
            ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => AuthError::InvalidAudience,
            ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => AuthError::InvalidIssuer,
            _ => AuthError::Malformed,
        }
    }
}

/// Why the identity setup failed at start.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is neither an RSA nor an EC public key in PEM form")]
    BadPem { path: String },
    #[error("cannot keep the generated secret in {path}: {source}")]
    Secret { path: String, source: std::io::Error },
    #[error("this server verifies with a public key and cannot sign access tokens")]
    CannotSign,
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Verifies and mints tokens. One per server, shared behind an `Arc`.
pub struct Auth {
    /// The one algorithm access tokens must use.
    access_alg: Algorithm,
    access_key: DecodingKey,
    access_validation: Validation,
    /// Present in HS256 mode: signs development access tokens.
    access_signer: Option<EncodingKey>,
    ws_signer: EncodingKey,
    ws_key: DecodingKey,
    ws_validation: Validation,
    ws_ttl_s: u64,
    /// Used WebSocket token ids, so each works once.
    used: Mutex<UsedTokens>,
    /// This run of the server (random per start): WebSocket tokens of another run are refused, since
    /// the ids they may have used before a restart are not known any more. (In cluster mode tokens
    /// carry the cluster's generation in Redis instead, shared by every node, so a token is refused
    /// only after Redis lost the used ids.)
    run: String,
}

/// Used WebSocket token ids, pruned in expiry order: each prune removes only what has expired,
/// however many are remembered.
#[derive(Default)]
struct UsedTokens {
    ids: HashSet<String>,
    by_expiry: BinaryHeap<Reverse<(u64, String)>>,
}

impl UsedTokens {
    /// Remembers `jti` until `exp`; false when it was already used.
    fn spend(&mut self, jti: &str, exp: u64, now: u64) -> bool {
        while let Some(Reverse((e, _))) = self.by_expiry.peek() {
            // A token is refused once expired anyway; a minute covers clock steps.
            if *e + 60 >= now {
                break;
            }
            if let Some(Reverse((_, id))) = self.by_expiry.pop() {
                self.ids.remove(&id);
            }
        }
        if !self.ids.insert(jti.to_string()) {
            return false;
        }
        self.by_expiry.push(Reverse((exp, jti.to_string())));
        true
    }
}

impl Identity {
    /// The tenancy rule, for rooms and jobs alike: a tenant's things are its members', and admins'.
    pub fn may_access(&self, tenant: &str) -> bool {
        self.admin || self.tenant == tenant
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The HS256 secret kept in the data directory.
#[derive(Debug, Clone)]
pub struct KeptSecret {
    /// The secret.
    pub secret: String,
    /// Whether this call generated it (the first start on this data directory).
    pub created: bool,
}

/// Reads `<data_dir>/jwt_secret`, or generates and writes it (0600) on first use. A symlink there is
/// refused (another file's content must not become the signing key); an existing file is made 0600.
pub fn load_or_create_secret(data_dir: &Path) -> Result<KeptSecret, KeyError> {
    let path = data_dir.join("jwt_secret");
    let err = |source| KeyError::Secret { path: path.display().to_string(), source };
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(err(std::io::Error::other("is a symbolic link; jobcast keeps its secret in a plain file")))
        }
        Ok(meta) if !meta.is_file() => return Err(err(std::io::Error::other("is not a regular file"))),
        Ok(_) => {
            let s = std::fs::read_to_string(&path).map_err(err)?;
            if !s.trim().is_empty() {
                crate::files::private_file(&path).map_err(err)?;
                return Ok(KeptSecret { secret: s.trim().to_string(), created: false });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    crate::files::private_dir(data_dir).map_err(err)?;
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    use std::io::Write;
    let mut opts = crate::files::private_options();
    opts.write(true).create(true).truncate(true);
    opts.open(&path).and_then(|mut f| f.write_all(secret.as_bytes())).map_err(err)?;
    Ok(KeptSecret { secret, created: true })
}

impl Auth {
    /// Builds the verifier from the configuration; `secret` is the HS256 secret (configured or kept).
    pub fn new(config: &Config, secret: &str) -> Result<Auth, KeyError> {
        let (access_alg, access_key, access_signer) = match &config.jwt_public_key {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
                if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    (Algorithm::RS256, key, None)
                } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    (Algorithm::ES256, key, None)
                } else {
                    return Err(KeyError::BadPem { path: path.display().to_string() });
                }
            }
            None => (
                Algorithm::HS256,
                DecodingKey::from_secret(secret.as_bytes()),
                Some(EncodingKey::from_secret(secret.as_bytes())),
            ),
        };
        let mut access_validation = Validation::new(access_alg);
        access_validation.leeway = config.jwt_leeway_s;
        access_validation.validate_nbf = true;
        // A configured audience or issuer must be present in the token, not only right when present.
        let mut required = vec!["exp", "sub"];
        required.extend(config.jwt_audience.as_ref().map(|_| "aud"));
        required.extend(config.jwt_issuer.as_ref().map(|_| "iss"));
        access_validation.set_required_spec_claims(&required);
        match &config.jwt_audience {
            Some(aud) => access_validation.set_audience(&[aud]),
            None => access_validation.validate_aud = false,
        }
        if let Some(iss) = &config.jwt_issuer {
            access_validation.set_issuer(&[iss]);
        }
        let ws_secret = format!("jobcast-websocket-token:{secret}");
        let mut ws_validation = Validation::new(Algorithm::HS256);
        ws_validation.leeway = 0;
        ws_validation.validate_aud = false;
        ws_validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Auth {
            access_alg,
            access_key,
            access_validation,
            access_signer,
            ws_signer: EncodingKey::from_secret(ws_secret.as_bytes()),
            ws_key: DecodingKey::from_secret(ws_secret.as_bytes()),
            ws_validation,
            ws_ttl_s: config.ws_token_ttl_s,
            used: Mutex::new(UsedTokens::default()),
            run: uuid::Uuid::new_v4().simple().to_string(),
        })
    }

    /// The algorithm access tokens must use.
    pub fn algorithm(&self) -> Algorithm {
        self.access_alg
    }

    /// Verifies an access JWT (HTTP `Authorization`, `refresh`). WebSocket tokens are refused here.
    pub fn verify_access(&self, token: &str) -> Result<Identity, AuthError> {
        let header_alg = peek_alg(token)?;
        if header_alg != algorithm_name(self.access_alg) {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.access_key, &self.access_validation)
            .map_err(|e| AuthError::from_jwt(&e))?;
        if data.claims.typ.as_deref() == Some("ws") {
            return Err(AuthError::WebSocketTokenNotAccepted);
        }
        identity(&data.claims, data.claims.exp)
    }

    /// Verifies what a WebSocket connection presents: a single-use WebSocket token or an access JWT.
    pub fn verify_connect(&self, token: &str) -> Result<Identity, AuthError> {
        let (id, spend) = self.check_connect(token, false)?;
        if let Some(u) = spend {
            self.spend(&u.jti, u.exp)?;
        }
        Ok(id)
    }

    /// Cluster mode: verifies like [`Auth::verify_connect`] but leaves the single use of a WebSocket
    /// token to the caller, which spends its id cluster-wide (`SET NX` in Redis): answers the identity
    /// and, for a WebSocket token, its id and expiry. Tokens of any node's run are accepted (Redis
    /// remembers used ids across restarts).
    pub fn verify_connect_unspent(&self, token: &str) -> Result<(Identity, Option<Unspent>), AuthError> {
        self.check_connect(token, true)
    }

    /// The run new WebSocket tokens of this node carry (cluster mode mints in the cluster's generation
    /// instead, [`Auth::mint_ws_token_in`]).
    pub fn run(&self) -> String {
        self.run.clone()
    }

    fn check_connect(&self, token: &str, cluster: bool) -> Result<(Identity, Option<Unspent>), AuthError> {
        let header_alg = peek_alg(token)?;
        if header_alg == "HS256" {
            match jsonwebtoken::decode::<Claims>(token, &self.ws_key, &self.ws_validation) {
                Ok(data) if data.claims.typ.as_deref() == Some("ws") => {
                    let c = data.claims;
                    let id = identity(&c, c.cred_exp.unwrap_or(c.exp))?;
                    if !cluster && c.run.as_deref() != Some(self.run().as_str()) {
                        return Err(AuthError::MintedBeforeStart);
                    }
                    let jti = c.jti.ok_or(AuthError::Malformed)?;
                    return Ok((id, Some(Unspent { jti, exp: c.exp, run: c.run.unwrap_or_default() })));
                }
                Ok(_) => return Err(AuthError::Malformed),
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {}
                // Signed with the WebSocket key (the signature is checked first), but refused.
                Err(e) => return Err(AuthError::from_jwt(&e)),
            }
        }
        Ok((self.verify_access(token)?, None))
    }

    /// Marks a WebSocket token id as used; refuses one already used.
    fn spend(&self, jti: &str, exp: u64) -> Result<(), AuthError> {
        let mut used = self.used.lock().map_err(|_| AuthError::Reused)?;
        if !used.spend(jti, exp, unix_now()) {
            return Err(AuthError::Reused);
        }
        Ok(())
    }

    /// Mints a single-use WebSocket token for `id`; returns it with its lifetime in seconds.
    pub fn mint_ws_token(&self, id: &Identity) -> Result<(String, u64), KeyError> {
        self.mint_ws_token_in(id, &self.run())
    }

    /// Cluster mode: mints a WebSocket token of the cluster's `generation` (as just read from Redis).
    pub fn mint_ws_token_in(&self, id: &Identity, generation: &str) -> Result<(String, u64), KeyError> {
        let now = unix_now();
        let exp = (now + self.ws_ttl_s).min(id.expires_at);
        let claims = Claims {
            sub: id.user_id.clone(),
            tenant: Some(id.tenant.clone()),
            exp,
            roles: roles_of(id),
            nbf: None,
            iat: Some(now),
            typ: Some("ws".into()),
            jti: Some(uuid::Uuid::new_v4().to_string()),
            cred_exp: Some(id.expires_at),
            run: Some(generation.to_string()),
            job: None,
            file: None,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.ws_signer)?;
        Ok((token, exp.saturating_sub(now)))
    }

    /// Mints an access JWT (HS256 mode only): for `jobcast token`, the development admin token and tests.
    pub fn mint_access(&self, user: &str, tenant: &str, roles: &[String], ttl_s: u64) -> Result<String, KeyError> {
        let signer = self.access_signer.as_ref().ok_or(KeyError::CannotSign)?;
        let now = unix_now();
        let claims = Claims {
            sub: user.into(),
            tenant: Some(tenant.into()),
            exp: now + ttl_s,
            roles: roles.to_vec(),
            nbf: None,
            iat: Some(now),
            typ: None,
            jti: None,
            cred_exp: None,
            run: None,
            job: None,
            file: None,
        };
        Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, signer)?)
    }

    /// Mints the job token of a job `id` created (with `POST /api/v1/jobs`): HS256 with the key
    /// WebSocket tokens use (so it works in public-key mode too), `typ: "job"`, good for
    /// [`JOB_TOKEN_TTL_S`] at most. It is refused wherever an access token or a WebSocket token is
    /// asked for.
    pub fn mint_job_token(&self, id: &Identity, job: uuid::Uuid) -> Result<String, KeyError> {
        let now = unix_now();
        let claims = Claims {
            sub: id.user_id.clone(),
            tenant: Some(id.tenant.clone()),
            exp: now + JOB_TOKEN_TTL_S,
            roles: Vec::new(),
            nbf: None,
            iat: Some(now),
            typ: Some("job".into()),
            jti: None,
            cred_exp: None,
            run: None,
            job: Some(job.to_string()),
            file: None,
        };
        Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.ws_signer)?)
    }

    /// Mints the token of a download link: HS256 with the WebSocket-token key, `typ: "download"`,
    /// for `file` of `job` of `tenant`, good until `exp` (Unix seconds). It is refused anywhere else.
    pub fn mint_download(&self, tenant: &str, job: uuid::Uuid, file: &str, exp: u64) -> Result<String, KeyError> {
        let claims = Claims {
            sub: format!("download:{job}"),
            tenant: Some(tenant.to_string()),
            exp,
            roles: Vec::new(),
            nbf: None,
            iat: Some(unix_now()),
            typ: Some("download".into()),
            jti: None,
            cred_exp: None,
            run: None,
            job: Some(job.to_string()),
            file: Some(file.to_string()),
        };
        Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.ws_signer)?)
    }

    /// Verifies a download token (a link altered in any byte, or expired, is refused).
    pub fn verify_download(&self, token: &str) -> Result<DownloadClaim, AuthError> {
        if peek_alg(token)? != "HS256" {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.ws_key, &self.ws_validation)
            .map_err(|e| AuthError::from_jwt(&e))?;
        let c = data.claims;
        if c.typ.as_deref() != Some("download") {
            return Err(AuthError::Malformed);
        }
        let job_id = c.job.as_deref().and_then(|j| uuid::Uuid::parse_str(j).ok()).ok_or(AuthError::Malformed)?;
        let tenant = c.tenant.filter(|t| !t.is_empty()).ok_or(AuthError::Malformed)?;
        let file = c
            .file
            .filter(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
            .filter(|f| !f.starts_with('.'))
            .ok_or(AuthError::Malformed)?;
        Ok(DownloadClaim { job_id, tenant, file })
    }

    /// Verifies a job token; answers the job it is for.
    pub fn verify_job(&self, token: &str) -> Result<JobClaim, AuthError> {
        if peek_alg(token)? != "HS256" {
            return Err(AuthError::UnsupportedAlgorithm);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.ws_key, &self.ws_validation)
            .map_err(|e| AuthError::from_jwt(&e))?;
        let c = data.claims;
        if c.typ.as_deref() != Some("job") {
            return Err(AuthError::Malformed);
        }
        let id = identity(&c, c.exp)?;
        let job_id = c.job.as_deref().and_then(|j| uuid::Uuid::parse_str(j).ok()).ok_or(AuthError::Malformed)?;
        Ok(JobClaim { job_id, user_id: id.user_id, tenant: id.tenant })
    }
}

fn roles_of(id: &Identity) -> Vec<String> {
    let mut roles = Vec::new();
    if id.admin {
        roles.push("admin".to_string());
    }
    if id.publisher {
        roles.push("publisher".to_string());
    }
    roles
}

fn identity(c: &Claims, expires_at: u64) -> Result<Identity, AuthError> {
    if expires_at > crate::protocol::MAX_RFC3339_S {
        return Err(AuthError::Malformed);
    }
    let tenant = c.tenant.clone().filter(|t| !t.is_empty()).ok_or(AuthError::MissingTenant)?;
    if c.sub.is_empty() {
        return Err(AuthError::Malformed);
    }
    if !crate::protocol::valid_id(&c.sub) || !crate::protocol::valid_id(&tenant) {
        return Err(AuthError::InvalidIdentity);
    }
    Ok(Identity {
        user_id: c.sub.clone(),
        tenant,
        admin: c.roles.iter().any(|r| r == "admin"),
        publisher: c.roles.iter().any(|r| r == "publisher"),
        expires_at,
    })
}

fn algorithm_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        _ => "unsupported",
    }
}

/// Reads the `alg` of a token's header without trusting anything else in it.
fn peek_alg(token: &str) -> Result<String, AuthError> {
    let header = token.split('.').next().ok_or(AuthError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    match v.get("alg").and_then(|a| a.as_str()) {
        Some(alg) => Ok(alg.to_string()),
        None => Err(AuthError::Malformed),
    }
}

/// Why a subscription to a room was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomRefusal {
    /// Not a room name jobcast knows, or a job that does not exist.
    Unknown,
    /// A room of another tenant or another user.
    Forbidden,
}

/// Whether `id` may join `room`; for a job room, `job_tenant` is the job's tenant (`None`: no such
/// job). The tenancy rule itself is [`Identity::may_access`].
pub fn authorize_room(id: &Identity, room: &RoomKind, job_tenant: Option<&str>) -> Result<(), RoomRefusal> {
    let allowed = match room {
        RoomKind::User(u) => id.admin || *u == id.user_id,
        RoomKind::Tenant(t) => id.may_access(t),
        RoomKind::Job(_) => id.may_access(job_tenant.ok_or(RoomRefusal::Unknown)?),
    };
    if allowed {
        Ok(())
    } else {
        Err(RoomRefusal::Forbidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&Config::default(), "test-secret").unwrap()
    }

    #[test]
    fn access_token_round_trip() {
        let a = auth();
        let t = a.mint_access("u1", "t1", &["admin".into()], 60).unwrap();
        let id = a.verify_access(&t).unwrap();
        assert_eq!(id.user_id, "u1");
        assert_eq!(id.tenant, "t1");
        assert!(id.admin && !id.publisher);
    }

    #[test]
    fn websocket_tokens_work_once_and_not_as_access_tokens() {
        let a = auth();
        let access = a.verify_access(&a.mint_access("u1", "t1", &[], 600).unwrap()).unwrap();
        let (ws, ttl) = a.mint_ws_token(&access).unwrap();
        assert!(ttl <= 300 && ttl > 290);
        assert_eq!(a.verify_access(&ws), Err(AuthError::InvalidSignature));
        let id = a.verify_connect(&ws).unwrap();
        assert_eq!(id.expires_at, access.expires_at, "lives as long as the access token");
        assert_eq!(a.verify_connect(&ws), Err(AuthError::Reused));
    }

    #[test]
    fn used_token_ids_are_pruned_in_expiry_order_and_only_once_expired() {
        let mut used = UsedTokens::default();
        for i in 0..10_000u64 {
            assert!(used.spend(&format!("t{i}"), 1_000 + i, 1_000));
        }
        assert!(!used.spend("t5", 2_000, 1_000), "a used id is refused while remembered");
        // At 1_000 + 5_060, the ids that expired more than a minute ago are gone, no others.
        assert!(used.spend("fresh", 9_000, 6_060));
        assert_eq!(used.ids.len(), 10_000 - 4_999);
        assert!(!used.spend("t5000", 9_000, 6_060), "an id within its lifetime is still refused");
        assert!(used.spend("t10", 9_000, 6_060), "an expired id was forgotten");
    }

    #[test]
    fn websocket_tokens_of_an_earlier_run_are_refused() {
        let a = auth();
        let access = a.verify_access(&a.mint_access("u1", "t1", &[], 600).unwrap()).unwrap();
        let (ws, _) = a.mint_ws_token(&access).unwrap();
        let later = auth();
        assert_eq!(later.verify_connect(&ws), Err(AuthError::MintedBeforeStart));
        assert_eq!(AuthError::MintedBeforeStart.reason(), "token_reused");
        assert!(a.verify_connect(&ws).is_ok());
    }

    #[test]
    fn garbage_is_malformed() {
        assert_eq!(auth().verify_connect("abc"), Err(AuthError::Malformed));
        assert_eq!(auth().verify_connect(""), Err(AuthError::Malformed));
    }

    #[test]
    fn tenancy_rules() {
        let id = Identity { user_id: "u1".into(), tenant: "t1".into(), admin: false, publisher: false, expires_at: 0 };
        let room = |name: &str| RoomKind::parse(name).unwrap();
        assert!(authorize_room(&id, &room("tenant:t1"), None).is_ok());
        assert_eq!(authorize_room(&id, &room("tenant:t2"), None), Err(RoomRefusal::Forbidden));
        assert!(authorize_room(&id, &room("user:u1"), None).is_ok());
        assert_eq!(authorize_room(&id, &room("user:u2"), None), Err(RoomRefusal::Forbidden));
        let job = room(&format!("job:{}", uuid::Uuid::new_v4()));
        assert_eq!(authorize_room(&id, &job, None), Err(RoomRefusal::Unknown));
        assert!(authorize_room(&id, &job, Some("t1")).is_ok());
        assert_eq!(authorize_room(&id, &job, Some("t2")), Err(RoomRefusal::Forbidden));
        let admin = Identity { admin: true, ..id };
        assert!(authorize_room(&admin, &room("tenant:t2"), None).is_ok());
        assert!(authorize_room(&admin, &job, Some("t2")).is_ok());
        assert!(admin.may_access("anyone") && !Identity { admin: false, ..admin.clone() }.may_access("t2"));
    }
}
