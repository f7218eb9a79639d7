//! One configuration tree: TOML file < environment < flags, resolved once and validated.
//!
//! Secrets (S3 keys, database passwords) come from the environment or from files named by
//! `*_FILE` variables / `*_file` keys, never from argv, and are never printed: `Secret`'s
//! `Debug` is redacted.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

use crate::input_err;

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

/// The file as written by the user. Every field is optional; defaults live in `Config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub repo: Option<String>,
    #[serde(default)]
    pub s3: FileS3,
    #[serde(default)]
    pub compression: FileCompression,
    #[serde(default)]
    pub upload: FileUpload,
    #[serde(default)]
    pub pg: FilePg,
    #[serde(default)]
    pub wal: FileWal,
    #[serde(default)]
    pub mysql: FileMysql,
    #[serde(default)]
    pub serve: FileServe,
    #[serde(default)]
    pub schedule: FileSchedule,
    #[serde(default)]
    pub drill: FileDrill,
    #[serde(default)]
    pub notify: FileNotify,
    #[serde(default)]
    pub retention: FileRetention,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetention {
    pub keep_days: Option<u32>,
    pub keep_backups: Option<usize>,
    pub incomplete_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDrill {
    pub scratch_dir: Option<PathBuf>,
    pub extra_suites: Option<Vec<PathBuf>>,
    pub row_tolerance: Option<f64>,
    pub heartbeat_tolerance: Option<String>,
    pub timeout: Option<String>,
    pub pushgateway_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNotify {
    pub slack_url_file: Option<PathBuf>,
    pub pagerduty_routing_key_file: Option<PathBuf>,
    pub pagerduty_url: Option<String>,
    pub on_success: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServe {
    pub listen: Option<String>,
    pub engine: Option<String>,
    pub node_name: Option<String>,
    pub refresh: Option<String>,
    pub heartbeat: Option<bool>,
    pub heartbeat_interval: Option<String>,
    pub heartbeat_database: Option<String>,
    pub max_lag: Option<String>,
    pub max_lag_seconds: Option<f64>,
    pub wal_lookahead: Option<bool>,
    pub wal_lookahead_parallel: Option<usize>,
    pub binlog_interval: Option<String>,
    pub binlog_max_age: Option<String>,
    pub catalog_refresh: Option<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileSchedule {
    pub backup: Option<String>,
    pub dump: Option<String>,
    pub prune: Option<String>,
    pub drill: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMysql {
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub bin_dir: Option<PathBuf>,
    pub binlog_dir: Option<PathBuf>,
    pub server_uuid: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileS3 {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: Option<bool>,
    pub allow_http: Option<bool>,
    pub access_key_id_file: Option<PathBuf>,
    pub secret_access_key_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCompression {
    pub level: Option<i32>,
    pub wal_level: Option<i32>,
    pub threads: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpload {
    pub part_size: Option<String>,
    pub concurrency: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePg {
    pub data_dir: Option<PathBuf>,
    pub bin_dir: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub database: Option<String>,
    pub password_file: Option<PathBuf>,
    pub system_identifier: Option<u64>,
    pub dump_databases: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWal {
    pub prefetch: Option<usize>,
    pub archive_wait: Option<String>,
}

/// The resolved configuration every command works from.
#[derive(Debug, Clone)]
pub struct Config {
    pub repo: Option<String>,
    pub s3: S3Config,
    pub compression: Compression,
    pub upload: UploadConfig,
    pub pg: PgConfig,
    pub wal: WalConfig,
    pub mysql: MysqlConfig,
    pub serve: ServeConfig,
    /// Cron expressions (5 fields, UTC) for jobs `serve` runs itself, by job name.
    pub schedule: Vec<(String, String)>,
    pub drill: DrillConfig,
    pub notify: NotifyConfig,
    pub retention: RetentionConfig,
    /// The config file this came from, passed on to `restore_command`.
    pub config_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: String,
    pub force_path_style: bool,
    pub allow_http: bool,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Postgres,
    Mysql,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: String,
    pub engine: EngineKind,
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
    pub binlog_interval: Duration,
    /// Rotate the active binlog (FLUSH BINARY LOGS) once it is this old, so a quiet server's
    /// writes reach the archive anyway: the MySQL twin of PostgreSQL's archive_timeout.
    pub binlog_max_age: Duration,
    pub catalog_refresh: Duration,
}

#[derive(Debug, Clone)]
pub struct WalConfig {
    /// How many segments `wal-fetch` downloads ahead of PostgreSQL.
    pub prefetch: usize,
    /// How long `backup` waits for the WAL it needs to be archived.
    pub archive_wait: Duration,
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
    /// Loads the file (if any), then applies the environment, then the flags.
    pub fn load(flags: &Overrides, env: &dyn Env) -> anyhow::Result<Config> {
        let config_file = flags
            .config_file
            .clone()
            .or_else(|| env.var("DBAGENT_CONFIG").map(PathBuf::from));
        let file = match &config_file {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let mut cfg = Config::resolve(file, env)?;
        if let Some(repo) = &flags.repo {
            cfg.repo = Some(repo.clone());
        }
        cfg.config_file = config_file.map(|p| std::path::absolute(&p).unwrap_or(p));
        Ok(cfg)
    }

    fn resolve(file: FileConfig, env: &dyn Env) -> anyhow::Result<Config> {
        let s3 = S3Config {
            endpoint: env.var("DBAGENT_S3_ENDPOINT").or(file.s3.endpoint),
            region: env
                .var("DBAGENT_S3_REGION")
                .or_else(|| env.var("AWS_REGION"))
                .or(file.s3.region)
                .unwrap_or_else(|| "us-east-1".to_string()),
            force_path_style: match env.var("DBAGENT_S3_FORCE_PATH_STYLE") {
                Some(v) => parse_bool("DBAGENT_S3_FORCE_PATH_STYLE", &v)?,
                None => file.s3.force_path_style.unwrap_or(true),
            },
            allow_http: match env.var("DBAGENT_S3_ALLOW_HTTP") {
                Some(v) => parse_bool("DBAGENT_S3_ALLOW_HTTP", &v)?,
                None => file.s3.allow_http.unwrap_or(false),
            },
            access_key_id: secret(
                env,
                "AWS_ACCESS_KEY_ID",
                file.s3.access_key_id_file.as_deref(),
                "s3.access_key_id_file",
            )?,
            secret_access_key: secret(
                env,
                "AWS_SECRET_ACCESS_KEY",
                file.s3.secret_access_key_file.as_deref(),
                "s3.secret_access_key_file",
            )?,
            session_token: secret(env, "AWS_SESSION_TOKEN", None, "")?,
        };

        let level = match env.var("DBAGENT_COMPRESSION_LEVEL") {
            Some(v) => v.parse::<i32>().map_err(|_| {
                input_err!("DBAGENT_COMPRESSION_LEVEL: expected a number from 1 to 19, got {v:?}")
            })?,
            None => file.compression.level.unwrap_or(3),
        };
        if !(1..=19).contains(&level) {
            return Err(input_err!(
                "compression.level: expected a number from 1 to 19, got {level}"
            ));
        }
        let wal_level = match env.var("DBAGENT_COMPRESSION_WAL_LEVEL") {
            Some(v) => v.parse::<i32>().map_err(|_| {
                input_err!(
                    "DBAGENT_COMPRESSION_WAL_LEVEL: expected a number from 1 to 19, got {v:?}"
                )
            })?,
            None => file.compression.wal_level.unwrap_or(1),
        };
        if !(1..=19).contains(&wal_level) {
            return Err(input_err!(
                "compression.wal_level: expected a number from 1 to 19, got {wal_level}"
            ));
        }
        let threads = match env.var("DBAGENT_COMPRESSION_THREADS") {
            Some(v) => v.parse::<u32>().map_err(|_| {
                input_err!("DBAGENT_COMPRESSION_THREADS: expected a whole number, got {v:?}")
            })?,
            None => file.compression.threads.unwrap_or(0),
        };

        let part_size = match env
            .var("DBAGENT_UPLOAD_PART_SIZE")
            .or(file.upload.part_size)
        {
            Some(v) => parse_size(&v).ok_or_else(|| {
                input_err!("upload.part_size: expected a size like 16MiB, got {v:?}")
            })?,
            None => DEFAULT_PART_SIZE,
        };
        if part_size < MIN_PART_SIZE {
            return Err(input_err!(
                "upload.part_size: must be at least 5MiB (the S3 and B2 minimum), got {part_size} bytes"
            ));
        }
        let concurrency = file.upload.concurrency.unwrap_or(2).max(1);

        let pg = PgConfig {
            data_dir: env.var("PGDATA").map(PathBuf::from).or(file.pg.data_dir),
            bin_dir: env
                .var("DBAGENT_PG_BIN_DIR")
                .map(PathBuf::from)
                .or(file.pg.bin_dir),
            host: env.var("PGHOST").or(file.pg.host),
            port: match env.var("PGPORT") {
                Some(v) => Some(
                    v.parse()
                        .map_err(|_| input_err!("PGPORT: expected a port number, got {v:?}"))?,
                ),
                None => file.pg.port,
            },
            user: env.var("PGUSER").or(file.pg.user),
            database: env.var("PGDATABASE").or(file.pg.database),
            password: secret(
                env,
                "PGPASSWORD",
                file.pg.password_file.as_deref(),
                "pg.password_file",
            )?,
            passfile: env.var("PGPASSFILE").map(PathBuf::from),
            system_identifier: match env.var("DBAGENT_PG_SYSTEM_IDENTIFIER") {
                Some(v) => Some(v.parse().map_err(|_| {
                    input_err!("DBAGENT_PG_SYSTEM_IDENTIFIER: expected a number, got {v:?}")
                })?),
                None => file.pg.system_identifier,
            },
            dump_databases: match env.var("DBAGENT_PG_DUMP_DATABASES") {
                Some(v) => v
                    .split(',')
                    .map(|d| d.trim().to_string())
                    .filter(|d| !d.is_empty())
                    .collect(),
                None => file.pg.dump_databases.unwrap_or_default(),
            },
        };

        let mysql_url = env.var("DBAGENT_MYSQL_URL").or(file.mysql.url);
        if let Some(url) = &mysql_url {
            let parsed = url::Url::parse(url).map_err(|e| {
                input_err!("DBAGENT_MYSQL_URL: {e}: expected mysql://user@host:port")
            })?;
            if parsed.scheme() != "mysql" && parsed.scheme() != "mariadb" {
                return Err(input_err!(
                    "DBAGENT_MYSQL_URL: expected mysql://user@host:port"
                ));
            }
            if parsed.password().is_some() {
                return Err(input_err!(
                    "DBAGENT_MYSQL_URL must not carry a password: put it in DBAGENT_MYSQL_PASSWORD_FILE"
                ));
            }
        }
        let mysql = MysqlConfig {
            url: mysql_url,
            password: secret(
                env,
                "DBAGENT_MYSQL_PASSWORD",
                file.mysql.password_file.as_deref(),
                "mysql.password_file",
            )?,
            bin_dir: env
                .var("DBAGENT_MYSQL_BIN_DIR")
                .map(PathBuf::from)
                .or(file.mysql.bin_dir),
            binlog_dir: env
                .var("DBAGENT_MYSQL_BINLOG_DIR")
                .map(PathBuf::from)
                .or(file.mysql.binlog_dir),
            server_uuid: env
                .var("DBAGENT_MYSQL_SERVER_UUID")
                .or(file.mysql.server_uuid),
        };
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

        let prefetch = match env.var("DBAGENT_WAL_PREFETCH") {
            Some(v) => v.parse().map_err(|_| {
                input_err!("DBAGENT_WAL_PREFETCH: expected a whole number, got {v:?}")
            })?,
            None => file.wal.prefetch.unwrap_or(8),
        };
        let archive_wait = match env
            .var("DBAGENT_WAL_ARCHIVE_WAIT")
            .or(file.wal.archive_wait)
        {
            Some(v) => humantime::parse_duration(&v)
                .map_err(|e| input_err!("wal.archive_wait: {e} (got {v:?}; try \"5m\")"))?,
            None => Duration::from_secs(300),
        };

        let duration =
            |key: &str, env_key: &str, file_value: Option<String>, default: Duration| match env
                .var(env_key)
                .or(file_value)
            {
                Some(v) => humantime::parse_duration(&v)
                    .map_err(|e| input_err!("{key}: {e} (got {v:?}; try \"1s\" or \"5m\")")),
                None => Ok(default),
            };
        let engine = match env.var("DBAGENT_ENGINE").or(file.serve.engine).as_deref() {
            None | Some("postgres") | Some("postgresql") => EngineKind::Postgres,
            Some("mysql") | Some("mariadb") => EngineKind::Mysql,
            Some(other) => {
                return Err(input_err!(
                    "serve.engine: expected postgres or mysql, got {other:?}"
                ));
            }
        };
        let max_lag_bytes =
            match env.var("DBAGENT_SERVE_MAX_LAG").or(file.serve.max_lag) {
                Some(v) => Some(parse_size(&v).ok_or_else(|| {
                    input_err!("serve.max_lag: expected a size like 16MB, got {v:?}")
                })? as u64),
                None => Some(16 << 20),
            };
        let serve = ServeConfig {
            listen: env
                .var("DBAGENT_SERVE_LISTEN")
                .or(file.serve.listen)
                .unwrap_or_else(|| "0.0.0.0:8008".into()),
            engine,
            node_name: env
                .var("DBAGENT_NODE_NAME")
                .or(file.serve.node_name)
                .or_else(|| env.var("HOSTNAME"))
                .or_else(hostname)
                .unwrap_or_else(|| "dbagent".into()),
            refresh: duration(
                "serve.refresh",
                "DBAGENT_SERVE_REFRESH",
                file.serve.refresh,
                Duration::from_secs(1),
            )?,
            heartbeat: file.serve.heartbeat.unwrap_or(true),
            heartbeat_interval: duration(
                "serve.heartbeat_interval",
                "DBAGENT_HEARTBEAT_INTERVAL",
                file.serve.heartbeat_interval,
                Duration::from_secs(1),
            )?,
            heartbeat_database: file
                .serve
                .heartbeat_database
                .unwrap_or_else(|| "postgres".into()),
            max_lag_bytes,
            max_lag_seconds: Some(file.serve.max_lag_seconds.unwrap_or(30.0)),
            wal_lookahead: file.serve.wal_lookahead.unwrap_or(true),
            wal_lookahead_parallel: file.serve.wal_lookahead_parallel.unwrap_or(4).max(1),
            binlog_interval: duration(
                "serve.binlog_interval",
                "DBAGENT_BINLOG_INTERVAL",
                file.serve.binlog_interval,
                Duration::from_secs(10),
            )?,
            binlog_max_age: duration(
                "serve.binlog_max_age",
                "DBAGENT_BINLOG_MAX_AGE",
                file.serve.binlog_max_age,
                Duration::from_secs(300),
            )?,
            catalog_refresh: duration(
                "serve.catalog_refresh",
                "DBAGENT_CATALOG_REFRESH",
                file.serve.catalog_refresh,
                Duration::from_secs(300),
            )?,
        };
        let mut schedule = Vec::new();
        let sched = file.schedule.clone();
        for (job, value) in [
            ("backup", sched.backup),
            ("dump", sched.dump),
            ("prune", sched.prune),
            ("drill", sched.drill),
        ] {
            let env_key = format!("DBAGENT_SCHEDULE_{}", job.to_ascii_uppercase());
            if let Some(expr) = env.var(&env_key).or(value) {
                crate::schedule::Cron::parse(&expr)
                    .map_err(|e| input_err!("schedule.{job}: {e}"))?;
                schedule.push((job.to_string(), expr));
            }
        }

        let drill = DrillConfig {
            scratch_dir: env
                .var("DBAGENT_DRILL_SCRATCH_DIR")
                .map(PathBuf::from)
                .or(file.drill.scratch_dir),
            extra_suites: file.drill.extra_suites.unwrap_or_default(),
            row_tolerance: file.drill.row_tolerance.unwrap_or(0.5),
            heartbeat_tolerance: duration(
                "drill.heartbeat_tolerance",
                "DBAGENT_DRILL_HEARTBEAT_TOLERANCE",
                file.drill.heartbeat_tolerance,
                Duration::from_secs(120),
            )?,
            timeout: duration(
                "drill.timeout",
                "DBAGENT_DRILL_TIMEOUT",
                file.drill.timeout,
                Duration::from_secs(6 * 3600),
            )?,
            pushgateway_url: env
                .var("DBAGENT_DRILL_PUSHGATEWAY_URL")
                .or(file.drill.pushgateway_url),
        };
        if !(0.0..=10.0).contains(&drill.row_tolerance) {
            return Err(input_err!(
                "drill.row_tolerance: expected a fraction like 0.5, got {}",
                drill.row_tolerance
            ));
        }
        let notify = NotifyConfig {
            slack_url: secret(
                env,
                "DBAGENT_NOTIFY_SLACK_URL",
                file.notify.slack_url_file.as_deref(),
                "notify.slack_url_file",
            )?,
            pagerduty_routing_key: secret(
                env,
                "DBAGENT_NOTIFY_PAGERDUTY_ROUTING_KEY",
                file.notify.pagerduty_routing_key_file.as_deref(),
                "notify.pagerduty_routing_key_file",
            )?,
            pagerduty_url: env
                .var("DBAGENT_NOTIFY_PAGERDUTY_URL")
                .or(file.notify.pagerduty_url)
                .unwrap_or_else(|| "https://events.pagerduty.com/v2/enqueue".into()),
            on_success: match env.var("DBAGENT_NOTIFY_ON_SUCCESS") {
                Some(v) => parse_bool("DBAGENT_NOTIFY_ON_SUCCESS", &v)?,
                None => file.notify.on_success.unwrap_or(false),
            },
        };

        let retention = RetentionConfig {
            keep_days: match env.var("DBAGENT_RETENTION_KEEP_DAYS") {
                Some(v) => v.parse().map_err(|_| {
                    input_err!("DBAGENT_RETENTION_KEEP_DAYS: expected a number of days, got {v:?}")
                })?,
                None => file.retention.keep_days.unwrap_or(30),
            },
            keep_backups: match env.var("DBAGENT_RETENTION_KEEP_BACKUPS") {
                Some(v) => v.parse().map_err(|_| {
                    input_err!("DBAGENT_RETENTION_KEEP_BACKUPS: expected a number, got {v:?}")
                })?,
                None => file.retention.keep_backups.unwrap_or(2),
            }
            .max(1),
            incomplete_after: duration(
                "retention.incomplete_after",
                "DBAGENT_RETENTION_INCOMPLETE_AFTER",
                file.retention.incomplete_after,
                Duration::from_secs(24 * 3600),
            )?,
        };

        Ok(Config {
            repo: env.var("DBAGENT_REPO").or(file.repo),
            s3,
            compression: Compression {
                level,
                wal_level,
                threads,
            },
            upload: UploadConfig {
                part_size,
                concurrency,
            },
            pg,
            wal: WalConfig {
                prefetch,
                archive_wait,
            },
            mysql,
            serve,
            schedule,
            drill,
            notify,
            retention,
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

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

fn read_file_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| input_err!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        // toml's message names the key and the line; keep it on one line.
        let msg = e.to_string().replace('\n', " ");
        input_err!("config file {}: {}", path.display(), msg.trim())
    })
}

/// A secret from `NAME`, else from the file named by `NAME_FILE`, else from the config key's file.
fn secret(
    env: &dyn Env,
    name: &str,
    file_from_config: Option<&Path>,
    key: &str,
) -> anyhow::Result<Option<Secret>> {
    if let Some(v) = env.var(name) {
        return Ok(Some(Secret::new(v)));
    }
    let (path, origin) = match env.var(&format!("{name}_FILE")) {
        Some(p) => (PathBuf::from(p), format!("{name}_FILE")),
        None => match file_from_config {
            Some(p) => (p.to_path_buf(), key.to_string()),
            None => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{origin}: cannot read {}", path.display()))
        .map_err(|e| input_err!("{e:#}"))?;
    Ok(Some(Secret::new(text.trim_end_matches(['\n', '\r']))))
}

fn parse_bool(key: &str, v: &str) -> anyhow::Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(input_err!("{key}: expected true or false, got {v:?}")),
    }
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
    fn sizes() {
        assert_eq!(parse_size("8MiB"), Some(8 << 20));
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("5000000"), Some(5_000_000));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
    }
}
