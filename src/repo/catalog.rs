//! What the repository holds for one PostgreSQL cluster, read from a listing, and the pure
//! questions asked of it: how far can a backup's WAL chain reach, what window is restorable,
//! and which branch of the timeline tree continues production when the history has forked.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};

use super::manifest::BaseBackup;
use super::wal::{
    DEFAULT_SEGMENT_SIZE, HistoryEntry, Lsn, Piece, Segment, WalFile, contiguous, parse_history,
};
use crate::storage::{ObjectInfo, Store};

#[derive(Debug, Clone, Default)]
pub struct PgCatalog {
    pub system_identifier: u64,
    pub seg_size: u64,
    /// Complete backups (those with a manifest), oldest `stop_time` first.
    pub backups: Vec<BaseBackup>,
    pub segments: BTreeMap<Segment, ObjectInfo>,
    pub histories: BTreeMap<u32, Vec<HistoryEntry>>,
    /// When each history file was archived, i.e. when its timeline began (the server that
    /// promoted onto it archives the file first).
    pub history_times: BTreeMap<u32, DateTime<Utc>>,
    /// Timelines whose history file says the recovery that began them stopped at a target
    /// (a time, a transaction, a name, an LSN): a restore to a chosen point, not a promotion at
    /// the end of the WAL (PostgreSQL's reason "no recovery target specified").
    pub targeted: std::collections::BTreeSet<u32>,
    /// The last transaction time noted in the trailers of the segments at the end of each
    /// backup's chain (`None`: the segment holds no transaction, or was archived without the
    /// note). Segments not read are absent.
    pub last_xact: BTreeMap<Segment, Option<DateTime<Utc>>>,
    /// Segments held only as streamed pieces (`serve.wal_stream`): each also appears in
    /// `segments`, under its newest contiguous piece, so chains reach into it; a chain ends
    /// there, since recovery reads it zero-padded after the last streamed byte.
    pub streamed: BTreeMap<Segment, Streamed>,
    /// Pieces of segments that are complete here: superseded, `prune` removes them.
    pub superseded_pieces: Vec<ObjectInfo>,
    /// Every backup the repository names, when `backups` holds only the newest of them
    /// (`load_newest`).
    pub listed: Option<std::collections::BTreeSet<String>>,
}

/// The streamed part of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    /// Where the contiguous run of pieces from offset 0 ends.
    pub end: u64,
    /// Every piece stored for the segment (the run and any left over from a cut stream).
    pub pieces: Vec<ObjectInfo>,
}

/// How many backup manifests are read at once.
const MANIFESTS_AT_ONCE: usize = 8;

/// The backup manifests of a listing of the backups prefix: (backup id, key).
fn manifest_keys(listing: &[ObjectInfo]) -> Vec<(String, String)> {
    listing
        .iter()
        .filter_map(|obj| {
            let dir = obj.key.strip_suffix("/backup.json")?;
            let id = dir.rsplit('/').next()?;
            Some((id.to_string(), obj.key.clone()))
        })
        .collect()
}

/// Reads backup manifests, several at once, refusing a format newer than this dbagent reads.
async fn read_manifests(
    store: &dyn Store,
    keys: impl Iterator<Item = String>,
) -> anyhow::Result<Vec<BaseBackup>> {
    futures::stream::iter(keys)
        .map(|key| async move {
            let m: BaseBackup =
                super::read_manifest(store, &key, &format!("backup manifest {key}")).await?;
            if m.format_version > super::FILES_FORMAT_VERSION {
                anyhow::bail!(
                    "backup {} has repository format {} but this dbagent reads up to {}: upgrade dbagent",
                    m.id,
                    m.format_version,
                    super::FILES_FORMAT_VERSION
                );
            }
            Ok(m)
        })
        .buffer_unordered(MANIFESTS_AT_ONCE)
        .try_collect()
        .await
}

/// How many segments at the end of a chain have their trailers read for a transaction time.
const TAIL_SEGMENTS: usize = 4;
/// How far back past idle segments the transaction times are read: 1024 segments, 16 GiB of
/// WAL without a commit (a quiet server's checkpoints every 5 minutes for days).
const MAX_TAIL_SEGMENTS: usize = 1024;

/// Segment notes already read in this process, by object key (with its size and upload time):
/// a stored segment is never rewritten (create-only), so `serve`, which loads the catalog
/// every `serve.catalog_refresh`, reads each note once instead of at every load.
static NOTES: std::sync::Mutex<BTreeMap<String, (Stamp, u64)>> =
    std::sync::Mutex::new(BTreeMap::new());
type Stamp = (u64, DateTime<Utc>);
/// Past this many notes the cache starts over: its memory stays bounded (about 100 bytes each).
const NOTES_CACHED: usize = 100_000;

fn cached_note(key: &str, stamp: Stamp) -> Option<u64> {
    let notes = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    notes
        .get(key)
        .filter(|(s, _)| *s == stamp)
        .map(|(_, note)| *note)
}

fn cache_note(key: &str, stamp: Stamp, note: u64) {
    let mut notes = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    if notes.len() >= NOTES_CACHED {
        notes.clear();
    }
    notes.insert(key.to_string(), (stamp, note));
}

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
    /// `end_time` comes from the segments' notes (a transaction's time, or none along the
    /// whole chain), not from an upload time or from the segments before a cut: a restore
    /// may refuse a target on its word.
    pub end_known: bool,
    /// The first missing segment, when later segments exist (a gap, not the end).
    pub gap: Option<String>,
    /// The chain reaches the backup's stop LSN, so the backup is consistent.
    pub consistent: bool,
    pub timeline: u32,
    /// Where the chain's WAL ends when its last segment is an older timeline's copy of the
    /// segment in which that timeline left the path (the newer timeline's own copy is not
    /// archived yet): recovery reads it only up to the branch point (`wal-fetch --timeline`).
    pub cut: Option<Lsn>,
}

/// A span of time a restore can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Window {
    /// Whether one of `windows` reaches instant `t`.
    pub fn any_covers(windows: &[Window], t: DateTime<Utc>) -> bool {
        windows.iter().any(|w| w.from <= t && t <= w.to)
    }
}

/// A timeline as the repository knows it, from its history file and the WAL present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    pub timeline: u32,
    /// The nearest ancestor the repository holds (absent: the first timeline here).
    pub parent: Option<u32>,
    /// Where the history left `parent`.
    pub branch_lsn: Option<Lsn>,
    /// When it began: when its history file was archived (the promoted server archives it
    /// first).
    pub created: Option<DateTime<Utc>>,
    /// Its newest archived segment, and when that arrived.
    pub last_segment: Option<Segment>,
    pub last_archived: Option<DateTime<Utc>>,
}

/// One end of the archived history: what a restore that follows it to its end replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    pub timeline: u32,
    /// The timelines from the first one here down to this one.
    pub lineage: Vec<u32>,
    pub last_segment: Option<Segment>,
    pub last_archived: Option<DateTime<Utc>>,
}

/// How the archived history ends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Branches {
    /// Every branch holding WAL the others lack, by timeline. Two or more: a fork.
    pub branches: Vec<Branch>,
    /// The branch that continues production: the only one archived after the branches
    /// parted. `None` when several were (or nothing is archived).
    pub production: Option<u32>,
}

impl Branches {
    /// How many times the history forked: branches beyond the first.
    pub fn forks(&self) -> usize {
        self.branches.len().saturating_sub(1)
    }

    /// One line per branch: its timeline, where it left its parent, how far it reaches.
    pub fn describe(&self, cat: &PgCatalog) -> Vec<String> {
        let tls = cat.timelines();
        self.branches
            .iter()
            .map(|b| {
                let from = match tls.get(&b.timeline) {
                    Some(Timeline {
                        parent: Some(p),
                        branch_lsn: Some(at),
                        ..
                    }) => format!(" (left timeline {p} at {at})"),
                    _ => String::new(),
                };
                let reach = match (b.last_segment, b.last_archived) {
                    (Some(s), Some(t)) => format!(
                        "WAL to {}, last archived {}",
                        s.name(cat.seg_size),
                        crate::timespec::show(t)
                    ),
                    _ => "no WAL of its own".into(),
                };
                format!("timeline {}{from}: {reach}", b.timeline)
            })
            .collect()
    }
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
    /// Every backup manifest of the cluster, oldest first (by stop time), read eight at a
    /// time: a repository keeps dozens, and on S3 each read is a round trip.
    async fn read_backups(store: &dyn Store, sysid: u64) -> anyhow::Result<Vec<BaseBackup>> {
        let listing = store.list(&super::backups_prefix(sysid)).await?;
        let keys = manifest_keys(&listing).into_iter().map(|(_, key)| key);
        let mut backups = read_manifests(store, keys).await?;
        backups.sort_by(|a, b| a.stop_time.cmp(&b.stop_time).then_with(|| a.id.cmp(&b.id)));
        Ok(backups)
    }

    /// The newest backups of `listing` (the backups prefix, listed), read newest name first
    /// (a name starts with the backup's start time) a batch at a time, until `enough` holds
    /// for those read or none are left. Choosing an incremental's base needs the newest
    /// usable backup, and the newest full for `backup.full_every`, not every manifest of a
    /// repository that keeps months of nightly backups: each is a GET. `chain_complete`
    /// answers from the listing, which names every backup.
    pub async fn load_newest(
        store: &dyn Store,
        sysid: u64,
        listing: &[ObjectInfo],
        enough: impl Fn(&PgCatalog) -> bool,
    ) -> anyhow::Result<PgCatalog> {
        let mut named = manifest_keys(listing);
        named.sort_by(|a, b| b.0.cmp(&a.0));
        let mut cat = PgCatalog {
            system_identifier: sysid,
            listed: Some(named.iter().map(|(id, _)| id.clone()).collect()),
            ..Default::default()
        };
        for batch in named.chunks(MANIFESTS_AT_ONCE) {
            let read = read_manifests(store, batch.iter().map(|(_, key)| key.clone())).await?;
            cat.backups.extend(read);
            cat.backups
                .sort_by(|a, b| a.stop_time.cmp(&b.stop_time).then_with(|| a.id.cmp(&b.id)));
            if enough(&cat) {
                break;
            }
        }
        cat.seg_size = cat
            .backups
            .last()
            .map(|b| b.wal_segment_size)
            .unwrap_or(DEFAULT_SEGMENT_SIZE);
        Ok(cat)
    }

    pub async fn load(store: &dyn Store, sysid: u64) -> anyhow::Result<PgCatalog> {
        let backups = Self::read_backups(store, sysid).await?;
        let seg_size = backups
            .last()
            .map(|b| b.wal_segment_size)
            .unwrap_or(DEFAULT_SEGMENT_SIZE);

        let mut segments = BTreeMap::new();
        let mut pieces: BTreeMap<Segment, Vec<(Piece, ObjectInfo)>> = BTreeMap::new();
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
                Some(WalFile::History(tli)) => history_keys.push((tli, obj)),
                Some(_) => {}
                None => {
                    if let Some(p) = Piece::parse(name) {
                        if let Some(seg) = Segment::parse(&p.segment, seg_size) {
                            pieces.entry(seg).or_default().push((p, obj));
                        }
                    }
                }
            }
        }
        let mut streamed = BTreeMap::new();
        let mut superseded_pieces = Vec::new();
        for (seg, list) in pieces {
            if segments.contains_key(&seg) {
                superseded_pieces.extend(list.into_iter().map(|(_, o)| o));
                continue;
            }
            let names: Vec<Piece> = list.iter().map(|(p, _)| p.clone()).collect();
            let (run, end) = contiguous(&names);
            let Some(last) = run.last() else {
                continue; // nothing from offset 0: unusable, verify reports it
            };
            let newest = list
                .iter()
                .find(|(p, _)| p == last)
                .map(|(_, o)| o.clone())
                .expect("the run is made of these pieces");
            segments.insert(seg, newest);
            streamed.insert(
                seg,
                Streamed {
                    end,
                    pieces: list.into_iter().map(|(_, o)| o).collect(),
                },
            );
        }
        let mut histories = BTreeMap::new();
        let mut history_times = BTreeMap::new();
        let mut targeted = std::collections::BTreeSet::new();
        for (tli, obj) in history_keys {
            let key = &obj.key;
            let (text, _) = crate::pipeline::download(store, key, Vec::new()).await?;
            let text = String::from_utf8_lossy(&text);
            let entries = parse_history(&text).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
            histories.insert(tli, entries);
            history_times.insert(tli, obj.last_modified);
            // The last line's reason: how the recovery that began this timeline ended.
            let reason = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .and_then(|l| l.splitn(3, '\t').nth(2))
                .unwrap_or_default();
            if !reason.is_empty() && !reason.starts_with("no recovery target specified") {
                targeted.insert(tli);
            }
        }
        let mut cat = PgCatalog {
            system_identifier: sysid,
            seg_size,
            backups,
            segments,
            histories,
            history_times,
            targeted,
            last_xact: BTreeMap::new(),
            streamed,
            superseded_pieces,
            listed: None,
        };
        cat.read_tails(store).await;
        Ok(cat)
    }

    /// Reads the transaction times noted in the trailers of the last few segments of every
    /// backup's chain, on every branch it can follow (a ranged read of each object's last
    /// bytes), further back while what was read holds no transaction: a quiet server's tail
    /// of checkpoint-only segments would otherwise end the window at the last upload, past
    /// the last commit, where no time target can stop. A trailer that cannot be read leaves
    /// the time unknown (the window then ends at the upload time, as before) and is logged;
    /// `verify` is where damage is reported.
    async fn read_tails(&mut self, store: &dyn Store) {
        let branches = self.branches();
        let mut chains: Vec<Vec<Segment>> = Vec::new();
        for b in &self.backups {
            let mut tlis: Vec<u32> = branches
                .branches
                .iter()
                .map(|x| x.timeline)
                .filter(|t| self.backup_on(b, *t))
                .collect();
            tlis.push(self.timeline_for(b, &branches));
            tlis.sort();
            tlis.dedup();
            for tli in tlis {
                chains.push(self.chain_on(b, tli).0);
            }
        }
        chains.sort();
        chains.dedup();
        let mut unreadable: std::collections::BTreeSet<Segment> = Default::default();
        let mut depth = TAIL_SEGMENTS;
        loop {
            let mut wanted: Vec<Segment> = Vec::new();
            for chain in &chains {
                // Walking back as `chain_end_time` does, past idle segments: deeper only
                // when the walk stops at a segment not read yet.
                let stops_unread = chain
                    .iter()
                    .rev()
                    .find(|s| !matches!(self.last_xact.get(*s), Some(None)))
                    .is_some_and(|s| !self.last_xact.contains_key(s) && !unreadable.contains(s));
                if stops_unread {
                    let from = chain.len().saturating_sub(depth);
                    wanted.extend(
                        chain[from..].iter().filter(|s| {
                            !self.last_xact.contains_key(*s) && !unreadable.contains(*s)
                        }),
                    );
                }
            }
            wanted.sort();
            wanted.dedup();
            if wanted.is_empty() {
                break;
            }
            let notes: Vec<(Segment, anyhow::Result<u64>)> = futures::stream::iter(wanted)
                .map(|seg| {
                    let obj = &self.segments[&seg];
                    async move {
                        let stamp = (obj.size, obj.last_modified);
                        if let Some(note) = cached_note(&obj.key, stamp) {
                            return (seg, Ok(note));
                        }
                        let note = crate::pipeline::read_note(store, &obj.key, obj.size).await;
                        if let Ok(n) = &note {
                            cache_note(&obj.key, stamp, *n);
                        }
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
                        tracing::warn!(segment = %seg.name(self.seg_size), error = %format!("{e:#}"), "could not read the segment's last transaction time: a restore window ending with it ends at its upload time");
                        unreadable.insert(seg);
                    }
                }
            }
            if depth >= MAX_TAIL_SEGMENTS {
                break;
            }
            depth = (depth * 4).min(MAX_TAIL_SEGMENTS);
        }
    }

    /// Every timeline the repository holds (a history file or WAL), each linked to the
    /// nearest ancestor that is here too.
    pub fn timelines(&self) -> BTreeMap<u32, Timeline> {
        let blank = |tli| Timeline {
            timeline: tli,
            parent: None,
            branch_lsn: None,
            created: None,
            last_segment: None,
            last_archived: None,
        };
        let mut out: BTreeMap<u32, Timeline> = BTreeMap::new();
        for (seg, obj) in &self.segments {
            let t = out.entry(seg.tli).or_insert_with(|| blank(seg.tli));
            t.last_segment = t.last_segment.max(Some(*seg));
            t.last_archived = t.last_archived.max(Some(obj.last_modified));
        }
        for tli in self.histories.keys() {
            out.entry(*tli).or_insert_with(|| blank(*tli));
        }
        let present: Vec<u32> = out.keys().copied().collect();
        for (tli, t) in out.iter_mut() {
            t.created = self.history_times.get(tli).copied();
            // An ancestor that left nothing here (pruned, or never archived) is skipped: the
            // timeline then branches from the nearest one that did, where the path left it.
            let parent = self.histories.get(tli).and_then(|h| {
                h.iter()
                    .rev()
                    .find(|e| e.tli < *tli && present.contains(&e.tli))
            });
            if let Some(e) = parent {
                t.parent = Some(e.tli);
                t.branch_lsn = Some(e.switchpoint);
            }
        }
        out
    }

    /// The ends of the archived history, and which one continues production.
    ///
    /// A timeline whose WAL stops where a child branched off ends in that child (a normal
    /// promotion). One that was archived past a child's branch point (a segment starting at
    /// or after it) is an end of its own: the history has forked. A child with no WAL of its
    /// own, off a parent that went on, holds nothing the parent's side lacks and is no branch,
    /// unless it was created after the parent stopped: then it is the newest history (a
    /// restore as the new primary that has not archived a segment yet) and continues
    /// production.
    pub fn branches(&self) -> Branches {
        let tls = self.timelines();
        let goes_past = |t: &Timeline, lsn: Lsn| {
            t.last_segment
                .is_some_and(|s| s.start_lsn(self.seg_size) >= lsn)
        };
        let mut branches = Vec::new();
        for t in tls.values() {
            let ends_in_child = tls.values().any(|c| {
                c.parent == Some(t.timeline) && !goes_past(t, c.branch_lsn.unwrap_or_default())
            });
            let empty = t.last_segment.is_none()
                && t.parent.is_some_and(|p| {
                    let from = t.branch_lsn.unwrap_or_default();
                    goes_past(&tls[&p], from) && !self.created_after(t, p, from)
                });
            if ends_in_child || empty {
                continue;
            }
            let mut lineage = vec![t.timeline];
            while let Some(p) = tls[lineage.last().expect("non-empty")].parent {
                lineage.push(p);
            }
            lineage.reverse();
            branches.push(Branch {
                timeline: t.timeline,
                lineage,
                last_segment: t.last_segment,
                last_archived: t.last_archived,
            });
        }
        let production = match branches.as_slice() {
            [] => None,
            [one] => Some(one.timeline),
            many => {
                let live: Vec<u32> = many
                    .iter()
                    .filter(|w| {
                        many.iter().all(|y| {
                            y.timeline == w.timeline || !self.written_since_parting(&tls, y, w)
                        })
                    })
                    .map(|w| w.timeline)
                    .collect();
                match live.as_slice() {
                    [one] => Some(*one),
                    _ => None,
                }
            }
        };
        Branches {
            branches,
            production,
        }
    }

    /// Whether timeline `t` began with a restore to a chosen point (its history names a
    /// target) after every segment its parent `parent` archived from `from` on: a restore as
    /// the new primary, before it archived WAL of its own, after the parent had stopped. (A
    /// promotion at the end of the WAL, of a standby or of a `--latest` restore that stopped
    /// short, is not: it holds nothing the parent's side lacks.)
    fn created_after(&self, t: &Timeline, parent: u32, from: Lsn) -> bool {
        self.targeted.contains(&t.timeline)
            && t.created.is_some_and(|c| {
                self.segments
                    .iter()
                    .filter(|(s, _)| s.tli == parent && s.start_lsn(self.seg_size) >= from)
                    .all(|(_, o)| o.last_modified < c)
            })
    }

    /// Whether branch `x` received WAL after it parted from branch `y`, that is after the
    /// later of the two timelines that begin where they part was created. A child's own WAL
    /// always is; a parent's WAL past the branch point may predate the child (a restore that
    /// undid a bad change leaves the change behind on the parent).
    fn written_since_parting(&self, tls: &BTreeMap<u32, Timeline>, x: &Branch, y: &Branch) -> bool {
        let common = x
            .lineage
            .iter()
            .zip(&y.lineage)
            .take_while(|(a, b)| a == b)
            .count();
        let (dx, dy) = (x.lineage.get(common), y.lineage.get(common));
        let Some(parted) = [dx, dy]
            .into_iter()
            .flatten()
            .map(|t| tls[t].created)
            .max()
            .flatten()
        else {
            return true; // unrelated timelines, nothing says when: both count
        };
        let on_side = |s: &Segment| match (dx, dy) {
            (Some(_), _) => x.lineage[common..].contains(&s.tli),
            (None, Some(d)) => {
                s.tli == x.timeline
                    && tls[d]
                        .branch_lsn
                        .is_some_and(|from| s.start_lsn(self.seg_size) >= from)
            }
            (None, None) => false,
        };
        // A new timeline with no WAL yet (kept by `branches` only when it was created after
        // its parent stopped) was itself the last thing written on its side.
        let created_last = dx.is_some()
            && x.lineage[common..]
                .iter()
                .all(|t| tls[t].last_segment.is_none())
            && tls[&x.timeline].created >= Some(parted);
        created_last
            || self
                .segments
                .iter()
                .any(|(s, o)| on_side(s) && o.last_modified > parted)
    }

    /// Whether recovery from `b` can follow timeline `tli`: the backup's timeline is on its
    /// history and the backup ended before the history left it.
    pub fn backup_on(&self, b: &BaseBackup, tli: u32) -> bool {
        self.path(tli)
            .iter()
            .any(|&(t, _, end)| t == b.timeline && end.is_none_or(|e| b.stop_lsn <= e))
    }

    /// The timeline a restore from `b` follows unless told otherwise: production's when the
    /// backup lies on its history, else the only branch it can reach (the newest when several:
    /// listings show something; `restore` refuses to guess).
    pub fn timeline_for(&self, b: &BaseBackup, branches: &Branches) -> u32 {
        if let Some(p) = branches.production.filter(|p| self.backup_on(b, *p)) {
            return p;
        }
        branches
            .branches
            .iter()
            .map(|x| x.timeline)
            .filter(|t| self.backup_on(b, *t))
            .max()
            .unwrap_or(b.timeline)
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

    /// The unbroken run of archived segments recovery from `b` along timeline `tli` reads,
    /// and the first segment it would miss.
    fn chain_on(&self, b: &BaseBackup, tli: u32) -> (Vec<Segment>, Segment) {
        let path = self.path(tli);
        let mut segno = b.start_lsn.0 / self.seg_size;
        let mut chain = Vec::new();
        loop {
            match self.find(&path, segno) {
                Ok(seg) if self.streamed.contains_key(&seg) => {
                    // Recovery reads no further than the last streamed byte of this one: the
                    // complete segment is what is missing, should later WAL exist.
                    chain.push(seg);
                    return (chain, seg);
                }
                Ok(seg) => {
                    chain.push(seg);
                    if self.left_path_in(&path, seg).is_some() {
                        // An older timeline's copy, read only up to the branch point: the
                        // newer timeline's own copy is what is missing.
                        let newer = path
                            .iter()
                            .map(|p| p.0)
                            .find(|&t| t > seg.tli)
                            .unwrap_or(tli);
                        return (chain, Segment { tli: newer, segno });
                    }
                    segno += 1;
                }
                Err(missing) => return (chain, missing),
            }
        }
    }

    /// Where a restore along `chain` can be targeted at the latest (see `Reach::end_time`),
    /// and whether the segments' notes say so (`Reach::end_known`) rather than an upload time.
    fn chain_end_time(&self, chain: &[Segment]) -> Option<(DateTime<Utc>, bool)> {
        let archived = chain.iter().map(|s| self.segments[s].last_modified).max()?;
        for seg in chain.iter().rev() {
            match self.last_xact.get(seg) {
                Some(Some(t)) => return Some((*t - chrono::Duration::microseconds(1), true)),
                Some(None) => continue, // no transaction in it: look at the one before
                None => return Some((archived, false)),
            }
        }
        // No transaction anywhere along the chain: no time after the backup's own
        // consistency point can be reached (every caller takes the later of the two).
        Some((DateTime::<Utc>::MIN_UTC, true))
    }

    /// How far a restore from `b` reaches along the timeline it follows by default.
    pub fn reach(&self, b: &BaseBackup) -> Reach {
        self.reach_on(b, self.timeline_for(b, &self.branches()))
    }

    /// How far a restore from `b` reaches following timeline `tli`.
    pub fn reach_on(&self, b: &BaseBackup, tli: u32) -> Reach {
        let path = self.path(tli);
        let (chain, missing) = self.chain_on(b, tli);
        let last = chain.last().copied();
        let cut = last.and_then(|s| self.left_path_in(&path, s));
        // A cut segment's transactions after the branch point are another history's: the
        // window ends with the segment before it (earlier than it could, never later).
        let (end_time, end_known) = match cut {
            Some(_) => (
                self.chain_end_time(&chain[..chain.len() - 1])
                    .map(|(t, _)| t)
                    .or(Some(b.stop_time)),
                false,
            ),
            None => self
                .chain_end_time(&chain)
                .map_or((None, false), |(t, known)| (Some(t), known)),
        };
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
            end_known,
            gap: later_exists.then(|| missing.name(self.seg_size)),
            consistent: last.is_some_and(|s| s.segno >= b.stop_lsn.0 / self.seg_size)
                && self.chain_complete(b),
            timeline: tli,
            cut,
        }
    }

    /// Where segment `seg`'s timeline left `path`, when that happened inside `seg` (after its
    /// first byte): the part of the older timeline's copy that is on the path ends there.
    fn left_path_in(&self, path: &[(u32, Lsn, Option<Lsn>)], seg: Segment) -> Option<Lsn> {
        let start = seg.start_lsn(self.seg_size).0;
        path.iter()
            .find(|&&(t, _, _)| t == seg.tli)
            .and_then(|&(_, _, end)| end)
            .filter(|e| e.0 > start && e.0 < start + self.seg_size)
    }

    /// The oldest incremental that builds on `b`, when `b` cannot be restored by itself
    /// because `prune` took its WAL: `prune` keeps the backups a kept incremental builds on
    /// for their files only, and the incremental restores through them. Such a backup is no
    /// restore point of its own, and no problem either. Prune's doing shows in the layout:
    /// every archived segment is newer than `b`'s start, and the oldest is where another
    /// backup starts (prune's floor). WAL cut anywhere else (a bucket lifecycle rule, a hand)
    /// is lost WAL.
    pub fn kept_as_base_of(&self, b: &BaseBackup) -> Option<&BaseBackup> {
        let oldest = self.segments.keys().map(|s| s.segno).min()?;
        if b.start_lsn.0 / self.seg_size >= oldest {
            return None;
        }
        let at_a_floor = self
            .backups
            .iter()
            .any(|o| o.start_lsn.0 / self.seg_size == oldest);
        if !at_a_floor {
            return None;
        }
        self.backups.iter().find(|o| o.depends_on().contains(&b.id))
    }

    /// Every backup an incremental `b` builds on is in the repository.
    pub fn chain_complete(&self, b: &BaseBackup) -> bool {
        b.depends_on().iter().all(|dep| match &self.listed {
            Some(ids) => ids.contains(dep),
            None => self.backups.iter().any(|o| &o.id == dep),
        })
    }

    /// The spans of time a restore can reach, merged across backups: along the branch that
    /// continues production (another branch's backups do not count), or, while a fork leaves
    /// that open, along every branch (each point is reached with the right `--timeline`).
    pub fn windows(&self) -> Vec<Window> {
        let branches = self.branches();
        let mut spans = Vec::new();
        for b in &self.backups {
            let tlis: Vec<u32> = match branches.production {
                Some(p) if self.backup_on(b, p) => vec![p],
                Some(_) => continue,
                None => {
                    let mut on: Vec<u32> = branches
                        .branches
                        .iter()
                        .map(|x| x.timeline)
                        .filter(|t| self.backup_on(b, *t))
                        .collect();
                    if on.is_empty() {
                        on.push(b.timeline);
                    }
                    on
                }
            };
            for tli in tlis {
                let r = self.reach_on(b, tli);
                if let (true, Some(end)) = (r.consistent, r.end_time) {
                    spans.push(Window {
                        from: b.stop_time,
                        to: end.max(b.stop_time),
                    });
                }
            }
        }
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
        // No transaction anywhere after the backup: its own stop time, not the last upload.
        for n in 2..=5 {
            c.last_xact.insert(Segment { tli: 1, segno: n }, None);
        }
        assert_eq!(c.windows()[0].to, t("00:03:30"));
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
                key_set: None,
            },
            databases: vec![],
            dbagent_version: "test".into(),
            files: None,
        }
    }

    /// `backup(…)`, as an incremental that builds on `deps` (oldest first).
    pub fn incremental(id: &str, start_seg: u64, stop: &str, deps: &[&str]) -> BaseBackup {
        let mut b = backup(id, start_seg, start_seg, stop);
        b.format_version = 2;
        b.files = Some(crate::repo::manifest::FilesInfo {
            kind: "incremental".into(),
            based_on: deps.last().map(|d| d.to_string()),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            files: 1,
            plain_bytes: 1,
            new_plain_bytes: 1,
            read_bytes: None,
            changes_from: None,
            bundles: vec![],
        });
        b
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

    /// Segment `n` held only as streamed pieces ending at `end`, the newest stored at minute n.
    fn add_streamed(c: &mut PgCatalog, n: u64, end: u64) {
        add_seg(c, 1, n);
        let seg = Segment { tli: 1, segno: n };
        c.streamed.insert(
            seg,
            Streamed {
                end,
                pieces: vec![c.segments[&seg].clone()],
            },
        );
    }

    #[test]
    fn a_streamed_segment_ends_the_chain_and_extends_the_window() {
        let mut c = catalog(vec![backup("b1", 2, 3, "00:03:30")], &[2, 3, 4]);
        add_streamed(&mut c, 5, 0x2000);
        c.last_xact
            .insert(Segment { tli: 1, segno: 5 }, Some(t("00:05:10")));
        let r = c.reach(&c.backups[0]);
        assert_eq!(r.last, Some(Segment { tli: 1, segno: 5 }));
        assert_eq!(r.gap, None);
        let end = t("00:05:10") - chrono::Duration::microseconds(1);
        assert_eq!(c.windows()[0].to, end);
        // Complete WAL after a streamed segment: recovery would stop inside it, a gap.
        add_seg(&mut c, 1, 6);
        let r = c.reach(&c.backups[0]);
        assert_eq!(r.last, Some(Segment { tli: 1, segno: 5 }));
        assert_eq!(r.gap.as_deref(), Some("000000010000000000000005"));
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
        assert_eq!(c.timeline_for(&c.backups[0], &c.branches()), 2);
    }

    /// Segment `n` of timeline `tli`, archived at `at`.
    fn add_seg_at(c: &mut PgCatalog, tli: u32, n: u64, at: &str) {
        add_seg(c, tli, n);
        c.segments
            .get_mut(&Segment { tli, segno: n })
            .unwrap()
            .last_modified = t(at);
    }

    /// Timeline `tli` branched off `parent` at `at_lsn`; its history file archived at `created`.
    pub fn add_timeline(c: &mut PgCatalog, tli: u32, parent: u32, at_lsn: u64, created: &str) {
        let mut h = c.histories.get(&parent).cloned().unwrap_or_default();
        h.push(HistoryEntry {
            tli: parent,
            switchpoint: Lsn(at_lsn),
        });
        c.histories.insert(tli, h);
        c.history_times.insert(tli, t(created));
        c.targeted.insert(tli);
    }

    fn tips(c: &PgCatalog) -> (Vec<u32>, Option<u32>) {
        let b = c.branches();
        (
            b.branches.iter().map(|x| x.timeline).collect(),
            b.production,
        )
    }

    #[test]
    fn a_linear_history_has_one_branch() {
        let mut c = catalog(vec![backup("b1", 2, 2, "00:02:30")], &[2, 3, 4, 5]);
        assert_eq!(tips(&c), (vec![1], Some(1)));
        assert_eq!(c.branches().forks(), 0);
        // A restore of the end of timeline 1 promoted onto 2 (at a segment boundary, after
        // a WAL switch) and went on there: timeline 1 ends in 2.
        add_timeline(&mut c, 2, 1, 6 * SEG, "00:06:10");
        add_seg_at(&mut c, 2, 6, "00:07:00");
        assert_eq!(tips(&c), (vec![2], Some(2)));
        // Promoted in the middle of segment 5, which timeline 1 had archived whole: the
        // segment holding the branch point is shared, not a fork.
        let mut c = catalog(vec![backup("b1", 2, 2, "00:02:30")], &[2, 3, 4, 5]);
        add_timeline(&mut c, 2, 1, 5 * SEG + 0x500, "00:06:10");
        add_seg_at(&mut c, 2, 5, "00:07:00");
        assert_eq!(tips(&c), (vec![2], Some(2)));
        // A new timeline that archived nothing yet still ends timeline 1.
        let mut c = catalog(vec![backup("b1", 2, 2, "00:02:30")], &[2, 3, 4, 5]);
        add_timeline(&mut c, 2, 1, 6 * SEG, "00:06:10");
        assert_eq!(tips(&c), (vec![2], Some(2)));
        assert_eq!(
            c.reach(&c.backups[0]).last,
            Some(Segment { tli: 1, segno: 5 })
        );
    }

    #[test]
    fn a_copy_archived_while_production_went_on_is_a_fork_nobody_can_settle() {
        // Production (timeline 1) archives a segment a minute; a copy restored to the middle
        // of segment 4 promoted onto timeline 2 at 00:06:30 and archived 4..7.
        let mut c = catalog(
            vec![backup("b1", 2, 2, "00:02:30")],
            &[2, 3, 4, 5, 6, 7, 8, 9],
        );
        add_timeline(&mut c, 2, 1, 4 * SEG + 0x500, "00:06:30");
        for n in 4..=7 {
            add_seg_at(&mut c, 2, n, &format!("00:{:02}:40", n + 3));
        }
        // Both were written after they parted: which one is production is not ours to guess.
        assert_eq!(tips(&c), (vec![1, 2], None));
        assert_eq!(c.branches().forks(), 1);
        let lines = c.branches().describe(&c);
        assert_eq!(
            lines,
            vec![
                "timeline 1: WAL to 000000010000000000000009, last archived 2026-11-23T00:09:00Z",
                "timeline 2 (left timeline 1 at 0/4000500): WAL to 000000020000000000000007, last archived 2026-11-23T00:10:40Z",
            ]
        );
        // Each branch has its own chain.
        let b = &c.backups[0];
        assert_eq!(c.reach_on(b, 1).last, Some(Segment { tli: 1, segno: 9 }));
        assert_eq!(c.reach_on(b, 2).last, Some(Segment { tli: 2, segno: 7 }));
        assert_eq!(c.reach_on(b, 2).gap, None);
    }

    #[test]
    fn the_branch_archived_after_the_parting_continues_production() {
        // A bad change on timeline 1 (segments 5..7, archived by 00:07:00); at 00:20 a
        // restore to before it promoted onto timeline 2 as the new primary, which goes on.
        let mut c = catalog(vec![backup("b1", 2, 2, "00:02:30")], &[2, 3, 4, 5, 6, 7]);
        add_timeline(&mut c, 2, 1, 4 * SEG + 0x500, "00:20:00");
        add_seg_at(&mut c, 2, 4, "00:21:00");
        add_seg_at(&mut c, 2, 5, "00:22:00");
        assert_eq!(tips(&c), (vec![1, 2], Some(2)));
        assert_eq!(c.reach(&c.backups[0]).timeline, 2);
        // The old primary archived once more after the new one began: both are live.
        add_seg_at(&mut c, 1, 8, "00:20:30");
        assert_eq!(tips(&c), (vec![1, 2], None));

        // A copy that promoted and archived its history but no WAL of its own is no branch:
        // production went on without it.
        let mut c = catalog(vec![backup("b1", 2, 2, "00:02:30")], &[2, 3, 4, 5, 6, 7]);
        add_timeline(&mut c, 2, 1, 4 * SEG + 0x500, "00:05:30");
        assert_eq!(tips(&c), (vec![1], Some(1)));
        assert_eq!(c.reach(&c.backups[0]).timeline, 1);

        // A restore as the new primary after the old one stopped, that has not archived a
        // segment of its own yet: it is the newest history and continues production. Its
        // chain reads timeline 1's copy of segment 4 only up to the branch point, and its own
        // copy of segment 4 is what it lacks (not a gap: nothing later is on its path).
        let mut c = catalog(vec![backup("b1", 2, 2, "00:02:30")], &[2, 3, 4, 5, 6, 7]);
        add_timeline(&mut c, 2, 1, 4 * SEG + 0x500, "00:20:00");
        assert_eq!(tips(&c), (vec![1, 2], Some(2)));
        let r = c.reach(&c.backups[0]);
        assert_eq!(
            (r.timeline, r.last, r.cut, r.gap),
            (
                2,
                Some(Segment { tli: 1, segno: 4 }),
                Some(Lsn(4 * SEG + 0x500)),
                None
            )
        );
        // Timeline 1 read along its own history is whole.
        assert_eq!(c.reach_on(&c.backups[0], 1).cut, None);
        // Its window ends before the cut segment: timeline 1's commits in it after the
        // branch point are the undone history.
        assert!(r.end_time.unwrap() < c.segments[&Segment { tli: 1, segno: 4 }].last_modified);
        // A --latest restore of it as the new primary again (no target of its own) before
        // either archived WAL: the newest history still continues production.
        let mut again = c.clone();
        let mut h = again.histories[&2].clone();
        h.push(HistoryEntry {
            tli: 2,
            switchpoint: Lsn(4 * SEG + 0x500),
        });
        again.histories.insert(3, h);
        again.history_times.insert(3, t("00:25:00"));
        assert_eq!(tips(&again), (vec![1, 3], Some(3)));

        // The same without a target (a promotion at the end of the WAL it could read: a
        // lagging standby, or a --latest restore that stopped short) adds nothing.
        c.targeted.remove(&2);
        assert_eq!(tips(&c), (vec![1], Some(1)));
    }

    #[test]
    fn production_restored_past_a_forgotten_copy_continues_on_its_new_timeline() {
        // Timeline 2 is a copy that archived until 00:08; timeline 1 went on to segment 9 and
        // was then restored (explicitly) as the new primary onto timeline 3 at its end.
        let mut c = catalog(
            vec![backup("b1", 2, 2, "00:02:30")],
            &[2, 3, 4, 5, 6, 7, 8, 9],
        );
        add_timeline(&mut c, 2, 1, 4 * SEG + 0x500, "00:05:30");
        add_seg_at(&mut c, 2, 4, "00:07:00");
        add_seg_at(&mut c, 2, 5, "00:08:00");
        assert_eq!(tips(&c).1, None);
        add_timeline(&mut c, 3, 1, 10 * SEG, "00:15:00");
        add_seg_at(&mut c, 3, 10, "00:16:00");
        assert_eq!(tips(&c), (vec![2, 3], Some(3)));
        assert_eq!(c.branches().branches[1].lineage, vec![1, 3]);
        let r = c.reach(&c.backups[0]);
        assert_eq!(
            (r.timeline, r.last),
            (3, Some(Segment { tli: 3, segno: 10 }))
        );
        // The copy woke up and archived again: undecided once more.
        add_seg_at(&mut c, 2, 6, "00:17:00");
        assert_eq!(tips(&c), (vec![2, 3], None));
    }

    #[test]
    fn a_repository_begun_on_a_later_timeline_has_it_as_its_root() {
        // The cluster was on timeline 3 when it began archiving here: no history files, and
        // timeline 4's history names ancestors that left nothing here.
        let mut c = PgCatalog {
            system_identifier: 1,
            seg_size: SEG,
            backups: vec![BaseBackup {
                timeline: 3,
                ..backup("b1", 2, 2, "00:02:30")
            }],
            ..Default::default()
        };
        for n in 2..=5 {
            add_seg(&mut c, 3, n);
        }
        assert_eq!(tips(&c), (vec![3], Some(3)));
        assert!(c.backup_on(&c.backups[0], 3));
        c.histories.insert(
            4,
            vec![
                HistoryEntry {
                    tli: 1,
                    switchpoint: Lsn(SEG),
                },
                HistoryEntry {
                    tli: 3,
                    switchpoint: Lsn(6 * SEG),
                },
            ],
        );
        c.history_times.insert(4, t("00:06:30"));
        let tl = c.timelines();
        assert_eq!(
            (tl[&4].parent, tl[&4].branch_lsn),
            (Some(3), Some(Lsn(6 * SEG)))
        );
        assert_eq!(tips(&c), (vec![4], Some(4)));
        assert!(c.backup_on(&c.backups[0], 4));
    }

    #[test]
    fn a_backup_is_on_a_timeline_when_it_ended_before_the_history_left_its_own() {
        let mut c = catalog(
            vec![
                backup("before", 2, 2, "00:02:30"),
                backup("after", 6, 6, "00:06:30"),
            ],
            &[2, 3, 4, 5, 6, 7],
        );
        add_timeline(&mut c, 2, 1, 4 * SEG + 0x500, "00:05:30");
        add_seg(&mut c, 2, 4);
        assert!(c.backup_on(&c.backups[0], 1) && c.backup_on(&c.backups[0], 2));
        assert!(c.backup_on(&c.backups[1], 1) && !c.backup_on(&c.backups[1], 2));
    }
}
