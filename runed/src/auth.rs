//! Authentication and authorisation of every RPC.
//!
//! [`Authenticator`] runs before each handler: it turns the bearer token into a [`Caller`] (the
//! user and the rules of its policies) or answers `Unauthenticated`. Each handler then calls
//! [`authorize`] with the resource, verb and the namespace the request acts on, so that a
//! namespace-scoped policy is checked against the namespace actually touched, creates included.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rune_log::Log;
use rune_statemachine::identity::{allows, PolicyRecord, PolicyRule, TokenRecord, UserRecord};
use rune_statemachine::store::{get_record, policy_key, token_hash_key, token_key, user_key};
use rune_statemachine::STATE_TABLE;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// Who is calling, resolved from the token at the start of the request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// User name.
    pub user: String,
    /// Token id.
    pub token_id: String,
    /// Token name.
    pub token_name: String,
    /// Effective policy names.
    pub policies: Vec<String>,
    /// Their rules.
    pub rules: Vec<PolicyRule>,
    /// Token expiry, if any.
    pub expires_at_ms: Option<i64>,
}

/// Hex SHA-256 of a token secret: the only form in which tokens are stored.
pub fn token_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Tokens resolved since users, policies or tokens last changed ([`Log::identity_epoch`]):
/// every request carries a token, and reading and decoding its token, user and policies from
/// the state each time cost more than the rest of a small write's checks.
#[derive(Default)]
struct Resolved {
    epoch: u64,
    /// By token hash; only tokens that resolved (a stream of bad tokens cannot grow it).
    callers: HashMap<String, Arc<Caller>>,
}

/// Tokens kept in [`Resolved`] at most; past it the map starts over.
const RESOLVED_MAX: usize = 4096;

/// The interceptor in front of every authenticated service.
#[derive(Clone)]
pub struct Authenticator {
    log: Arc<Log>,
    resolved: Arc<Mutex<Resolved>>,
}

impl Authenticator {
    /// An authenticator reading tokens from the applied state.
    pub fn new(log: Arc<Log>) -> Self {
        Self {
            log,
            resolved: Arc::default(),
        }
    }

    fn resolved(&self) -> std::sync::MutexGuard<'_, Resolved> {
        // A map of finished values: a panic elsewhere cannot leave it half-changed.
        self.resolved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn resolve(&self, secret: &str) -> Result<Arc<Caller>, Status> {
        let hash = token_hash(secret);
        // Read before the state: a change applied after this read bumps it, so what is
        // resolved below from an older state is never kept under a newer epoch.
        let epoch = self.log.identity_epoch();
        let cached = {
            let r = self.resolved();
            (r.epoch == epoch)
                .then(|| r.callers.get(&hash).cloned())
                .flatten()
        };
        let caller = match cached {
            Some(c) => c,
            None => {
                let c = Arc::new(self.resolve_from_state(&hash, None)?);
                let mut r = self.resolved();
                // A resolution from an older epoch than the map's is used once, not kept.
                if epoch >= r.epoch {
                    if r.epoch != epoch || r.callers.len() >= RESOLVED_MAX {
                        r.callers.clear();
                        r.epoch = epoch;
                    }
                    r.callers.insert(hash, c.clone());
                }
                c
            }
        };
        // Expiry moves with the clock, not with the log: checked on every request.
        if caller.expires_at_ms.is_some_and(|e| now_ms() >= e) {
            return Err(Status::unauthenticated(format!(
                "token {} has expired",
                caller.token_name
            )));
        }
        Ok(caller)
    }

    /// The caller a join token's secret stands for (`rune admin cluster join-token`): only a
    /// token made for joining, which the API itself refuses.
    pub fn resolve_join(&self, secret: &str) -> Result<Caller, Status> {
        self.resolve_from_state(
            &token_hash(secret),
            Some(rune_statemachine::identity::JOIN_PURPOSE),
        )
    }

    /// The caller of the token with this hash, if its purpose is `purpose` (`None`: an API
    /// token).
    fn resolve_from_state(&self, hash: &str, purpose: Option<&str>) -> Result<Caller, Status> {
        let internal = |e: &dyn std::fmt::Display| Status::internal(e.to_string());
        let txn = self.log.read().map_err(|e| internal(&e))?;
        let t = txn.open_table(STATE_TABLE).map_err(|e| internal(&e))?;
        let invalid = || Status::unauthenticated("invalid bearer token");
        let id: String = get_record(&t, &token_hash_key(hash))
            .map_err(|e| internal(&e))?
            .ok_or_else(invalid)?;
        let tok: TokenRecord = get_record(&t, &token_key(&id))
            .map_err(|e| internal(&e))?
            .ok_or_else(invalid)?;
        if tok.purpose.as_deref() != purpose {
            return Err(Status::unauthenticated(match &tok.purpose {
                Some(p) => format!("token {} is for {p} only, not for the API", tok.name),
                None => format!("token {} is an API token, not a join token", tok.name),
            }));
        }
        if tok.revoked_at_ms.is_some() {
            return Err(Status::unauthenticated(format!("token {} is revoked", tok.name)));
        }
        if !tok.live_at(now_ms()) {
            return Err(Status::unauthenticated(format!("token {} has expired", tok.name)));
        }
        let user: UserRecord = get_record(&t, &user_key(&tok.subject))
            .map_err(|e| internal(&e))?
            .ok_or_else(|| {
                Status::unauthenticated(format!("the user of token {} no longer exists", tok.name))
            })?;
        let policies: Vec<String> = if tok.policies.is_empty() {
            user.policies.clone()
        } else {
            // A token narrows its user; it never widens it, even after a detach.
            tok.policies
                .iter()
                .filter(|p| user.policies.contains(p))
                .cloned()
                .collect()
        };
        let mut rules = Vec::new();
        for p in &policies {
            if let Some(rec) = get_record::<PolicyRecord, _>(&t, &policy_key(p)).map_err(|e| internal(&e))? {
                rules.extend(rec.spec.rules);
            }
        }
        Ok(Caller {
            user: user.name,
            token_id: tok.id,
            token_name: tok.name,
            policies,
            rules,
            expires_at_ms: tok.expires_at_ms,
        })
    }
}

/// How a request reached runed over the local admin socket: the peer's uid (from the
/// kernel's peer credentials), or `None` when it came over TCP.
fn socket_peer<T>(req: &Request<T>) -> Option<Option<u32>> {
    req.extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .map(|i| i.peer_cred.map(|c| c.uid()))
}

/// Whether the request came over the local admin socket from root or from runed's own user:
/// the same trust as reading runed's data dir, so it needs no token.
pub fn local_root<T>(req: &Request<T>) -> bool {
    let me = crate::config::current_uid();
    matches!(socket_peer(req), Some(Some(uid)) if uid == 0 || uid == me)
}

impl Caller {
    /// Root on this host, over the admin socket without a token: the recovery path when no
    /// token is left, or when gRPC listens on a private interface only.
    fn local_root() -> Self {
        static RULES: std::sync::OnceLock<Vec<PolicyRule>> = std::sync::OnceLock::new();
        let rules = RULES.get_or_init(|| {
            rune_statemachine::identity::builtin_policies()
                .into_iter()
                .find(|p| p.name == "root")
                .map(|p| p.rules)
                .unwrap_or_default()
        });
        Self {
            user: "root".into(),
            token_id: String::new(),
            token_name: "local admin socket".into(),
            policies: vec!["root".into()],
            rules: rules.clone(),
            expires_at_ms: None,
        }
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if socket_peer(&req).is_some() && !local_root(&req) {
            return Err(Status::permission_denied(
                "the admin socket serves root (and runed's own user) only",
            ));
        }
        let Some(header) = req.metadata().get("authorization") else {
            if local_root(&req) {
                req.extensions_mut().insert(Arc::new(Caller::local_root()));
                return Ok(req);
            }
            return Err(Status::unauthenticated("missing bearer token"));
        };
        let text = header
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
        let secret = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("the authorization header is not `Bearer <token>`"))?
            .trim();
        let caller = self.resolve(secret)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// Whether the token behind a stream still stands: not revoked, not expired, its user there.
fn token_stands(log: &Log, id: &str) -> Result<(), String> {
    let txn = log.read().map_err(|e| format!("cannot check the token: {e}"))?;
    let t = txn
        .open_table(STATE_TABLE)
        .map_err(|e| format!("cannot check the token: {e}"))?;
    let tok: TokenRecord = get_record(&t, &token_key(id))
        .map_err(|e| format!("cannot check the token: {e}"))?
        .ok_or_else(|| "the token no longer exists".to_string())?;
    if tok.revoked_at_ms.is_some() {
        return Err(format!("token {} was revoked", tok.name));
    }
    if !tok.live_at(now_ms()) {
        return Err(format!("token {} has expired", tok.name));
    }
    match get_record::<UserRecord, _>(&t, &user_key(&tok.subject)) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!("the user of token {} no longer exists", tok.name)),
        Err(e) => Err(format!("cannot check the token: {e}")),
    }
}

/// Resolves with why once the token `id` stops standing: at its expiry, or at the applied
/// entry that revokes it or deletes its user.
async fn token_ends(log: Arc<Log>, id: String, expires_at_ms: Option<i64>) -> String {
    use tokio::sync::broadcast::error::RecvError;
    let mut rx = log.subscribe();
    if let Err(why) = token_stands(&log, &id) {
        return why;
    }
    let until = |at_ms: i64| {
        let wait = u64::try_from(at_ms.saturating_sub(now_ms())).unwrap_or(0);
        tokio::time::Instant::now() + std::time::Duration::from_millis(wait)
    };
    // Far enough to never fire when the token has no expiry.
    let never = tokio::time::Instant::now() + std::time::Duration::from_secs(100 * 365 * 86_400);
    let expiry = tokio::time::sleep_until(expires_at_ms.map_or(never, until));
    tokio::pin!(expiry);
    loop {
        let recheck = tokio::select! {
            () = &mut expiry => {
                // The wall clock may lag the timer (a step back, a resumed VM): look again soon.
                expiry.as_mut().reset(tokio::time::Instant::now() + std::time::Duration::from_secs(1));
                true
            }
            e = rx.recv() => match e {
                Ok(entry) => entry.changes.iter().any(|c| {
                    matches!(c.kind, rune_statemachine::Kind::Token | rune_statemachine::Kind::User)
                }),
                Err(RecvError::Lagged(_)) => true,
                // The log is closing: runed is stopping and ends every stream anyway.
                Err(RecvError::Closed) => return std::future::pending().await,
            },
        };
        if recheck {
            if let Err(why) = token_stands(&log, &id) {
                return why;
            }
        }
    }
}

/// Aborts the tasks it holds when dropped.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

/// Ends a server stream (watch, logs, exec, port-forward) with UNAUTHENTICATED once the token
/// that opened it is revoked or expires, so a revoked token holds no door open. `tied` are the
/// tasks that serve the stream (reading the client's side of a bidirectional stream, reading a
/// backend): they are aborted whenever the stream ends, for that or any other reason, including
/// the client going away. Streams opened by local root on the admin socket have no token.
pub fn until_token_ends<T: Send + 'static>(
    log: Arc<Log>,
    caller: &Caller,
    inner: crate::api::Stream_<T>,
    tied: Vec<tokio::task::AbortHandle>,
) -> crate::api::Stream_<T> {
    use futures::StreamExt;
    let (token, expires) = (caller.token_id.clone(), caller.expires_at_ms);
    let end = async move {
        if token.is_empty() {
            std::future::pending().await
        } else {
            token_ends(log, token, expires).await
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let _tied = AbortOnDrop(tied);
        let mut inner = inner;
        tokio::pin!(end);
        loop {
            tokio::select! {
                why = &mut end => {
                    let _ = tx.send(Err(Status::unauthenticated(format!("{why}: the stream is closed")))).await;
                    return;
                }
                item = inner.next() => match item {
                    Some(item) => if tx.send(item).await.is_err() { return },
                    None => return,
                },
                // The client went away: drop the stream, and with it what feeds it.
                () = tx.closed() => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The caller the interceptor resolved, for handlers that check several resources themselves.
pub fn caller<T>(req: &Request<T>) -> Result<Arc<Caller>, Status> {
    req.extensions()
        .get::<Arc<Caller>>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing bearer token"))
}

/// The caller, once authorised for `verb` on `resource` in `namespace` (`None`: cluster-wide).
pub fn authorize<T>(
    req: &Request<T>,
    resource: &str,
    verb: &str,
    namespace: Option<&str>,
) -> Result<Arc<Caller>, Status> {
    let caller = caller(req)?;
    check(&caller, resource, verb, namespace)?;
    Ok(caller)
}

/// Whether an already resolved caller may do this; the error names resource, verb and namespace.
pub fn check(caller: &Caller, resource: &str, verb: &str, namespace: Option<&str>) -> Result<(), Status> {
    if allows(&caller.rules, resource, verb, namespace) {
        return Ok(());
    }
    Err(denied(caller, &format!("{verb} {resource}"), namespace))
}

/// The denial of `action` (`verb resource`) in `namespace` (cluster-wide when `None`), naming
/// the caller's policies.
pub fn denied(caller: &Caller, action: &str, namespace: Option<&str>) -> Status {
    let place = match namespace {
        Some(ns) => format!("in namespace {ns}"),
        None => "cluster-wide".to_string(),
    };
    Status::permission_denied(format!(
        "user {} may not {action} {place} (policies: {})",
        caller.user,
        if caller.policies.is_empty() {
            "none".to_string()
        } else {
            caller.policies.join(", ")
        }
    ))
}

/// Admin RPCs answer only loopback clients and root on the admin socket, unless
/// `auth.allow-remote-admin` is set.
pub fn admin_gate<T>(req: &Request<T>, allow_remote: bool) -> Result<(), Status> {
    let local = local_root(req)
        || req
            .remote_addr()
            .is_some_and(|a: SocketAddr| a.ip().is_loopback());
    if local || allow_remote {
        Ok(())
    } else {
        Err(Status::permission_denied(
            "admin operations are allowed only from a loopback client or root on the admin socket (/run/rune/admin.sock) unless auth.allow-remote-admin is true",
        ))
    }
}
