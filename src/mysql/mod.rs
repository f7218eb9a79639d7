//! MySQL/MariaDB: logical dumps, binlog shipping, point-in-time restore.

pub mod backup;
pub mod binlog;
pub mod client;
pub mod conn;
pub mod dumpscan;
pub mod load;
pub mod plan;
pub mod restore;
pub mod scratch;
pub mod server;
pub mod sql;
pub mod stream;

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::restore::plan::Target;
use crate::storage::Store;

/// `dbagent backup --engine mysql`.
pub async fn backup_dump(
    cfg: &Config,
    store: Arc<dyn Store>,
) -> anyhow::Result<backup::DumpReport> {
    backup::backup_dump(cfg, store).await
}

/// `dbagent binlog-push`: ship every closed binlog once.
pub async fn binlog_push(
    cfg: &Config,
    store: Arc<dyn Store>,
) -> anyhow::Result<binlog::ShipReport> {
    let mut state = binlog::ShipState::default();
    binlog::ship_closed(cfg, &store, &mut state).await
}

#[derive(Debug, Clone)]
pub struct MysqlRestoreOptions {
    pub target: Target,
    /// A scratch server is initialised here and started; None restores into DBAGENT_MYSQL_URL.
    pub target_dir: Option<PathBuf>,
    pub dry_run: bool,
    pub port: Option<u16>,
    /// Stop the restored server cleanly and leave `target_dir` as its data directory.
    pub no_start: bool,
}

/// `dbagent restore --engine mysql`.
pub async fn restore(
    cfg: &Config,
    store: Arc<dyn Store>,
    opts: &MysqlRestoreOptions,
) -> anyhow::Result<restore::MysqlRestoreReport> {
    restore::restore(cfg, store, opts).await
}
