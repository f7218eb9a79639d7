//! S3 specifics: no checksum headers (Backblaze B2 rejects them), and clear errors for a
//! missing bucket or wrong credentials.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use dbagent_testcontainers::S3Server;

use crate::support::*;

/// A loopback TCP proxy that records every byte clients send upstream.
struct RecordingProxy {
    port: u16,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl RecordingProxy {
    fn start(upstream: u16) -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let record = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let record = record.clone();
                std::thread::spawn(move || {
                    let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                    let (mut c_read, mut s_write) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let (mut s_read, mut c_write) = (server, client);
                    let up = std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match c_read.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            record.lock().unwrap().extend_from_slice(&buf[..n]);
                            if s_write.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = s_write.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                    let _ = up.join();
                });
            }
        });
        RecordingProxy { port, sent }
    }

    /// Every header line of every request (body bytes are skipped: only lines that look like
    /// `name: value` before a blank line count).
    fn header_lines(&self) -> Vec<String> {
        let bytes = self.sent.lock().unwrap().clone();
        let text = String::from_utf8_lossy(&bytes);
        let mut out = Vec::new();
        let mut in_headers = false;
        for line in text.split("\r\n") {
            if line.contains(" HTTP/1.1") && line.split(' ').count() == 3 {
                in_headers = true;
                out.push(line.to_string());
            } else if in_headers {
                if line.is_empty() {
                    in_headers = false;
                } else {
                    out.push(line.to_string());
                }
            }
        }
        out
    }
}

#[test]
fn s3_requests_carry_no_checksum_headers() {
    let server = S3Server::start("b2-like").unwrap();
    let proxy = RecordingProxy::start(server.port());
    let mut env = server.env("cluster");
    for (k, v) in env.iter_mut() {
        if k == "DBAGENT_S3_ENDPOINT" {
            *v = format!("http://127.0.0.1:{}", proxy.port);
        }
    }
    let data = tempfile::tempdir().unwrap();
    let wal = data.path().join("pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    // Incompressible, so the object needs a multipart upload (parts of 5 MiB).
    let segment = dbagent_testcontainers::wal_segment(
        "000000010000000000000001",
        42,
        dbagent_testcontainers::Fill::Random(0x2545F4914F6CDD1D),
    );
    std::fs::write(wal.join("000000010000000000000001"), &segment).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(args)
            .current_dir(data.path())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("DBAGENT_PG_SYSTEM_IDENTIFIER", "42")
            .env("DBAGENT_UPLOAD_PART_SIZE", "5MiB");
        cmd.output().unwrap()
    };
    ok(&run(&["wal-push", "pg_wal/000000010000000000000001"]));
    ok(&run(&["wal-push", "pg_wal/000000010000000000000001"]));
    ok(&run(&[
        "wal-fetch",
        "000000010000000000000001",
        "pg_wal/RECOVERYXLOG",
    ]));
    assert!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap() == segment);
    ok(&run(&["list"]));

    let lines = proxy.header_lines();
    let requests: Vec<&String> = lines.iter().filter(|l| l.contains(" HTTP/1.1")).collect();
    // The test is only meaningful if it saw the multipart upload, the range read and the listing.
    assert!(
        requests
            .iter()
            .any(|l| l.starts_with("POST") && l.contains("uploads")),
        "{requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|l| l.starts_with("PUT") && l.contains("partNumber=")),
        "{requests:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.to_ascii_lowercase().starts_with("range:")),
        "{requests:#?}"
    );
    assert!(
        requests
            .iter()
            .any(|l| l.starts_with("GET") && l.contains("list-type=2")),
        "{requests:#?}"
    );
    let offending: Vec<&String> = lines
        .iter()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("x-amz-checksum-") || l.starts_with("x-amz-sdk-checksum-")
        })
        .collect();
    assert!(offending.is_empty(), "checksum headers sent: {offending:?}");
}

#[test]
fn missing_bucket_is_one_line() {
    let server = S3Server::start("exists").unwrap();
    let run = |overrides: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(BIN);
        cmd.arg("list").envs(
            server
                .env("p")
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        for (k, v) in overrides {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    refused(
        &run(&[("DBAGENT_REPO", "s3://no-such-bucket/p")]),
        "does not exist",
    );
    // The same for an upload: a missing bucket also answers 404, never "object not found".
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data.path().join("pg_wal")).unwrap();
    std::fs::write(
        data.path().join("pg_wal/000000010000000000000001"),
        dbagent_testcontainers::wal_segment(
            "000000010000000000000001",
            1,
            dbagent_testcontainers::Fill::Pattern(7),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["wal-push", "pg_wal/000000010000000000000001"])
        .current_dir(data.path())
        .envs(
            server
                .env("p")
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .env("DBAGENT_REPO", "s3://no-such-bucket/p")
        .env("DBAGENT_PG_SYSTEM_IDENTIFIER", "1")
        .output()
        .unwrap();
    refused(&out, "bucket \"no-such-bucket\" does not exist");
    // moto accepts any key unless told otherwise; authentication is checked once a user exists.
    let repo = Repo::S3(server, "p".into());
    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    assert!(listing.contains("\"postgres\": []"), "{listing}");
}
