//! Reading `global/pg_control` without a connection (for `wal-push` / `wal-fetch`).

use std::path::{Path, PathBuf};

use crate::input_err;

/// The system identifier: the first 8 bytes of `ControlFileData`, native (little) endian.
pub fn system_identifier(data_dir: &Path) -> anyhow::Result<u64> {
    let path = data_dir.join("global").join("pg_control");
    let bytes = std::fs::read(&path).map_err(|e| {
        input_err!(
            "cannot read {} ({e}): run from the data directory or set PGDATA",
            path.display()
        )
    })?;
    let first: [u8; 8] = bytes
        .get(0..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| input_err!("{} is too short to be a control file", path.display()))?;
    Ok(u64::from_le_bytes(first))
}

/// The data directory a WAL path belongs to: `<data>/pg_wal/<file>` → `<data>`, else the
/// configured PGDATA, else the working directory (PostgreSQL runs archive and restore
/// commands from the data directory).
pub fn data_dir_for(wal_path: &Path, configured: Option<&Path>) -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let abs = if wal_path.is_absolute() {
        wal_path.to_path_buf()
    } else {
        cwd.join(wal_path)
    };
    if let Some(parent) = abs.parent() {
        if parent.file_name().is_some_and(|n| n == "pg_wal") {
            if let Some(data) = parent.parent() {
                if data.join("global").join("pg_control").exists() {
                    return data.to_path_buf();
                }
            }
        }
    }
    configured.map(Path::to_path_buf).unwrap_or(cwd)
}
