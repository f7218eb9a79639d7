//! The repository's encryption records: `encryption/<version>.json` at the repository root,
//! one per key set the repository has used, never overwritten.
//!
//! Record 1 says the repository is encrypted and for which recipients (by fingerprint); a
//! rotation adds record 2, 3, … naming the new set and the SHA-256 of the record before it,
//! so the history is a chain nobody can rewrite without `verify` noticing. The newest record
//! is the set writers must be configured with; every record stays, so a reader can tell which
//! keys open an object from the key set its seal names.

use anyhow::Context;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::keys::{
    Fingerprint, IDENTITY_SETTING, Identities, KeySet, RECIPIENTS_SETTING, Recipients,
};
use crate::input_err;
use crate::storage::Store;

pub const RECORDS_PREFIX: &str = "encryption/";
pub const RECORD_FORMAT_VERSION: u32 = 1;

pub fn record_key(version: u32) -> String {
    format!("{RECORDS_PREFIX}{version:08}.json")
}

/// One key set the repository has used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub format_version: u32,
    /// 1, 2, 3, …: the record's place in the chain (and in its key).
    pub version: u32,
    pub key_set: String,
    /// Fingerprints of the recipients, sorted.
    pub recipients: Vec<String>,
    /// SHA-256 of the stored bytes of record `version - 1`; none for record 1.
    pub previous: Option<String>,
    pub created: DateTime<Utc>,
    pub dbagent_version: String,
}

impl KeyRecord {
    pub fn key_set(&self) -> anyhow::Result<KeySet> {
        self.key_set
            .parse()
            .map_err(|e: String| anyhow::anyhow!("encryption record {}: {e}", self.version))
    }

    pub fn fingerprints(&self) -> anyhow::Result<Vec<Fingerprint>> {
        self.recipients
            .iter()
            .map(|f| {
                f.parse()
                    .map_err(|e: String| anyhow::anyhow!("encryption record {}: {e}", self.version))
            })
            .collect()
    }
}

/// Every record, oldest first, as read from the repository.
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// Each record with the SHA-256 of its stored bytes.
    pub records: Vec<(KeyRecord, [u8; 32])>,
}

/// What a writer does with its next object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// The repository is not encrypted and the writer has no recipients.
    Plain,
    /// Encrypt for the repository's current key set.
    Encrypt(KeySet),
}

impl Records {
    /// Reads every record. A damaged or inconsistent chain is an error: a writer must not
    /// guess which keys the repository wants.
    pub async fn load(store: &dyn Store) -> anyhow::Result<Records> {
        let mut keys: Vec<String> = store
            .list(RECORDS_PREFIX)
            .await
            .context("listing the repository's encryption records")?
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k.ends_with(".json"))
            .collect();
        keys.sort();
        let mut raw = Vec::with_capacity(keys.len());
        for key in keys {
            let bytes = crate::storage::get_all(store, &key)
                .await
                .with_context(|| format!("reading encryption record {key}"))?;
            raw.push((key, bytes));
        }
        Records::from_objects(&raw)
    }

    /// Checks and orders records read from `(key, bytes)` pairs.
    pub fn from_objects(objects: &[(String, Bytes)]) -> anyhow::Result<Records> {
        let mut records = Vec::with_capacity(objects.len());
        for (i, (key, bytes)) in objects.iter().enumerate() {
            let record: KeyRecord = serde_json::from_slice(bytes)
                .with_context(|| format!("encryption record {key} is not valid"))?;
            if record.format_version > RECORD_FORMAT_VERSION {
                anyhow::bail!(
                    "encryption record {key} has format {} but this dbagent reads up to {RECORD_FORMAT_VERSION}: upgrade dbagent",
                    record.format_version
                );
            }
            let expected = i as u32 + 1;
            if record.version != expected || *key != record_key(expected) {
                anyhow::bail!(
                    "encryption record {key} is out of place (expected {}): the repository's key history is damaged; see `dbagent encryption status`",
                    record_key(expected)
                );
            }
            let previous = records
                .last()
                .map(|(_, sha): &(KeyRecord, [u8; 32])| hex::encode(sha));
            if record.previous != previous {
                anyhow::bail!(
                    "encryption record {key} does not follow record {}: the repository's key history was rewritten",
                    expected - 1
                );
            }
            let fingerprints = record.fingerprints()?;
            if fingerprints.is_empty() || KeySet::of(&fingerprints) != record.key_set()? {
                anyhow::bail!("encryption record {key}: its key set does not match its recipients");
            }
            records.push((record, Sha256::digest(bytes).into()));
        }
        Ok(Records { records })
    }

    pub fn is_encrypted(&self) -> bool {
        !self.records.is_empty()
    }

    pub fn current(&self) -> Option<&KeyRecord> {
        self.records.last().map(|(r, _)| r)
    }

    /// The recipients' fingerprints of a key set, from any record that names it.
    pub fn fingerprints_of(&self, key_set: KeySet) -> Option<Vec<Fingerprint>> {
        self.records
            .iter()
            .map(|(r, _)| r)
            .find(|r| r.key_set().ok() == Some(key_set))
            .and_then(|r| r.fingerprints().ok())
    }

    /// Whether a writer may write, and how. Refuses (exit 1, before anything is written) a
    /// writer without recipients in an encrypted repository, and a writer whose recipients
    /// are not the repository's current set.
    pub fn write_mode(
        &self,
        repo: &str,
        recipients: Option<&Recipients>,
    ) -> anyhow::Result<WriteMode> {
        match (self.current(), recipients) {
            (None, None) => Ok(WriteMode::Plain),
            (None, Some(r)) => Err(input_err!(
                "{RECIPIENTS_SETTING} is set ({}) but repository {repo} is not encrypted: run `dbagent encryption set` once to record these recipients (new objects are then encrypted), or unset it",
                r.source().display()
            )),
            (Some(cur), None) => Err(input_err!(
                "repository {repo} is encrypted (key set {}, record {}): writers need {RECIPIENTS_SETTING}, the public keys; nothing was written",
                cur.key_set,
                cur.version
            )),
            (Some(cur), Some(r)) => {
                if r.key_set().to_string() == cur.key_set {
                    Ok(WriteMode::Encrypt(r.key_set()))
                } else {
                    Err(input_err!(
                        "{RECIPIENTS_SETTING} ({}) names key set {} but repository {repo} now encrypts for key set {} (record {}, {}): use the current recipients file, or record these with `dbagent encryption set`; nothing was written",
                        r.source().display(),
                        r.key_set(),
                        cur.key_set,
                        cur.version,
                        cur.created.format("%Y-%m-%d %H:%M UTC")
                    ))
                }
            }
        }
    }

    /// Refuses (exit 1) a reader that lacks a key for any of `needed`, naming the setting.
    pub fn check_reader(
        &self,
        identities: Option<&Identities>,
        needed: &[KeySet],
    ) -> anyhow::Result<()> {
        if needed.is_empty() {
            return Ok(());
        }
        let Some(ids) = identities else {
            return Err(input_err!(
                "the objects to read are encrypted: readers need {IDENTITY_SETTING}, the secret keys; nothing was written"
            ));
        };
        for set in needed {
            match self.fingerprints_of(*set) {
                None => {
                    return Err(input_err!(
                        "objects are encrypted for key set {set}, which no encryption record of the repository names: the key history is incomplete (see `dbagent encryption status`)"
                    ));
                }
                Some(fps) if !ids.opens(&fps) => {
                    let names: Vec<String> = fps.iter().map(|f| f.to_string()).collect();
                    let have: Vec<String> =
                        ids.fingerprints().iter().map(|f| f.to_string()).collect();
                    return Err(input_err!(
                        "objects are encrypted for key set {set} (keys {}), and {IDENTITY_SETTING} ({}) holds none of them (it holds {}): add one of those secret keys; nothing was written",
                        names.join(", "),
                        ids.source().display(),
                        have.join(", ")
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The record that would make `recipients` current (`None` when they already are).
    pub fn next_record(
        &self,
        recipients: &Recipients,
        now: DateTime<Utc>,
    ) -> Option<(String, KeyRecord)> {
        if self
            .current()
            .is_some_and(|c| c.key_set == recipients.key_set().to_string())
        {
            return None;
        }
        let mut fps: Vec<String> = recipients
            .fingerprints()
            .iter()
            .map(|f| f.to_string())
            .collect();
        fps.sort();
        let version = self.records.len() as u32 + 1;
        Some((
            record_key(version),
            KeyRecord {
                format_version: RECORD_FORMAT_VERSION,
                version,
                key_set: recipients.key_set().to_string(),
                recipients: fps,
                previous: self.records.last().map(|(_, sha)| hex::encode(sha)),
                created: now,
                dbagent_version: env!("CARGO_PKG_VERSION").to_string(),
            },
        ))
    }
}

/// Makes `recipients` the repository's current key set (`dbagent encryption set`): the first
/// record turns encryption on, later ones rotate. Returns the record now current.
pub async fn set(store: &dyn Store, recipients: &Recipients) -> anyhow::Result<KeyRecord> {
    let records = Records::load(store).await?;
    let Some((key, record)) = records.next_record(recipients, Utc::now()) else {
        return Ok(records.current().expect("a current record").clone());
    };
    let mut bytes = serde_json::to_vec_pretty(&record)?;
    bytes.push(b'\n');
    // Never replace a record: a concurrent `set` that got there first wins (a create-only
    // write, not a look then a write), and this one says so instead of rewriting history.
    match store.put_new(&key, Bytes::from(bytes)).await {
        Err(e) if crate::storage::is_already_exists(&e) => anyhow::bail!(
            "encryption record {key} appeared while this one was written: run `dbagent encryption status` and try again"
        ),
        other => other.with_context(|| format!("writing encryption record {key}"))?,
    }
    Ok(record)
}

/// `dbagent encryption status`: the key history, and whether the configured keys fit it.
pub fn describe(
    records: &Records,
    repo: &str,
    recipients: Option<&Recipients>,
    identities: Option<&Identities>,
) -> String {
    let mut out = String::new();
    if !records.is_encrypted() {
        out.push_str(&format!(
            "repository {repo} is not encrypted (no encryption records)\n"
        ));
    }
    for (r, _) in &records.records {
        let current = records.current() == Some(r);
        let readable = match (identities, r.fingerprints()) {
            (Some(ids), Ok(fps)) if ids.opens(&fps) => "identity file opens it",
            (Some(_), _) => "NO configured identity opens it",
            (None, _) => "no identity file configured",
        };
        out.push_str(&format!(
            "record {} ({}): key set {}, recipients {}{}; {readable}\n",
            r.version,
            r.created.format("%Y-%m-%d %H:%M UTC"),
            r.key_set,
            r.recipients.join(", "),
            if current { " (current)" } else { "" },
        ));
    }
    match recipients {
        Some(rs) => out.push_str(&format!(
            "{RECIPIENTS_SETTING}: key set {} ({}){}\n",
            rs.key_set(),
            rs.fingerprints()
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            match records.current() {
                Some(c) if c.key_set == rs.key_set().to_string() => ": current, writers may write",
                Some(_) => ": NOT current, writers are refused",
                None => ": not recorded (`dbagent encryption set` records it)",
            }
        )),
        None => out.push_str(&format!("{RECIPIENTS_SETTING}: not set\n")),
    }
    if let Some(ids) = identities {
        out.push_str(&format!(
            "{IDENTITY_SETTING}: keys {}\n",
            ids.fingerprints()
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::test_pair as keys;
    use crate::storage::LocalStore;

    #[tokio::test]
    async fn enable_rotate_and_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let (id_a, a) = keys();
        let (id_b, b) = keys();

        let none = Records::load(&store).await.unwrap();
        assert_eq!(none.write_mode("r", None).unwrap(), WriteMode::Plain);
        let err = none.write_mode("r", Some(&a)).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 1);
        assert!(err.to_string().contains("dbagent encryption set"), "{err}");

        let first = set(&store, &a).await.unwrap();
        assert_eq!(first.version, 1);
        // The same set again changes nothing.
        assert_eq!(set(&store, &a).await.unwrap(), first);
        let on = Records::load(&store).await.unwrap();
        assert_eq!(
            on.write_mode("r", Some(&a)).unwrap(),
            WriteMode::Encrypt(a.key_set())
        );
        let err = on.write_mode("r", None).unwrap_err().to_string();
        assert!(err.contains("encryption.recipients_file"), "{err}");
        let err = on.write_mode("r", Some(&b)).unwrap_err().to_string();
        assert!(err.contains("dbagent encryption set"), "{err}");

        // Rotation: b is current; objects of a still need a's key.
        let second = set(&store, &b).await.unwrap();
        assert_eq!(second.version, 2);
        let rotated = Records::load(&store).await.unwrap();
        assert!(rotated.write_mode("r", Some(&a)).is_err());
        assert_eq!(
            rotated.write_mode("r", Some(&b)).unwrap(),
            WriteMode::Encrypt(b.key_set())
        );
        rotated.check_reader(Some(&id_a), &[a.key_set()]).unwrap();
        let err = rotated
            .check_reader(Some(&id_b), &[a.key_set(), b.key_set()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("encryption.identity_file"), "{err}");
        let err = rotated
            .check_reader(None, &[b.key_set()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("encryption.identity_file"), "{err}");
        rotated.check_reader(None, &[]).unwrap();
    }

    #[tokio::test]
    async fn a_rewritten_history_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let (_, a) = keys();
        let (_, b) = keys();
        let (_, c) = keys();
        set(&store, &a).await.unwrap();
        set(&store, &b).await.unwrap();
        // Someone replaces record 1 with another key set: record 2 no longer follows it.
        let forged = Records::default().next_record(&c, Utc::now()).unwrap().1;
        store
            .put(
                &record_key(1),
                Bytes::from(serde_json::to_vec(&forged).unwrap()),
            )
            .await
            .unwrap();
        let err = Records::load(&store).await.unwrap_err().to_string();
        assert!(err.contains("rewritten"), "{err}");
        // A gap in the numbering is refused too.
        store.delete(&record_key(1)).await.unwrap();
        let err = Records::load(&store).await.unwrap_err().to_string();
        assert!(err.contains("out of place"), "{err}");
    }
}
