//! Unpacking a layer tar into a snapshot directory (see the module doc of `layer` for the rules).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{
    FchmodatFlags, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens, makedev,
    mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use sha2::{Digest as _, Sha256};
use tar::EntryType;
use xattr::FileExt as _;

use super::{ApplyOptions, ApplyReport, Compression, LayerError};

const WH_PREFIX: &[u8] = b".wh.";
const WH_META_PREFIX: &[u8] = b".wh..wh.";
const WH_OPAQUE: &[u8] = b".wh..wh..opq";

/// Unpacks one layer tar stream into `dest` (an empty directory that becomes an overlay lowerdir).
///
/// The stream is read to its end (so the returned [`ApplyReport::diff_id`] covers all of it and
/// gzip's trailer is checked). Nothing is written outside `dest`: see the module doc.
pub fn apply_layer(
    reader: impl Read,
    compression: Compression,
    dest: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyReport, LayerError> {
    let decompressed = super::compress::decoder(reader, compression)?;
    let hashing = HashReader {
        inner: decompressed,
        hasher: Sha256::new(),
    };

    let root: OwnedFd = openat(
        nix::fcntl::AT_FDCWD,
        dest,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("opening the unpack destination", dest, e))?;

    let mut applier = Applier {
        root,
        dest,
        opts,
        report: ApplyReport::default(),
        dirs: Vec::new(),
        buf: vec![0u8; 64 * 1024],
        no_xattrs: false,
    };

    let mut archive = tar::Archive::new(hashing);
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        applier.report.entries += 1;
        applier.apply_entry(&mut entry)?;
    }
    // Read what follows the end-of-archive blocks too, so the diff_id covers the whole stream
    // and the gzip trailer (CRC, length) is verified.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(read_err)?;
    applier.finish_dirs()?;

    let mut report = applier.report;
    report.diff_id = format!("sha256:{}", hex::encode(rest.hasher.finalize()));
    Ok(report)
}

struct HashReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn read_err(source: io::Error) -> LayerError {
    LayerError::Read { source }
}

fn io_err(op: &'static str, path: &Path, e: impl Into<io::Error>) -> LayerError {
    LayerError::Io {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Ownership, mode and mtime of an entry, with PAX `uid`/`gid`/`mtime` records applied.
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: TimeSpec,
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Meta, LayerError> {
    let h = entry.header();
    let old = h.as_old();
    let mode = numeric(h.mode(), &old.mode)? as u32 & 0o7777;
    let mut uid = numeric(h.uid(), &old.uid)?;
    let mut gid = numeric(h.gid(), &old.gid)?;
    let secs = numeric(h.mtime(), &old.mtime)?;
    let mut mtime = TimeSpec::new(i64::try_from(secs).unwrap_or(0), 0);
    if let Some(exts) = entry.pax_extensions().map_err(read_err)? {
        for ext in exts {
            let ext = ext.map_err(read_err)?;
            let (Ok(key), Ok(value)) = (ext.key(), ext.value()) else {
                continue;
            };
            match key {
                "uid" => uid = value.trim().parse().unwrap_or(uid),
                "gid" => gid = value.trim().parse().unwrap_or(gid),
                "mtime" => mtime = parse_pax_time(value).unwrap_or(mtime),
                _ => {}
            }
        }
    }
    Ok(Meta {
        mode,
        uid,
        gid,
        mtime,
    })
}

/// A numeric header field; a blank one (all NULs or spaces) is 0, as Go's `archive/tar` reads it.
fn numeric<T: Into<u64>>(parsed: io::Result<T>, raw: &[u8]) -> Result<u64, LayerError> {
    match parsed {
        Ok(v) => Ok(v.into()),
        Err(_) if raw.iter().all(|&b| b == 0 || b == b' ') => Ok(0),
        Err(e) => Err(read_err(e)),
    }
}

/// A PAX time: decimal seconds with an optional fraction (`1700000000.5`). Before 1970 -> 0.
fn parse_pax_time(v: &str) -> Option<TimeSpec> {
    let v = v.trim();
    if v.starts_with('-') {
        return Some(TimeSpec::new(0, 0));
    }
    let (secs, frac) = v.split_once('.').unwrap_or((v, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, c) in frac.chars().take(9).enumerate() {
        let d = c.to_digit(10)? as i64;
        nanos += d * 10i64.pow(8 - i as u32);
    }
    Some(TimeSpec::new(secs, nanos))
}

/// Splits a tar name into safe components: leading `/` stripped (with a warning), empty and `.`
/// components dropped, `..` rejected.
fn clean_components(raw: &[u8], warnings: &mut Vec<String>) -> Result<Vec<Vec<u8>>, LayerError> {
    let shown = String::from_utf8_lossy(raw);
    if raw.starts_with(b"/") {
        warnings.push(format!(
            "absolute name {shown:?} in the layer was unpacked relative to the layer root"
        ));
    }
    let mut comps = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(LayerError::UnsafePath {
                    path: shown.into_owned(),
                    reason: "it has a `..` component",
                });
            }
            c => comps.push(c.to_vec()),
        }
    }
    Ok(comps)
}

fn join(comps: &[Vec<u8>]) -> String {
    let v: Vec<_> = comps.iter().map(|c| String::from_utf8_lossy(c)).collect();
    v.join("/")
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Removes `name` in `parent`, recursively if it is a directory, never following symlinks.
fn remove_all_at(parent: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
    match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
        Err(Errno::EISDIR) => {}
        other => return other,
    }
    {
        let mut dir = nix::dir::Dir::openat(parent, name, dir_flags(), Mode::empty())?;
        let mut names = Vec::new();
        for e in dir.iter() {
            let e = e?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        for n in names {
            remove_all_at(dir.as_fd(), &n)?;
        }
    }
    unlinkat(parent, name, UnlinkatFlags::RemoveDir)
}

/// What exists at a name (`lstat`).
fn kind_at(parent: BorrowedFd<'_>, name: &[u8]) -> nix::Result<Option<SFlag>> {
    match fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

struct Applier<'a> {
    root: OwnedFd,
    dest: &'a Path,
    opts: &'a ApplyOptions,
    report: ApplyReport,
    /// Directories whose mode and mtime are set at the end, after their contents.
    dirs: Vec<(Vec<Vec<u8>>, u32, TimeSpec)>,
    buf: Vec<u8>,
    /// The filesystem refused a user xattr: owners are no longer recorded.
    no_xattrs: bool,
}

enum Lookup {
    /// Create missing directories (mode 0755).
    Create,
    /// A missing directory is `Ok(None)`.
    Existing,
}

impl Applier<'_> {
    fn host_path(&self, rel: &str) -> std::path::PathBuf {
        self.dest.join(rel)
    }

    /// Opens the directory `comps` under the root, one component at a time, never following a
    /// symlink. `shown` names the entry for errors.
    fn open_dir(
        &self,
        comps: &[Vec<u8>],
        shown: &str,
        lookup: Lookup,
    ) -> Result<Option<OwnedFd>, LayerError> {
        let mut cur: OwnedFd = self
            .root
            .try_clone()
            .map_err(|e| io_err("duplicating the fd of", self.dest, e))?;
        for (i, comp) in comps.iter().enumerate() {
            let not_dir = || LayerError::NotADirectory {
                path: shown.to_string(),
                component: join(&comps[..=i]),
            };
            let next = match openat(cur.as_fd(), comp.as_slice(), dir_flags(), Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => match lookup {
                    Lookup::Existing => return Ok(None),
                    Lookup::Create => {
                        let made = self.host_path(&join(&comps[..=i]));
                        match mkdirat(
                            cur.as_fd(),
                            comp.as_slice(),
                            Mode::from_bits_truncate(0o755),
                        ) {
                            Ok(()) | Err(Errno::EEXIST) => {}
                            Err(e) => return Err(io_err("creating directory", &made, e)),
                        }
                        let fd = match openat(
                            cur.as_fd(),
                            comp.as_slice(),
                            dir_flags(),
                            Mode::empty(),
                        ) {
                            Ok(fd) => fd,
                            Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(not_dir()),
                            Err(e) => return Err(io_err("opening directory", &made, e)),
                        };
                        // Not subject to the umask: implicit parents are always 0755.
                        fchmod(fd.as_fd(), Mode::from_bits_truncate(0o755))
                            .map_err(|e| io_err("chmod", &made, e))?;
                        fd
                    }
                },
                Err(Errno::ELOOP | Errno::ENOTDIR) => return Err(not_dir()),
                Err(e) => {
                    return Err(io_err(
                        "opening directory",
                        &self.host_path(&join(&comps[..=i])),
                        e,
                    ));
                }
            };
            cur = next;
        }
        Ok(Some(cur))
    }

    fn chown_at(
        &self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        shown: &str,
        meta: &Meta,
    ) -> Result<(), LayerError> {
        if !self.opts.chown {
            return Ok(());
        }
        ids(meta)
            .and_then(|(uid, gid)| {
                fchownat(
                    parent,
                    name,
                    Some(uid),
                    Some(gid),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
            })
            .map_err(|e| self.chown_err(shown, meta, e))
    }

    /// [`ApplyOptions::record_owner`]: the tar's owner kept in an xattr of `file`. A store
    /// whose filesystem keeps no user xattrs (tmpfs before Linux 6.6) loses the owners, with one
    /// warning, rather than the build.
    fn record_owner(&mut self, file: &File, shown: &str, meta: &Meta) -> Result<(), LayerError> {
        if self.opts.chown
            || !self.opts.record_owner
            || self.no_xattrs
            || (meta.uid, meta.gid) == (0, 0)
        {
            return Ok(());
        }
        let value = format!("{}:{}", meta.uid, meta.gid);
        match file.set_xattr(super::OWNER_XATTR, value.as_bytes()) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => {
                self.no_xattrs = true;
                self.report.warnings.push(format!(
                    "{}: the store's filesystem keeps no user xattrs, so the owners of this image's files ({shown} belongs to {}:{}) cannot be recorded in a single-ID build: files a step changes will belong to 0 in its layer (put the store on ext4, xfs or btrfs, or give the user subordinate IDs)",
                    self.dest.display(),
                    meta.uid,
                    meta.gid
                ));
                Ok(())
            }
            Err(source) => Err(LayerError::Io {
                op: "recording the owner (xattr) of",
                path: self.host_path(shown),
                source,
            }),
        }
    }

    fn chown_err(&self, shown: &str, meta: &Meta, e: Errno) -> LayerError {
        LayerError::Chown {
            path: self.host_path(shown),
            uid: meta.uid,
            gid: meta.gid,
            source: e.into(),
        }
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), LayerError> {
        let kind = entry.header().entry_type();
        if kind == EntryType::XGlobalHeader {
            // Global PAX records (comments, mostly) carry nothing we restore.
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let comps = clean_components(&raw, &mut self.report.warnings)?;
        let shown = join(&comps);

        let Some((name, parent_comps)) = comps.split_last() else {
            // The layer root itself (`./`): only a directory makes sense there.
            if kind == EntryType::Directory {
                let meta = read_meta(entry)?;
                if self.opts.chown {
                    ids(&meta)
                        .and_then(|(uid, gid)| fchown(self.root.as_fd(), Some(uid), Some(gid)))
                        .map_err(|e| self.chown_err("", &meta, e))?;
                }
                self.dirs.push((Vec::new(), meta.mode, meta.mtime));
            } else {
                self.report.warnings.push(format!(
                    "skipped a {kind:?} entry named {:?} for the layer root",
                    String::from_utf8_lossy(&raw)
                ));
            }
            return Ok(());
        };

        // Whiteouts.
        if name.as_slice() == WH_OPAQUE {
            let dir = self
                .open_dir(parent_comps, &shown, Lookup::Create)?
                .expect("created");
            let dir = File::from(dir);
            let attr = self.opts.overlay_xattrs.opaque();
            dir.set_xattr(attr, b"y").map_err(|e| LayerError::Io {
                op: "marking opaque (setting the overlay xattr) on",
                path: self.host_path(&join(parent_comps)),
                source: e,
            })?;
            return Ok(());
        }
        if name.starts_with(WH_META_PREFIX) {
            self.report.warnings.push(format!(
                "skipped {shown:?}: aufs metadata, which overlay layers don't use"
            ));
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WH_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(LayerError::UnsafePath {
                    path: shown,
                    reason: "it is a whiteout for an invalid name",
                });
            }
            let parent = self
                .open_dir(parent_comps, &shown, Lookup::Create)?
                .expect("created");
            let mut target = parent_comps.to_vec();
            target.push(hidden.to_vec());
            let target_path = self.host_path(&join(&target));
            if kind_at(parent.as_fd(), hidden)
                .map_err(|e| io_err("lstat", &target_path, e))?
                .is_some()
            {
                remove_all_at(parent.as_fd(), hidden)
                    .map_err(|e| io_err("removing (for a whiteout)", &target_path, e))?;
            }
            mknodat(parent.as_fd(), hidden, SFlag::S_IFCHR, Mode::empty(), 0).map_err(|e| {
                io_err(
                    "creating the overlay whiteout (a 0/0 character device; needs Linux >= 5.8 in a user namespace)",
                    &target_path,
                    e,
                )
            })?;
            return Ok(());
        }

        let is_dir = kind == EntryType::Directory;
        match kind {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Char
            | EntryType::Block
            | EntryType::Fifo => {}
            other => {
                self.report.warnings.push(format!(
                    "skipped {shown:?}: unsupported tar entry type {other:?}"
                ));
                return Ok(());
            }
        }

        let parent = self
            .open_dir(parent_comps, &shown, Lookup::Create)?
            .expect("created");
        let path = self.host_path(&shown);
        let name = name.as_slice();

        // Hardlinks: resolve the target before touching the name (it may be the same entry).
        let link_target = if kind == EntryType::Link {
            let raw_target = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .unwrap_or_default();
            let tcomps = clean_components(&raw_target, &mut self.report.warnings)?;
            if tcomps == comps {
                return Ok(()); // a link to itself: nothing to do
            }
            let target_shown = String::from_utf8_lossy(&raw_target).into_owned();
            let missing = |source: io::Error| LayerError::HardlinkTarget {
                path: shown.clone(),
                target: target_shown.clone(),
                source,
            };
            let Some((tname, tparent)) = tcomps.split_last() else {
                return Err(missing(io::Error::other("the target is the layer root")));
            };
            let tdir = match self.open_dir(tparent, &shown, Lookup::Existing)? {
                Some(fd) => fd,
                None => return Err(missing(io::ErrorKind::NotFound.into())),
            };
            Some((tdir, tname.clone(), target_shown))
        } else {
            None
        };

        // Make room: a directory stays if a directory replaces it; anything else goes.
        let existing = kind_at(parent.as_fd(), name).map_err(|e| io_err("lstat", &path, e))?;
        let keep_dir = is_dir && existing == Some(SFlag::S_IFDIR);
        if existing.is_some() && !keep_dir {
            remove_all_at(parent.as_fd(), name)
                .map_err(|e| io_err("removing (to replace it)", &path, e))?;
        }

        let meta = read_meta(entry)?;
        let perm = Mode::from_bits_truncate(meta.mode);
        match kind {
            EntryType::Directory => {
                if !keep_dir {
                    mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o700))
                        .map_err(|e| io_err("creating directory", &path, e))?;
                }
                self.chown_at(parent.as_fd(), name, &shown, &meta)?;
                if self.opts.record_owner && !self.opts.chown {
                    let fd = openat(
                        parent.as_fd(),
                        name,
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| io_err("opening directory", &path, e))?;
                    self.record_owner(&File::from(fd), &shown, &meta)?;
                }
                self.dirs.push((comps.clone(), meta.mode, meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let fd = openat(
                    parent.as_fd(),
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| io_err("creating file", &path, e))?;
                let mut file = File::from(fd);
                loop {
                    let n = match entry.read(&mut self.buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(read_err(e)),
                    };
                    file.write_all(&self.buf[..n])
                        .map_err(|e| io_err("writing", &path, e))?;
                }
                if self.opts.chown {
                    ids(&meta)
                        .and_then(|(uid, gid)| fchown(file.as_fd(), Some(uid), Some(gid)))
                        .map_err(|e| self.chown_err(&shown, &meta, e))?;
                }
                self.record_owner(&file, &shown, &meta)?;
                // After chown, which clears setuid/setgid.
                fchmod(file.as_fd(), perm).map_err(|e| io_err("chmod", &path, e))?;
                futimens(file.as_fd(), &meta.mtime, &meta.mtime)
                    .map_err(|e| io_err("setting mtime of", &path, e))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                // The target is stored as is: it is never followed here.
                symlinkat(target.as_slice(), parent.as_fd(), name)
                    .map_err(|e| io_err("creating symlink", &path, e))?;
                self.chown_at(parent.as_fd(), name, &shown, &meta)?;
                self.set_mtime_at(parent.as_fd(), name, &path, &meta)?;
            }
            EntryType::Link => {
                let (tdir, tname, target_shown) = link_target.expect("resolved above");
                // Without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
                linkat(
                    tdir.as_fd(),
                    tname.as_slice(),
                    parent.as_fd(),
                    name,
                    AtFlags::empty(),
                )
                .map_err(|e| LayerError::HardlinkTarget {
                    path: shown.clone(),
                    target: target_shown,
                    source: e.into(),
                })?;
                // The inode's metadata is the target's: nothing more to set.
            }
            EntryType::Fifo | EntryType::Char | EntryType::Block => {
                let (sflag, dev) = match kind {
                    EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    _ => {
                        let h = entry.header();
                        let major = h.device_major().map_err(read_err)?.unwrap_or(0);
                        let minor = h.device_minor().map_err(read_err)?.unwrap_or(0);
                        let flag = if kind == EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (flag, makedev(major as u64, minor as u64))
                    }
                };
                match mknodat(parent.as_fd(), name, sflag, perm, dev) {
                    Ok(()) => {}
                    Err(Errno::EPERM) if sflag != SFlag::S_IFIFO => {
                        self.report.warnings.push(format!(
                            "skipped device {shown:?}: creating device nodes is not permitted here (user namespace); the container runtime provides /dev"
                        ));
                        return Ok(());
                    }
                    Err(e) => return Err(io_err("creating special file", &path, e)),
                }
                self.chown_at(parent.as_fd(), name, &shown, &meta)?;
                // The node was created just now under a directory fd we hold, so `name` is not a
                // symlink; fchmodat can't take AT_SYMLINK_NOFOLLOW portably (fchmodat2).
                fchmodat(parent.as_fd(), name, perm, FchmodatFlags::FollowSymlink)
                    .map_err(|e| io_err("chmod", &path, e))?;
                self.set_mtime_at(parent.as_fd(), name, &path, &meta)?;
            }
            _ => unreachable!("filtered above"),
        }
        Ok(())
    }

    fn set_mtime_at(
        &self,
        parent: BorrowedFd<'_>,
        name: &[u8],
        path: &Path,
        meta: &Meta,
    ) -> Result<(), LayerError> {
        utimensat(
            parent,
            name,
            &meta.mtime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| io_err("setting mtime of", path, e))
    }

    /// Sets directories' modes and mtimes, deepest first, now that nothing more is written in them.
    fn finish_dirs(&mut self) -> Result<(), LayerError> {
        let mut dirs = std::mem::take(&mut self.dirs);
        // Stable: for a directory listed twice, the later entry is applied last and wins.
        dirs.sort_by_key(|(comps, _, _)| std::cmp::Reverse(comps.len()));
        for (comps, mode, mtime) in dirs {
            let shown = join(&comps);
            // A directory replaced later by another type, or removed by a whiteout, is skipped.
            let fd = match self.open_dir(&comps, &shown, Lookup::Existing) {
                Ok(Some(fd)) => fd,
                Ok(None) | Err(LayerError::NotADirectory { .. }) => continue,
                Err(e) => return Err(e),
            };
            let path = self.host_path(&shown);
            fchmod(fd.as_fd(), Mode::from_bits_truncate(mode))
                .map_err(|e| io_err("chmod", &path, e))?;
            futimens(fd.as_fd(), &mtime, &mtime)
                .map_err(|e| io_err("setting mtime of", &path, e))?;
        }
        Ok(())
    }
}

/// The IDs to chown to. 2^32-1 means "leave unchanged" to chown(2), and larger ones don't exist:
/// both are EINVAL here, reported like an unmapped ID.
fn ids(meta: &Meta) -> nix::Result<(Uid, Gid)> {
    let valid = |id: u64| u32::try_from(id).ok().filter(|&id| id != u32::MAX);
    match (valid(meta.uid), valid(meta.gid)) {
        (Some(uid), Some(gid)) => Ok((Uid::from_raw(uid), Gid::from_raw(gid))),
        _ => Err(Errno::EINVAL),
    }
}
