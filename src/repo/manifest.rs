//! The manifests stored in the repository. Every one carries `format_version`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::wal::Lsn;
use crate::pipeline::{Fetched, Stored, Written};

/// One data object a manifest points at, with the identity of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub key: String,
    pub stored_bytes: u64,
    pub plain_bytes: u64,
    /// SHA-256 of the plain bytes (or `xxh3:` and xxh3-128, for objects written with
    /// `pipeline::Digest::Xxh3`, which no manifest references today); of an encrypted object
    /// (`key_set` set), SHA-256 of the stored age stream, so the manifest says nothing about
    /// the content.
    pub sha256: String,
    /// The key set an encrypted object was written for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_set: Option<String>,
}

impl ObjectRef {
    /// The object an upload wrote under `key`.
    pub fn written(key: &str, w: &Written) -> ObjectRef {
        ObjectRef {
            key: key.to_string(),
            stored_bytes: w.stored_size,
            plain_bytes: w.trailer.plain_size,
            sha256: match &w.seal {
                Some(seal) => seal.cipher_sha256_hex(),
                None => w.trailer.digest_hex(),
            },
            key_set: w.seal.map(|s| s.key_set.to_string()),
        }
    }

    /// The key set a reader needs for this object, if it is encrypted.
    pub fn needs(&self) -> Option<crate::crypto::KeySet> {
        self.key_set.as_deref().and_then(|k| k.parse().ok())
    }

    /// Whether the object's last bytes (read without a key) agree with this manifest.
    pub fn agrees(&self, stored: &Stored) -> bool {
        let same = match (stored, &self.key_set) {
            (Stored::Plain(t, _), None) => t.digest_hex() == self.sha256,
            (Stored::Sealed(s), Some(set)) => {
                s.cipher_sha256_hex() == self.sha256 && s.key_set.to_string() == *set
            }
            _ => false,
        };
        same && stored.plain_size() == self.plain_bytes
    }

    /// Checks what a download read (its trailer and seal, already verified against the bytes)
    /// against the checksum this manifest recorded. `what` names the object in the message.
    pub fn verify(&self, read: &Fetched, what: &str) -> anyhow::Result<()> {
        let matches = match (&read.seal, &self.key_set) {
            (None, None) => read.trailer.digest_hex() == self.sha256,
            (Some(seal), Some(_)) => seal.cipher_sha256_hex() == self.sha256,
            _ => false,
        };
        if matches {
            return Ok(());
        }
        Err(anyhow::Error::new(crate::error::Failure::Corrupt(format!(
            "{what} is corrupt: its data does not match the checksum in its manifest"
        ))))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRows {
    pub table: String,
    /// `pg_class.reltuples` at backup start, or the statistics system's live rows for a table
    /// never analyzed: an estimate; -1 when there is none.
    pub rows_estimate: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatabaseInfo {
    pub name: String,
    pub size_bytes: i64,
    #[serde(default)]
    pub tables: Vec<TableRows>,
    /// `ALTER DATABASE … SET` settings, as `name=value` (e.g. default_text_search_config).
    #[serde(default)]
    pub settings: Vec<String>,
    /// Installed extensions, as `name version`.
    #[serde(default)]
    pub extensions: Vec<String>,
    /// The backup could not read this database's tables and extensions (it could not connect
    /// to it, say): what is empty above is unknown, not empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unread: bool,
}

/// A PostgreSQL base backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseBackup {
    pub format_version: u32,
    pub id: String,
    /// Kept as a string: JSON readers (jq, JavaScript) lose precision on 64-bit integers.
    #[serde(with = "u64_string")]
    pub system_identifier: u64,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub start_wal: String,
    pub stop_wal: String,
    pub start_time: DateTime<Utc>,
    /// When the backup and the WAL it needs were complete: the earliest time it restores to.
    pub stop_time: DateTime<Utc>,
    pub server_version: String,
    pub server_version_num: i32,
    pub wal_segment_size: u64,
    /// The tar stream of a network backup; the file index of a file-level one (`files`).
    pub data: ObjectRef,
    pub databases: Vec<DatabaseInfo>,
    pub dbagent_version: String,
    /// Set for a file-level backup (format 2): its files live in bundles, listed in the index
    /// object `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesInfo>,
}

/// What the manifest of a file-level backup says about its files (the index has the rest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilesInfo {
    /// "full" or "incremental".
    pub kind: String,
    /// The backup an incremental was compared against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub based_on: Option<String>,
    /// Every earlier backup whose bundles this one reads: deleting any of them breaks it.
    #[serde(default)]
    pub depends_on: Vec<String>,
    pub files: u64,
    /// Bytes of the data directory it restores.
    pub plain_bytes: u64,
    /// Plain bytes this backup stored itself.
    pub new_plain_bytes: u64,
    /// Bytes of data files it read (an incremental reads only changed files, and of those
    /// only the blocks the WAL names when it can).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes: Option<u64>,
    /// How an incremental found its changes: "wal" (the block references of the WAL since
    /// its base started) or "compare" (every block of each changed file read and compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes_from: Option<String>,
    /// This backup's own bundle objects.
    pub bundles: Vec<crate::pg::fileset::BundleLoc>,
}

impl BaseBackup {
    /// The PostgreSQL major version it was taken of (`server_version_num` 150019: 15).
    pub fn major(&self) -> u32 {
        (self.server_version_num / 10000) as u32
    }

    /// Bytes of the data directory it restores.
    pub fn plain_bytes(&self) -> u64 {
        self.files
            .as_ref()
            .map_or(self.data.plain_bytes, |f| f.plain_bytes)
    }

    /// Bytes this backup's own objects take in the repository.
    pub fn stored_bytes(&self) -> u64 {
        self.data.stored_bytes
            + self
                .files
                .as_ref()
                .map_or(0, |f| f.bundles.iter().map(|b| b.stored_bytes).sum())
    }

    /// "full" or "incremental" ("full" for a network backup).
    pub fn kind(&self) -> &str {
        self.files.as_ref().map_or("full", |f| f.kind.as_str())
    }

    /// The earlier backups it needs.
    pub fn depends_on(&self) -> &[String] {
        self.files.as_ref().map_or(&[], |f| f.depends_on.as_slice())
    }

    /// Every object key it owns, its manifest excepted.
    pub fn own_keys(&self) -> Vec<String> {
        let mut keys = vec![self.data.key.clone()];
        if let Some(f) = &self.files {
            keys.extend(f.bundles.iter().map(|b| b.key.clone()));
        }
        keys
    }
}

mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_json_is_stable() {
        let m = BaseBackup {
            format_version: 1,
            id: "20261123T180000Z".into(),
            system_identifier: 7_441_000_000_000_000_001,
            timeline: 1,
            start_lsn: "0/2000028".parse().unwrap(),
            stop_lsn: "0/2000138".parse().unwrap(),
            start_wal: "000000010000000000000002".into(),
            stop_wal: "000000010000000000000002".into(),
            start_time: "2026-11-23T18:00:00Z".parse().unwrap(),
            stop_time: "2026-11-23T18:00:05Z".parse().unwrap(),
            server_version: "15.19".into(),
            server_version_num: 150019,
            wal_segment_size: 16 << 20,
            data: ObjectRef {
                key: "pg/7441000000000000001/backups/20261123T180000Z/base.tar.zst".into(),
                stored_bytes: 10,
                plain_bytes: 20,
                sha256: "ab".repeat(32),
                key_set: None,
            },
            databases: vec![DatabaseInfo {
                name: "discourse".into(),
                size_bytes: 8_000_000,
                tables: vec![TableRows {
                    table: "public.posts".into(),
                    rows_estimate: 42,
                }],
                settings: vec!["default_text_search_config=public.config_2_gram_cjk".into()],
                extensions: vec!["pg_trgm 1.6".into()],
                unread: false,
            }],
            dbagent_version: "0.1.0".into(),
            files: None,
        };
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["system_identifier"], "7441000000000000001");
        assert_eq!(json["start_lsn"], "0/2000028");
        assert_eq!(json["format_version"], 1);
        let back: BaseBackup = serde_json::from_value(json).unwrap();
        assert_eq!(back, m);
    }
}
