//! Every configuration key in one table, and the one way a key's value is found and read.
//!
//! A key `section.name` is set, first match wins, by its regular variable
//! `DBAGENT_SECTION_NAME`, then by the other variables the table lists for it (names users
//! already depend on: libpq's, AWS's, older dbagent names), then by the TOML file, then by its
//! default. A secret key (`…_file`, naming a file that holds the secret) also has a variable
//! that holds the secret itself, which wins over every file. Adding a key is one line here
//! and one field where `Config` is built; the README's table is checked against this one.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Env, Secret};
use crate::input_err;

/// How a key's value is written and checked.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Any string (addresses, URLs, names, paths).
    Text,
    /// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off` in variables).
    Bool,
    /// `30s`, `5m`, `1h30m`, at least `min` (a period that drives a loop cannot be 0).
    Duration { min: Duration },
    /// Bytes: `16MiB`, `64kB`, `5000000` (kB/MB/GB are 1024-based, as in PostgreSQL).
    Size { min: u64 },
    /// A whole number in `min..=max`.
    Int { min: i128, max: i128 },
    /// A number in `min..=max`.
    Float { min: f64, max: f64 },
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A 5-field cron expression (UTC).
    Cron,
    /// A list: a TOML array, or comma-separated in a variable.
    List,
    /// A secret: `value` names the variable holding the secret itself; the key and its other
    /// variables name a file holding it.
    Secret { value: &'static str },
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// `section.name` in the file (or a top-level `name`).
    pub name: &'static str,
    pub kind: Kind,
    /// More variables that set the key, tried in order after the regular one.
    pub also: &'static [&'static str],
    /// As a user would write it; `None`: unset unless given.
    pub default: Option<&'static str>,
}

impl Key {
    const fn new(name: &'static str, kind: Kind) -> Key {
        Key {
            name,
            kind,
            also: &[],
            default: None,
        }
    }
    const fn or(self, default: &'static str) -> Key {
        Key {
            default: Some(default),
            ..self
        }
    }
    const fn also(self, vars: &'static [&'static str]) -> Key {
        Key { also: vars, ..self }
    }

    /// `DBAGENT_` and the key's name in capitals, dots as underscores.
    pub fn regular_var(&self) -> String {
        format!(
            "DBAGENT_{}",
            self.name.replace('.', "_").to_ascii_uppercase()
        )
    }

    /// Every variable that sets the key, in the order they are tried.
    pub fn vars(&self) -> Vec<String> {
        let mut vars = Vec::new();
        if let Kind::Secret { value } = self.kind {
            vars.push(value.to_string());
        }
        vars.push(self.regular_var());
        vars.extend(self.also.iter().map(|v| v.to_string()));
        vars
    }
}

const fn text(name: &'static str) -> Key {
    Key::new(name, Kind::Text)
}
const fn flag(name: &'static str, default: &'static str) -> Key {
    Key::new(name, Kind::Bool).or(default)
}
const fn duration(name: &'static str, default: &'static str) -> Key {
    Key::new(
        name,
        Kind::Duration {
            min: Duration::ZERO,
        },
    )
    .or(default)
}
const fn duration_unset(name: &'static str) -> Key {
    Key::new(
        name,
        Kind::Duration {
            min: Duration::ZERO,
        },
    )
}
/// A duration that paces a loop: a zero would spin it (or panic a ticker).
const fn period(name: &'static str, min: Duration, default: &'static str) -> Key {
    Key::new(name, Kind::Duration { min }).or(default)
}
const fn size(name: &'static str, min: u64, default: &'static str) -> Key {
    Key::new(name, Kind::Size { min }).or(default)
}
const fn int(name: &'static str, min: i128, max: i128) -> Key {
    Key::new(name, Kind::Int { min, max })
}
const fn float(name: &'static str, min: f64, max: f64) -> Key {
    Key::new(name, Kind::Float { min, max })
}
const fn list(name: &'static str) -> Key {
    Key::new(name, Kind::List)
}
const fn cron(name: &'static str) -> Key {
    Key::new(name, Kind::Cron)
}
const fn secret(name: &'static str, value: &'static str) -> Key {
    Key::new(name, Kind::Secret { value })
}

/// "No maximum" for counts: what every count's type (u32, usize) holds.
const NO_MAX: i128 = u32::MAX as i128;
/// The shortest period of a loop that reads the database or the repository.
const TICK: Duration = Duration::from_millis(100);

/// Every key, in the README's order.
pub const KEYS: &[Key] = &[
    text("repo"),
    text("s3.endpoint"),
    text("s3.region").also(&["AWS_REGION"]).or("us-east-1"),
    flag("s3.force_path_style", "true"),
    flag("s3.allow_http", "false"),
    duration("s3.retry_timeout", "2m"),
    flag("s3.conditional_writes", "true"),
    secret("s3.access_key_id_file", "AWS_ACCESS_KEY_ID").also(&["AWS_ACCESS_KEY_ID_FILE"]),
    secret("s3.secret_access_key_file", "AWS_SECRET_ACCESS_KEY")
        .also(&["AWS_SECRET_ACCESS_KEY_FILE"]),
    secret("s3.session_token_file", "AWS_SESSION_TOKEN").also(&["AWS_SESSION_TOKEN_FILE"]),
    int("compression.level", 1, 19).or("3"),
    int("compression.wal_level", 1, 19).or("1"),
    int("compression.threads", 0, u32::MAX as i128).or("0"),
    size("upload.part_size", super::MIN_PART_SIZE as u64, "8MiB"),
    int("upload.concurrency", 0, NO_MAX).or("2"),
    Key::new("backup.method", Kind::Choice(&["auto", "files", "stream"])).or("auto"),
    int("backup.parallel", 0, 256).or("0"),
    duration_unset("backup.full_every"),
    Key::new("backup.changed_blocks", Kind::Choice(&["wal", "compare"])).or("wal"),
    text("pg.data_dir").also(&["PGDATA"]),
    text("pg.bin_dir"),
    text("pg.host").also(&["PGHOST"]),
    int("pg.port", 1, 65535).also(&["PGPORT"]),
    text("pg.user").also(&["PGUSER"]),
    text("pg.database").also(&["PGDATABASE"]),
    secret("pg.password_file", "PGPASSWORD").also(&["PGPASSWORD_FILE"]),
    text("pg.passfile").also(&["PGPASSFILE"]),
    Key::new("pg.sslmode", Kind::Choice(crate::pg::tls::SslMode::NAMES)).also(&["PGSSLMODE"]),
    text("pg.sslrootcert").also(&["PGSSLROOTCERT"]),
    text("pg.sslcert").also(&["PGSSLCERT"]),
    text("pg.sslkey").also(&["PGSSLKEY"]),
    Key::new(
        "pg.channel_binding",
        Kind::Choice(crate::pg::tls::ChannelBinding::NAMES),
    )
    .also(&["PGCHANNELBINDING"]),
    int("pg.system_identifier", 0, u64::MAX as i128),
    list("pg.dump_databases"),
    int("wal.prefetch", 0, NO_MAX).or("8"),
    duration("wal.archive_wait", "5m"),
    duration("wal.fetch_retry_timeout", "1m"),
    text("wal.sidecar_url"),
    duration("wal.sidecar_wait", "1s"),
    period("restore.promote_timeout", Duration::from_secs(1), "24h"),
    text("mysql.url"),
    secret("mysql.password_file", "DBAGENT_MYSQL_PASSWORD"),
    text("mysql.bin_dir"),
    text("mysql.binlog_dir"),
    text("mysql.server_uuid"),
    duration("mysql.lock_wait_timeout", "1m"),
    flag("mysql.replay_gtid_strict", "true"),
    int("mysql.stream_server_id", 1, u32::MAX as i128),
    Key::new(
        "mysql.ssl_mode",
        Kind::Choice(crate::mysql::conn::SslMode::NAMES),
    ),
    text("mysql.ssl_ca"),
    text("serve.listen").or("0.0.0.0:8008"),
    Key::new(
        "serve.engine",
        Kind::Choice(&["postgres", "postgresql", "mysql", "mariadb"]),
    )
    .also(&["DBAGENT_ENGINE"])
    .or("postgres"),
    text("serve.node_name").also(&["DBAGENT_NODE_NAME"]),
    period("serve.refresh", TICK, "1s"),
    flag("serve.heartbeat", "true"),
    period("serve.heartbeat_interval", TICK, "1s").also(&["DBAGENT_HEARTBEAT_INTERVAL"]),
    text("serve.heartbeat_database").or("postgres"),
    size("serve.max_lag", 0, "16MB"),
    float("serve.max_lag_seconds", 0.0, f64::INFINITY).or("30"),
    flag("serve.wal_lookahead", "true"),
    int("serve.wal_lookahead_parallel", 0, NO_MAX).or("4"),
    flag("serve.wal_stream", "false").also(&["DBAGENT_WAL_STREAM"]),
    text("serve.wal_stream_slot").or("dbagent"),
    period("serve.wal_stream_interval", TICK, "1s"),
    period("serve.wal_stream_timeout", Duration::from_secs(1), "30s"),
    period("serve.binlog_interval", TICK, "10s").also(&["DBAGENT_BINLOG_INTERVAL"]),
    duration("serve.binlog_max_age", "5m").also(&["DBAGENT_BINLOG_MAX_AGE"]),
    period("serve.catalog_refresh", Duration::from_secs(1), "5m")
        .also(&["DBAGENT_CATALOG_REFRESH"]),
    duration("serve.job_grace", "20s"),
    Key::new("serve.schedule_on", Kind::Choice(&["any", "primary"])).or("any"),
    cron("schedule.backup"),
    cron("schedule.dump"),
    cron("schedule.prune"),
    cron("schedule.drill"),
    text("drill.scratch_dir"),
    list("drill.extra_suites"),
    float("drill.row_tolerance", 0.0, 10.0).or("0.5"),
    duration("drill.heartbeat_tolerance", "2m"),
    period("drill.timeout", Duration::from_secs(1), "6h"),
    text("drill.pushgateway_url"),
    secret("notify.slack_url_file", "DBAGENT_NOTIFY_SLACK_URL"),
    secret(
        "notify.pagerduty_routing_key_file",
        "DBAGENT_NOTIFY_PAGERDUTY_ROUTING_KEY",
    ),
    text("notify.pagerduty_url").or("https://events.pagerduty.com/v2/enqueue"),
    flag("notify.on_success", "false"),
    int("retention.keep_days", 0, u32::MAX as i128).or("30"),
    int("retention.keep_backups", 0, NO_MAX).or("2"),
    duration("retention.incomplete_after", "24h"),
    text("encryption.recipients_file"),
    text("encryption.identity_file"),
    text("encryption.previous_recipients_file"),
];

/// Variables read outside the configuration tree (before it exists, or by the logger).
pub const ENVIRONMENT_ONLY: &[&str] = &[
    "DBAGENT_CONFIG",
    "DBAGENT_LOG",
    "DBAGENT_LOG_FORMAT",
    "DBAGENT_NO_INIT",
];

/// The `DBAGENT_*` variables among `names` that no key reads (a misspelling would otherwise be
/// ignored without a word), each with the known variable it is closest to, if one is close.
/// `DBAGENT_TEST_*` are the test suite's own knobs.
pub fn unknown_variables(names: impl Iterator<Item = String>) -> Vec<(String, Option<String>)> {
    let known: Vec<String> = KEYS
        .iter()
        .flat_map(|k| k.vars())
        .chain(ENVIRONMENT_ONLY.iter().map(|v| v.to_string()))
        .collect();
    let mut out: Vec<(String, Option<String>)> = names
        .filter(|n| n.starts_with("DBAGENT_") && !n.starts_with("DBAGENT_TEST_"))
        .filter(|n| !known.contains(n))
        .map(|n| {
            let near = known
                .iter()
                .map(|k| (edit_distance(&n, k), k))
                .filter(|(d, _)| *d <= 3)
                .min()
                .map(|(_, k)| k.clone());
            (n, near)
        })
        .collect();
    out.sort();
    out
}

/// Levenshtein distance over bytes (the names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diag + usize::from(ca != cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

pub fn key(name: &str) -> &'static Key {
    KEYS.iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("config key {name} is not in config::keys::KEYS"))
}

/// A key's value, read and checked.
#[derive(Debug, Clone)]
pub enum Value {
    Text(String),
    Bool(bool),
    Duration(Duration),
    Int(i128),
    Float(f64),
    List(Vec<String>),
    Secret(Secret),
}

/// The Rust types a `Value` turns into; `None` when the table's kind does not fit the field.
pub trait FromValue: Sized {
    fn from_value(v: Value) -> Option<Self>;
}

impl FromValue for String {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}
impl FromValue for PathBuf {
    fn from_value(v: Value) -> Option<Self> {
        String::from_value(v).map(PathBuf::from)
    }
}
impl FromValue for bool {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
}
impl FromValue for Duration {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Duration(d) => Some(d),
            _ => None,
        }
    }
}
impl FromValue for f64 {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Float(f) => Some(f),
            _ => None,
        }
    }
}
impl FromValue for Vec<String> {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::List(l) => Some(l),
            _ => None,
        }
    }
}
impl FromValue for Vec<PathBuf> {
    fn from_value(v: Value) -> Option<Self> {
        Vec::<String>::from_value(v).map(|l| l.into_iter().map(PathBuf::from).collect())
    }
}
impl FromValue for Secret {
    fn from_value(v: Value) -> Option<Self> {
        match v {
            Value::Secret(s) => Some(s),
            _ => None,
        }
    }
}
macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: Value) -> Option<Self> {
                match v {
                    Value::Int(n) => <$t>::try_from(n).ok(),
                    _ => None,
                }
            }
        }
    )*};
}
from_int!(i32, u16, u32, u64, usize);

/// Where values come from: the environment and the parsed file. Remembers which keys were read.
pub struct Sources<'a> {
    env: &'a dyn Env,
    file: toml::Table,
    file_path: Option<&'a Path>,
    read: RefCell<BTreeSet<&'static str>>,
}

impl<'a> Sources<'a> {
    /// `file` must have passed `check_file`.
    pub fn new(env: &'a dyn Env, file: toml::Table, file_path: Option<&'a Path>) -> Sources<'a> {
        Sources {
            env,
            file,
            file_path,
            read: RefCell::new(BTreeSet::new()),
        }
    }

    /// A variable outside the table (`HOSTNAME`).
    pub fn env_var(&self, name: &str) -> Option<String> {
        self.env.var(name)
    }

    /// A key that has a default.
    pub fn get<T: FromValue>(&self, name: &str) -> anyhow::Result<T> {
        Ok(self
            .opt(name)?
            .unwrap_or_else(|| panic!("config key {name} has no default")))
    }

    /// A key, `None` when nothing sets it and it has no default.
    pub fn opt<T: FromValue>(&self, name: &str) -> anyhow::Result<Option<T>> {
        let key = key(name);
        self.read.borrow_mut().insert(key.name);
        Ok(self.value(key)?.map(|v| {
            T::from_value(v).unwrap_or_else(|| {
                panic!(
                    "config key {name}: its kind {:?} does not fit {}",
                    key.kind,
                    std::any::type_name::<T>()
                )
            })
        }))
    }

    /// Keys of the table nobody asked for.
    pub fn unread(&self) -> Vec<&'static str> {
        let read = self.read.borrow();
        KEYS.iter()
            .map(|k| k.name)
            .filter(|n| !read.contains(n))
            .collect()
    }

    fn file_value(&self, key: &Key) -> Option<&toml::Value> {
        match key.name.split_once('.') {
            Some((section, name)) => self.file.get(section)?.as_table()?.get(name),
            None => self.file.get(key.name),
        }
    }

    fn value(&self, key: &Key) -> anyhow::Result<Option<Value>> {
        let mut vars = key.vars().into_iter();
        if let Kind::Secret { .. } = key.kind {
            let value_var = vars.next().expect("a secret has a value variable");
            if let Some(s) = self.env.var(&value_var) {
                return Ok(Some(Value::Secret(Secret::new(s))));
            }
        }
        for var in vars {
            if let Some(text) = self.env.var(&var) {
                let origin = format!("{var} ({})", key.name);
                return read_text(key, &origin, &text).map(Some);
            }
        }
        if let Some(v) = self.file_value(key) {
            let origin = match self.file_path {
                Some(p) => format!("{} in {}", key.name, p.display()),
                None => key.name.to_string(),
            };
            return read_toml(key, &origin, v).map(Some);
        }
        Ok(key.default.map(|d| {
            read_text(key, key.name, d)
                .unwrap_or_else(|e| panic!("config key {}: bad default: {e}", key.name))
        }))
    }
}

/// Refuses keys the table does not know, naming them and what the section holds.
pub fn check_file(file: &toml::Table, path: &Path) -> anyhow::Result<()> {
    let known = |name: &str| KEYS.iter().any(|k| k.name == name);
    for (top, value) in file {
        if known(top) {
            continue;
        }
        let section: Vec<&str> = KEYS
            .iter()
            .filter_map(|k| k.name.strip_prefix(top.as_str())?.strip_prefix('.'))
            .collect();
        if section.is_empty() {
            return Err(input_err!(
                "config file {}: unknown key {top:?}",
                path.display()
            ));
        }
        let Some(table) = value.as_table() else {
            return Err(input_err!(
                "config file {}: {top} must be a [{top}] section",
                path.display()
            ));
        };
        for name in table.keys() {
            if !section.contains(&name.as_str()) {
                return Err(input_err!(
                    "config file {}: unknown key {top}.{name} ([{top}] has {})",
                    path.display(),
                    section.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// What a kind accepts, for messages.
fn expected(kind: Kind) -> String {
    match kind {
        Kind::Text => "a string".into(),
        Kind::Bool => "true or false".into(),
        Kind::Duration { min } if min.is_zero() => "a duration like 30s, 5m or 1h30m".into(),
        Kind::Duration { min } => format!(
            "a duration like 30s, 5m or 1h30m, at least {}",
            humantime::format_duration(min)
        ),
        Kind::Size { min: 0 } => "a size like 16MiB".into(),
        Kind::Size { min } => format!("a size like 16MiB, at least {}", show_size(min)),
        Kind::Int { min, max } => format!("a whole number from {min} to {max}"),
        Kind::Float { min, max } if max.is_infinite() => format!("a number, {min} or more"),
        Kind::Float { min, max } => format!("a number from {min} to {max}"),
        Kind::Choice(words) => format!("one of {}", words.join(", ")),
        Kind::Cron => "a 5-field cron expression".into(),
        Kind::List => "a list".into(),
        Kind::Secret { .. } => "the path of a file".into(),
    }
}

fn show_size(bytes: u64) -> String {
    match bytes {
        b if b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// Reads a value written as text: a variable, a default, or a string in the file.
fn read_text(key: &Key, origin: &str, text: &str) -> anyhow::Result<Value> {
    let bad = || input_err!("{origin}: expected {}, got {text:?}", expected(key.kind));
    let value = match key.kind {
        Kind::Text => Value::Text(text.to_string()),
        Kind::Bool => Value::Bool(match text.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => return Err(bad()),
        }),
        Kind::Duration { min } => {
            let d = humantime::parse_duration(text.trim()).map_err(|_| bad())?;
            if d < min {
                return Err(bad());
            }
            Value::Duration(d)
        }
        Kind::Size { .. } => {
            let bytes = super::parse_size(text).ok_or_else(bad)?;
            return check_number(key, origin, text, bytes as i128);
        }
        Kind::Int { .. } => {
            let n: i128 = text.trim().parse().map_err(|_| bad())?;
            return check_number(key, origin, text, n);
        }
        Kind::Float { .. } => {
            let f: f64 = text.trim().parse().map_err(|_| bad())?;
            return check_float(key, origin, text, f);
        }
        Kind::Choice(words) => {
            let word = text.trim().to_ascii_lowercase();
            if !words.contains(&word.as_str()) {
                return Err(bad());
            }
            Value::Text(word)
        }
        Kind::Cron => {
            crate::schedule::Cron::parse(text).map_err(|e| input_err!("{origin}: {e}"))?;
            Value::Text(text.trim().to_string())
        }
        Kind::List => Value::List(
            text.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        Kind::Secret { value } => {
            // The path is not shown: a secret put here by mistake would be printed (and, from
            // `archive_command`, logged by PostgreSQL at every retry).
            let path = PathBuf::from(text);
            let secret = std::fs::read_to_string(&path).map_err(|e| {
                input_err!(
                    "{origin}: cannot read the file it names ({e}): it must hold the path of a file; a secret itself goes in {value}"
                )
            })?;
            Value::Secret(Secret::new(secret.trim_end_matches(['\n', '\r'])))
        }
    };
    Ok(value)
}

/// Reads a value from the file: strings as text, other TOML types where the kind takes them.
fn read_toml(key: &Key, origin: &str, v: &toml::Value) -> anyhow::Result<Value> {
    let shown = v.to_string();
    let bad = || input_err!("{origin}: expected {}, got {shown}", expected(key.kind));
    match (key.kind, v) {
        (_, toml::Value::String(s)) => read_text(key, origin, s),
        (Kind::Bool, toml::Value::Boolean(b)) => Ok(Value::Bool(*b)),
        (Kind::Int { .. } | Kind::Size { .. }, toml::Value::Integer(n)) => {
            check_number(key, origin, &shown, *n as i128)
        }
        (Kind::Float { .. }, toml::Value::Integer(n)) => {
            check_float(key, origin, &shown, *n as f64)
        }
        (Kind::Float { .. }, toml::Value::Float(f)) => check_float(key, origin, &shown, *f),
        (Kind::List, toml::Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<anyhow::Result<_>>()
            .map(Value::List),
        _ => Err(bad()),
    }
}

fn check_number(key: &Key, origin: &str, shown: &str, n: i128) -> anyhow::Result<Value> {
    let (min, max) = match key.kind {
        Kind::Int { min, max } => (min, max),
        Kind::Size { min } => (min as i128, u64::MAX as i128),
        _ => unreachable!("check_number on {:?}", key.kind),
    };
    if n < min || n > max {
        let shown = shown.trim_matches('"');
        return Err(input_err!(
            "{origin}: expected {}, got {shown:?}",
            expected(key.kind)
        ));
    }
    Ok(Value::Int(n))
}

fn check_float(key: &Key, origin: &str, shown: &str, f: f64) -> anyhow::Result<Value> {
    let Kind::Float { min, max } = key.kind else {
        unreachable!("check_float on {:?}", key.kind)
    };
    if !(min..=max).contains(&f) {
        let shown = shown.trim_matches('"');
        return Err(input_err!(
            "{origin}: expected {}, got {shown:?}",
            expected(key.kind)
        ));
    }
    Ok(Value::Float(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelled_variable_is_named_with_the_one_meant() {
        let unknown = unknown_variables(
            [
                "DBAGENT_COMPRESION_LEVEL",
                "DBAGENT_COMPRESSION_LEVEL",
                "DBAGENT_REPO",
                "DBAGENT_LOG_FORMAT",
                "DBAGENT_TEST_WRITE_SECONDS",
                "DBAGENT_SOMETHING_ELSE_ENTIRELY",
                "HOME",
            ]
            .into_iter()
            .map(String::from),
        );
        assert_eq!(
            unknown,
            [
                (
                    "DBAGENT_COMPRESION_LEVEL".to_string(),
                    Some("DBAGENT_COMPRESSION_LEVEL".to_string())
                ),
                ("DBAGENT_SOMETHING_ELSE_ENTIRELY".to_string(), None),
            ]
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    fn load_toml(text: &str) -> anyhow::Result<super::super::Config> {
        let file: toml::Table = toml::from_str(text).unwrap();
        check_file(&file, Path::new("c.toml"))?;
        super::super::Config::from_sources(&Sources::new(&[("X", "y")], file, None))
    }

    #[test]
    fn every_key_has_its_regular_variable() {
        let k = key("serve.heartbeat");
        assert_eq!(k.regular_var(), "DBAGENT_SERVE_HEARTBEAT");
        assert_eq!(
            key("pg.host").vars(),
            ["DBAGENT_PG_HOST".to_string(), "PGHOST".to_string()]
        );
        assert_eq!(
            key("s3.access_key_id_file").vars(),
            [
                "AWS_ACCESS_KEY_ID",
                "DBAGENT_S3_ACCESS_KEY_ID_FILE",
                "AWS_ACCESS_KEY_ID_FILE"
            ]
        );
    }

    #[test]
    fn every_key_is_read_and_fits_its_field() {
        // Empty: every default parses and every key with a default is asked with `get`.
        let sources = Sources::new(&[("X", "y")], toml::Table::new(), None);
        super::super::Config::from_sources(&sources).unwrap();
        assert!(sources.unread().is_empty(), "{:?}", sources.unread());
        // Each key set by its regular variable: the kind turns into the field's type (a
        // mismatch panics). Values that a later check refuses are fine here.
        for k in KEYS {
            let sample = match k.kind {
                Kind::Text => "x".to_string(),
                Kind::Bool => "yes".into(),
                Kind::Duration { .. } => "3s".into(),
                Kind::Size { min } => (min.max(1)).to_string(),
                Kind::Int { min, .. } => min.to_string(),
                Kind::Float { min, .. } => min.to_string(),
                Kind::Choice(words) => words[0].into(),
                Kind::Cron => "0 0 * * *".into(),
                Kind::List => "a,b".into(),
                Kind::Secret { .. } => "/dev/null".into(),
            };
            let var = k.regular_var();
            let env = [(var.as_str(), sample.as_str())];
            let _ =
                super::super::Config::from_sources(&Sources::new(&env, toml::Table::new(), None));
        }
    }

    #[test]
    fn keys_without_variables_before_now_have_them() {
        let env = [
            ("DBAGENT_SERVE_HEARTBEAT", "off"),
            ("DBAGENT_SERVE_HEARTBEAT_DATABASE", "discourse"),
            ("DBAGENT_SERVE_WAL_LOOKAHEAD_PARALLEL", "9"),
            ("DBAGENT_SERVE_MAX_LAG_SECONDS", "2.5"),
            ("DBAGENT_DRILL_ROW_TOLERANCE", "0.1"),
            ("DBAGENT_DRILL_EXTRA_SUITES", "/a.sql, /b.sql"),
            ("DBAGENT_UPLOAD_CONCURRENCY", "6"),
            ("DBAGENT_PG_HOST", "db"),
            ("PGHOST", "ignored: the regular variable wins"),
            ("DBAGENT_HEARTBEAT_INTERVAL", "3s"),
        ];
        let c = super::super::Config::from_sources(&Sources::new(&env, toml::Table::new(), None))
            .unwrap();
        assert!(!c.serve.heartbeat);
        assert_eq!(c.serve.heartbeat_database, "discourse");
        assert_eq!(c.serve.wal_lookahead_parallel, 9);
        assert_eq!(c.serve.max_lag_seconds, Some(2.5));
        assert_eq!(c.drill.row_tolerance, 0.1);
        assert_eq!(
            c.drill.extra_suites,
            [PathBuf::from("/a.sql"), PathBuf::from("/b.sql")]
        );
        assert_eq!(c.upload.concurrency, 6);
        assert_eq!(c.pg.host.as_deref(), Some("db"));
        assert_eq!(c.serve.heartbeat_interval, Duration::from_secs(3));
    }

    #[test]
    fn typed_values_from_the_file() {
        let c = load_toml(
            "[serve]\nheartbeat = false\nmax_lag = \"1GB\"\nmax_lag_seconds = 5\nrefresh = \"250ms\"\n\
             [upload]\npart_size = 16777216\n[pg]\ndump_databases = [\"discourse\", \"logto\"]\nport = 5433\n",
        )
        .unwrap();
        assert!(!c.serve.heartbeat);
        assert_eq!(c.serve.max_lag_bytes, Some(1 << 30));
        assert_eq!(c.serve.max_lag_seconds, Some(5.0));
        assert_eq!(c.serve.refresh, Duration::from_millis(250));
        assert_eq!(c.upload.part_size, 16 << 20);
        assert_eq!(c.pg.dump_databases, ["discourse", "logto"]);
        assert_eq!(c.pg.port, Some(5433));
    }

    #[test]
    fn bad_values_name_the_key_and_what_it_takes() {
        let msg = |r: anyhow::Result<super::super::Config>| r.unwrap_err().to_string();
        assert_eq!(
            msg(load_toml("[compression]\nlevel = 25\n")),
            "compression.level: expected a whole number from 1 to 19, got \"25\""
        );
        assert_eq!(
            msg(load_toml("[serve]\nheartbeat = \"maybe\"\n")),
            "serve.heartbeat: expected true or false, got \"maybe\""
        );
        assert_eq!(
            msg(load_toml("[serve]\nrefresh = 5\n")),
            "serve.refresh: expected a duration like 30s, 5m or 1h30m, at least 100ms, got 5"
        );
        assert_eq!(
            msg(load_toml("[drill]\nrow_tolerance = -1.0\n")),
            "drill.row_tolerance: expected a number from 0 to 10, got \"-1.0\""
        );
        assert_eq!(
            msg(load_toml("[serve]\nengine = \"oracle\"\n")),
            "serve.engine: expected one of postgres, postgresql, mysql, mariadb, got \"oracle\""
        );
        assert_eq!(
            msg(load_toml("[upload]\npart_size = \"1MiB\"\n")),
            "upload.part_size: expected a size like 16MiB, at least 5MiB, got \"1MiB\""
        );
        assert!(
            msg(load_toml("[schedule]\nbackup = \"daily\"\n")).starts_with("schedule.backup: ")
        );
        assert_eq!(
            msg(load_toml("[serve]\nheartbeet = true\n")),
            "config file c.toml: unknown key serve.heartbeet ([serve] has listen, engine, \
             node_name, refresh, heartbeat, heartbeat_interval, heartbeat_database, max_lag, \
             max_lag_seconds, wal_lookahead, wal_lookahead_parallel, wal_stream, \
             wal_stream_slot, wal_stream_interval, wal_stream_timeout, binlog_interval, \
             binlog_max_age, catalog_refresh, job_grace, schedule_on)"
        );
        assert_eq!(
            msg(load_toml("servr = 1\n")),
            "config file c.toml: unknown key \"servr\""
        );
        let env = [("DBAGENT_SERVE_HEARTBEAT", "maybe")];
        assert_eq!(
            msg(super::super::Config::from_sources(&Sources::new(
                &env,
                toml::Table::new(),
                None
            ))),
            "DBAGENT_SERVE_HEARTBEAT (serve.heartbeat): expected true or false, got \"maybe\""
        );
        // A secret given where its file belongs is not echoed.
        let env = [("PGPASSWORD_FILE", "hunter2-secret")];
        let got = msg(super::super::Config::from_sources(&Sources::new(
            &env,
            toml::Table::new(),
            None,
        )));
        assert!(
            got.starts_with("PGPASSWORD_FILE (pg.password_file): cannot read the file it names (")
                && got.ends_with("a secret itself goes in PGPASSWORD"),
            "{got}"
        );
        assert!(!got.contains("hunter2"), "{got}");
        // A loop's period of zero, and a count no type holds, are refused, not panics.
        for (var, value, said) in [
            (
                "DBAGENT_SERVE_REFRESH",
                "0s",
                "DBAGENT_SERVE_REFRESH (serve.refresh): expected a duration like 30s, 5m or 1h30m, at least 100ms, got \"0s\"",
            ),
            (
                "DBAGENT_SERVE_CATALOG_REFRESH",
                "10ms",
                "DBAGENT_SERVE_CATALOG_REFRESH (serve.catalog_refresh): expected a duration like 30s, 5m or 1h30m, at least 1s, got \"10ms\"",
            ),
            (
                "DBAGENT_WAL_PREFETCH",
                "99999999999999999999",
                "DBAGENT_WAL_PREFETCH (wal.prefetch): expected a whole number from 0 to 4294967295, got \"99999999999999999999\"",
            ),
        ] {
            let env = [(var, value)];
            assert_eq!(
                msg(super::super::Config::from_sources(&Sources::new(
                    &env,
                    toml::Table::new(),
                    None
                ))),
                said
            );
        }
    }

    /// The README's configuration table, row by row: (keys, variables, default cell).
    fn readme_rows() -> Vec<(Vec<String>, Vec<String>, String)> {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .expect("README has a Configuration section");
        let section = section.split("\n## ").next().unwrap();
        let ticked = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        section
            .lines()
            .filter(|l| l.starts_with('|'))
            .skip(2) // header and separator
            .map(|line| {
                let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
                assert!(cells.len() >= 4, "README row with too few cells: {line}");
                let vars = ticked(cells[1])
                    .into_iter()
                    .filter(|v| {
                        v.starts_with(|c: char| c.is_ascii_uppercase())
                            && v.chars()
                                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                    })
                    .collect();
                (ticked(cells[0]), vars, cells[2].to_string())
            })
            .collect()
    }

    #[test]
    fn readme_table_matches_the_keys() {
        let rows = readme_rows();
        let mut problems = Vec::new();
        let mut documented = BTreeSet::new();
        let mut env_only = BTreeSet::new();
        for (keys, vars, default) in &rows {
            if keys.is_empty() {
                env_only.extend(vars.iter().cloned());
                continue;
            }
            if keys.len() != 1 {
                problems.push(format!("one key per row, please: {keys:?}"));
                continue;
            }
            let name = &keys[0];
            documented.insert(name.clone());
            let Some(k) = KEYS.iter().find(|k| k.name == name) else {
                problems.push(format!(
                    "README documents {name}, which the code does not know"
                ));
                continue;
            };
            let code: BTreeSet<String> = k.vars().into_iter().collect();
            let doc: BTreeSet<String> = vars.iter().cloned().collect();
            if code != doc {
                problems.push(format!(
                    "{name}: README lists variables {doc:?}, the code reads {code:?}"
                ));
            }
            if let Some(d) = k.default {
                if !default.contains(&format!("`{d}`")) {
                    problems.push(format!(
                        "{name}: the code's default is {d:?}, README says {default:?}"
                    ));
                }
            }
        }
        for k in KEYS {
            if !documented.contains(k.name) {
                problems.push(format!("{} is not in the README's table", k.name));
            }
        }
        let code_env_only: BTreeSet<String> =
            ENVIRONMENT_ONLY.iter().map(|v| v.to_string()).collect();
        if env_only != code_env_only {
            problems.push(format!(
                "README's variables without a key {env_only:?}, the code's {code_env_only:?}"
            ));
        }
        assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    }
}
