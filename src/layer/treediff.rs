//! Layers without kernel overlayfs: the copy snapshotter and fuse-overlayfs.
//!
//! The copy snapshotter stacks the image's layers into one plain directory ([`materialize`]),
//! lets the step change it, and then finds what changed by comparing that directory with the
//! layers ([`diff_tree_to_upper`]). The result is written as an overlay upper dir, in exactly the
//! form kernel overlayfs leaves (0/0 character devices for whiteouts, `user.overlay.opaque` on a
//! directory that was removed and made again), so [`diff_upper_to_blob`](super::diff_upper_to_blob)
//! and the snapshot commit (renaming the upper dir) work unchanged and give the same layer.
//!
//! How a change is recognised: [`materialize`] remembers the inode of every directory it made and
//! a ctime taken after its last write. A file or link whose ctime is not older than that was
//! touched by the step (a write, chmod, chown, utimes, rename or link all set ctime, which no
//! process can set back), so it goes into the upper dir whole, as overlayfs would copy it up. A
//! directory is kept when something below it changed or its mode, owner or mtime differ from the
//! layers'; a directory at a known path with an unknown inode was removed and made again, and
//! becomes opaque. Names present in the layers and missing now become whiteouts.
//!
//! [`normalize_fuse_upper`] rewrites fuse-overlayfs' own markers (a `.wh..wh..opq` file, a
//! `.wh..opq` device and the `user.fuseoverlayfs.opaque` xattr on an opaque directory; `.wh.NAME`
//! files where it could not make a device) into the same kernel form.
//!
//! File contents are copied with `std::fs::copy`, i.e. `copy_file_range`, which shares extents
//! (a reflink) on filesystems that can (btrfs, XFS) and copies bytes elsewhere.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags, mknod, utimensat};
use nix::sys::time::TimeSpec;

use super::LayerError;

/// What [`materialize`] remembers for [`diff_tree_to_upper`].
#[derive(Debug, Default)]
pub struct CopyMarks {
    /// (dev, ino) of every directory made by [`materialize`].
    dirs: HashSet<(u64, u64)>,
    /// (seconds, nanoseconds): an entry whose ctime is this or later was touched by the step.
    since: (i64, i64),
    /// Things left out of the copy (devices that cannot be made here), one sentence each.
    pub warnings: Vec<String>,
    /// Paths neither replaced nor compared (in-place execution: see [`materialize_in_place`]).
    kept: Kept,
}

/// The paths of a running system that in-place execution leaves as they are: its mount points
/// (/proc, /dev, a CI's volumes, the hosts files a container runtime binds), shmocker's own
/// store, context and executable, and what `--ignore-path` names. Absolute paths.
#[derive(Debug, Default, Clone)]
pub struct Kept {
    paths: BTreeSet<PathBuf>,
}

impl Kept {
    /// `paths` are absolute; `/` itself is never kept (it is what gets replaced).
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> Kept {
        Kept {
            paths: paths
                .into_iter()
                .filter(|p| p.is_absolute() && p.parent().is_some())
                .map(|p| p.components().collect())
                .collect(),
        }
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.paths.iter().map(PathBuf::as_path)
    }

    fn is_kept(&self, p: &Path) -> bool {
        self.paths.contains(p)
    }

    /// Whether something kept lies below `p` (so `p` must stay, as a directory).
    fn holds_kept(&self, p: &Path) -> bool {
        self.paths.iter().any(|k| k != p && k.starts_with(p))
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn nix_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(nix::errno::Errno) -> LayerError + 'a {
    move |e| LayerError::Io {
        op,
        path: path.to_path_buf(),
        source: io::Error::from(e),
    }
}

fn lstat(p: &Path) -> Result<Option<Metadata>, LayerError> {
    match fs::symlink_metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("lstat", p)(e)),
    }
}

fn is_whiteout(md: &Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_opaque(p: &Path) -> bool {
    ["user.overlay.opaque", "trusted.overlay.opaque"]
        .iter()
        .any(|n| matches!(xattr::get(p, n), Ok(Some(v)) if v == b"y"))
}

/// A name as the stacked layers show it.
enum Lower {
    Absent,
    NonDir,
    /// The directory in each layer where it shows through, topmost first, and the topmost's
    /// metadata.
    Dir(Vec<PathBuf>, Metadata),
}

/// Resolves `name` in a directory seen through `dirs` (that directory in each layer where it
/// shows through, topmost first), as overlayfs does: the topmost entry wins; a whiteout hides
/// everything below; directories merge down to the first opaque one or the first non-directory.
fn resolve(dirs: &[PathBuf], name: &OsStr) -> Result<(Lower, Option<PathBuf>), LayerError> {
    let mut found: Vec<PathBuf> = Vec::new();
    let mut top: Option<Metadata> = None;
    for d in dirs {
        let p = d.join(name);
        let Some(md) = lstat(&p)? else { continue };
        if top.is_none() {
            if is_whiteout(&md) {
                return Ok((Lower::Absent, None));
            }
            if !md.is_dir() {
                return Ok((Lower::NonDir, Some(p)));
            }
            top = Some(md);
        } else if !md.is_dir() {
            break;
        }
        let opaque = is_opaque(&p);
        found.push(p);
        if opaque {
            break;
        }
    }
    Ok(match top {
        Some(md) => (Lower::Dir(found, md), None),
        None => (Lower::Absent, None),
    })
}

fn names_in(dirs: &[PathBuf]) -> Result<BTreeSet<OsString>, LayerError> {
    let mut names = BTreeSet::new();
    for d in dirs {
        for e in fs::read_dir(d).map_err(io_err("listing", d))? {
            names.insert(e.map_err(io_err("listing", d))?.file_name());
        }
    }
    Ok(names)
}

fn times(md: &Metadata) -> (TimeSpec, TimeSpec) {
    (
        TimeSpec::new(md.atime(), md.atime_nsec()),
        TimeSpec::new(md.mtime(), md.mtime_nsec()),
    )
}

/// Gives `dst` (a copy of `src`) the owner, mode and times of `md` (mode after owner: chown
/// clears setuid), and the owner a single-ID build recorded for `src` (see
/// [`super::OWNER_XATTR`]), as overlayfs' copy-up keeps it.
fn set_meta(src: &Path, dst: &Path, md: &Metadata) -> Result<(), LayerError> {
    std::os::unix::fs::lchown(dst, Some(md.uid()), Some(md.gid()))
        .map_err(io_err("changing the owner of", dst))?;
    if !md.file_type().is_symlink() {
        // Only files owned by the namespace's root can carry one.
        if md.uid() == 0
            && md.gid() == 0
            && let Ok(Some(owner)) = xattr::get(src, super::OWNER_XATTR)
        {
            xattr::set(dst, super::OWNER_XATTR, &owner)
                .map_err(io_err("copying the recorded owner (xattr) to", dst))?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(md.mode() & 0o7777))
            .map_err(io_err("changing the mode of", dst))?;
    }
    let (atime, mtime) = times(md);
    utimensat(
        nix::fcntl::AT_FDCWD,
        dst,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(nix_err("setting the times of", dst))
}

/// Copies one tree (or a single non-directory) from `src` to the new path `dst`, keeping owners,
/// modes, times and hardlinks (`links`: source (dev, ino) -> the first copy made). Directories
/// made are added to `made_dirs` when given.
fn copy_tree(
    src: &Path,
    md: &Metadata,
    dst: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
    mut made_dirs: Option<&mut HashSet<(u64, u64)>>,
    warnings: &mut Vec<String>,
) -> Result<(), LayerError> {
    let ft = md.file_type();
    if ft.is_dir() {
        fs::create_dir(dst).map_err(io_err("creating", dst))?;
        if let Some(made) = made_dirs.as_deref_mut() {
            let m = fs::symlink_metadata(dst).map_err(io_err("lstat", dst))?;
            made.insert((m.dev(), m.ino()));
        }
        let mut names: Vec<OsString> = Vec::new();
        for e in fs::read_dir(src).map_err(io_err("listing", src))? {
            names.push(e.map_err(io_err("listing", src))?.file_name());
        }
        for name in names {
            let s = src.join(&name);
            let m = fs::symlink_metadata(&s).map_err(io_err("lstat", &s))?;
            copy_tree(
                &s,
                &m,
                &dst.join(&name),
                links,
                made_dirs.as_deref_mut(),
                warnings,
            )?;
        }
        return set_meta(src, dst, md);
    }
    let key = (md.dev(), md.ino());
    if md.nlink() > 1
        && let Some(first) = links.get(&key)
    {
        return fs::hard_link(first, dst).map_err(io_err("hardlinking", dst));
    }
    if ft.is_file() {
        fs::copy(src, dst).map_err(io_err("copying", src))?;
    } else if ft.is_symlink() {
        let target = fs::read_link(src).map_err(io_err("readlink", src))?;
        std::os::unix::fs::symlink(&target, dst).map_err(io_err("creating", dst))?;
    } else if ft.is_fifo() {
        nix::unistd::mkfifo(dst, Mode::from_bits_truncate(0o600))
            .map_err(nix_err("creating", dst))?;
    } else if ft.is_char_device() || ft.is_block_device() {
        let kind = if ft.is_char_device() {
            SFlag::S_IFCHR
        } else {
            SFlag::S_IFBLK
        };
        if let Err(e) = mknod(dst, kind, Mode::from_bits_truncate(0o600), md.rdev()) {
            warnings.push(format!(
                "left out the device {}: {e} (devices cannot be made in a user namespace)",
                src.display()
            ));
            return Ok(());
        }
    } else {
        warnings.push(format!("left out {}: a socket", src.display()));
        return Ok(());
    }
    if md.nlink() > 1 {
        links.insert(key, dst.to_path_buf());
    }
    set_meta(src, dst, md)
}

/// Stacks `lowers` (unpacked layers in overlay form, topmost first) into the empty directory
/// `dest` as plain files: what the step's rootfs looks like through overlayfs. `clock_dir` is a
/// scratch directory outside `dest` used to read the filesystem's clock.
pub fn materialize(
    lowers: &[PathBuf],
    dest: &Path,
    clock_dir: &Path,
) -> Result<CopyMarks, LayerError> {
    stack_into(lowers, dest, CopyMarks::default(), clock_dir)
}

/// In-place execution: makes the running system's own `root` (`/`) what `lowers` stack to,
/// except for `kept`, which stays as it is. Everything else under `root` is removed first, then
/// the layers are copied in as [`materialize`] does; a directory that holds a kept path is not
/// removed but given the layers' contents and metadata around it (where the layers have no
/// directory there, it stays as it was, with a warning). [`diff_tree_to_upper`] with the marks
/// returned leaves the kept paths out of the comparison.
///
/// `clock_dir` must be on a filesystem whose timestamps are as fine as `root`'s (any local
/// Linux filesystem but FAT: they all take the kernel's clock at nanosecond granularity).
pub fn materialize_in_place(
    lowers: &[PathBuf],
    root: &Path,
    kept: Kept,
    clock_dir: &Path,
) -> Result<CopyMarks, LayerError> {
    clear_except(root, &kept)?;
    let marks = CopyMarks {
        kept,
        ..Default::default()
    };
    stack_into(lowers, root, marks, clock_dir)
}

/// Removes everything below `dir` but the kept paths and the directories leading to them. Never
/// crosses into a mount point: every mount point is kept (see [`Kept`]), and a directory above
/// one is entered rather than removed whole.
fn clear_except(dir: &Path, kept: &Kept) -> Result<(), LayerError> {
    let mut names: Vec<OsString> = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        names.push(e.map_err(io_err("listing", dir))?.file_name());
    }
    for name in names {
        let p = dir.join(&name);
        if kept.is_kept(&p) {
            continue;
        }
        let Some(md) = lstat(&p)? else { continue };
        if md.is_dir() && kept.holds_kept(&p) {
            clear_except(&p, kept)?;
        } else if md.is_dir() {
            fs::remove_dir_all(&p).map_err(io_err("removing", &p))?;
        } else {
            fs::remove_file(&p).map_err(io_err("removing", &p))?;
        }
    }
    Ok(())
}

/// The copy snapshotter's shortcut between steps: `dest` already is what the layers stack to
/// (the tree the previous step of the stage left, whose changes became the topmost layer), so
/// nothing is copied; only the inodes of its directories are noted (for filesystems without
/// birth times) and the clock is read, as [`materialize`] does after its copy.
pub fn adopt_tree(dest: &Path, clock_dir: &Path) -> Result<CopyMarks, LayerError> {
    fn note_dirs(dir: &Path, marks: &mut CopyMarks) -> Result<(), LayerError> {
        let m = fs::symlink_metadata(dir).map_err(io_err("lstat", dir))?;
        marks.dirs.insert((m.dev(), m.ino()));
        for e in fs::read_dir(dir).map_err(io_err("listing", dir))? {
            let e = e.map_err(io_err("listing", dir))?;
            if e.file_type().map_err(io_err("lstat", &e.path()))?.is_dir() {
                note_dirs(&e.path(), marks)?;
            }
        }
        Ok(())
    }
    let mut marks = CopyMarks::default();
    note_dirs(dest, &mut marks)?;
    marks.since = clock_after_now(clock_dir)?;
    Ok(marks)
}

fn stack_into(
    lowers: &[PathBuf],
    dest: &Path,
    mut marks: CopyMarks,
    clock_dir: &Path,
) -> Result<CopyMarks, LayerError> {
    let mut links = HashMap::new();
    let root_md = lowers
        .first()
        .map(|l| fs::symlink_metadata(l).map_err(io_err("lstat", l)))
        .transpose()?;
    let m = fs::symlink_metadata(dest).map_err(io_err("lstat", dest))?;
    marks.dirs.insert((m.dev(), m.ino()));
    copy_merged(lowers, dest, &mut links, &mut marks)?;
    if let (Some(md), Some(src)) = (root_md, lowers.first()) {
        set_meta(src, dest, &md)?;
    }
    marks.since = clock_after_now(clock_dir)?;
    Ok(marks)
}

fn copy_merged(
    dirs: &[PathBuf],
    dest: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
    marks: &mut CopyMarks,
) -> Result<(), LayerError> {
    for name in names_in(dirs)? {
        let dst = dest.join(&name);
        if marks.kept.is_kept(&dst) {
            continue;
        }
        // A directory left in place for something kept below it.
        let holder = marks.kept.holds_kept(&dst);
        match resolve(dirs, &name)? {
            (Lower::Absent, _) => {}
            (Lower::NonDir, Some(_)) if holder => marks.warnings.push(format!(
                "left out the image's {}: it is not a directory, and something below that path is kept (a mount point, shmocker's own files or --ignore-path)",
                dst.display()
            )),
            (Lower::NonDir, Some(src)) => {
                let md = fs::symlink_metadata(&src).map_err(io_err("lstat", &src))?;
                copy_tree(&src, &md, &dst, links, None, &mut marks.warnings)?;
            }
            (Lower::NonDir, None) => {}
            (Lower::Dir(ds, md), _) => {
                // A holder is still there, unless what it holds does not exist yet.
                if !holder || lstat(&dst)?.is_none() {
                    fs::create_dir(&dst).map_err(io_err("creating", &dst))?;
                }
                let m = fs::symlink_metadata(&dst).map_err(io_err("lstat", &dst))?;
                marks.dirs.insert((m.dev(), m.ino()));
                copy_merged(&ds, &dst, links, marks)?;
                // The topmost directory's metadata (and recorded owner) is what shows.
                if let Some(top) = ds.first() {
                    set_meta(top, &dst, &md)?;
                }
            }
        }
    }
    Ok(())
}

/// A ctime later than that of every change made so far: the filesystem's clock is coarse (a
/// kernel tick), so wait until a fresh file shows a later time than one made just before.
fn clock_after_now(dir: &Path) -> Result<(i64, i64), LayerError> {
    let stamp = |name: &str| -> Result<(i64, i64), LayerError> {
        let p = dir.join(name);
        let _ = fs::remove_file(&p);
        fs::write(&p, b"t").map_err(io_err("writing", &p))?;
        let m = fs::symlink_metadata(&p).map_err(io_err("lstat", &p))?;
        let _ = fs::remove_file(&p);
        Ok((m.ctime(), m.ctime_nsec()))
    };
    let first = stamp(".clock-1")?;
    for _ in 0..1000 {
        let next = stamp(".clock-2")?;
        if next > first {
            return Ok(next);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(LayerError::Io {
        op: "reading the clock of",
        path: dir.to_path_buf(),
        source: io::Error::other("file ctimes did not advance for a second"),
    })
}

/// Writes what changed in `merged` compared with `lowers` (see [`materialize`]) into the empty
/// directory `upper`, in kernel overlayfs form. Returns warnings (entries left out).
pub fn diff_tree_to_upper(
    lowers: &[PathBuf],
    merged: &Path,
    upper: &Path,
    marks: &CopyMarks,
) -> Result<Vec<String>, LayerError> {
    let mut d = TreeDiff {
        marks,
        links: HashMap::new(),
        warnings: Vec::new(),
    };
    d.dir(lowers, merged, upper)?;
    Ok(d.warnings)
}

struct TreeDiff<'a> {
    marks: &'a CopyMarks,
    links: HashMap<(u64, u64), PathBuf>,
    warnings: Vec<String>,
}

impl TreeDiff<'_> {
    fn touched(&self, md: &Metadata) -> bool {
        (md.ctime(), md.ctime_nsec()) >= self.marks.since
    }

    /// Whether a directory was made by the step rather than by [`materialize`]: by its birth
    /// time where the filesystem records one (an inode number may be reused by a directory
    /// removed and made again), else by its inode.
    fn made_by_step(&self, md: &Metadata) -> bool {
        match md.created() {
            Ok(born) => {
                let since = std::time::UNIX_EPOCH
                    + std::time::Duration::new(
                        self.marks.since.0.max(0) as u64,
                        self.marks.since.1.clamp(0, 999_999_999) as u32,
                    );
                born >= since
            }
            Err(_) => !self.marks.dirs.contains(&(md.dev(), md.ino())),
        }
    }

    /// Compares the directory `mdir` with its layers `dirs`; `udir` exists. Returns whether
    /// anything below changed.
    fn dir(&mut self, dirs: &[PathBuf], mdir: &Path, udir: &Path) -> Result<bool, LayerError> {
        let mut changed = false;
        let mut present = BTreeSet::new();
        let mut names: Vec<OsString> = Vec::new();
        for e in fs::read_dir(mdir).map_err(io_err("listing", mdir))? {
            names.push(e.map_err(io_err("listing", mdir))?.file_name());
        }
        names.sort();
        for name in names {
            let mp = mdir.join(&name);
            let up = udir.join(&name);
            if self.marks.kept.is_kept(&mp) {
                // Not the image's: left out, and not a whiteout either.
                present.insert(name);
                continue;
            }
            let holder = self.marks.kept.holds_kept(&mp);
            let md = fs::symlink_metadata(&mp).map_err(io_err("lstat", &mp))?;
            let (lower, _) = resolve(dirs, &name)?;
            present.insert(name);
            if holder && !(md.is_dir() && matches!(lower, Lower::Dir(..))) {
                // Left for what is kept below it, where the layers have no directory (see
                // `materialize_in_place`): only what the step made below it is the image's.
                if md.is_dir() {
                    fs::create_dir(&up).map_err(io_err("creating", &up))?;
                    if self.dir(&[], &mp, &up)? {
                        set_meta(&mp, &up, &md)?;
                        changed = true;
                    } else {
                        fs::remove_dir(&up).map_err(io_err("removing", &up))?;
                    }
                }
                continue;
            }
            if md.is_dir() {
                match lower {
                    Lower::Dir(ds, lmd) if holder || !self.made_by_step(&md) => {
                        fs::create_dir(&up).map_err(io_err("creating", &up))?;
                        let below = self.dir(&ds, &mp, &up)?;
                        let meta_changed = md.mode() != lmd.mode()
                            || md.uid() != lmd.uid()
                            || md.gid() != lmd.gid()
                            || (md.mtime(), md.mtime_nsec()) != (lmd.mtime(), lmd.mtime_nsec());
                        if below || meta_changed {
                            set_meta(&mp, &up, &md)?;
                            changed = true;
                        } else {
                            fs::remove_dir(&up).map_err(io_err("removing", &up))?;
                        }
                    }
                    other => {
                        copy_tree(&mp, &md, &up, &mut self.links, None, &mut self.warnings)?;
                        if !matches!(other, Lower::Absent) {
                            // Made where the layers have something else: overlayfs marks such a
                            // directory opaque, so nothing below it shows through.
                            let (atime, mtime) = times(&md);
                            xattr::set(&up, "user.overlay.opaque", b"y")
                                .map_err(io_err("marking opaque", &up))?;
                            utimensat(
                                nix::fcntl::AT_FDCWD,
                                &up,
                                &atime,
                                &mtime,
                                UtimensatFlags::NoFollowSymlink,
                            )
                            .map_err(nix_err("setting the times of", &up))?;
                        }
                        changed = true;
                    }
                }
            } else if !matches!(lower, Lower::NonDir) || self.touched(&md) {
                copy_tree(&mp, &md, &up, &mut self.links, None, &mut self.warnings)?;
                changed = true;
            }
        }
        for name in names_in(dirs)? {
            if present.contains(&name)
                || self.marks.kept.is_kept(&mdir.join(&name))
                || matches!(resolve(dirs, &name)?.0, Lower::Absent)
            {
                continue;
            }
            let up = udir.join(&name);
            make_whiteout(&up)?;
            changed = true;
        }
        Ok(changed)
    }
}

fn make_whiteout(p: &Path) -> Result<(), LayerError> {
    mknod(p, SFlag::S_IFCHR, Mode::empty(), 0).map_err(nix_err("creating the whiteout", p))
}

/// Rewrites an upper dir written by fuse-overlayfs into kernel overlayfs form, in place (see the
/// module docs). Directory times are kept.
///
/// fuse-overlayfs marks every directory it creates opaque; overlayfs only one made where the
/// layers (`lowers`, topmost first) have something, so the mark is kept only there.
pub fn normalize_fuse_upper(upper: &Path, lowers: &[PathBuf]) -> Result<(), LayerError> {
    let md = fs::symlink_metadata(upper).map_err(io_err("lstat", upper))?;
    normalize_dir(upper, &md, lowers, false)
}

const FUSE_OPAQUE_XATTR: &str = "user.fuseoverlayfs.opaque";

/// `lowers`: this directory in each layer where it shows through; `in_layers`: whether the
/// layers have anything at this path.
fn normalize_dir(
    dir: &Path,
    md: &Metadata,
    lowers: &[PathBuf],
    in_layers: bool,
) -> Result<(), LayerError> {
    let mut opaque = matches!(xattr::get(dir, FUSE_OPAQUE_XATTR), Ok(Some(v)) if v == b"y")
        || lstat(&dir.join(".wh..wh..opq"))?.is_some();
    let lowers: &[PathBuf] = if opaque { &[] } else { lowers };
    let mut edited = false;
    let mut names: Vec<OsString> = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        names.push(e.map_err(io_err("listing", dir))?.file_name());
    }
    for name in names {
        let p = dir.join(&name);
        let m = fs::symlink_metadata(&p).map_err(io_err("lstat", &p))?;
        let bytes = name.as_bytes();
        if bytes == b".wh..wh..opq" || bytes == b".wh..opq" {
            fs::remove_file(&p).map_err(io_err("removing", &p))?;
            opaque |= bytes == b".wh..wh..opq";
            edited = true;
        } else if let Some(hidden) = bytes.strip_prefix(b".wh.")
            && !m.is_dir()
        {
            fs::remove_file(&p).map_err(io_err("removing", &p))?;
            let target = dir.join(OsStr::from_bytes(hidden));
            if lstat(&target)?.is_none() {
                make_whiteout(&target)?;
            }
            edited = true;
        } else if m.is_dir() {
            let (below, present) = match resolve(lowers, &name)?.0 {
                Lower::Dir(ds, _) => (ds, true),
                Lower::NonDir => (Vec::new(), true),
                Lower::Absent => (Vec::new(), false),
            };
            normalize_dir(&p, &m, &below, present)?;
        }
    }
    if opaque {
        let _ = xattr::remove(dir, FUSE_OPAQUE_XATTR);
        if in_layers {
            xattr::set(dir, "user.overlay.opaque", b"y").map_err(io_err("marking opaque", dir))?;
        }
    }
    if edited || opaque {
        let (atime, mtime) = times(md);
        utimensat(
            nix::fcntl::AT_FDCWD,
            dir,
            &atime,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(nix_err("setting the times of", dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, text: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    /// Names below `dir`, relative, sorted ("name/" for directories).
    fn listing(dir: &Path) -> Vec<String> {
        fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(base).unwrap().display().to_string();
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    out.push(format!("{rel}/"));
                    walk(base, &p, out);
                } else {
                    out.push(rel);
                }
            }
        }
        let mut out = Vec::new();
        walk(dir, dir, &mut out);
        out.sort();
        out
    }

    #[test]
    fn in_place_replaces_all_but_the_kept_paths_and_leaves_them_out_of_the_diff() {
        let tmp = tempfile::tempdir().unwrap();
        let (layer, root, upper, clock) = (
            tmp.path().join("layer"),
            tmp.path().join("root"),
            tmp.path().join("upper"),
            tmp.path().join("clock"),
        );
        for d in [&upper, &clock] {
            fs::create_dir_all(d).unwrap();
        }
        // The image: /etc/passwd, its own /etc/hosts, /bin/sh, a file where a kept dir is.
        write(&layer.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n");
        write(&layer.join("etc/hosts"), "image hosts\n");
        write(&layer.join("bin/sh"), "image shell");
        write(&layer.join("work"), "the image's file at a kept path");
        write(
            &layer.join("data"),
            "the image's file where a kept path needs a directory",
        );
        write(&layer.join("run/x"), "image run");
        // The running system: a kept file in /etc, a kept tree, a kept path below a directory
        // the image does not have, and things the image does not have.
        write(&root.join("etc/hosts"), "runtime hosts\n");
        write(&root.join("etc/old.conf"), "system file");
        write(&root.join("work/ctx/Dockerfile"), "FROM x");
        write(&root.join("data/secrets/token"), "s3cret");
        write(&root.join("usr/bin/tool"), "system tool");
        write(
            &layer.join("sys/x"),
            "the image's /sys, where the system has none",
        );
        let kept = Kept::new([
            root.join("etc/hosts"),
            root.join("work"),
            root.join("data/secrets/"),
            root.join("sys"),
        ]);

        let marks =
            materialize_in_place(std::slice::from_ref(&layer), &root, kept, &clock).unwrap();
        assert_eq!(
            listing(&root),
            [
                "bin/",
                "bin/sh",
                "data/",
                "data/secrets/",
                "data/secrets/token",
                "etc/",
                "etc/hosts",
                "etc/passwd",
                "run/",
                "run/x",
                "work/",
                "work/ctx/",
                "work/ctx/Dockerfile",
            ]
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "runtime hosts\n"
        );
        assert!(
            marks.warnings.len() == 1 && marks.warnings[0].contains("data: it is not a directory"),
            "{:?}",
            marks.warnings
        );

        // The step: adds a file, changes a kept one, removes one of the image's, writes below
        // a kept directory.
        write(&root.join("etc/new"), "made by the step");
        write(&root.join("etc/hosts"), "changed at run time\n");
        write(&root.join("work/ctx/out"), "in the context");
        write(&root.join("data/secrets/more"), "x");
        write(
            &root.join("data/made"),
            "below a kept path's parent, which the image lacks",
        );
        fs::remove_file(root.join("bin/sh")).unwrap();

        diff_tree_to_upper(&[layer], &root, &upper, &marks).unwrap();
        assert_eq!(
            listing(&upper),
            ["bin/", "bin/sh", "data/", "data/made", "etc/", "etc/new"]
        );
        assert!(is_whiteout(
            &fs::symlink_metadata(upper.join("bin/sh")).unwrap()
        ));
    }
}
