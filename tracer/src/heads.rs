//! HTTP/1 heads, parsed once for both ends of a connection on this host. When client and
//! server run here, the daemon sees every head twice, byte for byte: written by one end, read
//! by the other, usually one right after the other. Parsing was a quarter of the daemon's work;
//! the second end now finds the head the first one parsed (a hash of the head, then a
//! comparison of its bytes: the same bytes parse the same). Only connections whose other end
//! may be on this host use it, so traffic to remote peers pays nothing for it.
use std::hash::{BuildHasher, Hasher};

use memchr::memmem;

use crate::http1::{self, ParseError, Parsed, RequestHead, ResponseHead};

#[derive(Clone, Debug)]
pub enum Head {
    Request(RequestHead),
    Response(ResponseHead),
}

impl Head {
    pub fn head_len(&self) -> usize {
        match self {
            Head::Request(h) => h.head_len,
            Head::Response(h) => h.head_len,
        }
    }
}

/// Slots, direct-mapped by the head's hash: enough for the heads in flight between the two
/// ends' events of a busy host; a collision only costs a parse.
const SLOTS: usize = 256;

/// Longest head kept (the capture is 1 KiB per syscall).
const MAX_KEPT: usize = 1024;

#[derive(Default)]
struct Slot {
    hash: u64,
    bytes: Vec<u8>,
    head: Option<Head>,
}

pub struct Heads {
    slots: Vec<Slot>,
    end: memmem::Finder<'static>,
    seed: foldhash::fast::FixedState,
    /// Heads found here rather than parsed.
    pub hits: u64,
}

impl Default for Heads {
    fn default() -> Self {
        Self::new()
    }
}

impl Heads {
    pub fn new() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            end: memmem::Finder::new(b"\r\n\r\n"),
            seed: foldhash::fast::FixedState::default(),
            hits: 0,
        }
    }

    /// The head at the start of `buf` (a request's when `requests`): `Ok(None)` while it is
    /// incomplete. `shared`: the other end of the connection may be on this host, so the head
    /// is looked for among those parsed, and kept once parsed.
    pub fn parse(
        &mut self,
        requests: bool,
        buf: &[u8],
        shared: bool,
    ) -> Result<Option<Head>, ParseError> {
        // Heads ended by a bare "\n\n" (which httparse accepts too) are simply parsed.
        let whole = shared
            .then(|| self.end.find(buf))
            .flatten()
            .map(|at| &buf[..at + 4])
            .filter(|h| h.len() <= MAX_KEPT);
        let Some(whole) = whole else {
            return parse(requests, buf);
        };
        let mut hasher = self.seed.build_hasher();
        hasher.write(whole);
        let hash = hasher.finish() ^ u64::from(requests);
        let slot = &mut self.slots[hash as usize % SLOTS];
        if slot.hash == hash
            && slot.bytes == whole
            && let Some(head) = &slot.head
        {
            self.hits += 1;
            return Ok(Some(head.clone()));
        }
        let parsed = parse(requests, buf)?;
        // Only a head that ends where the search found it: the same bytes then parse the same.
        if let Some(head) = parsed.as_ref().filter(|h| h.head_len() == whole.len()) {
            slot.hash = hash;
            slot.bytes.clear();
            slot.bytes.extend_from_slice(whole);
            slot.head = Some(head.clone());
        }
        Ok(parsed)
    }
}

fn parse(requests: bool, buf: &[u8]) -> Result<Option<Head>, ParseError> {
    Ok(if requests {
        match http1::parse_request(buf)? {
            Parsed::Complete(h) => Some(Head::Request(h)),
            Parsed::Partial => None,
        }
    } else {
        match http1::parse_response(buf)? {
            Parsed::Complete(h) => Some(Head::Response(h)),
            Parsed::Partial => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &[u8] = b"GET /a/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn second_end_finds_the_head_the_first_parsed() {
        let mut heads = Heads::new();
        let a = heads.parse(true, REQ, true).unwrap().unwrap();
        assert_eq!(heads.hits, 0);
        let b = heads.parse(true, REQ, true).unwrap().unwrap();
        assert_eq!(heads.hits, 1);
        let (Head::Request(a), Head::Request(b)) = (a, b) else {
            panic!("not requests")
        };
        assert_eq!((a.head_len, a.path.as_str()), (b.head_len, b.path.as_str()));
        assert_eq!(a.head_len, REQ.len() - 2);
    }

    #[test]
    fn kinds_and_unshared_connections_are_kept_apart() {
        let mut heads = Heads::new();
        heads.parse(false, RESP, true).unwrap();
        // The same bytes read as a request are parsed as one (and refused).
        assert!(heads.parse(true, RESP, true).is_err());
        heads.parse(false, RESP, false).unwrap();
        assert_eq!(heads.hits, 0);
        assert!(matches!(
            heads.parse(false, RESP, true).unwrap(),
            Some(Head::Response(h)) if h.status == 200
        ));
        assert_eq!(heads.hits, 1);
    }

    #[test]
    fn partial_and_differing_heads_are_parsed() {
        let mut heads = Heads::new();
        assert!(heads.parse(true, &REQ[..10], true).unwrap().is_none());
        heads.parse(true, REQ, true).unwrap();
        let other = b"GET /a/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
        match heads.parse(true, other, true).unwrap() {
            Some(Head::Request(h)) => assert_eq!(h.path.as_str(), "/a/2"),
            h => panic!("{h:?}"),
        }
        assert_eq!(heads.hits, 0);
    }
}
