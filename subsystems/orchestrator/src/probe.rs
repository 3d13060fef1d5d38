//! Liveness and readiness probes: one check, and the thresholds that turn checks into a state.

use std::time::Duration;

use rune_statemachine::spec::{PortRef, Probe, ServiceSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Probe timings with the defaults Kubernetes users expect.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Before the first check.
    pub initial_delay: Duration,
    /// Between checks.
    pub interval: Duration,
    /// For one check.
    pub timeout: Duration,
    /// Consecutive failures that make a passing probe fail.
    pub failure_threshold: u32,
    /// Consecutive successes that make a failing probe pass.
    pub success_threshold: u32,
}

impl Timing {
    /// The timings of a probe spec.
    pub fn of(p: &Probe) -> Self {
        let secs = |v: Option<i64>, d: u64| Duration::from_secs(v.map_or(d, |v| v.clamp(0, 86_400) as u64));
        Self {
            initial_delay: secs(p.initial_delay_seconds, 0),
            interval: secs(p.interval_seconds, 10).max(Duration::from_secs(1)),
            timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
            failure_threshold: p.failure_threshold.map_or(3, |v| v.clamp(1, 1000) as u32),
            success_threshold: p.success_threshold.map_or(1, |v| v.clamp(1, 1000) as u32),
        }
    }
}

/// Turns a stream of check results into state transitions, honouring the thresholds.
#[derive(Debug)]
pub struct Tracker {
    timing: Timing,
    ok: Option<bool>,
    streak: u32,
    /// The last check's result, shown by `rune health`.
    pub last: Option<(bool, String)>,
}

impl Tracker {
    /// A tracker in the unknown state.
    pub fn new(timing: Timing) -> Self {
        Self {
            timing,
            ok: None,
            streak: 0,
            last: None,
        }
    }

    /// The state after thresholds; `None` before the first check.
    pub fn state(&self) -> Option<bool> {
        self.ok
    }

    /// Records a result; returns the new state when it changed. A probe starts in `start_ok`
    /// (liveness passing, readiness failing, as in Kubernetes) and leaves it once a threshold
    /// is met.
    pub fn record(&mut self, ok: bool, message: &str, start_ok: bool) -> Option<bool> {
        self.last = Some((ok, message.to_string()));
        let current = self.ok.unwrap_or(start_ok);
        if ok == current {
            // Confirms the assumed start state, which is not news.
            self.streak = 0;
            self.ok = Some(current);
            return None;
        }
        self.streak += 1;
        let need = if ok {
            self.timing.success_threshold
        } else {
            self.timing.failure_threshold
        };
        if self.streak >= need {
            self.streak = 0;
            self.ok = Some(ok);
            return Some(ok);
        }
        None
    }
}

/// The port number a probe names, looked up among the service's ports when given by name.
pub fn resolve_port(p: &Option<PortRef>, spec: &ServiceSpec) -> Option<u16> {
    match p.as_ref()? {
        PortRef::Number(n) => u16::try_from(*n).ok(),
        PortRef::Name(name) => {
            let bare = name.split('/').next().unwrap_or(name);
            if let Ok(n) = bare.parse::<u16>() {
                return Some(n);
            }
            spec.ports
                .iter()
                .find(|x| x.name == bare)
                .and_then(|x| u16::try_from(x.target_port.unwrap_or(x.port)).ok())
        }
    }
}

/// One HTTP check: any 2xx or 3xx status passes. `scheme: https` speaks TLS first and, as
/// Kubernetes' kubelet does, does not verify the certificate: the probe asks whether the
/// instance answers, not whom to trust.
pub async fn http(host: &str, port: u16, p: &Probe, timeout: Duration) -> Result<String, String> {
    let scheme = p.scheme.as_deref().unwrap_or("http").to_ascii_lowercase();
    let run = async {
        let s = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        if scheme != "https" {
            return exchange(s, host, p).await;
        }
        let name = p.host.as_deref().unwrap_or(host).to_string();
        let server =
            rustls::pki_types::ServerName::try_from(name).map_err(|e| format!("https: server name: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(insecure_client()?)
            .connect(server, s)
            .await
            .map_err(|e| format!("https: TLS handshake with {host}:{port}: {e}"))?;
        exchange(tls, host, p).await
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {}s", timeout.as_secs())))
}

/// Sends the probe's GET and reads the status line.
async fn exchange<S>(mut s: S, host: &str, p: &Probe) -> Result<String, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let path = p.path.clone().unwrap_or_else(|| "/".into());
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: rune-probe/1\r\nAccept: */*\r\nConnection: close\r\n",
        p.host.as_deref().unwrap_or(host)
    );
    for (k, v) in &p.headers {
        req.push_str(&format!("{k}: {}\r\n", v.0));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 256];
    let mut n = 0;
    while n < 12 {
        let m = s.read(&mut buf[n..]).await.map_err(|e| format!("read: {e}"))?;
        if m == 0 {
            break;
        }
        n += m;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "no HTTP status in the answer".to_string())?;
    if (200..400).contains(&code) {
        Ok(format!("HTTP {code}"))
    } else {
        Err(format!("HTTP {code}"))
    }
}

/// A TLS client that accepts any certificate (signatures are still checked), made once.
fn insecure_client() -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    type Made = Result<std::sync::Arc<rustls::ClientConfig>, String>;
    static CONFIG: std::sync::OnceLock<Made> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("https: TLS setup: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Ok(std::sync::Arc::new(config))
        })
        .clone()
}

/// Accepts whatever certificate the instance shows; the handshake's signatures still verify.
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One TCP check: the port accepts a connection.
pub async fn tcp(host: &str, port: u16, timeout: Duration) -> Result<String, String> {
    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(_)) => Ok(format!("port {port} open")),
        Ok(Err(e)) => Err(format!("connect {host}:{port}: {e}")),
        Err(_) => Err(format!(
            "connect {host}:{port}: timed out after {}s",
            timeout.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(f: u32, s: u32) -> Timing {
        Timing {
            initial_delay: Duration::ZERO,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failure_threshold: f,
            success_threshold: s,
        }
    }

    #[test]
    fn failure_threshold_counts_consecutive_failures() {
        let mut t = Tracker::new(timing(3, 1));
        assert_eq!(t.record(false, "x", true), None);
        assert_eq!(t.record(false, "x", true), None);
        assert_eq!(t.record(true, "ok", true), None, "a success resets the streak");
        assert_eq!(t.record(false, "x", true), None);
        assert_eq!(t.record(false, "x", true), None);
        assert_eq!(t.record(false, "x", true), Some(false));
        assert_eq!(t.record(true, "ok", true), Some(true));
    }

    #[test]
    fn readiness_starts_unknown_and_needs_its_success_threshold() {
        let mut t = Tracker::new(timing(1, 2));
        assert_eq!(t.record(true, "ok", false), None);
        assert_eq!(t.record(true, "ok", false), Some(true));
        assert_eq!(t.record(false, "x", false), Some(false));
    }

    #[tokio::test]
    async fn http_and_tcp_checks_against_a_real_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut status = [200u16, 503].into_iter().cycle();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let code = status.next().unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let p = Probe {
            kind: "http".into(),
            path: Some("/healthz".into()),
            ..Default::default()
        };
        let t = Duration::from_secs(2);
        assert_eq!(http("127.0.0.1", port, &p, t).await, Ok("HTTP 200".into()));
        assert_eq!(http("127.0.0.1", port, &p, t).await, Err("HTTP 503".into()));
        assert!(tcp("127.0.0.1", port, t).await.is_ok());
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(tcp("127.0.0.1", closed, t).await.is_err());
    }

    #[tokio::test]
    async fn https_checks_speak_tls() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = rustls::pki_types::CertificateDer::from(cert.cert.der().to_vec());
        let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (s, _) = l.accept().await.unwrap();
                let Ok(mut s) = acceptor.accept(s).await else {
                    continue;
                };
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
                let _ = s.shutdown().await;
            }
        });
        let p = Probe {
            kind: "http".into(),
            scheme: Some("HTTPS".into()),
            host: Some("localhost".into()),
            ..Default::default()
        };
        let t = Duration::from_secs(5);
        assert_eq!(http("127.0.0.1", port, &p, t).await, Ok("HTTP 204".into()));
        // A port that accepts connections but speaks no TLS fails the probe.
        let plain = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_port = plain.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = plain.accept().await.unwrap();
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
            }
        });
        let r = http("127.0.0.1", plain_port, &p, t).await;
        assert!(r.as_ref().is_err_and(|e| e.contains("TLS handshake")), "{r:?}");
    }
}
