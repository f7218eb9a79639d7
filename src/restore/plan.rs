//! The restore plan: pure, computed from the catalog before anything touches disk.

use chrono::{DateTime, Utc};

use crate::input_err;
use crate::repo::catalog::{PgCatalog, Reach};
use crate::repo::manifest::BaseBackup;
use crate::repo::wal::{Lsn, Segment};
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
    /// The timeline recovery follows, written into the recovery settings.
    pub timeline: u32,
    /// Why this timeline, when the repository held a choice (a fork, or `--timeline`).
    pub timeline_choice: Option<String>,
    /// The repository holds the timeline's history file. Without one (a cluster that was
    /// already on it when it began archiving here) PostgreSQL cannot be given its number,
    /// only `'current'`, which is the backup's own timeline and so the same one.
    pub timeline_has_history: bool,
    /// The restored server replaces production and archives into the repository; otherwise
    /// it archives nothing.
    pub as_primary: bool,
    /// The restored server is a standby (`--standby`): `standby.signal`, it follows the
    /// archive (and its primary) and never promotes by itself.
    pub standby: bool,
    pub first_wal: String,
    pub last_wal: String,
    /// Where the WAL ends inside `last_wal` when that is an older timeline's copy read only up
    /// to where the timeline left the path (`Reach::cut`).
    pub wal_end: Option<Lsn>,
    pub segments: u64,
    /// The latest instant the archived WAL reaches from this backup.
    pub reachable_until: DateTime<Utc>,
    /// Where the archived WAL ends, read from `last_wal` before anything is written
    /// (`restore::read_archive_end`): a `--latest` recovery must get there. None for a time
    /// target and a standby.
    pub archive_end: Option<ArchiveEnd>,
}

/// The end of the archived WAL along a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveEnd {
    /// The end of the last whole record, as `pg_last_wal_replay_lsn()` reports it.
    pub end: Lsn,
    /// Where that record begins: `recovery_target_lsn` (inclusive), so that PostgreSQL
    /// refuses to promote short of it. Unknown when it began in the segment before.
    pub last_record: Option<Lsn>,
}

impl PgPlan {
    /// The WAL this plan replays, to where the chain from its backup reaches (`last`).
    fn set_span(&mut self, cat: &PgCatalog, last: Segment, reach: &Reach) {
        self.last_wal = last.name(cat.seg_size);
        self.wal_end = reach.cut;
        self.segments = last.segno - self.backup.start_lsn.0 / cat.seg_size + 1;
        if let Some(t) = reach.end_time {
            self.reachable_until = t.max(self.backup.stop_time);
        }
    }

    /// This plan with its WAL span as `cat` holds it now (same backup, same timeline): a
    /// `--latest` restore's archive may have grown since it was planned. None when the chain
    /// is broken or has a gap.
    pub fn along(&self, cat: &PgCatalog) -> Option<PgPlan> {
        let reach = cat.reach_on(&self.backup, self.timeline);
        let last = reach
            .last
            .filter(|_| reach.consistent && reach.gap.is_none())?;
        let mut plan = self.clone();
        plan.set_span(cat, last, &reach);
        Some(plan)
    }

    /// The value of `recovery_target_timeline`: the chosen timeline, never `'latest'`.
    pub fn recovery_target_timeline(&self) -> String {
        if self.standby {
            // A standby follows its primary onto whatever timeline that is on.
            return "latest".into();
        }
        if self.timeline == 1 || self.timeline_has_history {
            self.timeline.to_string()
        } else {
            "current".into()
        }
    }

    /// The whole plan for people: the summary, how the timeline was chosen, and whether the
    /// restored server archives.
    pub fn render(&self) -> String {
        let mut out = self.describe();
        if let Some(choice) = &self.timeline_choice {
            out.push_str(&format!("\n{choice}"));
        }
        out.push('\n');
        out.push_str(if self.standby {
            "the restored server is a standby (--standby): standby.signal; it replays the archive with dbagent wal-fetch and streams from the primary named by its primary_conninfo, never promotes by itself, and keeps the backup's archive settings for the day it is promoted"
        } else if self.as_primary {
            "the restored server is the new primary (--as-primary): it archives its new timeline into this repository as production did; stop the old primary for good first"
        } else {
            "the restored server is a copy: archive_mode = off, so it writes nothing into this repository and production's history stays as it is (--as-primary for a server that replaces production)"
        });
        out
    }

    /// The one-line summary.
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

/// The backups `b` builds on that the repository no longer lists, for messages.
fn missing_deps(cat: &PgCatalog, b: &BaseBackup) -> String {
    let gone: Vec<&str> = b
        .depends_on()
        .iter()
        .filter(|d| !cat.backups.iter().any(|o| &o.id == *d))
        .map(String::as_str)
        .collect();
    match gone.as_slice() {
        [] => "a backup".to_string(),
        [one] => format!("backup {one}"),
        many => format!("backups {}", many.join(", ")),
    }
}

/// Picks the timeline, backup and WAL range for `target`, or says why the archive cannot
/// reach it. `timeline` is the operator's choice; without it, the branch that continues
/// production, and a refusal naming the branches when a fork leaves that open.
pub fn plan_pg(cat: &PgCatalog, target: Target, timeline: Option<u32>) -> anyhow::Result<PgPlan> {
    if cat.backups.is_empty() {
        return Err(input_err!(
            "no base backups for cluster {} in the repository: run `dbagent backup` first",
            cat.system_identifier
        ));
    }
    let (timeline, timeline_choice) = choose_timeline(cat, timeline)?;
    // A base kept only for an incremental's files has lost its own WAL: no restore point.
    let on: Vec<&BaseBackup> = cat
        .backups
        .iter()
        .filter(|b| cat.backup_on(b, timeline) && cat.kept_as_base_of(b).is_none())
        .collect();
    let Some(first) = on.first() else {
        return Err(input_err!(
            "no base backup lies on timeline {timeline}'s history (the backups are on timeline(s) {}): choose another --timeline",
            list(cat.backups.iter().map(|b| b.timeline))
        ));
    };
    let candidates: Vec<&BaseBackup> = match target {
        Target::Latest => on.iter().rev().copied().collect(),
        Target::Time(t) => on
            .iter()
            .rev()
            .copied()
            .filter(|b| b.stop_time <= t)
            .collect(),
    };
    let Some(newest) = candidates.first() else {
        let Target::Time(t) = target else {
            unreachable!("--latest has every backup on the timeline")
        };
        return Err(input_err!(
            "target {} is before the first backup became consistent: the earliest restorable time is {}",
            show(t),
            show(first.stop_time)
        ));
    };
    // An incremental whose chain lost a backup (deleted by hand or by a bucket lifecycle
    // rule; prune never does it) cannot be restored; an older backup whose chain is whole
    // reaches the same target through the WAL, as it would have before the incremental.
    let Some(backup) = candidates.iter().copied().find(|b| cat.chain_complete(b)) else {
        return Err(input_err!(
            "backup {} cannot be restored: it builds on {}, missing from the repository, and no older backup before the target can be restored either",
            newest.id,
            missing_deps(cat, newest)
        ));
    };
    for skipped in candidates.iter().take_while(|b| b.id != backup.id) {
        tracing::warn!(
            skipped = %skipped.id,
            used = %backup.id,
            "backup {} builds on {}, missing from the repository: restoring from the older backup {} and its WAL instead",
            skipped.id,
            missing_deps(cat, skipped),
            backup.id
        );
    }
    let reach = cat.reach_on(backup, timeline);
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
    // PostgreSQL ends a time-targeted recovery at the first transaction stamped after the
    // target and refuses to promote without one: with none since the backup, no time can be
    // reached, not even its consistency point (which `until` never falls below). Only the
    // notes' word counts: an upload time or a cut chain is no proof of silence.
    let silent_since = reach.end_known && reach.end_time.is_some_and(|e| e < backup.stop_time);
    match (target, &reach.gap) {
        (Target::Time(_), gap) if silent_since => {
            return Err(input_err!(
                "no transaction has committed since backup {} became consistent at {}, and a time target needs one after it to stop at{}",
                backup.id,
                show(backup.stop_time),
                match gap {
                    None => "; --latest restores everything archived".to_string(),
                    Some(g) => format!(" (before segment {g}, missing from the archive)"),
                }
            ));
        }
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
                "target {} is beyond the archived WAL: the latest restorable time is {}; --latest restores everything archived",
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
    let mut plan = PgPlan {
        backup: backup.clone(),
        target,
        timeline,
        timeline_choice,
        timeline_has_history: cat.histories.contains_key(&timeline),
        as_primary: false,
        standby: false,
        first_wal: backup.start_wal.clone(),
        last_wal: String::new(),
        wal_end: None,
        segments: 0,
        reachable_until: until,
        archive_end: None,
    };
    plan.set_span(cat, last, &reach);
    Ok(plan)
}

/// The timeline to follow, and a sentence for the plan when there was a choice.
fn choose_timeline(cat: &PgCatalog, asked: Option<u32>) -> anyhow::Result<(u32, Option<String>)> {
    let branches = cat.branches();
    if let Some(n) = asked {
        let known = cat.timelines();
        if !known.contains_key(&n) {
            return Err(input_err!(
                "timeline {n} is not in the repository: it holds timeline(s) {}",
                list(known.keys().copied())
            ));
        }
        let mut note = format!("timeline {n} chosen with --timeline");
        if branches.forks() > 0 {
            note.push_str(&format!(
                "; the archived history has forked: {}",
                branches.describe(cat).join("; ")
            ));
        }
        return Ok((n, Some(note)));
    }
    match branches.production {
        Some(p) if branches.forks() == 0 => Ok((p, None)),
        Some(p) => {
            let others: Vec<String> = branches
                .describe(cat)
                .into_iter()
                .zip(&branches.branches)
                .filter(|(_, b)| b.timeline != p)
                .map(|(line, _)| line)
                .collect();
            Ok((
                p,
                Some(format!(
                    "the archived history has forked: timeline {p} continues production (the only branch archived after they parted); another branch: {} (restore it with --timeline N)",
                    others.join("; ")
                )),
            ))
        }
        None if branches.branches.is_empty() => {
            Ok((cat.backups.last().map_or(1, |b| b.timeline), None))
        }
        None => Err(input_err!(
            "the archived history has forked and every branch was archived after they parted, so which one continues production is not clear: {}; choose one with {}",
            branches.describe(cat).join("; "),
            branches
                .branches
                .iter()
                .map(|b| format!("--timeline {}", b.timeline))
                .collect::<Vec<_>>()
                .join(" or ")
        )),
    }
}

fn list(items: impl Iterator<Item = u32>) -> String {
    let mut v: Vec<u32> = items.collect();
    v.sort();
    v.dedup();
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::catalog::tests::{
        SEG, add_seg, add_timeline, backup, catalog, incremental, t,
    };
    use crate::repo::wal::Segment;

    fn err(c: &PgCatalog, target: Target) -> String {
        let e = plan_pg(c, target, None).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 1);
        e.to_string()
    }

    #[test]
    fn a_base_kept_only_for_an_incremental_is_no_restore_point() {
        // Prune kept the full backup for the incremental's files and took its WAL.
        let c = catalog(
            vec![
                backup("full", 2, 3, "00:03:30"),
                incremental("inc", 6, "00:06:30", &["full"]),
            ],
            &[6, 7],
        );
        assert_eq!(
            c.kept_as_base_of(&c.backups[0]).map(|b| b.id.as_str()),
            Some("inc")
        );
        assert_eq!(c.kept_as_base_of(&c.backups[1]), None);
        let e = plan_pg(&c, Target::Time(t("00:05:00")), None).unwrap_err();
        assert!(
            format!("{e}").contains("the earliest restorable time is 2026-11-23T00:06:30Z"),
            "{e}"
        );
        let p = plan_pg(&c, Target::Time(t("00:06:40")), None).unwrap();
        assert_eq!(p.backup.id, "inc");
        // WAL cut where no backup starts (a bucket lifecycle rule, a hand) is lost WAL: the
        // base is no note but a problem, and the incremental one too.
        let lost = catalog(c.backups.clone(), &[7]);
        assert_eq!(lost.kept_as_base_of(&lost.backups[0]), None);
        // With its WAL still there it is one.
        let c = catalog(c.backups.clone(), &[2, 3, 4, 5, 6, 7]);
        assert_eq!(c.kept_as_base_of(&c.backups[0]), None);
        assert_eq!(
            plan_pg(&c, Target::Time(t("00:05:00")), None)
                .unwrap()
                .backup
                .id,
            "full"
        );
    }

    /// The newest backup is an incremental whose base was deleted by hand: the older full
    /// backup and the WAL reach the same points. Before, the restore was refused, blaming a
    /// WAL segment that was there.
    #[test]
    fn an_incremental_that_lost_its_base_gives_way_to_an_older_backup() {
        let c = catalog(
            vec![
                backup("old", 2, 2, "00:02:30"),
                incremental("inc", 6, "00:06:30", &["gone"]),
            ],
            &[2, 3, 4, 5, 6, 7, 8, 9],
        );
        for target in [Target::Latest, Target::Time(t("00:07:00"))] {
            let p = plan_pg(&c, target, None).unwrap();
            assert_eq!(p.backup.id, "old");
            assert_eq!(p.last_wal, "000000010000000000000009");
        }
        // Nothing older to give way to: refused, naming what is missing.
        let c = catalog(
            vec![incremental("inc", 6, "00:06:30", &["gone"])],
            &[6, 7, 8, 9],
        );
        let e = err(&c, Target::Latest);
        assert!(e.contains("builds on backup gone, missing"), "{e}");
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
        let p = plan_pg(&c, Target::Time(t("00:05:00")), None).unwrap();
        assert_eq!(p.backup.id, "b1");
        let p = plan_pg(&c, Target::Time(t("00:07:00")), None).unwrap();
        assert_eq!(p.backup.id, "b2");
        assert_eq!(p.last_wal, "000000010000000000000009");
        assert_eq!(p.segments, 4);
        let p = plan_pg(&c, Target::Latest, None).unwrap();
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
        assert!(plan_pg(&c, Target::Time(t("00:04:00")), None).is_ok());
        let c = catalog(vec![], &[2, 3]);
        assert!(err(&c, Target::Latest).contains("no base backups"));
        let c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2]);
        assert!(err(&c, Target::Latest).contains("000000010000000000000003"));
    }

    /// A time target needs a commit after it: refused when the notes say none came since the
    /// backup, not when they cannot say (a segment without a readable note counts as its
    /// upload, whose clock is the store's).
    #[test]
    fn a_time_target_with_no_commit_since_the_backup_is_refused_on_the_notes_word_only() {
        let mut c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2, 3, 4]);
        c.last_xact.insert(Segment { tli: 1, segno: 4 }, None);
        c.last_xact.insert(Segment { tli: 1, segno: 3 }, None);
        c.last_xact
            .insert(Segment { tli: 1, segno: 2 }, Some(t("00:02:10")));
        let e = err(&c, Target::Time(t("00:03:30")));
        assert!(
            e.contains("no transaction has committed since backup b1"),
            "{e}"
        );
        assert!(e.contains("--latest"), "{e}");
        assert!(plan_pg(&c, Target::Latest, None).is_ok());
        // The last segment's note unread: its upload time stands, even one before the
        // backup's end by the store's clock (behind the backup host's), and the target passes.
        c.last_xact.remove(&Segment { tli: 1, segno: 4 });
        assert!(plan_pg(&c, Target::Time(t("00:03:30")), None).is_ok());
        c.backups[0].stop_time = t("00:04:30");
        assert!(plan_pg(&c, Target::Time(t("00:04:30")), None).is_ok());
        c.backups[0].stop_time = t("00:03:30");
        // A commit after the backup's end: reachable.
        c.last_xact
            .insert(Segment { tli: 1, segno: 4 }, Some(t("00:03:50")));
        assert!(plan_pg(&c, Target::Time(t("00:03:40")), None).is_ok());
    }

    /// Production on timeline 1 (segments 2..9, one a minute); a copy restored to the middle
    /// of segment 4 promoted onto timeline 2 at 00:03:30 and archived segments 4..6.
    fn forked() -> PgCatalog {
        let mut c = catalog(
            vec![
                backup("b1", 2, 2, "00:02:30"),
                backup("b2", 6, 6, "00:06:30"),
            ],
            &[2, 3, 4, 5, 6, 7, 8, 9],
        );
        add_timeline(&mut c, 2, 1, 4 * SEG + 0x500, "00:03:30");
        for n in 4..=6 {
            add_seg(&mut c, 2, n);
        }
        c
    }

    #[test]
    fn an_unsettled_fork_is_refused_naming_the_branches() {
        let c = forked();
        for target in [Target::Latest, Target::Time(t("00:05:00"))] {
            let e = err(&c, target);
            assert!(e.contains("forked"), "{e}");
            assert!(
                e.contains("timeline 1: WAL to 000000010000000000000009"),
                "{e}"
            );
            assert!(
                e.contains("timeline 2 (left timeline 1 at 0/4000500)"),
                "{e}"
            );
            assert!(e.contains("--timeline 1 or --timeline 2"), "{e}");
        }
    }

    #[test]
    fn timeline_chooses_a_branch() {
        let c = forked();
        let p = plan_pg(&c, Target::Latest, Some(1)).unwrap();
        assert_eq!((p.backup.id.as_str(), p.timeline), ("b2", 1));
        assert_eq!(p.last_wal, "000000010000000000000009");
        assert_eq!(p.recovery_target_timeline(), "1");
        let choice = p.timeline_choice.unwrap();
        assert!(
            choice
                .starts_with("timeline 1 chosen with --timeline; the archived history has forked")
        );
        // Backup b2 ended on timeline 1 after timeline 2 left it: not on timeline 2's path.
        let p = plan_pg(&c, Target::Latest, Some(2)).unwrap();
        assert_eq!((p.backup.id.as_str(), p.timeline), ("b1", 2));
        assert_eq!(p.last_wal, "000000020000000000000006");
        assert_eq!(p.recovery_target_timeline(), "2");
        assert!(
            err_with(&c, Target::Time(t("00:08:00")), Some(2)).contains("beyond the archived WAL")
        );
        let e = err_with(&c, Target::Latest, Some(7));
        assert!(
            e.contains("timeline 7 is not in the repository: it holds timeline(s) 1, 2"),
            "{e}"
        );
    }

    #[test]
    fn a_settled_fork_follows_production_and_says_so() {
        // Timeline 1 stopped being archived (00:09) long before timeline 2 began (00:20).
        let mut c = catalog(
            vec![backup("b1", 2, 2, "00:02:30")],
            &[2, 3, 4, 5, 6, 7, 8, 9],
        );
        add_timeline(&mut c, 2, 1, 4 * SEG + 0x500, "00:20:00");
        add_seg(&mut c, 2, 4);
        let seg = Segment { tli: 2, segno: 4 };
        c.segments.get_mut(&seg).unwrap().last_modified = t("00:21:00");
        let p = plan_pg(&c, Target::Latest, None).unwrap();
        assert_eq!(p.timeline, 2);
        assert_eq!(p.last_wal, "000000020000000000000004");
        let choice = p.timeline_choice.clone().unwrap();
        assert!(
            choice.contains("timeline 2 continues production"),
            "{choice}"
        );
        assert!(
            choice.contains("timeline 1: WAL to 000000010000000000000009"),
            "{choice}"
        );
        assert!(p.render().contains(&choice));
        assert!(
            p.render()
                .ends_with("(--as-primary for a server that replaces production)")
        );
    }

    #[test]
    fn a_timeline_without_its_history_file_is_named_current() {
        let mut c = PgCatalog {
            system_identifier: 1,
            seg_size: SEG,
            backups: vec![BaseBackup {
                timeline: 3,
                ..backup("b1", 2, 2, "00:02:30")
            }],
            ..Default::default()
        };
        for n in 2..=4 {
            add_seg(&mut c, 3, n);
        }
        let p = plan_pg(&c, Target::Latest, None).unwrap();
        assert_eq!(
            (p.timeline, p.recovery_target_timeline().as_str()),
            (3, "current")
        );
        assert_eq!(p.timeline_choice, None);
    }

    fn err_with(c: &PgCatalog, target: Target, timeline: Option<u32>) -> String {
        let e = plan_pg(c, target, timeline).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 1);
        e.to_string()
    }
}
