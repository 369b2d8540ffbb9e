//! Entering the build's user namespace, once, at the very start of the process.
//!
//! Everything a build does to files it unpacks (chown to container IDs, reading files owned by
//! subordinate IDs, mounting overlayfs) needs to happen as "root" inside a user namespace whose
//! IDs map onto the caller's subordinate ranges. Like `buildah unshare`, shmocker therefore runs the
//! whole build inside one user namespace: `main` calls [`enter`] before any thread exists (the
//! kernel refuses `unshare(CLONE_NEWUSER)` to a multi-threaded process), the process forks, the
//! child unshares and waits on a pipe, the parent writes the ID maps (through the setuid
//! `newuidmap`/`newgidmap` helpers, or directly when it is root), releases the child, and then only
//! forwards signals and waits. The child becomes uid 0 in the namespace and goes on to run the
//! command, tokio runtime and all.

use std::fs;
use std::io::{Read, Write};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid, fork, getegid, geteuid, pipe, setresgid, setresuid};

use super::SandboxError;

/// How the namespace's IDs map onto the host's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdMapping {
    /// The caller is root: every ID it has maps to itself (no helpers needed).
    Identity,
    /// Container root is the caller; container IDs 1.. map onto the subordinate ranges.
    Subordinate {
        uid: u32,
        gid: u32,
        subuid: (u32, u32),
        subgid: (u32, u32),
    },
    /// Only the caller's own ID exists in the namespace (no subordinate IDs or no newuidmap):
    /// files owned by other IDs cannot be created.
    Single { uid: u32, gid: u32, reason: String },
}

impl IdMapping {
    pub fn describe(&self) -> String {
        match self {
            IdMapping::Identity => "root: user namespace with the full ID map".into(),
            IdMapping::Subordinate { subuid, subgid, .. } => format!(
                "rootless: user namespace with subordinate IDs (uids {}-{}, gids {}-{})",
                subuid.0,
                subuid.0 as u64 + subuid.1 as u64 - 1,
                subgid.0,
                subgid.0 as u64 + subgid.1 as u64 - 1
            ),
            IdMapping::Single { reason, .. } => {
                format!("rootless with a single ID: only uid/gid 0 exist in the build ({reason})")
            }
        }
    }

    /// Whether the namespace has IDs beyond 0 (chown to other IDs can work).
    pub fn has_many_ids(&self) -> bool {
        !matches!(self, IdMapping::Single { .. })
    }
}

/// What [`enter`] leaves the caller with.
pub enum Entered {
    /// This is the child, now uid 0 inside the namespace: go on with the command.
    Inside(IdMapping),
    /// This is the parent; the child finished and this is the exit code to leave with.
    ParentDone(ExitCode),
}

static CHILD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: i32) {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid > 0
        && let Ok(sig) = Signal::try_from(sig)
    {
        // kill(2) is async-signal-safe.
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// The mapping this process would get, decided from /etc/subuid, /etc/subgid and the helpers.
pub fn plan_mapping() -> IdMapping {
    let uid = geteuid().as_raw();
    let gid = getegid().as_raw();
    if uid == 0 {
        return IdMapping::Identity;
    }
    let name = nix::unistd::User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    let subuid = subordinate_range("/etc/subuid", name.as_deref(), uid);
    let subgid = subordinate_range("/etc/subgid", name.as_deref(), uid);
    let who = name.clone().unwrap_or_else(|| uid.to_string());
    let missing_helper = ["newuidmap", "newgidmap"]
        .into_iter()
        .find(|h| which(h).is_none());
    match (subuid, subgid, missing_helper) {
        (Some(subuid), Some(subgid), None) => IdMapping::Subordinate {
            uid,
            gid,
            subuid,
            subgid,
        },
        (_, _, Some(helper)) => IdMapping::Single {
            uid,
            gid,
            reason: format!("{helper} not found; fix: apt-get install uidmap"),
        },
        _ => IdMapping::Single {
            uid,
            gid,
            reason: format!(
                "no range for {who} in /etc/subuid and /etc/subgid; fix: sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {who}"
            ),
        },
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The first `name:start:count` (or `uid:start:count`) line for the user.
pub fn subordinate_range(file: &str, name: Option<&str>, uid: u32) -> Option<(u32, u32)> {
    let text = fs::read_to_string(file).ok()?;
    parse_subordinate(&text, name, uid)
}

fn parse_subordinate(text: &str, name: Option<&str>, uid: u32) -> Option<(u32, u32)> {
    let uid_s = uid.to_string();
    text.lines().find_map(|line| {
        let mut parts = line.trim().split(':');
        let who = parts.next()?;
        let start = parts.next()?.parse().ok()?;
        let count: u32 = parts.next()?.parse().ok()?;
        ((Some(who) == name || who == uid_s) && count > 0).then_some((start, count))
    })
}

/// Forks; the child unshares a user namespace and gets `mapping`. Call before any thread exists.
pub fn enter(mapping: IdMapping) -> Result<Entered, SandboxError> {
    let threads = fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1);
    if threads > 1 {
        return Err(SandboxError::Setup(format!(
            "cannot create a user namespace from a process with {threads} threads (internal error: enter() must run first)"
        )));
    }
    let (ready_r, ready_w) = pipe().map_err(|e| SandboxError::sys("pipe", e))?;
    let (go_r, go_w) = pipe().map_err(|e| SandboxError::sys("pipe", e))?;
    let parent = nix::unistd::getpid();
    // SAFETY: the process is single-threaded (checked above), so the child is a complete copy and
    // may do anything, allocation included; no locks can be held by other threads.
    match unsafe { fork() }.map_err(|e| SandboxError::sys("fork", e))? {
        ForkResult::Child => {
            drop(ready_r);
            drop(go_w);
            let mut ready = fs::File::from(ready_w);
            let mut go = fs::File::from(go_r);
            let unshared = unshare(CloneFlags::CLONE_NEWUSER);
            if let (Err(e), IdMapping::Single { .. }) = (&unshared, &mapping) {
                let _ = ready.write_all(b"E");
                return Err(SandboxError::sys("unshare(CLONE_NEWUSER)", *e));
            }
            if let Err(e) = unshared {
                let _ = ready.write_all(b"E");
                return Err(userns_denied(e));
            }
            if let IdMapping::Single { uid, gid, .. } = &mapping {
                // A process may map its own IDs without helpers once setgroups is denied.
                write_single_map(*uid, *gid)?;
            }
            ready
                .write_all(b"R")
                .map_err(|e| SandboxError::io("pipe", e))?;
            let mut byte = [0u8; 1];
            let n = go
                .read(&mut byte)
                .map_err(|e| SandboxError::io("pipe", e))?;
            if n == 0 || byte[0] != b'G' {
                // The parent could not write the maps and has reported why.
                std::process::exit(125);
            }
            setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
                .map_err(|e| SandboxError::sys("setresgid(0) in the user namespace", e))?;
            setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
                .map_err(|e| SandboxError::sys("setresuid(0) in the user namespace", e))?;
            // Die with the parent: after a `kill -9` of shmocker, the build must not go on
            // writing to the store behind the next build's back. Set after the credential
            // change, which clears it; a parent already gone shows in getppid().
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|e| SandboxError::sys("prctl(PR_SET_PDEATHSIG)", e))?;
            if nix::unistd::getppid() != parent {
                std::process::exit(137);
            }
            Ok(Entered::Inside(mapping))
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            drop(go_r);
            CHILD_PID.store(child.as_raw(), Ordering::SeqCst);
            let action = SigAction::new(
                SigHandler::Handler(forward_signal),
                SaFlags::SA_RESTART,
                SigSet::empty(),
            );
            for sig in [
                Signal::SIGINT,
                Signal::SIGTERM,
                Signal::SIGHUP,
                Signal::SIGQUIT,
            ] {
                // SAFETY: the handler only loads an atomic and calls kill(2), both async-signal-safe.
                let _ = unsafe { sigaction(sig, &action) };
            }
            let mut ready = fs::File::from(ready_r);
            let mut go = fs::File::from(go_w);
            let mut byte = [0u8; 1];
            let n = ready.read(&mut byte).unwrap_or(0);
            if n == 1 && byte[0] == b'R' {
                match write_maps(child, &mapping) {
                    Ok(()) => {
                        let _ = go.write_all(b"G");
                    }
                    Err(e) => {
                        // The child gives up on "E"; the error is this call's, so the caller
                        // can say what it means (e.g. drop cached probe findings).
                        let _ = go.write_all(b"E");
                        drop(go);
                        while let Err(nix::errno::Errno::EINTR) = waitpid(child, None) {}
                        return Err(e);
                    }
                }
            }
            drop(go);
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => {
                        return Ok(Entered::ParentDone(ExitCode::from(code as u8)));
                    }
                    Ok(WaitStatus::Signaled(_, sig, _)) => {
                        return Ok(Entered::ParentDone(ExitCode::from(128 + sig as u8)));
                    }
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(SandboxError::sys("waitpid", e)),
                }
            }
        }
    }
}

fn userns_denied(e: nix::errno::Errno) -> SandboxError {
    let hint = match e {
        nix::errno::Errno::EPERM => {
            "the kernel or a security policy forbids unprivileged user namespaces (seccomp in a container, AppArmor's apparmor_restrict_unprivileged_userns on Ubuntu 24.04, or kernel.unprivileged_userns_clone=0)"
        }
        nix::errno::Errno::ENOSPC => {
            "the user namespace limit is reached (user.max_user_namespaces is 0 or exhausted)"
        }
        nix::errno::Errno::EINVAL => "the process was multi-threaded (internal error)",
        _ => "unexpected error",
    };
    SandboxError::Setup(format!(
        "cannot create a user namespace: {e}: {hint}; run `shmocker detect` for the fix that fits this machine"
    ))
}

fn write_single_map(uid: u32, gid: u32) -> Result<(), SandboxError> {
    let w = |path: &str, data: String| fs::write(path, data).map_err(|e| SandboxError::io(path, e));
    w("/proc/self/setgroups", "deny".into())?;
    w("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    w("/proc/self/gid_map", format!("0 {gid} 1\n"))
}

/// Writes `mapping` onto the user namespace of `child` (which has unshared and waits); also used
/// by `detect` to probe the mapping a build would get.
pub fn write_maps(child: Pid, mapping: &IdMapping) -> Result<(), SandboxError> {
    match mapping {
        IdMapping::Single { .. } => Ok(()),
        IdMapping::Identity => {
            // Map every ID this process itself has (all of them in the initial namespace; the
            // mapped ranges when shmocker already runs inside a user namespace).
            for kind in ["uid_map", "gid_map"] {
                let own = fs::read_to_string(format!("/proc/self/{kind}"))
                    .map_err(|e| SandboxError::io(kind, e))?;
                let map: String = own
                    .lines()
                    .filter_map(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        (f.len() == 3).then(|| format!("{} {} {}\n", f[0], f[0], f[2]))
                    })
                    .collect();
                let path = format!("/proc/{child}/{kind}");
                fs::write(&path, map).map_err(|e| SandboxError::io(&path, e))?;
            }
            Ok(())
        }
        IdMapping::Subordinate {
            uid,
            gid,
            subuid,
            subgid,
        } => {
            for (helper, own, range) in [("newuidmap", uid, subuid), ("newgidmap", gid, subgid)] {
                let out = Command::new(helper)
                    .arg(child.to_string())
                    .args(["0", &own.to_string(), "1"])
                    .args(["1", &range.0.to_string(), &range.1.to_string()])
                    .output()
                    .map_err(|e| SandboxError::io(helper, e))?;
                if !out.status.success() {
                    return Err(SandboxError::Setup(format!(
                        "{helper} failed ({}): {}; check that {helper} is setuid root (apt-get install --reinstall uidmap) and that /etc/sub{}id grants the range",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim(),
                        if *helper == *"newuidmap" { "u" } else { "g" }
                    )));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_by_name_or_uid() {
        let text = "alice:100000:65536\n1001:300000:1000\nbob:0:0\n";
        assert_eq!(
            parse_subordinate(text, Some("alice"), 1000),
            Some((100000, 65536))
        );
        assert_eq!(parse_subordinate(text, None, 1001), Some((300000, 1000)));
        assert_eq!(parse_subordinate(text, Some("bob"), 1002), None);
        assert_eq!(parse_subordinate(text, Some("carol"), 1003), None);
    }
}
