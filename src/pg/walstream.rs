//! `serve` with `serve.wal_stream`: WAL streamed from a physical replication slot into the
//! repository as it is written, for a recovery point about one second behind.
//!
//! What arrives is kept in memory for the segment being filled (one segment, 16 MiB by
//! default) and stored every `serve.wal_stream_interval` as an immutable *piece*
//! (`<segment>.<start>-<end>.part`, create-only). A filled segment is stored under its plain
//! name, exactly as `wal-push` would store it (same bytes, same trailer note), and so
//! supersedes its pieces. The server is told that WAL is flushed only once the repository
//! holds it, so the slot keeps everything not yet stored.
//!
//! A lost connection keeps what was received in memory and resumes from the end of it (the
//! slot still holds it: only stored WAL is confirmed); a restarted sidecar resumes from the
//! end of the stored pieces. Either way no gap, and no piece stored twice. When the server no longer has that WAL (the
//! slot was dropped, or `max_slot_wal_keep_size` invalidated it) the gap is reported loudly
//! (log, `dbagent_wal_stream_gaps_total`, `/status`) and streaming resumes where it can.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::conn::ConnInfo;
use super::replication::{Event, ReplConn, ServerError};
use super::walscan::WalScan;
use crate::pipeline::{self, PipeOptions, WriteMode};
use crate::repo::wal::{Lsn, Piece, Segment, WalFile, contiguous, history_name};
use crate::serve::state::Shared;
use crate::storage::{self, Store};

/// Settings of the streaming task.
#[derive(Debug, Clone)]
pub struct Settings {
    pub conn: ConnInfo,
    pub slot: String,
    pub interval: Duration,
    /// Silence after which the connection is given up as lost (see `session`).
    pub timeout: Duration,
    pub pipe: PipeOptions,
}

/// Where the streamed WAL stands: the segment being filled, its bytes from offset 0, and how
/// much of it the repository holds.
struct Cursor {
    seg: Segment,
    buf: Vec<u8>,
    stored: usize,
    scan: WalScan,
}

impl Cursor {
    fn empty(seg: Segment) -> Cursor {
        Cursor {
            seg,
            buf: Vec::new(),
            stored: 0,
            scan: WalScan::new(),
        }
    }

    fn received(&self, seg_size: u64) -> Lsn {
        Lsn(self.seg.start_lsn(seg_size).0 + self.buf.len() as u64)
    }

    fn stored_lsn(&self, seg_size: u64) -> Lsn {
        Lsn(self.seg.start_lsn(seg_size).0 + self.stored as u64)
    }
}

struct Streamer {
    settings: Settings,
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    sysid: Option<u64>,
    seg_size: u64,
    cursor: Option<Cursor>,
    /// When the oldest WAL not yet stored arrived.
    pending_since: Option<Instant>,
    /// How long the last store took.
    put_time: Duration,
    /// The slot as the last session found it.
    slot: Option<SlotSeen>,
    /// The server process of a connection given up as silent, which may still hold the slot.
    abandoned: Option<i32>,
}

#[derive(Debug, Clone, Copy)]
struct SlotSeen {
    state: super::replication::SlotState,
    /// It was missing and had to be made again.
    recreated: bool,
    server_tli: u32,
    /// The server's WAL position when the session began (IDENTIFY_SYSTEM).
    server_pos: Lsn,
}

/// Runs until `token` is cancelled, reconnecting with backoff after any failure.
pub async fn run(
    settings: Settings,
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    shared.stream_update(|f| f.slot = settings.slot.clone());
    let mut s = Streamer {
        settings,
        store,
        shared,
        sysid: None,
        seg_size: 0,
        cursor: None,
        pending_since: None,
        put_time: Duration::ZERO,
        slot: None,
        abandoned: None,
    };
    let mut pause = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let res = s.session(&token).await;
        s.shared.stream_update(|f| f.connected = false);
        match res {
            Ok(()) => return Ok(()),
            Err(e) if wal_removed(&e) => s.gap().await,
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(error = %msg, "WAL streaming interrupted; reconnecting");
                s.shared.stream_update(|f| {
                    f.interruptions += 1;
                    f.last_interruption = Some(format!("{}: {msg}", Utc::now().to_rfc3339()));
                    f.error = Some(msg);
                });
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            pause = Duration::from_millis(500);
        }
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

impl Streamer {
    async fn session(&mut self, token: &CancellationToken) -> anyhow::Result<()> {
        let mut conn = ReplConn::connect(&self.settings.conn).await?;
        conn.answers_within(self.settings.timeout);
        let id = conn.identify_system().await?;
        match self.sysid {
            Some(s) if s != id.system_identifier => anyhow::bail!(
                "the server is now cluster {} (was {s}): refusing to stream another cluster's WAL into this one's archive; restart serve",
                id.system_identifier
            ),
            _ => self.sysid = Some(id.system_identifier),
        }
        let sysid = id.system_identifier;
        self.seg_size = conn.wal_segment_size().await?;
        let slot_name = self.settings.slot.clone();
        let mut fresh_slot = false;
        let slot = match conn.read_slot(&slot_name).await? {
            Some(s) => s,
            None => {
                conn.create_slot(&slot_name).await?;
                fresh_slot = true;
                tracing::info!(slot = %slot_name, "created the physical replication slot");
                conn.read_slot(&slot_name)
                    .await?
                    .context("the slot just created is missing")?
            }
        };
        // A slot without a position was made without reserving WAL (streaming reserves it),
        // or was invalidated by max_slot_wal_keep_size and can never stream again. Slots are
        // not dropped behind the operator's back: say what to do (watch_slot counts the gap).
        if slot.restart_lsn.is_none() && self.slot_lost(&slot_name).await {
            anyhow::bail!(
                "replication slot {slot_name} was invalidated (max_slot_wal_keep_size exceeded) and can never stream again: drop it with SELECT pg_drop_replication_slot('{slot_name}'); the sidecar then creates it anew and reports the WAL lost meanwhile as a gap"
            );
        }
        if self.cursor.is_none() {
            self.cursor = Some(
                self.locate(sysid, id.timeline, slot.restart_lsn.unwrap_or(id.xlogpos))
                    .await?,
            );
        }
        // A slot that had to be made while the repository already streamed from this
        // cluster: WAL written meanwhile may be gone from the server.
        self.slot = Some(SlotSeen {
            state: slot,
            recreated: fresh_slot,
            server_tli: id.timeline,
            server_pos: id.xlogpos,
        });
        self.onto_history(&mut conn, sysid, &id, &slot).await?;
        // Tried again by every session until one streams: a failed attempt leaves the slot
        // held until the server's own timeout.
        if let Some(pid) = self.abandoned {
            self.end_abandoned(pid, &slot_name).await;
        }
        let tli = self.start_streaming(&mut conn, &slot_name, sysid).await?;
        self.abandoned = None;
        self.shared.stream_update(|f| {
            f.connected = true;
            f.error = None;
            // Storing is judged again by the next store; meanwhile nothing says it fails.
            f.store_failing = false;
            f.timeline = Some(tli);
        });
        // A network path that dies without a reset (a node lost, a NAT entry dropped) leaves
        // the connection open and silent, and an idle server has nothing to send: every
        // periodic status asks the server to answer, and a connection that says nothing for
        // `timeout` of listening is given up (as a standby's `wal_receiver_timeout`). Only
        // time spent waiting counts, so a slow store cannot pass for a silent server.
        let timeout = self.settings.timeout;
        let status_every = (timeout / 3).min(Duration::from_secs(10));
        let mut silent = Duration::ZERO;
        let mut last_status = Instant::now();
        loop {
            // Store once the oldest unstored byte has waited the interval less what a store
            // takes, so it is durable within the interval; and answer the server at least
            // every `status_every`.
            let status_due = last_status + status_every;
            let due = match self.pending_since {
                Some(since) => {
                    (since + self.settings.interval.saturating_sub(self.put_time)).min(status_due)
                }
                None => status_due,
            };
            let listening = Instant::now();
            tokio::select! {
                _ = token.cancelled() => {
                    self.store_piece().await?;
                    let (recv, stored) = self.positions();
                    let _ = conn.status(recv, stored, false).await;
                    conn.close().await;
                    return Ok(());
                }
                ev = conn.next() => match ev.inspect(|_| silent = Duration::ZERO)? {
                    Event::Data { start, data, .. } => {
                        let at = self.cursor().received(self.seg_size);
                        anyhow::ensure!(start == at, "the server sent WAL from {start}, expected {at}");
                        let confirmed = self.absorb(data).await?;
                        self.shared.stream_update(|f| f.received_lsn = Some(self.cursor.as_ref().map(|c| c.received(self.seg_size)).unwrap_or_default()));
                        if confirmed {
                            let (recv, stored) = self.positions();
                            conn.status(recv, stored, false).await?;
                            last_status = Instant::now();
                        }
                    }
                    Event::Keepalive { reply_requested, .. } => {
                        if reply_requested {
                            let (recv, stored) = self.positions();
                            conn.status(recv, stored, false).await?;
                            last_status = Instant::now();
                        }
                    }
                    Event::TimelineEnd { next_tli, next_start } => {
                        self.next_timeline(&mut conn, sysid, next_tli, next_start).await?;
                        let tli = self.start_streaming(&mut conn, &slot_name, sysid).await?;
                        self.shared.stream_update(|f| f.timeline = Some(tli));
                    }
                },
                _ = tokio::time::sleep_until(due.into()) => {
                    silent += listening.elapsed();
                    if silent >= timeout {
                        self.abandoned = conn.backend_pid();
                        anyhow::bail!(
                            "PostgreSQL at {} sent nothing for {} s, not even an answer to a status request (serve.wal_stream_timeout): the connection is lost",
                            self.settings.conn.describe(),
                            silent.as_secs()
                        );
                    }
                    let stored = self.store_piece().await?;
                    if stored || last_status.elapsed() >= status_every {
                        let (recv, stored) = self.positions();
                        conn.status(recv, stored, true).await?;
                        last_status = Instant::now();
                    }
                }
            }
        }
    }

    /// Starts the stream at the cursor, and follows timelines of the server's past that end
    /// exactly there (the server then names the next one instead of streaming). Returns the
    /// timeline streaming.
    async fn start_streaming(
        &mut self,
        conn: &mut ReplConn,
        slot: &str,
        sysid: u64,
    ) -> anyhow::Result<u32> {
        loop {
            let start = self.cursor().received(self.seg_size);
            let tli = self.cursor().seg.tli;
            match conn.start(slot, start, tli).await? {
                None => {
                    tracing::info!(%slot, %start, timeline = tli, "streaming WAL");
                    return Ok(tli);
                }
                Some(Event::TimelineEnd {
                    next_tli,
                    next_start,
                }) => {
                    self.next_timeline(conn, sysid, next_tli, next_start)
                        .await?
                }
                Some(other) => anyhow::bail!("unexpected answer to START_REPLICATION: {other:?}"),
            }
        }
    }

    /// The server's timeline `next_tli` begins at `next_start`: what was received is stored,
    /// the history file too, and the cursor moves onto it.
    async fn next_timeline(
        &mut self,
        conn: &mut ReplConn,
        sysid: u64,
        next_tli: u32,
        next_start: Lsn,
    ) -> anyhow::Result<()> {
        self.store_piece().await?;
        let (name, content) = conn.timeline_history(next_tli).await?;
        self.store_history(sysid, next_tli, &name, content).await?;
        self.switch_timeline(next_tli, next_start);
        tracing::info!(timeline = next_tli, start = %next_start, "following the server onto a new timeline");
        Ok(())
    }

    /// Puts the cursor on the server's history. Where the stream resumes comes from the
    /// repository, whose newest WAL may be another history than the server's: after a restore
    /// as the new primary (production's timeline went on past the branch point), or a
    /// promotion this sidecar did not see (it stored up to or past the switch point). The
    /// server would refuse that start for ever; the stream goes on from where the server's
    /// history left the cursor's timeline, or, off that history altogether, from the slot.
    async fn onto_history(
        &mut self,
        conn: &mut ReplConn,
        sysid: u64,
        id: &super::replication::Identity,
        slot: &super::replication::SlotState,
    ) -> anyhow::Result<()> {
        let (tli, received, segno) = {
            let c = self.cursor();
            (c.seg.tli, c.received(self.seg_size), c.seg.segno)
        };
        if tli == id.timeline {
            return Ok(());
        }
        let history = if id.timeline > 1 {
            let (name, content) = conn.timeline_history(id.timeline).await?;
            crate::repo::wal::parse_history(&String::from_utf8_lossy(&content))
                .map_err(|e| anyhow::anyhow!("{name} from the server: {e}"))?
        } else {
            Vec::new()
        };
        let found = history.iter().position(|e| e.tli == tli);
        if found.is_some_and(|i| received <= history[i].switchpoint) {
            return Ok(());
        }
        // What the repository already holds of the server's own timeline (its sidecar ran
        // before): go on from there.
        if let Some(c) = self.newest_stored(sysid, Some(id.timeline)).await? {
            tracing::info!(
                timeline = id.timeline,
                segment = %c.seg.name(self.seg_size),
                "the repository's newest WAL is another history than the server's: resuming after what it holds of the server's timeline"
            );
            self.cursor = Some(c);
            self.pending_since = None;
            return Ok(());
        }
        let (end, next) = match found {
            Some(i) => (
                history[i].switchpoint,
                history.get(i + 1).map_or(id.timeline, |e| e.tli),
            ),
            None => (slot.restart_lsn.unwrap_or(id.xlogpos), id.timeline),
        };
        tracing::warn!(
            timeline = tli,
            %received,
            server_timeline = id.timeline,
            resume = %end,
            resume_timeline = next,
            "the repository's stream lies off this server's history (a restore as the new primary, or a promotion while the sidecar was away): streaming on from where the server's history goes"
        );
        if found.is_some() && Segment::of_lsn(tli, end, self.seg_size).segno == segno {
            self.switch_timeline(next, end);
        } else {
            self.cursor = Some(Cursor::empty(Segment::of_lsn(next, end, self.seg_size)));
        }
        self.pending_since = None;
        Ok(())
    }

    /// The server no longer has the WAL the stream needs: report the gap loudly and go on
    /// from where the slot begins. What was received and not stored is stored first.
    async fn gap(&mut self) {
        if let Err(e) = self.store_piece().await {
            tracing::warn!(error = %format!("{e:#}"), "could not store the WAL received before the gap");
        }
        let (Some(seen), Some(c)) = (self.slot, self.cursor.as_ref()) else {
            return;
        };
        let from = c.received(self.seg_size);
        let tli = c.seg.tli;
        // A slot made without reserving WAL (by hand) holds none until a stream starts on it:
        // the server still has the segment it is writing.
        let resume = seen.state.restart_lsn.unwrap_or(seen.server_pos);
        let resume_seg = Segment::of_lsn(
            seen.state.restart_tli.unwrap_or(seen.server_tli),
            resume,
            self.seg_size,
        );
        let resume_at = resume_seg.start_lsn(self.seg_size);
        let gap = format!(
            "WAL from {from} to {resume_at} on timeline {tli} was removed from the server before it was streamed{}; streaming resumes at {resume_at}. Unless archive_command stored those segments, point-in-time recovery cannot cross this gap: take a new base backup",
            if seen.recreated {
                " (the replication slot was missing and has been created again)"
            } else if seen.state.restart_lsn.is_none() {
                " (the replication slot held no WAL: it was made without reserving any)"
            } else {
                " (was the slot invalidated by max_slot_wal_keep_size?)"
            },
        );
        tracing::error!(gap = %gap, "WAL streaming gap");
        self.shared.stream_update(|f| {
            f.gaps += 1;
            f.last_gap = Some(gap.clone());
            f.error = Some(gap);
        });
        self.cursor = Some(Cursor::empty(resume_seg));
        self.pending_since = None;
    }

    /// Whether the server says the slot is invalidated (`wal_status = lost`).
    /// Ends the server's side of the connection given up as silent: its walsender would hold
    /// the slot (START_REPLICATION refused, "slot is active") until the server's own
    /// `wal_sender_timeout` notices, a minute by default. Only that process, and only while it
    /// holds this slot; when it cannot be ended (no right to signal it), the reconnects go on
    /// until the server lets it go.
    async fn end_abandoned(&self, pid: i32, slot: &str) {
        let ended = async {
            let client = self.settings.conn.connect().await?;
            let rows = client
                .query(super::sql::STREAM_ABANDONED, &[&pid, &slot])
                .await?;
            anyhow::Ok(rows.first().is_some_and(|r| r.get::<_, bool>(0)))
        }
        .await;
        match ended {
            Ok(true) => tracing::info!(
                pid,
                %slot,
                "ended the server's side of the replication connection given up as silent"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                pid,
                %slot,
                error = %format!("{e:#}"),
                "could not end the server's side of the replication connection given up as silent; the slot is free once the server's wal_sender_timeout ends it"
            ),
        }
    }

    async fn slot_lost(&self, slot: &str) -> bool {
        let Ok(client) = self.settings.conn.connect().await else {
            return false;
        };
        let row = client
            .query_opt(super::sql::STREAM_SLOT, &[&slot])
            .await
            .ok()
            .flatten();
        row.and_then(|r| r.get::<_, Option<String>>(1))
            .is_some_and(|s| s == "lost")
    }

    fn cursor(&self) -> &Cursor {
        self.cursor.as_ref().expect("located before streaming")
    }

    fn positions(&self) -> (Lsn, Lsn) {
        let c = self.cursor();
        (c.received(self.seg_size), c.stored_lsn(self.seg_size))
    }

    /// Where streaming resumes: after the newest stored WAL of this cluster (the end of its
    /// pieces, or after its newest complete segment), else where the slot begins.
    async fn locate(&self, sysid: u64, server_tli: u32, slot_start: Lsn) -> anyhow::Result<Cursor> {
        if let Some(c) = self.newest_stored(sysid, None).await? {
            return Ok(c);
        }
        Ok(Cursor::empty(Segment::of_lsn(
            server_tli,
            slot_start,
            self.seg_size,
        )))
    }

    /// The cursor after the newest stored WAL of this cluster (of timeline `only`, when
    /// given): the end of its pieces, or after its newest complete segment.
    async fn newest_stored(&self, sysid: u64, only: Option<u32>) -> anyhow::Result<Option<Cursor>> {
        let prefix = crate::repo::wal_prefix(sysid);
        let mut complete: Option<Segment> = None;
        let mut pieces: BTreeMap<Segment, Vec<Piece>> = BTreeMap::new();
        for obj in self.store.list(&prefix).await? {
            let Some(name) = obj
                .key
                .strip_prefix(&prefix)
                .and_then(|n| n.strip_suffix(".zst"))
            else {
                continue;
            };
            if let Some(WalFile::Segment(n)) = WalFile::classify(name) {
                if let Some(seg) = Segment::parse(&n, self.seg_size)
                    && only.is_none_or(|t| seg.tli == t)
                    && newer(seg, complete)
                {
                    complete = Some(seg);
                }
            } else if let Some(p) = Piece::parse(name) {
                if let Some(seg) = Segment::parse(&p.segment, self.seg_size)
                    && only.is_none_or(|t| seg.tli == t)
                {
                    pieces.entry(seg).or_default().push(p);
                }
            }
        }
        let partial = pieces
            .into_iter()
            .filter(|(s, _)| complete.is_none_or(|c| s.segno > c.segno))
            .max_by_key(|(s, _)| (s.segno, s.tli));
        if let Some((seg, list)) = partial {
            let (run, end) = contiguous(&list);
            let mut cursor = Cursor::empty(seg);
            for p in &run {
                let key = crate::repo::wal_key(sysid, &p.name());
                let read = pipeline::download(self.store.as_ref(), &key, Vec::new()).await;
                // In an encrypted repository the sidecar holds no key that decrypts: it cannot
                // read its pieces back, so it streams the segment again from its start (the
                // slot keeps it); the new pieces overlap the old ones with the same bytes.
                if let Err(e) = &read
                    && crate::error::exit_code(e) == crate::error::EXIT_INPUT
                    && !crate::storage::is_not_found(e)
                {
                    tracing::warn!(segment = %seg.name(self.seg_size), "the stored pieces are encrypted and this process holds no key for them: streaming the segment again from its start");
                    return Ok(Some(Cursor::empty(seg)));
                }
                let (bytes, _) =
                    read.with_context(|| format!("reading the streamed piece {}", p.name()))?;
                anyhow::ensure!(
                    bytes.len() as u64 == p.end - p.start,
                    "streamed piece {} holds {} bytes",
                    p.name(),
                    bytes.len()
                );
                cursor.scan.feed(&bytes);
                cursor.buf.extend_from_slice(&bytes);
            }
            cursor.stored = end as usize;
            tracing::info!(segment = %seg.name(self.seg_size), offset = end, "resuming the stream after the stored pieces");
            return Ok(Some(cursor));
        }
        Ok(complete.map(|c| {
            Cursor::empty(Segment {
                tli: c.tli,
                segno: c.segno + 1,
            })
        }))
    }

    /// Takes in streamed bytes; stores each segment that fills. True when something new is
    /// durable.
    async fn absorb(&mut self, mut data: Bytes) -> anyhow::Result<bool> {
        let seg_size = self.seg_size as usize;
        let mut stored = false;
        while !data.is_empty() {
            let c = self.cursor.as_mut().expect("located");
            let take = (seg_size - c.buf.len()).min(data.len());
            let chunk = data.split_to(take);
            c.scan.feed(&chunk);
            c.buf.extend_from_slice(&chunk);
            self.pending_since.get_or_insert_with(Instant::now);
            if c.buf.len() == seg_size {
                self.store_segment().await?;
                stored = true;
            }
        }
        Ok(stored)
    }

    /// Stores the filled segment under its plain name, then moves to the next one.
    async fn store_segment(&mut self) -> anyhow::Result<()> {
        let sysid = self.sysid.expect("identified");
        let c = self.cursor.take().expect("located");
        let name = c.seg.name(self.seg_size);
        let note = c.scan.last_xact_micros.map_or(0, |t| t as u64);
        let key = crate::repo::wal_key(sysid, &name);
        let data = Bytes::from(c.buf);
        self.put(&key, data.clone(), note)
            .await
            .with_context(|| format!("storing streamed segment {name}"))?;
        self.pending_since = None;
        // Its block references, for incremental backups; in the background, and best effort.
        let (store, opts, seg_size, seg_name) = (
            self.store.clone(),
            self.settings.pipe,
            self.seg_size,
            name.clone(),
        );
        tokio::spawn(async move {
            let summary = tokio::task::spawn_blocking(move || {
                crate::pg::walrefs::summarize(sysid, seg_size, &seg_name, &data)
            })
            .await
            .ok()
            .flatten();
            if let Some(summary) = summary {
                crate::pg::walrefs::store_summary(store.as_ref(), opts, sysid, &summary).await;
            }
        });
        // wal-push of this segment (archive_command) may now return without reading it.
        self.shared.segments.add(sysid, &name);
        tracing::debug!(segment = %name, "stored a streamed segment");
        self.cursor = Some(Cursor::empty(Segment {
            tli: c.seg.tli,
            segno: c.seg.segno + 1,
        }));
        let lsn = self.cursor().stored_lsn(self.seg_size);
        self.shared.stream_update(|f| {
            f.segments_stored += 1;
            f.stored_lsn = Some(lsn);
            f.stored_at = Some(Utc::now());
        });
        Ok(())
    }

    /// Stores what was received since the last piece. True when it stored something.
    async fn store_piece(&mut self) -> anyhow::Result<bool> {
        let Some(c) = self.cursor.as_ref() else {
            return Ok(false);
        };
        if c.buf.len() == c.stored {
            return Ok(false);
        }
        let sysid = self.sysid.expect("identified");
        let piece = Piece {
            segment: c.seg.name(self.seg_size),
            start: c.stored as u64,
            end: c.buf.len() as u64,
        };
        let note = c.scan.last_xact_micros.map_or(0, |t| t as u64);
        let data = Bytes::copy_from_slice(&c.buf[c.stored..]);
        let key = crate::repo::wal_key(sysid, &piece.name());
        self.put(&key, data, note)
            .await
            .with_context(|| format!("storing streamed WAL {}", piece.name()))?;
        self.pending_since = None;
        let c = self.cursor.as_mut().expect("located");
        c.stored = c.buf.len();
        let lsn = c.stored_lsn(self.seg_size);
        self.shared.stream_update(|f| {
            f.pieces_stored += 1;
            f.stored_lsn = Some(lsn);
            f.stored_at = Some(Utc::now());
        });
        Ok(true)
    }

    /// A create-only write of `data`, compressed with `note` in its trailer, retried while
    /// the store fails transiently. The name already holding the same bytes is success (a
    /// retry whose answer was lost, or `wal-push` storing the segment first).
    async fn put(&mut self, key: &str, data: Bytes, note: u64) -> anyhow::Result<()> {
        let started = Instant::now();
        let res = self.put_inner(key, data, note).await;
        // Only a quick store predicts the next one; a retried one says the store was down.
        self.put_time = started.elapsed().min(self.settings.interval / 2);
        res
    }

    async fn put_inner(&self, key: &str, data: Bytes, note: u64) -> anyhow::Result<()> {
        let pipe = self.settings.pipe;
        let compressed = compress_wal(pipe, data.clone(), note).await?;
        let mut pause = Duration::from_millis(200);
        loop {
            let err = match store_wal(self.store.as_ref(), pipe, key, &compressed, &data).await {
                Ok(()) => {
                    self.shared.stream_update(|f| {
                        if f.store_failing {
                            tracing::info!(%key, "storing streamed WAL works again");
                            f.store_failing = false;
                            f.error = None;
                        }
                    });
                    return Ok(());
                }
                Err(e) => e,
            };
            if !storage::is_transient(&err) && !storage::is_already_exists(&err) {
                return Err(err);
            }
            let line = crate::error::one_line(&err);
            tracing::warn!(%key, error = %line, "storing streamed WAL failed; retrying");
            // Down until it works again: what the server sends is stored nowhere meanwhile.
            self.shared.stream_update(|f| {
                f.store_failing = true;
                f.error = Some(format!("storing {key}: {line}"));
            });
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    async fn store_history(
        &mut self,
        sysid: u64,
        tli: u32,
        name: &str,
        content: Vec<u8>,
    ) -> anyhow::Result<()> {
        let expected = history_name(tli);
        anyhow::ensure!(
            name == expected,
            "TIMELINE_HISTORY {tli} named {name:?}, expected {expected}"
        );
        let key = crate::repo::wal_key(sysid, &expected);
        self.put(&key, content.into(), 0).await
    }

    /// The server moved to `tli` at `start`: the new timeline's first segment begins with the
    /// old one's bytes up to the switch (as PostgreSQL copies them), stored as its first piece.
    fn switch_timeline(&mut self, tli: u32, start: Lsn) {
        let seg = Segment::of_lsn(tli, start, self.seg_size);
        let old = self.cursor.take().expect("located");
        let mut c = Cursor::empty(seg);
        let offset = (start.0 - seg.start_lsn(self.seg_size).0) as usize;
        if old.seg.segno == seg.segno && old.buf.len() >= offset {
            c.scan.feed(&old.buf[..offset]);
            c.buf.extend_from_slice(&old.buf[..offset]);
        } else {
            // Not reachable with a server that streams what it switched from; stay safe by
            // storing nothing that does not start at offset 0.
            tracing::warn!(timeline = tli, %start, "the new timeline starts in a segment not streamed; its first segment will be left to archive_command");
        }
        self.cursor = Some(c);
    }
}

fn wal_removed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<ServerError>()
            .is_some_and(|s| s.wal_removed())
    })
}

/// Whether `s` is newer than `than` (higher segment; on a tie, the later timeline).
fn newer(s: Segment, than: Option<Segment>) -> bool {
    than.is_none_or(|t| (s.segno, s.tli) > (t.segno, t.tli))
}

/// WAL bytes compressed for `store_wal`, with `note` (the last transaction's time) in the
/// trailer.
pub async fn compress_wal(
    pipe: PipeOptions,
    data: Bytes,
    note: u64,
) -> anyhow::Result<(Bytes, pipeline::Trailer)> {
    let (compressed, trailer) = tokio::task::spawn_blocking(move || {
        pipeline::compress_to_memory(
            std::io::Cursor::new(data),
            pipe.compression,
            pipe.digest,
            || Ok(note),
            &AtomicBool::new(false),
        )
    })
    .await
    .context("compression task panicked")??;
    let compressed = Bytes::from(compressed.context("compression was abandoned")?);
    Ok((compressed, trailer))
}

/// One create-only write of WAL (`data`, as `compress_wal` compressed it). The name already
/// holding the same bytes is success (a retry whose answer was lost, or another writer
/// storing the same WAL first); different bytes under it are an error.
pub async fn store_wal(
    store: &dyn Store,
    pipe: PipeOptions,
    key: &str,
    (compressed, trailer): &(Bytes, pipeline::Trailer),
    data: &Bytes,
) -> anyhow::Result<()> {
    let err = match pipeline::put_compressed(
        store,
        key,
        compressed.clone(),
        pipe.upload,
        WriteMode::CreateOnly,
    )
    .await
    {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    if !storage::is_already_exists(&err) {
        return Err(err);
    }
    let Some(obj) = store.head(key).await? else {
        return Err(err);
    };
    let stored = pipeline::read_trailer(store, key, obj.size).await?;
    let recipients = pipeline::recipients(store).await?;
    let (held, _) = stored.holds_by(recipients.as_deref(), |d| {
        Ok(match d == trailer.digest {
            true => *trailer,
            false => pipeline::Trailer::of_digest(d, data),
        })
    })?;
    if held == Some(true) {
        return Ok(());
    }
    anyhow::bail!(
        "refusing to overwrite {key}: the repository holds different WAL under that name ({} bytes; this one: {}, {} bytes), or WAL encrypted for another key set",
        stored.plain_size(),
        trailer.digest_short(),
        trailer.plain_size
    )
}

/// Assembles the streamed pieces of `segment` into a full-size segment (zero-padded after
/// the last streamed byte), as `pg_receivewal`'s `.partial` files are used, and says where the
/// streamed bytes end. `None` when no piece starts at offset 0. The segment size comes from
/// the first page's long header, which must name cluster `sysid`.
pub async fn assemble(
    store: &dyn Store,
    sysid: u64,
    segment: &str,
) -> anyhow::Result<Option<(Vec<u8>, u64)>> {
    let prefix = format!("{}{segment}.", crate::repo::wal_prefix(sysid));
    let pieces: Vec<Piece> = store
        .list(&prefix)
        .await?
        .iter()
        .filter_map(|o| {
            let name = o.key.rsplit('/').next()?.strip_suffix(".zst")?;
            Piece::parse(name)
        })
        .collect();
    let (run, end) = contiguous(&pieces);
    if run.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for p in &run {
        let key = crate::repo::wal_key(sysid, &p.name());
        let (bytes, _) = pipeline::download(store, &key, Vec::new())
            .await
            .with_context(|| format!("reading streamed WAL {}", p.name()))?;
        anyhow::ensure!(
            bytes.len() as u64 == p.end - p.start,
            "streamed WAL {} holds {} bytes, its name says {}",
            p.name(),
            bytes.len(),
            p.end - p.start
        );
        out.extend_from_slice(&bytes);
    }
    let header = out
        .get(..40)
        .context("streamed WAL shorter than a page header")?;
    let stored_sysid = u64::from_le_bytes(header[24..32].try_into().expect("8 bytes"));
    let seg_size = u32::from_le_bytes(header[32..36].try_into().expect("4 bytes")) as u64;
    anyhow::ensure!(
        stored_sysid == sysid,
        "streamed WAL {segment} belongs to cluster {stored_sysid}, not {sysid}"
    );
    anyhow::ensure!(
        seg_size.is_power_of_two()
            && ((1 << 20)..=(1 << 30)).contains(&seg_size)
            && end <= seg_size,
        "streamed WAL {segment}: its first page header gives a segment size of {seg_size}"
    );
    out.resize(seg_size as usize, 0);
    Ok(Some((out, end)))
}

/// Reads the slot's retained WAL every few seconds over an ordinary connection, for
/// `dbagent_wal_stream_slot_retained_bytes` and its alert. A slot PostgreSQL invalidated
/// (`wal_status = lost`) is a gap, reported like one.
pub async fn watch_slot(
    settings: Settings,
    shared: Arc<Shared>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = settings.conn.connect().await.ok();
        }
        if let Some(c) = &client {
            match c
                .query_opt(super::sql::STREAM_SLOT, &[&settings.slot])
                .await
            {
                Ok(Some(row)) => {
                    let retained: Option<i64> = row.get(0);
                    let status: Option<String> = row.get(1);
                    let lost = status.as_deref() == Some("lost");
                    shared.stream_update(|f| {
                        f.slot_retained_bytes = retained.map(|b| b.max(0) as u64);
                        if lost && f.slot_wal_status.as_deref() != Some("lost") {
                            let gap = format!(
                                "replication slot {} was invalidated (wal_status lost, max_slot_wal_keep_size exceeded): WAL not yet streamed is gone from the server",
                                settings.slot
                            );
                            tracing::error!(gap = %gap, "WAL streaming gap");
                            f.gaps += 1;
                            f.last_gap = Some(gap);
                        }
                        f.slot_wal_status = status;
                    });
                }
                Ok(None) => shared.stream_update(|f| {
                    f.slot_retained_bytes = None;
                    f.slot_wal_status = None;
                }),
                Err(e) => {
                    tracing::debug!(error = %e, "reading the streaming slot");
                    client = None;
                }
            }
        }
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}
