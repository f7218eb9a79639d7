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

/// A server program of PostgreSQL `major`, for a restored data directory: `pg.bin_dir`, else
/// `/usr/lib/postgresql/<major>/bin`, else as `program`; and it must say it is that major
/// (`--version`), or the server would refuse the data after it was all written.
pub async fn server_program(cfg: &PgConfig, name: &str, major: u32) -> anyhow::Result<PathBuf> {
    let own = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")).join(name);
    let path = if cfg.bin_dir.is_none() && own.is_file() {
        own
    } else {
        program(cfg, name)?
    };
    let out = tokio::process::Command::new(&path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| input_err!("cannot run {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match version_major(&text) {
        Some(found) if found == major => Ok(path),
        found => Err(input_err!(
            "{} is {}, but the backup is of PostgreSQL {major}: install PostgreSQL {major}'s server binaries or set DBAGENT_PG_BIN_DIR to their directory",
            path.display(),
            found.map_or(
                format!("not a PostgreSQL program ({:?})", text.trim()),
                |f| format!("PostgreSQL {f}")
            )
        )),
    }
}

/// The major version in a `--version` line (`pg_ctl (PostgreSQL) 15.19 (Debian 15.19-1)`).
fn version_major(text: &str) -> Option<u32> {
    let rest = text.split_once("(PostgreSQL) ")?.1;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_major_version_of_a_program() {
        assert_eq!(
            version_major("pg_ctl (PostgreSQL) 15.19 (Debian 15.19-1.pgdg12+1)\n"),
            Some(15)
        );
        assert_eq!(version_major("postgres (PostgreSQL) 16beta2\n"), Some(16));
        assert_eq!(version_major("mysqld  Ver 10.11"), None);
    }
}
