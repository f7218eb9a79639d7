//! A base backup read with the replication protocol's `BASE_BACKUP` command (PostgreSQL 15's
//! form) and stored as the one tar that `pg_basebackup -D - -Ft -X none` wrote on stdout, so
//! no child process sits between the server and the compressor.
//!
//! The server answers with its start position, the list of tablespaces, then one COPY stream
//! whose CopyData messages start with a type byte: `n` a new archive (name, tablespace
//! location), `d` archive or manifest bytes, `p` progress, `m` the manifest follows; then its
//! end position, and an error instead of the command's completion when something failed late
//! (a checksum failure). As `pg_basebackup` does when it writes to stdout:
//!
//! - only the main tablespace is accepted (a single tar cannot hold the others);
//! - the archive passes through unchanged up to its end-of-archive blocks, which are held back;
//! - `backup_manifest` is appended as the last member, with the header `pg_basebackup` makes
//!   (mode from `data_directory_mode`, uid 04000, gid 02000, owner names `postgres`), then
//!   two blocks of zeros end the tar.
//!
//! The manifest is kept in memory until the end (about 150 bytes per file of the cluster), as
//! `pg_basebackup` keeps it. The archive is handed over in the server's messages through a
//! bounded channel to the compressor's blocking thread, so memory stays bounded.

use std::future::Future;
use std::io::Read;

use anyhow::{Context, bail};
use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

use super::conn::ConnInfo;
use super::replication::{Frame, ReplConn, data_row};
use super::tarscan::TarScanner;
use crate::pipeline::{self, PipeOptions, Tap};
use crate::repo::manifest::ObjectRef;
use crate::repo::wal::Lsn;
use crate::storage::Store;

const BLOCK: usize = 512;
/// The archive goes to the compressor's thread in batches of about this many bytes (the
/// server's messages are about 32 KiB, and a wake-up per message cost more than the copy)...
const BATCH: usize = 256 << 10;
/// ...and at most this many batches wait for it: 1 MiB, what the pipe from `pg_basebackup`
/// held.
const QUEUED_BATCHES: usize = 4;
/// Owner and group ids of the members `pg_basebackup` adds itself ("what PostgreSQL has
/// historically used").
const INJECTED_UID: u64 = 0o4000;
const INJECTED_GID: u64 = 0o2000;

/// What one CopyData message of the stream says.
#[derive(Debug, PartialEq)]
enum Message {
    /// A new archive begins: its name (`base.tar`, `<oid>.tar`) and the tablespace's location
    /// (empty for the main data directory).
    Archive { name: String, location: String },
    /// Bytes of the current archive, or of the manifest once it has begun.
    Data(Bytes),
    /// How many bytes the server has sent so far.
    Progress(u64),
    /// The backup manifest follows.
    Manifest,
}

fn parse_message(mut body: Bytes) -> anyhow::Result<Message> {
    anyhow::ensure!(
        !body.is_empty(),
        "an empty message in the base backup stream"
    );
    let kind = body.get_u8();
    let mut cstring = |what: &str| -> anyhow::Result<String> {
        let end = body
            .iter()
            .position(|&b| b == 0)
            .with_context(|| format!("a new-archive message without its {what}"))?;
        let s = String::from_utf8_lossy(&body[..end]).into_owned();
        body.advance(end + 1);
        Ok(s)
    };
    Ok(match kind {
        b'n' => {
            let name = cstring("name")?;
            let location = cstring("location")?;
            Message::Archive { name, location }
        }
        b'd' => Message::Data(body),
        b'p' => {
            anyhow::ensure!(body.len() >= 8, "a short progress message");
            Message::Progress(body.get_u64())
        }
        b'm' => Message::Manifest,
        other => bail!(
            "an unknown message {:?} in the base backup stream",
            other as char
        ),
    })
}

#[derive(Debug, PartialEq)]
enum Part {
    Nothing,
    Archive,
    /// Past the archive's first all-zero block: only zeros may follow.
    ArchiveEnd,
    Manifest,
}

/// Turns the stream's messages into the tar `pg_basebackup -D -` writes (see the module docs).
/// It follows the archive's member boundaries (one header parse per member) to find where the
/// end-of-archive blocks begin.
#[derive(Debug)]
struct Assembler {
    part: Part,
    /// A member header still incomplete.
    header: Vec<u8>,
    /// Bytes of the current member's body and padding still to pass through.
    remaining: u64,
    manifest: Vec<u8>,
    /// Mode of the manifest member (0600, or 0640 with group access).
    file_mode: u64,
    /// Its modification time (Unix seconds).
    mtime: u64,
}

impl Assembler {
    fn new(file_mode: u64, mtime: u64) -> Assembler {
        Assembler {
            part: Part::Nothing,
            header: Vec::with_capacity(BLOCK),
            remaining: 0,
            manifest: Vec::new(),
            file_mode,
            mtime,
        }
    }

    /// Takes one message; appends to `out` the bytes that go to the store.
    fn take(&mut self, msg: Message, out: &mut Vec<Bytes>) -> anyhow::Result<()> {
        match msg {
            Message::Archive { name, location } => {
                if self.part != Part::Nothing || !location.is_empty() {
                    bail!(
                        "the server sent a second archive ({name}{}): only the main tablespace can be stored",
                        if location.is_empty() {
                            String::new()
                        } else {
                            format!(" for {location}")
                        }
                    );
                }
                self.part = Part::Archive;
            }
            Message::Data(data) => match self.part {
                Part::Nothing => bail!("archive data before any archive began"),
                Part::Archive | Part::ArchiveEnd => self.archive(data, out)?,
                Part::Manifest => self.manifest.extend_from_slice(&data),
            },
            Message::Progress(_) => {}
            Message::Manifest => {
                if !matches!(self.part, Part::Archive | Part::ArchiveEnd) {
                    bail!("a backup manifest without an archive before it");
                }
                self.archive_complete()?;
                self.part = Part::Manifest;
            }
        }
        Ok(())
    }

    fn archive(&mut self, mut data: Bytes, out: &mut Vec<Bytes>) -> anyhow::Result<()> {
        while !data.is_empty() {
            if self.part == Part::ArchiveEnd {
                if data.iter().any(|&b| b != 0) {
                    bail!("the archive goes on after its end-of-archive block");
                }
                return Ok(());
            }
            if self.remaining > 0 {
                let n = self.remaining.min(data.len() as u64) as usize;
                out.push(data.split_to(n));
                self.remaining -= n as u64;
                continue;
            }
            let n = (BLOCK - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data.advance(n);
            if self.header.len() < BLOCK {
                continue;
            }
            let header = std::mem::replace(&mut self.header, Vec::with_capacity(BLOCK));
            if header.iter().all(|&b| b == 0) {
                self.part = Part::ArchiveEnd;
                continue;
            }
            let size = super::tarscan::parse_size(&header[124..136]);
            self.remaining = size.next_multiple_of(BLOCK as u64);
            out.push(Bytes::from(header));
        }
        Ok(())
    }

    /// The archive has ended: it must not stop inside a member.
    fn archive_complete(&self) -> anyhow::Result<()> {
        if self.remaining > 0 || !self.header.is_empty() {
            bail!("the archive ended inside a member");
        }
        Ok(())
    }

    /// The end of the stream: the manifest member and the end-of-archive blocks.
    fn finish(self, out: &mut Vec<Bytes>) -> anyhow::Result<()> {
        match self.part {
            Part::Nothing => bail!("the server sent no archive"),
            Part::Archive | Part::ArchiveEnd => self.archive_complete()?,
            Part::Manifest => {
                let size = self.manifest.len() as u64;
                out.push(Bytes::from(
                    tar_header("backup_manifest", size, self.file_mode, self.mtime).to_vec(),
                ));
                let padding = (size.next_multiple_of(BLOCK as u64) - size) as usize;
                let mut manifest = self.manifest;
                manifest.resize(manifest.len() + padding, 0);
                out.push(Bytes::from(manifest));
            }
        }
        out.push(Bytes::from(vec![0u8; 2 * BLOCK]));
        Ok(())
    }
}

/// A regular file's header as PostgreSQL's `tarCreateHeader` writes it.
fn tar_header(name: &str, size: u64, mode: u64, mtime: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    let name = name.as_bytes();
    h[..name.len().min(99)].copy_from_slice(&name[..name.len().min(99)]);
    tar_number(&mut h[100..108], mode & 0o7777);
    tar_number(&mut h[108..116], INJECTED_UID);
    tar_number(&mut h[116..124], INJECTED_GID);
    tar_number(&mut h[124..136], size);
    tar_number(&mut h[136..148], mtime);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..273].copy_from_slice(b"postgres");
    h[297..305].copy_from_slice(b"postgres");
    tar_number(&mut h[329..337], 0);
    tar_number(&mut h[337..345], 0);
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| if (148..156).contains(&i) { b' ' } else { b } as u64)
        .sum();
    tar_number(&mut h[148..156], sum);
    h
}

/// A number field: octal with a trailing space, or GNU base-256 when it does not fit.
fn tar_number(field: &mut [u8], mut val: u64) {
    let len = field.len();
    if val < 1u64 << ((len - 1) * 3) {
        field[len - 1] = b' ';
        for b in field[..len - 1].iter_mut().rev() {
            *b = b'0' + (val & 7) as u8;
            val >>= 3;
        }
    } else {
        field[0] = 0x80;
        for b in field[1..].iter_mut().rev() {
            *b = val as u8;
            val >>= 8;
        }
    }
}

/// What the compressor's thread reads: the assembled tar, then either its explicit end or,
/// when the receiving side went away without one, an error (never a truncated success).
enum Piece {
    Data(Vec<Bytes>),
    End,
}

struct StreamReader {
    rx: mpsc::Receiver<Piece>,
    /// What is left of the batch being read, last piece first.
    current: Vec<Bytes>,
    ended: bool,
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() && !self.ended {
            if let Some(piece) = self.current.last_mut() {
                let k = piece.len().min(buf.len() - n);
                buf[n..n + k].copy_from_slice(&piece[..k]);
                piece.advance(k);
                if piece.is_empty() {
                    self.current.pop();
                }
                n += k;
                continue;
            }
            // Fill the caller's block with what is already queued; wait only when empty.
            let next = if n == 0 {
                self.rx.blocking_recv()
            } else {
                match self.rx.try_recv() {
                    Ok(p) => Some(p),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            match next {
                Some(Piece::Data(mut batch)) => {
                    batch.reverse();
                    self.current = batch;
                }
                Some(Piece::End) => self.ended = true,
                None if n > 0 => break,
                None => {
                    return Err(std::io::Error::other(
                        "the base backup stream stopped before its end",
                    ));
                }
            }
        }
        Ok(n)
    }
}

/// Where the backup starts and ends, as the server reported it.
#[derive(Debug, Clone, Copy)]
pub struct Positions {
    pub start: Lsn,
    pub timeline: u32,
    pub end: Lsn,
}

/// Runs `BASE_BACKUP` on a replication connection to `conn` and stores the tar under `key`,
/// compressed while it is read. `stop` is a watchdog: when it resolves, the backup is
/// abandoned and its error is the result. Whatever fails, nothing is left under `key`.
/// Returns the object, the scanner that saw every byte, and the server's positions.
pub async fn to_store(
    conn: &ConnInfo,
    label: &str,
    store: &dyn Store,
    key: &str,
    pipe: PipeOptions,
    stop: impl Future<Output = anyhow::Error>,
) -> anyhow::Result<(ObjectRef, TarScanner, Positions)> {
    // A writer the repository refuses (encryption keys) is refused before the server works.
    pipeline::recipients(store).await?;
    let mut repl = ReplConn::connect(conn).await?;
    let (tx, rx) = mpsc::channel(QUEUED_BATCHES);
    let (reader, scanner) = Tap::new(
        StreamReader {
            rx,
            current: Vec::new(),
            ended: false,
        },
        TarScanner::default(),
    );
    let server = conn.describe();
    let receive = async move {
        let res = receive(&mut repl, label, &tx).await;
        repl.close().await;
        res.with_context(|| format!("base backup from {server}"))
    };
    let mut receive = Box::pin(receive);
    let mut upload = Box::pin(pipeline::upload(store, key, reader, pipe));
    let mut stop = std::pin::pin!(stop);
    let (mut received, mut uploaded, mut stopped) = (None, None, None);
    while uploaded.is_none() && stopped.is_none() {
        tokio::select! {
            r = &mut receive, if received.is_none() => received = Some(r),
            u = &mut upload => uploaded = Some(u),
            e = &mut stop => stopped = Some(e),
        }
        if matches!(uploaded, Some(Err(_))) {
            break;
        }
    }
    // The connection closes and the reader sees the stream cut off: the upload ends with an
    // error and leaves nothing.
    drop(receive);
    let uploaded = match uploaded {
        Some(u) => u,
        None => upload.await,
    };
    let result = match (stopped, received, uploaded) {
        (Some(e), _, _) => Err(e),
        // The server's error, not the stream cut short that followed from it.
        (None, Some(Err(e)), _) => Err(e),
        (None, _, Err(e)) => Err(e),
        (None, Some(Ok(positions)), Ok(written)) => Ok((written, positions)),
        (None, None, Ok(_)) => Err(anyhow::anyhow!(
            "the base backup stream ended without the server's end position"
        )),
    };
    match result {
        Ok((written, positions)) => {
            let scanner = std::mem::take(&mut *scanner.lock().unwrap_or_else(|e| e.into_inner()));
            Ok((ObjectRef::written(key, &written), scanner, positions))
        }
        Err(e) => {
            let _ = store.delete(key).await;
            Err(e)
        }
    }
}

/// `'text'` with `'` doubled, as the replication command grammar reads strings.
fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Speaks the protocol and sends the assembled tar to `tx`, then its end.
async fn receive(
    repl: &mut ReplConn,
    label: &str,
    tx: &mpsc::Sender<Piece>,
) -> anyhow::Result<Positions> {
    let version = show(repl, "server_version_num").await?;
    if version.parse::<u32>().unwrap_or(0) < 150000 {
        return Err(crate::input_err!(
            "the server is PostgreSQL {} (server_version_num {version}); dbagent backup speaks PostgreSQL 15's BASE_BACKUP protocol and needs version 15 or newer",
            show(repl, "server_version").await.unwrap_or_default()
        ));
    }
    let file_mode = match show(repl, "data_directory_mode").await {
        Ok(m) if u32::from_str_radix(m.trim(), 8).is_ok_and(|m| m & 0o070 != 0) => 0o640,
        _ => 0o600,
    };
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let send = |piece: Piece| async move {
        tx.send(piece)
            .await
            .map_err(|_| anyhow::anyhow!("the upload stopped"))
    };

    let command = format!(
        "BASE_BACKUP ( LABEL {}, CHECKPOINT 'fast', TABLESPACE_MAP, MANIFEST 'yes', TARGET 'client' )",
        quote_literal(label)
    );
    repl.send_query(&command).await?;
    // Before the COPY: the start position, then one row per tablespace (the main one last,
    // with a NULL oid).
    let mut results: Vec<Vec<Vec<Option<String>>>> = vec![vec![]];
    loop {
        let f = repl.read_frame().await?;
        match f.tag {
            b'T' => {}
            b'D' => results
                .last_mut()
                .expect("never empty")
                .push(data_row(&f.body)?),
            b'C' => results.push(vec![]),
            b'H' => break,
            _ => repl.common(f)?,
        }
    }
    let (start, timeline) = position(results.first(), "start")?;
    let tablespaces = results.get(1).map_or(&[][..], |t| t.as_slice());
    let others: Vec<String> = tablespaces
        .iter()
        .filter(|row| row.first().cloned().flatten().is_some())
        .map(|row| row.get(1).cloned().flatten().unwrap_or_default())
        .collect();
    if !others.is_empty() {
        return Err(crate::input_err!(
            "the server has tablespaces besides pg_default and pg_global (at {}): dbagent backup stores the data directory as one tar and cannot back them up; move their tables to pg_default (ALTER TABLE … SET TABLESPACE pg_default) and drop them",
            others.join(", ")
        ));
    }
    tracing::debug!(%start, timeline, "base backup started on the server");

    let mut assembler = Assembler::new(file_mode, mtime);
    let mut out = Vec::new();
    loop {
        let Frame { tag, body } = repl.read_frame().await?;
        match tag {
            b'd' => {
                assembler.take(parse_message(body)?, &mut out)?;
                if out.iter().map(Bytes::len).sum::<usize>() >= BATCH {
                    send(Piece::Data(std::mem::take(&mut out))).await?;
                }
            }
            b'c' => break,
            _ => repl.common(Frame { tag, body })?,
        }
    }
    // After the COPY: the end position, then the command's completion, or an error (a
    // checksum failure is reported only here).
    let mut end = None;
    loop {
        let f = repl.read_frame().await?;
        match f.tag {
            b'T' | b'C' => {}
            b'D' => end = Some(data_row(&f.body)?),
            b'Z' => break,
            _ => repl.common(f)?,
        }
    }
    let end = end.context("the server sent no end position")?;
    let (end, _) = position(Some(&vec![end]), "end")?;
    assembler.finish(&mut out)?;
    send(Piece::Data(out)).await?;
    send(Piece::End).await?;
    Ok(Positions {
        start,
        timeline,
        end,
    })
}

/// The `(lsn, timeline)` row of a result set.
fn position(rows: Option<&Vec<Vec<Option<String>>>>, what: &str) -> anyhow::Result<(Lsn, u32)> {
    let row = rows
        .and_then(|r| r.first())
        .with_context(|| format!("the server sent no {what} position"))?;
    let lsn = row
        .first()
        .cloned()
        .flatten()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("the server sent an unreadable {what} position {row:?}"))?;
    let tli = row
        .get(1)
        .cloned()
        .flatten()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((lsn, tli))
}

/// `SHOW name` on the replication connection.
async fn show(repl: &mut ReplConn, name: &str) -> anyhow::Result<String> {
    repl.query(&format!("SHOW {name}"))
        .await?
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .with_context(|| format!("SHOW {name} returned nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(b: &[u8]) -> Bytes {
        let mut v = vec![b'd'];
        v.extend_from_slice(b);
        Bytes::from(v)
    }

    #[test]
    fn messages_as_the_server_sends_them() {
        assert_eq!(
            parse_message(Bytes::from_static(b"nbase.tar\0\0")).unwrap(),
            Message::Archive {
                name: "base.tar".into(),
                location: String::new()
            }
        );
        assert_eq!(
            parse_message(Bytes::from_static(b"n16384.tar\0/srv/ts\0")).unwrap(),
            Message::Archive {
                name: "16384.tar".into(),
                location: "/srv/ts".into()
            }
        );
        assert_eq!(
            parse_message(data(b"abc")).unwrap(),
            Message::Data(Bytes::from_static(b"abc"))
        );
        assert_eq!(
            parse_message(Bytes::from_static(b"p\0\0\0\0\0\0\x01\0")).unwrap(),
            Message::Progress(256)
        );
        assert_eq!(
            parse_message(Bytes::from_static(b"m")).unwrap(),
            Message::Manifest
        );
        assert!(parse_message(Bytes::from_static(b"nbase.tar")).is_err());
        assert!(parse_message(Bytes::from_static(b"p\0\0")).is_err());
        assert!(parse_message(Bytes::from_static(b"x")).is_err());
        assert!(parse_message(Bytes::new()).is_err());
    }

    /// A tar as PostgreSQL 15's server sends it: members, then two zero blocks.
    fn server_archive() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let label =
            b"START WAL LOCATION: 0/5000028 (file 000000010000000000000005)\nSTART TIMELINE: 1\n";
        for (name, body) in [
            ("backup_label", &label[..]),
            ("tablespace_map", &b""[..]),
            ("base/1/1259", &[7u8; 9000][..]),
        ] {
            let mut h = tar::Header::new_ustar();
            h.set_size(body.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            b.append_data(&mut h, name, body).unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o700);
        h.set_cksum();
        b.append_data(&mut h, "pg_wal", &b""[..]).unwrap();
        b.into_inner().unwrap()
    }

    fn assemble(messages: Vec<Message>) -> anyhow::Result<Vec<u8>> {
        let mut a = Assembler::new(0o600, 1_700_000_000);
        let mut out = Vec::new();
        for m in messages {
            a.take(m, &mut out)?;
        }
        a.finish(&mut out)?;
        Ok(out.concat())
    }

    #[test]
    fn the_archive_passes_through_and_the_manifest_is_its_last_member() {
        let archive = server_archive();
        assert!(archive.ends_with(&[0u8; 1024]));
        let manifest = b"{ \"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/5000028\", \"End-LSN\": \"0/5000100\" }\n] }\n";
        for step in [1usize, 100, 512, 700, 1 << 20] {
            let mut messages = vec![Message::Archive {
                name: "base.tar".into(),
                location: String::new(),
            }];
            for (i, chunk) in archive.chunks(step).enumerate() {
                messages.push(Message::Data(Bytes::copy_from_slice(chunk)));
                if i == 3 {
                    messages.push(Message::Progress(42));
                }
            }
            messages.push(Message::Manifest);
            for chunk in manifest.chunks(7) {
                messages.push(Message::Data(Bytes::copy_from_slice(chunk)));
            }
            let out = assemble(messages).unwrap();
            // The server's members unchanged, its end blocks replaced by the manifest's member.
            let members = archive.len() - 1024;
            assert_eq!(out[..members], archive[..members], "step {step}");
            assert_eq!(out.len() % BLOCK, 0);
            assert!(out.ends_with(&[0u8; 1024]));
            let mut entries = Vec::new();
            let mut t = tar::Archive::new(&out[..]);
            for e in t.entries().unwrap() {
                let mut e = e.unwrap();
                let name = e.path().unwrap().display().to_string();
                let mut body = Vec::new();
                e.read_to_end(&mut body).unwrap();
                entries.push((name, e.header().mode().unwrap(), body));
            }
            let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
            assert_eq!(
                names,
                [
                    "backup_label",
                    "tablespace_map",
                    "base/1/1259",
                    "pg_wal",
                    "backup_manifest"
                ]
            );
            let last = entries.last().unwrap();
            assert_eq!((last.1, &last.2[..]), (0o600, &manifest[..]));
            // What the backup reads from it.
            let (mut tap, scanner) =
                Tap::new(std::io::Cursor::new(out.clone()), TarScanner::default());
            std::io::copy(&mut tap, &mut std::io::sink()).unwrap();
            let facts = scanner.lock().unwrap().facts().clone();
            assert_eq!(facts.start(), Some(("0/5000028".parse().unwrap(), 1)));
            assert_eq!(facts.stop(), Some("0/5000100".parse().unwrap()));
        }
    }

    #[test]
    fn the_manifest_header_is_the_one_pg_basebackup_writes() {
        // From `pg_basebackup -D - -Ft` (PostgreSQL 15): name, mode, ids, size, mtime,
        // checksum, type, magic, owner names, device numbers.
        let h = tar_header("backup_manifest", 137326, 0o600, 0o15305015512);
        assert_eq!(
            &h[100..157],
            b"0000600 0004000 0002000 00000414156 15305015512 0016246 0"
        );
        assert_eq!(
            &h[257..345],
            b"ustar\x0000postgres\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0postgres\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x000000000 0000000 "
        );
        let mut field = [0u8; 12];
        tar_number(&mut field, 10 << 30);
        assert_eq!(super::super::tarscan::parse_size(&field), 10 << 30);
    }

    #[test]
    fn a_broken_stream_is_refused() {
        let archive = server_archive();
        let base = || Message::Archive {
            name: "base.tar".into(),
            location: String::new(),
        };
        // Cut inside a member.
        let cut = Message::Data(Bytes::copy_from_slice(&archive[..700]));
        assert!(assemble(vec![base(), cut]).is_err());
        // Data before any archive; a second archive (a tablespace).
        assert!(assemble(vec![Message::Data(Bytes::from_static(b"x"))]).is_err());
        let err = assemble(vec![
            Message::Archive {
                name: "16384.tar".into(),
                location: "/srv/ts".into(),
            },
            base(),
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("only the main tablespace"),
            "{err}"
        );
        // Something after the end-of-archive blocks.
        let mut more = archive.clone();
        more.extend_from_slice(&[1u8; 512]);
        assert!(assemble(vec![base(), Message::Data(Bytes::from(more))]).is_err());
        // No archive at all.
        assert!(assemble(vec![]).is_err());
    }

    #[test]
    fn the_reader_never_mistakes_a_cut_for_the_end() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Piece::Data(vec![Bytes::from_static(b"abc")]))
            .unwrap();
        tx.try_send(Piece::Data(vec![Bytes::from_static(b"def")]))
            .unwrap();
        drop(tx);
        let mut r = StreamReader {
            rx,
            current: Vec::new(),
            ended: false,
        };
        let mut buf = [0u8; 4];
        assert_eq!(r.read(&mut buf).unwrap(), 4);
        assert_eq!(r.read(&mut buf).unwrap(), 2);
        assert!(r.read(&mut buf).is_err());
        let (tx, rx) = mpsc::channel(4);
        let batch = ["ab", "", "c", "def"].map(|s| Bytes::from_static(s.as_bytes()));
        tx.try_send(Piece::Data(batch.to_vec())).unwrap();
        tx.try_send(Piece::Data(vec![Bytes::from_static(b"g")]))
            .unwrap();
        tx.try_send(Piece::End).unwrap();
        let mut r = StreamReader {
            rx,
            current: Vec::new(),
            ended: false,
        };
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcdefg");
    }
}
