//! The RESP request parser: arrays of bulk strings (what every Redis client
//! sends) and inline commands (what a person types into `telnet` or `nc`).
//!
//! Input is hostile. The parser never panics and never allocates more than the
//! [`Limits`] allow: lengths are checked before any data is awaited, array
//! capacity is reserved only as elements arrive, and a header line that runs on
//! past a few dozen bytes is refused. Every malformed input gives a typed
//! [`ProtocolError`]; the connection answers it with `-ERR Protocol error: ...`
//! and closes, as Redis does.
//!
//! It is incremental: [`Decoder::decode`] takes whatever bytes have arrived,
//! consumes the whole elements it can, and remembers a partly received array, so
//! a command split across reads is parsed exactly as if it had arrived at once,
//! without rescanning what it already consumed.

use std::fmt;

/// What a connection accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest bulk string (`$<len>`), in bytes.
    pub max_bulk: usize,
    /// Most elements in one command array (`*<len>`).
    pub max_array: usize,
    /// Longest inline command line, in bytes.
    pub max_inline: usize,
    /// Most bytes one command may hold in total: its bulk strings plus
    /// [`ARG_OVERHEAD`] per element, so a flood of empty elements counts too.
    pub max_command_bytes: usize,
}

/// What each element of an array counts for against
/// [`Limits::max_command_bytes`] besides its data (its header and bookkeeping).
pub const ARG_OVERHEAD: usize = 32;

/// The longest `*<len>` or `$<len>` header line, CRLF excluded.
const MAX_HEADER: usize = 32;

impl Limits {
    /// Limits for a node whose keys and values may be up to the given sizes.
    /// A bulk string may be up to 64 KiB longer than the largest key, value or
    /// context token, so a value a little over the limit reaches the core and
    /// gets its precise "value too large" error instead of a dropped connection.
    pub fn for_node(max_key_bytes: usize, max_value_bytes: usize) -> Limits {
        let max_bulk = max_value_bytes
            .max(max_key_bytes)
            .max(crate::context_token::MAX_TOKEN_LEN)
            .saturating_add(64 * 1024);
        Limits {
            max_bulk,
            max_array: 1024 * 1024,
            max_inline: 64 * 1024,
            max_command_bytes: (64usize << 20).max(max_bulk.saturating_mul(4)),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::for_node(1024, 1 << 20)
    }
}

/// Why the input is not RESP. The connection that sent it is closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// `*` not followed by a decimal integer and CRLF.
    InvalidMultibulkLength,
    /// `$` not followed by a non-negative decimal integer and CRLF.
    InvalidBulkLength,
    /// An array element that is not a bulk string.
    ExpectedBulk(u8),
    /// Bulk data not followed by CRLF.
    MissingCrlf,
    ArrayTooLong {
        len: u64,
        max: usize,
    },
    BulkTooLong {
        len: u64,
        max: usize,
    },
    CommandTooLarge {
        max: usize,
    },
    InlineTooLong {
        max: usize,
    },
    UnbalancedQuotes,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::InvalidMultibulkLength => write!(f, "invalid multibulk length"),
            ProtocolError::InvalidBulkLength => write!(f, "invalid bulk length"),
            ProtocolError::ExpectedBulk(b) => {
                write!(f, "expected '$', got '{}'", b.escape_ascii())
            }
            ProtocolError::MissingCrlf => write!(f, "bulk string not followed by CRLF"),
            ProtocolError::ArrayTooLong { len, max } => {
                write!(f, "multibulk length {len} is more than the limit of {max}")
            }
            ProtocolError::BulkTooLong { len, max } => write!(
                f,
                "bulk length {len} is more than the limit of {max} bytes (the node's \
                 --max-value-bytes plus slack)"
            ),
            ProtocolError::CommandTooLarge { max } => {
                write!(f, "the command is larger than the limit of {max} bytes")
            }
            ProtocolError::InlineTooLong { max } => write!(
                f,
                "too big inline request (more than {max} bytes without a newline)"
            ),
            ProtocolError::UnbalancedQuotes => write!(f, "unbalanced quotes in request"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A command: its name and arguments, each a byte string.
pub type Command = Vec<Vec<u8>>;

/// A partly received array.
#[derive(Debug)]
struct Partial {
    expected: usize,
    args: Command,
    bytes: usize,
}

/// An incremental RESP command decoder (one per connection).
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    partial: Option<Partial>,
}

impl Decoder {
    pub fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            partial: None,
        }
    }

    /// Decodes from `buf`, the bytes received and not yet consumed. Returns how
    /// many bytes it consumed (drop them before the next call) and the command
    /// it completed, if any. `(0, None)` means "send more bytes"; a consumed
    /// count with no command means part of an array was taken in.
    ///
    /// An empty command (`*0`, `*-1` or a blank inline line) comes back as an
    /// empty vector; Redis ignores those without a reply, and so should callers.
    pub fn decode(&mut self, buf: &[u8]) -> Result<(usize, Option<Command>), ProtocolError> {
        let mut pos = 0;
        if self.partial.is_none() {
            match buf.first() {
                None => return Ok((0, None)),
                Some(b'*') => {}
                Some(_) => return self.inline(buf),
            }
            let Some((line, next)) = header(buf, 0, ProtocolError::InvalidMultibulkLength)? else {
                return Ok((0, None));
            };
            let n = parse_int(&line[1..]).ok_or(ProtocolError::InvalidMultibulkLength)?;
            if n <= 0 {
                return Ok((next, Some(Vec::new())));
            }
            if n as u64 > self.limits.max_array as u64 {
                return Err(ProtocolError::ArrayTooLong {
                    len: n as u64,
                    max: self.limits.max_array,
                });
            }
            let expected = n as usize;
            self.partial = Some(Partial {
                expected,
                args: Vec::with_capacity(expected.min(16)),
                bytes: 0,
            });
            pos = next;
        }
        let limits = self.limits;
        let Some(p) = self.partial.as_mut() else {
            return Ok((pos, None));
        };
        while p.args.len() < p.expected {
            let Some(&first) = buf.get(pos) else {
                return Ok((pos, None));
            };
            if first != b'$' {
                return Err(ProtocolError::ExpectedBulk(first));
            }
            let Some((line, next)) = header(buf, pos, ProtocolError::InvalidBulkLength)? else {
                return Ok((pos, None));
            };
            let len = parse_int(&line[1..]).ok_or(ProtocolError::InvalidBulkLength)?;
            if len < 0 {
                return Err(ProtocolError::InvalidBulkLength);
            }
            if len as u64 > limits.max_bulk as u64 {
                return Err(ProtocolError::BulkTooLong {
                    len: len as u64,
                    max: limits.max_bulk,
                });
            }
            let len = len as usize;
            let total = p.bytes.saturating_add(len).saturating_add(ARG_OVERHEAD);
            if total > limits.max_command_bytes {
                return Err(ProtocolError::CommandTooLarge {
                    max: limits.max_command_bytes,
                });
            }
            // `len <= max_bulk`, so neither sum overflows.
            if buf.len() - next < len + 2 {
                return Ok((pos, None));
            }
            if &buf[next + len..next + len + 2] != b"\r\n" {
                return Err(ProtocolError::MissingCrlf);
            }
            p.args.push(buf[next..next + len].to_vec());
            p.bytes = total;
            pos = next + len + 2;
        }
        let done = self.partial.take().map(|p| p.args);
        Ok((pos, done))
    }

    fn inline(&mut self, buf: &[u8]) -> Result<(usize, Option<Command>), ProtocolError> {
        let max = self.limits.max_inline;
        let window = &buf[..buf.len().min(max.saturating_add(1))];
        let Some(end) = window.iter().position(|&b| b == b'\n') else {
            if buf.len() > max {
                return Err(ProtocolError::InlineTooLong { max });
            }
            return Ok((0, None));
        };
        let mut line = &buf[..end];
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        let args = split_args(line)?;
        Ok((end + 1, Some(args)))
    }
}

/// The header line starting at `pos` (without its CRLF) and the index after
/// the CRLF; `None` when the CRLF has not arrived yet.
fn header(
    buf: &[u8],
    pos: usize,
    err: ProtocolError,
) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = &buf[pos..];
    let window = &rest[..rest.len().min(MAX_HEADER + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(i) => Ok(Some((&rest[..i], pos + i + 2))),
        None if rest.len() >= MAX_HEADER + 2 => Err(err),
        None => Ok(None),
    }
}

/// A strict decimal integer: an optional `-`, then 1 to 19 digits.
fn parse_int(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if neg { -v } else { v })
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline command line into arguments the way `redis-cli` and Redis
/// do (`sdssplitargs`): whitespace separates; `"..."` understands `\n`, `\r`,
/// `\t`, `\b`, `\a`, `\xHH` and `\<char>`; `'...'` understands only `\'`; a
/// quote inside a word opens a quoted part too (`a"b c"` is `ab c`). A closing
/// quote must be followed by whitespace or the end of the line.
pub fn split_args(line: &[u8]) -> Result<Command, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && is_space(line[i]) {
            i += 1;
        }
        if i >= n {
            return Ok(args);
        }
        let mut cur = Vec::new();
        let (mut in_double, mut in_single) = (false, false);
        loop {
            let c = line.get(i).copied();
            if in_double {
                let Some(c) = c else {
                    return Err(ProtocolError::UnbalancedQuotes);
                };
                let next = line.get(i + 1).copied();
                if c == b'\\' && next == Some(b'x') {
                    let h = line.get(i + 2).copied().and_then(hex);
                    let l = line.get(i + 3).copied().and_then(hex);
                    if let (Some(h), Some(l)) = (h, l) {
                        cur.push(h * 16 + l);
                        i += 3;
                    } else {
                        i += 1;
                        cur.push(b'x');
                    }
                } else if let (b'\\', Some(e)) = (c, next) {
                    i += 1;
                    cur.push(match e {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    if next.is_some_and(|b| !is_space(b)) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else if in_single {
                let Some(c) = c else {
                    return Err(ProtocolError::UnbalancedQuotes);
                };
                let next = line.get(i + 1).copied();
                if c == b'\\' && next == Some(b'\'') {
                    i += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if next.is_some_and(|b| !is_space(b)) {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else {
                match c {
                    None | Some(b' ' | b'\n' | b'\r' | b'\t') => break,
                    Some(b'"') => in_double = true,
                    Some(b'\'') => in_single = true,
                    Some(other) => cur.push(other),
                }
            }
            i += 1;
        }
        args.push(cur);
    }
}

/// Encodes a command as a RESP array of bulk strings (what clients send).
pub fn encode_command(args: &[impl AsRef<[u8]>], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn small() -> Limits {
        Limits {
            max_bulk: 64,
            max_array: 16,
            max_inline: 128,
            max_command_bytes: 1024,
        }
    }

    /// Feeds `chunks` one by one as a connection does: append, decode until
    /// nothing more can be taken, drop what was consumed.
    fn feed(limits: Limits, chunks: &[&[u8]]) -> (Vec<Command>, Option<ProtocolError>) {
        let mut d = Decoder::new(limits);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                match d.decode(&buf) {
                    Ok((used, cmd)) => {
                        buf.drain(..used);
                        match cmd {
                            Some(c) => out.push(c),
                            None => break,
                        }
                    }
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        (out, None)
    }

    fn all(input: &[u8]) -> (Vec<Command>, Option<ProtocolError>) {
        feed(small(), &[input])
    }

    fn strs(c: &Command) -> Vec<String> {
        c.iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }

    #[test]
    fn multibulk_and_inline() {
        let (cmds, err) = all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\nset a  \"b c\"\r\n");
        assert_eq!(err, None);
        assert_eq!(strs(&cmds[0]), ["GET", "k"]);
        assert_eq!(strs(&cmds[1]), ["PING"]);
        assert_eq!(strs(&cmds[2]), ["set", "a", "b c"]);
    }

    #[test]
    fn empty_commands_are_empty() {
        let (cmds, err) = all(b"*0\r\n*-1\r\n\r\n   \n");
        assert_eq!(err, None);
        assert_eq!(cmds.len(), 4);
        assert!(cmds.iter().all(|c| c.is_empty()));
    }

    #[test]
    fn inline_quoting_like_redis() {
        let split = |s: &[u8]| split_args(s);
        assert_eq!(
            split(br#"a "x\ny\x41\"" 'it\'s' "" ''"#).unwrap(),
            vec![
                b"a".to_vec(),
                b"x\nyA\"".to_vec(),
                b"it's".to_vec(),
                vec![],
                vec![]
            ]
        );
        assert_eq!(split(br#""abc"#), Err(ProtocolError::UnbalancedQuotes));
        assert_eq!(split(br#""abc"d"#), Err(ProtocolError::UnbalancedQuotes));
        assert_eq!(split(br#"'abc"#), Err(ProtocolError::UnbalancedQuotes));
        assert_eq!(
            split(br#"a"b c" d"#).unwrap(),
            vec![b"ab c".to_vec(), b"d".to_vec()]
        );
        assert_eq!(split(br#"a"b"#), Err(ProtocolError::UnbalancedQuotes));
        assert_eq!(split(b"").unwrap(), Vec::<Vec<u8>>::new());
    }

    #[test]
    fn malformed_input_is_typed() {
        use ProtocolError::*;
        assert_eq!(all(b"*x\r\n").1, Some(InvalidMultibulkLength));
        assert_eq!(all(b"*1\r\n+OK\r\n").1, Some(ExpectedBulk(b'+')));
        assert_eq!(all(b"*1\r\n$-1\r\n").1, Some(InvalidBulkLength));
        assert_eq!(all(b"*1\r\n$ 1\r\n").1, Some(InvalidBulkLength));
        assert_eq!(all(b"*1\r\n$1\r\nab\r\n").1, Some(MissingCrlf));
        assert_eq!(all(b"*17\r\n").1, Some(ArrayTooLong { len: 17, max: 16 }));
        assert_eq!(
            all(b"*1\r\n$65\r\n").1,
            Some(BulkTooLong { len: 65, max: 64 })
        );
        assert_eq!(
            all(b"*99999999999999999999\r\n").1,
            Some(InvalidMultibulkLength)
        );
        assert_eq!(
            all(&[b'*'; 40]).1,
            Some(InvalidMultibulkLength),
            "a header without CRLF is cut off early"
        );
        assert_eq!(all(&[b'a'; 200]).1, Some(InlineTooLong { max: 128 }));
        // 16 bulks of 60 bytes: 16 * (60 + 32) > 1024.
        let mut big = Vec::new();
        encode_command(&vec![vec![b'v'; 60]; 16], &mut big);
        assert_eq!(all(&big).1, Some(CommandTooLarge { max: 1024 }));
    }

    #[test]
    fn a_huge_declared_array_allocates_nothing_up_front() {
        let mut d = Decoder::new(Limits::default());
        assert_eq!(d.decode(b"*1048576\r\n").unwrap(), (10, None));
        assert!(d.partial.as_ref().unwrap().args.capacity() <= 16);
    }

    #[test]
    fn partial_bulk_waits_without_consuming_its_header() {
        let mut d = Decoder::new(small());
        assert_eq!(d.decode(b"*1\r\n$5\r\nhel").unwrap(), (4, None));
        assert_eq!(d.decode(b"$5\r\nhel").unwrap(), (0, None));
        assert_eq!(
            d.decode(b"$5\r\nhello\r\n").unwrap(),
            (11, Some(vec![b"hello".to_vec()]))
        );
    }

    fn arg() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..40)
    }

    fn command() -> impl Strategy<Value = Command> {
        proptest::collection::vec(arg(), 1..6)
    }

    /// An inline-safe command: words of letters and digits.
    fn inline_command() -> impl Strategy<Value = Command> {
        proptest::collection::vec("[a-zA-Z0-9]{1,12}".prop_map(String::into_bytes), 1..5)
    }

    #[derive(Clone, Debug)]
    enum Wire {
        Multi(Command),
        Inline(Command),
    }

    fn wire() -> impl Strategy<Value = Wire> {
        prop_oneof![
            3 => command().prop_map(Wire::Multi),
            1 => inline_command().prop_map(Wire::Inline),
        ]
    }

    fn encode_wire(w: &Wire, out: &mut Vec<u8>) {
        match w {
            Wire::Multi(c) => encode_command(c, out),
            Wire::Inline(c) => {
                out.extend_from_slice(&c.join(&b' '));
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    fn expected(w: &Wire) -> &Command {
        match w {
            Wire::Multi(c) | Wire::Inline(c) => c,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            cut in 0usize..512,
        ) {
            let cut = cut.min(bytes.len());
            let _ = feed(small(), &[&bytes[..cut], &bytes[cut..]]);
            let _ = feed(Limits::default(), &[&bytes]);
        }

        #[test]
        fn mutated_valid_streams_never_panic(
            cmds in proptest::collection::vec(command(), 1..4),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = Vec::new();
            for c in &cmds {
                encode_command(c, &mut bytes);
            }
            for (at, b) in flips {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            let _ = feed(small(), &[&bytes]);
            let _ = feed(Limits::default(), &[&bytes]);
        }

        #[test]
        fn valid_commands_round_trip(cmd in command()) {
            let mut bytes = Vec::new();
            encode_command(&cmd, &mut bytes);
            let mut d = Decoder::new(Limits::default());
            let (used, got) = d.decode(&bytes).unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(got, Some(cmd));
        }

        #[test]
        fn any_split_of_a_pipeline_parses_the_same(
            stream in proptest::collection::vec(wire(), 1..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut bytes = Vec::new();
            for w in &stream {
                encode_wire(w, &mut bytes);
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
            let (whole, err) = feed(Limits::default(), &[&bytes]);
            prop_assert_eq!(err, None);
            let (split, err) = feed(Limits::default(), &chunks);
            prop_assert_eq!(err, None);
            let want: Vec<Command> = stream.iter().map(|w| expected(w).clone()).collect();
            prop_assert_eq!(&whole, &want);
            prop_assert_eq!(&split, &want);
            // Byte by byte, too.
            let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
            prop_assert_eq!(feed(Limits::default(), &bytewise).0, want);
        }
    }
}
