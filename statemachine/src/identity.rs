//! Users, policies and tokens: who may do what, kept in the state like everything else.
//!
//! A token is stored only as the SHA-256 of its secret. A policy is a list of rules of
//! (resource, verbs, namespace); resources are canonicalised to their plural names so that the
//! original's plural and the docs' singular spellings mean the same thing.

use serde::{Deserialize, Serialize};

use crate::decode::{FieldError, FieldPath};
use crate::meta::ObjectMeta;
use crate::validate::dns1123_label;

/// Resources a rule can name, in their canonical (plural) spelling.
pub const RESOURCES: [&str; 16] = [
    "services",
    "endpoints",
    "instances",
    "namespaces",
    "secrets",
    "configmaps",
    "logs",
    "exec",
    "health",
    "volumes",
    "releases",
    "users",
    "policies",
    "tokens",
    "admin",
    "*",
];

/// Verbs a rule can grant. `reveal` (read secret values) is Rune's addition: `get` on secrets
/// shows key names only, so a read-only policy never discloses a value.
pub const VERBS: [&str; 10] = [
    "get", "list", "watch", "create", "update", "delete", "scale", "exec", "reveal", "*",
];

/// The canonical spelling of a resource name, or `None` when it is unknown.
pub fn canonical_resource(r: &str) -> Option<&'static str> {
    let r = r.trim().to_ascii_lowercase();
    let plural = match r.as_str() {
        "service" | "svc" => "services",
        "endpoint" | "ep" => "endpoints",
        "instance" | "inst" => "instances",
        "namespace" | "ns" => "namespaces",
        "secret" => "secrets",
        "configmap" | "config" | "configs" => "configmaps",
        "log" => "logs",
        "user" => "users",
        "policy" => "policies",
        "token" => "tokens",
        "volume" | "vol" => "volumes",
        "release" | "rel" => "releases",
        other => other,
    };
    RESOURCES.iter().copied().find(|x| *x == plural)
}

/// One rule of a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyRule {
    /// A resource name (singular or plural) or `*`.
    pub resource: String,
    /// Verbs granted, or `*`.
    pub verbs: Vec<String>,
    /// The namespace the rule covers; `*` (the default) covers all and cluster-wide objects.
    #[serde(default = "star")]
    pub namespace: String,
}

fn star() -> String {
    "*".into()
}

/// A policy, as `rune admin policy create -f` reads it (YAML or JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// DNS-1123 label.
    pub name: String,
    /// What the policy is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// What it grants.
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
}

/// A stored policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// The spec, with resources canonicalised.
    pub spec: PolicySpec,
    /// Seeded at first start; cannot be changed or deleted.
    pub builtin: bool,
    /// Bookkeeping.
    pub meta: ObjectMeta,
}

/// A stored user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    /// DNS-1123 label.
    pub name: String,
    /// Contact address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Names of attached policies.
    pub policies: Vec<String>,
    /// Bookkeeping.
    pub meta: ObjectMeta,
}

/// A stored token: never its secret, only the secret's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TokenRecord {
    /// Random id, chosen by the proposer.
    pub id: String,
    /// A name for humans.
    pub name: String,
    /// The user it acts as.
    pub subject: String,
    /// What it is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// When non-empty, the token is limited to these of its user's policies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Issue time (proposer's clock).
    pub issued_at_ms: i64,
    /// Expiry; `None` never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
    /// When it was revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at_ms: Option<i64>,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// What the token is for when it is not an API token: [`JOIN_PURPOSE`] lets a node join the
    /// cluster and nothing else (the API refuses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
}

/// The purpose of a join token (`rune admin cluster join-token`).
pub const JOIN_PURPOSE: &str = "cluster-join";

impl TokenRecord {
    /// Whether the token can still authenticate at `now_ms`.
    pub fn live_at(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| now_ms < e)
    }
}

/// The built-in policies seeded at first start.
pub fn builtin_policies() -> Vec<PolicySpec> {
    let rules = |resources: &[&str], verbs: &[&str]| {
        resources
            .iter()
            .map(|r| PolicyRule {
                resource: r.to_string(),
                verbs: verbs.iter().map(|v| v.to_string()).collect(),
                namespace: "*".into(),
            })
            .collect()
    };
    let p = |name: &str, description: &str, resources: &[&str], verbs: &[&str]| PolicySpec {
        name: name.into(),
        description: Some(description.into()),
        rules: rules(resources, verbs),
    };
    vec![
        p("root", "Everything, everywhere", &["*"], &["*"]),
        p("admin", "Everything, everywhere", &["*"], &["*"]),
        p(
            "readwrite",
            "Read and change workloads, secrets included; not users, policies or tokens",
            &WORKLOAD_RESOURCES,
            &[
                "get", "list", "watch", "create", "update", "delete", "scale", "exec", "reveal",
            ],
        ),
        p(
            "readonly",
            "Read workloads, but not secret values, users, policies or tokens",
            &WORKLOAD_RESOURCES,
            &["get", "list", "watch"],
        ),
    ]
}

/// What readwrite and readonly cover. Identity (users, policies, tokens, admin) is left out on
/// purpose: whoever can create tokens or attach policies can make themselves root.
pub const WORKLOAD_RESOURCES: [&str; 11] = [
    "services",
    "endpoints",
    "instances",
    "namespaces",
    "secrets",
    "configmaps",
    "logs",
    "exec",
    "health",
    "volumes",
    "releases",
];

/// Whether `name` is a built-in policy.
pub fn is_builtin(name: &str) -> bool {
    builtin_policies().iter().any(|p| p.name == name)
}

/// Validates a policy and canonicalises its resource names.
pub fn normalize_policy(mut p: PolicySpec) -> Result<PolicySpec, Vec<FieldError>> {
    let mut errs = Vec::new();
    if let Err(m) = dns1123_label(&p.name) {
        errs.push(FieldError::new(
            FieldPath::root().key("name"),
            format!("policy name {m}"),
        ));
    }
    if p.rules.is_empty() {
        errs.push(FieldError::new(
            FieldPath::root().key("rules"),
            "a policy needs at least one rule",
        ));
    }
    for (i, r) in p.rules.iter_mut().enumerate() {
        let at = FieldPath::root().key("rules").index(i);
        match canonical_resource(&r.resource) {
            Some(c) => r.resource = c.to_string(),
            None => errs.push(FieldError::new(
                at.key("resource"),
                format!(
                    "'{}' is not a resource: use one of {}",
                    r.resource,
                    RESOURCES.join(", ")
                ),
            )),
        }
        if r.verbs.is_empty() {
            errs.push(FieldError::new(at.key("verbs"), "a rule needs at least one verb"));
        }
        for (j, v) in r.verbs.iter_mut().enumerate() {
            *v = v.trim().to_ascii_lowercase();
            if !VERBS.contains(&v.as_str()) {
                errs.push(FieldError::new(
                    at.key("verbs").index(j),
                    format!("'{v}' is not a verb: use one of {}", VERBS.join(", ")),
                ));
            }
        }
        if r.namespace.is_empty() {
            r.namespace = "*".into();
        }
        if r.namespace != "*" {
            if let Err(m) = dns1123_label(&r.namespace) {
                errs.push(FieldError::new(at.key("namespace"), format!("namespace {m}")));
            }
        }
    }
    if errs.is_empty() {
        Ok(p)
    } else {
        Err(errs)
    }
}

/// Whether `rules` allow `verb` on `resource` in `namespace`. `None` is a cluster-wide object
/// (a namespace list, a user), which only rules for namespace `*` cover.
pub fn allows(rules: &[PolicyRule], resource: &str, verb: &str, namespace: Option<&str>) -> bool {
    rules.iter().any(|r| {
        (r.resource == "*" || r.resource == resource)
            && r.verbs.iter().any(|v| v == "*" || v == verb)
            && (r.namespace == "*" || Some(r.namespace.as_str()) == namespace)
    })
}
