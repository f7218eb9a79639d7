//! age X25519 keys: the recipients file writers use, the identity file readers use, the
//! fingerprints the repository records, and `dbagent keygen`.
//!
//! Both files are in the formats `age-keygen` and `age` use: a recipients file holds public
//! keys (`age1…`) one per line, an identity file secret keys (`AGE-SECRET-KEY-1…`), one per
//! line, possibly several (old and new keys during a rotation). `#` starts a comment line.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use age::x25519;
use sha2::{Digest, Sha256};

use crate::input_err;

/// The setting writers need (a path to public keys).
pub const RECIPIENTS_SETTING: &str =
    "encryption.recipients_file (DBAGENT_ENCRYPTION_RECIPIENTS_FILE)";
/// The setting readers need (a path to secret keys).
pub const IDENTITY_SETTING: &str = "encryption.identity_file (DBAGENT_ENCRYPTION_IDENTITY_FILE)";

/// Names one public key without spelling it out: the first 8 bytes of the SHA-256 of its
/// `age1…` text, in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub [u8; 8]);

impl Fingerprint {
    pub fn of(recipient: &x25519::Recipient) -> Fingerprint {
        let digest = Sha256::digest(recipient.to_string().as_bytes());
        Fingerprint(digest[..8].try_into().expect("8 of 32 bytes"))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for Fingerprint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = hex::decode(s).map_err(|_| format!("{s:?} is not a key fingerprint"))?;
        bytes
            .try_into()
            .map(Fingerprint)
            .map_err(|_| format!("{s:?} is not a key fingerprint (16 hex digits)"))
    }
}

/// Names a set of recipients: the first 8 bytes of the SHA-256 of their sorted fingerprints.
/// Every encrypted object carries the key set it was encrypted for, so a reader knows
/// without trying whether one of its identities opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeySet(pub [u8; 8]);

impl KeySet {
    pub fn of(fingerprints: &[Fingerprint]) -> KeySet {
        let mut sorted = fingerprints.to_vec();
        sorted.sort();
        sorted.dedup();
        let mut h = Sha256::new();
        for fp in &sorted {
            h.update(fp.to_string().as_bytes());
            h.update(b"\n");
        }
        KeySet(h.finalize()[..8].try_into().expect("8 of 32 bytes"))
    }
}

impl fmt::Display for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for KeySet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Fingerprint::from_str(s)
            .map(|f| KeySet(f.0))
            .map_err(|_| format!("{s:?} is not a key set id (16 hex digits)"))
    }
}

/// The public keys new objects are encrypted for.
#[derive(Clone)]
pub struct Recipients {
    keys: Vec<x25519::Recipient>,
    fingerprints: Vec<Fingerprint>,
    source: PathBuf,
    /// The key set before this one (`encryption.previous_recipients_file`): only compared
    /// with, never encrypted for.
    previous: Option<Box<Recipients>>,
}

impl fmt::Debug for Recipients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recipients")
            .field("fingerprints", &self.fingerprints)
            .field("source", &self.source)
            .field("previous", &self.previous)
            .finish()
    }
}

impl Recipients {
    pub fn load(path: &Path) -> anyhow::Result<Recipients> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| input_err!("{RECIPIENTS_SETTING}: cannot read {}: {e}", path.display()))?;
        Recipients::parse(&text, path)
    }

    pub fn parse(text: &str, source: &Path) -> anyhow::Result<Recipients> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with("AGE-SECRET-KEY-") {
                return Err(input_err!(
                    "{RECIPIENTS_SETTING}: {} line {} holds a secret key: a recipients file holds public keys (age1…); keep the secret key for readers, in encryption.identity_file",
                    source.display(),
                    n + 1
                ));
            }
            let key = x25519::Recipient::from_str(line).map_err(|e| {
                input_err!(
                    "{RECIPIENTS_SETTING}: {} line {}: not an age X25519 public key (age1…): {e}",
                    source.display(),
                    n + 1
                )
            })?;
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(input_err!(
                "{RECIPIENTS_SETTING}: {} holds no public key (age1…, one per line)",
                source.display()
            ));
        }
        let fingerprints = keys.iter().map(Fingerprint::of).collect();
        Ok(Recipients {
            keys,
            fingerprints,
            source: source.to_path_buf(),
            previous: None,
        })
    }

    pub fn fingerprints(&self) -> &[Fingerprint] {
        &self.fingerprints
    }

    pub fn key_set(&self) -> KeySet {
        KeySet::of(&self.fingerprints)
    }

    /// These recipients, knowing the public keys of the key set before them.
    pub fn with_previous(mut self, previous: Recipients) -> Recipients {
        self.previous = Some(Box::new(Recipients {
            previous: None,
            ..previous
        }));
        self
    }

    /// The recipients (these, or the previous key set's) an object of `key_set` was
    /// encrypted for, when this writer knows their public keys.
    pub fn of_key_set(&self, key_set: KeySet) -> Option<&Recipients> {
        if self.key_set() == key_set {
            return Some(self);
        }
        self.previous.as_deref().filter(|p| p.key_set() == key_set)
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The key of `seal::plain_id`: a hash of the public keys themselves (sorted), which the
    /// repository never stores (it records fingerprints only).
    pub fn plain_id_key(&self) -> [u8; 32] {
        let mut texts: Vec<String> = self.keys.iter().map(|k| k.to_string()).collect();
        texts.sort();
        let mut h = Sha256::new();
        for t in texts {
            h.update(t.as_bytes());
            h.update(b"\n");
        }
        h.finalize().into()
    }

    pub(crate) fn encryptor(&self) -> age::Encryptor {
        age::Encryptor::with_recipients(self.keys.iter().map(|k| k as &dyn age::Recipient))
            .expect("X25519 recipients, at least one")
    }
}

/// The secret keys objects are decrypted with. Never printed: `Debug` shows fingerprints.
pub struct Identities {
    keys: Vec<x25519::Identity>,
    fingerprints: Vec<Fingerprint>,
    source: PathBuf,
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identities")
            .field("fingerprints", &self.fingerprints)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Identities {
    pub fn load(path: &Path) -> anyhow::Result<Identities> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| input_err!("{IDENTITY_SETTING}: cannot read {}: {e}", path.display()))?;
        Identities::parse(&text, path)
    }

    pub fn parse(text: &str, source: &Path) -> anyhow::Result<Identities> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // Never quote the line: it may be a secret key with a typo.
            let key = x25519::Identity::from_str(line).map_err(|_| {
                input_err!(
                    "{IDENTITY_SETTING}: {} line {}: not an age X25519 secret key (AGE-SECRET-KEY-1…, as age-keygen writes)",
                    source.display(),
                    n + 1
                )
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(input_err!(
                "{IDENTITY_SETTING}: {} holds no secret key (AGE-SECRET-KEY-1…)",
                source.display()
            ));
        }
        let fingerprints = keys
            .iter()
            .map(|k| Fingerprint::of(&k.to_public()))
            .collect();
        Ok(Identities {
            keys,
            fingerprints,
            source: source.to_path_buf(),
        })
    }

    pub fn fingerprints(&self) -> &[Fingerprint] {
        &self.fingerprints
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// True when one of these keys is among `fingerprints`.
    pub fn opens(&self, fingerprints: &[Fingerprint]) -> bool {
        self.fingerprints.iter().any(|f| fingerprints.contains(f))
    }

    pub(crate) fn as_age(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.keys.iter().map(|k| k as &dyn age::Identity)
    }
}

/// A new key pair, read as readers and writers read theirs (for tests).
#[cfg(test)]
pub fn test_pair() -> (Identities, Recipients) {
    use age::secrecy::ExposeSecret;
    let (secret, public) = generate();
    (
        Identities::parse(secret.expose_secret(), Path::new("/id")).unwrap(),
        Recipients::parse(&public, Path::new("/r")).unwrap(),
    )
}

/// A new key pair in `age-keygen`'s format. The first line is the identity file's text, the
/// second the public key (the recipients file's line).
pub fn generate() -> (age::secrecy::SecretString, String) {
    let key = x25519::Identity::generate();
    let public = key.to_public().to_string();
    let text = format!(
        "# created: {}\n# public key: {public}\n{}\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        key.to_string().expose_secret()
    );
    (text.into(), public)
}

/// Writes a new identity file (mode 0600, never over an existing file) and returns the
/// public key.
pub fn keygen(path: &Path) -> anyhow::Result<String> {
    let (text, public) = generate();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => input_err!(
                "{} exists: keygen never overwrites a key; choose another --output",
                path.display()
            ),
            _ => input_err!("cannot create {}: {e}", path.display()),
        })?;
    f.write_all(text.expose_secret().as_bytes())?;
    f.sync_all()?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_what_both_files_read() {
        let dir = tempfile::tempdir().unwrap();
        let id_path = dir.path().join("key.txt");
        let public = keygen(&id_path).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&id_path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let ids = Identities::load(&id_path).unwrap();
        let rs = Recipients::parse(&format!("# mine\n{public}\n\n"), Path::new("r")).unwrap();
        assert_eq!(ids.fingerprints(), rs.fingerprints());
        assert!(ids.opens(rs.fingerprints()));
        // Never over an existing file.
        let err = keygen(&id_path).unwrap_err().to_string();
        assert!(err.contains("never overwrites"), "{err}");
    }

    #[test]
    fn key_sets_ignore_order_and_repeats() {
        let (_, a) = generate();
        let (_, b) = generate();
        let ab = Recipients::parse(&format!("{a}\n{b}\n"), Path::new("r")).unwrap();
        let ba = Recipients::parse(&format!("{b}\n{a}\n{b}\n"), Path::new("r")).unwrap();
        let only_a = Recipients::parse(&a, Path::new("r")).unwrap();
        assert_eq!(ab.key_set(), ba.key_set());
        assert_ne!(ab.key_set(), only_a.key_set());
        let shown = ab.key_set().to_string();
        assert_eq!(shown.parse::<KeySet>().unwrap(), ab.key_set());
    }

    #[test]
    fn bad_files_name_the_setting_and_never_echo_a_secret() {
        let (secret, public) = generate();
        let secret_line = secret
            .expose_secret()
            .lines()
            .find(|l| l.starts_with("AGE-SECRET-KEY-"))
            .unwrap()
            .to_string();
        let err = Recipients::parse(&secret_line, Path::new("/r.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("encryption.recipients_file"), "{err}");
        assert!(!err.contains(&secret_line[20..]), "{err}");
        let err = Recipients::parse("# nothing\n", Path::new("/r.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no public key"), "{err}");
        let typo = format!("{}X", &secret_line);
        let err = Identities::parse(&typo, Path::new("/id.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("encryption.identity_file"), "{err}");
        assert!(!err.contains(&secret_line[20..]), "{err}");
        let err = Identities::parse(&public, Path::new("/id.txt"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        // Debug shows fingerprints only.
        let ids = Identities::parse(&secret_line, Path::new("/id.txt")).unwrap();
        assert!(!format!("{ids:?}").contains(&secret_line[20..]));
    }
}
