//! PostgreSQL logical dumps in the repository: keys, the manifest, and the catalog.
//!
//! ```text
//! pg/<system-id>/dumps/<id>/<db>.pgdump.zst    pg_dump -Fc of one database (written first)
//! pg/<system-id>/dumps/<id>/globals.sql.zst    pg_dumpall --globals-only (roles, tablespaces)
//! pg/<system-id>/dumps/<id>/dump.json          the manifest (written last)
//! ```
//! Database names are percent-encoded in keys (they may hold `/` or spaces); the manifest
//! holds the exact keys.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::manifest::ObjectRef;
use crate::storage::Store;

pub fn dumps_prefix(sysid: u64) -> String {
    format!("pg/{sysid}/dumps/")
}

pub fn database_key(sysid: u64, id: &str, database: &str) -> String {
    format!("pg/{sysid}/dumps/{id}/{}.pgdump.zst", key_safe(database))
}

pub fn globals_key(sysid: u64, id: &str) -> String {
    format!("pg/{sysid}/dumps/{id}/globals.sql.zst")
}

pub fn manifest_key(sysid: u64, id: &str) -> String {
    format!("pg/{sysid}/dumps/{id}/dump.json")
}

/// Keeps letters, digits, `_`, `-` and `.` (not leading); percent-encodes the rest.
fn key_safe(name: &str) -> String {
    let mut out = String::new();
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A database-level setting (`ALTER DATABASE … SET`, or `ALTER ROLE … IN DATABASE … SET`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbSetting {
    /// None for the database itself; Some(role) for a role's setting in this database.
    pub role: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCount {
    pub table: String,
    /// Exact `count(*)`, taken in the snapshot the dump was taken in.
    pub rows: i64,
}

/// The fields `repo::private` keeps out of the clear in an encrypted repository default to
/// empty: a reader without the key still lists and plans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DumpedDatabase {
    pub name: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub encoding: String,
    #[serde(default)]
    pub collate: String,
    #[serde(default)]
    pub ctype: String,
    /// `c` (libc) or `i` (ICU).
    #[serde(default)]
    pub locale_provider: String,
    #[serde(default)]
    pub icu_locale: Option<String>,
    /// No later than the snapshot the dump and the row counts saw.
    pub snapshot_time: DateTime<Utc>,
    #[serde(default)]
    pub settings: Vec<DbSetting>,
    #[serde(default)]
    pub tables: Vec<TableCount>,
    pub data: ObjectRef,
}

/// One `backup --kind dump` run: every database it dumped, and the globals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PgDumpSet {
    pub format_version: u32,
    pub id: String,
    /// Kept as a string: JSON readers lose precision on 64-bit integers.
    pub system_identifier: String,
    pub server_version: String,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub globals: ObjectRef,
    pub databases: Vec<DumpedDatabase>,
    pub dbagent_version: String,
}

impl PgDumpSet {
    pub fn database(&self, name: &str) -> Option<&DumpedDatabase> {
        self.databases.iter().find(|d| d.name == name)
    }

    pub fn plain_bytes(&self) -> u64 {
        self.globals.plain_bytes
            + self
                .databases
                .iter()
                .map(|d| d.data.plain_bytes)
                .sum::<u64>()
    }

    pub fn stored_bytes(&self) -> u64 {
        self.globals.stored_bytes
            + self
                .databases
                .iter()
                .map(|d| d.data.stored_bytes)
                .sum::<u64>()
    }
}

/// Every complete dump set of a cluster, oldest first.
pub async fn load(store: &dyn Store, sysid: u64) -> anyhow::Result<Vec<PgDumpSet>> {
    let mut out = Vec::new();
    for obj in store.list(&dumps_prefix(sysid)).await? {
        if !obj.key.ends_with("/dump.json") {
            continue;
        }
        let m: PgDumpSet =
            super::read_manifest(store, &obj.key, &format!("dump manifest {}", obj.key)).await?;
        if m.format_version > super::FORMAT_VERSION {
            anyhow::bail!(
                "dump {} has repository format {} but this dbagent reads up to {}: upgrade dbagent",
                m.id,
                m.format_version,
                super::FORMAT_VERSION
            );
        }
        out.push(m);
    }
    out.sort_by_key(|d| d.start_time);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_safe_for_any_database_name() {
        assert_eq!(
            database_key(7, "20261123T000000Z", "discourse"),
            "pg/7/dumps/20261123T000000Z/discourse.pgdump.zst"
        );
        assert_eq!(key_safe("a/b c"), "a%2Fb%20c");
        assert_eq!(key_safe(".."), "%2E.");
        assert_eq!(key_safe("論壇"), "%E8%AB%96%E5%A3%87");
    }
}
