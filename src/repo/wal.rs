//! WAL file names, LSNs and timeline history files.

use std::fmt;
use std::str::FromStr;

pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

/// A log sequence number, shown the way PostgreSQL shows it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| format!("bad LSN {s:?}"))?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| format!("bad LSN {s:?}"))?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| format!("bad LSN {s:?}"))?;
        if hi > 0xFFFF_FFFF || lo > 0xFFFF_FFFF {
            return Err(format!("bad LSN {s:?}"));
        }
        Ok(Lsn(hi << 32 | lo))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A WAL segment: timeline and segment number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Segment {
    pub tli: u32,
    pub segno: u64,
}

impl Segment {
    pub fn of_lsn(tli: u32, lsn: Lsn, seg_size: u64) -> Segment {
        Segment {
            tli,
            segno: lsn.0 / seg_size,
        }
    }

    pub fn name(&self, seg_size: u64) -> String {
        let per_id = 0x1_0000_0000u64 / seg_size;
        format!(
            "{:08X}{:08X}{:08X}",
            self.tli,
            self.segno / per_id,
            self.segno % per_id
        )
    }

    pub fn parse(name: &str, seg_size: u64) -> Option<Segment> {
        if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
        let log = u64::from_str_radix(&name[8..16], 16).ok()?;
        let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
        let per_id = 0x1_0000_0000u64 / seg_size;
        if seg >= per_id {
            return None;
        }
        Some(Segment {
            tli,
            segno: log * per_id + seg,
        })
    }

    /// The first LSN in this segment.
    pub fn start_lsn(&self, seg_size: u64) -> Lsn {
        Lsn(self.segno * seg_size)
    }
}

/// The kinds of file PostgreSQL archives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalFile {
    Segment(String),
    History(u32),
    /// `<segment>.<offset>.backup`: the backup history file written at backup stop.
    BackupHistory(String),
    /// `<segment>.partial`: the last, incomplete segment of an old timeline after promotion.
    Partial(String),
}

impl WalFile {
    pub fn classify(name: &str) -> Option<WalFile> {
        let is_seg = |s: &str| s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if is_seg(name) {
            return Some(WalFile::Segment(name.to_string()));
        }
        if let Some(tli) = name.strip_suffix(".history") {
            if tli.len() == 8 && tli.bytes().all(|b| b.is_ascii_hexdigit()) {
                return u32::from_str_radix(tli, 16).ok().map(WalFile::History);
            }
        }
        if let Some(seg) = name.strip_suffix(".partial") {
            if is_seg(seg) {
                return Some(WalFile::Partial(name.to_string()));
            }
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            if let Some((seg, off)) = rest.split_once('.') {
                if is_seg(seg) && off.len() == 8 && off.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Some(WalFile::BackupHistory(name.to_string()));
                }
            }
        }
        None
    }
}

/// A streamed piece of a segment (`serve` with `serve.wal_stream`): bytes `[start, end)` of
/// `segment`, stored as `<segment>.<start>-<end>.part` (offsets in 8 hex digits). Pieces of a
/// segment are contiguous from offset 0; a complete segment under the plain name supersedes
/// them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Piece {
    pub segment: String,
    pub start: u64,
    pub end: u64,
}

impl Piece {
    pub fn name(&self) -> String {
        format!("{}.{:08X}-{:08X}.part", self.segment, self.start, self.end)
    }

    pub fn parse(name: &str) -> Option<Piece> {
        let rest = name.strip_suffix(".part")?;
        let (segment, range) = rest.split_once('.')?;
        let (start, end) = range.split_once('-')?;
        let hex8 = |s: &str| {
            (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u64::from_str_radix(s, 16).ok())
                .flatten()
        };
        let (start, end) = (hex8(start)?, hex8(end)?);
        let is_seg = segment.len() == 24 && segment.bytes().all(|b| b.is_ascii_hexdigit());
        (is_seg && start < end).then(|| Piece {
            segment: segment.to_string(),
            start,
            end,
        })
    }
}

/// The pieces that make one segment's contiguous run from offset 0, in order, and the offset
/// where the run ends: the furthest any chain of pieces reaches, with the fewest pieces. Two
/// writers (the primary's sidecar and a standby's) store pieces with boundaries of their own,
/// and following the longest piece at each offset could end where one of them stopped while
/// the other's pieces went on.
pub fn contiguous(pieces: &[Piece]) -> (Vec<Piece>, u64) {
    let mut sorted: Vec<&Piece> = pieces.iter().collect();
    sorted.sort_by_key(|p| (p.start, p.end));
    // Each reachable offset: the fewest pieces that reach it, and the last of them. A piece
    // ends after it starts, so every way to reach its start is known when it comes up.
    let mut reach: std::collections::BTreeMap<u64, (usize, Option<usize>)> =
        std::collections::BTreeMap::from([(0, (0, None))]);
    for (i, p) in sorted.iter().enumerate() {
        let Some(&(count, _)) = reach.get(&p.start) else {
            continue;
        };
        let better = reach.get(&p.end).is_none_or(|&(c, _)| count + 1 < c);
        if better {
            reach.insert(p.end, (count + 1, Some(i)));
        }
    }
    let (&end, &(_, mut last)) = reach.iter().next_back().expect("offset 0");
    let mut run = Vec::new();
    while let Some(i) = last {
        run.push(sorted[i].clone());
        last = reach[&sorted[i].start].1;
    }
    run.reverse();
    (run, end)
}

pub fn history_name(tli: u32) -> String {
    format!("{tli:08X}.history")
}

/// One line of a timeline history file: `parent_tli  switchpoint  reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    pub tli: u32,
    /// The LSN where the next timeline branched off this one.
    pub switchpoint: Lsn,
}

pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let tli = parts
            .next()
            .and_then(|t| t.parse::<u32>().ok())
            .ok_or_else(|| format!("bad history line {line:?}"))?;
        let switchpoint = parts
            .next()
            .ok_or_else(|| format!("bad history line {line:?}"))?
            .parse::<Lsn>()?;
        out.push(HistoryEntry { tli, switchpoint });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
    }

    #[test]
    fn segment_names() {
        let s = Segment::parse("000000010000000A000000FF", DEFAULT_SEGMENT_SIZE).unwrap();
        assert_eq!(s.tli, 1);
        assert_eq!(s.segno, 0xA * 256 + 0xFF);
        assert_eq!(s.name(DEFAULT_SEGMENT_SIZE), "000000010000000A000000FF");
        let next = Segment {
            segno: s.segno + 1,
            ..s
        };
        assert_eq!(next.name(DEFAULT_SEGMENT_SIZE), "000000010000000B00000000");
        assert!(Segment::parse("000000010000000A00000100", DEFAULT_SEGMENT_SIZE).is_none());
        let lsn: Lsn = "0/3000028".parse().unwrap();
        assert_eq!(
            Segment::of_lsn(1, lsn, DEFAULT_SEGMENT_SIZE).name(DEFAULT_SEGMENT_SIZE),
            "000000010000000000000003"
        );
        // 1 GiB segments: 4 per xlogid.
        let s = Segment::parse("000000020000000100000003", 1 << 30).unwrap();
        assert_eq!(s.segno, 7);
    }

    #[test]
    fn classify_files() {
        assert!(matches!(
            WalFile::classify("000000010000000000000003"),
            Some(WalFile::Segment(_))
        ));
        assert_eq!(
            WalFile::classify("00000002.history"),
            Some(WalFile::History(2))
        );
        assert!(matches!(
            WalFile::classify("000000010000000000000002.00000028.backup"),
            Some(WalFile::BackupHistory(_))
        ));
        assert!(matches!(
            WalFile::classify("000000010000000000000003.partial"),
            Some(WalFile::Partial(_))
        ));
        assert_eq!(WalFile::classify("RECOVERYXLOG"), None);
        assert_eq!(WalFile::classify("../../etc/passwd"), None);
    }

    #[test]
    fn pieces_name_their_segment_and_range() {
        let p = Piece {
            segment: "000000010000000000000003".into(),
            start: 0,
            end: 0x2000,
        };
        assert_eq!(p.name(), "000000010000000000000003.00000000-00002000.part");
        assert_eq!(Piece::parse(&p.name()), Some(p.clone()));
        assert_eq!(
            Piece::parse("000000010000000000000003.00002000-00002000.part"),
            None
        );
        assert_eq!(Piece::parse("000000010000000000000003.partial"), None);
        assert_eq!(WalFile::classify(&p.name()), None);
        let q = Piece {
            start: 0x2000,
            end: 0x5000,
            ..p.clone()
        };
        let far = Piece {
            start: 0x6000,
            end: 0x7000,
            ..p.clone()
        };
        let (run, end) = contiguous(&[far, q.clone(), p.clone()]);
        assert_eq!(run, vec![p, q]);
        assert_eq!(end, 0x5000);
        assert_eq!(contiguous(&[]).1, 0);
    }

    #[test]
    fn the_run_reaches_as_far_as_any_writers_pieces_do() {
        // Two sidecars (the primary's and a standby's) store pieces of one segment with
        // boundaries of their own; the standby's stopped at 200, the primary's went on to 500.
        let piece = |start, end| Piece {
            segment: "000000010000000000000003".into(),
            start,
            end,
        };
        let (run, end) = contiguous(&[
            piece(0, 100),
            piece(100, 500),
            piece(0, 120),
            piece(120, 200),
        ]);
        assert_eq!(end, 500);
        assert_eq!(run, vec![piece(0, 100), piece(100, 500)]);
        // Where two runs reach as far, the one of fewer pieces.
        let (run, end) = contiguous(&[piece(0, 10), piece(10, 20), piece(0, 20), piece(20, 30)]);
        assert_eq!((run, end), (vec![piece(0, 20), piece(20, 30)], 30));
    }

    #[test]
    fn history_file() {
        let h = parse_history(
            "1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tat restore point\n",
        )
        .unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1].tli, 2);
        assert_eq!(h[1].switchpoint, "0/5000000".parse().unwrap());
    }
}
