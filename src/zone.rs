//! The zone actor: scans, parses, stores and categorizes one zone of a CSV file.
//!
//! Zone actors run on a sync arbiter sized to the cores, so CPU and SQLite work never blocks an I/O
//! arbiter. Each has its own database connection. A zone reports `zone_processing` and
//! `zone_completed` straight to the broker, and its numbers to the job actor, which alone computes
//! progress. Zones are idempotent: a zone already stored (before a restart) is not stored again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::broker::{Broker, Publish};
use crate::csv_import::{process_records, read_zone, Columns, Rules, ZoneStart};
use crate::protocol::{Event, ZoneCompleted, ZoneProcessing};
use crate::store::{StoreActor, StoreZone};

/// How many invalid rows and flagged cells a zone report keeps (the job keeps the first 100 overall).
const KEEP_PER_ZONE: usize = 100;

/// Process one zone.
#[derive(Message)]
#[rtype(result = "Result<Value, String>")]
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
}

/// The zone actor.
pub struct Zone {
    store: Addr<StoreActor>,
    rules: Arc<Rules>,
    broker: Addr<Broker>,
}

impl Zone {
    /// A zone actor that stores through `store` and reports to `broker`.
    pub fn new(store: Addr<StoreActor>, rules: Arc<Rules>, broker: Addr<Broker>) -> Self {
        Zone { store, rules, broker }
    }
}

impl Actor for Zone {
    type Context = SyncContext<Self>;
}

/// The id a zone goes by in events.
pub fn zone_id(job_id: Uuid, index: u64) -> String {
    format!("{job_id}:{index}")
}

impl Handler<ProcessZone> for Zone {
    type Result = Result<Value, String>;

    fn handle(&mut self, m: ProcessZone, _: &mut SyncContext<Self>) -> Self::Result {
        let span = tracing::info_span!("zone", job = %m.job_id, zone = m.index);
        let _g = span.enter();
        let started = Instant::now();
        let room = format!("job:{}", m.job_id);
        let id = zone_id(m.job_id, m.index);
        self.broker.do_send(Publish {
            room: room.clone(),
            event: Event::ZoneProcessing(ZoneProcessing {
                job_id: m.job_id,
                zone_id: id.clone(),
                zone_index: m.index,
                processing_tool: "csv".into(),
            }),
        });
        let records = read_zone(&m.path, &m.start)?;
        let out = process_records(records, &m.columns, &self.rules);
        let mut categories = serde_json::Map::new();
        for row in &out.rows {
            let n = categories.get(&row.category).and_then(Value::as_u64).unwrap_or(0);
            categories.insert(row.category.clone(), (n + 1).into());
        }
        let report = json!({
            "index": m.index,
            "rows": m.start.rows,
            "valid": out.rows.len(),
            "invalid_count": out.invalid.len(),
            "invalid_rows": out.invalid.iter().take(KEEP_PER_ZONE).collect::<Vec<_>>(),
            "flagged_count": out.flagged.len(),
            "flagged_cells": out.flagged.iter().take(KEEP_PER_ZONE).collect::<Vec<_>>(),
            "categories": categories,
        });
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job_id = m.job_id.to_string();
        self.store.do_send(StoreZone { job_id, tenant: m.tenant, index: m.index, rows: out.rows, report, reply });
        // This thread is a zone thread of a sync arbiter: waiting here blocks no I/O arbiter.
        let report = answer.blocking_recv().map_err(|_| "the store stopped".to_string())?.map_err(|e| e.to_string())?;
        let duration_ms = started.elapsed().as_millis() as u64;
        self.broker.do_send(Publish {
            room,
            event: Event::ZoneCompleted(ZoneCompleted {
                job_id: m.job_id,
                zone_id: id,
                zone_index: m.index,
                rows: m.start.rows,
                errors: report["invalid_count"].as_u64().unwrap_or(0),
                duration_ms,
            }),
        });
        Ok(report)
    }
}
