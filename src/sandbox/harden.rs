//! What a RUN step may not do, applied by its pid 1 and by the step's process just before exec.
//!
//! The defaults follow Docker's for containers (moby's `oci/defaults.go`): the capability
//! bounding set is cut to Docker's default set, `no_new_privs` is set so that nothing the step
//! executes can gain privileges, and /proc paths that reveal or change the host (kcore, keys,
//! timer lists, sysrq-trigger, /proc/sys, ...) are masked or made read-only. The step already
//! runs in its own user, mount, pid and UTS namespaces, under a pivot_root into the image, so
//! the builder's files, credentials and store are not in its view at all.
//! `RUN --security=insecure` (which the build must allow with `--allow security.insecure`)
//! skips all of this, as BuildKit does.

use std::fs;
use std::path::Path;

use caps::{CapSet, Capability};
use nix::mount::{MsFlags, mount};

use super::SandboxError;

/// Docker's default capabilities for a container: what a build step keeps.
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

/// Paths under /proc (and /sys) hidden from the step: files behind /dev/null, dirs behind an
/// empty read-only tmpfs.
pub const MASKED_PATHS: [&str; 10] = [
    "proc/acpi",
    "proc/asound",
    "proc/interrupts",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
];

/// Paths under /proc the step may read but not write.
pub const READONLY_PATHS: [&str; 5] = [
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

/// Masks and write-protects /proc paths in the rootfs at `root` (before pivot_root).
pub fn mask_proc(root: &Path) -> Result<(), SandboxError> {
    for rel in MASKED_PATHS {
        let p = root.join(rel);
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        let res = if meta.is_dir() {
            mount(
                Some("tmpfs"),
                &p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0"),
            )
        } else {
            mount(
                Some(Path::new("/dev/null")),
                &p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        res.map_err(|e| SandboxError::sys(format!("masking /{rel}"), e))?;
    }
    for rel in READONLY_PATHS {
        let p = root.join(rel);
        if fs::symlink_metadata(&p).is_err() {
            continue;
        }
        mount(
            Some(&p),
            &p,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| SandboxError::sys(format!("binding /{rel}"), e))?;
        mount(
            None::<&str>,
            &p,
            None::<&str>,
            MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| SandboxError::sys(format!("making /{rel} read-only"), e))?;
    }
    Ok(())
}

/// Cuts the capability bounding set to [`DEFAULT_CAPS`], limits a root step's own capabilities
/// to it, and sets `no_new_privs`. Called in the step's process right before exec.
pub fn restrict_process() -> Result<(), SandboxError> {
    let keep: caps::CapsHashSet = DEFAULT_CAPS.into_iter().collect();
    let all = caps::all();
    for cap in all.difference(&keep) {
        // A capability the running kernel does not know cannot be dropped; nothing to do.
        if let Err(e) = caps::drop(None, CapSet::Bounding, *cap)
            && caps::has_cap(None, CapSet::Bounding, *cap).unwrap_or(false)
        {
            return Err(SandboxError::Setup(format!(
                "dropping {cap} from the bounding set: {e}"
            )));
        }
    }
    for set in [CapSet::Effective, CapSet::Permitted, CapSet::Inheritable] {
        let current = caps::read(None, set)
            .map_err(|e| SandboxError::Setup(format!("reading capabilities: {e}")))?;
        let limited: caps::CapsHashSet = current.intersection(&keep).copied().collect();
        caps::set(None, set, &limited)
            .map_err(|e| SandboxError::Setup(format!("limiting capabilities: {e}")))?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| SandboxError::sys("setting no_new_privs", e))
}
