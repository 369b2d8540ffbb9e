//! A COPY's layer written straight from the build context.
//!
//! A COPY normally runs in the sandbox: its files are copied into the step's upper directory,
//! which then becomes the layer and the snapshot later steps stack on. When nothing reads the
//! step's files afterwards (the last such step of the target stage; `StageState::tree_unused_after`),
//! copying them only to read them back is waste: for a COPY of many small files, creating the
//! inodes costs more than compressing the layer. [`plan`] lists the layer's entries instead,
//! and `layer::entries_to_blob` writes them. If a later build does need the files, the snapshot
//! is unpacked from the layer then.
//!
//! [`plan`] takes only COPYs whose result it can tell from the context and a few lookups in the
//! snapshots below: from the context (no `--from`, no archives to unpack), into a directory,
//! with no or a numeric `--chown` that the user namespace maps, items that cannot meet (no two
//! with the same path, every parent an item of its own, no `.wh.` name), and below it only
//! plain directories of the image (no symlink, file, whiteout or opaque directory on the way;
//! none at all in single-ID builds, whose owners live in an xattr). The entries are what the
//! sandbox's copy (`sandbox::rootfs::copy_into`) leaves in overlayfs's upper directory: the
//! destination's missing parents as directories with mode 0755 owned by the `--chown` owner,
//! the ones the image has as copied up (their own metadata, their mtime kept, but the deepest,
//! which gets new entries, now), then every item with its source's mode (or `--chmod`), that
//! owner and its source's mtime. A file where the image has a directory is left to the
//! sandbox, which refuses it. Anything else goes the usual way, which also gives the usual
//! errors.

use std::collections::HashSet;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::layer::{ListedEntry, ListedKind};
use crate::sandbox::CopySpec;
use crate::sandbox::helper::id_mapped;
use crate::sandbox::rootfs::chmod_mode;

/// The layer's entries for `copy` on top of `lowers` (snapshot directories, bottom first), or
/// `None` when the COPY is not of the kind described in the module doc. `now`: the mtime of
/// the directories the COPY creates or adds to (seconds since the epoch). `recorded_owners`:
/// the build keeps owners in an xattr (single-ID builds).
pub(super) fn plan(
    copy: &CopySpec,
    lowers: &[PathBuf],
    now: i64,
    recorded_owners: bool,
) -> Option<Vec<ListedEntry>> {
    if copy.from.is_some() || !copy.archives.is_empty() || !copy.dest_is_dir {
        return None;
    }
    let (uid, gid) = match &copy.chown {
        None => (0, 0),
        Some(spec) => {
            let (u, g) = match spec.split_once(':') {
                Some((u, g)) => (u.parse().ok()?, g.parse().ok()?),
                None => {
                    let u: u32 = spec.parse().ok()?;
                    (u, u)
                }
            };
            // An ID the namespace cannot hold fails in the sandbox, with its explanation.
            if !id_mapped(u, "uid_map") || !id_mapped(g, "gid_map") {
                return None;
            }
            (u, g)
        }
    };
    let dest = plain_components(Path::new(copy.dest.trim_start_matches('/')))?;
    if dest.iter().any(|c| is_whiteout_name(c)) {
        return None;
    }
    // The layers below, topmost first; one that is not unpacked could hide anything.
    let view = Lowers::new(lowers)?;
    let dest_path: PathBuf = dest.iter().collect();
    // The destination and its parents, as the sandbox's copy leaves them in the upper
    // directory: a missing one made (0755, the owner, now); one the image has copied up with
    // its own metadata, its mtime kept (overlayfs restores a parent's times after a copy-up)
    // unless an entry right in it is made (below).
    let mut existing = Vec::new();
    let mut prefix = PathBuf::new();
    for c in &dest {
        prefix.push(c);
        existing.push(match view.kind(&prefix)? {
            Seen::Absent => None,
            Seen::Dir(m) if existing.last().is_none_or(Option::is_some) => Some(m),
            _ => return None,
        });
    }
    // `/` is there too, though never an entry of a layer.
    let base_exists = dest.is_empty() || existing.last().is_some_and(Option::is_some);
    if recorded_owners && (dest.is_empty() || existing.iter().any(Option::is_some)) {
        // Single-ID builds keep owners in an xattr; not worth reading here.
        return None;
    }
    let mut entries = Vec::new();
    let mut prefix = PathBuf::new();
    for (c, found) in dest.iter().zip(&existing) {
        prefix.push(c);
        entries.push(match found {
            Some(m) => ListedEntry {
                path: prefix.clone(),
                kind: ListedKind::Dir,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: m.mtime(),
            },
            None => ListedEntry {
                path: prefix.clone(),
                kind: ListedKind::Dir,
                mode: 0o755,
                uid,
                gid,
                mtime: now,
            },
        });
    }
    // Whether the COPY creates or replaces something right in an existing destination: only
    // then does the destination get a new mtime (a changed entry below it, or its own owner
    // and mode, leave it alone).
    let mut base_touched = false;
    let mut seen: HashSet<PathBuf> = HashSet::new();
    let mut dirs: HashSet<PathBuf> = HashSet::new();
    for item in &copy.items {
        let rel = plain_components(&item.rel)?;
        // A name the layer format reserves for whiteouts: the usual way refuses it, saying so.
        if rel.iter().any(|c| is_whiteout_name(c)) {
            return None;
        }
        let rel: PathBuf = rel.iter().collect();
        let meta = fs::symlink_metadata(&item.src).ok()?;
        let ft = meta.file_type();
        if rel.as_os_str().is_empty() {
            // A directory source itself: the destination keeps its own metadata.
            if !ft.is_dir() {
                return None;
            }
            continue;
        }
        if !seen.insert(rel.clone()) {
            return None;
        }
        let src_mode = meta.mode() & 0o7777;
        let mode = match &copy.chmod {
            Some(c) if !ft.is_symlink() => chmod_mode(c, src_mode, ft.is_dir()).ok()?,
            _ => src_mode,
        };
        // What the image has there is replaced, but a directory only by a directory (the
        // sandbox refuses the rest), and a file or symlink by a directory only in the sandbox
        // (whose upper directory then gets an opaque one).
        if base_exists {
            let there = view.kind(&dest_path.join(&rel))?;
            match there {
                Seen::Dir(_) if !ft.is_dir() => return None,
                Seen::Other if ft.is_dir() => return None,
                _ => {}
            }
            if rel.components().count() == 1 && !matches!(there, Seen::Dir(_)) {
                base_touched = true;
            }
        }
        let kind = if ft.is_dir() {
            dirs.insert(rel.clone());
            ListedKind::Dir
        } else if ft.is_file() {
            ListedKind::File {
                src: item.src.clone(),
            }
        } else if ft.is_symlink() {
            ListedKind::Symlink {
                target: fs::read_link(&item.src).ok()?,
            }
        } else {
            return None;
        };
        entries.push(ListedEntry {
            path: dest_path.join(&rel),
            kind,
            mode,
            uid,
            gid,
            mtime: meta.mtime(),
        });
    }
    // `COPY --parents` names files whose directories are not items: the sandbox makes those.
    let orphan = seen.iter().any(|rel| {
        rel.parent()
            .is_some_and(|p| !p.as_os_str().is_empty() && !dirs.contains(p))
    });
    if orphan {
        return None;
    }
    if base_exists && !dest.is_empty() && seen.is_empty() {
        return None; // nothing to copy: the sandbox makes no layer
    }
    // The deepest directory the image has gets an entry made right in it: the destination's
    // first missing part, or, if the destination exists, what the COPY touched there.
    if let Some(deepest) = existing.iter().rposition(Option::is_some)
        && (deepest + 1 < dest.len() || base_touched)
    {
        entries[deepest].mtime = now;
    }
    Some(entries)
}

/// The image's files below the COPY, looked up the way overlayfs merges the snapshots.
struct Lowers<'a> {
    /// The snapshot directories, topmost first, each with an open descriptor.
    layers: Vec<(&'a Path, fs::File)>,
}

/// What the image has at a path.
enum Seen {
    Absent,
    /// A directory, with the metadata of its topmost copy.
    Dir(fs::Metadata),
    /// Anything else: a file, a symlink, a whiteout.
    Other,
}

impl<'a> Lowers<'a> {
    fn new(lowers: &'a [PathBuf]) -> Option<Self> {
        let layers = lowers
            .iter()
            .rev()
            .map(|l| fs::File::open(l).ok().map(|dir| (l.as_path(), dir)))
            .collect::<Option<Vec<_>>>()?;
        Some(Lowers { layers })
    }

    /// What the image shows at `path` (relative, plain names), as overlayfs looks it up: the
    /// topmost layer's entry there, where a layer with anything but a directory there, or on
    /// the way there, hides the layers below it. `None` for what this module does not take on:
    /// a `.wh.` whiteout file, or an opaque directory (the layers below it hidden).
    fn kind(&self, path: &Path) -> Option<Seen> {
        let mut whiteout = b".wh.".to_vec();
        whiteout.extend_from_slice(path.file_name()?.as_bytes());
        let whiteout = path.with_file_name(std::ffi::OsStr::from_bytes(&whiteout));
        let mut seen = Seen::Absent;
        for (root, dir) in &self.layers {
            match entry(dir, &whiteout) {
                Entry::Absent | Entry::Hidden => {}
                Entry::Found(_) | Entry::Unknown => return None,
            }
            let m = match entry(dir, path) {
                Entry::Found(m) => m,
                Entry::Absent => continue,
                // A file or symlink on the way: nothing of `path` in this layer or below.
                Entry::Hidden => break,
                Entry::Unknown => return None,
            };
            if m.is_dir() && is_opaque(&root.join(path)) {
                return None;
            }
            if !m.is_dir() {
                if matches!(seen, Seen::Absent) {
                    seen = Seen::Other;
                }
                break;
            }
            if matches!(seen, Seen::Absent) {
                seen = Seen::Dir(m);
            }
        }
        Some(seen)
    }
}

enum Entry {
    Found(fs::Metadata),
    Absent,
    /// Something on the way is not a directory.
    Hidden,
    Unknown,
}

/// `path` below the layer directory `dir`, looked up without following any symlink (one in the
/// layer leads nowhere in the image, and must not lead into the host): the entry itself, as
/// lstat(2) sees it.
fn entry(dir: &fs::File, path: &Path) -> Entry {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
    match openat2(dir, path, how) {
        Ok(fd) => {
            let file = fs::File::from(fd);
            match file.metadata() {
                Ok(m) => Entry::Found(m),
                Err(_) => Entry::Unknown,
            }
        }
        Err(nix::errno::Errno::ENOENT) => Entry::Absent,
        Err(nix::errno::Errno::ENOTDIR | nix::errno::Errno::ELOOP) => Entry::Hidden,
        Err(_) => Entry::Unknown,
    }
}

fn is_opaque(dir: &Path) -> bool {
    ["user.overlay.opaque", "trusted.overlay.opaque"]
        .iter()
        .any(|name| xattr::get(dir, name).ok().flatten().is_some())
}

fn is_whiteout_name(name: &std::ffi::OsStr) -> bool {
    name.as_bytes().starts_with(b".wh.")
}

/// `path`'s components if every one is a plain name (none for an empty path).
fn plain_components(path: &Path) -> Option<Vec<&std::ffi::OsStr>> {
    path.components()
        .map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::CopyItem;

    fn spec(dir: &Path, dest: &str, items: &[&str]) -> CopySpec {
        CopySpec {
            items: items
                .iter()
                .map(|rel| CopyItem {
                    src: dir.join(rel),
                    rel: PathBuf::from(rel),
                })
                .collect(),
            dest: dest.into(),
            dest_is_dir: true,
            chown: None,
            chmod: None,
            from: None,
            link: false,
            archives: vec![],
        }
    }

    #[test]
    fn plans_only_copies_it_can_tell() {
        let ctx = tempfile::tempdir().unwrap();
        fs::create_dir(ctx.path().join("d")).unwrap();
        fs::write(ctx.path().join("d/f"), "x").unwrap();
        std::os::unix::fs::symlink("f", ctx.path().join("d/l")).unwrap();
        let lower = tempfile::tempdir().unwrap();
        fs::create_dir(lower.path().join("etc")).unwrap();
        fs::write(lower.path().join(".wh.gone"), "").unwrap();
        let lowers = [lower.path().to_path_buf()];

        let ok = spec(ctx.path(), "/data/sub/", &["", "d", "d/f", "d/l"]);
        let entries = plan(&ok, &lowers, 7, false).expect("a plain COPY is planned");
        let listed: Vec<String> = entries
            .iter()
            .map(|e| format!("{} {:o} {}", e.path.display(), e.mode, e.mtime == 7))
            .collect();
        assert_eq!(
            listed[..2],
            ["data 755 true".to_string(), "data/sub 755 true".to_string()]
        );
        assert_eq!(entries.len(), 5, "{listed:?}");
        assert!(
            matches!(&entries[4].kind, ListedKind::Symlink { target } if target == Path::new("f"))
        );

        // Into a directory of the image: it is listed with its own metadata and a new mtime.
        let into = plan(&spec(ctx.path(), "/etc/app/", &["d"]), &lowers, 7, false).unwrap();
        let etc = fs::metadata(lower.path().join("etc")).unwrap();
        assert_eq!(
            (
                into[0].path.as_path(),
                into[0].mode,
                into[0].uid,
                into[0].mtime
            ),
            (Path::new("etc"), etc.mode() & 0o7777, etc.uid(), 7)
        );
        // ... but not in a single-ID build, nor below a whiteout, a file or an opaque directory.
        assert!(plan(&spec(ctx.path(), "/etc/app/", &["d"]), &lowers, 7, true).is_none());
        assert!(plan(&spec(ctx.path(), "/gone/", &["d"]), &lowers, 7, false).is_none());
        fs::write(lower.path().join("file"), "").unwrap();
        assert!(plan(&spec(ctx.path(), "/file/x/", &["d"]), &lowers, 7, false).is_none());
        fs::create_dir(lower.path().join("opq")).unwrap();
        xattr::set(lower.path().join("opq"), "user.overlay.opaque", b"y").unwrap();
        assert!(plan(&spec(ctx.path(), "/opq/x/", &["d"]), &lowers, 7, false).is_none());
        // A file of the COPY where the image has a directory (the sandbox's error); where the
        // image has a file, the file is replaced.
        fs::create_dir_all(lower.path().join("etc/app/f")).unwrap();
        fs::write(lower.path().join("etc/app/g"), "old").unwrap();
        fs::write(ctx.path().join("f"), "").unwrap();
        fs::write(ctx.path().join("g"), "").unwrap();
        assert!(plan(&spec(ctx.path(), "/etc/app/", &["f"]), &lowers, 7, false).is_none());
        assert!(plan(&spec(ctx.path(), "/etc/app/", &["g"]), &lowers, 7, false).is_some());
        // Into `/`, the same checks (a file over the image's /etc is refused).
        fs::write(ctx.path().join("etc"), "").unwrap();
        assert!(plan(&spec(ctx.path(), "/", &["etc"]), &lowers, 7, false).is_none());
        assert!(plan(&spec(ctx.path(), "/", &["g"]), &lowers, 7, true).is_none());
        // A directory over the image's file (the sandbox's would be opaque).
        let files = tempfile::tempdir().unwrap();
        fs::write(files.path().join("d"), "").unwrap();
        let with_file = [files.path().to_path_buf()];
        assert!(plan(&spec(ctx.path(), "/", &["d", "d/f"]), &with_file, 7, false).is_none());
        assert!(plan(&spec(ctx.path(), "/", &["g"]), &with_file, 7, false).is_some());
        // Only existing directories changed in an existing destination: its mtime stays.
        fs::create_dir_all(lower.path().join("srv/d")).unwrap();
        let srv = fs::metadata(lower.path().join("srv")).unwrap().mtime();
        let kept = plan(&spec(ctx.path(), "/srv/", &["d"]), &lowers, 7, false).unwrap();
        assert_eq!(
            (kept[0].path.as_path(), kept[0].mtime),
            (Path::new("srv"), srv)
        );
        // ... and nothing to copy makes no layer.
        assert!(plan(&spec(ctx.path(), "/srv/", &[""]), &lowers, 7, false).is_none());
        // A symlink in a layer is never followed: /lnk/x is not there.
        std::os::unix::fs::symlink("/etc", lower.path().join("lnk")).unwrap();
        assert!(plan(&spec(ctx.path(), "/lnk/x/", &["d"]), &lowers, 7, false).is_none());
        // --link: no layers below.
        assert!(plan(&spec(ctx.path(), "/gone/", &["d"]), &[], 7, false).is_some());
        // A missing snapshot cannot be looked into.
        assert!(plan(&ok, &[lower.path().join("missing")], 7, false).is_none());
        // Names the layer format keeps for whiteouts, in the items or the destination.
        fs::write(ctx.path().join("d/.wh.x"), "").unwrap();
        assert!(
            plan(
                &spec(ctx.path(), "/data/", &["d", "d/.wh.x"]),
                &lowers,
                7,
                false
            )
            .is_none()
        );
        assert!(plan(&spec(ctx.path(), "/.wh.data/", &["d"]), &lowers, 7, false).is_none());
        // Two items with one path, a file without its directory, a name to look up.
        assert!(plan(&spec(ctx.path(), "/data/", &["d", "d"]), &lowers, 7, false).is_none());
        assert!(plan(&spec(ctx.path(), "/data/", &["d/f"]), &lowers, 7, false).is_none());
        let mut named = spec(ctx.path(), "/data/", &["d"]);
        named.chown = Some("app".into());
        assert!(plan(&named, &lowers, 7, false).is_none());
        let mut numeric = spec(ctx.path(), "/data/", &["d", "d/f"]);
        numeric.chown = Some("0:0".into());
        numeric.chmod = Some("0640".into());
        let e = plan(&numeric, &lowers, 7, false).unwrap();
        assert_eq!(e.last().unwrap().mode, 0o640);
        let mut single = spec(ctx.path(), "/data/x", &["d/f"]);
        single.dest_is_dir = false;
        assert!(plan(&single, &lowers, 7, false).is_none());
    }
}
