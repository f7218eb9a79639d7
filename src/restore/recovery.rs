//! The recovery settings a restore writes into `postgresql.auto.conf`, and their removal.
//!
//! A base backup carries the configuration of the server it was taken from. When that server
//! was itself restored, its `postgresql.auto.conf` may still hold the earlier restore's
//! `restore_command` and `recovery_target_*` (dbagent's, or another tool's), and the backup
//! may hold `recovery.signal` or `standby.signal`. PostgreSQL applies the last occurrence of a
//! setting, so appending a new block is not enough: a `--latest` restore would inherit an
//! earlier `recovery_target_time` and stop there. So a restore removes every recovery setting
//! and signal file first and writes exactly one block; when recovery ends, the block's own
//! `recovery_end_command` removes it again (the server is a primary now: its own backups and
//! the replicas cloned from it must not carry it). What is left is only the note and
//! `archive_mode = off` of a copy.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use super::plan::{PgPlan, Target};
use crate::timespec::pg_timestamp;

const AUTO_CONF: &str = "postgresql.auto.conf";
/// Signal files that start recovery; one from a base backup would steer the new server.
const SIGNAL_FILES: [&str; 2] = ["recovery.signal", "standby.signal"];
/// Comments dbagent writes above its lines (and the one older versions wrote).
const RECOVERY_NOTE: &str = "# dbagent restore: recovery settings";
const COPY_NOTE: &str = "# dbagent restore: a copy";
const OLD_NOTE: &str = "# point-in-time restore by dbagent";
/// The recovery targets PostgreSQL knows; at most one may be set.
const TARGETS: [&str; 5] = [
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
];

/// Settings that steer a recovery from the archive (`recovery_min_apply_delay` also delays
/// archive recovery, `recovery_end_command` runs at its end).
fn is_recovery_setting(name: &str) -> bool {
    matches!(
        name,
        "restore_command" | "recovery_end_command" | "recovery_min_apply_delay"
    ) || name.starts_with("recovery_target")
}

/// The setting a configuration line assigns (`name = value` or `name value`), lowercased as
/// PostgreSQL compares names.
fn setting_name(line: &str) -> Option<String> {
    let t = line.trim_start();
    let end = t
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(t.len());
    (end > 0).then(|| t[..end].to_ascii_lowercase())
}

/// What to take out of a configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strip {
    /// Before a restore: every recovery setting and every dbagent note.
    All,
    /// After promotion: the recovery settings; a copy keeps its note on archiving.
    Recovery,
}

/// `text` without recovery settings (pure). Other lines are kept as they are.
fn strip(text: &str, what: Strip) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| {
            let t = line.trim_start();
            let note = t.starts_with(RECOVERY_NOTE)
                || t.starts_with(OLD_NOTE)
                || (what == Strip::All && t.starts_with(COPY_NOTE));
            !note && !setting_name(t).is_some_and(|n| is_recovery_setting(&n))
        })
        .collect();
    let end = lines
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .map_or(0, |i| i + 1);
    lines[..end].iter().map(|l| format!("{l}\n")).collect()
}

/// Quotes a value for a PostgreSQL configuration file, whose strings take backslash escapes
/// and cannot hold a raw line break.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The one recovery block (pure), then `extra` lines. `recovery_end_command` removes the
/// block when recovery ends (`dbagent recovery-end`), whether or not a dbagent is watching:
/// after `--no-start` nothing else would, and a replica cloned from the new primary with
/// `pg_basebackup -R` would copy the block, whose target timeline is not its history.
pub fn block(
    plan: &PgPlan,
    restore_command: &str,
    recovery_end_command: &str,
    extra: &[String],
) -> Vec<String> {
    let mut lines = Vec::new();
    if plan.standby {
        lines.push(format!(
            "{RECOVERY_NOTE} (dbagent {}), of a standby: it follows the archive and its primary",
            env!("CARGO_PKG_VERSION")
        ));
        lines.push(format!("restore_command = {}", quote(restore_command)));
        lines.push("recovery_target_timeline = 'latest'".into());
        for name in TARGETS {
            lines.push(format!("{name} = ''"));
        }
        lines.extend(extra.iter().cloned());
        return lines;
    }
    if !plan.as_primary {
        lines.push(format!(
            "{COPY_NOTE}, not the primary (restored without --as-primary): it archives nothing into the repository, its subscriptions stay away from their publishers"
        ));
        lines.push("archive_mode = off".into());
        // An enabled subscription would start its apply worker at promotion, take the slot
        // on the publisher that the real subscriber waits on, and confirm changes it never
        // gets. `max_logical_replication_workers` needs a restart: a copy made the primary
        // later is restored `--as-primary` instead.
        lines.push("max_logical_replication_workers = 0".into());
        // Not the production server's pid file, when the copy runs on the same host.
        lines.push("external_pid_file = ''".into());
    }
    lines.push(format!(
        "{RECOVERY_NOTE} (dbagent {}), removed once the server has promoted",
        env!("CARGO_PKG_VERSION")
    ));
    lines.push(format!("restore_command = {}", quote(restore_command)));
    lines.push(format!(
        "recovery_end_command = {}",
        quote(recovery_end_command)
    ));
    lines.push(format!(
        "recovery_target_timeline = {}",
        quote(&plan.recovery_target_timeline())
    ));
    // A delayed standby's setting, carried in its backup's configuration, would hold the
    // restore back as far behind as it held the standby.
    lines.push("recovery_min_apply_delay = 0".into());
    // The unused targets are cleared, so one left in postgresql.conf cannot add a second
    // target. They come first: PostgreSQL applies settings in file order and refuses a
    // target while another kind is already set, even an empty one.
    // `--latest` targets the start of the archive's last record, inclusive: without a target
    // PostgreSQL promotes wherever restore_command first fails, and a promoted server has
    // already archived its new timeline's history, and a primary's WAL, before anyone can
    // look. With one it refuses ("recovery ended before configured recovery target was
    // reached") and stops.
    let target = match plan.target {
        Target::Time(t) => Some(("recovery_target_time", quote(&pg_timestamp(t)))),
        Target::Latest => plan
            .archive_end
            .and_then(|e| e.last_record)
            .map(|lsn| ("recovery_target_lsn", quote(&lsn.to_string()))),
    };
    for name in TARGETS
        .iter()
        .filter(|n| Some(**n) != target.as_ref().map(|t| t.0))
    {
        lines.push(format!("{name} = ''"));
    }
    if let Some((name, value)) = target {
        lines.push(format!("{name} = {value}"));
        lines.push("recovery_target_inclusive = on".into());
        lines.push("recovery_target_action = 'promote'".into());
    }
    lines.extend(extra.iter().cloned());
    lines
}

/// The lines of `dir`'s postgresql.auto.conf that point a standby at its primary
/// (`primary_conninfo`, `primary_slot_name`): a delta re-seed of a replica puts them back
/// after the backup's copy of the file (the primary's) has replaced its own.
pub fn standby_lines(dir: &Path) -> anyhow::Result<Vec<String>> {
    let text = read(dir)?;
    Ok(text
        .lines()
        .filter(|l| {
            setting_name(l)
                .is_some_and(|n| matches!(n.as_str(), "primary_conninfo" | "primary_slot_name"))
        })
        .map(str::to_string)
        .collect())
}

/// Removes earlier recovery settings and signal files from a restored data directory, then
/// writes `block` and `signal` (`recovery.signal`, or `standby.signal` for a standby).
pub fn write(dir: &Path, block: &[String], signal: &str) -> anyhow::Result<()> {
    for name in SIGNAL_FILES {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {name} from the backup"));
            }
            _ => {}
        }
    }
    let old = read(dir)?;
    let mut text = strip(&old, Strip::All);
    text.push_str(&(block.join("\n") + "\n"));
    replace(dir, &text)?;
    std::fs::File::create(dir.join(signal))
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {signal}"))?;
    sync_dir(dir)
}

/// After promotion: removes the recovery settings, so the server (and every base backup of
/// it) no longer carries them. Returns whether there was anything to remove.
pub fn remove_after_promotion(dir: &Path) -> anyhow::Result<bool> {
    let old = read(dir)?;
    let new = strip(&old, Strip::Recovery);
    if new == old {
        return Ok(false);
    }
    replace(dir, &new)?;
    Ok(true)
}

/// `dbagent recovery-end`, PostgreSQL's `recovery_end_command`: run by the server in its data
/// directory `dir` when recovery ends, it removes the restore's recovery block (and the
/// segments fetched ahead and never replayed). PostgreSQL only warns when it fails.
pub fn recovery_end(dir: &Path) -> anyhow::Result<()> {
    if !dir.join("PG_VERSION").is_file() {
        anyhow::bail!(
            "recovery-end runs in a PostgreSQL data directory, as the recovery_end_command a restore writes; {} holds no PG_VERSION",
            std::fs::canonicalize(dir)
                .unwrap_or_else(|_| dir.to_path_buf())
                .display()
        );
    }
    let _ = std::fs::remove_dir_all(dir.join("pg_wal").join(crate::pg::wal::PREFETCH_DIR));
    if remove_after_promotion(dir)? {
        eprintln!(
            "dbagent: recovery has ended: removed the restore's recovery settings from postgresql.auto.conf"
        );
    }
    Ok(())
}

fn read(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(AUTO_CONF);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replaces postgresql.auto.conf whole (temp file, fsync, rename, fsync of the directory), so
/// a crash leaves the old file or the new one.
fn replace(dir: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(AUTO_CONF);
    let tmp = dir.join(format!("{AUTO_CONF}.dbagent-tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    sync_dir(dir)
}

use super::untar::sync_dir;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::catalog::tests::{backup, catalog, t};
    use crate::repo::wal::Lsn;
    use crate::restore::plan::{ArchiveEnd, plan_pg};

    /// What an earlier restore (dbagent 0.1 and now) and ALTER SYSTEM left in a base backup.
    const CARRIED: &str = "# Do not edit this file manually!
# It will be overwritten by the ALTER SYSTEM command.
autovacuum = 'off'

# point-in-time restore by dbagent 0.1.0
restore_command = '/old/dbagent --repo file:///old wal-fetch %f %p'
recovery_target_timeline = 'latest'
recovery_target_time = '2026-11-20 00:00:00+00'
recovery_target_inclusive = on
recovery_target_action = 'promote'
Recovery_Target_Xid='42'
recovery_min_apply_delay = '1h'
# dbagent restore: a copy, not the primary (restored without --as-primary): it archives nothing into the repository
archive_mode = off
work_mem = '8MB'
";

    fn plan(target: crate::restore::plan::Target, as_primary: bool) -> PgPlan {
        let c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2, 3, 4, 5]);
        let mut p = plan_pg(&c, target, None).unwrap();
        p.as_primary = as_primary;
        p
    }

    fn settings(text: &str) -> Vec<String> {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .map(String::from)
            .collect()
    }

    #[test]
    fn earlier_recovery_settings_are_removed_before_the_new_block() {
        let stripped = strip(CARRIED, Strip::All);
        assert_eq!(
            settings(&stripped),
            vec![
                "autovacuum = 'off'",
                "archive_mode = off",
                "work_mem = '8MB'"
            ]
        );
        assert!(stripped.starts_with("# Do not edit this file manually!\n"));
        assert!(!stripped.contains("dbagent"), "{stripped}");
    }

    #[test]
    fn a_latest_restore_names_its_timeline_and_clears_every_target() {
        let b = block(
            &plan(Target::Latest, false),
            "dbagent wal-fetch %f %p",
            "dbagent recovery-end",
            &[],
        );
        assert_eq!(
            settings(&b.join("\n")),
            vec![
                "archive_mode = off",
                "max_logical_replication_workers = 0",
                "external_pid_file = ''",
                "restore_command = 'dbagent wal-fetch %f %p'",
                "recovery_end_command = 'dbagent recovery-end'",
                "recovery_target_timeline = '1'",
                "recovery_min_apply_delay = 0",
                "recovery_target = ''",
                "recovery_target_lsn = ''",
                "recovery_target_name = ''",
                "recovery_target_time = ''",
                "recovery_target_xid = ''",
            ]
        );

        // Once the archive's end is read, PostgreSQL may promote only after its last record.
        let mut p = plan(Target::Latest, true);
        p.archive_end = Some(ArchiveEnd {
            end: Lsn(0x3_0000_0098),
            last_record: Some(Lsn(0x3_0000_0060)),
        });
        let s = settings(&block(&p, "x", "y", &[]).join("\n"));
        assert_eq!(
            s[4..],
            [
                "recovery_target = ''",
                "recovery_target_name = ''",
                "recovery_target_time = ''",
                "recovery_target_xid = ''",
                "recovery_target_lsn = '3/60'",
                "recovery_target_inclusive = on",
                "recovery_target_action = 'promote'",
            ],
            "{s:?}"
        );
    }

    #[test]
    fn a_timed_restore_sets_its_target_after_clearing_the_others() {
        let b = block(
            &plan(Target::Time(t("00:04:00")), true),
            "it's",
            "x",
            &["port = 5433".into()],
        );
        let s = settings(&b.join("\n"));
        assert_eq!(s[0], "restore_command = 'it''s'", "no archive_mode: {s:?}");
        let time = s
            .iter()
            .position(|l| l.starts_with("recovery_target_time = '2026"))
            .unwrap();
        let xid = s
            .iter()
            .position(|l| l == "recovery_target_xid = ''")
            .unwrap();
        assert!(xid < time, "{s:?}");
        assert!(!s.contains(&"recovery_target_time = ''".to_string()));
        assert_eq!(s.last().unwrap(), "port = 5433");
    }

    #[test]
    fn the_block_goes_after_promotion_and_a_copy_keeps_archiving_off() {
        let b = block(&plan(Target::Time(t("00:04:00")), false), "x", "y", &[]);
        let written = strip(CARRIED, Strip::All) + &b.join("\n") + "\n";
        let after = strip(&written, Strip::Recovery);
        assert_eq!(
            settings(&after),
            vec![
                "autovacuum = 'off'",
                "archive_mode = off",
                "work_mem = '8MB'",
                "archive_mode = off",
                "max_logical_replication_workers = 0",
                "external_pid_file = ''",
            ]
        );
        assert!(after.contains(COPY_NOTE));
        assert!(!after.contains(RECOVERY_NOTE));
        // Nothing left to remove the second time.
        assert_eq!(strip(&after, Strip::Recovery), after);
    }

    #[test]
    fn files_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(AUTO_CONF), CARRIED).unwrap();
        std::fs::write(dir.path().join("standby.signal"), "").unwrap();
        let b = block(&plan(Target::Latest, true), "x", "y", &[]);
        write(dir.path(), &b, "recovery.signal").unwrap();
        assert!(!dir.path().join("standby.signal").exists());
        assert!(dir.path().join("recovery.signal").exists());
        let text = std::fs::read_to_string(dir.path().join(AUTO_CONF)).unwrap();
        assert_eq!(text.matches("restore_command").count(), 1, "{text}");
        assert!(remove_after_promotion(dir.path()).unwrap());
        let text = std::fs::read_to_string(dir.path().join(AUTO_CONF)).unwrap();
        assert!(!text.contains("restore_command") && !text.contains("recovery_target"));
        assert!(!remove_after_promotion(dir.path()).unwrap());
    }

    #[test]
    fn a_standby_follows_the_latest_timeline_keeps_archiving_and_its_primary() {
        let mut p = plan(Target::Latest, false);
        p.standby = true;
        let b = block(
            &p,
            "dbagent wal-fetch %f %p",
            "dbagent recovery-end",
            &["primary_slot_name = 'r1'".into()],
        );
        assert!(
            b.contains(&"recovery_target_timeline = 'latest'".to_string()),
            "{b:?}"
        );
        assert!(!b.iter().any(|l| l.contains("archive_mode")), "{b:?}");
        assert!(!b.iter().any(|l| l.contains("promote")), "{b:?}");
        assert_eq!(b.last().unwrap(), "primary_slot_name = 'r1'");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(AUTO_CONF),
            "work_mem = '8MB'\nprimary_conninfo = 'host=p user=r'\n  primary_slot_name='r1'\nprimary_conninfo_x = 1\n",
        )
        .unwrap();
        assert_eq!(
            standby_lines(dir.path()).unwrap(),
            vec![
                "primary_conninfo = 'host=p user=r'",
                "  primary_slot_name='r1'"
            ]
        );
        write(dir.path(), &b, "standby.signal").unwrap();
        assert!(dir.path().join("standby.signal").exists());
        assert!(!dir.path().join("recovery.signal").exists());
    }
}
