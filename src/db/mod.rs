//! The databases: SQLite plumbing, the event and job store, and the row store.
//!
//! - `sqlite.rs`: where a database lives, connections with jobcast's pragmas, migrations, the error
//!   type. Both stores use it; it knows no table.
//! - `store.rs`: `jobcast.db`, room history and jobs, behind the `StoreActor` (a sync arbiter).
//! - `row_store.rs`: `rows.db`, imported rows and zone reports in group commits, behind the
//!   `RowStore` actor (a sync arbiter of its own).
//!
//! - `pg.rs`, `pg_store.rs`, `pg_rows.rs`: the same two stores on PostgreSQL (`database_url`,
//!   cluster mode), shared by every node, with job leases and uploads kept for takeover.
//!
//! Callers hold a [`StoreAddr`] and a [`RowsAddr`]: the same messages reach SQLite or PostgreSQL.
//! This layer uses only the top-level modules (`protocol`, `config`, `quota`); the stores never use
//! each other, and only [`open`] and the two handles know that they go together.

pub mod outbox;
pub mod pg;
pub mod pg_rows;
pub mod pg_store;
pub mod row_store;
pub mod sqlite;
pub mod store;

use actix::dev::ToEnvelope;
use actix::prelude::*;
use futures_util::future::Either;
use pg_rows::PgRows;
use pg_store::PgStore;
use row_store::{RowStore, StoreZone, ZoneReports};
use sqlite::{Location, StoreError};
use store::{Store, StoreActor};

/// The event and job store, whichever engine keeps it. Cheap to clone.
#[derive(Clone)]
pub enum StoreAddr {
    /// `jobcast.db`, this node's own.
    Sqlite(Addr<StoreActor>),
    /// PostgreSQL, shared by the cluster.
    Postgres(Addr<PgStore>),
}

impl StoreAddr {
    /// Sends `msg` to the store and waits for its answer.
    pub fn send<M>(&self, msg: M) -> impl std::future::Future<Output = Result<M::Result, MailboxError>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        StoreActor: Handler<M>,
        PgStore: Handler<M>,
        <StoreActor as Actor>::Context: ToEnvelope<StoreActor, M>,
        <PgStore as Actor>::Context: ToEnvelope<PgStore, M>,
    {
        match self {
            StoreAddr::Sqlite(a) => Either::Left(a.send(msg)),
            StoreAddr::Postgres(a) => Either::Right(a.send(msg)),
        }
    }

    /// Sends `msg` without waiting for an answer.
    pub fn do_send<M>(&self, msg: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        StoreActor: Handler<M>,
        PgStore: Handler<M>,
        <StoreActor as Actor>::Context: ToEnvelope<StoreActor, M>,
        <PgStore as Actor>::Context: ToEnvelope<PgStore, M>,
    {
        match self {
            StoreAddr::Sqlite(a) => a.do_send(msg),
            StoreAddr::Postgres(a) => a.do_send(msg),
        }
    }

    /// The shared store, when this node has one (leases, kept uploads).
    pub fn shared(&self) -> Option<&Addr<PgStore>> {
        match self {
            StoreAddr::Sqlite(_) => None,
            StoreAddr::Postgres(a) => Some(a),
        }
    }
}

/// The row store, whichever engine keeps it. Cheap to clone.
#[derive(Clone)]
pub enum RowsAddr {
    /// `rows.db`, this node's own.
    Sqlite(Addr<RowStore>),
    /// PostgreSQL, shared by the cluster.
    Postgres(Addr<PgRows>),
}

impl RowsAddr {
    /// Hands a zone's rows over; the answer comes on the zone's own channel.
    pub fn store_zone(&self, zone: StoreZone) {
        match self {
            RowsAddr::Sqlite(a) => a.do_send(zone),
            RowsAddr::Postgres(a) => a.do_send(zone),
        }
    }

    /// A page of a tenant's rows for an export (`row_store::ExportRows`).
    pub async fn export_rows(
        &self,
        page: crate::db::row_store::ExportRows,
    ) -> Result<(Vec<crate::db::row_store::ExportRow>, Option<String>), StoreError> {
        let answer = match self {
            RowsAddr::Sqlite(a) => a.send(page).await,
            RowsAddr::Postgres(a) => a.send(page).await,
        };
        answer.map_err(|e| StoreError::new(e.to_string()))?
    }

    /// A job's stored zone reports.
    pub fn zone_reports(
        &self,
        job_id: String,
    ) -> impl std::future::Future<Output = Result<Result<Vec<(u64, crate::protocol::ZoneReport)>, StoreError>, MailboxError>>
    {
        match self {
            RowsAddr::Sqlite(a) => Either::Left(a.send(ZoneReports(job_id))),
            RowsAddr::Postgres(a) => Either::Right(a.send(ZoneReports(job_id))),
        }
    }
}

/// Opens (creating and migrating when needed) both databases of `location`: first the row store,
/// which takes over the rows and zone reports a version-1 main database kept (copying again is
/// harmless, and a newer main database has none), then the main store, whose migration 2 drops them.
/// Opening may block: it is done once, before anything is accepted.
pub fn open(location: &Location) -> Result<(Store, RowStore), StoreError> {
    let mut rows = RowStore::open(location)?;
    rows.adopt_legacy(location)?;
    let store = Store::open(location)?;
    Ok((store, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::row_store::Row;
    use rusqlite::Connection;

    fn row(line: u64, key: u8) -> Row {
        Row { line, date: "2024-01-01".into(), cents: 1, description: "d".into(), category: "c".into(), key: [key; 16] }
    }

    #[test]
    fn rows_of_an_older_main_database_move_to_the_row_store() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::file(dir.path().join("jobcast.db"));
        {
            // A main database as version 1 left it, with one zone of two rows.
            let conn = Connection::open(dir.path().join("jobcast.db")).unwrap();
            conn.execute_batch(store::LEGACY_V1).unwrap();
            conn.execute_batch(
                "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);
                 INSERT INTO zones VALUES ('j', 0, '{\"inserted\":2}');
                 INSERT INTO transactions (tenant, key, job_id, line, date, amount_cents, description, category)
                 VALUES ('t', x'01010101010101010101010101010101', 'j', 2, '2024-01-01', 1, 'd', 'c'),
                        ('t', x'02020202020202020202020202020202', 'j', 3, '2024-01-01', 1, 'd', 'c');",
            )
            .unwrap();
        }
        let (_, mut rows) = open(&loc).unwrap();
        assert_eq!(rows.row_count("t").unwrap(), 2);
        assert_eq!(rows.adopt_legacy(&loc).unwrap(), 0, "the main store dropped the old tables");
        assert_eq!(rows.zone_reports("j").unwrap()[0].1.inserted, 2);
        // The moved rows still deduplicate what comes after them.
        let report = rows.write_zone("j2", "t", 0, &[row(2, 1), row(3, 3)], Default::default()).unwrap();
        rows.commit_group();
        assert_eq!(report.inserted, 1);
        assert_eq!(rows.row_count("t").unwrap(), 3);
        drop(rows);
        // Opening again copies nothing twice.
        let (_, mut rows) = open(&loc).unwrap();
        assert_eq!(rows.row_count("t").unwrap(), 3);
    }
}
