//! The stack each eBPF program of our object needs, counted as the strictest verifier counts
//! it: a program's frame plus the frames of the functions it calls, `bpf_loop` callbacks
//! included (kernels differ here: 6.18.44 counts a callback into its caller's 512 bytes, an
//! earlier 6.18 build did not). Checked by a test on every build, so that a program that would
//! load on the developer's kernel and be refused on another fails here, not on a user's node.

use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SectionKind, SymbolKind};

/// The verifier's limit for a call chain's frames.
pub const MAX_STACK: u32 = 512;

/// One function of the object: a program (in its own section) or a `.text` function (a
/// callback or a helper LLVM did not inline), the deepest stack byte it touches, and the
/// `.text` functions it calls or hands to a helper (by relocation: the object is not linked).
#[derive(Debug)]
pub struct Frame {
    pub name: String,
    pub program: bool,
    pub depth: u32,
    /// Indices of the functions it refers to; `None`: one it refers to could not be told
    /// (through a section symbol), so all of `.text` is assumed.
    pub refs: Option<Vec<usize>>,
}

/// Every function of an eBPF ELF object with its frame.
pub fn frames(elf: &[u8]) -> anyhow::Result<Vec<Frame>> {
    use object::{RelocationTarget, SymbolIndex};
    let file = object::File::parse(elf)?;
    // (section, start, end, symbol) of each function.
    let mut spans = Vec::new();
    let mut out = Vec::new();
    for sym in file.symbols() {
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let Some(index) = sym.section_index() else {
            continue;
        };
        let section = file.section_by_index(index)?;
        if section.kind() != SectionKind::Text {
            continue;
        }
        let name = sym.name()?;
        let data = section.data()?;
        let (start, size) = (sym.address(), sym.size());
        let code = usize::try_from(start)
            .ok()
            .zip(usize::try_from(start + size).ok())
            .and_then(|(s, e)| data.get(s..e))
            .ok_or_else(|| anyhow::anyhow!("{name} outside its section"))?;
        spans.push((index, start, start + size, sym.index()));
        out.push(Frame {
            name: name.to_owned(),
            program: section.name()? != ".text",
            depth: scan(code),
            refs: Some(Vec::new()),
        });
    }
    let by_symbol = |s: SymbolIndex| spans.iter().position(|&(_, _, _, i)| i == s);
    for section in file.sections() {
        for (offset, reloc) in section.relocations() {
            let RelocationTarget::Symbol(target) = reloc.target() else {
                continue;
            };
            let Some(from) = spans
                .iter()
                .position(|&(sec, s, e, _)| sec == section.index() && (s..e).contains(&offset))
            else {
                continue;
            };
            let symbol = file.symbol_by_index(target)?;
            let in_text = symbol
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
                .is_some_and(|s| s.kind() == SectionKind::Text);
            if !in_text {
                continue;
            }
            // Through the `.text` section symbol, the offset is the instruction's immediate
            // (REL: the addend is implicit): bytes for a function's address (ld_imm64), the
            // instruction count minus one for a call.
            let to = if symbol.kind() == SymbolKind::Section {
                let at = usize::try_from(offset)?;
                let insn = section.data()?.get(at..at + 8).unwrap_or_default();
                let imm = insn
                    .get(4..8)
                    .map(|b| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])));
                let target = match (insn.first(), imm) {
                    (Some(0x18), Some(imm)) => Some(imm),
                    (Some(0x85), Some(imm)) => Some((imm + 1) * 8),
                    _ => None,
                };
                target.and_then(|t| {
                    spans.iter().position(|&(sec, s, _, _)| {
                        Some(sec) == symbol.section_index() && i64::try_from(s) == Ok(t)
                    })
                })
            } else {
                by_symbol(target)
            };
            match to {
                Some(to) if to != from => {
                    if let Some(refs) = out[from].refs.as_mut() {
                        refs.push(to);
                    }
                }
                Some(_) => {}
                None => out[from].refs = None,
            }
        }
    }
    Ok(out)
}

/// The deepest byte below the frame pointer (r10) the code reaches, by a load or store through
/// r10 or by a pointer made from it (`rX = r10; rX += -N`, as LLVM passes a stack buffer to a
/// helper). Straight-line: a pointer is followed to the next write of its register.
fn scan(code: &[u8]) -> u32 {
    const FP: u8 = 10;
    // Registers holding r10 + offset.
    let mut from_fp: [Option<i64>; 11] = [None; 11];
    let mut deepest = 0i64;
    let mut i = 0;
    while i + 8 <= code.len() {
        let op = code[i];
        let dst = code[i + 1] & 0x0f;
        let src = code[i + 1] >> 4;
        let off = i64::from(i16::from_le_bytes([code[i + 2], code[i + 3]]));
        let imm = i64::from(i32::from_le_bytes([
            code[i + 4],
            code[i + 5],
            code[i + 6],
            code[i + 7],
        ]));
        let class = op & 0x07;
        let width = if op == 0x18 { 16 } else { 8 };
        let mut base_reach = |base: u8| {
            let at = if base == FP {
                Some(off)
            } else {
                from_fp
                    .get(usize::from(base))
                    .copied()
                    .flatten()
                    .map(|o| o + off)
            };
            if let Some(at) = at
                && at < 0
            {
                deepest = deepest.max(-at);
            }
        };
        match class {
            // LDX: dst = *(src + off)
            0x01 => {
                base_reach(src);
                if let Some(r) = from_fp.get_mut(usize::from(dst)) {
                    *r = None;
                }
            }
            // ST, STX: *(dst + off) = ...
            0x02 | 0x03 => base_reach(dst),
            // ALU64
            0x07 => {
                let d = usize::from(dst).min(10);
                match op {
                    // mov dst, src
                    0xbf => {
                        from_fp[d] = if src == FP {
                            Some(0)
                        } else {
                            from_fp.get(usize::from(src)).copied().flatten()
                        }
                    }
                    // add dst, imm
                    0x07 => {
                        if let Some(o) = from_fp[d].as_mut() {
                            *o += imm;
                            if *o < 0 {
                                deepest = deepest.max(-*o);
                            }
                        }
                    }
                    _ => from_fp[d] = None,
                }
            }
            // JMP: a call clobbers r0-r5.
            0x05 => {
                if op == 0x85 {
                    for r in &mut from_fp[..6] {
                        *r = None;
                    }
                }
            }
            _ => {
                if let Some(r) = from_fp.get_mut(usize::from(dst)) {
                    *r = None;
                }
            }
        }
        i += width;
    }
    u32::try_from(deepest).unwrap_or(u32::MAX)
}

/// The stack each program needs at most: its frame and the deepest chain of the functions it
/// refers to, each frame rounded up to 32 bytes: as the verifier rounds them without a JIT and
/// on kernels before 6.8 (a JIT'ing one now rounds to 16).
pub fn worst_case(frames: &[Frame]) -> Vec<(String, u32)> {
    fn chain(frames: &[Frame], i: usize, depth: u32) -> u32 {
        let own = frames[i].depth.max(1).div_ceil(32) * 32;
        // The object's chains are short; a cycle (not allowed by the verifier) stops here.
        if depth > 8 {
            return own;
        }
        let below = match &frames[i].refs {
            Some(refs) => refs.iter().map(|&r| chain(frames, r, depth + 1)).max(),
            None => (0..frames.len())
                .filter(|&j| !frames[j].program && j != i)
                .map(|j| chain(frames, j, depth + 1))
                .max(),
        };
        own + below.unwrap_or(0)
    }
    (0..frames.len())
        .filter(|&i| frames[i].program)
        .map(|i| (frames[i].name.clone(), chain(frames, i, 0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every program of the object the daemon loads fits the strictest verifier's stack limit.
    #[test]
    fn every_program_fits_the_stack_with_its_callbacks() {
        let elf = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));
        let frames = frames(elf).unwrap();
        assert!(
            frames.iter().filter(|f| f.program).count() > 20,
            "programs not found: {frames:?}"
        );
        // The scan sees the frames at all (the socket programs keep state on the stack).
        let send = frames.iter().find(|f| f.name == "btf_sock_send").unwrap();
        assert!(send.depth >= 64, "{send:?}");
        // ... and the callback it hands to `bpf_loop`.
        assert!(
            send.refs
                .as_ref()
                .is_some_and(|r| r.iter().any(|&i| frames[i].name.contains("step"))),
            "{send:?}"
        );
        let over: Vec<_> = worst_case(&frames)
            .into_iter()
            .filter(|(_, need)| *need > MAX_STACK)
            .collect();
        assert!(over.is_empty(), "over {MAX_STACK} bytes of stack: {over:?}");
    }

    #[test]
    fn scan_follows_frame_pointer_copies() {
        // r1 = r10; r1 += -40; *(u64 *)(r10 - 24) = r2; call 1 (helper); exit
        let code = [
            0xbf, 0xa1, 0, 0, 0, 0, 0, 0, //
            0x07, 0x01, 0, 0, 0xd8, 0xff, 0xff, 0xff, //
            0x7b, 0x2a, 0xe8, 0xff, 0, 0, 0, 0, //
            0x85, 0x00, 0, 0, 1, 0, 0, 0, //
            0x95, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(scan(&code), 40);
    }
}
