//! The resource specs users write, as the original Rune's YAML documents them.
//!
//! Field names are the YAML's (camelCase). Numbers that users get wrong (ports, scale, probe
//! timings) are `i64` here so that validation can name the field and say what is wrong, instead
//! of serde's "invalid value: integer `-1`, expected u32". Optional fields stay `Option` and are
//! skipped when absent, so that the canonical JSON of a spec round-trips through `rune get -o yaml`
//! to the same hash.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// A string written in YAML as a string, a number or a boolean (`DEBUG: true` in `env`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Default)]
#[serde(transparent)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            S(String),
            B(bool),
            I(i64),
            U(u64),
            F(f64),
        }
        Ok(Text(match Any::deserialize(d)? {
            Any::S(s) => s,
            Any::B(b) => b.to_string(),
            Any::I(i) => i.to_string(),
            Any::U(u) => u.to_string(),
            Any::F(f) => f.to_string(),
        }))
    }
}

impl Text {
    /// The text as a `&str`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One string or a list of strings (`command: "node"` or `command: ["node", "x.js"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// A single string.
    One(String),
    /// A list of strings.
    Many(Vec<String>),
}

/// A port given by name (`http`) or number (`8080`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    /// A port number.
    Number(i64),
    /// A port name, or a `80/tcp` form.
    Name(String),
}

/// A namespace, cast as a top-level `namespace:` block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceSpec {
    /// DNS-1123 label.
    pub name: String,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, Text>,
    /// What the namespace is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A service: one spec, `scale` identical instances run as containers or host processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// DNS-1123 label, unique in its namespace.
    pub name: String,
    /// Defaults to `default` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Free-form labels, used by `rune get -l k=v`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, Text>,
    /// Container image; exactly one of `image` and `process` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Host process to run instead of a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSpec>,
    /// Overrides the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<StringOrList>,
    /// Arguments to `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<Text>>,
    /// Environment; values may hold `{{secret:name/key}}` references.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, Text>,
    /// Whole secrets or configmaps imported as environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_from: Option<EnvFromList>,
    /// Number of instances; 0 when absent, as in the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<i64>,
    /// Named ports the service listens on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Liveness and readiness probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// `Always` (default), `OnFailure` or `Never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_policy: Option<String>,
    /// Per-direction default-deny network policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicy>,
    /// Ingress exposure on edge nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose: Option<Expose>,
    /// How traffic to the service's VIP is spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Discovery>,
    /// Placement hints (kept, not acted on by a single node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Autoscaling bounds (kept, not acted on yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
    /// Secrets mounted as files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_mounts: Vec<Mount>,
    /// Configmaps mounted as files (`configMounts` in the original docs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_mounts: Vec<Mount>,
    /// Configmaps mounted as files (`configmapMounts` in newer examples).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub configmap_mounts: Vec<Mount>,
    /// Services, secrets and configmaps that must be ready first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<Dependency>,
    /// Named registry to pull the image from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_registry: Option<String>,
    /// Inline registry credentials (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<serde_json::Value>,
    /// `skip: true` leaves the service out of a cast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip: Option<bool>,
    /// Seconds between SIGTERM and SIGKILL when stopping an instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_grace_period_seconds: Option<i64>,
    /// Seconds an instance being stopped keeps running out of its service's endpoints
    /// before SIGTERM (Nomad's `shutdown_delay`), for what reaches it past this node's
    /// routers (a client that kept its address). The routers themselves are always waited
    /// for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_seconds: Option<i64>,
    /// Persistent storage: one volume per instance (`claimTemplate`) or one shared (`claim`).
    /// Volumes outlive instances and the service; only an explicit delete removes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    /// Run to completion, in order, before each instance's main container starts (with its
    /// volumes, mounts and environment): migrations, permissions, seeding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_steps: Vec<InitStep>,
    /// When to pull the image: `missing` (the default: only when the node does not have it),
    /// `always` (before every start, so a moved tag is followed) or `never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull: Option<String>,
    /// What the container may do beyond the engine's defaults (containers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<ContainerSecurity>,
    /// Where its instances run in a cluster (`node: NAME` pins them all to one node); without,
    /// they are spread over the ready nodes by count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<Placement>,
}

/// A container's seccomp profile, capabilities and privilege, as the original accepts them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSecurity {
    /// The seccomp filter: the engine's default, none, or a profile file on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp_profile: Option<SeccompProfile>,
    /// Capabilities added to the engine's default set (`NET_ADMIN`, `CAP_NET_ADMIN`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities removed (`ALL` for every one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Every capability and every device of the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privileged: Option<bool>,
}

/// `seccompProfile: {type: default|unconfined|localhost, localhostProfile: /path.json}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SeccompProfile {
    /// `default`, `unconfined` or `localhost` (any case: `Unconfined` as Kubernetes writes it).
    #[serde(rename = "type")]
    pub kind: String,
    /// For `localhost`: the profile's JSON file under the node's `/etc/rune/seccomp`, read at
    /// each start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localhost_profile: Option<String>,
}

/// Where a volume is mounted and which claim backs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// Volume name, unique in the service.
    pub name: String,
    /// Directory in the instance.
    pub mount_path: String,
    /// A named claim shared by every instance (and every service naming it) in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// A claim made per instance, kept across restarts and rollouts like a StatefulSet's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_template: Option<ClaimTemplate>,
    /// Mount read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
}

/// What a per-instance claim asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClaimTemplate {
    /// Requested size (`10Gi`); recorded and reported, not enforced by the local class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Text>,
    /// `ReadWriteOnce` (default), `ReadWriteMany` or `ReadOnlyMany`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<String>,
    /// Storage class; `local` (the default) is the only one a single node has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// One step run before an instance starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct InitStep {
    /// Step name, unique in the service; `rune logs SVC --init-step NAME` shows its output.
    pub name: String,
    /// Image to run; the service's image when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Overrides the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<StringOrList>,
    /// Arguments to `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<Text>>,
    /// Extra environment over the instance's, taken literally (`{{secret:..}}` is resolved in
    /// the service's `env`, which steps see too).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, Text>,
    /// The step's container's seccomp profile, capabilities and privilege.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<ContainerSecurity>,
}

/// Storage classes a single node offers.
pub const STORAGE_CLASSES: [&str; 1] = ["local"];

impl ServiceSpec {
    /// The namespace the service lives in.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(crate::DEFAULT_NAMESPACE)
    }

    /// The declared number of instances.
    pub fn scale(&self) -> i64 {
        self.scale.unwrap_or(0)
    }

    /// `container` or `process`.
    pub fn runtime(&self) -> &'static str {
        if self.process.is_some() {
            "process"
        } else {
            "container"
        }
    }
}

/// A host process to run as the service's instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSpec {
    /// Executable path or name.
    pub command: String,
    /// Arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<Text>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User and group to run as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
}

/// Identity a process runs under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    /// User name or uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Text>,
    /// Group name or gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Text>,
}

/// `envFrom` in any of the original's forms: a scalar (`secret:name`), one mapping, or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvFromList {
    /// A list of sources.
    Many(Vec<EnvFrom>),
    /// A single source.
    One(EnvFrom),
}

/// One `envFrom` source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EnvFrom {
    /// `secret:name` or `configmap:name`.
    Short(String),
    /// `{secret|configmap|secretRef|configRef, namespace, prefix}`.
    Long(EnvFromSource),
}

/// The mapping form of an `envFrom` source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvFromSource {
    /// Secret name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Configmap name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configmap: Option<String>,
    /// Secret name (kubectl spelling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// Configmap name (kubectl spelling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_ref: Option<String>,
    /// Namespace of the source, defaults to the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Prefix added to each imported key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// A named port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    /// Port name, referenced by probes, policies and `expose`.
    #[serde(default)]
    pub name: String,
    /// Port the service is reached on.
    pub port: i64,
    /// Port the instance listens on, if different.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<i64>,
    /// `tcp` (default) or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Host port to publish on 127.0.0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<i64>,
}

impl PortSpec {
    /// Whether this port is TCP (the default): only TCP is proxied and policed, so a UDP
    /// port's name or number must open no TCP port.
    pub fn is_tcp(&self) -> bool {
        self.protocol
            .as_deref()
            .is_none_or(|x| x.eq_ignore_ascii_case("tcp"))
    }
}

/// CPU and memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// CPU in cores (`0.5`) or millicores (`500m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<RequestLimit>,
    /// Memory in bytes with a unit (`256Mi`, `1G`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<RequestLimit>,
}

/// A request and a limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RequestLimit {
    /// What the instance is guaranteed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Text>,
    /// What the instance may use at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Text>,
}

/// Probes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Restarts the instance when failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
    /// Takes the instance out of endpoints when failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
}

/// One probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// `http`, `tcp` or `exec`.
    #[serde(rename = "type")]
    pub kind: String,
    /// HTTP path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Port, by number or name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
    /// `http` (default) or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Extra HTTP headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Text>,
    /// Host to probe instead of the instance's own address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Command for `exec` probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<StringOrList>,
    /// Seconds before the first probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay_seconds: Option<i64>,
    /// Seconds between probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<i64>,
    /// Seconds a probe may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    /// Consecutive failures that make the probe fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<i64>,
    /// Consecutive successes that make the probe pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<i64>,
}

/// Network policy: each direction with a rule becomes default-deny.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    /// Who may connect to this service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressRule>,
    /// Where this service may connect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
}

/// An ingress rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Allowed peers.
    #[serde(default)]
    pub from: Vec<Peer>,
    /// Allowed ports; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRef>,
}

/// An egress rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Allowed destinations.
    #[serde(default)]
    pub to: Vec<Peer>,
    /// Allowed ports; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRef>,
}

/// A policy peer: a service (in a namespace), a whole namespace, or a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// Service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Label selector (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<serde_json::Value>,
    /// IPv4 or IPv6 CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<String>,
}

/// Where a service's instances may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    /// Every instance on this node (its `--node-name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Ingress exposure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Expose {
    /// Service port, by name or number.
    pub port: PortRef,
    /// Virtual host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Host port to publish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<i64>,
    /// Path prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// TLS termination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ExposeTls>,
    /// Source CIDRs allowed at the listener.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_cidrs: Vec<String>,
    /// Client certificate requirements (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<serde_json::Value>,
}

impl Expose {
    /// The host as the ingress matches it: trimmed and lower-case; `None` when absent or empty.
    pub fn host(&self) -> Option<String> {
        self.host
            .as_deref()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
    }
}

impl Default for PortRef {
    fn default() -> Self {
        PortRef::Number(0)
    }
}

/// TLS of an exposed host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExposeTls {
    /// `acme`, `auto` or `manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `true` means ACME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto: Option<bool>,
    /// TLS secret for manual mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// TLS secret for manual mode (newer spelling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Answer plain HTTP for this host with a permanent redirect to HTTPS (ACME challenges
    /// are still answered over HTTP). Opt-in, as a host may serve both on purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<bool>,
}

/// Discovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Discovery {
    /// `round-robin`, `load-balanced`, `headless` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// Placement hints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Affinity {
    /// Labels a node must have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required: Vec<String>,
    /// Labels a node should have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred: Vec<String>,
    /// Services to run beside.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub with: Vec<String>,
    /// Services to keep away from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid: Vec<String>,
    /// Spread rule (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<serde_json::Value>,
}

/// Autoscaling bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Autoscale {
    /// Whether autoscaling is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    /// Upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    /// `cpu` or `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    /// Target, such as `75%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Text>,
    /// Cooldown (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown: Option<Text>,
    /// Instances added or removed per step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<i64>,
}

/// A secret or configmap mounted as files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    /// Mount name.
    pub name: String,
    /// Directory in the instance.
    pub mount_path: String,
    /// Secret to mount (defaults to `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Configmap to mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_name: Option<String>,
    /// Configmap to mount (newer spelling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configmap_name: Option<String>,
    /// Which keys to mount, under which file names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<KeyToPath>,
}

impl Mount {
    /// The secret (`secret`) or configmap it mounts: its own field, else the mount's name.
    pub fn source(&self, secret: bool) -> &str {
        let named = if secret {
            self.secret_name.as_deref()
        } else {
            self.configmap_name.as_deref().or(self.config_name.as_deref())
        };
        named.unwrap_or(&self.name)
    }
}

/// A key mounted under a file name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct KeyToPath {
    /// Key in the secret or configmap.
    pub key: String,
    /// File name under the mount path.
    pub path: String,
}

/// A dependency in the original's string form (`db`, `cache.shared`, `secret:creds`) or as a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dependency {
    /// The short string form.
    Short(String),
    /// The mapping form.
    Long(DependencySpec),
}

/// The mapping form of a dependency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DependencySpec {
    /// Service depended on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Secret depended on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Configmap depended on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configmap: Option<String>,
    /// Namespace of the dependency, defaults to the service's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `running`, `healthy` or `started`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_when: Option<String>,
    /// How long to wait for the dependency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i64>,
    /// Start anyway when the dependency is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}
