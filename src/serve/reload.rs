//! `serve` runs for months while the files it was started from change under it: a ConfigMap
//! or a Secret mounted as a directory is updated in place. Going on with what it read at start
//! would keep it storing into a repository the configuration no longer names (while every
//! `wal-push`, a new process, reads the new one), encrypting for a key set that was rotated,
//! connecting with a password that was changed.
//!
//! So it reads its configuration again every `CHECK_EVERY`. When anything changed (a setting,
//! a secret, the contents of a key file) it drains as on SIGTERM and exits 3, for its
//! supervisor (the kubelet) to start it again with the new configuration. A configuration that
//! no longer loads is not applied: the running one goes on, and the error is logged (once per
//! distinct error).

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::Failure;

pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Reads the configuration again, as the command line did at start.
pub type Reload = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// Everything a restart would pick up, as one digest: every setting (`Debug`, which redacts
/// the secrets), the secrets themselves, and the contents of the key files, which are read
/// when used rather than at load.
pub fn fingerprint(cfg: &Config) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(format!("{cfg:?}"));
    for secret in cfg.secrets() {
        h.update([0]);
        h.update(Sha256::digest(secret.expose()));
    }
    let key_files = [
        &cfg.encryption.recipients_file,
        &cfg.encryption.identity_file,
    ];
    for file in key_files.into_iter().flatten() {
        h.update([1]);
        match std::fs::read(file) {
            Ok(bytes) => h.update(Sha256::digest(bytes)),
            Err(e) => h.update(format!("unreadable: {:?}", e.kind())),
        }
    }
    h.finalize().into()
}

/// Returns `Failure::Restart` once the configuration `reload` reads is not `running`'s.
pub async fn watch(
    running: Config,
    reload: Reload,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let was = fingerprint(&running);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        // A few small files: read in place.
        match reload() {
            Ok(now) if fingerprint(&now) != was => {
                let what = if now.repository_identity() != running.repository_identity() {
                    format!(
                        "the configuration names another repository now ({})",
                        now.repo.as_deref().unwrap_or("none")
                    )
                } else {
                    "a setting, a secret or a key file changed".to_string()
                };
                return Err(anyhow::Error::new(Failure::Restart(format!(
                    "{what}: serve exits so that its supervisor starts it again with the new configuration"
                ))));
            }
            Ok(_) => last_error = None,
            Err(e) => {
                let line = crate::error::one_line(&e);
                if last_error.as_ref() != Some(&line) {
                    tracing::error!(error = %line, "the configuration no longer loads: serve goes on with the one it started with");
                    last_error = Some(line);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Env, Overrides};

    fn load(dir: &std::path::Path, text: &str, env: &dyn Env) -> Config {
        let file = dir.join("dbagent.toml");
        std::fs::write(&file, text).unwrap();
        let flags = Overrides {
            config_file: Some(file),
            repo: None,
        };
        Config::load(&flags, env).unwrap()
    }

    #[test]
    fn a_changed_setting_secret_or_key_file_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("recipients.txt");
        std::fs::write(&keys, "age1old\n").unwrap();
        let base = format!(
            "repo = \"file:///var/backups\"\n[encryption]\nrecipients_file = {:?}\n",
            keys.display().to_string()
        );
        let env = [("HOSTNAME", "pod-0"), ("AWS_SECRET_ACCESS_KEY", "x")];
        let a = load(dir.path(), &base, &env);
        let before = fingerprint(&a);
        assert_eq!(before, fingerprint(&load(dir.path(), &base, &env)));

        let moved = load(
            dir.path(),
            &base.replace("/var/backups", "/srv/backups"),
            &env,
        );
        assert_ne!(before, fingerprint(&moved));
        assert_ne!(a.repository_identity(), moved.repository_identity());

        let rotated = [("HOSTNAME", "pod-0"), ("AWS_SECRET_ACCESS_KEY", "y")];
        let b = load(dir.path(), &base, &rotated);
        assert_ne!(before, fingerprint(&b));
        assert!(!format!("{b:?}").contains("\"y\""), "secrets stay redacted");
        assert_eq!(a.repository_identity(), b.repository_identity());

        std::fs::write(&keys, "age1new\n").unwrap();
        assert_ne!(before, fingerprint(&a), "the recipients file's contents");
    }
}
