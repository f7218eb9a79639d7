//! The restore plan: pure, computed from the catalog before anything touches disk.

use chrono::{DateTime, Utc};

use crate::input_err;
use crate::repo::catalog::PgCatalog;
use crate::repo::manifest::BaseBackup;
use crate::timespec::show;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Time(DateTime<Utc>),
    Latest,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PgPlan {
    pub backup: BaseBackup,
    pub target: Target,
    pub timeline: u32,
    pub first_wal: String,
    pub last_wal: String,
    pub segments: u64,
    /// The latest instant the archived WAL reaches from this backup.
    pub reachable_until: DateTime<Utc>,
}

impl PgPlan {
    pub fn describe(&self) -> String {
        let target = match self.target {
            Target::Time(t) => format!("target time {} (UTC)", show(t)),
            Target::Latest => format!(
                "latest archived WAL (until about {})",
                show(self.reachable_until)
            ),
        };
        format!(
            "restore plan: base backup {} (consistent at {}), then WAL {}..{} ({} segments, timeline {}), to the {}",
            self.backup.id,
            show(self.backup.stop_time),
            self.first_wal,
            self.last_wal,
            self.segments,
            self.timeline,
            target
        )
    }
}

/// Picks the backup and WAL range for `target`, or says why the archive cannot reach it.
pub fn plan_pg(cat: &PgCatalog, target: Target) -> anyhow::Result<PgPlan> {
    let Some(first) = cat.backups.first() else {
        return Err(input_err!(
            "no base backups for cluster {} in the repository: run `dbagent backup` first",
            cat.system_identifier
        ));
    };
    let backup = match target {
        Target::Latest => cat.backups.last().expect("checked non-empty"),
        Target::Time(t) => cat
            .backups
            .iter()
            .rev()
            .find(|b| b.stop_time <= t)
            .ok_or_else(|| {
                input_err!(
                    "target {} is before the first backup became consistent: the earliest restorable time is {}",
                    show(t),
                    show(first.stop_time)
                )
            })?,
    };
    let reach = cat.reach(backup);
    let Some(last) = reach.last.filter(|_| reach.consistent) else {
        let missing = reach.gap.clone().unwrap_or_else(|| backup.stop_wal.clone());
        return Err(input_err!(
            "backup {} cannot be restored: WAL segment {missing} that it needs is missing from the archive",
            backup.id
        ));
    };
    let until = reach
        .end_time
        .expect("a consistent chain has segments")
        .max(backup.stop_time);
    match (target, &reach.gap) {
        (Target::Time(t), Some(gap)) if t > until => {
            return Err(input_err!(
                "target {} is past a gap in the archived WAL: segment {gap} is missing, so a restore from backup {} reaches at most {}",
                show(t),
                backup.id,
                show(until)
            ));
        }
        (Target::Time(t), None) if t > until => {
            return Err(input_err!(
                "target {} is beyond the archived WAL: the latest restorable time is {}",
                show(t),
                show(until)
            ));
        }
        (Target::Latest, Some(gap)) => {
            return Err(input_err!(
                "segment {gap} is missing from the archived WAL, so --latest would stop silently before later WAL: restore with --at up to {} instead",
                show(until)
            ));
        }
        _ => {}
    }
    let first_seg = backup.start_lsn.0 / cat.seg_size;
    Ok(PgPlan {
        backup: backup.clone(),
        target,
        timeline: reach.timeline,
        first_wal: backup.start_wal.clone(),
        last_wal: last.name(cat.seg_size),
        segments: last.segno - first_seg + 1,
        reachable_until: until,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::catalog::tests::{backup, catalog, t};

    fn err(c: &PgCatalog, target: Target) -> String {
        let e = plan_pg(c, target).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 1);
        e.to_string()
    }

    #[test]
    fn picks_newest_backup_before_target() {
        let c = catalog(
            vec![
                backup("b1", 2, 3, "00:03:30"),
                backup("b2", 6, 6, "00:06:30"),
            ],
            &[2, 3, 4, 5, 6, 7, 8, 9],
        );
        let p = plan_pg(&c, Target::Time(t("00:05:00"))).unwrap();
        assert_eq!(p.backup.id, "b1");
        let p = plan_pg(&c, Target::Time(t("00:07:00"))).unwrap();
        assert_eq!(p.backup.id, "b2");
        assert_eq!(p.last_wal, "000000010000000000000009");
        assert_eq!(p.segments, 4);
        let p = plan_pg(&c, Target::Latest).unwrap();
        assert_eq!(p.backup.id, "b2");
    }

    #[test]
    fn refusals() {
        let c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2, 3, 4, 5, 7]);
        assert!(err(&c, Target::Time(t("00:01:00"))).contains("before the first backup"));
        assert!(err(&c, Target::Time(t("00:06:00"))).contains("gap"));
        assert!(err(&c, Target::Latest).contains("000000010000000000000006"));
        let c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2, 3, 4]);
        assert!(err(&c, Target::Time(t("00:09:00"))).contains("beyond the archived WAL"));
        assert!(plan_pg(&c, Target::Time(t("00:04:00"))).is_ok());
        let c = catalog(vec![], &[2, 3]);
        assert!(err(&c, Target::Latest).contains("no base backups"));
        let c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2]);
        assert!(err(&c, Target::Latest).contains("000000010000000000000003"));
    }
}
