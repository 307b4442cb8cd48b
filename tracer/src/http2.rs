//! HTTP/2 over cleartext TCP with prior knowledge (gRPC, h2load, `curl --http2-prior-knowledge`),
//! over the bytes the probes captured: the frames of one direction of a connection, followed
//! across syscalls and across bytes past the capture (skipped by the frames' own lengths), and
//! their header blocks decoded (HPACK: `hpack`) into what a request or a response needs.
//!
//! HPACK state is shared by every header block of a direction: a block that went by unseen
//! leaves this side's table unlike the encoder's, and any later block could then decode to
//! wrong values. From then on the direction's blocks are not decoded (`Fields` is `None`):
//! their streams are counted as lost, never given a made-up route or status.

use tracer_common::SEGMENT_HEADER;

use crate::{
    hpack::Decoder,
    http1::{self, Method, Path, Propagated},
};

/// What a client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;

// Frame types (RFC 9113 §6).
pub(crate) const DATA: u8 = 0x0;
pub(crate) const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
pub(crate) const RST_STREAM: u8 = 0x3;
pub(crate) const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
pub(crate) const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
// Frame flags.
pub(crate) const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// Largest header block gathered (HEADERS and its CONTINUATIONs); a larger one is not decoded.
const MAX_BLOCK: usize = 16 * 1024;
/// Largest dynamic table followed (SETTINGS_HEADER_TABLE_SIZE, 4 KiB by default and in gRPC,
/// Go, nginx and Envoy, may allow an encoder more): a larger size update makes the direction
/// blind rather than the table large.
const MAX_TABLE: usize = 16 * 1024;
/// Buffers kept between header blocks; a larger one (a rare long block) is given back.
const KEPT_BUFFER: usize = 4096;
/// Longest path kept: a longer one is cut (at a character boundary).
const MAX_PATH: usize = 2048;
/// Longest frame believed when looking for frames again after a loss (16 KiB by default;
/// larger ones must be negotiated).
const RESYNC_MAX_FRAME: u32 = 1 << 20;

/// How a connection's first bytes open HTTP/2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// The client preface: the end that wrote it is the client.
    Preface,
    /// A SETTINGS frame first: a server's preface, which a server may write (and so its
    /// client read) before the client's preface.
    ServerSettings,
    /// A start of the preface: more bytes are needed.
    Undecided,
    Neither,
}

pub fn opening(buf: &[u8]) -> Opening {
    if buf.len() >= PREFACE.len() {
        if buf.starts_with(PREFACE) {
            return Opening::Preface;
        }
    } else if !buf.is_empty() && PREFACE.starts_with(buf) {
        return Opening::Undecided;
    }
    if buf.len() >= FRAME_HEADER {
        let h = FrameHeader::parse(buf);
        if h.kind == SETTINGS
            && h.flags == 0
            && h.stream == 0
            && !h.reserved
            && h.len.is_multiple_of(6)
        {
            return Opening::ServerSettings;
        }
    }
    Opening::Neither
}

#[derive(Clone, Copy, Debug)]
struct FrameHeader {
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
    reserved: bool,
}

impl FrameHeader {
    /// `b` holds at least the 9 bytes of a frame header.
    fn parse(b: &[u8]) -> Self {
        let id = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: id & 0x7fff_ffff,
            reserved: id >> 31 != 0,
        }
    }

    /// Whether bytes where a frame should begin after a loss look like one.
    fn plausible(&self) -> bool {
        !self.reserved
            && self.len <= RESYNC_MAX_FRAME
            && match self.kind {
                DATA | HEADERS | PRIORITY | RST_STREAM | PUSH_PROMISE | CONTINUATION => {
                    self.stream != 0
                }
                SETTINGS | PING | GOAWAY => self.stream == 0,
                WINDOW_UPDATE => true,
                _ => false,
            }
    }
}

/// What one direction's frames say, as they complete.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A stream's whole header block (HEADERS and its CONTINUATIONs), decoded; `None` when it
    /// could not be (bytes of it, or of an earlier block, went by unseen).
    Headers {
        stream: u32,
        end_stream: bool,
        fields: Option<Fields>,
    },
    Data {
        stream: u32,
        len: u32,
        end_stream: bool,
    },
    /// RST_STREAM, with its error code when its payload was seen.
    Reset { stream: u32, code: Option<u32> },
    /// GOAWAY: streams after `last_stream` were not processed (`None`: its payload was not
    /// seen).
    GoAway { last_stream: Option<u32> },
    /// Frames went by that could not be followed: what they held is unknown.
    Lost,
}

/// What a header block says that the tracer uses.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fields {
    pub method: Option<Method>,
    pub path: Option<Path>,
    pub status: Option<u16>,
    /// gRPC's own status (trailers, or headers of a response without body).
    pub grpc_status: Option<u32>,
    pub context: Option<Propagated>,
}

/// The frame whose payload is being read.
#[derive(Debug)]
struct Current {
    h: FrameHeader,
    left: u32,
}

/// One direction of an HTTP/2 connection: its frames, and the HPACK table its header blocks
/// build.
pub struct Half {
    /// Bytes of the client preface still to pass (the client's direction, followed from the
    /// start).
    preface: u8,
    hdr: [u8; FRAME_HEADER],
    hdr_len: u8,
    current: Option<Current>,
    /// Frame boundaries are known.
    synced: bool,
    /// The kept payload of the current frame (HEADERS, CONTINUATION, PUSH_PROMISE).
    payload: Vec<u8>,
    /// Bytes of the current frame's payload went by past the capture.
    payload_lost: bool,
    /// A header block still open (no END_HEADERS yet): its stream, END_STREAM and whether it
    /// is a PUSH_PROMISE's.
    open: Option<(u32, bool, bool)>,
    block: Vec<u8>,
    block_lost: bool,
    hpack: Decoder,
    /// A header block went by undecoded: this side's table is no longer the encoder's.
    blind: bool,
}

impl std::fmt::Debug for Half {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Half")
            .field("synced", &self.synced)
            .field("blind", &self.blind)
            .finish_non_exhaustive()
    }
}

impl Half {
    /// A direction followed from the connection's start; `preface`: the client's, which opens
    /// with the preface.
    pub fn new(preface: bool) -> Self {
        let hpack = Decoder::new(MAX_TABLE);
        Self {
            preface: if preface { PREFACE.len() as u8 } else { 0 },
            hdr: [0; FRAME_HEADER],
            hdr_len: 0,
            current: None,
            synced: true,
            payload: Vec::new(),
            payload_lost: false,
            open: None,
            block: Vec::new(),
            block_lost: false,
            hpack,
            blind: false,
        }
    }

    /// Whether frame boundaries are known.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// Whether header blocks to come can be decoded.
    pub fn readable(&self) -> bool {
        self.synced && !self.blind
    }

    /// Events of this direction went missing: frames (and header blocks) unseen.
    pub fn lose(&mut self, out: &mut impl FnMut(Frame)) {
        self.synced = false;
        self.blind = true;
        self.current = None;
        self.hdr_len = 0;
        self.open = None;
        self.block.clear();
        self.preface = 0;
        out(Frame::Lost);
    }

    /// One syscall's bytes, as far as they were captured.
    pub fn feed(&mut self, view: &View<'_>, out: &mut impl FnMut(Frame)) {
        let total = view.total;
        if !self.synced {
            // Frames are looked for again at a call that holds whole frames only (writers
            // write whole frames; most reads end where a write did).
            if !whole_frames(view) {
                return;
            }
            self.synced = true;
        }
        let mut off: u64 = 0;
        while off < total {
            let at = view.at(off);
            let rest = total - off;
            if self.preface > 0 {
                let n = rest.min(u64::from(self.preface)) as usize;
                let from = PREFACE.len() - self.preface as usize;
                let seen = n.min(at.len());
                if at[..seen] != PREFACE[from..from + seen] {
                    self.lose(out);
                    return;
                }
                self.preface -= n as u8;
                off += n as u64;
                continue;
            }
            let Some(cur) = &mut self.current else {
                let need = FRAME_HEADER - self.hdr_len as usize;
                let n = (rest as usize).min(need).min(at.len());
                if n == 0 {
                    // A frame header went by uncaptured.
                    self.lose(out);
                    return;
                }
                let from = self.hdr_len as usize;
                self.hdr[from..from + n].copy_from_slice(&at[..n]);
                self.hdr_len += n as u8;
                off += n as u64;
                if (self.hdr_len as usize) < FRAME_HEADER {
                    // The rest in the next call, or captured further on in this one.
                    continue;
                }
                self.hdr_len = 0;
                let h = FrameHeader::parse(&self.hdr);
                if self.open.is_some() && h.kind != CONTINUATION {
                    // RFC 9113 §6.10: nothing may come between a block's frames.
                    self.lose(out);
                    return;
                }
                self.payload.clear();
                self.payload_lost = false;
                self.current = Some(Current { h, left: h.len });
                if h.len == 0 {
                    self.end_frame(out);
                }
                continue;
            };
            let mut n = rest.min(u64::from(cur.left));
            // Header blocks whole; of a GOAWAY its last stream id (the debug data after it may
            // be long), of a RST_STREAM its error code.
            let word = matches!(cur.h.kind, GOAWAY | RST_STREAM);
            let kept = matches!(cur.h.kind, HEADERS | CONTINUATION | PUSH_PROMISE)
                || (word && self.payload.len() < 4);
            if kept {
                let mut seen = (n as usize).min(at.len());
                if word {
                    seen = seen.min(4 - self.payload.len());
                }
                if seen == 0 {
                    // Not captured up to the next bytes that were.
                    n = n.min(view.known_from(off) - off);
                    self.payload_lost = true;
                } else {
                    n = seen as u64;
                    if self.payload.len() + seen > MAX_BLOCK {
                        self.payload_lost = true;
                    } else {
                        self.payload.extend_from_slice(&at[..seen]);
                    }
                }
            }
            cur.left -= n as u32;
            off += n;
            if cur.left == 0 {
                self.end_frame(out);
            }
        }
    }

    /// The frame's first 4 payload bytes, when seen.
    fn first_word(&self) -> Option<u32> {
        let b = self.payload.get(..4).filter(|_| !self.payload_lost)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn end_frame(&mut self, out: &mut impl FnMut(Frame)) {
        let Some(Current { h, .. }) = self.current.take() else {
            return;
        };
        match h.kind {
            DATA => out(Frame::Data {
                stream: h.stream,
                len: h.len,
                end_stream: h.flags & END_STREAM != 0,
            }),
            HEADERS | PUSH_PROMISE => {
                let promise = h.kind == PUSH_PROMISE;
                let fragment = if self.payload_lost {
                    None
                } else {
                    fragment(&self.payload, h.flags, promise)
                };
                self.block.clear();
                self.block_lost = fragment.is_none();
                if let Some(f) = fragment {
                    self.block.extend_from_slice(f);
                }
                self.open = Some((h.stream, h.flags & END_STREAM != 0, promise));
                if h.flags & END_HEADERS != 0 {
                    self.end_block(out);
                }
            }
            CONTINUATION => {
                // One after a loss, whose block began unseen: skipped.
                if self.open.is_none() {
                    return;
                }
                if self.payload_lost || self.block.len() + self.payload.len() > MAX_BLOCK {
                    self.block_lost = true;
                } else {
                    self.block.extend_from_slice(&self.payload);
                }
                if h.flags & END_HEADERS != 0 {
                    self.end_block(out);
                }
            }
            RST_STREAM => out(Frame::Reset {
                stream: h.stream,
                code: self.first_word(),
            }),
            GOAWAY => out(Frame::GoAway {
                last_stream: self.first_word().map(|w| w & 0x7fff_ffff),
            }),
            _ => {}
        }
    }

    /// A whole header block: decoded (the table must follow every block, a push's too) unless
    /// this side's table is no longer the encoder's.
    fn end_block(&mut self, out: &mut impl FnMut(Frame)) {
        let Some((stream, end_stream, promise)) = self.open.take() else {
            return;
        };
        if self.block_lost {
            self.blind = true;
        }
        let fields = if self.blind {
            None
        } else {
            let fields = decode(&mut self.hpack, &self.block);
            self.blind = fields.is_none();
            fields
        };
        self.block.clear();
        if self.block.capacity() > KEPT_BUFFER {
            self.block.shrink_to(KEPT_BUFFER);
        }
        if self.payload.capacity() > KEPT_BUFFER {
            self.payload.shrink_to(KEPT_BUFFER);
        }
        if !promise {
            out(Frame::Headers {
                stream,
                end_stream,
                fields,
            });
        }
    }
}

/// A HEADERS (or PUSH_PROMISE) payload's header block fragment, without padding, priority or
/// promised stream.
fn fragment(payload: &[u8], flags: u8, promise: bool) -> Option<&[u8]> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = *p.first()? as usize;
        p = &p[1..];
    }
    if promise {
        p = p.get(4..)?;
    } else if flags & PRIORITY_FLAG != 0 {
        p = p.get(5..)?;
    }
    p.get(..p.len().checked_sub(pad)?)
}

/// Whether a call's bytes are frames from its first byte to its last.
fn whole_frames(view: &View<'_>) -> bool {
    let mut off: u64 = 0;
    while off < view.total {
        let Some(b) = view.at(off).get(..FRAME_HEADER) else {
            return false;
        };
        let h = FrameHeader::parse(b);
        if !h.plausible() {
            return false;
        }
        off += FRAME_HEADER as u64 + u64::from(h.len);
    }
    off == view.total
}

/// What was captured of one call: its first bytes, and the kernel side's segments of the
/// frames past them (`tracer_common::FRAMES_CAP`).
pub struct View<'a> {
    shown: &'a [u8],
    total: u64,
    segments: smallvec::SmallVec<[(u64, &'a [u8]); 16]>,
}

impl<'a> View<'a> {
    /// `shown` of the call's `total` bytes, and the segments as the kernel side sent them
    /// (a malformed one ends them).
    pub fn new(shown: &'a [u8], total: u64, mut frames: &'a [u8]) -> Self {
        let mut segments = smallvec::SmallVec::new();
        while let Some((head, rest)) = frames.split_first_chunk::<SEGMENT_HEADER>() {
            let off = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let Some(bytes) = rest.get(..len) else {
                break;
            };
            if u64::from(off) + len as u64 <= total {
                segments.push((u64::from(off), bytes));
            }
            frames = &rest[len..];
        }
        Self {
            shown,
            total,
            segments,
        }
    }

    /// The captured bytes from `off` on, as far as they run without a gap.
    fn at(&self, off: u64) -> &'a [u8] {
        let mut best: &'a [u8] = self.shown.get(off as usize..).unwrap_or(&[]);
        for &(at, bytes) in &self.segments {
            if at <= off && off < at + bytes.len() as u64 {
                let s = &bytes[(off - at) as usize..];
                if s.len() > best.len() {
                    best = s;
                }
            }
        }
        best
    }

    /// Where captured bytes begin again after `off` (the call's end if nowhere).
    fn known_from(&self, off: u64) -> u64 {
        self.segments
            .iter()
            .map(|&(at, _)| at)
            .filter(|&at| at > off)
            .min()
            .unwrap_or(self.total)
    }
}

/// Decodes a header block into the fields the tracer uses; `None` when it is not valid HPACK
/// (the table then no longer follows the encoder's).
fn decode(hpack: &mut Decoder, block: &[u8]) -> Option<Fields> {
    let mut f = Fields::default();
    // Names are lowercase in HTTP/2; the few this looks for are matched by length first.
    let mut context: [(&'static str, Vec<u8>); 7] = [
        ("traceparent", Vec::new()),
        ("tracestate", Vec::new()),
        ("b3", Vec::new()),
        ("x-b3-traceid", Vec::new()),
        ("x-b3-spanid", Vec::new()),
        ("x-b3-sampled", Vec::new()),
        ("x-b3-flags", Vec::new()),
    ];
    let mut has_context = false;
    hpack
        .decode(block, |name, value| match name {
            b":method" => f.method = std::str::from_utf8(value).ok().and_then(Method::parse),
            b":path" => {
                f.path = std::str::from_utf8(value).ok().map(|p| {
                    let p = http1::strip_query(p);
                    let mut cut = p.len().min(MAX_PATH);
                    while !p.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    Path::new(&p[..cut])
                })
            }
            b":status" => {
                f.status = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .filter(|s| (100..1000).contains(s))
            }
            b"grpc-status" => {
                f.grpc_status = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok())
            }
            n => {
                if let Some(slot) = context.iter_mut().find(|(k, _)| k.as_bytes() == n) {
                    slot.1 = value.to_vec();
                    has_context = true;
                }
            }
        })
        .ok()?;
    if has_context {
        let headers: Vec<httparse::Header<'_>> = context
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(name, value)| httparse::Header { name, value })
            .collect();
        f.context = http1::propagated(&headers);
    }
    Some(f)
}

/// Frames as a peer writes them, for tests (HPACK by another implementation: loona-hpack).
#[cfg(test)]
pub(crate) mod testing {
    use super::END_HEADERS;
    pub(crate) use super::{DATA, END_STREAM, GOAWAY, HEADERS, RST_STREAM, SETTINGS};
    pub use loona_hpack::Encoder;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    pub fn headers(
        enc: &mut Encoder<'_>,
        stream: u32,
        flags: u8,
        fields: &[(&[u8], &[u8])],
    ) -> Vec<u8> {
        let block = enc.encode(fields.iter().copied());
        frame(HEADERS, flags | END_HEADERS, stream, &block)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Encoder, frame, headers};
    use super::*;

    fn collect(half: &mut Half, shown: &[u8], total: u64) -> Vec<Frame> {
        let mut v = Vec::new();
        half.feed(&View::new(shown, total, &[]), &mut |f| v.push(f));
        v
    }

    #[test]
    fn preface_and_requests_across_calls() {
        let mut enc = Encoder::new();
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
        bytes.extend(headers(
            &mut enc,
            1,
            END_STREAM,
            &[
                (b":method", b"GET"),
                (b":path", b"/users/7?x=1"),
                (b":scheme", b"http"),
            ],
        ));
        bytes.extend(headers(
            &mut enc,
            3,
            0,
            &[
                (b":method", b"POST"),
                (b":path", b"/users/7?x=1"),
                (
                    b"traceparent",
                    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ],
        ));
        bytes.extend(frame(DATA, END_STREAM, 3, b"hello"));
        let mut half = Half::new(true);
        // Split at every point: frames followed across calls.
        for cut in [1, 9, 24, 30, 40, bytes.len() - 3] {
            let mut half2 = Half::new(true);
            let mut got = collect(&mut half2, &bytes[..cut], cut as u64);
            got.extend(collect(
                &mut half2,
                &bytes[cut..],
                (bytes.len() - cut) as u64,
            ));
            assert_eq!(got.len(), 3, "cut at {cut}: {got:?}");
        }
        let got = collect(&mut half, &bytes, bytes.len() as u64);
        let Frame::Headers {
            stream: 1,
            end_stream: true,
            fields: Some(f),
        } = &got[0]
        else {
            panic!("{got:?}");
        };
        assert_eq!(
            (f.method, f.path.as_deref()),
            (Some(Method::Get), Some("/users/7"))
        );
        let Frame::Headers {
            stream: 3,
            end_stream: false,
            fields: Some(f),
        } = &got[1]
        else {
            panic!("{got:?}");
        };
        assert_eq!(f.method, Some(Method::Post));
        assert_eq!(
            f.path.as_deref(),
            Some("/users/7"),
            "from the dynamic table"
        );
        assert!(f.context.is_some());
        assert_eq!(
            got[2],
            Frame::Data {
                stream: 3,
                len: 5,
                end_stream: true
            }
        );
    }

    #[test]
    fn data_past_the_capture_is_skipped_by_length() {
        let mut enc = Encoder::new();
        let mut bytes = headers(&mut enc, 1, 0, &[(b":status", b"200")]);
        bytes.extend(frame(DATA, 0, 1, &[b'x'; 3000]));
        let shown = 100;
        let mut half = Half::new(false);
        let got = collect(&mut half, &bytes[..shown], bytes.len() as u64);
        assert_eq!(got.len(), 2, "{got:?}");
        // Still in sync: the next call's frames are read.
        let next = headers(&mut enc, 3, END_STREAM, &[(b":status", b"404")]);
        let got = collect(&mut half, &next, next.len() as u64);
        let Frame::Headers {
            stream: 3,
            fields: Some(f),
            ..
        } = &got[0]
        else {
            panic!("{got:?}");
        };
        assert_eq!(f.status, Some(404));
    }

    #[test]
    fn an_unseen_block_blinds_the_direction_until_the_end() {
        let mut enc = Encoder::new();
        let mut bytes = frame(DATA, 0, 1, &[b'x'; 2000]);
        let first = bytes.len();
        bytes.extend(headers(
            &mut enc,
            3,
            0,
            &[(b":status", b"200"), (b"x-id", b"a")],
        ));
        let mut half = Half::new(false);
        // The second frame's header is past the capture: lost, and found again at a call of
        // whole frames.
        let got = collect(&mut half, &bytes[..first - 10], bytes.len() as u64);
        assert_eq!(got.last(), Some(&Frame::Lost));
        let next = headers(
            &mut enc,
            5,
            END_STREAM,
            &[(b":status", b"200"), (b"x-id", b"a")],
        );
        let got = collect(&mut half, &next, next.len() as u64);
        assert_eq!(
            got,
            vec![Frame::Headers {
                stream: 5,
                end_stream: true,
                fields: None
            }],
            "a block after an unseen one is not decoded"
        );
        // Garbage is not taken for frames.
        let got = collect(&mut half, b"GET / HTTP/1.1\r\n\r\n", 18);
        assert!(got.is_empty());
    }

    #[test]
    fn openings() {
        assert_eq!(opening(PREFACE), Opening::Preface);
        assert_eq!(opening(&PREFACE[..5]), Opening::Undecided);
        assert_eq!(
            opening(&frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])),
            Opening::ServerSettings
        );
        assert_eq!(opening(&frame(SETTINGS, 0, 0, &[1])), Opening::Neither);
        assert_eq!(opening(&frame(PING, 0, 0, &[0; 8])), Opening::Neither);
        assert_eq!(opening(b"GET / HTTP/1.1\r\n"), Opening::Neither);
    }

    #[test]
    fn padded_headers_with_priority() {
        let mut enc = Encoder::new();
        let block = enc.encode([(&b":status"[..], &b"503"[..])]);
        let mut payload = vec![2u8];
        payload.extend([0, 0, 0, 0, 16]);
        payload.extend(&block);
        payload.extend([0, 0]);
        let bytes = frame(
            HEADERS,
            PADDED | PRIORITY_FLAG | END_HEADERS | END_STREAM,
            1,
            &payload,
        );
        let got = collect(&mut Half::new(false), &bytes, bytes.len() as u64);
        let Frame::Headers {
            fields: Some(f), ..
        } = &got[0]
        else {
            panic!("{got:?}");
        };
        assert_eq!(f.status, Some(503));
    }
}
