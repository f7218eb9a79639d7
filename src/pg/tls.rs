//! TLS for dbagent's own PostgreSQL connections, with libpq's settings and meanings
//! (`PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`), over rustls.
//!
//! | sslmode | TLS | certificate checked | host name checked |
//! |---|---|---|---|
//! | `disable` | never | | |
//! | `allow`, `prefer` (libpq's default) | if the server offers it | | |
//! | `require` | always | only when a root certificate is given (as libpq) | |
//! | `verify-ca` | always | against the root certificates | |
//! | `verify-full` | always | against the root certificates | yes |
//!
//! `allow` is served like `prefer` (tokio-postgres tries TLS first). Connections over a unix
//! socket never use TLS, as in libpq. Child programs (`pg_dump`, `pg_restore`, …) are libpq
//! programs: they get the same settings through their environment.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode as WireMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::PgConfig;
use crate::input_err;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    Allow,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    /// The names libpq takes (the config key is a choice of exactly these).
    pub const NAMES: &'static [&'static str] = &[
        "disable",
        "allow",
        "prefer",
        "require",
        "verify-ca",
        "verify-full",
    ];

    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// libpq's `channel_binding`: whether SCRAM authentication binds itself to the TLS channel
/// (`SCRAM-SHA-256-PLUS`, tls-server-end-point), so that a man in the middle who terminates
/// TLS cannot relay the exchange, even where the certificate is not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelBinding {
    Disable,
    /// When the connection uses TLS and the server offers it (libpq's default).
    #[default]
    Prefer,
    /// Refuse a connection that does not authenticate with it (no TLS, no SCRAM, or a server
    /// that does not offer it).
    Require,
}

impl ChannelBinding {
    pub const NAMES: &'static [&'static str] = &["disable", "prefer", "require"];

    pub fn parse(s: &str) -> Option<ChannelBinding> {
        Some(match s {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ChannelBinding::Disable => "disable",
            ChannelBinding::Prefer => "prefer",
            ChannelBinding::Require => "require",
        }
    }

    pub fn wire(self) -> tokio_postgres::config::ChannelBinding {
        use tokio_postgres::config::ChannelBinding as Wire;
        match self {
            ChannelBinding::Disable => Wire::Disable,
            ChannelBinding::Prefer => Wire::Prefer,
            ChannelBinding::Require => Wire::Require,
        }
    }
}

/// The tls-server-end-point channel binding data of a TLS connection (RFC 5929): the server
/// certificate's hash, by the hash of its signature algorithm (SHA-1 taken as SHA-256).
/// `None` for an algorithm this does not map (Ed25519, RSA-PSS, MD5), as tokio-postgres-rustls:
/// SCRAM then goes unbound with the `n` flag, and `require` refuses it.
pub fn server_end_point(certs: Option<&[CertificateDer<'_>]>) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_cert::der::Decode;
    use x509_cert::der::oid::db::rfc5912 as oid;
    let der = certs?.first()?;
    let cert = x509_cert::Certificate::from_der(der.as_ref()).ok()?;
    Some(match cert.signature_algorithm.oid {
        oid::ID_SHA_1
        | oid::ID_SHA_256
        | oid::SHA_1_WITH_RSA_ENCRYPTION
        | oid::SHA_256_WITH_RSA_ENCRYPTION
        | oid::ECDSA_WITH_SHA_256 => sha2::Sha256::digest(der).to_vec(),
        oid::ID_SHA_384 | oid::SHA_384_WITH_RSA_ENCRYPTION | oid::ECDSA_WITH_SHA_384 => {
            sha2::Sha384::digest(der).to_vec()
        }
        oid::ID_SHA_512 | oid::SHA_512_WITH_RSA_ENCRYPTION | oid::ECDSA_WITH_SHA_512 => {
            sha2::Sha512::digest(der).to_vec()
        }
        _ => return None,
    })
}

/// The TLS settings of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// Root certificates (PEM); `system` for the system's store. libpq's default is
    /// `~/.postgresql/root.crt`.
    pub root_cert: Option<PathBuf>,
    /// A client certificate and its key (PEM), for `cert` authentication.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub channel_binding: ChannelBinding,
}

/// How a certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

impl TlsSettings {
    pub fn from_config(cfg: &PgConfig) -> TlsSettings {
        TlsSettings {
            mode: cfg
                .sslmode
                .as_deref()
                .and_then(SslMode::parse)
                .unwrap_or_default(),
            root_cert: cfg.sslrootcert.clone(),
            cert: cfg.sslcert.clone(),
            key: cfg.sslkey.clone(),
            channel_binding: cfg
                .channel_binding
                .as_deref()
                .and_then(ChannelBinding::parse)
                .unwrap_or_default(),
        }
    }

    pub fn wire_mode(&self) -> WireMode {
        match self.mode {
            SslMode::Disable => WireMode::Disable,
            SslMode::Allow | SslMode::Prefer => WireMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => WireMode::Require,
        }
    }

    fn check(&self) -> Check {
        match self.mode {
            SslMode::VerifyFull => Check::ChainAndName,
            SslMode::VerifyCa => Check::Chain,
            // As libpq: `require` with a root certificate given verifies the chain.
            SslMode::Require if self.root_cert.is_some() => Check::Chain,
            _ => Check::Nothing,
        }
    }

    /// The root certificate file in effect (libpq's default when none is set).
    pub fn root_cert_path(&self) -> Option<PathBuf> {
        self.root_cert.clone().or_else(|| {
            let home = std::env::var_os("HOME")?;
            let p = PathBuf::from(home).join(".postgresql/root.crt");
            p.exists().then_some(p)
        })
    }

    /// Environment for libpq child programs: only what was configured (libpq's defaults
    /// apply otherwise, as for dbagent).
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("PGSSLMODE", self.mode.name().to_string()),
            ("PGCHANNELBINDING", self.channel_binding.name().to_string()),
        ];
        for (var, path) in [
            ("PGSSLROOTCERT", &self.root_cert),
            ("PGSSLCERT", &self.cert),
            ("PGSSLKEY", &self.key),
        ] {
            if let Some(p) = path {
                env.push((var, p.to_string_lossy().into_owned()));
            }
        }
        env
    }

    /// The connector for tokio-postgres.
    pub fn connector(&self) -> anyhow::Result<MakeRustlsConnect> {
        Ok(MakeRustlsConnect::new(self.client_config()?))
    }

    /// The rustls configuration both kinds of connection use.
    pub fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
        let verifier: Arc<dyn ServerCertVerifier> = match self.check() {
            Check::Nothing => Arc::new(AnyCertificate(provider)),
            check => {
                let roots = self.roots()?;
                let webpki =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| input_err!("PGSSLROOTCERT: {e}"))?;
                Arc::new(Verify {
                    inner: webpki,
                    check_name: check == Check::ChainAndName,
                })
            }
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let certs = read_certs(cert, "PGSSLCERT (pg.sslcert)")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    input_err!(
                        "PGSSLKEY (pg.sslkey): cannot read a private key from {}: {e}",
                        key.display()
                    )
                })?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    input_err!("PGSSLCERT/PGSSLKEY: the certificate and key do not fit: {e}")
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(input_err!(
                    "PGSSLCERT and PGSSLKEY (pg.sslcert, pg.sslkey) go together: set both or neither"
                ));
            }
        };
        Ok(config)
    }

    fn roots(&self) -> anyhow::Result<Arc<RootCertStore>> {
        let mut roots = RootCertStore::empty();
        match self.root_cert_path() {
            Some(p) if p == Path::new("system") => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    let _ = roots.add(cert);
                }
            }
            Some(p) => {
                for cert in read_certs(&p, "PGSSLROOTCERT (pg.sslrootcert)")? {
                    roots.add(cert).map_err(|e| {
                        input_err!(
                            "PGSSLROOTCERT (pg.sslrootcert): {}: not a usable CA certificate: {e}",
                            p.display()
                        )
                    })?;
                }
            }
            None => {
                return Err(input_err!(
                    "sslmode {} needs the CA's certificate: set PGSSLROOTCERT (pg.sslrootcert) to a PEM file, or to \"system\" for the system's store",
                    self.mode.name()
                ));
            }
        }
        if roots.is_empty() {
            return Err(input_err!(
                "PGSSLROOTCERT (pg.sslrootcert) holds no certificate"
            ));
        }
        Ok(Arc::new(roots))
    }

    /// A one-line explanation of a failed TLS connection, naming the setting to fix.
    pub fn explain(&self, detail: &str, host: &str) -> Option<String> {
        let roots = || {
            self.root_cert_path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none".into())
        };
        if detail.contains("UnknownIssuer") || detail.contains("BadSignature") {
            return Some(format!(
                "the server's certificate is not signed by a CA in PGSSLROOTCERT ({}): give the CA that signed the server's certificate",
                roots()
            ));
        }
        if detail.contains("NotValidForName") {
            return Some(format!(
                "the server's certificate does not name the host {host:?} (sslmode verify-full checks it): connect with a name the certificate holds, or use verify-ca"
            ));
        }
        if detail.contains("Expired") || detail.contains("NotValidYet") {
            return Some("the server's certificate is expired or not yet valid".into());
        }
        if detail.contains("channel binding") {
            return Some(
                "PGCHANNELBINDING (pg.channel_binding) is require, and the server did not authenticate with SCRAM-SHA-256-PLUS over TLS: connect over TLS (sslmode require or stricter, not a unix socket) to a server whose pg_hba.conf method for this user is scram-sha-256, or set channel_binding to prefer".into(),
            );
        }
        if detail.contains("no encryption") && self.mode == SslMode::Disable {
            return Some("the server requires TLS and PGSSLMODE is disable".into());
        }
        if detail.contains("server does not support TLS")
            || detail.contains("tls") && detail.contains("not support")
        {
            return Some(format!(
                "the server does not offer TLS and sslmode is {}",
                self.mode.name()
            ));
        }
        None
    }
}

fn read_certs(path: &Path, setting: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| {
            input_err!(
                "{setting}: cannot read certificates from {}: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(input_err!(
            "{setting}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// `prefer`/`require` without roots: encryption without authentication, as libpq. The
/// handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (chain only) and `verify-full` (chain and host name).
#[derive(Debug)]
struct Verify {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for Verify {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_map_as_libpq() {
        let mut t = TlsSettings::default();
        assert_eq!(t.mode, SslMode::Prefer);
        assert_eq!(t.check(), Check::Nothing);
        t.mode = SslMode::Require;
        assert_eq!(t.check(), Check::Nothing);
        t.root_cert = Some("/ca.pem".into());
        assert_eq!(t.check(), Check::Chain);
        t.mode = SslMode::VerifyFull;
        assert_eq!(t.check(), Check::ChainAndName);
        assert_eq!(t.wire_mode(), WireMode::Require);
        assert_eq!(
            t.child_env(),
            [
                ("PGSSLMODE", "verify-full".to_string()),
                ("PGCHANNELBINDING", "prefer".to_string()),
                ("PGSSLROOTCERT", "/ca.pem".to_string())
            ]
        );
        for name in SslMode::NAMES {
            assert_eq!(SslMode::parse(name).unwrap().name(), *name);
        }
        for name in ChannelBinding::NAMES {
            assert_eq!(ChannelBinding::parse(name).unwrap().name(), *name);
        }
        assert_eq!(t.channel_binding, ChannelBinding::Prefer);
        assert_eq!(
            ChannelBinding::Require.wire(),
            tokio_postgres::config::ChannelBinding::Require
        );
    }

    #[test]
    fn verify_modes_need_a_root_certificate() {
        let t = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let err = t.connector().err().unwrap().to_string();
        assert!(err.starts_with("PGSSLROOTCERT"), "{err}");
        let t = TlsSettings {
            mode: SslMode::Require,
            cert: Some("/c.pem".into()),
            ..Default::default()
        };
        let err = t.connector().err().unwrap().to_string();
        assert!(err.contains("go together"), "{err}");
    }
}
