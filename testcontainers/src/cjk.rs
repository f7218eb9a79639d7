//! `pg_cjk_parser` for the tests. Where the local PostgreSQL 15 already has a `pg_cjk_parser`
//! that this crate did not install (the site's own), the tests use it as it is and never
//! replace it. Otherwise the stand-in in `ext/pg_cjk_parser` (see its README) is built with
//! PGXS and installed, once per process and under a file lock, so test processes running side
//! by side never replace the library under a running server. The installed stand-in's control
//! file starts with a mark line carrying a digest of its sources: a stand-in built from the
//! same sources is left alone, an older one is rebuilt.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use crate::postgres::pg_bin;
use crate::util::{require_file, run, workspace_root};

const FILES: [&str; 4] = [
    "Makefile",
    "pg_cjk_parser.c",
    "pg_cjk_parser.control",
    "pg_cjk_parser--1.0.sql",
];

/// The first line of the stand-in's installed control file, before the sources' digest.
const MARK: &str = "# dbagent test stand-in for pg_cjk_parser; sources ";

/// Which `pg_cjk_parser` the local PostgreSQL has for the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CjkParser {
    /// One this crate did not install (the site's own extension): used as it is.
    Installed,
    /// The stand-in from `testcontainers/ext/pg_cjk_parser`.
    StandIn,
}

static RESULT: OnceLock<Result<CjkParser, String>> = OnceLock::new();

/// Makes `CREATE EXTENSION pg_cjk_parser` work on the local PostgreSQL 15 and says with which
/// extension. Installing the stand-in needs `postgresql-server-dev-15` and write access to
/// PostgreSQL's library and extension directories (the tests run as root).
pub fn install_cjk_parser() -> Result<CjkParser> {
    RESULT
        .get_or_init(|| {
            pg_bin("pg_config")
                .and_then(|pg_config| ensure(&pg_config))
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Who installed the `pg_cjk_parser.control` found (if any).
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Nothing,
    /// The stand-in, built from sources with this digest (`None`: installed before the mark
    /// existed, when only its comment named it).
    StandIn(Option<String>),
    Other,
}

fn found(control: Option<&str>) -> Found {
    let Some(text) = control else {
        return Found::Nothing;
    };
    let first = text.lines().next().unwrap_or("");
    if let Some(digest) = first.strip_prefix(MARK) {
        return Found::StandIn(Some(digest.trim().to_string()));
    }
    if text
        .lines()
        .any(|l| l.starts_with("comment = 'dbagent test stand-in for pg_cjk_parser"))
    {
        return Found::StandIn(None);
    }
    Found::Other
}

/// FNV-1a over the sources' names and bytes: stable across builds and toolchains.
fn digest(sources: &[(&str, Vec<u8>)]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in sources {
        for b in name
            .bytes()
            .chain([0])
            .chain(bytes.iter().copied())
            .chain([0])
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn pg_config_dir(pg_config: &Path, flag: &str) -> Result<PathBuf> {
    let out = run(
        Command::new(pg_config).arg(flag),
        &format!("pg_config {flag}"),
    )?;
    Ok(PathBuf::from(out.trim()))
}

fn ensure(pg_config: &Path) -> Result<CjkParser> {
    let control = pg_config_dir(pg_config, "--sharedir")?.join("extension/pg_cjk_parser.control");
    let library = pg_config_dir(pg_config, "--pkglibdir")?.join("pg_cjk_parser.so");
    let src = workspace_root().join("testcontainers/ext/pg_cjk_parser");
    let mut sources = Vec::new();
    for f in FILES {
        sources.push((
            f,
            fs::read(src.join(f)).with_context(|| format!("reading {f}"))?,
        ));
    }
    let digest = digest(&sources);

    let lock = fs::File::create(std::env::temp_dir().join("dbagent-pg_cjk_parser.lock"))
        .context("creating the install lock")?;
    // SAFETY: flock on a file descriptor this function owns; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!(
            "locking the pg_cjk_parser install: {}",
            std::io::Error::last_os_error()
        );
    }
    let text = match fs::read_to_string(&control) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", control.display())),
    };
    match found(text.as_deref()) {
        Found::Other => return Ok(CjkParser::Installed),
        Found::StandIn(Some(d)) if d == digest && library.exists() => {
            return Ok(CjkParser::StandIn);
        }
        Found::Nothing if library.exists() => bail!(
            "{} exists without {}: a pg_cjk_parser the tests did not install, or half of one; \
             the tests will not replace it (install it completely, or remove the library)",
            library.display(),
            control.display()
        ),
        Found::Nothing | Found::StandIn(_) => {}
    }
    build_and_install(pg_config, &sources, &digest)?;
    Ok(CjkParser::StandIn)
}

fn build_and_install(pg_config: &Path, sources: &[(&str, Vec<u8>)], digest: &str) -> Result<()> {
    let include = run(
        Command::new(pg_config).arg("--includedir-server"),
        "pg_config --includedir-server",
    )?;
    require_file(
        &PathBuf::from(include.trim()).join("postgres.h"),
        "PostgreSQL server headers",
        "install postgresql-server-dev-15 (./scripts/setup)",
    )?;
    let build = tempfile::tempdir().context("creating a build directory")?;
    for (name, bytes) in sources {
        let mut bytes = bytes.clone();
        if *name == "pg_cjk_parser.control" {
            bytes.splice(0..0, format!("{MARK}{digest}\n").into_bytes());
        }
        fs::write(build.path().join(name), bytes).with_context(|| format!("writing {name}"))?;
    }
    run(
        Command::new("make")
            .current_dir(build.path())
            .arg("with_llvm=no")
            .arg(format!("PG_CONFIG={}", pg_config.display()))
            .arg("install"),
        "building the pg_cjk_parser stand-in",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_its_own_stand_in() {
        assert_eq!(found(None), Found::Nothing);
        assert_eq!(
            found(Some(&format!("{MARK}00ff\ncomment = 'x'\n"))),
            Found::StandIn(Some("00ff".into()))
        );
        // Installed before the mark line existed.
        assert_eq!(
            found(Some(
                "comment = 'dbagent test stand-in for pg_cjk_parser: CJK 2-gram text search parser'\n\
                 default_version = '1.0'\n"
            )),
            Found::StandIn(None)
        );
        // The site's extension: anything else, even one that mentions dbagent.
        assert_eq!(
            found(Some(
                "# pg_cjk_parser\ncomment = 'Parser for CJK, used by dbagent test stand-in users'\n\
                 default_version = '1.0'\nmodule_pathname = '$libdir/pg_cjk_parser'\n"
            )),
            Found::Other
        );
    }

    /// A PostgreSQL installation in a temporary directory, as far as `ensure` sees it: a
    /// `pg_config` that knows only the extension and library directories, so any attempt
    /// to build or install fails.
    struct FakeInstall {
        dir: tempfile::TempDir,
    }

    /// Writing a fake `pg_config` while another test forks to run its own would leave the
    /// new script open for writing in that child until it execs, and running the script then
    /// fails with "Text file busy": scripts are written under the write lock, run under a
    /// read lock.
    static FORKS: std::sync::RwLock<()> = std::sync::RwLock::new(());

    /// `ensure` with this fake installation's `pg_config`.
    fn ensure_fake(fake: &FakeInstall) -> anyhow::Result<CjkParser> {
        let _running = FORKS.read().unwrap_or_else(|e| e.into_inner());
        ensure(&fake.pg_config())
    }

    impl FakeInstall {
        fn new() -> FakeInstall {
            use std::os::unix::fs::PermissionsExt;
            let _writing = FORKS.write().unwrap_or_else(|e| e.into_inner());
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            fs::create_dir_all(root.join("share/extension")).unwrap();
            fs::create_dir_all(root.join("lib")).unwrap();
            let script = root.join("pg_config");
            fs::write(
                &script,
                format!(
                    "#!/bin/sh\ncase \"$1\" in\n--sharedir) echo {0}/share ;;\n\
                     --pkglibdir) echo {0}/lib ;;\n*) exit 1 ;;\nesac\n",
                    root.display()
                ),
            )
            .unwrap();
            fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
            FakeInstall { dir }
        }
        fn pg_config(&self) -> PathBuf {
            self.dir.path().join("pg_config")
        }
        fn control(&self) -> PathBuf {
            self.dir
                .path()
                .join("share/extension/pg_cjk_parser.control")
        }
        fn library(&self) -> PathBuf {
            self.dir.path().join("lib/pg_cjk_parser.so")
        }
        fn files(&self) -> Vec<(PathBuf, Vec<u8>)> {
            let mut out = Vec::new();
            for sub in ["share/extension", "lib"] {
                for e in fs::read_dir(self.dir.path().join(sub)).unwrap() {
                    let p = e.unwrap().path();
                    out.push((p.clone(), fs::read(&p).unwrap()));
                }
            }
            out.sort();
            out
        }
    }

    #[test]
    fn a_parser_the_tests_did_not_install_is_used_as_it_is() {
        let fake = FakeInstall::new();
        fs::write(
            fake.control(),
            "comment = 'CJK parser'\ndefault_version = '1.0'\nmodule_pathname = '$libdir/pg_cjk_parser'\n",
        )
        .unwrap();
        fs::write(fake.library(), b"the site's library").unwrap();
        let before = fake.files();
        assert_eq!(ensure_fake(&fake).unwrap(), CjkParser::Installed);
        assert_eq!(fake.files(), before);
    }

    #[test]
    fn a_library_without_its_control_file_is_refused_not_replaced() {
        let fake = FakeInstall::new();
        fs::write(fake.library(), b"someone's library").unwrap();
        let err = format!("{:#}", ensure_fake(&fake).unwrap_err());
        assert!(err.contains("will not replace"), "{err}");
        assert_eq!(fs::read(fake.library()).unwrap(), b"someone's library");
    }

    #[test]
    fn a_stand_in_from_the_same_sources_is_left_alone() {
        let fake = FakeInstall::new();
        let src = workspace_root().join("testcontainers/ext/pg_cjk_parser");
        let sources: Vec<_> = FILES
            .iter()
            .map(|f| (*f, fs::read(src.join(f)).unwrap()))
            .collect();
        fs::write(
            fake.control(),
            format!("{MARK}{}\ncomment = 'x'\n", digest(&sources)),
        )
        .unwrap();
        fs::write(fake.library(), b"built earlier").unwrap();
        let before = fake.files();
        // A build would fail here (the fake pg_config has no --includedir-server).
        assert_eq!(ensure_fake(&fake).unwrap(), CjkParser::StandIn);
        assert_eq!(fake.files(), before);
        // From other sources: rebuilt (which this fake cannot do, so it says it tried).
        fs::write(fake.control(), format!("{MARK}0000000000000000\n")).unwrap();
        let err = format!("{:#}", ensure_fake(&fake).unwrap_err());
        assert!(err.contains("includedir-server"), "{err}");
    }

    #[test]
    fn the_digest_follows_the_sources() {
        let a = digest(&[("a.c", b"int x;".to_vec()), ("b.sql", b"".to_vec())]);
        assert_eq!(
            a,
            digest(&[("a.c", b"int x;".to_vec()), ("b.sql", b"".to_vec())])
        );
        assert_ne!(
            a,
            digest(&[("a.c", b"int y;".to_vec()), ("b.sql", b"".to_vec())])
        );
        // Bytes moved from one file to the next change it too.
        assert_ne!(
            digest(&[("a", b"xy".to_vec()), ("b", b"".to_vec())]),
            digest(&[("a", b"x".to_vec()), ("b", b"y".to_vec())])
        );
    }
}
