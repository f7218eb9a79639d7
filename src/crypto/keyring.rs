//! The keys one command uses with one repository, resolved once and lazily: the repository's
//! records, the recipients a writer encrypts for (checked against the records: fail closed),
//! the identities a reader decrypts with.
//!
//! `storage::open` attaches a `Keyring` to every store it opens, so the pipeline (the one
//! place that encrypts and decrypts) finds the keys on the store it writes to or reads from;
//! no command can open a repository and forget them.

use std::sync::Arc;

use tokio::sync::OnceCell;

use super::{EncryptionConfig, Identities, KeySet, Recipients, Records, WriteMode};
use crate::storage::Store;

#[derive(Debug)]
pub struct Keyring {
    repo: String,
    config: EncryptionConfig,
    records: OnceCell<Records>,
    recipients: OnceCell<Option<Arc<Recipients>>>,
    identities: OnceCell<Option<Arc<Identities>>>,
}

impl Keyring {
    pub fn new(repo: &str, config: EncryptionConfig) -> Keyring {
        Keyring {
            repo: repo.to_string(),
            config,
            records: OnceCell::new(),
            recipients: OnceCell::new(),
            identities: OnceCell::new(),
        }
    }

    /// The repository's encryption records, read once.
    pub async fn records(&self, store: &dyn Store) -> anyhow::Result<&Records> {
        self.records.get_or_try_init(|| Records::load(store)).await
    }

    /// The recipients new objects are encrypted for, `None` in a plain repository. Refuses
    /// (exit 1) a writer whose recipients are missing or not the repository's current key
    /// set: callers ask before writing anything.
    pub async fn recipients(&self, store: &dyn Store) -> anyhow::Result<Option<Arc<Recipients>>> {
        self.recipients
            .get_or_try_init(|| async {
                let recipients = self.config.recipients()?;
                let records = self.records(store).await?;
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
        self.identities
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
