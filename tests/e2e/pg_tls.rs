//! A TLS-only PostgreSQL (`hostssl` + `scram-sha-256`, no plain `host` line, certificates
//! made by the test): backup, dumps, serve and drill work with `verify-full` and each way of
//! giving the password; a certificate from another CA, plain TCP and a wrong password are
//! refused with one clear line; `/status` and `/metrics` show no secret.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use dbagent_testcontainers::{Postgres, PostgresBuilder, TestCa, pg_owned_tempdir};

use crate::serve::Serve;
use crate::support::*;

const PASSWORD: &str = "Sup3r-s3cret pässword";
const AWS_SECRET: &str = "AWSSECRETbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const SLACK_TOKEN: &str = "T000/B000/slacktokenxyz";

fn tls_primary(repo: &Repo) -> Postgres {
    let mut b = PostgresBuilder::new()
        .tls_only(PASSWORD)
        .archive_command(&format!("{BIN} wal-push %p"))
        .setting("archive_timeout", "0");
    for (k, v) in repo.env() {
        b = b.env(&k, &v);
    }
    b.start().expect("start a TLS-only PostgreSQL")
}

/// A file only the postgres OS user reads (dbagent runs as that user in these tests).
fn private_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if dbagent_testcontainers::is_root() {
        let status = std::process::Command::new("chown")
            .arg("postgres")
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
    }
    path.display().to_string()
}

#[test]
fn tls_only_server_with_verify_full_and_every_password_source() {
    let repo = Repo::file();
    let pg = tls_primary(&repo);
    pg.psql("postgres", "CREATE DATABASE discourse").unwrap();
    pg.psql(
        "discourse",
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2);",
    )
    .unwrap();
    let secrets = pg_owned_tempdir().unwrap();
    let pw_file = private_file(secrets.path(), "pw", &format!("{PASSWORD}\n"));
    let passfile = private_file(
        secrets.path(),
        "pgpass",
        &format!("127.0.0.1:{}:*:postgres:{PASSWORD}\n", pg.port()),
    );

    // A base backup over TLS, the password from PGPASSWORD_FILE.
    let out = dbagent_cmd(&repo, Some(&pg), &["backup"])
        .env("PGPASSWORD_FILE", &pw_file)
        .output()
        .unwrap();
    let summary = ok(&out);
    assert!(summary.contains("backup "), "{summary}");
    // One over the network (dbagent's own replication connection), the password from a
    // libpq password file, its SCRAM bound to the TLS channel (SCRAM-SHA-256-PLUS: with
    // `require` nothing else is accepted): the drill below restores it. Backup ids are per
    // second.
    std::thread::sleep(Duration::from_millis(1100));
    let out = dbagent_cmd(&repo, Some(&pg), &["backup"])
        .env("DBAGENT_BACKUP_METHOD", "stream")
        .env("PGPASSFILE", &passfile)
        .env("PGCHANNELBINDING", "require")
        .output()
        .unwrap();
    ok(&out);

    // Logical dumps, the password from a libpq password file, channel binding required of
    // dbagent's connections and of pg_dump's.
    let out = dbagent_cmd(&repo, Some(&pg), &["backup", "--kind", "dump"])
        .env("PGPASSFILE", &passfile)
        .env("PGCHANNELBINDING", "require")
        .output()
        .unwrap();
    ok(&out);

    // The restore drill: its scratch server is reached over a socket, where libpq and
    // dbagent use no TLS, whatever PGSSLMODE says.
    switch_and_wait_archived(&pg);
    let scratch = pg_owned_tempdir().unwrap();
    let out = dbagent_cmd(&repo, Some(&pg), &["drill"])
        .env("PGPASSWORD", PASSWORD)
        .env("PGCHANNELBINDING", "require")
        .env("DBAGENT_DRILL_SCRATCH_DIR", scratch.path())
        .output()
        .unwrap();
    ok(&out);

    // serve, the password in PGPASSWORD, with an S3 key and a webhook token configured:
    // it reaches the database over TLS, and no endpoint shows a secret.
    let mut env = pg.env();
    env.retain(|(k, _)| k != "PGDATA");
    env.extend(repo.env());
    env.extend([
        ("PGPASSWORD".to_string(), PASSWORD.to_string()),
        ("AWS_ACCESS_KEY_ID".to_string(), "AKIAEXAMPLE".to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), AWS_SECRET.to_string()),
        (
            "DBAGENT_NOTIFY_SLACK_URL".to_string(),
            format!("https://hooks.slack.com/services/{SLACK_TOKEN}"),
        ),
    ]);
    let serve = Serve::start(&env);
    serve.wait_for(
        "a writable primary over TLS",
        Duration::from_secs(20),
        |s| s.code("/primary") == 200,
    );
    for path in ["/status", "/patroni", "/metrics", "/primary", "/health"] {
        let body = serve.get(path).1;
        for secret in [PASSWORD, AWS_SECRET, SLACK_TOKEN, "AKIAEXAMPLE"] {
            assert!(!body.contains(secret), "{path} shows a secret: {body}");
        }
    }
}

#[test]
fn tls_refusals_are_one_clear_line() {
    let repo = Repo::file();
    let pg = tls_primary(&repo);
    let other = pg_owned_tempdir().unwrap();
    let other_ca = other.path().join("other-ca.crt");
    TestCa::generate().unwrap().write_pem(&other_ca).unwrap();
    if dbagent_testcontainers::is_root() {
        std::process::Command::new("chown")
            .arg("postgres")
            .arg(&other_ca)
            .status()
            .unwrap();
    }

    // A server certificate from another CA.
    let out = dbagent_cmd(&repo, Some(&pg), &["backup"])
        .env("PGPASSWORD", PASSWORD)
        .env("PGSSLROOTCERT", &other_ca)
        .output()
        .unwrap();
    refused(
        &out,
        "the server's certificate is not signed by a CA in PGSSLROOTCERT",
    );

    // verify-full without a CA certificate.
    let out = dbagent_cmd(&repo, Some(&pg), &["backup"])
        .env("PGPASSWORD", PASSWORD)
        .env("PGSSLROOTCERT", "/nonexistent/ca.crt")
        .output()
        .unwrap();
    refused(&out, "PGSSLROOTCERT");

    // Plain TCP: the server has no line for it.
    let out = dbagent_cmd(&repo, Some(&pg), &["backup"])
        .env("PGPASSWORD", PASSWORD)
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap();
    refused(&out, "PGSSLMODE");

    // Channel binding required where no TLS can carry it: over the server's unix socket
    // (trust there), for dbagent's connections and for its replication connection.
    for method in ["auto", "stream"] {
        let out = dbagent_cmd(&repo, Some(&pg), &["backup"])
            .env("PGPASSWORD", PASSWORD)
            .env("PGHOST", pg.socket_dir())
            .env("PGCHANNELBINDING", "require")
            .env("DBAGENT_BACKUP_METHOD", method)
            .output()
            .unwrap();
        refused(&out, "PGCHANNELBINDING (pg.channel_binding) is require");
    }

    // A wrong password, over a verified connection.
    let out = dbagent_cmd(&repo, Some(&pg), &["backup"])
        .env("PGPASSWORD", "not the password")
        .output()
        .unwrap();
    refused(&out, "password authentication failed");

    // verify-ca trusts the CA without checking the name; require encrypts without checking.
    for mode in ["verify-ca", "require", "prefer"] {
        let out = dbagent_cmd(&repo, Some(&pg), &["backup", "--kind", "dump"])
            .env("PGPASSWORD", PASSWORD)
            .env("PGSSLMODE", mode)
            .output()
            .unwrap();
        ok(&out);
    }
    // Nothing the refused runs started became a backup.
    let list = ok(&dbagent(&repo, None, &["list", "--json"]));
    let listing: serde_json::Value = serde_json::from_str(&list).unwrap();
    let backups = listing
        .pointer("/postgres/0/backups")
        .and_then(|b| b.as_array())
        .map(|b| b.len())
        .unwrap_or(0);
    assert_eq!(backups, 0, "{list}");
}
