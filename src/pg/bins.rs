//! Finding PostgreSQL's programs.

use std::path::PathBuf;

use crate::config::PgConfig;
use crate::input_err;

/// The path of a PostgreSQL program: `pg.bin_dir` (`DBAGENT_PG_BIN_DIR`), else the newest
/// `/usr/lib/postgresql/<major>/bin`, else the PATH.
pub fn program(cfg: &PgConfig, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &cfg.bin_dir {
        let p = dir.join(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(input_err!(
                "{} not found: check pg.bin_dir / DBAGENT_PG_BIN_DIR",
                p.display()
            ))
        };
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut majors: Vec<(u32, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
            .collect();
        majors.sort();
        for (_, dir) in majors.into_iter().rev() {
            let p = dir.join("bin").join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(input_err!(
        "{name} not found: install the PostgreSQL server binaries or set DBAGENT_PG_BIN_DIR"
    ))
}
