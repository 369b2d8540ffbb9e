//! What this machine allows a build to do, found by trying it: `shmocker detect` prints it, and
//! every `shmocker build` starts from it to pick its isolation and snapshotter (see [`ladder`]).
//!
//! [`run`] forks throwaway children for the probes that need namespaces (see [`probes`]), reads
//! the host's security state from /proc, recognises the CI environment from [`matrix`], and maps
//! each failure (by its errno and that state) to a [`Problem`]: a cause, and the fix for this
//! environment — the matrix file's own words when it has them, a general fix otherwise. The
//! caller must still be single-threaded. docs/detect.md documents the JSON form.

pub mod cache;
pub mod ladder;
pub mod matrix;
pub mod netstack;
pub mod probes;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::sandbox::userns::{self, IdMapping};

/// Version of the JSON document; bumped only when a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

/// A cause `detect` can name. The ids are stable: matrix files and docs refer to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Problem {
    UsernsApparmor,
    UsernsSeccomp,
    UsernsSysctl,
    UsernsLimit,
    MountDenied,
    NoUidmap,
    NoSubids,
    SubidMapFailed,
    NoNewPrivs,
    OverlayStoreOnOverlay,
    OverlayUnavailable,
    NoDevFuse,
    DevFuseDenied,
    NoFuseOverlayfs,
    ProcMasked,
}

impl Problem {
    pub const ALL: [Problem; 15] = [
        Problem::UsernsApparmor,
        Problem::UsernsSeccomp,
        Problem::UsernsSysctl,
        Problem::UsernsLimit,
        Problem::MountDenied,
        Problem::NoUidmap,
        Problem::NoSubids,
        Problem::SubidMapFailed,
        Problem::NoNewPrivs,
        Problem::OverlayStoreOnOverlay,
        Problem::OverlayUnavailable,
        Problem::NoDevFuse,
        Problem::DevFuseDenied,
        Problem::NoFuseOverlayfs,
        Problem::ProcMasked,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Problem::UsernsApparmor => "userns-apparmor",
            Problem::UsernsSeccomp => "userns-seccomp",
            Problem::UsernsSysctl => "userns-sysctl",
            Problem::UsernsLimit => "userns-limit",
            Problem::MountDenied => "mount-denied",
            Problem::NoUidmap => "no-uidmap",
            Problem::NoSubids => "no-subids",
            Problem::SubidMapFailed => "subid-map-failed",
            Problem::NoNewPrivs => "no-new-privs",
            Problem::OverlayStoreOnOverlay => "overlay-store-on-overlay",
            Problem::OverlayUnavailable => "overlay-unavailable",
            Problem::NoDevFuse => "no-dev-fuse",
            Problem::DevFuseDenied => "dev-fuse-denied",
            Problem::NoFuseOverlayfs => "no-fuse-overlayfs",
            Problem::ProcMasked => "proc-masked",
        }
    }

    pub fn from_id(id: &str) -> Option<Problem> {
        Problem::ALL.into_iter().find(|p| p.id() == id)
    }

    pub fn cause(self) -> &'static str {
        match self {
            Problem::UsernsApparmor => {
                "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1, the Ubuntu 24.04 default)"
            }
            Problem::UsernsSeccomp => {
                "a seccomp filter denies unshare and mount (the default profile of Docker and containerd for a container without CAP_SYS_ADMIN)"
            }
            Problem::UsernsSysctl => {
                "unprivileged user namespaces are switched off (kernel.unprivileged_userns_clone=0)"
            }
            Problem::UsernsLimit => {
                "no user namespace may be created (user.max_user_namespaces is 0 or used up)"
            }
            Problem::MountDenied => {
                "mounting is denied inside the user namespace (an AppArmor or SELinux policy of the container)"
            }
            Problem::NoUidmap => "newuidmap/newgidmap are not installed",
            Problem::NoSubids => {
                "the user has no subordinate ID range in /etc/subuid and /etc/subgid"
            }
            Problem::SubidMapFailed => {
                "newuidmap/newgidmap refused the range (not setuid root, or the range is not granted)"
            }
            Problem::NoNewPrivs => {
                "no_new_privs is set, so the setuid newuidmap/newgidmap cannot gain privileges (allowPrivilegeEscalation: false)"
            }
            Problem::OverlayStoreOnOverlay => {
                "the store is on an overlay filesystem, which overlayfs cannot use as its upper layer"
            }
            Problem::OverlayUnavailable => {
                "kernel overlayfs does not work in a user namespace here (Linux < 5.11, or a store filesystem without the needed xattrs)"
            }
            Problem::NoDevFuse => "/dev/fuse does not exist in this container",
            Problem::DevFuseDenied => "/dev/fuse exists but cannot be opened",
            Problem::NoFuseOverlayfs => "fuse-overlayfs is not installed (not in PATH)",
            Problem::ProcMasked => {
                "a fresh /proc cannot be mounted (the container masks parts of /proc); steps get the host's /proc bound instead"
            }
        }
    }

    /// The fix when the environment is not recognised or its matrix file has none.
    pub fn general_fix(self, user: &str) -> String {
        match self {
            Problem::UsernsApparmor => "allow user namespaces for shmocker with an AppArmor profile: write /etc/apparmor.d/shmocker with `abi <abi/4.0>, include <tunables/global> /usr/local/bin/shmocker flags=(unconfined) { userns, }` and run `sudo apparmor_parser -r /etc/apparmor.d/shmocker`; or switch the restriction off: `sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`".into(),
            Problem::UsernsSeccomp => "run the container with `--security-opt seccomp=unconfined` (or a seccomp profile that allows unshare, clone and mount)".into(),
            Problem::UsernsSysctl => "`sudo sysctl -w kernel.unprivileged_userns_clone=1`".into(),
            Problem::UsernsLimit => "`sudo sysctl -w user.max_user_namespaces=28633`".into(),
            Problem::MountDenied => "run the container with `--security-opt apparmor=unconfined` (and `--security-opt label=disable` under SELinux)".into(),
            Problem::NoUidmap => "`apt-get install uidmap` (Debian, Ubuntu), `dnf install shadow-utils` (RHEL, Fedora), `apk add shadow-uidmap` (Alpine)".into(),
            Problem::NoSubids => format!("`sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`"),
            Problem::SubidMapFailed => "`sudo apt-get install --reinstall uidmap` (newuidmap and newgidmap must be setuid root) and check the user's lines in /etc/subuid and /etc/subgid".into(),
            Problem::NoNewPrivs => "allow privilege escalation for the build (`allowPrivilegeEscalation: true` in the container's securityContext), or accept single-ID builds".into(),
            Problem::OverlayStoreOnOverlay => "put the store on a volume: `-v shmocker-store:/var/lib/shmocker` (or `--root` on any non-overlay directory, such as a mounted volume or tmpfs)".into(),
            Problem::OverlayUnavailable => "use Linux >= 5.11, or keep the store on ext4, xfs, btrfs or tmpfs; shmocker falls back to fuse-overlayfs or copying".into(),
            Problem::NoDevFuse => "give the container the device: `--device /dev/fuse`".into(),
            Problem::DevFuseDenied => "`sudo chmod 0666 /dev/fuse`, or allow the device to the container (`--device /dev/fuse`)".into(),
            Problem::NoFuseOverlayfs => "`apt-get install fuse-overlayfs` (Debian, Ubuntu), `dnf install fuse-overlayfs` (RHEL), `apk add fuse-overlayfs` (Alpine)".into(),
            Problem::ProcMasked => "nothing needed; for a private /proc run the container with `--security-opt systempaths=unconfined`".into(),
        }
    }
}

/// One probe, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub name: String,
    /// `ok`, `failed` or `skipped` (a probe it depends on failed).
    pub status: &'static str,
    pub detail: String,
    /// The errno name of the failing call, when there was one.
    pub errno: Option<String>,
    pub problem: Option<Problem>,
    pub cause: Option<String>,
    pub fix: Option<String>,
}

impl Probe {
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// Security state of this process and its store, read from /proc and statfs.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub uid: u32,
    pub user: String,
    pub kernel: String,
    /// 0 off, 1 strict, 2 filter (/proc/self/status `Seccomp`).
    pub seccomp: Option<u32>,
    pub no_new_privs: Option<bool>,
    /// /proc/self/status `CapEff`, hex.
    pub cap_eff: Option<String>,
    pub cap_sys_admin: bool,
    pub apparmor: Option<String>,
    pub in_container: bool,
    /// sysctl name -> value, for those present.
    pub sysctls: BTreeMap<String, String>,
    pub store: Store,
}

#[derive(Debug, Clone, Serialize)]
pub struct Store {
    pub path: PathBuf,
    /// Filesystem type from statfs (`ext4`, `overlay`, `tmpfs`, `nfs`, ... or the magic in hex).
    pub fs_type: String,
    pub mount_point: Option<String>,
    /// `noexec`, `nodev`, `nosuid`, `ro` where set on the store's mount.
    pub flags: Vec<String>,
}

/// The recognised CI environment.
#[derive(Debug, Clone, Serialize)]
pub struct Recognised {
    pub id: String,
    pub name: String,
    pub ci: String,
    pub constraints: Vec<String>,
    pub fixes: BTreeMap<String, String>,
}

/// Everything `detect` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub host: Host,
    pub environment: Option<Recognised>,
    pub probes: Vec<Probe>,
    pub elapsed_ms: u64,
    /// `--network private`: slirp4netns and /dev/net/tun.
    pub network: netstack::NetworkStack,
}

impl Report {
    pub fn probe(&self, name: &str) -> Option<&Probe> {
        self.probes.iter().find(|p| p.name == name)
    }

    pub fn works(&self, name: &str) -> bool {
        self.probe(name).is_some_and(Probe::ok)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("cannot use {} for the probes: {source}; give a writable store with --root DIR", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Matrix(#[from] matrix::MatrixError),
}

/// The probes' work directory in `store`: a fresh temp name (see `store::temp_name`), so that
/// probes run at once in containers sharing a store never use (or remove) each other's, and a
/// killed run's directory is removed by the next build.
fn probe_dir(store: &Path) -> PathBuf {
    store.join("tmp").join(crate::store::temp_name("detect"))
}

/// Runs every probe with `store` (created if missing) as the place a build would write. Call
/// while the process is single-threaded.
pub fn run(store: &Path, mapping: &IdMapping) -> Result<Report, DetectError> {
    let started = Instant::now();
    let (raws, network) = run_probes(store, mapping)?;
    assemble(store, mapping, raws, network, started)
}

/// The probes that fork, write in the store or run a program (what [`cache`] keeps), and the
/// in-place probe (which [`assemble`]'s callers may take afresh).
fn run_probes(
    store: &Path,
    mapping: &IdMapping,
) -> Result<(Vec<probes::Raw>, netstack::NetworkStack), DetectError> {
    let store_err = |source| DetectError::Store {
        path: store.to_path_buf(),
        source,
    };
    let work = probe_dir(store);
    fs::create_dir_all(&work).map_err(store_err)?;
    let mut raws = probes::namespace_probes(&work);
    raws.insert(2, probes::mapping_probe(mapping));
    raws.push(probes::chroot_probe(&work));
    raws.push(probes::in_place_probe());
    raws.push(probes::reflink_probe(&work));
    // Overlayfs' mode-0 work dir included (see `store::remove_tree`).
    crate::store::remove_tree(&work);
    Ok((raws, netstack::probe()))
}

/// The report from the probes' findings: host facts read now, the environment recognised now,
/// and each failure mapped to its cause and fix.
fn assemble(
    store: &Path,
    mapping: &IdMapping,
    raws: Vec<probes::Raw>,
    network: netstack::NetworkStack,
    started: Instant,
) -> Result<Report, DetectError> {
    let status = proc_status();
    let host = host_facts(store, &status);
    let envs = matrix::environments()?;
    let recognised = matrix::recognise(&envs, &matrix::Host::current(status)).map(|e| Recognised {
        id: e.id.clone(),
        name: e.name.clone(),
        ci: e.ci.clone(),
        constraints: e.constraints.clone(),
        fixes: e.fixes.clone(),
    });
    let probes = raws
        .into_iter()
        .map(|raw| {
            let problem = if raw.ok == Some(false) {
                diagnose(&raw, &host, mapping)
            } else {
                None
            };
            let fix = problem.map(|p| {
                recognised
                    .as_ref()
                    .and_then(|r| r.fixes.get(p.id()).cloned())
                    .unwrap_or_else(|| p.general_fix(&host.user))
            });
            Probe {
                status: match raw.ok {
                    Some(true) => "ok",
                    Some(false) => "failed",
                    None => "skipped",
                },
                name: raw.name,
                detail: raw.detail,
                errno: raw.errno,
                problem,
                cause: problem.map(|p| p.cause().to_string()),
                fix,
            }
        })
        .collect();
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        host,
        environment: recognised,
        probes,
        elapsed_ms: started.elapsed().as_millis() as u64,
        network,
    })
}

/// Maps a failed probe to its cause, from its errno and the host's state.
fn diagnose(raw: &probes::Raw, host: &Host, mapping: &IdMapping) -> Option<Problem> {
    let errno = raw.errno.as_deref().unwrap_or("");
    let sysctl = |k: &str| host.sysctls.get(k).map(String::as_str);
    let apparmor_restricts = sysctl("kernel.apparmor_restrict_unprivileged_userns") == Some("1");
    let denied = matches!(errno, "EPERM" | "EACCES");
    let userns_problem = || {
        if apparmor_restricts {
            Problem::UsernsApparmor
        } else if sysctl("kernel.unprivileged_userns_clone") == Some("0") {
            Problem::UsernsSysctl
        } else {
            Problem::UsernsSeccomp
        }
    };
    match raw.name.as_str() {
        "userns" if errno == "ENOSPC" || sysctl("user.max_user_namespaces") == Some("0") => {
            Some(Problem::UsernsLimit)
        }
        "userns" => Some(userns_problem()),
        // Under Ubuntu's restriction the namespace is made but holds no capabilities.
        "map-single" | "mount-ns" | "mount-tmpfs" if apparmor_restricts => {
            Some(Problem::UsernsApparmor)
        }
        "map-single" => Some(userns_problem()),
        "mount-ns" | "mount-tmpfs" if denied => Some(Problem::MountDenied),
        "mount-ns" | "mount-tmpfs" => Some(Problem::MountDenied),
        "map-subordinate" => Some(match mapping {
            IdMapping::Single { reason, .. } if reason.contains("not found") => Problem::NoUidmap,
            IdMapping::Single { .. } => Problem::NoSubids,
            _ if host.no_new_privs == Some(true) => Problem::NoNewPrivs,
            _ => Problem::SubidMapFailed,
        }),
        "overlay-userxattr" if host.store.fs_type == "overlay" => {
            Some(Problem::OverlayStoreOnOverlay)
        }
        "overlay-userxattr" if denied && apparmor_restricts => Some(Problem::UsernsApparmor),
        "overlay-userxattr" => Some(Problem::OverlayUnavailable),
        // Without userxattr overlayfs wants trusted.* xattrs, which only real root may set:
        // failing here is expected, and shmocker does not need it.
        "overlay-trusted" => None,
        "fuse-overlayfs" if raw.detail.contains("not in PATH") => Some(Problem::NoFuseOverlayfs),
        "fuse-overlayfs" if raw.detail.contains("/dev/fuse") && errno == "ENOENT" => {
            Some(Problem::NoDevFuse)
        }
        "fuse-overlayfs" if raw.detail.contains("/dev/fuse") => Some(Problem::DevFuseDenied),
        "fuse-overlayfs" if host.store.fs_type == "overlay" => None,
        "fuse-overlayfs" => Some(Problem::DevFuseDenied),
        "proc-pidns" => Some(Problem::ProcMasked),
        _ => None,
    }
}

/// Fields of /proc/self/status, by name.
pub fn proc_status() -> BTreeMap<String, String> {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn host_facts(store: &Path, status: &BTreeMap<String, String>) -> Host {
    let uid = nix::unistd::geteuid().as_raw();
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string());
    let cap_eff = status.get("CapEff").cloned();
    let cap_sys_admin = cap_eff
        .as_deref()
        .and_then(|c| u64::from_str_radix(c, 16).ok())
        .is_some_and(|c| c & (1 << 21) != 0);
    let apparmor = [
        "/proc/self/attr/apparmor/current",
        "/proc/self/attr/current",
    ]
    .iter()
    .find_map(|p| fs::read_to_string(p).ok())
    .map(|s| s.trim_end_matches(['\0', '\n']).trim().to_string())
    .filter(|s| !s.is_empty());
    let mut sysctls = BTreeMap::new();
    for name in [
        "user.max_user_namespaces",
        "kernel.unprivileged_userns_clone",
        "kernel.apparmor_restrict_unprivileged_userns",
    ] {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        if let Ok(v) = fs::read_to_string(path) {
            sysctls.insert(name.to_string(), v.trim().to_string());
        }
    }
    let in_container = Path::new("/.dockerenv").exists()
        || Path::new("/run/.containerenv").exists()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    Host {
        uid,
        user,
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        seccomp: status.get("Seccomp").and_then(|s| s.parse().ok()),
        no_new_privs: status.get("NoNewPrivs").map(|s| s == "1"),
        cap_eff,
        cap_sys_admin,
        apparmor,
        in_container,
        sysctls,
        store: store_facts(store),
    }
}

fn fs_name(magic: i64) -> String {
    match magic {
        0x794c7630 => "overlay".into(),
        0x01021994 => "tmpfs".into(),
        0x6969 => "nfs".into(),
        0xEF53 => "ext4".into(),
        0x58465342 => "xfs".into(),
        0x9123683E => "btrfs".into(),
        0x2FC12FC1 => "zfs".into(),
        0x65735546 => "fuse".into(),
        0xFF534D42 => "cifs".into(),
        0x01021997 => "9p".into(),
        other => format!("{other:#x}"),
    }
}

fn store_facts(store: &Path) -> Store {
    let path = fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
    let fs_type = nix::sys::statfs::statfs(&path)
        .map(|s| fs_name(s.filesystem_type().0))
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let (mount_point, flags) = mount_of(&path).unwrap_or_default();
    Store {
        path,
        fs_type,
        mount_point,
        flags,
    }
}

/// The /proc/self/mountinfo line of the mount holding `path`, without its first two fields (the
/// mount ids change with every mount; the rest names the filesystem, its device, its mount
/// point and its options): a remount with other options, or another filesystem mounted there,
/// shows as another line.
pub(crate) fn mountinfo_line(path: &Path) -> Option<String> {
    mount_fields(path).map(|(_, f)| f[2..].join(" "))
}

/// The mount point holding `path` and its noexec/nodev/nosuid/ro flags, from mountinfo.
fn mount_of(path: &Path) -> Option<(Option<String>, Vec<String>)> {
    let (mp, f) = mount_fields(path)?;
    let flags: Vec<String> = f[5]
        .split(',')
        .filter(|o| ["noexec", "nodev", "nosuid", "ro"].contains(o))
        .map(str::to_string)
        .collect();
    Some((Some(mp), flags))
}

/// The mount point holding `path` and the fields of its /proc/self/mountinfo line (at least
/// six): the longest mount point above `path`, and of those the last line, which is mounted
/// over the earlier ones.
fn mount_fields(path: &Path) -> Option<(String, Vec<String>)> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(String, Vec<String>)> = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 6 {
            continue;
        }
        let mp = f[4].replace("\\040", " ");
        if path.starts_with(&mp) && best.as_ref().is_none_or(|(b, _)| mp.len() >= b.len()) {
            best = Some((mp, f.iter().map(|s| s.to_string()).collect()));
        }
    }
    best
}

/// The report as a table for people.
pub fn render_table(report: &Report, choice: Option<&ladder::Choice>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let h = &report.host;
    let _ = writeln!(
        out,
        "shmocker detect: user {} (uid {}), kernel {}, store {} ({}{})",
        h.user,
        h.uid,
        h.kernel,
        h.store.path.display(),
        h.store.fs_type,
        if h.store.flags.is_empty() {
            String::new()
        } else {
            format!(", {}", h.store.flags.join(","))
        }
    );
    let _ = writeln!(
        out,
        "security: seccomp {}, no_new_privs {}, CAP_SYS_ADMIN {}, AppArmor {}{}",
        match h.seccomp {
            Some(0) => "off",
            Some(1) => "strict",
            Some(2) => "filter",
            _ => "unknown",
        },
        h.no_new_privs
            .map_or("unknown", |b| if b { "yes" } else { "no" }),
        if h.cap_sys_admin { "yes" } else { "no" },
        h.apparmor.as_deref().unwrap_or("none"),
        if h.in_container {
            ", in a container"
        } else {
            ""
        }
    );
    if !h.sysctls.is_empty() {
        let s: Vec<String> = h.sysctls.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "sysctls: {}", s.join(", "));
    }
    match &report.environment {
        Some(e) => {
            let _ = writeln!(out, "environment: {} ({})", e.name, e.id);
            for c in &e.constraints {
                let _ = writeln!(out, "  usually: {c}");
            }
        }
        None => {
            let _ = writeln!(out, "environment: not recognised");
        }
    }
    let _ = writeln!(out);
    let width = report
        .probes
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "{:width$}  {:7}  detail", "probe", "result");
    for p in &report.probes {
        let detail = match &p.errno {
            Some(e) => format!("{} ({e})", p.detail),
            None => p.detail.clone(),
        };
        let _ = writeln!(out, "{:width$}  {:7}  {detail}", p.name, p.status);
        if let Some(cause) = &p.cause {
            let _ = writeln!(out, "{:width$}           cause: {cause}", "");
        }
        if let Some(fix) = &p.fix {
            let _ = writeln!(out, "{:width$}           fix: {fix}", "");
        }
    }
    if let Some(choice) = choice {
        let _ = writeln!(out);
        out.push_str(&choice.describe());
    }
    let _ = writeln!(out);
    out.push_str(&netstack::describe(&report.network));
    if let Some(e) = &report.environment
        && !e.fixes.is_empty()
    {
        let _ = writeln!(out, "\nfixes known for {}:", e.name);
        for (problem, fix) in &e.fixes {
            let _ = writeln!(out, "  {problem}: {fix}");
        }
    }
    let _ = writeln!(out, "\n(all probes took {} ms)", report.elapsed_ms);
    out
}

/// The ID mapping a build would use, as planned from /etc/subuid and the helpers.
pub fn planned_mapping() -> IdMapping {
    userns::plan_mapping()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn host() -> Host {
        Host {
            uid: 1000,
            user: "ci".into(),
            kernel: "6.8.0".into(),
            seccomp: Some(0),
            no_new_privs: Some(false),
            cap_eff: None,
            cap_sys_admin: false,
            apparmor: None,
            in_container: false,
            sysctls: BTreeMap::new(),
            store: Store {
                path: "/s".into(),
                fs_type: "ext4".into(),
                mount_point: None,
                flags: Vec::new(),
            },
        }
    }

    #[test]
    fn probe_dirs_are_store_temps_the_cleaner_knows() {
        let store = Path::new("/s");
        let (a, b) = (probe_dir(store), probe_dir(store));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/s/tmp")));
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        let (pid, ns) = crate::store::temp_owner(&name).expect("a store temp name");
        assert_eq!(pid, std::process::id());
        assert_ne!(ns, 0, "{name}: no pid namespace");
    }

    fn raw(name: &str, errno: &str, detail: &str) -> probes::Raw {
        probes::Raw {
            name: name.into(),
            ok: Some(false),
            errno: Some(errno.to_string()).filter(|e| !e.is_empty()),
            detail: detail.into(),
        }
    }

    const SUB: IdMapping = IdMapping::Subordinate {
        uid: 1000,
        gid: 1000,
        subuid: (100000, 65536),
        subgid: (100000, 65536),
    };

    #[test]
    fn a_denied_user_namespace_is_blamed_on_what_the_host_shows() {
        let mut h = host();
        h.sysctls.insert(
            "kernel.apparmor_restrict_unprivileged_userns".into(),
            "1".into(),
        );
        // Ubuntu 24.04: the namespace is made, but writing the map is denied.
        assert_eq!(
            diagnose(&raw("map-single", "EPERM", ""), &h, &SUB),
            Some(Problem::UsernsApparmor)
        );
        let mut h = host();
        h.seccomp = Some(2);
        assert_eq!(
            diagnose(&raw("userns", "EPERM", ""), &h, &SUB),
            Some(Problem::UsernsSeccomp)
        );
        h.sysctls
            .insert("kernel.unprivileged_userns_clone".into(), "0".into());
        assert_eq!(
            diagnose(&raw("userns", "EPERM", ""), &h, &SUB),
            Some(Problem::UsernsSysctl)
        );
        assert_eq!(
            diagnose(&raw("userns", "ENOSPC", ""), &host(), &SUB),
            Some(Problem::UsernsLimit)
        );
    }

    #[test]
    fn id_map_failures_name_the_missing_piece() {
        let single = |reason: &str| IdMapping::Single {
            uid: 1000,
            gid: 1000,
            reason: reason.into(),
        };
        let h = host();
        let p = |m: &IdMapping, h: &Host| diagnose(&raw("map-subordinate", "", ""), h, m);
        assert_eq!(
            p(&single("newuidmap not found; fix: ..."), &h),
            Some(Problem::NoUidmap)
        );
        assert_eq!(
            p(&single("no range for ci in /etc/subuid"), &h),
            Some(Problem::NoSubids)
        );
        assert_eq!(p(&SUB, &h), Some(Problem::SubidMapFailed));
        let mut nnp = host();
        nnp.no_new_privs = Some(true);
        assert_eq!(p(&SUB, &nnp), Some(Problem::NoNewPrivs));
        assert!(
            Problem::NoSubids
                .general_fix("ci")
                .contains("--add-subuids")
        );
    }

    #[test]
    fn storage_and_fuse_failures() {
        let mut on_overlay = host();
        on_overlay.store.fs_type = "overlay".into();
        assert_eq!(
            diagnose(&raw("overlay-userxattr", "EINVAL", ""), &on_overlay, &SUB),
            Some(Problem::OverlayStoreOnOverlay)
        );
        assert_eq!(
            diagnose(&raw("overlay-userxattr", "EINVAL", ""), &host(), &SUB),
            Some(Problem::OverlayUnavailable)
        );
        assert_eq!(
            diagnose(&raw("overlay-trusted", "EINVAL", ""), &host(), &SUB),
            None
        );
        let fuse = |errno, detail| diagnose(&raw("fuse-overlayfs", errno, detail), &host(), &SUB);
        assert_eq!(
            fuse("ENOENT", "opening /dev/fuse: No such file"),
            Some(Problem::NoDevFuse)
        );
        assert_eq!(
            fuse("EACCES", "opening /dev/fuse: Permission denied"),
            Some(Problem::DevFuseDenied)
        );
        assert_eq!(
            fuse("ENOENT", "fuse-overlayfs is not in PATH"),
            Some(Problem::NoFuseOverlayfs)
        );
    }

    #[test]
    fn every_problem_id_round_trips() {
        for p in Problem::ALL {
            assert_eq!(Problem::from_id(p.id()), Some(p));
            assert!(!p.cause().is_empty() && !p.general_fix("u").is_empty());
        }
    }
}
