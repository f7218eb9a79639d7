//! Which relation blocks changed between two LSNs, read from the block references of the WAL.
//!
//! An incremental backup would otherwise read every changed file whole to find its changed
//! blocks. PostgreSQL logs every change to a relation's main fork with a reference to the block
//! it changes (a full-page image or a redo record), so the WAL between the base backup's start
//! and this backup's start names every block that can differ from the base's copy. Blocks it
//! does not name are taken from the base unread; the others are read and compared as before.
//! PostgreSQL 17's WAL summaries rest on the same fact; this reads the WAL itself because 15
//! has no summarizer.
//!
//! What the block references do not cover, and how it is covered here:
//! - a relation created, or truncated, in the range (`XLOG_SMGR_CREATE`, `XLOG_SMGR_TRUNCATE`):
//!   a relfilenode can be reused, and pages extended without a record (zeroed) would otherwise
//!   keep the base's old content. From the creation or truncation point on, the relation counts
//!   as changed (PostgreSQL 17 calls this the limit block);
//! - a database created or dropped in the range (`CREATE DATABASE ... STRATEGY FILE_COPY`
//!   copies files with no block references): its directory is read whole;
//! - the free space map (not WAL-logged) and the visibility map (bits cleared by heap redo
//!   with no reference of their own), and every file that is not a main fork: read whole, as
//!   is anything outside `base/` and `global/`.
//!
//! The reader is strict. A page at an unexpected address, a broken `xl_prev` chain, a CRC
//! mismatch, lengths that do not add up, a missing segment or the end of the written WAL
//! before the target: each is an error, and the backup then compares blocks as it did before
//! (saying so in its log and manifest), so a gap in the archive costs time, never data.
//! Because every byte it uses is covered by these checks (the CRC-32C of each record and the
//! chain of records, as PostgreSQL's own recovery trusts them), archived segments are
//! decompressed without the SHA-256 of the whole object, which cost more CPU than
//! decompressing them (`pipeline::Check::Size`; a restore's `wal-fetch` still checks it).
//!
//! Layout (PostgreSQL 15: access/xlog_internal.h, access/xlogrecord.h): pages of 8 KiB, each
//! opening with a 24-byte header (40 on a segment's first page); records laid end to end on
//! 8-byte boundaries, split across pages with `XLP_FIRST_IS_CONTRECORD` and `xlp_rem_len` on
//! the continuing page; a record is a 24-byte header, block headers, then the block data and
//! the main data.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};

use crate::pg::fileset::BLOCK;
use crate::repo::wal::{Lsn, Segment};
use crate::storage::Store;

const XLOG_PAGE_MAGIC: u16 = 0xD110;
const XLOG_PAGE: usize = 8192;
const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const SHORT_PAGE_HEADER: usize = 24;
const LONG_PAGE_HEADER: usize = 40;
const RECORD_HEADER: usize = 24;
const XLR_MAX_BLOCK_ID: u8 = 32;
const BLOCK_ID_DATA_SHORT: u8 = 255;
const BLOCK_ID_DATA_LONG: u8 = 254;
const BLOCK_ID_ORIGIN: u8 = 253;
const BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const BKPBLOCK_FORK_MASK: u8 = 0x0F;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// `BKPIMAGE_COMPRESS_PGLZ | _LZ4 | _ZSTD`.
const BKPIMAGE_COMPRESSED: u8 = 0x04 | 0x08 | 0x10;
const RM_XLOG_ID: u8 = 0;
const RM_SMGR_ID: u8 = 2;
const RM_DBASE_ID: u8 = 4;
const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_SMGR_CREATE: u8 = 0x10;
const XLOG_SMGR_TRUNCATE: u8 = 0x20;
const MAIN_FORKNUM: u32 = 0;
const DEFAULT_TABLESPACE: u32 = 1663;
const GLOBAL_TABLESPACE: u32 = 1664;
/// The relation block size and segment size this reader maps blocks to files with.
pub const REL_BLOCK: u64 = 8192;
pub const REL_SEGMENT_BLOCKS: u64 = 131072;
/// Relation blocks per backup block.
const PER_CHUNK: u64 = BLOCK / REL_BLOCK;
/// A longer record ends the scan (an error, so the backup compares blocks instead): it bounds
/// the memory the reader holds. PostgreSQL's own limit is 1020 MiB; real records are far
/// smaller than this.
const MAX_RECORD: usize = 16 << 20;

/// A relation: tablespace, database and relfilenode.
type Rel = (u32, u32, u32);

/// What the WAL of a range says changed.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    /// Backup blocks (`BLOCK` bytes, numbered across a relation's segments) of main forks
    /// that a record references.
    chunks: HashMap<Rel, HashSet<u64>>,
    /// The relation block from which a main fork counts as changed whole: it was created or
    /// truncated in the range.
    limits: HashMap<Rel, u64>,
    /// Databases created or dropped in the range.
    whole_dbs: HashSet<u32>,
    /// Whether the server was shut down in the range (a shutdown checkpoint): offline tools
    /// (`pg_checksums --enable` rewrites every page) change files without any WAL, so the
    /// WAL no longer says what changed.
    pub shut_down: bool,
    /// Records read.
    pub records: u64,
}

impl Changes {
    /// For a file of the data directory, which of its `blocks` backup blocks may have changed;
    /// `None` when the file must be read whole (it is not a main fork of a relation in `base/`
    /// or `global/`, or its database was created or dropped in the range).
    pub fn file_blocks(&self, path: &str, blocks: usize) -> Option<Vec<bool>> {
        let (rel, segno) = main_fork(path)?;
        if rel.0 == DEFAULT_TABLESPACE && self.whole_dbs.contains(&rel.1) {
            return None;
        }
        let first = segno * (REL_SEGMENT_BLOCKS / PER_CHUNK);
        let chunks = self.chunks.get(&rel);
        let limit = self.limits.get(&rel).map(|b| b / PER_CHUNK);
        Some(
            (0..blocks as u64)
                .map(|i| {
                    let c = first + i;
                    chunks.is_some_and(|s| s.contains(&c)) || limit.is_some_and(|l| c >= l)
                })
                .collect(),
        )
    }

    /// Whether the WAL names anything of this file: a block of its 1 GB segment, a creation
    /// or truncation of its relation at or below the segment's end, or the creation or removal
    /// of its database. Such a file is read whatever its size and timestamps say.
    pub fn names(&self, path: &str) -> bool {
        let db = path
            .strip_prefix("base/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|db| db.parse::<u32>().ok());
        if db.is_some_and(|db| self.whole_dbs.contains(&db)) {
            return true;
        }
        let Some((rel, segno)) = main_fork(path) else {
            return false;
        };
        let first = segno * (REL_SEGMENT_BLOCKS / PER_CHUNK);
        let end = first + REL_SEGMENT_BLOCKS / PER_CHUNK;
        self.chunks
            .get(&rel)
            .is_some_and(|s| s.iter().any(|c| (first..end).contains(c)))
            || self.limits.get(&rel).is_some_and(|l| l / PER_CHUNK < end)
    }

    fn block(&mut self, rel: Rel, block: u32) {
        self.chunks
            .entry(rel)
            .or_default()
            .insert(block as u64 / PER_CHUNK);
    }

    fn limit(&mut self, rel: Rel, block: u32) {
        let l = self.limits.entry(rel).or_insert(block as u64);
        *l = (*l).min(block as u64);
    }

    /// Notes what one whole record (header included) changes.
    fn note(&mut self, rec: &[u8]) -> anyhow::Result<()> {
        let info = rec[16] & 0xF0;
        let rmid = rec[17];
        let total = rec.len();
        let mut p = RECORD_HEADER;
        let mut datatotal = 0usize;
        let mut main_len = 0usize;
        let mut rel: Option<Rel> = None;
        while total - p > datatotal {
            let id = byte(rec, p)?;
            p += 1;
            match id {
                BLOCK_ID_DATA_SHORT => {
                    main_len = byte(rec, p)? as usize;
                    p += 1;
                    datatotal += main_len;
                    break;
                }
                BLOCK_ID_DATA_LONG => {
                    main_len = u32_at(rec, p)? as usize;
                    p += 4;
                    datatotal += main_len;
                    break;
                }
                BLOCK_ID_ORIGIN => p += 2,
                BLOCK_ID_TOPLEVEL_XID => p += 4,
                0..=XLR_MAX_BLOCK_ID => {
                    let fork_flags = byte(rec, p)?;
                    datatotal += u16_at(rec, p + 1)? as usize;
                    p += 3;
                    if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                        datatotal += u16_at(rec, p)? as usize;
                        let bimg_info = byte(rec, p + 4)?;
                        p += 5;
                        if bimg_info & BKPIMAGE_COMPRESSED != 0
                            && bimg_info & BKPIMAGE_HAS_HOLE != 0
                        {
                            p += 2;
                        }
                    }
                    if fork_flags & BKPBLOCK_SAME_REL == 0 {
                        rel = Some(rel_at(rec, p)?);
                        p += 12;
                    }
                    let Some(r) = rel else {
                        bail!("a block reference says \"same relation\" with none before it");
                    };
                    let block = u32_at(rec, p)?;
                    p += 4;
                    if (fork_flags & BKPBLOCK_FORK_MASK) as u32 == MAIN_FORKNUM {
                        self.block(r, block);
                    }
                }
                other => bail!("unknown block id {other}"),
            }
            if p > total {
                bail!("block headers run past the record's end");
            }
        }
        if p + datatotal != total {
            bail!(
                "the record's lengths do not add up ({} header and {datatotal} data bytes in {total})",
                p
            );
        }
        let main = &rec[total - main_len..];
        match (rmid, info) {
            // xl_smgr_create: RelFileNode, ForkNumber.
            (RM_SMGR_ID, XLOG_SMGR_CREATE) if u32_at(main, 12)? == MAIN_FORKNUM => {
                self.limit(rel_at(main, 0)?, 0);
            }
            (RM_SMGR_ID, XLOG_SMGR_TRUNCATE) => {
                // xl_smgr_truncate: BlockNumber, RelFileNode, flags.
                self.limit(rel_at(main, 4)?, u32_at(main, 0)?);
            }
            (RM_DBASE_ID, _) => {
                // Every dbase record (create by file copy or by WAL, drop) opens with db_id.
                self.whole_dbs.insert(u32_at(main, 0)?);
            }
            (RM_XLOG_ID, XLOG_CHECKPOINT_SHUTDOWN) => self.shut_down = true,
            _ => {}
        }
        self.records += 1;
        Ok(())
    }
}

/// The relation and segment number of a main fork's file (`base/<db>/<rel>[.<seg>]` or
/// `global/<rel>[.<seg>]`).
fn main_fork(path: &str) -> Option<(Rel, u64)> {
    fn num(s: &str) -> Option<u32> {
        if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
    let mut parts = path.split('/');
    let (spc, db, file) = match (parts.next()?, parts.next()?, parts.next(), parts.next()) {
        ("base", db, Some(file), None) => (DEFAULT_TABLESPACE, num(db)?, file),
        ("global", file, None, None) => (GLOBAL_TABLESPACE, 0, file),
        _ => return None,
    };
    let (rel, seg) = match file.split_once('.') {
        Some((rel, seg)) => (num(rel)?, num(seg)? as u64),
        None => (num(file)?, 0),
    };
    Some(((spc, db, rel), seg))
}

fn byte(b: &[u8], p: usize) -> anyhow::Result<u8> {
    b.get(p)
        .copied()
        .context("a record shorter than its headers")
}

fn u16_at(b: &[u8], p: usize) -> anyhow::Result<u16> {
    let s = b
        .get(p..p + 2)
        .context("a record shorter than its headers")?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], p: usize) -> anyhow::Result<u32> {
    let s = b
        .get(p..p + 4)
        .context("a record shorter than its headers")?;
    Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], p: usize) -> u64 {
    u64::from_le_bytes(b[p..p + 8].try_into().expect("8 bytes"))
}

fn rel_at(b: &[u8], p: usize) -> anyhow::Result<Rel> {
    Ok((u32_at(b, p)?, u32_at(b, p + 4)?, u32_at(b, p + 8)?))
}

fn check_crc(rec: &[u8], at: Lsn) -> anyhow::Result<()> {
    let crc = u32::from_le_bytes(rec[20..24].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c_append(crc32c::crc32c(&rec[RECORD_HEADER..]), &rec[..20]);
    if crc != computed {
        bail!("the WAL record at {at} fails its CRC");
    }
    Ok(())
}

/// Reads WAL pages in order, from the start of the segment holding `from`, and notes the
/// changes of every record that starts before `to`. A scan may cover one segment of a longer
/// range: it keeps the record that runs into it from before (`head`) and the one that runs on
/// past its end (the unfinished record) for `collect` to join.
#[derive(Debug, Clone)]
pub struct RefScan {
    sysid: u64,
    seg_size: u64,
    to: u64,
    /// LSN of the first page read.
    start: u64,
    /// LSN of the page being filled.
    page_lsn: u64,
    page: Vec<u8>,
    /// The current record, while it is split across pages.
    rec: Vec<u8>,
    rec_start: u64,
    prev: Option<u64>,
    /// False until the first record boundary (the scan may open inside a record).
    synced: bool,
    /// The tail of a record that began before the scan (the bytes after the page headers), and
    /// the length it announced.
    head: Vec<u8>,
    head_total: Option<usize>,
    /// `xl_prev` of the first whole record: where the record before the scan began.
    first_prev: Option<u64>,
    /// After a switch record, the rest of its segment is padding.
    padding_until: u64,
    done: bool,
    pub changes: Changes,
}

impl RefScan {
    pub fn new(sysid: u64, seg_size: u64, from: u64, to: u64) -> RefScan {
        RefScan {
            sysid,
            seg_size,
            to,
            start: from - from % seg_size,
            page_lsn: from - from % seg_size,
            page: Vec::with_capacity(XLOG_PAGE),
            rec: Vec::new(),
            rec_start: 0,
            prev: None,
            synced: false,
            head: Vec::new(),
            head_total: None,
            first_prev: None,
            padding_until: 0,
            done: false,
            changes: Changes::default(),
        }
    }

    /// Whether every record before `to` has been read.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Whether the rest of the segment is a switch record's padding: there is nothing more to
    /// read in it. (A switched segment is mostly padding; every backup switches twice.)
    fn padded_out(&self) -> bool {
        self.padding_until == self.start + self.seg_size
    }

    pub fn feed(&mut self, mut data: &[u8]) -> anyhow::Result<()> {
        while !data.is_empty() && !self.done {
            if self.page.is_empty() && data.len() >= XLOG_PAGE {
                // A whole page in the input: read it where it is.
                self.page_read(&data[..XLOG_PAGE])?;
                self.page_lsn += XLOG_PAGE as u64;
                data = &data[XLOG_PAGE..];
                continue;
            }
            let n = (XLOG_PAGE - self.page.len()).min(data.len());
            self.page.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.page.len() == XLOG_PAGE {
                let page = std::mem::take(&mut self.page);
                let read = self.page_read(&page);
                self.page = page;
                self.page.clear();
                read?;
                self.page_lsn += XLOG_PAGE as u64;
            }
        }
        Ok(())
    }

    fn page_read(&mut self, page: &[u8]) -> anyhow::Result<()> {
        let lsn = self.page_lsn;
        let at = Lsn(lsn);
        if lsn < self.padding_until {
            // After a switch record: PostgreSQL may leave these pages zeroed.
            return Ok(());
        }
        let magic = u16::from_le_bytes([page[0], page[1]]);
        let info = u16::from_le_bytes([page[2], page[3]]);
        let addr = u64_at(page, 8);
        let rem_len = u32::from_le_bytes(page[16..20].try_into().expect("4 bytes")) as usize;
        if addr != lsn {
            bail!(
                "the WAL page at {at} holds page {} (a recycled file, or the end of the written WAL)",
                Lsn(addr)
            );
        }
        if magic != XLOG_PAGE_MAGIC {
            bail!("the WAL page at {at} has magic {magic:#x}, not PostgreSQL 15's");
        }
        let mut p = SHORT_PAGE_HEADER;
        if lsn.is_multiple_of(self.seg_size) {
            if info & XLP_LONG_HEADER == 0 {
                bail!("the WAL segment at {at} has no long page header");
            }
            let sysid = u64_at(page, 24);
            let seg = u32::from_le_bytes(page[32..36].try_into().expect("4 bytes")) as u64;
            let blcksz = u32::from_le_bytes(page[36..40].try_into().expect("4 bytes")) as usize;
            if sysid != self.sysid || seg != self.seg_size || blcksz != XLOG_PAGE {
                bail!(
                    "the WAL segment at {at} is of cluster {sysid} with {seg}-byte segments and {blcksz}-byte pages, not cluster {} with {}-byte segments and {XLOG_PAGE}-byte pages",
                    self.sysid,
                    self.seg_size
                );
            }
            p = LONG_PAGE_HEADER;
        }
        let cont = info & XLP_FIRST_IS_CONTRECORD != 0;
        if !self.rec.is_empty() {
            let total = self.rec_total();
            let want = total - self.rec.len();
            if !cont || rem_len != want {
                bail!(
                    "the WAL record at {} should continue with {want} bytes on page {at}, which continues none (or {rem_len})",
                    Lsn(self.rec_start)
                );
            }
            let n = want.min(XLOG_PAGE - p);
            self.rec.extend_from_slice(&page[p..p + n]);
            p += n;
            if self.rec.len() < total {
                return Ok(());
            }
            let rec = std::mem::take(&mut self.rec);
            let done = self.record_done(&rec);
            self.rec = rec;
            self.rec.clear();
            done?;
            p = p.next_multiple_of(8);
        } else if !self.synced && cont {
            // The tail of a record that began before the scan: kept for `collect` to join to
            // that record's start.
            let total = *self.head_total.get_or_insert(rem_len);
            if rem_len != total - self.head.len() {
                bail!(
                    "the continued record on WAL page {at} announces {rem_len} bytes where {} were left",
                    total - self.head.len()
                );
            }
            let n = rem_len.min(XLOG_PAGE - p);
            self.head.extend_from_slice(&page[p..p + n]);
            if p + rem_len >= XLOG_PAGE {
                return Ok(());
            }
            p = (p + rem_len).next_multiple_of(8);
        } else if self.synced && cont {
            bail!("the WAL page at {at} continues a record that no page began");
        }
        self.synced = true;
        while p < XLOG_PAGE && !self.done && lsn >= self.padding_until {
            let start = lsn + p as u64;
            if start >= self.to {
                self.done = true;
                break;
            }
            // Records start 8-aligned, so the length field is always on this page.
            let total = u32::from_le_bytes(page[p..p + 4].try_into().expect("4 bytes")) as usize;
            if total == 0 {
                bail!(
                    "the written WAL ends at {} before {}",
                    Lsn(start),
                    Lsn(self.to)
                );
            }
            if !(RECORD_HEADER..=MAX_RECORD).contains(&total) {
                bail!("the WAL record at {} claims {total} bytes", Lsn(start));
            }
            self.rec_start = start;
            if total > XLOG_PAGE - p {
                // Continued on the next page.
                self.rec.extend_from_slice(&page[p..]);
                break;
            }
            self.record_done(&page[p..p + total])?;
            p = (p + total).next_multiple_of(8);
        }
        Ok(())
    }

    fn rec_total(&self) -> usize {
        u32::from_le_bytes(self.rec[0..4].try_into().expect("4 bytes")) as usize
    }

    /// Checks and notes one whole record, `rec`, which starts at `self.rec_start`.
    fn record_done(&mut self, rec: &[u8]) -> anyhow::Result<()> {
        let at = Lsn(self.rec_start);
        if rec.len() < RECORD_HEADER {
            bail!("the WAL record at {at} is shorter than its header");
        }
        let prev = u64_at(rec, 8);
        if self.prev.is_none() && self.first_prev.is_none() {
            self.first_prev = Some(prev);
        }
        if let Some(p) = self.prev
            && p != prev
        {
            bail!(
                "the WAL record at {at} follows {} but the record before it is at {}",
                Lsn(prev),
                Lsn(p)
            );
        }
        check_crc(rec, at)?;
        self.changes
            .note(rec)
            .with_context(|| format!("reading the WAL record at {at}"))?;
        let (info, rmid) = (rec[16] & 0xF0, rec[17]);
        if rmid == RM_XLOG_ID && info == XLOG_SWITCH {
            self.padding_until = (self.rec_start / self.seg_size + 1) * self.seg_size;
        }
        self.prev = Some(self.rec_start);
        Ok(())
    }
}

/// Longest record parts a summary keeps (a record running in from the segment before, one
/// running on into the next): past this, no summary is written and the segment is read.
const SUMMARY_MAX_PARTIAL: usize = 1 << 20;

/// A segment's block references, stored beside it when it is archived (`wal-push`, the
/// streaming sidecar), so an incremental backup reads a few KiB instead of decompressing and
/// parsing 16 MiB. It is the state a `RefScan` of the whole segment ends in: records that
/// cross into the neighbouring segments are joined, and the chain of records checked across
/// segments, exactly as when the segment itself is read. A segment has one content (stores are
/// create-only, and a different push under its name fails), so neither has one summary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    version: u32,
    segment: String,
    system_identifier: u64,
    segment_size: u64,
    /// Length and bytes (hex) of the record that runs in from the segment before.
    head_total: Option<usize>,
    head: String,
    first_prev: Option<u64>,
    /// Where the last whole record began.
    last: Option<u64>,
    /// Start and bytes (hex) of the record that runs on into the next segment.
    open_start: u64,
    open: String,
    records: u64,
    /// (tablespace, database, relfilenode, backup blocks), sorted.
    chunks: Vec<(u32, u32, u32, Vec<u64>)>,
    limits: Vec<(u32, u32, u32, u64)>,
    whole_dbs: Vec<u32>,
    /// A shutdown checkpoint in the segment (see `Changes::shut_down`).
    shut_down: bool,
    /// The bytes of a backup block `chunks` counts in (`BLOCK`).
    block_bytes: u64,
}

/// 2: `shut_down` (a version 1 summary cannot say, so it is not used).
const SUMMARY_VERSION: u32 = 2;

impl Summary {
    /// A scan of a whole segment, `name`; `None` when the scan did not read all of it, or
    /// the records it cuts are too long to keep.
    pub fn of(scan: &RefScan, name: &str) -> Option<Summary> {
        if scan.done
            || scan.page_lsn != scan.start + scan.seg_size
            || !scan.page.is_empty()
            || scan.head.len() > SUMMARY_MAX_PARTIAL
            || scan.rec.len() > SUMMARY_MAX_PARTIAL
        {
            return None;
        }
        let c = &scan.changes;
        let mut chunks: Vec<_> = c
            .chunks
            .iter()
            .map(|(r, set)| {
                let mut blocks: Vec<u64> = set.iter().copied().collect();
                blocks.sort_unstable();
                (r.0, r.1, r.2, blocks)
            })
            .collect();
        chunks.sort_unstable();
        let mut limits: Vec<_> = c.limits.iter().map(|(r, l)| (r.0, r.1, r.2, *l)).collect();
        limits.sort_unstable();
        let mut whole_dbs: Vec<u32> = c.whole_dbs.iter().copied().collect();
        whole_dbs.sort_unstable();
        Some(Summary {
            version: SUMMARY_VERSION,
            segment: name.to_string(),
            system_identifier: scan.sysid,
            segment_size: scan.seg_size,
            head_total: scan.head_total,
            head: hex::encode(&scan.head),
            first_prev: scan.first_prev,
            last: scan.prev,
            open_start: scan.rec_start,
            open: hex::encode(&scan.rec),
            records: c.records,
            chunks,
            limits,
            whole_dbs,
            shut_down: c.shut_down,
            block_bytes: BLOCK,
        })
    }

    /// The scan this summary was made from, once it is checked to be segment `seg` of
    /// cluster `sysid`.
    fn into_scan(self, sysid: u64, seg_size: u64, seg: Segment) -> anyhow::Result<RefScan> {
        let name = seg.name(seg_size);
        if self.version != SUMMARY_VERSION
            || self.block_bytes != BLOCK
            || self.segment != name
            || self.system_identifier != sysid
            || self.segment_size != seg_size
        {
            bail!(
                "it is version {} of segment {} of cluster {} ({}-byte segments, {}-byte blocks)",
                self.version,
                self.segment,
                self.system_identifier,
                self.segment_size,
                self.block_bytes
            );
        }
        let head = hex::decode(&self.head).context("its head is not hex")?;
        let rec = hex::decode(&self.open).context("its open record is not hex")?;
        if self.head_total.is_some_and(|t| head.len() > t)
            || (self.head_total.is_none() && !head.is_empty())
        {
            bail!("its head is longer than the record it belongs to");
        }
        let start = seg.start_lsn(seg_size).0;
        let mut scan = RefScan::new(sysid, seg_size, start, start + seg_size);
        scan.page_lsn = start + seg_size;
        scan.head = head;
        scan.head_total = self.head_total;
        scan.first_prev = self.first_prev;
        scan.prev = self.last;
        scan.rec_start = self.open_start;
        scan.rec = rec;
        let changes = &mut scan.changes;
        changes.records = self.records;
        for (spc, db, rel, blocks) in self.chunks {
            changes
                .chunks
                .entry((spc, db, rel))
                .or_default()
                .extend(blocks);
        }
        for (spc, db, rel, limit) in self.limits {
            changes.limit(
                (spc, db, rel),
                limit.try_into().context("a limit past 2^32")?,
            );
        }
        changes.whole_dbs.extend(self.whole_dbs);
        changes.shut_down = self.shut_down;
        Ok(scan)
    }
}

/// A `RefScan` of a whole segment as `wal-push` reads it: an error ends the scan (the
/// segment is still archived, without a summary).
pub struct SummaryWatch {
    scan: RefScan,
    failed: bool,
}

impl SummaryWatch {
    /// For segment `name` of cluster `sysid` (the file's size is the segment size).
    pub fn new(sysid: u64, seg_size: u64, name: &str) -> Option<SummaryWatch> {
        let seg = Segment::parse(name, seg_size)?;
        let start = seg.start_lsn(seg_size).0;
        Some(SummaryWatch {
            scan: RefScan::new(sysid, seg_size, start, start + seg_size),
            failed: false,
        })
    }

    /// The summary of the segment `name`, if all of it was read without error.
    pub fn summary(&self, name: &str) -> Option<Summary> {
        if self.failed {
            return None;
        }
        Summary::of(&self.scan, name)
    }
}

impl crate::pipeline::Watch for SummaryWatch {
    fn watch(&mut self, buf: &[u8]) {
        if !self.failed && self.scan.feed(buf).is_err() {
            self.failed = true;
        }
    }
}

/// The summary of segment `name`, whole in `bytes` (the streaming sidecar's).
pub fn summarize(sysid: u64, seg_size: u64, name: &str, bytes: &[u8]) -> Option<Summary> {
    let mut watch = SummaryWatch::new(sysid, seg_size, name)?;
    crate::pipeline::Watch::watch(&mut watch, bytes);
    watch.summary(name)
}

/// Stores `summary` for the archived segment it describes. Create-only: an existing summary
/// describes the same content. Best effort: without one, an incremental reads the segment.
pub async fn store_summary(
    store: &dyn Store,
    opts: crate::pipeline::PipeOptions,
    sysid: u64,
    summary: &Summary,
) {
    let key = crate::repo::walrefs_key(sysid, &summary.segment);
    let json = match serde_json::to_vec(summary) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(segment = %summary.segment, error = %e, "cannot encode the segment's block references");
            return;
        }
    };
    // A few KiB: compressed in memory on one thread, then one PUT. (The streaming upload's
    // zstd workers, hashing thread and pipe cost wal-push more than the summary itself.)
    let compression = crate::config::Compression {
        threads: 1,
        ..opts.compression
    };
    let compressed = crate::pipeline::compress_to_memory(
        std::io::Cursor::new(json),
        compression,
        opts.digest,
        || Ok(0),
        &std::sync::atomic::AtomicBool::new(false),
    );
    let written = match compressed {
        Ok((data, _)) => {
            let data = data.expect("compression that is never abandoned has its output");
            crate::pipeline::put_compressed(
                store,
                &key,
                data.into(),
                opts.upload,
                crate::pipeline::WriteMode::CreateOnly,
            )
            .await
        }
        Err(e) => Err(e),
    };
    match written {
        Ok(_) => {
            tracing::debug!(segment = %summary.segment, "stored the segment's block references")
        }
        Err(e) if crate::storage::is_already_exists(&e) => {}
        Err(e) => tracing::warn!(
            segment = %summary.segment,
            error = %format!("{e:#}"),
            "cannot store the segment's block references (an incremental backup will read the segment instead)"
        ),
    }
}

/// Where `collect` read a segment's block references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Local,
    Summary,
    Archive,
}

/// What `collect` found, and where it read the WAL.
#[derive(Debug)]
pub struct Collected {
    pub changes: Changes,
    pub local_segments: u32,
    /// Archived segments whose stored block references were read instead of the segment.
    pub summarized_segments: u32,
    pub fetched_segments: u32,
}

/// Segments read at once: each is read (decompressed, when it comes from the archive) and
/// parsed on its own, and records that cross from one into the next are joined in order
/// afterwards. Reading a segment is CPU-bound, reading a summary is one small GET (tens of
/// milliseconds on B2), so more summaries than segments are asked for at once.
const SEGMENTS_AT_ONCE: usize = 2;
const LOOKUPS_AT_ONCE: usize = 8;

/// Reads the WAL from `from` to `to` on timeline `tli`: each segment from the data directory's
/// `pg_wal` while it is there (its first page names it), otherwise its stored summary (every
/// segment but the one holding `to`, which the summary of a whole segment would overshoot
/// only harmlessly, but which is usually still being written), otherwise the archived segment.
pub async fn collect(
    store: &dyn Store,
    data_dir: &Path,
    sysid: u64,
    tli: u32,
    seg_size: u64,
    from: Lsn,
    to: Lsn,
) -> anyhow::Result<Collected> {
    use futures::{StreamExt, TryStreamExt};
    if to.0 < from.0 {
        bail!("the range {from}..{to} runs backwards");
    }
    let first = Segment::of_lsn(tli, from, seg_size);
    let last = Segment::of_lsn(tli, to, seg_size);
    let reader = SegmentReader {
        store,
        data_dir,
        sysid,
        seg_size,
        reading: tokio::sync::Semaphore::new(SEGMENTS_AT_ONCE),
    };
    let scans = futures::stream::iter(
        (first.segno..=last.segno)
            .map(|segno| reader.scan(Segment { tli, segno }, to.0, segno < last.segno)),
    )
    .buffered(LOOKUPS_AT_ONCE);
    futures::pin_mut!(scans);
    let mut joined = Joined::default();
    let (mut local_segments, mut summarized_segments, mut fetched_segments) = (0, 0, 0);
    while let Some((scan, source)) = scans.try_next().await? {
        match source {
            Source::Local => local_segments += 1,
            Source::Summary => summarized_segments += 1,
            Source::Archive => fetched_segments += 1,
        }
        joined.add(scan)?;
        if joined.done {
            break;
        }
    }
    if !joined.done {
        bail!("the WAL ends before {to}");
    }
    Ok(Collected {
        changes: joined.changes,
        local_segments,
        summarized_segments,
        fetched_segments,
    })
}

/// The scans of consecutive segments, joined.
#[derive(Default)]
struct Joined {
    changes: Changes,
    started: bool,
    /// The record the last segment left unfinished: its start and bytes.
    open: Option<(u64, Vec<u8>)>,
    /// Where the last whole record began.
    last: Option<u64>,
    done: bool,
}

impl Joined {
    fn add(&mut self, scan: RefScan) -> anyhow::Result<()> {
        let mut last = self.last;
        match (self.open.take(), scan.head_total) {
            (Some((start, mut rec)), Some(total)) => {
                let at = Lsn(start);
                rec.extend_from_slice(&scan.head);
                if scan.head.len() != total || rec.len() != u32_at(&rec, 0)? as usize {
                    bail!("the WAL record at {at} is not whole where its segment ends");
                }
                if u64_at(&rec, 8) != last.unwrap_or(u64_at(&rec, 8)) {
                    bail!("the WAL record at {at} does not follow the one before it");
                }
                check_crc(&rec, at)?;
                self.changes
                    .note(&rec)
                    .with_context(|| format!("reading the WAL record at {at}"))?;
                last = Some(start);
            }
            (None, Some(_)) if self.started => {
                bail!("a WAL segment opens inside a record that no segment began")
            }
            (Some((start, _)), None) => {
                bail!(
                    "the WAL record at {} runs past its segment, and the next one does not continue it",
                    Lsn(start)
                )
            }
            _ => {}
        }
        if let (Some(first_prev), Some(last)) = (scan.first_prev, last)
            && first_prev != last
        {
            bail!(
                "the WAL from {} does not follow on from the segment before it",
                Lsn(scan.start)
            );
        }
        self.started = true;
        self.last = scan.prev.or(last);
        self.done = scan.done;
        if !scan.rec.is_empty() {
            if scan.rec.len() < 4 {
                bail!(
                    "a WAL record at {} is cut short by its segment's end",
                    Lsn(scan.rec_start)
                );
            }
            self.open = Some((scan.rec_start, scan.rec));
        }
        let changes = scan.changes;
        self.changes.records += changes.records;
        for (rel, chunks) in changes.chunks {
            self.changes.chunks.entry(rel).or_default().extend(chunks);
        }
        for (rel, limit) in changes.limits {
            let l = self.changes.limits.entry(rel).or_insert(limit);
            *l = (*l).min(limit);
        }
        self.changes.whole_dbs.extend(changes.whole_dbs);
        self.changes.shut_down |= changes.shut_down;
        Ok(())
    }
}

struct SegmentReader<'a> {
    store: &'a dyn Store,
    data_dir: &'a Path,
    sysid: u64,
    seg_size: u64,
    /// Held while a segment (not a summary) is read.
    reading: tokio::sync::Semaphore,
}

impl SegmentReader<'_> {
    /// Scans one segment, all of it up to `to` (or reads its summary, when `summarized`
    /// allows it): records before the range's start are noted too, which only reads a few
    /// more blocks.
    async fn scan(
        &self,
        seg: Segment,
        to: u64,
        summarized: bool,
    ) -> anyhow::Result<(RefScan, Source)> {
        let (sysid, seg_size) = (self.sysid, self.seg_size);
        let name = seg.name(seg_size);
        let path = self.data_dir.join("pg_wal").join(&name);
        let start = seg.start_lsn(seg_size).0;
        let reading = self
            .reading
            .acquire()
            .await
            .context("the WAL reader stopped")?;
        let mut scan = RefScan::new(sysid, seg_size, start, to);
        let local = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<Option<RefScan>> {
                let Some(file) = local_segment(&path, start, sysid) else {
                    return Ok(None);
                };
                feed_file(&mut scan, file)
                    .with_context(|| format!("reading {}", path.display()))?;
                Ok(Some(scan))
            })
            .await
            .context("reading a local WAL segment panicked")??
        };
        if let Some(scan) = local {
            return Ok((scan, Source::Local));
        }
        drop(reading);
        if summarized && let Some(scan) = read_summary(self.store, sysid, seg_size, seg).await {
            return Ok((scan, Source::Summary));
        }
        let _reading = self
            .reading
            .acquire()
            .await
            .context("the WAL reader stopped")?;
        let key = crate::repo::wal_key(sysid, &name);
        let scan = RefScan::new(sysid, seg_size, start, to);
        let scan =
            crate::pipeline::download_checked(self.store, &key, scan, crate::pipeline::Check::Size)
                .await
                .with_context(|| format!("reading WAL segment {name} from the archive"))?;
        Ok((scan, Source::Archive))
    }
}

/// The stored summary of segment `seg`, if there is a usable one (the segment is read
/// otherwise, so anything wrong with a summary costs only time).
async fn read_summary(
    store: &dyn Store,
    sysid: u64,
    seg_size: u64,
    seg: Segment,
) -> Option<RefScan> {
    let name = seg.name(seg_size);
    let key = crate::repo::walrefs_key(sysid, &name);
    let read = async {
        let (json, _) = crate::pipeline::download(store, &key, Vec::new()).await?;
        let summary: Summary = serde_json::from_slice(&json).context("it is not a summary")?;
        summary.into_scan(sysid, seg_size, seg)
    };
    match read.await {
        Ok(scan) => Some(scan),
        Err(e) if crate::storage::is_not_found(&e) => None,
        Err(e) => {
            tracing::warn!(segment = %name, error = %format!("{e:#}"), "cannot use the stored block references of this segment; reading the segment");
            None
        }
    }
}

/// The local copy of the segment starting at `start`, when `path` holds it: a recycled file
/// carries a later segment's name over an earlier segment's pages.
fn local_segment(path: &Path, start: u64, sysid: u64) -> Option<std::fs::File> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut head = [0u8; LONG_PAGE_HEADER];
    file.read_exact(&mut head).ok()?;
    let ours = u16::from_le_bytes([head[0], head[1]]) == XLOG_PAGE_MAGIC
        && u64_at(&head, 8) == start
        && u64_at(&head, 24) == sysid;
    if !ours {
        tracing::debug!(path = %path.display(), "not this segment's WAL; reading the archived copy");
        return None;
    }
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0)).ok()?;
    Some(file)
}

fn feed_file(scan: &mut RefScan, mut file: std::fs::File) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while !scan.done() && !scan.padded_out() {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        scan.feed(&buf[..n])?;
    }
    Ok(())
}

/// A segment downloaded only to be scanned.
impl std::io::Write for RefScan {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 * 1024 * 1024;
    const SYSID: u64 = 7_000_000_000_000_000_001;
    /// LSN of segment 000000010000000000000003.
    const START: u64 = 3 * SEG;

    /// Lays records out the way PostgreSQL does, across pages and segments.
    struct Wal {
        bytes: Vec<u8>,
        /// LSN of `bytes[0]`.
        base: u64,
        prev: u64,
    }

    impl Wal {
        /// WAL from the start of the segment at `base`; `cont` is the length of a record
        /// tail that opens it.
        fn new(base: u64, segments: u64, cont: Option<u32>) -> Wal {
            let mut bytes = vec![0u8; (segments * SEG) as usize];
            for page in 0..bytes.len() / XLOG_PAGE {
                let lsn = base + (page * XLOG_PAGE) as u64;
                let h = &mut bytes[page * XLOG_PAGE..];
                h[0..2].copy_from_slice(&XLOG_PAGE_MAGIC.to_le_bytes());
                let long = lsn.is_multiple_of(SEG);
                let mut info = if long { XLP_LONG_HEADER } else { 0 };
                if let (0, Some(n)) = (page, cont) {
                    info |= XLP_FIRST_IS_CONTRECORD;
                    h[16..20].copy_from_slice(&n.to_le_bytes());
                }
                h[2..4].copy_from_slice(&info.to_le_bytes());
                h[4..8].copy_from_slice(&1u32.to_le_bytes());
                h[8..16].copy_from_slice(&lsn.to_le_bytes());
                if long {
                    h[24..32].copy_from_slice(&SYSID.to_le_bytes());
                    h[32..36].copy_from_slice(&(SEG as u32).to_le_bytes());
                    h[36..40].copy_from_slice(&(XLOG_PAGE as u32).to_le_bytes());
                }
            }
            Wal {
                bytes,
                base,
                prev: 0,
            }
        }

        /// Writes a record at `lsn` (just after a page header if `lsn` is at one), continuing
        /// across pages; returns the LSN after it (8-aligned).
        fn record(&mut self, mut lsn: u64, rmid: u8, info: u8, body: &[u8]) -> u64 {
            let mut rec = vec![0u8; RECORD_HEADER];
            rec.extend_from_slice(body);
            let total = rec.len() as u32;
            rec[0..4].copy_from_slice(&total.to_le_bytes());
            rec[8..16].copy_from_slice(&self.prev.to_le_bytes());
            rec[16] = info;
            rec[17] = rmid;
            let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[RECORD_HEADER..]), &rec[..20]);
            rec[20..24].copy_from_slice(&crc.to_le_bytes());
            lsn = self.skip_header(lsn);
            self.prev = lsn;
            let mut left = &rec[..];
            let mut first = true;
            while !left.is_empty() {
                lsn = self.skip_header(lsn);
                let off = (lsn - self.base) as usize;
                if !first {
                    let page = off - off % XLOG_PAGE;
                    let info = u16::from_le_bytes([self.bytes[page + 2], self.bytes[page + 3]]);
                    self.bytes[page + 2..page + 4]
                        .copy_from_slice(&(info | XLP_FIRST_IS_CONTRECORD).to_le_bytes());
                    self.bytes[page + 16..page + 20]
                        .copy_from_slice(&(left.len() as u32).to_le_bytes());
                }
                let room = XLOG_PAGE - off % XLOG_PAGE;
                let n = room.min(left.len());
                self.bytes[off..off + n].copy_from_slice(&left[..n]);
                left = &left[n..];
                lsn += n as u64;
                first = false;
            }
            lsn.next_multiple_of(8)
        }

        fn skip_header(&self, lsn: u64) -> u64 {
            if lsn.is_multiple_of(SEG) {
                lsn + LONG_PAGE_HEADER as u64
            } else if lsn.is_multiple_of(XLOG_PAGE as u64) {
                lsn + SHORT_PAGE_HEADER as u64
            } else {
                lsn
            }
        }

        fn scan(&self, from: u64, to: u64) -> anyhow::Result<RefScan> {
            let mut scan = RefScan::new(SYSID, SEG, from, to);
            // Fed in odd-sized pieces, as a download arrives: whole pages are read in place,
            // the others gathered first.
            for piece in self.bytes.chunks(3 * XLOG_PAGE + 100) {
                scan.feed(piece)?;
            }
            Ok(scan)
        }
    }

    /// A record body referencing `blocks` (fork, block) of `rel`, with a compressed full-page
    /// image on the first, and `main` bytes of main data.
    fn body(rel: Rel, blocks: &[(u8, u32)], main: usize) -> Vec<u8> {
        let mut hdr = Vec::new();
        let mut data = Vec::new();
        for (i, (fork, block)) in blocks.iter().enumerate() {
            hdr.push(i as u8);
            let same = if i == 0 {
                BKPBLOCK_HAS_IMAGE
            } else {
                BKPBLOCK_SAME_REL
            };
            hdr.push(*fork | same);
            hdr.extend_from_slice(&3u16.to_le_bytes()); // data_length
            data.extend_from_slice(&[1, 2, 3]);
            if i == 0 {
                // length, hole_offset, bimg_info, hole_length.
                hdr.extend_from_slice(&100u16.to_le_bytes());
                hdr.extend_from_slice(&40u16.to_le_bytes());
                hdr.push(BKPIMAGE_HAS_HOLE | 0x10);
                hdr.extend_from_slice(&7000u16.to_le_bytes());
                data.extend_from_slice(&[9u8; 100]);
                for v in [rel.0, rel.1, rel.2] {
                    hdr.extend_from_slice(&v.to_le_bytes());
                }
            }
            hdr.extend_from_slice(&block.to_le_bytes());
        }
        if main < 256 {
            hdr.extend_from_slice(&[BLOCK_ID_DATA_SHORT, main as u8]);
        } else {
            hdr.push(BLOCK_ID_DATA_LONG);
            hdr.extend_from_slice(&(main as u32).to_le_bytes());
        }
        data.extend(std::iter::repeat_n(0u8, main));
        hdr.extend(data);
        hdr
    }

    fn heap_body(rel: u32, blocks: &[(u8, u32)]) -> Vec<u8> {
        body((DEFAULT_TABLESPACE, 5, rel), blocks, 4)
    }

    fn main_body(main: &[u8]) -> Vec<u8> {
        let mut b = vec![BLOCK_ID_DATA_SHORT, main.len() as u8];
        b.extend_from_slice(main);
        b
    }

    #[test]
    fn block_references_map_to_backup_blocks_of_the_right_segment_file() {
        let mut w = Wal::new(START, 1, None);
        let mut at = w.record(
            START,
            10,
            0,
            &heap_body(16384, &[(0, 3), (0, 200), (1, 40)]),
        );
        // A relation in its second 1 GiB segment, and one in global/.
        at = w.record(at, 10, 0, &heap_body(16385, &[(0, 131072 + 17)]));
        at = w.record(at, 10, 0, &body((GLOBAL_TABLESPACE, 0, 1262), &[(0, 0)], 4));
        let scan = w.scan(START, at).unwrap();
        assert!(scan.done());
        let c = &scan.changes;
        assert_eq!(c.records, 3);
        let blocks = c.file_blocks("base/5/16384", 3).unwrap();
        // Blocks 3 and 200 of 8 KiB are in backup blocks 0 and 12 (16 pages each).
        assert_eq!(blocks, vec![true, false, false]);
        assert!(c.file_blocks("base/5/16384", 13).unwrap()[12]);
        // The FSM reference (fork 1, block 40 -> backup block 2) marks nothing in the main fork.
        assert!(!c.file_blocks("base/5/16384", 13).unwrap()[2]);
        assert_eq!(
            c.file_blocks("base/5/16385.1", 3).unwrap(),
            vec![false, true, false]
        );
        assert_eq!(c.file_blocks("base/5/16385", 3).unwrap(), vec![false; 3]);
        assert_eq!(c.file_blocks("global/1262", 1).unwrap(), vec![true]);
        // Files that are not main forks are read whole.
        for path in [
            "base/5/16384_fsm",
            "base/5/16384_vm",
            "base/5/PG_VERSION",
            "global/pg_control",
            "pg_xact/0000",
            "base/5/t3_16390",
        ] {
            assert_eq!(c.file_blocks(path, 1), None, "{path}");
        }
        // What the WAL names is read whatever the file's timestamps say; only its own 1 GiB
        // segment counts, and forks the WAL does not cover are left to the timestamps.
        for path in ["base/5/16384", "base/5/16385.1", "global/1262"] {
            assert!(c.names(path), "{path}");
        }
        for path in [
            "base/5/16385",
            "base/5/16385.2",
            "base/5/16384_fsm",
            "base/5/16386",
            "pg_xact/0000",
        ] {
            assert!(!c.names(path), "{path}");
        }
    }

    #[test]
    fn creation_truncation_and_new_databases_count_as_changed() {
        let mut w = Wal::new(START, 1, None);
        let rel = |r: u32| [DEFAULT_TABLESPACE, 5, r].map(u32::to_le_bytes).concat();
        let mut create = rel(16400);
        create.extend_from_slice(&0u32.to_le_bytes());
        let mut at = w.record(START, RM_SMGR_ID, XLOG_SMGR_CREATE, &main_body(&create));
        let mut truncate = 40u32.to_le_bytes().to_vec();
        truncate.extend_from_slice(&rel(16401));
        truncate.extend_from_slice(&1u32.to_le_bytes());
        at = w.record(at, RM_SMGR_ID, XLOG_SMGR_TRUNCATE, &main_body(&truncate));
        // CREATE DATABASE ... STRATEGY FILE_COPY: db 6 from db 1.
        let copy = [6u32, DEFAULT_TABLESPACE, 1, DEFAULT_TABLESPACE]
            .map(u32::to_le_bytes)
            .concat();
        at = w.record(at, RM_DBASE_ID, 0x00, &main_body(&copy));
        let c = w.scan(START, at).unwrap().changes;
        assert_eq!(c.file_blocks("base/5/16400", 2).unwrap(), vec![true, true]);
        // Truncated at block 40: backup block 2 (blocks 32..48) on.
        assert_eq!(
            c.file_blocks("base/5/16401", 4).unwrap(),
            vec![false, false, true, true]
        );
        assert!(c.file_blocks("base/5/16401.1", 1).unwrap()[0]);
        assert_eq!(c.file_blocks("base/6/16384", 1), None);
        assert_eq!(c.file_blocks("base/5/16384", 1).unwrap(), vec![false]);
        // Created, truncated (in any segment from the limit on), or in a new database: named.
        for path in [
            "base/5/16400",
            "base/5/16401",
            "base/5/16401.3",
            "base/6/16384",
            "base/6/PG_VERSION",
        ] {
            assert!(c.names(path), "{path}");
        }
        assert!(!c.names("base/5/16384"));
    }

    #[test]
    fn records_split_across_pages_and_segments_are_read_whole() {
        let mut w = Wal::new(START, 2, None);
        let mut at = START;
        // Records until well into the second segment; every seventh longer than a page.
        let mut n = 0u32;
        while at < START + SEG + 3 * XLOG_PAGE as u64 {
            let main = if n.is_multiple_of(7) { 9000 } else { 4 };
            at = w.record(
                at,
                10,
                0,
                &body((DEFAULT_TABLESPACE, 5, 16384), &[(0, n)], main),
            );
            n += 1;
        }
        let scan = w.scan(START, at).unwrap();
        assert!(scan.done());
        assert_eq!(scan.changes.records, n as u64);
        // A scan opening in the second segment starts inside a record and skips its tail.
        let second = Wal {
            bytes: w.bytes[SEG as usize..].to_vec(),
            base: START + SEG,
            prev: 0,
        };
        let tail = second.scan(START + SEG, at).unwrap();
        assert!(tail.done());
        assert!(tail.changes.records > 0 && tail.changes.records < n as u64);
    }

    /// Scans each segment of `w` on its own, as `collect` does.
    fn per_segment(w: &Wal, to: u64) -> Vec<RefScan> {
        w.bytes
            .chunks(SEG as usize)
            .enumerate()
            .map(|(i, seg)| {
                let start = w.base + i as u64 * SEG;
                let mut scan = RefScan::new(SYSID, SEG, start, to);
                scan.feed(seg).unwrap();
                scan
            })
            .collect()
    }

    #[test]
    fn segments_scanned_apart_join_into_the_whole_range() {
        let mut w = Wal::new(START, 3, None);
        let mut at = START;
        let mut n = 0u32;
        // Long records, so some cross each segment boundary.
        while at < START + 2 * SEG + 3 * XLOG_PAGE as u64 {
            let main = if n.is_multiple_of(5) { 20_000 } else { 4 };
            at = w.record(
                at,
                10,
                0,
                &body((DEFAULT_TABLESPACE, 5, 16384 + n % 4), &[(0, n)], main),
            );
            n += 1;
        }
        let whole = w.scan(START, at).unwrap().changes;
        assert_eq!(whole.records, n as u64);
        let mut joined = Joined::default();
        for scan in per_segment(&w, at) {
            joined.add(scan).unwrap();
        }
        assert!(joined.done);
        assert_eq!(joined.changes.records, n as u64);
        assert_eq!(joined.changes.chunks, whole.chunks);

        // A segment missing from the middle, or the segments out of order: an error.
        let scans = per_segment(&w, at);
        let mut gap = Joined::default();
        gap.add(scans[0].clone()).unwrap();
        assert!(gap.add(scans[2].clone()).is_err());
        let mut swapped = Joined::default();
        swapped.add(scans[1].clone()).unwrap();
        assert!(swapped.add(scans[0].clone()).is_err());
    }

    #[test]
    fn a_broken_chain_a_bad_crc_or_the_end_of_the_wal_is_an_error() {
        let mut w = Wal::new(START, 1, None);
        let a = w.record(START, 10, 0, &heap_body(16384, &[(0, 1)]));
        let b = w.record(a, 10, 0, &heap_body(16384, &[(0, 2)]));
        assert!(w.scan(START, b).is_ok());
        // The WAL ends before the target.
        let err = w.scan(START, b + 64).unwrap_err();
        assert!(format!("{err:#}").contains("ends at"), "{err:#}");
        // A flipped byte in the second record's data.
        let mut bad = Wal {
            bytes: w.bytes.clone(),
            base: START,
            prev: 0,
        };
        bad.bytes[(a - START) as usize + 30] ^= 1;
        let err = bad.scan(START, b).unwrap_err();
        assert!(format!("{err:#}").contains("CRC"), "{err:#}");
        // A recycled file: pages of another segment.
        let other = Wal::new(START + 5 * SEG, 1, None);
        let err = RefScan::new(SYSID, SEG, START, b)
            .feed(&other.bytes[..XLOG_PAGE])
            .unwrap_err();
        assert!(format!("{err:#}").contains("recycled"), "{err:#}");
        // Another cluster's WAL.
        let err = RefScan::new(SYSID + 1, SEG, START, b)
            .feed(&w.bytes[..XLOG_PAGE])
            .unwrap_err();
        assert!(format!("{err:#}").contains("cluster"), "{err:#}");
    }

    /// Stores `bytes` (whole segments from `START`) in `store` as archived segments.
    async fn archive(store: &crate::storage::LocalStore, bytes: &[u8]) {
        let opts = crate::pipeline::PipeOptions::for_tests();
        for (i, seg) in bytes.chunks(SEG as usize).enumerate() {
            let name = Segment {
                tli: 1,
                segno: START / SEG + i as u64,
            }
            .name(SEG);
            let key = crate::repo::wal_key(SYSID, &name);
            crate::pipeline::upload(store, &key, std::io::Cursor::new(seg.to_vec()), opts)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn archived_segments_are_read_and_a_damaged_record_in_one_is_refused() {
        let mut w = Wal::new(START, 2, None);
        let a = w.record(START, 10, 0, &heap_body(16384, &[(0, 1)]));
        w.record(a, RM_XLOG_ID, XLOG_SWITCH, &[]);
        let b = w.record(START + SEG, 10, 0, &heap_body(16384, &[(0, 20)]));
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("pg_wal")).unwrap();
        let collect = |store| {
            let data = data.clone();
            async move { collect(store, &data, SYSID, 1, SEG, Lsn(START), Lsn(b)).await }
        };

        std::fs::create_dir_all(dir.path().join("good")).unwrap();
        std::fs::create_dir_all(dir.path().join("damaged")).unwrap();
        let good = crate::storage::LocalStore::new(dir.path().join("good"));
        archive(&good, &w.bytes).await;
        let got = collect(&good).await.unwrap();
        assert_eq!((got.local_segments, got.fetched_segments), (0, 2));
        assert_eq!(got.changes.records, 3);
        assert!(got.changes.file_blocks("base/5/16384", 2).unwrap()[1]);

        // A byte of the second segment's record changed before it was archived: the object
        // is whole (its trailer matches), the record's CRC-32C is not.
        let damaged = crate::storage::LocalStore::new(dir.path().join("damaged"));
        let mut bytes = w.bytes.clone();
        bytes[(SEG + 100) as usize] ^= 1;
        archive(&damaged, &bytes).await;
        let err = format!("{:#}", collect(&damaged).await.unwrap_err());
        assert!(
            err.contains("CRC") && err.contains("000000010000000000000004"),
            "{err}"
        );
    }

    #[test]
    fn a_shutdown_checkpoint_is_noticed_when_read_and_when_summarized() {
        let rel = (DEFAULT_TABLESPACE, 5, 16384);
        let mut w = Wal::new(START, 2, None);
        let mut at = w.record(START, 10, 0, &body(rel, &[(0, 1)], 4));
        // A checkpoint record (its body is a CheckPoint; only its type matters here).
        let checkpoint =
            |w: &mut Wal, at, info| w.record(at, RM_XLOG_ID, info, &main_body(&[0u8; 80]));
        at = checkpoint(&mut w, at, 0x10); // XLOG_CHECKPOINT_ONLINE: the server stayed up
        let online = w.scan(START, at).unwrap().changes;
        assert!(!online.shut_down);
        at = checkpoint(&mut w, at, XLOG_CHECKPOINT_SHUTDOWN);
        let mut n = 0;
        while at < START + SEG + 3 * XLOG_PAGE as u64 {
            at = w.record(at, 10, 0, &body(rel, &[(0, n)], 20_000));
            n += 1;
        }
        assert!(w.scan(START, at).unwrap().changes.shut_down);
        let seg = Segment {
            tli: 1,
            segno: START / SEG,
        };
        let whole = &w.bytes[..SEG as usize];
        let summary = summarize(SYSID, SEG, &seg.name(SEG), whole).expect("a whole segment");
        let back = summary.into_scan(SYSID, SEG, seg).unwrap();
        assert!(back.changes.shut_down);
        // A summary written before it was recorded cannot say: it is not used.
        let mut old = summarize(SYSID, SEG, &seg.name(SEG), whole).unwrap();
        old.version = 1;
        assert!(old.into_scan(SYSID, SEG, seg).is_err());
        // Nor is one counting blocks of another size.
        let mut other = summarize(SYSID, SEG, &seg.name(SEG), whole).unwrap();
        other.block_bytes = 2 * BLOCK;
        assert!(other.into_scan(SYSID, SEG, seg).is_err());
    }

    #[tokio::test]
    async fn stored_summaries_stand_in_for_whole_segments_and_a_bad_one_for_nothing() {
        // Three segments; long records cross both boundaries; the range ends in the third.
        let mut w = Wal::new(START, 3, None);
        let mut at = START;
        let mut n = 0u32;
        while at < START + 2 * SEG + 3 * XLOG_PAGE as u64 {
            let main = if n.is_multiple_of(5) { 20_000 } else { 4 };
            let rel = (DEFAULT_TABLESPACE, 5, 16384 + n % 4);
            at = w.record(at, 10, 0, &body(rel, &[(0, n)], main));
            n += 1;
        }
        let whole = w.scan(START, at).unwrap().changes;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("pg_wal")).unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        let store = crate::storage::LocalStore::new(repo.clone());
        archive(&store, &w.bytes).await;
        let opts = crate::pipeline::PipeOptions::for_tests();
        let names: Vec<String> = (0..3)
            .map(|i| {
                Segment {
                    tli: 1,
                    segno: START / SEG + i,
                }
                .name(SEG)
            })
            .collect();
        // The third is not whole (the WAL ends in it): no summary.
        let third = &w.bytes[2 * SEG as usize..];
        assert_eq!(summarize(SYSID, SEG, &names[2], third), None);
        for (name, seg) in names.iter().zip(w.bytes.chunks(SEG as usize)).take(2) {
            let summary = summarize(SYSID, SEG, name, seg).expect("a whole segment");
            // A second store of the same summary (two pushes racing) is no error.
            store_summary(&store, opts, SYSID, &summary).await;
            store_summary(&store, opts, SYSID, &summary).await;
        }
        let collect = || collect(&store, &data, SYSID, 1, SEG, Lsn(START), Lsn(at));

        // The first two segments come from their summaries, the last from the archive.
        let sources = |c: &Collected| (c.local_segments, c.summarized_segments, c.fetched_segments);
        let got = collect().await.unwrap();
        assert_eq!(sources(&got), (0, 2, 1));
        assert_eq!(got.changes.records, whole.records);
        assert_eq!(got.changes.chunks, whole.chunks);

        // A summary that is not that segment's, or not a summary: the segment is read.
        let path = |i: usize| repo.join(crate::repo::walrefs_key(SYSID, &names[i]));
        std::fs::copy(path(0), path(1)).unwrap();
        std::fs::write(path(0), b"not a summary").unwrap();
        let got = collect().await.unwrap();
        assert_eq!(sources(&got), (0, 0, 3));
        assert_eq!(got.changes.chunks, whole.chunks);

        // A summary claiming another chain of records: the join refuses it.
        let mut other = summarize(
            SYSID,
            SEG,
            &names[1],
            &w.bytes[SEG as usize..2 * SEG as usize],
        )
        .unwrap();
        other.first_prev = other.first_prev.map(|p| p + 8);
        std::fs::remove_file(path(1)).unwrap();
        store_summary(&store, opts, SYSID, &other).await;
        let err = format!("{:#}", collect().await.unwrap_err());
        assert!(err.contains("does not follow"), "{err}");
    }

    #[test]
    fn a_switch_record_pads_its_segment() {
        let mut w = Wal::new(START, 2, None);
        let a = w.record(START, 10, 0, &heap_body(16384, &[(0, 1)]));
        w.record(a, RM_XLOG_ID, XLOG_SWITCH, &[]);
        // The padding is not read: PostgreSQL may leave it zeroed, headers and all.
        w.bytes[(SEG / 2) as usize..(SEG / 2) as usize + 200].fill(0);
        let b = w.record(START + SEG, 10, 0, &heap_body(16384, &[(0, 20)]));
        let scan = w.scan(START, b).unwrap();
        assert_eq!(scan.changes.records, 3);
        assert!(scan.changes.file_blocks("base/5/16384", 2).unwrap()[1]);

        // A local segment is read no further than its switch record: the rest is padding.
        let mut scan = RefScan::new(SYSID, SEG, START, b);
        let switch_page = (a - START) as usize / XLOG_PAGE * XLOG_PAGE;
        scan.feed(&w.bytes[..switch_page]).unwrap();
        assert!(!scan.padded_out());
        scan.feed(&w.bytes[switch_page..switch_page + XLOG_PAGE])
            .unwrap();
        assert!(scan.padded_out());
        assert!(!scan.done());
    }
}
