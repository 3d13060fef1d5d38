//! Runesets: a directory (or a `.runeset.tgz` of one) of templated casts and the values they
//! take, rendered by the CLI into ordinary castfiles. `{{ values: .. }}`, `{{ context: .. }}`,
//! `{{ file: .. }}` and `{{ template: .. }}` are replaced here; `{{ secret: .. }}` and
//! `{{ configmap: .. }}` stay in the text for runed to resolve when it starts an instance.
//!
//! Rendering is text substitution, as in the original Rune, so a placeholder may sit inside a
//! quoted string or a block scalar; only a mapping or list value is emitted as YAML (flow
//! form) and only where it stands as a whole value.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::castfile::{self, Problem};
use crate::yaml::{self, NodeKind};

/// The manifest that makes a directory a runeset.
pub const MANIFEST: &str = "runeset.yaml";
/// The suffix `rune pack` writes and `rune cast` recognises.
pub const ARCHIVE_SUFFIX: &str = ".runeset.tgz";
/// Deepest chain of `template:`/`file:` includes; deeper is a loop in all but name.
const MAX_DEPTH: usize = 32;
/// Passes that resolve values referring to other values.
const FIXPOINT_PASSES: usize = 3;
/// Largest archive unpacked, all files together.
const MAX_ARCHIVE_BYTES: u64 = 100 * 1024 * 1024;
/// Environment variables that set values: `RUNE_VALUES_app__tag=v` sets `app.tag`.
const ENV_PREFIX: &str = "RUNE_VALUES_";

/// `runeset.yaml`.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    /// The runeset's name, and the release name unless `--release` says otherwise.
    pub name: String,
    /// Its version, recorded with the release.
    pub version: String,
    /// One line on what it is.
    pub description: String,
    /// Where its casts go unless they name a namespace (or `-n` overrides).
    pub namespace: Option<String>,
    /// The lowest-precedence values.
    pub defaults: Map<String, Value>,
    /// Keys the manifest has that this release does not know (reported, not refused).
    pub unknown: Vec<String>,
}

/// What the user chose on the command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `-f/--values FILE`, in order; later files win.
    pub values_files: Vec<PathBuf>,
    /// `--set a.b=v`, in order; highest precedence.
    pub set: Vec<String>,
    /// `-n`, when given: the effective namespace.
    pub namespace: Option<String>,
    /// `--release NAME`.
    pub release: Option<String>,
    /// `apply`, `render` or `dry-run`, visible to templates as `context:mode`.
    pub mode: &'static str,
}

/// One rendered cast.
#[derive(Debug, Clone)]
pub struct RenderedCast {
    /// Where it came from, as the user named the runeset (`app/casts/api.yaml`).
    pub file: String,
    /// The castfile text.
    pub text: String,
    /// True when includes changed the line count, so parse errors count rendered lines.
    pub lines_moved: bool,
}

/// A runeset rendered into castfiles.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The manifest.
    pub manifest: Manifest,
    /// The release name (`--release`, else the manifest's name).
    pub release: String,
    /// The effective namespace (`-n`, else the manifest's, else `default`).
    pub namespace: String,
    /// The casts, in file-name order.
    pub casts: Vec<RenderedCast>,
    /// `sha256:<hex>` of the merged values as canonical JSON: recorded with the release, so
    /// `rune release status` tells whether two casts used the same values without keeping them.
    pub values_digest: String,
}

/// A runeset on disk: the directory itself, or an archive unpacked into a temporary one.
#[derive(Debug)]
pub struct Source {
    /// The directory holding `runeset.yaml`.
    pub root: PathBuf,
    /// How the user named it, for messages.
    pub label: String,
    _unpacked: Option<tempfile::TempDir>,
}

fn problem(file: impl Into<String>, line: usize, message: impl Into<String>) -> Problem {
    Problem {
        file: file.into(),
        line,
        message: message.into(),
    }
}

/// True when the argument names a runeset: a directory with a manifest, or an archive.
pub fn is_runeset(arg: &str) -> bool {
    let p = Path::new(arg);
    p.join(MANIFEST).is_file() || (arg.ends_with(ARCHIVE_SUFFIX) && p.is_file())
}

impl Source {
    /// Opens a runeset directory, or unpacks an archive (refusing paths that leave it,
    /// links, devices and oversized contents).
    pub fn open(arg: &str) -> Result<Self, Problem> {
        let p = Path::new(arg);
        if p.is_dir() {
            if !p.join(MANIFEST).is_file() {
                return Err(problem(arg, 0, format!("not a runeset: no {MANIFEST}")));
            }
            return Ok(Self {
                root: p.to_path_buf(),
                label: arg.trim_end_matches('/').to_string(),
                _unpacked: None,
            });
        }
        let tmp = tempfile::Builder::new()
            .prefix("rune-runeset-")
            .tempdir()
            .map_err(|e| problem(arg, 0, format!("cannot make a directory to unpack into: {e}")))?;
        unpack(p, tmp.path()).map_err(|m| problem(arg, 0, m))?;
        // The manifest at the top, or in the one directory at the top.
        let mut root = tmp.path().to_path_buf();
        if !root.join(MANIFEST).is_file() {
            let dirs: Vec<PathBuf> = std::fs::read_dir(&root)
                .map_err(|e| problem(arg, 0, e.to_string()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            match dirs.as_slice() {
                [one] if one.join(MANIFEST).is_file() => root = one.clone(),
                _ => return Err(problem(arg, 0, format!("archive holds no {MANIFEST}"))),
            }
        }
        Ok(Self {
            root,
            label: arg.to_string(),
            _unpacked: Some(tmp),
        })
    }
}

fn unpack(archive: &Path, into: &Path) -> Result<(), String> {
    let f = std::fs::File::open(archive).map_err(|e| format!("cannot open: {e}"))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let mut total = 0u64;
    let entries = tar
        .entries()
        .map_err(|e| format!("not a gzip'd tar archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("corrupt archive: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("bad entry name: {e}"))?
            .into_owned();
        let shown = path.display().to_string();
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(format!("entry '{shown}' leaves the archive's directory; refused"));
        }
        let target = into.join(&path);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(|e| format!("{shown}: {e}"))?;
            }
            tar::EntryType::Regular => {
                let size = entry.size();
                total = total.saturating_add(size);
                if size > castfile::MAX_FILE_BYTES || total > MAX_ARCHIVE_BYTES {
                    return Err(format!(
                        "entry '{shown}' makes the archive too big (files up to {} MiB, {} MiB in all)",
                        castfile::MAX_FILE_BYTES >> 20,
                        MAX_ARCHIVE_BYTES >> 20
                    ));
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| format!("{shown}: {e}"))?;
                }
                let mut data = Vec::with_capacity(size as usize);
                entry
                    .by_ref()
                    .take(size)
                    .read_to_end(&mut data)
                    .map_err(|e| format!("{shown}: {e}"))?;
                std::fs::write(&target, data).map_err(|e| format!("{shown}: {e}"))?;
            }
            // pax headers and the like carry metadata only.
            tar::EntryType::XHeader | tar::EntryType::XGlobalHeader | tar::EntryType::GNULongName => {}
            other => {
                return Err(format!(
                    "entry '{shown}' is a {other:?}; a runeset archive holds files and directories only"
                ))
            }
        }
    }
    Ok(())
}

/// Reads `runeset.yaml`.
pub fn read_manifest(root: &Path, label: &str) -> Result<Manifest, Problem> {
    let file = format!("{label}/{MANIFEST}");
    let text = read_limited(&root.join(MANIFEST)).map_err(|m| problem(&file, 0, m))?;
    let docs =
        yaml::parse(&text).map_err(|e| problem(&file, e.line, format!("invalid YAML: {}", e.message)))?;
    let Some(doc) = docs.into_iter().next() else {
        return Err(problem(
            &file,
            0,
            "empty manifest: it needs at least name and version",
        ));
    };
    let NodeKind::Map(pairs) = &doc.kind else {
        return Err(problem(&file, doc.line, "the manifest must be a mapping"));
    };
    let mut m = Manifest::default();
    for (k, v) in pairs {
        let key = k.as_str().unwrap_or_default();
        let text = || match v.to_json() {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            _ => Err(problem(&file, k.line, format!("{key}: must be a string"))),
        };
        match key {
            "name" => m.name = text()?,
            "version" => m.version = text()?,
            "description" => m.description = text()?,
            "namespace" => m.namespace = Some(text()?).filter(|s| !s.is_empty()),
            "defaults" => match v.to_json() {
                Value::Object(o) => m.defaults = o,
                Value::Null => {}
                _ => return Err(problem(&file, k.line, "defaults: must be a mapping of values")),
            },
            other => m.unknown.push(other.to_string()),
        }
    }
    if m.name.is_empty() {
        return Err(problem(&file, doc.line, "name: required"));
    }
    if let Err(e) = rune_statemachine::validate::dns1123_label(&m.name) {
        return Err(problem(&file, doc.line, format!("name: {e}")));
    }
    if m.version.is_empty() {
        return Err(problem(&file, doc.line, "version: required"));
    }
    Ok(m)
}

fn read_limited(p: &Path) -> Result<String, String> {
    match std::fs::metadata(p) {
        Ok(m) if m.len() > castfile::MAX_FILE_BYTES => {
            return Err(format!(
                "file is larger than {} MiB",
                castfile::MAX_FILE_BYTES >> 20
            ))
        }
        Ok(_) => {}
        Err(e) => return Err(format!("cannot read: {e}")),
    }
    std::fs::read_to_string(p).map_err(|e| format!("cannot read: {e}"))
}

/// Merges `src` into `dst`: mappings key by key, anything else replaced.
fn merge(dst: &mut Map<String, Value>, src: Map<String, Value>) {
    for (k, v) in src {
        match (dst.get_mut(&k), v) {
            (Some(Value::Object(d)), Value::Object(s)) => merge(d, s),
            (_, v) => {
                dst.insert(k, v);
            }
        }
    }
}

/// Sets `a.b.c` to a value, making mappings on the way (replacing scalars in the way).
fn set_path(dst: &mut Map<String, Value>, path: &str, v: Value) {
    let mut segs: Vec<&str> = path.split('.').collect();
    let last = segs.pop().unwrap_or_default();
    let mut m = dst;
    for s in segs {
        let slot = m
            .entry(s.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(next) = slot else { return };
        m = next;
    }
    m.insert(last.to_string(), v);
}

/// A values file: a mapping, where unquoted `{{ .. }}` is allowed as in casts.
fn read_values_file(p: &Path, shown: &str) -> Result<Map<String, Value>, Problem> {
    let text = read_limited(p).map_err(|m| problem(shown, 0, m))?;
    let (hidden, saved) = castfile::hide_templates(&text);
    let docs =
        yaml::parse(&hidden).map_err(|e| problem(shown, e.line, format!("invalid YAML: {}", e.message)))?;
    let mut out = Map::new();
    for mut doc in docs {
        if doc.is_null() {
            continue;
        }
        castfile::restore_templates(&mut doc, &saved);
        match doc.to_json() {
            Value::Object(o) => merge(&mut out, o),
            _ => return Err(problem(shown, doc.line, "a values file must be a mapping")),
        }
    }
    Ok(out)
}

fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    v.sort();
    Ok(v)
}

/// Renders a runeset: merges its values and renders every cast.
pub fn render(src: &Source, opts: &Options) -> Result<Rendered, Problem> {
    let manifest = read_manifest(&src.root, &src.label)?;
    let casts_dir = src.root.join("casts");
    if !casts_dir.is_dir() {
        return Err(problem(&src.label, 0, "a runeset needs a casts/ directory"));
    }
    let namespace = opts
        .namespace
        .clone()
        .or_else(|| manifest.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let release = opts.release.clone().unwrap_or_else(|| manifest.name.clone());
    if let Err(e) = rune_statemachine::validate::dns1123_label(&release) {
        return Err(problem("--release", 0, format!("'{release}': {e}")));
    }

    // Values, lowest precedence first.
    let mut values = manifest.defaults.clone();
    let values_dir = src.root.join("values");
    if values_dir.is_dir() {
        for f in yaml_files(&values_dir).map_err(|e| problem(&src.label, 0, format!("values/: {e}")))? {
            let shown = format!("{}/values/{}", src.label, file_name(&f));
            merge(&mut values, read_values_file(&f, &shown)?);
        }
    }
    // `vars_os`: a variable that is not UTF-8 (ours or anyone's) is skipped, not a panic.
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let (k, v) = (k.into_string().ok()?, v.into_string().ok()?);
            Some((k.strip_prefix(ENV_PREFIX)?.replace("__", "."), v))
        })
        .collect();
    env.sort();
    for (k, v) in env {
        set_path(&mut values, &k, Value::String(v));
    }
    for f in &opts.values_files {
        let shown = f.display().to_string();
        merge(&mut values, read_values_file(f, &shown)?);
    }
    for s in &opts.set {
        let Some((k, v)) = s.split_once('=') else {
            return Err(problem(
                "--set",
                0,
                format!("'{s}': expected KEY=VALUE (KEY dotted, e.g. app.tag=v2)"),
            ));
        };
        let k = k.trim();
        if k.is_empty() || k.split('.').any(str::is_empty) {
            return Err(problem(
                "--set",
                0,
                format!("'{s}': the key must be dotted names, e.g. app.tag"),
            ));
        }
        set_path(&mut values, k, Value::String(v.to_string()));
    }
    // Reserved: what templates may read about the runeset itself.
    values.insert(
        "runeset".into(),
        serde_json::json!({
            "name": manifest.name,
            "version": manifest.version,
            "description": manifest.description,
            "effectiveNamespace": namespace,
        }),
    );
    let context = serde_json::json!({
        "namespace": namespace,
        "mode": opts.mode,
        "releaseName": release,
        "runeset": {
            "name": manifest.name,
            "version": manifest.version,
            "description": manifest.description,
            "namespace": manifest.namespace.clone().unwrap_or_default(),
            "defaults": Value::Object(manifest.defaults.clone()),
        },
    });
    let mut values = Value::Object(values);
    resolve_values(&mut values, &src.root, &context)?;

    let renderer = Renderer {
        root: &src.root,
        label: &src.label,
        values: &values,
        context: &context,
    };
    let files = yaml_files(&casts_dir).map_err(|e| problem(&src.label, 0, format!("casts/: {e}")))?;
    if files.is_empty() {
        return Err(problem(&src.label, 0, "casts/ holds no .yaml or .yml file"));
    }
    let mut casts = Vec::new();
    for f in files {
        let rel = format!("casts/{}", file_name(&f));
        let source = read_limited(&f).map_err(|m| problem(renderer.shown(&rel), 0, m))?;
        let text = renderer.render_text(&rel, &source, &mut vec![rel.clone()])?;
        casts.push(RenderedCast {
            file: renderer.shown(&rel),
            lines_moved: text.lines().count() != source.lines().count(),
            text,
        });
    }
    Ok(Rendered {
        values_digest: format!("sha256:{}", rune_statemachine::store::spec_hash(&values)),
        manifest,
        release,
        namespace,
        casts,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Lets values refer to values: string leaves are rendered until nothing changes.
fn resolve_values(values: &mut Value, root: &Path, context: &Value) -> Result<(), Problem> {
    for _ in 0..FIXPOINT_PASSES {
        let snapshot = values.clone();
        let renderer = Renderer {
            root,
            label: "values",
            values: &snapshot,
            context,
        };
        let mut changed = false;
        let mut err = None;
        walk_strings(values, "", &mut |path, s| {
            if err.is_some() || !s.contains("{{") {
                return;
            }
            match renderer.render_line(&format!("values:{path}"), 0, s, &mut Vec::new()) {
                Ok(r) if r != *s => {
                    *s = r;
                    changed = true;
                }
                Ok(_) => {}
                Err(e) => err = Some(e),
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
        if !changed {
            return Ok(());
        }
    }
    let mut left = None;
    walk_strings(values, "", &mut |path, s| {
        if left.is_none() && (s.contains("values:") || s.contains("context:")) && s.contains("{{") {
            left = Some(path.to_string());
        }
    });
    match left {
        Some(p) => Err(problem(
            format!("values:{p}"),
            0,
            format!("still has placeholders after {FIXPOINT_PASSES} passes; do values refer to each other in a loop?"),
        )),
        None => Ok(()),
    }
}

fn walk_strings(v: &mut Value, path: &str, f: &mut dyn FnMut(&str, &mut String)) {
    match v {
        Value::String(s) => f(path, s),
        Value::Array(a) => {
            for (i, x) in a.iter_mut().enumerate() {
                walk_strings(x, &format!("{path}.{i}"), f);
            }
        }
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk_strings(x, &p, f);
            }
        }
        _ => {}
    }
}

/// Looks up `a.b.0.c`.
fn lookup<'v>(root: &'v Value, path: &str) -> Option<&'v Value> {
    let mut v = root;
    for seg in path.split('.') {
        v = match v {
            Value::Object(o) => o.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

struct Renderer<'a> {
    root: &'a Path,
    label: &'a str,
    values: &'a Value,
    context: &'a Value,
}

/// One `{{ head: body }}`.
struct Placeholder<'t> {
    head: &'t str,
    body: &'t str,
}

fn parse_placeholder(inner: &str) -> Option<Placeholder<'_>> {
    let (head, body) = inner.split_once(':')?;
    Some(Placeholder {
        head: head.trim(),
        body: body.trim(),
    })
}

impl Renderer<'_> {
    fn shown(&self, rel: &str) -> String {
        format!("{}/{rel}", self.label)
    }

    /// Reads an include, which must stay inside the runeset.
    fn include(&self, from: &str, line: usize, rel: &str) -> Result<String, Problem> {
        let at = |m: String| problem(self.shown(from), line, m);
        let p = Path::new(rel);
        if rel.is_empty()
            || p.components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(at(format!(
                "'{rel}': includes are paths inside the runeset, without '..'"
            )));
        }
        let full = self.root.join(p);
        if !full.is_file() {
            return Err(at(format!("'{rel}': no such file in the runeset")));
        }
        read_limited(&full).map_err(|m| at(format!("'{rel}': {m}")))
    }

    /// Renders an included file, with cycle and depth checks.
    fn render_file(
        &self,
        from: &str,
        line: usize,
        rel: &str,
        stack: &mut Vec<String>,
    ) -> Result<String, Problem> {
        let rel = rel.trim_start_matches("./").to_string();
        if stack.contains(&rel) {
            return Err(problem(
                self.shown(from),
                line,
                format!("include cycle: {} -> {rel}", stack.join(" -> ")),
            ));
        }
        if stack.len() >= MAX_DEPTH {
            return Err(problem(
                self.shown(from),
                line,
                format!("includes nest deeper than {MAX_DEPTH}"),
            ));
        }
        let text = self.include(from, line, &rel)?;
        stack.push(rel.clone());
        let out = self.render_text(&rel, &text, stack);
        stack.pop();
        out.map_err(|mut p| {
            p.message = format!("{} (included from {}:{line})", p.message, self.shown(from));
            p
        })
    }

    /// Renders a file's text line by line.
    fn render_text(&self, file: &str, text: &str, stack: &mut Vec<String>) -> Result<String, Problem> {
        let mut out = String::with_capacity(text.len());
        for (i, raw) in text.split_inclusive('\n').enumerate() {
            let line = i + 1;
            let body = raw.trim_end_matches(['\n', '\r']);
            let nl = &raw[body.len()..];
            let trimmed = body.trim();
            // A line that is only `{{ template: x }}`: the rendered file at this indentation.
            if let Some(inner) = trimmed.strip_prefix("{{").and_then(|t| t.strip_suffix("}}")) {
                if let Some(p) =
                    parse_placeholder(inner).filter(|p| p.head == "template" && !inner.contains("{{"))
                {
                    let indent = &body[..body.len() - body.trim_start().len()];
                    let rendered = self.render_file(file, line, p.body, stack)?;
                    for l in rendered.lines() {
                        if !l.trim().is_empty() {
                            out.push_str(indent);
                            out.push_str(l);
                        }
                        out.push('\n');
                    }
                    if nl.is_empty() && out.ends_with('\n') {
                        out.pop();
                    }
                    continue;
                }
            }
            out.push_str(&self.render_line(file, line, body, stack)?);
            out.push_str(nl);
        }
        Ok(out)
    }

    /// Renders the placeholders of one line.
    fn render_line(
        &self,
        file: &str,
        line: usize,
        body: &str,
        stack: &mut Vec<String>,
    ) -> Result<String, Problem> {
        let at = |m: String| {
            if line == 0 {
                problem(file, 0, m)
            } else {
                problem(self.shown(file), line, m)
            }
        };
        let mut out = String::with_capacity(body.len());
        let mut rest = body;
        while let Some(start) = rest.find("{{") {
            let Some(len) = rest[start..].find("}}") else {
                return Err(at("'{{' is not closed by '}}' on the same line".into()));
            };
            let whole = &rest[start..start + len + 2];
            let inner = &whole[2..whole.len() - 2];
            let before = format!("{out}{}", &rest[..start]);
            let after = &rest[start + len + 2..];
            let alone = {
                let b = before.trim_end();
                let a = after.trim_start();
                (b.ends_with(':') || b.trim_start() == "-" || b.ends_with(" -"))
                    && (a.is_empty() || a.starts_with('#'))
            };
            out.push_str(&rest[..start]);
            let Some(p) = parse_placeholder(inner) else {
                return Err(at(format!(
                    "{whole}: a placeholder is {{{{ kind: what }}}}, kind one of values, context, file, template, secret, configmap"
                )));
            };
            match p.head {
                "secret" | "configmap" => out.push_str(whole),
                "values" | "context" => {
                    let (path, default) = match p.body.split_once('|') {
                        Some((path, filter)) => {
                            let filter = filter.trim();
                            let Some(d) = filter.strip_prefix("default").map(str::trim_start).and_then(|d| d.strip_prefix(':')) else {
                                return Err(at(format!("{whole}: unknown filter '{filter}' (only `default: VALUE` is known)")));
                            };
                            (path.trim(), Some(default_value(d.trim())))
                        }
                        None => (p.body, None),
                    };
                    let tree = if p.head == "values" { self.values } else { self.context };
                    let found = lookup(tree, path).filter(|v| !v.is_null()).cloned().or(default);
                    let Some(v) = found else {
                        return Err(at(format!("{}:{path} has no value (set it in values/, with -f FILE or --set {path}=...)", p.head)));
                    };
                    match v {
                        Value::String(s) if alone && s.contains('\n') => out.push_str(&Value::String(s).to_string()),
                        Value::String(s) => out.push_str(&s),
                        Value::Object(_) | Value::Array(_) if alone => out.push_str(&v.to_string()),
                        Value::Object(_) | Value::Array(_) => {
                            return Err(at(format!(
                                "{}:{path} is a {}; it can only stand as a whole value (`key: {whole}`)",
                                p.head,
                                if v.is_object() { "mapping" } else { "list" }
                            )))
                        }
                        other => out.push_str(&other.to_string()),
                    }
                }
                "file" => {
                    let content = self.render_file(file, line, p.body, stack)?;
                    if alone {
                        let indent = before.len() - before.trim_start().len();
                        out.push_str("|-");
                        for l in content.trim_end_matches('\n').lines() {
                            out.push('\n');
                            if !l.is_empty() {
                                out.push_str(&" ".repeat(indent + 2));
                                out.push_str(l);
                            }
                        }
                    } else if content.trim_end_matches('\n').contains('\n') {
                        return Err(at(format!(
                            "{whole}: a file of several lines can only stand as a whole value (`key: {whole}`)"
                        )));
                    } else {
                        out.push_str(content.trim_end_matches('\n'));
                    }
                }
                "template" => {
                    return Err(at(format!("{whole}: a template include must stand alone on its line")));
                }
                other => {
                    return Err(at(format!(
                        "{whole}: unknown placeholder kind '{other}' (values, context, file, template; secret and configmap are resolved by runed)"
                    )))
                }
            }
            rest = after;
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// `| default: X`: X read as a YAML scalar (so `default: 2` is a number and `"a b"` a string).
fn default_value(text: &str) -> Value {
    match yaml::parse(text) {
        Ok(docs) => docs.first().map(|d| d.to_json()).unwrap_or(Value::Null),
        Err(_) => Value::String(text.to_string()),
    }
}

/// Writes `NAME-VERSION.runeset.tgz` (or `out`) from a runeset directory: every file but
/// `.git`, in a fixed order with fixed times and owners, so the same tree packs to the same bytes.
pub fn pack(dir: &Path, out: Option<&Path>) -> Result<PathBuf, Problem> {
    let label = dir.display().to_string();
    let manifest = read_manifest(dir, &label)?;
    if !dir.join("casts").is_dir() {
        return Err(problem(&label, 0, "a runeset needs a casts/ directory"));
    }
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(format!("{}-{}{ARCHIVE_SUFFIX}", manifest.name, manifest.version)));
    let out_abs = std::path::absolute(&out).unwrap_or_else(|_| out.clone());
    let mut files = Vec::new();
    collect(dir, Path::new(""), &out_abs, &mut files).map_err(|m| problem(&label, 0, m))?;
    let tmp = out.with_extension("tgz.partial");
    let write = || -> std::io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        for rel in &files {
            let data = std::fs::read(dir.join(rel))?;
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, rel, data.as_slice())?;
        }
        let gz = tar.into_inner()?;
        let f = gz.finish()?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(problem(
            out.display().to_string(),
            0,
            format!("cannot write: {e}"),
        ));
    }
    std::fs::rename(&tmp, &out)
        .map_err(|e| problem(out.display().to_string(), 0, format!("cannot write: {e}")))?;
    Ok(out)
}

fn collect(dir: &Path, rel: &Path, skip: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let mut entries: Vec<std::fs::DirEntry> = std::fs::read_dir(dir.join(rel))
        .map_err(|e| format!("{}: {e}", rel.display()))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        let t = e.file_type().map_err(|e| e.to_string())?;
        if t.is_symlink() {
            return Err(format!(
                "{} is a symlink; a runeset archive holds regular files only",
                r.display()
            ));
        }
        if t.is_dir() {
            if e.file_name() != ".git" {
                collect(dir, &r, skip, out)?;
            }
        } else if t.is_file() {
            let abs = std::path::absolute(e.path()).unwrap_or_else(|_| e.path());
            let name = e.file_name().to_string_lossy().into_owned();
            if abs != skip && !name.ends_with(".tgz.partial") {
                out.push(r);
            }
        }
    }
    Ok(())
}

/// The SHA-256 of a file, as `sha256sum` prints it.
pub fn sha256_line(path: &Path) -> std::io::Result<String> {
    let data = std::fs::read(path)?;
    Ok(format!(
        "{}  {}\n",
        hex::encode(Sha256::digest(&data)),
        file_name(path)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn runeset(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        write(
            d.path(),
            MANIFEST,
            "name: app\nversion: 1.0.0\nnamespace: demo\ndefaults:\n  tag: v1\n",
        );
        for (rel, text) in files {
            write(d.path(), rel, text);
        }
        d
    }

    fn render_dir(d: &Path, opts: Options) -> Result<Rendered, Problem> {
        let src = Source::open(d.to_str().unwrap()).unwrap();
        render(&src, &opts)
    }

    #[test]
    fn values_defaults_filters_and_precedence() {
        let d = runeset(&[
            ("values/values.yaml", "app:\n  name: web\n  env: {A: '1', B: two}\n"),
            (
                "casts/a.yaml",
                "service:\n  name: \"{{values:app.name}}-api\"\n  image: x:{{ values: tag }}\n  scale: {{ values:app.replicas | default: 2 }}\n  env: {{ values: app.env }}\n",
            ),
        ]);
        let r = render_dir(d.path(), Options::default()).unwrap();
        assert_eq!(
            r.casts[0].text,
            "service:\n  name: \"web-api\"\n  image: x:v1\n  scale: 2\n  env: {\"A\":\"1\",\"B\":\"two\"}\n"
        );
        let opts = Options {
            set: vec!["tag=v2".into(), "app.replicas=5".into()],
            ..Default::default()
        };
        let r2 = render_dir(d.path(), opts).unwrap();
        assert!(
            r2.casts[0].text.contains("image: x:v2\n  scale: 5\n"),
            "{}",
            r2.casts[0].text
        );
        assert_eq!(r.release, "app");
        assert_eq!(r.namespace, "demo");
    }

    #[test]
    fn includes_keep_indentation_and_runtime_references_stay() {
        let d = runeset(&[
            ("templates/expose.tmpl", "expose:\n  port: {{ values:p }}\n"),
            ("templates/banner.txt", "hello {{ context:releaseName }}\nline two\n"),
            (
                "casts/a.yaml",
                "service:\n  name: a\n  env:\n    S: {{ secret: db/password }}\n    B: {{ file: templates/banner.txt }}\n  {{ template: templates/expose.tmpl }}\n",
            ),
        ]);
        let opts = Options {
            set: vec!["p=http".into()],
            release: Some("rel".into()),
            ..Default::default()
        };
        let r = render_dir(d.path(), opts).unwrap();
        assert_eq!(
            r.casts[0].text,
            "service:\n  name: a\n  env:\n    S: {{ secret: db/password }}\n    B: |-\n      hello rel\n      line two\n  expose:\n    port: http\n"
        );
        assert!(r.casts[0].lines_moved);
    }

    #[test]
    fn errors_name_the_file_line_and_placeholder() {
        let d = runeset(&[
            ("templates/t.tmpl", "x: 1\ny: {{ values:nope }}\n"),
            (
                "casts/a.yaml",
                "service:\n  name: a\n  {{ template: templates/t.tmpl }}\n",
            ),
        ]);
        let e = render_dir(d.path(), Options::default()).unwrap_err();
        assert!(e.file.ends_with("templates/t.tmpl"), "{e}");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("values:nope has no value"), "{e}");
        assert!(e.message.contains("casts/a.yaml:3"), "{e}");

        for (text, want) in [
            ("a: {{ values:x\n", "not closed"),
            ("a: {{ nope }}\n", "kind: what"),
            ("a: {{ shell: rm }}\n", "unknown placeholder kind 'shell'"),
            ("a: {{ file: ../etc/passwd }}\n", "without '..'"),
            ("a: {{ file: missing.txt }}\n", "no such file"),
            ("a: {{ values:tag | upper }}\n", "unknown filter"),
            ("a: x{{ values:runeset }}\n", "whole value"),
            ("a: {{ template: casts/b.yaml }} x\n", "alone on its line"),
        ] {
            let d = runeset(&[("casts/b.yaml", text)]);
            let e = render_dir(d.path(), Options::default()).unwrap_err();
            assert!(e.message.contains(want), "{text}: {e}");
            assert_eq!(e.line, 1, "{text}: {e}");
        }
    }

    #[test]
    fn include_cycles_are_refused() {
        let d = runeset(&[
            ("templates/a.tmpl", "{{ template: templates/b.tmpl }}\n"),
            ("templates/b.tmpl", "{{ template: templates/a.tmpl }}\n"),
            ("casts/a.yaml", "{{ template: templates/a.tmpl }}\n"),
        ]);
        let e = render_dir(d.path(), Options::default()).unwrap_err();
        assert!(e.message.contains("include cycle"), "{e}");
    }

    #[test]
    fn values_refer_to_values_and_loops_are_found() {
        let d = runeset(&[
            ("values/v.yaml", "host: {{ values:name }}.local\nname: web\n"),
            ("casts/a.yaml", "h: {{ values:host }}\n"),
        ]);
        let r = render_dir(d.path(), Options::default()).unwrap();
        assert_eq!(r.casts[0].text, "h: web.local\n");
        let d = runeset(&[
            ("values/v.yaml", "a: x{{ values:b }}\nb: y{{ values:a }}\n"),
            ("casts/a.yaml", "h: 1\n"),
        ]);
        let e = render_dir(d.path(), Options::default()).unwrap_err();
        assert!(e.message.contains("loop"), "{e}");
    }

    #[test]
    fn manifest_problems() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), MANIFEST, "version: 1\n");
        write(d.path(), "casts/a.yaml", "a: 1\n");
        let e = render_dir(d.path(), Options::default()).unwrap_err();
        assert!(e.message.contains("name: required"), "{e}");
        write(d.path(), MANIFEST, "name: Bad_Name\nversion: 1\n");
        let e = render_dir(d.path(), Options::default()).unwrap_err();
        assert!(e.message.starts_with("name:"), "{e}");
    }

    #[test]
    fn pack_round_trips_and_is_reproducible() {
        let d = runeset(&[
            ("casts/a.yaml", "n: {{ values:tag }}\n"),
            ("templates/x/y.tmpl", "z\n"),
        ]);
        let out_dir = tempfile::tempdir().unwrap();
        let a = pack(d.path(), Some(&out_dir.path().join("a.runeset.tgz"))).unwrap();
        let b = pack(d.path(), Some(&out_dir.path().join("b.runeset.tgz"))).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let src = Source::open(a.to_str().unwrap()).unwrap();
        let r = render(&src, &Options::default()).unwrap();
        assert_eq!(r.casts[0].text, "n: v1\n");
        assert!(src.root.join("templates/x/y.tmpl").is_file());
    }

    #[test]
    fn archives_that_escape_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evil.runeset.tgz");
        let f = std::fs::File::create(&path).unwrap();
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(f, flate2::Compression::default()));
        let mut h = tar::Header::new_gnu();
        let data = b"x";
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses '..' itself; write the raw name as an attacker would.
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        tar.append(&h, &data[..]).unwrap();
        tar.into_inner().unwrap().finish().unwrap();
        let e = Source::open(path.to_str().unwrap()).unwrap_err();
        assert!(e.message.contains("leaves the archive"), "{e}");
        assert!(!dir.path().join("escape").exists());
    }
}
