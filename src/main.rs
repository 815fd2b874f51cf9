//! The `jobcast` binary: parses the command line and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jobcast::{Config, Settings};

#[derive(Parser)]
#[command(
    name = "jobcast",
    version,
    about = "Runs document jobs zone by zone and streams their progress over WebSocket"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// TOML configuration file.
        #[arg(long, env = "JOBCAST_CONFIG")]
        config: Option<PathBuf>,
        /// Also serve `GET /ws/echo`, an unauthenticated WebSocket echo through `/ws`'s frame
        /// handling, for protocol conformance suites (Autobahn). Loopback binds only: with any other
        /// `bind` the server refuses to start (exit code 2).
        #[arg(long)]
        conformance_echo: bool,
        #[command(flatten)]
        settings: Settings,
    },
    /// Upload a CSV file and watch its import live, resuming if the connection drops.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// The server's base URL.
        #[arg(long, env = "JOBCAST_SERVER", default_value = "http://127.0.0.1:8080")]
        server: String,
        /// An access JWT; without one, a development token is minted from the local secret.
        #[arg(long, env = "JOBCAST_TOKEN")]
        token: Option<String>,
        /// TOML configuration file (for the local secret).
        #[arg(long, env = "JOBCAST_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
    /// Print an access JWT signed with the configured secret (development and tests).
    Token {
        /// The user id (`sub`).
        #[arg(long)]
        user: String,
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// `admin` or `publisher`; repeat for both.
        #[arg(long = "role", value_parser = ["admin", "publisher"])]
        roles: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// TOML configuration file.
        #[arg(long, env = "JOBCAST_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, conformance_echo, settings } => serve(settings, config, conformance_echo),
        Command::Token { user, tenant, roles, ttl, config, settings } => {
            token(settings, config, &user, &tenant, &roles, ttl)
        }
        Command::Import { file, server, token, config, settings } => import(&file, &server, token, settings, config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Refused>() => {
            eprintln!("jobcast: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("jobcast: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyError = Box<dyn std::error::Error>;

/// A start refused because of how it was asked for (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

fn auth_for(config: &Config) -> Result<jobcast::Auth, AnyError> {
    let secret = match &config.jwt_secret {
        Some(s) => s.clone(),
        None => jobcast::load_or_create_secret(&config.data_dir)?.secret,
    };
    Ok(jobcast::Auth::new(config, &secret)?)
}

fn token(
    settings: Settings,
    file: Option<PathBuf>,
    user: &str,
    tenant: &str,
    roles: &[String],
    ttl: u64,
) -> Result<(), AnyError> {
    for (what, id) in [("--user", user), ("--tenant", tenant)] {
        if !jobcast::protocol::valid_id(id) {
            return Err(format!("{what} {id:?}: an id is 1 to 128 characters of A-Z a-z 0-9 - _ . @").into());
        }
    }
    let config = Config::load(settings, file.as_deref())?;
    println!("{}", auth_for(&config)?.mint_access(user, tenant, roles, ttl)?);
    Ok(())
}

fn import(
    file: &std::path::Path,
    server: &str,
    token: Option<String>,
    settings: Settings,
    config: Option<PathBuf>,
) -> Result<(), AnyError> {
    let token = match token {
        Some(t) => t,
        None => {
            let config = Config::load(settings, config.as_deref())?;
            auth_for(&config)?.mint_access("cli", "default", &[], 86_400)?
        }
    };
    let outcome = actix_rt::System::new().block_on(jobcast::run_import(file, server, &token))?;
    match outcome {
        jobcast::ImportOutcome::Completed(_) => Ok(()),
        jobcast::ImportOutcome::Failed(e) => Err(format!("the import failed: {e}").into()),
        jobcast::ImportOutcome::Cancelled => Err("the import was cancelled".into()),
    }
}

fn serve(settings: Settings, file: Option<PathBuf>, conformance_echo: bool) -> Result<(), AnyError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("JOBCAST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A closed stderr must not turn a log line into a panic (it would stop the shutdown task).
        .log_internal_errors(false)
        .init();
    let mut config = Config::load(settings, file.as_deref())?;
    config.conformance_echo = conformance_echo;
    if conformance_echo && !config.binds_loopback() {
        return Err(Box::new(Refused(format!(
            "--conformance-echo serves /ws/echo without authentication: it needs a loopback bind \
             (127.0.0.0/8, ::1 or localhost), not bind {}",
            config.bind
        ))));
    }
    let listener = jobcast::listen(&config.bind).map_err(|e| format!("cannot listen on {}: {e}", config.bind))?;
    // The development admin token is printed only on a first start on loopback: the secret was
    // generated just now (so no one configured one), and only this machine can reach the server.
    let generated = match (&config.jwt_secret, &config.jwt_public_key) {
        (None, None) => jobcast::load_or_create_secret(&config.data_dir)?.created,
        _ => false,
    };
    let loopback = listener.local_addr().map(|a| a.ip().is_loopback()).unwrap_or(false);
    let dev_token = (generated && loopback)
        .then(|| auth_for(&config).ok())
        .flatten()
        .and_then(|a| a.mint_access("dev-admin", "default", &["admin".into(), "publisher".into()], 86_400).ok());
    let signs = config.jwt_public_key.is_none();
    actix_rt::System::new().block_on(async move {
        let signal = shutdown_signal()?;
        let running = jobcast::start(listener, config).await.map_err(|e| match e {
            e @ jobcast::StartError::EchoNotLoopback(_) => Box::new(Refused(e.to_string())) as AnyError,
            e => e.into(),
        })?;
        let addr = running.addr;
        // The banner goes to stdout; a closed stdout must not stop the server (no println! panic).
        let say = |line: String| {
            use std::io::Write;
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        };
        say(format!("jobcast listening on http://{addr}"));
        match &dev_token {
            Some(t) => say(format!("demo page: http://{addr}/?token={t}")),
            None => say(format!("demo page: http://{addr}/")),
        }
        match dev_token {
            Some(t) => say(format!("development admin token (24 h, tenant \"default\"): {t}")),
            None if signs => say("mint a token: jobcast token --user ID --tenant ID [--role admin]".into()),
            None => say("verifying with a public key: mint tokens with your identity provider".into()),
        }
        let shutdown = running.shutdown.clone();
        actix_rt::spawn(async move {
            signal.await;
            shutdown.shutdown().await;
        });
        running.wait().await?;
        Ok::<(), AnyError>(())
    })
}

/// Listens for SIGTERM and SIGINT from the moment it is called (so a signal sent right after the
/// banner is not missed); the returned future ends at the first one.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
