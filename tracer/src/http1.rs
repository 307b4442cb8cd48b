//! HTTP/1.x message heads and body framing, over the bytes the probes captured.
//!
//! Heads are parsed with httparse; this module only adds what a passive observer needs on top:
//! telling a request start from a response start, the body framing rules of RFC 9112 §6, and a
//! chunked-body scanner that can skip bytes it was not shown.

use std::mem::MaybeUninit;

use thiserror::Error;

/// A request path (target without its query): inline when short, as most are.
pub type Path = compact_str::CompactString;

/// Request methods recognised at the start of a message. A known list rather than any token, so
/// that random bytes and other protocols are not taken for HTTP.
const METHODS: [&[u8]; 9] = [
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
];

/// Most headers a head may have; more is a parse failure, not a silent cut.
const MAX_HEADERS: usize = 96;

/// What the first bytes of a message look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Request,
    Response,
    /// Too few bytes to tell, but they could still begin either.
    Undecided,
    /// Not HTTP/1.
    Neither,
}

pub fn classify(buf: &[u8]) -> Start {
    let mut undecided = false;
    for m in METHODS {
        if buf.len() > m.len() {
            if buf.starts_with(m) && buf[m.len()] == b' ' {
                return Start::Request;
            }
        } else if m.starts_with(buf) {
            undecided = true;
        }
    }
    const VERSION: &[u8] = b"HTTP/1.";
    if buf.len() >= VERSION.len() {
        if buf.starts_with(VERSION) {
            return Start::Response;
        }
    } else if VERSION.starts_with(buf) {
        undecided = true;
    }
    if undecided {
        Start::Undecided
    } else {
        Start::Neither
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
    Head,
    Options,
    Patch,
    Connect,
    Trace,
}

impl Method {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "GET" => Self::Get,
            "POST" => Self::Post,
            "PUT" => Self::Put,
            "DELETE" => Self::Delete,
            "HEAD" => Self::Head,
            "OPTIONS" => Self::Options,
            "PATCH" => Self::Patch,
            "CONNECT" => Self::Connect,
            "TRACE" => Self::Trace,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Head => "HEAD",
            Self::Options => "OPTIONS",
            Self::Patch => "PATCH",
            Self::Connect => "CONNECT",
            Self::Trace => "TRACE",
        }
    }
}

/// How the body after a head ends (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyLen {
    Empty,
    Length(u64),
    Chunked,
    /// Ends when the sender closes the connection.
    UntilClose,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Method,
    /// The request target without its query string.
    pub path: Path,
    pub head_len: usize,
    pub body: BodyLen,
    /// Trace context the request carries (W3C or B3), if any.
    pub context: Option<Propagated>,
    /// HTTP minor version: 0 or 1.
    pub minor_version: u8,
    /// It asks to go on in HTTP/2 (`Upgrade: h2c`): a 101 answer makes the connection h2c.
    pub upgrade_h2c: bool,
}

/// Trace context propagated in request headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Propagated {
    pub trace_id: u128,
    /// The caller's span: parent of the span that serves this request.
    pub span_id: u64,
    /// The caller's sampling decision, when it made one.
    pub sampled: Option<bool>,
    /// W3C `tracestate`, passed on as is.
    pub tracestate: Option<String>,
}

fn hex_u128(s: &[u8]) -> Option<u128> {
    if s.is_empty() || s.len() > 32 || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u128::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

fn hex_u64(s: &[u8]) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    hex_u128(s).map(|v| v as u64)
}

/// `traceparent: 00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>` (W3C Trace Context).
fn parse_traceparent(v: &[u8]) -> Option<Propagated> {
    let v = v.trim_ascii();
    let mut parts = v.split(|&b| b == b'-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || version.eq_ignore_ascii_case(b"ff") || trace.len() != 32 {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more.
    if version == b"00" && parts.next().is_some() {
        return None;
    }
    let trace_id = hex_u128(trace)?;
    let span_id = hex_u64(span)?;
    let flags = u8::from_str_radix(std::str::from_utf8(flags.get(..2)?).ok()?, 16).ok()?;
    (trace_id != 0 && span_id != 0).then_some(Propagated {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
        tracestate: None,
    })
}

/// `b3: {trace id}-{span id}[-{sampling}[-{parent span id}]]` (B3 single header).
fn parse_b3_single(v: &[u8]) -> Option<Propagated> {
    let mut parts = v.trim_ascii().split(|&b| b == b'-');
    let trace = parts.next()?;
    let span = parts.next()?;
    let sampled = parts.next().and_then(b3_sampled);
    let trace_id = hex_u128(trace).filter(|_| trace.len() == 16 || trace.len() == 32)?;
    let span_id = hex_u64(span)?;
    (trace_id != 0 && span_id != 0).then_some(Propagated {
        trace_id,
        span_id,
        sampled,
        tracestate: None,
    })
}

fn b3_sampled(v: &[u8]) -> Option<bool> {
    match v.trim_ascii() {
        b"1" | b"d" | b"true" => Some(true),
        b"0" | b"false" => Some(false),
        _ => None,
    }
}

/// Trace context from request headers: W3C `traceparent` first, then B3 (single or multi).
pub fn propagated(headers: &[httparse::Header<'_>]) -> Option<Propagated> {
    // Most requests carry none: one pass over the names' lengths (traceparent, b3,
    // x-b3-traceid) instead of a search per header name.
    if !headers.iter().any(|h| matches!(h.name.len(), 11 | 2 | 12)) {
        return None;
    }
    let find = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if let Some(mut ctx) = find("traceparent").and_then(parse_traceparent) {
        ctx.tracestate = find("tracestate")
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|s| s.trim().to_owned());
        return Some(ctx);
    }
    if let Some(ctx) = find("b3").and_then(parse_b3_single) {
        return Some(ctx);
    }
    let trace = find("x-b3-traceid")?.trim_ascii();
    let trace_id = hex_u128(trace).filter(|_| trace.len() == 16 || trace.len() == 32)?;
    let span_id = hex_u64(find("x-b3-spanid")?.trim_ascii())?;
    let sampled = if find("x-b3-flags").is_some_and(|f| f.trim_ascii() == b"1") {
        Some(true)
    } else {
        find("x-b3-sampled").and_then(b3_sampled)
    };
    (trace_id != 0 && span_id != 0).then_some(Propagated {
        trace_id,
        span_id,
        sampled,
        tracestate: None,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub head_len: usize,
    /// Framing as the response's own headers say; see [`ResponseHead::body_for`].
    pub body: BodyLen,
    /// HTTP/1.0 without keep-alive, or `Connection: close`.
    pub closes: bool,
}

impl ResponseHead {
    /// Framing given the request it answers: HEAD answers, 1xx, 204 and 304 have no body.
    pub fn body_for(&self, request_method: Option<Method>) -> BodyLen {
        if request_method == Some(Method::Head)
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            BodyLen::Empty
        } else {
            self.body
        }
    }
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("invalid head")]
    Invalid,
    #[error("unknown method")]
    UnknownMethod,
    #[error("invalid Content-Length")]
    BadContentLength,
}

impl ParseError {
    /// Label for the parse-failure counter.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Invalid => "invalid_head",
            Self::UnknownMethod => "unknown_method",
            Self::BadContentLength => "bad_content_length",
        }
    }
}

/// Result of parsing a head from the bytes seen so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    Complete(T),
    /// Valid so far; more bytes needed.
    Partial,
}

fn framing(headers: &[httparse::Header<'_>]) -> Result<(Option<u64>, bool), ParseError> {
    let mut length = None;
    let mut chunked = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or(ParseError::BadContentLength)?;
            if length.is_some_and(|l| l != v) {
                return Err(ParseError::BadContentLength);
            }
            length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked is the final coding when present (RFC 9112 §6.3 rule 4).
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }
    Ok((length, chunked))
}

pub(crate) fn strip_query(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or(target)
}

/// Whether an `Upgrade` header offers `h2c` (RFC 7540 §3.2; the token list is
/// comma-separated, case-insensitive).
fn offers_h2c(headers: &[httparse::Header<'_>]) -> bool {
    headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("upgrade")
            && h.value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"h2c"))
    })
}

pub fn parse_request(buf: &[u8]) -> Result<Parsed<RequestHead>, ParseError> {
    // Left uninitialised: httparse writes the ones it finds (initialising all 96 was a 3 KiB
    // memset per head).
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(head_len)) => {
            let method = req
                .method
                .and_then(Method::parse)
                .ok_or(ParseError::UnknownMethod)?;
            let path = Path::new(strip_query(req.path.unwrap_or("/")));
            let (length, chunked) = framing(req.headers)?;
            let body = if chunked {
                BodyLen::Chunked
            } else {
                match length {
                    Some(0) | None => BodyLen::Empty,
                    Some(n) => BodyLen::Length(n),
                }
            };
            Ok(Parsed::Complete(RequestHead {
                method,
                path,
                head_len,
                body,
                context: propagated(req.headers),
                minor_version: req.version.unwrap_or(1),
                upgrade_h2c: offers_h2c(req.headers),
            }))
        }
        Ok(httparse::Status::Partial) => Ok(Parsed::Partial),
        Err(_) => Err(ParseError::Invalid),
    }
}

pub fn parse_response(buf: &[u8]) -> Result<Parsed<ResponseHead>, ParseError> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(head_len)) => {
            let status = resp.code.ok_or(ParseError::Invalid)?;
            let (length, chunked) = framing(resp.headers)?;
            let (mut connection_close, mut keep_alive) = (false, false);
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("connection") {
                    for t in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                        connection_close |= t.eq_ignore_ascii_case(b"close");
                        keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                    }
                }
            }
            let closes = connection_close || (resp.version == Some(0) && !keep_alive);
            let body = if chunked {
                BodyLen::Chunked
            } else {
                match length {
                    Some(0) => BodyLen::Empty,
                    Some(n) => BodyLen::Length(n),
                    None => BodyLen::UntilClose,
                }
            };
            Ok(Parsed::Complete(ResponseHead {
                status,
                head_len,
                body,
                closes,
            }))
        }
        Ok(httparse::Status::Partial) => Ok(Parsed::Partial),
        Err(_) => Err(ParseError::Invalid),
    }
}

/// The request line alone, for a head longer than what was captured: enough to count and route
/// the request, though its framing is unknown.
pub fn parse_request_line(buf: &[u8]) -> Option<(Method, Path)> {
    let line = buf.split(|&b| b == b'\r' || b == b'\n').next()?;
    let mut parts = line.split(|&b| b == b' ');
    let method = Method::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    let target = std::str::from_utf8(parts.next()?).ok()?;
    parts.next().filter(|v| v.starts_with(b"HTTP/1."))?;
    Some((method, Path::new(strip_query(target))))
}

/// The status line alone, for a response head longer than what was captured.
pub fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let rest = buf.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// Scans a chunked body (RFC 9112 §7.1) to find where it ends. Chunk data need not be shown:
/// [`Chunked::skip`] advances over bytes that were counted but not captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    Size {
        value: u64,
        digits: u8,
    },
    Extension {
        value: u64,
    },
    SizeLf {
        value: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line; `cr` once a CR was seen there (the blank line).
    TrailerStart {
        cr: bool,
    },
    TrailerLine,
    Done,
}

#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("malformed chunked body")]
pub struct ChunkError;

impl Default for Chunked {
    fn default() -> Self {
        Self {
            state: ChunkState::Size {
                value: 0,
                digits: 0,
            },
        }
    }
}

impl Chunked {
    #[cfg(test)]
    fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Feeds shown bytes; returns how many belonged to the body once it is complete.
    pub fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, ChunkError> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            self.state = match self.state {
                ChunkState::Size { value, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if digits >= 15 {
                            return Err(ChunkError);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        ChunkState::Size {
                            value: value * 16 + d,
                            digits: digits + 1,
                        }
                    }
                    b';' | b' ' | b'\t' if digits > 0 => ChunkState::Extension { value },
                    b'\r' if digits > 0 => ChunkState::SizeLf { value },
                    _ => return Err(ChunkError),
                },
                ChunkState::Extension { value } => match b {
                    b'\r' => ChunkState::SizeLf { value },
                    _ => ChunkState::Extension { value },
                },
                ChunkState::SizeLf { value } => match b {
                    b'\n' if value == 0 => ChunkState::TrailerStart { cr: false },
                    b'\n' => ChunkState::Data(value),
                    _ => return Err(ChunkError),
                },
                ChunkState::Data(rem) => {
                    let take = (rem as usize).min(data.len() - i);
                    i += take;
                    let rem = rem - take as u64;
                    self.state = if rem == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(rem)
                    };
                    continue;
                }
                ChunkState::DataCr => match b {
                    b'\r' => ChunkState::DataLf,
                    _ => return Err(ChunkError),
                },
                ChunkState::DataLf => match b {
                    b'\n' => ChunkState::Size {
                        value: 0,
                        digits: 0,
                    },
                    _ => return Err(ChunkError),
                },
                ChunkState::TrailerStart { cr: false } => match b {
                    b'\r' => ChunkState::TrailerStart { cr: true },
                    b'\n' => ChunkState::Done,
                    _ => ChunkState::TrailerLine,
                },
                ChunkState::TrailerStart { cr: true } => match b {
                    b'\n' => ChunkState::Done,
                    _ => return Err(ChunkError),
                },
                ChunkState::TrailerLine => match b {
                    b'\n' => ChunkState::TrailerStart { cr: false },
                    _ => ChunkState::TrailerLine,
                },
                ChunkState::Done => return Ok(Some(i)),
            };
            i += 1;
            if self.state == ChunkState::Done {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Advances over `n` bytes that were moved but not shown. Returns false when they cannot
    /// all be chunk data, i.e. the framing can no longer be followed.
    /// Bytes of the current chunk's data still to come, when inside it.
    pub fn data_left(&self) -> Option<u64> {
        match self.state {
            ChunkState::Data(rem) => Some(rem),
            _ => None,
        }
    }

    pub fn skip(&mut self, n: u64) -> bool {
        match self.state {
            ChunkState::Data(rem) if rem >= n => {
                let rem = rem - n;
                self.state = if rem == 0 {
                    ChunkState::DataCr
                } else {
                    ChunkState::Data(rem)
                };
                true
            }
            _ => n == 0,
        }
    }
}

/// Whether `end` (the whole of a write or read) closes a chunked body.
pub fn ends_chunked(end: &[u8]) -> bool {
    end.ends_with(b"\r\n0\r\n\r\n") || end == b"0\r\n\r\n"
}

/// Whether a call's tail (its last bytes, the rest unseen) closes a chunked body: the last
/// chunk alone may follow a size digit ("50\r\n\r\n" is no end), so its CRLF before it too.
pub fn tail_ends_chunked(tail: &[u8]) -> bool {
    tail.ends_with(b"\r\n0\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_starts() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Start::Request);
        assert_eq!(classify(b"GE"), Start::Undecided);
        assert_eq!(classify(b"HTTP/1.1 200 OK\r\n"), Start::Response);
        assert_eq!(classify(b"HTT"), Start::Undecided);
        assert_eq!(classify(b"\x16\x03\x01"), Start::Neither);
        assert_eq!(classify(b"PRI * HTTP/2.0"), Start::Neither);
        assert_eq!(classify(b"GETX / HTTP/1.1"), Start::Neither);
    }

    #[test]
    fn parses_request_framing() {
        let r =
            parse_request(b"POST /a/1?x=2 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello");
        let Ok(Parsed::Complete(h)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(h.method, Method::Post);
        assert_eq!(h.path, "/a/1");
        assert_eq!(h.body, BodyLen::Length(5));
        assert_eq!(h.head_len, 54);
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost"),
            Ok(Parsed::Partial)
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Err(ParseError::BadContentLength)
        );
    }

    #[test]
    fn parses_response_framing() {
        let Ok(Parsed::Complete(h)) =
            parse_response(b"HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\n")
        else {
            panic!()
        };
        assert_eq!(h.status, 404);
        assert_eq!(h.body, BodyLen::UntilClose);
        assert!(h.closes);
        assert_eq!(h.body_for(Some(Method::Head)), BodyLen::Empty);
        let Ok(Parsed::Complete(h)) =
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
        else {
            panic!()
        };
        assert_eq!(h.body, BodyLen::Chunked);
        assert!(!h.closes);
    }

    #[test]
    fn request_and_status_lines() {
        assert_eq!(
            parse_request_line(b"GET /users/7?q HTTP/1.1\r\nHost: a"),
            Some((Method::Get, "/users/7".into()))
        );
        assert_eq!(parse_request_line(b"GET /users/7"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 503 Busy"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 5x3"), None);
    }

    #[test]
    fn trace_context_headers() {
        let head = |h: &str| {
            let raw = format!("GET / HTTP/1.1\r\n{h}\r\n\r\n");
            match parse_request(raw.as_bytes()) {
                Ok(Parsed::Complete(r)) => r.context,
                other => panic!("{other:?}"),
            }
        };
        let w3c = head(
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\ntracestate: k=v",
        )
        .expect("w3c");
        assert_eq!(w3c.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(w3c.span_id, 0x00f067aa0ba902b7);
        assert_eq!(w3c.sampled, Some(true));
        assert_eq!(w3c.tracestate.as_deref(), Some("k=v"));
        assert_eq!(
            head("traceparent: 00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(head("traceparent: 00-4bf92f35-00f067aa0ba902b7-01"), None);
        let b3 = head("b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0").expect("b3");
        assert_eq!(b3.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!(b3.sampled, Some(false));
        let multi = head(
            "X-B3-TraceId: 463ac35c9f6413ad\r\nX-B3-SpanId: a2fb4a1d1a96d312\r\nX-B3-Sampled: 1",
        )
        .expect("b3 multi");
        assert_eq!(multi.trace_id, 0x463ac35c9f6413ad);
        assert_eq!(multi.span_id, 0xa2fb4a1d1a96d312);
        assert_eq!(multi.sampled, Some(true));
        assert_eq!(head("Host: x"), None);
    }

    #[test]
    fn chunked_scans_and_skips() {
        let body = b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\nGET";
        let mut c = Chunked::default();
        assert_eq!(c.feed(body), Ok(Some(body.len() - 3)));
        // Split at every point.
        for split in 0..body.len() - 3 {
            let mut c = Chunked::default();
            assert_eq!(c.feed(&body[..split]), Ok(None));
            assert_eq!(c.feed(&body[split..]), Ok(Some(body.len() - 3 - split)));
        }
        let mut c = Chunked::default();
        assert_eq!(c.feed(b"10\r\nabc"), Ok(None));
        assert!(c.skip(13));
        assert_eq!(c.feed(b"\r\n0\r\n\r\n"), Ok(Some(7)));
        assert!(c.is_done());
        let mut c = Chunked::default();
        assert_eq!(c.feed(b"zz\r\n"), Err(ChunkError));
        assert!(ends_chunked(b"xyz\r\n0\r\n\r\n"));
    }
}
