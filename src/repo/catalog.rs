//! What the repository holds for one PostgreSQL cluster, read from a listing, and the pure
//! questions asked of it: how far can a backup's WAL chain reach, what window is restorable.

use std::collections::BTreeMap;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::manifest::BaseBackup;
use super::wal::{DEFAULT_SEGMENT_SIZE, HistoryEntry, Lsn, Segment, WalFile, parse_history};
use crate::storage::{ObjectInfo, Store};

#[derive(Debug, Clone, Default)]
pub struct PgCatalog {
    pub system_identifier: u64,
    pub seg_size: u64,
    /// Complete backups (those with a manifest), oldest `stop_time` first.
    pub backups: Vec<BaseBackup>,
    pub segments: BTreeMap<Segment, ObjectInfo>,
    pub histories: BTreeMap<u32, Vec<HistoryEntry>>,
    /// The last transaction time noted in the trailers of the segments at the end of each
    /// backup's chain (`None`: the segment holds no transaction, or was archived without the
    /// note). Segments not read are absent.
    pub last_xact: BTreeMap<Segment, Option<DateTime<Utc>>>,
}

/// How many segments at the end of a chain have their trailers read for a transaction time.
const TAIL_SEGMENTS: usize = 4;

/// How far a backup's WAL chain reaches.
#[derive(Debug, Clone, PartialEq)]
pub struct Reach {
    /// The last segment of the unbroken chain from the backup's start.
    pub last: Option<Segment>,
    /// The latest target time the chain reaches: just before its last transaction record,
    /// since PostgreSQL ends a time-targeted recovery at a transaction record stamped after
    /// the target and refuses to start without one. When the trailers do not say, the time
    /// the last segment was archived.
    pub end_time: Option<DateTime<Utc>>,
    /// The first missing segment, when later segments exist (a gap, not the end).
    pub gap: Option<String>,
    /// The chain reaches the backup's stop LSN, so the backup is consistent.
    pub consistent: bool,
    pub timeline: u32,
}

/// A span of time a restore can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// Sorts spans of restorable time and merges the ones that touch.
pub fn merge_windows(mut spans: Vec<Window>) -> Vec<Window> {
    spans.sort_by_key(|w| w.from);
    let mut merged: Vec<Window> = Vec::new();
    for w in spans {
        match merged.last_mut() {
            Some(last) if w.from <= last.to => last.to = last.to.max(w.to),
            _ => merged.push(w),
        }
    }
    merged
}

/// The clusters (system identifiers) that have anything in the repository.
pub async fn clusters(store: &dyn Store) -> anyhow::Result<Vec<u64>> {
    let mut out: Vec<u64> = store
        .list("pg/")
        .await?
        .iter()
        .filter_map(|o| o.key.split('/').nth(1)?.parse().ok())
        .collect();
    out.dedup();
    out.sort();
    out.dedup();
    Ok(out)
}

impl PgCatalog {
    pub async fn load(store: &dyn Store, sysid: u64) -> anyhow::Result<PgCatalog> {
        let mut backups = Vec::new();
        for obj in store.list(&super::backups_prefix(sysid)).await? {
            if !obj.key.ends_with("/backup.json") {
                continue;
            }
            let bytes = crate::storage::get_all(store, &obj.key).await?;
            let m: BaseBackup = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading backup manifest {}", obj.key))?;
            if m.format_version > super::FORMAT_VERSION {
                anyhow::bail!(
                    "backup {} has repository format {} but this dbagent reads up to {}: upgrade dbagent",
                    m.id,
                    m.format_version,
                    super::FORMAT_VERSION
                );
            }
            backups.push(m);
        }
        backups.sort_by_key(|b| b.stop_time);
        let seg_size = backups
            .last()
            .map(|b| b.wal_segment_size)
            .unwrap_or(DEFAULT_SEGMENT_SIZE);

        let mut segments = BTreeMap::new();
        let mut history_keys = Vec::new();
        let prefix = super::wal_prefix(sysid);
        for obj in store.list(&prefix).await? {
            let Some(name) = obj
                .key
                .strip_prefix(&prefix)
                .and_then(|n| n.strip_suffix(".zst"))
            else {
                continue;
            };
            match WalFile::classify(name) {
                Some(WalFile::Segment(n)) => {
                    if let Some(seg) = Segment::parse(&n, seg_size) {
                        segments.insert(seg, obj);
                    }
                }
                Some(WalFile::History(tli)) => history_keys.push((tli, obj.key.clone())),
                _ => {}
            }
        }
        let mut histories = BTreeMap::new();
        for (tli, key) in history_keys {
            let (text, _) = crate::pipeline::download(store, &key, Vec::new()).await?;
            let entries = parse_history(&String::from_utf8_lossy(&text))
                .map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
            histories.insert(tli, entries);
        }
        let mut cat = PgCatalog {
            system_identifier: sysid,
            seg_size,
            backups,
            segments,
            histories,
            last_xact: BTreeMap::new(),
        };
        cat.read_tails(store).await;
        Ok(cat)
    }

    /// Reads the transaction times noted in the trailers of the last few segments of every
    /// backup's chain (a ranged read of each object's last bytes). A trailer that cannot be
    /// read only leaves the time unknown: `verify` is where damage is reported.
    async fn read_tails(&mut self, store: &dyn Store) {
        let mut wanted: Vec<Segment> = Vec::new();
        for b in &self.backups {
            let (chain, _) = self.chain(b);
            let from = chain.len().saturating_sub(TAIL_SEGMENTS);
            wanted.extend(&chain[from..]);
        }
        wanted.sort();
        wanted.dedup();
        let notes: Vec<(Segment, anyhow::Result<u64>)> = futures::stream::iter(wanted)
            .map(|seg| {
                let obj = &self.segments[&seg];
                async move {
                    let note = crate::pipeline::read_note(store, &obj.key, obj.size).await;
                    (seg, note)
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for (seg, note) in notes {
            match note {
                Ok(micros) => {
                    let time = (micros != 0)
                        .then(|| DateTime::from_timestamp_micros(micros as i64))
                        .flatten();
                    self.last_xact.insert(seg, time);
                }
                Err(e) => {
                    tracing::debug!(segment = %seg.name(self.seg_size), error = %e, "no transaction time for this segment")
                }
            }
        }
    }

    /// The newest timeline a restore from `b` follows (recovery_target_timeline = latest):
    /// one whose history branches off the backup's timeline after the backup ended.
    pub fn target_timeline(&self, b: &BaseBackup) -> u32 {
        self.histories
            .iter()
            .filter(|(_, h)| {
                h.iter()
                    .any(|e| e.tli == b.timeline && e.switchpoint >= b.stop_lsn)
            })
            .map(|(tli, _)| *tli)
            .max()
            .unwrap_or(b.timeline)
            .max(b.timeline)
    }

    /// Timelines along the path to `tli`, each with the LSN range it is valid for.
    fn path(&self, tli: u32) -> Vec<(u32, Lsn, Option<Lsn>)> {
        let mut out = Vec::new();
        let mut begin = Lsn(0);
        if let Some(h) = self.histories.get(&tli) {
            for e in h {
                out.push((e.tli, begin, Some(e.switchpoint)));
                begin = e.switchpoint;
            }
        }
        out.push((tli, begin, None));
        out
    }

    /// Which archived file PostgreSQL would use for segment number `segno`: the newest
    /// timeline on the path that covers it and has the file.
    fn find(&self, path: &[(u32, Lsn, Option<Lsn>)], segno: u64) -> Result<Segment, Segment> {
        let mut wanted = None;
        for &(tli, begin, end) in path.iter().rev() {
            let seg = Segment { tli, segno };
            if self.covers(begin, end, seg) {
                if self.segments.contains_key(&seg) {
                    return Ok(seg);
                }
                wanted.get_or_insert(seg);
            }
        }
        Err(wanted.unwrap_or(Segment {
            tli: path.last().map(|p| p.0).unwrap_or(1),
            segno,
        }))
    }

    /// Whether a timeline valid for [begin, end) holds segment `seg`'s data.
    fn covers(&self, begin: Lsn, end: Option<Lsn>, seg: Segment) -> bool {
        begin.0 / self.seg_size <= seg.segno && end.is_none_or(|e| seg.start_lsn(self.seg_size) < e)
    }

    /// The unbroken run of archived segments recovery from `b` reads, and the first
    /// segment it would miss.
    fn chain(&self, b: &BaseBackup) -> (Vec<Segment>, Segment) {
        let path = self.path(self.target_timeline(b));
        let mut segno = b.start_lsn.0 / self.seg_size;
        let mut chain = Vec::new();
        loop {
            match self.find(&path, segno) {
                Ok(seg) => {
                    chain.push(seg);
                    segno += 1;
                }
                Err(missing) => return (chain, missing),
            }
        }
    }

    /// Where a restore along `chain` can be targeted at the latest (see `Reach::end_time`).
    fn chain_end_time(&self, chain: &[Segment]) -> Option<DateTime<Utc>> {
        let archived = chain.iter().map(|s| self.segments[s].last_modified).max()?;
        for seg in chain.iter().rev() {
            match self.last_xact.get(seg) {
                Some(Some(t)) => return Some(*t - chrono::Duration::microseconds(1)),
                Some(None) => continue, // no transaction in it: look at the one before
                None => break,
            }
        }
        Some(archived)
    }

    pub fn reach(&self, b: &BaseBackup) -> Reach {
        let tli = self.target_timeline(b);
        let path = self.path(tli);
        let (chain, missing) = self.chain(b);
        let last = chain.last().copied();
        let end_time = self.chain_end_time(&chain);
        // Only segments recovery would read count: an older timeline's WAL past the point
        // where the path left it is another history, not "later WAL".
        let later_exists = self.segments.keys().any(|s| {
            s.segno > missing.segno
                && path
                    .iter()
                    .any(|&(tli, begin, end)| tli == s.tli && self.covers(begin, end, *s))
        });
        Reach {
            last,
            end_time,
            gap: later_exists.then(|| missing.name(self.seg_size)),
            consistent: last.is_some_and(|s| s.segno >= b.stop_lsn.0 / self.seg_size),
            timeline: tli,
        }
    }

    /// The spans of time a restore can reach, merged across backups.
    pub fn windows(&self) -> Vec<Window> {
        let spans: Vec<Window> = self
            .backups
            .iter()
            .filter_map(|b| {
                let r = self.reach(b);
                let to = r.end_time?.max(b.stop_time);
                r.consistent.then_some(Window {
                    from: b.stop_time,
                    to,
                })
            })
            .collect();
        merge_windows(spans)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::repo::manifest::{BaseBackup, ObjectRef};

    #[test]
    fn the_window_ends_just_before_the_last_archived_transaction() {
        let mut c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2, 3, 4, 5]);
        // Without notes: the archive time of the last segment.
        assert_eq!(c.reach(&c.backups[0]).end_time, Some(t("00:05:00")));
        // Segment 5 holds no transaction; segment 4's last one committed at 00:04:10.
        c.last_xact.insert(Segment { tli: 1, segno: 5 }, None);
        c.last_xact
            .insert(Segment { tli: 1, segno: 4 }, Some(t("00:04:10")));
        let end = t("00:04:10") - chrono::Duration::microseconds(1);
        assert_eq!(c.reach(&c.backups[0]).end_time, Some(end));
        assert_eq!(c.windows()[0].to, end);
        // A segment whose note was not read leaves the archive time.
        c.last_xact.remove(&Segment { tli: 1, segno: 5 });
        assert_eq!(c.reach(&c.backups[0]).end_time, Some(t("00:05:00")));
    }

    pub const SEG: u64 = DEFAULT_SEGMENT_SIZE;

    pub fn t(s: &str) -> DateTime<Utc> {
        format!("2026-11-23T{s}Z").parse().unwrap()
    }

    pub fn backup(id: &str, start_seg: u64, stop_seg: u64, stop: &str) -> BaseBackup {
        BaseBackup {
            format_version: 1,
            id: id.into(),
            system_identifier: 1,
            timeline: 1,
            start_lsn: Lsn(start_seg * SEG + 0x28),
            stop_lsn: Lsn(stop_seg * SEG + 0x100),
            start_wal: Segment {
                tli: 1,
                segno: start_seg,
            }
            .name(SEG),
            stop_wal: Segment {
                tli: 1,
                segno: stop_seg,
            }
            .name(SEG),
            start_time: t("00:00:00"),
            stop_time: t(stop),
            server_version: "15".into(),
            server_version_num: 150000,
            wal_segment_size: SEG,
            data: ObjectRef {
                key: "k".into(),
                stored_bytes: 1,
                plain_bytes: 1,
                sha256: String::new(),
            },
            databases: vec![],
            dbagent_version: "test".into(),
        }
    }

    /// A catalog with segments `segs` on timeline 1, segment n archived at minute n.
    pub fn catalog(backups: Vec<BaseBackup>, segs: &[u64]) -> PgCatalog {
        let mut c = PgCatalog {
            system_identifier: 1,
            seg_size: SEG,
            backups,
            ..Default::default()
        };
        for &n in segs {
            add_seg(&mut c, 1, n);
        }
        c
    }

    pub fn add_seg(c: &mut PgCatalog, tli: u32, n: u64) {
        let seg = Segment { tli, segno: n };
        c.segments.insert(
            seg,
            ObjectInfo {
                key: seg.name(SEG),
                size: 1,
                last_modified: t(&format!("00:{n:02}:00")),
            },
        );
    }

    #[test]
    fn reach_follows_contiguous_segments_and_finds_gaps() {
        let c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2, 3, 4, 5, 7, 8]);
        let r = c.reach(&c.backups[0]);
        assert_eq!(r.last.unwrap().segno, 5);
        assert_eq!(r.end_time, Some(t("00:05:00")));
        assert_eq!(r.gap.as_deref(), Some("000000010000000000000006"));
        assert!(r.consistent);
        assert_eq!(
            c.windows(),
            vec![Window {
                from: t("00:03:30"),
                to: t("00:05:00")
            }]
        );
    }

    #[test]
    fn backup_without_its_wal_is_not_restorable() {
        let c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2]);
        assert!(!c.reach(&c.backups[0]).consistent);
        assert!(c.windows().is_empty());
    }

    #[test]
    fn follows_a_newer_timeline() {
        let mut c = catalog(vec![backup("b1", 2, 2, "00:02:30")], &[2, 3, 4]);
        // Timeline 2 branched at the middle of segment 4.
        c.histories.insert(
            2,
            vec![HistoryEntry {
                tli: 1,
                switchpoint: Lsn(4 * SEG + 500),
            }],
        );
        add_seg(&mut c, 2, 4);
        add_seg(&mut c, 2, 5);
        add_seg(&mut c, 2, 6);
        let r = c.reach(&c.backups[0]);
        assert_eq!(r.timeline, 2);
        assert_eq!(r.last, Some(Segment { tli: 2, segno: 6 }));
        assert_eq!(r.gap, None);
        // Timeline 1's WAL past the branch point is another history, not a later segment.
        add_seg(&mut c, 1, 9);
        assert_eq!(c.reach(&c.backups[0]).gap, None);
        // A timeline that branched before the backup ended is not followed.
        c.histories.insert(
            3,
            vec![HistoryEntry {
                tli: 1,
                switchpoint: Lsn(SEG),
            }],
        );
        assert_eq!(c.target_timeline(&c.backups[0]), 2);
    }
}
