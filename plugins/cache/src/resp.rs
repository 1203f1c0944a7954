//! RESP2, the Redis wire protocol: an incremental parser and an encoder, pure (no I/O).
//!
//! [`parse_frame`] and [`parse_command`] look at the bytes received so far and return
//! `Ok(None)` when the frame is not complete yet (the caller reads more and calls again),
//! `Ok(Some((value, consumed)))` when it is, and an error for bytes that can never become a
//! valid frame. Declared lengths are checked against [`Limits`] before anything is allocated,
//! and no buffer is reserved beyond what has actually arrived, so a client announcing a
//! 4 GiB bulk string or a billion-element array costs nothing.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// One RESP2 value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// `+OK\r\n` (borrowed for the fixed replies: `+OK` costs no allocation)
    Simple(Cow<'static, str>),
    /// `-ERR ...\r\n`, as bytes: Redis quotes client bytes in some errors (an unknown
    /// command's arguments, an unsupported option) exactly as they came, UTF-8 or not.
    Error(Vec<u8>),
    /// `:42\r\n`
    Integer(i64),
    /// `$3\r\nfoo\r\n`
    Bulk(Vec<u8>),
    /// `$-1\r\n`, the null bulk string.
    Null,
    /// `*-1\r\n`, the null array.
    NullArray,
    /// `*2\r\n...`
    Array(Vec<Frame>),
}

impl Frame {
    /// `+OK`.
    pub fn ok() -> Frame {
        Frame::Simple(Cow::Borrowed("OK"))
    }

    /// An error reply; `msg` should start with an error code such as `ERR`.
    pub fn err(msg: impl Into<String>) -> Frame {
        Frame::Error(msg.into().into_bytes())
    }

    /// A bulk string.
    pub fn bulk(b: impl Into<Vec<u8>>) -> Frame {
        Frame::Bulk(b.into())
    }
}

/// Size limits the parser enforces before allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Longest bulk string.
    pub max_bulk: usize,
    /// Most elements of one array.
    pub max_array: usize,
    /// Longest line (inline command, simple string, error, or a length header).
    pub max_line: usize,
    /// Deepest nesting of arrays.
    pub max_depth: usize,
}

/// Default longest bulk string: 64 MiB (Redis allows 512 MiB).
pub const DEFAULT_MAX_BULK: usize = 64 * 1024 * 1024;
/// Default most elements of one array: 1M (as Redis).
pub const DEFAULT_MAX_ARRAY: usize = 1024 * 1024;
/// Default longest inline line: 64 KiB (as Redis).
pub const DEFAULT_MAX_LINE: usize = 64 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk: DEFAULT_MAX_BULK,
            max_array: DEFAULT_MAX_ARRAY,
            max_line: DEFAULT_MAX_LINE,
            max_depth: 32,
        }
    }
}

/// Why bytes were refused. The messages follow Redis' `Protocol error: ...` replies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    /// A malformed frame.
    #[error("Protocol error: {0}")]
    Protocol(String),
    /// A declared bulk length beyond the limit.
    #[error("Protocol error: invalid bulk length")]
    BulkTooLarge,
    /// A declared array length beyond the limit.
    #[error("Protocol error: invalid multibulk length")]
    ArrayTooLarge,
    /// A line longer than the limit.
    #[error("Protocol error: too big inline request")]
    LineTooLong,
    /// Arrays nested too deeply.
    #[error("Protocol error: nesting too deep")]
    TooDeep,
}

type Parsed<T> = Result<Option<(T, usize)>, RespError>;

/// The line starting at `buf[0]` without its `\r\n`, and the bytes it takes with it.
fn line<'a>(buf: &'a [u8], limits: &Limits) -> Parsed<&'a [u8]> {
    let scan = &buf[..buf.len().min(limits.max_line.saturating_add(2))];
    match scan.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(i) if scan[i] == b'\n' => Err(RespError::Protocol("expected CRLF".into())),
        Some(i) => match scan.get(i + 1) {
            None => {
                if i > limits.max_line {
                    Err(RespError::LineTooLong)
                } else {
                    Ok(None)
                }
            }
            Some(b'\n') if i <= limits.max_line => Ok(Some((&buf[..i], i + 2))),
            Some(b'\n') => Err(RespError::LineTooLong),
            Some(_) => Err(RespError::Protocol("expected CRLF".into())),
        },
        None if scan.len() > limits.max_line => Err(RespError::LineTooLong),
        None => Ok(None),
    }
}

/// A strict decimal integer (optional leading `-`, digits only, no overflow).
fn int(bytes: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(bytes).ok()?;
    if s.is_empty() || s.starts_with('+') {
        return None;
    }
    s.parse().ok()
}

fn length(bytes: &[u8], what: &str) -> Result<i64, RespError> {
    int(bytes).ok_or_else(|| RespError::Protocol(format!("invalid {what} length")))
}

/// One command's arguments, borrowed from the buffer they were parsed from (most commands
/// have at most four, which stay on the stack).
pub type Args<'a> = SmallVec<[&'a [u8]; 4]>;

/// The type byte and header line of the frame at `buf[0]`, and the bytes they take.
fn header<'a>(buf: &'a [u8], limits: &Limits) -> Parsed<(u8, &'a [u8])> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    Ok(line(&buf[1..], limits)?.map(|(head, used)| ((tag, head), used + 1)))
}

/// The body of a bulk string whose header line was `head`, at the start of `body`: `None`
/// for the null bulk string; the bytes taken include the trailing CRLF.
fn bulk<'a>(head: &[u8], body: &'a [u8], limits: &Limits) -> Parsed<Option<&'a [u8]>> {
    let n = length(head, "bulk")?;
    if n == -1 {
        return Ok(Some((None, 0)));
    }
    let n = usize::try_from(n).map_err(|_| RespError::BulkTooLarge)?;
    if n > limits.max_bulk {
        return Err(RespError::BulkTooLarge);
    }
    if body.len() < n.saturating_add(2) {
        return Ok(None);
    }
    if &body[n..n + 2] != b"\r\n" {
        return Err(RespError::Protocol(
            "bulk string not followed by CRLF".into(),
        ));
    }
    Ok(Some((Some(&body[..n]), n + 2)))
}

/// The element count of an array whose header line was `head` (`None`: the null array).
fn array_len(head: &[u8], limits: &Limits, depth: usize) -> Result<Option<usize>, RespError> {
    let n = length(head, "multibulk")?;
    if n == -1 {
        return Ok(None);
    }
    let n = usize::try_from(n).map_err(|_| RespError::ArrayTooLarge)?;
    if n > limits.max_array {
        return Err(RespError::ArrayTooLarge);
    }
    if depth >= limits.max_depth {
        return Err(RespError::TooDeep);
    }
    Ok(Some(n))
}

fn unexpected(tag: u8) -> RespError {
    RespError::Protocol(format!("unexpected type byte {:?}", char::from(tag)))
}

/// Parse one frame of any type from the start of `buf`.
pub fn parse_frame(buf: &[u8], limits: &Limits) -> Parsed<Frame> {
    parse_at(buf, limits, 0)
}

fn parse_at(buf: &[u8], limits: &Limits, depth: usize) -> Parsed<Frame> {
    let Some(((tag, head), mut used)) = header(buf, limits)? else {
        return Ok(None);
    };
    let text = || {
        std::str::from_utf8(head)
            .map(str::to_string)
            .map_err(|_| RespError::Protocol("invalid UTF-8 in a simple string".into()))
    };
    let frame = match tag {
        b'+' => Frame::Simple(text()?.into()),
        b'-' => Frame::Error(head.to_vec()),
        b':' => {
            Frame::Integer(int(head).ok_or_else(|| RespError::Protocol("invalid integer".into()))?)
        }
        b'$' => {
            return Ok(bulk(head, &buf[used..], limits)?
                .map(|(b, k)| (b.map_or(Frame::Null, Frame::bulk), used + k)))
        }
        b'*' => {
            let Some(n) = array_len(head, limits, depth)? else {
                return Ok(Some((Frame::NullArray, used)));
            };
            // Never reserve more than what could have arrived: each element takes >= 3 bytes.
            let mut items = Vec::with_capacity(n.min((buf.len() - used) / 3 + 1));
            for _ in 0..n {
                match parse_at(&buf[used..], limits, depth + 1)? {
                    None => return Ok(None),
                    Some((f, k)) => {
                        items.push(f);
                        used += k;
                    }
                }
            }
            Frame::Array(items)
        }
        other => return Err(unexpected(other)),
    };
    Ok(Some((frame, used)))
}

/// The length of the complete frame at the start of `buf`, checked as [`parse_frame`]
/// checks it but without building it: how replies relayed from another node are delimited.
pub fn frame_len(buf: &[u8], limits: &Limits) -> Result<Option<usize>, RespError> {
    skip_at(buf, limits, 0)
}

fn skip_at(buf: &[u8], limits: &Limits, depth: usize) -> Result<Option<usize>, RespError> {
    let Some(((tag, head), mut used)) = header(buf, limits)? else {
        return Ok(None);
    };
    match tag {
        b'+' => {
            if std::str::from_utf8(head).is_err() {
                return Err(RespError::Protocol(
                    "invalid UTF-8 in a simple string".into(),
                ));
            }
        }
        b'-' => {}
        b':' => {
            int(head).ok_or_else(|| RespError::Protocol("invalid integer".into()))?;
        }
        b'$' => return Ok(bulk(head, &buf[used..], limits)?.map(|(_, k)| used + k)),
        b'*' => {
            for _ in 0..array_len(head, limits, depth)?.unwrap_or(0) {
                match skip_at(&buf[used..], limits, depth + 1)? {
                    None => return Ok(None),
                    Some(k) => used += k,
                }
            }
        }
        other => return Err(unexpected(other)),
    }
    Ok(Some(used))
}

/// Parse one client command: an array of bulk strings (what clients send), or an inline
/// command (a line of space-separated words, as typed into `telnet`). An empty inline line
/// yields an empty command, which the server skips. The arguments borrow from `buf`.
pub fn parse_command<'a>(buf: &'a [u8], limits: &Limits) -> Parsed<Args<'a>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != b'*' {
        return inline(buf, limits);
    }
    let Some(((_, head), mut used)) = header(buf, limits)? else {
        return Ok(None);
    };
    let n = length(head, "multibulk")?;
    if n <= 0 {
        return Ok(Some((Args::new(), used)));
    }
    let n = usize::try_from(n).map_err(|_| RespError::ArrayTooLarge)?;
    if n > limits.max_array {
        return Err(RespError::ArrayTooLarge);
    }
    let mut args = Args::with_capacity(n.min((buf.len() - used) / 4 + 1));
    for _ in 0..n {
        let Some(((tag, head), k)) = header(&buf[used..], limits)? else {
            return Ok(None);
        };
        if tag != b'$' {
            return Err(RespError::Protocol(format!(
                "expected '$', got '{}'",
                char::from(tag)
            )));
        }
        match bulk(head, &buf[used + k..], limits)? {
            None => return Ok(None),
            Some((Some(b), m)) => {
                args.push(b);
                used += k + m;
            }
            Some((None, _)) => return Err(RespError::Protocol("invalid bulk length".into())),
        }
    }
    Ok(Some((args, used)))
}

fn inline<'a>(buf: &'a [u8], limits: &Limits) -> Parsed<Args<'a>> {
    let scan = &buf[..buf.len().min(limits.max_line.saturating_add(1))];
    let Some(nl) = scan.iter().position(|&b| b == b'\n') else {
        return if scan.len() > limits.max_line {
            Err(RespError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    let mut text = &buf[..nl];
    if text.last() == Some(&b'\r') {
        text = &text[..text.len() - 1];
    }
    let args = text
        .split(|b| *b == b' ' || *b == b'\t')
        .filter(|w| !w.is_empty())
        .collect();
    Ok(Some((args, nl + 1)))
}

/// Append a type byte and a number line (`$3\r\n`) to `out`, without allocating or going
/// through `fmt` (every header of every reply and relayed command passes here).
fn put_header(out: &mut Vec<u8>, tag: u8, n: impl Into<i128>) {
    let n: i128 = n.into();
    let mut digits = [0u8; 40];
    let mut i = digits.len();
    let mut m = n.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (m % 10) as u8;
        m /= 10;
        if m == 0 {
            break;
        }
    }
    out.push(tag);
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Append the encoding of `frame` to `out`. Writes straight into `out`: a reply costs no
/// allocation of its own.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    // Simple strings and errors cannot carry CR or LF: replace them so the stream stays valid.
    fn line(out: &mut Vec<u8>, tag: u8, s: &[u8]) {
        out.push(tag);
        out.extend(
            s.iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        out.extend_from_slice(b"\r\n");
    }
    match frame {
        Frame::Simple(s) => line(out, b'+', s.as_bytes()),
        Frame::Error(s) => line(out, b'-', s),
        Frame::Integer(i) => put_header(out, b':', *i),
        Frame::Bulk(b) => {
            put_header(out, b'$', b.len() as u64);
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Frame::Null => out.extend_from_slice(b"$-1\r\n"),
        Frame::NullArray => out.extend_from_slice(b"*-1\r\n"),
        Frame::Array(items) => {
            put_header(out, b'*', items.len() as u64);
            for f in items {
                encode(f, out);
            }
        }
    }
}

/// Encode a command the way clients do (an array of bulk strings).
pub fn encode_command(args: &[&[u8]], out: &mut Vec<u8>) {
    put_header(out, b'*', args.len() as u64);
    for a in args {
        put_header(out, b'$', a.len() as u64);
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(f: &Frame) -> Vec<u8> {
        let mut v = Vec::new();
        encode(f, &mut v);
        v
    }

    #[test]
    fn table() {
        let l = Limits::default();
        let cases: &[(&[u8], Option<Frame>)] = &[
            (b"+OK\r\n", Some(Frame::ok())),
            (b"-ERR x\r\n", Some(Frame::err("ERR x"))),
            (b":-12\r\n", Some(Frame::Integer(-12))),
            (b"$3\r\nfoo\r\n", Some(Frame::bulk("foo"))),
            (b"$0\r\n\r\n", Some(Frame::bulk(""))),
            (b"$-1\r\n", Some(Frame::Null)),
            (b"*-1\r\n", Some(Frame::NullArray)),
            (b"*0\r\n", Some(Frame::Array(vec![]))),
            (b"$3\r\nfo", None),
            (b"*2\r\n$1\r\na\r\n", None),
            (b"+OK\r", None),
            (b"", None),
        ];
        for (bytes, want) in cases {
            let got = parse_frame(bytes, &l).expect("valid").map(|(f, _)| f);
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(bytes));
        }
        for bad in [
            &b"?x\r\n"[..],
            b":abc\r\n",
            b":+1\r\n",
            b"$-2\r\n",
            b"$3\r\nfooX\r\n",
            b"+OK\nx",
            b"+OK\rx",
            b"*-5\r\n",
        ] {
            assert!(parse_frame(bad, &l).is_err(), "{:?}", bad);
        }
    }

    #[test]
    fn huge_lengths_are_refused_without_allocating() {
        let l = Limits::default();
        assert_eq!(
            parse_frame(b"$99999999999\r\n", &l),
            Err(RespError::BulkTooLarge)
        );
        assert_eq!(
            parse_frame(b"*99999999999\r\n", &l),
            Err(RespError::ArrayTooLarge)
        );
        assert_eq!(
            parse_command(b"*2\r\n$999999999999999\r\n", &l),
            Err(RespError::BulkTooLarge)
        );
        assert!(parse_frame(b"$99999999999999999999999\r\n", &l).is_err());
        // Just under the limit: incomplete, and nothing reserved.
        let small = Limits {
            max_bulk: 10,
            ..Limits::default()
        };
        assert_eq!(parse_frame(b"$10\r\nab", &small), Ok(None));
        assert_eq!(
            parse_frame(b"$11\r\n", &small),
            Err(RespError::BulkTooLarge)
        );
        let long = vec![b'a'; DEFAULT_MAX_LINE + 10];
        assert_eq!(parse_command(&long, &l), Err(RespError::LineTooLong));
        let mut deep = Vec::new();
        for _ in 0..100 {
            deep.extend_from_slice(b"*1\r\n");
        }
        assert_eq!(parse_frame(&deep, &l), Err(RespError::TooDeep));
    }

    #[test]
    fn commands_and_inline() {
        let l = Limits::default();
        let mut v = Vec::new();
        encode_command(&[b"SET", b"k", b"v v"], &mut v);
        let (cmd, n) = parse_command(&v, &l).expect("ok").expect("complete");
        assert_eq!(n, v.len());
        assert_eq!(cmd.as_slice(), [&b"SET"[..], b"k", b"v v"]);
        let (cmd, n) = parse_command(b"PING\r\nGET", &l)
            .expect("ok")
            .expect("complete");
        assert_eq!((cmd.as_slice(), n), (&[&b"PING"[..]][..], 6));
        let (cmd, _) = parse_command(b"  set  a   b\n", &l)
            .expect("ok")
            .expect("complete");
        assert_eq!(cmd.len(), 3);
        assert_eq!(parse_command(b"\r\n", &l), Ok(Some((Args::new(), 2))));
        assert_eq!(parse_command(b"PIN", &l), Ok(None));
        assert!(parse_command(b"*1\r\n:1\r\n", &l).is_err());
        assert!(parse_command(b"*x\r\n", &l).is_err());
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let leaf = prop_oneof![
            "[a-zA-Z0-9 ]{0,20}".prop_map(|s| Frame::Simple(s.into())),
            "[a-zA-Z0-9 ]{0,20}".prop_map(|s| Frame::Error(s.into_bytes())),
            proptest::collection::vec(
                any::<u8>().prop_filter("one line", |b| *b != b'\r' && *b != b'\n'),
                0..20
            )
            .prop_map(Frame::Error),
            any::<i64>().prop_map(Frame::Integer),
            proptest::collection::vec(any::<u8>(), 0..64).prop_map(Frame::Bulk),
            Just(Frame::Null),
            Just(Frame::NullArray),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            proptest::collection::vec(inner, 0..8).prop_map(Frame::Array)
        })
    }

    proptest! {
        #[test]
        fn roundtrip(f in arb_frame()) {
            let bytes = enc(&f);
            let got = parse_frame(&bytes, &Limits::default()).expect("valid").expect("complete");
            prop_assert_eq!(got, (f, bytes.len()));
            prop_assert_eq!(frame_len(&bytes, &Limits::default()), Ok(Some(bytes.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            // Mostly protocol bytes, to get past the first byte more often.
            proptest::collection::vec(prop_oneof![Just(b'*'), Just(b'$'), Just(b'\r'), Just(b'\n'), Just(b'1'), Just(b'-'), Just(b'+'), Just(b':'), any::<u8>()], 0..64),
        ]) {
            let l = Limits { max_bulk: 100, max_array: 10, max_line: 50, max_depth: 4 };
            if let Ok(Some((f, n))) = parse_frame(&bytes, &l) {
                prop_assert!(n <= bytes.len());
                // What parses re-encodes canonically and parses back the same.
                let again = enc(&f);
                prop_assert_eq!(parse_frame(&again, &l), Ok(Some((f, again.len()))));
            }
            // Delimiting without building agrees with parsing, on every input.
            for lim in [l, Limits::default()] {
                let parsed = parse_frame(&bytes, &lim).map(|o| o.map(|(_, n)| n));
                prop_assert_eq!(frame_len(&bytes, &lim), parsed);
            }
            let _ = parse_command(&bytes, &l);
            let _ = parse_command(&bytes, &Limits::default());
        }

        #[test]
        fn any_split_parses_the_same(frames in proptest::collection::vec(arb_frame(), 1..5), cut in any::<prop::sample::Index>()) {
            let mut stream = Vec::new();
            for f in &frames { encode(f, &mut stream); }
            let cut = cut.index(stream.len() + 1);
            // Feed the prefix, then everything: the prefix never yields a wrong frame.
            let l = Limits::default();
            let mut got = Vec::new();
            let mut buf = stream[..cut].to_vec();
            let mut rest = &stream[cut..];
            loop {
                match parse_frame(&buf, &l).expect("valid prefix") {
                    Some((f, n)) => { got.push(f); buf.drain(..n); }
                    None if rest.is_empty() => break,
                    None => { buf.extend_from_slice(rest); rest = &[]; }
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn commands_any_split(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..20), 1..6), cut in any::<prop::sample::Index>()) {
            let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let mut stream = Vec::new();
            encode_command(&refs, &mut stream);
            let cut = cut.index(stream.len());
            let l = Limits::default();
            prop_assert_eq!(parse_command(&stream[..cut], &l).expect("valid prefix"), None);
            let (got, n) = parse_command(&stream, &l).expect("valid").expect("complete");
            prop_assert_eq!(n, stream.len());
            prop_assert_eq!(got.as_slice(), refs.as_slice());
        }
    }
}
