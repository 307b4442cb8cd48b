//! Calls the kernel side sent in several records: an HTTP/2 call whose frame segments outgrew
//! one record (`FRAMES_CAP`; a read of hundreds of streams' small frames) goes out as a head
//! with the event and payload (`FLAG_FRAMES_MORE`), then records of segments only
//! (`FLAG_FRAMES_CONT`). They are joined back into one record here, before decoding: the
//! last part's event and payload (its event number and TCP sequence are set after the walk),
//! and every part's segments in order.

use std::mem::offset_of;

use tracer_common::{
    DATA_EVENT_FIXED, DataMeta, EventHeader, EventKind, FLAG_FRAMES_CONT, FLAG_FRAMES_MORE,
    PAYLOAD_CAP,
};

/// Calls being joined at once. A call's records leave one CPU back to back, so only calls on
/// different CPUs overlap; past this the oldest is dropped (its records counted unjoined).
const MAX_OPEN: usize = 16;
/// A joined record's bytes, at most: segments past it are left out, and the parser finds those
/// frames missing, as past a walk that stopped short (their streams counted lost).
const MAX_JOINED: usize = 256 << 10;
/// Buffers kept for the next joins.
const MAX_SPARE: usize = 4;

/// What to do with one ring-buffer record.
pub enum Part {
    /// A record of its own: decode it as it is.
    Whole,
    /// Part of a call still being joined.
    Held,
    /// The call's last part came: the joined record (give it back with [`Joiner::recycle`]).
    Joined(Vec<u8>),
    /// A part whose call's head was never seen (lost in the kernel), or a call dropped unjoined.
    Unjoined,
}

struct Open {
    sk: u64,
    direction: u32,
    buf: Vec<u8>,
}

#[derive(Default)]
pub struct Joiner {
    open: Vec<Open>,
    spare: Vec<Vec<u8>>,
    /// Parts whose segments were left out (MAX_JOINED) since `take_truncated`.
    truncated: u64,
}

/// The record's data event header, when it is a data event that belongs to a split call.
fn split_meta(rec: &[u8]) -> Option<DataMeta> {
    let hdr: EventHeader = crate::event::read(rec).ok()?;
    if hdr.kind != EventKind::Data as u32 || hdr.flags & (FLAG_FRAMES_MORE | FLAG_FRAMES_CONT) == 0
    {
        return None;
    }
    crate::event::read(rec).ok()
}

/// The segments a part carries, after the whole payload.
fn segments<'a>(rec: &'a [u8], meta: &DataMeta) -> &'a [u8] {
    let at = DATA_EVENT_FIXED + PAYLOAD_CAP;
    let end = at.saturating_add(meta.frames_len as usize).min(rec.len());
    rec.get(at..end).unwrap_or(&[])
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

impl Joiner {
    /// Takes one record in the order the ring buffer gave it.
    pub fn offer(&mut self, rec: &[u8]) -> Part {
        let Some(meta) = split_meta(rec) else {
            return Part::Whole;
        };
        let flags = meta.hdr.flags;
        let segs = segments(rec, &meta);
        let open = self
            .open
            .iter()
            .position(|o| o.sk == meta.sk && o.direction == meta.direction);
        if flags & FLAG_FRAMES_CONT == 0 {
            // A head. One left open for the same socket and direction lost its last part: it
            // is dropped (its event number, never delivered, shows the loss to the parser).
            let mut unjoined = false;
            if let Some(i) = open {
                let old = self.open.swap_remove(i);
                self.recycle(old.buf);
                unjoined = true;
            }
            if self.open.len() >= MAX_OPEN {
                let old = self.open.remove(0);
                self.recycle(old.buf);
                unjoined = true;
            }
            // Room for the last part's event and payload, then the segments.
            let mut buf = self.spare.pop().unwrap_or_default();
            buf.clear();
            buf.resize(DATA_EVENT_FIXED + PAYLOAD_CAP, 0);
            buf.extend_from_slice(segs);
            self.open.push(Open {
                sk: meta.sk,
                direction: meta.direction,
                buf,
            });
            return if unjoined { Part::Unjoined } else { Part::Held };
        }
        let Some(i) = open else {
            return Part::Unjoined;
        };
        let buf = &mut self.open[i].buf;
        let room = MAX_JOINED.saturating_sub(buf.len());
        if segs.len() > room {
            self.truncated += 1;
        } else {
            buf.extend_from_slice(segs);
        }
        if flags & FLAG_FRAMES_MORE != 0 {
            return Part::Held;
        }
        let mut buf = self.open.swap_remove(i).buf;
        let head = (DATA_EVENT_FIXED + PAYLOAD_CAP).min(rec.len());
        buf[..head].copy_from_slice(&rec[..head]);
        let frames_len = (buf.len() - DATA_EVENT_FIXED - PAYLOAD_CAP) as u32;
        put_u32(&mut buf, offset_of!(DataMeta, frames_len), frames_len);
        put_u32(
            &mut buf,
            offset_of!(DataMeta, hdr) + offset_of!(EventHeader, flags),
            flags & !(FLAG_FRAMES_MORE | FLAG_FRAMES_CONT),
        );
        Part::Joined(buf)
    }

    /// Parts whose segments were left out of their joined record since the last call.
    pub fn take_truncated(&mut self) -> u64 {
        std::mem::take(&mut self.truncated)
    }

    /// Gives a joined record's buffer back for the next join.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.spare.len() < MAX_SPARE && buf.capacity() <= MAX_JOINED * 2 {
            self.spare.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, decode};
    use tracer_common::{DIR_INGRESS, SEGMENT_HEADER};

    /// A record as the kernel side sends it: `payload` captured, `segs` as (offset, bytes).
    fn record(sk: u64, flags: u32, payload: &[u8], segs: &[(u32, &[u8])]) -> Vec<u8> {
        // SAFETY: plain old data, all zeroes valid.
        let mut meta: DataMeta = unsafe { std::mem::zeroed() };
        meta.hdr.kind = EventKind::Data as u32;
        meta.hdr.flags = flags;
        meta.sk = sk;
        meta.direction = DIR_INGRESS;
        meta.bytes = 100_000;
        meta.captured = payload.len() as u32;
        meta.seq = 7;
        let mut frames = Vec::new();
        for (off, b) in segs {
            frames.extend_from_slice(&off.to_le_bytes());
            frames.extend_from_slice(&(b.len() as u32).to_le_bytes());
            frames.extend_from_slice(b);
        }
        meta.frames_len = frames.len() as u32;
        let mut rec = vec![0u8; DATA_EVENT_FIXED + PAYLOAD_CAP];
        // SAFETY: the buffer holds a DataMeta at its start.
        unsafe { rec.as_mut_ptr().cast::<DataMeta>().write_unaligned(meta) };
        rec[DATA_EVENT_FIXED..][..payload.len()].copy_from_slice(payload);
        rec.extend_from_slice(&frames);
        rec
    }

    fn segs_of(rec: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let Ok(Event::Data(d)) = decode(rec) else {
            panic!("not a data record");
        };
        let mut out = Vec::new();
        let mut f = d.frames;
        while f.len() >= SEGMENT_HEADER {
            let off = u32::from_le_bytes(f[..4].try_into().unwrap());
            let len = u32::from_le_bytes(f[4..8].try_into().unwrap()) as usize;
            out.push((off, f[8..8 + len].to_vec()));
            f = &f[8 + len..];
        }
        out
    }

    #[test]
    fn a_split_call_is_joined_in_order_with_its_head_payload() {
        let mut j = Joiner::default();
        let head = record(1, FLAG_FRAMES_MORE, b"PRI *", &[(2000, b"aaaa")]);
        let other = record(2, 0, b"GET / HTTP/1.1\r\n", &[]);
        let mid = record(
            1,
            FLAG_FRAMES_MORE | FLAG_FRAMES_CONT,
            b"PRI *",
            &[(3000, b"bb")],
        );
        // The last part's event is the whole one (the head's is sent before its number is).
        let mut last = record(1, FLAG_FRAMES_CONT, b"PRI *", &[(4000, b"c")]);
        last[offset_of!(DataMeta, seq)..][..4].copy_from_slice(&8u32.to_le_bytes());
        assert!(matches!(j.offer(&head), Part::Held));
        // Another socket's record between the parts goes through untouched.
        assert!(matches!(j.offer(&other), Part::Whole));
        assert!(matches!(j.offer(&mid), Part::Held));
        let Part::Joined(buf) = j.offer(&last) else {
            panic!("not joined");
        };
        let Ok(Event::Data(d)) = decode(&buf) else {
            panic!("joined record does not decode");
        };
        assert_eq!(d.payload, b"PRI *");
        assert_eq!(d.seq, 8);
        assert_eq!(
            segs_of(&buf),
            vec![
                (2000, b"aaaa".to_vec()),
                (3000, b"bb".to_vec()),
                (4000, b"c".to_vec())
            ]
        );
        j.recycle(buf);
        assert!(j.open.is_empty());
    }

    #[test]
    fn a_part_without_its_head_is_unjoined() {
        let mut j = Joiner::default();
        let last = record(1, FLAG_FRAMES_CONT, b"", &[(4000, b"c")]);
        assert!(matches!(j.offer(&last), Part::Unjoined));
        // A head whose last part never came is dropped when the next one comes.
        let head = record(1, FLAG_FRAMES_MORE, b"x", &[]);
        assert!(matches!(j.offer(&head), Part::Held));
        assert!(matches!(j.offer(&head), Part::Unjoined));
        assert_eq!(j.open.len(), 1);
    }

    #[test]
    fn overlapping_calls_stay_bounded() {
        let mut j = Joiner::default();
        for sk in 0..(MAX_OPEN as u64 + 5) {
            j.offer(&record(sk, FLAG_FRAMES_MORE, b"x", &[]));
        }
        assert_eq!(j.open.len(), MAX_OPEN);
    }
}
