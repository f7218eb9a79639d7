//! Streaming: reader -> zstd -> checksum of the plain bytes -> (encryption) -> (multipart)
//! upload, and back.
//!
//! Every object ends with a zstd *skippable frame* (the trailer) carrying the plain size and
//! SHA-256. Standard tools ignore skippable frames, so `zstd -d < object` gives the plain
//! bytes back by hand, while `wal-fetch` and `restore` verify the checksum before anything is
//! handed to PostgreSQL. Compression and hashing run on blocking threads; the upload runs on
//! the async runtime; the two are joined by a bounded channel, so memory stays at a few parts
//! whatever the object size.
//!
//! This is also the one place that encrypts and decrypts (see `crypto`): every write asks the
//! store's keyring for the recipients before it writes a byte (refused, exit 1, when they do
//! not match the repository's records), and every read opens an encrypted object with the
//! keyring's identities (refused, exit 1, naming the setting, before a byte is handed on).
//! Every writer and reader (`wal-push`, backups, dumps, globals, binlogs; restores, `wal-fetch`,
//! drills, `verify --full`) goes through here or through `proc`, which calls here.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::config::{Compression, UploadConfig};
use crate::crypto::keys::IDENTITY_SETTING;
use crate::crypto::{Identities, Recipients, SEAL_LEN, Seal, SealWriter};
use crate::input_err;
use crate::storage::Store;

/// zstd skippable frame magic (0x184D2A50..0x184D2A5F are all skippable).
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
/// The trailer of an object whose plain bytes are identified by SHA-256.
const TRAILER_TAG: &[u8; 8] = b"DBAGENT1";
/// The trailer of an object identified by xxh3-128 (in the first 16 bytes of the digest
/// field, the rest zero). Such an object also starts with `XXH3_HEADER`, so that a reader
/// knows which digest to compute before it reaches the trailer.
const TRAILER_TAG_XXH3: &[u8; 8] = b"DBAGENT2";
/// A skippable frame (zstd ignores it) opening every object identified by xxh3-128.
const XXH3_HEADER: [u8; 16] = {
    let mut h = [0u8; 16];
    let magic = SKIPPABLE_MAGIC.to_le_bytes();
    let (len, tag) = (8u32.to_le_bytes(), *b"DBAGXXH3");
    let mut i = 0;
    while i < 4 {
        h[i] = magic[i];
        h[4 + i] = len[i];
        i += 1;
    }
    let mut i = 0;
    while i < 8 {
        h[8 + i] = tag[i];
        i += 1;
    }
    h
};
const TRAILER_PAYLOAD: usize = 8 + 8 + 32 + 8;
pub const TRAILER_LEN: usize = 8 + TRAILER_PAYLOAD;
const READ_BLOCK: usize = 1 << 20;
/// S3 and B2 accept at most this many parts per object, each at most 5 GiB.
pub const MAX_PARTS: u64 = 10_000;
pub const MAX_PART_SIZE: u64 = 5 << 30;

/// The size of part `index` (0-based) of a stream cut into `base`-sized parts at first.
///
/// Parts double every 2,000 parts for the first 6,000 (so objects up to 68 GiB at the 5 MiB
/// minimum, 109 GiB at the 8 MiB default, keep parts no bigger than 4× the base, and memory
/// small), then every 400 parts, up to S3's 5 GiB. The sum of 10,000 parts then exceeds
/// S3's 5 TiB object limit from any base of at least 5 MiB (see the tests): a stream of
/// unknown length can always be stored as one object. Memory is about (concurrency + 1)
/// parts, so it grows only for objects far beyond 100 GiB.
pub fn part_size(base: usize, index: u64) -> usize {
    let doublings = if index < 6000 {
        index / 2000
    } else {
        3 + (index - 6000) / 400
    };
    let size = (base as u64).saturating_mul(1u64 << doublings.min(40));
    size.min(MAX_PART_SIZE.max(base as u64)) as usize
}

/// How an object's plain bytes are identified. Backups, dumps and binlogs use SHA-256 (their
/// manifests name it); WAL uses xxh3-128, which hashes a 16 MiB segment in under a millisecond
/// where SHA-256 takes 9 ms of the archiver's time for every segment, twice per backup on its
/// critical path (see `pg::wal`). Both detect corruption and tell two segments apart; neither
/// is what keeps a repository authentic (age's authentication does, where it is encrypted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest {
    Sha256,
    Xxh3,
}

impl Digest {
    pub const ALL: [Digest; 2] = [Digest::Xxh3, Digest::Sha256];
}

/// Computes a `Digest`.
enum Hasher {
    Sha256(Box<Sha256>),
    Xxh3(Box<xxhash_rust::xxh3::Xxh3>),
}

impl Hasher {
    fn new(digest: Digest) -> Hasher {
        match digest {
            Digest::Sha256 => Hasher::Sha256(Box::new(Sha256::new())),
            Digest::Xxh3 => Hasher::Xxh3(Box::new(xxhash_rust::xxh3::Xxh3::new())),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Xxh3(h) => h.update(bytes),
        }
    }

    fn finish(self) -> [u8; 32] {
        match self {
            Hasher::Sha256(h) => (*h).finalize().into(),
            Hasher::Xxh3(h) => {
                let mut sum = [0u8; 32];
                sum[..16].copy_from_slice(&h.digest128().to_le_bytes());
                sum
            }
        }
    }
}

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The plain bytes' identity, as stored in the trailer and in manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub plain_size: u64,
    pub digest: Digest,
    /// SHA-256, or xxh3-128 little endian followed by 16 zero bytes.
    pub sum: [u8; 32],
}

impl Trailer {
    /// `note` fills the trailer's last eight bytes (zero when the object has nothing to say;
    /// a WAL segment's is the time of its last transaction, see `pg::walscan`).
    pub fn encode(&self, note: u64) -> [u8; TRAILER_LEN] {
        let mut out = [0u8; TRAILER_LEN];
        out[0..4].copy_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&(TRAILER_PAYLOAD as u32).to_le_bytes());
        out[8..16].copy_from_slice(match self.digest {
            Digest::Sha256 => TRAILER_TAG,
            Digest::Xxh3 => TRAILER_TAG_XXH3,
        });
        out[16..24].copy_from_slice(&self.plain_size.to_le_bytes());
        out[24..56].copy_from_slice(&self.sum);
        out[56..64].copy_from_slice(&note.to_le_bytes());
        out
    }

    /// The note of an encoded trailer (`decode` must have accepted it).
    pub fn note(bytes: &[u8]) -> u64 {
        bytes
            .get(56..64)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    }

    pub fn decode(bytes: &[u8]) -> Option<Trailer> {
        if bytes.len() != TRAILER_LEN
            || bytes[0..4] != SKIPPABLE_MAGIC.to_le_bytes()
            || bytes[4..8] != (TRAILER_PAYLOAD as u32).to_le_bytes()
        {
            return None;
        }
        let digest = match &bytes[8..16] {
            t if t == TRAILER_TAG => Digest::Sha256,
            t if t == TRAILER_TAG_XXH3 => Digest::Xxh3,
            _ => return None,
        };
        let plain_size = u64::from_le_bytes(bytes[16..24].try_into().ok()?);
        let sum = bytes[24..56].try_into().ok()?;
        Some(Trailer {
            plain_size,
            digest,
            sum,
        })
    }

    /// The digest in hex; an xxh3-128 one is prefixed `xxh3:`, so that it never equals a
    /// SHA-256 (manifests hold SHA-256 as bare hex).
    pub fn digest_hex(&self) -> String {
        match self.digest {
            Digest::Sha256 => hex::encode(self.sum),
            Digest::Xxh3 => format!("xxh3:{}", hex::encode(&self.sum[..16])),
        }
    }

    /// The digest's name and first 16 hex digits, for messages.
    pub fn digest_short(&self) -> String {
        let hex = hex::encode(self.sum);
        match self.digest {
            Digest::Sha256 => format!("sha256 {}", &hex[..16]),
            Digest::Xxh3 => format!("xxh3 {}", &hex[..16]),
        }
    }

    /// The SHA-256 identity of bytes held in memory.
    pub fn of(bytes: &[u8]) -> Trailer {
        Trailer::of_digest(Digest::Sha256, bytes)
    }

    /// The identity of bytes held in memory, by `digest`.
    pub fn of_digest(digest: Digest, bytes: &[u8]) -> Trailer {
        let mut h = Hasher::new(digest);
        h.update(bytes);
        Trailer {
            plain_size: bytes.len() as u64,
            digest,
            sum: h.finish(),
        }
    }
}

/// What an upload wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub trailer: Trailer,
    pub stored_size: u64,
    /// The seal of an encrypted object.
    pub seal: Option<Seal>,
}

/// What a download read and verified: the plain trailer, and the seal of an encrypted object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    pub trailer: Trailer,
    pub seal: Option<Seal>,
}

/// The recipients a write into `store` encrypts for (`None`: a plain repository). Asked before
/// anything is written: a writer without recipients in an encrypted repository, or with
/// recipients that are not its current key set, is refused here (exit 1). A store opened
/// without a keyring (tests) still reads the records, so it cannot write plaintext into an
/// encrypted repository either.
pub async fn recipients(store: &dyn Store) -> anyhow::Result<Option<Arc<Recipients>>> {
    match store.keyring() {
        Some(keyring) => keyring.recipients(store).await,
        None => {
            crate::crypto::Records::load(store)
                .await?
                .write_mode("this repository", None)?;
            Ok(None)
        }
    }
}

/// Whether the object under `key` is stored in the clear even in an encrypted repository:
/// only PostgreSQL timeline history files, which are planning data (which timeline branched
/// from which, at which LSN) that `list`, `verify` and restore planning read without a key.
/// The writer is still checked against the records like any other.
pub fn stays_clear(key: &str) -> bool {
    key.ends_with(".history.zst")
}

/// The recipients for one object: none for what `stays_clear`.
async fn recipients_for(store: &dyn Store, key: &str) -> anyhow::Result<Option<Arc<Recipients>>> {
    let recipients = recipients(store).await?;
    Ok(recipients.filter(|_| !stays_clear(key)))
}

/// Refuses (exit 1) a reader that cannot open objects of every key set in `needed` (from the
/// manifests), before it starts writing anything anywhere.
pub async fn check_readable(
    store: &dyn Store,
    needed: &[crate::crypto::KeySet],
) -> anyhow::Result<()> {
    if needed.is_empty() {
        return Ok(());
    }
    match store.keyring() {
        Some(keyring) => keyring.check_reader(store, needed).await,
        None => Err(input_err!(
            "the objects to read are encrypted: readers need {IDENTITY_SETTING}, the secret keys; nothing was written"
        )),
    }
}

/// The key set new objects are written with, if the repository is encrypted: what WAL archived
/// from now on needs.
pub async fn current_key_set(store: &dyn Store) -> anyhow::Result<Option<crate::crypto::KeySet>> {
    let records = match store.keyring() {
        Some(keyring) => keyring.records(store).await?.current().cloned(),
        None => crate::crypto::Records::load(store)
            .await?
            .current()
            .cloned(),
    };
    records.map(|r| r.key_set()).transpose()
}

/// The identities a read from `store` decrypts with, if any are configured.
pub async fn identities(store: &dyn Store) -> anyhow::Result<Option<Arc<Identities>>> {
    match store.keyring() {
        Some(keyring) => keyring.identities().await,
        None => Ok(None),
    }
}

/// Where compressed bytes go: straight on, or through age first.
enum Sink<W: Write> {
    Plain(W),
    Sealed(Box<SealWriter<W>>),
}

impl<W: Write> Sink<W> {
    fn new(recipients: Option<&Recipients>, out: W) -> std::io::Result<Sink<W>> {
        Ok(match recipients {
            None => Sink::Plain(out),
            Some(r) => Sink::Sealed(Box::new(SealWriter::new(r, out)?)),
        })
    }

    /// Closes the age stream and appends the seal (encrypted objects).
    fn finish(self, trailer: &Trailer, note: u64) -> std::io::Result<(W, Option<Seal>)> {
        match self {
            Sink::Plain(w) => Ok((w, None)),
            Sink::Sealed(w) => {
                let (w, seal) = (*w).finish(trailer.plain_size, note, &trailer.sum)?;
                Ok((w, Some(seal)))
            }
        }
    }
}

impl<W: Write> Write for Sink<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Plain(w) => w.write(buf),
            Sink::Sealed(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Plain(w) => w.flush(),
            Sink::Sealed(w) => w.flush(),
        }
    }
}

/// Encrypts a whole object made by `compress_to_memory` for `recipients`, if any.
fn seal_in_memory(recipients: Option<&Recipients>, data: Bytes) -> anyhow::Result<Bytes> {
    let Some(r) = recipients else {
        return Ok(data);
    };
    let tail = data
        .len()
        .checked_sub(TRAILER_LEN)
        .map(|start| &data[start..])
        .unwrap_or_default();
    let trailer = Trailer::decode(tail).context("a compressed object without its trailer")?;
    let mut w = SealWriter::new(r, Vec::with_capacity(data.len() + 1024))?;
    w.write_all(&data)?;
    let (out, _) = w.finish(trailer.plain_size, Trailer::note(tail), &trailer.sum)?;
    Ok(out.into())
}

#[derive(Debug, Clone, Copy)]
pub struct PipeOptions {
    pub compression: Compression,
    pub upload: UploadConfig,
    /// How the objects written identify their plain bytes.
    pub digest: Digest,
    /// The input is small (a few MiB at most): compress and hash it on one thread, whatever
    /// `compression.threads` says, instead of starting zstd's workers and a hashing thread.
    pub small: bool,
}

impl PipeOptions {
    /// For backups, dumps and binlogs.
    pub fn from_config(cfg: &crate::config::Config) -> PipeOptions {
        PipeOptions {
            compression: cfg.compression,
            upload: cfg.upload,
            digest: Digest::Sha256,
            small: false,
        }
    }

    /// For `wal-push`: PostgreSQL's archiver runs it once per segment, one after the other,
    /// so it uses `compression.wal_level` (fast by default) instead of `compression.level`,
    /// and xxh3-128 instead of SHA-256 (see `Digest`).
    pub fn for_wal(cfg: &crate::config::Config) -> PipeOptions {
        PipeOptions {
            compression: Compression {
                level: cfg.compression.wal_level,
                ..cfg.compression
            },
            upload: cfg.upload,
            digest: Digest::Xxh3,
            small: false,
        }
    }
}

/// A full part, and the word back that the uploader has taken it.
type Handoff = (Bytes, oneshot::Sender<()>);

/// Sends compressed bytes to the uploader in parts.
struct PartWriter {
    buf: Vec<u8>,
    parts: u64,
    base: usize,
    tx: mpsc::Sender<Handoff>,
}

impl PartWriter {
    fn part_size(&self) -> usize {
        part_size(self.base, self.parts)
    }

    /// Hands the part over and waits until the uploader has taken it, which it does only
    /// when it can send it (see `Upload::put_part`): a full part waits here instead of
    /// beside a new one, so a stream holds at most (concurrency + 1) parts.
    fn send(&mut self) -> std::io::Result<()> {
        let stopped = || std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload stopped");
        let full = std::mem::take(&mut self.buf);
        self.parts += 1;
        let (taken, wait) = oneshot::channel();
        self.tx
            .blocking_send((Bytes::from(full), taken))
            .map_err(|_| stopped())?;
        wait.blocking_recv().map_err(|_| stopped())?;
        self.buf = Vec::with_capacity(self.part_size());
        Ok(())
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.part_size() - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.part_size() {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The digest on a thread of its own, fed the blocks the caller has finished with, so hashing
/// never holds up zstd (or decryption, or the writes). Blocks keep their full length (a pipe
/// fills 64 KiB of a 1 MiB block); the count of bytes read travels with them, and hashed
/// blocks come back for reuse.
struct HashThread<'scope> {
    blocks: std::sync::mpsc::SyncSender<(Vec<u8>, usize)>,
    recycled: std::sync::mpsc::Receiver<Vec<u8>>,
    handle: std::thread::ScopedJoinHandle<'scope, [u8; 32]>,
}

impl<'scope> HashThread<'scope> {
    fn spawn<'env>(scope: &'scope std::thread::Scope<'scope, 'env>, digest: Digest) -> Self {
        let (blocks, to_hash) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(2);
        let (recycle, recycled) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let handle = scope.spawn(move || {
            let mut hasher = Hasher::new(digest);
            for (block, n) in to_hash {
                hasher.update(&block[..n]);
                let _ = recycle.try_send(block);
            }
            hasher.finish()
        });
        HashThread {
            blocks,
            recycled,
            handle,
        }
    }

    /// A block to read into: a hashed one back, or a new one.
    fn block(&self) -> Vec<u8> {
        self.recycled
            .try_recv()
            .unwrap_or_else(|_| vec![0u8; READ_BLOCK])
    }

    /// Hands over the first `n` bytes of `block`, in order.
    fn hash(&self, block: Vec<u8>, n: usize) -> anyhow::Result<()> {
        self.blocks
            .send((block, n))
            .map_err(|_| anyhow::anyhow!("the hashing thread stopped"))
    }

    /// The digest of everything handed over.
    fn finish(self) -> anyhow::Result<[u8; 32]> {
        drop(self.blocks);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the hashing thread panicked"))
    }
}

/// Input per job of multithreaded zstd. Its default at level 3 is 8 MiB, and it keeps
/// (workers + 3) jobs of input in one ring, so two workers held 40 MiB, half of a backup's
/// peak RSS. With 1 MiB jobs the ring is 5 MiB; on a pgbench base backup the CPU time and
/// the stored size are the same (measured with `zstd -3 -T2 -B1MiB`: 0.82 s user vs 0.85 s,
/// 49.3 vs 49.8 MB), while 512 KiB (zstd's minimum) costs 15% more CPU.
const ZSTD_JOB_SIZE: u32 = 1 << 20;

/// `compression` for an input of `len` bytes, known before it is read: one zstd thread when it
/// is no bigger than one job, where zstd's workers and a hashing thread cost more to start than
/// they save (a piece of a WAL segment a few pages long, a history file). A `wal-push` of the
/// backup history file every backup leaves, `perf stat`, two rounds of 11: medians 5.4 and
/// 4.9 ms of CPU with them, 4.3 and 3.3 ms without.
pub fn compression_for(mut compression: Compression, len: u64) -> Compression {
    if len <= ZSTD_JOB_SIZE as u64 {
        compression.threads = 1;
    }
    compression
}

/// Most zstd workers one stream uses. Each costs 2–3 MiB at level 3 (its job's input and
/// output, its 1.3 MiB of tables; 4 workers peaked 6 MiB above 2); one stream from
/// `pg_basebackup` or a dump program rarely comes faster than four workers compress it (two
/// compress pgbench data at about 1 GB/s here), so more would mostly add memory on a big node.
pub const MAX_ZSTD_WORKERS: u32 = 4;

/// The zstd workers of one stream for `compression.threads` (0: one per core), at most
/// `MAX_ZSTD_WORKERS`.
pub fn zstd_workers(threads: u32) -> u32 {
    let wanted = match threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        n => n,
    };
    wanted.clamp(1, MAX_ZSTD_WORKERS)
}

/// Reads `reader` to its end, compressing into `out` and hashing on a thread of its own (so
/// the digest never holds up zstd), then appends the trailer. Once `abandon` is set the output is
/// dropped and the rest is only hashed: the result has no writer, but its trailer still
/// identifies the whole input. `note` gives the trailer's note once everything is read, or
/// an error that vetoes the object (a WAL segment that fails its checks): nothing is stored.
fn compress_into<W: Write>(
    mut reader: impl Read,
    opts: Compression,
    digest: Digest,
    mut out: W,
    note: impl FnOnce() -> anyhow::Result<u64>,
    abandon: &AtomicBool,
    small: bool,
) -> anyhow::Result<(Option<W>, Trailer, u64)> {
    if digest == Digest::Xxh3 {
        out.write_all(&XXH3_HEADER)
            .context("writing the object header")?;
    }
    // `small` first: counting the cores reads cgroup files, for nothing on the inline path.
    if small {
        return compress_inline(reader, out, opts.level, digest, note, abandon);
    }
    let threads = zstd_workers(opts.threads);
    if threads == 1 && digest == Digest::Xxh3 {
        return compress_inline(reader, out, opts.level, digest, note, abandon);
    }
    let mut enc = zstd::stream::Encoder::new(out, opts.level).context("starting zstd")?;
    if threads > 1 {
        enc.multithread(threads).context("starting zstd workers")?;
        enc.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_SIZE))
            .context("setting the zstd job size")?;
    }
    let mut enc = Some(enc);
    std::thread::scope(|scope| {
        let hasher = HashThread::spawn(scope, digest);
        let mut size = 0u64;
        loop {
            let mut block = hasher.block();
            let n = compress_next(&mut reader, &mut block, &mut enc, abandon)?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.hash(block, n)?;
        }
        let sum = hasher.finish()?;
        finish_compressed(finish_frame(enc.take())?, size, digest, sum, note)
    })
}

/// Bytes read at a time by `compress_inline`: small enough to stay in the core's cache
/// between the read, the hash and zstd.
const INLINE_BLOCK: usize = 128 << 10;

/// `compress_into` on the calling thread alone, for one zstd thread and a digest cheap enough
/// to compute in line (xxh3: 14 GB/s here). A switched WAL segment is mostly zeros; its push
/// spent more on the hashing thread, the hand-overs and fresh 1 MiB blocks (page faults) than
/// on compressing.
///
/// A block of zeros is not given to zstd, whose match search costs as much on zeros as on
/// data: it ends the frame in progress and is stored as a frame of its own, compressed once
/// per length (a few bytes: one RLE block). The object is then several frames, which every
/// zstd decoder reads as their concatenation (`zstd -d` and older dbagent versions too).
/// The switched segment that `wal-push` stores after each backup is 16 MiB of which a few
/// KiB are records.
fn compress_inline<W: Write>(
    mut reader: impl Read,
    out: W,
    level: i32,
    digest: Digest,
    note: impl FnOnce() -> anyhow::Result<u64>,
    abandon: &AtomicBool,
) -> anyhow::Result<(Option<W>, Trailer, u64)> {
    let mut hasher = Hasher::new(digest);
    let mut block = vec![0u8; INLINE_BLOCK];
    let mut size = 0u64;
    let mut framing = Framing::Between(out);
    let mut zeros: Option<(usize, Vec<u8>)> = None;
    loop {
        let n = read_some(&mut reader, &mut block)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        let chunk = &block[..n];
        hasher.update(chunk);
        if abandon.load(Ordering::Relaxed) {
            framing = Framing::Abandoned;
        }
        framing = match framing {
            Framing::Abandoned => Framing::Abandoned,
            framing if all_zeros(chunk) => {
                let mut out = framing.end_frame()?;
                let frame = match &zeros {
                    Some((len, frame)) if *len == n => frame,
                    _ => {
                        let frame = zstd::bulk::compress(chunk, level).context("compressing")?;
                        &zeros.insert((n, frame)).1
                    }
                };
                out.write_all(frame).context("compressing")?;
                Framing::Between(out)
            }
            framing => {
                let mut enc = framing.in_frame(level)?;
                enc.write_all(chunk).context("compressing")?;
                Framing::Frame(enc)
            }
        };
    }
    let out = match framing {
        Framing::Abandoned => None,
        Framing::Between(out) if size > 0 => Some(out),
        // The empty input still gets its (empty) frame.
        framing => finish_frame(Some(framing.in_frame(level)?))?,
    };
    finish_compressed(out, size, digest, hasher.finish(), note)
}

/// Where `compress_inline`'s output stands.
enum Framing<W: Write> {
    /// Inside a zstd frame.
    Frame(zstd::stream::Encoder<'static, W>),
    /// Between frames.
    Between(W),
    /// No output any more (`abandon`).
    Abandoned,
}

impl<W: Write> Framing<W> {
    /// The output, the frame in progress ended.
    fn end_frame(self) -> anyhow::Result<W> {
        match self {
            Framing::Frame(enc) => enc.finish().context("finishing zstd"),
            Framing::Between(out) => Ok(out),
            Framing::Abandoned => unreachable!("no output once abandoned"),
        }
    }

    /// The frame in progress, or a new one.
    fn in_frame(self, level: i32) -> anyhow::Result<zstd::stream::Encoder<'static, W>> {
        match self {
            Framing::Frame(enc) => Ok(enc),
            Framing::Between(out) => {
                zstd::stream::Encoder::new(out, level).context("starting zstd")
            }
            Framing::Abandoned => unreachable!("no output once abandoned"),
        }
    }
}

/// Whether `b` is all zeros: page by page, each folded without a branch so that the
/// compiler makes it a few vector instructions per cache line.
fn all_zeros(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|page| page.iter().fold(0u8, |acc, x| acc | x) == 0)
}

/// Reads the next bytes of `reader` into `block`: how many, 0 at the end.
fn read_some(reader: &mut impl Read, block: &mut [u8]) -> anyhow::Result<usize> {
    loop {
        match reader.read(block) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow::Error::new(e).context("reading the source")),
        }
    }
}

/// Reads the next bytes of `reader` into `block` and compresses them (unless `abandon` is
/// set, which drops the output for good); how many, 0 at the end.
fn compress_next<W: Write>(
    reader: &mut impl Read,
    block: &mut [u8],
    enc: &mut Option<zstd::stream::Encoder<'static, W>>,
    abandon: &AtomicBool,
) -> anyhow::Result<usize> {
    let n = read_some(reader, block)?;
    if abandon.load(Ordering::Relaxed) {
        *enc = None;
    }
    if let Some(enc) = enc.as_mut() {
        enc.write_all(&block[..n]).context("compressing")?;
    }
    Ok(n)
}

/// Ends a `compress_into`: the trailer after the last frame (`out`, every frame finished;
/// `None` once abandoned: no object, only the trailer).
fn finish_compressed<W: Write>(
    out: Option<W>,
    plain_size: u64,
    digest: Digest,
    sum: [u8; 32],
    note: impl FnOnce() -> anyhow::Result<u64>,
) -> anyhow::Result<(Option<W>, Trailer, u64)> {
    let trailer = Trailer {
        plain_size,
        digest,
        sum,
    };
    match out {
        Some(mut out) => {
            let note = note()?;
            out.write_all(&trailer.encode(note))?;
            Ok((Some(out), trailer, note))
        }
        None => Ok((None, trailer, 0)),
    }
}

/// zstd's last block, when there is an encoder.
fn finish_frame<W: Write>(
    enc: Option<zstd::stream::Encoder<'static, W>>,
) -> anyhow::Result<Option<W>> {
    enc.map(|enc| enc.finish().context("finishing zstd"))
        .transpose()
}

/// Gives the pipe from a dump program 1 MiB of buffer instead of 64 KiB, so the program and
/// the compressor switch places sixteen times less often (base backups: 6% faster). Best
/// effort: the default size works, only slower.
pub fn widen_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: fcntl on an open pipe descriptor borrowed for the call.
    unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}

/// Compresses all of `reader` into memory: the whole object, trailer included. For small
/// objects whose upload should not wait for the store (see `pg::wal::push`). When `abandon`
/// is set midway there is no object, only the trailer identifying the input.
pub fn compress_to_memory(
    reader: impl Read,
    opts: Compression,
    digest: Digest,
    note: impl FnOnce() -> anyhow::Result<u64>,
    abandon: &AtomicBool,
) -> anyhow::Result<(Option<Vec<u8>>, Trailer)> {
    compress_into(reader, opts, digest, Vec::new(), note, abandon, false)
        .map(|(out, trailer, _)| (out, trailer))
}

/// Whether a write may replace what is stored under its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    Overwrite,
    /// Fails with `storage::AlreadyExists` when the key is taken (WAL, manifests).
    CreateOnly,
}

async fn put_as(store: &dyn Store, key: &str, data: Bytes, mode: WriteMode) -> anyhow::Result<()> {
    match mode {
        WriteMode::Overwrite => store.put(key, data).await,
        WriteMode::CreateOnly => store.put_new(key, data).await,
    }
}

async fn start_upload_as(
    store: &dyn Store,
    key: &str,
    mode: WriteMode,
) -> anyhow::Result<Box<dyn crate::storage::Upload>> {
    match mode {
        WriteMode::Overwrite => store.start_upload(key).await,
        WriteMode::CreateOnly => store.start_upload_new(key).await,
    }
}

/// Stores an object compressed by `compress_to_memory` (encrypted first in an encrypted
/// repository): one PUT, or a multipart upload when it is bigger than a part. Nothing is
/// visible under `key` unless all of it was stored.
pub async fn put_compressed(
    store: &dyn Store,
    key: &str,
    data: Bytes,
    upload: UploadConfig,
    mode: WriteMode,
) -> anyhow::Result<()> {
    let recipients = recipients_for(store, key).await?;
    let data = match recipients {
        None => data,
        Some(r) => tokio::task::spawn_blocking(move || seal_in_memory(Some(&r), data))
            .await
            .context("encryption task panicked")??,
    };
    let part = upload.part_size.max(1);
    if data.len() <= part {
        return put_as(store, key, data, mode)
            .await
            .with_context(|| format!("uploading {key}"));
    }
    let mut up = start_upload_as(store, key, mode)
        .await
        .with_context(|| format!("uploading {key}"))?;
    for start in (0..data.len()).step_by(part) {
        let end = (start + part).min(data.len());
        if let Err(e) = up.put_part(data.slice(start..end)).await {
            up.abort().await;
            return Err(e.context(format!("uploading {key}")));
        }
    }
    up.complete()
        .await
        .with_context(|| format!("uploading {key}"))
}

/// Compresses `reader` into the object `key`. The object becomes visible only when the whole
/// stream has been read and uploaded; on any error nothing is left under `key`.
pub async fn upload<R: Read + Send + 'static>(
    store: &dyn Store,
    key: &str,
    reader: R,
    opts: PipeOptions,
) -> anyhow::Result<Written> {
    upload_noted(store, key, reader, opts, || Ok(0), WriteMode::Overwrite).await
}

/// `upload`, with a note for the trailer computed once the whole stream has been read (or an
/// error from it, which stores nothing), and a choice of write mode.
pub async fn upload_noted<R, N>(
    store: &dyn Store,
    key: &str,
    reader: R,
    opts: PipeOptions,
    note: N,
    mode: WriteMode,
) -> anyhow::Result<Written>
where
    R: Read + Send + 'static,
    N: FnOnce() -> anyhow::Result<u64> + Send + 'static,
{
    // Before a byte is read or written: a writer the repository refuses stops here.
    let recipients = recipients_for(store, key).await?;
    let (tx, mut rx) = mpsc::channel::<Handoff>(1);
    let writer = PartWriter {
        buf: Vec::with_capacity(opts.upload.part_size),
        parts: 0,
        base: opts.upload.part_size,
        tx,
    };
    let (compression, digest, small) = (opts.compression, opts.digest, opts.small);
    let producer = tokio::task::spawn_blocking(move || {
        let sink = Sink::new(recipients.as_deref(), writer)?;
        let (sink, trailer, note) = compress_into(
            reader,
            compression,
            digest,
            sink,
            note,
            &AtomicBool::new(false),
            small,
        )?;
        let (mut rest, seal) = sink.expect("never abandoned").finish(&trailer, note)?;
        if !rest.buf.is_empty() {
            rest.send()?;
        }
        Ok::<_, anyhow::Error>((trailer, seal))
    });

    // The first part is held back: if it is also the last, one plain PUT is enough.
    let mut held: Option<Bytes> = None;
    let mut multipart: Option<Box<dyn crate::storage::Upload>> = None;
    let mut stored = 0u64;
    let mut sent: anyhow::Result<()> = Ok(());
    while let Some((part, taken)) = rx.recv().await {
        let _ = taken.send(());
        stored += part.len() as u64;
        if multipart.is_none() {
            match held.take() {
                None => {
                    held = Some(part);
                    continue;
                }
                Some(first) => match start_upload_as(store, key, mode).await {
                    Ok(mut up) => {
                        let res = up.put_part(first).await;
                        multipart = Some(up);
                        if let Err(e) = res {
                            sent = Err(e);
                            break;
                        }
                    }
                    Err(e) => {
                        sent = Err(e);
                        break;
                    }
                },
            }
        }
        let up = multipart.as_mut().expect("multipart upload started above");
        if let Err(e) = up.put_part(part).await {
            sent = Err(e);
            break;
        }
    }
    // Closing the channel unblocks a producer that is still writing after an upload error.
    drop(rx);
    let produced = producer.await.context("compression task panicked")?;
    match (sent, produced) {
        (Ok(()), Ok((trailer, seal))) => {
            match multipart {
                Some(up) => up.complete().await,
                None => put_as(store, key, held.unwrap_or_default(), mode).await,
            }
            .with_context(|| format!("uploading {key}"))?;
            Ok(Written {
                trailer,
                stored_size: stored,
                seal,
            })
        }
        (sent, produced) => {
            if let Some(up) = multipart {
                up.abort().await;
            }
            match sent {
                Err(e) => Err(e.context(format!("uploading {key}"))),
                Ok(()) => Err(produced.expect_err("the success case is matched above")),
            }
        }
    }
}

/// Downloads `key`, decrypts it (an encrypted object), decompresses it into `out`, and verifies
/// the trailer (and the seal). The caller must treat what it wrote as garbage unless this
/// returns Ok.
pub async fn download<W: Write + Send + 'static>(
    store: &dyn Store,
    key: &str,
    out: W,
) -> anyhow::Result<(W, Fetched)> {
    download_checking(store, key, out, None, Check::Whole).await
}

/// What a download checks of the plain content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Its size and SHA-256 against the trailer: anything that goes to a data directory.
    Whole,
    /// Its size only: for a reader whose input carries checks of its own that it applies to
    /// everything it uses (the WAL reader of an incremental backup checks every record's
    /// CRC-32C and the chain of records, as PostgreSQL does in recovery). The SHA-256 would
    /// cost more CPU than decompressing. An encrypted object's seal is checked either way.
    Size,
}

/// `download`, checking only what `check` says.
pub async fn download_checked<W: Write + Send + 'static>(
    store: &dyn Store,
    key: &str,
    out: W,
    check: Check,
) -> anyhow::Result<W> {
    let (out, _) = download_checking(store, key, out, None, check).await?;
    Ok(out)
}

/// `download`, given up when the store sends nothing for `stall` (the answer, or the next
/// bytes of the body): a stalled connection fails fast instead of waiting for the client's
/// request timeout, and the caller can try again.
pub async fn download_watched<W: Write + Send + 'static>(
    store: &dyn Store,
    key: &str,
    out: W,
    stall: Option<std::time::Duration>,
) -> anyhow::Result<(W, Fetched)> {
    download_checking(store, key, out, stall, Check::Whole).await
}

async fn download_checking<W: Write + Send + 'static>(
    store: &dyn Store,
    key: &str,
    out: W,
    stall: Option<std::time::Duration>,
    check: Check,
) -> anyhow::Result<(W, Fetched)> {
    let stalled = |what: &str| {
        let limit = stall.unwrap_or_default().as_secs_f64();
        match what {
            // The S3 client retries failed requests inside this window.
            "answer" => anyhow::anyhow!(
                "downloading {key}: no usable answer from the store within {limit:.1}s"
            ),
            _ => anyhow::anyhow!("downloading {key}: no data from the store for {limit:.1}s"),
        }
    };
    let identities = identities(store).await?;
    let mut stream = match stall {
        Some(limit) => tokio::time::timeout(limit, store.get(key))
            .await
            .map_err(|_| stalled("answer"))??,
        None => store.get(key).await?,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(4);
    let name = key.to_string();
    let consumer = tokio::task::spawn_blocking(move || {
        decompress_from(
            ChannelReader::new(rx),
            out,
            &name,
            identities.as_deref(),
            check,
        )
    });
    let mut sent: anyhow::Result<()> = Ok(());
    loop {
        let next = match stall {
            Some(limit) => match tokio::time::timeout(limit, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    sent = Err(stalled("data"));
                    break;
                }
            },
            None => stream.next().await,
        };
        let Some(chunk) = next else { break };
        match chunk {
            Ok(bytes) => {
                if tx.send(bytes).is_err() {
                    break; // the consumer failed; its error says why
                }
            }
            Err(e) => {
                sent = Err(e);
                break;
            }
        }
    }
    drop(tx);
    let consumed = consumer.await.context("decompression task panicked")?;
    // A refused key says what to fix, whatever the transfer did meanwhile.
    if let Err(e) = &consumed
        && crate::error::exit_code(e) == crate::error::EXIT_INPUT
    {
        return consumed;
    }
    sent?;
    consumed
}

struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl ChannelReader {
    fn new(rx: std::sync::mpsc::Receiver<Bytes>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.current = b,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        let chunk = self.current.split_to(n);
        buf[..n].copy_from_slice(&chunk);
        Ok(n)
    }
}

/// Passes bytes through and keeps the last `TRAILER_LEN` of them, to find the trailer at the
/// end of the plain object.
struct TailKeeper<R> {
    inner: R,
    tail: Vec<u8>,
}

impl<R: Read> Read for TailKeeper<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let chunk = &buf[..n];
        if chunk.len() >= TRAILER_LEN {
            self.tail.clear();
            self.tail
                .extend_from_slice(&chunk[chunk.len() - TRAILER_LEN..]);
        } else {
            self.tail.extend_from_slice(chunk);
            if self.tail.len() > TRAILER_LEN {
                self.tail.drain(..self.tail.len() - TRAILER_LEN);
            }
        }
        Ok(n)
    }
}

/// An object's first bytes read ahead, to learn which digest identifies it (`XXH3_HEADER`
/// or not), then given back in order.
struct Peeked<R> {
    head: Vec<u8>,
    pos: usize,
    inner: R,
}

impl<R: Read> Peeked<R> {
    fn new(mut inner: R) -> std::io::Result<Peeked<R>> {
        let mut head = vec![0u8; XXH3_HEADER.len()];
        let mut n = 0;
        while n < head.len() {
            match inner.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        head.truncate(n);
        Ok(Peeked {
            head,
            pos: 0,
            inner,
        })
    }

    fn digest(&self) -> Digest {
        match self.head[..] == XXH3_HEADER {
            true => Digest::Xxh3,
            false => Digest::Sha256,
        }
    }
}

impl<R: Read> Read for Peeked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos < self.head.len() {
            let n = buf.len().min(self.head.len() - self.pos);
            buf[..n].copy_from_slice(&self.head[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

/// The age header every encrypted object starts with.
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// Decrypts (when the object is encrypted) and decompresses `reader` into `out`.
fn decompress_from<W: Write>(
    mut reader: ChannelReader,
    out: W,
    key: &str,
    identities: Option<&Identities>,
    check: Check,
) -> anyhow::Result<(W, Fetched)> {
    // The first bytes say which: a zstd frame or an age header.
    let mut head = Vec::with_capacity(AGE_MAGIC.len());
    while head.len() < AGE_MAGIC.len() {
        let mut byte = [0u8; 64];
        let want = AGE_MAGIC.len() - head.len();
        match reader.read(&mut byte[..want])? {
            0 => break,
            n => head.extend_from_slice(&byte[..n]),
        }
    }
    let encrypted = head == AGE_MAGIC;
    let input = std::io::Cursor::new(head).chain(reader);
    if !encrypted {
        let (out, trailer, _) = decompress_plain(input, out, key, check)?;
        return Ok((
            out,
            Fetched {
                trailer,
                seal: None,
            },
        ));
    }
    let Some(identities) = identities else {
        return Err(input_err!(
            "{key} is encrypted: readers need {IDENTITY_SETTING}, the secret key(s) of the repository; nothing was written"
        ));
    };
    let opened = crate::crypto::seal::open(identities, input, key)?;
    let (out, trailer, opened) = decompress_plain(opened, out, key, check)?;
    let seal = opened.finish()?;
    if seal.plain_size != trailer.plain_size {
        return Err(corrupt(format!(
            "{key} is corrupt: its seal says {} plain bytes, its content {}",
            seal.plain_size, trailer.plain_size
        )));
    }
    Ok((
        out,
        Fetched {
            trailer,
            seal: Some(seal),
        },
    ))
}

/// Decompresses a plain object (zstd frames, then the trailer) into `out`, checks the
/// trailer, and gives back the reader, read to its end.
fn decompress_plain<R: Read, W: Write>(
    reader: R,
    mut out: W,
    key: &str,
    check: Check,
) -> anyhow::Result<(W, Trailer, R)> {
    let reader = Peeked::new(reader).map_err(crate::crypto::seal::read_failure)?;
    let digest = reader.digest();
    let reader = TailKeeper {
        inner: reader,
        tail: Vec::with_capacity(2 * TRAILER_LEN),
    };
    let mut dec = zstd::stream::read::Decoder::new(reader).context("starting zstd")?;
    // The digest runs on a thread of its own, as in compress_into, so it never holds up zstd
    // (and decryption) on the way to the target.
    let (size, actual) = std::thread::scope(|scope| -> anyhow::Result<(u64, Option<[u8; 32]>)> {
        let hasher = (check == Check::Whole).then(|| HashThread::spawn(scope, digest));
        let mut spare = Vec::new();
        let mut size = 0u64;
        loop {
            let mut block = match &hasher {
                Some(h) => h.block(),
                None if spare.is_empty() => vec![0u8; READ_BLOCK],
                None => std::mem::take(&mut spare),
            };
            let n = match dec.read(&mut block) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // An encrypted chunk that failed authentication surfaces here.
                    if let Some(inner) = e.get_ref()
                        && inner.to_string().contains(" is corrupt")
                    {
                        return Err(corrupt(inner.to_string()));
                    }
                    return Err(corrupt(format!(
                        "{key} is corrupt: cannot decompress it ({e})"
                    )));
                }
            };
            size += n as u64;
            out.write_all(&block[..n])
                .with_context(|| format!("writing {key}"))?;
            match &hasher {
                Some(h) => h.hash(block, n)?,
                None => spare = block,
            }
        }
        Ok((size, hasher.map(HashThread::finish).transpose()?))
    })?;
    out.flush()?;
    let mut reader = dec.finish().into_inner();
    // Drain anything the decoder did not need (there should be nothing).
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(crate::crypto::seal::read_failure)?;
    let Some(trailer) = Trailer::decode(&reader.tail) else {
        return Err(corrupt(format!(
            "{key} is corrupt or truncated: its checksum trailer is missing"
        )));
    };
    if trailer.digest != digest {
        return Err(corrupt(format!(
            "{key} is corrupt: its header and its trailer name different digests"
        )));
    }
    if trailer.plain_size != size || actual.is_some_and(|a| a != trailer.sum) {
        let got = Trailer {
            plain_size: size,
            digest,
            sum: actual.unwrap_or_default(),
        };
        return Err(corrupt(format!(
            "{key} is corrupt: checksum mismatch (recorded {} bytes {}, got {} bytes {})",
            trailer.plain_size,
            trailer.digest_hex(),
            size,
            actual.map_or_else(|| "unchecked".to_string(), |_| got.digest_hex())
        )));
    }
    Ok((out, trailer, reader.inner.inner))
}

fn corrupt(msg: String) -> anyhow::Error {
    anyhow::Error::new(crate::error::Failure::Corrupt(msg))
}

/// What an object's last bytes say about it, read without downloading it (or a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// A plain object: its trailer and note.
    Plain(Trailer, u64),
    /// An encrypted object: its seal.
    Sealed(Seal),
}

impl Stored {
    pub fn plain_size(&self) -> u64 {
        match self {
            Stored::Plain(t, _) => t.plain_size,
            Stored::Sealed(s) => s.plain_size,
        }
    }

    pub fn note(&self) -> u64 {
        match self {
            Stored::Plain(_, note) => *note,
            Stored::Sealed(s) => s.note,
        }
    }

    /// The digests `holds` needs of the local bytes: the plain object's own, or, for an
    /// encrypted one (whose seal does not say), each a writer may have used.
    pub fn digests(&self) -> &'static [Digest] {
        match self {
            Stored::Plain(t, _) => match t.digest {
                Digest::Sha256 => &[Digest::Sha256],
                Digest::Xxh3 => &[Digest::Xxh3],
            },
            Stored::Sealed(_) => &Digest::ALL,
        }
    }

    /// `holds`, with the local identities computed by `identity` one digest at a time in the
    /// order of `digests`, until one matches or the answer cannot change: an encrypted object
    /// costs a second hash of the local bytes only when the first does not match. Gives the
    /// answer and the identity that decided it (the first computed when none matched).
    pub fn holds_by(
        &self,
        recipients: Option<&Recipients>,
        mut identity: impl FnMut(Digest) -> anyhow::Result<Trailer>,
    ) -> anyhow::Result<(Option<bool>, Trailer)> {
        let mut local: Vec<Trailer> = Vec::new();
        for &digest in self.digests() {
            local.push(identity(digest)?);
            let held = self.holds(&local, recipients);
            if held != Some(false) {
                return Ok((held, *local.last().expect("one pushed above")));
            }
        }
        Ok((Some(false), local[0]))
    }

    /// Whether the stored object holds the same plain bytes as the local ones (a file about
    /// to be pushed under the same name), whose identities by the digests of `digests` are
    /// `local` (others are ignored). `None` when it cannot be told: the object was encrypted
    /// for other recipients than the writer's.
    pub fn holds(&self, local: &[Trailer], recipients: Option<&Recipients>) -> Option<bool> {
        match self {
            Stored::Plain(t, _) => Some(local.contains(t)),
            Stored::Sealed(s) => {
                let r = recipients?.of_key_set(s.key_set)?;
                let key = r.plain_id_key();
                Some(local.iter().any(|l| {
                    s.plain_size == l.plain_size
                        && s.plain_id == crate::crypto::seal::plain_id(&key, &l.sum)
                }))
            }
        }
    }
}

/// Reads an object's trailer (or seal) without downloading the object.
pub async fn read_trailer(store: &dyn Store, key: &str, size: u64) -> anyhow::Result<Stored> {
    let min = TRAILER_LEN.min(SEAL_LEN) as u64;
    if size < min {
        return Err(corrupt(format!("{key} is corrupt: only {size} bytes")));
    }
    let from = size.saturating_sub(SEAL_LEN.max(TRAILER_LEN) as u64);
    let bytes = store.get_range(key, from..size).await?;
    if let Some(seal) = Seal::find(&bytes) {
        return Ok(Stored::Sealed(seal));
    }
    let tail = &bytes[bytes.len().saturating_sub(TRAILER_LEN)..];
    let trailer = Trailer::decode(tail)
        .ok_or_else(|| corrupt(format!("{key} is corrupt: its checksum trailer is missing")))?;
    Ok(Stored::Plain(trailer, Trailer::note(tail)))
}

/// Reads an object's trailer note without downloading the object.
pub async fn read_note(store: &dyn Store, key: &str, size: u64) -> anyhow::Result<u64> {
    Ok(read_trailer(store, key, size).await?.note())
}

/// The digest and size of a local file, as the trailer would record them.
pub fn file_identity(path: &std::path::Path, digest: Digest) -> anyhow::Result<Trailer> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Hasher::new(digest);
    let size = std::io::copy(&mut file, &mut hasher)?;
    Ok(Trailer {
        plain_size: size,
        digest,
        sum: hasher.finish(),
    })
}

/// `file_identity` by `digest`, or `known` when it is that digest's.
pub fn file_identity_or(
    path: &std::path::Path,
    digest: Digest,
    known: Option<Trailer>,
) -> anyhow::Result<Trailer> {
    match known.filter(|k| k.digest == digest) {
        Some(k) => Ok(k),
        None => file_identity(path, digest),
    }
}

/// Something that watches bytes go by.
pub trait Watch: Send {
    fn watch(&mut self, buf: &[u8]);
}

/// A watcher that may not be there.
impl<W: Watch> Watch for Option<W> {
    fn watch(&mut self, buf: &[u8]) {
        if let Some(w) = self {
            w.watch(buf);
        }
    }
}

/// A reader that passes bytes through unchanged and shows each block to a watcher.
pub struct Tap<R, W> {
    inner: R,
    watcher: Arc<Mutex<W>>,
}

impl<R: Read, W: Watch> Tap<R, W> {
    pub fn new(inner: R, watcher: W) -> (Self, Arc<Mutex<W>>) {
        let watcher = Arc::new(Mutex::new(watcher));
        (
            Tap {
                inner,
                watcher: watcher.clone(),
            },
            watcher,
        )
    }
}

impl<R: Read, W: Watch> Read for Tap<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.watcher
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .watch(&buf[..n]);
        }
        Ok(n)
    }
}

#[cfg(test)]
impl PipeOptions {
    /// Small and fast: for unit tests of what is stored, not of how fast.
    pub fn for_tests() -> PipeOptions {
        PipeOptions {
            compression: Compression {
                level: 1,
                wal_level: 1,
                threads: 1,
            },
            upload: UploadConfig {
                part_size: crate::config::MIN_PART_SIZE,
                concurrency: 1,
            },
            digest: Digest::Sha256,
            small: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::LocalStore;

    const MIN_PART: usize = crate::config::MIN_PART_SIZE;

    fn opts(part: usize) -> PipeOptions {
        PipeOptions {
            compression: Compression {
                level: 3,
                wal_level: 1,
                threads: 2,
            },
            upload: UploadConfig {
                part_size: part,
                concurrency: 2,
            },
            digest: Digest::Sha256,
            small: false,
        }
    }

    fn data(len: usize) -> Vec<u8> {
        // Compressible but not trivial.
        (0..len)
            .map(|i| ((i * 7919) % 251) as u8 ^ (i / 4096) as u8)
            .collect()
    }

    #[tokio::test]
    async fn round_trip_small_and_multipart() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let cases = [(0usize, 5 << 20), (1000, 5 << 20), (12 << 20, 1 << 16)];
        // `small`: compressed and hashed on the calling thread, the same object.
        for ((len, part), small) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
            let plain = data(len);
            let mut o = opts(part);
            o.compression.threads = 2;
            o.small = small;
            let w = upload(&store, "obj", std::io::Cursor::new(plain.clone()), o)
                .await
                .unwrap();
            assert_eq!(w.trailer.plain_size, len as u64);
            use sha2::Digest as _;
            assert_eq!(
                w.trailer.digest_hex(),
                hex::encode(sha2::Sha256::digest(&plain)),
                "small: {small}"
            );
            let (out, t) = download(&store, "obj", Vec::new()).await.unwrap();
            assert_eq!(out, plain);
            assert_eq!(t.trailer, w.trailer);
            let head = store.head("obj").await.unwrap().unwrap();
            assert_eq!(head.size, w.stored_size);
            assert_eq!(
                read_trailer(&store, "obj", head.size).await.unwrap(),
                Stored::Plain(w.trailer, 0)
            );
            // A person can decompress the object with the plain zstd tool.
            let raw = std::fs::read(dir.path().join("obj")).unwrap();
            assert_eq!(zstd::decode_all(&raw[..]).unwrap(), plain);
        }
    }

    #[tokio::test]
    async fn corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let plain = data(100_000);
        upload(
            &store,
            "obj",
            std::io::Cursor::new(plain.clone()),
            opts(5 << 20),
        )
        .await
        .unwrap();
        let path = dir.path().join("obj");
        let mut raw = std::fs::read(&path).unwrap();
        // Flip a checksum byte in the trailer: the content decompresses, the check fails.
        let i = raw.len() - 20;
        raw[i] ^= 0xff;
        std::fs::write(&path, &raw).unwrap();
        let err = download(&store, "obj", Vec::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        // A reader that checks what it reads by itself skips the SHA-256, not the size.
        let out = download_checked(&store, "obj", Vec::new(), Check::Size)
            .await
            .unwrap();
        assert_eq!(out, plain);
        let mut resized = raw.clone();
        let at = resized.len() - TRAILER_LEN + 16; // the plain size
        resized[at] ^= 0x01;
        std::fs::write(&path, &resized).unwrap();
        for check in [Check::Whole, Check::Size] {
            let err = download_checked(&store, "obj", Vec::new(), check)
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("checksum mismatch"), "{check:?}: {err}");
        }
        // Truncate: the trailer is gone.
        std::fs::write(&path, &raw[..raw.len() - 30]).unwrap();
        for check in [Check::Whole, Check::Size] {
            let err = download_checked(&store, "obj", Vec::new(), check)
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("corrupt"), "{check:?}: {err}");
        }
    }

    struct FailingReader(usize);
    impl Read for FailingReader {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("source died"));
            }
            let n = buf.len().min(self.0);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = (i * 31 % 253) as u8;
            }
            self.0 -= n;
            Ok(n)
        }
    }

    #[tokio::test]
    async fn failing_source_leaves_no_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        for len in [10usize, 3 << 20] {
            let err = upload(&store, "obj", FailingReader(len), opts(5 << 20))
                .await
                .unwrap_err();
            assert!(format!("{err:#}").contains("source died"));
            assert!(store.list("").await.unwrap().is_empty(), "len {len}");
        }
        // Multipart case: parts were sent before the failure.
        let err = upload(&store, "obj", FailingReader(40 << 20), opts(1 << 16))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("source died"));
        assert!(store.list("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn compressed_in_memory_matches_the_streamed_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let cases = [(1000usize, 5 << 20), (12 << 20, 1 << 16)];
        for ((len, part), digest) in cases.into_iter().flat_map(|c| Digest::ALL.map(|d| (c, d))) {
            let plain = data(len);
            let (object, trailer) = compress_to_memory(
                std::io::Cursor::new(plain.clone()),
                opts(part).compression,
                digest,
                || Ok(42),
                &AtomicBool::new(false),
            )
            .unwrap();
            assert_eq!(trailer, Trailer::of_digest(digest, &plain));
            let object = object.expect("not abandoned");
            put_compressed(
                &store,
                "mem",
                object.clone().into(),
                opts(part).upload,
                WriteMode::Overwrite,
            )
            .await
            .unwrap();
            assert_eq!(std::fs::read(dir.path().join("mem")).unwrap(), object);
            let (out, t) = download(&store, "mem", Vec::new()).await.unwrap();
            assert_eq!((out, t.trailer), (plain, trailer));
            let tail = &object[object.len() - TRAILER_LEN..];
            assert_eq!(Trailer::note(tail), 42);
        }
    }

    /// WAL is identified by xxh3-128 and everything else by SHA-256; a reader tells them
    /// apart by the object's first frame, so objects written before xxh3 still read, and a
    /// comparison with a stored object uses the stored object's digest.
    #[tokio::test]
    async fn objects_of_either_digest_read_back_checked_and_compare_by_the_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let plain = data(3 << 20);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &plain).unwrap();
        for digest in Digest::ALL {
            let key = format!("{digest:?}");
            let o = PipeOptions {
                digest,
                ..opts(5 << 20)
            };
            let w = upload(&store, &key, std::io::Cursor::new(plain.clone()), o)
                .await
                .unwrap();
            assert_eq!(w.trailer, Trailer::of_digest(digest, &plain));
            let raw = std::fs::read(dir.path().join(&key)).unwrap();
            assert_eq!(raw.starts_with(&XXH3_HEADER), digest == Digest::Xxh3);
            let (out, f) = download(&store, &key, Vec::new()).await.unwrap();
            assert_eq!((out == plain, f.trailer), (true, w.trailer));

            let stored = read_trailer(&store, &key, raw.len() as u64).await.unwrap();
            assert_eq!(stored.digests(), &[digest]);
            let (held, local) = stored
                .holds_by(None, |d| file_identity(file.path(), d))
                .unwrap();
            assert_eq!((held, local.digest), (Some(true), digest));
            // The other digest of the same bytes is no proof.
            let other = Digest::ALL.into_iter().find(|&d| d != digest).unwrap();
            let other = file_identity(file.path(), other).unwrap();
            assert_eq!(stored.holds(&[other], None), Some(false));
            let mut changed = plain.clone();
            changed[1 << 20] ^= 1;
            let changed = Trailer::of_digest(digest, &changed);
            assert_eq!(stored.holds(&[changed], None), Some(false));

            // A flipped byte inside the compressed data, and a trailer that names the other
            // digest than the header, are both corruption.
            let mut bad = raw.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x40;
            std::fs::write(dir.path().join("bad"), &bad).unwrap();
            let err = download(&store, "bad", Vec::new()).await.unwrap_err();
            assert_eq!(crate::error::exit_code(&err), 2, "{err:#}");
            let mut swapped = raw.clone();
            let at = swapped.len() - TRAILER_LEN + 8;
            swapped[at..at + 8].copy_from_slice(match digest {
                Digest::Sha256 => TRAILER_TAG_XXH3,
                Digest::Xxh3 => TRAILER_TAG,
            });
            std::fs::write(dir.path().join("bad"), &swapped).unwrap();
            let err = download(&store, "bad", Vec::new()).await.unwrap_err();
            assert!(format!("{err:#}").contains("is corrupt"), "{err:#}");
        }
    }

    #[tokio::test]
    async fn in_memory_compression_reads_back_the_same_on_one_thread_or_several() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        // A switched WAL segment's shape: some data, then zeros.
        let mut plain = data(1 << 20);
        plain.resize(3 << 20, 0);
        for threads in [1, 2] {
            for digest in Digest::ALL {
                let key = format!("{threads}-{digest:?}");
                let compression = Compression {
                    threads,
                    ..opts(5 << 20).compression
                };
                let cursor = std::io::Cursor::new(plain.clone());
                let never = AtomicBool::new(false);
                let (object, trailer) =
                    compress_to_memory(cursor, compression, digest, || Ok(7), &never).unwrap();
                assert_eq!(trailer, Trailer::of_digest(digest, &plain), "{key}");
                let object = object.unwrap();
                put_compressed(
                    &store,
                    &key,
                    object.into(),
                    opts(5 << 20).upload,
                    WriteMode::CreateOnly,
                )
                .await
                .unwrap();
                let (out, f) = download(&store, &key, Vec::new()).await.unwrap();
                assert_eq!((out == plain, f.trailer), (true, trailer), "{key}");
            }
        }
    }

    #[tokio::test]
    async fn blocks_of_zeros_are_frames_of_their_own_and_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        let block = INLINE_BLOCK;
        // Data; zeros; a block of zeros but one byte near its end; data again; zeros to an
        // odd length (a short last read: a frame of another length).
        let mut mixed = data(1 << 20);
        mixed.resize(mixed.len() + 4 * block, 0);
        let one = mixed.len() + block - 17;
        mixed.resize(mixed.len() + block, 0);
        mixed[one] = 1;
        mixed.extend(data(2 * block));
        mixed.resize((3 << 20) + 777, 0);
        let zeros = vec![0u8; 2 << 20];
        for (name, plain) in [("mixed", mixed), ("zeros", zeros), ("empty", Vec::new())] {
            let compression = Compression {
                threads: 1,
                ..opts(5 << 20).compression
            };
            let never = AtomicBool::new(false);
            let cursor = std::io::Cursor::new(plain.clone());
            let (object, trailer) =
                compress_to_memory(cursor, compression, Digest::Xxh3, || Ok(7), &never).unwrap();
            let object = object.unwrap();
            if name == "zeros" {
                // Sixteen frames of one RLE block each, and the header and trailer.
                assert!(object.len() < 512, "{} bytes", object.len());
            }
            assert_eq!(zstd::decode_all(&object[..]).unwrap(), plain, "{name}");
            put_compressed(
                &store,
                name,
                object.into(),
                opts(5 << 20).upload,
                WriteMode::CreateOnly,
            )
            .await
            .unwrap();
            let (out, f) = download(&store, name, Vec::new()).await.unwrap();
            assert_eq!((out == plain, f.trailer), (true, trailer), "{name}");
        }
    }

    #[test]
    fn abandoned_compression_still_identifies_the_whole_input() {
        let plain = data(3 << 20);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &plain).unwrap();
        // Abandoned after the first block: no object, but the trailer covers every byte.
        let abandon = AtomicBool::new(false);
        struct Abandoning<'a>(std::io::Cursor<Vec<u8>>, &'a AtomicBool);
        impl Read for Abandoning<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1.store(true, Ordering::Relaxed);
                Ok(n)
            }
        }
        for threads in [1, 2] {
            abandon.store(false, Ordering::Relaxed);
            let compression = Compression {
                threads,
                ..opts(5 << 20).compression
            };
            let (object, trailer) = compress_to_memory(
                Abandoning(std::io::Cursor::new(plain.clone()), &abandon),
                compression,
                Digest::Xxh3,
                || Ok(0),
                &abandon,
            )
            .unwrap();
            assert!(object.is_none(), "{threads} threads");
            assert_eq!(trailer, file_identity(file.path(), Digest::Xxh3).unwrap());
        }
    }

    #[test]
    fn parts_reach_five_tebibytes_within_ten_thousand() {
        const MIB: usize = 1 << 20;
        for base in [MIN_PART, 8 * MIB, 16 * MIB, 100 * MIB, 1 << 30] {
            let sizes: Vec<u64> = (0..MAX_PARTS).map(|i| part_size(base, i) as u64).collect();
            let total: u64 = sizes.iter().sum();
            assert!(
                total >= 5 << 40,
                "base {base}: {total} bytes in 10,000 parts"
            );
            assert!(
                sizes
                    .iter()
                    .all(|&s| s <= MAX_PART_SIZE && s >= base as u64)
            );
            assert!(
                sizes.windows(2).all(|w| w[0] <= w[1]),
                "base {base}: parts shrink"
            );
        }
        // Up to 68 GiB (from the 5 MiB minimum), parts stay at most 4x the configured size.
        let mut sum = 0u64;
        let mut i = 0;
        while sum < 68 << 30 {
            assert!(part_size(MIN_PART, i) <= 4 * MIN_PART);
            sum += part_size(MIN_PART, i) as u64;
            i += 1;
        }
        // The schedule before it scaled for 5 TiB stopped at about 484 GiB (8 MiB parts).
        assert_eq!(part_size(8 * MIB, 0), 8 * MIB);
        assert_eq!(part_size(8 * MIB, 5999), 32 * MIB);
    }

    #[tokio::test]
    async fn a_veto_from_the_note_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().into());
        for (len, part) in [(1000usize, 5 << 20), (3 << 20, 1 << 16)] {
            let err = upload_noted(
                &store,
                "obj",
                std::io::Cursor::new(data(len)),
                opts(part),
                || Err(anyhow::anyhow!("refused: not this cluster's")),
                WriteMode::CreateOnly,
            )
            .await
            .unwrap_err();
            assert!(format!("{err:#}").contains("not this cluster's"), "{err:#}");
            assert!(store.list("").await.unwrap().is_empty());
            assert!(store.leftovers().await.unwrap().is_empty());
        }
    }

    /// An encrypted repository in `dir`: the key pair's files, and stores for a writer, a
    /// reader and one without keys.
    struct Encrypted {
        dir: tempfile::TempDir,
        recipients: std::path::PathBuf,
        identity: std::path::PathBuf,
    }

    impl Encrypted {
        async fn new() -> Encrypted {
            let dir = tempfile::tempdir().unwrap();
            let identity = dir.path().join("key.txt");
            let public = crate::crypto::keys::keygen(&identity).unwrap();
            let recipients = dir.path().join("recipients.txt");
            std::fs::write(&recipients, format!("{public}\n")).unwrap();
            std::fs::create_dir(dir.path().join("repo")).unwrap();
            let e = Encrypted {
                dir,
                recipients,
                identity,
            };
            let r = crate::crypto::Recipients::load(&e.recipients).unwrap();
            crate::crypto::record::set(&e.bare(), &r).await.unwrap();
            e
        }

        fn bare(&self) -> LocalStore {
            LocalStore::new(self.dir.path().join("repo"))
        }

        fn store(
            &self,
            recipients: Option<&std::path::Path>,
            identity: Option<&std::path::Path>,
        ) -> crate::storage::Keyed {
            crate::storage::Keyed::new(
                Box::new(self.bare()),
                crate::crypto::keyring::Keyring::new(
                    "file:///repo",
                    crate::crypto::EncryptionConfig {
                        recipients_file: recipients.map(Into::into),
                        identity_file: identity.map(Into::into),
                        previous_recipients_file: None,
                    },
                ),
            )
        }

        fn raw(&self, key: &str) -> Vec<u8> {
            std::fs::read(self.dir.path().join("repo").join(key)).unwrap()
        }
    }

    fn marked(len: usize) -> Vec<u8> {
        let mut plain = b"MARKER-secret-row ".repeat(len / 18 + 1);
        plain.truncate(len);
        plain
    }

    #[tokio::test]
    async fn an_encrypted_repository_stores_no_plaintext_and_reads_back() {
        let e = Encrypted::new().await;
        let writer = e.store(Some(&e.recipients), None);
        let reader = e.store(None, Some(&e.identity));
        for (len, part) in [(0usize, 5 << 20), (100_000, 5 << 20), (12 << 20, 1 << 16)] {
            let plain = marked(len);
            let w = upload(
                &writer,
                "obj",
                std::io::Cursor::new(plain.clone()),
                opts(part),
            )
            .await
            .unwrap();
            let seal = w.seal.expect("sealed");
            let raw = e.raw("obj");
            assert_eq!(raw.len() as u64, w.stored_size);
            assert!(
                !raw.windows(6).any(|x| x == b"MARKER"),
                "plaintext in the object"
            );
            // Without a key: the seal; with one, the bytes.
            let stored = read_trailer(&writer, "obj", w.stored_size).await.unwrap();
            assert_eq!(stored, Stored::Sealed(seal));
            let obj = crate::repo::manifest::ObjectRef::written("obj", &w);
            assert!(obj.agrees(&stored));
            assert_eq!(stored.holds(std::slice::from_ref(&w.trailer), None), None);
            let r = crate::crypto::Recipients::load(&e.recipients).unwrap();
            assert_eq!(
                stored.holds(std::slice::from_ref(&w.trailer), Some(&r)),
                Some(true)
            );
            // After a rotation: a writer of the next key set cannot tell, unless it knows
            // this one's public keys as the previous recipients.
            let next_key = e.dir.path().join("next.key");
            let next_pub = e.dir.path().join("next.pub");
            let public = crate::crypto::keys::keygen(&next_key).unwrap();
            std::fs::write(&next_pub, format!("{public}\n")).unwrap();
            let next = crate::crypto::Recipients::load(&next_pub).unwrap();
            assert_eq!(
                stored.holds(std::slice::from_ref(&w.trailer), Some(&next)),
                None
            );
            let next = next.with_previous(r.clone());
            assert_eq!(
                stored.holds(std::slice::from_ref(&w.trailer), Some(&next)),
                Some(true)
            );
            let other = Trailer::of(b"other bytes");
            assert_eq!(
                stored.holds(std::slice::from_ref(&other), Some(&next)),
                Some(false)
            );
            std::fs::remove_file(&next_key).unwrap();
            let (out, fetched) = download(&reader, "obj", Vec::new()).await.unwrap();
            assert_eq!(out, plain, "len {len}");
            obj.verify(&fetched, "obj").unwrap();
        }
        // In-memory objects (wal-push, xxh3-128) are sealed too.
        let (object, trailer) = compress_to_memory(
            std::io::Cursor::new(marked(5000)),
            opts(5 << 20).compression,
            Digest::Xxh3,
            || Ok(9),
            &AtomicBool::new(false),
        )
        .unwrap();
        put_compressed(
            &writer,
            "mem",
            object.unwrap().into(),
            opts(5 << 20).upload,
            WriteMode::CreateOnly,
        )
        .await
        .unwrap();
        let raw = e.raw("mem");
        assert!(!raw.windows(6).any(|x| x == b"MARKER"));
        assert_eq!(
            read_note(&writer, "mem", raw.len() as u64).await.unwrap(),
            9
        );
        assert_eq!(
            download(&reader, "mem", Vec::new()).await.unwrap().0,
            marked(5000)
        );
        // A seal does not say which digest the plain bytes were identified by: both count.
        let stored = read_trailer(&writer, "mem", raw.len() as u64)
            .await
            .unwrap();
        assert_eq!(stored.digests(), &Digest::ALL);
        let sha = Trailer::of(&marked(5000));
        let r = crate::crypto::Recipients::load(&e.recipients).unwrap();
        assert_eq!(stored.holds(&[sha], Some(&r)), Some(false));
        assert_eq!(stored.holds(&[sha, trailer], Some(&r)), Some(true));
        // Compared one digest at a time: the xxh3 match settles it without SHA-256.
        let mut asked = Vec::new();
        let (held, _) = stored
            .holds_by(Some(&r), |d| {
                asked.push(d);
                Ok(Trailer::of_digest(d, &marked(5000)))
            })
            .unwrap();
        assert_eq!((held, asked), (Some(true), vec![Digest::Xxh3]));
    }

    #[tokio::test]
    async fn writers_and_readers_without_the_keys_are_refused_before_writing() {
        let e = Encrypted::new().await;
        let before = e.bare().list("").await.unwrap().len();
        for store in [
            Box::new(e.store(None, Some(&e.identity))) as Box<dyn Store>,
            Box::new(e.bare()),
        ] {
            let err = upload(
                store.as_ref(),
                "obj",
                std::io::Cursor::new(marked(10)),
                opts(5 << 20),
            )
            .await
            .unwrap_err();
            assert_eq!(crate::error::exit_code(&err), 1, "{err:#}");
            assert!(
                err.to_string().contains("encryption.recipients_file"),
                "{err}"
            );
            let err = put_compressed(
                store.as_ref(),
                "mem",
                Bytes::from_static(b"x"),
                opts(5 << 20).upload,
                WriteMode::CreateOnly,
            )
            .await
            .unwrap_err();
            assert_eq!(crate::error::exit_code(&err), 1, "{err:#}");
        }
        assert_eq!(e.bare().list("").await.unwrap().len(), before);

        let writer = e.store(Some(&e.recipients), None);
        upload(
            &writer,
            "obj",
            std::io::Cursor::new(marked(1000)),
            opts(5 << 20),
        )
        .await
        .unwrap();
        // No identity, and the wrong one: exit 1 naming the setting, nothing handed on.
        let other = e.dir.path().join("other.txt");
        crate::crypto::keys::keygen(&other).unwrap();
        for store in [e.store(None, None), e.store(None, Some(&other))] {
            let err = download(&store, "obj", Vec::new()).await.unwrap_err();
            assert_eq!(crate::error::exit_code(&err), 1, "{err:#}");
            assert!(
                err.to_string().contains("encryption.identity_file"),
                "{err}"
            );
        }
        // Damage is corruption, not a key problem.
        let reader = e.store(None, Some(&e.identity));
        let path = e.dir.path().join("repo/obj");
        let mut raw = std::fs::read(&path).unwrap();
        let i = raw.len() / 2;
        raw[i] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        let err = download(&reader, "obj", Vec::new()).await.unwrap_err();
        assert!(crate::error::is_corrupt(&err), "{err:#}");
    }

    struct Stalling;
    #[async_trait::async_trait]
    impl Store for Stalling {
        async fn put(&self, _: &str, _: Bytes) -> anyhow::Result<()> {
            unreachable!()
        }
        async fn put_new(&self, _: &str, _: Bytes) -> anyhow::Result<()> {
            unreachable!()
        }
        async fn start_upload(&self, _: &str) -> anyhow::Result<Box<dyn crate::storage::Upload>> {
            unreachable!()
        }
        async fn start_upload_new(
            &self,
            _: &str,
        ) -> anyhow::Result<Box<dyn crate::storage::Upload>> {
            unreachable!()
        }
        async fn get(&self, _: &str) -> anyhow::Result<crate::storage::ByteStream> {
            // The answer comes, then the body stops after its first bytes.
            let first = futures::stream::once(async { Ok(Bytes::from_static(b"\x28\xb5")) });
            Ok(Box::pin(first.chain(futures::stream::pending())))
        }
        async fn get_range(&self, _: &str, _: std::ops::Range<u64>) -> anyhow::Result<Bytes> {
            unreachable!()
        }
        async fn head(&self, _: &str) -> anyhow::Result<Option<crate::storage::ObjectInfo>> {
            unreachable!()
        }
        async fn list(&self, _: &str) -> anyhow::Result<Vec<crate::storage::ObjectInfo>> {
            unreachable!()
        }
        async fn delete(&self, _: &str) -> anyhow::Result<()> {
            unreachable!()
        }
        async fn leftovers(&self) -> anyhow::Result<Vec<crate::storage::Leftover>> {
            unreachable!()
        }
        async fn remove_leftover(&self, _: &crate::storage::Leftover) -> anyhow::Result<()> {
            unreachable!()
        }
    }

    impl std::fmt::Debug for Stalling {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Stalling")
        }
    }

    #[tokio::test]
    async fn a_stalled_download_is_given_up_and_counts_as_transient() {
        let limit = std::time::Duration::from_millis(200);
        let err = download_watched(&Stalling, "seg", Vec::new(), Some(limit))
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("no data from the store"),
            "{err:#}"
        );
        assert!(crate::storage::is_transient(&err));
    }
}
