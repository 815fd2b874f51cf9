//! `jobcast-loadtest`: measures jobcast honestly on one machine.
//!
//! Scenarios: `fanout` (C connections over R rooms, P events/s of B bytes for D seconds), `ack`
//! (fanout with `ack=1`), `step` (fanout with P raised until p99 or loss gives), `storm` (every client
//! dropped at once, by the server or by the harness cutting its sockets, then resuming with fresh tokens
//! and `since`), `idle` (C connections
//! holding on heartbeats, for memory per connection), `jobs` (U concurrent CSV uploads of N rows,
//! each watched by W clients) and `reports` (workers reporting into J jobs that run elsewhere, each
//! watched by W clients).
//!
//! By default the harness starts `target/release/jobcast` itself (so it knows the server's pid for
//! memory and CPU figures); `--server`/`--secret`/`--server-pid` aim it at a running one instead.
//! Everything talks to 127.0.0.1 only, and every run is bounded in time and count.

mod client;
mod report;
mod server;

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "jobcast-loadtest", about = "Load tests for jobcast")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    target: server::Target,
}

#[derive(Subcommand)]
enum Scenario {
    /// C connections over R rooms; P events/s in total, B bytes each, for D seconds.
    Fanout(Fanout),
    /// `fanout` with acknowledged delivery (`ack=1`, cumulative acks every 64 events).
    Ack(Fanout),
    /// `fanout` with P raised step by step until p99 passes a bound or an event is lost.
    Step {
        #[command(flatten)]
        fanout: Fanout,
        /// The p99 bound, milliseconds.
        #[arg(long, default_value_t = 50.0)]
        p99_ms: f64,
        /// Multiply P by this each step.
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        /// At most this many steps.
        #[arg(long, default_value_t = 8)]
        steps: u32,
    },
    /// C clients dropped at once (by the server, or `--cut` by the harness), resuming with fresh
    /// tokens and `since`.
    Storm {
        /// Connections.
        #[arg(long, short = 'c', default_value_t = 1000)]
        connections: usize,
        /// Rooms.
        #[arg(long, short = 'r', default_value_t = 10)]
        rooms: usize,
        /// The harness cuts its own sockets (no close handshake) instead of an admin disconnect.
        #[arg(long)]
        cut: bool,
    },
    /// C connections holding on heartbeats only, for memory per connection.
    Idle {
        /// Connections.
        #[arg(long, short = 'c', default_value_t = 1000)]
        connections: usize,
        /// Seconds to hold them.
        #[arg(long, short = 'd', default_value_t = 5)]
        duration: u64,
    },
    /// J jobs that run elsewhere (`POST /api/v1/jobs`), each watched by W clients, reported into at
    /// P reports/s in total for D seconds through keep-alive connections, each with its job token.
    Reports {
        /// Jobs.
        #[arg(long, short = 'j', default_value_t = 100)]
        jobs: usize,
        /// Watchers per job.
        #[arg(long, short = 'w', default_value_t = 10)]
        watchers: usize,
        /// Reports per second in total.
        #[arg(long, short = 'p', default_value_t = 20_000.0)]
        rate: f64,
        /// Seconds of reporting.
        #[arg(long, short = 'd', default_value_t = 10)]
        duration: u64,
    },
    /// J jobs that run elsewhere completed at once; their tenant's webhook (a receiver in the harness)
    /// gets each `job.completed`: the outbox's delivery rate and latency.
    Webhooks {
        /// Jobs.
        #[arg(long, short = 'j', default_value_t = 2000)]
        jobs: usize,
    },
    /// U concurrent CSV uploads of N rows, each watched by W clients.
    Jobs {
        /// Concurrent uploads.
        #[arg(long, short = 'u', default_value_t = 4)]
        uploads: usize,
        /// Rows per file.
        #[arg(long, short = 'n', default_value_t = 100_000)]
        rows: usize,
        /// Watchers per job.
        #[arg(long, short = 'w', default_value_t = 5)]
        watchers: usize,
    },
}

/// The fanout shape.
#[derive(Args, Clone, Debug)]
pub struct Fanout {
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub connections: usize,
    /// Rooms (connections spread evenly).
    #[arg(long, short = 'r', default_value_t = 10)]
    pub rooms: usize,
    /// Use `job:<uuid>` rooms (joined before any job exists) fed by publisher events
    /// (`POST /api/v1/jobs/{id}/events`) instead of `tenant:` rooms fed by admin broadcasts.
    #[arg(long)]
    pub job_rooms: bool,
    /// Events per second published in total.
    #[arg(long, short = 'p', default_value_t = 100.0)]
    pub rate: f64,
    /// Payload bytes per event.
    #[arg(long, short = 'b', default_value_t = 256)]
    pub bytes: usize,
    /// Seconds of publishing.
    #[arg(long, short = 'd', default_value_t = 10)]
    pub duration: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    raise_fd_limit();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jobcast-loadtest: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let target = server::Server::start(&cli.target).await?;
        let out = match cli.scenario {
            Scenario::Fanout(f) => client::fanout(&target, &f, false).await,
            Scenario::Ack(f) => client::fanout(&target, &f, true).await,
            Scenario::Step { fanout, p99_ms, factor, steps } => {
                client::step(&target, &fanout, p99_ms, factor, steps).await
            }
            Scenario::Storm { connections, rooms, cut } => client::storm(&target, connections, rooms, cut).await,
            Scenario::Idle { connections, duration } => {
                client::idle(&target, connections, Duration::from_secs(duration)).await
            }
            Scenario::Jobs { uploads, rows, watchers } => client::jobs(&target, uploads, rows, watchers).await,
            Scenario::Webhooks { jobs } => client::webhooks(&target, jobs).await,
            Scenario::Reports { jobs, watchers, rate, duration } => {
                client::reports(&target, jobs, watchers, rate, Duration::from_secs(duration)).await
            }
        };
        target.stop().await;
        out
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jobcast-loadtest: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Raises the open-file limit to its hard maximum (10,000 connections need 10,000 descriptors).
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
