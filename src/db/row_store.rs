//! The row store actor: imported rows and zone reports, in a database of their own (`rows.db`).
//!
//! Rows live apart from events and jobs so that bulk imports and room history never wait for each
//! other's writes. Zones are written in group commits: the first [`StoreZone`] of a group opens a
//! transaction and queues a [`Flush`] behind everything already in the mailbox, so every zone that
//! arrived while the previous group was committing joins the next one. No zone is answered before its
//! group is committed. A zone that fails spoils the transaction: the group is rolled back, that zone
//! gets its error, and the other zones are written again into a new group, so a zone fails alone and
//! is stored wholly or not at all. A group closes once it holds [`GROUP_ROWS`] rows or more, or when any
//! other message arrives, so reads always see committed data.
//!
//! Deduplication is per tenant: the unique index holds a 64-bit slot hashed from the tenant and the
//! row's content key, checked against the stored tenant and key (see [`dedup_slot`]). Small integer
//! entries keep the index small and fast: it takes rows at random positions, and its pages written per
//! commit are what an import costs.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::db::sqlite::{connect, migrate, Location, StoreError};
use crate::protocol::ZoneReport;
use crate::quota::{Exceeded, Quotas};

/// A group commit closes once it holds this many rows.
pub const GROUP_ROWS: usize = 64 * 1024;

/// Versioned migrations of `rows.db`, applied in order.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE zones (job_id TEXT NOT NULL, zone_index INTEGER NOT NULL, report TEXT NOT NULL,
             PRIMARY KEY (job_id, zone_index)) WITHOUT ROWID;
         CREATE TABLE transactions (id INTEGER PRIMARY KEY, slot INTEGER NOT NULL UNIQUE, tenant TEXT NOT NULL,
             key BLOB NOT NULL, job_id TEXT NOT NULL, line INTEGER NOT NULL, date TEXT NOT NULL,
             amount_cents INTEGER NOT NULL, description TEXT NOT NULL, category TEXT NOT NULL);",
    ),
    // Rows per tenant, kept in each zone's transaction, for `max_stored_rows_per_tenant`.
    (2, TENANT_ROWS),
];

/// The per-tenant row counts, (re)built from the rows.
const TENANT_ROWS: &str =
    "CREATE TABLE IF NOT EXISTS tenant_rows (tenant TEXT PRIMARY KEY, rows INTEGER NOT NULL) WITHOUT ROWID;
     DELETE FROM tenant_rows;
     INSERT INTO tenant_rows SELECT tenant, COUNT(*) FROM transactions GROUP BY tenant;";

/// One row ready for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// File line.
    pub line: u64,
    /// `YYYY-MM-DD`.
    pub date: String,
    /// Amount in cents.
    pub cents: i64,
    /// Description, neutralised.
    pub description: String,
    /// Category from the rules.
    pub category: String,
    /// Deduplication key (per tenant): a 128-bit hash of date, amount and normalised description.
    pub key: [u8; 16],
}

/// FNV-1a (128 bit) over the concatenation of `parts`.
pub fn fnv1a_128(parts: &[&[u8]]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= u128::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// Where a row's deduplication starts: a 64-bit hash of the tenant and the row's content key (FNV-1a,
/// 128 bits, folded). Equal rows of a tenant have the same slot; a different row in a slot (about once
/// in 2^64) moves the new one to the next free slot, so the unique index stays on 8-byte integers,
/// which SQLite maintains about twice as fast as 16-byte blobs.
pub fn dedup_slot(tenant: &str, key: &[u8; 16]) -> i64 {
    let h = fnv1a_128(&[tenant.as_bytes(), &[0], key]);
    ((h >> 64) as u64 ^ h as u64) as i64
}

/// Inserts rows unless their tenant has them, with statements prepared once for many rows.
struct RowWriter<'c> {
    insert: rusqlite::CachedStatement<'c>,
    holder: rusqlite::CachedStatement<'c>,
}

impl<'c> RowWriter<'c> {
    fn new(conn: &'c Connection) -> Result<Self, StoreError> {
        Ok(RowWriter {
            insert: conn.prepare_cached(
                "INSERT INTO transactions (slot, tenant, key, job_id, line, date, amount_cents, description, category)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (slot) DO NOTHING",
            )?,
            holder: conn.prepare_cached("SELECT tenant = ?2 AND key = ?3 FROM transactions WHERE slot = ?1")?,
        })
    }

    /// Inserts `row` unless the tenant has it; answers whether it was inserted. Probes from the row's
    /// slot: a free slot takes the row, a slot holding the same tenant and content key means a
    /// duplicate, any other row in the slot (a hash collision) sends it on to the next. Rows are never
    /// deleted, so the probe sequence of a stored row never has a gap.
    fn insert(&mut self, tenant: &str, job_id: &str, row: &Row) -> Result<bool, StoreError> {
        let mut slot = dedup_slot(tenant, &row.key);
        loop {
            let (line, key) = (row.line as i64, &row.key[..]);
            let values = params![slot, tenant, key, job_id, line, row.date, row.cents, row.description, row.category];
            if self.insert.execute(values)? == 1 {
                return Ok(true);
            }
            if self.holder.query_row(params![slot, tenant, key], |r| r.get::<_, bool>(0))? {
                return Ok(false);
            }
            slot = slot.wrapping_add(1);
        }
    }
}

/// The row store: one connection to `rows.db` and the group being written.
pub struct RowStore {
    conn: Connection,
    /// Zones written into the open transaction, with their completed reports.
    group: Vec<(StoreZone, ZoneReport)>,
    group_rows: usize,
    /// Each tenant's row count as the open group leaves it, told to `quotas` once committed.
    group_totals: HashMap<String, u64>,
    /// `max_stored_rows_per_tenant` and the committed counts; no limit without.
    quotas: Option<Arc<Quotas>>,
    /// Jobs a zone of which passed the row limit: zones of theirs that come after are refused too,
    /// so what such a job stored is the zones stored before the one that failed (the job fails with
    /// it); those rolled back with its group are written again.
    over_quota: std::collections::HashSet<String>,
    /// Set while a rolled-back group is written again: its zones came before the failure.
    rewriting: bool,
}

impl RowStore {
    /// Opens (creating and migrating when needed) the row database that goes with `main`.
    pub fn open(main: &Location) -> Result<RowStore, StoreError> {
        let conn = connect(&main.rows(), 32_768)?;
        migrate(&conn, MIGRATIONS)?;
        Ok(RowStore {
            conn,
            group: Vec::new(),
            group_rows: 0,
            group_totals: HashMap::new(),
            quotas: None,
            over_quota: std::collections::HashSet::new(),
            rewriting: false,
        })
    }

    /// Enforces `quotas`' row limit from now on, and tells it every tenant's committed count.
    pub fn with_quotas(mut self, quotas: Arc<Quotas>) -> Result<RowStore, StoreError> {
        self.commit_group();
        {
            let mut stmt = self.conn.prepare("SELECT tenant, rows FROM tenant_rows")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (tenant, n) = row?;
                quotas.set_stored_rows(&tenant, n.max(0) as u64);
            }
        }
        self.quotas = Some(quotas);
        Ok(self)
    }

    /// Copies rows and zone reports kept in the main database by versions before `rows.db` existed
    /// (the main store's migration 2 then drops them). Copying again is harmless.
    pub fn adopt_legacy(&mut self, main: &Location) -> Result<u64, StoreError> {
        if !main.exists() {
            return Ok(0);
        }
        self.commit_group();
        self.conn.execute("ATTACH DATABASE ?1 AS legacy", [main.uri()])?;
        let copied = self.copy_legacy();
        self.conn.execute("DETACH DATABASE legacy", [])?;
        copied
    }

    fn copy_legacy(&mut self) -> Result<u64, StoreError> {
        let has: Option<String> = self
            .conn
            .query_row(
                "SELECT name FROM legacy.sqlite_master WHERE type = 'table' AND name = 'transactions'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if has.is_none() {
            return Ok(0);
        }
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut copied = 0;
        {
            let mut read = tx.prepare(
                "SELECT tenant, key, job_id, line, date, amount_cents, description, category FROM legacy.transactions ORDER BY id",
            )?;
            let mut writer = RowWriter::new(&tx)?;
            let mut rows = read.query([])?;
            while let Some(r) = rows.next()? {
                let tenant: String = r.get(0)?;
                let Ok(key) = <[u8; 16]>::try_from(r.get::<_, Vec<u8>>(1)?.as_slice()) else {
                    // Version 1 always wrote 16-byte keys; a row without one cannot be deduplicated.
                    tracing::warn!(tenant = %tenant, "an old row without a 16-byte key is not copied");
                    continue;
                };
                let job_id: String = r.get(2)?;
                let row = Row {
                    line: r.get::<_, i64>(3)? as u64,
                    date: r.get(4)?,
                    cents: r.get(5)?,
                    description: r.get(6)?,
                    category: r.get(7)?,
                    key,
                };
                copied += u64::from(writer.insert(&tenant, &job_id, &row)?);
            }
            tx.execute("INSERT OR IGNORE INTO main.zones SELECT job_id, zone_index, report FROM legacy.zones", [])?;
            tx.execute_batch(TENANT_ROWS)?;
        }
        tx.commit()?;
        Ok(copied)
    }

    /// Whether a group's transaction is open.
    fn in_group(&self) -> bool {
        !self.conn.is_autocommit()
    }

    /// Writes a zone's rows (skipping rows the tenant already has) and its report into the open
    /// group, opening one when needed; answers the report completed with `inserted` and
    /// `duplicates`. A zone stored before answers its earlier report and writes nothing. Nothing is
    /// durable before [`RowStore::commit_group`]; after an error the transaction must be rolled back.
    pub fn write_zone(
        &mut self,
        job_id: &str,
        tenant: &str,
        zone_index: u64,
        rows: &[Row],
        mut report: ZoneReport,
    ) -> Result<ZoneReport, StoreError> {
        if !self.in_group() {
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
        }
        let existing: Option<String> = self
            .conn
            .prepare_cached("SELECT report FROM zones WHERE job_id = ?1 AND zone_index = ?2")?
            .query_row(params![job_id, zone_index as i64], |r| r.get(0))
            .optional()?;
        if let Some(text) = existing {
            return serde_json::from_str(&text).map_err(|e| StoreError::new(e.to_string()));
        }
        if !self.rewriting && self.over_quota.contains(job_id) {
            let max = self.quotas.as_ref().map_or(0, |q| q.limits().rows);
            return Err(StoreError::new(Exceeded::Rows { tenant: tenant.into(), max }.to_string()));
        }
        // No savepoint per zone: a savepoint copies every page a zone touches to a sub-journal, which
        // cost more than the inserts. A failing zone rolls back its group instead (see `add`).
        self.insert_zone(job_id, tenant, zone_index, rows, &mut report)?;
        Ok(report)
    }

    /// Adds a zone to the open group (opening one when needed); its answer waits for the commit.
    /// When the zone fails, the group is rolled back, the zone answered with its error, and the
    /// group's other zones written again.
    fn add(&mut self, zone: StoreZone) {
        match self.write_zone(&zone.job_id, &zone.tenant, zone.index, &zone.rows, zone.report.clone()) {
            Ok(report) => {
                self.group_rows += zone.rows.len();
                self.group.push((zone, report));
            }
            Err(error) => {
                if self.in_group() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                self.group_rows = 0;
                self.group_totals.clear();
                let others = std::mem::take(&mut self.group);
                tracing::error!(job = %zone.job_id, zone = zone.index, %error, others = others.len(),
                    "zone not stored; its group is written again without it");
                let _ = zone.reply.send(Err(error));
                let was = std::mem::replace(&mut self.rewriting, true);
                for (other, _) in others {
                    self.add(other);
                }
                self.rewriting = was;
            }
        }
    }

    fn insert_zone(
        &mut self,
        job_id: &str,
        tenant: &str,
        zone_index: u64,
        rows: &[Row],
        report: &mut ZoneReport,
    ) -> Result<(), StoreError> {
        let mut inserted = 0u64;
        let mut writer = RowWriter::new(&self.conn)?;
        for row in rows {
            inserted += u64::from(writer.insert(tenant, job_id, row)?);
        }
        drop(writer);
        let total: i64 = self
            .conn
            .prepare_cached(
                "INSERT INTO tenant_rows (tenant, rows) VALUES (?1, ?2)
                 ON CONFLICT (tenant) DO UPDATE SET rows = rows + excluded.rows RETURNING rows",
            )?
            .query_row(params![tenant, inserted as i64], |r| r.get(0))?;
        let total = total.max(0) as u64;
        if let Some(max) = self.quotas.as_ref().map(|q| q.limits().rows) {
            if total > max {
                // The group is rolled back (see `add`): none of this zone's rows stay.
                self.over_quota.insert(job_id.to_string());
                return Err(StoreError::new(Exceeded::Rows { tenant: tenant.into(), max }.to_string()));
            }
        }
        self.group_totals.insert(tenant.to_string(), total);
        report.inserted = inserted;
        report.duplicates = rows.len() as u64 - inserted;
        self.conn.prepare_cached("INSERT INTO zones (job_id, zone_index, report) VALUES (?1, ?2, ?3)")?.execute(
            params![
                job_id,
                zone_index as i64,
                serde_json::to_string(report).map_err(|e| StoreError::new(e.to_string()))?
            ],
        )?;
        Ok(())
    }

    /// Commits the open group and answers its zones (all with the error when the commit fails).
    pub fn commit_group(&mut self) {
        if !self.in_group() {
            return;
        }
        self.group_rows = 0;
        let group = std::mem::take(&mut self.group);
        let totals = std::mem::take(&mut self.group_totals);
        let committed = self.conn.execute_batch("COMMIT");
        if committed.is_err() && self.in_group() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        if let (Ok(()), Some(quotas)) = (&committed, &self.quotas) {
            for (tenant, rows) in totals {
                quotas.set_stored_rows(&tenant, rows);
            }
        }
        tracing::debug!(zones = group.len(), ok = committed.is_ok(), "row group committed");
        for (zone, report) in group {
            let _ = zone.reply.send(match &committed {
                Ok(()) => Ok(report),
                Err(e) => Err(StoreError::new(format!("the group commit failed: {e}"))),
            });
        }
    }

    /// Reports of the zones of a job that completed, by index.
    pub fn zone_reports(&mut self, job_id: &str) -> Result<Vec<(u64, ZoneReport)>, StoreError> {
        self.commit_group();
        let mut stmt =
            self.conn.prepare_cached("SELECT zone_index, report FROM zones WHERE job_id = ?1 ORDER BY zone_index")?;
        let rows = stmt.query_map([job_id], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?)))?;
        Ok(rows.filter_map(|r| r.ok()).filter_map(|(i, t)| serde_json::from_str(&t).ok().map(|v| (i, v))).collect())
    }

    /// How many rows a tenant has (for tests and stats).
    #[cfg(test)]
    pub fn row_count(&mut self, tenant: &str) -> Result<u64, StoreError> {
        self.commit_group();
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM transactions WHERE tenant = ?1", [tenant], |r| r.get::<_, i64>(0))?
            as u64)
    }
}

impl Actor for RowStore {
    type Context = SyncContext<Self>;
}

/// Store a zone's rows and report (see [`RowStore::write_zone`]); the answer goes to `reply` once
/// the zone's group is committed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StoreZone {
    /// The job.
    pub job_id: String,
    /// The job's tenant.
    pub tenant: String,
    /// The zone's index.
    pub index: u64,
    /// Its valid rows.
    pub rows: Vec<Row>,
    /// Its report so far.
    pub report: ZoneReport,
    /// Where the completed report goes.
    pub reply: oneshot::Sender<Result<ZoneReport, StoreError>>,
}

/// Commit the open group (the row store sends it to itself).
#[derive(Message)]
#[rtype(result = "()")]
struct Flush;

/// A job's completed zone reports.
#[derive(Message)]
#[rtype(result = "Result<Vec<(u64, ZoneReport)>, StoreError>")]
pub struct ZoneReports(pub String);

/// Which of a tenant's stored rows an export takes (every filter optional).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExportFilters {
    /// From this date on (`YYYY-MM-DD`, inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Up to this date (`YYYY-MM-DD`, inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Only this category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Only the rows this job stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

/// One stored row as an export writes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ExportRow {
    pub date: String,
    pub amount_cents: i64,
    pub description: String,
    pub category: String,
    pub job_id: String,
    pub line: i64,
}

/// The next `limit` rows of `tenant` matching `filters` after `cursor` (`None`: from the first),
/// in the store's own order; answers them and the cursor after the last (`None` at the end).
#[derive(Message)]
#[rtype(result = "Result<(Vec<ExportRow>, Option<String>), StoreError>")]
pub struct ExportRows {
    /// The tenant.
    pub tenant: String,
    /// Which rows.
    pub filters: ExportFilters,
    /// Where the previous page ended (opaque).
    pub cursor: Option<String>,
    /// Rows per page.
    pub limit: usize,
}

impl Handler<ExportRows> for RowStore {
    type Result = Result<(Vec<ExportRow>, Option<String>), StoreError>;
    fn handle(&mut self, m: ExportRows, _: &mut SyncContext<Self>) -> Self::Result {
        // What a zone wrote is read once it is committed, as its job saw it.
        self.commit_group();
        let after: i64 = m.cursor.as_deref().and_then(|c| c.parse().ok()).unwrap_or(0);
        let f = &m.filters;
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, date, amount_cents, description, category, job_id, line FROM transactions
             WHERE tenant = ?1 AND id > ?2 AND (?3 IS NULL OR date >= ?3) AND (?4 IS NULL OR date <= ?4)
                 AND (?5 IS NULL OR category = ?5) AND (?6 IS NULL OR job_id = ?6)
             ORDER BY id LIMIT ?7",
        )?;
        let mut last = None;
        let rows =
            stmt.query_map(params![m.tenant, after, f.from, f.to, f.category, f.job_id, m.limit as i64], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    ExportRow {
                        date: r.get(1)?,
                        amount_cents: r.get(2)?,
                        description: r.get(3)?,
                        category: r.get(4)?,
                        job_id: r.get(5)?,
                        line: r.get(6)?,
                    },
                ))
            })?;
        let mut out = Vec::with_capacity(m.limit);
        for row in rows {
            let (id, row) = row?;
            last = Some(id);
            out.push(row);
        }
        let cursor = last.filter(|_| out.len() == m.limit).map(|id| id.to_string());
        Ok((out, cursor))
    }
}

impl Handler<StoreZone> for RowStore {
    type Result = ();
    fn handle(&mut self, zone: StoreZone, ctx: &mut SyncContext<Self>) {
        if !self.in_group() {
            // Behind every message already queued: they join this group.
            ctx.address().do_send(Flush);
        }
        self.add(zone);
        if self.group_rows >= GROUP_ROWS {
            self.commit_group();
        }
    }
}

impl Handler<Flush> for RowStore {
    type Result = ();
    fn handle(&mut self, _: Flush, _: &mut SyncContext<Self>) {
        self.commit_group();
    }
}

impl Handler<ZoneReports> for RowStore {
    type Result = Result<Vec<(u64, ZoneReport)>, StoreError>;
    fn handle(&mut self, m: ZoneReports, _: &mut SyncContext<Self>) -> Self::Result {
        self.zone_reports(&m.0)
    }
}

impl Drop for RowStore {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A panic may have stopped in the middle of a zone: keep nothing of the group.
            let _ = self.conn.execute_batch("ROLLBACK");
        } else {
            self.commit_group();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: u64, key: u8) -> Row {
        Row { line, date: "2024-01-01".into(), cents: 1, description: "d".into(), category: "c".into(), key: [key; 16] }
    }

    fn store_zone(s: &mut RowStore, job: &str, tenant: &str, index: u64, rows: &[Row]) -> ZoneReport {
        let report = s
            .write_zone(job, tenant, index, rows, ZoneReport { rows: rows.len() as u64, ..ZoneReport::default() })
            .unwrap();
        s.commit_group();
        report
    }

    #[test]
    fn zones_store_once_and_dedupe_per_tenant() {
        let loc = Location::memory();
        let mut s = RowStore::open(&loc).unwrap();
        let rows = vec![row(2, 1), row(3, 2), row(4, 1)];
        let r = store_zone(&mut s, "j1", "t1", 0, &rows);
        assert_eq!((r.inserted, r.duplicates), (2, 1));
        // The same zone again is a no-op with the same report.
        assert_eq!(store_zone(&mut s, "j1", "t1", 0, &rows), r);
        // Another job of the same tenant inserts nothing new; another tenant does.
        assert_eq!(store_zone(&mut s, "j2", "t1", 0, &rows).inserted, 0);
        assert_eq!(store_zone(&mut s, "j3", "t2", 0, &rows).inserted, 2);
        assert_eq!(s.row_count("t1").unwrap(), 2);
        assert_eq!(s.zone_reports("j1").unwrap().len(), 1);
    }

    #[test]
    fn a_job_past_the_row_limit_stores_nothing_after_the_zone_that_passed_it() {
        let limits = crate::quota::Limits { jobs: 10, upload_bytes: 1 << 30, rows: 25, min_free_disk: 0 };
        let quotas = crate::quota::Quotas::new(limits);
        let mut s = RowStore::open(&Location::memory()).unwrap().with_quotas(quotas.clone()).unwrap();
        let rows = |from: u8, n: u8| (from..from + n).map(|k| row(u64::from(k), k)).collect::<Vec<_>>();
        assert_eq!(store_zone(&mut s, "j", "t", 0, &rows(0, 10)).inserted, 10);
        assert_eq!(store_zone(&mut s, "j", "t", 1, &rows(10, 10)).inserted, 10);
        let failed = s.write_zone("j", "t", 2, &rows(20, 10), ZoneReport::default()).unwrap_err();
        assert!(failed.to_string().contains("more than 25 rows"), "{failed}");
        let _ = s.conn.execute_batch("ROLLBACK");
        // Three more would fit (23), but they come after the zone that failed.
        assert!(s.write_zone("j", "t", 3, &rows(30, 3), ZoneReport::default()).is_err());
        let _ = s.conn.execute_batch("ROLLBACK");
        // A zone before it, written again after its group was rolled back, still goes in; so does
        // another job of the tenant, up to the limit.
        assert_eq!(store_zone(&mut s, "other", "t", 0, &rows(40, 5)).inserted, 5);
        assert_eq!(quotas.stored_rows("t"), 25);
        assert_eq!(s.row_count("t").unwrap(), 25);
    }

    #[test]
    fn a_row_whose_slot_another_row_holds_moves_on_and_still_deduplicates() {
        let mut s = RowStore::open(&Location::memory()).unwrap();
        let b = row(2, 7);
        let slot = dedup_slot("t", &b.key);
        // A row of other content in b's slot, as a 64-bit collision would leave it, and one in the next.
        for (i, squatter) in [(0, 0xa5u8), (1, 0x5a)] {
            s.conn
                .execute(
                    "INSERT INTO transactions (slot, tenant, key, job_id, line, date, amount_cents, description, category)
                     VALUES (?1, 't', ?2, 'x', 1, '2024-01-01', 1, 'other', 'c')",
                    params![slot.wrapping_add(i), &[squatter; 16][..]],
                )
                .unwrap();
        }
        let first = store_zone(&mut s, "j", "t", 0, std::slice::from_ref(&b));
        assert_eq!((first.inserted, first.duplicates), (1, 0));
        let stored: i64 = s.conn.query_row("SELECT slot FROM transactions WHERE line = 2", [], |r| r.get(0)).unwrap();
        assert_eq!(stored, slot.wrapping_add(2), "the row took the first free slot after the taken ones");
        let again = store_zone(&mut s, "j", "t", 1, &[b]);
        assert_eq!((again.inserted, again.duplicates), (0, 1));
        assert_eq!(s.row_count("t").unwrap(), 3);
    }

    #[test]
    fn a_group_is_durable_only_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::file(dir.path().join("jobcast.db"));
        let died = std::panic::catch_unwind(|| {
            let mut s = RowStore::open(&loc).unwrap();
            s.write_zone("j", "t", 0, &[row(2, 1)], ZoneReport::default()).unwrap();
            s.write_zone("j", "t", 1, &[row(3, 2)], ZoneReport::default()).unwrap();
            s.commit_group();
            s.write_zone("j", "t", 2, &[row(4, 3)], ZoneReport::default()).unwrap();
            panic!("the row store dies with zone 2 written and not committed");
        });
        assert!(died.is_err());
        let mut s = RowStore::open(&loc).unwrap();
        assert_eq!(s.zone_reports("j").unwrap().iter().map(|z| z.0).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(s.row_count("t").unwrap(), 2, "nothing of zone 2 was kept");
    }

    /// Adds a zone as the actor does; the answer arrives once its group is committed.
    fn add(s: &mut RowStore, index: u64, rows: Vec<Row>) -> oneshot::Receiver<Result<ZoneReport, StoreError>> {
        let (reply, answer) = oneshot::channel();
        let report = ZoneReport { rows: rows.len() as u64, ..ZoneReport::default() };
        s.add(StoreZone { job_id: "j".into(), tenant: "t".into(), index, rows, report, reply });
        answer
    }

    #[test]
    fn a_failing_zone_fails_alone_and_its_group_is_written_again() {
        let mut s = RowStore::open(&Location::memory()).unwrap();
        // The store refuses zone 1's report, after its rows were written.
        s.conn
            .execute_batch(
                "CREATE TRIGGER no_zone_1 BEFORE INSERT ON zones WHEN NEW.zone_index = 1
                 BEGIN SELECT RAISE(ABORT, 'refused'); END",
            )
            .unwrap();
        let mut zone0 = add(&mut s, 0, vec![row(2, 1)]);
        let zone1 = add(&mut s, 1, vec![row(3, 2)]);
        let zone2 = add(&mut s, 2, vec![row(4, 3)]);
        assert!(zone1.blocking_recv().unwrap().unwrap_err().to_string().contains("refused"));
        assert!(zone0.try_recv().is_err(), "zone 0 is answered only when its group commits");
        s.commit_group();
        assert_eq!(zone0.blocking_recv().unwrap().unwrap().inserted, 1);
        assert_eq!(zone2.blocking_recv().unwrap().unwrap().inserted, 1);
        assert_eq!(s.zone_reports("j").unwrap().iter().map(|z| z.0).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(s.row_count("t").unwrap(), 2, "nothing of zone 1 stayed");
    }
}
