//! A check of a shared library's ELF headers before it is mapped.
//!
//! `dlopen` maps a library's segments as its program headers describe them;
//! when the file is shorter than they say (a copy cut short), touching the
//! missing pages kills the process with SIGBUS, with no message. Reading the
//! headers first, and refusing a file whose program headers, segments or
//! section header table reach past its end, turns that into an error that
//! names the file. Only 64-bit little-endian ELF is accepted (what the host
//! runs as); other platforms' libraries are not checked here.

use std::fs::File;
use std::io::Read;
use std::path::Path;

const HEADER: usize = 64;
const PROGRAM_HEADER: usize = 56;

fn u16_at(b: &[u8], at: usize) -> u64 {
    u16::from_le_bytes([b[at], b[at + 1]]) as u64
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Why `path` cannot be a complete 64-bit little-endian ELF library, if it cannot.
pub fn check(path: &Path) -> Result<(), String> {
    if !cfg!(all(target_os = "linux", target_endian = "little", target_pointer_width = "64")) {
        return Ok(());
    }
    let mut file = File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let len = file.metadata().map_err(|e| format!("cannot read it: {e}"))?.len();
    let mut head = Vec::with_capacity(HEADER);
    file.by_ref().take(HEADER as u64).read_to_end(&mut head).map_err(|e| format!("cannot read it: {e}"))?;
    if !head.starts_with(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if head.len() < HEADER {
        return Err(cut_short("its ELF header", HEADER as u64, len));
    }
    if head[4] != 2 || head[5] != 1 {
        return Err("not a 64-bit little-endian ELF library".into());
    }
    let (phoff, phentsize, phnum) = (u64_at(&head, 0x20), u16_at(&head, 0x36), u16_at(&head, 0x38));
    let (shoff, shentsize, shnum) = (u64_at(&head, 0x28), u16_at(&head, 0x3a), u16_at(&head, 0x3c));
    if phnum > 0 && phentsize < PROGRAM_HEADER as u64 {
        return Err(format!("program headers of {phentsize} bytes, not {PROGRAM_HEADER}: a damaged file"));
    }
    let table_end = |off: u64, size: u64, n: u64| off.checked_add(size * n).unwrap_or(u64::MAX);
    if table_end(phoff, phentsize, phnum) > len {
        return Err(cut_short("its program headers", table_end(phoff, phentsize, phnum), len));
    }
    if shoff > 0 && table_end(shoff, shentsize, shnum) > len {
        return Err(cut_short("its section headers", table_end(shoff, shentsize, shnum), len));
    }
    let mut table = vec![0u8; (phentsize * phnum) as usize];
    read_at(&mut file, phoff, &mut table).map_err(|e| format!("cannot read its program headers: {e}"))?;
    for (i, ph) in table.chunks_exact(phentsize as usize).enumerate() {
        let (offset, filesz) = (u64_at(ph, 8), u64_at(ph, 32));
        let end = offset.checked_add(filesz).unwrap_or(u64::MAX);
        if end > len {
            return Err(cut_short(&format!("segment {i}"), end, len));
        }
    }
    Ok(())
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

fn cut_short(what: &str, needs: u64, len: u64) -> String {
    format!(
        "the file is cut short: {what} reach byte {needs}, but it has {len} bytes \
         (an interrupted copy or download?); copy or rebuild the library again"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_cut_short_is_refused_and_a_whole_one_passes() {
        // The test binary's own libtorch is a complete ELF library.
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.libtorch/lib/libc10.so");
        let lib = lib.canonicalize().expect("scripts/setup.sh makes .libtorch");
        check(&lib).unwrap();
        let bytes = std::fs::read(&lib).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cut = dir.path().join("libcut.so");
        for n in [7, 64, 20_000, bytes.len() / 2, bytes.len() - 4096] {
            std::fs::write(&cut, &bytes[..n]).unwrap();
            let err = check(&cut).unwrap_err();
            assert!(err.contains("cut short"), "{n} bytes: {err}");
        }
        std::fs::write(&cut, b"text").unwrap();
        assert_eq!(check(&cut).unwrap_err(), "not an ELF file");
    }
}
