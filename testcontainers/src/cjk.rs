//! The `pg_cjk_parser` stand-in in `ext/pg_cjk_parser` (see its README): built with PGXS and
//! installed into the local PostgreSQL 15, once per process and under a file lock, so test
//! processes running side by side never replace the library under a running server.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use crate::postgres::pg_bin;
use crate::util::{require_file, run, workspace_root};

const FILES: [&str; 4] = [
    "Makefile",
    "pg_cjk_parser.c",
    "pg_cjk_parser.control",
    "pg_cjk_parser--1.0.sql",
];

static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();

/// Makes `CREATE EXTENSION pg_cjk_parser` work on the local PostgreSQL 15. Needs
/// `postgresql-server-dev-15` and write access to PostgreSQL's library and extension
/// directories (the tests run as root).
pub fn install_cjk_parser() -> Result<()> {
    INSTALLED
        .get_or_init(|| build_and_install().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_and_install() -> Result<()> {
    let pg_config = pg_bin("pg_config")?;
    let include = run(
        Command::new(&pg_config).arg("--includedir-server"),
        "pg_config --includedir-server",
    )?;
    require_file(
        &PathBuf::from(include.trim()).join("postgres.h"),
        "PostgreSQL server headers",
        "install postgresql-server-dev-15 (./scripts/setup)",
    )?;
    let src = workspace_root().join("testcontainers/ext/pg_cjk_parser");
    let build = tempfile::tempdir().context("creating a build directory")?;
    for f in FILES {
        fs::copy(src.join(f), build.path().join(f)).with_context(|| format!("copying {f}"))?;
    }
    let lock = fs::File::create(std::env::temp_dir().join("dbagent-pg_cjk_parser.lock"))
        .context("creating the install lock")?;
    // SAFETY: flock on a file descriptor this function owns; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "locking the pg_cjk_parser install: {}",
            std::io::Error::last_os_error()
        );
    }
    run(
        Command::new("make")
            .current_dir(build.path())
            .arg("with_llvm=no")
            .arg(format!("PG_CONFIG={}", pg_config.display()))
            .arg("install"),
        "building the pg_cjk_parser stand-in",
    )?;
    Ok(())
}
