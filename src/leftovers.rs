//! What killed uploads leave behind, and its removal by `prune`.
//!
//! A process killed mid-upload never gets to clean up: a local repository keeps its hidden
//! temp file (`.dbagent-tmp-*`), an S3 bucket keeps the parts of its multipart upload. Neither
//! is visible to listings, and both cost storage forever. `prune` removes those older than
//! `retention.incomplete_after` (an upload younger than that may still be running).

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::storage::{Leftover, Store};

/// What a sweep found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sweep {
    /// Old enough to go (removed unless this was a dry run).
    pub old: Vec<Leftover>,
    /// Young enough that the upload may still be running: kept.
    pub young: usize,
    pub older_than: Duration,
    pub dry_run: bool,
}

impl Sweep {
    pub fn describe(&self) -> String {
        let age = humantime::format_duration(self.older_than);
        let mut out = String::from("unfinished uploads:\n");
        if self.old.is_empty() {
            out.push_str(&format!("  none older than {age}\n"));
        } else {
            let bytes: u64 = self.old.iter().filter_map(|l| l.size).sum();
            let size = if bytes > 0 {
                format!(", {}", crate::restore::human(bytes))
            } else {
                String::new()
            };
            out.push_str(&format!(
                "  {} {} older than {age}{size}\n",
                if self.dry_run {
                    "would delete"
                } else {
                    "deleted"
                },
                self.old.len()
            ));
            for l in &self.old {
                out.push_str(&format!(
                    "    {} (started {})\n",
                    l.key,
                    crate::timespec::show(l.started)
                ));
            }
        }
        if self.young > 0 {
            out.push_str(&format!(
                "  keep {} younger than {age} (may still be running)\n",
                self.young
            ));
        }
        out
    }
}

/// Splits leftovers into those old enough to remove and the count of the rest.
pub fn plan(
    found: Vec<Leftover>,
    now: DateTime<Utc>,
    older_than: Duration,
) -> (Vec<Leftover>, usize) {
    let before = crate::prune::before(now, older_than);
    let (old, young): (Vec<_>, Vec<_>) = found.into_iter().partition(|l| l.started < before);
    (old, young.len())
}

/// Finds the repository's unfinished uploads and removes those older than `older_than`.
pub async fn sweep(
    store: &dyn Store,
    older_than: Duration,
    now: DateTime<Utc>,
    dry_run: bool,
) -> anyhow::Result<Sweep> {
    let (old, young) = plan(store.leftovers().await?, now, older_than);
    if !dry_run {
        for l in &old {
            store.remove_leftover(l).await?;
        }
    }
    Ok(Sweep {
        old,
        young,
        older_than,
        dry_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftover(key: &str, hours_ago: i64, now: DateTime<Utc>) -> Leftover {
        Leftover {
            key: key.into(),
            id: key.into(),
            started: now - chrono::Duration::hours(hours_ago),
            size: Some(10),
        }
    }

    #[test]
    fn only_old_leftovers_go() {
        let now = Utc::now();
        let found = vec![
            leftover("a", 30, now),
            leftover("b", 1, now),
            leftover("c", 25, now),
        ];
        let (old, young) = plan(found, now, Duration::from_secs(24 * 3600));
        let keys: Vec<&str> = old.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ["a", "c"]);
        assert_eq!(young, 1);
        // An upload that started this very moment is kept even with a zero age.
        let (old, young) = plan(vec![leftover("d", 0, now)], now, Duration::ZERO);
        assert_eq!((old.len(), young), (0, 1));
    }

    #[tokio::test]
    async fn a_sweep_removes_old_temp_files_and_keeps_running_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::LocalStore::new(dir.path().to_path_buf());
        for key in [
            "pg/1/backups/x/base.tar.zst",
            "pg/1/wal/000000010000000000000001.zst",
        ] {
            let mut up = store.start_upload(key).await.unwrap();
            up.put_part(bytes::Bytes::from_static(b"partial"))
                .await
                .unwrap();
            std::mem::forget(up); // killed
        }
        let later = Utc::now() + chrono::Duration::hours(2);
        let dry = sweep(&store, Duration::from_secs(3600), later, true)
            .await
            .unwrap();
        assert_eq!(dry.old.len(), 2);
        assert!(
            dry.describe().contains("would delete 2"),
            "{}",
            dry.describe()
        );
        assert_eq!(store.leftovers().await.unwrap().len(), 2);
        let kept = sweep(&store, Duration::from_secs(3600), Utc::now(), false)
            .await
            .unwrap();
        assert_eq!((kept.old.len(), kept.young), (0, 2));
        let done = sweep(&store, Duration::from_secs(3600), later, false)
            .await
            .unwrap();
        assert_eq!(done.old.len(), 2);
        assert!(store.leftovers().await.unwrap().is_empty());
    }
}
