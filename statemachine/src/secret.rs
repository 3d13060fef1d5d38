//! Secrets and configmaps: the YAML users write, and what the state keeps of them.
//!
//! A [`SecretSpec`] holds plaintext and never reaches the log: the API turns it into [`SecretData`]
//! (key → bytes) and seals that into a [`SealedSecret`] before proposing. The state only ever holds
//! ciphertext, the data key wrapped by the KEK, and the key names (so `rune get secrets` can list
//! them without opening anything).

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::decode::{FieldError, FieldPath};
use crate::spec::Text;
use crate::validate::dns1123_label;

/// Plaintext secret data, key → value bytes. Lives only in the API and the runners, never in the log.
pub type SecretData = BTreeMap<String, Vec<u8>>;

/// `data` as a mapping or as the original's list of `{key, value}` pairs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DataForm {
    /// `data: {k: v}`.
    Map(BTreeMap<String, Text>),
    /// `data: [{key: k, value: v}]`.
    Pairs(Vec<KeyValue>),
}

/// One pair of the list form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Text>,
    /// The value, base64-encoded (for binary values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

/// A `secret:` block as cast. Plaintext: never stored or logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSpec {
    /// DNS-1123 label.
    pub name: String,
    /// Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `static` (default); `dynamic` secrets need an engine, which does not exist yet.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Values as text, by key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataForm>,
    /// Values as text, by key (kubectl's spelling); merged over `data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string_data: Option<BTreeMap<String, Text>>,
    /// A single value, stored under the key `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Text>,
    /// A single base64-encoded value, stored decoded under the key `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// Dynamic-secret engine (accepted, inert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<serde_json::Value>,
    /// Rotation policy (accepted, inert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<serde_json::Value>,
    /// `skip: true` leaves the secret out of a cast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip: Option<bool>,
}

/// A `configmap:` block as cast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigmapSpec {
    /// DNS-1123 label.
    pub name: String,
    /// Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Values by key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataForm>,
    /// `skip: true` leaves the configmap out of a cast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip: Option<bool>,
}

/// A configmap as stored: plaintext, since configuration is not secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Configmap {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Values by key.
    pub data: BTreeMap<String, String>,
}

/// A secret version as stored and logged: ciphertext only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SealedSecret {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `static` or `dynamic`.
    #[serde(rename = "type")]
    pub type_: String,
    /// 1 at creation, +1 per change. Chosen by the proposer, because it is bound into the
    /// ciphertext; apply refuses a version that does not follow the stored one.
    pub version: u64,
    /// Key names, so listings need not open anything.
    pub keys: Vec<String>,
    /// Which KEK wrapped the data key.
    pub kek_id: String,
    /// The data key, sealed by the KEK (base64 of nonce ‖ ciphertext ‖ tag).
    pub wrapped_dek: String,
    /// The data, sealed by the data key (base64 of nonce ‖ ciphertext ‖ tag).
    pub ciphertext: String,
}

/// Limits on secret size, from `storage.secret-limits`; also applied to configmaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretLimits {
    /// Most keys in one secret.
    pub max_keys: usize,
    /// Largest value, in bytes.
    pub max_value_size: usize,
}

impl Default for SecretLimits {
    fn default() -> Self {
        Self {
            max_keys: 64,
            max_value_size: 65536,
        }
    }
}

/// Checks a key: it becomes a file name in mounts and an environment variable with `envFrom`.
pub fn key_ok(k: &str) -> Result<(), String> {
    if k.is_empty() {
        return Err("a key is empty".into());
    }
    if k.len() > 253 {
        let head: String = k.chars().take(20).collect();
        return Err(format!("key '{head}…' is longer than 253 characters"));
    }
    if k == "."
        || k == ".."
        || !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(format!(
            "key '{k}' may contain only letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

fn data_entries(form: &DataForm, at: &FieldPath, errs: &mut Vec<FieldError>) -> Vec<(String, Vec<u8>)> {
    match form {
        DataForm::Map(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), v.0.clone().into_bytes()))
            .collect(),
        DataForm::Pairs(pairs) => {
            let mut out = Vec::new();
            for (i, p) in pairs.iter().enumerate() {
                let at = at.index(i);
                match (&p.value, &p.value_base64) {
                    (Some(v), None) => out.push((p.key.clone(), v.0.clone().into_bytes())),
                    (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b.trim()) {
                        Ok(bytes) => out.push((p.key.clone(), bytes)),
                        // The decoder's message quotes the offending byte: a piece of the secret.
                        Err(_) => errs.push(FieldError::new(at.key("valueBase64"), "is not valid base64")),
                    },
                    _ => errs.push(FieldError::new(
                        at,
                        format!("key '{}' needs exactly one of value or valueBase64", p.key),
                    )),
                }
            }
            out
        }
    }
}

fn check_entries(
    entries: Vec<(String, Vec<u8>)>,
    limits: SecretLimits,
    at: &FieldPath,
    errs: &mut Vec<FieldError>,
) -> SecretData {
    let mut out = SecretData::new();
    for (k, v) in entries {
        if let Err(m) = key_ok(&k) {
            errs.push(FieldError::new(at.clone(), m));
            continue;
        }
        if v.len() > limits.max_value_size {
            errs.push(FieldError::new(
                at.key(&k),
                format!(
                    "value is {} bytes; storage.secret-limits.max-value-size is {}",
                    v.len(),
                    limits.max_value_size
                ),
            ));
        }
        if out.insert(k.clone(), v).is_some() {
            errs.push(FieldError::new(at.clone(), format!("key '{k}' is given twice")));
        }
    }
    if out.len() > limits.max_keys {
        errs.push(FieldError::new(
            at.clone(),
            format!(
                "{} keys; storage.secret-limits.max-keys-per-secret is {}",
                out.len(),
                limits.max_keys
            ),
        ));
    }
    out
}

fn check_name(name: &str, ns: Option<&str>, what: &str, errs: &mut Vec<FieldError>) {
    if let Err(m) = dns1123_label(name) {
        errs.push(FieldError::new(
            FieldPath::root().key("name"),
            format!("{what} name {m}"),
        ));
    }
    if let Some(ns) = ns {
        if let Err(m) = dns1123_label(ns) {
            errs.push(FieldError::new(
                FieldPath::root().key("namespace"),
                format!("namespace {m}"),
            ));
        }
    }
}

impl SecretSpec {
    /// The namespace, `default` when none is given.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(crate::DEFAULT_NAMESPACE)
    }

    /// Validates the spec and flattens every form of data into key → bytes.
    pub fn to_data(&self, limits: SecretLimits) -> Result<SecretData, Vec<FieldError>> {
        let mut errs = Vec::new();
        check_name(&self.name, self.namespace.as_deref(), "secret", &mut errs);
        match self.type_.as_deref() {
            None | Some("static") => {}
            Some("dynamic") => errs.push(FieldError::new(
                FieldPath::root().key("type"),
                "dynamic secrets need a secret engine, which this release does not have",
            )),
            Some(other) => errs.push(FieldError::new(
                FieldPath::root().key("type"),
                format!("'{other}' is not a secret type: use static"),
            )),
        }
        let mut entries = Vec::new();
        if let Some(d) = &self.data {
            entries.extend(data_entries(d, &FieldPath::root().key("data"), &mut errs));
        }
        let mut overrides = Vec::new();
        if let Some(m) = &self.string_data {
            overrides.extend(m.iter().map(|(k, v)| (k.clone(), v.0.clone().into_bytes())));
        }
        match (&self.value, &self.value_base64) {
            (Some(_), Some(_)) => errs.push(FieldError::new(
                FieldPath::root().key("valueBase64"),
                "give value or valueBase64, not both",
            )),
            (Some(v), None) => overrides.push(("value".into(), v.0.clone().into_bytes())),
            (None, Some(b)) => match base64::engine::general_purpose::STANDARD.decode(b.trim()) {
                Ok(bytes) => overrides.push(("value".into(), bytes)),
                Err(_) => errs.push(FieldError::new(
                    FieldPath::root().key("valueBase64"),
                    "is not valid base64",
                )),
            },
            (None, None) => {}
        }
        // stringData wins over data for the same key, as in Kubernetes.
        let over: std::collections::BTreeSet<&String> = overrides.iter().map(|(k, _)| k).collect();
        entries.retain(|(k, _)| !over.contains(k));
        entries.extend(overrides);
        let data = check_entries(entries, limits, &FieldPath::root().key("data"), &mut errs);
        if data.is_empty() && errs.is_empty() {
            errs.push(FieldError::new(
                FieldPath::root().key("data"),
                "a secret needs at least one key (data, stringData or value)",
            ));
        }
        if errs.is_empty() {
            Ok(data)
        } else {
            Err(errs)
        }
    }
}

impl ConfigmapSpec {
    /// Validates the spec and flattens it into what is stored.
    pub fn to_configmap(&self, limits: SecretLimits) -> Result<Configmap, Vec<FieldError>> {
        let mut errs = Vec::new();
        check_name(&self.name, self.namespace.as_deref(), "configmap", &mut errs);
        let at = FieldPath::root().key("data");
        let entries = match &self.data {
            Some(d) => data_entries(d, &at, &mut errs),
            None => Vec::new(),
        };
        let data = check_entries(entries, limits, &at, &mut errs);
        let mut out = BTreeMap::new();
        for (k, v) in data {
            match String::from_utf8(v) {
                Ok(s) => {
                    out.insert(k, s);
                }
                Err(_) => errs.push(FieldError::new(at.key(&k), "configmap values must be text")),
            }
        }
        if out.is_empty() && errs.is_empty() {
            errs.push(FieldError::new(at, "a configmap needs at least one key"));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Configmap {
            namespace: self
                .namespace
                .clone()
                .unwrap_or_else(|| crate::DEFAULT_NAMESPACE.to_string()),
            name: self.name.clone(),
            data: out,
        })
    }
}

/// Validates a configmap as it arrives in a command (apply re-checks what the API checked).
pub fn validate_configmap(c: &Configmap) -> Vec<FieldError> {
    let mut errs = Vec::new();
    check_name(&c.name, Some(&c.namespace), "configmap", &mut errs);
    for k in c.data.keys() {
        if let Err(m) = key_ok(k) {
            errs.push(FieldError::new(FieldPath::root().key("data"), m));
        }
    }
    errs
}

/// Validates a sealed secret as it arrives in a command.
pub fn validate_sealed(s: &SealedSecret) -> Vec<FieldError> {
    let mut errs = Vec::new();
    check_name(&s.name, Some(&s.namespace), "secret", &mut errs);
    for k in &s.keys {
        if let Err(m) = key_ok(k) {
            errs.push(FieldError::new(FieldPath::root().key("keys"), m));
        }
    }
    if s.version == 0 {
        errs.push(FieldError::new(
            FieldPath::root().key("version"),
            "must be at least 1",
        ));
    }
    if s.kek_id.is_empty() || s.wrapped_dek.is_empty() || s.ciphertext.is_empty() {
        errs.push(FieldError::new(FieldPath::root(), "is not sealed"));
    }
    errs
}
