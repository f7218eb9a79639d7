//! Sealed objects: an age stream around today's object format, then a clear trailer (the
//! *seal*) that listing and `verify` read without a key. See the module above for the layout.
//!
//! Both directions stream with bounded memory: age encrypts and decrypts 64 KiB chunks, the
//! hashing is done as bytes pass, and the reader holds back only the seal's 112 bytes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::keys::{IDENTITY_SETTING, Identities, KeySet, Recipients};
use crate::error::Failure;

/// zstd skippable frame magic, as the plain trailer uses: the seal has the same framing.
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
const SEAL_TAG: &[u8; 8] = b"DBAGENTS";
/// tag, plain size, note, cipher size, cipher SHA-256, key set, keyed plain id.
const SEAL_PAYLOAD: usize = 8 + 8 + 8 + 8 + 32 + 8 + 32;
/// The seal's length at the end of every encrypted object.
pub const SEAL_LEN: usize = 8 + SEAL_PAYLOAD;
const READ_CHUNK: usize = 256 << 10;

/// What the clear trailer of an encrypted object says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    /// Bytes of the plain object (before compression): a size, as manifests show.
    pub plain_size: u64,
    /// The plain trailer's note (a WAL segment's last transaction time), repeated here so
    /// `list` reads it without a key.
    pub note: u64,
    /// Bytes of the age stream (the object without its seal).
    pub cipher_size: u64,
    /// SHA-256 of the age stream: what `verify` and restores compare with the manifest.
    pub cipher_sha256: [u8; 32],
    /// The recipients the object was encrypted for.
    pub key_set: KeySet,
    /// The plain bytes' SHA-256 hashed again with a key derived from the recipients' public
    /// keys (`Recipients::plain_id`): a writer holding the same recipients file can tell
    /// whether a stored object has the same content as its own (two pushes of one WAL name),
    /// while whoever reads the bucket, without that file, learns nothing about the content.
    pub plain_id: [u8; 32],
}

impl Seal {
    pub fn encode(&self) -> [u8; SEAL_LEN] {
        let mut out = [0u8; SEAL_LEN];
        out[0..4].copy_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&(SEAL_PAYLOAD as u32).to_le_bytes());
        out[8..16].copy_from_slice(SEAL_TAG);
        out[16..24].copy_from_slice(&self.plain_size.to_le_bytes());
        out[24..32].copy_from_slice(&self.note.to_le_bytes());
        out[32..40].copy_from_slice(&self.cipher_size.to_le_bytes());
        out[40..72].copy_from_slice(&self.cipher_sha256);
        out[72..80].copy_from_slice(&self.key_set.0);
        out[80..112].copy_from_slice(&self.plain_id);
        out
    }

    /// `None` unless `bytes` is exactly a seal.
    pub fn decode(bytes: &[u8]) -> Option<Seal> {
        if bytes.len() != SEAL_LEN
            || bytes[0..4] != SKIPPABLE_MAGIC.to_le_bytes()
            || bytes[4..8] != (SEAL_PAYLOAD as u32).to_le_bytes()
            || &bytes[8..16] != SEAL_TAG
        {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        Some(Seal {
            plain_size: u64_at(16),
            note: u64_at(24),
            cipher_size: u64_at(32),
            cipher_sha256: bytes[40..72].try_into().ok()?,
            key_set: KeySet(bytes[72..80].try_into().ok()?),
            plain_id: bytes[80..112].try_into().ok()?,
        })
    }

    /// The seal at the end of an object's last bytes, if the object is encrypted.
    pub fn find(tail: &[u8]) -> Option<Seal> {
        tail.len()
            .checked_sub(SEAL_LEN)
            .and_then(|start| Seal::decode(&tail[start..]))
    }

    pub fn cipher_sha256_hex(&self) -> String {
        hex::encode(self.cipher_sha256)
    }
}

/// Counts and hashes what is written through it.
struct Hashing<W> {
    inner: W,
    size: u64,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Encrypts what is written into it for a set of recipients; `finish` closes the age stream
/// and appends the seal.
pub struct SealWriter<W: Write> {
    age: age::stream::StreamWriter<Hashing<W>>,
    key_set: KeySet,
    plain_id_key: [u8; 32],
}

impl<W: Write> SealWriter<W> {
    pub fn new(recipients: &Recipients, out: W) -> io::Result<SealWriter<W>> {
        let hashing = Hashing {
            inner: out,
            size: 0,
            hasher: Sha256::new(),
        };
        Ok(SealWriter {
            age: recipients.encryptor().wrap_output(hashing)?,
            key_set: recipients.key_set(),
            plain_id_key: recipients.plain_id_key(),
        })
    }

    /// Ends the age stream and writes the seal, which repeats `plain_size` and `note` (the
    /// plain trailer already inside the encrypted part holds them with the plain checksum)
    /// and holds the keyed id of `plain_sha256`.
    pub fn finish(
        self,
        plain_size: u64,
        note: u64,
        plain_sha256: &[u8; 32],
    ) -> io::Result<(W, Seal)> {
        let hashing = self.age.finish()?;
        let seal = Seal {
            plain_size,
            note,
            cipher_size: hashing.size,
            cipher_sha256: hashing.hasher.finalize().into(),
            key_set: self.key_set,
            plain_id: plain_id(&self.plain_id_key, plain_sha256),
        };
        let mut out = hashing.inner;
        out.write_all(&seal.encode())?;
        Ok((out, seal))
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.age.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        // age writes whole chunks; a flush here would only be a no-op on the inner writer.
        Ok(())
    }
}

/// The keyed id of a plain SHA-256 (see `Seal::plain_id`).
pub fn plain_id(key: &[u8; 32], plain_sha256: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"dbagent plain id v1\n");
    h.update(key);
    h.update(plain_sha256);
    h.finalize().into()
}

/// What `HoldBack` found once its input ended.
#[derive(Default)]
struct Held {
    size: u64,
    sha256: [u8; 32],
    tail: Vec<u8>,
    done: bool,
}

/// Passes its input through except for the last `SEAL_LEN` bytes, hashing what it passes.
struct HoldBack<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    hasher: Sha256,
    size: u64,
    eof: bool,
    out: Arc<Mutex<Held>>,
}

impl<R: Read> Read for HoldBack<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let available = self.buf.len() - self.start;
            if available > SEAL_LEN {
                let n = out.len().min(available - SEAL_LEN);
                let released = &self.buf[self.start..self.start + n];
                out[..n].copy_from_slice(released);
                self.hasher.update(released);
                self.size += n as u64;
                self.start += n;
                return Ok(n);
            }
            if self.eof {
                let mut held = self.out.lock().unwrap_or_else(|e| e.into_inner());
                if !held.done {
                    *held = Held {
                        size: self.size,
                        sha256: self.hasher.clone().finalize().into(),
                        tail: self.buf[self.start..].to_vec(),
                        done: true,
                    };
                }
                return Ok(0);
            }
            // Keep what is held, then read a chunk after it.
            self.buf.drain(..self.start);
            self.start = 0;
            let len = self.buf.len();
            self.buf.resize(len + READ_CHUNK, 0);
            let n = loop {
                match self.inner.read(&mut self.buf[len..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.buf.truncate(len);
                        return Err(e);
                    }
                }
            };
            self.buf.truncate(len + n);
            if n == 0 {
                self.eof = true;
            }
        }
    }
}

/// The plain inner object of an encrypted one, read as it is decrypted. Call `finish` after
/// reading to the end: only then are the seal and the stored bytes' checksum checked.
pub struct Opened<R: Read> {
    reader: age::stream::StreamReader<BufReader<HoldBack<R>>>,
    held: Arc<Mutex<Held>>,
    name: String,
}

fn corrupt(msg: String) -> anyhow::Error {
    anyhow::Error::new(Failure::Corrupt(msg))
}

/// Starts decrypting an encrypted object (`name` is for messages). Refuses with an input
/// error naming the identity setting when none of `identities` opens it.
pub fn open<R: Read>(identities: &Identities, input: R, name: &str) -> anyhow::Result<Opened<R>> {
    let held = Arc::new(Mutex::new(Held::default()));
    let hold = HoldBack {
        inner: input,
        buf: Vec::with_capacity(READ_CHUNK + SEAL_LEN),
        start: 0,
        hasher: Sha256::new(),
        size: 0,
        eof: false,
        out: held.clone(),
    };
    let decryptor = age::Decryptor::new_buffered(BufReader::with_capacity(READ_CHUNK, hold))
        .map_err(|e| corrupt(format!("{name} is corrupt: its encryption header: {e}")))?;
    let reader = decryptor.decrypt(identities.as_age()).map_err(|e| match e {
        age::DecryptError::NoMatchingKeys => anyhow::Error::new(Failure::Input(format!(
            "{name} is encrypted for keys that {IDENTITY_SETTING} ({}) does not hold: add the secret key it was written for (see `dbagent encryption status`)",
            identities.source().display()
        ))),
        e => corrupt(format!("{name} is corrupt: its encryption header: {e}")),
    })?;
    Ok(Opened {
        reader,
        held,
        name: name.to_string(),
    })
}

impl<R: Read> Read for Opened<R> {
    /// A chunk that fails authentication, or a stream cut short, is `InvalidData` naming the
    /// object; `read_failure` turns it into a corruption error.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is corrupt: {e}", self.name),
            ),
            _ => e,
        })
    }
}

/// An error from reading an `Opened`: corruption (exit 2, or 126 from `wal-fetch`) when the
/// encrypted data was bad, the I/O error otherwise.
pub fn read_failure(e: io::Error) -> anyhow::Error {
    match e.kind() {
        io::ErrorKind::InvalidData => corrupt(e.to_string()),
        _ => anyhow::Error::new(e),
    }
}

impl<R: Read> Opened<R> {
    /// Reads whatever is left (nothing, after a complete read), then checks the seal against
    /// the bytes that passed. The plain trailer inside is the caller's to check.
    pub fn finish(mut self) -> anyhow::Result<Seal> {
        io::copy(&mut self.reader, &mut io::sink())
            .map_err(|e| corrupt(format!("{} is corrupt: {e}", self.name)))?;
        // The age stream ended: anything the buffer still holds lies between it and the seal.
        let rest = self.reader_inner_rest()?;
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if !rest.is_empty() || !held.done {
            return Err(corrupt(format!(
                "{} is corrupt: data after the end of its encrypted part",
                self.name
            )));
        }
        let Some(seal) = Seal::decode(&held.tail) else {
            return Err(corrupt(format!(
                "{} is corrupt or truncated: its seal (the clear trailer of an encrypted object) is missing",
                self.name
            )));
        };
        if seal.cipher_size != held.size || seal.cipher_sha256 != held.sha256 {
            return Err(corrupt(format!(
                "{} is corrupt: checksum mismatch of the stored bytes (recorded {} bytes sha256 {}, got {} bytes sha256 {})",
                self.name,
                seal.cipher_size,
                seal.cipher_sha256_hex(),
                held.size,
                hex::encode(held.sha256)
            )));
        }
        Ok(seal)
    }

    /// Drains what the age reader left unread below it.
    fn reader_inner_rest(&mut self) -> anyhow::Result<Vec<u8>> {
        // StreamReader has no into_inner; it reads its input only up to the final chunk, and
        // its next read after the end reads the input again: a byte there is trailing data.
        let mut probe = [0u8; 1];
        match self.reader.read(&mut probe) {
            Ok(0) => Ok(Vec::new()),
            Ok(_) => Ok(vec![probe[0]]),
            Err(e) => Err(corrupt(format!("{} is corrupt: {e}", self.name))),
        }
    }
}

/// Encrypts a small value whole (manifest details): the age bytes, no seal.
pub fn seal_bytes(recipients: &Recipients, plain: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut w = recipients.encryptor().wrap_output(Vec::new())?;
    w.write_all(plain)?;
    Ok(w.finish()?)
}

/// Decrypts what `seal_bytes` made.
pub fn open_bytes(identities: &Identities, sealed: &[u8], name: &str) -> anyhow::Result<Vec<u8>> {
    let decryptor = age::Decryptor::new_buffered(sealed)
        .map_err(|e| corrupt(format!("{name} is corrupt: {e}")))?;
    let mut reader = decryptor
        .decrypt(identities.as_age())
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => anyhow::Error::new(Failure::Input(format!(
                "{name} is encrypted for keys that {IDENTITY_SETTING} ({}) does not hold",
                identities.source().display()
            ))),
            e => corrupt(format!("{name} is corrupt: {e}")),
        })?;
    let mut out = Vec::new();
    reader
        .read_to_end(&mut out)
        .map_err(|e| corrupt(format!("{name} is corrupt: {e}")))?;
    Ok(out)
}

/// True when `reader`'s first bytes are an age header (an encrypted object whose seal is
/// unknown, e.g. read by hand).
pub fn looks_encrypted(reader: &mut impl BufRead) -> io::Result<bool> {
    Ok(reader.fill_buf()?.starts_with(b"age-encryption.org/v1\n"))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use age::secrecy::ExposeSecret;

    use super::*;
    use crate::crypto::keys::generate;

    fn pair() -> (Identities, Recipients) {
        let (ids, rs, _) = pair_text();
        (ids, rs)
    }

    fn pair_text() -> (Identities, Recipients, String) {
        let (secret, public) = generate();
        (
            Identities::parse(secret.expose_secret(), Path::new("/id")).unwrap(),
            Recipients::parse(&public, Path::new("/r")).unwrap(),
            secret.expose_secret().to_string(),
        )
    }

    fn seal(recipients: &Recipients, plain: &[u8], note: u64) -> Vec<u8> {
        let mut w = SealWriter::new(recipients, Vec::new()).unwrap();
        // Odd-sized writes cross age's chunks.
        for piece in plain.chunks(7919) {
            w.write_all(piece).unwrap();
        }
        let sha: [u8; 32] = Sha256::digest(plain).into();
        let (out, s) = w.finish(plain.len() as u64, note, &sha).unwrap();
        assert_eq!(s.plain_id, plain_id(&recipients.plain_id_key(), &sha));
        assert_eq!(s.cipher_size as usize, out.len() - SEAL_LEN);
        out
    }

    fn open_all(ids: &Identities, object: &[u8]) -> anyhow::Result<(Vec<u8>, Seal)> {
        // A reader that hands out a few bytes at a time, like a network stream.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(5000);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut opened = open(ids, Trickle(object), "obj")?;
        let mut out = Vec::new();
        opened.read_to_end(&mut out).map_err(read_failure)?;
        let seal = opened.finish()?;
        Ok((out, seal))
    }

    #[test]
    fn round_trip_for_every_size_around_age_chunks() {
        let (ids, rs) = pair();
        for len in [0usize, 1, 65535, 65536, 65537, 3 * 65536, 1 << 20] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let object = seal(&rs, &plain, 77);
            let found = Seal::find(&object[object.len().saturating_sub(200)..]).unwrap();
            assert_eq!(found.plain_size, len as u64);
            assert_eq!(found.note, 77);
            assert_eq!(found.key_set, rs.key_set());
            let (back, s) = open_all(&ids, &object).unwrap();
            assert_eq!(back, plain, "len {len}");
            assert_eq!(s, found);
        }
    }

    #[test]
    fn the_wrong_key_is_an_input_error_naming_the_setting() {
        let (_, rs) = pair();
        let (other, _) = pair();
        let object = seal(&rs, b"secret rows", 0);
        let err = open_all(&other, &object).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 1);
        assert!(
            err.to_string().contains("encryption.identity_file"),
            "{err}"
        );
        // An identity file with the old and the new key opens objects of both.
        let (_, r_a, text_a) = pair_text();
        let (_, r_b, text_b) = pair_text();
        let both_text = format!("{text_a}\n{text_b}");
        let both = Identities::parse(&both_text, Path::new("/both")).unwrap();
        for r in [&r_a, &r_b] {
            let object = seal(r, b"rows", 0);
            assert_eq!(open_all(&both, &object).unwrap().0, b"rows");
        }
    }

    #[test]
    fn damage_is_corruption() {
        let (ids, rs) = pair();
        let plain = vec![7u8; 200_000];
        let object = seal(&rs, &plain, 0);
        // A flipped byte in the encrypted part: age's authentication fails.
        let mut bad = object.clone();
        bad[1000] ^= 1;
        let err = open_all(&ids, &bad).unwrap_err();
        assert!(crate::error::is_corrupt(&err), "{err:#}");
        // A flipped byte in the seal's checksum of the stored bytes.
        let mut bad = object.clone();
        let i = bad.len() - SEAL_LEN + 50;
        bad[i] ^= 1;
        let err = open_all(&ids, &bad).unwrap_err();
        assert!(format!("{err:#}").contains("checksum mismatch"), "{err:#}");
        // Truncated: the seal is gone.
        let err = open_all(&ids, &object[..object.len() - 30]).unwrap_err();
        assert!(crate::error::is_corrupt(&err), "{err:#}");
        // Bytes inserted between the age stream and the seal.
        let mut bad = object[..object.len() - SEAL_LEN].to_vec();
        bad.extend_from_slice(b"extra");
        bad.extend_from_slice(&object[object.len() - SEAL_LEN..]);
        let err = open_all(&ids, &bad).unwrap_err();
        assert!(crate::error::is_corrupt(&err), "{err:#}");
    }

    #[test]
    fn small_values_round_trip() {
        let (ids, rs) = pair();
        let sealed = seal_bytes(&rs, b"{\"rows\":42}").unwrap();
        assert!(looks_encrypted(&mut &sealed[..]).unwrap());
        assert_eq!(open_bytes(&ids, &sealed, "m").unwrap(), b"{\"rows\":42}");
    }
}
