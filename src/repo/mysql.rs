//! MySQL/MariaDB objects in the repository: keys, manifests, and the catalog read back from a
//! listing, with the pure questions asked of it (how far does a dump's binlog chain reach).
//!
//! ```text
//! mysql/<server-uuid>/dumps/<id>/dump.sql.zst     the dump (written first)
//! mysql/<server-uuid>/dumps/<id>/dump.json        its manifest (written last)
//! mysql/<server-uuid>/binlog/<name>.zst           one closed binlog file
//! mysql/<server-uuid>/binlog/<name>.json          what it holds (written last: the file counts
//!                                                 as archived only once this exists)
//! mysql/<server-uuid>/binlog-stream/<name>/<from>-<to>.zst   bytes [from, to) of binlog
//!                                                 <name>, streamed while it was written
//! mysql/<server-uuid>/binlog-stream/<name>/<from>-<to>.json  what they hold (written last)
//! ```
//!
//! Streamed parts of one file follow each other without overlap, each ending on a
//! transaction boundary; the first starts at 0, so parts `0..n` together are a readable
//! binlog file prefix. Once the complete file is archived its parts are superseded.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::catalog::Window;
use super::manifest::ObjectRef;
use crate::storage::Store;

/// How many binlog descriptions the catalog reads at once.
const META_READS_IN_FLIGHT: usize = 16;

pub fn servers_prefix() -> &'static str {
    "mysql/"
}

pub fn dumps_prefix(server: &str) -> String {
    format!("mysql/{server}/dumps/")
}

pub fn dump_data_key(server: &str, id: &str) -> String {
    format!("mysql/{server}/dumps/{id}/dump.sql.zst")
}

pub fn dump_manifest_key(server: &str, id: &str) -> String {
    format!("mysql/{server}/dumps/{id}/dump.json")
}

pub fn binlog_prefix(server: &str) -> String {
    format!("mysql/{server}/binlog/")
}

pub fn binlog_key(server: &str, name: &str) -> String {
    format!("mysql/{server}/binlog/{name}.zst")
}

pub fn binlog_meta_key(server: &str, name: &str) -> String {
    format!("mysql/{server}/binlog/{name}.json")
}

pub fn stream_prefix(server: &str) -> String {
    format!("mysql/{server}/binlog-stream/")
}

pub fn stream_part_key(server: &str, name: &str, from: u64, to: u64) -> String {
    format!("mysql/{server}/binlog-stream/{name}/{from:012}-{to:012}.zst")
}

pub fn stream_part_meta_key(server: &str, name: &str, from: u64, to: u64) -> String {
    format!("mysql/{server}/binlog-stream/{name}/{from:012}-{to:012}.json")
}

/// The binlog name and byte range a streamed part's key names (either of its two objects).
pub fn parse_stream_key(server: &str, key: &str) -> Option<(String, u64, u64)> {
    let rest = key.strip_prefix(&stream_prefix(server))?;
    let (name, file) = rest.split_once('/')?;
    let stem = file
        .strip_suffix(".json")
        .or_else(|| file.strip_suffix(".zst"))?;
    let (from, to) = stem.split_once('-')?;
    Some((name.to_string(), from.parse().ok()?, to.parse().ok()?))
}

/// Which server family wrote a dump: the tools and some SQL differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    Mariadb,
    Mysql,
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Mariadb => "MariaDB",
            Flavor::Mysql => "MySQL",
        })
    }
}

/// A place in the binlog: file name and byte offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinlogPosition {
    pub file: String,
    pub position: u64,
}

impl fmt::Display for BinlogPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.position)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCount {
    pub table: String,
    /// Exact: the rows written into the dump, counted as the dump streamed past.
    pub rows: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpedDatabase {
    pub name: String,
    /// Private in an encrypted repository (see `repo::private`).
    #[serde(default)]
    pub tables: Vec<TableCount>,
}

/// A MySQL/MariaDB logical dump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MysqlDump {
    pub format_version: u32,
    pub id: String,
    pub server_uuid: String,
    pub server_id: u64,
    pub hostname: String,
    pub flavor: Flavor,
    pub server_version: String,
    /// Before the dump program started.
    pub start_time: DateTime<Utc>,
    /// No later than the dump's snapshot: the dump plus the binlogs from `binlog` restore any
    /// instant from here on.
    pub consistent_time: DateTime<Utc>,
    /// When the dump was complete in the repository.
    pub stop_time: DateTime<Utc>,
    /// The binlog coordinates of the snapshot: replay starts here.
    pub binlog: BinlogPosition,
    /// The GTID position of the snapshot (MariaDB `gtid_slave_pos` form, or MySQL's GTID set).
    pub gtid: Option<String>,
    /// Whether the dump starts with the server's accounts and grants (MariaDB).
    pub accounts: bool,
    pub data: ObjectRef,
    pub databases: Vec<DumpedDatabase>,
    pub dbagent_version: String,
    /// The server's time zones when the dump was taken (dumps before 0.1 lack them): binlog
    /// events logged as statements (`binlog_format` MIXED or STATEMENT) evaluate `NOW()`
    /// into DATETIME columns, and name a session's time zone, in the replaying server's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<ServerTimeZone>,
}

/// What a server's clock means: its `SYSTEM` zone (its process's `TZ`) and global zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerTimeZone {
    /// `@@global.time_zone`: `SYSTEM`, an offset (`+09:00`) or a named zone (`Asia/Tokyo`,
    /// which needs the server's time zone tables).
    pub global: String,
    /// `@@system_time_zone`: the abbreviation of the server's `TZ` (`JST`, `UTC`).
    pub system: String,
    /// The `SYSTEM` zone's offset from UTC when the dump was taken, in seconds.
    pub system_offset_seconds: i64,
    /// `@@global.binlog_format`.
    pub binlog_format: String,
}

impl ServerTimeZone {
    /// A `TZ` value for a server that replays this one's binlogs: UTC, or the dump's fixed
    /// offset (POSIX `<+0900>-09:00`; a zone with daylight saving time is replayed at the
    /// offset it had when the dump was taken).
    pub fn posix_tz(&self) -> String {
        let off = self.system_offset_seconds;
        if off == 0 {
            return "UTC".into();
        }
        let (sign, inverse) = if off > 0 { ('+', '-') } else { ('-', '+') };
        let (h, m) = (off.abs() / 3600, off.abs() % 3600 / 60);
        format!("<{sign}{h:02}{m:02}>{inverse}{h:02}:{m:02}")
    }

    /// The global zone is a named one: replay needs the time zone tables.
    pub fn named(&self) -> bool {
        !self.global.eq_ignore_ascii_case("SYSTEM") && !self.global.starts_with(['+', '-'])
    }
}

impl MysqlDump {
    pub fn total_rows(&self) -> u64 {
        self.databases
            .iter()
            .flat_map(|d| &d.tables)
            .map(|t| t.rows)
            .sum()
    }
}

/// What one archived binlog file holds; written after the file itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinlogMeta {
    pub format_version: u32,
    pub server_uuid: String,
    pub name: String,
    pub data: ObjectRef,
    /// The first event's time (the file's creation).
    pub first_event_time: Option<DateTime<Utc>>,
    /// The latest event time in the file (its Rotate event for a file closed by rotation):
    /// every transaction committed before it is in this file or an earlier one.
    pub last_event_time: Option<DateTime<Utc>>,
    pub events: u64,
    /// `rotate`, `stop` (server shut down) or `none` (crash, or unreadable events).
    pub closed_by: String,
    pub uploaded_at: DateTime<Utc>,
}

impl BinlogMeta {
    /// No transaction after this instant is in the file. Without event times (encrypted
    /// binlogs) the upload time is the only bound there is.
    pub fn end_time(&self) -> DateTime<Utc> {
        self.last_event_time.unwrap_or(self.uploaded_at)
    }
}

/// One streamed part of a binlog file: bytes `from..to`, ending on a transaction boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinlogPart {
    pub format_version: u32,
    pub server_uuid: String,
    pub name: String,
    pub from: u64,
    pub to: u64,
    pub data: ObjectRef,
    pub first_event_time: Option<DateTime<Utc>>,
    /// The latest event time in the file up to `to`.
    pub last_event_time: Option<DateTime<Utc>>,
    pub events: u64,
    /// The GTID of the last transaction in the part (MariaDB `domain-server-seq`), if any.
    pub gtid: Option<String>,
    /// Bytes of events the server does not send a replica (MariaDB's Annotate_rows: the SQL
    /// text of row events), stored as placeholders of the same size so offsets match.
    pub placeholder_bytes: u64,
    /// The part ends the file (its last event is a Rotate or Stop event).
    pub ends_file: bool,
    pub uploaded_at: DateTime<Utc>,
}

/// The streamed prefix of a binlog file whose complete copy is not archived (yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Streamed {
    pub name: String,
    /// Contiguous from offset 0.
    pub parts: Vec<BinlogPart>,
}

impl Streamed {
    /// Bytes of the file the parts hold.
    pub fn end(&self) -> u64 {
        self.parts.last().map_or(0, |p| p.to)
    }

    pub fn last_event_time(&self) -> Option<DateTime<Utc>> {
        self.parts.iter().filter_map(|p| p.last_event_time).max()
    }

    /// The parts reach the file's end (its Rotate or Stop event).
    pub fn ended(&self) -> bool {
        self.parts.last().is_some_and(|p| p.ends_file)
    }

    /// No transaction after this is in the streamed prefix.
    pub fn end_time(&self) -> DateTime<Utc> {
        self.last_event_time()
            .or_else(|| self.parts.last().map(|p| p.uploaded_at))
            .unwrap_or_default()
    }

    /// Puts the parts of one file in order and keeps the run that starts at 0 and has no hole.
    pub fn from_parts(name: &str, mut parts: Vec<BinlogPart>) -> Option<Streamed> {
        parts.sort_by_key(|p| (p.from, p.to));
        let mut run: Vec<BinlogPart> = Vec::new();
        let mut end = 0;
        for p in parts {
            // An empty part only ends a file (one the server left without a Rotate or Stop
            // event): nothing may follow it.
            if p.from == end && (p.to > p.from || (p.ends_file && end > 0)) {
                end = p.to;
                let ended = p.ends_file;
                run.push(p);
                if ended {
                    break;
                }
            } else if p.from > end {
                break;
            }
        }
        (!run.is_empty()).then(|| Streamed {
            name: name.to_string(),
            parts: run,
        })
    }
}

/// A binlog file name split into its base and sequence number (`binlog.000042`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BinlogName {
    pub base: String,
    pub seq: u64,
    width: usize,
}

impl BinlogName {
    pub fn parse(name: &str) -> Option<BinlogName> {
        let (base, seq) = name.rsplit_once('.')?;
        if base.is_empty()
            || seq.is_empty()
            || !seq.bytes().all(|b| b.is_ascii_digit())
            || base.contains('/')
        {
            return None;
        }
        Some(BinlogName {
            base: base.to_string(),
            seq: seq.parse().ok()?,
            width: seq.len(),
        })
    }

    pub fn next(&self) -> BinlogName {
        BinlogName {
            base: self.base.clone(),
            seq: self.seq + 1,
            width: self.width,
        }
    }

    pub fn prev(&self) -> Option<BinlogName> {
        Some(BinlogName {
            base: self.base.clone(),
            seq: self.seq.checked_sub(1)?,
            width: self.width,
        })
    }
}

impl fmt::Display for BinlogName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:0width$}", self.base, self.seq, width = self.width)
    }
}

/// Everything the repository holds for one server.
#[derive(Debug, Clone, Default)]
pub struct MysqlCatalog {
    pub server_uuid: String,
    /// Complete dumps (those with a manifest), oldest `consistent_time` first.
    pub dumps: Vec<MysqlDump>,
    /// Archived binlogs (those with a description), keyed by (base, sequence).
    pub binlogs: BTreeMap<(String, u64), BinlogMeta>,
    /// Streamed prefixes of binlogs not archived complete, keyed like `binlogs`.
    pub streamed: BTreeMap<(String, u64), Streamed>,
    /// Keys of streamed parts whose complete file is archived: `prune` removes them.
    pub superseded_parts: Vec<String>,
}

/// How far a binlog's creation may come before the previous file's, on a server whose clock
/// was stepped back (NTP), before the two are taken for different histories.
pub const HISTORY_SLACK_SECONDS: i64 = 300;

/// How far the unbroken run of archived binlogs from a dump's position reaches.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    /// The files, in order, starting with the dump's own.
    pub files: Vec<String>,
    /// No transaction committed after this is missing from `files`.
    pub end_time: Option<DateTime<Utc>>,
    /// What is missing first (a file, or the rest of a streamed one from a position), when
    /// later files of the same sequence exist.
    pub gap: Option<String>,
    /// The binlog that gap starts in.
    pub gap_file: Option<String>,
    /// The last file of `files` is a streamed prefix, not a complete archived file.
    pub streamed: bool,
    /// The next file by name, whose events are older than the chain's end: it belongs to
    /// another binlog history (RESET MASTER, or a server rebuilt under the same identity
    /// after `prune` took the old history's low-numbered files), and the chain stops before
    /// it. Said as a sentence naming both.
    pub other_history: Option<String>,
}

/// The servers that have anything in the repository.
pub async fn servers(store: &dyn Store) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = store
        .list(servers_prefix())
        .await?
        .iter()
        .filter_map(|o| o.key.split('/').nth(1).map(str::to_string))
        .filter(|s| !s.is_empty())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

impl MysqlCatalog {
    pub async fn load(store: &dyn Store, server: &str) -> anyhow::Result<MysqlCatalog> {
        let mut dumps = Vec::new();
        for obj in store.list(&dumps_prefix(server)).await? {
            if !obj.key.ends_with("/dump.json") {
                continue;
            }
            let m: MysqlDump =
                super::read_manifest(store, &obj.key, &format!("dump manifest {}", obj.key))
                    .await?;
            check_version(m.format_version, &format!("dump {}", m.id))?;
            dumps.push(m);
        }
        dumps.sort_by_key(|d| d.consistent_time);

        let meta_keys: Vec<String> = store
            .list(&binlog_prefix(server))
            .await?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k.ends_with(".json"))
            .collect();
        let metas: Vec<anyhow::Result<BinlogMeta>> = futures::stream::iter(meta_keys)
            .map(|key| async move {
                let m: BinlogMeta =
                    super::read_manifest(store, &key, &format!("binlog description {key}")).await?;
                check_version(m.format_version, &format!("binlog {}", m.name))?;
                Ok(m)
            })
            .buffer_unordered(META_READS_IN_FLIGHT)
            .collect()
            .await;
        let mut binlogs = BTreeMap::new();
        for m in metas {
            let m = m?;
            if let Some(n) = BinlogName::parse(&m.name) {
                binlogs.insert((n.base, n.seq), m);
            }
        }
        let (streamed, superseded_parts) = load_streamed(store, server, &binlogs).await?;
        Ok(MysqlCatalog {
            server_uuid: server.to_string(),
            dumps,
            binlogs,
            streamed,
            superseded_parts,
        })
    }

    /// When no transaction after this instant is in `name` (archived or streamed).
    pub fn end_time_of(&self, name: &str) -> Option<DateTime<Utc>> {
        let n = BinlogName::parse(name)?;
        let k = (n.base, n.seq);
        self.binlogs
            .get(&k)
            .map(BinlogMeta::end_time)
            .or_else(|| self.streamed.get(&k).map(Streamed::end_time))
    }

    /// The streamed prefix of `name`, when its complete copy is not archived.
    pub fn streamed_file(&self, name: &str) -> Option<&Streamed> {
        let n = BinlogName::parse(name)?;
        self.streamed.get(&(n.base, n.seq))
    }

    /// The archived binlogs from `from` on, up to the first missing one.
    pub fn chain(&self, from: &str) -> Chain {
        let Some(start) = BinlogName::parse(from) else {
            return Chain {
                files: vec![],
                end_time: None,
                gap: None,
                gap_file: None,
                streamed: false,
                other_history: None,
            };
        };
        let mut files = Vec::new();
        let mut end_time = None;
        let mut next = start;
        let mut streamed = false;
        // A streamed file the chain stops in before its end: where its stored bytes end.
        let mut cut: Option<(String, u64)> = None;
        let mut other_history = None;
        // The creation time of the last file with one.
        let mut prev_first: Option<DateTime<Utc>> = None;
        loop {
            let key = (next.base.clone(), next.seq);
            // A file is created after the one before it (its first event is written by the
            // server itself at the rotation, on its own clock), give or take a stepped clock.
            // Later events can carry other clocks (a replica's copies of its source's, SET
            // TIMESTAMP), so creation times are what is compared.
            let first = self.first_event_time(&key);
            if let (Some(prev), Some(this)) = (prev_first, first)
                && this + chrono::Duration::seconds(HISTORY_SLACK_SECONDS) < prev
            {
                other_history = Some(format!(
                    "binlog {next} was created at {} although {}, before it, was created at {}: {next} and the files after it belong to another binlog history (RESET MASTER, or a server rebuilt under the same identity)",
                    crate::timespec::show(this),
                    files.last().map_or("the file", |f: &String| f.as_str()),
                    crate::timespec::show(prev)
                ));
                break;
            }
            prev_first = first.or(prev_first);
            if let Some(m) = self.binlogs.get(&key) {
                files.push(m.name.clone());
                end_time = Some(m.end_time());
                streamed = false;
            } else if let Some(s) = self.streamed.get(&key) {
                // Streamed but not archived complete yet: the file being written, or one
                // whose rotation the stream stored before the shipper archived it.
                files.push(s.name.clone());
                end_time = Some(s.end_time());
                streamed = true;
                if !s.ended() {
                    cut = Some((s.name.clone(), s.end()));
                    next = next.next();
                    break;
                }
            } else {
                break;
            }
            next = next.next();
        }
        let later_exists = other_history.is_none()
            && (self
                .binlogs
                .range((next.base.clone(), next.seq)..)
                .next()
                .is_some_and(|((base, _), _)| *base == next.base)
                || self
                    .streamed
                    .range((next.base.clone(), next.seq)..)
                    .next()
                    .is_some_and(|((base, _), _)| *base == next.base));
        // Past a file cut short, its missing rest is the first thing missing.
        let (gap, gap_file) = match (later_exists, cut) {
            (false, _) => (None, None),
            (true, Some((name, end))) => (Some(format!("{name} from position {end}")), Some(name)),
            (true, None) => (Some(next.to_string()), Some(next.to_string())),
        };
        Chain {
            files,
            end_time,
            gap,
            gap_file,
            streamed,
            other_history,
        }
    }

    /// The first event time of a binlog, archived or streamed.
    fn first_event_time(&self, key: &(String, u64)) -> Option<DateTime<Utc>> {
        match self.binlogs.get(key) {
            Some(m) => m.first_event_time,
            None => self
                .streamed
                .get(key)
                .and_then(|s| s.parts.first())
                .filter(|p| p.from == 0)
                .and_then(|p| p.first_event_time),
        }
    }

    /// The span of time the dump plus its binlog chain can reach, if any.
    pub fn dump_window(&self, d: &MysqlDump) -> Option<Window> {
        let chain = self.chain(&d.binlog.file);
        let end = chain.end_time?;
        // Event times are whole seconds: an end logged at second S covers targets up to S.999.
        (end + chrono::Duration::seconds(1) > d.consistent_time).then_some(Window {
            from: d.consistent_time,
            to: end.max(d.consistent_time),
        })
    }

    /// The spans of time a restore can reach, merged across dumps.
    pub fn windows(&self) -> Vec<Window> {
        super::catalog::merge_windows(
            self.dumps
                .iter()
                .filter_map(|d| self.dump_window(d))
                .collect(),
        )
    }

    /// What is missing between the first and the last archived binlog of each sequence:
    /// whole files, and the rest of a streamed file that a later file follows.
    pub fn gaps(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut prev: Option<BinlogName> = None;
        // Each file, and where its stored bytes end when it is a streamed prefix that has not
        // ended.
        let mut names: BTreeMap<BinlogName, Option<u64>> = self
            .streamed
            .values()
            .filter_map(|s| Some((BinlogName::parse(&s.name)?, (!s.ended()).then(|| s.end()))))
            .collect();
        // A complete archived copy supersedes a streamed prefix.
        names.extend(
            self.binlogs
                .values()
                .filter_map(|m| Some((BinlogName::parse(&m.name)?, None))),
        );
        let mut cut: Option<u64> = None;
        for (n, end) in names {
            if let Some(p) = &prev {
                if p.base == n.base {
                    if let Some(at) = cut {
                        out.push(format!("{p} from position {at}"));
                    } else if n.seq > p.seq + 1 {
                        out.push(p.next().to_string());
                    }
                }
            }
            prev = Some(n);
            cut = end;
        }
        out
    }
}

/// The streamed parts of files not archived complete (their descriptions read), and the keys
/// of parts a complete file supersedes (not read).
async fn load_streamed(
    store: &dyn Store,
    server: &str,
    binlogs: &BTreeMap<(String, u64), BinlogMeta>,
) -> anyhow::Result<(BTreeMap<(String, u64), Streamed>, Vec<String>)> {
    let mut superseded = Vec::new();
    let mut wanted: Vec<(String, String)> = Vec::new();
    for obj in store.list(&stream_prefix(server)).await? {
        let Some((name, _, _)) = parse_stream_key(server, &obj.key) else {
            continue;
        };
        let Some(n) = BinlogName::parse(&name) else {
            continue;
        };
        if binlogs.contains_key(&(n.base, n.seq)) {
            superseded.push(obj.key);
        } else if obj.key.ends_with(".json") {
            wanted.push((name, obj.key));
        }
    }
    let parts: Vec<anyhow::Result<(String, BinlogPart)>> = futures::stream::iter(wanted)
        .map(|(name, key)| async move {
            let bytes = crate::storage::get_all(store, &key).await?;
            let p: BinlogPart = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading streamed binlog part {key}"))?;
            check_version(p.format_version, &format!("streamed part of binlog {name}"))?;
            Ok((name, p))
        })
        .buffer_unordered(META_READS_IN_FLIGHT)
        .collect()
        .await;
    let mut by_file: BTreeMap<String, Vec<BinlogPart>> = BTreeMap::new();
    for p in parts {
        let (name, p) = p?;
        by_file.entry(name).or_default().push(p);
    }
    let mut streamed = BTreeMap::new();
    for (name, parts) in by_file {
        let Some(n) = BinlogName::parse(&name) else {
            continue;
        };
        if let Some(s) = Streamed::from_parts(&name, parts) {
            streamed.insert((n.base, n.seq), s);
        }
    }
    Ok((streamed, superseded))
}

fn check_version(found: u32, what: &str) -> anyhow::Result<()> {
    if found > super::FORMAT_VERSION {
        anyhow::bail!(
            "{what} has repository format {found} but this dbagent reads up to {}: upgrade dbagent",
            super::FORMAT_VERSION
        );
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn t(s: &str) -> DateTime<Utc> {
        format!("2026-11-23T{s}Z").parse().unwrap()
    }

    pub fn dump(id: &str, file: &str, consistent: &str) -> MysqlDump {
        MysqlDump {
            format_version: 1,
            id: id.into(),
            server_uuid: "u".into(),
            server_id: 1,
            hostname: "db-0".into(),
            flavor: Flavor::Mariadb,
            server_version: "10.11.19-MariaDB".into(),
            start_time: t(consistent),
            consistent_time: t(consistent),
            stop_time: t(consistent),
            binlog: BinlogPosition {
                file: file.into(),
                position: 1019,
            },
            gtid: Some("0-1-14".into()),
            accounts: true,
            data: ObjectRef {
                key: "k".into(),
                stored_bytes: 1,
                plain_bytes: 1,
                sha256: String::new(),
                key_set: None,
            },
            databases: vec![],
            dbagent_version: "test".into(),
            time_zone: None,
        }
    }

    /// Binlog `binlog.00000n` ends at minute n.
    pub fn binlog(n: u64) -> BinlogMeta {
        BinlogMeta {
            format_version: 1,
            server_uuid: "u".into(),
            name: format!("binlog.{n:06}"),
            data: ObjectRef {
                key: format!("binlog.{n:06}.zst"),
                stored_bytes: 1,
                plain_bytes: 1,
                sha256: String::new(),
                key_set: None,
            },
            first_event_time: Some(t(&format!("00:{:02}:00", n - 1))),
            last_event_time: Some(t(&format!("00:{n:02}:00"))),
            events: 3,
            closed_by: "rotate".into(),
            uploaded_at: t(&format!("00:{n:02}:30")),
        }
    }

    pub fn catalog(dumps: Vec<MysqlDump>, binlogs: &[u64]) -> MysqlCatalog {
        MysqlCatalog {
            server_uuid: "u".into(),
            dumps,
            binlogs: binlogs
                .iter()
                .map(|&n| (("binlog".to_string(), n), binlog(n)))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_replaying_server_runs_in_the_dump_s_offset() {
        let tz = |off| ServerTimeZone {
            global: "SYSTEM".into(),
            system: "X".into(),
            system_offset_seconds: off,
            binlog_format: "MIXED".into(),
        };
        assert_eq!(tz(0).posix_tz(), "UTC");
        assert_eq!(tz(9 * 3600).posix_tz(), "<+0900>-09:00");
        assert_eq!(tz(-(3 * 3600 + 1800)).posix_tz(), "<-0330>+03:30");
        assert!(!tz(0).named());
        let mut named = tz(0);
        named.global = "Asia/Tokyo".into();
        assert!(named.named());
        named.global = "+09:00".into();
        assert!(!named.named());
    }

    #[test]
    fn names() {
        let n = BinlogName::parse("mysql-bin.000042").unwrap();
        assert_eq!((n.base.as_str(), n.seq), ("mysql-bin", 42));
        assert_eq!(n.next().to_string(), "mysql-bin.000043");
        assert_eq!(
            BinlogName::parse("b.999999").unwrap().next().to_string(),
            "b.1000000"
        );
        assert!(BinlogName::parse("binlog.index").is_none());
        assert!(BinlogName::parse(".000001").is_none());
        assert!(BinlogName::parse("../x.000001").is_none());
    }

    #[test]
    fn chain_stops_at_the_first_missing_file() {
        let c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[1, 2, 3, 5]);
        let chain = c.chain("binlog.000002");
        assert_eq!(chain.files, vec!["binlog.000002", "binlog.000003"]);
        assert_eq!(chain.end_time, Some(t("00:03:00")));
        assert_eq!(chain.gap.as_deref(), Some("binlog.000004"));
        assert_eq!(c.gaps(), vec!["binlog.000004".to_string()]);
        assert_eq!(
            c.windows(),
            vec![Window {
                from: t("00:01:30"),
                to: t("00:03:00")
            }]
        );
        // A dump whose own file is not archived reaches nothing.
        let c = catalog(vec![dump("d1", "binlog.000009", "00:08:30")], &[1, 2]);
        let chain = c.chain("binlog.000009");
        assert!(chain.files.is_empty());
        assert_eq!(chain.gap, None);
        assert!(c.windows().is_empty());
    }

    /// Binlog `binlog.00000n` streamed up to minute n (its end, when `ended`).
    pub fn streamed(n: u64, ended: bool) -> ((String, u64), Streamed) {
        let name = format!("binlog.{n:06}");
        let part = BinlogPart {
            format_version: 1,
            server_uuid: "u".into(),
            name: name.clone(),
            from: 0,
            to: 900,
            data: ObjectRef {
                key: format!("{name}/0-900.zst"),
                stored_bytes: 1,
                plain_bytes: 900,
                sha256: String::new(),
                key_set: None,
            },
            first_event_time: Some(t(&format!("00:{:02}:00", n - 1))),
            last_event_time: Some(t(&format!("00:{n:02}:00"))),
            events: 3,
            gtid: Some(format!("0-1-{n}")),
            placeholder_bytes: 0,
            ends_file: ended,
            uploaded_at: t(&format!("00:{n:02}:01")),
        };
        (
            ("binlog".to_string(), n),
            Streamed::from_parts(&name, vec![part]).unwrap(),
        )
    }

    #[test]
    fn an_empty_part_ends_a_file_the_server_left_without_a_rotate() {
        let (_, s) = streamed(4, false);
        let open = s.parts[0].clone();
        let mut end = open.clone();
        end.from = 900;
        end.ends_file = true;
        let ended = Streamed::from_parts(&s.name, vec![end.clone(), open.clone()]).unwrap();
        assert!(ended.ended());
        assert_eq!(ended.end(), 900);
        // Not an end without the bytes before it, nor an empty part that does not end it.
        let mut lone = end.clone();
        lone.from = 0;
        lone.to = 0;
        assert!(Streamed::from_parts(&s.name, vec![lone]).is_none());
        let mut empty = end;
        empty.ends_file = false;
        assert!(
            !Streamed::from_parts(&s.name, vec![open, empty])
                .unwrap()
                .ended()
        );
    }

    #[test]
    fn a_chain_goes_on_through_streamed_files_that_ended_and_stops_at_the_one_being_written() {
        let mut c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[2, 3]);
        c.streamed.extend([streamed(4, true), streamed(5, false)]);
        let chain = c.chain("binlog.000002");
        assert_eq!(
            chain.files,
            vec![
                "binlog.000002",
                "binlog.000003",
                "binlog.000004",
                "binlog.000005"
            ]
        );
        assert!(chain.streamed);
        assert_eq!(chain.end_time, Some(t("00:05:00")));
        assert_eq!(chain.gap, None);
        assert!(c.gaps().is_empty());
        // A file streamed after a hole (binlogs purged while the sidecar was away) is a gap:
        // --latest must not stop silently before it.
        let mut c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[2, 3]);
        c.streamed.extend([streamed(4, false), streamed(6, false)]);
        let chain = c.chain("binlog.000002");
        assert_eq!(chain.files.len(), 3);
        // What is missing first is the rest of 4 (it has not ended), then 5.
        let end4 = c.streamed[&("binlog".to_string(), 4)].end();
        let missing = format!("binlog.000004 from position {end4}");
        assert_eq!(chain.gap.as_deref(), Some(missing.as_str()));
        assert_eq!(chain.gap_file.as_deref(), Some("binlog.000004"));
        assert_eq!(c.gaps(), vec![missing]);
        // Two whole files missing between complete ones: the first is named.
        let c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[2, 5]);
        let chain = c.chain("binlog.000002");
        assert_eq!(chain.gap.as_deref(), Some("binlog.000003"));
        assert_eq!(chain.gap_file.as_deref(), Some("binlog.000003"));
        assert_eq!(c.gaps(), vec!["binlog.000003".to_string()]);
        // A streamed file that has not ended, then a complete later one: also a gap.
        let mut c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[2, 5]);
        c.streamed.extend([streamed(3, false)]);
        let end = c.streamed[&("binlog".to_string(), 3)].end();
        assert_eq!(
            c.chain("binlog.000002").gap,
            Some(format!("binlog.000003 from position {end}"))
        );
        assert_eq!(c.gaps(), vec![format!("binlog.000003 from position {end}")]);
        // Cut short, then the next file: only the rest of the first is missing (the sidecar
        // was away while the server rotated and purged it).
        let mut c = catalog(vec![dump("d1", "binlog.000002", "00:01:30")], &[2]);
        c.streamed.extend([streamed(3, false), streamed(4, false)]);
        let chain = c.chain("binlog.000002");
        assert_eq!(chain.files, vec!["binlog.000002", "binlog.000003"]);
        assert_eq!(
            chain.gap,
            Some(format!("binlog.000003 from position {end}"))
        );
        assert_eq!(c.gaps(), vec![format!("binlog.000003 from position {end}")]);
    }

    #[test]
    fn an_end_in_the_dumps_own_second_still_reaches_it() {
        // The chain's last event is logged at 00:02:00 (whole seconds); the dump's snapshot
        // was at 00:02:00.4: replay stops at whole seconds, so the dump is restorable.
        let c = catalog(vec![dump("d1", "binlog.000002", "00:02:00.4")], &[2]);
        assert_eq!(
            c.windows(),
            vec![Window {
                from: t("00:02:00.4"),
                to: t("00:02:00.4")
            }]
        );
        let c = catalog(vec![dump("d1", "binlog.000002", "00:02:01")], &[2]);
        assert!(c.windows().is_empty());
    }

    #[test]
    fn manifest_json_is_stable() {
        let d = dump("20261123T000130Z", "binlog.000002", "00:01:30");
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["flavor"], "mariadb");
        assert_eq!(json["binlog"]["position"], 1019);
        assert_eq!(json["format_version"], 1);
        let back: MysqlDump = serde_json::from_value(json).unwrap();
        assert_eq!(back, d);
    }
}
