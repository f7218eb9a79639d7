//! The keys one command uses with one repository, resolved once and lazily: the repository's
//! records, the recipients a writer encrypts for (checked against the records: fail closed),
//! the identities a reader decrypts with.
//!
//! `storage::open` attaches a `Keyring` to every store it opens, so the pipeline (the one
//! place that encrypts and decrypts) finds the keys on the store it writes to or reads from;
//! no command can open a repository and forget them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::{EncryptionConfig, Identities, KeySet, Recipients, Records, WriteMode};
use crate::storage::Store;

#[derive(Debug)]
pub struct Keyring {
    repo: String,
    config: EncryptionConfig,
    /// How long what was read stays good: `None` (one command) for the process's life.
    max_age: Option<Duration>,
    current: Mutex<Arc<Reading>>,
}

/// What was read at one time: the records, and what follows from them and the key files.
#[derive(Debug)]
struct Reading {
    at: Instant,
    records: OnceCell<Arc<Records>>,
    recipients: OnceCell<Option<Arc<Recipients>>>,
    identities: OnceCell<Option<Arc<Identities>>>,
}

impl Reading {
    fn new() -> Arc<Reading> {
        Arc::new(Reading {
            at: Instant::now(),
            records: OnceCell::new(),
            recipients: OnceCell::new(),
            identities: OnceCell::new(),
        })
    }
}

impl Keyring {
    pub fn new(repo: &str, config: EncryptionConfig) -> Keyring {
        Keyring {
            repo: repo.to_string(),
            config,
            max_age: None,
            current: Mutex::new(Reading::new()),
        }
    }

    /// For a process that runs for months (`serve`): the repository's records are read again
    /// once `max_age` old, so a writer that `dbagent encryption set` turned away (encryption
    /// turned on, or a rotation its recipients are not yet part of) is refused within that
    /// time, as a new `wal-push` is at once, instead of writing for the old key set (or in the
    /// clear) for as long as it runs.
    pub fn refreshed_every(mut self, max_age: Duration) -> Keyring {
        self.max_age = Some(max_age);
        self
    }

    fn reading(&self) -> Arc<Reading> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if self.max_age.is_some_and(|age| current.at.elapsed() >= age) {
            *current = Reading::new();
        }
        current.clone()
    }

    /// The repository's encryption records, read once (or once per `max_age`).
    pub async fn records(&self, store: &dyn Store) -> anyhow::Result<Arc<Records>> {
        let reading = self.reading();
        Self::records_of(&reading, store).await
    }

    async fn records_of(reading: &Reading, store: &dyn Store) -> anyhow::Result<Arc<Records>> {
        reading
            .records
            .get_or_try_init(|| async { Records::load(store).await.map(Arc::new) })
            .await
            .cloned()
    }

    /// The recipients new objects are encrypted for, `None` in a plain repository. Refuses
    /// (exit 1) a writer whose recipients are missing or not the repository's current key
    /// set: callers ask before writing anything.
    pub async fn recipients(&self, store: &dyn Store) -> anyhow::Result<Option<Arc<Recipients>>> {
        let reading = self.reading();
        reading
            .recipients
            .get_or_try_init(|| async {
                let recipients = self.config.recipients()?;
                let records = Self::records_of(&reading, store).await?;
                match records.write_mode(&self.repo, recipients.as_ref())? {
                    WriteMode::Plain => Ok(None),
                    WriteMode::Encrypt(_) => Ok(recipients.map(Arc::new)),
                }
            })
            .await
            .cloned()
    }

    /// The secret keys this reader holds, if `encryption.identity_file` is set.
    pub async fn identities(&self) -> anyhow::Result<Option<Arc<Identities>>> {
        self.reading()
            .identities
            .get_or_try_init(|| async { Ok(self.config.identities()?.map(Arc::new)) })
            .await
            .cloned()
    }

    /// Refuses (exit 1) a reader that cannot open objects of every key set in `needed`, before
    /// it writes anything: no identity, or none of the keys a set was written for.
    pub async fn check_reader(&self, store: &dyn Store, needed: &[KeySet]) -> anyhow::Result<()> {
        if needed.is_empty() {
            return Ok(());
        }
        let identities = self.identities().await?;
        self.records(store)
            .await?
            .check_reader(identities.as_deref(), needed)
    }
}
