//! Containers through the Docker Engine API.
//!
//! Containers carry labels (`rune.managed`, `rune.node`, `rune.namespace`, `rune.service`,
//! `rune.instance`, `rune.template`) so a restarted runed adopts them instead of starting
//! duplicates. The connection is made lazily and dropped on failure: an engine that is down or a
//! socket that is missing is an error for that operation only, retried by the caller.

use std::collections::HashMap;
use std::time::Duration;

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, RestartPolicy, RestartPolicyNameEnum};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    ResizeExecOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Mutex};

use rune_statemachine::spec::{InitStep, VolumeSpec};

use super::{
    ExecInput, ExecOutput, ExecSpec, Exit, Found, Launch, LogQuery, LogStream, Run, RunError, RunHandle,
};

/// Label marking containers rune manages.
pub const LABEL_MANAGED: &str = "rune.managed";
/// Label naming the cluster (the data dir's identity) a container belongs to.
pub const LABEL_CLUSTER: &str = "rune.cluster";
/// Label marking an init step's container (its value is the step's name).
pub const LABEL_INIT_STEP: &str = "rune.init-step";
/// How long an ended init step's container is kept once its instance no longer runs.
const INIT_STEP_KEEP_S: i64 = 3600;
/// Label naming the spec volume a Docker volume backs.
pub const LABEL_VOLUME: &str = "rune.volume";
/// Label naming the shared claim a Docker volume is.
pub const LABEL_CLAIM: &str = "rune.claim";
/// Label recording the size a claim template asked for.
pub const LABEL_SIZE: &str = "rune.size";

/// How runed talks to the Docker Engine (`docker.api-version`, `fallback-api-version`,
/// `negotiation-timeout-seconds` of the runefile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DockerClientConfig {
    /// Use this API version, without negotiating.
    pub api_version: Option<(usize, usize)>,
    /// Use this API version when negotiation fails or times out.
    pub fallback_api_version: Option<(usize, usize)>,
    /// How long to wait for the engine to answer the version negotiation.
    pub negotiation_timeout: Duration,
    /// How long one request to the engine may take. A stop is given its grace period on top,
    /// since the engine answers it only once the container is gone.
    pub request_timeout: Duration,
}

impl Default for DockerClientConfig {
    fn default() -> Self {
        Self {
            api_version: None,
            fallback_api_version: None,
            negotiation_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// Runs instances as Docker containers.
#[derive(Debug)]
pub struct DockerRunner {
    socket: String,
    node: String,
    /// The cluster's identity (empty before a runed chose one): part of every name and label.
    cluster: String,
    client_cfg: DockerClientConfig,
    client: Mutex<Option<Docker>>,
    /// The gateway of this node's container network, where containers find the embedded DNS.
    gateway: tokio::sync::watch::Sender<Option<String>>,
    network_lock: tokio::sync::Mutex<()>,
}

/// Where `seccompProfile: {type: localhost, localhostProfile: NAME}` profiles live on a node
/// (as the kubelet keeps them under its own directory): a spec can name a profile, never an
/// arbitrary file for root to read.
pub const SECCOMP_DIR: &str = "/etc/rune/seccomp";

/// What to do about a pull the registry refused for want of (right) credentials.
fn auth_hint(why: &str, image: &str, auth: Option<&crate::registry::PullAuth>) -> String {
    let w = why.to_ascii_lowercase();
    let refused = [
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
        "access denied",
        "denied:",
    ]
    .iter()
    .any(|k| w.contains(k));
    match (refused, auth) {
        (false, _) => String::new(),
        (true, None) => format!(
            " (the registry {} wants credentials: add it to docker.registries in the runefile)",
            crate::registry::image_host(image)
        ),
        (true, Some(a)) => format!(
            " (the registry refused the credentials of docker.registries entry '{}')",
            a.entry
        ),
    }
}

fn bollard_err(socket: &str, e: bollard::errors::Error) -> RunError {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError { status_code, message } => {
            RunError::Runtime(format!("docker: {message} ({status_code})"))
        }
        E::SocketNotFoundError(p) => RunError::EngineDown {
            socket: socket.into(),
            message: format!("socket {p} does not exist"),
        },
        other => RunError::EngineDown {
            socket: socket.into(),
            message: other.to_string(),
        },
    }
}

fn not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }
    )
}

impl DockerRunner {
    /// A runner talking to the engine at `socket` (a unix socket path), labelling with `node`
    /// and `cluster`.
    pub fn new(
        socket: impl Into<String>,
        node: impl Into<String>,
        cluster: impl Into<String>,
        client_cfg: DockerClientConfig,
    ) -> Self {
        Self {
            socket: socket.into(),
            node: node.into(),
            cluster: cluster.into(),
            client_cfg,
            client: Mutex::new(None),
            gateway: tokio::sync::watch::Sender::new(None),
            network_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// The gateway address of this node's container network, once it exists.
    pub fn gateway(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.gateway.subscribe()
    }

    /// This runed's container network: a bridge of its own, so that its gateway is an address
    /// only this runed serves DNS on, and several runeds can share one engine.
    pub fn network_name(&self) -> String {
        format!("rune-{}", self.owner())
    }

    /// `node-cluster` (the first 8 characters of the cluster id), made safe for Docker names:
    /// what tells this runed's objects on the engine from another's.
    fn owner(&self) -> String {
        super::owner_name(&self.node, &self.cluster)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    }

    /// Creates the node's network when missing; returns its gateway.
    async fn ensure_network(&self) -> Result<String, RunError> {
        if let Some(gw) = self.gateway.borrow().clone() {
            return Ok(gw);
        }
        // The engine does not refuse a second network of the same name: instances starting
        // together must not each create one.
        let _one_at_a_time = self.network_lock.lock().await;
        if let Some(gw) = self.gateway.borrow().clone() {
            return Ok(gw);
        }
        let d = self.docker().await?;
        let name = self.network_name();
        let inspect = |d: Docker, name: String| async move {
            d.inspect_network(&name, None::<bollard::query_parameters::InspectNetworkOptions>)
                .await
        };
        let net = match inspect(d.clone(), name.clone()).await {
            Ok(n) => n,
            Err(e) if not_found(&e) => {
                let req = bollard::models::NetworkCreateRequest {
                    name: name.clone(),
                    driver: Some("bridge".into()),
                    labels: Some(HashMap::from([
                        (LABEL_MANAGED.to_string(), "true".to_string()),
                        ("rune.node".to_string(), self.node.clone()),
                        (LABEL_CLUSTER.to_string(), self.cluster.clone()),
                    ])),
                    ..Default::default()
                };
                if let Err(e) = d.create_network(req).await {
                    // Another start may have created it meanwhile.
                    if !matches!(
                        &e,
                        bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }
                    ) {
                        return Err(self.failed(e).await);
                    }
                }
                match inspect(d.clone(), name.clone()).await {
                    Ok(n) => n,
                    Err(e) => return Err(self.failed(e).await),
                }
            }
            Err(e) => return Err(self.failed(e).await),
        };
        let gw = net
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .find_map(|c| c.gateway.filter(|g| g.parse::<std::net::Ipv4Addr>().is_ok()))
            .ok_or_else(|| RunError::Runtime(format!("docker network {name} has no IPv4 gateway")))?;
        self.gateway.send_replace(Some(gw.clone()));
        Ok(gw)
    }

    /// The socket, for messages.
    pub fn socket(&self) -> &str {
        &self.socket
    }

    async fn docker(&self) -> Result<Docker, RunError> {
        let mut c = self.client.lock().await;
        if let Some(d) = c.as_ref() {
            return Ok(d.clone());
        }
        let connect = |v: (usize, usize)| {
            let version = bollard::ClientVersion {
                major_version: v.0,
                minor_version: v.1,
            };
            Docker::connect_with_unix(&self.socket, self.client_cfg.request_timeout.as_secs(), &version)
                .map_err(|e| bollard_err(&self.socket, e))
        };
        let cfg = &self.client_cfg;
        let d = match cfg.api_version {
            // A pinned version (`docker.api-version`) is used as it is.
            Some(v) => connect(v)?,
            None => {
                let d = Docker::connect_with_unix(
                    &self.socket,
                    cfg.request_timeout.as_secs(),
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| bollard_err(&self.socket, e))?;
                // The engine here may be older than bollard's default API version.
                let negotiated = tokio::time::timeout(cfg.negotiation_timeout, d.negotiate_version()).await;
                match (negotiated, cfg.fallback_api_version) {
                    (Ok(Ok(d)), _) => d,
                    (failed, Some(v)) => {
                        let why = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer within {:?}", cfg.negotiation_timeout),
                        };
                        tracing::warn!(error = %why, fallback = ?v, "docker API version negotiation failed; using the fallback version");
                        connect(v)?
                    }
                    (Err(_), None) => {
                        return Err(RunError::EngineDown {
                            socket: self.socket.clone(),
                            message: format!("no answer within {:?}", cfg.negotiation_timeout),
                        })
                    }
                    (Ok(Err(e)), None) => return Err(bollard_err(&self.socket, e)),
                }
            }
        };
        *c = Some(d.clone());
        Ok(d)
    }

    /// Drops the cached connection after a transport failure, so the next call reconnects.
    async fn failed(&self, e: bollard::errors::Error) -> RunError {
        let e = bollard_err(&self.socket, e);
        if matches!(e, RunError::EngineDown { .. }) {
            *self.client.lock().await = None;
        }
        e
    }

    /// Whether the engine answers.
    pub async fn ping(&self) -> Result<(), RunError> {
        let d = self.docker().await?;
        match d.ping().await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// Container names are global to the engine: the node and the cluster are part of them,
    /// so two runeds on one engine (tests, several dev nodes) never take each other's containers.
    pub fn container_name(&self, ns: &str, id: &str) -> String {
        format!("rune-{}-{ns}-{id}", self.owner())
    }

    /// Whether labels say a container (or network) is this runed's: its node, and its cluster
    /// (one made before clusters had an identity has none, and is this node's).
    fn ours(&self, labels: &HashMap<String, String>) -> bool {
        labels.get("rune.node") == Some(&self.node)
            && labels
                .get(LABEL_CLUSTER)
                .is_none_or(|c| c.is_empty() || *c == self.cluster)
    }

    /// Removes this runed's container network once none of its containers is left, so an
    /// idle engine keeps nothing of it.
    pub async fn remove_network_if_unused(&self) -> Result<(), RunError> {
        let _one_at_a_time = self.network_lock.lock().await;
        if !self.list().await?.is_empty() {
            return Ok(());
        }
        let d = self.docker().await?;
        match d.remove_network(&self.network_name()).await {
            Ok(()) => {
                self.gateway.send_replace(None);
                tracing::info!(network = %self.network_name(), "removed the container network: no container uses it");
                Ok(())
            }
            Err(e) if not_found(&e) => {
                self.gateway.send_replace(None);
                Ok(())
            }
            // Still in use by something else attached to it: leave it.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 403 | 409,
                ..
            }) => Ok(()),
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// Makes sure an image is present, pulling it with the launch's
    /// credentials for its registry, as the service's `imagePull` says: `missing` (default),
    /// `always` (every start, so a moved tag is followed), `never`.
    async fn ensure_image(&self, d: &Docker, image: &str, l: &Launch) -> Result<(), RunError> {
        // Credentials that could not be read fail a start only when it has to pull.
        let auth = || match l.pull_auth.get(&crate::registry::image_host(image)) {
            Some(Ok(a)) => Ok(Some(a)),
            Some(Err(e)) => Err(e.clone()),
            None => Ok(None),
        };
        let policy = l.spec.image_pull.as_deref().unwrap_or("missing");
        if policy == "always" {
            return self.pull(d, image, auth()?).await;
        }
        match d.inspect_image(image).await {
            Ok(_) => Ok(()),
            Err(e) if not_found(&e) && policy == "never" => Err(RunError::Image {
                image: image.into(),
                message: "not on this node, and imagePull is never".into(),
            }),
            Err(e) if not_found(&e) => self.pull(d, image, auth()?).await,
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// Removes what is left of a previous run under this name, refusing to touch a container
    /// this runed does not manage.
    async fn clear_name(&self, d: &Docker, name: &str) -> Result<(), RunError> {
        match d.inspect_container(name, None).await {
            Ok(c) => {
                let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
                if !self.ours(&labels) {
                    return Err(RunError::Launch(format!(
                        "container name {name} is taken by a container rune does not manage on this node"
                    )));
                }
                self.remove(name).await?;
                tracing::info!(container = %name, "removed the previous container of this name");
                Ok(())
            }
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// The labels every container of an instance carries (its init steps' too).
    fn labels(&self, l: &Launch) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = l
            .spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        for (k, v) in [
            (LABEL_MANAGED, "true"),
            ("rune.node", self.node.as_str()),
            (LABEL_CLUSTER, self.cluster.as_str()),
            ("rune.namespace", l.namespace.as_str()),
            ("rune.service", l.service.as_str()),
            ("rune.instance", l.id.as_str()),
            ("rune.template", l.template.as_str()),
        ] {
            labels.insert(k.into(), v.into());
        }
        labels
    }

    /// The Docker volume behind a spec volume: `claim` is one per namespace and claim name,
    /// `claimTemplate` one per instance and volume name, so an instance finds its data again
    /// after a restart, a rollout or a restart of runed.
    pub fn volume_name(&self, ns: &str, instance: &str, v: &VolumeSpec) -> String {
        match &v.claim {
            Some(claim) => format!("rune-{}-{ns}-{claim}", self.owner()),
            None => format!("rune-{}-{ns}-{instance}-{}", self.owner(), v.name),
        }
    }

    /// Creates the volume if it does not exist (creating is idempotent in the engine) and
    /// returns its bind.
    async fn ensure_volume(&self, d: &Docker, l: &Launch, v: &VolumeSpec) -> Result<String, RunError> {
        let name = self.volume_name(&l.namespace, &l.id, v);
        match d.inspect_volume(&name).await {
            Ok(existing) => {
                if !self.ours(&existing.labels) {
                    return Err(RunError::Launch(format!(
                        "volume {name} exists and rune does not manage it on this node"
                    )));
                }
            }
            Err(e) if not_found(&e) => {
                let mut labels = HashMap::from([
                    (LABEL_MANAGED.to_string(), "true".to_string()),
                    ("rune.node".to_string(), self.node.clone()),
                    (LABEL_CLUSTER.to_string(), self.cluster.clone()),
                    ("rune.namespace".to_string(), l.namespace.clone()),
                    (LABEL_VOLUME.to_string(), v.name.clone()),
                ]);
                match (&v.claim, &v.claim_template) {
                    (Some(c), _) => {
                        labels.insert(LABEL_CLAIM.into(), c.clone());
                    }
                    (None, t) => {
                        labels.insert("rune.service".into(), l.service.clone());
                        labels.insert("rune.instance".into(), l.id.clone());
                        if let Some(size) = t.as_ref().and_then(|t| t.size.as_ref()) {
                            labels.insert(LABEL_SIZE.into(), size.0.clone());
                        }
                        let class = t.as_ref().and_then(|t| t.storage_class_name.clone());
                        labels.insert(
                            "rune.storage-class".into(),
                            class.unwrap_or_else(|| "local".into()),
                        );
                    }
                }
                let req = bollard::models::VolumeCreateRequest {
                    name: Some(name.clone()),
                    driver: Some("local".into()),
                    labels: Some(labels),
                    ..Default::default()
                };
                if let Err(e) = d.create_volume(req).await {
                    return Err(RunError::Launch(format!(
                        "cannot create volume {name}: {}",
                        bollard_err(&self.socket, e)
                    )));
                }
                tracing::info!(volume = %name, instance = %l.id, "created a volume");
            }
            Err(e) => return Err(self.failed(e).await),
        }
        let ro = if v.read_only == Some(true) { ":ro" } else { "" };
        Ok(format!("{name}:{}{ro}", v.mount_path))
    }

    fn host_config(
        &self,
        l: &Launch,
        gateway: String,
        binds: &[String],
        security: Option<&rune_statemachine::spec::ContainerSecurity>,
    ) -> Result<HostConfig, RunError> {
        let r = resources(&l.spec);
        let sec = security.cloned().unwrap_or_default();
        let seccomp = match &sec.seccomp_profile {
            Some(p) if p.kind.eq_ignore_ascii_case("unconfined") => Some("seccomp=unconfined".to_string()),
            Some(p) if p.kind.eq_ignore_ascii_case("localhost") => {
                // The engine takes the profile itself, as `docker run --security-opt` sends it;
                // only profiles an operator put in the seccomp directory are read.
                let rel = p.localhost_profile.clone().unwrap_or_default();
                let path = std::path::Path::new(SECCOMP_DIR).join(&rel);
                let json = std::fs::read_to_string(&path).map_err(|e| {
                    RunError::Launch(format!(
                        "securityContext.seccompProfile.localhostProfile {}: {e}",
                        path.display()
                    ))
                })?;
                Some(format!("seccomp={json}"))
            }
            _ => None,
        };
        let caps = |v: &[String]| (!v.is_empty()).then(|| v.to_vec());
        Ok(HostConfig {
            privileged: sec.privileged,
            cap_add: caps(&sec.cap_add),
            cap_drop: caps(&sec.cap_drop),
            security_opt: seccomp.map(|s| vec![s]),
            nano_cpus: r.nano_cpus,
            cpu_shares: r.cpu_shares,
            memory: r.memory,
            memory_reservation: r.memory_reservation,
            // Services find each other by name: `api` is `api.<ns>.rune`, served by runed's
            // DNS on the node network's gateway.
            network_mode: Some(self.network_name()),
            dns: Some(vec![gateway]),
            dns_search: Some(vec![format!("{}.rune", l.namespace)]),
            binds: (!binds.is_empty()).then(|| binds.to_vec()),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            ..Default::default()
        })
    }

    /// The container of an instance's init step; kept after it ends so `rune logs
    /// --init-step` can read it, replaced by the next run.
    pub fn init_container_name(&self, ns: &str, id: &str, step: &str) -> String {
        format!("{}-init-{step}", self.container_name(ns, id))
    }

    /// Runs one init step to its end; an exit other than 0 fails the instance's start.
    async fn run_init_step(
        &self,
        d: &Docker,
        l: &Launch,
        step: &InitStep,
        gateway: &str,
        binds: &[String],
    ) -> Result<(), RunError> {
        let name = self.init_container_name(&l.namespace, &l.id, &step.name);
        self.clear_name(d, &name).await?;
        let image = step
            .image
            .clone()
            .or_else(|| l.spec.image.clone())
            .unwrap_or_default();
        self.ensure_image(d, &image, l).await?;
        let mut env = l.env.clone();
        env.extend(step.env.iter().map(|(k, v)| (k.clone(), v.0.clone())));
        let mut labels = self.labels(l);
        labels.insert(LABEL_INIT_STEP.into(), step.name.clone());
        let body = ContainerCreateBody {
            image: Some(image),
            entrypoint: step.command.as_ref().map(command_vec),
            cmd: step
                .args
                .as_ref()
                .map(|a| a.iter().map(|t| t.0.clone()).collect()),
            env: Some(super::process::env_list(&env)),
            labels: Some(labels),
            hostname: Some(l.id.clone()),
            host_config: Some(self.host_config(
                l,
                gateway.to_string(),
                binds,
                step.security_context.as_ref(),
            )?),
            ..Default::default()
        };
        let id = self.create_started(d, &name, body).await.map_err(|e| match e {
            RunError::Launch(m) => RunError::Launch(format!("init step '{}': {m}", step.name)),
            e => e,
        })?;
        tracing::info!(instance = %l.id, step = %step.name, "init step started");
        let exit = self.wait(&id).await;
        if exit.code == Some(0) {
            tracing::info!(instance = %l.id, step = %step.name, "init step done");
            return Ok(());
        }
        Err(RunError::Launch(format!(
            "init step '{}' failed: {}",
            step.name, exit.reason
        )))
    }

    /// Creates and starts the container of an instance, replacing a stale one of the same name;
    /// its volumes are made first and its init steps run to completion before it.
    pub async fn start(&self, l: &Launch) -> Result<Run, RunError> {
        let d = self.docker().await?;
        let gateway = self.ensure_network().await?;
        let spec = &l.spec;
        let image = spec.image.clone().unwrap_or_default();
        self.ensure_image(&d, &image, l).await?;
        let name = self.container_name(&l.namespace, &l.id);
        self.clear_name(&d, &name).await?;
        let mut binds: Vec<String> = l
            .mounts
            .iter()
            .map(|m| format!("{}:{}:ro", m.host.display(), m.target.display()))
            .collect();
        for v in &spec.volumes {
            binds.push(self.ensure_volume(&d, l, v).await?);
        }
        for step in &spec.init_steps {
            self.run_init_step(&d, l, step, &gateway, &binds).await?;
        }
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            entrypoint: spec.command.as_ref().map(command_vec),
            cmd: spec
                .args
                .as_ref()
                .map(|a| a.iter().map(|t| t.0.clone()).collect()),
            env: Some(super::process::env_list(&l.env)),
            labels: Some(self.labels(l)),
            hostname: Some(l.id.clone()),
            exposed_ports: Some(
                spec.ports
                    .iter()
                    .map(|p| {
                        let proto = p.protocol.clone().unwrap_or_else(|| "tcp".into()).to_lowercase();
                        format!("{}/{proto}", p.target_port.unwrap_or(p.port))
                    })
                    .collect(),
            ),
            stop_timeout: Some(super::grace(spec).as_secs() as i64),
            host_config: Some(self.host_config(l, gateway, &binds, spec.security_context.as_ref())?),
            ..Default::default()
        };
        let id = self.create_started(&d, &name, body).await?;
        let address = self.address(&id).await.unwrap_or_default();
        Ok(Run {
            handle: RunHandle::Container { id },
            address,
        })
    }

    /// Creates and starts a container, returning its id. What the engine refuses is the
    /// launch's fault (`Launch`); a lost engine is `EngineDown`, retried. A container that
    /// cannot start is removed again.
    async fn create_started(
        &self,
        d: &Docker,
        name: &str,
        body: ContainerCreateBody,
    ) -> Result<String, RunError> {
        let created = d
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.to_string()),
                    ..Default::default()
                }),
                body,
            )
            .await;
        let created = match created {
            Ok(c) => c,
            Err(e @ bollard::errors::Error::DockerResponseServerError { .. }) => {
                return Err(RunError::Launch(format!(
                    "cannot create the container: {}",
                    bollard_err(&self.socket, e)
                )))
            }
            Err(e) => return Err(self.failed(e).await),
        };
        if let Err(e) = d.start_container(&created.id, None).await {
            let _ = d
                .remove_container(
                    &created.id,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
            return Err(match e {
                e @ bollard::errors::Error::DockerResponseServerError { .. } => RunError::Launch(format!(
                    "cannot start the container: {}",
                    bollard_err(&self.socket, e)
                )),
                e => self.failed(e).await,
            });
        }
        Ok(created.id)
    }

    async fn pull(
        &self,
        d: &Docker,
        image: &str,
        auth: Option<&crate::registry::PullAuth>,
    ) -> Result<(), RunError> {
        let (repo, tag) = match image.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
            _ => (image.to_string(), "latest".to_string()),
        };
        let creds = auth.map(|a| bollard::auth::DockerCredentials {
            username: a.username.clone(),
            password: a.password.clone(),
            registrytoken: a.registry_token.clone(),
            serveraddress: Some(a.server.clone()),
            ..Default::default()
        });
        let mut s = d.create_image(
            Some(CreateImageOptions {
                from_image: Some(repo),
                tag: Some(tag),
                ..Default::default()
            }),
            None,
            creds,
        );
        let pulled = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(item) = s.next().await {
                item?;
            }
            Ok::<(), bollard::errors::Error>(())
        })
        .await;
        match pulled {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let why = bollard_err(&self.socket, e).to_string();
                Err(RunError::Image {
                    image: image.into(),
                    message: format!(
                        "not present locally and the pull failed: {why}{}",
                        auth_hint(&why, image, auth)
                    ),
                })
            }
            Err(_) => Err(RunError::Image {
                image: image.into(),
                message: "not present locally and the pull did not finish within 120s".into(),
            }),
        }
    }

    async fn address(&self, id: &str) -> Result<String, RunError> {
        let d = self.docker().await?;
        let i = match d.inspect_container(id, None).await {
            Ok(i) => i,
            Err(e) => return Err(self.failed(e).await),
        };
        let nets = i.network_settings.and_then(|n| n.networks).unwrap_or_default();
        let mut ips: Vec<String> = nets
            .values()
            .filter_map(|e| e.ip_address.clone())
            .filter(|ip| !ip.is_empty())
            .collect();
        ips.sort();
        Ok(ips.into_iter().next().unwrap_or_default())
    }

    /// Waits until the container stops. Survives the engine going away: it polls until the
    /// engine answers again and then reports what happened meanwhile.
    pub async fn wait(&self, id: &str) -> Exit {
        let mut delay = Duration::from_millis(500);
        loop {
            if let Ok(d) = self.docker().await {
                let mut s = d.wait_container(
                    id,
                    Some(WaitContainerOptions {
                        condition: "not-running".into(),
                    }),
                );
                match s.next().await {
                    Some(Ok(r)) => return self.exit_of(id, Some(r.status_code)).await,
                    Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                        return self.exit_of(id, Some(code)).await
                    }
                    Some(Err(e)) if not_found(&e) => {
                        return Exit {
                            code: None,
                            reason: "the container was removed outside rune".into(),
                        }
                    }
                    Some(Err(e)) => {
                        let e = self.failed(e).await;
                        tracing::warn!(container = %id, error = %e, "lost the container's wait; retrying");
                    }
                    None => {}
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    async fn exit_of(&self, id: &str, code: Option<i64>) -> Exit {
        let oom = match self.docker().await {
            Ok(d) => d
                .inspect_container(id, None)
                .await
                .ok()
                .and_then(|i| i.state)
                .and_then(|s| s.oom_killed)
                .unwrap_or(false),
            Err(_) => false,
        };
        let reason = match code {
            _ if oom => "OOM-killed (memory limit reached)".to_string(),
            Some(c) => format!("exited with code {c}"),
            None => "exited".to_string(),
        };
        Exit { code, reason }
    }

    /// Removes the init step containers of the instance a container belongs to, so that
    /// nothing holds its volumes once it is gone.
    async fn remove_init_steps_of(&self, d: &Docker, id: &str) {
        let Ok(c) = d.inspect_container(id, None).await else {
            return;
        };
        let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
        let (Some(ns), Some(instance)) = (labels.get("rune.namespace"), labels.get("rune.instance")) else {
            return;
        };
        if labels.contains_key(LABEL_INIT_STEP) {
            return;
        }
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("rune.node={}", self.node),
                format!("rune.namespace={ns}"),
                format!("rune.instance={instance}"),
                LABEL_INIT_STEP.to_string(),
            ],
        )]);
        let Ok(list) = d
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
        else {
            return;
        };
        for c in list {
            if self.ours(&c.labels.unwrap_or_default()) {
                if let Some(cid) = c.id {
                    if let Err(e) = self.remove(&cid).await {
                        tracing::warn!(container = %cid, error = %e, "cannot remove an init step container");
                    }
                }
            }
        }
    }

    /// The grace period a container was created with (its `StopTimeout`), for stopping a run
    /// whose spec is gone; `None` when the engine cannot say.
    pub async fn stop_timeout(&self, id: &str) -> Option<Duration> {
        let c = self.docker().await.ok()?.inspect_container(id, None).await.ok()?;
        let secs = c.config?.stop_timeout?;
        Some(Duration::from_secs(u64::try_from(secs).ok()?.min(3600)))
    }

    /// Stops (SIGTERM, SIGKILL after `grace`) and removes a container, and its init steps'.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), RunError> {
        if let Ok(d) = self.docker().await {
            self.remove_init_steps_of(&d, id).await;
        }
        // The engine answers after the grace period and the kill: a client timeout shorter than
        // that would call a slow, successful stop a failure.
        let d = self
            .docker()
            .await?
            .with_timeout(grace + self.client_cfg.request_timeout);
        match d
            .stop_container(
                id,
                Some(StopContainerOptions {
                    t: Some(grace.as_secs() as i32),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => {}
            Err(e) if not_found(&e) => return Ok(()),
            // 304: already stopped.
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => {}
            Err(e) => return Err(self.failed(e).await),
        }
        self.remove(id).await
    }

    /// Removes a container, stopped or not.
    pub async fn remove(&self, id: &str) -> Result<(), RunError> {
        let d = self.docker().await?;
        match d
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    ..Default::default()
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// Containers of this node that rune manages.
    pub async fn list(&self) -> Result<Vec<Found>, RunError> {
        let d = self.docker().await?;
        let mut filters = HashMap::new();
        filters.insert(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("rune.node={}", self.node),
            ],
        );
        let list = match d
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
        {
            Ok(l) => l,
            Err(e) => return Err(self.failed(e).await),
        };
        let mut out = Vec::new();
        let mut init_steps = Vec::new();
        for c in list {
            let labels = c.labels.unwrap_or_default();
            if !self.ours(&labels) {
                // Another runed's on this engine (same node name, another data dir).
                continue;
            }
            let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
            let Some(id) = c.id else { continue };
            let running = matches!(c.state, Some(bollard::models::ContainerSummaryStateEnum::RUNNING));
            if labels.contains_key(LABEL_INIT_STEP) {
                // Not an instance: kept for its logs while its instance lives.
                init_steps.push((
                    get("rune.namespace"),
                    get("rune.instance"),
                    id,
                    running,
                    c.created.unwrap_or(0),
                ));
                continue;
            }
            let address = if running {
                self.address(&id).await.unwrap_or_default()
            } else {
                String::new()
            };
            out.push(Found {
                namespace: get("rune.namespace"),
                service: get("rune.service"),
                id: get("rune.instance"),
                template: get("rune.template"),
                running,
                run: Run {
                    handle: RunHandle::Container { id },
                    address,
                },
                // The engine's own StopTimeout, set from the spec at create, is what counts.
                grace: None,
            });
        }
        // An init step whose instance has not run for an hour is only clutter (a failed one is
        // kept that long for `rune logs --init-step`; each retry makes a new one).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for (ns, instance, id, running, created) in init_steps {
            if !running
                && now - created > INIT_STEP_KEEP_S
                && !out.iter().any(|f| f.namespace == ns && f.id == instance)
            {
                if let Err(e) = self.remove(&id).await {
                    tracing::warn!(container = %id, error = %e, "cannot remove an old init step container");
                }
            }
        }
        Ok(out)
    }

    /// The volumes this runed made, with what uses them and how much they hold (`measure`:
    /// walking every volume's files is for `rune volume list`, not for finding one by name).
    pub async fn list_volumes(&self, measure: bool) -> Result<Vec<VolumeInfo>, RunError> {
        let d = self.docker().await?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("rune.node={}", self.node),
            ],
        )]);
        let list = d
            .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
                filters: Some(filters),
            }))
            .await;
        let list = match list {
            Ok(l) => l.volumes.unwrap_or_default(),
            Err(e) => return Err(self.failed(e).await),
        };
        let mut out = Vec::new();
        for v in list.into_iter().filter(|v| self.ours(&v.labels)) {
            let get = |k: &str| v.labels.get(k).cloned().unwrap_or_default();
            let mut info = VolumeInfo {
                engine_name: v.name.clone(),
                namespace: get("rune.namespace"),
                service: get("rune.service"),
                instance: get("rune.instance"),
                volume: get(LABEL_VOLUME),
                claim: get(LABEL_CLAIM),
                requested_size: get(LABEL_SIZE),
                storage_class: get("rune.storage-class"),
                usage_bytes: None,
                users: Vec::new(),
            };
            if measure {
                info.users = self.volume_users(&d, &v.name).await?;
                let mountpoint = std::path::PathBuf::from(&v.mountpoint);
                // Walking a big volume takes a while: off the async threads.
                info.usage_bytes = tokio::task::spawn_blocking(move || dir_usage(&mountpoint))
                    .await
                    .ok()
                    .flatten();
            }
            out.push(info);
        }
        out.sort_by(|a, b| (&a.namespace, a.name()).cmp(&(&b.namespace, b.name())));
        Ok(out)
    }

    /// Names of the containers (running or not) that mount a volume.
    async fn volume_users(&self, d: &Docker, volume: &str) -> Result<Vec<String>, RunError> {
        let filters = HashMap::from([("volume".to_string(), vec![volume.to_string()])]);
        match d
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
        {
            Ok(l) => Ok(l
                .into_iter()
                .filter_map(|c| {
                    c.names
                        .and_then(|n| n.first().map(|n| n.trim_start_matches('/').to_string()))
                })
                .collect()),
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// Deletes a volume no container uses; `Err(Launch)` names the users otherwise.
    pub async fn delete_volume(&self, engine_name: &str) -> Result<(), RunError> {
        let d = self.docker().await?;
        let users = self.volume_users(&d, engine_name).await?;
        if !users.is_empty() {
            return Err(RunError::Launch(format!("in use by {}", users.join(", "))));
        }
        match d
            .remove_volume(
                engine_name,
                None::<bollard::query_parameters::RemoveVolumeOptions>,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e @ bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => {
                Err(RunError::Launch(bollard_err(&self.socket, e).to_string()))
            }
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// The output of the last run of an instance's init step; `None` when it has not run.
    pub async fn init_step_logs(
        &self,
        ns: &str,
        instance: &str,
        step: &str,
        q: &LogQuery,
    ) -> Result<Option<LogStream>, RunError> {
        let name = self.init_container_name(ns, instance, step);
        match self.docker().await?.inspect_container(&name, None).await {
            Ok(_) => Ok(Some(self.logs(&name, q).await?)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(self.failed(e).await),
        }
    }

    /// The container's output, as Docker keeps it.
    pub async fn logs(&self, id: &str, q: &LogQuery) -> Result<LogStream, RunError> {
        let d = self.docker().await?;
        let s = d.logs(
            id,
            Some(LogsOptions {
                follow: q.follow,
                stdout: true,
                stderr: true,
                since: i32::try_from(q.since_s).unwrap_or(0),
                until: 0,
                timestamps: q.timestamps,
                tail: if q.tail == 0 {
                    "all".into()
                } else {
                    q.tail.to_string()
                },
            }),
        );
        let socket = self.socket.clone();
        Ok(Box::pin(s.map(move |r| {
            r.map(|o| o.into_bytes()).map_err(|e| bollard_err(&socket, e))
        })))
    }

    /// Runs a command in the container.
    pub async fn exec(
        &self,
        id: &str,
        spec: &ExecSpec,
    ) -> Result<(mpsc::Sender<ExecInput>, mpsc::Receiver<ExecOutput>), RunError> {
        let d = self.docker().await?;
        let created = d
            .create_exec(
                id,
                CreateExecOptions::<String> {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(spec.tty),
                    cmd: Some(spec.command.clone()),
                    ..Default::default()
                },
            )
            .await;
        let exec_id = match created {
            Ok(c) => c.id,
            Err(e @ bollard::errors::Error::DockerResponseServerError { .. }) => {
                return Err(RunError::Launch(bollard_err(&self.socket, e).to_string()))
            }
            Err(e) => return Err(self.failed(e).await),
        };
        let started = d
            .start_exec(
                &exec_id,
                Some(StartExecOptions {
                    detach: false,
                    tty: spec.tty,
                    output_capacity: None,
                }),
            )
            .await;
        let (mut output, mut input) = match started {
            Ok(StartExecResults::Attached { output, input }) => (output, input),
            Ok(StartExecResults::Detached) => return Err(RunError::Runtime("exec detached".into())),
            Err(e) => return Err(RunError::Launch(bollard_err(&self.socket, e).to_string())),
        };
        if spec.tty {
            let _ = d
                .resize_exec(
                    &exec_id,
                    ResizeExecOptions {
                        h: i32::from(spec.rows.max(1)),
                        w: i32::from(spec.cols.max(1)),
                    },
                )
                .await;
        }
        let (in_tx, mut in_rx) = mpsc::channel::<ExecInput>(16);
        let (out_tx, out_rx) = mpsc::channel::<ExecOutput>(16);
        let d2 = d.clone();
        let eid = exec_id.clone();
        tokio::spawn(async move {
            while let Some(i) = in_rx.recv().await {
                match i {
                    ExecInput::Stdin(b) => {
                        if input.write_all(&b).await.is_err() {
                            break;
                        }
                        let _ = input.flush().await;
                    }
                    ExecInput::Resize { cols, rows } => {
                        let _ = d2
                            .resize_exec(
                                &eid,
                                ResizeExecOptions {
                                    h: i32::from(rows.max(1)),
                                    w: i32::from(cols.max(1)),
                                },
                            )
                            .await;
                    }
                    ExecInput::Eof => {
                        let _ = input.shutdown().await;
                    }
                }
            }
        });
        tokio::spawn(async move {
            use bollard::container::LogOutput;
            let pump = async {
                while let Some(Ok(o)) = output.next().await {
                    let msg = match o {
                        LogOutput::StdErr { message } => ExecOutput::Stderr(message),
                        LogOutput::StdOut { message } | LogOutput::Console { message } => {
                            ExecOutput::Stdout(message)
                        }
                        LogOutput::StdIn { .. } => continue,
                    };
                    if out_tx.send(msg).await.is_err() {
                        return false;
                    }
                }
                true
            };
            let finished = tokio::select! {
                f = pump => f,
                _ = out_tx.closed() => false,
            };
            if !finished {
                // Nobody reads any more (a probe timed out, the client went away). The Engine
                // has no call to stop an exec: its process is ended by its host pid.
                let pid = d.inspect_exec(&exec_id).await.ok().and_then(|i| i.pid);
                if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 1) {
                    // SAFETY: kill(2) has no memory effects; the pid is the exec's own process.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
                return;
            }
            let code = d
                .inspect_exec(&exec_id)
                .await
                .ok()
                .and_then(|i| i.exit_code)
                .unwrap_or(-1);
            let _ = out_tx.send(ExecOutput::Exit(code)).await;
        });
        Ok((in_tx, out_rx))
    }
}

pub(super) fn command_vec(c: &rune_statemachine::spec::StringOrList) -> Vec<String> {
    match c {
        rune_statemachine::spec::StringOrList::One(s) => vec![s.clone()],
        rune_statemachine::spec::StringOrList::Many(v) => v.clone(),
    }
}

/// A volume as `rune volume list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The engine's name.
    pub engine_name: String,
    /// Namespace.
    pub namespace: String,
    /// Service, for a per-instance claim.
    pub service: String,
    /// Instance, for a per-instance claim.
    pub instance: String,
    /// The spec's volume name.
    pub volume: String,
    /// The shared claim's name, for a shared claim.
    pub claim: String,
    /// The size the claim template asked for.
    pub requested_size: String,
    /// Storage class.
    pub storage_class: String,
    /// Bytes held, when measured and the host's copy could be read.
    pub usage_bytes: Option<u64>,
    /// Containers mounting it, when measured.
    pub users: Vec<String>,
}

impl VolumeInfo {
    /// The user-facing name: the claim, or `<volume>-<instance>` as a StatefulSet names its
    /// claims.
    pub fn name(&self) -> String {
        if self.claim.is_empty() {
            format!("{}-{}", self.volume, self.instance)
        } else {
            self.claim.clone()
        }
    }
}

/// Bytes in the files under a directory (not following links); `None` when unreadable.
pub(super) fn dir_usage(dir: &std::path::Path) -> Option<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).ok()? {
            let Ok(e) = e else { continue };
            seen += 1;
            if seen > 1_000_000 {
                return Some(total);
            }
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total = total.saturating_add(m.len());
            }
        }
    }
    Some(total)
}

/// What `resources` asks of the engine (and of a process's cgroup).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EngineResources {
    /// CPU limit (`cpu.limit`), in billionths of a CPU.
    pub nano_cpus: Option<i64>,
    /// Relative CPU weight (`cpu.request` x 1024, at least 2, as the original set it).
    pub cpu_shares: Option<i64>,
    /// Hard memory limit (`memory.limit`), in bytes.
    pub memory: Option<i64>,
    /// Soft memory reservation (`memory.request`), in bytes.
    pub memory_reservation: Option<i64>,
}

/// The limits and requests of a spec, in the engine's units.
pub fn resources(spec: &rune_statemachine::spec::ServiceSpec) -> EngineResources {
    use rune_statemachine::validate::{parse_cpu_millis, parse_memory_bytes};
    let Some(r) = &spec.resources else {
        return EngineResources::default();
    };
    let cpu = |f: fn(&rune_statemachine::spec::RequestLimit) -> Option<&rune_statemachine::spec::Text>| {
        r.cpu
            .as_ref()
            .and_then(f)
            .and_then(|t| parse_cpu_millis(t.as_str()).ok())
            .and_then(|m| i64::try_from(m).ok())
    };
    let mem = |f: fn(&rune_statemachine::spec::RequestLimit) -> Option<&rune_statemachine::spec::Text>| {
        r.memory
            .as_ref()
            .and_then(f)
            .and_then(|t| parse_memory_bytes(t.as_str()).ok())
            .and_then(|b| i64::try_from(b).ok())
    };
    EngineResources {
        nano_cpus: cpu(|c| c.limit.as_ref()).map(|m| m.saturating_mul(1_000_000)),
        cpu_shares: cpu(|c| c.request.as_ref()).map(|m| (m.saturating_mul(1024) / 1000).max(2)),
        memory: mem(|c| c.limit.as_ref()),
        memory_reservation: mem(|c| c.request.as_ref()),
    }
}
