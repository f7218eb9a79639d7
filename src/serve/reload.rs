//! `serve` runs for months while the files it was started from change under it: a ConfigMap
//! or a Secret mounted as a directory is updated in place. Going on with what it read at start
//! would keep it storing into a repository the configuration no longer names (while every
//! `wal-push`, a new process, reads the new one), encrypting for a key set that was rotated,
//! connecting with a password that was changed.
//!
//! So it reads its configuration again every `CHECK_EVERY`. When anything it uses itself
//! changed (where and how it stores, the keys, the credentials, what it connects to, its own
//! settings and schedule) it drains as on SIGTERM and starts again in place with the new
//! configuration (`cli::restart_in_place`: the same process, so the kubelet sees no restart;
//! exit 3 for the supervisor only when that fails); a scheduled job still running is let
//! finish first. Settings only its jobs use (backup, restore, drill, notify, retention) need
//! no restart: each job is a new process that reads the configuration itself. A
//! configuration that no longer loads is not applied: the running one goes on, and the error
//! is logged (once per distinct error).

use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::config::Config;
use crate::error::Failure;
use crate::serve::state::Shared;

pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Reads the configuration again, as the command line did at start.
pub type Reload = Box<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// What only a restart of serve applies, as one digest: the settings serve uses itself
/// (`Debug`, which redacts the secrets), their secrets, and the contents of the key files,
/// which are read when used rather than at load.
pub fn fingerprint(cfg: &Config) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        cfg.repo,
        cfg.s3,
        cfg.encryption,
        cfg.compression,
        cfg.upload,
        cfg.pg,
        cfg.wal,
        cfg.mysql,
        cfg.serve,
        cfg.schedule
    ));
    let secrets = [
        &cfg.s3.access_key_id,
        &cfg.s3.secret_access_key,
        &cfg.s3.session_token,
        &cfg.pg.password,
        &cfg.mysql.password,
    ];
    for secret in secrets.into_iter().flatten() {
        h.update([0]);
        h.update(Sha256::digest(secret.expose()));
    }
    let key_files = [
        &cfg.encryption.recipients_file,
        &cfg.encryption.identity_file,
        &cfg.encryption.previous_recipients_file,
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

/// Returns `Failure::Restart` once the configuration `reload` reads is not `running`'s, and no
/// scheduled job (in `shared`) is running.
pub async fn watch(
    running: Config,
    reload: Reload,
    shared: Arc<Shared>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    watch_every(CHECK_EVERY, running, reload, shared, token).await
}

async fn watch_every(
    every: Duration,
    running: Config,
    reload: Reload,
    shared: Arc<Shared>,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let was = fingerprint(&running);
    let mut last_error: Option<String> = None;
    let mut waiting_for: Option<String> = None;
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        // A few small files: read in place.
        match reload() {
            Ok(now) if fingerprint(&now) != was => {
                let busy = shared
                    .jobs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .find(|(_, j)| j.running)
                    .map(|(name, _)| name.clone());
                if let Some(job) = busy {
                    if waiting_for.as_ref() != Some(&job) {
                        tracing::warn!(%job, "the configuration changed: serve restarts to apply it once the running job ends");
                        waiting_for = Some(job);
                    }
                    continue;
                }
                let what = if now.repository_identity() != running.repository_identity() {
                    format!(
                        "the configuration names another repository now ({})",
                        now.repo.as_deref().unwrap_or("none")
                    )
                } else {
                    "a setting, a secret or a key file changed".to_string()
                };
                return Err(anyhow::Error::new(Failure::Restart {
                    why: format!("{what}: serve drained to start again with the new configuration"),
                    in_place: true,
                }));
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

        // What only the jobs read (each a new process) needs no restart.
        let drill = load(
            dir.path(),
            &format!("{base}[drill]\ntimeout = \"2h\"\n"),
            &env,
        );
        assert_eq!(before, fingerprint(&drill));

        std::fs::write(&keys, "age1new\n").unwrap();
        assert_ne!(before, fingerprint(&a), "the recipients file's contents");
    }

    #[tokio::test]
    async fn a_running_job_holds_the_restart_back_until_it_ends() {
        let every = Duration::from_millis(20);
        let dir = tempfile::tempdir().unwrap();
        let env = [("HOSTNAME", "pod-0")];
        let running = load(dir.path(), "repo = \"file:///var/backups\"\n", &env);
        let moved = load(dir.path(), "repo = \"file:///srv/backups\"\n", &env);
        let shared = Shared::new(
            crate::health::Policy {
                stale_after: Duration::from_secs(3),
                loop_dead_after: Duration::from_secs(10),
                readiness: crate::health::LagLimits::default(),
            },
            crate::engine::Engine::Postgres,
        );
        shared.job_update("backup", |j| j.running = true);
        let reload: Reload = Box::new(move || Ok(moved.clone()));
        let token = CancellationToken::new();
        let watching = tokio::spawn(watch_every(every, running, reload, shared.clone(), token));
        tokio::time::sleep(every * 10).await;
        assert!(!watching.is_finished(), "restarted under a running backup");
        shared.job_update("backup", |j| j.running = false);
        let ended = tokio::time::timeout(Duration::from_secs(5), watching)
            .await
            .expect("no restart once the job ended")
            .unwrap();
        let err = ended.unwrap_err();
        assert!(
            matches!(err.downcast_ref(), Some(Failure::Restart { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("/srv/backups"), "{err}");
    }
}
