//! Sealed blobs of a file-level backup: one data key per writer, wrapped once with age.
//!
//! A file-level backup stores its data as 1 MiB blobs, each compressed and, in an encrypted
//! repository, sealed on its own so that a restore can open any of them alone. Sealing each
//! as an age stream ran age's X25519 key agreement twice per blob (once per blob to wrap a
//! fresh file key, once on the way back): at scale 70 a thousand times each way, which put
//! an encrypted backup 10–20% behind a plain one. Now a writer draws one 32-byte data key,
//! wraps it with age for the repository's recipients once, and seals every blob with
//! XChaCha20-Poly1305 under that key:
//!
//! ```text
//! "dbagent-blob/1\n"  (15 bytes)
//! wrapped key length  (u32, little-endian)
//! wrapped key         (an age stream of the 32-byte data key, to the recipients)
//! nonce               (24 random bytes)
//! ciphertext + tag    (XChaCha20-Poly1305 of the compressed blob; the bytes above are
//!                      its associated data)
//! ```
//!
//! Every blob still carries what opens it (the wrapped key, a few hundred bytes), so nothing
//! else in the repository changes; a reader unwraps each distinct wrapped key once. Random
//! 192-bit nonces never repeat in practice under one key. Blobs sealed as whole age streams
//! by earlier versions are still read (`fileset::BlobReader`).

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

use super::keys::{Fingerprint, Identities, Recipients};
use crate::error::Failure;

/// The first bytes of a blob sealed under a wrapped data key.
pub const MAGIC: &[u8] = b"dbagent-blob/1\n";
const NONCE: usize = 24;
/// Longest wrapped key read back: an age stream of 32 bytes is about 200 bytes per recipient.
const MAX_WRAPPED: usize = 64 << 10;
/// Wrapped keys a reader keeps unwrapped: a restore meets one or two per backup in its chain.
const KEYS_KEPT: usize = 32;

/// Seals blobs under one data key, drawn and wrapped on first use.
#[derive(Default)]
pub struct BlobSealer {
    key: Option<(Vec<Fingerprint>, XChaCha20Poly1305, Vec<u8>)>,
}

impl BlobSealer {
    /// `plain` sealed for `recipients`.
    pub fn seal(&mut self, recipients: &Recipients, plain: &[u8]) -> anyhow::Result<Vec<u8>> {
        let fresh = self
            .key
            .as_ref()
            .is_none_or(|(f, _, _)| f != recipients.fingerprints());
        if fresh {
            let key = XChaCha20Poly1305::generate_key(&mut OsRng);
            let wrapped = super::seal::seal_bytes(recipients, key.as_slice())?;
            let mut header = Vec::with_capacity(MAGIC.len() + 4 + wrapped.len());
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&(wrapped.len() as u32).to_le_bytes());
            header.extend_from_slice(&wrapped);
            self.key = Some((
                recipients.fingerprints().to_vec(),
                XChaCha20Poly1305::new(&key),
                header,
            ));
        }
        let (_, cipher, header) = self.key.as_ref().expect("a data key");
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain,
                    aad: header,
                },
            )
            .map_err(|_| anyhow::anyhow!("sealing a blob failed"))?;
        let mut out = Vec::with_capacity(header.len() + NONCE + sealed.len());
        out.extend_from_slice(header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }
}

/// Opens blobs `BlobSealer` sealed, unwrapping each data key once.
#[derive(Default)]
pub struct BlobOpener {
    keys: Vec<(Vec<u8>, XChaCha20Poly1305)>,
}

impl BlobOpener {
    /// The plain bytes of `stored` (which starts with `MAGIC`); `name` says where it is.
    pub fn open(
        &mut self,
        identities: &Identities,
        stored: &[u8],
        name: &str,
    ) -> anyhow::Result<Vec<u8>> {
        let corrupt =
            |why: &str| anyhow::Error::new(Failure::Corrupt(format!("{name} is corrupt: {why}")));
        let rest = stored
            .strip_prefix(MAGIC)
            .ok_or_else(|| corrupt("not a sealed blob"))?;
        let len = rest
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .filter(|&l| l <= MAX_WRAPPED)
            .ok_or_else(|| corrupt("its wrapped key is cut short"))?;
        let header_len = MAGIC.len() + 4 + len;
        if stored.len() < header_len + NONCE + 16 {
            return Err(corrupt("it is cut short"));
        }
        let (header, body) = stored.split_at(header_len);
        let wrapped = &header[MAGIC.len() + 4..];
        let at = match self.keys.iter().position(|(w, _)| w == wrapped) {
            Some(at) => at,
            None => {
                let key = super::seal::open_bytes(identities, wrapped, name)?;
                if key.len() != 32 {
                    return Err(corrupt("its data key is not 32 bytes"));
                }
                if self.keys.len() == KEYS_KEPT {
                    self.keys.remove(0);
                }
                let cipher = XChaCha20Poly1305::new(Key::from_slice(&key));
                self.keys.push((wrapped.to_vec(), cipher));
                self.keys.len() - 1
            }
        };
        let (nonce, sealed) = body.split_at(NONCE);
        self.keys[at]
            .1
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: header,
                },
            )
            .map_err(|_| corrupt("it fails authentication (altered, or not what was sealed)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::test_pair as pair;

    #[test]
    fn blobs_share_one_wrapped_key_and_open_only_with_it_unaltered() {
        let (ids, rs) = pair();
        let mut sealer = BlobSealer::default();
        let a = sealer.seal(&rs, b"first blob").unwrap();
        let b = sealer.seal(&rs, b"second blob").unwrap();
        assert!(a.starts_with(MAGIC));
        // One data key, wrapped once: both blobs carry the same header, and no plain bytes.
        let header = MAGIC.len() + 4 + u32::from_le_bytes(a[15..19].try_into().unwrap()) as usize;
        assert_eq!(a[..header], b[..header]);
        assert!(!a.windows(10).any(|w| w == b"first blob"));
        // Two blobs of the same bytes differ (a nonce each).
        assert_ne!(sealer.seal(&rs, b"first blob").unwrap(), a);

        let mut opener = BlobOpener::default();
        assert_eq!(opener.open(&ids, &a, "a").unwrap(), b"first blob");
        assert_eq!(opener.open(&ids, &b, "b").unwrap(), b"second blob");
        assert_eq!(opener.keys.len(), 1, "the key is unwrapped once");

        // Any altered byte, in the header, the nonce or the ciphertext, is corruption.
        for at in [3, header - 1, header + 5, a.len() - 1] {
            let mut bad = a.clone();
            bad[at] ^= 1;
            let err = BlobOpener::default()
                .open(&ids, &bad, "blob 3")
                .unwrap_err();
            assert_eq!(crate::error::exit_code(&err), 2, "byte {at}: {err:#}");
        }
        // A cut blob too, and someone else's key is an input error naming the setting.
        let err = opener.open(&ids, &a[..header + 10], "blob 4").unwrap_err();
        assert_eq!(crate::error::exit_code(&err), 2, "{err:#}");
        let (other, _) = pair();
        let err = BlobOpener::default()
            .open(&other, &a, "blob 5")
            .unwrap_err();
        assert!(format!("{err:#}").contains("does not hold"), "{err:#}");

        // New recipients: a new data key.
        let (ids2, rs2) = pair();
        let c = sealer.seal(&rs2, b"third").unwrap();
        assert_ne!(c[..header.min(c.len())], a[..header]);
        assert_eq!(opener.open(&ids2, &c, "c").unwrap(), b"third");
    }
}
