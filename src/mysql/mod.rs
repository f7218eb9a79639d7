//! MySQL/MariaDB: logical dumps, binlog shipping, point-in-time restore.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::input_err;
use crate::restore::plan::Target;
use crate::storage::Store;

/// `dbagent backup --engine mysql`. Returns the one-line summary printed on stdout.
pub async fn backup_dump(_cfg: &Config, _store: Arc<dyn Store>) -> anyhow::Result<String> {
    Err(input_err!(
        "backup --engine mysql is not available in this version"
    ))
}

/// `dbagent binlog-push`: ship every closed binlog once. Returns the summary line.
pub async fn binlog_push(_cfg: &Config, _store: Arc<dyn Store>) -> anyhow::Result<String> {
    Err(input_err!("binlog-push is not available in this version"))
}

#[derive(Debug, Clone)]
pub struct MysqlRestoreOptions {
    pub target: Target,
    /// A scratch server is initialised here and started; None restores into DBAGENT_MYSQL_URL.
    pub target_dir: Option<PathBuf>,
    pub dry_run: bool,
    pub port: Option<u16>,
}

/// `dbagent restore --engine mysql`.
pub async fn restore(
    _cfg: &Config,
    _store: Arc<dyn Store>,
    _opts: &MysqlRestoreOptions,
) -> anyhow::Result<()> {
    Err(input_err!(
        "restore --engine mysql is not available in this version"
    ))
}
