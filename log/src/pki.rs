//! The cluster's own certificate authority, for the raft port's mutual TLS.
//!
//! A node that founds a cluster makes the CA ([`ClusterCa::generate`], rcgen, ECDSA P-256) and
//! signs a certificate for each member ([`ClusterCa::issue`]), named `node-<id>.raft.rune`. On
//! the raft port both ends present their certificate and accept only the CA's: a peer dials
//! member `id` expecting the name `node-<id>.raft.rune`, so a certificate made for another
//! member, or by another CA, is refused at the handshake, before any raft message is read.
//! Every member's certificate also names [`ANY_MEMBER`], the name a joining node expects: it
//! knows the CA (from its join token) but not yet whom it dials. A server takes calls only
//! from a certificate naming a current member ([`member_id`]). The files live under the data
//! dir's [`PKI_DIR`], owner-only, keys `0600`, as etcd keeps its peer certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The directory under the data dir holding the CA and this node's certificate.
pub const PKI_DIR: &str = "cluster";
const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const NODE_CERT: &str = "node.crt";
const NODE_KEY: &str = "node.key";
const NODE_ID: &str = "node.id";

/// The name every member's certificate carries besides its own: what a node that joins, and
/// so knows the CA but no member yet, checks the member it dials for.
pub const ANY_MEMBER: &str = "raft.rune";

/// Why the cluster's certificates cannot be made, read or kept.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file under [`PKI_DIR`] cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// rcgen could not make or parse a key or certificate.
    #[error("cluster certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A file under [`PKI_DIR`] holds something else than what was written there.
    #[error("{path}: {why}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

/// The name member `id`'s certificate carries, and the name a peer expects when it dials it.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.raft.rune")
}

/// The member id a certificate was issued for (its `node-<id>.raft.rune` name), so the raft
/// port can tell a current member from a node that was removed but kept its certificate.
pub fn member_id(cert_der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => {
            d.strip_prefix("node-")?.strip_suffix(".raft.rune")?.parse().ok()
        }
        _ => None,
    })
}

/// What one member needs on its raft port: the CA's certificate, its own certificate and key.
#[derive(Clone)]
pub struct NodeTls {
    /// This member's raft id (its certificate names it).
    pub node: u64,
    /// The CA's certificate (PEM): the only issuer a peer's certificate may have.
    pub ca_pem: String,
    /// This member's certificate (PEM), signed by the CA.
    pub cert_pem: String,
    /// This member's private key (PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// The raft port's server side: presents this member's certificate and checks a client's
    /// against the CA. A client without one gets through the handshake so that a joining node
    /// can ask to join; every other RPC refuses it ([`crate::network`]).
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
            // A peer that opens a connection and never finishes the handshake is dropped.
            .timeout(std::time::Duration::from_secs(10))
    }

    /// The client side towards member `target`: trusts the CA alone, expects `target`'s name,
    /// and presents this member's certificate.
    pub fn client(&self, target: u64) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(node_name(target))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    /// Writes the CA's and this member's certificate, key and raft id under `data_dir`'s
    /// [`PKI_DIR`]; the id last, so that a node interrupted here has no certificates at its
    /// next start rather than half of them.
    pub fn save(&self, data_dir: &Path) -> Result<(), PkiError> {
        let dir = pki_dir(data_dir)?;
        write(&dir.join(CA_CERT), &self.ca_pem)?;
        write(&dir.join(NODE_CERT), &self.cert_pem)?;
        write(&dir.join(NODE_KEY), &self.key_pem)?;
        write(&dir.join(NODE_ID), &format!("{}\n", self.node))
    }

    /// This member's certificates and raft id as [`NodeTls::save`] left them, if there are any.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, PkiError> {
        let dir = data_dir.join(PKI_DIR);
        let Some(id) = read(&dir.join(NODE_ID))? else {
            return Ok(None);
        };
        let node = id.trim().parse::<u64>().map_err(|e| PkiError::Damaged {
            path: dir.join(NODE_ID),
            why: format!("not a raft node id: {e}"),
        })?;
        let damaged = |f: &str| PkiError::Damaged {
            path: dir.join(f),
            why: "missing beside node.id".into(),
        };
        let ca_pem = read(&dir.join(CA_CERT))?.ok_or_else(|| damaged(CA_CERT))?;
        let cert_pem = read(&dir.join(NODE_CERT))?.ok_or_else(|| damaged(NODE_CERT))?;
        let key_pem = read(&dir.join(NODE_KEY))?.ok_or_else(|| damaged(NODE_KEY))?;
        Ok(Some(Self {
            node,
            ca_pem,
            cert_pem,
            key_pem,
        }))
    }
}

/// The cluster's CA: its certificate and the key that signs members' certificates.
pub struct ClusterCa {
    cert_pem: String,
    key: KeyPair,
    params: CertificateParams,
}

/// The CA's certificate parameters: the same for the CA made at founding and the one read
/// back from disk or handed to a joining node, so that what it signs later names it as the
/// issuer it is. Trust is in the key, not the name: a member trusts its one CA only.
fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "rune");
    dn.push(DnType::CommonName, "rune cluster CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

impl ClusterCa {
    /// A new CA, made by the node that founds a cluster.
    pub fn generate() -> Result<Self, PkiError> {
        let params = ca_params()?;
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            cert_pem,
            key,
            params,
        })
    }

    /// The CA under `data_dir`'s [`PKI_DIR`], if this node holds it.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, PkiError> {
        let dir = data_dir.join(PKI_DIR);
        let (Some(cert_pem), Some(key_pem)) = (read(&dir.join(CA_CERT))?, read(&dir.join(CA_KEY))?) else {
            return Ok(None);
        };
        Self::from_pem(cert_pem, &key_pem)
            .map(Some)
            .map_err(|e| PkiError::Damaged {
                path: dir.join(CA_KEY),
                why: e.to_string(),
            })
    }

    /// The CA from its certificate and key (PEM), as a joining node receives them: every
    /// member holds the CA, so whichever leads can admit the next node.
    pub fn from_pem(cert_pem: String, key_pem: &str) -> Result<Self, PkiError> {
        Ok(Self {
            cert_pem,
            key: KeyPair::from_pem(key_pem)?,
            params: ca_params()?,
        })
    }

    /// The CA's private key (PEM), for a node that joins.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Keeps the CA's certificate and key under `data_dir`'s [`PKI_DIR`].
    pub fn save(&self, data_dir: &Path) -> Result<(), PkiError> {
        let dir = pki_dir(data_dir)?;
        write(&dir.join(CA_CERT), &self.cert_pem)?;
        write(&dir.join(CA_KEY), &self.key.serialize_pem())
    }

    /// The CA's certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A new key and certificate for member `node`, named [`node_name`] and [`ANY_MEMBER`],
    /// good for both ends of a raft connection.
    pub fn issue(&self, node: u64) -> Result<NodeTls, PkiError> {
        let mut p = CertificateParams::new(vec![node_name(node), ANY_MEMBER.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "rune");
        dn.push(DnType::CommonName, node_name(node));
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer)?;
        Ok(NodeTls {
            node,
            ca_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn pki_dir(data_dir: &Path) -> Result<PathBuf, PkiError> {
    let dir = data_dir.join(PKI_DIR);
    crate::backup::private_dir(&dir).map_err(|source| PkiError::Io {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

fn read(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `text` to `path` owner-only (tempfile makes its files 0600), through a temporary
/// file of its own renamed into place, so a crash leaves the old file or the new one.
fn write(path: &Path, text: &str) -> Result<(), PkiError> {
    use std::io::Write;
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut f = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.as_file().sync_all())
        .map_err(io)?;
    f.persist(path).map_err(|e| io(e.error))?;
    // The rename itself is durable once the directory is.
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}
