//! `dbagent backup --engine mysql`: a logical dump in one consistent snapshot, streamed into
//! the repository with its binlog coordinates and exact row counts.
//!
//! `mariadb-dump`/`mysqldump --single-transaction --master-data=2` (`--source-data=2` on
//! MySQL 8.0.26+) writes the snapshot's binlog coordinates as a comment at the top; the dump
//! scanner reads them, and counts the rows of every table, as the stream goes by on its way
//! to compression. On MariaDB the server's accounts and grants (`--system=users`, as
//! `CREATE USER IF NOT EXISTS` + `GRANT`) come first in the same object, so that a restore can
//! replay binlogged statements that refer to them. The manifest is written last.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::Serialize;

use super::client;
use super::conn::MysqlConn;
use super::dumpscan::{DumpFacts, DumpScanner};
use super::server::{Server, ServerFacts};
use crate::config::Config;
use crate::input_err;
use crate::pipeline::PipeOptions;
use crate::proc::{Program, Stdout};
use crate::repo::FORMAT_VERSION;
use crate::repo::mysql::{
    self as keys, BinlogPosition, DumpedDatabase, Flavor, MysqlDump, TableCount,
};
use crate::restore::human;
use crate::storage::Store;

/// The accounts part is read into memory before the data dump starts; it is a few lines per
/// account, so this bound is generous.
const MAX_ACCOUNTS_BYTES: u64 = 64 << 20;

/// What `dbagent backup --engine mysql` did.
#[derive(Debug, Serialize)]
pub struct DumpReport {
    pub id: String,
    pub server_uuid: String,
    pub flavor: Flavor,
    pub server_version: String,
    pub seconds: f64,
    pub databases: Vec<String>,
    pub tables: usize,
    pub rows: u64,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    /// Where binlog replay starts.
    pub binlog: BinlogPosition,
    pub gtid: Option<String>,
    /// Tables of engines without transactions (`schema.table engine`): read outside the
    /// dump's snapshot.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub non_transactional: Vec<String>,
}

impl std::fmt::Display for DumpReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "mysql dump {} of server {} ({} {}) complete in {:.1}s: {} databases, {} tables, {} rows, {} read, {} stored, binlog {}",
            self.id,
            self.server_uuid,
            self.flavor,
            self.server_version,
            self.seconds,
            self.databases.len(),
            self.tables,
            self.rows,
            human(self.plain_bytes),
            human(self.stored_bytes),
            self.binlog
        )?;
        if let Some(gtid) = &self.gtid {
            write!(f, ", gtid {gtid}")?;
        }
        if !self.non_transactional.is_empty() {
            write!(
                f,
                "\n{}",
                non_transactional_warning(&self.non_transactional)
            )?;
        }
        Ok(())
    }
}

pub async fn backup_dump(cfg: &Config, store: Arc<dyn Store>) -> anyhow::Result<DumpReport> {
    let started = Instant::now();
    let conn = MysqlConn::from_config(&cfg.mysql)?;
    let server = Server::connect(&cfg.mysql, conn).await?;
    server.require_binlog()?;
    let databases = server.user_databases().await?;
    let time_zone = server.time_zone().await?;
    if databases.is_empty() {
        return Err(input_err!(
            "{} holds no databases besides the system ones: there is nothing to dump",
            server.conn.describe()
        ));
    }
    // A single-transaction dump is consistent for transactional tables only: the others are
    // read whenever the dump reaches them, and a write to one meanwhile is both in the dump
    // and replayed from the binlogs after its position (twice, for `n = n + 1`).
    let non_transactional = server.non_transactional_tables().await?;
    if !non_transactional.is_empty() {
        tracing::warn!(
            tables = %non_transactional.join(", "),
            "{}",
            non_transactional_warning(&non_transactional)
        );
    }
    let uuid = server.facts.server_uuid.clone();
    // Fail on a wrong bucket or credentials before reading the database.
    store.list(&keys::dumps_prefix(&uuid)).await?;

    let start_time = Utc::now();
    let id = crate::repo::new_id(start_time);
    let data_key = keys::dump_data_key(&uuid, &id);
    let manifest_key = keys::dump_manifest_key(&uuid, &id);
    if store.head(&manifest_key).await?.is_some() {
        anyhow::bail!("a dump named {id} already exists; try again in a second");
    }

    let accounts = match server.facts.flavor {
        Flavor::Mariadb => dump_accounts(&server).await,
        Flavor::Mysql => None,
    };
    let options = server.conn.options_file()?;
    let program = Program::new(&server.programs.dump)
        .arg(options.arg())
        .args(dump_args(&server.facts))
        .arg("--databases")
        // Names are the server's: after `--`, a database called `--no-data` stays a name.
        .arg("--")
        .args(&databases);
    // Sessions of this account already waiting are not the dump's.
    let mut watch = server.conn.connect().await?;
    let waiting_before: Vec<u64> = server
        .waiting_sessions(&mut watch)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|w| w.0)
        .collect();
    tracing::info!(%id, server = %server.conn.describe(), databases = databases.len(), "mysql dump started");
    let has_accounts = accounts.is_some();
    let (data, scanner) = program
        .run()
        .stop_when(lock_wait(
            &server,
            watch,
            cfg.mysql.lock_wait_timeout,
            waiting_before,
        ))
        .on_failure(|exit| {
            let line = exit.telling_line();
            if client::is_connect_error(&line) {
                client::client_error(&server.conn, &line)
            } else {
                exit.error()
            }
        })
        .to_store(
            store.as_ref(),
            &data_key,
            PipeOptions::from_config(cfg),
            Stdout::watched(DumpScanner::default()).after(accounts.unwrap_or_default()),
        )
        .await?;
    drop(options);
    let facts = scanner.finish();
    let (binlog, consistent_time) = match (&facts.binlog, facts.coordinates_seen_at) {
        (Some((file, position)), Some(seen)) if facts.completed => (
            BinlogPosition {
                file: file.clone(),
                position: *position,
            },
            seen,
        ),
        _ => {
            let _ = store.delete(&data_key).await;
            anyhow::bail!(
                "the dump from {} is incomplete (binlog coordinates {}, end marker {}): not recorded",
                server.programs.dump.display(),
                if facts.binlog.is_some() {
                    "found"
                } else {
                    "missing"
                },
                if facts.completed { "found" } else { "missing" }
            );
        }
    };

    let manifest = MysqlDump {
        format_version: FORMAT_VERSION,
        id: id.clone(),
        server_uuid: uuid.clone(),
        server_id: server.facts.server_id,
        hostname: server.facts.hostname.clone(),
        flavor: server.facts.flavor,
        server_version: server.facts.version.clone(),
        start_time,
        consistent_time,
        stop_time: Utc::now(),
        binlog,
        gtid: facts.gtid.clone(),
        accounts: has_accounts,
        data,
        databases: dumped_databases(&databases, &facts),
        dbagent_version: env!("CARGO_PKG_VERSION").to_string(),
        time_zone: Some(time_zone),
    };
    crate::repo::write_manifest(
        store.as_ref(),
        &manifest_key,
        &manifest,
        "the dump manifest",
    )
    .await?;
    tracing::info!(%id, "mysql dump complete");
    Ok(DumpReport {
        seconds: started.elapsed().as_secs_f64(),
        tables: manifest.databases.iter().map(|d| d.tables.len()).sum(),
        rows: manifest.total_rows(),
        databases: manifest.databases.into_iter().map(|d| d.name).collect(),
        id: manifest.id,
        server_uuid: manifest.server_uuid,
        flavor: manifest.flavor,
        server_version: manifest.server_version,
        plain_bytes: manifest.data.plain_bytes,
        stored_bytes: manifest.data.stored_bytes,
        binlog: manifest.binlog,
        gtid: manifest.gtid,
        non_transactional,
    })
}

/// Resolves once a session of the dump has waited `limit` for a lock, after ending its wait on
/// the server: `FLUSH TABLES WITH READ LOCK` queued behind a long query holds up every write
/// on the server while it waits, and killing the client alone would leave it queued.
/// (`mariadb-dump` and `mysqldump` have no lock-wait option of their own.)
async fn lock_wait(
    server: &Server,
    mut session: mysql_async::Conn,
    limit: Duration,
    before: Vec<u64>,
) -> anyhow::Error {
    let limit_secs = limit.as_secs().max(1);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let waiting = match server.waiting_sessions(&mut session).await {
            Ok(w) => w,
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "cannot see the dump's sessions");
                if let Ok(fresh) = server.conn.connect().await {
                    session = fresh;
                }
                continue;
            }
        };
        let Some((id, _, state, statement)) = waiting
            .into_iter()
            .find(|(id, secs, ..)| !before.contains(id) && *secs >= limit_secs)
        else {
            continue;
        };
        if let Err(e) = server.kill_query(&mut session, id).await {
            tracing::warn!(error = %format!("{e:#}"), session = id, "could not end the dump's lock wait on the server");
        }
        return anyhow::anyhow!(
            "the dump waited {} for a lock ({state}{}): another session holds it (a long query or LOCK TABLES); the dump stopped and withdrew its request so writes are not held up; retry once the lock is released, or raise mysql.lock_wait_timeout",
            humantime::format_duration(limit),
            if statement.is_empty() {
                String::new()
            } else {
                format!(": {statement}")
            }
        );
    }
}

fn non_transactional_warning(tables: &[String]) -> String {
    format!(
        "warning: {} table(s) use an engine without transactions ({}): the dump reads them outside its snapshot, so a write to one during the dump is replayed on top of it at restore; convert them to InnoDB (ALTER TABLE … ENGINE=InnoDB)",
        tables.len(),
        tables
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
            + if tables.len() > 5 { ", …" } else { "" }
    )
}

/// The dump program's options: one consistent snapshot, everything in the databases
/// (routines, triggers, events), binary data as hex, coordinates as a comment.
fn dump_args(facts: &ServerFacts) -> Vec<&'static str> {
    let mut args = vec![
        "--single-transaction",
        "--quick",
        "--routines",
        "--triggers",
        "--events",
        "--hex-blob",
        "--default-character-set=utf8mb4",
        "--max-allowed-packet=1G",
    ];
    match facts.flavor {
        Flavor::Mariadb => args.extend(["--master-data=2", "--gtid"]),
        Flavor::Mysql if version_at_least(&facts.version, (8, 0, 26)) => {
            args.push("--source-data=2")
        }
        Flavor::Mysql => args.push("--master-data=2"),
    }
    args
}

fn version_at_least(version: &str, want: (u32, u32, u32)) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let have = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    have >= want
}

/// MariaDB's accounts and grants as portable SQL. Without the privilege to read them, the
/// dump goes on without them (and says so).
async fn dump_accounts(server: &Server) -> Option<Vec<u8>> {
    let options = server.conn.options_file().ok()?;
    let out = Program::new(&server.programs.dump)
        .arg(options.arg())
        .args([
            "--system=users",
            "--insert-ignore",
            "--default-character-set=utf8mb4",
        ])
        .run()
        .output()
        .await;
    match out {
        Ok(out) if out.success() && (out.stdout.len() as u64) < MAX_ACCOUNTS_BYTES => {
            // The data dump's own end marker is the one that proves completeness.
            let text: Vec<u8> = out
                .stdout
                .split_inclusive(|&b| b == b'\n')
                .filter(|l| !l.starts_with(b"-- Dump completed"))
                .flat_map(grant_without_password)
                .collect();
            Some(text)
        }
        Ok(out) => {
            tracing::warn!(
                error = %out.telling_line(),
                "accounts and grants not dumped (the dump user needs SELECT on mysql.*)"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "accounts and grants not dumped");
            None
        }
    }
}

/// On MariaDB, `GRANT … IDENTIFIED BY PASSWORD '…'` *resets* the password of an account that
/// already exists on the restore target (its root, the account dbagent connects as). The
/// `CREATE USER IF NOT EXISTS` lines already carry each new account's password, so the grants
/// keep only the privileges.
fn grant_without_password(line: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(line);
    if !text.trim_start().to_ascii_uppercase().starts_with("GRANT ") {
        return line.to_vec();
    }
    let upper = text.to_ascii_uppercase();
    let Some(start) = upper.find(" IDENTIFIED ") else {
        return line.to_vec();
    };
    let end = upper[start..]
        .find(" WITH ")
        .map(|i| start + i)
        .or_else(|| upper[start..].rfind(';').map(|i| start + i))
        .unwrap_or(text.len());
    format!("{}{}", &text[..start], &text[end..]).into_bytes()
}

fn dumped_databases(names: &[String], facts: &DumpFacts) -> Vec<DumpedDatabase> {
    let mut out: Vec<DumpedDatabase> = names
        .iter()
        .map(|n| DumpedDatabase {
            name: n.clone(),
            tables: vec![],
        })
        .collect();
    for ((db, table), rows) in &facts.tables {
        let entry = match out.iter_mut().position(|d| &d.name == db) {
            Some(i) => &mut out[i],
            None => {
                out.push(DumpedDatabase {
                    name: db.clone(),
                    tables: vec![],
                });
                out.last_mut().expect("just pushed")
            }
        };
        entry.tables.push(TableCount {
            table: table.clone(),
            rows: *rows,
        });
    }
    out
}

#[cfg(test)]
mod grant_tests {
    use super::grant_without_password as strip;

    #[test]
    fn grants_keep_privileges_but_never_reset_passwords() {
        let g = b"GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` IDENTIFIED BY PASSWORD '*81F5E21E35407D884A6CD4A731AEBFB6AF209E1B' WITH GRANT OPTION;\n";
        assert_eq!(
            strip(g),
            b"GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION;\n".to_vec()
        );
        let g =
            b"GRANT USAGE ON *.* TO `app`@`%` IDENTIFIED VIA mysql_native_password USING '*AB';\n";
        assert_eq!(strip(g), b"GRANT USAGE ON *.* TO `app`@`%`;\n".to_vec());
        let c = b"CREATE USER IF NOT EXISTS `app`@`%` IDENTIFIED BY PASSWORD '*AB';\n";
        assert_eq!(strip(c), c.to_vec(), "new accounts keep their password");
        let g = b"GRANT SELECT ON `wp`.* TO `reader`@`%`;\n";
        assert_eq!(strip(g), g.to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert!(version_at_least("8.0.36", (8, 0, 26)));
        assert!(version_at_least("8.4.0-commercial", (8, 0, 26)));
        assert!(!version_at_least("8.0.25", (8, 0, 26)));
        assert!(!version_at_least("5.7.44-log", (8, 0, 26)));
    }
}
