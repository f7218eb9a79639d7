//! PostgreSQL logical dumps: `pg_dump -Fc` per database, globals, and database-level settings.

use std::sync::Arc;

use crate::config::Config;
use crate::input_err;
use crate::restore::plan::Target;
use crate::storage::Store;

/// `dbagent backup --engine postgres --kind dump`. Returns the summary printed on stdout.
pub async fn backup_dumps(_cfg: &Config, _store: Arc<dyn Store>) -> anyhow::Result<String> {
    Err(input_err!(
        "backup --kind dump is not available in this version"
    ))
}

#[derive(Debug, Clone)]
pub struct DumpRestoreOptions {
    pub database: String,
    pub target: Target,
    /// Connection URL of the server (and new database name) to restore into.
    pub target_url: String,
    pub dry_run: bool,
}

/// `dbagent restore --engine postgres --dump <db> --target-url <url>`.
pub async fn restore_dump(
    _cfg: &Config,
    _store: Arc<dyn Store>,
    _opts: &DumpRestoreOptions,
) -> anyhow::Result<()> {
    Err(input_err!(
        "restore --dump is not available in this version"
    ))
}
