//! File work inside a step's rootfs that needs no namespace of its own: resolving paths the way
//! the container will see them, looking up users, copying files in for COPY, making WORKDIRs.
//!
//! Every path is resolved with [`resolve_in_root`], which follows symlinks as if `root` were `/`,
//! so a symlink in an image (`/app -> /etc`, or `../../..`) can never send a write outside the
//! rootfs.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{AT_FDCWD, AtFlags};
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat};

use super::{CopySpec, SandboxError};

const MAX_SYMLINKS: usize = 40;

/// Resolves `path` (absolute or relative to `/`) inside `root`, following symlinks as the
/// container would: absolute targets restart at `root`, `..` never climbs above it. The last
/// component is followed too when it is a symlink and `follow_last` is set. Missing components
/// are kept as they are (the result may not exist yet).
pub fn resolve_in_root(
    root: &Path,
    path: &str,
    follow_last: bool,
) -> Result<PathBuf, SandboxError> {
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = components(Path::new(path));
    pending.reverse();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&part);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() && (!is_last || follow_last) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(SandboxError::Setup(format!(
                        "too many levels of symbolic links resolving {path}"
                    )));
                }
                let target =
                    fs::read_link(&candidate).map_err(|e| SandboxError::io(&candidate, e))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => resolved.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

fn components(p: &Path) -> Vec<std::ffi::OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// A user as the container sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub home: Option<String>,
    pub groups: Vec<u32>,
}

/// Resolves a Dockerfile `USER` value (`name`, `uid`, `name:group`, `uid:gid`) against the
/// rootfs' /etc/passwd and /etc/group, as runc does for a container's user.
pub fn resolve_user(root: &Path, spec: &str) -> Result<ResolvedUser, SandboxError> {
    if spec.is_empty() {
        return Ok(ResolvedUser {
            uid: 0,
            gid: 0,
            home: Some("/root".into()),
            groups: vec![],
        });
    }
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_db(root, "/etc/passwd");
    let groups_db = read_db(root, "/etc/group");
    let entry = passwd.iter().find(|f| {
        f.first().map(String::as_str) == Some(user) || (f.get(2).map(String::as_str) == Some(user))
    });
    let (uid, mut gid, home, name) = match (user.parse::<u32>(), entry) {
        (Ok(uid), e) => (
            uid,
            e.and_then(|f| f.get(3)?.parse().ok()).unwrap_or(0),
            e.and_then(|f| f.get(5).cloned()),
            e.and_then(|f| f.first().cloned()),
        ),
        (Err(_), Some(f)) => (
            f.get(2)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad_db("passwd", user))?,
            f.get(3).and_then(|s| s.parse().ok()).unwrap_or(0),
            f.get(5).cloned(),
            Some(user.to_string()),
        ),
        (Err(_), None) => {
            return Err(SandboxError::Setup(format!(
                "unable to find user {user}: no matching entries in the image's /etc/passwd; create the user in an earlier RUN step or use a numeric uid"
            )));
        }
    };
    let mut groups = vec![];
    if let Some(group) = group {
        gid = lookup_group(&groups_db, group)?;
    } else if let Some(name) = &name {
        groups = groups_db
            .iter()
            .filter(|f| {
                f.get(3)
                    .is_some_and(|members| members.split(',').any(|m| m == name))
            })
            .filter_map(|f| f.get(2)?.parse().ok())
            .filter(|g| *g != gid)
            .collect();
    }
    Ok(ResolvedUser {
        uid,
        gid,
        home,
        groups,
    })
}

/// Resolves `--chown=user[:group]` as BuildKit does: names through the image's databases; a
/// user without a group gets the user's primary group (or the same number for a numeric uid).
pub fn resolve_chown(root: &Path, spec: &str) -> Result<(u32, u32), SandboxError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_db(root, "/etc/passwd");
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => {
            let f = passwd
                .iter()
                .find(|f| f.first().map(String::as_str) == Some(user))
                .ok_or_else(|| {
                    SandboxError::Setup(format!(
                        "--chown={spec}: unable to find user {user} in the image's /etc/passwd"
                    ))
                })?;
            (
                f.get(2)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad_db("passwd", user))?,
                f.get(3).and_then(|s| s.parse().ok()).unwrap_or(0),
            )
        }
    };
    let gid = match group {
        Some(g) => lookup_group(&read_db(root, "/etc/group"), g)?,
        None => primary,
    };
    Ok((uid, gid))
}

fn lookup_group(db: &[Vec<String>], group: &str) -> Result<u32, SandboxError> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    db.iter()
        .find(|f| f.first().map(String::as_str) == Some(group))
        .and_then(|f| f.get(2)?.parse().ok())
        .ok_or_else(|| {
            SandboxError::Setup(format!(
                "unable to find group {group}: no matching entries in the image's /etc/group"
            ))
        })
}

fn bad_db(db: &str, name: &str) -> SandboxError {
    SandboxError::Setup(format!("malformed /etc/{db} entry for {name}"))
}

fn read_db(root: &Path, path: &str) -> Vec<Vec<String>> {
    let Ok(p) = resolve_in_root(root, path, true) else {
        return vec![];
    };
    fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect()
}

/// `mkdir -p` inside the rootfs; new directories get mode 0755 and the given owner.
pub fn mkdir_all(root: &Path, path: &str, owner: (u32, u32)) -> Result<PathBuf, SandboxError> {
    let mut current = String::new();
    for part in components(Path::new(path)) {
        current.push('/');
        current.push_str(&part.to_string_lossy());
        let p = resolve_in_root(root, &current, true)?;
        match fs::metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(SandboxError::Setup(format!(
                    "cannot create directory {current}: a file of that name exists in the image"
                )));
            }
            Err(_) => {
                fs::create_dir(&p).map_err(|e| SandboxError::io(&p, e))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                    .map_err(|e| SandboxError::io(&p, e))?;
                chown(&p, owner)?;
            }
        }
    }
    resolve_in_root(root, path, true)
}

fn chown(p: &Path, (uid, gid): (u32, u32)) -> Result<(), SandboxError> {
    fchownat(
        AT_FDCWD,
        p,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| {
        SandboxError::Setup(format!(
            "cannot chown {} to {uid}:{gid}: {e}{}",
            p.display(),
            if e == nix::errno::Errno::EINVAL {
                " (that ID is not mapped in this build's user namespace; give the user a subordinate ID range)"
            } else {
                ""
            }
        ))
    })
}

fn set_mtime(p: &Path, meta: &fs::Metadata) -> Result<(), SandboxError> {
    let t = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(AT_FDCWD, p, &t, &t, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| SandboxError::sys(format!("setting mtime of {}", p.display()), e))
}

/// Copies the COPY step's files into the rootfs at `root`.
pub fn copy_into(root: &Path, spec: &CopySpec) -> Result<(), SandboxError> {
    let owner = match &spec.chown {
        Some(c) => resolve_chown(root, c)?,
        None => (0, 0),
    };
    let dest_is_dir = spec.dest_is_dir || {
        let p = resolve_in_root(root, &spec.dest, true)?;
        fs::metadata(&p).map(|m| m.is_dir()).unwrap_or(false)
    };
    let base = if dest_is_dir {
        mkdir_all(root, &spec.dest, owner)?
    } else {
        let parent = Path::new(&spec.dest)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into());
        mkdir_all(root, &parent, owner)?;
        resolve_in_root(root, &spec.dest, false)?
    };
    // Directory mtimes are set last, deepest first, since writing into a directory changes it.
    let mut dir_times = Vec::new();
    // Regular files are copied by a few threads at once (creating inodes is most of a big
    // COPY's time, and a filesystem creates them in parallel across directories); everything
    // else happens in order here. A queued file's target does not exist yet, so before an item
    // touches a queued target, or a path below one, the queue is emptied: the result is the
    // same as copying one item after the other.
    let mut queue = FileQueue::default();
    let copied = copy_items(
        root,
        spec,
        owner,
        dest_is_dir,
        &base,
        &mut queue,
        &mut dir_times,
    );
    // Files queued before a failing item come first, as if copied one after the other.
    queue.run(spec, owner)?;
    copied?;
    for (dir, meta) in dir_times.iter().rev() {
        set_mtime(dir, meta)?;
    }
    Ok(())
}

/// The loop of [`copy_into`]: every item but the regular files, which go to `queue`.
fn copy_items<'a>(
    root: &Path,
    spec: &'a CopySpec,
    owner: (u32, u32),
    dest_is_dir: bool,
    base: &Path,
    queue: &mut FileQueue<'a>,
    dir_times: &mut Vec<(PathBuf, fs::Metadata)>,
) -> Result<(), SandboxError> {
    // An item's directory is resolved from the rootfs's `/`, as the container sees it: a
    // symlink in the image below the destination (`/app/config -> /etc/app`) leads where it
    // points, never out of the rootfs.
    let base_in_root = Path::new("/").join(base.strip_prefix(root).unwrap_or(Path::new("")));
    let resolve_dir =
        |p: &Path| resolve_in_root(root, &base_in_root.join(p).to_string_lossy(), true);
    for item in &spec.items {
        let target = if !dest_is_dir || item.rel.as_os_str().is_empty() {
            base.to_path_buf()
        } else {
            // `rel` comes from our own walk of the context: plain components only.
            let parent = match item.rel.parent() {
                Some(p) if !p.as_os_str().is_empty() => {
                    let mut dir = resolve_dir(p)?;
                    if queue.touches(&dir, root) {
                        queue.run(spec, owner)?;
                        dir = resolve_dir(p)?;
                    }
                    if !dir.exists() {
                        // `COPY --parents` names files whose directories are not items.
                        let rel = dir.strip_prefix(root).unwrap_or(&dir);
                        mkdir_all(root, &format!("/{}", rel.display()), owner)?;
                    }
                    if !dir.starts_with(root) {
                        return Err(SandboxError::Setup(format!(
                            "COPY destination {} leaves the image's filesystem",
                            dir.display()
                        )));
                    }
                    dir
                }
                _ => base.to_path_buf(),
            };
            parent.join(item.rel.file_name().unwrap_or(OsStr::new("")))
        };
        if queue.touches(&target, root) {
            queue.run(spec, owner)?;
        }
        let meta = fs::symlink_metadata(&item.src).map_err(|e| SandboxError::io(&item.src, e))?;
        let existing = fs::symlink_metadata(&target).ok();
        if meta.is_dir() {
            match existing {
                Some(m) if m.is_dir() => {
                    if item.rel.as_os_str().is_empty() {
                        continue; // the destination directory itself keeps its metadata
                    }
                }
                Some(_) => {
                    remove_any(&target)?;
                    fs::create_dir(&target).map_err(|e| SandboxError::io(&target, e))?;
                }
                None => fs::create_dir(&target).map_err(|e| SandboxError::io(&target, e))?,
            }
            chown(&target, owner)?;
            let mode = match &spec.chmod {
                Some(c) => chmod_mode(c, meta.mode() & 0o7777, meta.is_dir())?,
                None => meta.mode() & 0o7777,
            };
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(|e| SandboxError::io(&target, e))?;
            dir_times.push((target, meta));
            continue;
        }
        if let Some(m) = existing {
            if m.is_dir() {
                return Err(SandboxError::Setup(format!(
                    "cannot copy {} over the directory {}",
                    item.src.display(),
                    target.strip_prefix(root).unwrap_or(&target).display()
                )));
            }
            remove_any(&target)?;
        }
        if meta.file_type().is_symlink() {
            let link = fs::read_link(&item.src).map_err(|e| SandboxError::io(&item.src, e))?;
            std::os::unix::fs::symlink(&link, &target).map_err(|e| SandboxError::io(&target, e))?;
            chown(&target, owner)?;
        } else if meta.is_file() {
            queue.push(&item.src, target, meta);
            continue;
        } else {
            return Err(SandboxError::Setup(format!(
                "COPY source {} is not a regular file, directory or symlink",
                item.src.display()
            )));
        }
        set_mtime(&target, &meta)?;
    }
    Ok(())
}

/// Regular files of a COPY waiting to be copied, in the order of the items.
#[derive(Default)]
struct FileQueue<'a> {
    files: Vec<(&'a Path, PathBuf, fs::Metadata)>,
    targets: std::collections::HashSet<PathBuf>,
    bytes: u64,
}

/// Below this many files or bytes, a queue is copied by this thread alone.
const PARALLEL_MIN_FILES: usize = 64;
const PARALLEL_MIN_BYTES: u64 = 4 << 20;

impl<'a> FileQueue<'a> {
    fn push(&mut self, src: &'a Path, target: PathBuf, meta: fs::Metadata) {
        self.bytes += meta.len();
        self.targets.insert(target.clone());
        self.files.push((src, target, meta));
    }

    /// Whether `target` is a queued file or lies below one (up to `root`).
    fn touches(&self, target: &Path, root: &Path) -> bool {
        !self.targets.is_empty()
            && target
                .ancestors()
                .take_while(|a| a.starts_with(root))
                .any(|a| self.targets.contains(a))
    }

    /// Copies every queued file, on up to four threads (this one included); the first failure
    /// in item order is the one reported.
    fn run(&mut self, spec: &CopySpec, owner: (u32, u32)) -> Result<(), SandboxError> {
        let files = std::mem::take(&mut self.files);
        self.targets.clear();
        let bytes = std::mem::take(&mut self.bytes);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4);
        if threads < 2 || (files.len() < PARALLEL_MIN_FILES && bytes < PARALLEL_MIN_BYTES) {
            for (src, target, meta) in &files {
                copy_file(src, target, meta, spec, owner)?;
            }
            return Ok(());
        }
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
        // Each worker takes the next file until none is left or one failed.
        let work = || {
            while !failed.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let (src, target, meta) = files.get(i)?;
                if let Err(e) = copy_file(src, target, meta, spec, owner) {
                    failed.store(true, Ordering::Relaxed);
                    return Some((i, e));
                }
            }
            None
        };
        let errors = std::thread::scope(|scope| {
            // This thread works too; a thread that cannot be started (RLIMIT_NPROC) is
            // simply not there.
            let helpers: Vec<_> = (1..threads)
                .filter_map(|_| std::thread::Builder::new().spawn_scoped(scope, work).ok())
                .collect();
            let mut errors: Vec<_> = work().into_iter().collect();
            for h in helpers {
                errors.extend(h.join().unwrap_or_else(|_| {
                    Some((
                        usize::MAX,
                        SandboxError::Setup("a COPY worker thread panicked".into()),
                    ))
                }));
            }
            errors
        });
        match errors.into_iter().min_by_key(|(i, _)| *i) {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}

/// Copies one regular file of a COPY to `target` (which does not exist) with its owner, mode
/// and modification time.
fn copy_file(
    src: &Path,
    target: &Path,
    meta: &fs::Metadata,
    spec: &CopySpec,
    owner: (u32, u32),
) -> Result<(), SandboxError> {
    fs::copy(src, target).map_err(|e| SandboxError::io(target, e))?;
    chown(target, owner)?;
    let mode = match &spec.chmod {
        Some(c) => chmod_mode(c, meta.mode() & 0o7777, false)?,
        None => meta.mode() & 0o7777,
    };
    fs::set_permissions(target, fs::Permissions::from_mode(mode))
        .map_err(|e| SandboxError::io(target, e))?;
    set_mtime(target, meta)
}

/// The mode `--chmod` gives a file whose mode is `current`: octal (`0755`) or symbolic as
/// chmod(1) takes it (`u+x`, `go-w`, `a=rX`, comma-separated clauses).
pub fn chmod_mode(spec: &str, current: u32, is_dir: bool) -> Result<u32, SandboxError> {
    let bad = || {
        SandboxError::Setup(format!(
            "--chmod={spec}: expected an octal mode (0755) or a symbolic one (u+x,go-w)"
        ))
    };
    if !spec.is_empty() && spec.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return u32::from_str_radix(spec, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(bad);
    }
    let mut mode = current;
    for clause in spec.split(',') {
        let who_end = clause.find(['+', '-', '=']).ok_or_else(bad)?;
        let (who, mut rest) = clause.split_at(who_end);
        let mut mask = 0u32;
        for c in who.chars() {
            mask |= match c {
                'u' => 0o4700,
                'g' => 0o2070,
                'o' => 0o1007,
                'a' => 0o7777,
                _ => return Err(bad()),
            };
        }
        if who.is_empty() {
            mask = 0o7777;
        }
        while !rest.is_empty() {
            let op = rest.chars().next().ok_or_else(bad)?;
            rest = &rest[1..];
            let end = rest.find(['+', '-', '=']).unwrap_or(rest.len());
            let (perms, tail) = rest.split_at(end);
            rest = tail;
            let mut bits = 0u32;
            for c in perms.chars() {
                bits |= match c {
                    'r' => 0o444,
                    'w' => 0o222,
                    'x' => 0o111,
                    'X' if is_dir || current & 0o111 != 0 => 0o111,
                    'X' => 0,
                    's' => 0o6000,
                    't' => 0o1000,
                    _ => return Err(bad()),
                };
            }
            let bits = bits & mask;
            mode = match op {
                '+' => mode | bits,
                '-' => mode & !bits,
                '=' => (mode & !(mask & 0o7777)) | bits,
                _ => return Err(bad()),
            };
        }
    }
    Ok(mode & 0o7777)
}

fn remove_any(p: &Path) -> Result<(), SandboxError> {
    let m = fs::symlink_metadata(p).map_err(|e| SandboxError::io(p, e))?;
    if m.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
    .map_err(|e| SandboxError::io(p, e))
}

/// The name a path has relative to the rootfs, for messages.
pub fn display_in_root(root: &Path, p: &Path) -> String {
    match p.strip_prefix(root) {
        Ok(rel) => format!("/{}", String::from_utf8_lossy(rel.as_os_str().as_bytes())),
        Err(_) => p.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_cannot_leave_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/etc", root.join("abs")).unwrap();
        symlink("../../../../etc", root.join("climb")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        assert_eq!(
            resolve_in_root(root, "/abs/passwd", true).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, "climb/passwd", true).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, "/../../x", true).unwrap(),
            root.join("x")
        );
        assert_eq!(
            resolve_in_root(root, "/abs", false).unwrap(),
            root.join("abs")
        );
        assert!(resolve_in_root(root, "/loop1/x", true).is_err());
    }

    #[test]
    fn chmod_takes_octal_and_symbolic_modes() {
        assert_eq!(chmod_mode("0755", 0o600, false).unwrap(), 0o755);
        assert_eq!(chmod_mode("u+x", 0o644, false).unwrap(), 0o744);
        assert_eq!(chmod_mode("go-r,u+w", 0o444, false).unwrap(), 0o600);
        assert_eq!(chmod_mode("a=rX", 0o600, true).unwrap(), 0o555);
        assert_eq!(chmod_mode("a=rX", 0o600, false).unwrap(), 0o444);
        assert_eq!(chmod_mode("+x", 0o600, false).unwrap(), 0o711);
        assert!(chmod_mode("u+q", 0o644, false).is_err());
        assert!(chmod_mode("9", 0o644, false).is_err());
        assert!(chmod_mode("", 0o644, false).is_err());
    }

    #[test]
    fn users_resolve_through_the_image_databases() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            root.join("etc/group"),
            "root:x:0:\napp:x:1001:\nextra:x:2000:app,other\n",
        )
        .unwrap();
        let app = resolve_user(root, "app").unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1001));
        assert_eq!(app.home.as_deref(), Some("/home/app"));
        assert_eq!(app.groups, vec![2000]);
        assert_eq!(resolve_user(root, "1000:extra").unwrap().gid, 2000);
        assert_eq!(resolve_user(root, "4242").unwrap().uid, 4242);
        let err = resolve_user(root, "ghost").unwrap_err().to_string();
        assert!(err.contains("unable to find user ghost"), "{err}");
        assert_eq!(resolve_chown(root, "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_chown(root, "7").unwrap(), (7, 7));
        assert_eq!(resolve_chown(root, "app:root").unwrap(), (1000, 0));
        assert!(resolve_chown(root, "app:nogroup").is_err());
    }
}
