//! A TLS-terminating proxy in front of a local server (moto), with a certificate authority
//! made up by the test: HTTPS to "S3" without a cloud, and a CA that no system trusts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};

use crate::util::tempdir_for;

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority generated for one test; its PEM file is what `SSL_CERT_FILE`
/// points at.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
    dir: TempDir,
}

impl TestCa {
    pub fn generate() -> Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "dbagent test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        let dir = tempdir_for("dbagent-ca-", None)?;
        std::fs::write(dir.path().join("ca.pem"), &pem)?;
        Ok(TestCa {
            params,
            key,
            pem,
            dir,
        })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A file holding the CA certificate (PEM), for `SSL_CERT_FILE`.
    pub fn pem_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes the CA certificate to `path` (e.g. inside a chroot).
    pub fn write_pem(&self, path: &Path) -> Result<()> {
        std::fs::write(path, &self.pem).with_context(|| format!("writing {}", path.display()))
    }

    /// A certificate for these names (DNS names or IP addresses) signed by this CA, PEM; the
    /// first name is also its common name. For servers that read PEM files (PostgreSQL).
    pub fn issue(&self, names: &[&str]) -> Result<CertPair> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for 127.0.0.1 and localhost signed by this CA: (chain, key).
    fn server_cert(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let mut params = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "dbagent test server");
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone()], key))
    }
}

/// Listens on 127.0.0.1 with TLS (a certificate from `TestCa`) and forwards the plain bytes
/// to a local port. Stops when dropped.
pub struct TlsProxy {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsProxy {
    pub fn start(ca: &TestCa, upstream_port: u16) -> Result<TlsProxy> {
        let (chain, key) = ca.server_cert()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("tls-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            accepted = listener.accept() => {
                                let Ok((client, _)) = accepted else { continue };
                                tokio::spawn(forward(acceptor.clone(), client, upstream_port));
                            }
                        }
                    }
                });
            })?;
        Ok(TlsProxy {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// "https://127.0.0.1:PORT"
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// One connection: a handshake that fails (the client does not trust the CA) just ends it.
async fn forward(acceptor: tokio_rustls::TlsAcceptor, client: TcpStream, upstream_port: u16) {
    let Ok(mut tls) = acceptor.accept(client).await else {
        return;
    };
    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
