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
//! [`plan`] takes only COPYs whose result it can tell without looking at the image's files
//! beyond one name: from the context (no `--from`, no archives to unpack), into a directory
//! whose top-level name no layer below has (or `--link`), with numeric or no `--chown`, and
//! items that cannot meet (no two with the same path, every parent an item of its own). The
//! entries are what the sandbox's copy (`sandbox::rootfs::copy_into`) leaves in the upper
//! directory: the destination and its missing parents as directories with mode 0755 owned by
//! the `--chown` owner, then every item with its source's mode (or `--chmod`), that owner and
//! its source's mtime. Anything else goes the usual way, which also gives the usual errors.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::layer::{ListedEntry, ListedKind};
use crate::sandbox::CopySpec;
use crate::sandbox::helper::id_mapped;
use crate::sandbox::rootfs::chmod_mode;

/// The layer's entries for `copy` on top of `lowers` (snapshot directories, any order), or
/// `None` when the COPY is not of the kind described in the module doc. `now`: the mtime of
/// the directories the COPY creates (seconds since the epoch).
pub(super) fn plan(copy: &CopySpec, lowers: &[PathBuf], now: i64) -> Option<Vec<ListedEntry>> {
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
    let top = dest.first()?;
    let mut whiteout = b".wh.".to_vec();
    whiteout.extend_from_slice(top.as_bytes());
    let whiteout = std::ffi::OsStr::from_bytes(&whiteout);
    for lower in lowers {
        for name in [*top, whiteout] {
            match fs::symlink_metadata(lower.join(name)) {
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                _ => return None,
            }
        }
        // A snapshot that is not there could hide the name: the usual way unpacks it.
        if !lower.is_dir() {
            return None;
        }
    }
    let dest_path: PathBuf = dest.iter().collect();
    let mut entries: Vec<ListedEntry> = dest
        .iter()
        .scan(PathBuf::new(), |path, c| {
            path.push(c);
            Some(path.clone())
        })
        .map(|path| ListedEntry {
            path,
            kind: ListedKind::Dir,
            mode: 0o755,
            uid,
            gid,
            mtime: now,
        })
        .collect();
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
    Some(entries)
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
        let entries = plan(&ok, &lowers, 7).expect("a plain COPY is planned");
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

        // The destination's top-level name is in a layer below, or whited out there.
        assert!(plan(&spec(ctx.path(), "/etc/app/", &["d"]), &lowers, 7).is_none());
        assert!(plan(&spec(ctx.path(), "/gone/", &["d"]), &lowers, 7).is_none());
        // ... unless the COPY is --link (no layers below).
        assert!(plan(&spec(ctx.path(), "/etc/app/", &["d"]), &[], 7).is_some());
        // A missing snapshot cannot be looked into.
        assert!(plan(&ok, &[lower.path().join("missing")], 7).is_none());
        // Names the layer format keeps for whiteouts, in the items or the destination.
        fs::write(ctx.path().join("d/.wh.x"), "").unwrap();
        assert!(plan(&spec(ctx.path(), "/data/", &["d", "d/.wh.x"]), &lowers, 7).is_none());
        assert!(plan(&spec(ctx.path(), "/.wh.data/", &["d"]), &lowers, 7).is_none());
        // Two items with one path, a file without its directory, a name to look up.
        assert!(plan(&spec(ctx.path(), "/data/", &["d", "d"]), &lowers, 7).is_none());
        assert!(plan(&spec(ctx.path(), "/data/", &["d/f"]), &lowers, 7).is_none());
        let mut named = spec(ctx.path(), "/data/", &["d"]);
        named.chown = Some("app".into());
        assert!(plan(&named, &lowers, 7).is_none());
        let mut numeric = spec(ctx.path(), "/data/", &["d", "d/f"]);
        numeric.chown = Some("0:0".into());
        numeric.chmod = Some("0640".into());
        let e = plan(&numeric, &lowers, 7).unwrap();
        assert_eq!(e.last().unwrap().mode, 0o640);
        let mut single = spec(ctx.path(), "/data/x", &["d/f"]);
        single.dest_is_dir = false;
        assert!(plan(&single, &lowers, 7).is_none());
    }
}
