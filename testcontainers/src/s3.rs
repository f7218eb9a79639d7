//! An S3 API server (moto) started as a local process.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::util::{finish_tempdir, free_port, http_request, log_tail, tempdir_for, workspace_root};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the moto_server executable: `$DBAGENT_MOTO_SERVER` or `<workspace>/.venv/bin/moto_server`.
pub fn moto_server_path() -> PathBuf {
    std::env::var_os("DBAGENT_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/moto_server"))
}

/// A moto S3 server on 127.0.0.1:<free port>, killed on drop.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    port: u16,
    bucket: String,
    dir: Option<TempDir>,
    log: PathBuf,
}

impl S3Server {
    /// Starts moto_server, waits until it answers HTTP (up to 30 s) and creates `bucket`.
    pub fn start(bucket: &str) -> Result<S3Server> {
        let exe = moto_server_path();
        if !exe.exists() {
            bail!(
                "moto_server not found at {}: run ./scripts/setup",
                exe.display()
            );
        }
        let dir = tempdir_for("dbagent-s3-", None)?;
        let log = dir.path().join("moto.log");
        let port = free_port();
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("spawning {}", exe.display()))?;
        let mut server = S3Server {
            child,
            port,
            bucket: bucket.to_string(),
            dir: Some(dir),
            log,
        };
        server.wait_ready()?;
        server.create_bucket(bucket)?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "moto_server exited ({status}) before answering on port {}; log:\n{}",
                    self.port,
                    log_tail(&self.log, 30)
                );
            }
            if http_request(self.port, "GET", "/moto-api/").is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "moto_server did not answer HTTP on port {} within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    log_tail(&self.log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// "http://127.0.0.1:PORT"
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    /// Creates a bucket with an unsigned `PUT /<name>` (moto accepts it).
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        let (status, body) = http_request(self.port, "PUT", &format!("/{name}"))
            .with_context(|| format!("creating bucket {name}"))?;
        if !(200..300).contains(&status) {
            bail!("creating bucket {name}: HTTP {status}: {body}");
        }
        Ok(())
    }

    /// Environment for dbagent: DBAGENT_S3_ENDPOINT, DBAGENT_S3_REGION=us-east-1,
    /// AWS_ACCESS_KEY_ID=testing, AWS_SECRET_ACCESS_KEY=testing, DBAGENT_S3_ALLOW_HTTP=true,
    /// DBAGENT_REPO=s3://<bucket>/<prefix>.
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        let prefix = prefix.trim_matches('/');
        let repo = if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{prefix}", self.bucket)
        };
        vec![
            ("DBAGENT_S3_ENDPOINT".into(), self.endpoint()),
            ("DBAGENT_S3_REGION".into(), "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("DBAGENT_S3_ALLOW_HTTP".into(), "true".into()),
            ("DBAGENT_REPO".into(), repo),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        finish_tempdir(
            &format!("moto_server on port {}", self.port),
            self.dir.take(),
            std::slice::from_ref(&self.log),
        );
    }
}
