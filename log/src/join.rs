//! Joining a cluster: a new node presents a join token to a member's raft port and leaves
//! with a raft id, its own certificate and the cluster's CA; the leader adds it as a learner
//! and makes it a voter once it has caught up.
//!
//! The token ([`JoinToken`], `RJ1.<CA>.<secret>`) carries the CA's certificate, so the new
//! node checks whom it talks to before it sends the secret: it dials over TLS trusting that
//! CA alone and expecting [`crate::pki::ANY_MEMBER`], the name every member's certificate
//! carries (as kubeadm pins the CA with `--discovery-token-ca-cert-hash`). The secret is
//! checked by the [`Admission`] the daemon supplies (runed: an API token allowed to join),
//! which also says what else travels with the grant (runed: the KEK, so that the new member
//! opens the same secrets).
//!
//! Only the leader admits, one node at a time: it picks an id above every id the membership
//! holds and the daemon remembers ([`Admission::taken_ids`]), so ids are never given twice (or
//! the id a learner at the same address already has, so a node that crashed before it kept its
//! grant can ask again; a voter asking again is refused: it would come back without its vote
//! and log), adds the learner through the log before it answers, so the id is taken in every
//! member's membership, and promotes it once it caught up ([`Joins::catch_up`]; a learner
//! left behind by a leader change is promoted by the next leader, [`crate::Log::promote_learners`]).

use std::sync::Arc;
use std::time::Duration;

use openraft::Raft;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::pki::{ClusterCa, NodeTls, PkiError, ANY_MEMBER};
use crate::types::TypeConfig;

/// What a join token starts with: the format's version.
pub const TOKEN_PREFIX: &str = "RJ1";

/// How long the leader waits for a new learner to catch up before it takes it out again:
/// time for the new node to keep its grant, open its log, serve its raft port and receive the
/// state (a snapshot of a large state included).
pub const CATCH_UP: Duration = Duration::from_secs(120);

/// Checks a join token for the daemon, and says what the new member is handed besides its
/// certificate.
#[tonic::async_trait]
pub trait Admission: Send + Sync + 'static {
    /// `Ok` admits the bearer of `secret` and is what it receives in [`JoinGrant::extra`]; an
    /// `Err` is the refusal it hears (`Unauthenticated`, `PermissionDenied`).
    async fn admit(&self, secret: &str) -> Result<String, Status>;

    /// Raft ids once given out that the membership may no longer show (removed members the
    /// daemon still remembers): a new node never gets one, so an old certificate never names
    /// it.
    fn taken_ids(&self) -> Vec<u64> {
        Vec::new()
    }
}

/// A join token: the cluster CA's certificate (to check the member dialled) and a secret (for
/// the member to check the joining node).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The CA's certificate, PEM.
    pub ca_pem: String,
    /// What [`Admission::admit`] checks.
    pub secret: String,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken").finish_non_exhaustive()
    }
}

const PEM_BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const PEM_END: &str = "-----END CERTIFICATE-----";

impl JoinToken {
    /// `RJ1.<the CA's DER in URL-safe base64>.<secret>`: one line, safe in a file, a shell
    /// variable or a URL.
    pub fn encode(&self) -> Result<String, JoinError> {
        let body: String = self
            .ca_pem
            .trim()
            .strip_prefix(PEM_BEGIN)
            .and_then(|s| s.strip_suffix(PEM_END))
            .ok_or_else(|| JoinError::Token("the CA certificate is not one PEM certificate".into()))?
            .chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| match c {
                '+' => '-',
                '/' => '_',
                c => c,
            })
            .collect();
        Ok(format!(
            "{TOKEN_PREFIX}.{}.{}",
            body.trim_end_matches('='),
            self.secret
        ))
    }

    /// Reads a token as [`JoinToken::encode`] writes it (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, JoinError> {
        let bad = |why: &str| JoinError::Token(why.to_string());
        let mut parts = text.trim().splitn(3, '.');
        let (Some(prefix), Some(ca), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected RJ1.<ca>.<secret>"));
        };
        if prefix != TOKEN_PREFIX {
            return Err(bad("it does not start with RJ1. (is this an API token?)"));
        }
        if secret.is_empty() || ca.is_empty() {
            return Err(bad("the CA or the secret part is empty"));
        }
        if !ca
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad("the CA part is not URL-safe base64"));
        }
        let mut body: String = ca
            .chars()
            .map(|c| match c {
                '-' => '+',
                '_' => '/',
                c => c,
            })
            .collect();
        while !body.len().is_multiple_of(4) {
            body.push('=');
        }
        let mut pem = String::from(PEM_BEGIN);
        for line in body.as_bytes().chunks(64) {
            pem.push('\n');
            pem.push_str(&String::from_utf8_lossy(line));
        }
        pem.push('\n');
        pem.push_str(PEM_END);
        pem.push('\n');
        Ok(Self {
            ca_pem: pem,
            secret: secret.to_string(),
        })
    }
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The join token is not one.
    #[error("join token: {0}")]
    Token(String),
    /// No member answered at the address given, or none led in time.
    #[error("cannot join through {address}: {why}")]
    Unreachable {
        /// The raft address dialled.
        address: String,
        /// What went wrong.
        why: String,
    },
    /// A member refused: a token that is wrong, expired or not allowed to join; an address it
    /// does not take.
    #[error("{address} refused to let this node join ({code:?}): {message}")]
    Refused {
        /// The raft address dialled.
        address: String,
        /// The gRPC code.
        code: Code,
        /// The member's reason.
        message: String,
    },
    /// What the member granted cannot be used.
    #[error("the grant: {0}")]
    Grant(#[from] PkiError),
}

/// What a joining node asks.
#[derive(Serialize, Deserialize)]
struct JoinRequest {
    /// [`JoinToken::secret`].
    secret: String,
    /// Where the other members will reach the new node's raft port.
    address: String,
}

/// What a joining node is given: everything it needs to be a member.
#[derive(Clone, Serialize, Deserialize)]
pub struct JoinGrant {
    /// Its raft id.
    pub node: u64,
    /// The CA's certificate (PEM).
    pub ca_cert: String,
    /// The CA's key (PEM): every member holds it, so whichever leads can admit the next.
    pub ca_key: String,
    /// The new member's certificate (PEM).
    pub cert: String,
    /// The new member's key (PEM).
    pub key: String,
    /// What the [`Admission`] returned.
    pub extra: String,
}

impl std::fmt::Debug for JoinGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinGrant")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl JoinGrant {
    /// The new member's certificates for its raft port.
    pub fn tls(&self) -> NodeTls {
        NodeTls {
            node: self.node,
            ca_pem: self.ca_cert.clone(),
            cert_pem: self.cert.clone(),
            key_pem: self.key.clone(),
        }
    }

    /// The cluster's CA.
    pub fn ca(&self) -> Result<ClusterCa, PkiError> {
        ClusterCa::from_pem(self.ca_cert.clone(), &self.ca_key)
    }
}

/// The answer to a join request.
#[derive(Serialize, Deserialize)]
enum JoinAnswer {
    /// Admitted: the learner is in the membership.
    Granted(JoinGrant),
    /// Ask the leader (its raft address, when known).
    NotLeader(Option<String>),
}

/// A member's side of joining: the daemon's admission and the CA that signs new members.
pub struct Joins {
    admission: Arc<dyn Admission>,
    ca: ClusterCa,
    /// One admission at a time, from choosing the id to the learner in the membership.
    one_at_a_time: tokio::sync::Mutex<()>,
    /// How long a new learner has to catch up.
    pub catch_up: Duration,
}

impl Joins {
    /// Admits with `admission`, signs with `ca`.
    pub fn new(admission: Arc<dyn Admission>, ca: ClusterCa) -> Self {
        Self {
            admission,
            ca,
            one_at_a_time: tokio::sync::Mutex::new(()),
            catch_up: CATCH_UP,
        }
    }

    /// Answers one join request (the JSON of a [`JoinRequest`]).
    pub(crate) async fn answer(&self, raft: &Raft<TypeConfig>, json: &[u8]) -> Result<Vec<u8>, Status> {
        let req: JoinRequest = serde_json::from_slice(json)
            .map_err(|e| Status::invalid_argument(format!("not a join request: {e}")))?;
        let answer = self.join(raft, req).await?;
        serde_json::to_vec(&answer).map_err(|e| Status::internal(e.to_string()))
    }

    async fn join(&self, raft: &Raft<TypeConfig>, req: JoinRequest) -> Result<JoinAnswer, Status> {
        if let Some(leader) = leader_elsewhere(raft) {
            return Ok(JoinAnswer::NotLeader(leader));
        }
        check_address(&req.address)?;
        let extra = self.admission.admit(&req.secret).await?;
        let _one = self.one_at_a_time.lock().await;
        let (existing, highest) = {
            let m = raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let existing = membership
                .nodes()
                .find(|(_, n)| n.addr == req.address)
                .map(|(id, _)| (*id, membership.voter_ids().any(|v| v == *id)));
            (existing, membership.nodes().map(|(id, _)| *id).max().unwrap_or(0))
        };
        // A voter that asks again has lost its disk (its vote and log) or is someone posing at
        // its address: letting it back under its id could lose committed entries.
        if let Some((id, true)) = existing {
            return Err(Status::already_exists(format!(
                "node {id} at {} is a voter; a node that lost its data dir joins again after `rune admin cluster remove {id}`",
                req.address
            )));
        }
        let next = self.admission.taken_ids().into_iter().fold(highest, u64::max) + 1;
        let node = existing.map_or(next, |(id, _)| id);
        let tls = self
            .ca
            .issue(node)
            .map_err(|e| Status::internal(format!("issuing the new member's certificate: {e}")))?;
        match existing {
            Some(_) => self.promote_later(raft, node, &req.address, 0),
            None => {
                let at = crate::node::add_learner(raft, node, &req.address)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                tracing::info!(node, address = %req.address, "admitted a new node as a learner");
                self.promote_later(raft, node, &req.address, at);
            }
        }
        Ok(JoinAnswer::Granted(JoinGrant {
            node,
            ca_cert: tls.ca_pem,
            ca_key: self.ca.key_pem(),
            cert: tls.cert_pem,
            key: tls.key_pem,
            extra,
        }))
    }

    fn promote_later(&self, raft: &Raft<TypeConfig>, node: u64, address: &str, at: u64) {
        let (raft, address, catch_up) = (raft.clone(), address.to_string(), self.catch_up);
        tokio::spawn(async move {
            if let Err(e) = crate::node::promote(&raft, node, &address, at, catch_up).await {
                tracing::warn!(node, %address, error = %e, "a joining node did not become a voter");
            }
        });
    }
}

/// `Some(leader's address)` when another member leads (or none is known): only the leader
/// admits.
fn leader_elsewhere(raft: &Raft<TypeConfig>) -> Option<Option<String>> {
    let m = raft.metrics();
    let m = m.borrow();
    if m.current_leader == Some(m.id) {
        return None;
    }
    let membership = m.membership_config.membership();
    Some(
        m.current_leader
            .and_then(|l| membership.get_node(&l))
            .map(|n| n.addr.clone()),
    )
}

/// A raft address the others can dial: `host:port`.
fn check_address(address: &str) -> Result<(), Status> {
    raft_address(address).map_err(|why| Status::invalid_argument(format!("address '{address}': {why}")))
}

/// Checks a raft address as members dial it, `host:port` (not `local`, a lone node's): the
/// one check for what an operator configures and what a joining node sends.
pub fn raft_address(address: &str) -> Result<(), String> {
    let (host, port) = address.trim().rsplit_once(':').ok_or("expected host:port")?;
    if host.is_empty() || host == "local" {
        return Err("the host is missing".into());
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("the port is not a number from 1 to 65535".into()),
    }
}

/// How long a joining node keeps asking: long enough for an election to end and for a
/// learner to be added through the log.
const JOIN_DEADLINE: Duration = Duration::from_secs(30);

/// Asks the member at `member` (a raft address) to let this node join, as `address`, with
/// `token`; follows the member to the leader. The TLS handshake checks the member against the
/// token's CA before the secret is sent.
pub async fn request(member: &str, token: &JoinToken, address: &str) -> Result<JoinGrant, JoinError> {
    use rune_proto::raft::raft_client::RaftClient;
    let deadline = tokio::time::Instant::now() + JOIN_DEADLINE;
    let json = serde_json::to_vec(&JoinRequest {
        secret: token.secret.clone(),
        address: address.to_string(),
    })
    .map_err(|e| JoinError::Token(e.to_string()))?;
    let mut target = member.to_string();
    let mut hops = 0;
    loop {
        let unreachable = |why: String| JoinError::Unreachable {
            address: target.clone(),
            why,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&token.ca_pem))
            .domain_name(ANY_MEMBER);
        let endpoint = Endpoint::from_shared(format!("https://{target}"))
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(JOIN_DEADLINE);
        let retry = match endpoint.connect().await {
            Err(e) => format!("{e:?}"),
            Ok(channel) => {
                let reply = RaftClient::new(channel)
                    .join(rune_proto::raft::Message {
                        json: json.clone(),
                        data: Vec::new(),
                    })
                    .await;
                match reply {
                    Ok(r) => match serde_json::from_slice(&r.into_inner().json) {
                        Ok(JoinAnswer::Granted(grant)) => return Ok(grant),
                        // Members that name each other during an election: asked again below,
                        // within the deadline.
                        Ok(JoinAnswer::NotLeader(Some(leader))) if hops < 3 => {
                            tracing::info!(member = %target, %leader, "asking the leader to join");
                            target = leader;
                            hops += 1;
                            continue;
                        }
                        Ok(JoinAnswer::NotLeader(Some(leader))) => {
                            hops = 0;
                            format!("sent on to {leader} more than 3 times")
                        }
                        Ok(JoinAnswer::NotLeader(None)) => "no leader yet".to_string(),
                        Err(e) => return Err(unreachable(format!("an answer that is not a grant: {e}"))),
                    },
                    Err(s) if s.code() == Code::Unavailable => s.message().to_string(),
                    Err(s) => {
                        return Err(JoinError::Refused {
                            address: target.clone(),
                            code: s.code(),
                            message: s.message().to_string(),
                        })
                    }
                }
            }
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(unreachable(retry));
        }
        tracing::info!(member = %target, why = %retry, "could not join yet; asking again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_carries_the_ca_certificate_and_the_secret_unchanged() {
        let ca = ClusterCa::generate().unwrap();
        let token = JoinToken {
            ca_pem: ca.cert_pem().to_string(),
            secret: "rune_abc.def".into(),
        };
        let text = token.encode().unwrap();
        assert!(
            text.starts_with("RJ1.") && !text.contains(['\n', '+', '/', '=']),
            "{text}"
        );
        let back = JoinToken::parse(&format!("  {text}\n")).unwrap();
        assert_eq!(back.secret, token.secret);
        let der = |pem: &str| -> String { pem.lines().filter(|l| !l.starts_with("-----")).collect() };
        assert_eq!(der(&back.ca_pem), der(&token.ca_pem));
        for bad in [
            "",
            "RJ1",
            "RJ1..x",
            "RJ1.abc.",
            "XX1.abc.def",
            "RJ1.a+b.c",
            "rune_123",
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn addresses_without_a_host_or_port_are_refused() {
        for good in ["10.0.0.2:7946", "node-b:7946", "[::1]:7946"] {
            assert!(check_address(good).is_ok(), "{good}");
        }
        for bad in [
            "local",
            "10.0.0.2",
            ":7946",
            "10.0.0.2:0",
            "10.0.0.2:http",
            "10.0.0.2:70000",
        ] {
            let e = check_address(bad).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
            assert!(e.message().contains(bad), "{}", e.message());
        }
    }
}
