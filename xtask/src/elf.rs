//! Minimal ELF64 editing: drop one `DT_NEEDED` entry from a shared library's dynamic section
//! (what `patchelf --remove-needed` does), so that the CPU libtorch does not ask the loader for
//! `libtorch_cuda.so`. Only little-endian x86-64/aarch64 ELF64 files are handled.

use anyhow::{Context, Result, bail, ensure};

const PT_DYNAMIC: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

struct Segment {
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

fn segments(b: &[u8]) -> Result<Vec<(u32, Segment)>> {
    ensure!(b.len() > 64 && &b[..4] == b"\x7fELF", "not an ELF file");
    ensure!(
        b[4] == 2 && b[5] == 1,
        "only little-endian ELF64 is supported"
    );
    let phoff = u64_at(b, 32) as usize;
    let phentsize = u16_at(b, 54) as usize;
    let phnum = u16_at(b, 56) as usize;
    let mut out = Vec::with_capacity(phnum);
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        ensure!(o + 56 <= b.len(), "program header {i} out of bounds");
        out.push((
            u32_at(b, o),
            Segment {
                offset: u64_at(b, o + 8),
                vaddr: u64_at(b, o + 16),
                filesz: u64_at(b, o + 32),
            },
        ));
    }
    Ok(out)
}

/// Map a virtual address to a file offset through the PT_LOAD segments.
fn vaddr_to_offset(segs: &[(u32, Segment)], vaddr: u64) -> Option<u64> {
    segs.iter()
        .filter(|(t, _)| *t == 1)
        .find(|(_, s)| vaddr >= s.vaddr && vaddr < s.vaddr + s.filesz)
        .map(|(_, s)| vaddr - s.vaddr + s.offset)
}

/// The `DT_NEEDED` names of an ELF shared object.
pub fn needed(b: &[u8]) -> Result<Vec<String>> {
    let (dyn_off, dyn_size, strtab) = dynamic(b)?;
    let mut names = Vec::new();
    for i in 0..dyn_size / 16 {
        let o = dyn_off + i * 16;
        match u64_at(b, o) {
            DT_NULL => break,
            DT_NEEDED => names.push(cstr(b, strtab + u64_at(b, o + 8) as usize)?),
            _ => {}
        }
    }
    Ok(names)
}

fn cstr(b: &[u8], o: usize) -> Result<String> {
    let end = b[o..]
        .iter()
        .position(|&c| c == 0)
        .context("unterminated string")?;
    Ok(String::from_utf8_lossy(&b[o..o + end]).into_owned())
}

fn dynamic(b: &[u8]) -> Result<(usize, usize, usize)> {
    let segs = segments(b)?;
    let (_, d) = segs
        .iter()
        .find(|(t, _)| *t == PT_DYNAMIC)
        .context("no dynamic section")?;
    let (off, size) = (d.offset as usize, d.filesz as usize);
    let mut strtab = None;
    for i in 0..size / 16 {
        let o = off + i * 16;
        match u64_at(b, o) {
            DT_NULL => break,
            DT_STRTAB => strtab = Some(u64_at(b, o + 8)),
            _ => {}
        }
    }
    let strtab = strtab.context("no DT_STRTAB")?;
    let strtab = vaddr_to_offset(&segs, strtab).context("DT_STRTAB outside the loaded segments")?;
    Ok((off, size, strtab as usize))
}

/// Remove the `DT_NEEDED` entry naming `lib`; later entries move up one slot and the freed
/// slot at the end becomes `DT_NULL`. Returns whether an entry was removed.
pub fn remove_needed(b: &mut [u8], lib: &str) -> Result<bool> {
    let (dyn_off, dyn_size, strtab) = dynamic(b)?;
    let n = dyn_size / 16;
    let mut count = n;
    let mut found = None;
    for i in 0..n {
        let o = dyn_off + i * 16;
        let tag = u64_at(b, o);
        if tag == DT_NULL {
            count = i + 1;
            break;
        }
        if tag == DT_NEEDED && cstr(b, strtab + u64_at(b, o + 8) as usize)? == lib {
            found = Some(i);
        }
    }
    let Some(i) = found else { return Ok(false) };
    let start = dyn_off + i * 16;
    let end = dyn_off + count * 16;
    if end > b.len() {
        bail!("dynamic section out of bounds");
    }
    b.copy_within(start + 16..end, start);
    b[end - 16..end].fill(0);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round trip on a real shared object of this machine: removing one needed entry leaves
    /// the others in order.
    #[test]
    fn removes_one_needed_entry_from_a_real_library() {
        let candidates = [
            "/usr/lib/x86_64-linux-gnu/libz.so.1",
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        ];
        let path = candidates
            .iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("a system shared library");
        let mut bytes = std::fs::read(path).unwrap();
        let before = needed(&bytes).unwrap();
        assert!(!before.is_empty());
        let victim = before[0].clone();
        assert!(remove_needed(&mut bytes, &victim).unwrap());
        let after = needed(&bytes).unwrap();
        assert_eq!(after, before[1..].to_vec());
        assert!(!remove_needed(&mut bytes, &victim).unwrap());
    }
}
