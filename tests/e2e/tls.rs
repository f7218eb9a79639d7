//! HTTPS to S3 and the image the binary runs in: the CA comes from `SSL_CERT_FILE`, the system
//! bundle, or the roots built into the binary when the image has none (the official
//! `postgres` image removes `ca-certificates`); `dbagent install` copies the binary into a
//! shared volume; and the binary needs nothing but the C library that every database image has.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dbagent_testcontainers::{S3Server, TestCa, TlsProxy};

use crate::support::*;

/// The environment for `s3://tls/p` behind the TLS proxy (HTTPS only: plain HTTP refused).
fn https_env(server: &S3Server, proxy: &TlsProxy) -> Vec<(String, String)> {
    server
        .env("p")
        .into_iter()
        .filter(|(k, _)| k != "DBAGENT_S3_ALLOW_HTTP")
        // object_store logs each retry at info: keep stderr to the one error line.
        .chain([("DBAGENT_LOG".to_string(), "warn".to_string())])
        .map(|(k, v)| match k.as_str() {
            "DBAGENT_S3_ENDPOINT" => (k, proxy.endpoint()),
            _ => (k, v),
        })
        .collect()
}

fn list(env: &[(String, String)], cert_file: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("list")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    if let Some(f) = cert_file {
        cmd.env("SSL_CERT_FILE", f);
    }
    cmd.output().unwrap()
}

#[test]
fn https_endpoint_is_verified_with_the_ca_in_ssl_cert_file() {
    let server = S3Server::start("tls").unwrap();
    let ca = TestCa::generate().unwrap();
    let proxy = TlsProxy::start(&ca, server.port()).unwrap();
    let env = https_env(&server, &proxy);

    let listing = ok(&list(&env, Some(ca.pem_path().to_str().unwrap())));
    assert!(!listing.is_empty(), "list printed nothing");

    // A bundle that is not there is named, not silently replaced by other roots.
    refused(
        &list(&env, Some("/nonexistent/ca.pem")),
        "SSL_CERT_FILE=/nonexistent/ca.pem",
    );
    // The system bundle does not hold the test's CA: verification is on, and the message
    // says which roots were used and how to add a private CA.
    let stderr = refused(&list(&env, None), "does not trust");
    assert!(stderr.contains("system CA bundle"), "{stderr}");
    assert!(stderr.contains("SSL_CERT_FILE"), "{stderr}");
}

#[test]
fn install_copies_the_binary_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["install", dir.path().to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    let stdout = ok(&out);
    let dest = dir.path().join("dbagent");
    assert!(stdout.contains(dest.to_str().unwrap()), "{stdout}");
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(BIN).unwrap());
    let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755);
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    // The copy runs.
    let version = Command::new(&dest).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&ok(&version).into_bytes()).starts_with("dbagent "));

    let absent = dir.path().join("not-mounted");
    refused(
        &Command::new(BIN)
            .args(["install", absent.to_str().unwrap()])
            .output()
            .unwrap(),
        "does not exist",
    );
}

/// The shared libraries every Debian/Ubuntu-based database image has (libc6, libgcc-s1).
const BASE_IMAGE_LIBRARIES: &[&str] = &[
    "linux-vdso.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
    "libc.so.6",
    "libm.so.6",
    "libgcc_s.so.1",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
];

/// The paths `ldd` names for the binary.
fn linked_libraries(bin: &str) -> Vec<(String, Option<PathBuf>)> {
    let out = Command::new("ldd").arg(bin).output().expect("run ldd");
    let text = ok(&out);
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let name = l.split_whitespace().next()?.to_string();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next().map(PathBuf::from),
                None => Some(PathBuf::from(&name)),
            }
            .filter(|p| p.is_absolute());
            let short = Path::new(&name).file_name()?.to_string_lossy().into_owned();
            Some((short, path))
        })
        .collect()
}

/// A root filesystem with the binary (put there by `dbagent install`) and the C library only:
/// no shell, no CA bundle (an empty /etc/ssl/certs). It stands for a database image from which
/// `ca-certificates` was removed; the binary must still start and reach S3 over HTTPS.
#[test]
fn the_binary_runs_with_nothing_but_the_c_library() {
    assert!(
        dbagent_testcontainers::is_root(),
        "this test builds a chroot and must run as root (as ./scripts/test does)"
    );
    let libs = linked_libraries(BIN);
    let foreign: Vec<_> = libs
        .iter()
        .filter(|(name, _)| !BASE_IMAGE_LIBRARIES.contains(&name.as_str()))
        .collect();
    assert!(
        foreign.is_empty(),
        "dbagent links libraries a database image may not have: {foreign:?}"
    );

    let root = tempfile::tempdir().unwrap();
    ok(&Command::new(BIN)
        .args(["install", root.path().to_str().unwrap()])
        .output()
        .unwrap());
    for (_, path) in &libs {
        let Some(path) = path else { continue };
        let inside = root.path().join(path.strip_prefix("/").unwrap());
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::copy(path, &inside).unwrap();
    }
    // What removing ca-certificates can leave behind: the directory, without a certificate.
    std::fs::create_dir_all(root.path().join("etc/ssl/certs")).unwrap();
    assert_eq!(
        std::fs::read_dir(root.path().join("etc/ssl/certs"))
            .unwrap()
            .count(),
        0
    );

    let server = S3Server::start("tls").unwrap();
    let ca = TestCa::generate().unwrap();
    ca.write_pem(&root.path().join("ca.pem")).unwrap();
    let proxy = TlsProxy::start(&ca, server.port()).unwrap();
    let env = https_env(&server, &proxy);
    let chrooted = |args: &[&str], cert_file: Option<&str>| {
        let mut cmd = Command::new("/usr/sbin/chroot");
        cmd.arg(root.path())
            .arg("/dbagent")
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(f) = cert_file {
            cmd.env("SSL_CERT_FILE", f);
        }
        cmd.output().expect("run chroot")
    };

    let version = ok(&chrooted(&["--version"], None));
    assert!(version.starts_with("dbagent "), "{version}");
    // A private CA through SSL_CERT_FILE works without any system bundle.
    ok(&chrooted(&["list"], Some("/ca.pem")));
    // Without one, the built-in roots verify the server (and refuse the test's CA): the
    // client was built, and says which roots it used.
    let stderr = refused(&chrooted(&["list"], None), "does not trust");
    assert!(stderr.contains("built into dbagent"), "{stderr}");
}
