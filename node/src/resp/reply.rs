//! RESP2 replies: what the server sends, and a small decoder for them (used by
//! the tests and handy for any Rust client of the RESP port).

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+text`: a status such as `OK` or `PONG`.
    Simple(String),
    /// `-CODE message`: the text includes the code (`ERR`, `TRYAGAIN`, ...).
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$len` and the bytes.
    Bulk(Vec<u8>),
    /// `$-1`: a missing value.
    Nil,
    /// `*len` and the elements.
    Array(Vec<Reply>),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    /// `-ERR message`.
    pub fn err(message: impl AsRef<str>) -> Reply {
        Reply::Error(format!("ERR {}", message.as_ref()))
    }

    pub fn bulk(bytes: impl Into<Vec<u8>>) -> Reply {
        Reply::Bulk(bytes.into())
    }

    /// An array of bulk strings.
    pub fn strings<S: AsRef<[u8]>>(items: impl IntoIterator<Item = S>) -> Reply {
        Reply::Array(
            items
                .into_iter()
                .map(|s| Reply::Bulk(s.as_ref().to_vec()))
                .collect(),
        )
    }

    /// Appends the wire form. Simple strings and errors cannot carry CR or LF;
    /// any are replaced by spaces.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(s) => line(out, b'+', s),
            Reply::Error(s) => line(out, b'-', s),
            Reply::Integer(n) => {
                out.push(b':');
                out.extend_from_slice(n.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Reply::Bulk(b) => {
                out.push(b'$');
                out.extend_from_slice(b.len().to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Nil => out.extend_from_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                out.push(b'*');
                out.extend_from_slice(items.len().to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                for item in items {
                    item.encode(out);
                }
            }
        }
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes one reply from the front of `buf`: `Ok(Some((reply, used)))`,
    /// `Ok(None)` when more bytes are needed, `Err` when it is not RESP2.
    /// Never panics; nesting deeper than 64 arrays is refused.
    pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
        decode_at(buf, 0, 0)
    }
}

fn line(out: &mut Vec<u8>, prefix: u8, text: &str) {
    out.push(prefix);
    out.extend(
        text.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

fn decode_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Reply, usize)>, String> {
    if depth > 64 {
        return Err("arrays nested more than 64 deep".into());
    }
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(end) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let text = &buf[pos + 1..pos + end];
    let next = pos + end + 2;
    let int = || -> Result<i64, String> {
        std::str::from_utf8(text)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad integer {:?}", String::from_utf8_lossy(text)))
    };
    let string = || String::from_utf8_lossy(text).into_owned();
    match kind {
        b'+' => Ok(Some((Reply::Simple(string()), next))),
        b'-' => Ok(Some((Reply::Error(string()), next))),
        b':' => Ok(Some((Reply::Integer(int()?), next))),
        b'$' => {
            let len = int()?;
            if len < 0 {
                return Ok(Some((Reply::Nil, next)));
            }
            let len = usize::try_from(len).map_err(|e| e.to_string())?;
            let Some(stop) = next.checked_add(len).and_then(|s| s.checked_add(2)) else {
                return Err("bulk length overflows".into());
            };
            if buf.len() < stop {
                return Ok(None);
            }
            if &buf[stop - 2..stop] != b"\r\n" {
                return Err("bulk string not followed by CRLF".into());
            }
            Ok(Some((Reply::Bulk(buf[next..stop - 2].to_vec()), stop)))
        }
        b'*' => {
            let len = int()?;
            if len < 0 {
                return Ok(Some((Reply::Nil, next)));
            }
            let mut items = Vec::new();
            let mut at = next;
            for _ in 0..len {
                match decode_at(buf, at, depth + 1)? {
                    Some((item, used)) => {
                        items.push(item);
                        at = used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(items), at)))
        }
        other => Err(format!(
            "unexpected reply type byte '{}'",
            other.escape_ascii()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wire_forms() {
        assert_eq!(Reply::ok().to_bytes(), b"+OK\r\n");
        assert_eq!(Reply::err("a\r\nb").to_bytes(), b"-ERR a  b\r\n");
        assert_eq!(Reply::Integer(-3).to_bytes(), b":-3\r\n");
        assert_eq!(Reply::bulk("hi").to_bytes(), b"$2\r\nhi\r\n");
        assert_eq!(Reply::Nil.to_bytes(), b"$-1\r\n");
        assert_eq!(
            Reply::Array(vec![Reply::Integer(1), Reply::Nil]).to_bytes(),
            b"*2\r\n:1\r\n$-1\r\n"
        );
    }

    fn reply() -> impl Strategy<Value = Reply> {
        let leaf = prop_oneof![
            "[a-zA-Z ]{0,10}".prop_map(Reply::Simple),
            "[a-zA-Z ]{0,10}".prop_map(Reply::Error),
            any::<i64>().prop_map(Reply::Integer),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(Reply::Bulk),
            Just(Reply::Nil),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            proptest::collection::vec(inner, 0..4).prop_map(Reply::Array)
        })
    }

    proptest! {
        #[test]
        fn replies_round_trip_and_prefixes_wait(r in reply()) {
            let bytes = r.to_bytes();
            prop_assert_eq!(Reply::decode(&bytes).unwrap(), Some((r, bytes.len())));
            for cut in 0..bytes.len() {
                prop_assert_eq!(Reply::decode(&bytes[..cut]).unwrap(), None);
            }
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Reply::decode(&bytes);
        }
    }
}
