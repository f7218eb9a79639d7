//! The backup repository format (v1): where every object lives, what manifests say, and the
//! catalog read back from a listing.
//!
//! ```text
//! pg/<system-id>/wal/<segment or history file>.zst      WAL, one object per file
//! pg/<system-id>/backups/<id>/base.tar.zst              base backup data (written first)
//! pg/<system-id>/backups/<id>/data/<n>.bundle            file-level backup: blobs (first)
//! pg/<system-id>/backups/<id>/files.json.zst             file-level backup: the file index
//! pg/<system-id>/backups/<id>/backup.json               manifest (written last)
//! ```
//! A backup exists only when its manifest exists. Every `.zst` object ends with a trailer
//! holding the plain bytes' size and SHA-256 (see `pipeline`).

pub mod catalog;
pub mod dump;
pub mod manifest;
pub mod mysql;
pub mod private;
pub mod wal;

pub const FORMAT_VERSION: u32 = 1;
/// File-level base backups (`pg::fileset`): older dbagents must not read them as a tar.
pub const FILES_FORMAT_VERSION: u32 = 2;

/// Writes a manifest (or report) as pretty JSON under `key`, create-only (`storage::put_once`:
/// the same bytes already there is success, different ones fail and change nothing). `what`
/// names it in the error ("the backup manifest"). Manifests go last: what they describe is
/// already stored.
pub async fn write_manifest<T: serde::Serialize>(
    store: &dyn crate::storage::Store,
    key: &str,
    value: &T,
    what: &str,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut doc = serde_json::to_value(value).with_context(|| format!("encoding {what}"))?;
    if let Some(recipients) = crate::pipeline::recipients(store).await? {
        private::seal(&mut doc, &recipients).with_context(|| format!("encrypting {what}"))?;
    }
    let json = serde_json::to_vec_pretty(&doc).with_context(|| format!("encoding {what}"))?;
    crate::storage::put_once(store, key, json.into())
        .await
        .with_context(|| format!("writing {what}"))
}

/// Reads a manifest written by `write_manifest`: its private part opened when this reader holds
/// a key for it, left out otherwise. `what` names it in the error ("backup manifest …").
pub async fn read_manifest<T: serde::de::DeserializeOwned>(
    store: &dyn crate::storage::Store,
    key: &str,
    what: &str,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let bytes = crate::storage::get_all(store, key).await?;
    let mut doc: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("reading {what}"))?;
    if doc.get("private").is_some() {
        let identities = crate::pipeline::identities(store).await?;
        private::open(&mut doc, identities.as_deref(), key)?;
    }
    serde_json::from_value(doc).with_context(|| format!("reading {what}"))
}

/// A new backup, dump or report id: its UTC start time, then a random suffix, so two runs
/// started in the same second never share keys (one's cleanup must not touch the other's data).
/// Ids sort by time; code that orders backups uses their recorded times anyway.
pub fn new_id(start: chrono::DateTime<chrono::Utc>) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(start.timestamp_nanos_opt().unwrap_or_default() as u128);
    h.write_u32(std::process::id());
    format!(
        "{}-{:04x}",
        start.format("%Y%m%dT%H%M%SZ"),
        h.finish() & 0xffff
    )
}

pub fn pg_root(sysid: u64) -> String {
    format!("pg/{sysid}/")
}

pub fn wal_prefix(sysid: u64) -> String {
    format!("pg/{sysid}/wal/")
}

pub fn wal_key(sysid: u64, file_name: &str) -> String {
    format!("pg/{sysid}/wal/{file_name}.zst")
}

/// Prefix of the WAL segments' block reference summaries (see `pg::walrefs::Summary`).
pub fn walrefs_prefix(sysid: u64) -> String {
    format!("pg/{sysid}/walrefs/")
}

pub fn walrefs_key(sysid: u64, segment: &str) -> String {
    format!("pg/{sysid}/walrefs/{segment}.zst")
}

pub fn backups_prefix(sysid: u64) -> String {
    format!("pg/{sysid}/backups/")
}

pub fn backup_data_key(sysid: u64, id: &str) -> String {
    format!("pg/{sysid}/backups/{id}/base.tar.zst")
}

/// The file index of a file-level backup.
pub fn backup_index_key(sysid: u64, id: &str) -> String {
    format!("pg/{sysid}/backups/{id}/files.json.zst")
}

/// Bundle `no` of a file-level backup.
pub fn backup_bundle_key(sysid: u64, id: &str, no: u32) -> String {
    format!("pg/{sysid}/backups/{id}/data/{no:06}.bundle")
}

pub fn backup_manifest_key(sysid: u64, id: &str) -> String {
    format!("pg/{sysid}/backups/{id}/backup.json")
}

pub fn pg_drills_prefix(sysid: u64) -> String {
    format!("pg/{sysid}/drills/")
}

pub fn pg_drill_key(sysid: u64, id: &str) -> String {
    format!("pg/{sysid}/drills/{id}.json")
}

pub fn mysql_drills_prefix(server_uuid: &str) -> String {
    format!("mysql/{server_uuid}/drills/")
}

pub fn mysql_drill_key(server_uuid: &str, id: &str) -> String {
    format!("{}{id}.json", mysql_drills_prefix(server_uuid))
}
