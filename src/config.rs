//! One configuration tree: TOML file < environment < flags, resolved once and validated.
//!
//! Which keys exist, their variables, defaults and how values are read live in one table,
//! `keys::KEYS`; this file holds the resolved tree the commands work from.
//!
//! Secrets (S3 keys, database passwords) come from the environment or from files named by
//! `*_FILE` variables / `*_file` keys, never from argv, and are never printed: `Secret`'s
//! `Debug` is redacted.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::Engine;
use crate::input_err;

pub mod keys;

use keys::Sources;

/// A value that must not appear in logs, metrics or status output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The resolved configuration every command works from.
#[derive(Debug, Clone)]
pub struct Config {
    pub repo: Option<String>,
    pub s3: S3Config,
    pub compression: Compression,
    pub upload: UploadConfig,
    pub backup: BackupConfig,
    pub pg: PgConfig,
    pub wal: WalConfig,
    pub restore: RestoreConfig,
    pub mysql: MysqlConfig,
    pub serve: ServeConfig,
    /// Cron expressions (5 fields, UTC) for jobs `serve` runs itself, by job name.
    pub schedule: Vec<(String, String)>,
    pub drill: DrillConfig,
    pub notify: NotifyConfig,
    pub retention: RetentionConfig,
    pub encryption: crate::crypto::EncryptionConfig,
    /// The config file this came from, passed on to `restore_command`.
    pub config_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: String,
    pub force_path_style: bool,
    pub allow_http: bool,
    /// How long one S3 request is retried (5xx, 429, dropped connections) before it fails.
    pub retry_timeout: Duration,
    /// Create-only writes with `If-None-Match: *`; off for services that reject or ignore
    /// it (then: look first, write, read back and compare).
    pub conditional_writes: bool,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
}

#[derive(Debug, Clone, Copy)]
pub struct Compression {
    pub level: i32,
    /// The level `wal-push` uses.
    pub wal_level: i32,
    /// zstd worker threads; 0 means one per core.
    pub threads: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct UploadConfig {
    pub part_size: usize,
    pub concurrency: usize,
}

/// How PostgreSQL base backups are taken.
#[derive(Debug, Clone, Default)]
pub struct BackupConfig {
    /// `auto` (files when `pg.data_dir` is set, else stream), `files`, `stream`.
    pub method: String,
    /// Worker threads of a file-level backup or restore; 0 means one per core.
    pub parallel: usize,
    /// `backup` without `--full`/`--incremental` takes an incremental unless the newest full
    /// backup is older than this (unset: always a full).
    pub full_every: Option<Duration>,
    /// How an incremental finds the changed blocks of a changed file: `wal` (the block
    /// references of the WAL since its base, falling back to `compare` when it cannot tell) or
    /// `compare` (read and compare every block).
    pub changed_blocks: String,
}

impl BackupConfig {
    pub fn workers(&self) -> usize {
        match self.parallel {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct PgConfig {
    pub data_dir: Option<PathBuf>,
    pub bin_dir: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub database: Option<String>,
    pub password: Option<Secret>,
    pub passfile: Option<PathBuf>,
    /// libpq's sslmode (`disable` … `verify-full`); unset is libpq's `prefer`.
    pub sslmode: Option<String>,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    /// libpq's channel_binding (`disable`, `prefer`, `require`); unset is `prefer`.
    pub channel_binding: Option<String>,
    pub system_identifier: Option<u64>,
    /// Databases `backup --kind dump` dumps; empty means every non-template database.
    pub dump_databases: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct MysqlConfig {
    /// `mysql://user@host:port` (a password in the URL is refused: use the password file).
    pub url: Option<String>,
    pub password: Option<Secret>,
    /// Where `mysqldump`/`mariadb-dump`, `mysqlbinlog`/`mariadb-binlog`, `mariadbd` live.
    pub bin_dir: Option<PathBuf>,
    /// The server's binlog directory, for `binlog-push` (default: asked from the server).
    pub binlog_dir: Option<PathBuf>,
    /// The server's identity in the repository: overrides `@@server_uuid` (MySQL) or the one
    /// derived from host name and server_id (MariaDB), and picks the server to restore.
    pub server_uuid: Option<String>,
    /// How long a dump may wait for a lock before it gives up (and withdraws its request, so
    /// that writes queued behind it go on).
    pub lock_wait_timeout: Duration,
    /// MariaDB replays read the binlogs in GTID strict mode, refusing transactions out of
    /// GTID order (two histories mixed under one server's name).
    pub replay_gtid_strict: bool,
    /// The `server_id` binlog streaming registers with (default: 2,000,000,000 + the
    /// server's own).
    pub stream_server_id: Option<u32>,
    /// TLS to the server (`disabled` … `verify_identity`); unset: the client programs' default
    /// and no TLS on dbagent's own connections.
    pub ssl_mode: Option<String>,
    /// The CA certificates (PEM) `verify_ca`/`verify_identity` trust.
    pub ssl_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct DrillConfig {
    /// Where scratch servers are created (default: the system temp directory).
    pub scratch_dir: Option<PathBuf>,
    /// More `.sql` suites to run after the built-in ones.
    pub extra_suites: Vec<PathBuf>,
    /// How far a restored table's row count may be from the base backup's estimate (0.5 = 50%).
    pub row_tolerance: f64,
    /// How far before the target the newest heartbeat may be.
    pub heartbeat_tolerance: Duration,
    /// The whole drill's deadline.
    pub timeout: Duration,
    /// Prometheus Pushgateway to push the drill's metrics to (CronJob use).
    pub pushgateway_url: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct RetentionConfig {
    /// Every point of the last `keep_days` days stays restorable.
    pub keep_days: u32,
    /// At least this many newest backups are kept, however old.
    pub keep_backups: usize,
    /// Leftovers of a backup without a manifest are removed only after this long (it may
    /// still be running before that).
    pub incomplete_after: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct NotifyConfig {
    /// Slack-compatible incoming webhook (the URL holds a token: a secret).
    pub slack_url: Option<Secret>,
    pub pagerduty_routing_key: Option<Secret>,
    pub pagerduty_url: String,
    /// Also notify when a drill passes (PagerDuty always gets a resolve).
    pub on_success: bool,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: String,
    pub engine: Engine,
    /// This server's name in the heartbeat table (default: the host name, i.e. the pod name).
    pub node_name: String,
    pub refresh: Duration,
    pub heartbeat: bool,
    pub heartbeat_interval: Duration,
    /// The PostgreSQL database that holds the `dbagent.heartbeat` table.
    pub heartbeat_database: String,
    /// What `/readiness` accepts on a replica.
    pub max_lag_bytes: Option<u64>,
    pub max_lag_seconds: Option<f64>,
    pub wal_lookahead: bool,
    pub wal_lookahead_parallel: usize,
    /// Stream WAL from a physical replication slot into the repository (`pg::walstream`).
    pub wal_stream: bool,
    pub wal_stream_slot: String,
    pub wal_stream_interval: Duration,
    /// Silence after which a replication connection is given up as lost (`pg::walstream`).
    pub wal_stream_timeout: Duration,
    pub binlog_interval: Duration,
    /// Rotate the active binlog (FLUSH BINARY LOGS) once it is this old, so a quiet server's
    /// writes reach the archive anyway: the MySQL twin of PostgreSQL's archive_timeout.
    pub binlog_max_age: Duration,
    pub catalog_refresh: Duration,
    /// How long a scheduled job has, after SIGTERM, before SIGKILL when `serve` stops.
    pub job_grace: Duration,
    /// Run the scheduled jobs only while this node is the primary (`serve.schedule_on =
    /// "primary"`), so one pod of a StatefulSet whose pods share a configuration runs them.
    pub schedule_on_primary: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct RestoreConfig {
    /// How long `restore` waits for the restored server to replay its WAL and promote.
    pub promote_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct WalConfig {
    /// How many segments `wal-fetch` downloads ahead of PostgreSQL.
    pub prefetch: usize,
    /// How long `backup` waits for the WAL it needs to be archived.
    pub archive_wait: Duration,
    /// How long `wal-fetch` retries a repository that fails transiently before it stops
    /// recovery (exit 126) instead of answering "not archived".
    pub fetch_retry_timeout: Duration,
    /// The streaming sidecar `wal-push` asks before it pushes (`wal.sidecar_url`): a loopback
    /// address, or `None` when it asks nobody.
    pub sidecar: Option<std::net::SocketAddr>,
    /// How long the sidecar may take to answer when it is still storing the segment.
    pub sidecar_wait: Duration,
}

/// B2's minimum part size is 5,000,000 bytes; S3's is 5 MiB. Use the larger.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
pub const DEFAULT_PART_SIZE: usize = 8 * 1024 * 1024;

/// Flags that override the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub repo: Option<String>,
}

/// A source of environment variables (the process environment, or a map in tests).
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, key: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
}

impl Config {
    /// Where this configuration stores, as a short fingerprint: the repository URL and, for
    /// S3, the service and addressing it is reached with. `wal-push` compares it with the
    /// streaming sidecar's before it takes the sidecar's word that a segment is stored: the
    /// two read their configuration at different times.
    pub fn repository_identity(&self) -> String {
        use sha2::Digest;
        let repo = self.repo.as_deref().unwrap_or("").trim_end_matches('/');
        let place = if repo.starts_with("s3://") {
            format!(
                "{repo}\n{}\n{}\n{}",
                self.s3
                    .endpoint
                    .as_deref()
                    .unwrap_or("")
                    .trim_end_matches('/'),
                self.s3.region,
                self.s3.force_path_style
            )
        } else {
            repo.to_string()
        };
        hex::encode(&sha2::Sha256::digest(place.as_bytes())[..8])
    }

    /// Loads the file (if any), then applies the environment, then the flags.
    pub fn load(flags: &Overrides, env: &dyn Env) -> anyhow::Result<Config> {
        let config_file = flags
            .config_file
            .clone()
            .or_else(|| env.var("DBAGENT_CONFIG").map(PathBuf::from));
        let file = match &config_file {
            Some(path) => read_file(path)?,
            None => toml::Table::new(),
        };
        let mut cfg = Config::from_sources(&Sources::new(env, file, config_file.as_deref()))?;
        if let Some(repo) = &flags.repo {
            cfg.repo = Some(repo.clone());
        }
        cfg.config_file = config_file.map(|p| std::path::absolute(&p).unwrap_or(p));
        Ok(cfg)
    }

    /// Every key through `keys::Sources`: `get` for keys with a default, `opt` for the others.
    fn from_sources(v: &Sources) -> anyhow::Result<Config> {
        let mysql = MysqlConfig {
            url: v.opt("mysql.url")?,
            password: v.opt("mysql.password_file")?,
            bin_dir: v.opt("mysql.bin_dir")?,
            binlog_dir: v.opt("mysql.binlog_dir")?,
            server_uuid: v.opt("mysql.server_uuid")?,
            lock_wait_timeout: v.get("mysql.lock_wait_timeout")?,
            replay_gtid_strict: v.get("mysql.replay_gtid_strict")?,
            stream_server_id: v.opt("mysql.stream_server_id")?,
            ssl_mode: v.opt("mysql.ssl_mode")?,
            ssl_ca: v.opt("mysql.ssl_ca")?,
        };
        if let Some(url) = &mysql.url {
            crate::mysql::conn::MysqlConn::parse(url, None)?;
        }
        if let Some(id) = &mysql.server_uuid {
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(input_err!(
                    "mysql.server_uuid: use letters, digits, '-' and '_' only (it names a folder in the repository), got {id:?}"
                ));
            }
        }
        let engine: Engine = v
            .get::<String>("serve.engine")?
            .parse()
            .map_err(|e| input_err!("serve.engine: {e}"))?;
        let mut schedule = Vec::new();
        for key in keys::KEYS
            .iter()
            .filter(|k| k.name.starts_with("schedule."))
        {
            if let Some(expr) = v.opt::<String>(key.name)? {
                schedule.push((key.name["schedule.".len()..].to_string(), expr));
            }
        }

        Ok(Config {
            repo: v.opt("repo")?,
            s3: S3Config {
                endpoint: v.opt("s3.endpoint")?,
                region: v.get("s3.region")?,
                force_path_style: v.get("s3.force_path_style")?,
                allow_http: v.get("s3.allow_http")?,
                retry_timeout: v.get("s3.retry_timeout")?,
                conditional_writes: v.get("s3.conditional_writes")?,
                access_key_id: v.opt("s3.access_key_id_file")?,
                secret_access_key: v.opt("s3.secret_access_key_file")?,
                session_token: v.opt("s3.session_token_file")?,
            },
            compression: Compression {
                level: v.get("compression.level")?,
                wal_level: v.get("compression.wal_level")?,
                threads: v.get("compression.threads")?,
            },
            upload: UploadConfig {
                part_size: v.get("upload.part_size")?,
                concurrency: v.get::<usize>("upload.concurrency")?.max(1),
            },
            backup: BackupConfig {
                method: v.get("backup.method")?,
                parallel: v.get("backup.parallel")?,
                full_every: v.opt("backup.full_every")?,
                changed_blocks: v.get("backup.changed_blocks")?,
            },
            pg: PgConfig {
                data_dir: v.opt("pg.data_dir")?,
                bin_dir: v.opt("pg.bin_dir")?,
                host: v.opt("pg.host")?,
                port: v.opt("pg.port")?,
                user: v.opt("pg.user")?,
                database: v.opt("pg.database")?,
                password: v.opt("pg.password_file")?,
                passfile: v.opt("pg.passfile")?,
                sslmode: v.opt("pg.sslmode")?,
                sslrootcert: v.opt("pg.sslrootcert")?,
                sslcert: v.opt("pg.sslcert")?,
                sslkey: v.opt("pg.sslkey")?,
                channel_binding: v.opt("pg.channel_binding")?,
                system_identifier: v.opt("pg.system_identifier")?,
                dump_databases: v.opt("pg.dump_databases")?.unwrap_or_default(),
            },
            wal: WalConfig {
                prefetch: v.get("wal.prefetch")?,
                archive_wait: v.get("wal.archive_wait")?,
                fetch_retry_timeout: v.get("wal.fetch_retry_timeout")?,
                sidecar: sidecar_addr(
                    v.opt("wal.sidecar_url")?,
                    &v.get::<String>("serve.listen")?,
                )?,
                sidecar_wait: v.get("wal.sidecar_wait")?,
            },
            restore: RestoreConfig {
                promote_timeout: v.get("restore.promote_timeout")?,
            },
            mysql,
            serve: ServeConfig {
                listen: v.get("serve.listen")?,
                engine,
                // HOSTNAME is the pod's name in Kubernetes; it comes after the file's key.
                node_name: v
                    .opt("serve.node_name")?
                    .or_else(|| v.env_var("HOSTNAME"))
                    .or_else(hostname)
                    .unwrap_or_else(|| "dbagent".into()),
                refresh: v.get("serve.refresh")?,
                heartbeat: v.get("serve.heartbeat")?,
                heartbeat_interval: v.get("serve.heartbeat_interval")?,
                heartbeat_database: v.get("serve.heartbeat_database")?,
                max_lag_bytes: Some(v.get("serve.max_lag")?),
                max_lag_seconds: Some(v.get("serve.max_lag_seconds")?),
                wal_lookahead: v.get("serve.wal_lookahead")?,
                wal_lookahead_parallel: v.get::<usize>("serve.wal_lookahead_parallel")?.max(1),
                wal_stream: v.get("serve.wal_stream")?,
                wal_stream_slot: slot_name(v.get("serve.wal_stream_slot")?)?,
                wal_stream_interval: v.get("serve.wal_stream_interval")?,
                wal_stream_timeout: v.get("serve.wal_stream_timeout")?,
                binlog_interval: v.get("serve.binlog_interval")?,
                binlog_max_age: v.get("serve.binlog_max_age")?,
                catalog_refresh: v.get("serve.catalog_refresh")?,
                job_grace: v.get("serve.job_grace")?,
                schedule_on_primary: v.get::<String>("serve.schedule_on")? == "primary",
            },
            schedule,
            drill: DrillConfig {
                scratch_dir: v.opt("drill.scratch_dir")?,
                extra_suites: v.opt("drill.extra_suites")?.unwrap_or_default(),
                row_tolerance: v.get("drill.row_tolerance")?,
                heartbeat_tolerance: v.get("drill.heartbeat_tolerance")?,
                timeout: v.get("drill.timeout")?,
                pushgateway_url: v.opt("drill.pushgateway_url")?,
            },
            notify: NotifyConfig {
                slack_url: v.opt("notify.slack_url_file")?,
                pagerduty_routing_key: v.opt("notify.pagerduty_routing_key_file")?,
                pagerduty_url: v.get("notify.pagerduty_url")?,
                on_success: v.get("notify.on_success")?,
            },
            retention: RetentionConfig {
                keep_days: v.get("retention.keep_days")?,
                keep_backups: v.get::<usize>("retention.keep_backups")?.max(1),
                incomplete_after: v.get("retention.incomplete_after")?,
            },
            encryption: crate::crypto::EncryptionConfig {
                recipients_file: v.opt("encryption.recipients_file")?,
                identity_file: v.opt("encryption.identity_file")?,
                previous_recipients_file: v.opt("encryption.previous_recipients_file")?,
            },
            config_file: None,
        })
    }

    /// The repository URL, or an input error saying how to set it.
    pub fn repo_url(&self) -> anyhow::Result<&str> {
        self.repo.as_deref().ok_or_else(|| {
            input_err!("no repository configured: pass --repo file:///path or s3://bucket/prefix, or set DBAGENT_REPO")
        })
    }
}

/// A replication slot name as PostgreSQL accepts it: lower-case letters, digits and `_`,
/// at most 63 characters.
fn slot_name(name: String) -> anyhow::Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(name)
    } else {
        Err(input_err!(
            "serve.wal_stream_slot {name:?}: a replication slot name is 1 to 63 lower-case letters, digits or underscores"
        ))
    }
}

/// Where `wal-push` finds the streaming sidecar: `wal.sidecar_url` (`off` for nowhere), by
/// default `serve.listen` reached over loopback. Only loopback: `wal-push` acknowledges a
/// segment on the sidecar's word, so that word must come from inside the pod.
fn sidecar_addr(url: Option<String>, listen: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let Some(url) = url else {
        let Ok(addr) = listen.parse::<SocketAddr>() else {
            return Ok(None);
        };
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip if ip.is_loopback() => ip,
            _ => return Ok(None),
        };
        return Ok(Some(SocketAddr::new(ip, addr.port())));
    };
    let url = url.trim();
    if url.is_empty() || url == "off" {
        return Ok(None);
    }
    let bad = |why: &str| {
        input_err!("wal.sidecar_url {url:?}: {why}; like http://127.0.0.1:8008, or off")
    };
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(bad("expected an http:// URL"));
    };
    let hostport = rest.trim_end_matches('/');
    let hostport = match hostport.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}"),
        None => hostport.to_string(),
    };
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|_| bad("expected http://<loopback address>:<port>"))?;
    if !addr.ip().is_loopback() {
        return Err(bad(
            "must be a loopback address (wal-push skips storing a segment on the sidecar's word)",
        ));
    }
    Ok(Some(addr))
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

fn read_file(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| input_err!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        // toml's message names the line; keep it on one line.
        let msg = e.to_string().replace('\n', " ");
        input_err!("config file {}: {}", path.display(), msg.trim())
    })?;
    keys::check_file(&table, path)?;
    Ok(table)
}

/// Parses sizes like `8MiB`, `16MB`, `5000000`, `64kB` (kB/MB/GB are 1024-based, as in PostgreSQL).
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().ok()?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sidecar_is_serve_on_loopback_and_only_on_loopback() {
        let addr = |url: Option<&str>, listen: &str| {
            sidecar_addr(url.map(str::to_string), listen).map(|a| a.map(|a| a.to_string()))
        };
        assert_eq!(
            addr(None, "0.0.0.0:8008").unwrap().as_deref(),
            Some("127.0.0.1:8008")
        );
        assert_eq!(
            addr(None, "[::]:9000").unwrap().as_deref(),
            Some("[::1]:9000")
        );
        assert_eq!(
            addr(None, "127.0.0.2:80").unwrap().as_deref(),
            Some("127.0.0.2:80")
        );
        assert_eq!(
            addr(None, "10.1.2.3:8008").unwrap(),
            None,
            "serve is not on loopback"
        );
        let url = |u: &str| addr(Some(u), "0.0.0.0:8008");
        assert_eq!(
            url("http://127.0.0.1:9999/").unwrap().as_deref(),
            Some("127.0.0.1:9999")
        );
        assert_eq!(
            url("http://localhost:9999").unwrap().as_deref(),
            Some("127.0.0.1:9999")
        );
        assert_eq!(url("off").unwrap(), None);
        for bad in [
            "http://10.0.0.5:8008",
            "https://127.0.0.1:8008",
            "127.0.0.1:8008",
            "http://sidecar:8008",
        ] {
            let err = url(bad).unwrap_err().to_string();
            assert!(err.contains("wal.sidecar_url"), "{err}");
        }
        assert!(
            url("http://10.0.0.5:8008")
                .unwrap_err()
                .to_string()
                .contains("loopback")
        );
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dbagent.toml");
        std::fs::write(
            &path,
            "repo = \"file:///from-file\"\n[compression]\nlevel = 5\n[s3]\nregion = \"eu-central-003\"\n",
        )
        .unwrap();
        let flags = Overrides {
            config_file: Some(path.clone()),
            repo: None,
        };
        let env = [
            ("DBAGENT_REPO", "s3://b/p"),
            ("DBAGENT_COMPRESSION_LEVEL", "7"),
        ];
        let cfg = Config::load(&flags, &env).unwrap();
        assert_eq!(cfg.repo.as_deref(), Some("s3://b/p"));
        assert_eq!(cfg.compression.level, 7);
        assert_eq!(cfg.s3.region, "eu-central-003");

        let flags = Overrides {
            config_file: Some(path),
            repo: Some("file:///flag".into()),
        };
        let cfg = Config::load(&flags, &env).unwrap();
        assert_eq!(cfg.repo.as_deref(), Some("file:///flag"));
    }

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[compression]\nlevl = 3\n").unwrap();
        let flags = Overrides {
            config_file: Some(path),
            repo: None,
        };
        let err = Config::load(&flags, &[("X", "y")]).unwrap_err().to_string();
        assert!(err.contains("levl"), "{err}");
        assert_eq!(
            crate::error::exit_code(&Config::load(&flags, &[("X", "y")]).unwrap_err()),
            1
        );
    }

    #[test]
    fn secrets_come_from_files_and_are_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secret");
        std::fs::write(&key, "s3cr3t\n").unwrap();
        let keyfile = key.to_str().unwrap();
        let env = [("AWS_SECRET_ACCESS_KEY_FILE", keyfile)];
        let cfg = Config::load(&Overrides::default(), &env).unwrap();
        assert_eq!(
            cfg.s3.secret_access_key.as_ref().unwrap().expose(),
            "s3cr3t"
        );
        assert!(!format!("{cfg:?}").contains("s3cr3t"));
    }

    /// Every type that holds a secret formats it as `<redacted>`: the whole configuration, a
    /// PostgreSQL connection, a MySQL connection and the S3 store built from it.
    #[test]
    fn no_debug_output_shows_a_secret() {
        let env = [
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "aws-s3cret-value"),
            ("AWS_SESSION_TOKEN", "session-t0ken-value"),
            ("PGPASSWORD", "pg-pa55word-value"),
            ("DBAGENT_MYSQL_PASSWORD", "my-pa55word-value"),
            ("DBAGENT_MYSQL_URL", "mysql://backup@db:3306"),
            (
                "DBAGENT_NOTIFY_SLACK_URL",
                "https://hooks.example/sl4ck-t0ken",
            ),
            ("DBAGENT_NOTIFY_PAGERDUTY_ROUTING_KEY", "pd-r0uting-key"),
            ("DBAGENT_S3_ENDPOINT", "http://127.0.0.1:9"),
        ];
        let secrets = [
            "aws-s3cret-value",
            "session-t0ken-value",
            "pg-pa55word-value",
            "my-pa55word-value",
            "sl4ck-t0ken",
            "pd-r0uting-key",
        ];
        let cfg = Config::load(&Overrides::default(), &env).unwrap();
        let shown = [
            format!("{cfg:?}"),
            format!("{:?}", crate::pg::conn::ConnInfo::from_config(&cfg.pg)),
            format!(
                "{:?}",
                crate::mysql::conn::MysqlConn::from_config(&cfg.mysql).unwrap()
            ),
            format!(
                "{:?}",
                crate::storage::open_url("s3://bucket/prefix", &cfg).unwrap()
            ),
        ];
        for text in &shown {
            for secret in secrets {
                assert!(!text.contains(secret), "{secret} shown in {text}");
            }
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::load(
            &Overrides::default(),
            &[("DBAGENT_COMPRESSION_LEVEL", "fast")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("DBAGENT_COMPRESSION_LEVEL"), "{err}");
        let err = Config::load(
            &Overrides::default(),
            &[("DBAGENT_UPLOAD_PART_SIZE", "1MiB")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("5MiB"), "{err}");
    }

    #[test]
    fn retry_windows_and_conditional_writes() {
        let cfg = Config::load(&Overrides::default(), &[("X", "y")]).unwrap();
        assert_eq!(cfg.wal.fetch_retry_timeout, Duration::from_secs(60));
        assert_eq!(cfg.s3.retry_timeout, Duration::from_secs(120));
        assert!(cfg.s3.conditional_writes);
        let cfg = Config::load(
            &Overrides::default(),
            &[
                ("DBAGENT_WAL_FETCH_RETRY_TIMEOUT", "4s"),
                ("DBAGENT_S3_RETRY_TIMEOUT", "3s"),
                ("DBAGENT_S3_CONDITIONAL_WRITES", "false"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.wal.fetch_retry_timeout, Duration::from_secs(4));
        assert_eq!(cfg.s3.retry_timeout, Duration::from_secs(3));
        assert!(!cfg.s3.conditional_writes);
        for (key, name) in [
            ("DBAGENT_WAL_FETCH_RETRY_TIMEOUT", "wal.fetch_retry_timeout"),
            ("DBAGENT_S3_RETRY_TIMEOUT", "s3.retry_timeout"),
        ] {
            let err = Config::load(&Overrides::default(), &[(key, "soon")])
                .unwrap_err()
                .to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8MiB"), Some(8 << 20));
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("5000000"), Some(5_000_000));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
    }
}
