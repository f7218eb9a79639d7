//! Reads the transaction times out of a WAL segment as it streams past.
//!
//! PostgreSQL ends a time-targeted recovery at the first commit or abort record stamped after
//! the target; when the archived WAL holds none it refuses to start ("recovery ended before
//! configured recovery target was reached"). So an archive can be restored to any instant
//! before its last transaction record, not up to the upload time of its last segment, and
//! `wal-push` records that time in each segment's trailer for `list` and `restore` to use.
//!
//! Layout (access/xlog_internal.h, access/xlogrecord.h): a segment is a run of pages, each
//! opening with a page header (40 bytes on a segment's first page, 24 after); records are laid
//! end to end across page boundaries, each on an 8-byte boundary, each opening with a 24-byte
//! `XLogRecord` header. The scanner follows that chain and stops, without error, where it
//! cannot trust it: a page whose address is not the expected one (a recycled file's old
//! content), a zero length, a record whose `xl_prev` is not the record before it, or the
//! segment switch record. What it cannot read simply yields no time.

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const SHORT_PAGE_HEADER: usize = 24;
const LONG_PAGE_HEADER: usize = 40;
const RECORD_HEADER: usize = 24;
const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
/// Block ids that precede a record's main data (`XLR_BLOCK_ID_*`).
const BLOCK_ID_DATA_SHORT: u8 = 255;
const BLOCK_ID_DATA_LONG: u8 = 254;
const BLOCK_ID_ORIGIN: u8 = 253;
const BLOCK_ID_TOPLEVEL_XID: u8 = 252;
/// Enough of a transaction record for its timestamp: header, origin, top-level xid, main data
/// header, `xact_time`.
const XACT_PREFIX: usize = RECORD_HEADER + 3 + 5 + 5 + 8;
/// 2000-01-01 (PostgreSQL's epoch) in microseconds since the Unix epoch.
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Watches the bytes of one WAL segment, in order, and keeps the time of the last commit or
/// abort record in it.
#[derive(Debug, Default)]
pub struct WalScan {
    /// Bytes of the segment seen so far.
    offset: u64,
    /// LSN of the segment's first byte, from the first page header.
    seg_start: u64,
    seg_size: u64,
    page_size: u64,
    /// The current page header, while it is being read.
    page_header: Vec<u8>,
    header_len: usize,
    /// Bytes still to pass over: the rest of the current record.
    skip: u64,
    /// The opening bytes of the current record.
    record: Vec<u8>,
    record_start: u64,
    prev_record: Option<u64>,
    /// Where the record being passed over began (unknown for the tail of a record begun in
    /// the previous segment).
    skipped_start: Option<u64>,
    /// Records starting at or after this LSN are not read (`until`).
    limit: Option<u64>,
    done: bool,
    /// Commit/abort records seen.
    pub transactions: u64,
    /// Microseconds since the Unix epoch of the last commit or abort record.
    pub last_xact_micros: Option<i64>,
    /// Where the last record that ends inside the segment ends, as PostgreSQL reports the end
    /// of a replayed record (`pg_last_wal_replay_lsn()`): 8-byte aligned, and the segment's end
    /// after a switch record. A record running on into the next segment is not counted.
    pub end_lsn: Option<u64>,
    /// Where the record that ends at `end_lsn` begins: a recovery that must reach `end_lsn`
    /// targets it (`recovery_target_lsn`, inclusive). Unknown when that record began in the
    /// previous segment.
    pub last_start: Option<u64>,
}

impl WalScan {
    pub fn new() -> WalScan {
        WalScan {
            header_len: SHORT_PAGE_HEADER,
            ..Default::default()
        }
    }

    /// A scan that reads no record starting at or after `lsn` (where a timeline left the
    /// path: what follows in this copy is not on it).
    pub fn until(mut self, lsn: u64) -> WalScan {
        self.limit = Some(lsn);
        self
    }

    /// The time of the last transaction record, as a timestamp.
    pub fn last_xact_time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.last_xact_micros
            .and_then(chrono::DateTime::from_timestamp_micros)
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.done {
            if self.page_header.len() < self.header_len || self.in_page() == 0 {
                // Page header bytes.
                let n = (self.header_len - self.page_header.len()).min(data.len());
                self.page_header.extend_from_slice(&data[..n]);
                self.offset += n as u64;
                data = &data[n..];
                if self.page_header.len() == self.header_len {
                    self.page_header_read();
                }
                continue;
            }
            let left_in_page = self.page_size - self.in_page();
            let n = (left_in_page.min(data.len() as u64)) as usize;
            let lsn = self.seg_start + self.offset;
            self.records(lsn, &data[..n]);
            self.offset += n as u64;
            data = &data[n..];
            if self.in_page() == 0 {
                self.page_header.clear();
                self.header_len = SHORT_PAGE_HEADER;
                if self.offset >= self.seg_size {
                    self.done = true;
                }
            }
        }
    }

    /// Position inside the current page (0 at a page boundary). Before the first page
    /// header is read the page size is unknown and the position is the offset.
    fn in_page(&self) -> u64 {
        match self.page_size {
            0 => self.offset,
            p => self.offset % p,
        }
    }

    fn page_header_read(&mut self) {
        let h = &self.page_header;
        let info = u16::from_le_bytes([h[2], h[3]]);
        let pageaddr = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let rem_len = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
        if info & XLP_LONG_HEADER != 0 && self.header_len == SHORT_PAGE_HEADER {
            self.header_len = LONG_PAGE_HEADER;
            return;
        }
        let first = self.page_size == 0;
        if first {
            if self.header_len != LONG_PAGE_HEADER {
                self.done = true;
                return;
            }
            let seg_size = u32::from_le_bytes(h[32..36].try_into().expect("4 bytes")) as u64;
            let page_size = u32::from_le_bytes(h[36..40].try_into().expect("4 bytes")) as u64;
            let sane = page_size.is_power_of_two()
                && (1024..=65536).contains(&page_size)
                && seg_size.is_power_of_two()
                && seg_size >= page_size
                && pageaddr.is_multiple_of(seg_size);
            if !sane {
                self.done = true;
                return;
            }
            self.seg_size = seg_size;
            self.page_size = page_size;
            self.seg_start = pageaddr;
            if info & XLP_FIRST_IS_CONTRECORD != 0 {
                // The tail of a record that began in the previous segment.
                self.skip = rem_len as u64;
                self.skipped_start = None;
            }
        } else if pageaddr != self.seg_start + self.offset - self.header_len as u64 {
            // Not this segment's page: the old content of a recycled file.
            self.done = true;
        }
    }

    /// Record bytes of one page, starting at `lsn`.
    fn records(&mut self, mut lsn: u64, mut data: &[u8]) {
        while !data.is_empty() && !self.done {
            let n = if self.skip > 0 {
                self.skip.min(data.len() as u64) as usize
            } else if self.record.is_empty() && !lsn.is_multiple_of(8) {
                ((8 - lsn % 8) as usize).min(data.len())
            } else {
                if self.record.is_empty() {
                    if self.limit.is_some_and(|l| lsn >= l) {
                        self.done = true;
                        return;
                    }
                    self.record_start = lsn;
                }
                let want = self.wanted();
                let n = (want - self.record.len()).min(data.len());
                self.record.extend_from_slice(&data[..n]);
                if self.record.len() == want {
                    self.record_read();
                    if self.record.is_empty() && self.skip == 0 && !self.done {
                        self.end_lsn = Some(maxalign(lsn + n as u64));
                        self.last_start = Some(self.record_start);
                    }
                }
                lsn += n as u64;
                data = &data[n..];
                continue;
            };
            let skipping = self.skip > 0;
            self.skip = self.skip.saturating_sub(n as u64);
            if skipping && self.skip == 0 {
                self.end_lsn = Some(maxalign(lsn + n as u64)); // the rest of a record
                self.last_start = self.skipped_start;
            }
            lsn += n as u64;
            data = &data[n..];
        }
    }

    fn tot_len(&self) -> u64 {
        u32::from_le_bytes(self.record[0..4].try_into().expect("4 bytes")) as u64
    }

    fn is_xact_end(&self) -> bool {
        let (info, rmid) = (self.record[16], self.record[17]);
        rmid == RM_XACT_ID
            && matches!(
                info & XLOG_XACT_OPMASK,
                XLOG_XACT_COMMIT
                    | XLOG_XACT_ABORT
                    | XLOG_XACT_COMMIT_PREPARED
                    | XLOG_XACT_ABORT_PREPARED
            )
    }

    /// How many opening bytes of the current record to read.
    fn wanted(&self) -> usize {
        if self.record.len() < RECORD_HEADER {
            return RECORD_HEADER;
        }
        if self.is_xact_end() {
            XACT_PREFIX.min(self.tot_len() as usize).max(RECORD_HEADER)
        } else {
            RECORD_HEADER
        }
    }

    fn record_read(&mut self) {
        let tot_len = self.tot_len();
        if self.record.len() == RECORD_HEADER {
            let prev = u64::from_le_bytes(self.record[8..16].try_into().expect("8 bytes"));
            let linked = self.prev_record.is_none_or(|p| p == prev);
            if tot_len < RECORD_HEADER as u64 || !linked {
                self.done = true; // the end of the written WAL, or not a record
                return;
            }
            self.prev_record = Some(self.record_start);
            if self.wanted() > RECORD_HEADER {
                return; // read on: a transaction record's timestamp follows
            }
        }
        if self.is_xact_end()
            && let Some(t) = xact_time(&self.record)
        {
            self.transactions += 1;
            self.last_xact_micros = Some(t);
        }
        let (info, rmid) = (self.record[16], self.record[17]);
        self.skip = tot_len - self.record.len() as u64;
        self.skipped_start = Some(self.record_start);
        self.record.clear();
        if rmid == RM_XLOG_ID && info & 0xF0 == XLOG_SWITCH {
            self.done = true; // the rest of the segment is padding
            self.end_lsn = Some(self.seg_start + self.seg_size);
            self.last_start = Some(self.record_start);
        }
    }
}

impl crate::pipeline::Watch for WalScan {
    fn watch(&mut self, buf: &[u8]) {
        self.feed(buf);
    }
}

/// A segment downloaded only to be scanned.
impl std::io::Write for WalScan {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn maxalign(lsn: u64) -> u64 {
    lsn.next_multiple_of(8)
}

/// `xact_time` of a commit/abort record: the first field of its main data, which follows the
/// optional origin and top-level xid headers (transaction records reference no blocks).
fn xact_time(record: &[u8]) -> Option<i64> {
    let mut p = RECORD_HEADER;
    loop {
        match *record.get(p)? {
            BLOCK_ID_ORIGIN => p += 3,
            BLOCK_ID_TOPLEVEL_XID => p += 5,
            BLOCK_ID_DATA_SHORT => break p += 2,
            BLOCK_ID_DATA_LONG => break p += 5,
            _ => return None,
        }
    }
    let ts = i64::from_le_bytes(record.get(p..p + 8)?.try_into().ok()?);
    Some(ts + PG_EPOCH_UNIX_MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 8192;
    const SEG: usize = 16 * 1024 * 1024;
    /// LSN of segment 000000010000000000000003.
    const START: u64 = 3 * SEG as u64;

    /// Writes WAL the way PostgreSQL lays it out, so records can cross page boundaries.
    struct Builder {
        seg: Vec<u8>,
        /// Write position (offset in the segment).
        pos: usize,
        prev: u64,
    }

    impl Builder {
        fn new(cont: Option<u32>) -> Builder {
            let mut seg = vec![0u8; SEG];
            for page in 0..SEG / PAGE {
                let h = &mut seg[page * PAGE..];
                h[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
                let mut info = if page == 0 { XLP_LONG_HEADER } else { 0 };
                if let (0, Some(n)) = (page, cont) {
                    info |= XLP_FIRST_IS_CONTRECORD;
                    h[16..20].copy_from_slice(&n.to_le_bytes());
                }
                h[2..4].copy_from_slice(&info.to_le_bytes());
                h[4..8].copy_from_slice(&1u32.to_le_bytes());
                h[8..16].copy_from_slice(&(START + (page * PAGE) as u64).to_le_bytes());
                if page == 0 {
                    h[32..36].copy_from_slice(&(SEG as u32).to_le_bytes());
                    h[36..40].copy_from_slice(&(PAGE as u32).to_le_bytes());
                }
            }
            let mut b = Builder {
                seg,
                pos: LONG_PAGE_HEADER,
                prev: 0,
            };
            if let Some(n) = cont {
                b.put(&vec![0xAB; n as usize]);
            }
            b
        }

        /// Writes bytes into the usable space, skipping page headers.
        fn put(&mut self, mut bytes: &[u8]) {
            while !bytes.is_empty() {
                if self.pos.is_multiple_of(PAGE) {
                    self.pos += SHORT_PAGE_HEADER;
                }
                let room = PAGE - self.pos % PAGE;
                let n = room.min(bytes.len());
                self.seg[self.pos..self.pos + n].copy_from_slice(&bytes[..n]);
                self.pos += n;
                bytes = &bytes[n..];
            }
        }

        fn record(&mut self, rmid: u8, info: u8, body: &[u8]) -> u64 {
            self.pos = self.pos.next_multiple_of(8);
            if self.pos.is_multiple_of(PAGE) {
                self.pos += SHORT_PAGE_HEADER;
            }
            let start = START + self.pos as u64;
            let mut rec = Vec::new();
            rec.extend_from_slice(&((RECORD_HEADER + body.len()) as u32).to_le_bytes());
            rec.extend_from_slice(&7u32.to_le_bytes());
            rec.extend_from_slice(&self.prev.to_le_bytes());
            rec.extend_from_slice(&[info, rmid, 0, 0, 0, 0, 0, 0]);
            rec.extend_from_slice(body);
            self.put(&rec);
            self.prev = start;
            start
        }

        fn commit(&mut self, unix_micros: i64, toplevel: bool) {
            let mut body = Vec::new();
            if toplevel {
                body.extend_from_slice(&[BLOCK_ID_TOPLEVEL_XID, 1, 2, 3, 4]);
            }
            body.extend_from_slice(&[BLOCK_ID_DATA_SHORT, 16]);
            body.extend_from_slice(&(unix_micros - PG_EPOCH_UNIX_MICROS).to_le_bytes());
            body.extend_from_slice(&[0; 8]);
            self.record(RM_XACT_ID, XLOG_XACT_COMMIT | 0x80, &body);
        }

        fn heap(&mut self, len: usize) {
            self.record(10, 0, &vec![0x5A; len]);
        }
    }

    fn scan(seg: &[u8], chunk: usize) -> WalScan {
        let mut s = WalScan::new();
        for c in seg.chunks(chunk) {
            s.feed(c);
        }
        s
    }

    #[test]
    fn finds_the_last_commit_across_pages_and_chunk_sizes() {
        let mut b = Builder::new(None);
        b.commit(1_000_000, false);
        b.heap(20_000); // spans pages
        b.commit(2_000_000, true);
        // A commit whose header straddles a page boundary.
        b.heap(PAGE - (b.pos % PAGE) - 40);
        b.commit(3_000_000, false);
        b.heap(100);
        for chunk in [1, 7, 8192, 1 << 20, SEG] {
            let s = scan(&b.seg, chunk);
            assert_eq!(s.transactions, 3, "chunk {chunk}");
            assert_eq!(s.last_xact_micros, Some(3_000_000), "chunk {chunk}");
        }
    }

    #[test]
    fn a_continued_record_at_the_start_is_passed_over() {
        let mut b = Builder::new(Some(10_000));
        b.commit(5_000_000, false);
        let s = scan(&b.seg, 4096);
        assert_eq!(s.last_xact_micros, Some(5_000_000));
    }

    #[test]
    fn stops_at_the_switch_and_at_stale_content() {
        let mut b = Builder::new(None);
        b.commit(1_000_000, false);
        b.record(RM_XLOG_ID, XLOG_SWITCH, &[]);
        b.commit(9_000_000, false); // after the switch: not WAL
        assert_eq!(scan(&b.seg, 65536).last_xact_micros, Some(1_000_000));

        // A record whose xl_prev does not link back is a recycled file's old content.
        let mut b = Builder::new(None);
        b.commit(1_000_000, false);
        b.prev = 12345;
        b.commit(9_000_000, false);
        assert_eq!(scan(&b.seg, 65536).last_xact_micros, Some(1_000_000));

        // So is a page with another address.
        let mut b = Builder::new(None);
        b.commit(1_000_000, false);
        b.seg[PAGE + 8..PAGE + 16].copy_from_slice(&0u64.to_le_bytes());
        b.heap(PAGE);
        b.commit(9_000_000, false);
        assert_eq!(scan(&b.seg, 65536).last_xact_micros, Some(1_000_000));
    }

    /// Where the Builder's last record ended, as PostgreSQL reports a replayed record's end.
    fn written_end(b: &Builder) -> Option<u64> {
        Some(START + b.pos.next_multiple_of(8) as u64)
    }

    #[test]
    fn the_end_of_the_last_whole_record_is_where_replay_can_reach() {
        let mut b = Builder::new(None);
        b.commit(1_000_000, false);
        b.heap(20_000); // spans pages
        b.commit(2_000_000, false);
        b.heap(13); // ends off an 8-byte boundary
        let end = written_end(&b);
        for chunk in [1, 7, 8192, SEG] {
            assert_eq!(scan(&b.seg, chunk).end_lsn, end, "chunk {chunk}");
        }

        // A record that runs on into the next segment cannot be replayed from this one.
        let start = b.record(10, 0, &[0x5A; 64]) - START;
        let at = start as usize;
        b.seg[at..at + 4].copy_from_slice(&(40u32 << 20).to_le_bytes());
        assert_eq!(scan(&b.seg, 65536).end_lsn, end);

        // A record ending exactly at a page boundary ends there.
        let mut b = Builder::new(None);
        b.commit(1_000_000, false);
        let room = PAGE - b.pos.next_multiple_of(8) % PAGE;
        b.heap(room - RECORD_HEADER);
        assert_eq!(b.pos % PAGE, 0);
        assert_eq!(scan(&b.seg, 4096).end_lsn, Some(START + PAGE as u64));
    }

    #[test]
    fn a_switch_ends_at_the_segment_end_and_a_continued_record_counts() {
        let mut b = Builder::new(None);
        b.commit(1_000_000, false);
        b.record(RM_XLOG_ID, XLOG_SWITCH, &[]);
        b.commit(9_000_000, false);
        assert_eq!(scan(&b.seg, 65536).end_lsn, Some(START + SEG as u64));

        // Only the tail of a record begun in the previous segment.
        let b = Builder::new(Some(10_003));
        assert_eq!(scan(&b.seg, 4096).end_lsn, written_end(&b));
        let mut b = Builder::new(Some(100));
        b.commit(5_000_000, false);
        assert_eq!(scan(&b.seg, 4096).end_lsn, written_end(&b));

        assert_eq!(scan(&[0u8; 100_000], 4096).end_lsn, None);
        assert_eq!(scan(b"not wal", 3).end_lsn, None);
    }

    #[test]
    fn the_last_record_starts_where_a_recovery_must_stop_after_it() {
        let mut b = Builder::new(None);
        b.commit(1_000_000, false);
        let spanning = b.record(10, 0, &[0x5A; 20_000]);
        for chunk in [1, 7, 8192, SEG] {
            assert_eq!(
                scan(&b.seg, chunk).last_start,
                Some(spanning),
                "chunk {chunk}"
            );
        }
        let last = b.record(10, 0, &[0x5A; 13]);
        assert_eq!(scan(&b.seg, 4096).last_start, Some(last));
        let switch = b.record(RM_XLOG_ID, XLOG_SWITCH, &[]);
        assert_eq!(scan(&b.seg, 4096).last_start, Some(switch));

        // Read only up to where a timeline left the path: the record before it is the last.
        let s = {
            let mut s = WalScan::new().until(last);
            s.feed(&b.seg);
            s
        };
        assert_eq!((s.last_start, s.end_lsn), (Some(spanning), Some(last)));

        // Only the tail of a record begun in the previous segment: its start is not here.
        let b = Builder::new(Some(10_003));
        let s = scan(&b.seg, 4096);
        assert_eq!((s.last_start, s.end_lsn), (None, written_end(&b)));
    }

    #[test]
    fn garbage_yields_nothing() {
        assert_eq!(scan(&[0u8; 100_000], 4096).last_xact_micros, None);
        assert_eq!(scan(&[0xFFu8; 100_000], 4096).last_xact_micros, None);
        assert_eq!(scan(b"not wal", 3).last_xact_micros, None);
    }
}
