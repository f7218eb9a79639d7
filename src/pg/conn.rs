//! Connecting to PostgreSQL with the libpq settings users already have (PGHOST, PGPORT,
//! PGUSER, PGPASSWORD / PGPASSWORD_FILE / PGPASSFILE, PGDATABASE, and the TLS settings of
//! `tls`). Passwords are sent as the server asks: SCRAM-SHA-256 (with channel binding over
//! TLS), or MD5/plain for old servers.

use std::path::PathBuf;

use anyhow::Context;
use tokio_postgres::Client;

use super::tls::TlsSettings;
use crate::config::{PgConfig, Secret};
use crate::error::Failure;

/// The connection settings, resolved like libpq does.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    password: Option<Secret>,
    pub tls: TlsSettings,
}

impl ConnInfo {
    pub fn from_config(cfg: &PgConfig) -> ConnInfo {
        let user = cfg
            .user
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into());
        let host = cfg
            .host
            .clone()
            .unwrap_or_else(|| "/var/run/postgresql".into());
        let port = cfg.port.unwrap_or(5432);
        let dbname = cfg.database.clone().unwrap_or_else(|| user.clone());
        let password = cfg.password.clone().or_else(|| {
            passfile_lookup(cfg.passfile.clone(), &host, port, &dbname, &user).map(Secret::new)
        });
        ConnInfo {
            host,
            port,
            user,
            dbname,
            password,
            tls: TlsSettings::from_config(cfg),
        }
    }

    pub fn with_db(&self, dbname: &str) -> ConnInfo {
        ConnInfo {
            dbname: dbname.to_string(),
            ..self.clone()
        }
    }

    /// Environment for child programs (pg_dump, pg_restore): the password travels in
    /// PGPASSWORD, never on the command line; the TLS settings travel as libpq's variables.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("PGHOST", self.host.clone()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", self.user.clone()),
            ("PGDATABASE", self.dbname.clone()),
        ];
        if let Some(p) = &self.password {
            env.push(("PGPASSWORD", p.expose().to_string()));
        }
        env.extend(self.tls.child_env());
        env
    }

    /// A unix socket directory rather than a network host: no TLS there, as in libpq.
    fn is_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// The password, for connections dbagent speaks itself (`pg::replication`).
    pub fn password(&self) -> Option<&Secret> {
        self.password.as_ref()
    }

    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        match self.open().await {
            Ok(client) => Ok(client),
            Err(Opening::Refused(e)) => Err(self.explain(e)),
            Err(Opening::Setup(e)) => Err(e),
        }
    }

    /// `connect`, to a server that is starting (a restored one, replaying WAL): `None` while
    /// it says "not yet" (no socket or listener yet, starting up, not yet accepting
    /// connections); every other refusal (authentication, an unknown role or database, TLS)
    /// is the error, at once.
    pub async fn connect_when_ready(&self) -> anyhow::Result<Option<Client>> {
        match self.open().await {
            Ok(client) => Ok(Some(client)),
            Err(Opening::Refused(e)) if not_ready(&e) => Ok(None),
            Err(Opening::Refused(e)) => Err(self.explain(e)),
            Err(Opening::Setup(e)) => Err(e),
        }
    }

    async fn open(&self) -> Result<Client, Opening> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("dbagent")
            .connect_timeout(std::time::Duration::from_secs(10))
            // A server that vanished mid-query (a lost node, a dropped route) is noticed in
            // about a minute instead of the kernel's two hours.
            .keepalives(true)
            .keepalives_idle(std::time::Duration::from_secs(30))
            .keepalives_interval(std::time::Duration::from_secs(10))
            .keepalives_retries(3);
        if let Some(p) = &self.password {
            cfg.password(p.expose());
        }
        cfg.channel_binding(self.tls.channel_binding.wire());
        let client = if self.is_socket() || self.tls.mode == super::tls::SslMode::Disable {
            cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let (client, connection) = cfg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(Opening::Refused)?;
            drive(connection);
            client
        } else {
            cfg.ssl_mode(self.tls.wire_mode());
            let tls = self.tls.connector().map_err(Opening::Setup)?;
            let (client, connection) = cfg.connect(tls).await.map_err(Opening::Refused)?;
            drive(connection);
            client
        };
        Ok(client)
    }

    /// The one line a failed connection gets: what the server or the network said, and what
    /// to check.
    fn explain(&self, e: tokio_postgres::Error) -> anyhow::Error {
        let mut detail = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| {
                let mut chain = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    chain = format!("{chain}: {s}");
                    source = s.source();
                }
                chain
            });
        if let Some(why) = self.tls.explain(&detail, &self.host) {
            detail = format!("{why} ({detail})");
        } else if detail.contains("no encryption") {
            detail.push_str(
                ": the server accepts only TLS: set PGSSLMODE=verify-full and PGSSLROOTCERT",
            );
        } else {
            detail.push_str(": check PGHOST, PGPORT, PGUSER, the password and PGSSLMODE");
        }
        anyhow::Error::new(Failure::Input(format!(
            "cannot connect to PostgreSQL at {}: {detail}",
            self.describe()
        )))
    }
}

/// Why a connection did not open: the server (or the network) refused it, or the client
/// could not even be set up (TLS files).
enum Opening {
    Refused(tokio_postgres::Error),
    Setup(anyhow::Error),
}

/// A refusal that a starting server gives before it takes connections: nothing listening
/// yet, or SQLSTATE 57P03 ("the database system is starting up", "not yet accepting
/// connections"). Keyed on the SQLSTATE and the I/O error kind, never on message text.
fn not_ready(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        return db.code() == &tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                NotFound | ConnectionRefused | ConnectionReset | UnexpectedEof | TimedOut
            );
        }
        source = s.source();
    }
    // A connection closed during startup (the server restarting between phases).
    e.is_closed()
}

/// Runs a connection's I/O until the client is dropped.
fn drive(connection: impl Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
}

/// Looks the password up in a `.pgpass` file (`host:port:db:user:password`, `*` matches all).
fn passfile_lookup(
    path: Option<PathBuf>,
    host: &str,
    port: u16,
    db: &str,
    user: &str,
) -> Option<String> {
    let path =
        path.or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let port = port.to_string();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let fields = split_pgpass(line);
        if fields.len() != 5 {
            continue;
        }
        let ok = |f: &str, v: &str| f == "*" || f == v;
        let host_ok = ok(&fields[0], host) || (fields[0] == "localhost" && host.starts_with('/'));
        if host_ok && ok(&fields[1], &port) && ok(&fields[2], db) && ok(&fields[3], user) {
            return Some(fields[4].clone());
        }
    }
    None
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().unwrap().push(n);
                }
            }
            ':' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

/// What a server says about itself (`sql/postgres/server_facts.sql`).
#[derive(Debug, Clone)]
pub struct ServerFacts {
    pub system_identifier: u64,
    pub version: String,
    pub version_num: i32,
    pub wal_segment_size: u64,
    pub archive_mode: String,
    pub in_recovery: bool,
    /// The relation block size (`block_size`) and blocks per relation segment file
    /// (`segment_size`): an incremental maps WAL block references to file offsets with them.
    pub block_size: u64,
    pub rel_segment_blocks: u64,
}

impl ServerFacts {
    pub async fn read(client: &Client) -> anyhow::Result<ServerFacts> {
        let row = client
            .query_typed_one(crate::pg::sql::SERVER_FACTS, &[])
            .await
            .context("reading server settings")?;
        Ok(ServerFacts {
            system_identifier: row
                .get::<_, String>(0)
                .parse()
                .context("system identifier")?,
            version: row.get(1),
            version_num: row.get(2),
            wal_segment_size: row.get::<_, i64>(3) as u64,
            archive_mode: row.get(4),
            in_recovery: row.get(5),
            block_size: row.get::<_, i64>(6) as u64,
            rel_segment_blocks: row.get::<_, i64>(7) as u64,
        })
    }
}

/// Runs a query returning one text column of one row.
pub async fn query_one_text(client: &Client, sql: &str) -> anyhow::Result<String> {
    let row = client
        .query_one(sql, &[])
        .await
        .with_context(|| format!("running {sql}"))?;
    Ok(row.get::<_, String>(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_matching() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pgpass");
        std::fs::write(&p, "# comment\nother:5432:*:*:nope\n*:5433:*:app:pa\\:ss\n").unwrap();
        assert_eq!(
            passfile_lookup(Some(p.clone()), "db", 5433, "x", "app").as_deref(),
            Some("pa:ss")
        );
        assert_eq!(passfile_lookup(Some(p), "db", 5432, "x", "app"), None);
    }
}
