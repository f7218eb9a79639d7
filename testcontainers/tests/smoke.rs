//! Starts every kind of server for real and checks the basics.

use std::time::{Duration, Instant};

use dbagent_testcontainers::{
    MariaDbBuilder, Postgres, PostgresBuilder, S3Server, command_as_pg_user, http_request,
    mariadb_replica_pair, pg_owned_tempdir,
};

#[test]
fn postgres_starts_and_answers() {
    let pg = PostgresBuilder::new()
        .setting("application_name", "it's quoted")
        .start()
        .unwrap();
    assert_eq!(pg.psql("postgres", "select 1").unwrap(), "1");
    assert_eq!(pg.psql("postgres", "show wal_level").unwrap(), "replica");
    assert_eq!(pg.psql("postgres", "show fsync").unwrap(), "on");
    assert_eq!(
        pg.psql("postgres", "show application_name").unwrap(),
        "psql",
        "psql sets its own application_name"
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "select current_setting('application_name', true) is not null"
        )
        .unwrap(),
        "t"
    );
    assert!(pg.log_path().exists());
    let env = pg.env();
    assert!(env.contains(&("PGPORT".to_string(), pg.port().to_string())));
    let err = pg
        .psql("postgres", "select * from no_such_table")
        .unwrap_err();
    assert!(format!("{err:#}").contains("no_such_table"), "{err:#}");
}

#[test]
fn two_postgres_in_parallel_get_different_ports() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| PostgresBuilder::new().start().unwrap());
        let b = s.spawn(|| PostgresBuilder::new().start().unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    assert_eq!(a.psql("postgres", "select 1").unwrap(), "1");
    assert_eq!(b.psql("postgres", "select 2").unwrap(), "2");
}

#[test]
fn postgres_archive_command_gets_env() {
    let out_dir = pg_owned_tempdir().unwrap();
    let marker = out_dir.path().join("archived");
    let pg = PostgresBuilder::new()
        .env("DBAGENT_TEST_MARKER", marker.to_str().unwrap())
        .archive_command("echo %f >> \"$DBAGENT_TEST_MARKER\"")
        .start()
        .unwrap();
    pg.psql("postgres", "select pg_switch_wal()").unwrap();
    // The shell creates the file before it writes the line: wait for the line.
    let deadline = Instant::now() + Duration::from_secs(30);
    let archived = loop {
        let text = std::fs::read_to_string(&marker).unwrap_or_default();
        if text.ends_with('\n') {
            break text;
        }
        assert!(Instant::now() < deadline, "archive_command never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(archived.starts_with("0000000100000000000000"), "{archived}");
}

#[test]
fn postgres_stop_kill_restart_destroy_and_adopt() {
    let mut pg = PostgresBuilder::new().start().unwrap();
    pg.psql(
        "postgres",
        "create table t(x int); insert into t values (42)",
    )
    .unwrap();
    pg.stop().unwrap();
    pg.stop().unwrap(); // idempotent
    assert!(pg.psql("postgres", "select 1").is_err());
    pg.restart().unwrap();
    assert_eq!(pg.psql("postgres", "select x from t").unwrap(), "42");
    pg.kill();
    assert!(!pg.is_running());
    pg.restart().unwrap();
    assert_eq!(pg.psql("postgres", "select x from t").unwrap(), "42");

    // Copy the data dir (as a restore would, owned by whoever runs the test) and adopt it.
    let copy_parent = tempfile::tempdir().unwrap();
    let copy = copy_parent.path().join("pgdata");
    pg.stop().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(pg.data_dir())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    pg.restart().unwrap();
    {
        let adopted = Postgres::start_existing(&copy, &[("FOO", "bar")]).unwrap();
        assert_ne!(adopted.port(), pg.port());
        assert_eq!(adopted.psql("postgres", "select x from t").unwrap(), "42");
    }
    assert!(
        copy.join("PG_VERSION").exists(),
        "adopted dir must survive drop"
    );

    let emptied = pg.destroy_data().unwrap();
    assert_eq!(std::fs::read_dir(&emptied).unwrap().count(), 0);
    assert!(pg.psql("postgres", "select 1").is_err());
}

#[test]
fn command_as_pg_user_passes_env() {
    let out = command_as_pg_user("sh")
        .args(["-c", "echo $DBAGENT_X; id -un"])
        .env("DBAGENT_X", "hello")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("hello"));
    if dbagent_testcontainers::is_root() {
        assert_eq!(lines.next(), Some("postgres"));
    }
}

#[test]
fn s3_server_starts_with_bucket() {
    let s3 = S3Server::start("test-bucket").unwrap();
    assert_eq!(s3.endpoint(), format!("http://127.0.0.1:{}", s3.port()));
    let (status, body) = http_request(s3.port(), "GET", "/test-bucket").unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_request(s3.port(), "GET", "/no-such-bucket").unwrap();
    assert_eq!(status, 404);
    s3.create_bucket("second").unwrap();
    let (status, _) = http_request(s3.port(), "GET", "/second").unwrap();
    assert_eq!(status, 200);
    let env = s3.env("prefix/a");
    assert!(env.contains(&(
        "DBAGENT_REPO".to_string(),
        "s3://test-bucket/prefix/a".to_string()
    )));
}

#[test]
fn mariadb_starts_and_answers() {
    let mut db = MariaDbBuilder::new()
        .setting("max_connections", "50")
        .start()
        .unwrap();
    assert_eq!(db.sql(None, "select 1").unwrap(), "1");
    assert_eq!(db.sql(None, "select @@max_connections").unwrap(), "50");
    assert_eq!(db.sql(None, "select @@log_bin").unwrap(), "1");
    assert_eq!(db.url(), format!("mysql://root@127.0.0.1:{}", db.port()));
    db.sql(
        None,
        "create database d; create table d.t(x int primary key); insert into d.t values (7)",
    )
    .unwrap();
    db.stop().unwrap();
    db.stop().unwrap();
    db.restart().unwrap();
    assert_eq!(db.sql(Some("d"), "select x from t").unwrap(), "7");
    db.kill();
    assert!(db.sql(None, "select 1").is_err());
}

#[test]
fn mariadb_replica_pair_replicates() {
    let (primary, replica) = mariadb_replica_pair().unwrap();
    primary
        .sql(
            None,
            "create database app; create table app.t(id int primary key, v text); \
             insert into app.t values (1, 'replicated')",
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(v) = replica.sql(Some("app"), "select v from t where id = 1") {
            if v == "replicated" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "row never reached the replica");
        std::thread::sleep(Duration::from_millis(100));
    }
}
