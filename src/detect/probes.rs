//! The probes themselves: each does the real thing (never a guess from versions or sysctls) in a
//! throwaway child process, forked while the caller is still single-threaded.
//!
//! One child takes the namespace probes in order — user namespace, single-ID map, mount
//! namespace, tmpfs, kernel overlayfs with and without `userxattr`, fuse-overlayfs, /proc in a
//! pid namespace — each needing the ones before it, and reports one line per probe over a pipe.
//! A second child is the target of the subordinate-ID map (written by the parent with
//! newuidmap/newgidmap, exactly as a build does). Host facts and the reflink probe need no child.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork, getegid, geteuid, pipe2};

use crate::sandbox::userns::{self, IdMapping};

/// What one probe found, before causes and fixes are attached (and what [`super::cache`]
/// keeps).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Raw {
    pub name: String,
    pub ok: Option<bool>,
    /// The errno name (`EPERM`) of the failing call.
    pub errno: Option<String>,
    pub detail: String,
}

impl Raw {
    fn line(&self) -> String {
        let status = match self.ok {
            Some(true) => "ok",
            Some(false) => "failed",
            None => "skipped",
        };
        format!(
            "{}\t{status}\t{}\t{}\n",
            self.name,
            self.errno.as_deref().unwrap_or(""),
            self.detail.replace(['\t', '\n'], " ")
        )
    }

    fn parse(line: &str) -> Option<Raw> {
        let mut f = line.splitn(4, '\t');
        let name = f.next()?.to_string();
        let ok = match f.next()? {
            "ok" => Some(true),
            "failed" => Some(false),
            _ => None,
        };
        let errno = Some(f.next()?.to_string()).filter(|e| !e.is_empty());
        Some(Raw {
            name,
            ok,
            errno,
            detail: f.next().unwrap_or("").to_string(),
        })
    }
}

/// Names of the namespace probes, in the order the child runs them.
pub const NAMESPACE_PROBES: [&str; 8] = [
    "userns",
    "map-single",
    "mount-ns",
    "mount-tmpfs",
    "overlay-userxattr",
    "overlay-trusted",
    "fuse-overlayfs",
    "proc-pidns",
];

fn ok(name: &str, detail: impl Into<String>) -> Raw {
    Raw {
        name: name.into(),
        ok: Some(true),
        errno: None,
        detail: detail.into(),
    }
}

fn failed(name: &str, errno: Option<Errno>, detail: impl Into<String>) -> Raw {
    Raw {
        name: name.into(),
        ok: Some(false),
        errno: errno.map(|e| format!("{e:?}")),
        detail: detail.into(),
    }
}

fn skipped(name: &str, detail: impl Into<String>) -> Raw {
    Raw {
        name: name.into(),
        ok: None,
        errno: None,
        detail: detail.into(),
    }
}

fn io_errno(e: &std::io::Error) -> Option<Errno> {
    e.raw_os_error().map(Errno::from_raw)
}

/// Runs the namespace probes in a forked child with `work` (an empty directory in the store) as
/// scratch space. The caller must be single-threaded.
pub fn namespace_probes(work: &Path) -> Vec<Raw> {
    let (r, w) = match pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return vec![failed("userns", Some(e), "pipe for the probe child")],
    };
    let uid = geteuid().as_raw();
    let gid = getegid().as_raw();
    // SAFETY: callers run the probes before any thread exists (main before the tokio runtime;
    // the benchmark's single-threaded main), so the child is a full copy of a single-threaded
    // process and may allocate and use the standard library.
    match unsafe { fork() } {
        Err(e) => vec![failed("userns", Some(e), "fork for the probe child")],
        Ok(ForkResult::Child) => {
            drop(r);
            let mut out = File::from(w);
            child_probes(work, uid, gid, &mut |raw| {
                let _ = out.write_all(raw.line().as_bytes());
            });
            let _ = out.flush();
            std::process::exit(0);
        }
        Ok(ForkResult::Parent { child }) => {
            drop(w);
            let mut text = String::new();
            let _ = File::from(r).read_to_string(&mut text);
            let _ = waitpid(child, None);
            let mut found: Vec<Raw> = text.lines().filter_map(Raw::parse).collect();
            for name in NAMESPACE_PROBES {
                if !found.iter().any(|p| p.name == name) {
                    found.push(skipped(name, "the probe process ended before this probe"));
                }
            }
            found
        }
    }
}

fn child_probes(work: &Path, uid: u32, gid: u32, report: &mut dyn FnMut(&Raw)) {
    let mut rest = NAMESPACE_PROBES.iter();
    let give_up = |report: &mut dyn FnMut(&Raw), rest: &mut std::slice::Iter<&str>, why| {
        for name in rest {
            report(&skipped(name, why));
        }
    };
    rest.next();
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER) {
        report(&failed("userns", Some(e), "unshare(CLONE_NEWUSER)"));
        give_up(report, &mut rest, "needs a user namespace");
        return;
    }
    report(&ok("userns", "unshare(CLONE_NEWUSER)"));
    rest.next();
    let map = (|| -> Result<(), (Errno, &'static str)> {
        let w = |p: &'static str, d: String| {
            fs::write(p, d).map_err(|e| (io_errno(&e).unwrap_or(Errno::EIO), p))
        };
        w("/proc/self/setgroups", "deny".into())?;
        w("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
        w("/proc/self/gid_map", format!("0 {gid} 1\n"))
    })();
    if let Err((e, path)) = map {
        report(&failed("map-single", Some(e), format!("writing {path}")));
        give_up(report, &mut rest, "needs an ID map");
        return;
    }
    report(&ok("map-single", format!("uid {uid} and gid {gid} as 0")));
    rest.next();
    let private = unshare(CloneFlags::CLONE_NEWNS).and_then(|_| {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
    });
    if let Err(e) = private {
        report(&failed(
            "mount-ns",
            Some(e),
            "unshare(CLONE_NEWNS) in the user namespace",
        ));
        give_up(report, &mut rest, "needs a mount namespace");
        return;
    }
    report(&ok("mount-ns", "unshare(CLONE_NEWNS)"));
    rest.next();
    let tmp = work.join("tmpfs");
    report(&match fs::create_dir(&tmp)
        .map_err(|e| io_errno(&e))
        .and_then(|_| {
            mount(
                Some("tmpfs"),
                &tmp,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("size=1m"),
            )
            .map_err(Some)
        }) {
        Ok(()) => {
            let _ = umount2(&tmp, MntFlags::MNT_DETACH);
            ok("mount-tmpfs", "mount -t tmpfs")
        }
        Err(e) => failed("mount-tmpfs", e, "mount -t tmpfs"),
    });
    rest.next();
    let userxattr = overlay_probe(work, "overlay-userxattr", true);
    report(&userxattr);
    rest.next();
    // Only a fallback's question (older kernels patched to allow overlayfs in a user namespace
    // without userxattr), and a slow one: asked when userxattr failed.
    report(&if userxattr.ok == Some(true) {
        skipped("overlay-trusted", "not needed: overlay-userxattr works")
    } else {
        overlay_probe(work, "overlay-trusted", false)
    });
    rest.next();
    report(&fuse_probe(work));
    rest.next();
    report(&proc_probe(work));
}

/// Lower dir with a file `a` and a directory `d/x`; the exercise removes `a` (a whiteout) and
/// replaces `d` with an empty directory (an opaque directory).
fn make_exercise(base: &Path) -> Result<[PathBuf; 4], Raw> {
    let dirs = ["lower", "upper", "work", "merged"].map(|d| base.join(d));
    let setup = || -> std::io::Result<()> {
        for d in &dirs {
            fs::create_dir_all(d)?;
        }
        fs::write(dirs[0].join("a"), b"a")?;
        fs::create_dir(dirs[0].join("d"))?;
        fs::write(dirs[0].join("d/x"), b"x")
    };
    setup().map_err(|e| {
        failed(
            "overlay",
            io_errno(&e),
            format!("preparing {}: {e}", base.display()),
        )
    })?;
    Ok(dirs)
}

fn exercise(merged: &Path) -> Result<(), (Option<Errno>, String)> {
    let step = |what: &str, r: std::io::Result<()>| {
        r.map_err(|e| (io_errno(&e), format!("{what} through the mount: {e}")))
    };
    step("removing a lower file", fs::remove_file(merged.join("a")))?;
    step("removing a lower file", fs::remove_file(merged.join("d/x")))?;
    step(
        "removing a lower directory",
        fs::remove_dir(merged.join("d")),
    )?;
    step("making a directory again", fs::create_dir(merged.join("d")))?;
    let empty = fs::read_dir(merged.join("d"))
        .map(|mut d| d.next().is_none())
        .unwrap_or(false);
    if !empty {
        return Err((
            None,
            "the remade directory still shows the lower files".into(),
        ));
    }
    Ok(())
}

fn whiteout_at(upper: &Path, name: &str) -> bool {
    fs::symlink_metadata(upper.join(name))
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
        || upper.join(format!(".wh.{name}")).exists()
}

fn xattr_is(p: &Path, name: &str) -> bool {
    matches!(xattr::get(p, name), Ok(Some(v)) if v == b"y")
}

fn overlay_probe(work: &Path, name: &str, userxattr: bool) -> Raw {
    let base = work.join(name);
    let [lower, upper, wdir, merged] = match make_exercise(&base) {
        Ok(d) => d,
        Err(mut r) => {
            r.name = name.into();
            return r;
        }
    };
    let mut opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        wdir.display()
    );
    if userxattr {
        opts.push_str(",userxattr");
    }
    if let Err(e) = mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    ) {
        return failed(name, Some(e), "mount -t overlay in the store");
    }
    let result = exercise(&merged);
    let _ = umount2(&merged, MntFlags::MNT_DETACH);
    if let Err((e, what)) = result {
        return failed(name, e, what);
    }
    let xattr = if userxattr {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    };
    if !whiteout_at(&upper, "a") {
        return failed(name, None, "no 0/0 whiteout device in the upper dir");
    }
    if !xattr_is(&upper.join("d"), xattr) {
        return failed(name, None, format!("no {xattr} on the opaque directory"));
    }
    ok(name, format!("whiteout and opaque directory ({xattr})"))
}

fn fuse_probe(work: &Path) -> Raw {
    const NAME: &str = "fuse-overlayfs";
    if let Err(e) = File::options().read(true).write(true).open("/dev/fuse") {
        return failed(NAME, io_errno(&e), format!("opening /dev/fuse: {e}"));
    }
    let Some(program) = which("fuse-overlayfs") else {
        return failed(NAME, Some(Errno::ENOENT), "fuse-overlayfs is not in PATH");
    };
    let base = work.join(NAME);
    let [lower, upper, wdir, merged] = match make_exercise(&base) {
        Ok(d) => d,
        Err(mut r) => {
            r.name = NAME.into();
            return r;
        }
    };
    let out = std::process::Command::new(&program)
        .arg("-o")
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            wdir.display()
        ))
        .arg(&merged)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let err: Vec<&str> = err
                .lines()
                .filter(|l| !l.contains("unknown argument ignored"))
                .collect();
            return failed(
                NAME,
                None,
                format!(
                    "{} failed ({}): {}",
                    program.display(),
                    o.status,
                    err.join(" ")
                ),
            );
        }
        Err(e) => {
            return failed(
                NAME,
                io_errno(&e),
                format!("starting {}: {e}", program.display()),
            );
        }
    }
    let result = exercise(&merged);
    let _ = umount2(&merged, MntFlags::empty()).or_else(|_| umount2(&merged, MntFlags::MNT_DETACH));
    if let Err((e, what)) = result {
        return failed(NAME, e, what);
    }
    let d = upper.join("d");
    if !whiteout_at(&upper, "a") {
        return failed(NAME, None, "no whiteout in the upper dir");
    }
    if !(xattr_is(&d, "user.fuseoverlayfs.opaque")
        || xattr_is(&d, "user.overlay.opaque")
        || d.join(".wh..wh..opq").exists())
    {
        return failed(NAME, None, "no opaque marker on the remade directory");
    }
    ok(
        NAME,
        format!("{}: whiteout and opaque directory", program.display()),
    )
}

fn proc_probe(work: &Path) -> Raw {
    const NAME: &str = "proc-pidns";
    let target = work.join("proc");
    if let Err(e) = fs::create_dir(&target) {
        return failed(NAME, io_errno(&e), format!("creating {}", target.display()));
    }
    if let Err(e) = unshare(CloneFlags::CLONE_NEWPID) {
        return failed(NAME, Some(e), "unshare(CLONE_NEWPID)");
    }
    // SAFETY: the probe child is single-threaded (forked from a single-threaded parent and
    // starts no threads), so its own child may use the standard library.
    match unsafe { fork() } {
        Err(e) => failed(NAME, Some(e), "fork into the pid namespace"),
        Ok(ForkResult::Child) => {
            let code = match mount(
                Some("proc"),
                &target,
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            ) {
                Ok(()) => 0,
                Err(e) => e as i32,
            };
            std::process::exit(code);
        }
        Ok(ForkResult::Parent { child }) => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => {
                ok(NAME, "mount -t proc as pid 1 of a new pid namespace")
            }
            Ok(WaitStatus::Exited(_, code)) => failed(
                NAME,
                Some(Errno::from_raw(code)),
                "mount -t proc in a new pid namespace (the host's /proc has masked or read-only parts)",
            ),
            other => failed(NAME, None, format!("probe ended with {other:?}")),
        },
    }
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Writes the ID map a build would use (`mapping`) onto a fresh child's user namespace.
pub fn mapping_probe(mapping: &IdMapping) -> Raw {
    const NAME: &str = "map-subordinate";
    if let IdMapping::Single { reason, .. } = mapping {
        return failed(NAME, None, reason.clone());
    }
    let pipes = pipe2(OFlag::O_CLOEXEC).and_then(|a| pipe2(OFlag::O_CLOEXEC).map(|b| (a, b)));
    let ((ready_r, ready_w), (go_r, go_w)): ((OwnedFd, OwnedFd), (OwnedFd, OwnedFd)) = match pipes {
        Ok(p) => p,
        Err(e) => return failed(NAME, Some(e), "pipe"),
    };
    // SAFETY: as in `namespace_probes`: the caller is single-threaded.
    match unsafe { fork() } {
        Err(e) => failed(NAME, Some(e), "fork"),
        Ok(ForkResult::Child) => {
            drop(ready_r);
            drop(go_w);
            let byte = if unshare(CloneFlags::CLONE_NEWUSER).is_ok() {
                b"R"
            } else {
                b"E"
            };
            let _ = File::from(ready_w).write_all(byte);
            let mut buf = [0u8; 1];
            let _ = File::from(go_r).read(&mut buf);
            std::process::exit(0);
        }
        Ok(ForkResult::Parent { child }) => {
            drop(ready_w);
            drop(go_r);
            let mut buf = [0u8; 1];
            let _ = File::from(ready_r).read(&mut buf);
            let result = if buf[0] != b'R' {
                skipped(NAME, "needs a user namespace")
            } else {
                match userns::write_maps(child, mapping) {
                    Ok(()) => ok(NAME, mapping.describe()),
                    Err(e) => failed(NAME, None, e.to_string()),
                }
            };
            let _ = go_w.as_raw_fd();
            drop(go_w);
            let _ = waitpid(child, None);
            result
        }
    }
}

/// chroot(2) into a directory of the store, as real root (for the `chroot` isolation, used where
/// no user namespace can be made).
pub fn chroot_probe(work: &Path) -> Raw {
    const NAME: &str = "chroot";
    if !geteuid().is_root() {
        return skipped(NAME, "needs real root");
    }
    let dir = work.join("chroot");
    if let Err(e) = fs::create_dir_all(&dir) {
        return failed(NAME, io_errno(&e), format!("creating {}", dir.display()));
    }
    // SAFETY: as in `namespace_probes`: the caller is single-threaded.
    match unsafe { fork() } {
        Err(e) => failed(NAME, Some(e), "fork"),
        Ok(ForkResult::Child) => {
            let code = match nix::unistd::chroot(&dir) {
                Ok(()) => 0,
                Err(e) => e as i32,
            };
            std::process::exit(code);
        }
        Ok(ForkResult::Parent { child }) => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, 0)) => ok(NAME, "chroot(2) as real root"),
            Ok(WaitStatus::Exited(_, code)) => {
                failed(NAME, Some(Errno::from_raw(code)), "chroot(2) as real root")
            }
            other => failed(NAME, None, format!("probe ended with {other:?}")),
        },
    }
}

/// Whether in-place execution (`--isolation in-place`, never chosen on its own) may run here:
/// real root, in what says it is a container (docker's /.dockerenv, podman's
/// /run/.containerenv, the `container` variable of systemd's container interface, or a
/// Kubernetes pod's KUBERNETES_SERVICE_HOST), with the capabilities to set any owner and mode.
/// Anywhere else, replacing `/` with an image's files would wreck the machine itself, so
/// shmocker refuses. Reads a few files; runs nothing.
pub fn in_place_probe() -> Raw {
    const NAME: &str = "in-place";
    if !geteuid().is_root() {
        return skipped(NAME, "needs real root");
    }
    let sign = ["/.dockerenv", "/run/.containerenv"]
        .into_iter()
        .find(|f| Path::new(f).exists())
        .map(str::to_string)
        .or_else(|| {
            ["container", "KUBERNETES_SERVICE_HOST"]
                .into_iter()
                .find(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
                .map(|k| format!("${k}"))
        });
    // Giving the image's files their owners and modes, whoever owns what is there now.
    let needed = [(0, "CAP_CHOWN"), (1, "CAP_DAC_OVERRIDE"), (3, "CAP_FOWNER")];
    let cap_eff = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(bit, _)| cap_eff & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    match sign {
        Some(_) if !missing.is_empty() => failed(
            NAME,
            None,
            format!(
                "in-place execution needs CAP_CHOWN, CAP_DAC_OVERRIDE and CAP_FOWNER to give the image's files their owners and modes, and {} missing here: add it to the container (docker run --cap-add, or the pod's securityContext.capabilities.add)",
                missing.join(", ") + if missing.len() == 1 { " is" } else { " are" }
            ),
        ),
        Some(sign) => ok(
            NAME,
            format!("real root in a container ({sign}): --isolation in-place can be asked for"),
        ),
        None => failed(
            NAME,
            None,
            "no sign of a container (/.dockerenv, /run/.containerenv, $container, $KUBERNETES_SERVICE_HOST): in-place execution would replace this machine's own files",
        ),
    }
}

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// FICLONE between two files in `dir` (the store).
pub fn reflink_probe(dir: &Path) -> Raw {
    const NAME: &str = "reflink";
    let src = dir.join("reflink-src");
    let dst = dir.join("reflink-dst");
    let run = || -> std::io::Result<()> {
        fs::write(&src, [7u8; 4096])?;
        let s = File::open(&src)?;
        let d = File::create(&dst)?;
        // SAFETY: FICLONE takes the source file descriptor as its integer argument; both
        // descriptors are open for the duration of the call.
        unsafe { ficlone(d.as_raw_fd(), s.as_raw_fd() as nix::libc::c_ulong) }
            .map(|_| ())
            .map_err(std::io::Error::from)
    };
    let r = run();
    let _ = fs::remove_file(&src);
    let _ = fs::remove_file(&dst);
    match r {
        Ok(()) => ok(NAME, "FICLONE in the store: copies share extents"),
        Err(e) => failed(
            NAME,
            io_errno(&e),
            format!("FICLONE in the store: {e}; the copy snapshotter copies bytes"),
        ),
    }
}
