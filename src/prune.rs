//! `dbagent prune`: retention. A pure plan first (printed on `--dry-run`), then deletion.
//!
//! Backups are ordered by their recorded times, never by name. Kept: every backup needed to
//! restore any point of the last `keep_days` days (those consistent inside the window, and the
//! newest one before it, which covers the window's start), and the `keep_backups` newest. WAL
//! is deleted only below the lowest start segment of all kept backups, on every timeline (a
//! restored branch can start below an older backup), so no kept backup or promised point loses
//! WAL. Timeline history files are never deleted. Leftovers of a backup without a manifest go
//! only after `incomplete_after`, since the backup may still be running.
//!
//! Logical dumps follow the same keep rule: PostgreSQL dump sets by the time they were taken,
//! MySQL/MariaDB dumps by their consistent time, and a MySQL binlog is deleted only when it
//! lies before the file the oldest kept dump replays from.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};

use crate::config::{Config, RetentionConfig};
use crate::leftovers::Sweep;
use crate::repo::catalog::{self, PgCatalog};
use crate::repo::wal::{Segment, WalFile};
use crate::storage::{ObjectInfo, Store};

/// Drill reports kept per cluster.
const KEEP_DRILL_REPORTS: usize = 36;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrunePlan {
    #[serde(serialize_with = "as_string")]
    pub system_identifier: u64,
    /// Kept backup ids, with why.
    #[serde(serialize_with = "kept")]
    pub keep: Vec<(String, &'static str)>,
    /// Deleted backups: id and keys, the manifest first.
    #[serde(serialize_with = "deleted")]
    pub delete_backups: Vec<(String, Vec<String>)>,
    /// WAL below this segment number (any timeline) is deleted.
    pub wal_floor: Option<String>,
    pub delete_wal: Vec<String>,
    pub delete_incomplete: Vec<String>,
    pub delete_reports: Vec<String>,
    /// Kept logical dump sets (`backup --kind dump`), with why.
    #[serde(serialize_with = "kept")]
    pub keep_dumps: Vec<(String, &'static str)>,
    /// Deleted dump sets: id and keys, the manifest first.
    #[serde(serialize_with = "deleted")]
    pub delete_dumps: Vec<(String, Vec<String>)>,
}

impl PrunePlan {
    pub fn is_empty(&self) -> bool {
        self.delete_dumps.is_empty()
            && self.delete_backups.is_empty()
            && self.delete_wal.is_empty()
            && self.delete_incomplete.is_empty()
            && self.delete_reports.is_empty()
    }

    pub fn describe(&self) -> String {
        let mut out = format!(
            "prune plan for PostgreSQL cluster {}:\n",
            self.system_identifier
        );
        for (id, why) in &self.keep {
            out.push_str(&format!("  keep   backup {id} ({why})\n"));
        }
        for (id, _) in &self.delete_backups {
            out.push_str(&format!("  delete backup {id}\n"));
        }
        // Segments below the floor with their block summaries, and streamed pieces of
        // segments stored whole (also without a floor).
        match (&self.wal_floor, self.delete_wal.len()) {
            (_, 0) => out.push_str("  delete no WAL\n"),
            (Some(floor), n) => out.push_str(&format!(
                "  delete {n} WAL object(s): segments before {floor} and their block summaries, streamed pieces of segments stored whole\n"
            )),
            (None, n) => out.push_str(&format!(
                "  delete {n} WAL object(s): streamed pieces of segments stored whole\n"
            )),
        }
        for (id, why) in &self.keep_dumps {
            out.push_str(&format!("  keep   dump {id} ({why})\n"));
        }
        for (id, _) in &self.delete_dumps {
            out.push_str(&format!("  delete dump {id}\n"));
        }
        if !self.delete_incomplete.is_empty() {
            out.push_str(&format!(
                "  delete {} object(s) of incomplete backups and dumps\n",
                self.delete_incomplete.len()
            ));
        }
        if !self.delete_reports.is_empty() {
            out.push_str(&format!(
                "  delete {} old drill report(s)\n",
                self.delete_reports.len()
            ));
        }
        out
    }
}

fn as_string<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn kept<S: Serializer>(keep: &[(String, &'static str)], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Kept<'a> {
        id: &'a str,
        why: &'a str,
    }
    s.collect_seq(keep.iter().map(|(id, why)| Kept { id, why }))
}

fn deleted<S: Serializer>(backups: &[(String, Vec<String>)], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Deleted<'a> {
        id: &'a str,
        keys: &'a [String],
    }
    s.collect_seq(backups.iter().map(|(id, keys)| Deleted { id, keys }))
}

/// What `prune` did (or, on a dry run, would do), cluster by cluster, and the unfinished
/// uploads it swept.
#[derive(Debug, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub clusters: Vec<Pruned>,
    /// MySQL/MariaDB servers: dumps and binlogs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mysql: Vec<MysqlPruned>,
    /// MySQL/MariaDB: streamed binlog parts a complete archived binlog supersedes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub superseded_binlog_parts: Vec<SupersededParts>,
    #[serde(serialize_with = "swept")]
    pub leftovers: Sweep,
}

#[derive(Debug, Serialize)]
pub struct SupersededParts {
    pub server_uuid: String,
    /// Deleted, or on a dry run to be deleted.
    pub keys: Vec<String>,
}

fn swept<S: Serializer>(sweep: &Sweep, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Old<'a> {
        key: &'a str,
        started: DateTime<Utc>,
        size: Option<u64>,
    }
    #[derive(Serialize)]
    struct Swept<'a> {
        older_than_seconds: u64,
        /// Removed, or on a dry run to be removed.
        old: Vec<Old<'a>>,
        /// Kept: young enough that the upload may still be running.
        young: usize,
    }
    Swept {
        older_than_seconds: sweep.older_than.as_secs(),
        old: sweep
            .old
            .iter()
            .map(|l| Old {
                key: &l.key,
                started: l.started,
                size: l.size,
            })
            .collect(),
        young: sweep.young,
    }
    .serialize(s)
}

#[derive(Debug, Serialize)]
pub struct Pruned {
    pub plan: PrunePlan,
    /// Objects deleted; none on a dry run or when there was nothing to delete.
    pub deleted: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct MysqlPruned {
    pub plan: MysqlPrunePlan,
    /// Objects deleted; none on a dry run or when there was nothing to delete.
    pub deleted: Option<usize>,
}

impl std::fmt::Display for PruneReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = String::new();
        for c in &self.clusters {
            text.push_str(&c.plan.describe());
            if self.dry_run {
                text.push_str("dry run: nothing was deleted\n");
            } else if let Some(n) = c.deleted {
                text.push_str(&format!("deleted {n} object(s)\n"));
            }
        }
        for m in &self.mysql {
            text.push_str(&m.plan.describe());
            if self.dry_run {
                text.push_str("dry run: nothing was deleted\n");
            } else if let Some(n) = m.deleted {
                text.push_str(&format!("deleted {n} object(s)\n"));
            }
        }
        for p in &self.superseded_binlog_parts {
            text.push_str(&format!(
                "MySQL server {}: {} {} streamed binlog part object(s) that complete binlogs supersede\n",
                p.server_uuid,
                if self.dry_run { "would delete" } else { "deleted" },
                p.keys.len()
            ));
        }
        text.push_str(&self.leftovers.describe());
        f.write_str(text.trim_end())
    }
}

/// `dbagent prune [--dry-run]`: plans every PostgreSQL cluster in the repository (or the
/// configured one) and carries the plans out.
pub async fn run(cfg: &Config, store: &dyn Store, dry_run: bool) -> anyhow::Result<PruneReport> {
    let clusters = match cfg.pg.system_identifier {
        Some(id) => vec![id],
        None => catalog::clusters(store).await?,
    };
    let mut out = Vec::new();
    for sysid in clusters {
        let cat = PgCatalog::load(store, sysid).await?;
        let objects = store.list(&crate::repo::pg_root(sysid)).await?;
        let mut plan = plan(&cat, &objects, Utc::now(), &cfg.retention);
        let dumps = crate::repo::dump::load(store, sysid).await?;
        plan_dumps(&mut plan, &dumps, Utc::now(), &cfg.retention);
        // A dump set killed before its manifest: its objects, once old enough to be dead.
        plan.delete_incomplete.extend(incomplete_sets(
            &objects,
            &crate::repo::dump::dumps_prefix(sysid),
            dumps.iter().map(|d| d.id.as_str()),
            before(Utc::now(), cfg.retention.incomplete_after),
        ));
        let deleted = match dry_run || plan.is_empty() {
            true => None,
            false => {
                // The plan first: a delete that fails part-way leaves a record of the rest.
                eprint!("{}", plan.describe());
                Some(execute(store, &plan).await?)
            }
        };
        out.push(Pruned { plan, deleted });
    }
    let mut superseded_binlog_parts = Vec::new();
    let servers = match &cfg.mysql.server_uuid {
        Some(id) => vec![id.clone()],
        None => crate::repo::mysql::servers(store).await?,
    };
    let mut mysql = Vec::new();
    for uuid in servers {
        let cat = crate::repo::mysql::MysqlCatalog::load(store, &uuid).await?;
        let mut plan = plan_mysql(&cat, Utc::now(), &cfg.retention);
        let prefix = crate::repo::mysql::dumps_prefix(&uuid);
        plan.delete_incomplete = incomplete_sets(
            &store.list(&prefix).await?,
            &prefix,
            cat.dumps.iter().map(|d| d.id.as_str()),
            before(Utc::now(), cfg.retention.incomplete_after),
        );
        let reports = store.list(&crate::repo::mysql_drills_prefix(&uuid)).await?;
        plan.delete_reports = old_reports(reports.iter().map(|o| o.key.as_str()));
        let deleted = match dry_run || plan.is_empty() {
            true => None,
            false => {
                eprint!("{}", plan.describe());
                Some(execute_mysql(store, &plan).await?)
            }
        };
        mysql.push(MysqlPruned { plan, deleted });
        let mut keys = cat.superseded_parts;
        if keys.is_empty() {
            continue;
        }
        // Descriptions first: a part without one no longer counts, its data is garbage.
        keys.sort_by_key(|k| !k.ends_with(".json"));
        if !dry_run {
            for key in &keys {
                store.delete(key).await?;
            }
        }
        superseded_binlog_parts.push(SupersededParts {
            server_uuid: uuid,
            keys,
        });
    }
    let leftovers =
        crate::leftovers::sweep(store, cfg.retention.incomplete_after, Utc::now(), dry_run).await?;
    Ok(PruneReport {
        dry_run,
        clusters: out,
        mysql,
        superseded_binlog_parts,
        leftovers,
    })
}

/// `now` less `d`; the earliest time there is when that is out of range (a setting of
/// "forever"), so that a window too long to compute keeps everything rather than nothing.
pub fn before(now: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The manifest a leftover object's backup or dump would have (`…/backups/<id>/backup.json`,
/// `…/dumps/<id>/dump.json`).
fn manifest_of(key: &str) -> Option<String> {
    for (dir, manifest) in [("/backups/", "backup.json"), ("/dumps/", "dump.json")] {
        if let Some(at) = key.find(dir) {
            let rest = &key[at + dir.len()..];
            let id = rest
                .split('/')
                .next()
                .filter(|id| !id.is_empty() && rest.len() > id.len())?;
            return Some(format!("{}{dir}{id}/{manifest}", &key[..at]));
        }
    }
    None
}

/// Deletes leftovers of backups and dumps, skipping any whose manifest has appeared since the
/// plan was made.
async fn delete_leftovers(store: &dyn Store, keys: &[String]) -> anyhow::Result<usize> {
    let mut finished: BTreeMap<String, bool> = BTreeMap::new();
    let mut n = 0;
    for key in keys {
        if let Some(manifest) = manifest_of(key) {
            let done = match finished.get(&manifest) {
                Some(done) => *done,
                None => {
                    let done = store.head(&manifest).await?.is_some();
                    finished.insert(manifest, done);
                    done
                }
            };
            if done {
                continue;
            }
        }
        store.delete(key).await?;
        n += 1;
    }
    Ok(n)
}

/// The objects of backups or dumps under `prefix` (`<prefix><id>/…`) that have no manifest
/// (`complete` names the ones that do) and whose objects are all older than `running_since`:
/// one killed (SIGKILL, OOM) before it wrote its manifest, which no restore can use.
fn incomplete_sets<'a>(
    objects: &[ObjectInfo],
    prefix: &str,
    complete: impl Iterator<Item = &'a str>,
    running_since: DateTime<Utc>,
) -> Vec<String> {
    let complete: BTreeSet<&str> = complete.collect();
    let mut by_id: BTreeMap<&str, Vec<&ObjectInfo>> = BTreeMap::new();
    for o in objects {
        if let Some(id) = o
            .key
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('/'))
            .map(|(id, _)| id)
        {
            by_id.entry(id).or_default().push(o);
        }
    }
    by_id
        .into_iter()
        .filter(|(id, objs)| {
            !complete.contains(id) && objs.iter().all(|o| o.last_modified < running_since)
        })
        .flat_map(|(_, objs)| objs.into_iter().map(|o| o.key.clone()))
        .collect()
}

/// Which of a series of backups (or dumps), oldest first with the time each restores from,
/// the policy keeps, and why: the `keep_backups` newest, those inside the last `keep_days`,
/// and the newest before that window, which covers its start.
fn keep_by_time<'a>(
    items: impl DoubleEndedIterator<Item = (&'a str, DateTime<Utc>)> + Clone,
    now: DateTime<Utc>,
    policy: &RetentionConfig,
) -> BTreeMap<String, &'static str> {
    let window_start = before(
        now,
        std::time::Duration::from_secs(policy.keep_days as u64 * 86400),
    );
    let mut keep: BTreeMap<String, &'static str> = BTreeMap::new();
    for (id, _) in items.clone().rev().take(policy.keep_backups) {
        keep.insert(id.to_string(), "among the newest");
    }
    for (id, _) in items.clone().filter(|(_, t)| *t >= window_start) {
        keep.entry(id.to_string())
            .or_insert("inside the recovery window");
    }
    if let Some((id, _)) = items.rev().find(|(_, t)| *t < window_start) {
        keep.entry(id.to_string())
            .or_insert("covers the start of the recovery window");
    }
    keep
}

/// What `prune` does to one MySQL/MariaDB server: the base-backup rules applied to dumps, and
/// archived (or streamed) binlogs deleted only before the oldest kept dump's coordinates, so
/// every kept dump can still be rolled forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MysqlPrunePlan {
    pub server_uuid: String,
    #[serde(serialize_with = "kept")]
    pub keep: Vec<(String, &'static str)>,
    /// Deleted dumps: id and keys, the manifest first.
    #[serde(serialize_with = "deleted")]
    pub delete_dumps: Vec<(String, Vec<String>)>,
    /// Binlogs before this file (of the same base name) are deleted.
    pub binlog_floor: Option<String>,
    /// Binlog objects, each file's description before its data.
    pub delete_binlogs: Vec<String>,
    /// Objects of dumps killed before their manifest, older than `incomplete_after`.
    pub delete_incomplete: Vec<String>,
    /// Drill reports beyond the newest `KEEP_DRILL_REPORTS`.
    pub delete_reports: Vec<String>,
}

impl MysqlPrunePlan {
    pub fn is_empty(&self) -> bool {
        self.delete_dumps.is_empty()
            && self.delete_binlogs.is_empty()
            && self.delete_incomplete.is_empty()
            && self.delete_reports.is_empty()
    }

    pub fn describe(&self) -> String {
        let mut out = format!("prune plan for MySQL server {}:\n", self.server_uuid);
        for (id, why) in &self.keep {
            out.push_str(&format!("  keep   dump {id} ({why})\n"));
        }
        for (id, _) in &self.delete_dumps {
            out.push_str(&format!("  delete dump {id}\n"));
        }
        match (&self.binlog_floor, self.delete_binlogs.len()) {
            (Some(floor), n) if n > 0 => {
                out.push_str(&format!("  delete {n} binlog object(s) before {floor}\n"))
            }
            _ => out.push_str("  delete no binlogs\n"),
        }
        if !self.delete_incomplete.is_empty() {
            out.push_str(&format!(
                "  delete {} object(s) of incomplete dumps\n",
                self.delete_incomplete.len()
            ));
        }
        if !self.delete_reports.is_empty() {
            out.push_str(&format!(
                "  delete {} old drill report(s)\n",
                self.delete_reports.len()
            ));
        }
        out
    }
}

/// Decides what to delete on a MySQL/MariaDB server (pure).
pub fn plan_mysql(
    cat: &crate::repo::mysql::MysqlCatalog,
    now: DateTime<Utc>,
    policy: &RetentionConfig,
) -> MysqlPrunePlan {
    use crate::repo::mysql::{self as keys, BinlogName};
    let uuid = &cat.server_uuid;
    let dumps = &cat.dumps; // oldest consistent_time first
    let keep = keep_by_time(
        dumps.iter().map(|d| (d.id.as_str(), d.consistent_time)),
        now,
        policy,
    );
    let delete_dumps = dumps
        .iter()
        .filter(|d| !keep.contains_key(&d.id))
        .map(|d| {
            (
                d.id.clone(),
                vec![keys::dump_manifest_key(uuid, &d.id), d.data.key.clone()],
            )
        })
        .collect();
    // A dump still running (it started after `running_since`) replays from a position later
    // than that of the newest dump then: binlogs are kept from there too.
    let running_since = before(now, policy.incomplete_after);
    let newest_then = dumps
        .iter()
        .rfind(|d| d.consistent_time < running_since)
        .map(|d| d.id.as_str());
    let bounds = |d: &&crate::repo::mysql::MysqlDump| {
        keep.contains_key(&d.id)
            || d.consistent_time >= running_since
            || newest_then == Some(d.id.as_str())
    };
    // Per base name, the earliest file a kept (or running) dump starts replaying from.
    let mut floors: BTreeMap<String, BinlogName> = BTreeMap::new();
    for d in dumps.iter().filter(bounds) {
        if let Some(name) = BinlogName::parse(&d.binlog.file) {
            let floor = floors.entry(name.base.clone()).or_insert(name.clone());
            if name.seq < floor.seq {
                *floor = name;
            }
        }
    }
    let below = |base: &str, seq: u64| floors.get(base).is_some_and(|f| seq < f.seq);
    let mut delete_binlogs = Vec::new();
    for ((base, seq), meta) in &cat.binlogs {
        if below(base, *seq) {
            delete_binlogs.push(keys::binlog_meta_key(uuid, &meta.name));
            delete_binlogs.push(meta.data.key.clone());
        }
    }
    for ((base, seq), streamed) in &cat.streamed {
        if below(base, *seq) {
            for part in &streamed.parts {
                delete_binlogs.push(keys::stream_part_meta_key(
                    uuid, &part.name, part.from, part.to,
                ));
                delete_binlogs.push(part.data.key.clone());
            }
        }
    }
    // One base name only: the floor can be named.
    let binlog_floor = match floors.len() {
        1 => floors.values().next().map(|f| f.to_string()),
        _ => None,
    };
    MysqlPrunePlan {
        server_uuid: uuid.clone(),
        keep: keep.into_iter().collect(),
        delete_dumps,
        binlog_floor,
        delete_binlogs,
        delete_incomplete: Vec::new(),
        delete_reports: Vec::new(),
    }
}

/// The drill reports (keys named by their time-ordered ids) beyond the newest
/// `KEEP_DRILL_REPORTS`.
fn old_reports<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut reports: Vec<&str> = keys.collect();
    reports.sort();
    reports
        .iter()
        .take(reports.len().saturating_sub(KEEP_DRILL_REPORTS))
        .map(|k| k.to_string())
        .collect()
}

/// Deletes what the plan says: manifests and descriptions before their data, so that an
/// interrupted prune leaves garbage, never a listed dump or binlog without its data.
async fn execute_mysql(store: &dyn Store, plan: &MysqlPrunePlan) -> anyhow::Result<usize> {
    let mut n = delete_leftovers(store, &plan.delete_incomplete).await?;
    for key in plan
        .delete_dumps
        .iter()
        .flat_map(|(_, keys)| keys)
        .chain(&plan.delete_binlogs)
        .chain(&plan.delete_reports)
    {
        store.delete(key).await?;
        n += 1;
    }
    Ok(n)
}

/// The backups a backup still running may build on or need WAL from. One that started after
/// `running_since` (its leftovers are swept only after `retention.incomplete_after`) on one of
/// the `live` timelines chose as its base the newest file-level backup of its timeline then,
/// and the newest backup of any kind then started below it: every backup that was either
/// since `running_since` is one of these. Ordered as `backups` (by stop time).
fn bases_of_running<'a>(
    backups: &'a [crate::repo::manifest::BaseBackup],
    running_since: DateTime<Utc>,
    live: &[u32],
) -> Vec<&'a crate::repo::manifest::BaseBackup> {
    let earlier = |b: &&crate::repo::manifest::BaseBackup| b.stop_time < running_since;
    let newest = backups.iter().rfind(earlier);
    let bases: Vec<_> = live
        .iter()
        .filter_map(|tli| {
            backups
                .iter()
                .filter(earlier)
                .rfind(|b| b.timeline == *tli && b.files.is_some())
        })
        .collect();
    backups
        .iter()
        .filter(|b| {
            !earlier(b)
                || newest.is_some_and(|n| n.id == b.id)
                || bases.iter().any(|n| n.id == b.id)
        })
        .collect()
}

/// The backups kept for their own sake (each a restore point, with its WAL from its start),
/// and why: the keep rules over all backups, over each live branch's history, and the bases a
/// backup still running may need. The backups an incremental among them builds on are kept
/// too, by `plan`, for their files only.
fn restore_points(
    cat: &PgCatalog,
    now: DateTime<Utc>,
    policy: &RetentionConfig,
) -> BTreeMap<String, &'static str> {
    let backups = &cat.backups; // oldest stop_time first
    let mut keep = keep_by_time(
        backups.iter().map(|b| (b.id.as_str(), b.stop_time)),
        now,
        policy,
    );
    // The same rules over production's history alone: after a restore that branched below
    // newer backups (a bad change undone), those newer ones lie on the abandoned branch and
    // cannot restore production; the backup it was restored from can, and is kept for it.
    // While a fork is unsettled (no branch is known to be production), each branch's own.
    let branches = cat.branches();
    let mut lines: Vec<u32> = match branches.production {
        Some(tli) => vec![tli],
        None => branches.branches.iter().map(|b| b.timeline).collect(),
    };
    // A timeline a restore to a chosen point began (`--as-primary`) that has archived no
    // WAL yet is no branch to `branches` while its parent archived on after it (the old
    // primary not stopped yet): a fork in the making. For `incomplete_after` after its
    // history file was stored, what it restores from is kept as for a branch; a new primary
    // has archived WAL of its own by then, and a copy that never did is let go.
    let young = before(now, policy.incomplete_after);
    for (tli, t) in cat.timelines() {
        let in_the_making = t.last_segment.is_none()
            && cat.targeted.contains(&tli)
            && t.created.is_some_and(|c| c >= young);
        if in_the_making && !lines.contains(&tli) {
            lines.push(tli);
        }
    }
    for tli in lines {
        let on_branch = backups.iter().filter(|b| cat.backup_on(b, tli));
        for (id, why) in keep_by_time(on_branch.map(|b| (b.id.as_str(), b.stop_time)), now, policy)
        {
            keep.entry(id).or_insert(why);
        }
    }
    let running_since = before(now, policy.incomplete_after);
    // A backup runs on production's timeline (or, when the history is forked with no
    // production to tell, on any branch's).
    let live: Vec<u32> = match branches.production {
        Some(tli) => vec![tli],
        None => branches.branches.iter().map(|b| b.timeline).collect(),
    };
    for b in bases_of_running(backups, running_since, &live) {
        keep.entry(b.id.clone())
            .or_insert("a backup still running may build on it");
    }
    keep
}

/// Decides what to delete. `objects` is everything under `pg/<sysid>/`.
pub fn plan(
    cat: &PgCatalog,
    objects: &[ObjectInfo],
    now: DateTime<Utc>,
    policy: &RetentionConfig,
) -> PrunePlan {
    let sysid = cat.system_identifier;
    let backups = &cat.backups; // oldest stop_time first
    let mut keep = restore_points(cat, now, policy);
    let running_since = before(now, policy.incomplete_after);
    // WAL is needed from the backups kept for their own sake; the ones an incremental builds
    // on are kept for their files only.
    let restore_points: BTreeSet<String> = keep.keys().cloned().collect();
    for b in backups.iter().filter(|b| restore_points.contains(&b.id)) {
        for dep in b.depends_on() {
            keep.entry(dep.clone())
                .or_insert("a kept incremental backup builds on it");
        }
    }

    let backups_prefix = crate::repo::backups_prefix(sysid);
    let mut by_dir: BTreeMap<String, Vec<&ObjectInfo>> = BTreeMap::new();
    for o in objects
        .iter()
        .filter(|o| o.key.starts_with(&backups_prefix))
    {
        let id = o.key[backups_prefix.len()..]
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        by_dir.entry(id).or_default().push(o);
    }
    let mut delete_backups = Vec::new();
    for b in backups.iter().filter(|b| !keep.contains_key(&b.id)) {
        let manifest = crate::repo::backup_manifest_key(sysid, &b.id);
        let mut keys = vec![manifest.clone()];
        for o in by_dir.get(&b.id).into_iter().flatten() {
            if o.key != manifest {
                keys.push(o.key.clone());
            }
        }
        delete_backups.push((b.id.clone(), keys));
    }
    // The same rule as for dumps: no manifest, and every object old (not running any more).
    let delete_incomplete = incomplete_sets(
        objects,
        &backups_prefix,
        backups.iter().map(|b| b.id.as_str()),
        running_since,
    );

    // WAL: nothing is deleted unless a kept backup bounds it, and nothing archived since a
    // backup still running may have started (on a timeline branched below the floor, say).
    let floor = backups
        .iter()
        .filter(|b| restore_points.contains(&b.id))
        .map(|b| b.start_lsn.0 / cat.seg_size)
        .min();
    let wal_prefix = crate::repo::wal_prefix(sysid);
    let mut delete_wal = Vec::new();
    if let Some(floor) = floor {
        let settled = |o: &&ObjectInfo| o.last_modified < running_since;
        for o in objects
            .iter()
            .filter(|o| o.key.starts_with(&wal_prefix))
            .filter(settled)
        {
            let Some(name) = o.key[wal_prefix.len()..].strip_suffix(".zst") else {
                continue;
            };
            let segment = match WalFile::classify(name) {
                Some(WalFile::Segment(n)) => Segment::parse(&n, cat.seg_size),
                Some(WalFile::Partial(n)) | Some(WalFile::BackupHistory(n)) => {
                    Segment::parse(&n[..24], cat.seg_size)
                }
                Some(WalFile::History(_)) => None,
                // Streamed pieces go with their segment.
                None => crate::repo::wal::Piece::parse(name)
                    .and_then(|p| Segment::parse(&p.segment, cat.seg_size)),
            };
            if segment.is_some_and(|s| s.segno < floor) {
                delete_wal.push(o.key.clone());
            }
        }
        // The segments' block reference summaries go with them.
        let refs_prefix = crate::repo::walrefs_prefix(sysid);
        for o in objects
            .iter()
            .filter(|o| o.key.starts_with(&refs_prefix))
            .filter(settled)
        {
            let segment = o.key[refs_prefix.len()..]
                .strip_suffix(".zst")
                .and_then(|name| Segment::parse(name, cat.seg_size));
            if segment.is_some_and(|s| s.segno < floor) {
                delete_wal.push(o.key.clone());
            }
        }
    }
    // Pieces of a segment stored whole hold nothing the segment lacks.
    delete_wal.extend(cat.superseded_pieces.iter().map(|o| o.key.clone()));
    delete_wal.sort();
    delete_wal.dedup();

    let drills_prefix = crate::repo::pg_drills_prefix(sysid);
    let delete_reports = old_reports(
        objects
            .iter()
            .filter(|o| o.key.starts_with(&drills_prefix))
            .map(|o| o.key.as_str()),
    );

    let mut keep: Vec<(String, &'static str)> = keep.into_iter().collect();
    keep.sort_by_key(|(id, _)| backups.iter().position(|b| &b.id == id));
    PrunePlan {
        system_identifier: sysid,
        keep,
        delete_backups,
        wal_floor: floor.map(|f| Segment { tli: 1, segno: f }.name(cat.seg_size)[8..].to_string()),
        delete_wal,
        delete_incomplete,
        delete_reports,
        keep_dumps: Vec::new(),
        delete_dumps: Vec::new(),
    }
}

/// Adds the logical dump sets to a cluster's plan (pure): the base-backup rules, by the time
/// each set was taken. A dump needs no WAL, so nothing else depends on it.
pub fn plan_dumps(
    plan: &mut PrunePlan,
    dumps: &[crate::repo::dump::PgDumpSet],
    now: DateTime<Utc>,
    policy: &RetentionConfig,
) {
    let sysid = plan.system_identifier;
    // By the time each set restores from, which the keep rule reads as oldest first (the
    // sets are listed by start time, and two can overlap).
    let mut by_stop: Vec<_> = dumps.iter().map(|d| (d.id.as_str(), d.stop_time)).collect();
    by_stop.sort_by_key(|&(id, t)| (t, id));
    let keep = keep_by_time(by_stop.into_iter(), now, policy);
    plan.delete_dumps = dumps
        .iter()
        .filter(|d| !keep.contains_key(&d.id))
        .map(|d| {
            let mut keys = vec![crate::repo::dump::manifest_key(sysid, &d.id)];
            keys.push(d.globals.key.clone());
            keys.extend(d.databases.iter().map(|db| db.data.key.clone()));
            (d.id.clone(), keys)
        })
        .collect();
    let mut kept: Vec<(String, &'static str)> = keep.into_iter().collect();
    kept.sort_by_key(|(id, _)| dumps.iter().position(|d| &d.id == id));
    plan.keep_dumps = kept;
}

/// Carries the plan out: each deleted backup's manifest first (the backup disappears at once),
/// then its data, then WAL oldest first.
pub async fn execute(store: &dyn Store, plan: &PrunePlan) -> anyhow::Result<usize> {
    // Leftovers first, each set only while it still has no manifest: one that was running
    // past incomplete_after may have finished since the listing.
    let mut deleted = delete_leftovers(store, &plan.delete_incomplete).await?;
    for (_, keys) in plan.delete_backups.iter().chain(&plan.delete_dumps) {
        for key in keys {
            store.delete(key).await?;
            deleted += 1;
        }
    }
    for key in plan.delete_wal.iter().chain(&plan.delete_reports) {
        store.delete(key).await?;
        deleted += 1;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_leftover_names_the_manifest_its_set_would_have() {
        assert_eq!(
            manifest_of("pg/1/backups/b1/data/000001.bundle").as_deref(),
            Some("pg/1/backups/b1/backup.json")
        );
        assert_eq!(
            manifest_of("pg/1/dumps/d1/globals.sql.zst").as_deref(),
            Some("pg/1/dumps/d1/dump.json")
        );
        assert_eq!(
            manifest_of("mysql/u/dumps/d2/dump.sql.zst").as_deref(),
            Some("mysql/u/dumps/d2/dump.json")
        );
        assert_eq!(manifest_of("pg/1/wal/000000010000000000000001.zst"), None);
    }

    #[test]
    fn a_dump_without_its_manifest_goes_once_it_cannot_be_running() {
        let at = |key: &str, t: &str| ObjectInfo {
            key: key.into(),
            size: 1,
            last_modified: crate::repo::catalog::tests::t(t),
        };
        let objects = [
            at("pg/1/dumps/a/globals.sql.zst", "00:01:00"),
            at("pg/1/dumps/a/dump.json", "00:02:00"),
            at("pg/1/dumps/b/globals.sql.zst", "00:01:00"),
            at("pg/1/dumps/b/shop.pgdump.zst", "00:02:00"),
            at("pg/1/dumps/c/globals.sql.zst", "00:01:00"),
            at("pg/1/dumps/c/shop.pgdump.zst", "00:09:00"),
        ];
        let since = crate::repo::catalog::tests::t("00:05:00");
        let gone = incomplete_sets(&objects, "pg/1/dumps/", ["a"].into_iter(), since);
        // `a` is complete; `c` may still be writing.
        assert_eq!(
            gone,
            [
                "pg/1/dumps/b/globals.sql.zst",
                "pg/1/dumps/b/shop.pgdump.zst"
            ]
        );
    }

    #[test]
    fn mysql_dumps_follow_the_backup_rules_and_binlogs_stay_from_the_oldest_kept_dump() {
        use crate::repo::mysql::tests::{catalog, dump, t};
        let c = catalog(
            vec![
                dump("d1", "binlog.000002", "00:01:30"),
                dump("d2", "binlog.000004", "00:03:30"),
                dump("d3", "binlog.000006", "00:05:30"),
            ],
            &[1, 2, 3, 4, 5, 6, 7],
        );
        let policy = |days, backups| RetentionConfig {
            keep_days: days,
            keep_backups: backups,
            incomplete_after: std::time::Duration::from_secs(86400),
        };
        // Two newest kept: d1 goes, and binlogs 1..3 (d2 starts replaying in 4).
        let p = plan_mysql(
            &c,
            t("00:10:00") + chrono::Duration::days(30),
            &policy(1, 2),
        );
        let kept: Vec<&str> = p.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, ["d2", "d3"]);
        assert_eq!(p.delete_dumps.len(), 1);
        assert_eq!(p.delete_dumps[0].0, "d1");
        assert!(
            p.delete_dumps[0].1[0].ends_with("dumps/d1/dump.json"),
            "manifest first"
        );
        assert_eq!(p.binlog_floor.as_deref(), Some("binlog.000004"));
        let data: Vec<&str> = p
            .delete_binlogs
            .iter()
            .filter(|k| !k.ends_with(".json"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            data,
            [
                "binlog.000001.zst",
                "binlog.000002.zst",
                "binlog.000003.zst"
            ]
        );
        assert!(p.delete_binlogs[0].ends_with(".json"), "description first");

        // The window reaches back to 00:02: d1 covers its start and is kept with all binlogs.
        let p = plan_mysql(&c, t("00:02:00") + chrono::Duration::days(1), &policy(1, 1));
        assert_eq!(p.keep.len(), 3, "{p:?}");
        assert_eq!(p.binlog_floor.as_deref(), Some("binlog.000002"));
        assert_eq!(p.delete_binlogs.len(), 2); // binlog.000001 and its description

        // A dump still running started after the newest kept one before it: with one dump
        // kept and a day's incomplete_after, binlogs stay from d2, the newest a day ago.
        let p = plan_mysql(&c, t("00:04:00") + chrono::Duration::days(1), &policy(0, 1));
        let kept: Vec<&str> = p.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, ["d3"]);
        assert_eq!(p.binlog_floor.as_deref(), Some("binlog.000004"));

        // No dumps: nothing bounds the binlogs, nothing is deleted.
        let p = plan_mysql(&catalog(vec![], &[1, 2, 3]), t("00:10:00"), &policy(0, 1));
        assert!(p.is_empty());
    }
    use crate::repo::catalog::tests::{SEG, add_seg, backup, catalog, incremental, t};

    fn objects(cat: &PgCatalog, extra: &[(&str, &str)]) -> Vec<ObjectInfo> {
        let mut out = Vec::new();
        for b in &cat.backups {
            for f in ["backup.json", "base.tar.zst"] {
                out.push(ObjectInfo {
                    key: format!("pg/1/backups/{}/{f}", b.id),
                    size: 1,
                    last_modified: b.stop_time,
                });
            }
        }
        for seg in cat.segments.keys() {
            out.push(ObjectInfo {
                key: format!("pg/1/wal/{}.zst", seg.name(SEG)),
                size: 1,
                last_modified: t("00:00:00"),
            });
        }
        for (key, at) in extra {
            out.push(ObjectInfo {
                key: key.to_string(),
                size: 1,
                last_modified: t(at),
            });
        }
        out
    }

    fn policy(keep_backups: usize) -> RetentionConfig {
        RetentionConfig {
            keep_days: 0,
            keep_backups,
            incomplete_after: Duration::from_secs(3600),
        }
    }

    #[test]
    fn a_kept_incremental_keeps_its_chain_but_not_the_chain_s_wal() {
        let cat = catalog(
            vec![
                backup("full-0-old", 1, 1, "00:01:30"),
                backup("full-1", 2, 2, "00:02:30"),
                incremental("incr-1", 4, "00:04:30", &["full-1"]),
                incremental("incr-2", 6, "00:06:30", &["full-1", "incr-1"]),
            ],
            &[1, 2, 3, 4, 5, 6, 7],
        );
        let p = plan(&cat, &objects(&cat, &[]), t("23:00:00"), &policy(1));
        let mut kept: Vec<&str> = p.keep.iter().map(|(id, _)| id.as_str()).collect();
        kept.sort();
        assert_eq!(kept, vec!["full-1", "incr-1", "incr-2"]);
        let deleted: Vec<&str> = p.delete_backups.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(deleted, vec!["full-0-old"]);
        // Restores start at incr-2: WAL below its start goes.
        let wal: Vec<&str> = p.delete_wal.iter().map(|k| &k[9..33]).collect();
        assert_eq!(wal.last(), Some(&"000000010000000000000005"));
        // Without its full backup, an incremental is not restorable.
        let mut broken = cat.clone();
        broken.backups.retain(|b| b.id != "full-1");
        assert!(!broken.reach(&broken.backups[2]).consistent);
        assert!(cat.reach(&cat.backups[3]).consistent);
    }

    #[test]
    fn what_a_backup_still_running_may_build_on_is_kept_with_its_wal() {
        let mut full_1 = incremental("full-1", 1, "00:10:00", &[]);
        full_1.files.as_mut().unwrap().kind = "full".into();
        let mut full_4 = incremental("full-4", 4, "00:40:00", &[]);
        full_4.files.as_mut().unwrap().kind = "full".into();
        let cat = catalog(
            vec![
                full_1,
                incremental("incr-2", 2, "00:20:00", &["full-1"]),
                full_4,
                // Taken over the network: no incremental builds on it.
                backup("stream-5", 5, 5, "01:10:00"),
            ],
            &[1, 2, 3, 4, 5, 6],
        );
        // A branch that starts below the floor, archived at 00:50 and 01:45.
        let branch = [
            ("pg/1/wal/000000020000000000000002.zst", "00:50:00"),
            ("pg/1/wal/000000020000000000000003.zst", "01:45:00"),
        ];
        let objects = objects(&cat, &branch);
        let kept = |p: &PrunePlan| -> Vec<String> {
            p.keep
                .iter()
                .map(|(id, why)| format!("{id}: {why}"))
                .collect()
        };
        let wal = |p: &PrunePlan| -> Vec<String> {
            p.delete_wal.iter().map(|k| k[9..33].to_string()).collect()
        };

        // At 01:30 a backup running since 00:30 (retention.incomplete_after = 1h) may build on
        // incr-2, the newest file-level backup then, and needs WAL from its start.
        let p = plan(&cat, &objects, t("01:30:00"), &policy(1));
        assert_eq!(
            kept(&p),
            [
                "full-1: a kept incremental backup builds on it",
                "incr-2: a backup still running may build on it",
                "full-4: a backup still running may build on it",
                "stream-5: among the newest"
            ]
        );
        assert_eq!(wal(&p), ["000000010000000000000001"]);

        // At 02:00 (since 01:00): full-4 is the newest file-level backup, stream-5 the newest.
        // The branch's segment archived at 01:45 stays though it lies below the floor.
        let p = plan(&cat, &objects, t("02:00:00"), &policy(1));
        assert_eq!(
            kept(&p),
            [
                "full-4: a backup still running may build on it",
                "stream-5: among the newest"
            ]
        );
        assert_eq!(
            wal(&p),
            [
                "000000010000000000000001",
                "000000010000000000000002",
                "000000010000000000000003",
                "000000020000000000000002"
            ]
        );

        // Later the branch's segment goes too; full-4 stays while it is the newest file-level
        // backup (the next incremental builds on it).
        let p = plan(&cat, &objects, t("23:00:00"), &policy(1));
        assert_eq!(kept(&p).len(), 2);
        assert_eq!(wal(&p).len(), 5);
    }

    #[test]
    fn keeps_the_newest_by_time_not_by_name_and_trims_wal_below_them() {
        // Named so that name order and time order disagree (a clock or timeline oddity).
        let cat = catalog(
            vec![
                backup("zzz-oldest", 2, 2, "00:02:30"),
                backup("aaa-middle", 4, 4, "00:04:30"),
                backup("mmm-newest", 6, 6, "00:06:30"),
            ],
            &[1, 2, 3, 4, 5, 6, 7],
        );
        // Block reference summaries of segments 2 and 4 (see walrefs::Summary).
        let summaries = [
            "pg/1/walrefs/000000010000000000000002.zst",
            "pg/1/walrefs/000000010000000000000004.zst",
        ];
        let extra: Vec<(&str, &str)> = summaries.iter().map(|k| (*k, "00:00:00")).collect();
        let mut p = plan(&cat, &objects(&cat, &extra), t("23:00:00"), &policy(2));
        assert!(p.delete_wal.contains(&summaries[0].to_string()), "{p:?}");
        assert!(!p.delete_wal.contains(&summaries[1].to_string()), "{p:?}");
        p.delete_wal.retain(|k| !k.contains("/walrefs/"));
        let kept: Vec<&str> = p.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, vec!["aaa-middle", "mmm-newest"]);
        assert_eq!(p.delete_backups.len(), 1);
        assert_eq!(p.delete_backups[0].0, "zzz-oldest");
        assert!(
            p.delete_backups[0].1[0].ends_with("backup.json"),
            "manifest first"
        );
        let wal: Vec<&str> = p.delete_wal.iter().map(|k| &k[9..33]).collect();
        assert_eq!(
            wal,
            vec![
                "000000010000000000000001",
                "000000010000000000000002",
                "000000010000000000000003"
            ]
        );
    }

    #[test]
    fn streamed_pieces_go_with_their_segment_or_once_it_is_stored_whole() {
        let mut cat = catalog(
            vec![
                backup("b1", 2, 2, "00:02:30"),
                backup("b2", 4, 4, "00:04:30"),
            ],
            &[2, 3, 4, 5],
        );
        let piece = |seg: &str, end: &str| {
            (
                format!("pg/1/wal/{seg}.00000000-{end}.part.zst"),
                "00:01:00",
            )
        };
        let old = piece("000000010000000000000003", "00002000");
        let superseded = piece("000000010000000000000005", "00004000");
        let current = piece("000000010000000000000006", "00001000");
        cat.superseded_pieces.push(ObjectInfo {
            key: superseded.0.clone(),
            size: 1,
            last_modified: t("00:05:00"),
        });
        let extra = [
            (old.0.as_str(), old.1),
            (superseded.0.as_str(), superseded.1),
            (current.0.as_str(), current.1),
        ];
        let p = plan(&cat, &objects(&cat, &extra), t("23:00:00"), &policy(1));
        assert!(p.delete_wal.contains(&old.0), "{:?}", p.delete_wal);
        assert!(p.delete_wal.contains(&superseded.0), "{:?}", p.delete_wal);
        assert!(!p.delete_wal.contains(&current.0), "{:?}", p.delete_wal);
    }

    #[test]
    fn the_recovery_window_keeps_its_covering_backup() {
        let cat = catalog(
            vec![
                backup("b1", 2, 2, "00:02:30"),
                backup("b2", 4, 4, "00:04:30"),
                backup("b3", 6, 6, "00:06:30"),
            ],
            &[2, 3, 4, 5, 6, 7],
        );
        // Window starts at 00:05:00: b3 is inside, b2 covers the start, b1 goes.
        let mut pol = policy(1);
        pol.keep_days = 1;
        let now = t("00:05:00") + chrono::Duration::days(1);
        let p = plan(&cat, &objects(&cat, &[]), now, &pol);
        let kept: Vec<&str> = p.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, vec!["b2", "b3"]);
        assert!(
            p.delete_wal
                .iter()
                .all(|k| k.contains("00000002.zst") || k.contains("00000003.zst"))
        );
    }

    #[test]
    fn a_branch_that_starts_lower_keeps_its_wal_and_history_is_never_deleted() {
        let mut cat = catalog(vec![backup("b1", 8, 8, "00:08:30")], &[6, 7, 8, 9]);
        // A restore branched timeline 2 off at segment 5; a backup was then taken on it.
        let mut b2 = backup("b2", 5, 5, "00:10:30");
        b2.timeline = 2;
        cat.backups.push(b2);
        add_seg(&mut cat, 2, 5);
        add_seg(&mut cat, 2, 6);
        let extra = [("pg/1/wal/00000002.history.zst", "00:00:00")];
        let p = plan(&cat, &objects(&cat, &extra), t("23:00:00"), &policy(2));
        assert!(p.delete_backups.is_empty());
        // Floor is segment 5 (b2's start): nothing at or above it goes, on either timeline.
        assert!(p.delete_wal.is_empty(), "{:?}", p.delete_wal);
    }

    /// z, then a bad change at 00:10, then a1 and a2 on timeline 1; restored from z to a point
    /// in segment 2, promoted onto timeline 2 at 00:40, which archives the `archived`
    /// segments (timeline, number) at 00:50.
    fn restored_below_newer_backups(archived: &[(u32, u64)]) -> (PgCatalog, Vec<ObjectInfo>) {
        use crate::repo::catalog::tests::add_timeline;
        let mut cat = catalog(
            vec![
                backup("z", 1, 1, "00:05:00"),
                backup("a1", 4, 4, "00:20:00"),
                backup("a2", 6, 6, "00:30:00"),
            ],
            &[1, 2, 3, 4, 5, 6],
        );
        add_timeline(&mut cat, 2, 1, 2 * SEG + 0x500, "00:40:00");
        let mut objects = objects(&cat, &[]);
        for &(tli, n) in archived {
            let seg = Segment { tli, segno: n };
            let object = ObjectInfo {
                key: format!("pg/1/wal/{}.zst", seg.name(SEG)),
                size: 1,
                last_modified: t("00:50:00"),
            };
            cat.segments.insert(seg, object.clone());
            objects.push(object);
        }
        (cat, objects)
    }

    /// The backup each branch restores from stays, and timeline 2's WAL.
    fn keeps_z_and_timeline_2(cat: &PgCatalog, objects: &[ObjectInfo]) {
        let p = plan(cat, objects, t("03:00:00"), &policy(2));
        let kept: Vec<&str> = p.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, ["z", "a1", "a2"], "{p:?}");
        assert!(
            !p.delete_wal.iter().any(|k| k.contains("/wal/00000002")),
            "{:?}",
            p.delete_wal
        );
    }

    #[test]
    fn a_restore_below_newer_backups_keeps_the_backup_production_restores_from() {
        let (cat, objects) = restored_below_newer_backups(&[(2, 2), (2, 3), (2, 4), (2, 5)]);
        assert_eq!(cat.branches().production, Some(2));
        keeps_z_and_timeline_2(&cat, &objects);
    }

    #[test]
    fn an_unsettled_fork_keeps_what_each_branch_restores_from() {
        // Timeline 1 archived on after timeline 2 began (the old primary kept running):
        // which branch is production cannot be told, so each keeps its own.
        let (cat, objects) =
            restored_below_newer_backups(&[(2, 2), (2, 3), (2, 4), (1, 7), (1, 8)]);
        assert_eq!(cat.branches().production, None);
        keeps_z_and_timeline_2(&cat, &objects);
    }

    #[test]
    fn a_fork_in_the_making_keeps_what_it_restores_from_for_a_while() {
        // Timeline 2 (a restore --as-primary from z, at 00:40) has archived nothing yet, and
        // the old primary archived on (00:50): no branch to `branches`, but z is what it
        // restores from.
        let (cat, objects) = restored_below_newer_backups(&[(1, 7), (1, 8)]);
        assert_eq!(cat.branches().production, Some(1));
        let half_an_hour = RetentionConfig {
            incomplete_after: Duration::from_secs(1800),
            ..policy(2)
        };
        let p = plan(&cat, &objects, t("01:00:00"), &half_an_hour);
        let kept: Vec<&str> = p.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, ["z", "a1", "a2"], "{p:?}");
        // Past incomplete_after with still no WAL of its own: let go.
        let p = plan(&cat, &objects, t("03:00:00"), &half_an_hour);
        let kept: Vec<&str> = p.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, ["a1", "a2"], "{p:?}");
    }

    #[test]
    fn after_a_failover_the_old_timeline_s_last_backup_and_its_wal_go() {
        use crate::repo::catalog::tests::add_timeline;
        let mut f1 = incremental("f1", 2, "00:10:00", &[]);
        f1.files.as_mut().unwrap().kind = "full".into();
        let mut cat = catalog(vec![f1], &[1, 2, 3, 4]);
        add_timeline(&mut cat, 2, 1, 4 * SEG + 0x100, "00:20:00");
        for (id, seg, stop) in [("f2", 6, "00:30:00"), ("f3", 8, "00:40:00")] {
            let mut b = backup(id, seg, seg, stop);
            b.timeline = 2;
            cat.backups.push(b);
        }
        for n in 4..=9 {
            add_seg(&mut cat, 2, n);
        }
        let p = plan(&cat, &objects(&cat, &[]), t("23:00:00"), &policy(1));
        let kept: Vec<&str> = p.keep.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(kept, ["f3"], "{p:?}");
        let wal: Vec<&str> = p.delete_wal.iter().map(|k| &k[9..33]).collect();
        for n in 4..=7 {
            let name = Segment { tli: 2, segno: n }.name(SEG);
            assert!(wal.contains(&name.as_str()), "{name} not deleted: {wal:?}");
        }
    }

    #[test]
    fn settings_of_forever_keep_everything() {
        let cat = catalog(
            vec![
                backup("b1", 2, 2, "00:02:30"),
                backup("b2", 4, 4, "00:04:30"),
            ],
            &[1, 2, 3, 4, 5],
        );
        let forever = RetentionConfig {
            keep_days: u32::MAX,
            keep_backups: 1,
            incomplete_after: Duration::from_secs(1),
        };
        let p = plan(&cat, &objects(&cat, &[]), t("23:00:00"), &forever);
        assert!(p.delete_backups.is_empty(), "{p:?}");
        let forever = RetentionConfig {
            keep_days: 0,
            keep_backups: 1,
            incomplete_after: Duration::MAX,
        };
        let p = plan(&cat, &objects(&cat, &[]), t("23:00:00"), &forever);
        assert!(
            p.delete_backups.is_empty() && p.delete_wal.is_empty(),
            "{p:?}"
        );
    }

    #[test]
    fn incomplete_backups_go_only_when_old_and_nothing_without_backups() {
        let cat = catalog(vec![backup("b1", 4, 4, "00:04:30")], &[3, 4]);
        let extra = [
            ("pg/1/backups/killed/base.tar.zst", "00:01:00"),
            ("pg/1/backups/running/base.tar.zst", "22:59:00"),
        ];
        let p = plan(&cat, &objects(&cat, &extra), t("23:00:00"), &policy(1));
        assert_eq!(
            p.delete_incomplete,
            vec!["pg/1/backups/killed/base.tar.zst".to_string()]
        );
        let empty = catalog(vec![], &[1, 2, 3]);
        let p = plan(&empty, &objects(&empty, &[]), t("23:00:00"), &policy(1));
        assert!(p.is_empty(), "no backup bounds the WAL: nothing may go");
    }
}
