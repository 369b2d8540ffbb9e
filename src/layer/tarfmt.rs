//! Writing tar headers the way Go's `archive/tar` does for BuildKit and containerd: USTAR, with a
//! PAX extended header only for values USTAR cannot hold. See the module doc of `layer` for the
//! format; this file is its single implementation.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

pub const BLOCK: usize = 512;

pub const TYPE_REG: u8 = b'0';
pub const TYPE_LINK: u8 = b'1';
pub const TYPE_SYMLINK: u8 = b'2';
pub const TYPE_CHAR: u8 = b'3';
pub const TYPE_BLOCK: u8 = b'4';
pub const TYPE_DIR: u8 = b'5';
pub const TYPE_FIFO: u8 = b'6';
const TYPE_PAX: u8 = b'x';

// Field offsets and sizes of a USTAR header block.
const NAME: (usize, usize) = (0, 100);
const MODE: (usize, usize) = (100, 8);
const UID: (usize, usize) = (108, 8);
const GID: (usize, usize) = (116, 8);
const SIZE: (usize, usize) = (124, 12);
const MTIME: (usize, usize) = (136, 12);
const CHKSUM: (usize, usize) = (148, 8);
const TYPEFLAG: usize = 156;
const LINKNAME: (usize, usize) = (157, 100);
const MAGIC: (usize, usize) = (257, 6);
const VERSION: (usize, usize) = (263, 2);
const DEVMAJOR: (usize, usize) = (329, 8);
const DEVMINOR: (usize, usize) = (337, 8);
const PREFIX: (usize, usize) = (345, 155);

/// One member to write. `name` is the full layer path (directories with their trailing `/`).
#[derive(Debug, Clone, Default)]
pub struct EntryHeader {
    pub name: Vec<u8>,
    pub typeflag: u8,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub linkname: Vec<u8>,
    pub devmajor: u64,
    pub devminor: u64,
}

fn field(block: &mut [u8; BLOCK], (off, len): (usize, usize)) -> &mut [u8] {
    &mut block[off..off + len]
}

/// Zero-padded octal with a NUL terminator, as Go's `formatOctal`; false if it doesn't fit.
fn fits_octal(len: usize, v: u64) -> bool {
    // len-1 octal digits.
    let digits = (len - 1) as u32;
    digits >= 22 || v < (1u64 << (3 * digits))
}

fn put_octal(block: &mut [u8; BLOCK], f: (usize, usize), v: u64) {
    let dst = field(block, f);
    let s = format!("{v:o}");
    let n = dst.len() - 1;
    let pad = n.saturating_sub(s.len());
    for b in dst[..pad].iter_mut() {
        *b = b'0';
    }
    dst[pad..n].copy_from_slice(&s.as_bytes()[s.len().saturating_sub(n)..]);
    dst[n] = 0;
}

/// Copies `s` (truncated) into a field, NUL-terminating if there is room, as Go's `formatString`.
fn put_str(block: &mut [u8; BLOCK], f: (usize, usize), s: &[u8]) {
    let dst = field(block, f);
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s[..n]);
    if s.len() < dst.len() {
        dst[s.len()] = 0;
    }
    // A truncated name must not end with '/' (buggy readers would take it for a directory).
    if s.len() > dst.len() && dst[dst.len() - 1] == b'/' {
        let mut end = dst.len() - 1;
        while end > 0 && dst[end - 1] == b'/' {
            end -= 1;
        }
        dst[end] = 0;
    }
}

fn to_ascii(s: &[u8]) -> Vec<u8> {
    s.iter().copied().filter(|b| b.is_ascii()).collect()
}

/// Go's `splitUSTARPath`: (prefix, name) when a long ASCII name can be split at a '/'.
fn split_ustar_path(name: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = name.len();
    if len <= NAME.1 || !name.is_ascii() {
        return None;
    }
    let mut l = len;
    if l > PREFIX.1 + 1 {
        l = PREFIX.1 + 1;
    } else if name[l - 1] == b'/' {
        l -= 1;
    }
    let i = name[..l].iter().rposition(|&b| b == b'/')?;
    let nlen = len - i - 1;
    if i == 0 || nlen > NAME.1 || nlen == 0 || i > PREFIX.1 {
        return None;
    }
    Some((&name[..i], &name[i + 1..]))
}

/// One PAX record: `"<len> <key>=<value>\n"`, where len counts the whole record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let base = key.len() + value.len() + 3;
    let mut n = base + base.to_string().len();
    if n.to_string().len() + base != n {
        n = base + n.to_string().len();
    }
    let mut rec = Vec::with_capacity(n);
    rec.extend_from_slice(n.to_string().as_bytes());
    rec.push(b' ');
    rec.extend_from_slice(key.as_bytes());
    rec.push(b'=');
    rec.extend_from_slice(value);
    rec.push(b'\n');
    debug_assert_eq!(rec.len(), n);
    rec
}

fn checksum(block: &mut [u8; BLOCK]) {
    field(block, CHKSUM).fill(b' ');
    let sum: u64 = block.iter().map(|&b| b as u64).sum();
    // Go: six octal digits, NUL, space.
    let dst = &mut block[CHKSUM.0..CHKSUM.0 + 7];
    let s = format!("{sum:06o}");
    dst[..6].copy_from_slice(&s.as_bytes()[s.len() - 6..]);
    dst[6] = 0;
    block[CHKSUM.0 + 7] = b' ';
}

fn set_ustar_magic(block: &mut [u8; BLOCK]) {
    field(block, MAGIC).copy_from_slice(b"ustar\0");
    field(block, VERSION).copy_from_slice(b"00");
}

/// The name of the PAX header block for `name`: Go's `path.Join(dir, "PaxHeaders.0", file)`.
fn pax_header_name(name: &[u8]) -> Vec<u8> {
    let (dir, file) = match name.iter().rposition(|&b| b == b'/') {
        Some(i) => (&name[..i], &name[i + 1..]),
        None => (&name[..0], name),
    };
    let mut out = Vec::new();
    let dir = {
        let mut d = dir;
        while d.last() == Some(&b'/') {
            d = &d[..d.len() - 1];
        }
        d
    };
    if !dir.is_empty() {
        out.extend_from_slice(dir);
        out.push(b'/');
    }
    out.extend_from_slice(b"PaxHeaders.0");
    if !file.is_empty() {
        out.push(b'/');
        out.extend_from_slice(file);
    }
    let mut out = to_ascii(&out);
    out.truncate(NAME.1);
    while out.last() == Some(&b'/') {
        out.pop();
    }
    out
}

/// Encodes `h`: the optional PAX header block plus its padded records, and the main header block.
pub fn encode(h: &EntryHeader) -> Result<(Vec<u8>, [u8; BLOCK]), String> {
    let max12 = 0o77777777777u64;
    let mut pax: BTreeMap<&'static str, Vec<u8>> = BTreeMap::new();

    let name_fits = h.name.len() <= NAME.1 && h.name.is_ascii();
    let split = if name_fits {
        None
    } else {
        split_ustar_path(&h.name)
    };
    if !name_fits && split.is_none() {
        pax.insert("path", h.name.clone());
    }
    if h.linkname.len() > LINKNAME.1 || !h.linkname.is_ascii() {
        pax.insert("linkpath", h.linkname.clone());
    }
    if !fits_octal(UID.1, h.uid) {
        pax.insert("uid", h.uid.to_string().into_bytes());
    }
    if !fits_octal(GID.1, h.gid) {
        pax.insert("gid", h.gid.to_string().into_bytes());
    }
    if h.size > max12 {
        pax.insert("size", h.size.to_string().into_bytes());
    }
    if h.mtime < 0 || h.mtime as u64 > max12 {
        pax.insert("mtime", h.mtime.to_string().into_bytes());
    }
    if !fits_octal(DEVMAJOR.1, h.devmajor) || !fits_octal(DEVMINOR.1, h.devminor) {
        return Err(format!(
            "device number {}:{} is too large for a tar header",
            h.devmajor, h.devminor
        ));
    }

    let mut block = [0u8; BLOCK];
    let or_zero = |len: usize, v: u64| if fits_octal(len, v) { v } else { 0 };
    if pax.is_empty() {
        match split {
            Some((prefix, name)) => {
                put_str(&mut block, NAME, name);
                put_str(&mut block, PREFIX, prefix);
            }
            None => put_str(&mut block, NAME, &h.name),
        }
        put_str(&mut block, LINKNAME, &h.linkname);
    } else {
        // PAX format: the USTAR fields get a best-effort ASCII copy; readers use the records.
        put_str(&mut block, NAME, &to_ascii(&h.name));
        put_str(&mut block, LINKNAME, &to_ascii(&h.linkname));
    }
    put_octal(&mut block, MODE, h.mode as u64 & 0o7777);
    put_octal(&mut block, UID, or_zero(UID.1, h.uid));
    put_octal(&mut block, GID, or_zero(GID.1, h.gid));
    put_octal(&mut block, SIZE, or_zero(SIZE.1, h.size));
    let mtime = if h.mtime < 0 { 0 } else { h.mtime as u64 };
    put_octal(&mut block, MTIME, or_zero(MTIME.1, mtime));
    block[TYPEFLAG] = h.typeflag;
    set_ustar_magic(&mut block);
    put_octal(&mut block, DEVMAJOR, h.devmajor);
    put_octal(&mut block, DEVMINOR, h.devminor);
    checksum(&mut block);

    let mut pre = Vec::new();
    if !pax.is_empty() {
        let mut data = Vec::new();
        for (k, v) in &pax {
            data.extend_from_slice(&pax_record(k, v));
        }
        let mut ph = [0u8; BLOCK];
        put_str(&mut ph, NAME, &pax_header_name(&h.name));
        put_octal(&mut ph, MODE, 0);
        put_octal(&mut ph, UID, 0);
        put_octal(&mut ph, GID, 0);
        put_octal(&mut ph, SIZE, data.len() as u64);
        put_octal(&mut ph, MTIME, 0);
        ph[TYPEFLAG] = TYPE_PAX;
        set_ustar_magic(&mut ph);
        checksum(&mut ph);
        pre.extend_from_slice(&ph);
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        pre.extend_from_slice(&data);
        pre.resize(pre.len() + pad, 0);
    }
    Ok((pre, block))
}

/// A tar stream being written to `W`.
pub struct TarWriter<W: Write> {
    out: W,
}

/// What went wrong while appending: the header (a value that doesn't fit), the content source
/// (a file that changed), or the output.
pub enum AppendError {
    Header(String),
    ShortRead { actual: u64 },
    Source(io::Error),
    Write(io::Error),
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        TarWriter { out }
    }

    /// Writes a member; `data` must yield exactly `h.size` bytes (it's read no further).
    pub fn append(
        &mut self,
        h: &EntryHeader,
        data: Option<&mut dyn Read>,
    ) -> Result<(), AppendError> {
        let (pre, block) = encode(h).map_err(AppendError::Header)?;
        self.out.write_all(&pre).map_err(AppendError::Write)?;
        self.out.write_all(&block).map_err(AppendError::Write)?;
        if h.size == 0 {
            return Ok(());
        }
        let Some(data) = data else {
            return Err(AppendError::ShortRead { actual: 0 });
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = h.size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match data.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(AppendError::ShortRead {
                        actual: h.size - left,
                    });
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(AppendError::Source(e)),
            };
            self.out.write_all(&buf[..n]).map_err(AppendError::Write)?;
            left -= n as u64;
        }
        let pad = (BLOCK as u64 - h.size % BLOCK as u64) % BLOCK as u64;
        self.out
            .write_all(&[0u8; BLOCK][..pad as usize])
            .map_err(AppendError::Write)?;
        Ok(())
    }

    /// Writes the two zero blocks that end the archive and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 2 * BLOCK])?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        assert_eq!(pax_record("path", b"abc"), b"12 path=abc\n");
        // 9 + 3 = 12 needs 2 digits, but the record with 2 digits is 98 + 2 = exactly where the
        // digit count changes: check a value whose length crosses 100.
        let v = vec![b'a'; 91]; // 4 + 91 + 3 = 98 -> 98 + 2 = 100 -> needs 3 digits -> 101
        let rec = pax_record("path", &v);
        assert_eq!(rec.len(), 101);
        assert!(rec.starts_with(b"101 path="));
    }

    #[test]
    fn pax_header_names_like_go() {
        assert_eq!(pax_header_name(b"x"), b"PaxHeaders.0/x");
        assert_eq!(pax_header_name(b"a/b/c"), b"a/b/PaxHeaders.0/c");
        assert_eq!(pax_header_name(b"a/b/"), b"a/b/PaxHeaders.0");
        assert_eq!(pax_header_name("ä/ö".as_bytes()), b"/PaxHeaders.0");
        let long = format!("{}/f", "d".repeat(120));
        assert_eq!(pax_header_name(long.as_bytes()), "d".repeat(100).as_bytes());
    }

    #[test]
    fn splits_like_go() {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(50));
        let (p, n) = split_ustar_path(long.as_bytes()).unwrap();
        assert_eq!(p.len(), 120);
        assert_eq!(n.len(), 50);
        assert!(split_ustar_path("x".repeat(150).as_bytes()).is_none());
        assert!(split_ustar_path(b"short").is_none());
    }

    #[test]
    fn header_fields_are_go_formatted() {
        let h = EntryHeader {
            name: b"etc/".to_vec(),
            typeflag: TYPE_DIR,
            mode: 0o40755, // type bits are dropped
            uid: 1000,
            gid: 1000,
            mtime: 1_700_000_000,
            ..Default::default()
        };
        let (pre, b) = encode(&h).unwrap();
        assert!(pre.is_empty());
        assert_eq!(&b[0..5], b"etc/\0");
        assert_eq!(&b[100..108], b"0000755\0");
        assert_eq!(&b[108..116], b"0001750\0");
        assert_eq!(&b[136..148], b"14524770400\0");
        assert_eq!(&b[257..265], b"ustar\x0000");
        assert_eq!(&b[329..337], b"0000000\0");
        assert_eq!(b[155], b' ');
        assert_eq!(b[154], 0);
        // The tar crate agrees on the checksum.
        let th = tar::Header::from_byte_slice(&b);
        assert_eq!(th.cksum().unwrap(), {
            let mut c = b;
            c[148..156].fill(b' ');
            c.iter().map(|&x| x as u32).sum::<u32>()
        });
    }
}
