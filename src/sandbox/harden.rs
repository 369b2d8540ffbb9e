//! What a RUN step may not do, applied by its pid 1 and by the step's process just before exec.
//!
//! The defaults follow Docker's for containers (moby's `oci/defaults.go`): the capability
//! bounding set is cut to Docker's default set, `no_new_privs` is set so that nothing the step
//! executes can gain privileges, a seccomp filter denies the system calls Docker's default
//! profile denies a container without extra capabilities (see [`install_seccomp`]), and /proc
//! paths that reveal or change the host (kcore, keys, timer lists, sysrq-trigger, /proc/sys,
//! ...) are masked or made read-only. The step already
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
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| SandboxError::sys("setting no_new_privs", e))?;
    install_seccomp()
}

/// System calls a step may not make (EPERM), from Docker's default seccomp profile
/// (moby `profiles/seccomp/default.json`) for a container without CAP_SYS_ADMIN, CAP_SYS_MODULE,
/// CAP_SYS_BOOT, CAP_SYS_TIME, CAP_SYS_PTRACE, CAP_SYS_NICE, CAP_SYSLOG, CAP_SYS_PACCT or
/// CAP_BPF: namespaces and mounts (a new user namespace would hand the step a full set of
/// capabilities over its own mounts), the kernel keyring (not namespaced), kernel modules,
/// kexec, reboot, the clocks, swap, quotas, BPF, perf events, userfaultfd, io_uring, handles
/// to files by inode, NUMA policy, accounting and the kernel log. Several of these already
/// fail for want of a capability; the filter also holds where a step finds another way to one.
/// A denylist rather than Docker's allowlist: a system call that is new to this list's
/// authors (and harmless) keeps working.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const DENIED_SYSCALLS: &[nix::libc::c_long] = {
    use nix::libc::*;
    &[
        SYS_acct,
        SYS_add_key,
        SYS_bpf,
        SYS_clock_adjtime,
        SYS_clock_settime,
        SYS_delete_module,
        SYS_fanotify_init,
        SYS_finit_module,
        SYS_fsconfig,
        SYS_fsmount,
        SYS_fsopen,
        SYS_fspick,
        SYS_get_mempolicy,
        SYS_init_module,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_io_uring_setup,
        SYS_kcmp,
        #[cfg(target_arch = "x86_64")]
        SYS_kexec_file_load,
        // kexec_file_load on aarch64 (asm-generic 294); libc's musl aarch64 module lacks it.
        #[cfg(target_arch = "aarch64")]
        294,
        SYS_kexec_load,
        SYS_keyctl,
        SYS_lookup_dcookie,
        SYS_mbind,
        SYS_mount,
        SYS_mount_setattr,
        SYS_move_mount,
        SYS_move_pages,
        SYS_name_to_handle_at,
        SYS_open_by_handle_at,
        SYS_open_tree,
        SYS_perf_event_open,
        SYS_pivot_root,
        SYS_quotactl,
        SYS_reboot,
        SYS_request_key,
        SYS_set_mempolicy,
        SYS_setns,
        SYS_settimeofday,
        SYS_swapoff,
        SYS_swapon,
        SYS_syslog,
        SYS_umount2,
        SYS_unshare,
        SYS_userfaultfd,
        SYS_vhangup,
        #[cfg(target_arch = "x86_64")]
        SYS_ioperm,
        #[cfg(target_arch = "x86_64")]
        SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        SYS_sysfs,
        #[cfg(target_arch = "x86_64")]
        SYS__sysctl,
        #[cfg(target_arch = "x86_64")]
        SYS_uselib,
        #[cfg(target_arch = "x86_64")]
        SYS_ustat,
    ]
};

/// `clone` flags that make namespaces: denied, as Docker's profile does.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const NAMESPACE_FLAGS: [nix::libc::c_int; 7] = [
    nix::libc::CLONE_NEWNS,
    nix::libc::CLONE_NEWUTS,
    nix::libc::CLONE_NEWIPC,
    nix::libc::CLONE_NEWUSER,
    nix::libc::CLONE_NEWPID,
    nix::libc::CLONE_NEWNET,
    nix::libc::CLONE_NEWCGROUP,
];

/// Installs the step's seccomp filters on the calling thread (after `no_new_privs`, which lets
/// an unprivileged process install one): [`DENIED_SYSCALLS`] and `clone` with a namespace flag
/// fail with EPERM; `clone3`, whose flags sit in memory a filter cannot read, fails with ENOSYS
/// so that libc falls back to `clone`, as under Docker.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn install_seccomp() -> Result<(), SandboxError> {
    use std::collections::BTreeMap;

    use seccompiler::{
        BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule,
    };

    let arch: seccompiler::TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SandboxError::Setup(format!("seccomp: {e:?}")))?;
    let err = |e: seccompiler::BackendError| SandboxError::Setup(format!("seccomp filter: {e}"));

    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED_SYSCALLS.iter().map(|&nr| (nr, vec![])).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            let flag = u64::from(flag.cast_unsigned());
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    rules.insert(nix::libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(nix::libc::EPERM.cast_unsigned()),
        arch,
    )
    .map_err(err)?;
    let clone3 = SeccompFilter::new(
        [(nix::libc::SYS_clone3, vec![])].into(),
        SeccompAction::Allow,
        SeccompAction::Errno(nix::libc::ENOSYS.cast_unsigned()),
        arch,
    )
    .map_err(err)?;
    for filter in [deny, clone3] {
        let program: BpfProgram = filter.try_into().map_err(err)?;
        seccompiler::apply_filter(&program)
            .map_err(|e| SandboxError::Setup(format!("installing the seccomp filter: {e}")))?;
    }
    Ok(())
}

/// No filter where seccompiler cannot build one (it knows x86_64 and aarch64, the targets
/// shmocker is released for).
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn install_seccomp() -> Result<(), SandboxError> {
    Ok(())
}
