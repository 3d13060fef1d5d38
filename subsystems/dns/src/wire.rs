//! The little of the DNS wire format this server needs (RFC 1035): read one question, write a
//! response that echoes it with A records. Anything else is refused before it is trusted.

/// Record types this server answers by name.
pub const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;

/// Response codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    /// No error (possibly no data).
    NoError = 0,
    /// The query could not be parsed.
    FormErr = 1,
    /// The server cannot answer now (stale, data path not ready, upstream down).
    ServFail = 2,
    /// The name does not exist.
    NxDomain = 3,
    /// Not a standard query.
    NotImp = 4,
}

/// A parsed query: its header fields and its one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Message id.
    pub id: u16,
    /// Recursion desired.
    pub rd: bool,
    /// The question name, lower-cased, without the final dot.
    pub name: String,
    /// Question type.
    pub qtype: u16,
    /// Question class.
    pub qclass: u16,
    /// End of the question section in the packet.
    pub question_end: usize,
}

/// Why a packet is not a query this server takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// Too short to hold a header, or a response: not worth an answer.
    Drop,
    /// Has a header but is malformed, or is not a standard query: answer with this code.
    Answer(u16, bool, Rcode),
}

/// Parses a query packet.
pub fn parse(p: &[u8]) -> Result<Query, Bad> {
    if p.len() < 12 || p[2] & 0x80 != 0 {
        return Err(Bad::Drop);
    }
    let id = u16::from_be_bytes([p[0], p[1]]);
    let rd = p[2] & 0x01 != 0;
    let opcode = (p[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Err(Bad::Answer(id, rd, Rcode::NotImp));
    }
    let qdcount = u16::from_be_bytes([p[4], p[5]]);
    if qdcount != 1 {
        return Err(Bad::Answer(id, rd, Rcode::FormErr));
    }
    let formerr = Bad::Answer(id, rd, Rcode::FormErr);
    let mut at = 12;
    let mut name = String::new();
    loop {
        let len = *p.get(at).ok_or(formerr.clone())? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        // No compression pointers in a question; labels are at most 63 bytes.
        if len > 63 {
            return Err(formerr);
        }
        let label = p.get(at..at + len).ok_or(formerr.clone())?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            if b == b'.' || !b.is_ascii_graphic() {
                return Err(formerr);
            }
            name.push(b.to_ascii_lowercase() as char);
        }
        at += len;
        if name.len() > 253 {
            return Err(formerr);
        }
    }
    let t = p.get(at..at + 4).ok_or(formerr)?;
    Ok(Query {
        id,
        rd,
        name,
        qtype: u16::from_be_bytes([t[0], t[1]]),
        qclass: u16::from_be_bytes([t[2], t[3]]),
        question_end: at + 4,
    })
}

/// A response to `q` (whose packet is `p`) with `answers` as A records of `ttl` seconds.
pub fn respond(
    p: &[u8],
    q: &Query,
    rcode: Rcode,
    authoritative: bool,
    answers: &[[u8; 4]],
    ttl: u32,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.question_end + answers.len() * 16);
    out.extend_from_slice(&q.id.to_be_bytes());
    out.push(0x80 | if authoritative { 0x04 } else { 0 } | u8::from(q.rd));
    out.push(0x80 | rcode as u8);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::try_from(answers.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&p[12..q.question_end]);
    for ip in answers {
        // The name is the question's: a pointer to offset 12.
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(ip);
    }
    out
}

/// A bare error response for a packet whose question could not be read.
pub fn error(id: u16, rd: bool, rcode: Rcode) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&id.to_be_bytes());
    out.push(0x80 | u8::from(rd));
    out.push(0x80 | rcode as u8);
    out.extend_from_slice(&[0; 8]);
    out
}

/// Whether the class is IN (or ANY).
pub fn class_ok(q: &Query) -> bool {
    q.qclass == CLASS_IN || q.qclass == 255
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            p.push(l.len() as u8);
            p.extend_from_slice(l.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        p
    }

    #[test]
    fn round_trip_and_garbage() {
        let p = query("Api.Default.rune", 1);
        let q = parse(&p).unwrap();
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype, q.rd),
            (0x1234, "api.default.rune", 1, true)
        );
        let r = respond(&p, &q, Rcode::NoError, true, &[[10, 96, 0, 2]], 5);
        assert_eq!(&r[0..2], &[0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 0);
        assert_eq!(&r[6..8], &[0, 1]);
        assert_eq!(&r[r.len() - 4..], &[10, 96, 0, 2]);
        // The question is echoed as sent (case kept).
        assert_eq!(&r[12..q.question_end], &p[12..q.question_end]);

        assert_eq!(parse(&[1, 2, 3]), Err(Bad::Drop));
        let mut resp = p.clone();
        resp[2] |= 0x80;
        assert_eq!(parse(&resp), Err(Bad::Drop));
        for cut in 13..p.len() {
            assert!(
                matches!(parse(&p[..cut]), Err(Bad::Answer(_, _, Rcode::FormErr))),
                "cut {cut}"
            );
        }
        let mut ptr = p.clone();
        ptr[12] = 0xc0;
        assert!(matches!(parse(&ptr), Err(Bad::Answer(_, _, Rcode::FormErr))));
        let mut two = p.clone();
        two[5] = 2;
        assert!(matches!(parse(&two), Err(Bad::Answer(_, _, Rcode::FormErr))));
        let mut notify = p;
        notify[2] = 0x20;
        assert!(matches!(parse(&notify), Err(Bad::Answer(_, _, Rcode::NotImp))));
    }
}
