//! Checks that a file PostgreSQL asks `wal-push` to archive is the WAL segment its name says,
//! of this cluster, before anything is stored.
//!
//! Every WAL page opens with a header (access/xlog_internal.h): magic, info flags, timeline,
//! the page's own WAL address; the first page of a segment has the long form, which adds the
//! cluster's system identifier, the segment size and the page size. A recycled file (old
//! content under a new name), a copy under the wrong name or another cluster's segment shows
//! in those headers, and archiving it would poison every restore that replays through it.
//!
//! A complete segment is a run of valid pages, possibly followed by pages whose header is all
//! zeros (PostgreSQL 14+ zeroes what follows a WAL switch). Pages may carry an older
//! timeline than the file name (the start of a new timeline's first segment is copied from
//! the old one), never a newer one, and the timeline never goes down from page to page. A
//! `.partial` file (the old timeline's last segment after a promotion) holds whatever the
//! recycled file held after the switch point, so only its first page is checked.

use crate::repo::wal::{Lsn, Segment};

const XLP_LONG_HEADER: u16 = 0x0002;
const SHORT_HEADER: usize = 24;
const LONG_HEADER: usize = 40;

/// Watches a WAL file's bytes go by and keeps the first problem found.
#[derive(Debug)]
pub struct WalCheck {
    name: String,
    /// The timeline and segment number the file name gives once the segment size is known.
    name_tli: u32,
    sysid: u64,
    first_page_only: bool,
    offset: u64,
    header: Vec<u8>,
    page_size: u64,
    seg_size: u64,
    seg_start: u64,
    magic: u16,
    last_tli: u32,
    zero_tail: bool,
    problem: Option<String>,
}

impl WalCheck {
    /// `name` is the file name (a segment or `<segment>.partial`), `sysid` the cluster's.
    pub fn new(name: &str, sysid: u64) -> WalCheck {
        let first_page_only = name.ends_with(".partial");
        let seg_name = name.strip_suffix(".partial").unwrap_or(name);
        WalCheck {
            name: seg_name.to_string(),
            name_tli: u32::from_str_radix(seg_name.get(0..8).unwrap_or("0"), 16).unwrap_or(0),
            sysid,
            first_page_only,
            offset: 0,
            header: Vec::with_capacity(LONG_HEADER),
            page_size: 0,
            seg_size: 0,
            seg_start: 0,
            magic: 0,
            last_tli: 0,
            zero_tail: false,
            problem: None,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.problem.is_none() {
            if self.first_page_only && self.page_size != 0 && self.offset >= self.page_size {
                self.offset += data.len() as u64; // nothing more to check in this file
                return;
            }
            let in_page = match self.page_size {
                0 => self.offset,
                p => self.offset % p,
            };
            let want = if self.page_size == 0 {
                LONG_HEADER
            } else {
                SHORT_HEADER
            };
            if (in_page as usize) < want && self.header.len() < want {
                let n = (want - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..n]);
                self.offset += n as u64;
                data = &data[n..];
                if self.header.len() == want {
                    self.page_header();
                }
                continue;
            }
            // Pass over the page body up to the next page boundary.
            let left = self.page_size - in_page;
            let n = left.min(data.len() as u64) as usize;
            self.offset += n as u64;
            data = &data[n..];
            if self.offset.is_multiple_of(self.page_size) {
                self.header.clear();
            }
        }
    }

    fn page_header(&mut self) {
        let h = &self.header;
        let magic = u16::from_le_bytes([h[0], h[1]]);
        let info = u16::from_le_bytes([h[2], h[3]]);
        let tli = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let pageaddr = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        if self.page_size == 0 {
            self.first_page(magic, info, tli, pageaddr);
            return;
        }
        let at = self.offset - SHORT_HEADER as u64;
        if h.iter().all(|&b| b == 0) {
            self.zero_tail = true; // the zeroed rest of a segment after a WAL switch
            return;
        }
        if self.zero_tail {
            self.fail(format!(
                "the page at offset {at} holds data after zeroed pages: not a segment PostgreSQL wrote"
            ));
        } else if magic != self.magic {
            self.fail(format!(
                "the page at offset {at} has magic {magic:#06X}, the first page {:#06X}",
                self.magic
            ));
        } else if pageaddr != self.seg_start + at {
            self.fail(format!(
                "the page at offset {at} is for WAL position {}, not {}: a recycled file's old content",
                Lsn(pageaddr),
                Lsn(self.seg_start + at)
            ));
        } else if tli < self.last_tli || tli > self.name_tli {
            self.fail(format!(
                "the page at offset {at} is on timeline {tli} (the previous page on {}, the file name says {})",
                self.last_tli, self.name_tli
            ));
        } else {
            self.last_tli = tli;
        }
    }

    fn first_page(&mut self, magic: u16, info: u16, tli: u32, pageaddr: u64) {
        let h = &self.header;
        let sysid = u64::from_le_bytes(h[24..32].try_into().expect("8 bytes"));
        let seg_size = u32::from_le_bytes(h[32..36].try_into().expect("4 bytes")) as u64;
        let page_size = u32::from_le_bytes(h[36..40].try_into().expect("4 bytes")) as u64;
        // Every PostgreSQL release's XLOG_PAGE_MAGIC is 0xD0xx or 0xD1xx.
        if !(0xD000..=0xD1FF).contains(&magic) || info & XLP_LONG_HEADER == 0 {
            return self.fail(format!(
                "it does not start with a WAL page header (magic {magic:#06X}): not a PostgreSQL WAL segment"
            ));
        }
        let sane = page_size.is_power_of_two()
            && (1024..=65536).contains(&page_size)
            && seg_size.is_power_of_two()
            && ((1 << 20)..=(1 << 30)).contains(&seg_size);
        if !sane {
            return self.fail(format!(
                "its first page header gives a segment size of {seg_size} and a page size of {page_size} bytes: not a PostgreSQL WAL segment"
            ));
        }
        if sysid != self.sysid {
            return self.fail(format!(
                "it belongs to the cluster with system identifier {sysid}, not to this one ({}): a segment copied from another server",
                self.sysid
            ));
        }
        let Some(expected) = Segment::parse(&self.name, seg_size) else {
            return self.fail(format!(
                "its name does not fit its segment size of {} MiB",
                seg_size >> 20
            ));
        };
        let start = expected.start_lsn(seg_size).0;
        if pageaddr != start {
            let actual = Segment::of_lsn(expected.tli, Lsn(pageaddr), seg_size);
            return self.fail(format!(
                "its first page is for WAL position {} (segment {}), not {}: a recycled file's old content, or a copy under the wrong name",
                Lsn(pageaddr),
                actual.name(seg_size),
                Lsn(start)
            ));
        }
        if tli == 0 || tli > self.name_tli {
            return self.fail(format!(
                "its first page is on timeline {tli}, the file name says {}",
                self.name_tli
            ));
        }
        self.magic = magic;
        self.page_size = page_size;
        self.seg_size = seg_size;
        self.seg_start = start;
        self.last_tli = tli;
    }

    fn fail(&mut self, why: String) {
        self.problem = Some(why);
    }

    /// The pages fed so far (the start of the file, a page at least) are this segment's.
    pub fn prefix_verdict(&self) -> anyhow::Result<()> {
        match &self.problem {
            Some(why) => Err(anyhow::anyhow!("{why}")),
            None if self.page_size == 0 => Err(anyhow::anyhow!(
                "it is only {} bytes long: not a PostgreSQL WAL segment",
                self.offset
            )),
            None => Ok(()),
        }
    }

    /// Once the whole file has been fed: Ok, or why it must not be archived.
    pub fn verdict(&self) -> anyhow::Result<()> {
        let problem = match &self.problem {
            Some(p) => Some(p.clone()),
            None if self.page_size == 0 => Some(format!(
                "it is only {} bytes long: not a PostgreSQL WAL segment",
                self.offset
            )),
            None if !self.first_page_only && self.offset != self.seg_size => Some(format!(
                "it is {} bytes long; its header says segments are {} bytes",
                self.offset, self.seg_size
            )),
            None => None,
        };
        match problem {
            None => Ok(()),
            Some(why) => Err(anyhow::anyhow!("refused: {why}; nothing was stored")),
        }
    }
}

/// `wal-push`'s fast path: the first page's long header names segment `name` of cluster
/// `sysid` (magic, timeline, page address, system identifier, sizes) and the file is as long
/// as that header says a segment is. Reads 40 bytes, not the file: enough to tell a recycled
/// file or another cluster's segment from the one the streaming sidecar stored.
pub fn first_page(path: &std::path::Path, name: &str, sysid: u64) -> anyhow::Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut header = [0u8; LONG_HEADER];
    file.read_exact(&mut header)?;
    let len = file.metadata()?.len();
    let mut check = WalCheck::new(name, sysid);
    check.feed(&header);
    if let Some(why) = &check.problem {
        anyhow::bail!("{why}");
    }
    anyhow::ensure!(
        check.page_size != 0 && len == check.seg_size,
        "it is {len} bytes long; its header says segments are {} bytes",
        check.seg_size
    );
    Ok(())
}

impl crate::pipeline::Watch for WalCheck {
    fn watch(&mut self, buf: &[u8]) {
        self.feed(buf);
    }
}

/// Page headers for a synthetic segment, for tests here and in `pg::wal`.
#[cfg(test)]
pub(crate) fn synthetic_segment(name: &str, sysid: u64, seg_size: usize, fill: u8) -> Vec<u8> {
    const PAGE: usize = 8192;
    let seg = Segment::parse(name, seg_size as u64).expect("a segment name");
    let start = seg.start_lsn(seg_size as u64).0;
    let mut out = vec![fill; seg_size];
    for page in 0..seg_size / PAGE {
        let h = &mut out[page * PAGE..];
        h[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        let info: u16 = if page == 0 { XLP_LONG_HEADER } else { 0 };
        h[2..4].copy_from_slice(&info.to_le_bytes());
        h[4..8].copy_from_slice(&seg.tli.to_le_bytes());
        h[8..16].copy_from_slice(&(start + (page * PAGE) as u64).to_le_bytes());
        h[16..24].fill(0);
        if page == 0 {
            h[24..32].copy_from_slice(&sysid.to_le_bytes());
            h[32..36].copy_from_slice(&(seg_size as u32).to_le_bytes());
            h[36..40].copy_from_slice(&(PAGE as u32).to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: usize = 1 << 20;
    const NAME: &str = "000000020000000000000003";
    const SYSID: u64 = 7_000_000_000_000_000_001;

    fn check(name: &str, bytes: &[u8], chunk: usize) -> anyhow::Result<()> {
        let mut c = WalCheck::new(name, SYSID);
        for piece in bytes.chunks(chunk) {
            c.feed(piece);
        }
        c.verdict()
    }

    fn refused(name: &str, bytes: &[u8], needle: &str) {
        for chunk in [1, 7, 8192, 1 << 20] {
            let err = check(name, bytes, chunk).unwrap_err().to_string();
            assert!(err.contains(needle), "chunk {chunk}: {err}");
            assert!(err.starts_with("refused: "), "{err}");
        }
    }

    #[test]
    fn a_segment_of_this_cluster_passes_in_any_chunking() {
        let seg = synthetic_segment(NAME, SYSID, SEG, 0x5A);
        for chunk in [1, 7, 24, 40, 8192, 100_000, SEG] {
            check(NAME, &seg, chunk).unwrap();
        }
        // Zeroed pages after a WAL switch, and pages copied from the parent timeline.
        let mut switched = seg.clone();
        switched[SEG / 2..].fill(0);
        check(NAME, &switched, 4096).unwrap();
        let mut branched = seg.clone();
        for page in 0..4 {
            branched[page * 8192 + 4..page * 8192 + 8].copy_from_slice(&1u32.to_le_bytes());
        }
        check(NAME, &branched, 4096).unwrap();
    }

    #[test]
    fn the_first_page_check_reads_the_header_and_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let write = |bytes: &[u8]| {
            let path = dir.path().join(NAME);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let good = synthetic_segment(NAME, SYSID, SEG, 1);
        first_page(&write(&good), NAME, SYSID).unwrap();
        let recycled = synthetic_segment("000000020000000000000001", SYSID, SEG, 1);
        let err = first_page(&write(&recycled), NAME, SYSID).unwrap_err();
        assert!(err.to_string().contains("recycled"), "{err}");
        let err = first_page(&write(&good), NAME, 42).unwrap_err();
        assert!(err.to_string().contains("system identifier"), "{err}");
        let err = first_page(&write(&good[..SEG / 2]), NAME, SYSID).unwrap_err();
        assert!(err.to_string().contains("bytes long"), "{err}");
        assert!(first_page(&write(&good[..20]), NAME, SYSID).is_err());
    }

    #[test]
    fn recycled_misnamed_and_foreign_segments_are_refused() {
        // The old content of a recycled file: every page is for segment 1.
        let old = synthetic_segment("000000020000000000000001", SYSID, SEG, 1);
        refused(NAME, &old, "segment 000000020000000000000001");
        // Recycled after its first pages were rewritten.
        let mut half = synthetic_segment(NAME, SYSID, SEG, 1);
        half[SEG / 2..].copy_from_slice(&old[SEG / 2..]);
        refused(NAME, &half, "a recycled file's old content");
        // Another cluster's segment.
        let foreign = synthetic_segment(NAME, 42, SEG, 1);
        refused(NAME, &foreign, "system identifier 42");
        // A newer timeline's segment under an older timeline's name.
        let newer = synthetic_segment("000000030000000000000003", SYSID, SEG, 1);
        refused(NAME, &newer, "timeline 3");
        // Not WAL at all, and a truncated segment.
        refused(NAME, &vec![7u8; SEG], "not a PostgreSQL WAL segment");
        refused(NAME, &[], "only 0 bytes long");
        let seg = synthetic_segment(NAME, SYSID, SEG, 1);
        refused(NAME, &seg[..SEG - 8192], "bytes long; its header says");
        // Data after zeroed pages.
        let mut odd = seg.clone();
        odd[8192..16384].fill(0);
        refused(NAME, &odd, "after zeroed pages");
    }

    #[test]
    fn a_partial_file_is_checked_on_its_first_page() {
        let name = format!("{NAME}.partial");
        let mut seg = synthetic_segment(NAME, SYSID, SEG, 1);
        let old = synthetic_segment("000000020000000000000001", SYSID, SEG, 1);
        seg[SEG / 2..].copy_from_slice(&old[SEG / 2..]);
        check(&name, &seg, 8192).unwrap();
        refused(&name, &old, "segment 000000020000000000000001");
    }
}
