//! Castfiles: the original Rune's YAML (top-level `service:`, `services:`, `namespace:`, repeated
//! keys, several `---` documents) turned into typed resources, with every problem located as
//! `file:line`.

use std::fmt;
use std::path::{Path, PathBuf};

use rune_statemachine::command::parse_resource;
use rune_statemachine::decode::{FieldError, FieldPath};
use rune_statemachine::Resource;

use crate::yaml::{self, Node, NodeKind};

/// Largest castfile read; a spec is configuration, and a 10 MiB one is a mistake.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// A problem at a place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: String,
    /// 1-based line, 0 when the problem is the whole file.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.file.is_empty() {
            write!(f, "{}", self.message)
        } else if self.line > 0 {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(f, "{}: {}", self.file, self.message)
        }
    }
}

/// A resource kind the castfile format knows but this release cannot cast yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// `secret`, `configmap`, ...
    pub kind: String,
    /// Its name, if it has one.
    pub name: String,
    /// Where it is.
    pub file: String,
    /// Its line.
    pub line: usize,
}

/// A decoded resource and where it came from.
#[derive(Debug, Clone)]
pub struct Located {
    /// The resource.
    pub resource: Resource,
    /// Its file.
    pub file: String,
    /// The line its block starts on.
    pub line: usize,
}

/// Everything read from a set of castfiles.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Resources that decoded and validated.
    pub resources: Vec<Located>,
    /// Kinds recognised but not castable by this release.
    pub unsupported: Vec<Unsupported>,
    /// Every problem found.
    pub problems: Vec<Problem>,
    /// Services marked `skip: true`.
    pub skipped: Vec<String>,
    /// Files that are runefiles (server configuration), not castfiles.
    pub runefiles: Vec<String>,
    /// Secrets, still plaintext: the server seals them.
    pub secrets: Vec<LocatedSecret>,
    /// The namespace of resources that name none (a runeset's); `default` when unset.
    pub default_namespace: Option<String>,
}

/// A secret read from a castfile, validated but not sealed.
#[derive(Debug, Clone)]
pub struct LocatedSecret {
    /// The spec as written.
    pub spec: rune_statemachine::secret::SecretSpec,
    /// Its file.
    pub file: String,
    /// Its line.
    pub line: usize,
}

/// Top-level keys of a runefile; a document with two of them and no castfile key is one.
const RUNEFILE_KEYS: [&str; 16] = [
    "server",
    "data_dir",
    "data-dir",
    "client",
    "docker",
    "auth",
    "resources",
    "log",
    "secret",
    "plugins",
    "storage",
    "telemetry",
    "networking",
    "ingress",
    "acme",
    "crypto",
];

fn is_runefile(pairs: &[(Node, Node)]) -> bool {
    let keys: Vec<&str> = pairs.iter().filter_map(|(k, _)| k.as_str()).collect();
    let castfile = keys.iter().any(|k| {
        matches!(
            *k,
            "service" | "services" | "namespaces" | "secrets" | "configmap" | "configmaps"
        )
    });
    !castfile && keys.iter().filter(|k| RUNEFILE_KEYS.contains(k)).count() >= 2
}

const LATER_KINDS: [(&str, &str); 4] = [
    ("policy", "policy"),
    ("policies", "policy"),
    ("runeset", "runeset"),
    ("job", "job"),
];

/// Replaces `{{ ... }}` with placeholders so unquoted templates are valid YAML; returns the
/// originals to restore after parsing.
pub(crate) fn hide_templates(text: &str) -> (String, Vec<String>) {
    let mut out = String::with_capacity(text.len());
    let mut saved = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        out.push_str(&format!("__rune_template_{}__", saved.len()));
        saved.push(rest[start..start + len + 2].to_string());
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    (out, saved)
}

pub(crate) fn restore_templates(node: &mut Node, saved: &[String]) {
    if saved.is_empty() {
        return;
    }
    node.map_strings(&|s: &str| {
        if !s.contains("__rune_template_") {
            return None;
        }
        let mut out = s.to_string();
        for (i, t) in saved.iter().enumerate().rev() {
            out = out.replace(&format!("__rune_template_{i}__"), t);
        }
        Some(out)
    });
}

/// Parses one castfile's text.
pub fn parse_text(file: &str, text: &str, parsed: &mut Parsed) {
    let (hidden, saved) = hide_templates(text);
    let docs = match yaml::parse(&hidden) {
        Ok(d) => d,
        Err(e) => {
            parsed.problems.push(Problem {
                file: file.into(),
                line: e.line,
                message: format!("invalid YAML: {}", e.message),
            });
            return;
        }
    };
    for mut doc in docs {
        if doc.is_null() {
            continue;
        }
        restore_templates(&mut doc, &saved);
        let NodeKind::Map(pairs) = &doc.kind else {
            parsed.problems.push(Problem {
                file: file.into(),
                line: doc.line,
                message: "cast file must be a YAML mapping at the top level".into(),
            });
            continue;
        };
        if is_runefile(pairs) {
            parsed.runefiles.push(file.into());
            continue;
        }
        for (key, value) in pairs {
            let k = key.as_str().unwrap_or_default();
            let problem = |m: String| Problem {
                file: file.into(),
                line: key.line,
                message: m,
            };
            match k {
                "service" => decode_service(file, value, parsed),
                "namespace" => decode_namespace(file, value, parsed),
                "secret" => decode_secret(file, value, parsed),
                "configmap" => decode_configmap(file, value, parsed),
                "services" | "namespaces" | "secrets" | "configmaps" => match &value.kind {
                    NodeKind::Seq(items) => {
                        for item in items {
                            match k {
                                "services" => decode_service(file, item, parsed),
                                "secrets" => decode_secret(file, item, parsed),
                                "configmaps" => decode_configmap(file, item, parsed),
                                _ => decode_namespace(file, item, parsed),
                            }
                        }
                    }
                    _ => parsed.problems.push(problem(format!("'{k}' must be a list"))),
                },
                other => match LATER_KINDS.iter().find(|(key, _)| *key == other) {
                    Some((_, kind)) => {
                        let items: Vec<&Node> = match &value.kind {
                            NodeKind::Seq(items) => items.iter().collect(),
                            _ => vec![value],
                        };
                        for item in items {
                            let name = match &item.kind {
                                NodeKind::Map(p) => p
                                    .iter()
                                    .find(|(k, _)| k.as_str() == Some("name"))
                                    .and_then(|(_, v)| v.as_str())
                                    .unwrap_or_default()
                                    .to_string(),
                                _ => String::new(),
                            };
                            parsed.unsupported.push(Unsupported { kind: kind.to_string(), name, file: file.into(), line: item.line });
                        }
                    }
                    None => parsed.problems.push(problem(format!(
                        "unknown top-level key '{other}' at line {}: expected service, services, namespace, namespaces, secret(s) or configmap(s)",
                        key.line
                    ))),
                },
            }
        }
    }
}

fn located(file: &str, node: &Node, errs: &[FieldError], what: &str) -> Vec<Problem> {
    errs.iter()
        .map(|e| Problem {
            file: file.into(),
            line: node.line_of(&e.path),
            message: if e.path == FieldPath::root() {
                format!("{what}: {}", e.message)
            } else {
                format!("{what}: {}: {}", e.path, e.message)
            },
        })
        .collect()
}

fn name_of(node: &Node) -> String {
    match node.to_json().get("name") {
        Some(serde_json::Value::String(s)) => s.clone(),
        _ => "<unnamed>".into(),
    }
}

/// The node as JSON, with the default namespace filled in where the spec names none.
fn value_of(node: &Node, parsed: &Parsed) -> serde_json::Value {
    let mut value = node.to_json();
    if let (Some(ns), serde_json::Value::Object(m)) = (&parsed.default_namespace, &mut value) {
        if !matches!(m.get("namespace"), Some(serde_json::Value::String(_))) {
            m.insert("namespace".into(), serde_json::Value::String(ns.clone()));
        }
    }
    value
}

fn decode_service(file: &str, node: &Node, parsed: &mut Parsed) {
    let value = value_of(node, parsed);
    if value.get("skip") == Some(&serde_json::Value::Bool(true)) {
        parsed.skipped.push(format!("service/{}", name_of(node)));
        return;
    }
    decode_as("service", file, node, &value, parsed);
}

fn skipped(value: &serde_json::Value) -> bool {
    value.get("skip") == Some(&serde_json::Value::Bool(true))
}

fn decode_secret(file: &str, node: &Node, parsed: &mut Parsed) {
    use rune_statemachine::secret::{SecretLimits, SecretSpec};
    let value = value_of(node, parsed);
    if skipped(&value) {
        parsed.skipped.push(format!("secret/{}", name_of(node)));
        return;
    }
    let what = format!("secret \"{}\"", name_of(node));
    // The server's limits may differ; it checks again with its own.
    match rune_statemachine::decode::decode::<SecretSpec>(&value)
        .and_then(|s| s.to_data(SecretLimits::default()).map(|_| s))
    {
        Ok(spec) => parsed.secrets.push(LocatedSecret {
            spec,
            file: file.into(),
            line: node.line,
        }),
        Err(errs) => parsed.problems.extend(located(file, node, &errs, &what)),
    }
}

fn decode_configmap(file: &str, node: &Node, parsed: &mut Parsed) {
    use rune_statemachine::secret::{ConfigmapSpec, SecretLimits};
    let value = value_of(node, parsed);
    if skipped(&value) {
        parsed.skipped.push(format!("configmap/{}", name_of(node)));
        return;
    }
    let what = format!("configmap \"{}\"", name_of(node));
    match rune_statemachine::decode::decode::<ConfigmapSpec>(&value)
        .and_then(|s| s.to_configmap(SecretLimits::default()))
    {
        Ok(c) => parsed.resources.push(Located {
            resource: Resource::Configmap(c),
            file: file.into(),
            line: node.line,
        }),
        Err(errs) => parsed.problems.extend(located(file, node, &errs, &what)),
    }
}

fn decode_namespace(file: &str, node: &Node, parsed: &mut Parsed) {
    decode_as("namespace", file, node, &node.to_json(), parsed);
}

fn decode_as(kind: &str, file: &str, node: &Node, value: &serde_json::Value, parsed: &mut Parsed) {
    match parse_resource(kind, value) {
        Ok(resource) => parsed.resources.push(Located {
            resource,
            file: file.into(),
            line: node.line,
        }),
        Err(errs) => {
            let what = format!("{kind} \"{}\"", name_of(node));
            parsed.problems.extend(located(file, node, &errs, &what))
        }
    }
}

/// Expands files, directories (`*.yaml`/`*.yml`, recursively with `recursive`) and globs.
pub fn expand_paths(args: &[String], recursive: bool) -> Result<Vec<PathBuf>, Problem> {
    let mut out = Vec::new();
    for a in args {
        let p = Path::new(a);
        if p.is_dir() {
            collect_dir(p, recursive, &mut out).map_err(|e| Problem {
                file: a.clone(),
                line: 0,
                message: e.to_string(),
            })?;
        } else if p.exists() {
            out.push(p.to_path_buf());
        } else if a.contains(['*', '?', '[']) {
            let matches: Vec<PathBuf> = glob::glob(a)
                .map_err(|e| Problem {
                    file: a.clone(),
                    line: 0,
                    message: format!("bad pattern: {e}"),
                })?
                .filter_map(Result::ok)
                .filter(|p| p.is_file())
                .collect();
            if matches.is_empty() {
                return Err(Problem {
                    file: a.clone(),
                    line: 0,
                    message: "pattern matches no file".into(),
                });
            }
            out.extend(matches);
        } else {
            return Err(Problem {
                file: a.clone(),
                line: 0,
                message: "no such file or directory".into(),
            });
        }
    }
    Ok(out)
}

fn collect_dir(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            if recursive {
                collect_dir(&p, recursive, out)?;
            }
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads and parses files, refusing oversized ones before reading them.
pub fn parse_files(paths: &[PathBuf]) -> Parsed {
    let mut parsed = Parsed::default();
    for p in paths {
        let file = p.display().to_string();
        match std::fs::metadata(p) {
            Ok(m) if m.len() > MAX_FILE_BYTES => {
                parsed.problems.push(Problem {
                    file,
                    line: 0,
                    message: format!(
                        "file is {:.1} MiB; cast files are limited to {} MiB",
                        m.len() as f64 / 1048576.0,
                        MAX_FILE_BYTES / 1048576
                    ),
                });
                continue;
            }
            Err(e) => {
                parsed.problems.push(Problem {
                    file,
                    line: 0,
                    message: e.to_string(),
                });
                continue;
            }
            Ok(_) => {}
        }
        match std::fs::read_to_string(p) {
            Ok(text) => parse_text(&file, &text, &mut parsed),
            Err(e) => parsed.problems.push(Problem {
                file,
                line: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    finish(&mut parsed);
    parsed
}

/// Runs the checks that need every file read, and orders the problems by place.
pub fn finish(parsed: &mut Parsed) {
    check_together(parsed);
    parsed
        .problems
        .sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
}

/// What only the files together decide: an object declared twice, a dependency cycle among
/// the services given, an egress rule naming a port the peer service (given too) does not have.
fn check_together(parsed: &mut Parsed) {
    use rune_statemachine::deps::{find_cycle, resolve, DepKind};
    use std::collections::BTreeMap;
    let mut seen: BTreeMap<(String, String, String), (String, usize)> = BTreeMap::new();
    let mut problems = Vec::new();
    let ids = parsed
        .resources
        .iter()
        .map(|l| {
            let (kind, ns, name) = match &l.resource {
                Resource::Service(s) => ("service", s.namespace().to_string(), s.name.clone()),
                Resource::Namespace(n) => ("namespace", String::new(), n.name.clone()),
                Resource::Secret(x) => ("secret", x.namespace.clone(), x.name.clone()),
                Resource::Configmap(c) => ("configmap", c.namespace.clone(), c.name.clone()),
            };
            ((kind.to_string(), ns, name), (l.file.clone(), l.line))
        })
        .chain(parsed.secrets.iter().map(|l| {
            (
                (
                    "secret".to_string(),
                    l.spec.namespace().to_string(),
                    l.spec.name.clone(),
                ),
                (l.file.clone(), l.line),
            )
        }));
    for (id, at) in ids {
        if let Some(first) = seen.get(&id) {
            let what = if id.1.is_empty() {
                format!("{} {}", id.0, id.2)
            } else {
                format!("{} {}/{}", id.0, id.1, id.2)
            };
            problems.push(Problem {
                file: at.0.clone(),
                line: at.1,
                message: format!("{what} is declared twice (first at {}:{})", first.0, first.1),
            });
        } else {
            seen.insert(id, at);
        }
    }
    // The first declaration of each service (a second one is a problem above).
    let mut services: BTreeMap<(String, String), &Located> = BTreeMap::new();
    for l in &parsed.resources {
        if let Resource::Service(s) = &l.resource {
            services
                .entry((s.namespace().to_string(), s.name.clone()))
                .or_insert(l);
        }
    }
    let spec = |l: &Located| match &l.resource {
        Resource::Service(s) => Some(s.clone()),
        _ => None,
    };
    let graph: BTreeMap<(String, String), Vec<(String, String)>> = services
        .iter()
        .filter_map(|(id, l)| Some((id.clone(), spec(l)?)))
        .map(|(id, s)| {
            let deps = resolve(&s)
                .into_iter()
                .filter(|d| d.kind == DepKind::Service)
                .map(|d| (d.namespace, d.name))
                .filter(|d| services.contains_key(d))
                .collect();
            (id, deps)
        })
        .collect();
    let mut cycles = std::collections::BTreeSet::new();
    for (id, l) in &services {
        if let Some(cycle) = find_cycle(&graph, id) {
            let mut members: Vec<&str> = cycle.split(" -> ").collect();
            members.sort_unstable();
            members.dedup();
            if cycles.insert(members.join(",")) {
                problems.push(Problem {
                    file: l.file.clone(),
                    line: l.line,
                    message: format!("service {}/{}: dependency cycle: {cycle}", id.0, id.1),
                });
            }
        }
    }
    for ((ns, name), l) in &services {
        let Some(s) = spec(l) else { continue };
        let Some(np) = &s.network_policy else { continue };
        for (i, r) in np.egress.iter().enumerate() {
            for peer in &r.to {
                let Some(target) = &peer.service else { continue };
                let tns = peer.namespace.clone().unwrap_or_else(|| ns.clone());
                let Some(t) = services.get(&(tns.clone(), target.clone())).and_then(|t| spec(t)) else {
                    continue;
                };
                for (j, p) in r.ports.iter().enumerate() {
                    if let Some(pn) = rune_statemachine::validate::port_name(p) {
                        if !t.ports.iter().any(|tp| tp.name == pn) {
                            problems.push(Problem {
                                file: l.file.clone(),
                                line: l.line,
                                message: format!(
                                    "service {ns}/{name}: networkPolicy.egress[{i}].ports[{j}]: '{pn}' names no port of service {tns}/{target} ({})",
                                    rune_statemachine::validate::port_names(&t)
                                ),
                            });
                        }
                    }
                }
            }
        }
    }
    parsed.problems.extend(problems);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Parsed {
        let mut p = Parsed::default();
        parse_text("t.yaml", text, &mut p);
        p
    }

    #[test]
    fn repeated_keys_lists_and_documents() {
        let p = parse(
            "service:\n  name: a\n  image: x\nservice:\n  name: b\n  image: x\n---\nservices:\n  - name: c\n    image: x\nnamespace:\n  name: team\n",
        );
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.resources.len(), 4);
    }

    #[test]
    fn unknown_fields_are_located() {
        let p = parse("service:\n  name: a\n  image: x\n  bogus: 1\n  health:\n    liveness:\n      type: tcp\n      port: 80\n      nope: 2\n");
        let lines: Vec<usize> = p.problems.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![4, 9], "{:?}", p.problems);
        assert!(p.problems[0].message.contains("unknown field 'bogus'"));
    }

    #[test]
    fn unknown_top_level_key_and_later_kinds() {
        let p = parse("servce:\n  name: a\nsecret:\n  name: s\n  data: {a: b}\npolicy:\n  name: p\n");
        assert_eq!(p.problems.len(), 1);
        assert_eq!(p.problems[0].line, 1);
        assert_eq!(p.secrets[0].spec.name, "s");
        assert_eq!(p.unsupported[0].kind, "policy");
        assert_eq!(p.unsupported[0].name, "p");
    }

    #[test]
    fn secrets_and_configmaps_in_every_form() {
        let p = parse(
            "secrets:\n  - name: a\n    data:\n      - key: u\n        value: x\n      - key: b\n        valueBase64: AAE=\n\
             secret:\n  name: c\n  stringData: {k: v}\n\
             configmaps:\n  - name: m\n    data: {port: 8080}\n\
             secret:\n  name: bad\n  data:\n    - key: x\n      valueBase64: '%%%'\n",
        );
        let names: Vec<&str> = p.secrets.iter().map(|s| s.spec.name.as_str()).collect();
        assert_eq!(names, vec!["a", "c"]);
        assert_eq!(p.resources.len(), 1);
        assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
        assert!(p.problems[0].message.contains("valueBase64"), "{}", p.problems[0]);
    }

    #[test]
    fn templates_survive_unquoted() {
        let p = parse("service:\n  name: a\n  image: x\n  env:\n    A: {{ secret: db/password }}\n");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let Resource::Service(s) = &p.resources[0].resource else {
            panic!()
        };
        assert_eq!(s.env["A"].as_str(), "{{ secret: db/password }}");
    }

    #[test]
    fn validation_errors_are_located() {
        let p = parse(
            "service:\n  name: a\n  image: x\n  scale: -1\n  ports:\n    - name: http\n      port: 70000\n",
        );
        let lines: Vec<usize> = p.problems.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![4, 7], "{:?}", p.problems);
    }
}
