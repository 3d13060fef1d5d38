//! TLS for the gRPC API and the HTTP endpoint (rustls with ring), and the self-signed pair
//! `--dev-mode` makes when TLS is on without certificate files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A certificate chain and its key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate (chain), PEM.
    pub cert: PathBuf,
    /// The private key, PEM.
    pub key: PathBuf,
}

/// A certificate and key read and checked, with the files they came from.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    /// Where they came from (for messages and the HTTPS listener).
    pub files: TlsFiles,
    /// The certificate chain, PEM.
    pub cert: Vec<u8>,
    /// The private key, PEM.
    pub key: Vec<u8>,
}

/// Why TLS cannot be set up; runed refuses to start with it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The PEM does not hold what it should.
    #[error("{0}: {1}")]
    Pem(PathBuf, String),
    /// rustls refused the pair.
    #[error("TLS certificate and key do not work together: {0}")]
    Rustls(#[from] rustls::Error),
    /// The self-signed pair could not be made.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
}

/// The dev-mode pair under `dir`, generated on first use (for localhost and 127.0.0.1); the
/// certificate is its own CA, so `rune --tls-ca DIR/cert.pem` trusts it.
pub fn dev_pair(dir: &Path) -> Result<TlsFiles, TlsError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    if files.cert.is_file() && files.key.is_file() {
        return Ok(files);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| TlsError::Io(dir.to_path_buf(), e))?;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()])
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let write = |p: &Path, text: String, mode: u32| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(p)
            .map_err(|e| TlsError::Io(p.to_path_buf(), e))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| TlsError::Io(p.to_path_buf(), e))
    };
    write(&files.key, ck.signing_key.serialize_pem(), 0o600)?;
    write(&files.cert, ck.cert.pem(), 0o644)?;
    tracing::info!(cert = %files.cert.display(), "generated a self-signed TLS certificate for dev mode");
    Ok(files)
}

/// Reads both files, checking that they hold a certificate and a key.
pub fn read_pem(files: &TlsFiles) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| TlsError::Io(p.to_path_buf(), e));
    let (cert, key) = (read(&files.cert)?, read(&files.key)?);
    let _ = server_config_from(&cert, &key, files)?;
    Ok((cert, key))
}

fn server_config_from(
    cert: &[u8],
    key: &[u8],
    files: &TlsFiles,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem(files.cert.clone(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(files.cert.clone(), "no CERTIFICATE block".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem(files.key.clone(), e.to_string()))?;
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Handshakes in progress at once on the HTTPS listener; more connections wait in the kernel's
/// backlog.
const MAX_HANDSHAKES: usize = 256;
/// Longest a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A TLS listener for axum. Connections are handshaken concurrently, each bounded in time, so a
/// slow or silent client delays nobody else; failed handshakes are logged and dropped.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Wraps a bound listener and starts accepting on it.
    pub fn new(tcp: TcpListener, files: &TlsFiles, cert: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let acceptor = TlsAcceptor::from(server_config_from(cert, key, files)?);
        let local = tcp
            .local_addr()
            .map_err(|e| TlsError::Io(files.cert.clone(), e))?;
        let (tx, ready) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
        let limit = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let acceptor_task = tokio::spawn(async move {
            loop {
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                let (stream, addr) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting an HTTPS connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        });
        Ok(Self {
            ready,
            local,
            acceptor_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The acceptor stopped (only when the listener is dropped): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
