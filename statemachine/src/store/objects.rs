//! Apply for secrets, configmaps, users, policies and tokens.
//!
//! Keys: `secrets/<ns>/<name>`, `history/secrets/<ns>/<name>/<version>`, `configmaps/<ns>/<name>`,
//! `history/configmaps/<ns>/<name>/<version>`,
//! `users/<name>`, `policies/<name>`, `tokens/<id>` and `token-hashes/<sha256>` → id, the index
//! that makes authenticating a request one lookup.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::{
    change, history_key_for, invalid, new_meta, prune_history, spec_hash, ObjectMeta, Overlay, StoreError,
};
use crate::command::{Action, Change, Kind, Rejection, Rewrap};
use crate::identity::{is_builtin, normalize_policy, PolicyRecord, PolicySpec, TokenRecord, UserRecord};
use crate::secret::{validate_configmap, validate_sealed, Configmap, SealedSecret};

/// A stored secret: its newest version, sealed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// The newest version.
    pub sealed: SealedSecret,
    /// Bookkeeping; `generation` is the version.
    pub meta: ObjectMeta,
}

/// A stored configmap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigmapRecord {
    /// The data.
    pub configmap: Configmap,
    /// Bookkeeping; `generation` is the version.
    pub meta: ObjectMeta,
}

/// Key of a secret.
pub fn secret_key(ns: &str, name: &str) -> String {
    format!("secrets/{ns}/{name}")
}

/// Key prefix of the secrets of a namespace, or of all.
pub fn secrets_prefix(ns: Option<&str>) -> String {
    ns.map_or_else(|| "secrets/".into(), |ns| format!("secrets/{ns}/"))
}

/// Key prefix of a secret's kept versions.
pub fn secret_history_prefix(ns: &str, name: &str) -> String {
    format!("history/secrets/{ns}/{name}/")
}

/// Key prefix of every kept secret version.
pub const SECRET_HISTORY_ALL: &str = "history/secrets/";

/// Key of a configmap.
pub fn configmap_key(ns: &str, name: &str) -> String {
    format!("configmaps/{ns}/{name}")
}

/// Key prefix of the configmaps of a namespace, or of all.
pub fn configmaps_prefix(ns: Option<&str>) -> String {
    ns.map_or_else(|| "configmaps/".into(), |ns| format!("configmaps/{ns}/"))
}

/// Prefixes of every record that decides who a bearer token is and what it may do (users,
/// policies, tokens and their hashes): readers that cache an identity drop it when an entry
/// writes under one of them.
pub const IDENTITY_PREFIXES: [&str; 4] = ["users/", "policies/", "tokens/", "token-hashes/"];

/// Key of a user.
pub fn user_key(name: &str) -> String {
    format!("users/{name}")
}

/// Key of a policy.
pub fn policy_key(name: &str) -> String {
    format!("policies/{name}")
}

/// Key of a token.
pub fn token_key(id: &str) -> String {
    format!("tokens/{id}")
}

/// Key of the hash → id index entry of a token.
pub fn token_hash_key(hash: &str) -> String {
    format!("token-hashes/{hash}")
}

type Decided = Result<Result<Vec<Change>, Rejection>, StoreError>;

pub(super) fn put_secret<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    now: i64,
    s: &SealedSecret,
    history_limit: u32,
) -> Result<Result<Change, Rejection>, StoreError> {
    let errs = validate_sealed(s);
    if !errs.is_empty() {
        return Ok(Err(invalid("secret", &s.name, &errs)));
    }
    let key = secret_key(&s.namespace, &s.name);
    let prev = o.get::<SecretRecord>(&key)?;
    let expected = prev.as_ref().map_or(1, |p| p.sealed.version + 1);
    if s.version != expected {
        return Ok(Err(Rejection::FailedPrecondition(format!(
            "secret {}/{} changed while this cast was sealed (version {} is next, not {}); cast again",
            s.namespace, s.name, expected, s.version
        ))));
    }
    let hash = spec_hash(&s.keys);
    let meta = match &prev {
        None => new_meta(now, index, hash, 0),
        Some(p) => ObjectMeta {
            updated_at_ms: now,
            generation: s.version,
            spec_hash: hash,
            resource_version: index,
            ..p.meta.clone()
        },
    };
    let action = if prev.is_some() {
        Action::Configured
    } else {
        Action::Created
    };
    let prefix = secret_history_prefix(&s.namespace, &s.name);
    o.put(history_key_for(&prefix, s.version), s.clone());
    prune_history(o, &prefix, history_limit.max(1) as usize)?;
    let summary = format!("version {}, keys {}", s.version, s.keys.join(","));
    o.put(
        key,
        SecretRecord {
            sealed: s.clone(),
            meta,
        },
    );
    Ok(Ok(change(
        Kind::Secret,
        &s.namespace,
        &s.name,
        action,
        s.version,
        &summary,
    )))
}

/// One kept version of a configmap, for `rune get configmap NAME --history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigmapVersion {
    /// Its version (the configmap's generation when it was cast).
    pub version: u64,
    /// The data.
    pub configmap: Configmap,
    /// When it was cast.
    pub created_at_ms: i64,
}

fn configmap_history_prefix(ns: &str, name: &str) -> String {
    format!("history/configmaps/{ns}/{name}/")
}

/// The kept versions of a configmap, oldest first (the newest is the current one). Configmaps
/// cast before versions were kept have none until their next change.
pub fn configmap_history<R>(table: &R, ns: &str, name: &str) -> Result<Vec<ConfigmapVersion>, StoreError>
where
    R: ReadableTable<&'static str, &'static [u8]>,
{
    super::list_records(table, &configmap_history_prefix(ns, name))
}

pub(super) fn put_configmap<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    now: i64,
    c: &Configmap,
    force: bool,
    history_limit: Option<u32>,
) -> Result<Result<Change, Rejection>, StoreError> {
    let errs = validate_configmap(c);
    if !errs.is_empty() {
        return Ok(Err(invalid("configmap", &c.name, &errs)));
    }
    let key = configmap_key(&c.namespace, &c.name);
    let hash = spec_hash(c);
    let (action, meta) = match o.get::<ConfigmapRecord>(&key)? {
        None => (Action::Created, new_meta(now, index, hash, 0)),
        Some(p) if p.meta.spec_hash == hash && !force => {
            return Ok(Ok(change(
                Kind::Configmap,
                &c.namespace,
                &c.name,
                Action::Unchanged,
                p.meta.generation,
                "",
            )))
        }
        Some(p) => (Action::Configured, p.meta.next(now, index, hash)),
    };
    let summary = format!("version {}", meta.generation);
    // `None` for entries written before configmaps kept versions (format v1).
    if let Some(limit) = history_limit {
        let prefix = configmap_history_prefix(&c.namespace, &c.name);
        o.put(
            history_key_for(&prefix, meta.generation),
            ConfigmapVersion {
                version: meta.generation,
                configmap: c.clone(),
                created_at_ms: now,
            },
        );
        prune_history(o, &prefix, limit.max(1) as usize)?;
    }
    let ch = change(
        Kind::Configmap,
        &c.namespace,
        &c.name,
        action,
        meta.generation,
        &summary,
    );
    o.put(
        key,
        ConfigmapRecord {
            configmap: c.clone(),
            meta,
        },
    );
    Ok(Ok(ch))
}

pub(super) fn delete_secret<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    ns: &str,
    name: &str,
) -> Decided {
    let key = secret_key(ns, name);
    let Some(rec) = o.get::<SecretRecord>(&key)? else {
        return Ok(Err(Rejection::NotFound(format!("secret {ns}/{name} not found"))));
    };
    o.delete(key);
    for k in o.keys_with_prefix(&secret_history_prefix(ns, name))? {
        o.delete(k);
    }
    Ok(Ok(vec![change(
        Kind::Secret,
        ns,
        name,
        Action::Deleted,
        rec.meta.generation,
        "",
    )]))
}

pub(super) fn delete_configmap<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    ns: &str,
    name: &str,
) -> Decided {
    let key = configmap_key(ns, name);
    let Some(rec) = o.get::<ConfigmapRecord>(&key)? else {
        return Ok(Err(Rejection::NotFound(format!(
            "configmap {ns}/{name} not found"
        ))));
    };
    o.delete(key);
    for k in o.keys_with_prefix(&configmap_history_prefix(ns, name))? {
        o.delete(k);
    }
    Ok(Ok(vec![change(
        Kind::Configmap,
        ns,
        name,
        Action::Deleted,
        rec.meta.generation,
        "",
    )]))
}

pub(super) fn rewrap<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    items: &[Rewrap],
) -> Decided {
    let mut changes = Vec::new();
    for it in items {
        let hkey = history_key_for(&secret_history_prefix(&it.namespace, &it.name), it.version);
        if let Some(mut h) = o.get::<SealedSecret>(&hkey)? {
            if h.kek_id == it.from_kek_id {
                h.kek_id = it.kek_id.clone();
                h.wrapped_dek = it.wrapped_dek.clone();
                o.put(hkey, h);
            }
        }
        let key = secret_key(&it.namespace, &it.name);
        if let Some(mut rec) = o.get::<SecretRecord>(&key)? {
            if rec.sealed.version == it.version && rec.sealed.kek_id == it.from_kek_id {
                rec.sealed.kek_id = it.kek_id.clone();
                rec.sealed.wrapped_dek = it.wrapped_dek.clone();
                rec.meta.resource_version = index;
                o.put(key, rec);
            }
        }
        changes.push(change(
            Kind::Secret,
            &it.namespace,
            &it.name,
            Action::Configured,
            it.version,
            &format!(
                "version {} data key re-wrapped under KEK {}",
                it.version, it.kek_id
            ),
        ));
    }
    Ok(Ok(changes))
}

/// Creates missing built-in policies and restores changed ones.
pub(super) fn seed_policies<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    now: i64,
    policies: &[PolicySpec],
) -> Result<Vec<Change>, StoreError> {
    let mut changes = Vec::new();
    for p in policies {
        let Ok(spec) = normalize_policy(p.clone()) else {
            continue;
        };
        let key = policy_key(&spec.name);
        let hash = spec_hash(&spec);
        let prev = o.get::<PolicyRecord>(&key)?;
        if prev
            .as_ref()
            .is_some_and(|r| r.meta.spec_hash == hash && r.builtin)
        {
            continue;
        }
        let action = if prev.is_some() {
            Action::Configured
        } else {
            Action::Created
        };
        let meta = new_meta(now, index, hash, 0);
        changes.push(change(Kind::Policy, "", &spec.name, action, 1, "built in"));
        o.put(
            key,
            PolicyRecord {
                spec,
                builtin: true,
                meta,
            },
        );
    }
    Ok(changes)
}

fn missing_policies<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
    names: &[String],
) -> Result<Option<Rejection>, StoreError> {
    for p in names {
        if !o.contains(&policy_key(p))? {
            return Ok(Some(Rejection::NotFound(format!("policy {p} not found"))));
        }
    }
    Ok(None)
}

fn user_not_found(name: &str) -> Rejection {
    Rejection::NotFound(format!("user {name} not found"))
}

pub(super) fn put_user<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    now: i64,
    name: &str,
    email: &Option<String>,
    policies: &[String],
    create: bool,
) -> Decided {
    if let Err(m) = crate::validate::dns1123_label(name) {
        return Ok(Err(Rejection::Invalid(format!("user name {m}"))));
    }
    if let Some(r) = missing_policies(o, policies)? {
        return Ok(Err(r));
    }
    let key = user_key(name);
    let prev = o.get::<UserRecord>(&key)?;
    if create && prev.is_some() {
        return Ok(Err(Rejection::AlreadyExists(format!("user {name} exists"))));
    }
    let mut policies: Vec<String> = policies.to_vec();
    policies.sort();
    policies.dedup();
    let (action, meta) = match prev {
        None => (Action::Created, new_meta(now, index, String::new(), 0)),
        Some(p) => (
            Action::Configured,
            p.meta.next(now, index, p.meta.spec_hash.clone()),
        ),
    };
    let summary = format!("policies {}", policies.join(","));
    let c = change(Kind::User, "", name, action, meta.generation, &summary);
    o.put(
        key,
        UserRecord {
            name: name.into(),
            email: email.clone(),
            policies,
            meta,
        },
    );
    Ok(Ok(vec![c]))
}

fn tokens<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &Overlay<'_, R>,
) -> Result<Vec<TokenRecord>, StoreError> {
    let mut out = Vec::new();
    for k in o.keys_with_prefix("tokens/")? {
        if let Some(t) = o.get::<TokenRecord>(&k)? {
            out.push(t);
        }
    }
    Ok(out)
}

pub(super) fn delete_user<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    now: i64,
    name: &str,
) -> Decided {
    let key = user_key(name);
    let Some(rec) = o.get::<UserRecord>(&key)? else {
        return Ok(Err(user_not_found(name)));
    };
    o.delete(key);
    let mut changes = vec![change(
        Kind::User,
        "",
        name,
        Action::Deleted,
        rec.meta.generation,
        "",
    )];
    for mut t in tokens(o)? {
        if t.subject == name && t.revoked_at_ms.is_none() {
            t.revoked_at_ms = Some(now);
            changes.push(change(
                Kind::Token,
                "",
                &t.id,
                Action::Configured,
                1,
                "revoked with its user",
            ));
            o.put(token_key(&t.id), t);
        }
    }
    Ok(Ok(changes))
}

pub(super) fn put_policy<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    now: i64,
    spec: &PolicySpec,
) -> Decided {
    if is_builtin(&spec.name) {
        return Ok(Err(Rejection::FailedPrecondition(format!(
            "policy {} is built in and cannot be changed; create a policy under another name",
            spec.name
        ))));
    }
    let spec = match normalize_policy(spec.clone()) {
        Ok(s) => s,
        Err(errs) => return Ok(Err(invalid("policy", &spec.name, &errs))),
    };
    let key = policy_key(&spec.name);
    let hash = spec_hash(&spec);
    let (action, meta) = match o.get::<PolicyRecord>(&key)? {
        None => (Action::Created, new_meta(now, index, hash, 0)),
        Some(p) if p.meta.spec_hash == hash => {
            return Ok(Ok(vec![change(
                Kind::Policy,
                "",
                &spec.name,
                Action::Unchanged,
                p.meta.generation,
                "",
            )]))
        }
        Some(p) => (Action::Configured, p.meta.next(now, index, hash)),
    };
    let c = change(Kind::Policy, "", &spec.name, action, meta.generation, "");
    o.put(
        key,
        PolicyRecord {
            spec,
            builtin: false,
            meta,
        },
    );
    Ok(Ok(vec![c]))
}

pub(super) fn delete_policy<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    name: &str,
) -> Decided {
    if is_builtin(name) {
        return Ok(Err(Rejection::FailedPrecondition(format!(
            "policy {name} is built in and cannot be deleted"
        ))));
    }
    let key = policy_key(name);
    let Some(rec) = o.get::<PolicyRecord>(&key)? else {
        return Ok(Err(Rejection::NotFound(format!("policy {name} not found"))));
    };
    let mut users = Vec::new();
    for k in o.keys_with_prefix("users/")? {
        if let Some(u) = o.get::<UserRecord>(&k)? {
            if u.policies.iter().any(|p| p == name) {
                users.push(u.name);
            }
        }
    }
    if !users.is_empty() {
        return Ok(Err(Rejection::FailedPrecondition(format!(
            "policy {name} is attached to {}; detach it first",
            users.join(", ")
        ))));
    }
    o.delete(key);
    Ok(Ok(vec![change(
        Kind::Policy,
        "",
        name,
        Action::Deleted,
        rec.meta.generation,
        "",
    )]))
}

pub(super) fn set_user_policy<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    now: i64,
    user: &str,
    policy: &str,
    attach: bool,
) -> Decided {
    let Some(u) = o.get::<UserRecord>(&user_key(user))? else {
        return Ok(Err(user_not_found(user)));
    };
    let mut policies = u.policies.clone();
    if attach {
        if let Some(r) = missing_policies(o, &[policy.to_string()])? {
            return Ok(Err(r));
        }
        policies.push(policy.into());
    } else {
        if !policies.iter().any(|p| p == policy) {
            return Ok(Err(Rejection::NotFound(format!(
                "policy {policy} is not attached to user {user}"
            ))));
        }
        policies.retain(|p| p != policy);
    }
    put_user(o, index, now, user, &u.email, &policies, false)
}

pub(super) fn create_token<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    index: u64,
    now: i64,
    t: &TokenRecord,
    create_user: bool,
    bootstrap: bool,
) -> Decided {
    if t.id.is_empty() || t.secret_hash.len() != 64 {
        return Ok(Err(Rejection::Invalid(
            "token: id and secret hash are required".into(),
        )));
    }
    if o.contains(&token_key(&t.id))? {
        return Ok(Err(Rejection::AlreadyExists(format!("token {} exists", t.id))));
    }
    let mut changes = Vec::new();
    if bootstrap {
        let live = tokens(o)?.iter().filter(|x| x.live_at(now)).count();
        if live > 0 {
            return Ok(Err(Rejection::FailedPrecondition(format!(
                "bootstrap is refused: {live} live token(s) exist; use one of them, or `rune admin token create`"
            ))));
        }
        let mut policies = o
            .get::<UserRecord>(&user_key(&t.subject))?
            .map(|u| u.policies)
            .unwrap_or_default();
        if !policies.iter().any(|p| p == "root") {
            policies.push("root".into());
            match put_user(o, index, now, &t.subject, &None, &policies, false)? {
                Ok(c) => changes.extend(c),
                Err(r) => return Ok(Err(r)),
            }
        }
    } else {
        match o.get::<UserRecord>(&user_key(&t.subject))? {
            Some(u) => {
                if let Some(p) = t.policies.iter().find(|p| !u.policies.contains(p)) {
                    return Ok(Err(Rejection::FailedPrecondition(format!(
                        "user {} does not have policy {p}; a token can only narrow its user's policies",
                        t.subject
                    ))));
                }
            }
            None if create_user => {
                let policies = if t.policies.is_empty() {
                    vec!["readonly".to_string()]
                } else {
                    t.policies.clone()
                };
                match put_user(o, index, now, &t.subject, &None, &policies, true)? {
                    Ok(c) => changes.extend(c),
                    Err(r) => return Ok(Err(r)),
                }
            }
            None => return Ok(Err(user_not_found(&t.subject))),
        }
        if let Some(r) = missing_policies(o, &t.policies)? {
            return Ok(Err(r));
        }
    }
    o.put(token_hash_key(&t.secret_hash), t.id.clone());
    o.put(token_key(&t.id), t.clone());
    changes.push(change(
        Kind::Token,
        "",
        &t.id,
        Action::Created,
        1,
        &format!("{} for user {}", t.name, t.subject),
    ));
    Ok(Ok(changes))
}

pub(super) fn revoke_token<R: ReadableTable<&'static str, &'static [u8]>>(
    o: &mut Overlay<'_, R>,
    now: i64,
    id: &str,
) -> Decided {
    let key = token_key(id);
    let Some(mut t) = o.get::<TokenRecord>(&key)? else {
        return Ok(Err(Rejection::NotFound(format!("token {id} not found"))));
    };
    if t.revoked_at_ms.is_some() {
        return Ok(Ok(vec![change(
            Kind::Token,
            "",
            id,
            Action::Unchanged,
            1,
            "already revoked",
        )]));
    }
    t.revoked_at_ms = Some(now);
    o.put(key, t);
    Ok(Ok(vec![change(
        Kind::Token,
        "",
        id,
        Action::Configured,
        2,
        "revoked",
    )]))
}
