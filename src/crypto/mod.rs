//! Client-side encryption at rest: age X25519, compress-then-encrypt, fail closed.
//!
//! # Keys
//!
//! Writers (`wal-push`, `backup`, dumps, `binlog-push`) need only the public keys
//! (`encryption.recipients_file`); readers (`wal-fetch`, `restore`, `drill`, `verify --full`)
//! need a secret key (`encryption.identity_file`). The database pod never holds a key that
//! decrypts. Both files are in `age-keygen`'s format (see `keys`).
//!
//! # The repository says it is encrypted
//!
//! `encryption/00000001.json`, `00000002.json`, … (see `record`): each names a key set by
//! its recipients' fingerprints and chains to the record before it by SHA-256. They are
//! written create-only and never deleted. The newest is the key set writers must be
//! configured with: no records and no recipients is a plain repository; anything else that
//! does not match is refused with exit 1 before a byte is written.
//!
//! # An encrypted object
//!
//! A plain object is zstd frames followed by the 64-byte trailer (a zstd skippable frame:
//! `DBAGENT1`, plain size, plain SHA-256, note). An encrypted object is that same plain object
//! inside an age v1 stream (X25519 stanzas for every recipient of the key set, 64 KiB
//! ChaCha20-Poly1305 chunks), followed by a 112-byte *seal* in the clear, framed like the
//! trailer:
//!
//! ```text
//! offset  size  field
//! 0       4     0x184D2A5E (little-endian): a zstd skippable frame
//! 4       4     104: the payload's length
//! 8       8     "DBAGENTS"
//! 16      8     plain size (u64 LE): the bytes the database wrote
//! 24      8     note (u64 LE): a WAL segment's last transaction time, else 0
//! 32      8     size of the age stream (u64 LE)
//! 40      32    SHA-256 of the age stream
//! 72      8     key set: the first 8 bytes of SHA-256 over the recipients' sorted fingerprints
//! 80      32    plain id: the plain SHA-256 hashed with a key derived from the public keys
//! ```
//!
//! So `list` reads sizes and the WAL note with one ranged read of the last 112 bytes, and
//! `verify` without `--full` compares the seal (stored size and checksum, key set) with the
//! manifest, all without a key. The plain SHA-256 is only inside the encrypted part: the
//! clear text says nothing about the content beyond its size (and a WAL segment's time). A
//! reader checks the stored bytes against the seal and the manifest, then age authenticates
//! every chunk, then the plain trailer inside proves the decompressed bytes. By hand:
//! `head -c -112 OBJECT | age -d -i key.txt | zstd -d`.
//!
//! Manifests stay JSON in the clear with what listing and planning need (names, LSNs, times,
//! sizes, the stored bytes' checksum, key sets); what is derived from the data (row counts,
//! database settings, extensions, table names, owners, locales) moves into a `private` field
//! holding an age-encrypted JSON document (`seal_bytes`).

pub mod blob;
pub mod keyring;
pub mod keys;
pub mod record;
pub mod seal;

use std::path::PathBuf;

pub use keys::{Fingerprint, Identities, KeySet, Recipients};
pub use record::{KeyRecord, Records, WriteMode};
pub use seal::{SEAL_LEN, Seal, SealWriter};

/// Where the keys are: paths only, read by the commands that need them.
#[derive(Debug, Clone, Default)]
pub struct EncryptionConfig {
    /// Public keys (`age1…`), one per line: what writers need.
    pub recipients_file: Option<PathBuf>,
    /// Secret keys (`AGE-SECRET-KEY-1…`), one or more: what readers need.
    pub identity_file: Option<PathBuf>,
    /// The public keys of the key set before the current one (the recipients file writers
    /// had before a rotation): never encrypted for, only to tell whether an object stored
    /// for that key set holds the bytes a writer is about to store again.
    pub previous_recipients_file: Option<PathBuf>,
}

impl EncryptionConfig {
    pub fn recipients(&self) -> anyhow::Result<Option<Recipients>> {
        let Some(current) = self.recipients_file.as_deref() else {
            return Ok(None);
        };
        let current = Recipients::load(current)?;
        Ok(Some(match self.previous_recipients_file.as_deref() {
            Some(previous) => {
                let text = std::fs::read_to_string(previous).map_err(|e| {
                    crate::input_err!(
                        "encryption.previous_recipients_file: cannot read {}: {e}",
                        previous.display()
                    )
                })?;
                current.with_previous(Recipients::parse(&text, previous)?)
            }
            None => current,
        }))
    }

    pub fn identities(&self) -> anyhow::Result<Option<Identities>> {
        self.identity_file
            .as_deref()
            .map(Identities::load)
            .transpose()
    }
}
