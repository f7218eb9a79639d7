//! PostgreSQL logical dumps: database settings, roles, exact row counts and CJK text survive
//! a dump and a restore into a new database.

use dbagent_testcontainers::{Postgres, PostgresBuilder};

use crate::support::*;

const CJK: &str = "中文全文檢索 日本語の全文検索 한국어 전문 검색 🐘🎉 𠀀";

fn target_url(pg: &Postgres, db: &str) -> String {
    format!("postgresql://postgres@{}:{}/{db}", pg.host(), pg.port())
}

fn manifest(repo: &Repo) -> serde_json::Value {
    let pg_dir = std::fs::read_dir(repo.root().unwrap().join("pg"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let id = std::fs::read_dir(pg_dir.join("dumps"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    serde_json::from_slice(&std::fs::read(id.join("dump.json")).unwrap()).unwrap()
}

fn source() -> Postgres {
    let pg = PostgresBuilder::new().start().unwrap();
    pg.psql(
        "postgres",
        "CREATE ROLE app LOGIN PASSWORD 'app-secret';
         CREATE ROLE reader NOLOGIN;
         GRANT reader TO app;",
    )
    .unwrap();
    pg.psql("postgres", "CREATE DATABASE discourse OWNER app")
        .unwrap();
    pg.psql("postgres", "CREATE DATABASE logto").unwrap();
    pg.psql(
        "discourse",
        &format!(
            "SET ROLE app;
             CREATE TEXT SEARCH CONFIGURATION public.cjk_test (COPY = pg_catalog.simple);
             CREATE TABLE posts (id int PRIMARY KEY, body text);
             INSERT INTO posts SELECT g, '{CJK} ' || g FROM generate_series(1, 3000) g;
             CREATE TABLE empty (i int);
             CREATE UNLOGGED TABLE scratch AS SELECT g FROM generate_series(1, 7) g;"
        ),
    )
    .unwrap();
    // What a plain `pg_dump -Fc` restored with `pg_restore -d newdb` loses.
    pg.psql(
        "postgres",
        "ALTER DATABASE discourse SET default_text_search_config = 'public.cjk_test';
         ALTER DATABASE discourse SET search_path = '$user', public;
         ALTER ROLE app IN DATABASE discourse SET work_mem = '8MB';",
    )
    .unwrap();
    pg.psql(
        "logto",
        "CREATE TABLE users (id int, name text); INSERT INTO users VALUES (1, 'ユーザー'), (2, '사용자');",
    )
    .unwrap();
    pg
}

#[test]
fn pg_dump_round_trip_keeps_settings_roles_and_cjk() {
    let repo = Repo::file();
    let pg = source();
    // `restore --dump <db> --latest --target-url <url>`.
    let restore_dump = |db: &str, url: &str| {
        dbagent_cmd(
            &repo,
            None,
            &["restore", "--dump", db, "--latest", "--target-url", url],
        )
    };
    let out = ok(&dbagent(
        &repo,
        Some(&pg),
        &["backup", "--kind", "dump", "--json"],
    ));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = report["databases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"discourse") && names.contains(&"logto"),
        "{out}"
    );
    // Writes after the dump are not in it.
    pg.psql("discourse", "INSERT INTO posts VALUES (999999, 'later')")
        .unwrap();

    let m = manifest(&repo);
    let discourse = m["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "discourse")
        .unwrap();
    let rows = |table: &str| {
        discourse["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == table)
            .unwrap_or_else(|| panic!("{table} not in {discourse}"))["rows"]
            .as_i64()
            .unwrap()
    };
    assert_eq!(rows("public.posts"), 3000);
    assert_eq!(rows("public.empty"), 0);
    assert_eq!(rows("public.scratch"), 7);
    let settings = discourse["settings"].to_string();
    assert!(settings.contains("public.cjk_test"), "{settings}");

    let listing = ok(&dbagent(&repo, None, &["list", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(
        json["postgres"][0]["dumps"].as_array().unwrap().len(),
        1,
        "{listing}"
    );

    // Into a new database on the same server.
    let out = ok(&restore_dump("discourse", &target_url(&pg, "restored"))
        .output()
        .unwrap());
    assert!(
        out.contains("default_text_search_config=public.cjk_test"),
        "{out}"
    );
    assert_eq!(
        pg.psql("restored", "SHOW default_text_search_config")
            .unwrap(),
        "public.cjk_test"
    );
    assert_eq!(
        pg.psql("restored", "SHOW search_path").unwrap(),
        "\"$user\", public"
    );
    assert_eq!(
        pg.psql(
            "restored",
            "SELECT setconfig::text FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
              WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = 'restored')"
        )
        .unwrap(),
        "{work_mem=8MB}"
    );
    let hex = |pg: &Postgres, db: &str| {
        pg.psql(
            db,
            "SELECT encode(convert_to(string_agg(body, '|' ORDER BY id), 'UTF8'), 'hex') FROM posts WHERE id <= 3000",
        )
        .unwrap()
    };
    assert_eq!(hex(&pg, "restored"), hex(&pg, "discourse"));
    assert_eq!(
        pg.psql("restored", "SELECT count(*) FROM posts").unwrap(),
        "3000"
    );
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'restored'"
        )
        .unwrap(),
        "app"
    );
    // Text search goes through the restored configuration by default.
    assert_eq!(
        pg.psql("restored", "SELECT get_current_ts_config()::text")
            .unwrap(),
        "cjk_test"
    );

    // A database of that name exists now: refused, nothing changed.
    let before = pg.psql("restored", "SELECT count(*) FROM posts").unwrap();
    refused(
        &restore_dump("discourse", &target_url(&pg, "restored"))
            .output()
            .unwrap(),
        "already exists",
    );
    assert_eq!(
        pg.psql("restored", "SELECT count(*) FROM posts").unwrap(),
        before
    );

    // Into another server that lacks the roles: they are created, then owned.
    let other = PostgresBuilder::new().start().unwrap();
    // ...but not before what the restore needs is known to be there: a user that may create
    // databases and pg_restore. Refused, no role created (before: the roles stayed behind).
    other
        .psql("postgres", "CREATE ROLE restorer LOGIN CREATEROLE")
        .unwrap();
    let roles = || {
        other
            .psql("postgres", "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname !~ '^pg_'")
            .unwrap()
    };
    let roles_before = roles();
    let restorer_url = format!(
        "postgresql://restorer@{}:{}/discourse",
        other.host(),
        other.port()
    );
    refused(
        &restore_dump("discourse", &restorer_url).output().unwrap(),
        "may not create databases",
    );
    let no_bins = tempfile::tempdir().unwrap();
    let out = restore_dump("discourse", &target_url(&other, "discourse"))
        .env("DBAGENT_PG_BIN_DIR", no_bins.path())
        .output()
        .unwrap();
    refused(&out, "pg_restore not found");
    assert_eq!(roles(), roles_before);
    let out = ok(&restore_dump("discourse", &target_url(&other, "discourse"))
        .output()
        .unwrap());
    assert!(out.contains("created missing roles"), "{out}");
    assert_eq!(
        other
            .psql(
                "postgres",
                "SELECT string_agg(rolname, ',' ORDER BY rolname) FROM pg_roles WHERE rolname IN ('app', 'reader')"
            )
            .unwrap(),
        "app,reader"
    );
    assert_eq!(
        other
            .psql("postgres", "SELECT pg_has_role('app', 'reader', 'member')")
            .unwrap(),
        "t"
    );
    assert_eq!(
        other
            .psql("discourse", "SHOW default_text_search_config")
            .unwrap(),
        "public.cjk_test"
    );
    assert_eq!(hex(&other, "discourse"), hex(&pg, "discourse"));
    let names = |p: &Postgres| {
        p.psql(
            "logto",
            "SELECT encode(convert_to(string_agg(name, '|' ORDER BY id), 'UTF8'), 'hex') FROM users",
        )
        .unwrap()
    };
    ok(&restore_dump("logto", &target_url(&other, "logto"))
        .output()
        .unwrap());
    assert_eq!(names(&other), names(&pg));
}

#[test]
fn pg_dump_refusals_change_nothing() {
    let repo = Repo::file();
    let pg = PostgresBuilder::new().start().unwrap();
    pg.psql("postgres", "CREATE DATABASE app").unwrap();
    let url = target_url(&pg, "fresh");
    let restore = |args: &[&str]| {
        let mut all = vec!["restore", "--dump"];
        all.extend_from_slice(args);
        dbagent(&repo, None, &all)
    };
    refused(
        &restore(&["app", "--latest", "--target-url", &url]),
        "holds no PostgreSQL",
    );
    let mut cmd_env = pg.env();
    cmd_env.retain(|(k, _)| k != "PGDATABASE");
    let out = {
        let mut cmd = dbagent_testcontainers::command_as_pg_user(BIN);
        cmd.args(["backup", "--kind", "dump"])
            .env("DBAGENT_LOG_FORMAT", "text")
            .env("DBAGENT_PG_DUMP_DATABASES", "app,nosuchdb")
            .env(
                "DBAGENT_PG_BIN_DIR",
                dbagent_testcontainers::pg_bin("pg_ctl")
                    .unwrap()
                    .parent()
                    .unwrap(),
            )
            .current_dir("/tmp");
        for (k, v) in repo.env().into_iter().chain(cmd_env) {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    refused(&out, "nosuchdb");
    // Nobody listens on this port.
    let mut cmd = dbagent_testcontainers::command_as_pg_user(BIN);
    cmd.args(["backup", "--kind", "dump"])
        .env("DBAGENT_LOG_FORMAT", "text")
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", dbagent_testcontainers::free_port().to_string())
        .env("PGUSER", "postgres")
        .current_dir("/tmp");
    for (k, v) in repo.env() {
        cmd.env(k, v);
    }
    refused(&cmd.output().unwrap(), "cannot connect to PostgreSQL");
    assert!(repo.snapshot().is_empty());
    ok(&dbagent(&repo, Some(&pg), &["backup", "--kind", "dump"]));
    let before = repo.snapshot();
    refused(
        &restore(&["app", "--at", "2001-01-01 00:00:00", "--target-url", &url]),
        "before the first dump",
    );
    refused(
        &restore(&["nosuchdb", "--latest", "--target-url", &url]),
        "no dump of database",
    );
    refused(
        &restore(&["app", "--latest", "--target-url", &target_url(&pg, "app")]),
        "already exists",
    );
    refused(
        &restore(&[
            "app",
            "--latest",
            "--target-url",
            "postgresql://postgres:pw@127.0.0.1/x",
        ]),
        "must not carry a password",
    );
    let plan = ok(&restore(&[
        "app",
        "--latest",
        "--dry-run",
        "--target-url",
        &url,
    ]));
    assert!(plan.contains("restore plan: dump"), "{plan}");
    let plan: serde_json::Value = serde_json::from_str(&ok(&restore(&[
        "app",
        "--latest",
        "--dry-run",
        "--json",
        "--target-url",
        &url,
    ])))
    .unwrap();
    assert_eq!(
        (&plan["dry_run"], &plan["new_database"]),
        (&true.into(), &"fresh".into()),
        "{plan}"
    );
    assert!(plan["seconds"].is_null(), "{plan}");
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname = 'fresh'"
        )
        .unwrap(),
        "0"
    );
    assert_eq!(repo.snapshot(), before);
}

/// `verify` checks every object of the PostgreSQL dumps (`--full`: every byte) and names a
/// damaged one; `prune` applies the base-backup rules to dump sets.
#[test]
fn verify_checks_pg_dumps_and_prune_keeps_the_newest() {
    let repo = Repo::file();
    let pg = PostgresBuilder::new().start().unwrap();
    pg.psql("postgres", "CREATE DATABASE shop").unwrap();
    pg.psql(
        "shop",
        "CREATE TABLE t AS SELECT g, md5(g::text) AS v FROM generate_series(1, 20000) g",
    )
    .unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup", "--kind", "dump"]));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    ok(&dbagent(&repo, Some(&pg), &["backup", "--kind", "dump"]));
    let report: serde_json::Value =
        serde_json::from_str(&ok(&dbagent(&repo, None, &["verify", "--json"]))).unwrap();
    // Two sets of three objects (globals, postgres, shop) besides any WAL.
    assert!(
        report["clusters"][0]["objects"].as_u64().unwrap() >= 6,
        "{report:#}"
    );

    let pg_dir = std::fs::read_dir(repo.root().unwrap().join("pg"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut ids: Vec<String> = std::fs::read_dir(pg_dir.join("dumps"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 2);
    // Damage the middle of the older set's shop dump, keeping its size and trailer.
    let victim = pg_dir.join("dumps").join(&ids[0]).join("shop.pgdump.zst");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&victim, &bytes).unwrap();
    ok(&dbagent(&repo, None, &["verify"]));
    let out = dbagent(&repo, None, &["verify", "--full"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("dump {} database shop", ids[0])),
        "{text}"
    );

    let policy = [
        ("DBAGENT_RETENTION_KEEP_DAYS", "0"),
        ("DBAGENT_RETENTION_KEEP_BACKUPS", "1"),
    ];
    let mut prune = dbagent_cmd(&repo, None, &["prune"]);
    prune.envs(policy);
    let text = ok(&prune.output().unwrap());
    assert!(text.contains(&format!("delete dump {}", ids[0])), "{text}");
    let left: Vec<_> = repo
        .snapshot()
        .into_keys()
        .filter(|p| p.to_string_lossy().contains(&ids[0]))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        pg_dir
            .join("dumps")
            .join(&ids[1])
            .join("dump.json")
            .exists()
    );
    ok(&dbagent(&repo, None, &["verify", "--full"]));

    // What a dump killed before its manifest leaves (SIGKILL, OOM): kept while it may still
    // be running, removed after `retention.incomplete_after` (before: never, billed forever).
    let killed = pg_dir.join("dumps").join("20990101T000000Z-dead");
    std::fs::create_dir(&killed).unwrap();
    std::fs::copy(
        pg_dir.join("dumps").join(&ids[1]).join("globals.sql.zst"),
        killed.join("globals.sql.zst"),
    )
    .unwrap();
    // Owned as the dump's writer (the repository's owner) would own them.
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(&pg_dir).unwrap();
    for path in [killed.clone(), killed.join("globals.sql.zst")] {
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
    }
    ok(&prune.output().unwrap());
    assert!(killed.join("globals.sql.zst").exists());
    let mut prune = dbagent_cmd(&repo, None, &["prune"]);
    prune
        .envs(policy)
        .env("DBAGENT_RETENTION_INCOMPLETE_AFTER", "0s");
    let out = prune.output().unwrap();
    let text = ok(&out);
    assert!(!killed.join("globals.sql.zst").exists(), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("1 object(s) of incomplete backups and dumps"),
        "the plan goes to stderr before anything is deleted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        pg_dir
            .join("dumps")
            .join(&ids[1])
            .join("dump.json")
            .exists()
    );
    ok(&dbagent(&repo, None, &["verify", "--full"]));
}

/// A database named like an option is dumped and restored as a database: its name reaches
/// pg_dump through PGDATABASE and pg_restore as a quoted conninfo value, never as an argument.
#[test]
fn a_database_named_like_an_option_stays_a_name() {
    let repo = Repo::file();
    let pg = PostgresBuilder::new().start().unwrap();
    pg.psql("postgres", "CREATE DATABASE \"--no-data\"")
        .unwrap();
    pg.psql(
        "--no-data",
        "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 42);",
    )
    .unwrap();
    ok(&dbagent(&repo, Some(&pg), &["backup", "--kind", "dump"]));
    let json = manifest(&repo);
    let db = json["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "--no-data")
        .unwrap_or_else(|| panic!("{json:#}"));
    assert_eq!(db["tables"][0]["rows"], 42, "{json:#}");
    ok(&dbagent(
        &repo,
        None,
        &[
            "restore",
            "--dump=--no-data",
            "--latest",
            "--target-url",
            &target_url(&pg, "restored"),
        ],
    ));
    assert_eq!(pg.psql("restored", "SELECT count(*) FROM t").unwrap(), "42");
}
