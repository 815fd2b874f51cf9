//! The `Retention` actor: removes the downloadable files of jobs (`data_dir/downloads/<job>/`) once
//! they are older than `retention_s`, checking every tenth of that (at least once a second, at most
//! every ten minutes). The walk runs on `spawn_blocking`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use actix::prelude::*;

/// The retention actor.
pub struct Retention {
    dir: PathBuf,
    keep: Duration,
}

impl Retention {
    /// Keeps the files under `dir` for `keep`.
    pub fn new(dir: PathBuf, keep: Duration) -> Retention {
        Retention { dir, keep }
    }

    fn sweep(&self, ctx: &mut Context<Self>) {
        let (dir, keep) = (self.dir.clone(), self.keep);
        let work = tokio::task::spawn_blocking(move || remove_older(&dir, keep));
        ctx.spawn(
            async move {
                match work.await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "job files past retention_s removed"),
                    Err(e) => tracing::warn!(error = %e, "job files not swept"),
                }
            }
            .into_actor(self),
        );
    }
}

/// Removes every job directory under `dir` last changed more than `keep` ago; answers how many.
pub fn remove_older(dir: &std::path::Path, keep: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| now.duration_since(t).unwrap_or_default() > keep)
            .unwrap_or(false);
        if old && entry.file_type().is_ok_and(|t| t.is_dir()) && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

impl Actor for Retention {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every = (self.keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
        self.sweep(ctx);
        ctx.run_interval(every, |r, ctx| r.sweep(ctx));
    }
}
