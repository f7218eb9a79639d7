//! MySQL/MariaDB objects in the repository: keys, manifests, and the catalog read back from a
//! listing, with the pure questions asked of it (how far does a dump's binlog chain reach).
//!
//! ```text
//! mysql/<server-uuid>/dumps/<id>/dump.sql.zst     the dump (written first)
//! mysql/<server-uuid>/dumps/<id>/dump.json        its manifest (written last)
//! mysql/<server-uuid>/binlog/<name>.zst           one closed binlog file
//! mysql/<server-uuid>/binlog/<name>.json          what it holds (written last: the file counts
//!                                                 as archived only once this exists)
//! ```

use std::collections::BTreeMap;
use std::fmt;

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
}

/// How far the unbroken run of archived binlogs from a dump's position reaches.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    /// The files, in order, starting with the dump's own.
    pub files: Vec<String>,
    /// No transaction committed after this is missing from `files`.
    pub end_time: Option<DateTime<Utc>>,
    /// The first missing file, when later files of the same sequence exist.
    pub gap: Option<String>,
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
        Ok(MysqlCatalog {
            server_uuid: server.to_string(),
            dumps,
            binlogs,
        })
    }

    /// The archived binlogs from `from` on, up to the first missing one.
    pub fn chain(&self, from: &str) -> Chain {
        let Some(start) = BinlogName::parse(from) else {
            return Chain {
                files: vec![],
                end_time: None,
                gap: None,
            };
        };
        let mut files = Vec::new();
        let mut end_time = None;
        let mut next = start;
        while let Some(m) = self.binlogs.get(&(next.base.clone(), next.seq)) {
            files.push(m.name.clone());
            end_time = Some(m.end_time());
            next = next.next();
        }
        let later_exists = self
            .binlogs
            .range((next.base.clone(), next.seq)..)
            .next()
            .is_some_and(|((base, _), _)| *base == next.base);
        Chain {
            files,
            end_time,
            gap: later_exists.then(|| next.to_string()),
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

    /// Files missing between the first and the last archived binlog of each sequence.
    pub fn gaps(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut prev: Option<BinlogName> = None;
        for m in self.binlogs.values() {
            let Some(n) = BinlogName::parse(&m.name) else {
                continue;
            };
            if let Some(p) = &prev {
                if p.base == n.base && n.seq > p.seq + 1 {
                    out.push(p.next().to_string());
                }
            }
            prev = Some(n);
        }
        out
    }
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
        }
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
