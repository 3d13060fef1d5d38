//! runed as a member of a raft cluster: its raft identity at start, and the admission of the
//! nodes that join it.
//!
//! A node with `cluster.raft-listen` and no certificates yet either founds a cluster (makes
//! the cluster CA with rcgen and signs its own certificate as raft node 1, the id a single
//! node always had, so an existing data dir becomes the first member unchanged) or, with
//! `cluster.join`, asks a member for a grant with its join token ([`rune_log::join`]): its
//! raft id, its certificate, the CA, and the KEK, which it keeps where `crypto.kek` says, so
//! every member opens the same secrets. What it was granted is kept under the data dir's
//! `cluster/`, and later starts read it back: joining happens once.
//!
//! The join token (`rune admin cluster join-token`, 24 h by default) is a token record made for
//! joining only (the API refuses it) by a caller who may `create` on `admin`, with the CA's
//! certificate in front of its secret; a member admits its bearer while that token is live and
//! its user is still allowed the same.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use rune_log::join::{Admission, JoinError, JoinToken};
use rune_log::pki::{ClusterCa, NodeTls, PKI_DIR};
use rune_secrets::{Kek, KekSource};
use tonic::Status;

use crate::config::{ClusterSettings, ConfigError, Settings};

/// The resource and verb a join token's caller must hold, and a joining node's token too.
pub const JOIN_RIGHT: (&str, &str) = ("admin", "create");

/// This node's raft identity: its certificates (which name its raft id) and the cluster's CA.
pub struct Member {
    /// Its certificates for the raft port.
    pub tls: NodeTls,
    /// The CA, with which this member admits others.
    pub ca: ClusterCa,
}

/// This node's raft identity: as kept from an earlier start, else founded or joined now.
pub async fn member(s: &Settings, c: &ClusterSettings) -> anyhow::Result<Member> {
    let dir = &s.data_dir;
    if let Some(tls) = NodeTls::load(dir).context("reading this node's raft certificate")? {
        let ca = ClusterCa::load(dir)
            .context("reading the cluster's CA")?
            .ok_or_else(|| {
                ConfigError(format!(
                    "{}: the cluster CA's key is missing beside this node's certificate",
                    dir.join(PKI_DIR).display()
                ))
            })?;
        return Ok(Member { tls, ca });
    }
    match &c.join {
        None => found(dir),
        Some((address, token_file)) => join(s, c, address, token_file).await,
    }
}

/// A data dir that belongs to a cluster member cannot start as a single node: it would open
/// raft as node 1 with the cluster's membership.
pub fn refuse_member_dir(dir: &Path) -> Result<(), ConfigError> {
    match NodeTls::load(dir) {
        Ok(Some(tls)) => Err(ConfigError(format!(
            "{} belongs to raft node {} of a cluster: start runed with cluster.raft-listen (--raft-listen) as before",
            dir.display(),
            tls.node
        ))),
        Ok(None) => Ok(()),
        // A data dir that cannot be read is the log's to report (it names the data dir).
        Err(rune_log::pki::PkiError::Io { .. }) => Ok(()),
        Err(e) => Err(ConfigError(format!("{}: {e}", dir.join(PKI_DIR).display()))),
    }
}

/// A new cluster: its CA, and node 1's certificate.
fn found(dir: &Path) -> anyhow::Result<Member> {
    let ca = ClusterCa::generate().context("making the cluster's CA")?;
    let tls = ca
        .issue(rune_log::types::NODE_ID)
        .context("signing this node's raft certificate")?;
    ca.save(dir).context("keeping the cluster's CA")?;
    tls.save(dir).context("keeping this node's raft certificate")?;
    tracing::info!(
        node = tls.node,
        dir = %dir.join(PKI_DIR).display(),
        "made the cluster's CA and this node's raft certificate"
    );
    Ok(Member { tls, ca })
}

/// Asks the member at `address` for a grant with the token in `token_file`, and keeps it.
async fn join(s: &Settings, c: &ClusterSettings, address: &str, token_file: &Path) -> anyhow::Result<Member> {
    let dir = &s.data_dir;
    if dir.join(rune_log::LOG_DIR).exists() {
        return Err(ConfigError(format!(
            "cluster.join: {} already holds a raft log of its own; a node joins with an empty data dir (or start it without cluster.join, as the cluster it is)",
            dir.display()
        ))
        .into());
    }
    let at = format!("cluster.join-token-file {}", token_file.display());
    let text = std::fs::read_to_string(token_file).map_err(|e| ConfigError(format!("{at}: {e}")))?;
    let token = JoinToken::parse(&text).map_err(|e| ConfigError(format!("{at}: {e}")))?;
    crate::systemd::status(&format!("joining the cluster through {address}"));
    tracing::info!(member = %address, advertise = %c.advertise, "asking to join the cluster");
    let grant = match rune_log::join::request(address, &token, &c.advertise).await {
        Ok(g) => g,
        // Starting again will not change the answer: no restart loop.
        Err(e @ (JoinError::Refused { .. } | JoinError::Token(_))) => {
            return Err(ConfigError(format!("cluster.join: {e}")).into())
        }
        Err(e) => return Err(anyhow::Error::new(e).context("cluster.join")),
    };
    keep_kek(&s.kek_source, &grant.extra)?;
    let ca = grant.ca().context("the cluster's CA, as granted")?;
    ca.save(dir).context("keeping the cluster's CA")?;
    let tls = grant.tls();
    tls.save(dir).context("keeping this node's raft certificate")?;
    tracing::info!(node = tls.node, member = %address, "granted membership: joining as a learner");
    Ok(Member { tls, ca })
}

/// Keeps the cluster's KEK where this node's `crypto.kek` reads it: every member must open
/// the same sealed secrets. A KEK of this node's own that differs is refused, never replaced.
fn keep_kek(source: &KekSource, granted: &str) -> Result<(), ConfigError> {
    let kek = Kek::parse(granted).map_err(|e| ConfigError(format!("the KEK the cluster sent: {e}")))?;
    let differs = |what: String| {
        ConfigError(format!(
            "crypto.kek: {what} holds another KEK than the cluster's ({}); a member must use the cluster's",
            kek.id()
        ))
    };
    match source {
        KekSource::File { path, .. } => match std::fs::read_to_string(path) {
            Ok(text) => match Kek::parse(&text) {
                Ok(mine) if mine.id() == kek.id() => Ok(()),
                _ => Err(differs(format!("the file {}", path.display()))),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => rune_secrets::write_kek_file(path, &kek)
                .map_err(|e| ConfigError(format!("crypto.kek: keeping the cluster's KEK: {e}"))),
            Err(e) => Err(ConfigError(format!("crypto.kek: {}: {e}", path.display()))),
        },
        KekSource::Env { var } => match std::env::var(var).ok().map(|v| Kek::parse(&v)) {
            Some(Ok(mine)) if mine.id() == kek.id() => Ok(()),
            _ => Err(differs(format!("the variable {var}"))),
        },
        KekSource::Generated => Err(ConfigError(
            "crypto.kek.source generated gives each process a KEK of its own; a cluster member needs the cluster's: use a file (the default) or env".into(),
        )),
    }
}

/// Admits nodes that present a join token: an API token whose caller may still create on
/// `admin`. Hands them the KEK once the secrets are loaded (until then: unavailable).
pub struct JoinAdmission {
    log: Arc<rune_log::Log>,
    auth: crate::auth::Authenticator,
    secrets: OnceLock<Arc<crate::sealing::Secrets>>,
}

impl JoinAdmission {
    /// Checks join tokens against `log`'s state.
    pub fn new(log: Arc<rune_log::Log>) -> Self {
        Self {
            auth: crate::auth::Authenticator::new(log.clone()),
            log,
            secrets: OnceLock::new(),
        }
    }

    /// The KEKs, once loaded: from then on nodes are admitted.
    pub fn ready(&self, secrets: Arc<crate::sealing::Secrets>) {
        let _ = self.secrets.set(secrets);
    }
}

#[tonic::async_trait]
impl Admission for JoinAdmission {
    async fn admit(&self, secret: &str) -> Result<String, Status> {
        let caller = self.auth.resolve_join(secret)?;
        crate::auth::check(&caller, JOIN_RIGHT.0, JOIN_RIGHT.1, None)?;
        let secrets = self
            .secrets
            .get()
            .ok_or_else(|| Status::unavailable("this member is still starting"))?;
        let kek = secrets.kek_for_member()?;
        tracing::warn!(user = %caller.user, token = %caller.token_name, "admitting a node into the cluster");
        Ok(kek)
    }

    fn taken_ids(&self) -> Vec<u64> {
        use rune_statemachine::store::{get_record, nodes::HIGHEST_RAFT_ID_KEY};
        let highest = self.log.read().ok().and_then(|txn| {
            let t = txn.open_table(rune_statemachine::STATE_TABLE).ok()?;
            get_record::<u64, _>(&t, HIGHEST_RAFT_ID_KEY).ok().flatten()
        });
        highest.into_iter().collect()
    }
}

/// Forgets the node with raft id `raft_id` for placement (after `rune admin cluster remove`):
/// its instances go to the others and its name is free again.
pub async fn forget(log: &rune_log::Log, raft_id: u64) -> anyhow::Result<()> {
    for n in nodes(log)?.into_iter().filter(|n| n.raft_id == raft_id) {
        let p = log
            .propose(rune_statemachine::Command::ForgetNode { name: n.name.clone() })
            .await
            .context("forgetting the node")?;
        if let Err(r) = p.outcome {
            tracing::warn!(node = %n.name, error = %r, "the removed node's record stays");
        }
    }
    Ok(())
}

/// Registers this node for placement under its `--node-name` (again at every start: a node
/// that was found gone is ready once it is back) with its gateway's address. A name another
/// raft node holds is refused. A node its own state already knows by this name and id waits
/// for it only a little ([`REGISTER_WAIT`]): past that (no quorum within reach) it goes on in
/// the background, retried until a quorum takes it, so a member cut off from the others
/// still starts and serves.
pub async fn register(
    log: Arc<rune_log::Log>,
    name: &str,
    raft_id: u64,
    gateway: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let command = rune_statemachine::Command::RegisterNode {
        name: name.to_string(),
        raft_id,
        gateway: Some(gateway.to_string()),
    };
    let refused = |r: rune_statemachine::Rejection| ConfigError(format!("node.name: {r}"));
    let known = nodes(&log)?
        .into_iter()
        .find(|n| n.name == name && n.raft_id == raft_id);
    match known {
        Some(n) if n.ready && n.gateway.as_deref() == Some(gateway.to_string().as_str()) => Ok(()),
        Some(_) => {
            if let Ok(Ok(p)) = tokio::time::timeout(REGISTER_WAIT, log.propose(command.clone())).await {
                return p.outcome.map(|_| ()).map_err(|r| refused(r).into());
            }
            tracing::warn!(
                "no quorum within reach: starting from this node's own state, registering in the background"
            );
            tokio::spawn(async move {
                loop {
                    match log.propose(command.clone()).await {
                        Ok(p) => {
                            match p.outcome {
                                Ok(_) => tracing::info!("registered this node for placement again"),
                                Err(r) => {
                                    tracing::error!(reason = %r, "this node's registration was refused")
                                }
                            }
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot register this node yet; retrying");
                            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                        }
                    }
                }
            });
            Ok(())
        }
        None => {
            let p = log.propose(command).await.context("registering this node")?;
            p.outcome.map_err(refused)?;
            Ok(())
        }
    }
}

/// How long a node its state knows waits at start to register before it goes on without a
/// quorum: a follower that restarts hears its leader within a heartbeat, so this is ample.
pub const REGISTER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The address the other nodes dial for this node's gateway: the one it listens on, or, when
/// that is every interface, the host the other members know this node by (`raft-advertise`,
/// resolved once here) with the gateway's port.
pub async fn gateway_address(
    c: &crate::config::ClusterSettings,
    bound: std::net::SocketAddr,
) -> anyhow::Result<std::net::SocketAddr> {
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    let found = tokio::net::lookup_host(c.advertise.as_str())
        .await
        .with_context(|| {
            format!(
                "resolving cluster.raft-advertise ({}) for the gateway's address",
                c.advertise
            )
        })?
        .next();
    let ip = found.map(|a| a.ip()).ok_or_else(|| {
        ConfigError(format!(
            "cluster.raft-advertise: {} names no address; the other nodes could not reach this node's gateway",
            c.advertise
        ))
    })?;
    Ok(std::net::SocketAddr::new(ip, bound.port()))
}

/// The registered nodes, as the state holds them.
pub fn nodes(log: &rune_log::Log) -> anyhow::Result<Vec<rune_statemachine::store::nodes::NodeRecord>> {
    use rune_statemachine::store::{list_records, nodes::NODES_PREFIX};
    let txn = log.read()?;
    let t = txn.open_table(rune_statemachine::STATE_TABLE)?;
    Ok(list_records(&t, NODES_PREFIX)?)
}

/// On the leader, every second: a registered node that has not answered raft for `grace` (or
/// is no longer a member) is marked not ready, and apply places its instances on the others;
/// one that answers again is marked ready. A new leader gives every node `grace` from when it
/// took over: it has heard no one yet.
pub fn watch_nodes(log: Arc<rune_log::Log>, me: u64, grace: std::time::Duration) {
    tokio::spawn(async move {
        let mut leading_since: Option<std::time::Instant> = None;
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let st = log.cluster_status();
            if st.role == "shutdown" {
                return;
            }
            if st.leader != Some(me) {
                leading_since = None;
                continue;
            }
            let since = *leading_since.get_or_insert_with(std::time::Instant::now);
            // A join's promotion lives in the leader that admitted it: after a leader change,
            // learners that caught up are made voters here.
            for id in log.promote_learners().await {
                tracing::info!(node = id, "promoted a learner that had caught up");
            }
            let all = match nodes(&log) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the registered nodes");
                    continue;
                }
            };
            for n in all {
                let member = st.members.iter().any(|m| m.id == n.raft_id);
                let heard = log.last_contact(n.raft_id).map_or(since, |t| t.max(since));
                let silent = if n.raft_id == me {
                    std::time::Duration::ZERO
                } else {
                    heard.elapsed()
                };
                let ready = member && silent < grace;
                // Back only once it answers again, not merely inside the grace of a new leader.
                let back = member && log.last_contact(n.raft_id).is_some_and(|t| t.elapsed() < grace);
                let want = if n.ready { ready } else { back || n.raft_id == me };
                if want == n.ready {
                    continue;
                }
                tracing::warn!(node = %n.name, raft_id = n.raft_id, ready = want, silent_s = silent.as_secs(), "node readiness changed; placing its instances again");
                let cmd = rune_statemachine::Command::SetNodeReady {
                    name: n.name.clone(),
                    ready: want,
                };
                if let Err(e) = log.propose(cmd).await {
                    tracing::warn!(node = %n.name, error = %e, "cannot record the node's readiness");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_joining_node_keeps_the_clusters_kek_and_refuses_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        let source = KekSource::File {
            path: path.clone(),
            generate_if_missing: true,
        };
        let cluster = Kek::generate().unwrap();
        keep_kek(&source, &cluster.to_base64()).unwrap();
        let kept = Kek::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(kept.id(), cluster.id());
        // Again with the same KEK: nothing to do.
        keep_kek(&source, &cluster.to_base64()).unwrap();
        // Another cluster's KEK never replaces the file.
        let other = Kek::generate().unwrap();
        let e = keep_kek(&source, &other.to_base64()).unwrap_err().0;
        assert!(
            e.contains("another KEK") && e.contains(&path.display().to_string()),
            "{e}"
        );
        assert_eq!(
            Kek::parse(&std::fs::read_to_string(&path).unwrap()).unwrap().id(),
            cluster.id()
        );
        let e = keep_kek(&KekSource::Generated, &cluster.to_base64())
            .unwrap_err()
            .0;
        assert!(e.contains("generated"), "{e}");
        assert!(keep_kek(&source, "not base64").is_err());
    }
}
