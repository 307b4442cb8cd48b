//! HPACK header block decoding (RFC 7541) for a reader that only watches: the dynamic table
//! follows the encoder's, and each field is handed out borrowed (from the block, the static
//! table or the dynamic table), copied only into the dynamic table.
//!
//! Written here rather than taken from a crate: loona-hpack (like hpack, which it forks)
//! rebuilds its Huffman table for every string (~50 µs per header block here, more than all the
//! rest the daemon does for a request), and httlib-hpack indexes past the end of a truncated
//! integer (a panic on bytes this reader cannot trust). Huffman strings are decoded by
//! httlib-huffman's table-driven decoder.

use std::collections::VecDeque;

use httlib_huffman::DecoderSpeed;

/// Why a block could not be decoded; the table is no longer the encoder's after any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    Truncated,
    BadIndex,
    Huffman,
    TableSize,
}

/// RFC 7541 Appendix A.
const STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// Bytes an entry counts for beyond its name and value (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;
/// The dynamic table's size until the encoder says otherwise (SETTINGS_HEADER_TABLE_SIZE's
/// default).
const DEFAULT_SIZE: usize = 4096;

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// One direction's decoder.
pub struct Decoder {
    /// Newest first.
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
    /// Largest size an encoder may set here: past it the block is refused (and the direction
    /// no longer decoded) rather than the table grown.
    limit: usize,
    /// Decoded Huffman strings, reused.
    name: Vec<u8>,
    value: Vec<u8>,
}

impl Decoder {
    pub fn new(limit: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max: DEFAULT_SIZE.min(limit),
            limit,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// Decodes one whole header block, handing each field to `field(name, value)`.
    pub fn decode(
        &mut self,
        mut block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), Error> {
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                // Indexed field.
                let (index, n) = integer(block, 7)?;
                block = &block[n..];
                let (name, value) = self.get(index)?;
                field(name, value);
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update.
                let (size, n) = integer(block, 5)?;
                block = &block[n..];
                if size > self.limit {
                    return Err(Error::TableSize);
                }
                self.max = size;
                self.evict(0);
            } else {
                // Literal: with incremental indexing (01), without (0000) or never indexed
                // (0001).
                let indexing = first & 0x40 != 0;
                let (index, n) = integer(block, if indexing { 6 } else { 4 })?;
                block = &block[n..];
                let mut name_buf = std::mem::take(&mut self.name);
                let mut value_buf = std::mem::take(&mut self.value);
                let result = (|| {
                    let name: &[u8] = if index == 0 {
                        let (s, n) = string(block, &mut name_buf)?;
                        block = &block[n..];
                        s
                    } else {
                        // Copied: adding this field may evict the entry it names.
                        name_buf.clear();
                        name_buf.extend_from_slice(self.get(index)?.0);
                        &name_buf
                    };
                    let (value, n) = string(block, &mut value_buf)?;
                    block = &block[n..];
                    field(name, value);
                    if indexing {
                        self.insert(name, value);
                    }
                    Ok(())
                })();
                self.name = name_buf;
                self.value = value_buf;
                result?;
            }
        }
        Ok(())
    }

    fn get(&self, index: usize) -> Result<(&[u8], &[u8]), Error> {
        match index {
            0 => Err(Error::BadIndex),
            1..=61 => Ok(STATIC[index - 1]),
            _ => self
                .entries
                .get(index - 62)
                .map(|(n, v)| (&n[..], &v[..]))
                .ok_or(Error::BadIndex),
        }
    }

    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max {
            // RFC 7541 §4.4: an entry larger than the table empties it.
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.entries.push_front((name.into(), value.into()));
        self.size += size;
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some((n, v)) = self.entries.pop_back() else {
                break;
            };
            self.size -= n.len() + v.len() + ENTRY_OVERHEAD;
        }
    }
}

/// An integer with an N-bit prefix (RFC 7541 §5.1), and the bytes it took; at most 2^28, as
/// nothing larger is meaningful here.
fn integer(buf: &[u8], prefix: u8) -> Result<(usize, usize), Error> {
    let mask = (1u16 << prefix) as usize - 1;
    let first = *buf.first().ok_or(Error::Truncated)? as usize & mask;
    if first < mask {
        return Ok((first, 1));
    }
    let mut value = mask;
    for (i, &b) in buf.iter().enumerate().skip(1).take(4) {
        value += ((b & 0x7f) as usize) << (7 * (i - 1));
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
    }
    Err(Error::Truncated)
}

/// A string literal (RFC 7541 §5.2): its bytes, decoded into `buf` if Huffman-coded, and the
/// bytes it took.
fn string<'a>(block: &'a [u8], buf: &'a mut Vec<u8>) -> Result<(&'a [u8], usize), Error> {
    let huffman = block.first().ok_or(Error::Truncated)? & 0x80 != 0;
    let (len, n) = integer(block, 7)?;
    let raw = block.get(n..n + len).ok_or(Error::Truncated)?;
    if !huffman {
        return Ok((raw, n + len));
    }
    buf.clear();
    httlib_huffman::decode(raw, buf, DecoderSpeed::FiveBits).map_err(|_| Error::Huffman)?;
    Ok((buf, n + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, Error> {
        let mut v = Vec::new();
        d.decode(block, |n, val| {
            v.push((
                String::from_utf8_lossy(n).into_owned(),
                String::from_utf8_lossy(val).into_owned(),
            ))
        })?;
        Ok(v)
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman() {
        let mut d = Decoder::new(4096);
        let first = fields(&mut d, &unhex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")).unwrap();
        assert_eq!(first[3], (":authority".into(), "www.example.com".into()));
        let second = fields(&mut d, &unhex("8286 84be 5886 a8eb 1064 9cbf")).unwrap();
        assert_eq!(second[3], (":authority".into(), "www.example.com".into()));
        assert_eq!(second[4], ("cache-control".into(), "no-cache".into()));
        let third = fields(
            &mut d,
            &unhex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
        )
        .unwrap();
        assert_eq!(third[2], (":path".into(), "/index.html".into()));
        assert_eq!(third[4], ("custom-key".into(), "custom-value".into()));
        assert_eq!(d.size, 164);
    }

    #[test]
    fn rfc7541_c6_responses_evict() {
        let mut d = Decoder::new(4096);
        d.max = 256;
        let blocks = [
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ff c1 c0 bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ];
        let mut last = Vec::new();
        for b in blocks {
            last = fields(&mut d, &unhex(b)).unwrap();
        }
        assert_eq!(last[0], (":status".into(), "200".into()));
        assert_eq!(last[2].0, "date");
        assert_eq!(d.size, 215);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut d = Decoder::new(4096);
        for b in [
            &[0xff][..],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[0x40, 0x85],
            &[0x40, 0x7f],
            &[0xbe],
            &[0x80],
            &[0x3f, 0xe1, 0xff, 0x03],
            &[0x00, 0x81, 0xff],
        ] {
            assert!(d.decode(b, |_, _| {}).is_err(), "{b:?}");
        }
    }
}
