//! YAML with line numbers: a node tree that keeps every key's position and repeated keys, its
//! translation to JSON for serde, path-to-line lookup for error messages, and an emitter.

use std::fmt;

use rune_statemachine::decode::{FieldPath, Seg};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::{Yaml, YamlEmitter};

/// A YAML node and where it starts (1-based line and column).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Line of the node's first character.
    pub line: usize,
    /// Column of the node's first character.
    pub col: usize,
    /// The node itself.
    pub kind: NodeKind,
}

/// The shapes a node takes.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// A scalar and whether it was quoted (quoted scalars are always strings).
    Scalar {
        /// Its text.
        value: String,
        /// Quoted or block scalars are never typed as numbers or booleans.
        plain: bool,
    },
    /// A list.
    Seq(Vec<Node>),
    /// A mapping, keeping repeated keys in order.
    Map(Vec<(Node, Node)>),
}

/// A YAML syntax error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {col}: {message}")]
pub struct SyntaxError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What the parser said.
    pub message: String,
}

#[derive(Default)]
struct Builder {
    docs: Vec<Node>,
    stack: Vec<(Node, Option<Node>)>,
    anchors: std::collections::HashMap<usize, Node>,
    anchor_stack: Vec<usize>,
}

impl Builder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some((parent, pending_key)) => match &mut parent.kind {
                NodeKind::Seq(items) => items.push(node),
                NodeKind::Map(pairs) => match pending_key.take() {
                    None => *pending_key = Some(node),
                    Some(k) => pairs.push((k, node)),
                },
                NodeKind::Scalar { .. } => {}
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let at = |kind| Node {
            line: mark.line(),
            col: mark.col() + 1,
            kind,
        };
        match ev {
            Event::Scalar(value, style, anchor, _) => {
                let node = at(NodeKind::Scalar {
                    value,
                    plain: style == TScalarStyle::Plain,
                });
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push_value(node);
            }
            Event::SequenceStart(anchor, _) => {
                self.anchor_stack.push(anchor);
                self.stack.push((at(NodeKind::Seq(vec![])), None));
            }
            Event::MappingStart(anchor, _) => {
                self.anchor_stack.push(anchor);
                self.stack.push((at(NodeKind::Map(vec![])), None));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let anchor = self.anchor_stack.pop().unwrap_or(0);
                if let Some((node, _)) = self.stack.pop() {
                    if anchor > 0 {
                        self.anchors.insert(anchor, node.clone());
                    }
                    self.push_value(node);
                }
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().unwrap_or_else(|| {
                    at(NodeKind::Scalar {
                        value: String::new(),
                        plain: true,
                    })
                });
                self.push_value(node);
            }
            _ => {}
        }
    }
}

/// Parses every document of a YAML stream.
pub fn parse(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut b, true).map_err(|e| SyntaxError {
        line: e.marker().line(),
        col: e.marker().col() + 1,
        message: e.info().to_string(),
    })?;
    Ok(b.docs)
}

impl Node {
    /// The scalar text, if this is a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// True for an empty document or an explicit null.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, NodeKind::Scalar { value, plain: true } if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The node as JSON, typing plain scalars the way YAML 1.2's core schema does. Of repeated
    /// keys below the top level, the last wins.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            NodeKind::Scalar { value, plain: false } => Value::String(value.clone()),
            NodeKind::Scalar { value, plain: true } => plain_scalar(value),
            NodeKind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeKind::Map(pairs) => {
                let mut m = serde_json::Map::new();
                for (k, v) in pairs {
                    let key = match &k.kind {
                        NodeKind::Scalar { value, .. } => value.clone(),
                        _ => k.to_json().to_string(),
                    };
                    m.insert(key, v.to_json());
                }
                Value::Object(m)
            }
        }
    }

    /// The line of the field a path names (the key's line for mapping fields), or of the
    /// deepest part of the path that exists.
    pub fn line_of(&self, path: &FieldPath) -> usize {
        let mut node = self;
        let mut line = self.line;
        for seg in &path.0 {
            let next = match (seg, &node.kind) {
                (Seg::Key(k), NodeKind::Map(pairs)) => pairs
                    .iter()
                    .rev()
                    .find(|(key, _)| key.as_str() == Some(k.as_str()))
                    .map(|(key, v)| {
                        line = key.line;
                        v
                    }),
                (Seg::Index(i), NodeKind::Seq(items)) => items.get(*i).inspect(|v| line = v.line),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        line
    }

    /// Replaces text in every string scalar (used to restore `{{...}}` placeholders).
    pub fn map_strings(&mut self, f: &dyn Fn(&str) -> Option<String>) {
        match &mut self.kind {
            NodeKind::Scalar { value, plain } => {
                if let Some(v) = f(value) {
                    *value = v;
                    *plain = false;
                }
            }
            NodeKind::Seq(items) => items.iter_mut().for_each(|n| n.map_strings(f)),
            NodeKind::Map(pairs) => pairs.iter_mut().for_each(|(_, v)| v.map_strings(f)),
        }
    }
}

fn plain_scalar(v: &str) -> serde_json::Value {
    use serde_json::Value;
    match v {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = v.parse::<i64>() {
        return Value::from(i);
    }
    if let Some(h) = v.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(h, 16) {
            return Value::from(i);
        }
    }
    if let Some(o) = v.strip_prefix("0o") {
        if let Ok(i) = i64::from_str_radix(o, 8) {
            return Value::from(i);
        }
    }
    let looks_numeric = v
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_digit() || b == b'-' || b == b'+' || b == b'.');
    if looks_numeric && !v.ends_with('.') {
        if let Ok(f) = v.parse::<f64>() {
            if f.is_finite() {
                if let Some(n) = serde_json::Number::from_f64(f) {
                    return Value::Number(n);
                }
            }
        }
    }
    Value::String(v.to_string())
}

fn to_yaml(v: &serde_json::Value) -> Yaml {
    use serde_json::Value;
    match v {
        Value::Null => Yaml::Null,
        Value::Bool(b) => Yaml::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Yaml::Integer(i),
            None => Yaml::Real(n.to_string()),
        },
        Value::String(s) => Yaml::String(s.clone()),
        Value::Array(a) => Yaml::Array(a.iter().map(to_yaml).collect()),
        Value::Object(o) => {
            let mut h = yaml_rust2::yaml::Hash::new();
            for (k, v) in o {
                h.insert(Yaml::String(k.clone()), to_yaml(v));
            }
            Yaml::Hash(h)
        }
    }
}

/// Emits JSON as a YAML document (without the leading `---`).
pub fn emit(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let mut e = YamlEmitter::new(&mut out);
    e.multiline_strings(true);
    if e.dump(&to_yaml(v)).is_err() {
        return serde_json::to_string_pretty(v).unwrap_or_default();
    }
    let body = out.strip_prefix("---\n").unwrap_or(&out).to_string();
    body + "\n"
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_lines_and_repeated_keys() {
        let docs = parse("service:\n  name: a\nservice:\n  name: b\n---\nx: 1\n").unwrap();
        assert_eq!(docs.len(), 2);
        let NodeKind::Map(pairs) = &docs[0].kind else {
            panic!()
        };
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].0.line, 3);
        assert_eq!(docs[0].line_of(&FieldPath::root().key("service").key("name")), 4);
    }

    #[test]
    fn typing_follows_quotes() {
        let d = &parse("a: 80\nb: '80'\nc: true\nd: 1.5\ne: hello\nf: ~\n").unwrap()[0];
        assert_eq!(
            d.to_json(),
            serde_json::json!({"a": 80, "b": "80", "c": true, "d": 1.5, "e": "hello", "f": null})
        );
    }

    #[test]
    fn emitted_yaml_parses_back_to_the_same_json() {
        let v = serde_json::json!({"name": "x", "env": {"A": "true", "B": "0123", "C": "a: b"}, "scale": 3, "args": ["-c", "echo \"hi\""]});
        let back = parse(&emit(&v)).unwrap()[0].to_json();
        assert_eq!(back, v);
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = parse("a: [1, 2\nb: c\n").unwrap_err();
        assert!(e.line >= 1);
    }
}
