//! Strict decoding of spec documents: every unknown field and the first type error, each with the
//! path of the field, so that a front end holding the source can point at its line.

use std::fmt;

use serde::de::DeserializeOwned;

/// One step of a path into a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// A mapping key.
    Key(String),
    /// A list index.
    Index(usize),
}

/// A path into a document such as `ports[1].port`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FieldPath(pub Vec<Seg>);

impl FieldPath {
    /// The path of the document's root.
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// This path extended by a key.
    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_string()));
        Self(v)
    }

    /// This path extended by a list index.
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Self(v)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A problem with one field of a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    /// Where the problem is.
    pub path: FieldPath,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl FieldError {
    /// A problem at `path`.
    pub fn new(path: FieldPath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
        }
    }
}

/// Decodes `value` as `T`, reporting every unknown field and, if the shape is wrong, where.
pub fn decode<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, Vec<FieldError>> {
    // Every cast decodes its spec, nearly always a good one: a first pass without path tracking
    // (which copies each key it passes into a path) settles those. Decoding is deterministic,
    // so a document that fails it fails the tracked pass below the same way, now with paths.
    let mut clean = true;
    let fast = T::deserialize(serde_ignored::Deserializer::new(
        value,
        &mut |_: serde_ignored::Path<'_>| clean = false,
    ));
    if let (Ok(v), true) = (fast, clean) {
        return Ok(v);
    }
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let result = {
        let mut on_unknown = |p: serde_ignored::Path<'_>| unknown.push(ignored_path(&p));
        let inner = serde_ignored::Deserializer::new(value, &mut on_unknown);
        T::deserialize(serde_path_to_error::Deserializer::new(inner, &mut track))
    };
    let mut errors: Vec<FieldError> = unknown
        .into_iter()
        .map(|p| {
            let name = match p.0.last() {
                Some(Seg::Key(k)) => k.clone(),
                _ => String::new(),
            };
            FieldError::new(p, format!("unknown field '{name}'"))
        })
        .collect();
    match result {
        Ok(v) if errors.is_empty() => Ok(v),
        Ok(_) => Err(errors),
        Err(e) => {
            let path = FieldPath(
                track
                    .path()
                    .iter()
                    .filter_map(|s| match s {
                        serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                        serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key.clone())),
                        _ => None,
                    })
                    .collect(),
            );
            // An untagged shape says nothing of why no variant fit; the usual reason is a key
            // left without a value (`password:` after a placeholder rendered to nothing).
            let message = e.to_string();
            if message.contains("untagged enum") {
                if let Some(null) = first_null_under(value, &path) {
                    errors.push(FieldError::new(
                        null,
                        "has no value (an empty YAML value is null); give one, or quote \"\" for an empty string",
                    ));
                    return Err(errors);
                }
            }
            errors.push(FieldError::new(path, tidy_serde_message(&message)));
            Err(errors)
        }
    }
}

/// The path of the first null directly inside the value at `at` (a mapping's value or a list's
/// item, one level down).
fn first_null_under(root: &serde_json::Value, at: &FieldPath) -> Option<FieldPath> {
    let mut v = root;
    for seg in &at.0 {
        v = match seg {
            Seg::Key(k) => v.get(k)?,
            Seg::Index(i) => v.get(i)?,
        };
    }
    let child = |seg: Seg| {
        let mut p = at.clone();
        p.0.push(seg);
        p
    };
    match v {
        serde_json::Value::Object(m) => m
            .iter()
            .find(|(_, x)| x.is_null())
            .map(|(k, _)| child(Seg::Key(k.clone()))),
        serde_json::Value::Array(a) => a.iter().position(|x| x.is_null()).map(|i| child(Seg::Index(i))),
        _ => None,
    }
}

fn ignored_path(p: &serde_ignored::Path<'_>) -> FieldPath {
    fn walk(p: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
        use serde_ignored::Path::*;
        match p {
            Root => {}
            Seq { parent, index } => {
                walk(parent, out);
                out.push(Seg::Index(*index));
            }
            Map { parent, key } => {
                walk(parent, out);
                out.push(Seg::Key(key.clone()));
            }
            Some { parent } | NewtypeStruct { parent } | NewtypeVariant { parent } => walk(parent, out),
        }
    }
    let mut out = Vec::new();
    walk(p, &mut out);
    FieldPath(out)
}

/// serde's messages speak of Rust types; say it the way a YAML user would.
fn tidy_serde_message(m: &str) -> String {
    let m = m
        .replace(
            "data did not match any variant of untagged enum",
            "value has an unsupported shape for",
        )
        .replace(
            "invalid type: map, expected a string",
            "expected a string, found a mapping",
        )
        .replace(
            "invalid type: sequence, expected a string",
            "expected a string, found a list",
        );
    m.replace("i64", "an integer").replace("u64", "an integer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ServiceSpec;

    #[test]
    fn reports_every_unknown_field_with_its_path() {
        let v = serde_json::json!({
            "name": "a", "image": "x", "bogus": 1,
            "health": {"liveness": {"type": "http", "nope": true}},
            "ports": [{"name": "h", "port": 80, "weird": 1}]
        });
        let errs = decode::<ServiceSpec>(&v).unwrap_err();
        let paths: Vec<String> = errs.iter().map(|e| e.path.to_string()).collect();
        assert!(paths.contains(&"bogus".to_string()), "{paths:?}");
        assert!(paths.contains(&"health.liveness.nope".to_string()), "{paths:?}");
        assert!(paths.contains(&"ports[0].weird".to_string()), "{paths:?}");
    }

    #[test]
    fn type_errors_name_the_field() {
        let v = serde_json::json!({"name": "a", "image": "x", "ports": [{"name": "h", "port": "eighty"}]});
        let errs = decode::<ServiceSpec>(&v).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].path.to_string(), "ports[0].port");
    }

    #[test]
    fn a_key_without_a_value_is_named() {
        let v = serde_json::json!({"name": "s", "data": {"user": "u", "password": null}});
        let errs = decode::<crate::secret::SecretSpec>(&v).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path.to_string(), "data.password");
        assert!(errs[0].message.contains("has no value"), "{}", errs[0].message);
    }

    #[test]
    fn a_good_document_decodes_and_a_bad_one_still_names_its_field() {
        // The untracked first pass must not change what either kind of document gives.
        let good = serde_json::json!({"name": "a", "image": "x", "ports": [{"name": "h", "port": 80}]});
        let s = decode::<ServiceSpec>(&good).unwrap();
        assert_eq!(s.ports[0].port, 80);
        let unknown_only = serde_json::json!({"name": "a", "image": "x", "extra": {"deep": 1}});
        let errs = decode::<ServiceSpec>(&unknown_only).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path.to_string(), "extra");
        assert_eq!(errs[0].message, "unknown field 'extra'");
    }

    #[test]
    fn scalars_become_text() {
        let v = serde_json::json!({"name": "a", "image": "x", "env": {"DEBUG": true, "N": 3}});
        let s = decode::<ServiceSpec>(&v).unwrap();
        assert_eq!(s.env["DEBUG"].as_str(), "true");
        assert_eq!(s.env["N"].as_str(), "3");
    }
}
