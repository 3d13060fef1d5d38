//! Chunked lists, as kubectl's: a list RPC takes `limit` and `continue_token`, and answers a
//! page plus the token of the next one. Pages follow key order, so an object that exists
//! throughout is listed exactly once; each page is read at one applied index.
//!
//! The token names the list and the key prefix it was made for, and the key to continue after.
//! It is not signed: it only says where to resume, within what the caller may list anyway. A
//! token of another list, or one that does not decode, is refused (InvalidArgument).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rune_statemachine::store::{list_page, StoreError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::Status;

/// A page given a limit ends once it has read this many bytes of values, so it stays under the
/// 4 MiB that gRPC clients accept by default unless one object alone is that large.
pub const MAX_PAGE_BYTES: usize = 2 << 20;

#[derive(Serialize, Deserialize)]
struct Token {
    /// The list: `services`, `instances`, ...
    l: String,
    /// The key prefix the list reads.
    p: String,
    /// The key the next page starts after.
    a: String,
}

/// One page of a list RPC.
pub struct PageQuery {
    list: &'static str,
    prefix: String,
    limit: usize,
    after: Option<String>,
}

impl PageQuery {
    /// The page a request asks for: `limit` 0 is everything.
    pub fn new(
        list: &'static str,
        prefix: impl Into<String>,
        limit: u32,
        token: &str,
    ) -> Result<Self, Status> {
        let prefix = prefix.into();
        let after = if token.is_empty() {
            None
        } else {
            let bad = || {
                Status::invalid_argument(format!(
                    "continue_token: not a token of this {list} list (list again without it)"
                ))
            };
            let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
            let t: Token = serde_json::from_slice(&bytes).map_err(|_| bad())?;
            if t.l != list || t.p != prefix || !t.a.starts_with(&prefix) {
                return Err(bad());
            }
            Some(t.a)
        };
        Ok(Self {
            list,
            prefix,
            limit: limit as usize,
            after,
        })
    }

    /// Reads the page; `keep` filters. Returns the records and the next page's token (empty
    /// when this was the last page).
    pub fn read<T, R>(&self, table: &R, keep: impl FnMut(&T) -> bool) -> Result<(Vec<T>, String), Status>
    where
        T: DeserializeOwned,
        R: redb::ReadableTable<&'static str, &'static [u8]>,
    {
        let max_bytes = if self.limit > 0 { MAX_PAGE_BYTES } else { 0 };
        let page = list_page(
            table,
            &self.prefix,
            self.after.as_deref(),
            self.limit,
            max_bytes,
            keep,
        )
        .map_err(|e: StoreError| Status::internal(e.to_string()))?;
        let next = match (page.more, page.last_key) {
            (true, Some(a)) => {
                let t = Token {
                    l: self.list.to_string(),
                    p: self.prefix.clone(),
                    a,
                };
                URL_SAFE_NO_PAD.encode(serde_json::to_vec(&t).map_err(|e| Status::internal(e.to_string()))?)
            }
            _ => String::new(),
        };
        Ok((page.items, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(list: &str, prefix: &str, after: &str) -> String {
        let t = Token {
            l: list.into(),
            p: prefix.into(),
            a: after.into(),
        };
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&t).unwrap())
    }

    #[test]
    fn tokens_of_another_list_or_tampered_ones_are_refused() {
        let good = token("things", "things/", "things/0004");
        let q = PageQuery::new("things", "things/", 5, &good).unwrap();
        assert_eq!(q.after.as_deref(), Some("things/0004"));
        assert!(PageQuery::new("things", "things/", 0, "")
            .unwrap()
            .after
            .is_none());
        for (list, prefix, t) in [
            ("services", "things/", good.clone()),
            ("things", "things/a", good.clone()),
            ("things", "things/", token("things", "things/", "other/0001")),
            ("things", "things/", "not-base64!".into()),
            ("things", "things/", "e30".into()),
        ] {
            let e = PageQuery::new(list, prefix, 5, &t).err().unwrap();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{list} {prefix} {t}");
            assert!(e.message().contains("continue_token"));
        }
    }
}
