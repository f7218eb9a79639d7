//! Connecting to PostgreSQL with the libpq settings users already have (PGHOST, PGPORT,
//! PGUSER, PGPASSWORD / PGPASSFILE, PGDATABASE).

use std::path::PathBuf;

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

use crate::config::PgConfig;
use crate::error::Failure;

/// The connection settings, resolved like libpq does.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    password: Option<String>,
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
        let password = cfg
            .password
            .as_ref()
            .map(|s| s.expose().to_string())
            .or_else(|| passfile_lookup(cfg.passfile.clone(), &host, port, &dbname, &user));
        ConnInfo {
            host,
            port,
            user,
            dbname,
            password,
        }
    }

    pub fn with_db(&self, dbname: &str) -> ConnInfo {
        ConnInfo {
            dbname: dbname.to_string(),
            ..self.clone()
        }
    }

    /// Environment for child programs (pg_basebackup, pg_dump): the password travels in
    /// PGPASSWORD, never on the command line.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("PGHOST", self.host.clone()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", self.user.clone()),
            ("PGDATABASE", self.dbname.clone()),
        ];
        if let Some(p) = &self.password {
            env.push(("PGPASSWORD", p.clone()));
        }
        env
    }

    pub fn describe(&self) -> String {
        format!("{}@{}:{}/{}", self.user, self.host, self.port, self.dbname)
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("dbagent")
            .connect_timeout(std::time::Duration::from_secs(10));
        if let Some(p) = &self.password {
            cfg.password(p);
        }
        let (client, connection) = cfg.connect(NoTls).await.map_err(|e| {
            let detail = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| {
                std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string())
            });
            anyhow::Error::new(Failure::Input(format!(
                "cannot connect to PostgreSQL at {}: {detail}: check PGHOST, PGPORT, PGUSER and the password",
                self.describe()
            )))
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection closed");
            }
        });
        Ok(client)
    }
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
