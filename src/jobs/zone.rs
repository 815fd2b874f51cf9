//! The zone actor: scans, parses, stores and categorizes the zones of one job's CSV file.
//!
//! Each job starts its own zone actor, which works on several zones at once: the CPU-heavy part of a
//! zone (reading, scanning, parsing, categorizing) runs on `spawn_blocking`, at most one per core
//! across all jobs (a shared semaphore), so no I/O arbiter ever waits on it; the zone's rows then go to
//! the row store, whose group commits take many zones at once. Rows read and not yet committed are
//! bounded across all jobs by [`ROWS_IN_FLIGHT`], and the file bytes they came from by
//! [`KIB_IN_FLIGHT`] (a zone itself is at most `csv::ZONE_BYTES`). A zone reports `zone_processing` when
//! its work starts and `zone_completed` once its rows are committed, straight to the broker, and its
//! numbers to the job actor, which alone computes progress. Zones are idempotent: a zone already
//! stored (before a restart) is not stored again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use tokio::sync::Semaphore;
use tracing::Instrument;
use uuid::Uuid;

use crate::db::row_store::StoreZone;
use crate::db::RowsAddr;
use crate::jobs::csv::{process_records, read_zone, Columns, Rules, ZoneStart, KEEP_PER_ZONE};
use crate::protocol::{Event, RoomKind, ZoneCompleted, ZoneProcessing, ZoneReport};
use crate::realtime::broker::{Broker, Publish};

/// Why a zone did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneError {
    /// It failed; the message says why.
    Failed(String),
    /// Cluster mode: the job's lease is another node's now (that node runs the job), so nothing of
    /// this zone was stored here and the job must stop here without a word.
    LeaseLost,
}

impl From<String> for ZoneError {
    fn from(message: String) -> Self {
        ZoneError::Failed(message)
    }
}

impl std::fmt::Display for ZoneError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ZoneError::Failed(message) => f.write_str(message),
            ZoneError::LeaseLost => f.write_str("another node took the job over"),
        }
    }
}

/// Process one zone; answers its report once its rows are committed, or `None` when the job was
/// stopped (`stop`) before the zone's work began.
#[derive(Message)]
#[rtype(result = "Result<Option<ZoneReport>, ZoneError>")]
pub struct ProcessZone {
    /// The job.
    pub job_id: Uuid,
    /// The job's tenant (rows are deduplicated per tenant).
    pub tenant: String,
    /// The uploaded file.
    pub path: Arc<PathBuf>,
    /// Where the required columns are.
    pub columns: Columns,
    /// The zone's index.
    pub index: u64,
    /// Where the zone starts.
    pub start: ZoneStart,
    /// Set when the job is cancelled or failed: zones not begun yet are skipped.
    pub stop: Arc<AtomicBool>,
}

/// What zone actors share.
#[derive(Clone)]
pub struct ZoneDeps {
    /// Where rows go.
    pub rows: RowsAddr,
    /// Categorization rules.
    pub rules: Arc<Rules>,
    /// Where events go.
    pub broker: Addr<Broker>,
    /// One permit per core: zones doing CPU work at once, across all jobs.
    pub cpu: Arc<Semaphore>,
    /// One permit per row, [`ROWS_IN_FLIGHT`] in all: rows read and not yet committed, across all jobs.
    pub rows_in_flight: Arc<Semaphore>,
    /// One permit per KiB of the file those rows were read from, [`KIB_IN_FLIGHT`] in all.
    pub kib_in_flight: Arc<Semaphore>,
}

/// Rows that may be parsed and waiting for the row store at once, across all jobs: this bounds the
/// memory of imports (some 16 MB at about 250 bytes a parsed row) however many run, and is enough for
/// large group commits.
pub const ROWS_IN_FLIGHT: usize = 64 * 1024;

/// KiB of file that may be read into zones not yet committed, across all jobs (64 MiB): with rows
/// of up to `csv::MAX_RECORD_BYTES`, the row count alone would not bound memory.
pub const KIB_IN_FLIGHT: usize = 64 * 1024;

impl ZoneDeps {
    /// Zone dependencies with one CPU permit per `cores`.
    pub fn new(rows: RowsAddr, rules: Arc<Rules>, broker: Addr<Broker>, cores: usize) -> Self {
        ZoneDeps {
            rows,
            rules,
            broker,
            cpu: Arc::new(Semaphore::new(cores)),
            rows_in_flight: Arc::new(Semaphore::new(ROWS_IN_FLIGHT)),
            kib_in_flight: Arc::new(Semaphore::new(KIB_IN_FLIGHT)),
        }
    }
}

/// The zone actor.
pub struct Zone {
    deps: ZoneDeps,
}

impl Zone {
    /// A zone actor that stores through `deps.rows` and reports to `deps.broker`.
    pub fn new(deps: ZoneDeps) -> Self {
        Zone { deps }
    }
}

impl Actor for Zone {
    type Context = Context<Self>;
}

/// The id a zone goes by in events.
pub fn zone_id(job_id: Uuid, index: u64) -> String {
    format!("{job_id}:{index}")
}

impl Handler<ProcessZone> for Zone {
    type Result = ResponseFuture<Result<Option<ZoneReport>, ZoneError>>;

    fn handle(&mut self, m: ProcessZone, _: &mut Context<Self>) -> Self::Result {
        let span = tracing::info_span!("zone", job = %m.job_id, zone = m.index);
        Box::pin(process(self.deps.clone(), m).instrument(span))
    }
}

async fn process(deps: ZoneDeps, m: ProcessZone) -> Result<Option<ZoneReport>, ZoneError> {
    if m.stop.load(Ordering::Acquire) {
        return Ok(None);
    }
    let stopping = |_| "the server is stopping".to_string();
    // Held until the zone's rows are committed; a zone larger than the whole budget takes all of it.
    let budget = m.start.rows.min(ROWS_IN_FLIGHT as u64) as u32;
    let _rows = deps.rows_in_flight.clone().acquire_many_owned(budget).await.map_err(stopping)?;
    let kib = m.start.bytes.div_ceil(1024).clamp(1, KIB_IN_FLIGHT as u64) as u32;
    let _kib = deps.kib_in_flight.clone().acquire_many_owned(kib).await.map_err(stopping)?;
    let permit = deps.cpu.clone().acquire_owned().await.map_err(stopping)?;
    // Checked again: the job may have stopped while this zone waited for its permits.
    if m.stop.load(Ordering::Acquire) {
        return Ok(None);
    }
    let started = Instant::now();
    let room = RoomKind::Job(m.job_id).name();
    let id = zone_id(m.job_id, m.index);
    deps.broker.do_send(Publish::job(
        room.clone(),
        Event::ZoneProcessing(ZoneProcessing {
            job_id: m.job_id,
            zone_id: id.clone(),
            zone_index: m.index,
            processing_tool: "csv".into(),
        }),
    ));
    let (path, start, columns, rules) = (m.path.clone(), m.start, m.columns, deps.rules.clone());
    let parsed = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let records = read_zone(&path, &start, &columns)?;
        let out = process_records(records, &columns, &rules);
        debug_assert!(out.invalid.len() <= KEEP_PER_ZONE && out.flagged.len() <= KEEP_PER_ZONE);
        let mut report = ZoneReport {
            index: m.index,
            rows: start.rows,
            valid: out.rows.len() as u64,
            invalid_count: out.invalid_count,
            invalid_rows: out.invalid,
            flagged_count: out.flagged_count,
            flagged_cells: out.flagged,
            ..ZoneReport::default()
        };
        for row in &out.rows {
            *report.categories.entry(row.category.clone()).or_insert(0) += 1;
        }
        Ok::<_, String>((out.rows, report))
    });
    let (rows, report) = parsed.await.map_err(|e| format!("zone work stopped: {e}"))??;
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job_id = m.job_id.to_string();
    deps.rows.store_zone(StoreZone { job_id, tenant: m.tenant, index: m.index, rows, report, reply });
    let report = answer.await.map_err(|_| "the row store stopped".to_string())?.map_err(|e| match e {
        e if e.is_lease_lost() => ZoneError::LeaseLost,
        e => ZoneError::Failed(e.to_string()),
    })?;
    let completed = Event::ZoneCompleted(ZoneCompleted {
        job_id: m.job_id,
        zone_id: id,
        zone_index: m.index,
        rows: m.start.rows,
        errors: report.invalid_count,
        duration_ms: started.elapsed().as_millis() as u64,
    });
    // Answered once the event is published (in cluster mode, once Redis took it): with Redis away
    // the zone waits here, and its job pauses instead of running ahead of its events. Its budgets are
    // given back first: its rows are stored.
    drop((_rows, _kib));
    match deps.broker.send(Publish::job(room, completed)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "zone_completed not published"),
        Err(_) => return Err(ZoneError::Failed("the server is stopping".into())),
    }
    Ok(Some(report))
}
