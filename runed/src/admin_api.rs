//! Identity administration: bootstrap, whoami, users, policies and tokens.
//!
//! Token secrets are made here, shown once in the reply, and only their SHA-256 goes to the log.
//! Every admin RPC answers loopback clients only, unless `auth.allow-remote-admin`.

use rune_proto::v1 as pb;
use rune_statemachine::identity::{PolicyRecord, PolicySpec, TokenRecord, UserRecord};
use rune_statemachine::store::{get_record, list_records, policy_key, token_key};
use rune_statemachine::{Command, STATE_TABLE};
use tonic::{Request, Response, Status};

use crate::api::Api;
use crate::auth::{admin_gate, authorize, now_ms, token_hash};
use crate::grpc::{internal, not_proposed, rejection};

/// Longest a backup waits for its client to take the next chunk.
const BACKUP_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// A new token secret: `rune_` and 32 random bytes in hex, recognisable by secret scanners.
fn new_secret() -> Result<String, Status> {
    Ok(format!("rune_{}", hex::encode(random(32)?)))
}

fn new_id() -> Result<String, Status> {
    Ok(hex::encode(random(8)?))
}

fn random(n: usize) -> Result<Vec<u8>, Status> {
    rune_secrets::random_bytes(n).map_err(|e| Status::unavailable(e.to_string()))
}

fn user_pb(u: &UserRecord) -> pb::User {
    pb::User {
        name: u.name.clone(),
        email: u.email.clone().unwrap_or_default(),
        policies: u.policies.clone(),
        created_at_ms: u.meta.created_at_ms,
    }
}

fn policy_pb(p: &PolicyRecord) -> pb::Policy {
    pb::Policy {
        name: p.spec.name.clone(),
        spec_json: serde_json::to_string(&p.spec).unwrap_or_default(),
        builtin: p.builtin,
    }
}

fn token_pb(t: &TokenRecord) -> pb::Token {
    pb::Token {
        id: t.id.clone(),
        name: t.name.clone(),
        subject: t.subject.clone(),
        policies: t.policies.clone(),
        issued_at_ms: t.issued_at_ms,
        expires_at_ms: t.expires_at_ms.unwrap_or(0),
        revoked_at_ms: t.revoked_at_ms.unwrap_or(0),
        description: t.description.clone(),
    }
}

impl Api {
    async fn propose_identity(&self, cmd: Command) -> Result<u64, Status> {
        let p = self.log.propose(cmd).await.map_err(not_proposed)?;
        p.outcome.map_err(rejection)?;
        Ok(p.index)
    }

    fn read_one<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, Status> {
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        get_record(&t, key).map_err(internal)
    }

    fn read_page<T: serde::de::DeserializeOwned>(
        &self,
        list: &'static str,
        prefix: &str,
        req: &pb::ListRequest,
    ) -> Result<(Vec<T>, String), Status> {
        let q = crate::paging::PageQuery::new(list, prefix, req.limit, &req.continue_token)?;
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        q.read(&t, |_: &T| true)
    }

    fn read_all<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, Status> {
        let txn = self.log.read().map_err(internal)?;
        let t = txn.open_table(STATE_TABLE).map_err(internal)?;
        list_records(&t, prefix).map_err(internal)
    }

    fn gate<T>(
        &self,
        req: &Request<T>,
        resource: &str,
        verb: &str,
    ) -> Result<std::sync::Arc<crate::auth::Caller>, Status> {
        admin_gate(req, self.allow_remote_admin)?;
        authorize(req, resource, verb, None)
    }

    /// Nobody grants more than they hold: every rule of every policy given away must be one the
    /// caller could exercise itself (Kubernetes' escalation rule), else managing users, tokens
    /// or policies would be a way to become root.
    fn may_grant(&self, caller: &crate::auth::Caller, policies: &[String]) -> Result<(), Status> {
        for name in policies {
            let Some(p) = self.read_one::<PolicyRecord>(&policy_key(name))? else {
                return Err(Status::not_found(format!("policy {name} not found")));
            };
            may_grant_rules(caller, &p.spec.rules, name)?;
        }
        Ok(())
    }
}

fn may_grant_rules(
    caller: &crate::auth::Caller,
    rules: &[rune_statemachine::identity::PolicyRule],
    what: &str,
) -> Result<(), Status> {
    for r in rules {
        let ns = (r.namespace != "*").then_some(r.namespace.as_str());
        for v in &r.verbs {
            if !rune_statemachine::identity::allows(&caller.rules, &r.resource, v, ns) {
                return Err(Status::permission_denied(format!(
                    "user {} cannot grant {what}: it allows {v} on {} in {}, which {} may not do itself",
                    caller.user,
                    r.resource,
                    ns.map_or("every namespace".to_string(), |n| format!("namespace {n}")),
                    caller.user
                )));
            }
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::bootstrap_api_server::BootstrapApi for Api {
    async fn bootstrap(
        &self,
        req: Request<pb::BootstrapRequest>,
    ) -> Result<Response<pb::BootstrapResponse>, Status> {
        // The first root token needs no credential: with an admin socket, only root on this
        // host (over the socket, peer credentials checked) may ask, not any local user.
        if self.admin_socket && !crate::auth::local_root(&req) {
            return Err(Status::permission_denied(
                "bootstrap mints the first root token: run `rune admin bootstrap` as root on runed's host, which uses the admin socket",
            ));
        }
        admin_gate(&req, self.allow_remote_admin)?;
        let secret = new_secret()?;
        let token = TokenRecord {
            id: new_id()?,
            name: format!("bootstrap-{}", now_ms()),
            subject: "root".into(),
            description: "minted by rune admin bootstrap".into(),
            policies: vec![],
            issued_at_ms: now_ms(),
            expires_at_ms: None,
            revoked_at_ms: None,
            secret_hash: token_hash(&secret),
            purpose: None,
        };
        let id = token.id.clone();
        // Apply refuses while any live token exists, deciding in log order: two racing
        // bootstraps cannot both win.
        self.propose_identity(Command::CreateToken {
            token,
            create_user: false,
            bootstrap: true,
        })
        .await?;
        tracing::warn!(token_id = %id, "bootstrap token minted for user root");
        Ok(Response::new(pb::BootstrapResponse {
            token: secret,
            token_id: id,
            user: "root".into(),
        }))
    }
}

#[tonic::async_trait]
impl pb::admin_api_server::AdminApi for Api {
    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let c = crate::auth::caller(&req)?;
        Ok(Response::new(pb::WhoAmIResponse {
            user: c.user.clone(),
            token_id: c.token_id.clone(),
            token_name: c.token_name.clone(),
            policies: c.policies.clone(),
            expires_at_ms: c.expires_at_ms.unwrap_or(0),
        }))
    }

    async fn create_user(&self, req: Request<pb::CreateUserRequest>) -> Result<Response<pb::User>, Status> {
        let caller = self.gate(&req, "users", "create")?;
        let r = req.into_inner();
        let policies = if r.policies.is_empty() {
            vec!["readonly".to_string()]
        } else {
            r.policies
        };
        self.may_grant(&caller, &policies)?;
        self.propose_identity(Command::PutUser {
            name: r.name.clone(),
            email: (!r.email.is_empty()).then_some(r.email),
            policies,
            create: true,
        })
        .await?;
        let u: UserRecord = self
            .read_one(&rune_statemachine::store::user_key(&r.name))?
            .ok_or_else(|| Status::internal("user vanished"))?;
        Ok(Response::new(user_pb(&u)))
    }

    async fn list_users(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        self.gate(&req, "users", "list")?;
        let (users, continue_token) = self.read_page::<UserRecord>("users", "users/", req.get_ref())?;
        Ok(Response::new(pb::ListUsersResponse {
            users: users.iter().map(user_pb).collect(),
            continue_token,
        }))
    }

    async fn delete_user(
        &self,
        req: Request<pb::NameRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let c = self.gate(&req, "users", "delete")?;
        let name = req.into_inner().name;
        if name == c.user {
            return Err(Status::failed_precondition(format!(
                "user {name} is the caller: deleting it would revoke the token in use; use another admin"
            )));
        }
        let index = self.propose_identity(Command::DeleteUser { name }).await?;
        Ok(Response::new(pb::ChangeResponse { index }))
    }

    async fn put_policy(&self, req: Request<pb::PutPolicyRequest>) -> Result<Response<pb::Policy>, Status> {
        let caller = self.gate(&req, "policies", "create")?;
        let value: serde_json::Value = serde_json::from_str(&req.get_ref().spec_json)
            .map_err(|e| Status::invalid_argument(format!("policy is not JSON: {e}")))?;
        let spec: PolicySpec = rune_statemachine::decode::decode(&value).map_err(|errs| {
            let list: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            Status::invalid_argument(format!("policy: {}", list.join("; ")))
        })?;
        let spec = rune_statemachine::identity::normalize_policy(spec).map_err(|errs| {
            let list: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            Status::invalid_argument(format!("policy: {}", list.join("; ")))
        })?;
        let name = spec.name.clone();
        // Changing a policy changes what its users may do: the caller must hold all of it.
        may_grant_rules(&caller, &spec.rules, &format!("policy {name}"))?;
        if self.read_one::<PolicyRecord>(&policy_key(&name))?.is_some() {
            crate::auth::check(&caller, "policies", "update", None)?;
        }
        self.propose_identity(Command::PutPolicy { spec }).await?;
        let p: PolicyRecord = self
            .read_one(&policy_key(&name))?
            .ok_or_else(|| Status::internal("policy vanished"))?;
        Ok(Response::new(policy_pb(&p)))
    }

    async fn get_policy(&self, req: Request<pb::NameRequest>) -> Result<Response<pb::Policy>, Status> {
        self.gate(&req, "policies", "get")?;
        let name = req.into_inner().name;
        let p: PolicyRecord = self
            .read_one(&policy_key(&name))?
            .ok_or_else(|| Status::not_found(format!("policy {name} not found")))?;
        Ok(Response::new(policy_pb(&p)))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.gate(&req, "policies", "list")?;
        let (ps, continue_token) = self.read_page::<PolicyRecord>("policies", "policies/", req.get_ref())?;
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: ps.iter().map(policy_pb).collect(),
            continue_token,
        }))
    }

    async fn delete_policy(
        &self,
        req: Request<pb::NameRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        self.gate(&req, "policies", "delete")?;
        let name = req.into_inner().name;
        let index = self.propose_identity(Command::DeletePolicy { name }).await?;
        Ok(Response::new(pb::ChangeResponse { index }))
    }

    async fn attach_policy(
        &self,
        req: Request<pb::AttachPolicyRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let caller = self.gate(&req, "users", "update")?;
        let r = req.into_inner();
        if r.attach {
            self.may_grant(&caller, std::slice::from_ref(&r.policy))?;
        }
        self.propose_identity(Command::SetUserPolicy {
            user: r.user.clone(),
            policy: r.policy,
            attach: r.attach,
        })
        .await?;
        let u: UserRecord = self
            .read_one(&rune_statemachine::store::user_key(&r.user))?
            .ok_or_else(|| Status::internal("user vanished"))?;
        Ok(Response::new(user_pb(&u)))
    }

    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let caller = self.gate(&req, "tokens", "create")?;
        let mut r = req.into_inner();
        let subject = self.read_one::<UserRecord>(&rune_statemachine::store::user_key(&r.subject))?;
        if r.subject != caller.user {
            // A token for someone else is acting as them: that takes managing users, and a
            // new subject is a new user.
            let verb = if subject.is_some() { "update" } else { "create" };
            crate::auth::check(&caller, "users", verb, None)?;
        } else if r.policies.is_empty() && subject.as_ref().is_some_and(|u| u.policies != caller.policies) {
            // A narrowed token's token for its own user is narrowed as much: "all of the
            // user's policies" would give it what its maker was not given.
            r.policies = caller.policies.clone();
        }
        // What the token will be able to do: its own policies, else all of its user's. Nobody
        // grants more than they hold, not even to their own user (a narrowed token); a token
        // for oneself with all of one's own policies grants nothing new.
        let granted = match (&subject, r.policies.is_empty()) {
            (_, false) => r.policies.clone(),
            (Some(_), true) if r.subject == caller.user => Vec::new(),
            (Some(u), true) => u.policies.clone(),
            (None, true) => vec!["readonly".to_string()],
        };
        self.may_grant(&caller, &granted)?;
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name: is required"));
        }
        if r.subject.is_empty() {
            return Err(Status::invalid_argument("subject: is required (--subject-name)"));
        }
        if r.ttl_seconds < 0 {
            return Err(Status::invalid_argument("ttl: must not be negative"));
        }
        let secret = new_secret()?;
        let now = now_ms();
        let token = TokenRecord {
            id: new_id()?,
            name: r.name,
            subject: r.subject,
            description: r.description,
            policies: r.policies,
            issued_at_ms: now,
            expires_at_ms: (r.ttl_seconds > 0)
                .then(|| now.saturating_add(r.ttl_seconds.saturating_mul(1000))),
            revoked_at_ms: None,
            secret_hash: token_hash(&secret),
            purpose: None,
        };
        self.propose_identity(Command::CreateToken {
            token: token.clone(),
            create_user: true,
            bootstrap: false,
        })
        .await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(token_pb(&token)),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.gate(&req, "tokens", "list")?;
        let (ts, continue_token) = self.read_page::<TokenRecord>("tokens", "tokens/", req.get_ref())?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: ts.iter().map(token_pb).collect(),
            continue_token,
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        self.gate(&req, "tokens", "delete")?;
        let want = req.into_inner().id;
        let id = if self.read_one::<TokenRecord>(&token_key(&want))?.is_some() {
            want
        } else {
            let ts: Vec<TokenRecord> = self.read_all("tokens/")?;
            let named: Vec<&TokenRecord> = ts.iter().filter(|t| t.name == want).collect();
            match named.as_slice() {
                [one] => one.id.clone(),
                [] => return Err(Status::not_found(format!("token {want} not found"))),
                _ => {
                    return Err(Status::failed_precondition(format!(
                        "{} tokens are named {want}; revoke by id",
                        named.len()
                    )))
                }
            }
        };
        let index = self.propose_identity(Command::RevokeToken { id }).await?;
        Ok(Response::new(pb::ChangeResponse { index }))
    }

    async fn rotate_kek(
        &self,
        req: Request<pb::RotateKekRequest>,
    ) -> Result<Response<pb::RotateKekResponse>, Status> {
        crate::secrets_api::rotate_kek(self, req).await.map(Response::new)
    }

    type BackupStream = crate::api::Stream_<pb::BackupChunk>;

    /// The state at one applied index, read in one transaction on a blocking thread and
    /// streamed as it is read (bounded: a slow client slows the read, not runed's memory).
    /// Admin-gated, needs `get` on `admin`: the backup holds every object (secrets sealed).
    async fn backup(&self, req: Request<pb::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        self.gate(&req, "admin", "get")?;
        // Not in the middle of a KEK rotation, whose re-wraps span several entries: a backup
        // holding secrets under two KEKs could not be restored with either. The read
        // transaction is a snapshot once open, so the guard is held only while it opens.
        let source = {
            let _no_rotation = self.secrets.cast_guard().await;
            if self.secrets.rotation_unfinished() {
                return Err(Status::failed_precondition(
                    "a KEK rotation is unfinished (secrets are sealed under two KEKs): run rotate-kek to the new KEK first, then back up",
                ));
            }
            self.log.backup().map_err(internal)?
        };
        let h = source.header().clone();
        tracing::info!(index = h.index, records = h.records, "backup started");
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::BackupChunk, Status>>(4);
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("rune-backup".into())
            .spawn(move || {
                let mut first = true;
                let sent = source.write_chunks(256 << 10, |data| {
                    let mut chunk = pb::BackupChunk {
                        data,
                        ..Default::default()
                    };
                    if std::mem::take(&mut first) {
                        (chunk.index, chunk.records, chunk.total_bytes) = (h.index, h.records, h.bytes);
                    }
                    // A client that stops reading does not hold the read transaction (and so
                    // redb's old pages) forever.
                    // The timer is made inside the runtime, whose clock it needs.
                    let sent =
                        rt.block_on(async { tokio::time::timeout(BACKUP_STALL, tx.send(Ok(chunk))).await });
                    match sent {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(_)) => Err("the client went away".to_string()),
                        Err(_) => Err(format!("the client read nothing for {BACKUP_STALL:?}")),
                    }
                });
                match sent {
                    Ok(()) => tracing::info!(index = h.index, "backup sent"),
                    Err(e) => {
                        tracing::warn!(error = %e, index = h.index, "backup not completed");
                        let _ = tx.blocking_send(Err(Status::internal(e.to_string())));
                    }
                }
            })
            .map_err(internal)?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    /// Needs `get` on `admin`, as the backup: members' addresses are the cluster's layout.
    async fn cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.gate(&req, "admin", "get")?;
        let mut status = self.cluster_status_pb()?;
        let views: std::collections::HashMap<u64, Result<rune_log::MemberView, String>> =
            self.log.member_views().await.into_iter().collect();
        for m in &mut status.members {
            match views.get(&m.id) {
                Some(Ok(v)) => {
                    m.role = v.role.clone();
                    m.term = v.term;
                    m.leader_id = v.leader;
                    m.last_index = v.last_index;
                    m.applied_index = v.applied;
                }
                Some(Err(e)) => m.error = e.clone(),
                None => {}
            }
        }
        Ok(Response::new(status))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let (resource, verb) = crate::cluster::JOIN_RIGHT;
        let caller = self.gate(&req, resource, verb)?;
        let ca_pem = self.cluster_ca.clone().ok_or_else(|| {
            Status::failed_precondition(
                "this runed serves no raft port: start it with --raft-listen (cluster.raft-listen) to form a cluster",
            )
        })?;
        let ttl_seconds = match req.get_ref().ttl_seconds {
            0 => JOIN_TOKEN_TTL_SECONDS,
            n if n < 0 => return Err(Status::invalid_argument("ttl: must not be negative")),
            n => n,
        };
        let secret = new_secret()?;
        let now = now_ms();
        let id = new_id()?;
        let token = TokenRecord {
            name: format!("join-{id}"),
            id,
            subject: caller.user.clone(),
            description: "rune admin cluster join-token: lets a node join the cluster".into(),
            policies: vec![],
            issued_at_ms: now,
            expires_at_ms: Some(now.saturating_add(ttl_seconds.saturating_mul(1000))),
            revoked_at_ms: None,
            secret_hash: token_hash(&secret),
            purpose: Some(rune_statemachine::identity::JOIN_PURPOSE.into()),
        };
        self.propose_identity(Command::CreateToken {
            token: token.clone(),
            create_user: false,
            bootstrap: false,
        })
        .await?;
        let join_token = rune_log::join::JoinToken { ca_pem, secret }
            .encode()
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::warn!(user = %caller.user, token_id = %token.id, ttl_seconds, "join token minted");
        Ok(Response::new(pb::CreateJoinTokenResponse {
            join_token,
            token_id: token.id,
            expires_at_ms: token.expires_at_ms,
            members: self
                .log
                .cluster_status()
                .members
                .into_iter()
                .filter(|m| m.voter)
                .map(|m| m.address)
                .collect(),
        }))
    }

    async fn remove_cluster_member(
        &self,
        req: Request<pb::RemoveClusterMemberRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let caller = self.gate(&req, "admin", "delete")?;
        let node = req.get_ref().node_id;
        self.log.remove_member(node).await.map_err(|e| match e {
            rune_log::LogError::Membership(why) if why.ends_with("is not a member") => Status::not_found(why),
            rune_log::LogError::Membership(why) => Status::failed_precondition(why),
            other => Status::unavailable(other.to_string()),
        })?;
        // Its instances go elsewhere now rather than after the grace period.
        crate::cluster::forget(&self.log, node)
            .await
            .map_err(|e| Status::unavailable(format!("node {node} is out of the cluster, but {e:#}")))?;
        tracing::warn!(user = %caller.user, node, "removed a node from the cluster");
        Ok(Response::new(self.cluster_status_pb()?))
    }
}

/// How long a join token admits nodes unless asked otherwise: a day, as kubeadm's.
const JOIN_TOKEN_TTL_SECONDS: i64 = 24 * 3600;

impl Api {
    fn cluster_status_pb(&self) -> Result<pb::ClusterStatusResponse, Status> {
        let s = self.log.cluster_status();
        let cluster_id = {
            let txn = self.log.read().map_err(internal)?;
            let t = txn.open_table(STATE_TABLE).map_err(internal)?;
            rune_statemachine::store::cluster_id(&t)
                .map_err(internal)?
                .unwrap_or_default()
        };
        Ok(pb::ClusterStatusResponse {
            cluster_id,
            node_id: s.node,
            role: s.role.into(),
            term: s.term,
            leader_id: s.leader,
            last_index: s.last_index,
            committed_index: s.committed,
            applied_index: s.applied,
            snapshot_index: s.snapshot,
            purged_index: s.purged,
            millis_since_quorum_ack: s.millis_since_quorum_ack,
            members: s
                .members
                .into_iter()
                .map(|m| pb::ClusterMember {
                    id: m.id,
                    address: m.address,
                    voter: m.voter,
                    matched_index: m.matched,
                    ..Default::default()
                })
                .collect(),
        })
    }
}
