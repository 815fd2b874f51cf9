//! The shared row store on PostgreSQL (cluster mode with `database_url`): the same messages as the
//! SQLite [`RowStore`](crate::db::row_store::RowStore) — [`StoreZone`] and [`ZoneReports`] — so a
//! zone does not know which one keeps its rows.
//!
//! Zones waiting are written in groups by at most [`WRITERS`] writers at once, each group one
//! transaction: its rows go into a temporary table with one binary `COPY`, then into `transactions`
//! with `ON CONFLICT (tenant_key) DO NOTHING` (dedup per tenant, the first row of a key wins, as in
//! SQLite), counted per zone by the same statement; then the tenants' row counts and the zone
//! reports. A zone is stored wholly or not at all, and at most once: `zones` has one row per job
//! and zone, so a zone another node stored (a job taken over) is answered with that node's report.
//! A group that fails for any reason but the database being away is written again zone by zone, so
//! a zone fails alone (the one that passes the tenant's row limit, say). While the database is
//! unreachable the group waits and retries with backoff: the job pauses, nothing is lost.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use deadpool_postgres::Pool;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::db::pg::{self, is_transient};
use crate::db::row_store::{fnv1a_128, ExportRow, ExportRows, StoreZone, ZoneReports, GROUP_ROWS};
use crate::db::sqlite::StoreError;
use crate::protocol::ZoneReport;
use crate::quota::{Exceeded, Quotas};

/// Groups written at once (each on its own connection).
pub const WRITERS: usize = 2;

const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE zones (job_id TEXT NOT NULL, zone_index BIGINT NOT NULL, report TEXT NOT NULL,
         PRIMARY KEY (job_id, zone_index));
     CREATE TABLE transactions (tenant_key UUID PRIMARY KEY, tenant TEXT NOT NULL, job_id TEXT NOT NULL,
         zone_index BIGINT NOT NULL, line BIGINT NOT NULL, date TEXT NOT NULL, amount_cents BIGINT NOT NULL,
         description TEXT NOT NULL, category TEXT NOT NULL);
     CREATE TABLE tenant_rows (tenant TEXT PRIMARY KEY, rows BIGINT NOT NULL);",
)];

/// A group's rows before they are deduplicated into `transactions`; `zone` is the row's zone's
/// position in the group (its tenant, job and index come as arrays beside the insert).
const STAGING: &str = "CREATE TEMP TABLE IF NOT EXISTS staging (zone INTEGER, tenant_key UUID, line BIGINT,
     date TEXT, amount_cents BIGINT, description TEXT, category TEXT) ON COMMIT DELETE ROWS";

/// A row's deduplication key in PostgreSQL: one 128-bit hash of its tenant and its content key, so the
/// unique index compares 16 fixed bytes (a `(tenant, key)` index spent most of the database's time
/// in text comparisons). Equal rows of a tenant have equal keys; two different rows collide about
/// once in 2^64, as their content keys already may.
fn tenant_key(tenant: &str, key: &[u8; 16]) -> Uuid {
    Uuid::from_u128(fnv1a_128(&[tenant.as_bytes(), &[0], key]))
}

/// The shared row store actor.
pub struct PgRows {
    pool: Pool,
    /// This node's id: zones are stored only for jobs whose lease it holds.
    node: Arc<str>,
    quotas: Arc<Quotas>,
    queue: VecDeque<StoreZone>,
    writers: usize,
    /// Jobs that passed their tenant's row limit: their later zones are refused.
    over_quota: HashSet<String>,
}

impl PgRows {
    /// Connects, migrates, and reads every tenant's row count into `quotas`.
    pub async fn open(url: &str, prefix: &str, node: &str, quotas: Arc<Quotas>) -> Result<Self, StoreError> {
        let setup = pg::pool(url, prefix, 1, Some(Duration::from_secs(5)))?;
        pg::migrate(&setup, prefix, MIGRATIONS, "rows_version").await?;
        let client = setup.get().await?;
        for row in client.query("SELECT tenant, rows FROM tenant_rows", &[]).await? {
            quotas.set_stored_rows(row.get(0), row.get::<_, i64>(1).max(0) as u64);
        }
        drop(client);
        setup.close();
        // Writers wait for a connection as long as it takes: their zones must not be dropped. The
        // connections are made where the actor runs.
        let pool = pg::pool(url, prefix, WRITERS + 1, None)?;
        Ok(PgRows { pool, node: node.into(), quotas, queue: VecDeque::new(), writers: 0, over_quota: HashSet::new() })
    }

    /// Starts the actor on an arbiter of its own (encoding rows for `COPY` is its CPU work).
    pub fn start_own(self) -> Addr<PgRows> {
        PgRows::start_in_arbiter(&Arbiter::new().handle(), move |_| self)
    }

    /// Starts writers while there are zones waiting and fewer than [`WRITERS`] busy.
    fn write_waiting(&mut self, ctx: &mut Context<Self>) {
        while self.writers < WRITERS && !self.queue.is_empty() {
            let mut group = Vec::new();
            let mut rows = 0;
            while let Some(zone) = self.queue.front() {
                if !group.is_empty() && rows + zone.rows.len() > GROUP_ROWS {
                    break;
                }
                rows += zone.rows.len();
                group.extend(self.queue.pop_front());
            }
            let (refused, group): (Vec<_>, Vec<_>) =
                group.into_iter().partition(|z| self.over_quota.contains(&z.job_id));
            for zone in refused {
                let max = self.quotas.limits().rows;
                let _ = zone.reply.send(Err(StoreError::new(Exceeded::Rows { tenant: zone.tenant, max }.to_string())));
            }
            if group.is_empty() {
                continue;
            }
            self.writers += 1;
            let writer = Writer { pool: self.pool.clone(), node: self.node.clone(), quotas: self.quotas.clone() };
            ctx.spawn(writer.write(group).into_actor(self).map(|over, rows, ctx| {
                rows.writers -= 1;
                rows.over_quota.extend(over);
                rows.write_waiting(ctx);
            }));
        }
    }
}

impl Actor for PgRows {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Other nodes' imports raise the tenants' counts too: the up-front check of an upload reads
        // them as of a few seconds ago (the check in each zone's transaction is exact).
        ctx.run_interval(Duration::from_secs(5), |rows, ctx| {
            let (pool, quotas) = (rows.pool.clone(), rows.quotas.clone());
            ctx.spawn(
                async move {
                    let Ok(client) = pool.get().await else { return };
                    let Ok(counts) = client.query("SELECT tenant, rows FROM tenant_rows", &[]).await else { return };
                    for row in counts {
                        quotas.set_stored_rows(row.get(0), row.get::<_, i64>(1).max(0) as u64);
                    }
                }
                .into_actor(rows),
            );
        });
    }
}

impl Handler<StoreZone> for PgRows {
    type Result = ();
    fn handle(&mut self, zone: StoreZone, ctx: &mut Context<Self>) {
        self.queue.push_back(zone);
        self.write_waiting(ctx);
    }
}

impl Handler<ExportRows> for PgRows {
    type Result = ResponseFuture<Result<(Vec<ExportRow>, Option<String>), StoreError>>;
    fn handle(&mut self, m: ExportRows, _: &mut Context<Self>) -> Self::Result {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            // Keyset on the primary key: every page reads on from where the last one ended.
            let after = match m.cursor.as_deref() {
                Some(c) => Uuid::parse_str(c).map_err(|e| StoreError::new(format!("bad export cursor: {e}")))?,
                None => Uuid::nil(),
            };
            let f = &m.filters;
            let rows = client
                .query(
                    "SELECT tenant_key, date, amount_cents, description, category, job_id, line FROM transactions
                     WHERE tenant_key > $2 AND tenant = $1 AND ($3::TEXT IS NULL OR date >= $3)
                         AND ($4::TEXT IS NULL OR date <= $4) AND ($5::TEXT IS NULL OR category = $5)
                         AND ($6::TEXT IS NULL OR job_id = $6)
                     ORDER BY tenant_key LIMIT $7",
                    &[&m.tenant, &after, &f.from, &f.to, &f.category, &f.job_id, &(m.limit as i64)],
                )
                .await?;
            let last = rows.last().map(|r| r.get::<_, Uuid>(0));
            let out: Vec<ExportRow> = rows
                .iter()
                .map(|r| ExportRow {
                    date: r.get(1),
                    amount_cents: r.get(2),
                    description: r.get(3),
                    category: r.get(4),
                    job_id: r.get(5),
                    line: r.get(6),
                })
                .collect();
            let cursor = last.filter(|_| out.len() == m.limit).map(|k| k.to_string());
            Ok((out, cursor))
        })
    }
}

impl Handler<ZoneReports> for PgRows {
    type Result = ResponseFuture<Result<Vec<(u64, ZoneReport)>, StoreError>>;
    fn handle(&mut self, m: ZoneReports, _: &mut Context<Self>) -> Self::Result {
        let pool = self.pool.clone();
        Box::pin(async move {
            let client = pool.get().await?;
            let rows = client
                .query("SELECT zone_index, report FROM zones WHERE job_id = $1 ORDER BY zone_index", &[&m.0])
                .await?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    let report = serde_json::from_str(r.get::<_, &str>(1)).ok()?;
                    Some((r.get::<_, i64>(0) as u64, report))
                })
                .collect())
        })
    }
}

/// Why a group was not stored.
enum GroupError {
    /// The database is away: try again later.
    Transient(StoreError),
    /// Refused (a constraint, a stored report that does not parse): write the zones one by one
    /// to find the one at fault.
    Refused(StoreError),
    /// The tenant's row limit would be passed.
    OverQuota(StoreError),
}

impl GroupError {
    fn into_store(self) -> StoreError {
        match self {
            GroupError::Transient(e) | GroupError::Refused(e) | GroupError::OverQuota(e) => e,
        }
    }
}

impl From<tokio_postgres::Error> for GroupError {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_transient(&e) {
            GroupError::Transient(e.into())
        } else {
            GroupError::Refused(e.into())
        }
    }
}

impl From<deadpool_postgres::PoolError> for GroupError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        GroupError::Transient(e.into())
    }
}

/// One writer's group, with what it needs.
struct Writer {
    pool: Pool,
    node: Arc<str>,
    quotas: Arc<Quotas>,
}

impl Writer {
    /// Writes `group` and answers every zone in it; answers the jobs that passed their limit.
    async fn write(self, group: Vec<StoreZone>) -> Vec<String> {
        let mut over = Vec::new();
        match self.retrying(&group).await {
            Ok(reports) => reply(group, reports),
            Err(first) if group.len() == 1 => {
                if matches!(first, GroupError::OverQuota(_)) {
                    over.extend(group.first().map(|z| z.job_id.clone()));
                }
                reply(group, vec![Err(first.into_store())])
            }
            Err(_) => {
                // One zone at a time: each gets its own answer.
                for zone in group {
                    let result = match self.retrying(std::slice::from_ref(&zone)).await {
                        Ok(mut reports) => reports.remove(0),
                        Err(e) => {
                            if matches!(e, GroupError::OverQuota(_)) {
                                over.push(zone.job_id.clone());
                            }
                            Err(e.into_store())
                        }
                    };
                    reply(vec![zone], vec![result]);
                }
            }
        }
        over
    }

    /// [`Writer::store`], again and again while the database is away (backoff up to 2 s).
    async fn retrying(&self, group: &[StoreZone]) -> Result<Vec<Result<ZoneReport, StoreError>>, GroupError> {
        let mut wait = Duration::from_millis(100);
        loop {
            match self.store(group).await {
                Ok(reports) => return Ok(reports),
                Err(GroupError::Transient(e)) => {
                    tracing::warn!(error = %e, zones = group.len(), retry_in_ms = wait.as_millis() as u64,
                        "rows not stored: the database is away; the zones wait");
                    actix_rt::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
                Err(refused) => return Err(refused),
            }
        }
    }

    /// One transaction for the whole group; answers each zone's report, in order (or, for a job
    /// this node no longer holds the lease of, [`StoreError::lease_lost`]).
    async fn store(&self, group: &[StoreZone]) -> Result<Vec<Result<ZoneReport, StoreError>>, GroupError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // The fence: a node that lost a job's lease (it could not renew in time and another node took
        // the job over) stores none of its zones. The rows stay share-locked until the commit, so the
        // lease cannot move meanwhile.
        let ids: Vec<Uuid> = group.iter().filter_map(|z| z.job_id.parse().ok()).collect();
        let held: HashSet<String> = tx
            .query("SELECT id FROM jobs WHERE id = ANY($1) AND lease_node = $2 FOR SHARE", &[&ids, &&*self.node])
            .await?
            .iter()
            .map(|r| r.get::<_, Uuid>(0).to_string())
            .collect();
        let group: Vec<&StoreZone> = group.iter().collect();
        let fenced = |z: &StoreZone| !held.contains(&z.job_id);
        // Zones already stored (by this node before, or by the node that had the job) keep their report.
        let jobs: Vec<&str> = group.iter().filter(|z| !fenced(z)).map(|z| z.job_id.as_str()).collect();
        let indexes: Vec<i64> = group.iter().filter(|z| !fenced(z)).map(|z| z.index as i64).collect();
        let mut stored: HashMap<(String, i64), ZoneReport> = HashMap::new();
        for row in tx
            .query(
                "SELECT z.job_id, z.zone_index, z.report FROM zones z
                 JOIN unnest($1::TEXT[], $2::BIGINT[]) AS w (job_id, zone_index) USING (job_id, zone_index)",
                &[&jobs, &indexes],
            )
            .await?
        {
            let report = serde_json::from_str(row.get::<_, &str>(2))
                .map_err(|e| GroupError::Refused(StoreError::new(format!("a stored zone report: {e}"))))?;
            stored.insert((row.get(0), row.get(1)), report);
        }
        let new: Vec<&StoreZone> = group
            .iter()
            .copied()
            .filter(|z| !fenced(z) && !stored.contains_key(&(z.job_id.clone(), z.index as i64)))
            .collect();
        let mut inserted: HashMap<(String, i64), u64> = HashMap::new();
        if new.iter().any(|z| !z.rows.is_empty()) {
            tx.batch_execute(STAGING).await?;
            let sink = tx
                .copy_in("COPY staging (zone, tenant_key, line, date, amount_cents, description, category) FROM STDIN BINARY")
                .await?;
            let types = [Type::INT4, Type::UUID, Type::INT8, Type::TEXT, Type::INT8, Type::TEXT, Type::TEXT];
            let writer = BinaryCopyInWriter::new(sink, &types);
            futures_util::pin_mut!(writer);
            for (at, zone) in new.iter().enumerate() {
                let at = at as i32 + 1;
                for row in &zone.rows {
                    let (key, line) = (tenant_key(&zone.tenant, &row.key), row.line as i64);
                    writer
                        .as_mut()
                        .write(&[&at, &key, &line, &row.date, &row.cents, &row.description, &row.category])
                        .await?;
                }
            }
            writer.finish().await?;
            let tenants: Vec<&str> = new.iter().map(|z| z.tenant.as_str()).collect();
            let jobs: Vec<&str> = new.iter().map(|z| z.job_id.as_str()).collect();
            let indexes: Vec<i64> = new.iter().map(|z| z.index as i64).collect();
            // In zone and line order, so the first row of a key in the file is the one kept.
            let counted = tx
                .query(
                    "WITH z AS (SELECT * FROM unnest($1::TEXT[], $2::TEXT[], $3::BIGINT[]) WITH ORDINALITY
                                    AS z (tenant, job_id, zone_index, at)),
                          ins AS (
                         INSERT INTO transactions (tenant_key, tenant, job_id, zone_index, line, date, amount_cents, description, category)
                         SELECT s.tenant_key, z.tenant, z.job_id, z.zone_index, s.line, s.date, s.amount_cents, s.description, s.category
                         FROM staging s JOIN z ON z.at = s.zone ORDER BY s.tenant_key, s.zone, s.line
                         ON CONFLICT (tenant_key) DO NOTHING RETURNING job_id, zone_index)
                     SELECT job_id, zone_index, COUNT(*) FROM ins GROUP BY job_id, zone_index",
                    &[&tenants, &jobs, &indexes],
                )
                .await?;
            for row in counted {
                inserted.insert((row.get(0), row.get(1)), row.get::<_, i64>(2) as u64);
            }
        }
        // Each tenant's count, in tenant order (two writers never wait on each other in a cycle).
        let mut per_tenant: Vec<(&str, i64)> = Vec::new();
        for zone in &new {
            let n = inserted.get(&(zone.job_id.clone(), zone.index as i64)).copied().unwrap_or(0) as i64;
            match per_tenant.iter_mut().find(|(t, _)| *t == zone.tenant) {
                Some((_, sum)) => *sum += n,
                None => per_tenant.push((&zone.tenant, n)),
            }
        }
        per_tenant.sort();
        let max = self.quotas.limits().rows;
        let mut totals = Vec::new();
        for (tenant, n) in per_tenant {
            let total: i64 = tx
                .query_one(
                    "INSERT INTO tenant_rows (tenant, rows) VALUES ($1, $2)
                     ON CONFLICT (tenant) DO UPDATE SET rows = tenant_rows.rows + excluded.rows RETURNING rows",
                    &[&tenant, &n],
                )
                .await?
                .get(0);
            if total.max(0) as u64 > max {
                let e = Exceeded::Rows { tenant: tenant.into(), max };
                return Err(GroupError::OverQuota(StoreError::new(e.to_string())));
            }
            totals.push((tenant.to_string(), total.max(0) as u64));
        }
        let mut reports = Vec::with_capacity(group.len());
        let (mut ids, mut idx, mut texts) = (Vec::new(), Vec::new(), Vec::new());
        for zone in group.iter().copied() {
            if fenced(zone) {
                let job = &zone.job_id;
                reports.push(Err(StoreError::lease_lost(format!("job {job} is leased by another node now"))));
                continue;
            }
            let at = (zone.job_id.clone(), zone.index as i64);
            if let Some(report) = stored.get(&at) {
                reports.push(Ok(report.clone()));
                continue;
            }
            let mut report = zone.report.clone();
            report.inserted = inserted.get(&at).copied().unwrap_or(0);
            report.duplicates = zone.rows.len() as u64 - report.inserted;
            let text =
                serde_json::to_string(&report).map_err(|e| GroupError::Refused(StoreError::new(e.to_string())))?;
            ids.push(zone.job_id.as_str());
            idx.push(at.1);
            texts.push(text);
            reports.push(Ok(report));
        }
        if !ids.is_empty() {
            // A zone another node stored meanwhile breaks the primary key: the group is written again
            // zone by zone, and that zone then finds the other node's report.
            tx.execute(
                "INSERT INTO zones (job_id, zone_index, report) SELECT * FROM unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[])",
                &[&ids, &idx, &texts],
            )
            .await?;
        }
        tx.commit().await?;
        for (tenant, total) in totals {
            self.quotas.set_stored_rows(&tenant, total);
        }
        Ok(reports)
    }
}

fn reply(group: Vec<StoreZone>, results: Vec<Result<ZoneReport, StoreError>>) {
    for (zone, result) in group.into_iter().zip(results) {
        // The job may have stopped waiting; nothing to do then.
        let _ = zone.reply.send(result);
    }
}
