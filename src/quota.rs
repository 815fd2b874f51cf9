//! Per-tenant quotas and the free-disk floor: what one tenant may make the server hold, checked
//! before an upload's body is read and again while it is read, so no tenant fills the disk or the
//! run queue for the others.
//!
//! - `max_queued_jobs_per_tenant`: uploads being received plus the tenant's jobs that are queued or
//!   running. An [`Admission`] is taken when an upload begins and lives with its job until the job
//!   actor ends, so the count is exact (no window between two uploads' checks).
//! - `max_upload_bytes_per_tenant`: the bytes of those uploads (the declared length first, then what
//!   arrived), i.e. the upload files the tenant has on the server's disk at once.
//! - `max_stored_rows_per_tenant`: imported rows kept for the tenant. The row store enforces it in the
//!   zone's own transaction (a zone that would go past it fails, and with it the job); this module
//!   holds the committed counts so an upload from a tenant already at the limit is refused up front.
//! - `min_free_disk_bytes`: free space that must remain on the data directory's file system after an
//!   upload; checked before the body is read (with the declared length) and as it arrives.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Config;

/// The limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `max_queued_jobs_per_tenant`.
    pub jobs: usize,
    /// `max_upload_bytes_per_tenant`.
    pub upload_bytes: u64,
    /// `max_stored_rows_per_tenant`.
    pub rows: u64,
    /// `min_free_disk_bytes`.
    pub min_free_disk: u64,
}

impl Limits {
    /// The limits `config` sets.
    pub fn of(config: &Config) -> Limits {
        Limits {
            jobs: config.max_queued_jobs_per_tenant,
            upload_bytes: config.max_upload_bytes_per_tenant,
            rows: config.max_stored_rows_per_tenant,
            min_free_disk: config.min_free_disk_bytes,
        }
    }
}

/// Why an upload (or a zone's rows) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exceeded {
    #[error("tenant {tenant} has {max} jobs queued or running or being uploaded (max_queued_jobs_per_tenant); retry when one has finished")]
    Jobs { tenant: String, max: usize },
    #[error(
        "tenant {tenant} would hold more than {max} bytes of uploads not yet processed (max_upload_bytes_per_tenant)"
    )]
    UploadBytes { tenant: String, max: u64 },
    #[error("tenant {tenant} would store more than {max} rows (max_stored_rows_per_tenant)")]
    Rows { tenant: String, max: u64 },
    #[error("not enough free disk space: {free} bytes free, {needed} needed to keep min_free_disk_bytes free")]
    Disk { free: u64, needed: u64 },
}

impl Exceeded {
    /// Whether this is the server's disk rather than a tenant's quota (507 rather than 429).
    pub fn is_disk(&self) -> bool {
        matches!(self, Exceeded::Disk { .. })
    }
}

#[derive(Default, Debug, Clone, Copy)]
struct Usage {
    jobs: usize,
    bytes: u64,
}

/// Every tenant's usage; shared by the upload endpoint, the jobs and the row store.
#[derive(Debug)]
pub struct Quotas {
    limits: Limits,
    usage: Mutex<HashMap<String, Usage>>,
    /// Committed rows per tenant, as the row store last reported them.
    rows: Mutex<HashMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still holds consistent counts.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Quotas {
    /// Quotas with these limits and no usage.
    pub fn new(limits: Limits) -> Arc<Quotas> {
        Arc::new(Quotas { limits, usage: Mutex::default(), rows: Mutex::default() })
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// A new upload of `tenant` that says it brings `declared` bytes (0 when it does not say).
    pub fn admit(self: &Arc<Self>, tenant: &str, declared: u64) -> Result<Admission, Exceeded> {
        if self.stored_rows(tenant) >= self.limits.rows {
            return Err(Exceeded::Rows { tenant: tenant.into(), max: self.limits.rows });
        }
        let mut usage = lock(&self.usage);
        let u = usage.entry(tenant.to_string()).or_default();
        if u.jobs >= self.limits.jobs {
            return Err(Exceeded::Jobs { tenant: tenant.into(), max: self.limits.jobs });
        }
        if u.bytes.saturating_add(declared) > self.limits.upload_bytes {
            return Err(Exceeded::UploadBytes { tenant: tenant.into(), max: self.limits.upload_bytes });
        }
        u.jobs += 1;
        u.bytes += declared;
        Ok(Admission { quotas: self.clone(), tenant: tenant.into(), bytes: declared, on_release: None })
    }

    /// A job resumed after a restart: counted, never refused (it was admitted before).
    pub fn resumed(self: &Arc<Self>, tenant: &str, bytes: u64) -> Admission {
        let mut usage = lock(&self.usage);
        let u = usage.entry(tenant.to_string()).or_default();
        u.jobs += 1;
        u.bytes = u.bytes.saturating_add(bytes);
        Admission { quotas: self.clone(), tenant: tenant.into(), bytes, on_release: None }
    }

    /// Rows `tenant` has committed.
    pub fn stored_rows(&self, tenant: &str) -> u64 {
        lock(&self.rows).get(tenant).copied().unwrap_or(0)
    }

    /// The row store's committed count for `tenant`.
    pub fn set_stored_rows(&self, tenant: &str, rows: u64) {
        lock(&self.rows).insert(tenant.to_string(), rows);
    }

    /// Uploads and jobs `tenant` holds, and their bytes.
    #[cfg(test)]
    pub fn usage(&self, tenant: &str) -> (usize, u64) {
        lock(&self.usage).get(tenant).map(|u| (u.jobs, u.bytes)).unwrap_or((0, 0))
    }

    fn release(&self, tenant: &str, bytes: u64) {
        let mut usage = lock(&self.usage);
        if let Some(u) = usage.get_mut(tenant) {
            u.jobs = u.jobs.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(bytes);
            if u.jobs == 0 {
                usage.remove(tenant);
            }
        }
    }
}

/// Told the bytes an admission held when it is given back (cluster mode gives back its share in Redis).
pub type OnRelease = Box<dyn FnOnce(u64) + Send + Sync>;

/// One upload's (then one job's) share of its tenant's quota, given back when dropped.
pub struct Admission {
    quotas: Arc<Quotas>,
    tenant: String,
    bytes: u64,
    on_release: Option<OnRelease>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("tenant", &self.tenant).field("bytes", &self.bytes).finish()
    }
}

impl Admission {
    /// Also calls `f` with the bytes held when given back.
    pub fn on_release(&mut self, f: OnRelease) {
        self.on_release = Some(f);
    }

    /// The bytes counted for it now.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The upload has brought `bytes` so far: counts them (when above what was declared), refusing
    /// once the tenant's upload bytes would pass the limit.
    pub fn grow_to(&mut self, bytes: u64) -> Result<(), Exceeded> {
        if bytes <= self.bytes {
            return Ok(());
        }
        let mut usage = lock(&self.quotas.usage);
        let u = usage.entry(self.tenant.clone()).or_default();
        let more = bytes - self.bytes;
        if u.bytes.saturating_add(more) > self.quotas.limits.upload_bytes {
            return Err(Exceeded::UploadBytes { tenant: self.tenant.clone(), max: self.quotas.limits.upload_bytes });
        }
        u.bytes += more;
        self.bytes = bytes;
        Ok(())
    }

    /// The upload is complete at `bytes` (less than declared gives the rest back).
    pub fn settle(&mut self, bytes: u64) {
        if bytes < self.bytes {
            let mut usage = lock(&self.quotas.usage);
            if let Some(u) = usage.get_mut(&self.tenant) {
                u.bytes = u.bytes.saturating_sub(self.bytes - bytes);
            }
            self.bytes = bytes;
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.quotas.release(&self.tenant, self.bytes);
        if let Some(f) = self.on_release.take() {
            f(self.bytes);
        }
    }
}

/// Bytes free for unprivileged use on the file system of `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(dir)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Whether `more` bytes can still be written under `dir` leaving `min_free` free. Blocking (one
/// `statvfs`): call it off the arbiters.
pub fn check_disk(dir: &Path, more: u64, min_free: u64) -> Result<(), Exceeded> {
    let free = free_bytes(dir).map_err(|_| Exceeded::Disk { free: 0, needed: more.saturating_add(min_free) })?;
    let needed = more.saturating_add(min_free);
    if free < needed {
        return Err(Exceeded::Disk { free, needed });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(jobs: usize, upload_bytes: u64, rows: u64) -> Arc<Quotas> {
        Quotas::new(Limits { jobs, upload_bytes, rows, min_free_disk: 0 })
    }

    #[test]
    fn admissions_count_jobs_and_bytes_until_dropped() {
        let q = quotas(2, 100, 10);
        let a = q.admit("t", 60).unwrap();
        assert!(matches!(q.admit("t", 50), Err(Exceeded::UploadBytes { .. })), "60 + 50 > 100");
        let mut b = q.admit("t", 0).unwrap();
        assert!(matches!(q.admit("t", 0), Err(Exceeded::Jobs { max: 2, .. })));
        assert!(q.admit("other", 100).is_ok(), "another tenant has its own quota");
        assert!(b.grow_to(40).is_ok());
        assert!(matches!(b.grow_to(41), Err(Exceeded::UploadBytes { .. })));
        assert_eq!(q.usage("t"), (2, 100));
        drop(a);
        assert_eq!(q.usage("t"), (1, 40));
        b.settle(10);
        assert_eq!(q.usage("t"), (1, 10));
        drop(b);
        assert_eq!(q.usage("t"), (0, 0));
    }

    #[test]
    fn a_tenant_at_its_row_limit_is_refused_and_resumed_jobs_always_count() {
        let q = quotas(1, 100, 10);
        q.set_stored_rows("t", 10);
        assert!(matches!(q.admit("t", 0), Err(Exceeded::Rows { max: 10, .. })));
        q.set_stored_rows("t", 9);
        let _resumed = q.resumed("t", 500);
        assert_eq!(q.usage("t"), (1, 500));
        assert!(matches!(q.admit("t", 0), Err(Exceeded::Jobs { .. })));
    }

    #[test]
    fn the_disk_check_reads_the_file_system() {
        let dir = std::env::temp_dir();
        let free = free_bytes(&dir).unwrap();
        assert!(free > 0);
        assert!(check_disk(&dir, 0, 0).is_ok());
        assert!(matches!(check_disk(&dir, free, u64::MAX / 2), Err(Exceeded::Disk { .. })));
    }
}
