//! Certificates for exposed hosts: ordered through ACME (HTTP-01, answered on the ingress's
//! HTTP listener), or taken from a TLS secret the user cast (`tls: {mode: manual, secretName}`).
//!
//! Issued certificates and the ACME account are kept as secrets in the `system` namespace,
//! sealed and written through the log like any secret ([`Vault`]), so a restart, a replay and a
//! KEK rotation treat them like the rest. Renewal starts 30 days before expiry, or after two
//! thirds of a lifetime shorter than 90 days; failures back off from 30 s to 1 h. A new
//! certificate is installed for the next handshake; no listener restarts.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder,
    OrderStatus, RetryPolicy,
};
use rune_statemachine::secret::SecretData;
use rustls::sign::CertifiedKey;

/// Where certificates and the ACME account are kept: secrets, sealed and written through the
/// log by the daemon.
pub trait Vault: Send + Sync {
    /// The current value of a secret, opened.
    fn get(&self, namespace: &str, name: &str) -> Result<Option<SecretData>, String>;
    /// Writes a new version of a secret; returns once it is applied.
    fn put<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        data: SecretData,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
    /// The names of the secrets of `namespace` that start with `prefix`, none opened.
    fn names(&self, namespace: &str, prefix: &str) -> Result<Vec<String>, String>;
    /// Deletes a secret; returns once it is applied (a secret already gone is not an error).
    fn delete<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

/// The namespace certificates and the account live in.
pub const SYSTEM_NAMESPACE: &str = "system";
const ACCOUNT_SECRET: &str = "acme-account";

/// Settings of the ACME client.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The directory URL (Let's Encrypt production unless configured).
    pub directory: String,
    /// Contact e-mail for the account.
    pub email: Option<String>,
    /// A CA (PEM) to trust for the directory's own TLS (a private ACME server such as pebble).
    pub ca_file: Option<PathBuf>,
    /// Renew this long before expiry instead of the default rule (tests force early renewals).
    pub renew_before: Option<Duration>,
    /// How long the certificate of a host no longer exposed is kept before it is deleted, so
    /// that a host taken down and put back within that time is not ordered again (ACME
    /// servers limit duplicate orders).
    pub keep_unexposed: Duration,
}

/// The default of [`AcmeConfig::keep_unexposed`].
pub const DEFAULT_KEEP_UNEXPOSED: Duration = Duration::from_secs(24 * 3600);

/// The prefix of [`cert_secret_name`].
pub const CERT_SECRET_PREFIX: &str = "tls-";

/// Whether a secret name is one [`cert_secret_name`] gives (`tls-…-` and 8 hex digits).
pub fn is_cert_secret_name(name: &str) -> bool {
    name.strip_prefix(CERT_SECRET_PREFIX)
        .and_then(|rest| rest.rsplit_once('-'))
        .is_some_and(|(_, h)| h.len() == 8 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The secret that holds a host's issued certificate: readable, and unique per host.
pub fn cert_secret_name(host: &str) -> String {
    let mut h: u32 = 2_166_136_261;
    for b in host.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16_777_619);
    }
    let readable: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    format!("{CERT_SECRET_PREFIX}{}-{h:08x}", readable.trim_matches('-'))
}

/// A certificate ready to serve, with what the status shows.
#[derive(Clone)]
pub struct Loaded {
    /// For rustls.
    pub key: Arc<CertifiedKey>,
    /// Expiry, seconds since the epoch (0 when unknown).
    pub not_after: i64,
    /// Start of validity, seconds since the epoch.
    pub not_before: i64,
}

/// Parses a PEM chain and key into something rustls serves.
pub fn load_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    let first = certs.first().ok_or("tls.crt: no CERTIFICATE block")?;
    let (not_before, not_after) = validity(first).unwrap_or((0, 0));
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("tls.key: {e}"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| format!("tls.key: {e}"))?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match()
        .map_err(|e| format!("tls.crt and tls.key do not belong together: {e}"))?;
    Ok(Loaded {
        key: Arc::new(ck),
        not_after,
        not_before,
    })
}

/// The validity of an X.509 certificate (DER): a small walk to TBSCertificate.validity.
fn validity(der: &[u8]) -> Option<(i64, i64)> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&l0, rest) = rest.split_first()?;
        let (len, rest) = if l0 < 0x80 {
            (usize::from(l0), rest)
        } else {
            let n = usize::from(l0 & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            (
                rest[..n].iter().fold(0usize, |a, x| (a << 8) | usize::from(*x)),
                &rest[n..],
            )
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(cert)?;
    // [0] version (optional), serial, signature, issuer, validity.
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
        tbs = tlv(tbs)?.2;
    } else {
        tbs = rest;
    }
    tbs = tlv(tbs)?.2; // signature algorithm
    tbs = tlv(tbs)?.2; // issuer
    let (_, validity, _) = tlv(tbs)?;
    let (t1, nb, rest) = tlv(validity)?;
    let (t2, na, _) = tlv(rest)?;
    Some((time(t1, nb)?, time(t2, na)?))
}

fn time(tag: u8, v: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(v).ok()?.trim_end_matches('Z');
    let (year, rest) = match tag {
        0x17 => {
            let y: i64 = s.get(0..2)?.parse().ok()?;
            (if y >= 50 { 1900 + y } else { 2000 + y }, s.get(2..)?)
        }
        0x18 => (s.get(0..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let n = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (mo, d, h, mi, se) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    // Days from the civil date (proleptic Gregorian).
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

/// When a certificate should be renewed.
pub fn renew_at(l: &Loaded, renew_before: Option<Duration>) -> i64 {
    let life = l.not_after - l.not_before;
    match renew_before {
        Some(d) => l.not_after - d.as_secs() as i64,
        None if life > 0 && life < 90 * 86_400 => l.not_before + life * 2 / 3,
        None => l.not_after - 30 * 86_400,
    }
}

/// The state of one host's certificate, for `rune get ingresses` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertState {
    /// `pending`, `ready` or `error`.
    pub state: &'static str,
    /// Why, when not ready.
    pub detail: String,
    /// Expiry (seconds since the epoch), when ready.
    pub not_after: i64,
}

/// HTTP-01 answers in flight: token → key authorization.
pub type Challenges = Arc<Mutex<HashMap<String, String>>>;

/// Orders one certificate for `host`; returns (chain PEM, key PEM).
pub async fn order(
    account: &Account,
    host: &str,
    challenges: &Challenges,
) -> Result<(String, String), String> {
    let ids = [Identifier::Dns(host.to_string())];
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(|e| format!("new order: {e}"))?;
    // Whatever ends the order (an error, or the caller's timeout dropping it), its answers
    // are not served after it.
    let mut tokens = Answered {
        challenges,
        tokens: Vec::new(),
    };
    {
        let mut auths = order.authorizations();
        while let Some(a) = auths.next().await {
            let mut a = a.map_err(|e| format!("authorization: {e}"))?;
            if a.status == AuthorizationStatus::Valid {
                continue;
            }
            let mut ch = a
                .challenge(ChallengeType::Http01)
                .ok_or("the ACME server offers no http-01 challenge")?;
            let ka = ch.key_authorization().as_str().to_string();
            if let Ok(mut m) = challenges.lock() {
                m.insert(ch.token.clone(), ka);
            }
            tokens.tokens.push(ch.token.clone());
            ch.set_ready().await.map_err(|e| format!("challenge: {e}"))?;
        }
    }
    let retry = RetryPolicy::new().timeout(Duration::from_secs(60));
    let result = async {
        let status = order
            .poll_ready(&retry)
            .await
            .map_err(|e| format!("order: {e}"))?;
        if status != OrderStatus::Ready {
            return Err(format!(
                "order is {status:?}, not ready (did the HTTP-01 check reach this node?)"
            ));
        }
        let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).map_err(|e| e.to_string())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(|e| e.to_string())?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(|e| format!("finalize: {e}"))?;
        let chain = order
            .poll_certificate(&retry)
            .await
            .map_err(|e| format!("certificate: {e}"))?;
        Ok((chain, key.serialize_pem()))
    }
    .await;
    drop(tokens);
    result
}

/// The HTTP-01 answers one order put up, taken down when it is dropped.
struct Answered<'a> {
    challenges: &'a Challenges,
    tokens: Vec<String>,
}

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.challenges.lock() {
            for t in &self.tokens {
                m.remove(t);
            }
        }
    }
}

/// The ACME account: restored from the vault, or created and stored there.
pub async fn account(cfg: &AcmeConfig, vault: &dyn Vault) -> Result<Account, String> {
    let builder = || match &cfg.ca_file {
        Some(p) => Account::builder_with_root(p).map_err(|e| format!("acme.ca-file {}: {e}", p.display())),
        None => Account::builder().map_err(|e| e.to_string()),
    };
    if let Some(data) = vault.get(SYSTEM_NAMESPACE, ACCOUNT_SECRET)? {
        let creds: Option<AccountCredentials> = data
            .get("credentials")
            .and_then(|b| serde_json::from_slice(b).ok())
            .filter(|_| data.get("directory").map(|d| d.as_slice()) == Some(cfg.directory.as_bytes()));
        if let Some(c) = creds {
            return builder()?
                .from_credentials(c)
                .await
                .map_err(|e| format!("restoring the ACME account: {e}"));
        }
    }
    let mail = cfg.email.as_ref().map(|m| format!("mailto:{m}"));
    let contact: Vec<&str> = mail.iter().map(String::as_str).collect();
    let (acct, creds) = builder()?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            cfg.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("creating the ACME account at {}: {e}", cfg.directory))?;
    let json = serde_json::to_vec(&creds).map_err(|e| e.to_string())?;
    let data: SecretData = BTreeMap::from([
        ("credentials".to_string(), json),
        ("directory".to_string(), cfg.directory.clone().into_bytes()),
    ]);
    vault.put(SYSTEM_NAMESPACE, ACCOUNT_SECRET, data).await?;
    Ok(acct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_validity_and_matches_pairs() {
        let ck = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let l = load_pair(
            ck.cert.pem().as_bytes(),
            ck.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        // rcgen's defaults: 1975-01-01 to 4096-01-01.
        assert_eq!(l.not_before, 157_766_400);
        assert!(l.not_after > 60_000_000_000, "{}", l.not_after);
        let other = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        let e = load_pair(
            ck.cert.pem().as_bytes(),
            other.signing_key.serialize_pem().as_bytes(),
        )
        .err()
        .unwrap();
        assert!(e.contains("do not belong together"), "{e}");
        assert!(load_pair(b"junk", b"junk").is_err());
    }

    #[test]
    fn renewal_times_and_names() {
        let l = Loaded {
            key: Arc::new(CertifiedKey::new(vec![], {
                let ck = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
                let k = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
                rustls::crypto::ring::sign::any_supported_type(&k).unwrap()
            })),
            not_before: 0,
            not_after: 6 * 86_400,
        };
        assert_eq!(renew_at(&l, None), 4 * 86_400, "two thirds of a short life");
        let long = Loaded {
            not_after: 90 * 86_400,
            ..l.clone()
        };
        assert_eq!(renew_at(&long, None), 60 * 86_400, "30 days before");
        assert_eq!(renew_at(&l, Some(Duration::from_secs(86_400))), 5 * 86_400);
        assert_ne!(cert_secret_name("a-b.c"), cert_secret_name("a.b-c"));
        assert!(cert_secret_name("web.example.com").starts_with("tls-web-example-com-"));
        assert!(is_cert_secret_name(&cert_secret_name("web.example.com")));
        assert!(is_cert_secret_name(&cert_secret_name("-")));
        assert!(!is_cert_secret_name("tls-mine"));
        assert!(!is_cert_secret_name("web-tls-0123abcd"));
    }
}
