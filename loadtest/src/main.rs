//! `jobcast-loadtest`: the load-test harness. The scenarios (fanout, jobs, storm, idle, ack) are built
//! by the load-test issue; this binary exists so the workspace and its protocol types are wired.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "jobcast-loadtest {}: no scenarios yet (protocol v{})",
        env!("CARGO_PKG_VERSION"),
        jobcast::protocol::PROTOCOL_VERSION
    );
    ExitCode::from(2)
}
