//! Binlog shipping: every closed binlog file goes into the repository once, with its checksum
//! and the time span of its events.
//!
//! The file being written is the last one `SHOW BINARY LOGS` lists: it is never shipped. The
//! others are closed and final. Each file is uploaded (`<name>.zst`), then described
//! (`<name>.json`, with its first and last event times); only described files count as
//! archived. Shipping a file that is already archived with the same content succeeds; with
//! different content it fails loudly and leaves the archived copy alone, as `wal-push` does.
//!
//! `ship_closed` is the reusable core: `binlog-push` calls it once, a long-running sidecar
//! calls it in a loop with the same `ShipState`, which remembers files already verified so
//! they are not hashed again.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};

use super::conn::MysqlConn;
use super::server::Server;
use crate::config::Config;
use crate::input_err;
use crate::pipeline;
use crate::pipeline::{Tap, Watch};
use crate::repo::FORMAT_VERSION;
use crate::repo::manifest::ObjectRef;
use crate::repo::mysql::{self as keys, BinlogMeta, BinlogName};
use crate::storage::Store;

const BINLOG_MAGIC: [u8; 4] = [0xfe, b'b', b'i', b'n'];
const HEADER_LEN: usize = 19;
const STOP_EVENT: u8 = 3;
const ROTATE_EVENT: u8 = 4;
/// MariaDB's START_ENCRYPTION_EVENT: later event headers are not readable.
const START_ENCRYPTION_EVENT: u8 = 164;

/// What a pass over a binlog file found: event count and time span.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BinlogScan {
    offset: u64,
    next_event: u64,
    header: Vec<u8>,
    pub magic_ok: bool,
    pub events: u64,
    pub first_time: Option<u32>,
    pub max_time: Option<u32>,
    pub last_type: Option<u8>,
    /// Event headers stopped being readable (encryption) or made no sense.
    pub unreadable: bool,
}

impl BinlogScan {
    pub fn feed(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.offset < 4 {
                let take = (4 - self.offset as usize).min(buf.len());
                self.header.extend_from_slice(&buf[..take]);
                self.offset += take as u64;
                buf = &buf[take..];
                if self.offset == 4 {
                    self.magic_ok = self.header == BINLOG_MAGIC;
                    self.unreadable |= !self.magic_ok;
                    self.header.clear();
                    self.next_event = 4;
                }
                continue;
            }
            if self.unreadable {
                self.offset += buf.len() as u64;
                return;
            }
            if self.offset < self.next_event {
                let skip = ((self.next_event - self.offset) as usize).min(buf.len());
                self.offset += skip as u64;
                buf = &buf[skip..];
                continue;
            }
            let take = (HEADER_LEN - self.header.len()).min(buf.len());
            self.header.extend_from_slice(&buf[..take]);
            self.offset += take as u64;
            buf = &buf[take..];
            if self.header.len() == HEADER_LEN {
                self.event_header();
            }
        }
    }

    fn event_header(&mut self) {
        let h = std::mem::take(&mut self.header);
        let when = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let kind = h[4];
        let size = u32::from_le_bytes(h[9..13].try_into().expect("4 bytes")) as u64;
        if size < HEADER_LEN as u64 {
            self.unreadable = true;
            return;
        }
        self.events += 1;
        self.first_time.get_or_insert(when);
        self.max_time = Some(self.max_time.map_or(when, |m| m.max(when)));
        self.last_type = Some(kind);
        // The event started HEADER_LEN bytes ago.
        self.next_event = self.offset - HEADER_LEN as u64 + size;
        if kind == START_ENCRYPTION_EVENT {
            self.unreadable = true;
        }
    }

    /// The file ended exactly at an event boundary.
    pub fn ends_cleanly(&self) -> bool {
        self.magic_ok
            && !self.unreadable
            && self.offset == self.next_event
            && self.header.is_empty()
    }

    pub fn closed_by(&self) -> &'static str {
        match self.last_type {
            _ if self.unreadable => "none",
            Some(ROTATE_EVENT) => "rotate",
            Some(STOP_EVENT) => "stop",
            _ => "none",
        }
    }

    fn time(secs: Option<u32>) -> Option<DateTime<Utc>> {
        Utc.timestamp_opt(secs? as i64, 0).single()
    }

    pub fn first_event_time(&self) -> Option<DateTime<Utc>> {
        Self::time(self.first_time)
    }

    /// The latest event time, only when every event header could be read.
    pub fn last_event_time(&self) -> Option<DateTime<Utc>> {
        if self.unreadable {
            return None;
        }
        Self::time(self.max_time)
    }
}

impl Watch for BinlogScan {
    fn watch(&mut self, buf: &[u8]) {
        self.feed(buf);
    }
}

/// What the shipper remembers between passes (the sidecar keeps one for its lifetime).
#[derive(Debug, Default)]
pub struct ShipState {
    /// Files already known to be archived with this content: name -> (size, mtime).
    verified: BTreeMap<String, (u64, SystemTime)>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct ShipReport {
    pub server_uuid: String,
    pub shipped: Vec<String>,
    pub shipped_bytes: u64,
    pub already_archived: usize,
    /// The file being written, not shipped.
    pub active: Option<String>,
}

impl std::fmt::Display for ShipReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shipped = match (self.shipped.first(), self.shipped.last()) {
            (Some(first), Some(last)) if first == last => {
                format!(
                    "shipped {first} ({})",
                    crate::restore::human(self.shipped_bytes)
                )
            }
            (Some(first), Some(last)) => format!(
                "shipped {} binlogs {first}..{last} ({})",
                self.shipped.len(),
                crate::restore::human(self.shipped_bytes)
            ),
            _ => "nothing new to ship".to_string(),
        };
        let active = self
            .active
            .as_deref()
            .map(|a| format!("; {a} is still being written and was not shipped"))
            .unwrap_or_default();
        write!(
            f,
            "binlog-push for server {}: {shipped}, {} already archived{active}",
            self.server_uuid, self.already_archived
        )
    }
}

/// Ships every closed binlog not yet archived. Stops at the first failure, so the archive
/// never has a file without the ones before it from this pass.
pub async fn ship_closed(
    cfg: &Config,
    store: &Arc<dyn Store>,
    state: &mut ShipState,
) -> anyhow::Result<ShipReport> {
    let conn = MysqlConn::from_config(&cfg.mysql)?;
    let server = Server::connect(&cfg.mysql, conn).await?;
    server.require_binlog()?;
    let uuid = server.facts.server_uuid.clone();
    let dir = server.binlog_dir(&cfg.mysql)?;
    let logs = server.binary_logs().await?;
    let Some(((active, _), closed)) = logs.split_last() else {
        return Err(input_err!(
            "the server lists no binary logs: is log_bin on?"
        ));
    };
    // One listing tells which files are already uploaded and which are described.
    let listed = store.list(&keys::binlog_prefix(&uuid)).await?;
    let present: HashSet<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    let opts = crate::pipeline::PipeOptions::from_config(cfg);

    let archived: Vec<&str> = listed
        .iter()
        .filter_map(|o| {
            o.key
                .strip_prefix(&keys::binlog_prefix(&uuid))?
                .strip_suffix(".json")
        })
        .collect();
    let purged = logs
        .first()
        .and_then(|(oldest, _)| purged_unarchived(&archived, oldest));

    let mut report = ShipReport {
        server_uuid: uuid.clone(),
        active: Some(active.clone()),
        ..Default::default()
    };
    for (name, size) in closed {
        if BinlogName::parse(name).is_none() {
            return Err(input_err!(
                "the server lists a binlog named {name:?}, which is not <base>.<number>"
            ));
        }
        let path = dir.join(name);
        let meta = std::fs::metadata(&path).map_err(|e| {
            input_err!(
                "cannot read binlog {} ({e}): dbagent must run where the server's binlog directory is mounted; set DBAGENT_MYSQL_BINLOG_DIR",
                path.display()
            )
        })?;
        if meta.len() != *size {
            return Err(input_err!(
                "binlog {} is {} bytes but the server says {name} is {size}: DBAGENT_MYSQL_BINLOG_DIR points at another server's binlogs",
                path.display(),
                meta.len()
            ));
        }
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if state.verified.get(name) == Some(&(*size, mtime)) {
            report.already_archived += 1;
            continue;
        }
        let data_key = keys::binlog_key(&uuid, name);
        let meta_key = keys::binlog_meta_key(&uuid, name);
        if present.contains(data_key.as_str()) {
            let stored_size = listed
                .iter()
                .find(|o| o.key == data_key)
                .map(|o| o.size)
                .unwrap_or(0);
            let described = present.contains(meta_key.as_str());
            adopt(store.as_ref(), &uuid, name, &path, stored_size, described).await?;
            state.verified.insert(name.clone(), (*size, mtime));
            report.already_archived += 1;
            continue;
        }
        check_not_older_history(store.as_ref(), &uuid, &archived, name, &path).await?;
        let file = std::fs::File::open(&path)
            .map_err(|e| input_err!("cannot open binlog {}: {e}", path.display()))?;
        let (reader, scan) = Tap::new(file, BinlogScan::default());
        // Create-only: another shipper (the sidecar's, a binlog-push) may have stored it since
        // the listing, and in an encrypted repository its object is another ciphertext, which
        // its description names by digest: replacing it would make a good binlog look corrupt.
        let written = match pipeline::upload_noted(
            store.as_ref(),
            &data_key,
            reader,
            opts,
            || Ok(0),
            pipeline::WriteMode::CreateOnly,
        )
        .await
        {
            Ok(written) => written,
            Err(e) if crate::storage::is_already_exists(&e) => {
                let stored_size = store
                    .head(&data_key)
                    .await?
                    .map(|o| o.size)
                    .unwrap_or_default();
                let described = store.head(&meta_key).await?.is_some();
                adopt(store.as_ref(), &uuid, name, &path, stored_size, described).await?;
                state.verified.insert(name.clone(), (*size, mtime));
                report.already_archived += 1;
                continue;
            }
            Err(e) => return Err(e.context(format!("shipping binlog {name}"))),
        };
        let scan = scan.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if written.trailer.plain_size != *size {
            let _ = store.delete(&data_key).await;
            anyhow::bail!(
                "binlog {name} changed while it was shipped ({} bytes read, the server said {size}); not archived",
                written.trailer.plain_size
            );
        }
        describe(store.as_ref(), &uuid, name, &data_key, written, &scan).await?;
        tracing::info!(%name, bytes = size, "binlog shipped");
        state.verified.insert(name.clone(), (*size, mtime));
        report.shipped.push(name.clone());
        report.shipped_bytes += size;
    }
    // Everything still on the server is archived now; the files before it are lost for good,
    // unless the sidecar's stream stored them whole.
    if let Some((first, last)) = purged {
        let cat = keys::MysqlCatalog::load(store.as_ref(), &uuid).await?;
        let held = |name: &str| cat.streamed_file(name).is_some_and(|s| s.ended());
        match not_held(&first, &last, held) {
            Some((first, last)) => anyhow::bail!(
                "binlogs {first} to {last} were purged from the server before they were archived: no point-in-time restore can cross them. Take a dump now (dbagent backup --engine mysql) and keep binlogs longer than the shipping interval (binlog_expire_logs_seconds)"
            ),
            None => tracing::info!(
                "binlogs {first} to {last} were purged from the server before they were shipped; the repository holds each whole as streamed"
            ),
        }
    }
    Ok(report)
}

/// The first and last file of `first..=last` that `held` says the repository does not hold.
fn not_held(first: &str, last: &str, held: impl Fn(&str) -> bool) -> Option<(String, String)> {
    let (mut name, last) = (BinlogName::parse(first)?, BinlogName::parse(last)?);
    let mut missing = Vec::new();
    while name.seq <= last.seq {
        if !held(&name.to_string()) {
            missing.push(name.to_string());
        }
        name = name.next();
    }
    Some((missing.first()?.clone(), missing.last()?.clone()))
}

/// The binlogs the server purged before they were archived: those after the newest archived
/// one and before the oldest one the server still lists.
fn purged_unarchived(archived: &[&str], oldest_on_server: &str) -> Option<(String, String)> {
    let oldest = BinlogName::parse(oldest_on_server)?;
    let newest = archived
        .iter()
        .filter_map(|n| BinlogName::parse(n))
        .filter(|n| n.base == oldest.base)
        .max_by_key(|n| n.seq)?;
    let first = newest.next();
    let last = oldest.prev()?;
    (first.seq <= last.seq).then(|| (first.to_string(), last.to_string()))
}

/// Reads a local binlog file's event headers.
fn scan_file(path: &Path) -> anyhow::Result<BinlogScan> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut scan = BinlogScan::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(scan);
        }
        scan.feed(&buf[..n]);
    }
}

/// Writes `<name>.json`: from now on the file counts as archived.
async fn describe(
    store: &dyn Store,
    uuid: &str,
    name: &str,
    data_key: &str,
    written: pipeline::Written,
    scan: &BinlogScan,
) -> anyhow::Result<()> {
    if !scan.magic_ok {
        tracing::warn!(%name, "not a binlog file (no binlog magic number): archived without event times");
    } else if !scan.ends_cleanly() && !scan.unreadable {
        tracing::warn!(%name, "binlog ends in the middle of an event (crash?)");
    } else if scan.unreadable {
        tracing::warn!(%name, "binlog events are encrypted or unreadable: its end time is bounded by the upload time");
    }
    let meta = BinlogMeta {
        format_version: FORMAT_VERSION,
        server_uuid: uuid.to_string(),
        name: name.to_string(),
        data: ObjectRef::written(data_key, &written),
        first_event_time: scan.first_event_time(),
        last_event_time: scan.last_event_time(),
        events: scan.events,
        closed_by: scan.closed_by().to_string(),
        uploaded_at: Utc::now(),
    };
    let meta_key = keys::binlog_meta_key(uuid, name);
    let what = format!("the description of binlog {name}");
    let wrote = crate::repo::write_manifest(store, &meta_key, &meta, &what).await;
    if wrote.is_err() {
        // Another shipper described the same object meanwhile (the data is create-only, so
        // there is one object; the descriptions differ in their times): that one stands.
        let theirs: Option<BinlogMeta> = crate::repo::read_manifest(store, &meta_key, &what)
            .await
            .ok();
        if theirs.is_some_and(|t| t.data == meta.data) {
            return Ok(());
        }
    }
    wrote
}

/// Refuses to ship `name` when the archive already holds a later-named binlog of the same
/// base created before `name` was: the server's names started again (RESET MASTER, or
/// a server rebuilt under the same identity after `prune` took the old history's first
/// files), and a restore would run from this history into the other one. A later name
/// created after it is this history's (`name` is a file `prune` took and the server keeps).
async fn check_not_older_history(
    store: &dyn Store,
    uuid: &str,
    archived: &[&str],
    name: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let Some(this) = BinlogName::parse(name) else {
        return Ok(());
    };
    let Some(later) = archived
        .iter()
        .filter_map(|a| BinlogName::parse(a))
        .filter(|a| a.base == this.base && a.seq > this.seq)
        .min_by_key(|a| a.seq)
    else {
        return Ok(());
    };
    let Some(began) = first_event_time(path) else {
        return Ok(());
    };
    let later_name = later.to_string();
    let what = format!("the description of binlog {later_name}");
    let meta: BinlogMeta =
        crate::repo::read_manifest(store, &keys::binlog_meta_key(uuid, &later_name), &what).await?;
    // Creation times, each on the server's own clock (later events may carry a source's).
    let slack = chrono::Duration::seconds(crate::repo::mysql::HISTORY_SLACK_SECONDS);
    match meta.first_event_time {
        Some(created) if created + slack < began => Err(input_err!(
            "refusing to archive binlog {name} (created {}): the archive holds {later_name}, created earlier ({}), so the server's binlog names started again (RESET MASTER, or a server rebuilt under the same hostname and server_id) and a restore would run on from this history into the other. Give the server a new server_id (or a new repository prefix) and take a dump",
            crate::timespec::show(began),
            crate::timespec::show(created)
        )),
        _ => Ok(()),
    }
}

/// The time of a binlog file's first event (its creation), from its header.
fn first_event_time(path: &Path) -> Option<DateTime<Utc>> {
    use std::io::Read;
    let mut head = [0u8; 8];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    if head[..4] != BINLOG_MAGIC {
        return None;
    }
    let secs = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    DateTime::from_timestamp(i64::from(secs), 0)
}

/// A binlog already stored (by an earlier pass, or another shipper since the listing): it must
/// be the local file at `path`; described here if its writer died before describing it (or is
/// describing it now: see `describe`).
async fn adopt(
    store: &dyn Store,
    uuid: &str,
    name: &str,
    path: &Path,
    stored_size: u64,
    described: bool,
) -> anyhow::Result<()> {
    let data_key = keys::binlog_key(uuid, name);
    let (stored, trailer) = compare_existing(store, &data_key, stored_size, path, name).await?;
    if described {
        return Ok(());
    }
    let scan = scan_file(path)?;
    let written = pipeline::Written {
        trailer,
        stored_size,
        seal: match stored {
            pipeline::Stored::Sealed(seal) => Some(seal),
            pipeline::Stored::Plain(..) => None,
        },
    };
    describe(store, uuid, name, &data_key, written, &scan).await
}

/// Whether the binlog stored under `key` is the local file: what is stored and the file's
/// identity when it is, a loud error when it is not.
async fn compare_existing(
    store: &dyn Store,
    key: &str,
    size: u64,
    path: &Path,
    name: &str,
) -> anyhow::Result<(pipeline::Stored, pipeline::Trailer)> {
    let stored = pipeline::read_trailer(store, key, size).await?;
    let recipients = pipeline::recipients(store).await?;
    // The binlog pipeline writes SHA-256 (`PipeOptions::from_config`): a match is by that
    // digest, and the identity given back with it is the file's SHA-256.
    let (matched, local) =
        stored.holds_by(recipients.as_deref(), |d| pipeline::file_identity(path, d))?;
    match matched {
        Some(true) => Ok((stored, local)),
        Some(false) => anyhow::bail!(
            "refusing to overwrite binlog {name}: the archive already holds a different {name} ({} bytes; this one is {}, {} bytes). Two servers may share a server id and hostname, or the server's binlogs were reset (RESET MASTER): give it a new server_id or a new repository prefix",
            stored.plain_size(),
            local.digest_short(),
            local.plain_size
        ),
        None => anyhow::bail!(
            "binlog {name} is already archived, encrypted for another key set than this writer's: cannot tell whether it is this file; not archived again"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purged_binlogs_the_stream_holds_whole_are_not_lost() {
        let streamed = ["mysql-bin.000003", "mysql-bin.000004", "mysql-bin.000006"];
        let held = |n: &str| streamed.contains(&n);
        assert_eq!(not_held("mysql-bin.000003", "mysql-bin.000004", held), None);
        assert_eq!(
            not_held("mysql-bin.000003", "mysql-bin.000007", held),
            Some(("mysql-bin.000005".into(), "mysql-bin.000007".into()))
        );
        assert_eq!(
            not_held("mysql-bin.000002", "mysql-bin.000003", held),
            Some(("mysql-bin.000002".into(), "mysql-bin.000002".into()))
        );
    }

    #[test]
    fn binlogs_purged_before_shipping_are_named() {
        let archived = ["mysql-bin.000001", "mysql-bin.000002"];
        assert_eq!(
            purged_unarchived(&archived, "mysql-bin.000005"),
            Some(("mysql-bin.000003".into(), "mysql-bin.000004".into()))
        );
        assert_eq!(purged_unarchived(&archived, "mysql-bin.000003"), None);
        assert_eq!(purged_unarchived(&archived, "mysql-bin.000002"), None);
        assert_eq!(purged_unarchived(&[], "mysql-bin.000009"), None);
        assert_eq!(purged_unarchived(&archived, "other.000009"), None);
    }

    fn event(when: u32, kind: u8, body: usize) -> Vec<u8> {
        let size = (HEADER_LEN + body) as u32;
        let mut e = Vec::new();
        e.extend_from_slice(&when.to_le_bytes());
        e.push(kind);
        e.extend_from_slice(&1u32.to_le_bytes());
        e.extend_from_slice(&size.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&0u16.to_le_bytes());
        e.extend(std::iter::repeat_n(0xabu8, body));
        e
    }

    fn file(events: &[(u32, u8, usize)]) -> Vec<u8> {
        let mut f = BINLOG_MAGIC.to_vec();
        for &(w, k, b) in events {
            f.extend(event(w, k, b));
        }
        f
    }

    #[test]
    fn reads_event_times_in_any_chunking() {
        let f = file(&[
            (100, 15, 200),
            (90, 30, 50),
            (105, 16, 8),
            (107, ROTATE_EVENT, 20),
        ]);
        for chunk in [1, 3, 19, 20, 4096] {
            let mut s = BinlogScan::default();
            for c in f.chunks(chunk) {
                s.feed(c);
            }
            assert!(s.ends_cleanly(), "chunk {chunk}");
            assert_eq!(s.events, 4);
            assert_eq!(s.first_time, Some(100));
            assert_eq!(s.max_time, Some(107));
            assert_eq!(s.closed_by(), "rotate");
        }
    }

    #[test]
    fn truncated_and_foreign_files() {
        let f = file(&[(100, 15, 200), (107, ROTATE_EVENT, 20)]);
        let mut s = BinlogScan::default();
        s.feed(&f[..f.len() - 5]);
        assert!(!s.ends_cleanly());
        let mut s = BinlogScan::default();
        s.feed(b"not a binlog at all");
        assert!(!s.magic_ok);
        assert_eq!(s.last_event_time(), None);
        let f = file(&[(100, 15, 200), (101, START_ENCRYPTION_EVENT, 10), (3, 1, 0)]);
        let mut s = BinlogScan::default();
        s.feed(&f);
        assert!(s.unreadable);
        assert_eq!(s.last_event_time(), None);
        assert_eq!(s.first_event_time().unwrap().timestamp(), 100);
    }

    #[test]
    fn summary_line() {
        let r = ShipReport {
            server_uuid: "u".into(),
            shipped: vec!["b.000002".into(), "b.000003".into()],
            shipped_bytes: 2048,
            already_archived: 1,
            active: Some("b.000004".into()),
        };
        assert_eq!(
            r.to_string(),
            "binlog-push for server u: shipped 2 binlogs b.000002..b.000003 (2.0 KiB), 1 already archived; b.000004 is still being written and was not shipped"
        );
    }
}
