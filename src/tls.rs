//! Which certificate authorities HTTPS clients (S3/B2, webhooks) trust.
//!
//! The system's CA bundle when it has one, as `SSL_CERT_FILE` / `SSL_CERT_DIR` or the usual
//! distribution paths name it; Mozilla's roots built into the binary when it has none. The
//! binary is copied into database images for `archive_command`, and the official `postgres`
//! image removes `ca-certificates`: without the fallback, nothing could reach B2 from there.

use anyhow::Context;
use rustls_pki_types::CertificateDer;

use crate::input_err;

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource {
    /// The system store (or `SSL_CERT_FILE` / `SSL_CERT_DIR`): the HTTP client loads it itself.
    System { certificates: usize },
    /// No system store: the roots built into the binary.
    BuiltIn,
}

impl RootSource {
    /// Says which roots verified a connection, for an error about a refused certificate.
    pub fn describe(&self) -> String {
        match self {
            RootSource::System { certificates } => {
                let from = match (env_path("SSL_CERT_FILE"), env_path("SSL_CERT_DIR")) {
                    (Some(f), _) => format!("SSL_CERT_FILE={f}"),
                    (None, Some(d)) => format!("SSL_CERT_DIR={d}"),
                    (None, None) => "the system CA bundle".to_string(),
                };
                format!(
                    "verified against {certificates} certificate(s) from {from}; for a private CA, set SSL_CERT_FILE to its PEM file"
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

/// Finds the trusted roots. A `SSL_CERT_FILE` or `SSL_CERT_DIR` that cannot be read is an
/// input error: silently falling back would trust the wrong authorities.
pub fn root_source() -> anyhow::Result<RootSource> {
    let loaded = rustls_native_certs::load_native_certs();
    if !loaded.certs.is_empty() {
        return Ok(RootSource::System {
            certificates: loaded.certs.len(),
        });
    }
    let named = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .into_iter()
        .find_map(|v| env_path(v).map(|p| (v, p)));
    if let Some((var, path)) = named {
        let why = loaded
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no PEM certificate in it".to_string());
        return Err(input_err!(
            "{var}={path}: {why}: point it at a readable PEM file of CA certificates, or unset it"
        ));
    }
    Ok(RootSource::BuiltIn)
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
        RootSource::System { .. } => &[][..],
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
    fn built_in_roots_are_described_with_the_fix() {
        let text = RootSource::BuiltIn.describe();
        assert!(text.contains("built into dbagent"), "{text}");
        assert!(text.contains("SSL_CERT_FILE"), "{text}");
    }
}
