//! The MySQL/MariaDB restore plan: pure, computed from the catalog before anything is touched.
//!
//! Binlog event times have one-second resolution, and `mysqlbinlog --stop-datetime` stops at
//! the first event logged at or after the given second. A restore to T therefore replays the
//! transactions logged before T's whole second: nothing logged at or after T is ever replayed,
//! and transactions committed in the same second but before T are not replayed either.

use chrono::{DateTime, SubsecRound, Utc};

use crate::input_err;
use crate::repo::mysql::{MysqlCatalog, MysqlDump};
use crate::restore::plan::Target;
use crate::timespec::show;

#[derive(Debug, Clone, PartialEq)]
pub struct MysqlPlan {
    pub dump: MysqlDump,
    pub target: Target,
    /// Binlog files to replay, in order; the first is the dump's own file.
    pub binlogs: Vec<String>,
    /// Where replay starts in the first file.
    pub start_position: u64,
    /// `--stop-datetime` (UTC, whole seconds); None replays every archived event.
    pub stop_datetime: Option<DateTime<Utc>>,
    /// The latest instant the archived binlogs reach from this dump.
    pub reachable_until: Option<DateTime<Utc>>,
    /// The last of `binlogs` is the streamed prefix of a file not archived complete yet.
    pub streamed: bool,
}

impl MysqlPlan {
    pub fn describe(&self) -> String {
        let d = &self.dump;
        let dump = format!(
            "restore plan: {} dump {} of server {} ({}, consistent at {}, {} databases)",
            d.flavor,
            d.id,
            d.server_uuid,
            d.server_version,
            show(d.consistent_time),
            d.databases.len()
        );
        let binlogs = match (self.binlogs.first(), self.binlogs.last()) {
            (Some(first), Some(last)) => format!(
                ", then binlogs {first}..{last} ({} files) from position {}",
                self.binlogs.len(),
                self.start_position
            ),
            _ => ", no binlogs to replay".to_string(),
        };
        let binlogs = match (self.streamed, self.binlogs.last()) {
            (true, Some(last)) => format!("{binlogs}, {last} as streamed so far"),
            _ => binlogs,
        };
        let target = match (self.target, self.stop_datetime) {
            (Target::Time(t), Some(stop)) => format!(
                ", to the target time {} (UTC): transactions logged before {} are replayed",
                show(t),
                show(stop)
            ),
            _ => match self.reachable_until {
                Some(until) => format!(
                    ", to the latest archived binlog (until about {})",
                    show(until)
                ),
                None => ", to the dump's own snapshot (no binlogs archived after it)".to_string(),
            },
        };
        format!("{dump}{binlogs}{target}")
    }
}

/// How far apart the agent's clock (a dump's time) and the server's (binlog event times) may be.
const CLOCK_SLACK_SECONDS: i64 = 300;

/// The archived binlog that a dump starts from must be the file the dump saw: after `RESET
/// MASTER`, or a server rebuilt under the same identity, binlog names start again at
/// `.000001` and an older history's file can carry the dump's name. Replaying it would apply
/// another history's transactions.
fn check_same_history(
    cat: &MysqlCatalog,
    dump: &crate::repo::mysql::MysqlDump,
) -> anyhow::Result<()> {
    let Some(meta) = cat.binlogs.values().find(|m| m.name == dump.binlog.file) else {
        return Ok(());
    };
    let slack = chrono::Duration::seconds(CLOCK_SLACK_SECONDS);
    let ended_before = meta
        .last_event_time
        .is_some_and(|end| end + slack < dump.consistent_time);
    let began_after = meta
        .first_event_time
        .is_some_and(|first| first > dump.consistent_time + slack);
    if ended_before || began_after {
        return Err(input_err!(
            "the archived binlog {} (events {} .. {}) is not the one dump {} was taken in at {}: it belongs to another binlog history (RESET MASTER, or a server rebuilt under the same identity); give the current server its own identity with mysql.server_uuid and take a new dump",
            meta.name,
            meta.first_event_time
                .map(show)
                .unwrap_or_else(|| "?".into()),
            meta.last_event_time.map(show).unwrap_or_else(|| "?".into()),
            dump.id,
            show(dump.consistent_time)
        ));
    }
    Ok(())
}

/// Picks the dump and binlogs for `target`, or says why the archive cannot reach it.
pub fn plan_mysql(cat: &MysqlCatalog, target: Target) -> anyhow::Result<MysqlPlan> {
    let Some(first) = cat.dumps.first() else {
        return Err(input_err!(
            "no dumps of MySQL server {} in the repository: run `dbagent backup --engine mysql` first",
            cat.server_uuid
        ));
    };
    let dump = match target {
        Target::Latest => cat.dumps.last().expect("checked non-empty"),
        Target::Time(t) => cat
            .dumps
            .iter()
            .rev()
            .find(|d| d.consistent_time <= t)
            .ok_or_else(|| {
                input_err!(
                    "target {} is before the first dump: the earliest restorable time is {}",
                    show(t),
                    show(first.consistent_time)
                )
            })?,
    };
    check_same_history(cat, dump)?;
    let chain = cat.chain(&dump.binlog.file);
    let until = chain.end_time.map(|e| e.max(dump.consistent_time));
    let files = match target {
        Target::Time(t) => {
            let Some(until) = until else {
                return Err(match &chain.gap {
                    Some(gap) => input_err!(
                        "binlog {gap} that dump {} starts from is missing from the archive, so no target after the dump can be reached",
                        dump.id
                    ),
                    None => input_err!(
                        "target {} is beyond the archived binlogs: no binlog since dump {} has been archived yet (run `dbagent binlog-push`)",
                        show(t),
                        dump.id
                    ),
                });
            };
            // Replay stops at T's whole second, so the last archived second is reachable
            // to its end.
            if t.trunc_subsecs(0) > chain.end_time.expect("until is set from it") {
                if let Some(other) = &chain.other_history {
                    return Err(input_err!(
                        "target {} is past the end of dump {}'s binlog history, which reaches {}: {other}",
                        show(t),
                        dump.id,
                        show(until)
                    ));
                }
                return Err(match &chain.gap {
                    Some(gap) => input_err!(
                        "target {} is past a gap in the archived binlogs: {gap} is missing, so a restore from dump {} reaches at most {}",
                        show(t),
                        dump.id,
                        show(until)
                    ),
                    None => input_err!(
                        "target {} is beyond the archived binlogs: the latest restorable time is {}",
                        show(t),
                        show(until)
                    ),
                });
            }
            // Up to the first file that was still open at the target's second: later files
            // hold only transactions committed after it.
            let stop = t.trunc_subsecs(0);
            let ends: Vec<_> = chain
                .files
                .iter()
                .map(|f| cat.end_time_of(f).expect("chain files are in the catalog"))
                .collect();
            let last = ends
                .iter()
                .position(|end| *end >= stop)
                .unwrap_or(ends.len() - 1);
            chain.files[..=last].to_vec()
        }
        Target::Latest => {
            if let Some(other) = &chain.other_history {
                return Err(input_err!(
                    "{other}; which history is production's cannot be told from the repository: restore with --at up to {} for dump {}'s, and give the current server its own identity (a new server_id)",
                    until.map_or("its end".into(), show),
                    dump.id
                ));
            }
            if let Some(gap) = &chain.gap {
                return Err(input_err!(
                    "binlog {gap} is missing from the archive, so --latest would stop silently before later binlogs: restore with --at{} instead",
                    until
                        .map(|u| format!(" up to {}", show(u)))
                        .unwrap_or_default()
                ));
            }
            chain.files.clone()
        }
    };
    let streamed = chain.streamed && files.last() == chain.files.last();
    Ok(MysqlPlan {
        streamed,
        dump: dump.clone(),
        target,
        binlogs: files,
        start_position: dump.binlog.position,
        stop_datetime: match target {
            Target::Time(t) => Some(t.trunc_subsecs(0)),
            Target::Latest => None,
        },
        reachable_until: until,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::mysql::tests::{catalog, dump, t};

    fn err(c: &MysqlCatalog, target: Target) -> String {
        let e = plan_mysql(c, target).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 1);
        e.to_string()
    }

    #[test]
    fn a_chain_stops_where_a_later_name_holds_an_older_history() {
        // A server rebuilt under the same identity after prune took the old history's first
        // files: its binlog.000002..000003 (created at minutes 40, 41) run on by name into the
        // old 000004 (created at minute 3).
        let mut c = catalog(vec![dump("new", "binlog.000002", "00:40:30")], &[4, 5]);
        for n in [2u64, 3] {
            let mut m = crate::repo::mysql::tests::binlog(n);
            m.first_event_time = Some(t(&format!("00:{:02}:00", 38 + n)));
            m.last_event_time = Some(t(&format!("00:{:02}:00", 39 + n)));
            c.binlogs.insert(("binlog".into(), n), m);
        }
        let chain = c.chain("binlog.000002");
        assert_eq!(chain.files, ["binlog.000002", "binlog.000003"]);
        assert_eq!(chain.gap, None);
        let other = chain.other_history.unwrap();
        assert!(
            other.starts_with("binlog binlog.000004 was created at 2026-11-23T00:03:00Z"),
            "{other}"
        );
        let e = err(&c, Target::Latest);
        assert!(
            e.contains("another binlog history") && e.contains("--at up to 2026-11-23T00:42:00Z"),
            "{e}"
        );
        let e = err(&c, Target::Time(t("00:43:00")));
        assert!(
            e.contains("past the end of dump new's binlog history"),
            "{e}"
        );
        let p = plan_mysql(&c, Target::Time(t("00:41:30"))).unwrap();
        assert_eq!(p.binlogs, ["binlog.000002", "binlog.000003"]);
        // One history, a clock stepped back a minute at a rotation: still one chain.
        let mut c = catalog(vec![dump("d", "binlog.000002", "00:01:30")], &[2, 3, 4]);
        c.binlogs
            .get_mut(&("binlog".into(), 3))
            .unwrap()
            .first_event_time = Some(t("00:00:30"));
        assert_eq!(c.chain("binlog.000002").files.len(), 3);
        // A replica whose source's clock runs an hour ahead: the copied events' times do
        // not count, the files' creation times do.
        c.binlogs
            .get_mut(&("binlog".into(), 2))
            .unwrap()
            .last_event_time = Some(t("01:02:00"));
        assert_eq!(c.chain("binlog.000002").files.len(), 3);
    }

    #[test]
    fn refuses_a_dump_whose_binlog_name_belongs_to_an_older_history() {
        // After RESET MASTER the new history reuses binlog.000002; the archive still holds the
        // old file of that name, which ended long before this dump was taken.
        let c = catalog(
            vec![dump("after-reset", "binlog.000002", "00:30:00")],
            &[2, 3],
        );
        for target in [Target::Latest, Target::Time(t("00:31:00"))] {
            let e = err(&c, target);
            assert!(e.contains("another binlog history"), "{e}");
        }
        // Within the clock slack it is the same history.
        let c = catalog(vec![dump("d", "binlog.000002", "00:03:30")], &[2, 3, 4]);
        assert!(plan_mysql(&c, Target::Latest).is_ok());
    }

    #[test]
    fn picks_the_newest_dump_before_the_target_and_the_files_it_needs() {
        let c = catalog(
            vec![
                dump("d1", "binlog.000002", "00:01:30"),
                dump("d2", "binlog.000005", "00:04:30"),
            ],
            &[2, 3, 4, 5, 6, 7],
        );
        let p = plan_mysql(&c, Target::Time(t("00:03:10.5"))).unwrap();
        assert_eq!(p.dump.id, "d1");
        // binlog.000003 ends at 00:03:00, before the target: 000004 holds the target.
        assert_eq!(
            p.binlogs,
            vec!["binlog.000002", "binlog.000003", "binlog.000004"]
        );
        assert_eq!(p.stop_datetime, Some(t("00:03:10")));
        assert_eq!(p.start_position, 1019);
        let p = plan_mysql(&c, Target::Time(t("00:05:00"))).unwrap();
        assert_eq!(p.dump.id, "d2");
        assert_eq!(p.binlogs, vec!["binlog.000005"]);
        let p = plan_mysql(&c, Target::Latest).unwrap();
        assert_eq!(p.dump.id, "d2");
        assert_eq!(
            p.binlogs,
            vec!["binlog.000005", "binlog.000006", "binlog.000007"]
        );
        assert_eq!(p.stop_datetime, None);
        assert_eq!(p.reachable_until, Some(t("00:07:00")));
        assert!(
            p.describe()
                .contains("binlog.000005..binlog.000007 (3 files)")
        );
    }

    #[test]
    fn latest_refuses_to_stop_silently_before_a_streamed_file_past_a_gap() {
        use crate::repo::mysql::tests::streamed;
        let mut c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[2]);
        c.streamed.extend([streamed(3, false)]);
        let p = plan_mysql(&c, Target::Latest).unwrap();
        assert_eq!(p.binlogs, vec!["binlog.000002", "binlog.000003"]);
        assert!(p.streamed && p.describe().contains("binlog.000003 as streamed so far"));
        assert_eq!(p.reachable_until, Some(t("00:03:00")));
        // Within the streamed file's seconds, --at picks it too.
        let p = plan_mysql(&c, Target::Time(t("00:02:30"))).unwrap();
        assert_eq!(p.binlogs, vec!["binlog.000002", "binlog.000003"]);
        c.streamed.extend([streamed(5, false)]);
        let end = c.streamed[&("binlog".to_string(), 3)].end();
        let e = err(&c, Target::Latest);
        assert!(
            e.contains(&format!("binlog.000003 from position {end} is missing")),
            "{e}"
        );
    }

    #[test]
    fn refusals() {
        let c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[2, 3, 5]);
        assert!(err(&c, Target::Time(t("00:01:00"))).contains("before the first dump"));
        let e = err(&c, Target::Time(t("00:04:00")));
        assert!(e.contains("gap") && e.contains("binlog.000004"), "{e}");
        assert!(err(&c, Target::Latest).contains("binlog.000004 is missing"));
        assert!(plan_mysql(&c, Target::Time(t("00:03:00"))).is_ok());
        // The chain ends at 00:03:00 (whole seconds): up to 00:03:00.999 is reachable.
        assert!(plan_mysql(&c, Target::Time(t("00:03:00.9"))).is_ok());
        assert!(err(&c, Target::Time(t("00:03:01"))).contains("gap"));
        let c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[2, 3]);
        assert!(err(&c, Target::Time(t("00:09:00"))).contains("beyond the archived binlogs"));
        let c = catalog(vec![], &[2, 3]);
        assert!(err(&c, Target::Latest).contains("no dumps"));
        // The dump's own binlog is missing but later ones exist.
        let c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[3, 4]);
        assert!(err(&c, Target::Time(t("00:03:00"))).contains("binlog.000002"));
        // Nothing archived since the dump: a time target cannot be reached, --latest restores
        // the dump alone.
        let c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[1]);
        assert!(err(&c, Target::Time(t("00:02:00"))).contains("binlog-push"));
        let p = plan_mysql(&c, Target::Latest).unwrap();
        assert!(p.binlogs.is_empty());
        assert!(p.describe().contains("no binlogs"));
    }
}
