//! The sandbox helper: `shmocker __sandbox SPEC STATUS`, a fresh single-threaded process inside the
//! build's user namespace that runs one step (see the module docs of `sandbox`).
//!
//! Process tree of a RUN step:
//!
//! ```text
//! helper (own mount ns; mounts the overlay; removes mount-point stubs afterwards)
//! ├── init: pid 1 of a new pid + UTS + mount namespace; mounts /proc, /dev, /sys, hosts files,
//! │   │     pivots into the overlay, reaps orphans
//! │   └── the step's command, as the step's user
//! └── --network=private only, forked before the pid namespace: slirp4netns, or with
//!     --allow-host the filtering proxy and resolver (see `net` and `egress`)
//! ```
//!
//! Errors before the command starts travel back over a `report` pipe that closes on exec, so the
//! helper can tell "the command failed" from "the sandbox could not be set up".

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, chdir, execve, fork, pipe2, pivot_root};

use super::rootfs;
use super::{
    Action, MountKind, Network, ProcessSpec, SandboxError, SecretSource, Snapshotter, StepSpec,
    StepStatus,
};

pub const SUBCOMMAND: &str = "__sandbox";

/// Entry point of the helper process. Always writes a status file; exits 0 unless even that fails.
pub fn main(spec_path: &Path, status_path: &Path) -> ExitCode {
    // A step dies with the build that started it: `run_step` spawned this helper with
    // `die_with_spawner` (PR_SET_PDEATHSIG, kept across the exec, and a check that the build
    // still ran once it was set), and pid 1 and a chrooted command die with the helper in turn.
    let status = match read_spec(spec_path).and_then(|spec| run(&spec)) {
        Ok(status) => status,
        Err(e) if e.is_unavailable() => StepStatus::Unavailable(e.to_string()),
        Err(e) => StepStatus::Failed(e.to_string()),
    };
    let json = serde_json::to_vec(&status).unwrap_or_default();
    match fs::write(status_path, json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "shmocker sandbox: cannot write {}: {e}",
                status_path.display()
            );
            ExitCode::from(125)
        }
    }
}

fn read_spec(path: &Path) -> Result<StepSpec, SandboxError> {
    let bytes = fs::read(path).map_err(|e| SandboxError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| SandboxError::Setup(format!("bad step spec: {e}")))
}

fn run(spec: &StepSpec) -> Result<StepStatus, SandboxError> {
    if let Some(keep) = &spec.in_place {
        return run_without_namespaces(spec, Some(keep));
    }
    if spec.chroot {
        return run_without_namespaces(spec, None);
    }
    unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| SandboxError::sys("unshare(CLONE_NEWNS) for the step", e))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| SandboxError::sys("making mounts private", e))?;
    let marks = match spec.snapshotter {
        Snapshotter::Overlayfs => {
            mount_overlay(spec)?;
            None
        }
        Snapshotter::FuseOverlayfs => {
            mount_fuse_overlay(spec)?;
            None
        }
        Snapshotter::Copy => Some(prepare_copy(spec)?),
    };
    let root = spec.merged.as_path();
    let status = match &spec.action {
        Action::Copy(copy) => {
            let copy = match &copy.from {
                Some(from) => {
                    let view = spec.scratch.join("from");
                    fs::create_dir_all(&view).map_err(|e| SandboxError::io(&view, e))?;
                    mount_view(&from.lower, &spec.empty_dir, &view)?;
                    copy_from_view(copy, &view)?
                }
                None => copy.clone(),
            };
            let copy = squash_copy_owner(root, &copy, spec.ignore_chown_errors)?;
            rootfs::copy_into(root, &copy)?;
            unpack_archives(root, &copy)?;
            StepStatus::Exited(0)
        }
        Action::Export { dest } => {
            export_rootfs(root, dest)?;
            StepStatus::Exited(0)
        }
        Action::Mkdir { path, user } => {
            let owner = match user {
                Some(u) if !u.is_empty() => {
                    let mut u = rootfs::resolve_user(root, u)?;
                    if spec.ignore_chown_errors {
                        squash_user(&mut u, "WORKDIR");
                    }
                    (u.uid, u.gid)
                }
                _ => (0, 0),
            };
            rootfs::mkdir_all(root, path, owner)?;
            StepStatus::Exited(0)
        }
        Action::Run(process) => {
            let etc_before = dir_times(&root.join("etc"));
            let mut stubs = make_mount_points(root)?;
            let binds = prepare_run_mounts(spec, process, &mut stubs)?;
            let etc_with_stubs = dir_times(&root.join("etc"));
            let private = super::net::private_process(process, &spec.scratch)?;
            let process = private.as_ref().unwrap_or(process);
            let status = run_process(root, process, &binds, spec.ignore_chown_errors, spec);
            let etc_after = dir_times(&root.join("etc"));
            // The rootfs must be unmounted before its upper dir is edited directly.
            unmount_rootfs(root)?;
            if spec.snapshotter == Snapshotter::FuseOverlayfs {
                normalize_upper(spec)?;
            }
            if spec.snapshotter == Snapshotter::Copy {
                remove_stubs_in(root, &stubs)?;
                // Making and removing the stubs changed /etc's mtime: put back the one the
                // command left, or the image's when the command did not touch /etc, so that
                // the tree comparison sees what overlayfs would.
                if let (Some(before), Some(with), Some(after)) =
                    (etc_before, etc_with_stubs, etc_after)
                {
                    set_dir_times(
                        &root.join("etc"),
                        if with == after { before } else { after },
                    )?;
                }
            } else {
                let etc = spec.upper.join("etc");
                let etc_upper = dir_times(&etc);
                remove_stubs(spec, &stubs)?;
                // Removing a stub changed the copied-up /etc's mtime: keep the command's.
                if let Some(t) = etc_upper
                    && dir_times(&etc).is_some()
                {
                    set_dir_times(&etc, t)?;
                }
            }
            let status = status?;
            if let Some(marks) = &marks {
                diff_tree(spec, &spec.merged, marks)?;
            }
            return Ok(status);
        }
    };
    match spec.snapshotter {
        Snapshotter::Overlayfs => {}
        Snapshotter::FuseOverlayfs => {
            unmount_rootfs(root)?;
            normalize_upper(spec)?;
        }
        Snapshotter::Copy => {
            unmount_rootfs(root)?;
            if let Some(marks) = &marks {
                diff_tree(spec, &spec.merged, marks)?;
            }
        }
    }
    Ok(status)
}

/// COPY --from: the sources matched in `view` (the stage's or image's files, mounted or copied
/// there) become the copy's items.
fn copy_from_view(copy: &super::CopySpec, view: &Path) -> Result<super::CopySpec, SandboxError> {
    let mut copy = copy.clone();
    let Some(from) = &copy.from else {
        return Ok(copy);
    };
    let ctx = crate::engine::context::Context::new(view.to_path_buf(), None);
    let mut matched = 0;
    for source in &from.sources {
        let matches = ctx.matches(source).map_err(|e| match e {
            crate::engine::context::ContextError::NotFound(src, _) => SandboxError::Setup(format!(
                "{src}: not found in --from={} (the files of that stage or image; check the path)",
                from.name
            )),
            e => SandboxError::Setup(e.to_string()),
        })?;
        for rel in matches {
            matched += 1;
            ctx.items(&rel, &mut copy.items)
                .map_err(|e| SandboxError::Setup(e.to_string()))?;
        }
    }
    let has_dir = copy.items.iter().any(|i| i.rel.as_os_str().is_empty());
    if matched > 1 && !copy.dest_is_dir {
        return Err(SandboxError::Setup(format!(
            "when using COPY with more than one source file, the destination must be a directory and end with a /: {}",
            copy.dest
        )));
    }
    copy.dest_is_dir |= has_dir;
    Ok(copy)
}

/// The `chroot` isolation (`in_place` is None): real root, no namespaces and no mounts (where
/// seccomp denies them). The layers are copied into `merged`, the step runs chrooted there, and
/// the tree comparison finds its changes. Only /dev's basic device nodes are provided (made with
/// mknod where CAP_MKNOD allows, and removed afterwards); there is no /proc, and the network
/// files are the image's own.
///
/// The `in-place` isolation (`in_place` holds the paths to keep): as above, but the rootfs is
/// the running system's own `/`, made the image's by `layer::materialize_in_place` (everything
/// but the kept paths, the mount points and /proc, /sys, /dev is removed first), and the step
/// runs there without a chroot, with the container's /proc, /dev and network files.
fn run_without_namespaces(
    spec: &StepSpec,
    in_place: Option<&[PathBuf]>,
) -> Result<StepStatus, SandboxError> {
    let isolation = if in_place.is_some() {
        "in-place"
    } else {
        "chroot"
    };
    if spec.snapshotter != Snapshotter::Copy {
        return Err(SandboxError::Setup(format!(
            "the {isolation} isolation cannot use the {} snapshotter (it mounts); use --snapshotter copy",
            spec.snapshotter.name()
        )));
    }
    if let (Some(_), Action::Export { dest }) = (in_place, &spec.action) {
        // Not through `/`: the layers are stacked straight into the destination.
        return export_in_place(spec, dest);
    }
    // What cannot run here is refused before anything is copied (or `/` replaced).
    let unavailable = |what: &str| {
        SandboxError::Setup(format!(
            "{what} needs mounts, which the {isolation} isolation cannot make; run where user namespaces are allowed (see `shmocker detect`)"
        ))
    };
    if let Action::Run(process) = &spec.action {
        if !process.mounts.is_empty() {
            return Err(unavailable("RUN --mount"));
        }
        match process.network {
            Network::None => return Err(unavailable("RUN --network=none")),
            Network::Private => return Err(unavailable("RUN --network=private")),
            Network::Host => {}
        }
    }
    let (root, marks) = match in_place {
        Some(keep) => {
            let root = Path::new("/");
            let kept = in_place_kept(keep)?;
            refuse_kept_destination(&spec.action, &kept)?;
            // The change clock is read on `/` itself (its own filesystem's timestamps); the
            // stamp files there come and go before the step, and `/`'s own entry is never
            // part of a layer.
            let marks = crate::layer::materialize_in_place(
                &lower_dirs(spec),
                root,
                crate::layer::Kept::new(kept),
                root,
            )
            .map_err(|e| {
                SandboxError::Setup(format!(
                    "making / the image's filesystem (in-place execution): {e}; / is now partly replaced, so throw this container away"
                ))
            })?;
            (root, marks)
        }
        None => (spec.merged.as_path(), materialize_merged(spec)?),
    };
    let status = match &spec.action {
        Action::Copy(copy) => {
            let copy = match &copy.from {
                Some(from) => {
                    // No mounts: the stage's or image's files are copied out to be read.
                    let view = spec.scratch.join("from");
                    fs::create_dir_all(&view).map_err(|e| SandboxError::io(&view, e))?;
                    crate::layer::materialize(&from.lower, &view, &spec.work).map_err(|e| {
                        SandboxError::Setup(format!(
                            "copying the files of --from={} into {}: {e}",
                            from.name,
                            view.display()
                        ))
                    })?;
                    copy_from_view(copy, &view)?
                }
                None => copy.clone(),
            };
            rootfs::copy_into(root, &copy)?;
            unpack_archives(root, &copy)?;
            StepStatus::Exited(0)
        }
        Action::Export { dest } => {
            export_rootfs(root, dest)?;
            return Ok(StepStatus::Exited(0));
        }
        Action::Mkdir { path, user } => {
            let owner = match user {
                Some(u) if !u.is_empty() => {
                    let u = rootfs::resolve_user(root, u)?;
                    (u.uid, u.gid)
                }
                _ => (0, 0),
            };
            rootfs::mkdir_all(root, path, owner)?;
            StepStatus::Exited(0)
        }
        Action::Run(process) => {
            if in_place.is_some() {
                // The container's own /dev, /proc and hosts files are there (and kept).
                run_chrooted(root, process, false)?
            } else {
                let dev = root.join("dev");
                let dev_before = dir_times(&dev);
                let stubs = make_device_stubs(root)?;
                let dev_with = dir_times(&dev);
                let status = run_chrooted(root, process, true);
                let dev_after = dir_times(&dev);
                remove_stubs_in(root, &stubs)?;
                if let (Some(before), Some(with), Some(after)) = (dev_before, dev_with, dev_after) {
                    set_dir_times(&dev, if with == after { before } else { after })?;
                }
                status?
            }
        }
    };
    diff_tree(spec, root, &marks)?;
    Ok(status)
}

/// What in-place execution leaves alone: `keep` (shmocker's own files and `--ignore-path`),
/// /proc, /sys, /dev, and every mount point but `/` (a container's /etc/hosts and
/// /etc/resolv.conf, its volumes, a CI's workspace).
fn in_place_kept(keep: &[PathBuf]) -> Result<Vec<PathBuf>, SandboxError> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| SandboxError::io("/proc/self/mountinfo", e))?;
    let mut kept: Vec<PathBuf> = keep.to_vec();
    kept.extend(["/proc", "/sys", "/dev"].map(PathBuf::from));
    kept.extend(mount_points(&text).filter(|p| p != Path::new("/")));
    Ok(kept)
}

/// In place, a COPY, ADD or WORKDIR may not write at or below a kept path: that is the
/// container's own (often a bind mount of the runner's files, such as the context itself), and
/// it would be changed for real and left out of the layer.
fn refuse_kept_destination(action: &Action, kept: &[PathBuf]) -> Result<(), SandboxError> {
    let (what, dest) = match action {
        Action::Copy(c) => ("COPY/ADD destination", c.dest.as_str()),
        Action::Mkdir { path, .. } => ("WORKDIR", path.as_str()),
        _ => return Ok(()),
    };
    let dest: PathBuf = Path::new("/").join(dest).components().collect();
    match kept.iter().find(|k| dest.starts_with(k)) {
        Some(k) => Err(SandboxError::Setup(format!(
            "{what} {} is in {}, which in-place execution leaves as it is (a mount point, shmocker's store, context or executable, or --ignore-path) and keeps out of the image; choose another path in the Dockerfile, or move that directory",
            dest.display(),
            k.display()
        ))),
        None => Ok(()),
    }
}

/// The mount points in /proc/self/mountinfo text (the fifth field, octal escapes undone).
fn mount_points(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    use std::os::unix::ffi::OsStringExt;
    mountinfo.lines().filter_map(|line| {
        let field = line.split(' ').nth(4)?;
        let raw = field.as_bytes();
        let mut out = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            let octal = raw
                .get(i + 1..i + 4)
                .filter(|d| raw[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
            match octal {
                Some(d) => {
                    out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                    i += 4;
                }
                None => {
                    out.push(raw[i]);
                    i += 1;
                }
            }
        }
        Some(PathBuf::from(std::ffi::OsString::from_vec(out)))
    })
}

/// `--output type=local` of an in-place build: the layers stacked into the (empty) destination,
/// without going through `/` and without any program of the image.
fn export_in_place(spec: &StepSpec, dest: &Path) -> Result<StepStatus, SandboxError> {
    let empty = fs::read_dir(dest)
        .map_err(|e| SandboxError::io(dest, e))?
        .next()
        .is_none();
    if !empty {
        return Err(SandboxError::Setup(format!(
            "--output type=local,dest={}: the directory is not empty; in-place builds export only into an empty directory",
            dest.display()
        )));
    }
    let marks = crate::layer::materialize(&lower_dirs(spec), dest, &spec.work).map_err(|e| {
        SandboxError::Setup(format!(
            "copying the image's filesystem to {}: {e}",
            dest.display()
        ))
    })?;
    for w in &marks.warnings {
        eprintln!("warning: {w}");
    }
    Ok(StepStatus::Exited(0))
}

/// /dev/null and friends in the rootfs, as device nodes like the host's (needs CAP_MKNOD; left
/// out where it is missing).
fn make_device_stubs(root: &Path) -> Result<Vec<Stub>, SandboxError> {
    let mut stubs = Vec::new();
    let dev = root.join("dev");
    match fs::symlink_metadata(&dev) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(stubs),
        Err(_) => {
            fs::create_dir(&dev).map_err(|e| SandboxError::io(&dev, e))?;
            fs::set_permissions(&dev, fs::Permissions::from_mode(0o755))
                .map_err(|e| SandboxError::io(&dev, e))?;
            stubs.push(Stub {
                rel: "dev".into(),
                dir: true,
            });
        }
    }
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        let Ok(host) = fs::metadata(Path::new("/dev").join(name)) else {
            continue;
        };
        if fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        let made = nix::sys::stat::mknod(
            &target,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            host.rdev(),
        );
        if made.is_ok() {
            let _ = fs::set_permissions(&target, fs::Permissions::from_mode(0o666));
            stubs.push(Stub {
                rel: PathBuf::from("dev").join(name),
                dir: false,
            });
        }
    }
    Ok(stubs)
}

/// Runs the step's command chrooted into `root` (unless `chroot` is false: in-place execution,
/// where `root` is `/`), as its user, and waits for it.
fn run_chrooted(
    root: &Path,
    process: &ProcessSpec,
    chroot: bool,
) -> Result<StepStatus, SandboxError> {
    let user = rootfs::resolve_user(root, &process.user)?;
    let (report_r, report_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::sys("pipe", e))?;
    let helper = nix::unistd::getpid();
    // SAFETY: the helper is single-threaded (a fresh exec that never starts threads), so the
    // forked child may allocate and use the standard library freely.
    match unsafe { fork() }.map_err(|e| SandboxError::sys("fork", e))? {
        ForkResult::Child => {
            // The command dies with the helper; a helper already gone shows in getppid() (the
            // same pid namespace).
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            if nix::unistd::getppid() != helper {
                std::process::exit(137);
            }
            drop(report_r);
            let mut report = File::from(report_w);
            let err = (|| -> Result<(), SandboxError> {
                if chroot {
                    nix::unistd::chroot(root).map_err(|e| SandboxError::sys("chroot", e))?;
                }
                chdir("/").map_err(|e| SandboxError::sys("chdir /", e))?;
                let exec = prepare_exec(process, &user)?;
                // The same limits as in a namespace: the step shares the host's namespaces
                // here, so they matter all the more.
                Err(harden_and_exec(process, &user, &exec))
            })()
            .unwrap_err();
            let _ = writeln!(report, "E{err}");
            std::process::exit(127);
        }
        ForkResult::Parent { child } => {
            drop(report_w);
            let mut text = String::new();
            let _ = File::from(report_r).read_to_string(&mut text);
            let status = wait_for(child)?;
            if let Some(err) = text.lines().find_map(|l| l.strip_prefix('E')) {
                return Ok(StepStatus::Failed(err.to_string()));
            }
            Ok(match status {
                WaitStatus::Exited(_, code) => StepStatus::Exited(code),
                WaitStatus::Signaled(_, sig, _) => StepStatus::Signaled(sig as i32),
                other => StepStatus::Failed(format!("unexpected wait status {other:?}")),
            })
        }
    }
}

fn lower_dirs(spec: &StepSpec) -> Vec<PathBuf> {
    if spec.lower.is_empty() {
        vec![spec.empty_dir.clone()]
    } else {
        topmost_once(&spec.lower)
    }
}

/// `lower` (topmost first) with every snapshot after its first, topmost, appearance left out.
/// Two layers of an image can be the same (a step that changes a directory back to what an
/// earlier step made it), and so the same snapshot; overlayfs refuses a directory that is
/// twice among its lower ones (ELOOP). The stack shows the same files without the lower copy:
/// everything it has, the topmost copy has above it, whiteouts and opaque directories included.
fn topmost_once(lower: &[PathBuf]) -> Vec<PathBuf> {
    let mut seen = std::collections::HashSet::new();
    lower.iter().filter(|p| seen.insert(*p)).cloned().collect()
}

fn unmount_rootfs(root: &Path) -> Result<(), SandboxError> {
    umount2(root, MntFlags::empty())
        .or_else(|_| umount2(root, MntFlags::MNT_DETACH))
        .map_err(|e| SandboxError::sys("unmounting the step's rootfs", e))
}

fn normalize_upper(spec: &StepSpec) -> Result<(), SandboxError> {
    crate::layer::normalize_fuse_upper(&spec.upper, &lower_dirs(spec)).map_err(|e| {
        SandboxError::Setup(format!(
            "reading the changes fuse-overlayfs recorded in {}: {e}",
            spec.upper.display()
        ))
    })
}

/// The image's layers stacked into `merged` as plain files (the copy snapshotter's rootfs, and
/// the chroot isolation's).
fn materialize_merged(spec: &StepSpec) -> Result<crate::layer::CopyMarks, SandboxError> {
    if let Some(tree) = &spec.reuse {
        // `merged` is still empty: the previous step's tree takes its place (or, if that
        // cannot be, the layers are copied as usual).
        if fs::rename(tree, &spec.merged).is_ok() {
            return crate::layer::adopt_tree(&spec.merged, &spec.work).map_err(|e| {
                SandboxError::Setup(format!(
                    "reading the previous step's rootfs {}: {e}",
                    spec.merged.display()
                ))
            });
        }
    }
    crate::layer::materialize(&lower_dirs(spec), &spec.merged, &spec.work).map_err(|e| {
        SandboxError::Setup(format!(
            "copying the image's layers into {}: {e}",
            spec.merged.display()
        ))
    })
}

/// The copy snapshotter: the layers stacked into `merged`, which is then bound onto itself so
/// that it is a mount point (pivot_root needs one).
fn prepare_copy(spec: &StepSpec) -> Result<crate::layer::CopyMarks, SandboxError> {
    let marks = materialize_merged(spec)?;
    bind(&spec.merged, &spec.merged, true)?;
    Ok(marks)
}

/// The changes in `root` (the copy snapshotter's `merged`, or `/` in place) into `upper`.
fn diff_tree(
    spec: &StepSpec,
    root: &Path,
    marks: &crate::layer::CopyMarks,
) -> Result<(), SandboxError> {
    let warnings = crate::layer::diff_tree_to_upper(&lower_dirs(spec), root, &spec.upper, marks)
        .map_err(|e| {
            SandboxError::Setup(format!(
                "comparing the step's rootfs {} with its layers: {e}",
                root.display()
            ))
        })?;
    if !warnings.is_empty() {
        let mark = spec.scratch.join(super::TREE_DIFFERS);
        fs::write(&mark, b"").map_err(|e| SandboxError::io(&mark, e))?;
    }
    for w in marks.warnings.iter().chain(&warnings) {
        eprintln!("warning: {w}");
    }
    Ok(())
}

fn dir_times(p: &Path) -> Option<(i64, i64, i64, i64)> {
    let m = fs::symlink_metadata(p).ok().filter(|m| m.is_dir())?;
    Some((m.atime(), m.atime_nsec(), m.mtime(), m.mtime_nsec()))
}

fn set_dir_times(p: &Path, t: (i64, i64, i64, i64)) -> Result<(), SandboxError> {
    use nix::sys::time::TimeSpec;
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &TimeSpec::new(t.0, t.1),
        &TimeSpec::new(t.2, t.3),
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| SandboxError::sys(format!("restoring the times of {}", p.display()), e))
}

/// fuse-overlayfs, run inside this helper's user and mount namespaces (it mounts with mount(2)
/// there, so no setuid fusermount3 is involved). It returns once the mount is in place and
/// stays in the background until the rootfs is unmounted.
fn mount_fuse_overlay(spec: &StepSpec) -> Result<(), SandboxError> {
    let mut paths = lower_dirs(spec);
    paths.extend([spec.upper.clone(), spec.work.clone(), spec.merged.clone()]);
    if let Some(bad) = paths.iter().find(|p| {
        let s = p.to_string_lossy();
        s.contains(':') || s.contains(',')
    }) {
        return Err(SandboxError::Setup(format!(
            "fuse-overlayfs cannot use {}: the path contains ':' or ','; choose a store path without them (--root DIR)",
            bad.display()
        )));
    }
    let lower: Vec<String> = lower_dirs(spec)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        spec.upper.display(),
        spec.work.display()
    );
    let out = std::process::Command::new("fuse-overlayfs")
        .arg("-o")
        .arg(&opts)
        .arg(&spec.merged)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            SandboxError::Setup(format!(
                "starting fuse-overlayfs: {e}; install it (apt-get install fuse-overlayfs) or choose another --snapshotter"
            ))
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("unknown argument ignored"))
            .collect();
        return Err(SandboxError::Setup(format!(
            "fuse-overlayfs could not mount {} ({}): {}; check that /dev/fuse is accessible (run `shmocker detect`)",
            spec.merged.display(),
            out.status,
            stderr.join(" ")
        )));
    }
    Ok(())
}

/// Mounts a read-only overlay of `lower` (topmost first) at `target`: the view of a stage or
/// image that `COPY --from` and `RUN --mount=from=` read.
fn mount_view(lower: &[PathBuf], empty: &Path, target: &Path) -> Result<(), SandboxError> {
    // Without an upper dir overlayfs needs at least two lower dirs.
    let mut dirs: Vec<PathBuf> = topmost_once(lower);
    dirs.push(empty.to_path_buf());
    if dirs.len() < 2 {
        // An image without layers: two empty directories, since overlayfs refuses one twice.
        let second = target.with_extension("empty");
        fs::create_dir_all(&second).map_err(|e| SandboxError::io(&second, e))?;
        dirs.push(second);
    }
    let links = target.with_extension("lowers");
    mount_overlayfs(&dirs, ",userxattr", &links, target, MsFlags::MS_RDONLY).map_err(|(e, _)| {
        SandboxError::Setup(format!(
            "mounting a read-only view on {}: {e}",
            target.display()
        ))
    })
}

/// ADD: unpacks the step's local tar archives into its destination directory.
fn unpack_archives(root: &Path, copy: &super::CopySpec) -> Result<(), SandboxError> {
    for archive in &copy.archives {
        let dest = rootfs::mkdir_all(root, &copy.dest, (0, 0))?;
        let compression = crate::layer::sniff_compression(archive)
            .map_err(|e| SandboxError::Setup(e.to_string()))?;
        let file = File::open(archive).map_err(|e| SandboxError::io(archive, e))?;
        crate::layer::apply_layer(
            std::io::BufReader::new(file),
            compression,
            &dest,
            &crate::layer::ApplyOptions::default(),
        )
        .map_err(|e| SandboxError::Setup(format!("ADD {}: {e}", archive.display())))?;
    }
    Ok(())
}

/// `--output type=local`: copies the rootfs to `dest`. cp -a keeps owners, modes, links and
/// times; the rootfs is read through the overlay (or the copy), so whiteouts are applied.
fn export_rootfs(root: &Path, dest: &Path) -> Result<(), SandboxError> {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", root.display()))
        .arg(dest)
        .output()
        .map_err(|e| SandboxError::io("cp", e))?;
    if !out.status.success() {
        return Err(SandboxError::Setup(format!(
            "copying the image's filesystem to {}: {}",
            dest.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn mount_overlay(spec: &StepSpec) -> Result<(), SandboxError> {
    let lower = lower_dirs(spec);
    let rest = format!(
        ",upperdir={},workdir={},userxattr",
        escape_overlay_path(&spec.upper),
        escape_overlay_path(&spec.work)
    );
    let links = spec.scratch.join("lowers");
    mount_overlayfs(&lower, &rest, &links, &spec.merged, MsFlags::empty()).map_err(|(e, opts)| {
        SandboxError::Setup(format!(
            "mounting overlayfs on {} failed: {e} ({} lower layers, options {} bytes); the kernel may not allow overlayfs in a user namespace (needs Linux >= 5.11) or the store may be on a filesystem overlayfs cannot use as upper (overlay, some network filesystems): run `shmocker detect`",
            spec.merged.display(),
            spec.lower.len(),
            opts.len()
        ))
    })
}

/// The kernel copies mount(2)'s options into one page, and the options must end before it.
const MOUNT_OPTIONS_MAX: usize = 4095;

/// Mounts overlayfs on `target` with `lower` (topmost first) and the other options in `rest`
/// (starting with a comma). When the absolute lower paths make the options longer than a page
/// (about 30 layers in a store under /var/tmp), each lower is named instead by a short symbolic
/// link `links/<n>`, and the mount is made from inside `links` with the names relative to it,
/// as containers-storage does with its `l/` links: overlayfs resolves the lower dirs once, when
/// it mounts, so the links only need to live that long. On failure: the error and the options.
fn mount_overlayfs(
    lower: &[PathBuf],
    rest: &str,
    links: &Path,
    target: &Path,
    flags: MsFlags,
) -> Result<(), (SandboxError, String)> {
    let escaped: Vec<String> = lower.iter().map(|p| escape_overlay_path(p)).collect();
    let opts = format!("lowerdir={}{rest}", escaped.join(":"));
    if opts.len() <= MOUNT_OPTIONS_MAX {
        return mount(
            Some("overlay"),
            target,
            Some("overlay"),
            flags,
            Some(opts.as_str()),
        )
        .map_err(|e| (SandboxError::sys("mount overlayfs", e), opts));
    }
    let names: Vec<String> = (0..lower.len()).map(|i| i.to_string()).collect();
    let short = format!("lowerdir={}{rest}", names.join(":"));
    let fail = |e: SandboxError| (e, short.clone());
    fs::create_dir_all(links).map_err(|e| fail(SandboxError::io(links, e)))?;
    for (dir, name) in lower.iter().zip(&names) {
        let link = links.join(name);
        std::os::unix::fs::symlink(dir, &link).map_err(|e| fail(SandboxError::io(&link, e)))?;
    }
    let cwd = std::env::current_dir().map_err(|e| fail(SandboxError::io(".", e)))?;
    chdir(links).map_err(|e| fail(SandboxError::sys(format!("chdir {}", links.display()), e)))?;
    let mounted = mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(short.as_str()),
    );
    chdir(&cwd).map_err(|e| fail(SandboxError::sys(format!("chdir {}", cwd.display()), e)))?;
    mounted.map_err(|e| fail(SandboxError::sys("mount overlayfs", e)))
}

/// Overlayfs splits its options at `,` and lower dirs at `:`; both must be escaped in paths.
fn escape_overlay_path(p: &Path) -> String {
    p.to_string_lossy()
        .replace('\\', "\\\\")
        .replace(':', "\\:")
        .replace(',', "\\,")
}

/// A mount point this helper had to create in the rootfs, to be removed from the upper dir later.
#[derive(Debug)]
struct Stub {
    rel: PathBuf,
    dir: bool,
}

const MOUNT_DIRS: [&str; 3] = ["proc", "dev", "sys"];
const HOSTS_FILES: [&str; 2] = ["etc/hosts", "etc/resolv.conf"];

fn make_mount_points(root: &Path) -> Result<Vec<Stub>, SandboxError> {
    let mut stubs = Vec::new();
    for d in MOUNT_DIRS {
        let p = root.join(d);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir(&p).map_err(|e| SandboxError::io(&p, e))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                .map_err(|e| SandboxError::io(&p, e))?;
            stubs.push(Stub {
                rel: d.into(),
                dir: true,
            });
        }
    }
    let etc = root.join("etc");
    match fs::symlink_metadata(&etc) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Ok(stubs), // /etc is a link or a file: leave the image's files alone
        Err(_) => {
            fs::create_dir(&etc).map_err(|e| SandboxError::io(&etc, e))?;
            fs::set_permissions(&etc, fs::Permissions::from_mode(0o755))
                .map_err(|e| SandboxError::io(&etc, e))?;
            stubs.push(Stub {
                rel: "etc".into(),
                dir: true,
            });
        }
    }
    for f in HOSTS_FILES {
        let p = root.join(f);
        if fs::symlink_metadata(&p).is_err() {
            File::create(&p).map_err(|e| SandboxError::io(&p, e))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o644))
                .map_err(|e| SandboxError::io(&p, e))?;
            stubs.push(Stub {
                rel: f.into(),
                dir: false,
            });
        }
    }
    Ok(stubs)
}

/// Removes the mount points made by [`make_mount_points`] from the upper dir, so the layer holds
/// only what the command did. A directory that the command wrote into stays. A directory of the
/// image that was copied up only because a stub was created in it is dropped again when it is
/// empty and its owner and mode are unchanged.
fn remove_stubs(spec: &StepSpec, stubs: &[Stub]) -> Result<(), SandboxError> {
    let upper = &spec.upper;
    for stub in stubs.iter().rev() {
        let p = upper.join(&stub.rel);
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        let removable = if stub.dir {
            m.is_dir() && dir_is_empty(&p)
        } else {
            m.is_file() && m.len() == 0
        };
        if removable {
            if stub.dir {
                fs::remove_dir(&p)
            } else {
                fs::remove_file(&p)
            }
            .map_err(|e| SandboxError::io(&p, e))?;
        }
    }
    // Copied-up parents of file stubs (only /etc today).
    for stub in stubs.iter().filter(|s| !s.dir) {
        let Some(parent) = stub.rel.parent() else {
            continue;
        };
        if parent.as_os_str().is_empty() || stubs.iter().any(|s| s.dir && s.rel == parent) {
            continue;
        }
        let up = upper.join(parent);
        let (Ok(m), Some(lower)) = (
            fs::symlink_metadata(&up),
            spec.lower
                .iter()
                .find_map(|l| fs::symlink_metadata(l.join(parent)).ok()),
        ) else {
            continue;
        };
        if m.is_dir()
            && dir_is_empty(&up)
            && !is_opaque(&up)
            && m.mode() == lower.mode()
            && m.uid() == lower.uid()
            && m.gid() == lower.gid()
        {
            fs::remove_dir(&up).map_err(|e| SandboxError::io(&up, e))?;
        }
    }
    Ok(())
}

/// The copy snapshotter's [`remove_stubs`]: the stubs are in the rootfs itself.
fn remove_stubs_in(root: &Path, stubs: &[Stub]) -> Result<(), SandboxError> {
    for stub in stubs.iter().rev() {
        let p = root.join(&stub.rel);
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if stub.dir && m.is_dir() && dir_is_empty(&p) {
            fs::remove_dir(&p).map_err(|e| SandboxError::io(&p, e))?;
        } else if !stub.dir && ((m.is_file() && m.len() == 0) || m.file_type().is_char_device()) {
            fs::remove_file(&p).map_err(|e| SandboxError::io(&p, e))?;
        }
    }
    Ok(())
}

fn dir_is_empty(p: &Path) -> bool {
    fs::read_dir(p)
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

fn is_opaque(p: &Path) -> bool {
    ["user.overlay.opaque", "trusted.overlay.opaque"]
        .iter()
        .any(|name| matches!(xattr::get(p, name), Ok(Some(v)) if v == b"y"))
}

/// A `RUN --mount`, ready for pid 1 to mount: a host path to bind, or a tmpfs.
#[derive(Debug)]
struct PreparedMount {
    target: PathBuf,
    source: Option<PathBuf>,
    tmpfs_size: Option<u64>,
    readonly: bool,
}

/// Makes what the step's mounts need outside the rootfs (read-only views, secret files on a
/// tmpfs) and their mount points inside it (recorded as stubs, removed after the step).
fn prepare_run_mounts(
    spec: &StepSpec,
    process: &ProcessSpec,
    stubs: &mut Vec<Stub>,
) -> Result<Vec<PreparedMount>, SandboxError> {
    let root = spec.merged.as_path();
    let mut prepared = Vec::new();
    let mut secrets_dir: Option<PathBuf> = None;
    for (i, m) in process.mounts.iter().enumerate() {
        let (source, is_file, tmpfs_size) = match &m.kind {
            MountKind::Bind { source } => {
                let is_file = fs::metadata(source).map(|md| !md.is_dir()).unwrap_or(false);
                (Some(source.clone()), is_file, None)
            }
            MountKind::Layers { lower, subpath } => {
                let view = spec.scratch.join(format!("view{i}"));
                fs::create_dir_all(&view).map_err(|e| SandboxError::io(&view, e))?;
                mount_view(lower, &spec.empty_dir, &view)?;
                let source = rootfs::resolve_in_root(&view, subpath, true)?;
                if fs::symlink_metadata(&source).is_err() {
                    return Err(SandboxError::Setup(format!(
                        "mount source {subpath} does not exist in the image or stage it names"
                    )));
                }
                let is_file = fs::metadata(&source)
                    .map(|md| !md.is_dir())
                    .unwrap_or(false);
                (Some(source), is_file, None)
            }
            MountKind::Tmpfs { size } => (None, false, Some(size.unwrap_or(0))),
            MountKind::Secret {
                source,
                uid,
                gid,
                mode,
            } => {
                let dir = match &secrets_dir {
                    Some(d) => d.clone(),
                    None => {
                        let d = spec.scratch.join("secrets");
                        fs::create_dir_all(&d).map_err(|e| SandboxError::io(&d, e))?;
                        // Secrets live in memory only, never in the store.
                        mount(
                            Some("tmpfs"),
                            &d,
                            Some("tmpfs"),
                            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                            Some("mode=0755,size=16m"),
                        )
                        .map_err(|e| SandboxError::sys("mounting a tmpfs for secrets", e))?;
                        secrets_dir = Some(d.clone());
                        d
                    }
                };
                let value = match source {
                    SecretSource::File(p) => fs::read(p).map_err(|e| SandboxError::io(p, e))?,
                    SecretSource::Env(var) => std::env::var_os(var)
                        .map(|v| v.into_encoded_bytes())
                        .unwrap_or_default(),
                };
                let file = dir.join(format!("secret{i}"));
                fs::write(&file, value).map_err(|e| SandboxError::io(&file, e))?;
                nix::unistd::chown(&file, Some(Uid::from_raw(*uid)), Some(Gid::from_raw(*gid)))
                    .map_err(|e| SandboxError::sys("chown of a secret file", e))?;
                fs::set_permissions(&file, fs::Permissions::from_mode(*mode))
                    .map_err(|e| SandboxError::io(&file, e))?;
                (Some(file), true, None)
            }
        };
        let target = make_stub_path(root, &m.target, is_file, stubs)?;
        prepared.push(PreparedMount {
            target,
            source,
            tmpfs_size,
            readonly: m.readonly,
        });
    }
    Ok(prepared)
}

/// Creates the mount point `path` in the rootfs (and missing parents), recording each new
/// component as a stub. Returns the resolved host path.
fn make_stub_path(
    root: &Path,
    path: &str,
    is_file: bool,
    stubs: &mut Vec<Stub>,
) -> Result<PathBuf, SandboxError> {
    let target = rootfs::resolve_in_root(root, path, true)?;
    if fs::symlink_metadata(&target).is_ok() {
        return Ok(target);
    }
    let rel = target.strip_prefix(root).unwrap_or(&target).to_path_buf();
    let mut current = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for (i, part) in parts.iter().enumerate() {
        current.push(part);
        if fs::symlink_metadata(&current).is_ok() {
            continue;
        }
        let last = i + 1 == parts.len();
        if last && is_file {
            File::create(&current).map_err(|e| SandboxError::io(&current, e))?;
        } else {
            fs::create_dir(&current).map_err(|e| SandboxError::io(&current, e))?;
            fs::set_permissions(&current, fs::Permissions::from_mode(0o755))
                .map_err(|e| SandboxError::io(&current, e))?;
        }
        stubs.push(Stub {
            rel: current.strip_prefix(root).unwrap_or(&current).to_path_buf(),
            dir: !(last && is_file),
        });
    }
    Ok(target)
}

fn run_process(
    root: &Path,
    process: &ProcessSpec,
    mounts: &[PreparedMount],
    ignore_chown_errors: bool,
    spec: &StepSpec,
) -> Result<StepStatus, SandboxError> {
    let link = match process.network {
        Network::Private => Some(super::net::Link::new(process, &spec.scratch)?),
        _ => None,
    };
    let (init_link, helper_link) = match link {
        Some(l) => (Some(l.init), Some(l.helper)),
        None => (None, None),
    };
    unshare(CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWUTS)
        .map_err(|e| SandboxError::sys("unshare(CLONE_NEWPID|CLONE_NEWUTS)", e))?;
    let (report_r, report_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::sys("pipe", e))?;
    // Pid 1's getppid() is 0 (its parent is outside its pid namespace), so whether the helper
    // still runs is told by this pipe: the helper holds the only write end until pid 1 is gone,
    // and a read that finds no writer left means it died.
    let (alive_r, alive_w) =
        pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| SandboxError::sys("pipe", e))?;
    // SAFETY: the helper is single-threaded (a fresh exec that never starts threads), so the
    // forked child may allocate and use the standard library freely.
    match unsafe { fork() }.map_err(|e| SandboxError::sys("fork", e))? {
        ForkResult::Child => {
            // pid 1 dies with the helper, and with it every process of the step; a helper that
            // died before the signal was set shows as the end of the `alive` pipe.
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            drop(alive_w);
            if writer_gone(&alive_r) {
                std::process::exit(137);
            }
            drop(alive_r);
            drop(report_r);
            if let Some(h) = helper_link {
                h.close_in_child();
            }
            let mut report = File::from(report_w);
            let code = match init(
                root,
                process,
                mounts,
                &mut report,
                ignore_chown_errors,
                init_link,
            ) {
                Ok(code) => code,
                Err(e) => {
                    let _ = writeln!(report, "E{e}");
                    125
                }
            };
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop(alive_r);
            // Held (open) until this function returns, after pid 1 is waited for.
            let _alive = alive_w;
            drop(report_w);
            // From here pid 1 holds the only copy of its end (the network's children close what
            // they do not use), so the helper's wait for it ends when pid 1 exits.
            drop(init_link);
            // Kept until pid 1 is gone: dropping it stops slirp4netns.
            let net = helper_link.map(|h| h.start(child));
            let mut text = String::new();
            let _ = File::from(report_r).read_to_string(&mut text);
            let status = wait_for(child)?;
            let pid1_err = text.lines().find_map(|l| l.strip_prefix('E'));
            if let Some(Err(e)) = net {
                // Pid 1's own error says more, unless it only saw the helper give up.
                return Ok(StepStatus::Failed(match pid1_err {
                    Some(err) if !err.starts_with(super::net::NOT_SET_UP) => err.to_string(),
                    _ => e.to_string(),
                }));
            }
            drop(net);
            if let Some(err) = pid1_err {
                return Ok(StepStatus::Failed(err.to_string()));
            }
            if let Some(sig) = text.lines().find_map(|l| l.strip_prefix('S')) {
                return Ok(StepStatus::Signaled(sig.parse().unwrap_or(0)));
            }
            Ok(match status {
                WaitStatus::Exited(_, code) => StepStatus::Exited(code),
                WaitStatus::Signaled(_, sig, _) => StepStatus::Signaled(sig as i32),
                other => StepStatus::Failed(format!("unexpected wait status {other:?}")),
            })
        }
    }
}

/// Whether every write end of the pipe `r` (opened `O_NONBLOCK`, never written to) is closed:
/// a read then finds the end of the pipe instead of nothing yet.
fn writer_gone(r: &std::os::fd::OwnedFd) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(r, &mut byte) {
            Ok(0) => return true,
            Err(Errno::EINTR) => continue,
            // EAGAIN: a writer is still there (nothing is ever written).
            _ => return false,
        }
    }
}

fn wait_for(pid: Pid) -> Result<WaitStatus, SandboxError> {
    loop {
        match waitpid(pid, None) {
            Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => return Ok(s),
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => return Err(SandboxError::sys("waitpid", e)),
        }
    }
}

/// Pid 1 of the step: finishes the container's mounts, pivots, starts the command and reaps.
fn init(
    root: &Path,
    process: &ProcessSpec,
    mounts: &[PreparedMount],
    report: &mut File,
    ignore_chown_errors: bool,
    link: Option<std::os::unix::net::UnixStream>,
) -> Result<i32, SandboxError> {
    unshare(CloneFlags::CLONE_NEWNS)
        .map_err(|e| SandboxError::sys("unshare(CLONE_NEWNS) for pid 1", e))?;
    let mut _keep = None;
    if process.network != Network::Host {
        unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| SandboxError::sys("unshare(CLONE_NEWNET) for the step's network", e))?;
        match link {
            Some(link) => _keep = Some(super::net::init_side(process, link)?),
            None => super::net::loopback_up()?,
        }
    }
    mount_proc(root)?;
    if !process.insecure {
        super::harden::mask_proc(root)?;
    }
    mount_dev(root)?;
    bind(Path::new("/sys"), &root.join("sys"), true).ok(); // best effort, as with host networking
    if fs::symlink_metadata(root.join("etc")).is_ok_and(|m| m.is_dir()) {
        for (src, dest) in [
            (&process.hosts_file, "etc/hosts"),
            (&process.resolv_conf, "etc/resolv.conf"),
        ] {
            let target = root.join(dest);
            if fs::symlink_metadata(&target).is_ok_and(|m| m.is_file()) {
                bind(src, &target, false)?;
            }
        }
    }
    for m in mounts {
        match &m.source {
            Some(source) => {
                bind(source, &m.target, true)?;
                if m.readonly {
                    remount_readonly(&m.target)?;
                }
            }
            None => {
                let size = m.tmpfs_size.filter(|s| *s > 0).map(|s| format!("size={s}"));
                mount(
                    Some("tmpfs"),
                    &m.target,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    size.as_deref(),
                )
                .map_err(|e| {
                    SandboxError::sys(format!("mounting tmpfs on {}", m.target.display()), e)
                })?;
            }
        }
    }
    nix::unistd::sethostname(&process.hostname).map_err(|e| SandboxError::sys("sethostname", e))?;
    let mut user = rootfs::resolve_user(root, &process.user)?;
    if ignore_chown_errors {
        squash_user(&mut user, "USER");
    }
    chdir(root).map_err(|e| SandboxError::sys("chdir to the rootfs", e))?;
    pivot_root(".", ".").map_err(|e| SandboxError::sys("pivot_root", e))?;
    umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| SandboxError::sys("detaching the old root", e))?;
    chdir("/").map_err(|e| SandboxError::sys("chdir /", e))?;
    let exec = prepare_exec(process, &user)?;

    // SAFETY: pid 1 is single-threaded (forked from the single-threaded helper).
    match unsafe { fork() }.map_err(|e| SandboxError::sys("fork", e))? {
        ForkResult::Child => {
            let err = harden_and_exec(process, &user, &exec);
            let _ = writeln!(report, "E{err}");
            std::process::exit(127);
        }
        ForkResult::Parent { child } => loop {
            // Reap every orphan; leave when the command itself is done.
            match waitpid(None::<Pid>, None) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => return Ok(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                    let _ = writeln!(report, "S{}", sig as i32);
                    return Ok(128 + sig as i32);
                }
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => return Err(SandboxError::sys("waitpid in pid 1", e)),
            }
        },
    }
}

/// Whether `id` exists in this process's user namespace (`map`: `uid_map` or `gid_map`).
pub fn id_mapped(id: u32, map: &str) -> bool {
    let Ok(text) = fs::read_to_string(format!("/proc/self/{map}")) else {
        return true;
    };
    text.lines().any(|l| {
        let f: Vec<u64> = l
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        f.len() == 3 && (f[0]..f[0] + f[2]).contains(&u64::from(id))
    })
}

/// `--ignore-chown-errors`: an owner this namespace does not map becomes 0, with a warning,
/// instead of failing the step.
fn squash_user(user: &mut rootfs::ResolvedUser, what: &str) {
    if !id_mapped(user.uid, "uid_map") || !id_mapped(user.gid, "gid_map") {
        eprintln!(
            "warning: {what} {}:{} is not mapped in this build's user namespace; using 0:0 (--ignore-chown-errors)",
            user.uid, user.gid
        );
        user.uid = 0;
        user.gid = 0;
    }
    user.groups.retain(|g| id_mapped(*g, "gid_map"));
}

fn squash_copy_owner(
    root: &Path,
    copy: &super::CopySpec,
    ignore_chown_errors: bool,
) -> Result<super::CopySpec, SandboxError> {
    let mut copy = copy.clone();
    if let (true, Some(spec)) = (ignore_chown_errors, &copy.chown) {
        let (uid, gid) = rootfs::resolve_chown(root, spec)?;
        if !id_mapped(uid, "uid_map") || !id_mapped(gid, "gid_map") {
            eprintln!(
                "warning: COPY --chown={spec}: {uid}:{gid} is not mapped in this build's user namespace; the files stay owned by 0:0 (--ignore-chown-errors)"
            );
            copy.chown = None;
        }
    }
    Ok(copy)
}

/// What the step's process is exec'd with, made inside the rootfs (after pivot_root or chroot).
struct Exec {
    cwd: String,
    program: PathBuf,
    cprog: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

/// Creates the working directory if missing (owned by the step's user, as runc does), adds HOME
/// from the user's passwd entry when the environment has none, and finds the program in PATH.
fn prepare_exec(process: &ProcessSpec, user: &rootfs::ResolvedUser) -> Result<Exec, SandboxError> {
    let cwd = if process.cwd.is_empty() {
        "/".to_string()
    } else {
        process.cwd.clone()
    };
    if fs::metadata(&cwd).is_err() {
        fs::create_dir_all(&cwd).map_err(|e| SandboxError::io(&cwd, e))?;
        nix::unistd::chown(
            cwd.as_str(),
            Some(Uid::from_raw(user.uid)),
            Some(Gid::from_raw(user.gid)),
        )
        .map_err(|e| SandboxError::sys(format!("chown {cwd}"), e))?;
    }
    let mut env = process.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!(
            "HOME={}",
            user.home.clone().unwrap_or_else(|| "/".into())
        ));
    }
    let program = find_program(&process.args, &env)?;
    let cprog = CString::new(program.as_os_str().as_encoded_bytes())
        .map_err(|_| SandboxError::Setup("program path contains NUL".into()))?;
    Ok(Exec {
        cwd,
        argv: cstrings(&process.args)?,
        envp: cstrings(&env)?,
        program,
        cprog,
    })
}

/// The step's process, in pid 1's child or chrooted: the limits of `harden` unless the step is
/// insecure (before switching user: cutting the bounding set needs CAP_SETPCAP), then
/// [`switch_user_and_exec`]. Returns only on failure, with the reason.
fn harden_and_exec(
    process: &ProcessSpec,
    user: &rootfs::ResolvedUser,
    exec: &Exec,
) -> SandboxError {
    if !process.insecure
        && let Err(e) = super::harden::restrict_process()
    {
        return e;
    }
    switch_user_and_exec(user, exec)
}

/// Becomes the step's user (supplementary groups, gid, uid), enters its working directory and
/// execs the program. Returns only on failure, with the reason.
fn switch_user_and_exec(user: &rootfs::ResolvedUser, exec: &Exec) -> SandboxError {
    let run = || -> Result<(), SandboxError> {
        let groups: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
        // A single-ID namespace is made with setgroups denied (the kernel's condition for an
        // unprivileged gid map): there are no other groups to switch to anyway.
        let setgroups_denied =
            fs::read_to_string("/proc/self/setgroups").is_ok_and(|s| s.trim() == "deny");
        if !setgroups_denied {
            nix::unistd::setgroups(&groups).map_err(|e| {
                SandboxError::sys("setgroups (supplementary groups not mapped?)", e)
            })?;
        }
        let gid = Gid::from_raw(user.gid);
        nix::unistd::setresgid(gid, gid, gid).map_err(|e| unmapped("gid", user.gid, e))?;
        let uid = Uid::from_raw(user.uid);
        nix::unistd::setresuid(uid, uid, uid).map_err(|e| unmapped("uid", user.uid, e))?;
        let cwd = exec.cwd.as_str();
        chdir(cwd).map_err(|e| SandboxError::sys(format!("chdir {cwd}"), e))?;
        let e = execve(&exec.cprog, &exec.argv, &exec.envp).unwrap_err();
        Err(SandboxError::Setup(format!(
            "exec {}: {}",
            exec.program.display(),
            e.desc()
        )))
    };
    match run() {
        Err(e) => e,
        Ok(()) => SandboxError::Setup("exec returned".into()),
    }
}

fn unmapped(kind: &str, id: u32, e: Errno) -> SandboxError {
    SandboxError::Setup(format!(
        "cannot switch to {kind} {id}: {e}; that ID is not mapped in this build's user namespace (give the user a subordinate ID range in /etc/sub{kind}, or use USER 0)"
    ))
}

fn cstrings(items: &[String]) -> Result<Vec<CString>, SandboxError> {
    items
        .iter()
        .map(|s| {
            CString::new(s.as_bytes())
                .map_err(|_| SandboxError::Setup(format!("argument contains a NUL byte: {s:?}")))
        })
        .collect()
}

/// Finds the program the way runc does: a name without `/` is looked up in the step's PATH.
fn find_program(args: &[String], env: &[String]) -> Result<PathBuf, SandboxError> {
    let name = args
        .first()
        .ok_or_else(|| SandboxError::Setup("RUN has no command".into()))?;
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(crate::image::DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        if fs::metadata(&candidate).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0) {
            return Ok(candidate);
        }
    }
    Err(SandboxError::Setup(format!(
        "exec: {name:?}: executable file not found in $PATH ({path})"
    )))
}

fn mount_proc(root: &Path) -> Result<(), SandboxError> {
    let target = root.join("proc");
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match mount(Some("proc"), &target, Some("proc"), flags, None::<&str>) {
        Ok(()) => Ok(()),
        // A fresh proc is refused where the host's /proc is partly masked (containers); the
        // host's view, recursively bound, is the fallback BuildKit and buildah use too.
        Err(_) => bind(Path::new("/proc"), &target, true)
            .map_err(|e| SandboxError::Setup(format!("cannot mount /proc for the step: {e}"))),
    }
}

fn mount_dev(root: &Path) -> Result<(), SandboxError> {
    let dev = root.join("dev");
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .map_err(|e| SandboxError::sys("mounting tmpfs on /dev", e))?;
    // Device nodes cannot be created in a user namespace; the host's are bound instead.
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        File::create(&target).map_err(|e| SandboxError::io(&target, e))?;
        bind(&Path::new("/dev").join(name), &target, false)?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(name))
            .map_err(|e| SandboxError::io(dev.join(name), e))?;
    }
    let pts = dev.join("pts");
    fs::create_dir(&pts).map_err(|e| SandboxError::io(&pts, e))?;
    let _ = mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    );
    let shm = dev.join("shm");
    fs::create_dir(&shm).map_err(|e| SandboxError::io(&shm, e))?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=65536k"),
    )
    .map_err(|e| SandboxError::sys("mounting /dev/shm", e))
}

/// Makes a bind mount read-only, keeping the flags the kernel locks in a user namespace.
fn remount_readonly(target: &Path) -> Result<(), SandboxError> {
    use nix::sys::statvfs::{FsFlags, statvfs};
    let current = statvfs(target)
        .map_err(|e| SandboxError::sys("statvfs", e))?
        .flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (fs_flag, ms_flag) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if current.contains(fs_flag) {
            flags |= ms_flag;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(|e| SandboxError::sys(format!("making {} read-only", target.display()), e))
}

fn bind(src: &Path, target: &Path, recursive: bool) -> Result<(), SandboxError> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(src), target, None::<&str>, flags, None::<&str>).map_err(|e| {
        SandboxError::sys(
            format!("bind-mounting {} on {}", src.display(), target.display()),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_pipe_tells_that_its_writer_is_gone() {
        let (r, w) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
        assert!(!writer_gone(&r));
        assert!(!writer_gone(&r), "reading changed nothing");
        drop(w);
        assert!(writer_gone(&r));
    }

    #[test]
    fn overlay_paths_are_escaped() {
        assert_eq!(escape_overlay_path(Path::new("/a:b,c")), "/a\\:b\\,c");
    }

    #[test]
    fn programs_are_found_in_the_steps_path() {
        let env = vec!["PATH=/nonexistent:/bin:/usr/bin".to_string()];
        assert_eq!(
            find_program(&["sh".into()], &env).unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert_eq!(
            find_program(&["./x".into()], &env).unwrap(),
            PathBuf::from("./x")
        );
        let err = find_program(&["no-such-program".into()], &env).unwrap_err();
        assert!(
            err.to_string().contains("executable file not found"),
            "{err}"
        );
    }
}
