//! Validation of specs: pure, offline, and shared by `rune lint`, the API and `apply`, so that a
//! spec the linter passes is one the server accepts.

use std::collections::BTreeSet;

use crate::decode::{FieldError, FieldPath};
use crate::spec::{
    Dependency, EnvFrom, EnvFromList, NamespaceSpec, Peer, PortRef, Probe, RequestLimit, ServiceSpec,
    StringOrList,
};

/// Largest scale a single node accepts; beyond it a typo (`scale: 10000`) is more likely than intent.
pub const MAX_SCALE: i64 = 1000;

/// Checks a node name as `--node-name` takes it (a host name): what `placement.node` pins to.
pub fn node_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("'{name}' must be a node name of 1 to 253 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(format!(
            "'{name}' is not a node name: letters, digits, '-', '.' and '_' only"
        ));
    }
    Ok(())
}

/// Checks a name against DNS-1123 label rules, so it can be a DNS name (`<svc>.<ns>.rune`).
pub fn dns1123_label(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".into());
    }
    if name.len() > 63 {
        return Err(format!(
            "'{name}' is {} characters long; at most 63 are allowed",
            name.len()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "'{name}' may contain only lowercase letters, digits and '-'"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("'{name}' must start and end with a letter or digit"));
    }
    Ok(())
}

/// Validates a namespace spec.
pub fn validate_namespace(ns: &NamespaceSpec) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if let Err(m) = dns1123_label(&ns.name) {
        errs.push(FieldError::new(
            FieldPath::root().key("name"),
            format!("namespace name {m}"),
        ));
    }
    errs
}

/// Checks an exposed host: a DNS name the ingress can match against `Host` and SNI (any case;
/// it is matched lower-case).
pub fn exposed_host(host: &str) -> Result<(), String> {
    let h = host.trim().to_ascii_lowercase();
    if h.contains("://") {
        return Err(format!(
            "'{host}' is a URL; give the host name alone (such as api.example.com)"
        ));
    }
    if h.starts_with("*.") {
        return Err(format!(
            "'{host}': wildcard hosts are not supported; expose each host name"
        ));
    }
    if h.contains(':') || h.contains('/') {
        return Err(format!(
            "'{host}' must be a host name alone, without a port or a path (expose.path takes a path)"
        ));
    }
    if h.len() > 253 {
        return Err(format!(
            "'{host}' is {} characters long; at most 253 are allowed",
            h.len()
        ));
    }
    for label in h.split('.') {
        dns1123_label(label).map_err(|e| {
            if label.is_empty() {
                format!("'{host}' has an empty label (a leading, trailing or doubled '.')")
            } else {
                format!("'{host}': label {e}")
            }
        })?;
    }
    Ok(())
}

/// Validates a service spec; an empty result means the spec can be stored.
pub fn validate_service(s: &ServiceSpec) -> Vec<FieldError> {
    validate_service_at(s, crate::FORMAT_VERSION)
}

/// [`validate_service`] as the build that wrote entry format `version` did, so a replayed old
/// entry is judged by the rules it was accepted under (v3 added `expose.host`'s syntax).
pub fn validate_service_at(s: &ServiceSpec, version: u32) -> Vec<FieldError> {
    let root = FieldPath::root();
    let mut errs = Vec::new();
    validate_basics(s, &root, &mut errs);
    validate_ports(s, &root, &mut errs);
    if let Some(node) = s.placement.as_ref().and_then(|p| p.node.as_deref()) {
        if let Err(m) = node_name(node) {
            errs.push(FieldError::new(root.key("placement").key("node"), m));
        }
    }
    if let Some(r) = &s.resources {
        if let Some(cpu) = &r.cpu {
            check_request_limit(
                cpu,
                &root.key("resources").key("cpu"),
                parse_cpu_millis,
                &mut errs,
            );
        }
        if let Some(mem) = &r.memory {
            check_request_limit(
                mem,
                &root.key("resources").key("memory"),
                parse_memory_bytes,
                &mut errs,
            );
        }
    }
    if let Some(h) = &s.health {
        if let Some(p) = &h.liveness {
            validate_probe(p, s, &root.key("health").key("liveness"), &mut errs);
        }
        if let Some(p) = &h.readiness {
            validate_probe(p, s, &root.key("health").key("readiness"), &mut errs);
        }
    }
    validate_refs(s, &root, &mut errs);
    if version >= 3 {
        let host = s.expose.as_ref().and_then(|e| e.host.as_deref());
        if let Some(h) = host.filter(|h| !h.trim().is_empty()) {
            if let Err(m) = exposed_host(h) {
                errs.push(FieldError::new(root.key("expose").key("host"), m));
            }
        }
    }
    validate_mounts(s, &root, &mut errs);
    validate_volumes(s, &root, &mut errs);
    validate_init_steps(s, &root, &mut errs);
    validate_container_settings(s, &root, &mut errs);
    errs
}

fn mount_path_ok(p: &str) -> bool {
    p.starts_with('/') && !p.contains(':') && !p.split('/').any(|c| c == ".." || c == ".") && p != "/"
}

/// Volume names become parts of Docker volume names and host directories: plain labels only.
fn validate_volumes(s: &ServiceSpec, root: &FieldPath, errs: &mut Vec<FieldError>) {
    let mut names = BTreeSet::new();
    let mut paths: BTreeSet<&str> = s
        .secret_mounts
        .iter()
        .chain(&s.config_mounts)
        .chain(&s.configmap_mounts)
        .map(|m| m.mount_path.as_str())
        .collect();
    for (i, v) in s.volumes.iter().enumerate() {
        let at = root.key("volumes").index(i);
        let mut err = |p: FieldPath, m: String| errs.push(FieldError::new(p, m));
        if let Err(e) = dns1123_label(&v.name) {
            err(at.key("name"), format!("volume name {e}"));
        } else if !names.insert(v.name.as_str()) {
            err(at.key("name"), format!("volume name '{}' is used twice", v.name));
        }
        if !mount_path_ok(&v.mount_path) {
            err(
                at.key("mountPath"),
                format!(
                    "'{}' must be an absolute path without '.', '..' or ':' (and not /)",
                    v.mount_path
                ),
            );
        } else if !paths.insert(v.mount_path.as_str()) {
            err(
                at.key("mountPath"),
                format!("'{}' is mounted twice", v.mount_path),
            );
        }
        match (&v.claim, &v.claim_template) {
            (Some(_), Some(_)) | (None, None) => err(
                at.clone(),
                String::from("give exactly one of 'claim' (shared) and 'claimTemplate' (one per instance)"),
            ),
            (Some(c), None) => {
                if let Err(e) = dns1123_label(c) {
                    err(at.key("claim"), format!("claim name {e}"));
                }
            }
            (None, Some(t)) => {
                let at = at.key("claimTemplate");
                if let Some(size) = &t.size {
                    if let Err(e) = parse_memory_bytes(size.as_str()) {
                        err(at.key("size"), format!("'{}': {e}", size.as_str()));
                    }
                }
                if let Some(m) = &t.access_mode {
                    if !matches!(m.as_str(), "ReadWriteOnce" | "ReadWriteMany" | "ReadOnlyMany") {
                        err(
                            at.key("accessMode"),
                            format!("'{m}': expected ReadWriteOnce, ReadWriteMany or ReadOnlyMany"),
                        );
                    }
                }
                if let Some(c) = &t.storage_class_name {
                    if !crate::spec::STORAGE_CLASSES.contains(&c.as_str()) {
                        err(
                            at.key("storageClassName"),
                            format!(
                                "unknown storage class '{c}'; this node offers: {}",
                                crate::spec::STORAGE_CLASSES.join(", ")
                            ),
                        );
                    }
                }
            }
        }
    }
}

fn validate_init_steps(s: &ServiceSpec, root: &FieldPath, errs: &mut Vec<FieldError>) {
    let mut names = BTreeSet::new();
    for (i, step) in s.init_steps.iter().enumerate() {
        let at = root.key("initSteps").index(i);
        if let Err(e) = dns1123_label(&step.name) {
            errs.push(FieldError::new(at.key("name"), format!("init step name {e}")));
        } else if !names.insert(step.name.as_str()) {
            errs.push(FieldError::new(
                at.key("name"),
                format!("init step name '{}' is used twice", step.name),
            ));
        }
        if s.process.is_some() {
            // A process service's steps run on the host, as its process does.
            if step.image.is_some() {
                errs.push(FieldError::new(
                    at.key("image"),
                    "a process service's init steps run on the host: give a command, not an image",
                ));
            }
            if step.command.is_none() {
                errs.push(FieldError::new(
                    at.key("command"),
                    "is required for a process service's init step",
                ));
            }
            if step.security_context.is_some() {
                errs.push(FieldError::new(
                    at.key("securityContext"),
                    "applies to containers; a process service's steps run as its process.securityContext user",
                ));
            }
        }
        if step.image.as_deref().is_some_and(|i| i.trim().is_empty()) {
            errs.push(FieldError::new(at.key("image"), "image must not be empty"));
        }
        for k in step.env.keys() {
            if k.is_empty() || k.contains('=') {
                errs.push(FieldError::new(
                    at.key("env").key(k),
                    format!("'{k}' is not a valid environment variable name"),
                ));
            }
        }
        if let Some(sc) = &step.security_context {
            validate_security(sc, &at.key("securityContext"), errs);
        }
    }
}

/// `imagePull` and `securityContext`: container settings, refused on process services.
fn validate_container_settings(s: &ServiceSpec, root: &FieldPath, errs: &mut Vec<FieldError>) {
    if let Some(p) = &s.image_pull {
        if !IMAGE_PULL.contains(&p.as_str()) {
            errs.push(FieldError::new(
                root.key("imagePull"),
                format!("'{p}' is not one of {}", IMAGE_PULL.join(", ")),
            ));
        }
        if s.process.is_some() {
            errs.push(FieldError::new(
                root.key("imagePull"),
                "a process service has no image to pull",
            ));
        }
    }
    if let Some(sc) = &s.security_context {
        if s.process.is_some() {
            errs.push(FieldError::new(
                root.key("securityContext"),
                "applies to containers; a process service's user and group are process.securityContext",
            ));
        }
        validate_security(sc, &root.key("securityContext"), errs);
    }
}

/// What `imagePull` may say.
pub const IMAGE_PULL: [&str; 3] = ["missing", "always", "never"];

fn validate_security(sc: &crate::spec::ContainerSecurity, at: &FieldPath, errs: &mut Vec<FieldError>) {
    if let Some(p) = &sc.seccomp_profile {
        let at = at.key("seccompProfile");
        match (p.kind.to_ascii_lowercase().as_str(), &p.localhost_profile) {
            ("default" | "unconfined", None) => {}
            ("localhost", Some(path))
                if !path.starts_with('/') && !path.split('/').any(|c| c == ".." || c.is_empty()) => {}
            ("localhost", Some(path)) => errs.push(FieldError::new(
                at.key("localhostProfile"),
                format!(
                    "'{path}' must be a file name under the node's /etc/rune/seccomp (relative, no '..')"
                ),
            )),
            ("localhost", None) => errs.push(FieldError::new(
                at.key("localhostProfile"),
                "is required for type localhost",
            )),
            ("default" | "unconfined", Some(_)) => errs.push(FieldError::new(
                at.key("localhostProfile"),
                format!("only goes with type localhost, not {}", p.kind),
            )),
            _ => errs.push(FieldError::new(
                at.key("type"),
                format!("'{}' is not one of default, unconfined, localhost", p.kind),
            )),
        }
    }
    for (field, caps) in [("capAdd", &sc.cap_add), ("capDrop", &sc.cap_drop)] {
        for (i, c) in caps.iter().enumerate() {
            let name = c.strip_prefix("CAP_").unwrap_or(c);
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                errs.push(FieldError::new(
                    at.key(field).index(i),
                    format!("'{c}' is not a capability name (NET_ADMIN, CAP_SYS_TIME, ALL)"),
                ));
            }
        }
    }
}

/// Mount names become directory names on the host and mount paths mount points: both must be
/// plain, so that no spec can make runed write or mount outside its own directories.
fn validate_mounts(s: &ServiceSpec, root: &FieldPath, errs: &mut Vec<FieldError>) {
    let lists = [
        ("secretMounts", &s.secret_mounts),
        ("configMounts", &s.config_mounts),
        ("configmapMounts", &s.configmap_mounts),
    ];
    let mut names = BTreeSet::new();
    for (field, list) in lists {
        for (i, m) in list.iter().enumerate() {
            let at = root.key(field).index(i);
            if let Err(e) = dns1123_label(&m.name) {
                errs.push(FieldError::new(at.key("name"), format!("mount name {e}")));
            } else if !names.insert(m.name.clone()) {
                errs.push(FieldError::new(
                    at.key("name"),
                    format!("mount name '{}' is used twice", m.name),
                ));
            }
            let p = &m.mount_path;
            if !mount_path_ok(p) {
                errs.push(FieldError::new(
                    at.key("mountPath"),
                    format!("'{p}' must be an absolute path without '.', '..' or ':' (and not /)"),
                ));
            }
            for (j, it) in m.items.iter().enumerate() {
                if it.path.is_empty() || it.path.contains('/') || it.path == ".." || it.path == "." {
                    errs.push(FieldError::new(
                        at.key("items").index(j).key("path"),
                        format!("'{}' must be a plain file name", it.path),
                    ));
                }
            }
        }
    }
}

fn validate_basics(s: &ServiceSpec, root: &FieldPath, errs: &mut Vec<FieldError>) {
    let mut err = |p: FieldPath, m: String| errs.push(FieldError::new(p, m));
    if let Err(m) = dns1123_label(&s.name) {
        err(root.key("name"), format!("service name {m}"));
    }
    if let Some(ns) = &s.namespace {
        if let Err(m) = dns1123_label(ns) {
            err(root.key("namespace"), format!("namespace {m}"));
        }
    }
    match (&s.image, &s.process) {
        (None, None) => err(
            root.key("image"),
            "exactly one of 'image' and 'process' is required".into(),
        ),
        (Some(_), Some(_)) => err(
            root.key("process"),
            "give either 'image' or 'process', not both".into(),
        ),
        (Some(i), None) if i.trim().is_empty() => err(root.key("image"), "image must not be empty".into()),
        (None, Some(p)) if p.command.trim().is_empty() => err(
            root.key("process").key("command"),
            "process command is required".into(),
        ),
        _ => {}
    }
    if let Some(scale) = s.scale {
        if scale < 0 {
            err(root.key("scale"), format!("scale must be 0 or more, got {scale}"));
        } else if scale > MAX_SCALE {
            err(
                root.key("scale"),
                format!("scale {scale} is above the limit of {MAX_SCALE}"),
            );
        }
    }
    // A drain is waited out by `rune cast` and `rune scale` without progress: it stays
    // within their default progress deadline (10 minutes).
    for (field, v, max) in [
        ("stopGracePeriodSeconds", s.stop_grace_period_seconds, 3600),
        ("drainSeconds", s.drain_seconds, 300),
    ] {
        if let Some(g) = v.filter(|g| !(0..=max).contains(g)) {
            err(root.key(field), format!("must be between 0 and {max}, got {g}"));
        }
    }
    if let Some(rp) = &s.restart_policy {
        if !matches!(rp.as_str(), "Always" | "OnFailure" | "Never") {
            err(
                root.key("restartPolicy"),
                format!("must be Always, OnFailure or Never, got '{rp}'"),
            );
        }
    }
    for (k, v) in &s.env {
        if k.is_empty() || k.contains('=') {
            err(
                root.key("env").key(k),
                format!("'{k}' is not a valid environment variable name"),
            );
        } else if !env_reference_ok(v.as_str()) {
            err(
                root.key("env").key(k),
                format!(
                    "'{}' is not a valid reference: use {{{{secret:name/key}}}}",
                    v.as_str()
                ),
            );
        }
    }
}

fn validate_ports(s: &ServiceSpec, root: &FieldPath, errs: &mut Vec<FieldError>) {
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, p) in s.ports.iter().enumerate() {
        let at = root.key("ports").index(i);
        if p.name.is_empty() {
            errs.push(FieldError::new(
                at.key("name"),
                format!("port name is required for port at index {i}"),
            ));
        } else if let Err(m) = dns1123_label(&p.name) {
            errs.push(FieldError::new(at.key("name"), format!("port name {m}")));
        } else if !names.insert(p.name.clone()) {
            errs.push(FieldError::new(
                at.key("name"),
                format!("duplicate port name '{}'", p.name),
            ));
        }
        let proto = p.protocol.as_deref().unwrap_or("tcp").to_ascii_lowercase();
        if proto != "tcp" && proto != "udp" {
            errs.push(FieldError::new(
                at.key("protocol"),
                format!("protocol must be tcp or udp, got '{proto}'"),
            ));
        }
        if !(1..=65535).contains(&p.port) {
            errs.push(FieldError::new(
                at.key("port"),
                format!("port must be between 1 and 65535, got {}", p.port),
            ));
        } else if !numbers.insert((p.port, proto)) {
            errs.push(FieldError::new(
                at.key("port"),
                format!("duplicate port {}", p.port),
            ));
        }
        for (field, v) in [("targetPort", p.target_port), ("hostPort", p.host_port)] {
            if let Some(v) = v {
                if !(1..=65535).contains(&v) {
                    errs.push(FieldError::new(
                        at.key(field),
                        format!("must be between 1 and 65535, got {v}"),
                    ));
                }
            }
        }
    }
}

/// The port name a policy port refers to, or `None` for `80`, `80/tcp` and `53/udp`.
pub fn port_name(r: &PortRef) -> Option<&str> {
    match r {
        PortRef::Number(_) => None,
        PortRef::Name(s) => {
            let num = s.split_once('/').map_or(s.as_str(), |(n, _)| n);
            num.trim().parse::<u16>().is_err().then_some(s.trim())
        }
    }
}

/// `web, metrics`, or `none declared`.
pub fn port_names(s: &ServiceSpec) -> String {
    let names: Vec<&str> = s
        .ports
        .iter()
        .map(|p| p.name.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        "it names none".into()
    } else {
        format!("its ports: {}", names.join(", "))
    }
}

fn port_ref_ok(s: &ServiceSpec, r: &PortRef) -> bool {
    match r {
        PortRef::Number(n) => {
            s.ports.is_empty() && (1..=65535).contains(n)
                || s.ports.iter().any(|p| p.port == *n || p.target_port == Some(*n))
        }
        PortRef::Name(n) => s.ports.iter().any(|p| &p.name == n),
    }
}

fn validate_probe(p: &Probe, s: &ServiceSpec, at: &FieldPath, errs: &mut Vec<FieldError>) {
    let mut err = |f: &str, m: String| errs.push(FieldError::new(at.key(f), m));
    match p.kind.as_str() {
        "http" => {
            match &p.path {
                None => err("path", "http probe must have a path".into()),
                Some(path) if !path.starts_with('/') => {
                    err("path", format!("path must start with '/', got '{path}'"))
                }
                _ => {}
            }
            if p.port.is_none() {
                err("port", "http probe must have a port".into());
            }
            if let Some(sch) = &p.scheme {
                if sch != "http" && sch != "https" {
                    err("scheme", format!("scheme must be http or https, got '{sch}'"));
                }
            }
        }
        "tcp" => {
            if p.port.is_none() {
                err("port", "tcp probe must have a port".into());
            }
        }
        "exec" => {
            let empty = match &p.command {
                None => true,
                Some(StringOrList::One(c)) => c.trim().is_empty(),
                Some(StringOrList::Many(v)) => v.is_empty(),
            };
            if empty {
                err("command", "exec probe must have a command".into());
            }
        }
        other => err(
            "type",
            format!("unknown probe type '{other}': use http, tcp or exec"),
        ),
    }
    if let Some(port) = &p.port {
        match port {
            PortRef::Number(n) if !(1..=65535).contains(n) => {
                err("port", format!("port must be between 1 and 65535, got {n}"))
            }
            PortRef::Name(n) if !port_ref_ok(s, port) => err("port", format!("no port named '{n}' in ports")),
            _ => {}
        }
    }
    for (f, v, min) in [
        ("initialDelaySeconds", p.initial_delay_seconds, 0),
        ("intervalSeconds", p.interval_seconds, 1),
        ("timeoutSeconds", p.timeout_seconds, 1),
        ("failureThreshold", p.failure_threshold, 1),
        ("successThreshold", p.success_threshold, 1),
    ] {
        if let Some(v) = v {
            if v < min || v > 86_400 {
                err(f, format!("must be between {min} and 86400, got {v}"));
            }
        }
    }
}

fn validate_refs(s: &ServiceSpec, root: &FieldPath, errs: &mut Vec<FieldError>) {
    if let Some(e) = &s.expose {
        if !port_ref_ok(s, &e.port) {
            errs.push(FieldError::new(
                root.key("expose").key("port"),
                "expose.port must reference a declared service port by name or number",
            ));
        }
        if let Some(path) = &e.path {
            if !path.starts_with('/') {
                errs.push(FieldError::new(
                    root.key("expose").key("path"),
                    "expose.path must start with '/'",
                ));
            }
        }
    }
    if let Some(d) = &s.discovery {
        if let Some(m) = &d.mode {
            if !matches!(m.as_str(), "round-robin" | "load-balanced" | "headless" | "none") {
                errs.push(FieldError::new(
                    root.key("discovery").key("mode"),
                    format!("mode must be round-robin, load-balanced, headless or none, got '{m}'"),
                ));
            }
        }
    }
    if let Some(a) = &s.autoscale {
        if a.enabled == Some(true) {
            if let (Some(min), Some(max)) = (a.min, a.max) {
                if max < min {
                    errs.push(FieldError::new(
                        root.key("autoscale").key("max"),
                        "autoscale max cannot be less than min",
                    ));
                }
            }
        }
    }
    if let Some(np) = &s.network_policy {
        for (i, r) in np.ingress.iter().enumerate() {
            check_peers(
                &r.from,
                &root.key("networkPolicy").key("ingress").index(i).key("from"),
                errs,
            );
            // An ingress rule's port names are this service's: one that names nothing would
            // open nothing, silently.
            for (j, name) in r
                .ports
                .iter()
                .enumerate()
                .filter_map(|(j, p)| Some((j, port_name(p)?)))
            {
                if !s.ports.iter().any(|p| p.name == name) {
                    errs.push(FieldError::new(
                        root.key("networkPolicy")
                            .key("ingress")
                            .index(i)
                            .key("ports")
                            .index(j),
                        format!("'{name}' names no port of this service ({})", port_names(s)),
                    ));
                }
            }
        }
        for (i, r) in np.egress.iter().enumerate() {
            check_peers(
                &r.to,
                &root.key("networkPolicy").key("egress").index(i).key("to"),
                errs,
            );
        }
    }
    for (i, d) in s.dependencies.iter().enumerate() {
        let at = root.key("dependencies").index(i);
        match d {
            Dependency::Short(t) if t.trim().is_empty() => {
                errs.push(FieldError::new(at, "dependency must not be empty"))
            }
            Dependency::Long(l) => {
                let n = [&l.service, &l.secret, &l.configmap]
                    .iter()
                    .filter(|x| x.is_some())
                    .count();
                if n != 1 {
                    errs.push(FieldError::new(
                        at.clone(),
                        "dependency must name exactly one of service, secret or configmap",
                    ));
                }
                if let Some(w) = &l.ready_when {
                    if !matches!(w.as_str(), "running" | "healthy" | "started") {
                        errs.push(FieldError::new(
                            at.key("readyWhen"),
                            format!("readyWhen must be running, healthy or started, got '{w}'"),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(ef) = &s.env_from {
        let items: Vec<&EnvFrom> = match ef {
            EnvFromList::Many(v) => v.iter().collect(),
            EnvFromList::One(e) => vec![e],
        };
        for (i, e) in items.into_iter().enumerate() {
            let ok = match e {
                EnvFrom::Short(t) => {
                    let t = t.trim().trim_start_matches("{{").trim_end_matches("}}").trim();
                    t.starts_with("secret:") || t.starts_with("configmap:")
                }
                EnvFrom::Long(l) => {
                    [&l.secret, &l.configmap, &l.secret_ref, &l.config_ref]
                        .iter()
                        .filter(|x| x.is_some())
                        .count()
                        == 1
                }
            };
            if !ok {
                errs.push(FieldError::new(
                    root.key("envFrom").index(i),
                    format!("envFrom item at index {i} must specify exactly one of 'secret' or 'configmap'"),
                ));
            }
        }
    }
}

fn check_peers(peers: &[Peer], at: &FieldPath, errs: &mut Vec<FieldError>) {
    if peers.is_empty() {
        errs.push(FieldError::new(at.clone(), "rule must list at least one peer"));
    }
    for (j, p) in peers.iter().enumerate() {
        if p.service.is_none() && p.namespace.is_none() && p.cidr.is_none() && p.service_selector.is_none() {
            errs.push(FieldError::new(
                at.index(j),
                "peer must specify service, namespace, serviceSelector or cidr",
            ));
        }
        // One kind of peer per entry (a service may name its namespace): a combination would
        // be read as the wider of the two and open more than was written.
        let kinds = [
            p.service.is_some() || p.namespace.is_some(),
            p.cidr.is_some(),
            p.service_selector.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() > 1 {
            errs.push(FieldError::new(
                at.index(j),
                "peer must be one of: service (with an optional namespace), namespace, serviceSelector or cidr; write separate peers to allow several",
            ));
        }
        if let Some(c) = &p.cidr {
            if !valid_cidr(c) {
                errs.push(FieldError::new(
                    at.index(j).key("cidr"),
                    format!("'{c}' is not a valid CIDR"),
                ));
            }
        }
    }
}

fn valid_cidr(c: &str) -> bool {
    let Some((ip, len)) = c.split_once('/') else {
        return false;
    };
    let Ok(len) = len.parse::<u8>() else { return false };
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => len <= 32,
        Ok(std::net::IpAddr::V6(_)) => len <= 128,
        Err(_) => false,
    }
}

fn check_request_limit(
    rl: &RequestLimit,
    at: &FieldPath,
    parse: fn(&str) -> Result<u64, String>,
    errs: &mut Vec<FieldError>,
) {
    let mut parsed = [None, None];
    for (i, (f, v)) in [("request", &rl.request), ("limit", &rl.limit)]
        .into_iter()
        .enumerate()
    {
        if let Some(v) = v {
            match parse(v.as_str()) {
                Ok(n) => parsed[i] = Some(n),
                Err(m) => errs.push(FieldError::new(at.key(f), m)),
            }
        }
    }
    if let [Some(req), Some(lim)] = parsed {
        if req > lim {
            errs.push(FieldError::new(at.key("request"), "request cannot exceed limit"));
        }
    }
}

/// Parses `500m`, `0.5` or `2` into millicores.
pub fn parse_cpu_millis(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let bad = || format!("'{v}' is not a CPU quantity such as 500m or 0.5");
    if let Some(m) = v.strip_suffix('m') {
        return m.parse::<u64>().map_err(|_| bad());
    }
    let f: f64 = v.parse().map_err(|_| bad())?;
    if !(0.0..=1e6).contains(&f) {
        return Err(bad());
    }
    Ok((f * 1000.0).round() as u64)
}

/// Parses `256Mi`, `1G`, `128974848` into bytes.
pub fn parse_memory_bytes(v: &str) -> Result<u64, String> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{v}' is not a memory quantity such as 256Mi"))?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024f64.powi(2),
        "gi" => 1024f64.powi(3),
        "ti" => 1024f64.powi(4),
        _ => {
            return Err(format!(
                "unknown memory unit '{unit}' in '{v}': use Ki, Mi, Gi, Ti, k, M, G or T"
            ))
        }
    };
    Ok((n * mult).round() as u64)
}

/// Checks an `env` value template, so that `{{secret:x}}` without a key is caught before it is cast.
pub fn env_reference_ok(v: &str) -> bool {
    let mut end = 0;
    for (at, inner) in crate::uses::templates(v) {
        if crate::uses::template_ref(inner).is_some() && !inner.contains('/') {
            return false;
        }
        end = at.end;
    }
    // An opening left without its closing.
    !v[end..].contains("{{")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::PortSpec;

    fn svc() -> ServiceSpec {
        ServiceSpec {
            name: "api".into(),
            image: Some("busybox".into()),
            ..Default::default()
        }
    }

    #[test]
    fn dns_names() {
        assert!(dns1123_label("api-2").is_ok());
        assert!(dns1123_label("Api").is_err());
        assert!(dns1123_label("-a").is_err());
        assert!(dns1123_label(&"a".repeat(64)).is_err());
        assert!(dns1123_label("").is_err());
    }

    #[test]
    fn a_peer_is_one_kind() {
        let mut s = svc();
        s.network_policy = Some(crate::spec::NetworkPolicy {
            ingress: vec![crate::spec::IngressRule {
                from: vec![
                    Peer {
                        service: Some("web".into()),
                        namespace: Some("prod".into()),
                        ..Default::default()
                    },
                    Peer {
                        namespace: Some("data".into()),
                        cidr: Some("10.0.0.0/8".into()),
                        ..Default::default()
                    },
                ],
                ports: vec![],
            }],
            egress: vec![],
        });
        let errs = validate_service(&s);
        let paths: Vec<String> = errs.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(paths, ["networkPolicy.ingress[0].from[1]"], "{errs:?}");
    }

    #[test]
    fn negative_scale_and_duplicate_ports_are_named() {
        let mut s = svc();
        s.scale = Some(-1);
        s.ports = vec![
            PortSpec {
                name: "http".into(),
                port: 80,
                ..Default::default()
            },
            PortSpec {
                name: "http".into(),
                port: 80,
                ..Default::default()
            },
        ];
        let paths: Vec<String> = validate_service(&s).iter().map(|e| e.path.to_string()).collect();
        assert!(paths.contains(&"scale".into()));
        assert!(paths.contains(&"ports[1].name".into()));
        assert!(paths.contains(&"ports[1].port".into()));
    }

    #[test]
    fn stop_timings_are_bounded_and_named() {
        let mut s = svc();
        s.stop_grace_period_seconds = Some(3601);
        s.drain_seconds = Some(-1);
        let errs = validate_service(&s);
        let named: Vec<(String, String)> = errs
            .iter()
            .map(|e| (e.path.to_string(), e.message.clone()))
            .collect();
        assert!(
            named.contains(&("drainSeconds".into(), "must be between 0 and 300, got -1".into())),
            "{named:?}"
        );
        assert!(
            named.iter().any(|(p, _)| p == "stopGracePeriodSeconds"),
            "{named:?}"
        );
        s.stop_grace_period_seconds = Some(30);
        s.drain_seconds = Some(301);
        assert_eq!(validate_service(&s).len(), 1);
        s.drain_seconds = Some(300);
        assert!(validate_service(&s).is_empty());
    }

    #[test]
    fn image_xor_process() {
        let mut s = svc();
        s.image = None;
        assert_eq!(validate_service(&s)[0].path.to_string(), "image");
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_cpu_millis("500m"), Ok(500));
        assert_eq!(parse_cpu_millis("0.5"), Ok(500));
        assert_eq!(parse_memory_bytes("1Ki"), Ok(1024));
        assert!(parse_memory_bytes("1Qi").is_err());
    }

    #[test]
    fn exposed_hosts_are_plain_dns_names() {
        for ok in ["api.example.com", "Web.Test", "localhost", "a-1.b2.local"] {
            assert_eq!(exposed_host(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("https://api.example.com", "is a URL"),
            ("*.example.com", "wildcard"),
            ("api.example.com:8443", "without a port"),
            ("api.example.com/v1", "without a port or a path"),
            ("api..example.com", "empty label"),
            ("api.example.com.", "empty label"),
            ("-api.example.com", "must start and end"),
            ("api_1.example.com", "only lowercase letters"),
            ("my api.example.com", "only lowercase letters"),
        ] {
            let e = exposed_host(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(exposed_host(&long).unwrap_err().contains("at most 63"));
        // In a spec: named by its field, and only for entries of format v3 on.
        let s: ServiceSpec = serde_json::from_value(serde_json::json!({"name": "web", "image": "x",
            "ports": [{"name": "http", "port": 80}], "expose": {"port": "http", "host": "http://web.test"}}))
        .unwrap();
        let paths: Vec<String> = validate_service(&s).iter().map(|e| e.path.to_string()).collect();
        assert_eq!(paths, ["expose.host"]);
        assert!(validate_service_at(&s, 2).is_empty());
    }
}
