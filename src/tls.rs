//! Which certificate authorities HTTPS clients (S3/B2, webhooks) trust.
//!
//! The system's CA bundle when it has one, as `SSL_CERT_FILE` / `SSL_CERT_DIR` or the usual
//! distribution paths name it; Mozilla's roots built into the binary when it has none. The
//! binary is copied into database images for `archive_command`, and the official `postgres`
//! image removes `ca-certificates`: without the fallback, nothing could reach B2 from there.

use std::path::Path;

use anyhow::Context;
use rustls_pki_types::CertificateDer;

use crate::input_err;

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// The system store (or `SSL_CERT_FILE` / `SSL_CERT_DIR`): the HTTP client loads it itself.
    System,
    /// No system store: the roots built into the binary.
    BuiltIn,
}

impl RootSource {
    /// Says which roots verified a connection, for an error about a refused certificate.
    pub fn describe(&self) -> String {
        match self {
            RootSource::System => {
                let from = match (env_path("SSL_CERT_FILE"), env_path("SSL_CERT_DIR")) {
                    (Some(f), _) => format!("SSL_CERT_FILE={f}"),
                    (None, Some(d)) => format!("SSL_CERT_DIR={d}"),
                    (None, None) => "the system CA bundle".to_string(),
                };
                format!(
                    "verified against {from}; for a private CA, set SSL_CERT_FILE to its PEM file"
                )
            }
            RootSource::BuiltIn => format!(
                "verified against the {} CA roots built into dbagent (no system CA bundle found); for a private CA, set SSL_CERT_FILE to its PEM file",
                builtin_roots().len()
            ),
        }
    }
}

fn env_path(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

const PEM_CERTIFICATE: &[u8] = b"-----BEGIN CERTIFICATE-----";

/// Whether a file holds at least one PEM certificate. Cheap: it only looks for the marker,
/// where parsing a distribution's 150 roots costs milliseconds that `wal-push` pays per segment.
fn holds_certificate(path: &Path) -> std::io::Result<bool> {
    let bytes = std::fs::read(path)?;
    Ok(bytes
        .windows(PEM_CERTIFICATE.len())
        .any(|w| w == PEM_CERTIFICATE))
}

fn dir_holds_certificate(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .flatten()
        .any(|e| holds_certificate(&e.path()).unwrap_or(false))
}

/// Finds the trusted roots, looking where the HTTP client's loader (rustls-native-certs) does:
/// only `SSL_CERT_FILE` / `SSL_CERT_DIR` when either is set, the distribution's usual paths
/// otherwise. A variable that names nothing usable is an input error: silently falling back
/// would trust other authorities than the ones asked for.
pub fn root_source() -> anyhow::Result<RootSource> {
    let file = env_path("SSL_CERT_FILE");
    let dirs = env_path("SSL_CERT_DIR");
    if file.is_some() || dirs.is_some() {
        if let Some(f) = &file {
            match holds_certificate(Path::new(f)) {
                Ok(true) => return Ok(RootSource::System),
                Ok(false) if dirs.is_none() => {
                    return Err(input_err!(
                        "SSL_CERT_FILE={f} holds no PEM certificate: point it at a PEM file of CA certificates, or unset it"
                    ));
                }
                Err(e) if dirs.is_none() => {
                    return Err(input_err!(
                        "SSL_CERT_FILE={f}: {e}: point it at a readable PEM file of CA certificates, or unset it"
                    ));
                }
                _ => {}
            }
        }
        if let Some(d) = &dirs {
            if d.split(':').any(|d| dir_holds_certificate(Path::new(d))) {
                return Ok(RootSource::System);
            }
            return Err(input_err!(
                "SSL_CERT_DIR={d} holds no readable PEM certificate: point it at a directory of CA certificates, or unset it"
            ));
        }
    }
    let probe = openssl_probe::probe();
    let system = probe
        .cert_file
        .as_deref()
        .is_some_and(|f| holds_certificate(f).unwrap_or(false))
        || probe.cert_dir.iter().any(|d| dir_holds_certificate(d));
    Ok(if system {
        RootSource::System
    } else {
        RootSource::BuiltIn
    })
}

/// Mozilla's CA roots, compiled in.
pub fn builtin_roots() -> &'static [CertificateDer<'static>] {
    webpki_root_certs::TLS_SERVER_ROOT_CERTS
}

/// The roots to add to an HTTP client that already loads the system store itself: none when
/// the system has a store, the built-in ones when it has none.
pub fn extra_roots() -> anyhow::Result<(RootSource, &'static [CertificateDer<'static>])> {
    let source = root_source()?;
    let extra = match source {
        RootSource::System => &[][..],
        RootSource::BuiltIn => builtin_roots(),
    };
    Ok((source, extra))
}

/// A reqwest client builder that trusts the roots chosen above.
pub fn reqwest_builder() -> anyhow::Result<reqwest::ClientBuilder> {
    let (_, extra) = extra_roots()?;
    let mut builder = reqwest::Client::builder();
    for cert in extra {
        let cert = reqwest::Certificate::from_der(cert.as_ref())
            .context("loading a built-in CA certificate")?;
        builder = builder.add_root_certificate(cert);
    }
    Ok(builder)
}

/// True when an error chain reads like a refused server certificate.
pub fn is_certificate_error(text: &str) -> bool {
    [
        "UnknownIssuer",
        "invalid peer certificate",
        "certificate verify failed",
        "BadSignature",
        "NotValidForName",
        "CertExpired",
    ]
    .iter()
    .any(|m| text.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_roots_are_a_real_store() {
        // Enough roots to reach B2, AWS, Wasabi and Let's Encrypt-fronted MinIO.
        assert!(builtin_roots().len() > 100, "{}", builtin_roots().len());
        for cert in builtin_roots() {
            reqwest::Certificate::from_der(cert.as_ref()).expect("a DER certificate");
        }
    }

    #[test]
    fn certificate_errors_are_recognised() {
        assert!(is_certificate_error(
            "error sending request: client error (Connect): invalid peer certificate: UnknownIssuer"
        ));
        assert!(!is_certificate_error("connection refused"));
    }

    #[test]
    fn a_bundle_counts_only_when_it_holds_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"# no certificates here\n").unwrap();
        assert!(!holds_certificate(&empty).unwrap());
        assert!(!dir_holds_certificate(dir.path()));
        let bundle = dir.path().join("bundle.pem");
        std::fs::write(
            &bundle,
            b"x\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(holds_certificate(&bundle).unwrap());
        assert!(dir_holds_certificate(dir.path()));
        assert!(holds_certificate(&dir.path().join("absent.pem")).is_err());
        // An empty /etc/ssl/certs (ca-certificates removed) is no store.
        let certs = tempfile::tempdir().unwrap();
        assert!(!dir_holds_certificate(certs.path()));
    }

    #[test]
    fn built_in_roots_are_described_with_the_fix() {
        let text = RootSource::BuiltIn.describe();
        assert!(text.contains("built into dbagent"), "{text}");
        assert!(text.contains("SSL_CERT_FILE"), "{text}");
    }
}
