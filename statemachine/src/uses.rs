//! Which secrets and configmaps a service reads, in every form the original accepts. One
//! reading, shared by the orchestrator (which resolves them when an instance starts) and the
//! store (which refuses deleting one a service still uses): if the two read a spec
//! differently, a deletion the store allowed would fail a start later.

use crate::deps::{resolve, DepKind};
use crate::spec::{EnvFrom, EnvFromList, ServiceSpec};

/// `name`, `name.ns` or `name.ns.rune` as (namespace, name); `default_ns` when none is named.
pub fn split_object_ref(r: &str, default_ns: &str) -> (String, String) {
    let r = r.trim().trim_end_matches(".rune");
    match r.split_once('.') {
        Some((name, ns)) if !ns.is_empty() => (ns.to_string(), name.to_string()),
        _ => (default_ns.to_string(), r.to_string()),
    }
}

/// The inside of an env template, `secret:name/key` or `configmap:name/key`: (whether a
/// secret, the object as written, the key). None for anything else, which stays literal.
pub fn template_ref(inner: &str) -> Option<(bool, &str, &str)> {
    let (head, tail) = inner.trim().split_once(':')?;
    let secret = match head.trim() {
        "secret" => true,
        "configmap" => false,
        _ => return None,
    };
    let (obj, key) = tail.trim().split_once('/').unwrap_or((tail.trim(), ""));
    Some((secret, obj, key.trim()))
}

/// The `{{…}}` templates of a value, in order: (byte range of the whole template, its inside).
/// An opening without a closing ends the scan, as it stays literal.
pub fn templates(v: &str) -> impl Iterator<Item = (std::ops::Range<usize>, &str)> {
    let mut from = 0;
    std::iter::from_fn(move || {
        let start = from + v.get(from..)?.find("{{")?;
        let len = v[start..].find("}}")?;
        from = start + len + 2;
        Some((start..from, &v[start + 2..start + len]))
    })
}

/// One `envFrom` source, resolved to the object it imports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvSource {
    /// A secret (else a configmap).
    pub secret: bool,
    /// The object's namespace.
    pub namespace: String,
    /// The object's name.
    pub name: String,
    /// Put before each imported key.
    pub prefix: String,
}

/// The `envFrom` sources of `spec`, in order.
pub fn env_sources(spec: &ServiceSpec) -> Vec<EnvSource> {
    let own = spec.namespace();
    let items: Vec<&EnvFrom> = match &spec.env_from {
        Some(EnvFromList::Many(v)) => v.iter().collect(),
        Some(EnvFromList::One(e)) => vec![e],
        None => vec![],
    };
    items
        .into_iter()
        .map(|e| match e {
            EnvFrom::Short(t) => {
                let t = t.trim().trim_start_matches("{{").trim_end_matches("}}").trim();
                let (head, name) = t.split_once(':').unwrap_or(("", t));
                let (namespace, name) = split_object_ref(name, own);
                EnvSource {
                    secret: head.trim() == "secret",
                    namespace,
                    name,
                    prefix: String::new(),
                }
            }
            EnvFrom::Long(x) => {
                let secret = x.secret.is_some() || x.secret_ref.is_some();
                let obj = x
                    .secret
                    .as_ref()
                    .or(x.secret_ref.as_ref())
                    .or(x.configmap.as_ref())
                    .or(x.config_ref.as_ref())
                    .map_or("", String::as_str);
                let (namespace, name) = match &x.namespace {
                    Some(n) => (n.clone(), obj.to_string()),
                    None => split_object_ref(obj, own),
                };
                EnvSource {
                    secret,
                    namespace,
                    name,
                    prefix: x.prefix.clone().unwrap_or_default(),
                }
            }
        })
        .collect()
}

/// A secret or configmap a service needs, and the field that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUse {
    /// A secret (else a configmap).
    pub secret: bool,
    /// The object's namespace.
    pub namespace: String,
    /// The object's name.
    pub name: String,
    /// Where the spec names it, as users write it (`env.DB_PASSWORD`, `secretMounts[0]`).
    pub field: String,
}

/// Every secret and configmap `spec` needs for its instances to start (or, for a manual TLS
/// certificate, for its host to be served with it). Optional dependencies are not needs.
pub fn objects_used(spec: &ServiceSpec) -> Vec<ObjectUse> {
    let own = spec.namespace();
    let mut out = Vec::new();
    let mut add = |secret: bool, (namespace, name): (String, String), field: String| {
        out.push(ObjectUse {
            secret,
            namespace,
            name,
            field,
        })
    };
    for (i, d) in resolve(spec).into_iter().enumerate() {
        let secret = match d.kind {
            DepKind::Secret => true,
            DepKind::Configmap => false,
            DepKind::Service => continue,
        };
        if !d.optional {
            add(secret, (d.namespace, d.name), format!("dependencies[{i}]"));
        }
    }
    // Env and mounts are read from the service's own namespace only (a start that names
    // another's fails whatever exists there), so only those are needs.
    let mut read = |secret: bool, (namespace, name): (String, String), field: String| {
        if namespace == own {
            add(secret, (namespace, name), field);
        }
    };
    for (i, s) in env_sources(spec).into_iter().enumerate() {
        read(s.secret, (s.namespace, s.name), format!("envFrom[{i}]"));
    }
    for (k, v) in &spec.env {
        for (_, inner) in templates(v.as_str()) {
            if let Some((secret, obj, _)) = template_ref(inner) {
                read(secret, split_object_ref(obj, own), format!("env.{k}"));
            }
        }
    }
    let mounts = [
        (true, "secretMounts", &spec.secret_mounts),
        (false, "configMounts", &spec.config_mounts),
        (false, "configmapMounts", &spec.configmap_mounts),
    ];
    for (secret, field, list) in mounts {
        for (i, m) in list.iter().enumerate() {
            read(
                secret,
                split_object_ref(m.source(secret), own),
                format!("{field}[{i}]"),
            );
        }
    }
    // The ingress's reading: ACME wins over `manual`, and only an exposed host has one.
    let manual = spec
        .expose
        .as_ref()
        .filter(|e| e.host().is_some())
        .and_then(|e| e.tls.as_ref())
        .filter(|t| t.auto != Some(true) && t.mode.as_deref() == Some("manual"));
    let named = manual.and_then(|t| match (&t.secret_name, &t.secret) {
        (Some(n), _) => Some((n, "expose.tls.secretName")),
        (None, Some(n)) => Some((n, "expose.tls.secret")),
        (None, None) => None,
    });
    if let Some((name, field)) = named {
        read(true, (own.to_string(), name.clone()), field.into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_reference_is_read() {
        let s: ServiceSpec = serde_json::from_value(serde_json::json!({
            "name": "api",
            "namespace": "shop",
            "image": "x",
            "env": {
                "A": "pre-{{ secret:db/password }}-{{configmap:cfg.other/mode}}-{{unknown:x}}",
                "B": "{{secret:open",
            },
            "envFrom": [
                "secret:creds",
                {"configRef": "settings", "prefix": "S_"},
                {"secret": "far", "namespace": "elsewhere"},
            ],
            "secretMounts": [
                {"name": "tls", "mountPath": "/tls"},
                {"name": "m", "mountPath": "/m", "secretName": "keys.shop.rune"},
            ],
            "configmapMounts": [{"name": "files", "mountPath": "/f", "configmapName": "nginx"}],
            "dependencies": ["secret:token", {"configmap": "maybe", "optional": true}, "db"],
            "expose": {"port": "http", "host": "a.test", "tls": {"mode": "manual", "secretName": "cert"}},
        }))
        .unwrap();
        let got: Vec<String> = objects_used(&s)
            .iter()
            .map(|u| {
                let kind = if u.secret { "secret" } else { "configmap" };
                format!("{} {kind} {}/{}", u.field, u.namespace, u.name)
            })
            .collect();
        assert_eq!(
            got,
            [
                "dependencies[0] secret shop/token",
                "envFrom[0] secret shop/creds",
                "envFrom[1] configmap shop/settings",
                "env.A secret shop/db",
                "secretMounts[0] secret shop/tls",
                "secretMounts[1] secret shop/keys",
                "configmapMounts[0] configmap shop/nginx",
                "expose.tls.secretName secret shop/cert",
            ]
        );
    }

    #[test]
    fn templates_are_found_where_they_close() {
        let v = "a{{x}}b{{ y }}{{open";
        let found: Vec<(std::ops::Range<usize>, &str)> = templates(v).collect();
        assert_eq!(found, [(1..6, "x"), (7..14, " y ")]);
        assert_eq!(template_ref(" secret: db/pw "), Some((true, "db", "pw")));
        assert_eq!(template_ref("configmap:cfg"), Some((false, "cfg", "")));
        assert_eq!(template_ref("other:x/y"), None);
    }
}
