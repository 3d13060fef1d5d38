//! The log's payload: a versioned [`Envelope`] around a typed [`Command`], and what applying it did.
//!
//! Everything `apply` needs is in the envelope: the time is chosen by the proposer, never read
//! from a clock while applying. Fields are only ever added with `#[serde(default)]`, and
//! commands are only ever added as new variants, so entries written by an older build decode.

use serde::{Deserialize, Serialize};

use crate::identity::{PolicySpec, TokenRecord};
use crate::instance::InstanceEvent;
use crate::secret::{Configmap, SealedSecret};
use crate::spec::{NamespaceSpec, ServiceSpec};

/// The entry format this build writes. Builds decode every version up to this one, and apply
/// each as the build that wrote it would: v2 added configmap versions, so a v1 entry still
/// writes none (replaying an old log gives the state it gave then); v3 added host claims, so a
/// v2 cast of a host another service exposes is still accepted; v4 refuses deleting a secret
/// or configmap a service needs unless forced, so a v3 delete of one is still applied, and a
/// v3 release delete still checks only the dependencies and mounts it checked then; v5 runs
/// report the ports of the spec they were started from, and endpoints publish those, and
/// services may carry `drainSeconds`, both of which a v4 build would drop (it refuses the
/// entries instead of computing other endpoints and storing other specs).
pub const FORMAT_VERSION: u32 = 5;

/// One proposed write, as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Entry format version ([`FORMAT_VERSION`] when written by this build).
    #[serde(rename = "v")]
    pub version: u32,
    /// Wall-clock time at the proposer, in Unix milliseconds; the only time apply ever sees.
    pub proposed_at_ms: i64,
    /// What to do.
    pub command: Command,
}

impl Envelope {
    /// Wraps a command in the current format.
    pub fn new(proposed_at_ms: i64, command: Command) -> Self {
        Self {
            version: FORMAT_VERSION,
            proposed_at_ms,
            command,
        }
    }
}

/// A change of desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Command {
    /// Seeds the reserved namespaces on a new cluster; a no-op for those that exist.
    Init {
        /// Namespaces to create.
        namespaces: Vec<String>,
        /// Built-in policies to create or restore.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        policies: Vec<PolicySpec>,
        /// The cluster network VIPs come from (`networking.cluster-cidr`), when it changed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster_cidr: Option<String>,
        /// This cluster's identity, chosen once by the first runed (random): what runed
        /// creates outside its data dir (containers, networks, mount files) carries it, so
        /// several runeds on one host never touch each other's. Kept once set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster_id: Option<String>,
        /// Claim the hosts of exposed services cast before claims existed (format v3), first
        /// by namespace and name, so that a later cast cannot take a host already served.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        claim_hosts: bool,
    },
    /// A cast: all resources are applied, or none is.
    Apply {
        /// Resources in the order they were cast; namespaces should come first.
        resources: Vec<Resource>,
        /// Create the namespaces the resources name when missing.
        #[serde(default)]
        create_namespace: bool,
        /// Bump generations even for unchanged specs.
        #[serde(default)]
        force: bool,
        /// How many previous specs to keep per service, chosen by the proposer's config.
        #[serde(default = "default_history_limit")]
        history_limit: u32,
        /// The runeset release this cast installs or upgrades: recorded with what it cast, in
        /// the same entry, so a release never names resources that were not written.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        release: Option<ReleaseSpec>,
    },
    /// Casts an earlier spec of a service again as a new generation (`rune rollback`); the
    /// current scale is kept, as `kubectl rollout undo` keeps replicas.
    RollbackService {
        /// Namespace of the service.
        namespace: String,
        /// Name of the service.
        name: String,
        /// The generation whose spec to restore; the newest kept one before the current when
        /// absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_generation: Option<u64>,
        /// How many previous specs to keep, as for a cast.
        #[serde(default = "default_history_limit")]
        history_limit: u32,
    },
    /// Removes a release and every service, configmap and secret it cast (volumes are not
    /// state: the caller deletes them when asked).
    DeleteRelease {
        /// Namespace of the release.
        namespace: String,
        /// Name of the release.
        name: String,
        /// Delete even when services outside the release depend on what it holds.
        #[serde(default)]
        force: bool,
        /// The revision the caller checked its permissions against: refused when a cast
        /// changed the release since (it may hold more now).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        revision: Option<u64>,
    },
    /// Removes a service and its history; its instances are then stopped and removed.
    DeleteService {
        /// Namespace of the service.
        namespace: String,
        /// Name of the service.
        name: String,
        /// Delete even when other services depend on it.
        #[serde(default)]
        force: bool,
    },
    /// Sets the number of instances without touching the template (`rune scale`, `rune stop`).
    Scale {
        /// Namespace of the service.
        namespace: String,
        /// Name of the service.
        name: String,
        /// New number of instances.
        scale: u32,
    },
    /// Replaces every instance, one at a time (`rune restart`); brings a stopped service back to
    /// its last non-zero scale.
    Restart {
        /// Namespace of the service.
        namespace: String,
        /// Name of the service.
        name: String,
    },
    /// State changes of instances, observed by the node that runs them.
    InstanceEvents {
        /// In the order they happened.
        events: Vec<InstanceEvent>,
        /// The node that reports them, in a cluster: apply ignores a node's events about an
        /// instance placed elsewhere (it moved while that node was away). None on a single
        /// node and in older entries.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    /// A node of the cluster, by its `--node-name` and raft id, joins the placement of
    /// instances (or, registered already, is ready again).
    RegisterNode {
        /// Its name (instances record it).
        name: String,
        /// Its raft id.
        raft_id: u64,
        /// Where the other nodes' data planes reach its instances (its gateway, host:port).
        /// None in older entries: such a node's instances are reachable only on itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gateway: Option<String>,
    },
    /// A node taken out of the cluster (`rune admin cluster remove`): its instances are placed
    /// elsewhere and its name is free again (its raft id is never given out again).
    ForgetNode {
        /// The node's name.
        name: String,
    },
    /// The leader saw a node go silent past its grace period (`ready: false`: its instances
    /// are placed elsewhere), or come back (`ready: true`: it takes new instances again).
    SetNodeReady {
        /// The node's name.
        name: String,
        /// Whether it takes instances.
        ready: bool,
    },
    /// Removes an empty, non-reserved namespace.
    DeleteNamespace {
        /// Name of the namespace.
        name: String,
    },
    /// Removes a secret and its versions.
    DeleteSecret {
        /// Namespace of the secret.
        namespace: String,
        /// Name of the secret.
        name: String,
        /// Delete even when services use it (their next start fails until it is back).
        #[serde(default)]
        force: bool,
    },
    /// Removes a configmap and its versions.
    DeleteConfigmap {
        /// Namespace of the configmap.
        namespace: String,
        /// Name of the configmap.
        name: String,
        /// Delete even when services use it (their next start fails until it is back).
        #[serde(default)]
        force: bool,
    },
    /// Replaces wrapped data keys after a KEK rotation; the ciphertexts stay as they are.
    RewrapSecrets {
        /// One per stored secret version.
        items: Vec<Rewrap>,
    },
    /// Creates a user, or updates one when `create` is false.
    PutUser {
        /// User name.
        name: String,
        /// Contact address.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<String>,
        /// Policies to attach.
        policies: Vec<String>,
        /// Refuse when the user exists.
        create: bool,
    },
    /// Removes a user and revokes its tokens.
    DeleteUser {
        /// User name.
        name: String,
    },
    /// Creates or replaces a (non built-in) policy.
    PutPolicy {
        /// The policy, validated.
        spec: PolicySpec,
    },
    /// Removes a policy that no user or token uses.
    DeletePolicy {
        /// Policy name.
        name: String,
    },
    /// Attaches a policy to a user, or detaches it.
    SetUserPolicy {
        /// User name.
        user: String,
        /// Policy name.
        policy: String,
        /// Attach (true) or detach (false).
        attach: bool,
    },
    /// Issues a token; its secret was hashed by the proposer.
    CreateToken {
        /// The token.
        token: TokenRecord,
        /// Create the subject user (with the token's policies) when missing.
        #[serde(default)]
        create_user: bool,
        /// The first token of a cluster: refused while any live token exists; creates the user
        /// `root` with the `root` policy.
        #[serde(default)]
        bootstrap: bool,
    },
    /// Revokes a token at once.
    RevokeToken {
        /// Token id.
        id: String,
    },
}

/// A runeset release as a cast names it: which runeset, which version, with which values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSpec {
    /// Release name (`--release`, else the runeset's name).
    pub name: String,
    /// The namespace the release lives in (the runeset's).
    pub namespace: String,
    /// The runeset's name.
    pub runeset: String,
    /// The runeset's version.
    pub version: String,
    /// The runeset's description.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// `sha256:<hex>` of the merged values, so two casts can tell whether values changed
    /// without the state holding them (values may carry secrets).
    pub values_digest: String,
    /// Resources of the cast left out of `resources` because they did not change (sealed
    /// secrets already stored): the release owns them all the same. Never stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<crate::store::ResourceRef>,
    /// Take over resources of the cast that exist outside any release (`--adopt`): what was
    /// cast before releases were recorded, or by hand. Never stored.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,
}

/// A secret version's data key, wrapped again under a new KEK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rewrap {
    /// Namespace of the secret.
    pub namespace: String,
    /// Name of the secret.
    pub name: String,
    /// The version whose data key this is.
    pub version: u64,
    /// The KEK it was wrapped by; a version since re-wrapped by another is left alone.
    pub from_kek_id: String,
    /// The new KEK.
    pub kek_id: String,
    /// The data key wrapped by the new KEK.
    pub wrapped_dek: String,
}

fn default_history_limit() -> u32 {
    crate::DEFAULT_HISTORY_LIMIT
}

impl Command {
    /// Whether this write may use the lower half of the storage reserve: writes that free space
    /// (deletes, revocations) or keep the record of what runs true (instance reports, seeding,
    /// KEK re-wraps), so that a nearly full disk still lets an operator clean up and the state
    /// stays truthful while new objects are refused.
    pub fn uses_reserve(&self) -> bool {
        matches!(
            self,
            Command::Init { .. }
                | Command::DeleteService { .. }
                | Command::DeleteNamespace { .. }
                | Command::InstanceEvents { .. }
                | Command::RegisterNode { .. }
                | Command::SetNodeReady { .. }
                | Command::ForgetNode { .. }
                | Command::DeleteSecret { .. }
                | Command::DeleteConfigmap { .. }
                | Command::DeleteRelease { .. }
                | Command::RewrapSecrets { .. }
                | Command::DeleteUser { .. }
                | Command::DeletePolicy { .. }
                | Command::RevokeToken { .. }
        )
    }

    /// A short name for logs, metrics and replay.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Init { .. } => "init",
            Command::Apply { .. } => "apply",
            Command::DeleteService { .. } => "delete_service",
            Command::RollbackService { .. } => "rollback_service",
            Command::DeleteRelease { .. } => "delete_release",
            Command::DeleteNamespace { .. } => "delete_namespace",
            Command::Scale { .. } => "scale",
            Command::Restart { .. } => "restart",
            Command::InstanceEvents { .. } => "instance_events",
            Command::RegisterNode { .. } => "register_node",
            Command::SetNodeReady { .. } => "set_node_ready",
            Command::ForgetNode { .. } => "forget_node",
            Command::DeleteSecret { .. } => "delete_secret",
            Command::DeleteConfigmap { .. } => "delete_configmap",
            Command::RewrapSecrets { .. } => "rewrap_secrets",
            Command::PutUser { .. } => "put_user",
            Command::DeleteUser { .. } => "delete_user",
            Command::PutPolicy { .. } => "put_policy",
            Command::DeletePolicy { .. } => "delete_policy",
            Command::SetUserPolicy { .. } => "set_user_policy",
            Command::CreateToken { .. } => "create_token",
            Command::RevokeToken { .. } => "revoke_token",
        }
    }
}

/// One resource of a cast.
// Casts hold a handful of resources for a moment; boxing the service would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "spec", rename_all = "snake_case")]
pub enum Resource {
    /// A service.
    Service(ServiceSpec),
    /// A namespace.
    Namespace(NamespaceSpec),
    /// A secret version, sealed before proposing.
    Secret(SealedSecret),
    /// A configmap.
    Configmap(Configmap),
}

/// Kinds of stored objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A service.
    Service,
    /// A namespace.
    Namespace,
    /// An instance of a service.
    Instance,
    /// A secret.
    Secret,
    /// A configmap.
    Configmap,
    /// A user.
    User,
    /// A policy.
    Policy,
    /// A token.
    Token,
    /// A service's ready instances.
    Endpoints,
    /// A service's virtual IP.
    Vip,
    /// A runeset release.
    Release,
    /// A node of the cluster.
    Node,
}

impl Kind {
    /// The name users write (`service/default/api`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Namespace => "namespace",
            Kind::Instance => "instance",
            Kind::Secret => "secret",
            Kind::Configmap => "configmap",
            Kind::User => "user",
            Kind::Policy => "policy",
            Kind::Token => "token",
            Kind::Endpoints => "endpoints",
            Kind::Vip => "vip",
            Kind::Release => "release",
            Kind::Node => "node",
        }
    }
}

/// What happened to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// It did not exist and now does.
    Created,
    /// Its spec changed (or a re-cast was forced).
    Configured,
    /// It was cast again with the same spec.
    Unchanged,
    /// It was removed.
    Deleted,
}

/// The effect of a command on one object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Kind of object.
    pub kind: Kind,
    /// Namespace of the object; empty for namespaces themselves.
    pub namespace: String,
    /// Name of the object.
    pub name: String,
    /// What happened.
    pub action: Action,
    /// The object's generation afterwards (before, for deletions).
    pub generation: u64,
    /// A one-line human summary, such as `scale 1→3`.
    pub summary: String,
}

impl Change {
    /// `service/default/api`, the form `rune admin replay --resource` takes.
    pub fn resource(&self) -> String {
        if self.namespace.is_empty() {
            format!("{}/{}", self.kind.as_str(), self.name)
        } else {
            format!("{}/{}/{}", self.kind.as_str(), self.namespace, self.name)
        }
    }
}

/// Why a command changed nothing. Decided by apply from the state alone, so replay rejects the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", content = "message", rename_all = "snake_case")]
pub enum Rejection {
    /// The spec is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The state does not allow the change.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The object to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The entry was written by a newer build.
    #[error("entry format v{0} is newer than this build understands (v{FORMAT_VERSION})")]
    UnsupportedFormat(u32),
}

/// The result of applying one entry: the changes, or why there were none.
pub type Outcome = Result<Vec<Change>, Rejection>;

/// Decodes and validates one resource of `kind` (`service` or `namespace`), so that every front
/// end (castfiles, the API) accepts exactly the same specs. The service's namespace is filled in.
pub fn parse_resource(
    kind: &str,
    value: &serde_json::Value,
) -> Result<Resource, Vec<crate::decode::FieldError>> {
    match kind {
        "service" => {
            let mut s: crate::spec::ServiceSpec = crate::decode::decode(value)?;
            let errs = crate::validate::validate_service(&s);
            if !errs.is_empty() {
                return Err(errs);
            }
            s.namespace = Some(s.namespace().to_string());
            Ok(Resource::Service(s))
        }
        "namespace" => {
            let n: crate::spec::NamespaceSpec = crate::decode::decode(value)?;
            let errs = crate::validate::validate_namespace(&n);
            if !errs.is_empty() {
                return Err(errs);
            }
            Ok(Resource::Namespace(n))
        }
        other => Err(vec![crate::decode::FieldError::new(
            crate::decode::FieldPath::root(),
            format!("unknown resource kind '{other}'"),
        )]),
    }
}
