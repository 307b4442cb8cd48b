//! The streams of one HTTP/2 connection, paired into exchanges: a stream's request headers open
//! it, its response's END_STREAM ends it. Pairs are by stream id, so a stream lost or reset
//! never shifts another's.

use std::sync::atomic::{AtomicUsize, Ordering};

use foldhash::HashMap;

use crate::{
    conn::{self, End, Exchange, Side},
    event::{Data, Task, Tuple},
    http1::{Method, Path},
    http2::{Fields, Frame, Half, View},
    metrics::Metrics,
    spans::{self, Linker, SpanId},
};

/// Streams open at once on one connection (nginx allows 128, Go 250, node and Envoy no limit:
/// h2load `-m 1000`, grpc-js with 1000 calls in flight); a request past it is counted as lost.
pub const MAX_STREAMS: usize = 4096;
/// Streams open at once on all connections together (~150 bytes each): past it a request is
/// counted as lost, as past MAX_STREAMS.
pub const MAX_STREAMS_TOTAL: usize = 64 * 1024;

/// Streams open now on all connections (`OpenStreams`).
static OPEN_TOTAL: AtomicUsize = AtomicUsize::new(0);

/// A connection's open streams, counted in OPEN_TOTAL while they are held.
#[derive(Debug, Default)]
struct OpenStreams(HashMap<u32, Stream>);

impl OpenStreams {
    /// Whether one more stream may open here.
    fn full(&self) -> bool {
        self.0.len() >= MAX_STREAMS || OPEN_TOTAL.load(Ordering::Relaxed) >= MAX_STREAMS_TOTAL
    }

    fn insert(&mut self, id: u32, s: Stream) {
        if self.0.insert(id, s).is_none() {
            OPEN_TOTAL.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remove(&mut self, id: &u32) -> Option<Stream> {
        let s = self.0.remove(id);
        if s.is_some() {
            OPEN_TOTAL.fetch_sub(1, Ordering::Relaxed);
        }
        s
    }

    fn drain(&mut self) -> impl Iterator<Item = (u32, Stream)> + '_ {
        OPEN_TOTAL.fetch_sub(self.0.len(), Ordering::Relaxed);
        self.0.drain()
    }
}

impl std::ops::Deref for OpenStreams {
    type Target = HashMap<u32, Stream>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for OpenStreams {
    fn drop(&mut self) {
        OPEN_TOTAL.fetch_sub(self.0.len(), Ordering::Relaxed);
    }
}
/// Furthest a client stream id is believed ahead of the next one expected: ids go up by 2 per
/// stream, and a jump further than this many streams is bytes misread as a frame (after a
/// loss), not requests unseen.
const MAX_ID_JUMP: u32 = 2 * 4096;

/// One stream as this end saw it.
#[derive(Debug)]
struct Stream {
    /// The request's method and path; `None` when its header block could not be decoded.
    request: Option<(Method, Path)>,
    start_ns: u64,
    req_bytes: u64,
    /// The thread that read or wrote the request.
    task: Task,
    span: Option<SpanId>,
    /// The final response status: `Some(None)` when the response's header block could not be
    /// decoded.
    status: Option<Option<u16>>,
    grpc_status: Option<u32>,
    resp_bytes: u64,
    /// When its response's last frame seen so far came.
    resp_ns: u64,
    /// `Streams::response_losses` when it opened: more since, and its end may be among them.
    losses_at_open: u32,
    /// Its server span gave its client span back after response frames went by unseen: the
    /// client end, traced here, counts it.
    released: bool,
}

/// What this end's connection is, for the exchanges its streams make.
pub struct Env<'a, 'b> {
    pub d: &'a Data<'b>,
    pub side: Side,
    pub tuple: Tuple,
    /// The connection's latest process (a client's exchanges name it).
    pub task: Task,
    pub peer_local: bool,
    pub peer_sk: u64,
    pub metrics: &'a Metrics,
    pub linker: &'a mut Linker,
    pub out: &'a mut Vec<Exchange>,
}

impl Env<'_, '_> {
    fn end(&self) -> End {
        End::new(self.side, &self.tuple, self.peer_sk != 0, self.peer_local)
    }
}

/// An HTTP/1.1 request whose connection was upgraded to h2c: stream 1, answered in HTTP/2.
pub struct Upgraded {
    pub method: Method,
    pub path: Path,
    pub start_ns: u64,
    pub req_bytes: u64,
    pub task: Task,
    pub span: Option<SpanId>,
}

/// What an exchange says of the connection it was on, as this end saw it.
pub struct Ends {
    pub side: Side,
    /// The connection's latest process (a client's exchanges name it).
    pub task: Task,
    pub tuple: Tuple,
    pub peer_sk: u64,
    pub tls: bool,
}

impl Ends {
    /// A stream's exchange, ended at `end_ns`; none for one released to its client end, or
    /// without a request or status.
    fn exchange(&self, s: Stream, end_ns: u64) -> Option<Exchange> {
        let (Some((method, path)), Some(Some(status))) = (s.request, s.status) else {
            return None;
        };
        (!s.released).then(|| Exchange {
            side: self.side,
            task: if self.side == Side::Server {
                s.task
            } else {
                self.task
            },
            tuple: self.tuple,
            peer_sk: self.peer_sk,
            method,
            path,
            status,
            grpc_status: s.grpc_status,
            start_ns: s.start_ns,
            end_ns: end_ns.max(s.start_ns),
            req_bytes: s.req_bytes,
            resp_bytes: s.resp_bytes,
            span: s.span,
            unsure: false,
            tls: self.tls,
        })
    }
}

/// Both directions of an HTTP/2 connection and its open streams.
#[derive(Debug)]
pub struct Streams {
    /// Client to server.
    requests: Half,
    /// Server to client.
    responses: Half,
    open: OpenStreams,
    /// The next client stream id expected.
    next_id: u32,
    /// Request frames went by unseen since `next_id` was set: streams skipped over are
    /// requests this end did not see.
    requests_gap: bool,
    /// Times response frames went by unseen (and while they are not followed, one more).
    response_losses: u32,
    /// The server's last GOAWAY: the last stream it processes (`Some(None)`: unread).
    goaway: Option<Option<u32>>,
    /// Frames decoded but not yet applied (kept for their allocation).
    frames: Vec<Frame>,
}

impl Streams {
    /// A connection followed from its start: the client direction opens with the preface.
    pub fn new() -> Self {
        Self {
            requests: Half::new(true),
            responses: Half::new(false),
            open: OpenStreams::default(),
            next_id: 1,
            requests_gap: false,
            response_losses: 0,
            goaway: None,
            frames: Vec::new(),
        }
    }

    /// A connection upgraded to h2c after `request`: the client's next bytes are the preface,
    /// the server's next ones frames, and the request is stream 1.
    pub fn upgraded(request: Upgraded) -> Self {
        let mut s = Self::new();
        s.open.insert(
            1,
            Stream {
                request: Some((request.method, request.path)),
                start_ns: request.start_ns,
                req_bytes: request.req_bytes,
                task: request.task,
                span: request.span,
                status: None,
                grpc_status: None,
                resp_bytes: 0,
                resp_ns: 0,
                losses_at_open: 0,
                released: false,
            },
        );
        s.next_id = 3;
        s
    }

    /// One syscall's bytes on the request (client to server) or response direction.
    pub fn feed(&mut self, requests: bool, env: &mut Env<'_, '_>) {
        let d = env.d;
        let mut frames = std::mem::take(&mut self.frames);
        let half = if requests {
            &mut self.requests
        } else {
            &mut self.responses
        };
        let view = View::new(d.payload, u64::from(d.bytes), d.frames);
        half.feed(&view, &mut |f| frames.push(f));
        let at_ns = d.boundary_ns();
        for f in frames.drain(..) {
            if requests {
                self.on_request_frame(f, at_ns, env);
            } else {
                self.on_response_frame(f, at_ns, env);
            }
        }
        self.frames = frames;
    }

    fn on_request_frame(&mut self, f: Frame, at_ns: u64, env: &mut Env<'_, '_>) {
        match f {
            Frame::Headers { stream, fields, .. } => {
                // Client streams are odd; a known one's second block is its trailers.
                if stream % 2 == 0
                    || self.open.contains_key(&stream)
                    || stream < self.next_id
                    || stream - self.next_id > MAX_ID_JUMP
                {
                    return;
                }
                // Streams skipped over after a loss were opened in frames not seen. (A client
                // may skip ids; none of those followed here do.)
                if self.requests_gap && stream > self.next_id {
                    lost(
                        env,
                        "h2_stream_unseen",
                        u64::from((stream - self.next_id) / 2),
                    );
                }
                self.requests_gap = !self.requests.synced();
                self.next_id = stream.saturating_add(2);
                if self.open.full() && !self.evict_doubtful(env) {
                    env.metrics
                        .pairing_drops
                        .with_label_values(&["pending_overflow"])
                        .inc();
                    lost(env, "pending_overflow", 1);
                    return;
                }
                let request = fields
                    .as_ref()
                    .and_then(|f| Some((f.method?, f.path.clone()?)));
                // No span for a stream whose response this end cannot read (the direction's
                // table went blind): it would claim the client end's span, and that end may
                // see the whole exchange.
                let span = request
                    .as_ref()
                    .filter(|_| self.responses.readable())
                    .and_then(|_| {
                        env.linker.start(spans::Start {
                            kind: env.side,
                            task: env.d.task,
                            tuple: env.tuple,
                            context: fields.as_ref().and_then(|f| f.context.as_ref()),
                            // Both ends number a request by its stream id.
                            index: u64::from(stream),
                            start_ns: at_ns,
                            version: "2",
                            tls: env.d.tls,
                            peer_local: env.peer_local,
                            goroutine: env.d.goroutine,
                            seq: None,
                        })
                    });
                // Without a span for want of a readable response: a client end traced here
                // (with spans) counts it, its span unclaimed.
                let released = env.side == Side::Server
                    && span.is_none()
                    && request.is_some()
                    && env.peer_sk != 0
                    && env.linker.enabled();
                self.open.insert(
                    stream,
                    Stream {
                        request,
                        start_ns: at_ns,
                        req_bytes: 0,
                        task: env.d.task,
                        span,
                        status: None,
                        grpc_status: None,
                        resp_bytes: 0,
                        resp_ns: 0,
                        losses_at_open: self.response_losses,
                        released,
                    },
                );
            }
            Frame::Data { stream, len, .. } => {
                if let Some(s) = self.open.0.get_mut(&stream) {
                    s.req_bytes += u64::from(len);
                }
            }
            Frame::Reset { stream, .. } => self.reset(stream, None, env),
            // A client's GOAWAY says which pushed streams it took: none are followed.
            Frame::GoAway { .. } => {}
            Frame::Lost => self.requests_gap = true,
        }
    }

    fn on_response_frame(&mut self, f: Frame, at_ns: u64, env: &mut Env<'_, '_>) {
        if let Frame::Headers { stream, .. } | Frame::Data { stream, .. } = f {
            self.unseen_request(stream, env);
        }
        match f {
            Frame::Headers {
                stream,
                end_stream,
                fields,
            } => {
                let Some(s) = self.open.0.get_mut(&stream) else {
                    return;
                };
                s.resp_ns = at_ns;
                if let Some(g) = fields.as_ref().and_then(|f| f.grpc_status) {
                    s.grpc_status = Some(g);
                }
                if s.status.is_none() {
                    match fields.as_ref().map(|f: &Fields| f.status) {
                        // Interim (1xx): the final response follows.
                        Some(Some(status)) if status < 200 && !end_stream => return,
                        Some(status) => s.status = Some(status),
                        None => s.status = Some(None),
                    }
                    if let Some(span) = s.span {
                        env.linker.responding(span);
                    }
                }
                if end_stream {
                    self.complete(stream, at_ns, env);
                }
            }
            Frame::Data {
                stream,
                len,
                end_stream,
            } => {
                if let Some(s) = self.open.0.get_mut(&stream) {
                    s.resp_bytes += u64::from(len);
                    s.resp_ns = at_ns;
                    if end_stream {
                        self.complete(stream, at_ns, env);
                    }
                }
            }
            Frame::Reset { stream, code } => self.reset(stream, code, env),
            Frame::GoAway { last_stream } => self.goaway = Some(last_stream),
            // Response frames went by unseen: streams whose end was among them end at the
            // connection's close, counted there. A server end gives the client spans it holds
            // back now: the client end, traced here, may have seen their responses whole (a
            // span that holds none yet keeps going: it may still complete, and link then).
            Frame::Lost => {
                self.response_losses = self.response_losses.saturating_add(1);
                if env.side == Side::Server {
                    for s in self.open.0.values_mut() {
                        if let Some(span) = s.span.filter(|&span| env.linker.holds_client(span)) {
                            s.span = None;
                            s.released = env.linker.abandon(span);
                        }
                    }
                }
            }
        }
    }

    /// A response on a client stream this end never saw open: it and the streams before it
    /// that were not seen either are requests that happened, not counted here.
    fn unseen_request(&mut self, stream: u32, env: &mut Env<'_, '_>) {
        if stream % 2 == 1 && stream >= self.next_id && stream - self.next_id <= MAX_ID_JUMP {
            lost(
                env,
                "h2_stream_unseen",
                u64::from((stream - self.next_id) / 2 + 1),
            );
            self.next_id = stream.saturating_add(2);
            self.requests_gap = !self.requests.synced();
        }
    }

    /// Makes room for a new stream by dropping one whose end may have gone by unseen (response
    /// frames were lost since it opened), counted as such; false when there is none.
    fn evict_doubtful(&mut self, env: &mut Env<'_, '_>) -> bool {
        let Some(id) = self
            .open
            .iter()
            .filter(|(_, s)| self.doubtful(s))
            .map(|(id, _)| *id)
            .min()
        else {
            return false;
        };
        if let Some(s) = self.open.remove(&id) {
            env.metrics
                .pairing_drops
                .with_label_values(&["no_response"])
                .inc();
            give_up(&env.end(), &s, "response_unseen", env.linker, env.metrics);
        }
        true
    }

    /// Whether a stream's end may have gone by unseen: response frames were lost since it
    /// opened, or are not followed now (as `unpair_all` tells).
    fn doubtful(&self, s: &Stream) -> bool {
        doubtful(s, self.response_losses, self.responses.synced())
    }

    /// A stream's response ended at `end_ns`.
    fn complete(&mut self, stream: u32, end_ns: u64, env: &mut Env<'_, '_>) {
        let Some(s) = self.open.remove(&stream) else {
            return;
        };
        if s.released {
            return;
        }
        if s.request.is_none() || !matches!(s.status, Some(Some(_))) {
            // A header block that could not be decoded: a request that happened, not counted
            // here.
            give_up(
                &env.end(),
                &s,
                "h2_headers_unreadable",
                env.linker,
                env.metrics,
            );
            return;
        }
        let ends = Ends {
            side: env.side,
            task: env.task,
            tuple: env.tuple,
            peer_sk: env.peer_sk,
            tls: env.d.tls,
        };
        env.out.extend(ends.exchange(s, end_ns));
    }

    /// The connection is closing: a stream whose response began (it has a status) but whose
    /// end this end did not see ends with what was seen, as an HTTP/1 response cut short does.
    /// A client that stops reading once it has the body's length (curl) closes before the
    /// server's END_STREAM reaches it.
    pub fn finish_answered(&mut self, ends: &Ends, out: &mut Vec<Exchange>) {
        let answered: smallvec::SmallVec<[u32; 8]> = self
            .open
            .iter()
            .filter(|(_, s)| matches!(s.status, Some(Some(_))) && s.request.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in answered {
            if let Some(s) = self.open.remove(&id) {
                let end = s.resp_ns;
                out.extend(ends.exchange(s, end));
            }
        }
    }

    /// Whether a stream's request was read and its response has not begun.
    pub fn has_unanswered(&self) -> bool {
        self.open
            .values()
            .any(|s| s.request.is_some() && s.status.is_none())
    }

    /// The server closed or reset the connection: streams it had and did not answer failed
    /// (status 0), as an HTTP/1 request left so does. Not those after the last stream of the
    /// server's GOAWAY (not processed: clients retry them; all of them when the GOAWAY's
    /// payload went unseen), nor those whose response may have gone by unseen: both are left
    /// to `unpair_all`.
    pub fn unanswered(&mut self, ends: &Ends, end_ns: u64, out: &mut Vec<Exchange>) {
        let last = match self.goaway {
            None => u32::MAX,
            Some(Some(last)) => last,
            Some(None) => return,
        };
        let failed: smallvec::SmallVec<[u32; 8]> = self
            .open
            .iter()
            .filter(|&(&id, s)| {
                id <= last
                    && s.request.is_some()
                    && s.status.is_none()
                    && !s.released
                    && !self.doubtful(s)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in failed {
            if let Some(mut s) = self.open.remove(&id) {
                s.status = Some(Some(conn::NO_RESPONSE));
                out.extend(ends.exchange(s, end_ns));
            }
        }
    }

    /// RST_STREAM from either end: a stream already answered ends with its status (a
    /// response cut short); one not answered yet has no response: a failed request (status
    /// 0) when the server reset it (`server_code`, its error code) for any reason but
    /// REFUSED_STREAM (not processed: the client may send it again), counted by the server's
    /// end, or by the client's when the server's is not followed here; else (the client
    /// cancelled) not counted.
    fn reset(&mut self, stream: u32, server_code: Option<u32>, env: &mut Env<'_, '_>) {
        const REFUSED_STREAM: u32 = 0x7;
        match self.open.get(&stream) {
            Some(s) if s.status.is_some() => self.complete(stream, env.d.boundary_ns(), env),
            Some(s)
                if server_code.is_some_and(|c| c != REFUSED_STREAM)
                    && s.request.is_some()
                    && (env.side == Side::Server || env.peer_sk == 0) =>
            {
                if let Some(s) = self.open.0.get_mut(&stream) {
                    s.status = Some(Some(conn::NO_RESPONSE));
                    // A server end that gave the stream's client span back counts it all the
                    // same: the client end, traced here, leaves resets to it.
                    s.released = false;
                }
                self.complete(stream, env.d.boundary_ns(), env);
            }
            Some(_) => {
                if let Some(span) = self.open.remove(&stream).and_then(|s| s.span) {
                    env.linker.abandon(span);
                }
                env.metrics
                    .pairing_drops
                    .with_label_values(&["stream_reset"])
                    .inc();
            }
            None => {}
        }
    }

    /// Events of this connection went missing: both directions look for frames again, and the
    /// open streams (whose ends may have been among them) are dropped and counted.
    pub fn lost_events(&mut self, end: &End, metrics: &Metrics, linker: &mut Linker) {
        self.requests.lose(&mut |_| {});
        self.responses.lose(&mut |_| {});
        self.requests_gap = true;
        self.unpair_all(end, metrics, linker, "events_lost");
    }

    /// Drops the open streams (the connection closed, or lost events), counted with `reason`.
    pub fn unpair_all(
        &mut self,
        end: &End,
        metrics: &Metrics,
        linker: &mut Linker,
        reason: &'static str,
    ) {
        let n = self.open.len() as u64;
        if n == 0 {
            return;
        }
        // At the close, a stream left open is a request its server did not answer, unless
        // response frames went by unseen since it opened (its end may have been among them).
        let (losses, synced) = (self.response_losses, self.responses.synced());
        for (_, s) in self.open.drain() {
            let lost = match reason {
                "no_response" if !doubtful(&s, losses, synced) => None,
                "no_response" => Some("response_unseen"),
                other => Some(other),
            };
            match lost {
                Some(lost) => give_up(end, &s, lost, linker, metrics),
                None => {
                    if let Some(span) = s.span {
                        linker.abandon(span);
                    }
                }
            }
        }
        metrics.pairing_drops.with_label_values(&[reason]).inc_by(n);
    }
}

impl Default for Streams {
    fn default() -> Self {
        Self::new()
    }
}

/// `Streams::doubtful`, from the connection's response losses and whether they are followed.
fn doubtful(s: &Stream, losses: u32, synced: bool) -> bool {
    s.losses_at_open != losses || !synced
}

/// Requests that happened and that this end will not count, with no span to say whether the
/// other end has them.
fn lost(env: &mut Env<'_, '_>, reason: &'static str, n: u64) {
    conn::count_lost(&env.end(), reason, n, env.metrics, env.linker);
}

/// A stream this end will not count (`conn::give_up`).
fn give_up(end: &End, s: &Stream, reason: &'static str, linker: &mut Linker, metrics: &Metrics) {
    conn::give_up(end, s.span, s.released, reason, linker, metrics);
}
