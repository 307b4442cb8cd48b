//! Where an ELF file's exported functions are, found as the dynamic linker finds them: through
//! the file's symbol hash table, over a read-only mapping, so that only the pages a lookup
//! touches are read. An executable may be a hundred MB (Node.js, OpenSSL inside) whose symbol
//! and string tables alone are 17 MB: a walk over every symbol (as a symbol name handed to the
//! uprobe attach does) made all of them resident, the daemon's peak RSS doubled.
use std::{fs, path::Path};

use object::{
    Endianness, SectionIndex, elf,
    read::elf::{FileHeader as _, SectionHeader as _, SectionTable, Sym as _},
};

type Header = elf::FileHeader64<Endianness>;

/// The file offsets (where a uprobe goes) of the functions among `names` that `path` defines
/// and exports, in `names`' order; those it does not export are left out. 64-bit ELF only (the
/// architectures the probes are built for).
pub fn exported<'n>(path: &Path, names: &[&'n str]) -> Result<Vec<(&'n str, u64)>, String> {
    let file = fs::File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: a shared read-only mapping, dropped before this returns. A file written while
    // mapped shows other bytes (wrong offsets: the attach fails or the probe never fires);
    // one truncated under it faults the read (SIGBUS), as aya's own symbol lookup would.
    // Running executables cannot be written (ETXTBSY); package managers replace libraries
    // by a rename.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
    lookup(&map, names).map_err(|e| e.to_string())
}

fn lookup<'n>(data: &[u8], names: &[&'n str]) -> object::read::Result<Vec<(&'n str, u64)>> {
    let header = Header::parse(data)?;
    let endian = header.endian()?;
    let sections = header.sections(endian, data)?;
    let versions = sections.versions(endian, data)?.unwrap_or_default();
    let mut found = Vec::new();
    let mut keep = |name, sym: &elf::Sym64<Endianness>| {
        if let Some(offset) = function_offset(&sections, endian, sym) {
            found.push((name, offset));
        }
    };
    // The GNU hash table, else the SysV one: either names the dynamic symbol table.
    let gnu = sections.gnu_hash(endian, data)?;
    let sysv = match gnu {
        Some(_) => None,
        None => sections.hash(endian, data)?,
    };
    let table = gnu.as_ref().map(|g| g.1).or(sysv.as_ref().map(|h| h.1));
    if let Some(index) = table {
        let symbols = sections.symbol_table_by_index(endian, data, index)?;
        for &name in names {
            let n = name.as_bytes();
            let sym = match (&gnu, &sysv) {
                (Some((t, _)), _) => t.find(endian, n, elf::gnu_hash(n), None, &symbols, &versions),
                (None, Some((t, _))) => t.find(endian, n, elf::hash(n), None, &symbols, &versions),
                (None, None) => None,
            };
            if let Some((_, sym)) = sym {
                keep(name, sym);
            }
        }
    } else {
        // No hash table (a linker told not to write one): every dynamic symbol looked at.
        let symbols = sections.symbols(endian, data, elf::SHT_DYNSYM)?;
        for sym in symbols.iter() {
            let Ok(sym_name) = sym.name(endian, symbols.strings()) else {
                continue;
            };
            if let Some(&name) = names.iter().find(|n| n.as_bytes() == sym_name) {
                keep(name, sym);
            }
        }
        let order = |n: &str| names.iter().position(|m| *m == n);
        found.sort_by_key(|&(n, _)| order(n));
        found.dedup_by_key(|&mut (n, _)| n);
    }
    Ok(found)
}

/// A defined function's file offset: its address made relative to its section's.
fn function_offset<'data>(
    sections: &SectionTable<'data, Header, &'data [u8]>,
    endian: Endianness,
    sym: &elf::Sym64<Endianness>,
) -> Option<u64> {
    if sym.st_type() != elf::STT_FUNC {
        return None;
    }
    // None for an undefined symbol (and the reserved indexes).
    let index = sym.st_shndx(endian).index()?;
    let section = sections.section(SectionIndex(index.into())).ok()?;
    let (offset, _) = section.file_range(endian)?;
    sym.st_value(endian)
        .checked_sub(section.sh_addr(endian))?
        .checked_add(offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test binary's own libc, whose `write` and `read` a process can be seen to call:
    /// the offsets found must be where the file holds those functions' code, as the
    /// full symbol walk (object's own reader over the whole file) finds them.
    #[test]
    fn finds_libc_functions_as_a_full_walk_does() {
        use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
        let maps = fs::read_to_string("/proc/self/maps").expect("maps");
        let libc = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| p.contains("libc.so"))
            .expect("libc mapped");
        let names = ["write", "read", "no_such_function_here", "sendmsg"];
        let found = exported(Path::new(libc), &names).expect("lookup");
        assert_eq!(
            found.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            ["write", "read", "sendmsg"]
        );
        let data = fs::read(libc).expect("read libc");
        let file = object::File::parse(&*data).expect("parse");
        for (name, offset) in found {
            let sym = file
                .dynamic_symbols()
                .find(|s| s.name() == Ok(name) && s.is_definition())
                .expect("in dynsym");
            let section = file
                .section_by_index(sym.section_index().expect("section"))
                .expect("section");
            let (start, _) = section.file_range().expect("file range");
            assert_eq!(offset, sym.address() - section.address() + start, "{name}");
        }
    }

    #[test]
    fn not_an_elf_file_is_an_error() {
        assert!(lookup(b"#!/bin/sh\necho hi\n", &["main"]).is_err());
        assert!(exported(Path::new("/nonexistent/x"), &["main"]).is_err());
    }
}
