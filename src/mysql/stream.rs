//! Binlog streaming: `serve` reads the binlog over the replication protocol, as a replica
//! would (its own `server_id`), and stores what it reads as immutable *parts* of the file
//! being written, at least once per `serve.wal_stream_interval` while events flow.
//!
//! A part holds bytes `from..to` of one binlog file and ends on a transaction boundary; the
//! parts of a file follow each other from offset 0, so together they are a readable prefix of
//! the server's file, at the server's offsets (a dump's binlog position stays valid). Each
//! part costs one upload of what is new, not of the whole prefix. The complete file that
//! `binlog-push`/the shipper archives on rotation supersedes them.
//!
//! The stream is asked for from position 4 of the file to resume (the end of the newest
//! part, or the file after the newest archived one): the server sends the file again from its
//! start, and events the repository already holds are skipped. Every event's `log_pos` (its
//! end offset in the file) is checked against the bytes assembled so far. MariaDB does not
//! send a replica Annotate_rows events (the SQL text of row events) unless it asks with a
//! flag mysql_async cannot set; such a hole is filled with an Annotate_rows event of the same
//! size whose text says so, so offsets and replay stay those of the server's file. Any other
//! hole, an overlap or an event that does not fit stops the session loudly.
//!
//! A resume point the server no longer has (purged binlogs) is a gap: reported through
//! `StreamStatus` (log, metric, `/status`), and streaming continues from the oldest file
//! the server still has.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use futures::StreamExt;
use mysql_async::prelude::Queryable;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::conn::MysqlConn;
use super::server::Server;
use crate::config::Config;
use crate::input_err;
use crate::pipeline::{self, PipeOptions, WriteMode};
use crate::repo::FORMAT_VERSION;
use crate::repo::manifest::ObjectRef;
use crate::repo::mysql::{self as keys, BinlogName, BinlogPart, Flavor};
use crate::storage::Store;

const HEADER_LEN: usize = 19;
const CHECKSUM_LEN: usize = 4;
const QUERY_EVENT: u8 = 2;
const STOP_EVENT: u8 = 3;
const ROTATE_EVENT: u8 = 4;
const FORMAT_DESCRIPTION_EVENT: u8 = 15;
const XID_EVENT: u8 = 16;
const HEARTBEAT_EVENT: u8 = 27;
const MYSQL_GTID_EVENT: u8 = 33;
const MYSQL_ANONYMOUS_GTID_EVENT: u8 = 34;
const XA_PREPARE_EVENT: u8 = 38;
/// MySQL 8 `binlog_transaction_compression`: one event holds a whole transaction (the client
/// library also hands out the events inside it, with no position of their own).
const TRANSACTION_PAYLOAD_EVENT: u8 = 40;
const MARIADB_ANNOTATE_ROWS_EVENT: u8 = 160;
const MARIADB_GTID_EVENT: u8 = 162;
/// MariaDB's START_ENCRYPTION_EVENT: the events after it in a file on disk are encrypted.
const MARIADB_START_ENCRYPTION_EVENT: u8 = 164;
/// A Query event compressed (`log_bin_compress`): its text is not readable as it is.
const MARIADB_QUERY_COMPRESSED_EVENT: u8 = 165;
/// MariaDB GTID flag: the group is one statement (DDL), with no BEGIN/COMMIT around it.
const FL_STANDALONE: u8 = 1;
/// MariaDB's replica capability "understands GTID events": without it the server rewrites
/// GTID events into BEGIN queries, and the stream would not be the file.
const MARIADB_SLAVE_CAPABILITY_GTID: u32 = 4;
/// The server sends a heartbeat this often when there is nothing to send.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// No event nor heartbeat for this long: the connection is dead.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How many recent stores the pacing looks back on.
const RECENT_STORES: usize = 10;
/// How long a stopping session may take to store what it holds.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The server's "cannot read the binlog you asked for" (purged, or never existed).
const ER_MASTER_FATAL_ERROR_READING_BINLOG: u16 = 1236;

/// What one event's header says.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Header {
    timestamp: u32,
    kind: u8,
    size: u64,
    log_pos: u64,
}

impl Header {
    fn parse(raw: &[u8]) -> anyhow::Result<Header> {
        anyhow::ensure!(
            raw.len() >= HEADER_LEN,
            "a binlog event shorter than its header"
        );
        let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
        let h = Header {
            timestamp: u32_at(0),
            kind: raw[4],
            size: u32_at(9) as u64,
            log_pos: u32_at(13) as u64,
        };
        anyhow::ensure!(
            h.size == raw.len() as u64,
            "binlog event of type {} says it is {} bytes but {} arrived",
            h.kind,
            h.size,
            raw.len()
        );
        Ok(h)
    }
}

/// Where we are in a transaction (an event group), to store only whole transactions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
enum Group {
    #[default]
    Outside,
    /// After a GTID event: a MariaDB standalone statement ends with the next query; a MySQL
    /// group is one statement unless its first query is BEGIN.
    Started { standalone: bool, mysql: bool },
    /// Inside BEGIN … COMMIT/XID.
    Transaction,
}

/// What the events between two points hold.
#[derive(Debug, Clone, Default, PartialEq)]
struct Stats {
    first_time: Option<u32>,
    max_time: Option<u32>,
    events: u64,
    gtid: Option<String>,
    placeholder_bytes: u64,
    ends_file: bool,
}

impl Stats {
    fn merge(&mut self, later: Stats) {
        self.first_time = self.first_time.or(later.first_time);
        self.max_time = self.max_time.max(later.max_time);
        self.events += later.events;
        self.gtid = later.gtid.or(self.gtid.take());
        self.placeholder_bytes += later.placeholder_bytes;
        self.ends_file |= later.ends_file;
    }
}

/// A part ready to store: bytes `from..to` of `name`.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub name: String,
    pub from: u64,
    pub to: u64,
    pub bytes: bytes::Bytes,
    first_time: Option<u32>,
    /// The latest event time in the file up to `to`.
    file_max_time: Option<u32>,
    events: u64,
    gtid: Option<String>,
    placeholder_bytes: u64,
    ends_file: bool,
}

/// What happened to one event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pushed {
    Appended,
    /// Not part of the file (artificial, a heartbeat) or already stored.
    Skipped,
}

/// Builds one binlog file from the events the server streams, and hands out the bytes up to
/// the last transaction boundary. Pure: tested without a server.
#[derive(Debug)]
pub struct FileAssembler {
    pub name: String,
    flavor: Flavor,
    /// Bytes of the file seen so far.
    len: u64,
    /// Bytes already stored (or handed out as a part).
    stored: u64,
    /// The last transaction boundary (≥ stored).
    boundary: u64,
    /// Bytes `stored..len`.
    pending: Vec<u8>,
    checksum: bool,
    group: Group,
    /// Events between `stored` and `boundary`, and after `boundary`.
    closed: Stats,
    open: Stats,
    file_max_time: Option<u32>,
    boundary_max_time: Option<u32>,
    /// Stored parts not yet read again (see `expect_stored`).
    checks: std::collections::VecDeque<(u64, u64, PartCheck)>,
    /// Bytes of one transaction held before it is handed out unfinished.
    max_open: u64,
}

/// The most of one unfinished transaction held in memory (a bulk load commits gigabytes at
/// once): beyond it, its bytes so far are stored anyway.
const MAX_OPEN_TRANSACTION_BYTES: u64 = 64 << 20;

impl FileAssembler {
    /// A file whose first `stored` bytes (a transaction boundary) the repository holds.
    pub fn new(name: &str, flavor: Flavor, stored: u64) -> FileAssembler {
        FileAssembler {
            name: name.to_string(),
            flavor,
            len: 0,
            stored,
            boundary: stored,
            pending: Vec::new(),
            checksum: false,
            group: Group::Outside,
            closed: Stats::default(),
            open: Stats::default(),
            file_max_time: None,
            boundary_max_time: None,
            checks: Default::default(),
            max_open: MAX_OPEN_TRANSACTION_BYTES,
        }
    }

    /// Bytes of the file stored or handed out.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// A whole transaction (or more) waits to be stored.
    pub fn has_ready(&self) -> bool {
        self.boundary > self.stored
    }

    /// The file ended (Rotate or Stop event) and everything up to its end was handed out.
    pub fn finished(&self) -> bool {
        self.closed.ends_file && !self.has_ready()
    }

    /// The server moved on to the next file although this one has no Rotate or Stop event
    /// (the server crashed, or was killed): it sends the next file only once this one is no
    /// longer written, so this one ended where the stream got to. An empty part that ends
    /// the file says so, once everything before it was handed out; None when the file
    /// ended already, or when nothing of it is stored (nothing known of it).
    pub fn end_cut_short(&mut self) -> Option<Part> {
        if self.closed.ends_file || self.has_ready() || !self.pending.is_empty() || self.stored == 0
        {
            return None;
        }
        self.closed.ends_file = true;
        Some(Part {
            name: self.name.clone(),
            from: self.stored,
            to: self.stored,
            bytes: bytes::Bytes::new(),
            first_time: None,
            file_max_time: self.boundary_max_time,
            events: 0,
            gtid: None,
            placeholder_bytes: 0,
            ends_file: true,
        })
    }

    /// Forgets the events after the last transaction boundary (a transaction the file never
    /// ended): their byte range, or None when there were none. Only bytes not stored yet are
    /// forgotten; part of a big transaction stored before its end rolls back on replay.
    pub fn drop_unfinished(&mut self) -> Option<(u64, u64)> {
        // Bytes read again and not yet compared with the stored parts are no unfinished
        // transaction: left as they are (the caller then refuses to move on).
        if self.pending.is_empty() || self.has_ready() || !self.checks.is_empty() {
            return None;
        }
        let range = (self.stored, self.len);
        self.pending.clear();
        self.len = self.stored;
        self.group = Group::Outside;
        self.open = Stats::default();
        Some(range)
    }

    /// Adds one event, as the server sent it (header, body, checksum).
    pub fn push(&mut self, raw: &[u8]) -> anyhow::Result<Pushed> {
        let h = Header::parse(raw)?;
        if h.log_pos == 0 || h.kind == HEARTBEAT_EVENT {
            return Ok(Pushed::Skipped);
        }
        if self.len == 0 {
            // The file starts with the magic number, which is not an event.
            self.len = 4;
        }
        // Stored already: the file is read again from its start after a reconnect.
        let replay = h.log_pos <= self.stored;
        if replay && self.checks.is_empty() {
            if h.kind == FORMAT_DESCRIPTION_EVENT {
                self.checksum = fde_checksum(raw);
            }
            self.len = self.len.max(h.log_pos);
            return Ok(Pushed::Skipped);
        }
        let start = h.log_pos.checked_sub(h.size).ok_or_else(|| {
            anyhow::anyhow!(
                "binlog {}: an event of {} bytes ends at {}",
                self.name,
                h.size,
                h.log_pos
            )
        })?;
        if start < self.len {
            anyhow::bail!(
                "binlog {}: an event at {start}..{} overlaps the bytes read up to {}",
                self.name,
                h.log_pos,
                self.len
            );
        }
        if self.len == 4 && self.pending.is_empty() && (self.stored == 0 || replay) {
            self.pending.extend_from_slice(&BINLOG_MAGIC);
        }
        if start > self.len {
            self.fill_hole(start - self.len, h.timestamp)?;
        }
        if h.kind == FORMAT_DESCRIPTION_EVENT {
            self.checksum = fde_checksum(raw);
        }
        self.pending.extend_from_slice(raw);
        self.len = h.log_pos;
        self.open.events += 1;
        self.open.first_time.get_or_insert(h.timestamp);
        self.open.max_time = self.open.max_time.max(Some(h.timestamp));
        self.file_max_time = self.file_max_time.max(Some(h.timestamp));
        if self.ends_group(&h, raw) {
            self.mark_boundary();
        } else if self.len - self.boundary > self.max_open {
            self.cut_open_transaction();
        }
        if replay {
            self.check_replayed()?;
            return Ok(Pushed::Skipped);
        }
        Ok(Pushed::Appended)
    }

    /// Compares the bytes read again with the stored parts they should equal: a server whose
    /// binlog changed under the same name (reset, restored, another server) must not get its
    /// new events appended to the old history.
    fn check_replayed(&mut self) -> anyhow::Result<()> {
        while let Some((from, to, check)) = self.checks.front() {
            let (from, to) = (*from, *to);
            if self.len < to {
                return Ok(());
            }
            let same = self.len == to && (check.0)(&crate::pipeline::Trailer::of(&self.pending));
            if !same {
                return Err(input_err!(
                    "the server's binlog {} differs from what the repository holds of it (bytes {from}..{to}): its binlogs were reset (RESET MASTER) or belong to another server; give it a new server_id or repository prefix",
                    self.name
                ));
            }
            self.pending.clear();
            self.checks.pop_front();
        }
        // Everything stored was read again: what follows is new.
        self.closed = Stats::default();
        self.open = Stats::default();
        self.group = Group::Outside;
        self.boundary = self.stored;
        Ok(())
    }

    /// The stored parts (`from`, `to`, a check of their plain bytes) that the bytes read again
    /// up to `stored` must equal.
    pub fn expect_stored(&mut self, parts: Vec<(u64, u64, PartCheck)>) {
        self.checks = parts.into();
    }

    /// An event the server left out: an Annotate_rows event of the same size takes its place.
    fn fill_hole(&mut self, size: u64, timestamp: u32) -> anyhow::Result<()> {
        let crc = if self.checksum { CHECKSUM_LEN } else { 0 };
        let min = (HEADER_LEN + crc) as u64;
        if self.flavor != Flavor::Mariadb || size < min || size > u32::MAX as u64 {
            anyhow::bail!(
                "binlog {}: the server sent nothing for bytes {}..{} (an event it does not send a replica)",
                self.name,
                self.len,
                self.len + size
            );
        }
        let mut ev = Vec::with_capacity(size as usize);
        ev.extend_from_slice(&timestamp.to_le_bytes());
        ev.push(MARIADB_ANNOTATE_ROWS_EVENT);
        ev.extend_from_slice(&0u32.to_le_bytes());
        ev.extend_from_slice(&(size as u32).to_le_bytes());
        ev.extend_from_slice(&((self.len + size) as u32).to_le_bytes());
        ev.extend_from_slice(&0u16.to_le_bytes());
        let text_len = size as usize - HEADER_LEN - crc;
        let mut text = b"-- statement text not streamed by dbagent".to_vec();
        text.resize(text_len, b' ');
        text.truncate(text_len);
        ev.extend_from_slice(&text);
        if self.checksum {
            let sum = crc32fast::hash(&ev);
            ev.extend_from_slice(&sum.to_le_bytes());
        }
        self.pending.extend_from_slice(&ev);
        self.len += size;
        self.open.placeholder_bytes += size;
        Ok(())
    }

    fn ends_group(&mut self, h: &Header, raw: &[u8]) -> bool {
        let body = &raw[HEADER_LEN..raw.len() - if self.checksum { CHECKSUM_LEN } else { 0 }];
        match h.kind {
            MARIADB_GTID_EVENT => {
                if body.len() >= 13 {
                    let seq = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
                    let domain = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes"));
                    let server = u32::from_le_bytes(raw[5..9].try_into().expect("4 bytes"));
                    self.open.gtid = Some(format!("{domain}-{server}-{seq}"));
                }
                let standalone = body.get(12).is_some_and(|f| f & FL_STANDALONE != 0);
                self.group = Group::Started {
                    standalone,
                    mysql: false,
                };
                false
            }
            MYSQL_GTID_EVENT | MYSQL_ANONYMOUS_GTID_EVENT => {
                self.group = Group::Started {
                    standalone: false,
                    mysql: true,
                };
                false
            }
            QUERY_EVENT => {
                let q = query_text(body).unwrap_or_default();
                let word =
                    |w: &str| q.len() >= w.len() && q[..w.len()].eq_ignore_ascii_case(w.as_bytes());
                match self.group {
                    Group::Outside => true,
                    Group::Started {
                        standalone: true, ..
                    } => true,
                    Group::Started { mysql: true, .. } if !word("BEGIN") && !word("XA START") => {
                        true
                    }
                    _ if word("COMMIT")
                        || word("ROLLBACK")
                        || word("XA COMMIT")
                        || word("XA ROLLBACK") =>
                    {
                        true
                    }
                    _ => {
                        self.group = Group::Transaction;
                        false
                    }
                }
            }
            // Only a long statement is compressed, never BEGIN or COMMIT: one that stands
            // alone (DDL) ends its group; in a transaction it is one of its statements.
            MARIADB_QUERY_COMPRESSED_EVENT => match self.group {
                Group::Outside
                | Group::Started {
                    standalone: true, ..
                } => true,
                _ => {
                    self.group = Group::Transaction;
                    false
                }
            },
            XID_EVENT | XA_PREPARE_EVENT | TRANSACTION_PAYLOAD_EVENT => true,
            ROTATE_EVENT | STOP_EVENT => {
                self.open.ends_file = true;
                true
            }
            _ => self.group == Group::Outside,
        }
    }

    /// A transaction this big is handed out before its end, so memory stays bounded. Replay
    /// of a prefix that ends inside it rolls it back (the binlog reader adds the ROLLBACK),
    /// and the event times the part records stay those of whole transactions.
    fn cut_open_transaction(&mut self) {
        self.boundary = self.len;
        let mut open = std::mem::take(&mut self.open);
        // Its GTID counts as stored once its end is.
        self.open.gtid = open.gtid.take();
        open.max_time = None;
        self.closed.merge(open);
    }

    fn mark_boundary(&mut self) {
        self.group = Group::Outside;
        self.boundary = self.len;
        self.boundary_max_time = self.file_max_time;
        let open = std::mem::take(&mut self.open);
        self.closed.merge(open);
    }

    /// The bytes up to the last transaction boundary not handed out yet.
    pub fn take_ready(&mut self) -> Option<Part> {
        if !self.has_ready() {
            return None;
        }
        let n = (self.boundary - self.stored) as usize;
        // No copy of what goes out: the pending buffer itself, or its head.
        let bytes = if n == self.pending.len() {
            bytes::Bytes::from(std::mem::take(&mut self.pending))
        } else {
            let rest = self.pending.split_off(n);
            bytes::Bytes::from(std::mem::replace(&mut self.pending, rest))
        };
        let stats = std::mem::take(&mut self.closed);
        let part = Part {
            name: self.name.clone(),
            from: self.stored,
            to: self.boundary,
            bytes,
            first_time: stats.first_time,
            file_max_time: self.boundary_max_time,
            events: stats.events,
            gtid: stats.gtid,
            placeholder_bytes: stats.placeholder_bytes,
            ends_file: stats.ends_file,
        };
        self.stored = self.boundary;
        // Remembered so `finished` knows the file ended after the hand-out.
        self.closed.ends_file = part.ends_file;
        Some(part)
    }
}

/// Where the last whole transaction of a binlog file read from disk ends, when the file has
/// events (or a torn event) after it and no Rotate or Stop event closes it: a server killed
/// while writing a transaction. Returns (that end, the file's length); None when the file
/// ends as the server closes a file, or with a whole transaction. The server rolled the
/// cut-off transaction back at its restart and gave its GTID to the next transaction, which
/// a replay in GTID strict mode refuses as out of order while the cut-off events precede it.
/// Reads the file once; holds at most one transaction (up to 64 MiB) in memory.
pub fn unfinished_tail(
    name: &str,
    flavor: Flavor,
    file: &mut impl std::io::Read,
) -> anyhow::Result<Option<(u64, u64)>> {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic)
        .with_context(|| format!("reading binlog {name}"))?;
    anyhow::ensure!(magic == BINLOG_MAGIC, "binlog {name} has no binlog header");
    let mut assembler = FileAssembler::new(name, flavor, 0);
    let (mut at, mut boundary, mut last_kind) = (4u64, 4u64, None);
    let mut raw = Vec::new();
    loop {
        raw.resize(HEADER_LEN, 0);
        let got = read_full(file, &mut raw)?;
        if got < HEADER_LEN {
            at += got as u64; // a torn header, or the end
            break;
        }
        let u32_at = |i: usize| u32::from_le_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
        let (size, end) = (u32_at(9) as u64, u32_at(13) as u64);
        if raw[4] == MARIADB_START_ENCRYPTION_EVENT {
            // What follows cannot be read without the server's key: nothing to say.
            return Ok(None);
        }
        // In a file every event's header names where it ends: anything else is no event
        // header (damage), and no place to cut.
        anyhow::ensure!(
            size >= HEADER_LEN as u64 && end == at + size,
            "binlog {name}: the event header at byte {at} makes no sense (size {size}, end {end})"
        );
        // Grows with what the file holds, not with what a torn header claims.
        raw.truncate(HEADER_LEN);
        let body = size - HEADER_LEN as u64;
        let got = (&mut *file)
            .take(body)
            .read_to_end(&mut raw)
            .with_context(|| format!("reading binlog {name}"))?;
        if (got as u64) < body {
            at += (HEADER_LEN + got) as u64; // a torn event
            break;
        }
        assembler.push(&raw)?;
        at += size;
        last_kind = Some(raw[4]);
        while assembler.take_ready().is_some() {}
        if assembler.group == Group::Outside {
            boundary = at;
        }
    }
    let closed = matches!(last_kind, Some(ROTATE_EVENT | STOP_EVENT)) && at == boundary;
    Ok((!closed && at > boundary).then_some((boundary, at)))
}

/// Reads until `buf` is full or the end: how many bytes it read.
fn read_full(file: &mut impl std::io::Read, buf: &mut [u8]) -> anyhow::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading a binlog file"),
        }
    }
    Ok(n)
}

/// The file a Rotate event names. Before the first Format_description event nobody knows
/// whether the server checksums events: a valid CRC32 at the end is one.
fn rotate_name(raw: &[u8]) -> anyhow::Result<Option<String>> {
    let h = Header::parse(raw)?;
    if h.kind != ROTATE_EVENT || raw.len() < HEADER_LEN + 8 {
        return Ok(None);
    }
    let mut end = raw.len();
    if end >= HEADER_LEN + 8 + CHECKSUM_LEN {
        let (body, sum) = raw.split_at(end - CHECKSUM_LEN);
        if crc32fast::hash(body).to_le_bytes() == sum {
            end -= CHECKSUM_LEN;
        }
    }
    let name = String::from_utf8_lossy(&raw[HEADER_LEN + 8..end]).into_owned();
    if BinlogName::parse(&name).is_none() {
        anyhow::bail!(
            "the server rotates to a binlog named {name:?}, which is not <base>.<number>"
        );
    }
    Ok(Some(name))
}

const BINLOG_MAGIC: [u8; 4] = [0xfe, b'b', b'i', b'n'];

/// Whether the events after this Format_description event carry CRC32 checksums: the byte
/// before the event's own checksum names the algorithm.
fn fde_checksum(raw: &[u8]) -> bool {
    raw.len() >= HEADER_LEN + 5 && raw[raw.len() - 5] == 1
}

/// A Query event's statement text.
fn query_text(body: &[u8]) -> Option<&[u8]> {
    // thread id 4, exec time 4, db length 1, error code 2, status vars length 2.
    let db_len = *body.get(8)? as usize;
    let vars_len = u16::from_le_bytes(body.get(11..13)?.try_into().ok()?) as usize;
    body.get(13 + vars_len + db_len + 1..)
}

/// What the stream is doing, for `/status` and the metrics.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamFacts {
    pub connected: bool,
    /// The file being streamed and how much of it the repository holds.
    pub file: Option<String>,
    pub stored_position: u64,
    /// The GTID of the newest transaction the repository holds from the stream (MariaDB).
    pub stored_gtid: Option<String>,
    /// The newest event time the repository holds from the stream.
    pub last_event_time: Option<DateTime<Utc>>,
    pub last_stored_at: Option<DateTime<Utc>>,
    pub parts_stored: u64,
    pub bytes_stored: u64,
    /// A stretch of binlog the server purged before it was stored: no restore crosses it.
    pub gap: Option<String>,
    /// The first binlog of that stretch (a dump taken past it supersedes the gap).
    #[serde(skip)]
    pub gap_file: Option<String>,
    /// Storing into the repository fails (retried meanwhile).
    pub store_failing: bool,
    pub error: Option<String>,
}

/// The stream's state; every change goes through a method that logs what matters.
#[derive(Debug, Default)]
pub struct StreamStatus(Mutex<StreamFacts>);

impl StreamStatus {
    pub fn facts(&self) -> StreamFacts {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    #[cfg(test)]
    pub fn set_for_test(&self, facts: StreamFacts) {
        self.update(|s| *s = facts);
    }

    fn update(&self, f: impl FnOnce(&mut StreamFacts)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn connected(&self, file: &str, position: u64) {
        tracing::info!(%file, position, "binlog stream connected");
        self.update(|s| {
            s.connected = true;
            s.file = Some(file.to_string());
            s.stored_position = position;
            s.error = None;
            s.store_failing = false;
        });
    }

    fn store_failing(&self, error: &anyhow::Error) {
        let msg = format!("{error:#}");
        if self.facts().error.as_deref() != Some(msg.as_str()) {
            tracing::warn!(error = %msg, "cannot store streamed binlog; retrying");
        }
        self.update(|s| {
            s.store_failing = true;
            s.error = Some(msg);
        });
    }

    fn stored(&self, part: &Part) {
        tracing::debug!(file = %part.name, from = part.from, to = part.to, "binlog part stored");
        if self.facts().error.is_some() {
            tracing::info!(file = %part.name, "binlog streaming caught up");
        }
        self.update(|s| {
            s.error = None;
            s.store_failing = false;
            s.file = Some(part.name.clone());
            s.stored_position = part.to;
            if part.gtid.is_some() {
                s.stored_gtid = part.gtid.clone();
            }
            if let Some(t) = part.file_max_time.and_then(time) {
                s.last_event_time = s.last_event_time.max(Some(t));
            }
            s.last_stored_at = Some(Utc::now());
            s.parts_stored += 1;
            s.bytes_stored += part.bytes.len() as u64;
        });
    }

    fn gap(&self, file: &str, what: String) {
        tracing::error!(gap = %what, "binlog stream GAP: binlogs were purged before they were stored; no point-in-time restore can cross it until a new dump is taken (dbagent backup --engine mysql)");
        self.update(|s| {
            s.gap = Some(what);
            s.gap_file = Some(file.to_string());
        });
    }

    fn failed(&self, error: &anyhow::Error) {
        let msg = format!("{error:#}");
        let changed = self.facts().error.as_deref() != Some(msg.as_str());
        if changed {
            tracing::warn!(error = %msg, "binlog stream failed; reconnecting");
        }
        self.update(|s| {
            s.connected = false;
            s.error = Some(msg);
        });
    }
}

fn time(secs: u32) -> Option<DateTime<Utc>> {
    Utc.timestamp_opt(secs as i64, 0).single()
}

/// Where streaming resumes: a file and how much of it the repository holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    pub file: String,
    pub stored: u64,
}

/// The end of what the repository holds: the newest streamed part, or the file after the
/// newest archived one. None when it holds no binlog of this server.
pub async fn repository_end(store: &dyn Store, uuid: &str) -> anyhow::Result<Option<Resume>> {
    let mut newest: Option<(BinlogName, u64)> = None;
    for obj in store.list(&keys::binlog_prefix(uuid)).await? {
        let Some(name) = obj
            .key
            .strip_prefix(&keys::binlog_prefix(uuid))
            .and_then(|k| k.strip_suffix(".json"))
        else {
            continue;
        };
        if let Some(n) = BinlogName::parse(name) {
            let next = n.next();
            if newest.as_ref().is_none_or(|(b, _)| next > *b) {
                newest = Some((next, 0));
            }
        }
    }
    // Parts count once described; they run from 0 without holes.
    let mut parts: std::collections::BTreeMap<BinlogName, Vec<(u64, u64)>> = Default::default();
    for obj in store.list(&keys::stream_prefix(uuid)).await? {
        if !obj.key.ends_with(".json") {
            continue;
        }
        if let Some((name, from, to)) = keys::parse_stream_key(uuid, &obj.key) {
            if let Some(n) = BinlogName::parse(&name) {
                parts.entry(n).or_default().push((from, to));
            }
        }
    }
    for (n, mut ranges) in parts {
        ranges.sort();
        let mut end = 0;
        for (from, to) in ranges {
            if from == end {
                end = to;
            }
        }
        if end > 0 && newest.as_ref().is_none_or(|(b, _)| n >= *b) {
            newest = Some((n, end));
        }
    }
    // A file whose stored parts reach its end: the next one is where to resume (the server
    // may have purged this one already, which is no gap).
    if let Some((n, stored)) = &newest {
        if *stored > 0 {
            let (from, to) = last_range(store, uuid, n, *stored).await?;
            let key = keys::stream_part_meta_key(uuid, &n.to_string(), from, to);
            let part: BinlogPart =
                serde_json::from_slice(&crate::storage::get_all(store, &key).await?)
                    .with_context(|| format!("reading streamed binlog part {key}"))?;
            if part.ends_file {
                newest = Some((n.next(), 0));
            }
        }
    }
    Ok(newest.map(|(n, stored)| Resume {
        file: n.to_string(),
        stored,
    }))
}

/// The `from` of the part of `name` that ends at `to` (from the listing).
async fn last_range(
    store: &dyn Store,
    uuid: &str,
    name: &BinlogName,
    to: u64,
) -> anyhow::Result<(u64, u64)> {
    let prefix = format!("{}{name}/", keys::stream_prefix(uuid));
    store
        .list(&prefix)
        .await?
        .iter()
        // Described parts only, as `repository_end` counts them: a part whose data was
        // stored and whose description was not (a crash between the two) is none yet.
        .filter(|o| o.key.ends_with(".json"))
        .filter_map(|o| keys::parse_stream_key(uuid, &o.key))
        .map(|(_, from, end)| (from, end))
        .filter(|(_, end)| *end == to)
        // The empty part that ends a file cut short, where there is one, is its last.
        .max()
        .ok_or_else(|| anyhow::anyhow!("the streamed part of {name} ending at {to} vanished"))
}

/// Where to start given what the server still has. A resume file older than the server's
/// oldest is a gap: streaming goes on from the oldest, and the gap is returned.
pub fn plan_start(
    repo: Option<Resume>,
    server_logs: &[(String, u64)],
) -> anyhow::Result<(Resume, Option<String>)> {
    let (Some((oldest, _)), Some((current, _))) = (server_logs.first(), server_logs.last()) else {
        return Err(input_err!(
            "the server lists no binary logs: is log_bin on?"
        ));
    };
    let Some(repo) = repo else {
        return Ok((
            Resume {
                file: current.clone(),
                stored: 0,
            },
            None,
        ));
    };
    if let Some((_, size)) = server_logs.iter().find(|(n, _)| *n == repo.file) {
        if *size < repo.stored {
            return Err(input_err!(
                "the server's {} is {size} bytes but the repository already holds {} bytes of it: the server's binlogs were reset (RESET MASTER) or belong to another server; give it a new server_id or repository prefix",
                repo.file,
                repo.stored
            ));
        }
        return Ok((repo, None));
    }
    let (Some(want), Some(old), Some(cur)) = (
        BinlogName::parse(&repo.file),
        BinlogName::parse(oldest),
        BinlogName::parse(current),
    ) else {
        return Err(input_err!(
            "binlog names {} and {oldest} are not <base>.<number>",
            repo.file
        ));
    };
    if want.base == old.base && want < old {
        let last = old.prev().map(|p| p.to_string()).unwrap_or_default();
        let gap = if want.seq + 1 == old.seq {
            format!("{} from position {}", repo.file, repo.stored)
        } else {
            format!("{} from position {} to {last}", repo.file, repo.stored)
        };
        return Ok((
            Resume {
                file: oldest.clone(),
                stored: 0,
            },
            Some(gap),
        ));
    }
    if want.base == cur.base && want.seq == cur.seq + 1 && repo.stored == 0 {
        // Everything up to the current file is archived and it has not rotated yet.
        return Ok((
            Resume {
                file: current.clone(),
                stored: 0,
            },
            None,
        ));
    }
    Err(input_err!(
        "the repository's binlogs reach {} but the server's are {oldest}..{current}: the server's binlogs were reset (RESET MASTER) or belong to another server; give it a new server_id or repository prefix",
        repo.file
    ))
}

/// Streams until `token` is cancelled, reconnecting after failures (backoff up to 5 s).
pub async fn run(
    cfg: Config,
    store: Arc<dyn Store>,
    status: Arc<StreamStatus>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        // On SIGTERM the session stores what it holds; it gets a few seconds for that.
        let shutdown = async {
            token.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let res = tokio::select! {
            _ = shutdown => return Ok(()),
            res = session(&cfg, &store, &status, &token) => res,
        };
        match res {
            _ if token.is_cancelled() => return Ok(()),
            Ok(()) => {}
            Err(e) => status.failed(&e),
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One connection: from the repository's end until the connection fails or `token` fires.
async fn session(
    cfg: &Config,
    store: &Arc<dyn Store>,
    status: &StreamStatus,
    token: &CancellationToken,
) -> anyhow::Result<()> {
    let conn = MysqlConn::from_config(&cfg.mysql)?;
    let server = Server::connect(&cfg.mysql, conn.clone()).await?;
    server.require_binlog()?;
    let uuid = server.facts.server_uuid.clone();
    let flavor = server.facts.flavor;
    let logs = server.binary_logs().await?;
    let repo_end = repository_end(store.as_ref(), &uuid).await?;
    let resume_file = repo_end
        .as_ref()
        .map(|r| r.file.clone())
        .unwrap_or_default();
    let (start, gap) = plan_start(repo_end, &logs)?;
    if let Some(gap) = gap {
        status.gap(&resume_file, gap);
    }
    let server_id = cfg
        .mysql
        .stream_server_id
        .unwrap_or_else(|| 2_000_000_000u32.wrapping_add(server.facts.server_id as u32));

    let mut session = conn.connect().await?;
    let mut setup = vec![format!(
        "SET @master_heartbeat_period = {}",
        HEARTBEAT.as_nanos()
    )];
    match flavor {
        Flavor::Mariadb => setup.push(format!(
            "SET @mariadb_slave_capability = {MARIADB_SLAVE_CAPABILITY_GTID}"
        )),
        // MySQL 8.0.26+ reads the `source_` spellings (8.4 may read only those).
        Flavor::Mysql => setup.extend([
            format!("SET @source_heartbeat_period = {}", HEARTBEAT.as_nanos()),
            "SET @source_binlog_checksum = 'CRC32'".to_string(),
        ]),
    }
    for q in setup {
        session
            .query_drop(&q)
            .await
            .map_err(|e| conn.query_error(e))?;
    }
    let request = mysql_async::BinlogStreamRequest::new(server_id)
        .with_filename(start.file.as_bytes())
        .with_pos(4u64);
    let mut stream = session.get_binlog_stream(request).await.map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "asking {} for its binlog as a replica (the account needs REPLICATION SLAVE)",
            conn.describe()
        ))
    })?;
    status.connected(&start.file, start.stored);

    let opts = PipeOptions::from_config(cfg);
    let interval = cfg.serve.wal_stream_interval;
    let mut file = FileAssembler::new(&start.file, flavor, start.stored);
    if start.stored > 0 {
        file.expect_stored(stored_parts(store.as_ref(), &uuid, &start).await?);
    }
    // Stores start early by the slowest recent one's duration (at most half the interval),
    // so that what was ready is durable within `interval`, not `interval` plus an upload.
    let mut last_store = Instant::now() - interval;
    // The slowest of the recent stores: one slower than the last must still end in time.
    let mut upload_times: std::collections::VecDeque<Duration> = Default::default();
    let mut upload_time = Duration::ZERO;
    loop {
        let due = file
            .has_ready()
            .then(|| last_store + interval.saturating_sub(upload_time));
        let event = tokio::select! {
            _ = token.cancelled() => {
                store_ready(store.as_ref(), &uuid, &mut file, opts, status).await?;
                let _ = stream.close().await;
                return Ok(());
            }
            _ = sleep_until(due), if due.is_some() => {
                last_store = Instant::now();
                store_ready(store.as_ref(), &uuid, &mut file, opts, status).await?;
                if upload_times.len() == RECENT_STORES {
                    upload_times.pop_front();
                }
                upload_times.push_back(last_store.elapsed());
                upload_time = upload_times.iter().max().copied().unwrap_or_default().min(interval / 2);
                continue;
            }
            ev = tokio::time::timeout(READ_TIMEOUT, stream.next()) => ev,
        };
        let event = match event {
            Err(_) => anyhow::bail!(
                "no binlog event nor heartbeat from {} for {READ_TIMEOUT:?}",
                conn.describe()
            ),
            Ok(None) => anyhow::bail!("the server ended the binlog stream"),
            Ok(Some(Err(mysql_async::Error::Server(e))))
                if e.code == ER_MASTER_FATAL_ERROR_READING_BINLOG =>
            {
                if e.message.contains("truncated in the middle of event")
                    && end_at_torn_event(&server, store, &uuid, &mut file, opts, status).await?
                {
                    return Ok(());
                }
                status.gap(&start.file, format!("{} ({})", start.file, e.message));
                anyhow::bail!(
                    "the server cannot send binlog {}: {}",
                    start.file,
                    e.message
                );
            }
            Ok(Some(Err(e))) => {
                return Err(anyhow::Error::new(e).context("reading the binlog stream"));
            }
            Ok(Some(Ok(ev))) => ev,
        };
        let mut raw = Vec::with_capacity(event.header().event_size() as usize);
        event
            .write(mysql_async::binlog::BinlogVersion::Version4, &mut raw)
            .context("re-encoding a binlog event")?;
        if let Some(stored) = event.checksum() {
            anyhow::ensure!(
                raw.ends_with(&stored),
                "binlog {}: an event's checksum does not match its bytes",
                file.name
            );
        }
        // A Rotate event the server makes up (log_pos 0) names the file that follows: the
        // first one of a session names the file asked for.
        if event.header().log_pos() == 0 {
            if let Some(next) = rotate_name(&raw)? {
                if next != file.name {
                    store_ready(store.as_ref(), &uuid, &mut file, opts, status).await?;
                    // A transaction whose end the file never got (the server died while
                    // writing it) never committed: left out, the file ends before it.
                    // Before, the session failed here, and every session after it.
                    if let Some(dropped) = file.drop_unfinished() {
                        tracing::warn!(file = %file.name, from = dropped.0, to = dropped.1, next = %next, "the server moved on to the next binlog in the middle of a transaction: its events, never committed, are left out");
                    }
                    anyhow::ensure!(
                        file.pending.is_empty() && file.checks.is_empty(),
                        "the server moved on to binlog {next} before {} was read again up to what the repository holds of it",
                        file.name
                    );
                    // Without it, a restore from the repository alone would stop at this
                    // file's streamed end, refusing every point after the crash.
                    if let Some(end) = file.end_cut_short() {
                        tracing::info!(file = %file.name, at = end.from, next = %next, "the server moved on without ending the binlog (it crashed?): recorded as ended there");
                        store_part_retrying(store.as_ref(), &uuid, &end, opts, status).await?;
                    }
                    file = FileAssembler::new(&next, flavor, 0);
                    last_store = Instant::now() - interval;
                }
            }
            continue;
        }
        file.push(&raw)?;
        // The file ended: store its end now, the next file starts. Or more than
        // MAX_OPEN_TRANSACTION_BYTES are held: store them now, whatever the timer says, so a
        // bulk load is stored in pieces of that size (the timer could fire only after its
        // commit, and one part would hold all of it).
        if file.has_ready()
            && (file.closed.ends_file || file.pending.len() as u64 > MAX_OPEN_TRANSACTION_BYTES)
        {
            last_store = Instant::now();
            store_ready(store.as_ref(), &uuid, &mut file, opts, status).await?;
        }
    }
}

/// After the server refused to send the rest of `file` because it ends in a torn event
/// ("binlog truncated in the middle of event"): when the server no longer writes the file
/// (asked now: the session may have followed it into files it began since) and what is left
/// unread is no more than one transaction the stream would hold, the server died while
/// writing that transaction, which never committed. The file is recorded as ended at its
/// last whole transaction (true), and the next session goes on with the next file (before:
/// a false gap, every session). Anything else (a file still written, bytes read again not
/// yet compared with the stored ones, more unreadable than one transaction: damage in the
/// middle of the file) is left to the caller's gap (false).
async fn end_at_torn_event(
    server: &Server,
    store: &Arc<dyn Store>,
    uuid: &str,
    file: &mut FileAssembler,
    opts: PipeOptions,
    status: &StreamStatus,
) -> anyhow::Result<bool> {
    let logs = server.binary_logs().await?;
    let Some(at) = logs.iter().position(|(name, _)| *name == file.name) else {
        return Ok(false);
    };
    let size = logs[at].1;
    if at + 1 == logs.len() || !file.checks.is_empty() {
        return Ok(false);
    }
    store_ready(store.as_ref(), uuid, file, opts, status).await?;
    let unreadable = size.saturating_sub(file.stored());
    if unreadable > MAX_OPEN_TRANSACTION_BYTES {
        return Ok(false);
    }
    let dropped = file.drop_unfinished();
    if !file.pending.is_empty() {
        return Ok(false);
    }
    let Some(end) = file.end_cut_short() else {
        return Ok(false);
    };
    tracing::warn!(file = %file.name, at = end.from, size, unfinished = ?dropped, "the server's binlog ends in a torn event (it died while writing it): the rest of the file, a transaction that never committed, is left out and the file is recorded as ended there");
    store_part_retrying(store.as_ref(), uuid, &end, opts, status).await?;
    Ok(true)
}

/// The descriptions of the parts of `start.file` up to `start.stored`, in order.
async fn stored_parts(
    store: &dyn Store,
    uuid: &str,
    start: &Resume,
) -> anyhow::Result<Vec<(u64, u64, PartCheck)>> {
    let prefix = format!("{}{}/", keys::stream_prefix(uuid), start.file);
    let mut parts = Vec::new();
    for obj in store.list(&prefix).await? {
        if !obj.key.ends_with(".json") {
            continue;
        }
        let bytes = crate::storage::get_all(store, &obj.key).await?;
        let p: BinlogPart = serde_json::from_slice(&bytes)
            .with_context(|| format!("reading streamed binlog part {}", obj.key))?;
        parts.push(p);
    }
    let run = keys::Streamed::from_parts(&start.file, parts)
        .map(|s| s.parts)
        .unwrap_or_default();
    // An encrypted part records the ciphertext's checksum: its seal's keyed id (the writer's
    // recipients derive the key) tells whether bytes read again are the ones stored.
    let recipients = pipeline::recipients(store).await?;
    let mut checks = Vec::new();
    for p in run.into_iter().filter(|p| p.to <= start.stored) {
        let check: PartCheck = if p.data.key_set.is_none() {
            plain_check(p.data.sha256)
        } else {
            let stored = pipeline::read_trailer(store, &p.data.key, p.data.stored_bytes).await?;
            let recipients = recipients.clone();
            PartCheck(Box::new(move |t| {
                stored.holds(std::slice::from_ref(t), recipients.as_deref()) == Some(true)
            }))
        };
        checks.push((p.from, p.to, check));
    }
    Ok(checks)
}

/// How the bytes read again are compared with a stored part.
pub struct PartCheck(Box<dyn Fn(&crate::pipeline::Trailer) -> bool + Send + Sync>);

impl std::fmt::Debug for PartCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PartCheck")
    }
}

/// The check of a plain part: the SHA-256 of its bytes.
fn plain_check(sha256_hex: String) -> PartCheck {
    PartCheck(Box::new(move |t| t.digest_hex() == sha256_hex))
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Stores the ready part, if any: data first, its description last, both create-only.
async fn store_ready(
    store: &dyn Store,
    uuid: &str,
    file: &mut FileAssembler,
    opts: PipeOptions,
    status: &StreamStatus,
) -> anyhow::Result<()> {
    let Some(part) = file.take_ready() else {
        return Ok(());
    };
    store_part_retrying(store, uuid, &part, opts, status).await
}

/// Stores one part, waiting for a repository that fails for a while.
async fn store_part_retrying(
    store: &dyn Store,
    uuid: &str,
    part: &Part,
    opts: PipeOptions,
    status: &StreamStatus,
) -> anyhow::Result<()> {
    // A repository that fails for a while (S3 down, throttling) is waited for here, holding
    // the connection: once it answers again the stream goes on where it was. The server
    // buffers meanwhile, or drops the connection after its net_write_timeout; either way
    // nothing is lost.
    let mut backoff = Duration::from_millis(200);
    loop {
        match store_part(store, uuid, part, opts).await {
            Ok(()) => break,
            Err(e) if crate::storage::is_transient(&e) => {
                status.store_failing(&e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_STORE_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
    status.stored(part);
    Ok(())
}

/// The longest wait between two attempts to store a part: the stream catches up at most
/// this long after the repository is back.
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(2);

pub async fn store_part(
    store: &dyn Store,
    uuid: &str,
    part: &Part,
    opts: PipeOptions,
) -> anyhow::Result<()> {
    let data_key = keys::stream_part_key(uuid, &part.name, part.from, part.to);
    let meta_key = keys::stream_part_meta_key(uuid, &part.name, part.from, part.to);
    let what = format!("binlog {} bytes {}..{}", part.name, part.from, part.to);
    let written = match pipeline::upload_noted(
        store,
        &data_key,
        std::io::Cursor::new(part.bytes.clone()),
        opts,
        || Ok(0),
        WriteMode::CreateOnly,
    )
    .await
    {
        Ok(w) => w,
        Err(e) if crate::storage::is_already_exists(&e) => {
            // A session that died before describing it: the same bytes are fine.
            let size = store
                .head(&data_key)
                .await?
                .map(|o| o.size)
                .unwrap_or_default();
            let stored = pipeline::read_trailer(store, &data_key, size).await?;
            let mine = crate::pipeline::Trailer::of(&part.bytes);
            let recipients = pipeline::recipients(store).await?;
            anyhow::ensure!(
                stored.holds(std::slice::from_ref(&mine), recipients.as_deref()) == Some(true),
                "refusing to overwrite streamed {what}: the repository holds different bytes under {data_key}, or bytes encrypted for another key set"
            );
            if store.head(&meta_key).await?.is_some() {
                return Ok(());
            }
            pipeline::Written {
                trailer: mine,
                stored_size: size,
                seal: match stored {
                    pipeline::Stored::Sealed(seal) => Some(seal),
                    pipeline::Stored::Plain(..) => None,
                },
            }
        }
        Err(e) => return Err(e.context(format!("storing streamed {what}"))),
    };
    let meta = BinlogPart {
        format_version: FORMAT_VERSION,
        server_uuid: uuid.to_string(),
        name: part.name.clone(),
        from: part.from,
        to: part.to,
        data: ObjectRef::written(&data_key, &written),
        first_event_time: part.first_time.and_then(time),
        last_event_time: part.file_max_time.and_then(time),
        events: part.events,
        gtid: part.gtid.clone(),
        placeholder_bytes: part.placeholder_bytes,
        ends_file: part.ends_file,
        uploaded_at: Utc::now(),
    };
    crate::repo::write_manifest(
        store,
        &meta_key,
        &meta,
        &format!("the description of {what}"),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event with checksum: header, body, CRC32.
    fn event(kind: u8, ts: u32, end: u64, body: &[u8]) -> Vec<u8> {
        let size = (HEADER_LEN + body.len() + CHECKSUM_LEN) as u32;
        let mut ev = Vec::new();
        ev.extend_from_slice(&ts.to_le_bytes());
        ev.push(kind);
        ev.extend_from_slice(&1u32.to_le_bytes());
        ev.extend_from_slice(&size.to_le_bytes());
        ev.extend_from_slice(&(end as u32).to_le_bytes());
        ev.extend_from_slice(&0u16.to_le_bytes());
        ev.extend_from_slice(body);
        let crc = crc32fast::hash(&ev);
        ev.extend_from_slice(&crc.to_le_bytes());
        ev
    }

    fn fde() -> Vec<u8> {
        // Anything, then the checksum algorithm (1 = CRC32).
        let mut body = vec![0u8; 80];
        body.push(1);
        event(FORMAT_DESCRIPTION_EVENT, 100, 4 + 104, &body)
    }

    fn query(q: &str) -> Vec<u8> {
        let mut b = vec![0u8; 13];
        b.push(0); // empty db name's NUL
        b.extend_from_slice(q.as_bytes());
        b
    }

    fn gtid(seq: u64, standalone: bool) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        b.push(if standalone { FL_STANDALONE } else { 0 });
        b
    }

    /// Events laid out one after the other from offset 4, with their ends filled in.
    struct Writer {
        at: u64,
        file: Vec<u8>,
    }

    impl Writer {
        fn new() -> Writer {
            Writer {
                at: 4,
                file: BINLOG_MAGIC.to_vec(),
            }
        }
        fn add(&mut self, kind: u8, ts: u32, body: &[u8]) -> Vec<u8> {
            let len = (HEADER_LEN + body.len() + CHECKSUM_LEN) as u64;
            let ev = if kind == FORMAT_DESCRIPTION_EVENT {
                fde()
            } else {
                event(kind, ts, self.at + len, body)
            };
            self.at += ev.len() as u64;
            self.file.extend_from_slice(&ev);
            ev
        }
    }

    #[test]
    fn finds_the_transaction_a_crash_cut_off_at_a_file_s_end() {
        let tail = |file: &[u8]| {
            unfinished_tail("binlog.000001", Flavor::Mariadb, &mut &file[..]).unwrap()
        };
        let mut w = Writer::new();
        w.add(FORMAT_DESCRIPTION_EVENT, 100, &[]);
        w.add(MARIADB_GTID_EVENT, 101, &gtid(7, false));
        w.add(19, 101, &[1; 10]);
        w.add(XID_EVENT, 101, &[0; 8]);
        let whole = w.at;
        assert_eq!(tail(&w.file), None, "ends with a whole transaction");
        // Killed while writing the next one: its GTID and rows, no XID.
        w.add(MARIADB_GTID_EVENT, 102, &gtid(8, false));
        w.add(23, 102, &[2; 30]);
        assert_eq!(tail(&w.file), Some((whole, w.at)));
        // ... or in the middle of an event.
        let torn = &w.file[..w.file.len() - 5];
        assert_eq!(tail(torn), Some((whole, torn.len() as u64)));
        let torn_header = &w.file[..whole as usize + 7];
        assert_eq!(tail(torn_header), Some((whole, whole + 7)));
        // A standalone statement ends at its query.
        let mut w = Writer::new();
        w.add(FORMAT_DESCRIPTION_EVENT, 100, &[]);
        w.add(MARIADB_GTID_EVENT, 101, &gtid(7, true));
        w.add(QUERY_EVENT, 101, &query("CREATE TABLE t (id int)"));
        assert_eq!(tail(&w.file), None);
        // A file the server closed.
        w.add(ROTATE_EVENT, 103, b"\x04\0\0\0\0\0\0\0binlog.000002");
        assert_eq!(tail(&w.file), None);
        assert!(
            unfinished_tail("x", Flavor::Mariadb, &mut &b"nope"[..]).is_err(),
            "not a binlog"
        );

        // A long DDL compressed (log_bin_compress) stands alone and committed: kept.
        let mut w = Writer::new();
        w.add(FORMAT_DESCRIPTION_EVENT, 100, &[]);
        w.add(MARIADB_GTID_EVENT, 101, &gtid(7, true));
        w.add(MARIADB_QUERY_COMPRESSED_EVENT, 101, &[9; 40]);
        assert_eq!(tail(&w.file), None);
        // A compressed statement in a transaction without its XID: cut.
        let whole = w.at;
        w.add(MARIADB_GTID_EVENT, 102, &gtid(8, false));
        w.add(QUERY_EVENT, 102, &query("BEGIN"));
        w.add(MARIADB_QUERY_COMPRESSED_EVENT, 102, &[9; 40]);
        assert_eq!(tail(&w.file), Some((whole, w.at)));

        // Encrypted on disk (encrypt_binlog): nothing after the event can be read.
        let mut w = Writer::new();
        w.add(FORMAT_DESCRIPTION_EVENT, 100, &[]);
        w.add(MARIADB_START_ENCRYPTION_EVENT, 100, &[0; 17]);
        w.file.extend_from_slice(&[0xa5; 300]);
        assert_eq!(tail(&w.file), None);

        // A header that names another end than its own is damage: no place to cut.
        let mut w = Writer::new();
        w.add(FORMAT_DESCRIPTION_EVENT, 100, &[]);
        let at = w.file.len();
        w.add(MARIADB_GTID_EVENT, 101, &gtid(7, false));
        w.file[at + 13..at + 17].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unfinished_tail("x", Flavor::Mariadb, &mut &w.file[..]).is_err());
    }

    #[test]
    fn hands_out_whole_transactions_that_add_up_to_the_file() {
        let mut w = Writer::new();
        let mut a = FileAssembler::new("binlog.000001", Flavor::Mariadb, 0);
        let fde = w.add(FORMAT_DESCRIPTION_EVENT, 100, &[]);
        assert_eq!(a.push(&fde).unwrap(), Pushed::Appended);
        // A transaction: GTID, table map, rows, XID.
        let evs = [
            w.add(MARIADB_GTID_EVENT, 101, &gtid(7, false)),
            w.add(19, 101, &[1; 10]),
            w.add(23, 101, &[2; 30]),
        ];
        for e in &evs {
            a.push(e).unwrap();
        }
        // Only the FDE is a whole group yet.
        let p = a.take_ready().unwrap();
        assert_eq!((p.from, p.to), (0, 4 + fde.len() as u64));
        assert!(!a.has_ready());
        a.push(&w.add(XID_EVENT, 102, &[0; 8])).unwrap();
        let q = a.take_ready().unwrap();
        assert_eq!(q.from, p.to);
        assert_eq!(q.to, w.at);
        assert_eq!(q.events, 4);
        assert_eq!(q.gtid.as_deref(), Some("0-1-7"));
        assert_eq!(q.file_max_time, Some(102));
        // A standalone DDL is a group of its own.
        a.push(&w.add(MARIADB_GTID_EVENT, 103, &gtid(8, true)))
            .unwrap();
        assert!(!a.has_ready());
        a.push(&w.add(QUERY_EVENT, 103, &query("CREATE TABLE t (i int)")))
            .unwrap();
        let r = a.take_ready().unwrap();
        // A statement-based transaction ends with a COMMIT query.
        a.push(&w.add(MARIADB_GTID_EVENT, 104, &gtid(9, false)))
            .unwrap();
        a.push(&w.add(QUERY_EVENT, 104, &query("INSERT INTO t VALUES (1)")))
            .unwrap();
        assert!(!a.has_ready());
        a.push(&w.add(QUERY_EVENT, 104, &query("COMMIT"))).unwrap();
        // An XA transaction ends with its prepare, not with XA END.
        a.push(&w.add(MARIADB_GTID_EVENT, 104, &gtid(10, false)))
            .unwrap();
        a.push(&w.add(QUERY_EVENT, 104, &query("XA START 'x'")))
            .unwrap();
        a.push(&w.add(QUERY_EVENT, 104, &query("XA END 'x'")))
            .unwrap();
        let before_prepare = a.boundary;
        a.push(&w.add(XA_PREPARE_EVENT, 104, &[0; 12])).unwrap();
        assert!(a.boundary > before_prepare);
        // MySQL: a compressed transaction is one event after its GTID.
        a.push(&w.add(MYSQL_GTID_EVENT, 104, &[0; 20])).unwrap();
        let before_payload = a.boundary;
        a.push(&w.add(TRANSACTION_PAYLOAD_EVENT, 104, &[0; 30]))
            .unwrap();
        assert_eq!(a.boundary, w.at);
        assert!(a.boundary > before_payload);
        let s = a.take_ready().unwrap();
        a.push(&w.add(ROTATE_EVENT, 105, b"\x04\0\0\0\0\0\0\0binlog.000002"))
            .unwrap();
        assert!(!a.finished());
        let t = a.take_ready().unwrap();
        assert!(t.ends_file && a.finished());
        let joined: Vec<u8> = [p, q, r, s, t].into_iter().flat_map(|p| p.bytes).collect();
        assert_eq!(joined, w.file);
    }

    #[test]
    fn resumes_skips_what_is_stored_and_fills_annotate_holes() {
        let mut w = Writer::new();
        let fde = w.add(FORMAT_DESCRIPTION_EVENT, 100, &[]);
        let g1 = w.add(MARIADB_GTID_EVENT, 101, &gtid(1, false));
        let x1 = w.add(XID_EVENT, 101, &[0; 8]);
        let stored = w.at;
        let g2 = w.add(MARIADB_GTID_EVENT, 102, &gtid(2, false));
        let annotate = w.add(
            MARIADB_ANNOTATE_ROWS_EVENT,
            102,
            b"insert into t values (1)",
        );
        let rows = w.add(23, 102, &[3; 12]);
        let x2 = w.add(XID_EVENT, 102, &[0; 8]);
        let mut a = FileAssembler::new("binlog.000001", Flavor::Mariadb, stored);
        // The artificial rotate and a heartbeat are not the file's.
        let fake = event(ROTATE_EVENT, 0, 0, b"\x04\0\0\0\0\0\0\0binlog.000001");
        assert_eq!(
            rotate_name(&fake).unwrap().as_deref(),
            Some("binlog.000001")
        );
        assert_eq!(a.push(&fake).unwrap(), Pushed::Skipped);
        for e in [&fde, &g1, &x1] {
            assert_eq!(a.push(e).unwrap(), Pushed::Skipped);
        }
        a.push(&g2).unwrap();
        // The annotate event never arrives.
        a.push(&rows).unwrap();
        a.push(&x2).unwrap();
        let p = a.take_ready().unwrap();
        assert_eq!((p.from, p.to), (stored, w.at));
        assert_eq!(p.placeholder_bytes, annotate.len() as u64);
        let expected = &w.file[stored as usize..];
        assert_eq!(p.bytes.len(), expected.len());
        // Everything but the placeholder's text and checksum is the server's.
        let hole = g2.len();
        assert_eq!(&p.bytes[..hole + 4], &expected[..hole + 4]);
        assert_eq!(p.bytes[hole + 4], MARIADB_ANNOTATE_ROWS_EVENT);
        assert_eq!(
            &p.bytes[hole + annotate.len()..],
            &expected[hole + annotate.len()..]
        );
        let ph = &p.bytes[hole..hole + annotate.len()];
        let crc = crc32fast::hash(&ph[..ph.len() - 4]);
        assert_eq!(&ph[ph.len() - 4..], &crc.to_le_bytes());

        // Read again with the stored parts' checksums: the same bytes pass, then new ones.
        let stored_bytes = &w.file[..stored as usize];
        let sha = crate::pipeline::Trailer::of(stored_bytes).digest_hex();
        let mut b = FileAssembler::new("binlog.000001", Flavor::Mariadb, stored);
        b.expect_stored(vec![(0, stored, plain_check(sha.clone()))]);
        for e in [&fde, &g1, &x1] {
            assert_eq!(b.push(e).unwrap(), Pushed::Skipped);
        }
        b.push(&g2).unwrap();
        b.push(&rows).unwrap();
        b.push(&x2).unwrap();
        let again = b.take_ready().unwrap();
        assert_eq!(again, p);
        // A server whose file differs under the same name is refused.
        let mut c = FileAssembler::new("binlog.000001", Flavor::Mariadb, stored);
        c.expect_stored(vec![(0, stored, plain_check("0".repeat(64)))]);
        c.push(&fde).unwrap();
        c.push(&g1).unwrap();
        let e = c.push(&x1).unwrap_err();
        assert!(e.to_string().contains("differs"), "{e}");

        // A hole a MySQL server leaves, or an overlap, stops the stream.
        let mut m = FileAssembler::new("binlog.000001", Flavor::Mysql, stored);
        m.push(&fde).unwrap();
        assert!(m.push(&rows).is_err());
    }

    #[test]
    fn a_huge_transaction_is_handed_out_before_it_ends() {
        let mut w = Writer::new();
        let mut a = FileAssembler::new("binlog.000001", Flavor::Mariadb, 0);
        a.max_open = 150;
        a.push(&w.add(FORMAT_DESCRIPTION_EVENT, 100, &[])).unwrap();
        let first = a.take_ready().unwrap();
        a.push(&w.add(MARIADB_GTID_EVENT, 101, &gtid(1, false)))
            .unwrap();
        a.push(&w.add(23, 105, &[7; 60])).unwrap();
        assert!(!a.has_ready());
        a.push(&w.add(23, 106, &[7; 60])).unwrap();
        // Over the bound: out it goes, without claiming the transaction's time or GTID.
        let cut = a.take_ready().unwrap();
        assert_eq!(cut.to, w.at);
        assert_eq!(cut.gtid, None);
        assert_eq!(cut.file_max_time, first.file_max_time);
        // Its end closes it as usual.
        a.push(&w.add(XID_EVENT, 107, &[0; 8])).unwrap();
        let end = a.take_ready().unwrap();
        assert_eq!(end.gtid.as_deref(), Some("0-1-1"));
        assert_eq!(end.file_max_time, Some(107));
        let joined: Vec<u8> = [first, cut, end]
            .into_iter()
            .flat_map(|p| p.bytes)
            .collect();
        assert_eq!(joined, w.file);
    }

    #[tokio::test]
    async fn the_repository_end_is_after_the_newest_part_or_in_the_next_file_once_one_ended() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::LocalStore::new(dir.path().to_path_buf());
        let opts = PipeOptions::for_tests();
        assert_eq!(repository_end(&store, "u").await.unwrap(), None);
        let part = |name: &str, from: u64, to: u64, ends_file: bool| Part {
            name: name.into(),
            from,
            to,
            bytes: vec![1; (to - from) as usize].into(),
            first_time: Some(1),
            file_max_time: Some(2),
            events: 1,
            gtid: None,
            placeholder_bytes: 0,
            ends_file,
        };
        for p in [
            part("b.000007", 0, 300, false),
            part("b.000007", 300, 450, false),
        ] {
            store_part(&store, "u", &p, opts).await.unwrap();
        }
        let at = |file: &str, stored: u64| {
            Some(Resume {
                file: file.into(),
                stored,
            })
        };
        assert_eq!(
            repository_end(&store, "u").await.unwrap(),
            at("b.000007", 450)
        );
        // The empty part that ends a file cut short, its data stored and its description not
        // (a session that died between the two): no end yet, and no error.
        let mut end = part("b.000007", 450, 450, true);
        end.bytes = bytes::Bytes::new();
        store_part(&store, "u", &end, opts).await.unwrap();
        let described = crate::repo::mysql::stream_part_meta_key("u", "b.000007", 450, 450);
        store.delete(&described).await.unwrap();
        assert_eq!(
            repository_end(&store, "u").await.unwrap(),
            at("b.000007", 450)
        );
        store_part(&store, "u", &end, opts).await.unwrap();
        assert_eq!(
            repository_end(&store, "u").await.unwrap(),
            at("b.000008", 0)
        );
        store.delete(&described).await.unwrap();
        // The same part again is fine (a session that died before its description).
        store_part(&store, "u", &part("b.000007", 300, 450, false), opts)
            .await
            .unwrap();
        store_part(&store, "u", &part("b.000007", 450, 500, true), opts)
            .await
            .unwrap();
        assert_eq!(
            repository_end(&store, "u").await.unwrap(),
            at("b.000008", 0)
        );
    }

    #[test]
    fn start_points() {
        let logs = |names: &[(&str, u64)]| -> Vec<(String, u64)> {
            names.iter().map(|(n, s)| (n.to_string(), *s)).collect()
        };
        let server = logs(&[("b.000003", 900), ("b.000004", 500)]);
        let r = |f: &str, s: u64| Resume {
            file: f.into(),
            stored: s,
        };
        // Nothing stored: the file being written.
        assert_eq!(plan_start(None, &server).unwrap(), (r("b.000004", 0), None));
        // The newest part.
        assert_eq!(
            plan_start(Some(r("b.000003", 700)), &server).unwrap(),
            (r("b.000003", 700), None)
        );
        // The file after the newest archived one, not rotated yet.
        assert_eq!(
            plan_start(Some(r("b.000005", 0)), &server).unwrap(),
            (r("b.000004", 0), None)
        );
        // Purged before it was stored: a gap, then the oldest the server has.
        let (start, gap) = plan_start(Some(r("b.000001", 300)), &server).unwrap();
        assert_eq!(start, r("b.000003", 0));
        assert_eq!(gap.unwrap(), "b.000001 from position 300 to b.000002");
        // The server's file is shorter than what is stored, or its names went backwards.
        assert!(plan_start(Some(r("b.000004", 600)), &server).is_err());
        assert!(plan_start(Some(r("b.000009", 0)), &server).is_err());
    }
}
