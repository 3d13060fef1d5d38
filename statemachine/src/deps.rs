//! Dependencies between services: the original's short string forms normalised, and cycles found.

use std::collections::BTreeMap;

use crate::spec::{Dependency, ServiceSpec};

/// What kind of object a dependency names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepKind {
    /// A service: its instances must reach `ready_when`.
    Service,
    /// A secret: it must exist.
    Secret,
    /// A configmap: it must exist.
    Configmap,
}

/// When a service dependency counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyWhen {
    /// At least one instance has started (any phase after scheduling).
    Started,
    /// At least one instance runs.
    Running,
    /// At least one instance runs and passes readiness (the default).
    Healthy,
}

/// One normalised dependency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DepRef {
    /// Kind of object.
    pub kind: DepKind,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// When a service dependency is ready.
    pub ready_when: ReadyWhen,
    /// How long instances wait before starting anyway (optional) or failing (required).
    pub timeout_seconds: Option<i64>,
    /// Start anyway when it is missing or not ready in time.
    pub optional: bool,
}

impl DepRef {
    /// `default/db`, as users read it.
    pub fn display(&self) -> String {
        let kind = match self.kind {
            DepKind::Service => "",
            DepKind::Secret => "secret:",
            DepKind::Configmap => "configmap:",
        };
        format!("{kind}{}/{}", self.namespace, self.name)
    }
}

/// Splits `name`, `name.ns` or `name.ns.rune` into (namespace, name).
fn split_dotted(s: &str, own_ns: &str) -> (String, String) {
    let s = s.trim().strip_suffix(".rune").unwrap_or(s.trim());
    match s.split_once('.') {
        Some((name, ns)) => (ns.to_string(), name.to_string()),
        None => (own_ns.to_string(), s.to_string()),
    }
}

/// The dependencies of a service in one form.
pub fn resolve(spec: &ServiceSpec) -> Vec<DepRef> {
    let own_ns = spec.namespace();
    spec.dependencies
        .iter()
        .map(|d| match d {
            Dependency::Short(s) => {
                let (kind, rest) = match s.split_once(':') {
                    Some(("secret", r)) => (DepKind::Secret, r),
                    Some(("configmap", r)) => (DepKind::Configmap, r),
                    Some(("service", r)) => (DepKind::Service, r),
                    _ => (DepKind::Service, s.as_str()),
                };
                let (namespace, name) = split_dotted(rest, own_ns);
                DepRef {
                    kind,
                    namespace,
                    name,
                    ready_when: ReadyWhen::Healthy,
                    timeout_seconds: None,
                    optional: false,
                }
            }
            Dependency::Long(l) => {
                let (kind, name) = match (&l.service, &l.secret, &l.configmap) {
                    (Some(n), _, _) => (DepKind::Service, n),
                    (None, Some(n), _) => (DepKind::Secret, n),
                    (None, None, Some(n)) => (DepKind::Configmap, n),
                    // Validation refuses this; an empty name never matches anything.
                    (None, None, None) => (DepKind::Service, &String::new()),
                };
                let (ns_in_name, name) = split_dotted(name, own_ns);
                DepRef {
                    kind,
                    namespace: l.namespace.clone().unwrap_or(ns_in_name),
                    name,
                    ready_when: match l.ready_when.as_deref() {
                        Some("started") => ReadyWhen::Started,
                        Some("running") => ReadyWhen::Running,
                        _ => ReadyWhen::Healthy,
                    },
                    timeout_seconds: l.timeout_seconds,
                    optional: l.optional.unwrap_or(false),
                }
            }
        })
        .collect()
}

/// A service as `ns/name`.
pub type ServiceId = (String, String);

/// The first cycle through `start` in a graph of service dependencies, as `ns/a -> ns/b -> ns/a`.
pub fn find_cycle(graph: &BTreeMap<ServiceId, Vec<ServiceId>>, start: &ServiceId) -> Option<String> {
    fn dfs(
        graph: &BTreeMap<ServiceId, Vec<ServiceId>>,
        node: &ServiceId,
        start: &ServiceId,
        path: &mut Vec<ServiceId>,
        seen: &mut std::collections::BTreeSet<ServiceId>,
    ) -> bool {
        for next in graph.get(node).into_iter().flatten() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if dfs(graph, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.clone()];
    let mut seen = std::collections::BTreeSet::new();
    if dfs(graph, start, start, &mut path, &mut seen) {
        path.push(start.clone());
        Some(
            path.iter()
                .map(|(ns, n)| format!("{ns}/{n}"))
                .collect::<Vec<_>>()
                .join(" -> "),
        )
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ServiceId {
        let (a, b) = s.split_once('/').unwrap();
        (a.into(), b.into())
    }

    #[test]
    fn short_forms() {
        let spec: ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": "api", "namespace": "prod", "image": "x",
            "dependencies": ["db", "cache.shared", "db2.other.rune", "secret:creds", "configmap:cfg.x",
                {"service": "q", "readyWhen": "started", "optional": true}]
        }))
        .unwrap();
        let d: Vec<String> = resolve(&spec).iter().map(DepRef::display).collect();
        assert_eq!(
            d,
            [
                "prod/db",
                "shared/cache",
                "other/db2",
                "secret:prod/creds",
                "configmap:x/cfg",
                "prod/q"
            ]
        );
        let q = &resolve(&spec)[5];
        assert!(q.optional && q.ready_when == ReadyWhen::Started);
    }

    #[test]
    fn cycles() {
        let mut g = BTreeMap::new();
        g.insert(id("d/a"), vec![id("d/b")]);
        g.insert(id("d/b"), vec![id("d/c")]);
        g.insert(id("d/c"), vec![id("d/a")]);
        g.insert(id("d/x"), vec![id("d/a")]);
        assert_eq!(
            find_cycle(&g, &id("d/a")).as_deref(),
            Some("d/a -> d/b -> d/c -> d/a")
        );
        assert_eq!(find_cycle(&g, &id("d/x")), None);
        g.insert(id("d/s"), vec![id("d/s")]);
        assert_eq!(find_cycle(&g, &id("d/s")).as_deref(), Some("d/s -> d/s"));
    }
}
