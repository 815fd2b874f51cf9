//! The jobs layer: the scheduler, one actor per job and its zone actor, the progress arithmetic, the
//! CSV pipeline, and job access for callers.
//!
//! - `scheduler.rs`: the `Scheduler` actor, the run queue (`max_concurrent_jobs`), cancels.
//! - `job.rs`: the `Job` actor, one job's state machine, progress, ETA and snapshot.
//! - `zone.rs`: the `Zone` actor, a job's zones on `spawn_blocking`, stored through the row store.
//! - `external.rs`: the `External` actor, one job that runs elsewhere: its worker's reports turned
//!   into progress, steps and terminal events; cancel requests; stalls.
//! - `export.rs`: the `Export` actor, one export job: a tenant's rows, filtered, to a CSV or JSON
//!   lines file page by page, and its signed download link.
//! - `downloads.rs`: the `Retention` actor, which removes job files older than `retention_s`.
//! - `progress.rs`, `csv.rs`: plain logic, no actor: stage bands, ETA, coalescing; CSV validation,
//!   scanning, parsing, categorization.
//! - `lookup.rs`: finding, reserving, listing and cancelling jobs under the tenancy rule, for the
//!   WebSocket session and the HTTP API.
//!
//! This layer uses the top-level modules, `db` and the realtime broker (everything a job says is a
//! `Publish` to the broker); it never uses a session. Inside it dependencies point one way:
//! `lookup` → `scheduler` → `job` | `external` | `export` → `zone` → `csv`; the job tells the scheduler
//! it finished through a `Recipient<Finished>`, an external job through a `Recipient<ExternalEnded>`,
//! an export through a `Recipient<ExportEnded>`.

pub mod csv;
pub mod downloads;
pub mod export;
pub mod external;
pub mod job;
pub mod lookup;
pub mod progress;
pub mod scheduler;
pub mod webhooks;
pub mod zone;
