//! The sandbox: every namespace and mount syscall of shmocker lives here, and nowhere else.
//!
//! How a build step runs, as a story:
//!
//! 1. At start-up, before any thread exists, `main` calls [`userns::enter`]: the process forks and
//!    the child becomes uid 0 of a user namespace mapped onto the caller's subordinate IDs (or the
//!    full ID range for root). The whole build runs in that child.
//! 2. For each step that changes the filesystem (RUN, COPY, WORKDIR), the engine prepares an
//!    overlay: the image's unpacked layers as `lower` dirs, an empty `upper` and `work`, and a
//!    `merged` mount point (see `snapshot/`). It describes the step as a [`StepSpec`] and calls
//!    [`run_step`].
//! 3. [`run_step`] re-executes the shmocker binary as `shmocker __sandbox SPEC` — a fresh process,
//!    hence single-threaded, which is what `unshare(CLONE_NEWNS | CLONE_NEWPID)` requires — and
//!    relays its output line by line.
//! 4. That helper ([`helper::main`]) takes its own mount namespace, mounts overlayfs (`userxattr`,
//!    since it is inside a user namespace) and then either copies files in (COPY), makes a
//!    directory (WORKDIR), or (RUN) forks the step's pid 1 into new pid and UTS namespaces, which
//!    mounts /proc, a minimal /dev, /sys, /etc/hosts and /etc/resolv.conf, pivots into the overlay
//!    and runs the command as the step's user. Mount points it had to create are removed from the
//!    upper dir afterwards, so they never reach the layer.
//! 5. The helper reports the command's exit status in a small JSON status file; the upper dir now
//!    holds exactly the step's changes in overlay form, which `layer::diff_upper_to_blob` turns
//!    into a layer.

pub mod egress;
pub mod harden;
pub mod helper;
pub mod net;
pub mod rootfs;
pub mod userns;

pub use userns::IdMapping;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl SandboxError {
    /// Whether the machine refused the sandbox itself (a namespace, mount, ID map or
    /// fuse-overlayfs call), rather than the step's input being wrong.
    pub fn is_unavailable(&self) -> bool {
        match self {
            SandboxError::Sys { .. } => true,
            SandboxError::Setup(m) => m.contains("fuse-overlayfs"),
            SandboxError::Io { .. } => false,
        }
    }

    pub(crate) fn sys(what: impl Into<String>, source: nix::errno::Errno) -> Self {
        SandboxError::Sys {
            what: what.into(),
            source,
        }
    }
    pub(crate) fn io(what: impl AsRef<Path>, source: std::io::Error) -> Self {
        SandboxError::Io {
            what: what.as_ref().display().to_string(),
            source,
        }
    }
}

/// The mark the helper leaves in a step's `scratch` when the layer leaves out part of the tree
/// the step ran in (a socket, a device that cannot be made): that tree then is not what the
/// layers stack to, and the next step must not start from it.
pub const TREE_DIFFERS: &str = "tree-differs";

/// One filesystem-changing step, as the helper process receives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepSpec {
    /// Unpacked layers, topmost first. Empty for an image with no layers (`FROM scratch`).
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    /// An empty directory used as the lower layer when `lower` is empty.
    pub empty_dir: PathBuf,
    /// A private directory of the step for the helper's own files (secrets, read-only views).
    pub scratch: PathBuf,
    pub action: Action,
    /// How the rootfs is stacked from `lower` (see [`Snapshotter`]).
    #[serde(default)]
    pub snapshotter: Snapshotter,
    /// No namespaces: the helper is real root and chroots the step into a copy of its rootfs
    /// (the `chroot` isolation; needs the copy snapshotter).
    #[serde(default)]
    pub chroot: bool,
    /// In-place execution (the `in-place` isolation, opt-in, for throwaway containers): no
    /// namespaces and no chroot; the running system's own `/` is made the step's rootfs, except
    /// for these paths, every mount point and /proc, /sys and /dev, which are left as they are
    /// and out of the layer (needs the copy snapshotter).
    #[serde(default)]
    pub in_place: Option<Vec<PathBuf>>,
    /// The copy snapshotter: a tree that already is what `lower` stacks to (the one the
    /// stage's previous step left), taken as the rootfs instead of copying the layers again.
    #[serde(default)]
    pub reuse: Option<PathBuf>,
    /// An owner (COPY --chown, USER, WORKDIR) the namespace does not map becomes 0 instead of an
    /// error (`--ignore-chown-errors`, for single-ID builds).
    #[serde(default)]
    pub ignore_chown_errors: bool,
}

/// How a step's rootfs is made from the image's layers, fastest first. Whatever the choice, the
/// step's changes end up in `upper` in kernel overlayfs form (0/0 character devices for
/// whiteouts, `user.overlay.opaque` on opaque directories), so the layer and the committed
/// snapshot do not depend on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Snapshotter {
    /// Kernel overlayfs with `userxattr` (Linux >= 5.11 in a user namespace).
    #[default]
    Overlayfs,
    /// The `fuse-overlayfs` program over /dev/fuse; its upper dir is rewritten into kernel form.
    FuseOverlayfs,
    /// A full copy of the layers into `merged` (extents shared by `copy_file_range` where the
    /// filesystem can reflink); the changes are found by comparing the trees afterwards.
    Copy,
}

impl Snapshotter {
    pub const ALL: [Snapshotter; 3] = [
        Snapshotter::Overlayfs,
        Snapshotter::FuseOverlayfs,
        Snapshotter::Copy,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Snapshotter::Overlayfs => "overlayfs",
            Snapshotter::FuseOverlayfs => "fuse-overlayfs",
            Snapshotter::Copy => "copy",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Action {
    Run(ProcessSpec),
    Copy(CopySpec),
    Mkdir {
        path: String,
        user: Option<String>,
    },
    /// Copy the whole rootfs, owners and modes kept, into a host directory (`type=local`).
    Export {
        dest: PathBuf,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// Absolute working directory inside the rootfs (created if missing, as BuildKit does).
    pub cwd: String,
    /// The Dockerfile USER: `name`, `uid`, `name:group`, `uid:gid`; empty for root.
    pub user: String,
    pub hostname: String,
    /// Files bind-mounted over /etc/hosts and /etc/resolv.conf.
    pub hosts_file: PathBuf,
    pub resolv_conf: PathBuf,
    /// `RUN --mount`s, in order.
    #[serde(default)]
    pub mounts: Vec<RunMount>,
    #[serde(default)]
    pub network: Network,
    /// `RUN --security=insecure` (allowed with `--allow security.insecure`): no masked /proc
    /// paths, the full capability set, no `no_new_privs`.
    #[serde(default)]
    pub insecure: bool,
    /// `--allow-host`: with [`Network::Private`], the only destinations the step may reach
    /// (through the helper's filtering proxy instead of slirp4netns; see [`egress`]).
    #[serde(default)]
    pub allow_hosts: Vec<egress::AllowHost>,
}

/// The network a RUN step sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Network {
    /// The runner's own network namespace (what docker build and buildah do by default).
    #[default]
    Host,
    /// A network namespace of its own with only loopback.
    None,
    /// A network namespace of its own with outbound access through slirp4netns, or, with an
    /// `--allow-host` list, only to the listed hosts through the helper's filtering proxy.
    Private,
}

/// A `RUN --mount`: something mounted at `target` for the duration of the step only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunMount {
    /// Absolute path inside the rootfs.
    pub target: String,
    pub kind: MountKind,
    pub readonly: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum MountKind {
    /// A host file or directory (a cache mount's directory, the build context).
    Bind {
        source: PathBuf,
    },
    /// A read-only view of an image's or stage's layers (topmost first), then `subpath` in it.
    Layers {
        lower: Vec<PathBuf>,
        subpath: String,
    },
    Tmpfs {
        size: Option<u64>,
    },
    /// A secret, as a file on a tmpfs outside the rootfs, bound read-only at `target`.
    Secret {
        source: SecretSource,
        uid: u32,
        gid: u32,
        mode: u32,
    },
}

/// Where a secret's value is read by the helper. Never the value itself: the spec is a file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum SecretSource {
    File(PathBuf),
    /// An environment variable set for the helper process only.
    Env(String),
}

/// COPY: host files (already filtered by .dockerignore) into the rootfs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopySpec {
    pub items: Vec<CopyItem>,
    /// Destination, absolute inside the rootfs.
    pub dest: String,
    /// Whether `dest` names a directory to copy into (trailing slash, several sources, or a
    /// directory source); otherwise a single file is copied *to* `dest`, unless `dest` is an
    /// existing directory in the image.
    pub dest_is_dir: bool,
    /// `--chown` as written (names resolved in the image's /etc/passwd and /etc/group).
    pub chown: Option<String>,
    /// `--chmod`: an octal or symbolic mode (see `rootfs::chmod_mode`).
    pub chmod: Option<String>,
    /// `--from`: copy from these layers (a stage or an image, topmost first) instead of the
    /// context; the helper mounts them read-only and matches `sources` there.
    #[serde(default)]
    pub from: Option<CopyFrom>,
    /// `--link`: the layer is made on its own, not on top of the image's layers.
    #[serde(default)]
    pub link: bool,
    /// ADD: local tar archives (plain, gzip, bzip2, xz or zstd), unpacked into the destination.
    #[serde(default)]
    pub archives: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyFrom {
    pub lower: Vec<PathBuf>,
    pub sources: Vec<String>,
    /// The `--from` value as written, for messages.
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyItem {
    /// The file or directory on the host.
    pub src: PathBuf,
    /// Its path under the destination directory (`name` for a top-level source file, `sub/name` for
    /// an entry inside a directory source, empty for the directory source itself).
    pub rel: PathBuf,
}

/// What the helper writes into its status file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StepStatus {
    Exited(i32),
    Signaled(i32),
    /// The step could not run: its input or the sandbox's set-up failed (the message says why).
    Failed(String),
    /// The machine refused the sandbox itself: a namespace, a mount, an ID map or fuse-overlayfs
    /// (what the detection probes vouch for; see `detect::cache`).
    Unavailable(String),
}

/// The outcome of [`run_step`].
#[derive(Debug)]
pub struct StepResult {
    pub status: StepStatus,
    /// The last lines the step printed, for error reports.
    pub tail: Vec<String>,
}

const TAIL_LINES: usize = 20;

/// Makes the process `cmd` starts die (SIGKILL) when the thread that starts it ends, which is
/// when this process dies if that thread lives as long as the child (it waits for it, or it is
/// a thread that lasts: the main thread, a runtime's worker). If this process is already gone
/// by the time the child has set that up, the child does not run (the spawn fails).
pub fn die_with_spawner(cmd: &mut Command) {
    die_with_parent(cmd, std::process::id());
}

fn die_with_parent(cmd: &mut Command, parent: u32) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: it makes two system calls (prctl, getppid) and builds an io::Error
    // from a raw errno, which allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            // The parent (same pid namespace) died before the signal was set: the child was
            // reparented, and will never get it.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Runs one step in a fresh helper process (see the module docs). `on_line` receives each line
/// the step prints (stdout and stderr merged, in order). Blocking: call from `spawn_blocking`.
pub fn run_step(
    spec: &StepSpec,
    helper_env: &[(String, String)],
    mut on_line: impl FnMut(&str),
) -> Result<StepResult, SandboxError> {
    let scratch = spec.scratch.as_path();
    let spec_path = scratch.join("spec.json");
    let status_path = scratch.join("status.json");
    let json = serde_json::to_vec(spec).map_err(|e| SandboxError::Setup(e.to_string()))?;
    std::fs::write(&spec_path, json).map_err(|e| SandboxError::io(&spec_path, e))?;
    let _ = std::fs::remove_file(&status_path);

    let (read_end, write_end): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SandboxError::sys("pipe", e))?;
    let write_clone = write_end
        .try_clone()
        .map_err(|e| SandboxError::io("pipe", e))?;
    // /proc/self/exe, not the path it points to: that path may have been replaced or removed
    // since this process started (an upgrade during a build), while the open inode still runs.
    let exe = std::path::PathBuf::from("/proc/self/exe");
    let mut cmd = Command::new(exe);
    cmd.arg(helper::SUBCOMMAND)
        .arg(&spec_path)
        .arg(&status_path)
        .envs(helper_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_clone));
    // The step dies with the build: this thread spawns the helper and waits for it below.
    die_with_spawner(&mut cmd);
    let spawned = cmd.spawn();
    // The Command holds the only other copies of the write end; dropping it closes them, so
    // the reader sees EOF when the step's last process exits.
    drop(cmd);
    let mut child = spawned.map_err(|e| SandboxError::io("starting the sandbox helper", e))?;
    let reader = BufReader::new(std::fs::File::from(read_end));
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for line in reader.split(b'\n') {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                // Nothing would read the step's output any more: end it rather than leave it
                // running (or blocked on a full pipe) behind the build.
                let _ = child.kill();
                let _ = child.wait();
                return Err(SandboxError::io("reading step output", e));
            }
        };
        let line = String::from_utf8_lossy(&line).into_owned();
        on_line(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let exit = child
        .wait()
        .map_err(|e| SandboxError::io("waiting for the sandbox helper", e))?;
    let status = match std::fs::read(&status_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| StepStatus::Failed(format!("unreadable status file: {e}"))),
        Err(_) => StepStatus::Failed(format!(
            "the sandbox helper ended without a status ({exit})"
        )),
    };
    Ok(StepResult {
        status,
        tail: tail.into(),
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_the_machine_refusing_the_sandbox_counts_as_unavailable() {
        let sys = SandboxError::sys("mounting overlayfs", nix::errno::Errno::EPERM);
        assert!(sys.is_unavailable());
        assert!(SandboxError::Setup("fuse-overlayfs exited with 1".into()).is_unavailable());
        assert!(!SandboxError::Setup("unknown user \"app\"".into()).is_unavailable());
        let io = SandboxError::io("/etc/passwd", std::io::Error::other("x"));
        assert!(!io.is_unavailable());
    }

    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    #[test]
    fn a_child_dies_with_the_thread_that_spawned_it() {
        let spawner = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("60");
            die_with_spawner(&mut cmd);
            cmd.spawn().expect("sleep")
        });
        let mut child = spawner.join().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("`sleep 60` outlived the thread that spawned it");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(status.signal(), Some(9), "{status}");
    }

    #[test]
    fn a_child_whose_parent_is_gone_does_not_run() {
        // As if the parent had died between fork and prctl: the child's parent is not the one
        // recorded.
        let mut cmd = Command::new("true");
        die_with_parent(&mut cmd, 0x7fff_fffe);
        let err = cmd.spawn().expect_err("ran although its parent was gone");
        assert_eq!(err.raw_os_error(), Some(nix::libc::ESRCH), "{err}");
    }
}
