//! The probes' findings kept for the next build: `<store>/cache/detect.json`, reused while a key
//! of everything the findings depend on is unchanged (see
//! docs/adr/0010-cached-probe-results-for-builds.md). `shmocker detect` never uses it;
//! `SHMOCKER_DETECT_CACHE=0` switches it off.
//!
//! Kept: what the probes that fork, mount, write in the store or run a program found (the
//! namespace probes, the subordinate-ID map, chroot, reflink, the network stack). Taken afresh on
//! every build, as they cost a few reads: the host facts, the recognised CI environment (and so
//! every fix), and the in-place probe. The key is a few stats and small reads, no forks.
//!
//! A stale entry the key cannot see (a device cgroup changed in place, a policy reloaded) shows
//! as a step whose sandbox cannot be set up; the caller then drops the entry with [`drop_entry`]
//! and says so, and the next build probes afresh.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::{DetectError, Report, netstack, probes};
use crate::sandbox::userns::IdMapping;

/// The variable that switches the cache off (`0`).
pub const ENV: &str = "SHMOCKER_DETECT_CACHE";

/// Bumped when the entry's form or the key's meaning changes: an older entry is then a miss.
const FORMAT: u32 = 1;

/// Where the probes' findings are kept in `store`.
pub fn path(store: &Path) -> PathBuf {
    store.join("cache").join("detect.json")
}

/// Whether builds may use the cache (`SHMOCKER_DETECT_CACHE` is not `0`).
pub fn enabled() -> bool {
    std::env::var_os(ENV).is_none_or(|v| v != "0")
}

/// The key: each component's name and value.
pub type Key = BTreeMap<String, String>;

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    format: u32,
    key: Key,
    /// When the probes ran, in seconds since the epoch.
    probed_at: u64,
    raws: Vec<probes::Raw>,
    network: netstack::NetworkStack,
}

/// Where a build's report came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// From the cache; the probes ran at this time (seconds since the epoch).
    Cached { probed_at: u64 },
    /// The probes ran now, because of `why`.
    Probed { why: String, elapsed_ms: u64 },
}

impl Origin {
    /// The line a build prints under its mode.
    pub fn describe(&self) -> String {
        match self {
            Origin::Cached { probed_at } => format!(
                "probes: cached results from {} (nothing they depend on changed; {ENV}=0 probes every build)\n",
                jiff::Timestamp::from_second(*probed_at as i64)
                    .map(|t| t.to_string())
                    .unwrap_or_else(|_| probed_at.to_string())
            ),
            Origin::Probed { why, elapsed_ms } => {
                format!("probes: ran in {elapsed_ms} ms ({why})\n")
            }
        }
    }

    pub fn cached(&self) -> bool {
        matches!(self, Origin::Cached { .. })
    }
}

/// The report for a build in `store`: the cached findings when their key still holds, else the
/// probes run now (and kept, when the cache is on). Call while single-threaded.
pub fn for_build(store: &Path, mapping: &IdMapping) -> Result<(Report, Origin), DetectError> {
    report_for_build(store, mapping, false)
}

/// [`for_build`] that runs the probes whatever the cache holds (and keeps their findings), for
/// a build the cached findings would have refused.
pub fn probe_for_build(store: &Path, mapping: &IdMapping) -> Result<(Report, Origin), DetectError> {
    report_for_build(store, mapping, true)
}

fn report_for_build(
    store: &Path,
    mapping: &IdMapping,
    force: bool,
) -> Result<(Report, Origin), DetectError> {
    let started = Instant::now();
    if !enabled() {
        let report = super::run(store, mapping)?;
        let elapsed_ms = report.elapsed_ms;
        let why = format!("{ENV}=0");
        return Ok((report, Origin::Probed { why, elapsed_ms }));
    }
    fs::create_dir_all(store).map_err(|source| DetectError::Store {
        path: store.to_path_buf(),
        source,
    })?;
    let key = current_key(store, mapping);
    let file = path(store);
    let cached = if force {
        Err("the cached results would have refused this build".to_string())
    } else {
        read(&file)
    };
    let why = match cached {
        Ok(entry) if entry.key == key => {
            let mut raws = entry.raws;
            // Reads a few files and variables: always taken afresh.
            for raw in raws.iter_mut().filter(|r| r.name == "in-place") {
                *raw = probes::in_place_probe();
            }
            let report = super::assemble(store, mapping, raws, entry.network, started)?;
            let origin = Origin::Cached {
                probed_at: entry.probed_at,
            };
            return Ok((report, origin));
        }
        Ok(entry) => format!("{} since the cached results", changed(&entry.key, &key)),
        Err(why) => why,
    };
    let probed_at = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (raws, network) = super::run_probes(store, mapping)?;
    let entry = Entry {
        format: FORMAT,
        key,
        probed_at,
        raws,
        network,
    };
    // A failure that may pass (a limit reached, memory or descriptors short, a busy mount) is
    // not kept: it would hold later builds in a weaker mode until the key changed.
    let why = match transient_failure(&entry.raws) {
        Some(failure) => {
            let _ = fs::remove_file(&file);
            format!("{why}; not kept: {failure}, which may pass")
        }
        None => match write(store, &file, &entry) {
            Ok(()) => format!("{why}; kept for the next builds"),
            Err(e) => format!("{why}; not kept: writing {}: {e}", file.display()),
        },
    };
    let report = super::assemble(store, mapping, entry.raws, entry.network, started)?;
    let elapsed_ms = report.elapsed_ms;
    Ok((report, Origin::Probed { why, elapsed_ms }))
}

/// The first probe failure that may pass by the next build, if any.
fn transient_failure(raws: &[probes::Raw]) -> Option<String> {
    raws.iter().find_map(|r| {
        r.errno
            .as_deref()
            .filter(|e| TRANSIENT_ERRNOS.contains(e))
            .map(|e| format!("probe {} failed with {e}", r.name))
    })
}

/// Probe failures that say "not now" rather than "not here".
const TRANSIENT_ERRNOS: [&str; 7] = [
    "EAGAIN", "ENOMEM", "ENOSPC", "EMFILE", "ENFILE", "EINTR", "EBUSY",
];

/// The largest entry read back (a real one is a few KB).
const MAX_ENTRY: u64 = 1 << 20;

/// Removes the cached findings of `store`; true if there were some.
pub fn drop_entry(store: &Path) -> bool {
    fs::remove_file(path(store)).is_ok()
}

/// Reads an entry only from a regular file (not through a symlink) that this user owns and no
/// one else can write, of a sane size: findings decide how a build is isolated, so a store
/// others can write to (`--root` on a shared directory) must not be able to choose them.
fn read(file: &Path) -> Result<Entry, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(file)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("no cached results".into());
        }
        Err(e) => return Err(format!("cannot read the cached results: {e}")),
    };
    let m = f
        .metadata()
        .map_err(|e| format!("cannot read the cached results: {e}"))?;
    if !m.file_type().is_file()
        || m.uid() != nix::unistd::geteuid().as_raw()
        || m.mode() & 0o022 != 0
        || m.len() > MAX_ENTRY
    {
        return Err(format!(
            "the cached results at {} are not a regular file of this user that only it can write",
            file.display()
        ));
    }
    let mut bytes = Vec::new();
    f.by_ref()
        .take(MAX_ENTRY)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the cached results: {e}"))?;
    match serde_json::from_slice::<Entry>(&bytes) {
        Ok(entry) if entry.format == FORMAT => Ok(entry),
        Ok(_) => Err("the cached results are from another version".into()),
        Err(e) => Err(format!("the cached results are unreadable ({e})")),
    }
}

/// Writes `entry` atomically: a temp file in the store's `tmp/`, then a rename.
fn write(store: &Path, file: &Path, entry: &Entry) -> std::io::Result<()> {
    let tmp_dir = store.join("tmp");
    fs::create_dir_all(&tmp_dir)?;
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = tmp_dir.join(crate::store::temp_name("detect-cache"));
    let done = fs::write(&tmp, serde_json::to_vec(entry)?).and_then(|()| fs::rename(&tmp, file));
    if done.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    done
}

/// The components that differ between two keys, for the build's mode line.
fn changed(old: &Key, new: &Key) -> String {
    let mut names: Vec<&str> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(v))
        .map(|(k, _)| k.as_str())
        .chain(
            old.keys()
                .filter(|k| !new.contains_key(*k))
                .map(String::as_str),
        )
        .collect();
    names.sort_unstable();
    if names.is_empty() {
        "the key changed".into()
    } else {
        format!("{} changed", names.join(", "))
    }
}

/// A file's identity and version (or why it cannot be read): what replacing, editing,
/// `chmod` or `chown` changes.
pub fn file_fact(path: &Path) -> String {
    match fs::metadata(path) {
        Ok(m) => format!(
            "{} size {} mtime {}.{} ctime {}.{}",
            node_fact(path),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            // File capabilities (`setcap`, as Fedora gives newuidmap) change only the ctime.
            m.ctime(),
            m.ctime_nsec(),
        ),
        Err(e) => format!("{}: {}", path.display(), e.kind()),
    }
}

/// A directory's or device's identity, owner and mode (or why it cannot be read), without the
/// times and size that every write changes.
pub fn node_fact(path: &Path) -> String {
    match fs::metadata(path) {
        Ok(m) => format!(
            "{} dev {} ino {} mode {:o} owner {}:{} rdev {}",
            path.display(),
            m.dev(),
            m.ino(),
            m.mode(),
            m.uid(),
            m.gid(),
            m.rdev()
        ),
        Err(e) => format!("{}: {}", path.display(), e.kind()),
    }
}

/// The program `name` as found on `search_path` (as the probes and steps find it).
pub fn tool_fact(name: &str, search_path: &std::ffi::OsStr) -> String {
    std::env::split_paths(search_path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .map_or_else(|| "not found".into(), |p| file_fact(&p))
}

/// The store: its resolved path, its inode, and its filesystem's type and mount flags.
pub fn store_fact(store: &Path) -> String {
    let path = fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
    let fs = nix::sys::statvfs::statvfs(&path)
        .map(|s| format!("flags {:?}", s.flags()))
        .unwrap_or_else(|e| format!("statvfs: {e}"));
    let kind = nix::sys::statfs::statfs(&path)
        .map(|s| format!("type {:#x}", s.filesystem_type().0))
        .unwrap_or_else(|e| format!("statfs: {e}"));
    format!(
        "{}; {kind} {fs}; mount {}",
        node_fact(&path),
        super::mountinfo_line(&path).unwrap_or_else(|| "(not in mountinfo)".into())
    )
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\0', '\n']).trim().to_string())
        .unwrap_or_else(|e| format!("({})", e.kind()))
}

fn namespace(name: &str) -> String {
    fs::read_link(format!("/proc/self/ns/{name}"))
        .map(|l| l.display().to_string())
        .unwrap_or_else(|e| format!("({})", e.kind()))
}

/// The key of this process's probes with `store` and `mapping`: everything their findings depend
/// on that a few stats and small reads can see.
pub fn current_key(store: &Path, mapping: &IdMapping) -> Key {
    let mut key = Key::new();
    let mut put = |k: &str, v: String| {
        key.insert(k.to_string(), v);
    };
    put("format", format!("{FORMAT}.{}", super::SCHEMA_VERSION));
    // An upgrade (or a rebuild) of shmocker re-probes: its probes may have changed.
    put("shmocker", file_fact(Path::new("/proc/self/exe")));
    put("boot", read_trimmed("/proc/sys/kernel/random/boot_id"));
    put(
        "kernel",
        nix::sys::utsname::uname()
            .map(|u| {
                format!(
                    "{} {}",
                    u.release().to_string_lossy(),
                    u.version().to_string_lossy()
                )
            })
            .unwrap_or_else(|e| format!("({e})")),
    );
    put(
        "ids",
        format!(
            "uid {} gid {} euid {} egid {}",
            nix::unistd::getuid(),
            nix::unistd::getgid(),
            nix::unistd::geteuid(),
            nix::unistd::getegid()
        ),
    );
    put("mapping", format!("{mapping:?}"));
    put("store", store_fact(store));
    let status = super::proc_status();
    for field in [
        "Seccomp",
        "Seccomp_filters",
        "NoNewPrivs",
        "CapEff",
        "CapPrm",
        "CapBnd",
        "CapAmb",
    ] {
        put(
            &format!("status.{field}"),
            status.get(field).cloned().unwrap_or_default(),
        );
    }
    put(
        "security-label",
        [
            "/proc/self/attr/apparmor/current",
            "/proc/self/attr/current",
        ]
        .iter()
        .map(|p| read_trimmed(p))
        .collect::<Vec<_>>()
        .join(" | "),
    );
    for name in [
        "user/max_user_namespaces",
        "kernel/unprivileged_userns_clone",
        "kernel/apparmor_restrict_unprivileged_userns",
    ] {
        put(
            &format!("sysctl.{}", name.replace('/', ".")),
            read_trimmed(&format!("/proc/sys/{name}")),
        );
    }
    for ns in ["user", "mnt", "pid", "cgroup"] {
        put(&format!("ns.{ns}"), namespace(ns));
    }
    let search_path =
        std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    for tool in [
        "fuse-overlayfs",
        "newuidmap",
        "newgidmap",
        "slirp4netns",
        "pasta",
    ] {
        put(&format!("tool.{tool}"), tool_fact(tool, &search_path));
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        put(&format!("file.{file}"), file_fact(Path::new(file)));
    }
    for device in ["/dev/fuse", "/dev/net/tun"] {
        put(&format!("file.{device}"), node_fact(Path::new(device)));
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    fn mapping() -> IdMapping {
        IdMapping::Subordinate {
            uid: 1000,
            gid: 1000,
            subuid: (100000, 65536),
            subgid: (100000, 65536),
        }
    }

    #[test]
    fn only_safe_entries_are_read_and_passing_failures_are_not_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let entry = Entry {
            format: FORMAT,
            key: Key::new(),
            probed_at: 1,
            raws: vec![],
            network: Default::default(),
        };
        let file = dir.path().join("detect.json");
        fs::write(&file, serde_json::to_vec(&entry).unwrap()).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read(&file).is_ok());
        // Writable by others: anyone could choose this build's isolation.
        fs::set_permissions(&file, fs::Permissions::from_mode(0o666)).unwrap();
        let e = read(&file).unwrap_err();
        assert!(e.contains("not a regular file of this user"), "{e}");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        // Not through a symlink.
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(read(&link).is_err());

        let raw = |name: &str, errno: Option<&str>| probes::Raw {
            name: name.into(),
            ok: Some(errno.is_none()),
            errno: errno.map(str::to_string),
            detail: String::new(),
        };
        assert_eq!(
            transient_failure(&[raw("userns", None), raw("map-subordinate", Some("EPERM"))]),
            None
        );
        assert_eq!(
            transient_failure(&[raw("userns", Some("ENOSPC"))]).as_deref(),
            Some("probe userns failed with ENOSPC")
        );
    }

    #[test]
    fn the_key_is_stable_and_names_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let a = current_key(dir.path(), &mapping());
        assert_eq!(a, current_key(dir.path(), &mapping()));
        for k in [
            "shmocker",
            "boot",
            "kernel",
            "ids",
            "mapping",
            "store",
            "status.Seccomp",
            "status.NoNewPrivs",
            "status.CapEff",
            "status.CapBnd",
            "security-label",
            "sysctl.user.max_user_namespaces",
            "sysctl.kernel.unprivileged_userns_clone",
            "sysctl.kernel.apparmor_restrict_unprivileged_userns",
            "ns.user",
            "ns.mnt",
            "tool.fuse-overlayfs",
            "tool.newuidmap",
            "tool.newgidmap",
            "tool.slirp4netns",
            "file./etc/subuid",
            "file./etc/subgid",
            "file./dev/fuse",
            "file./dev/net/tun",
        ] {
            assert!(a.contains_key(k), "no {k} in the key");
        }
        assert!(a["boot"].len() >= 32, "{}", a["boot"]);
        assert!(a["ns.user"].starts_with("user:["), "{}", a["ns.user"]);
    }

    #[test]
    fn the_mapping_and_the_store_change_the_key() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = current_key(one.path(), &mapping());
        assert_ne!(a["store"], current_key(two.path(), &mapping())["store"]);
        let other = IdMapping::Subordinate {
            uid: 1000,
            gid: 1000,
            subuid: (200000, 65536),
            subgid: (100000, 65536),
        };
        let b = current_key(one.path(), &other);
        assert_ne!(a["mapping"], b["mapping"]);
        assert_eq!(changed(&a, &b), "mapping changed");
        // The same path, a new directory: a new inode.
        let path = one.path().join("store");
        fs::create_dir(&path).unwrap();
        let before = store_fact(&path);
        // Writing in it does not change it.
        fs::write(path.join("x"), b"x").unwrap();
        assert_eq!(before, store_fact(&path));
        fs::remove_file(path.join("x")).unwrap();
        fs::remove_dir(&path).unwrap();
        let _hold = fs::File::create(one.path().join("hold")).unwrap();
        fs::create_dir(&path).unwrap();
        assert_ne!(before, store_fact(&path));
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let chmodded = store_fact(&path);
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert_ne!(chmodded, store_fact(&path));
    }

    #[test]
    fn a_tool_changes_the_key_when_moved_touched_or_chmodded() {
        use std::os::unix::fs::PermissionsExt;
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let tool = one.path().join("fuse-overlayfs");
        fs::write(&tool, b"#!/bin/sh\n").unwrap();
        let both = std::env::join_paths([one.path(), two.path()]).unwrap();
        let found = tool_fact("fuse-overlayfs", &both);
        assert!(found.contains(&tool.display().to_string()), "{found}");
        assert_eq!(
            tool_fact("fuse-overlayfs", two.path().as_os_str()),
            "not found"
        );
        assert_eq!(tool_fact("fuse-overlayfs", OsStr::new("")), "not found");
        fs::set_permissions(&tool, fs::Permissions::from_mode(0o4755)).unwrap();
        let chmodded = tool_fact("fuse-overlayfs", &both);
        assert_ne!(found, chmodded);
        let f = fs::File::options().write(true).open(&tool).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH).unwrap();
        assert_ne!(chmodded, tool_fact("fuse-overlayfs", &both));
        // A copy earlier on the path wins, and changes the key.
        let copy = two.path().join("fuse-overlayfs");
        fs::copy(&tool, &copy).unwrap();
        let first_two = std::env::join_paths([two.path(), one.path()]).unwrap();
        assert_ne!(
            tool_fact("fuse-overlayfs", &both),
            tool_fact("fuse-overlayfs", &first_two)
        );
        // An edit of the same size in the same second still changes mtime's nanoseconds.
        let before = file_fact(&copy);
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&copy, b"#!/bin/sx\n").unwrap();
        assert_ne!(before, file_fact(&copy));
    }

    #[test]
    fn keys_name_what_changed() {
        let mut a = Key::new();
        a.insert("boot".into(), "1".into());
        a.insert("kernel".into(), "6.1".into());
        let mut b = a.clone();
        b.insert("kernel".into(), "6.8".into());
        assert_eq!(changed(&a, &b), "kernel changed");
        let mut c = b.clone();
        c.remove("boot");
        assert_eq!(changed(&a, &c), "boot, kernel changed");
    }

    #[test]
    fn entries_round_trip_and_damaged_ones_are_misses() {
        let store = tempfile::tempdir().unwrap();
        let file = path(store.path());
        assert_eq!(read(&file).unwrap_err(), "no cached results");
        let entry = Entry {
            format: FORMAT,
            key: current_key(store.path(), &mapping()),
            probed_at: 1,
            raws: vec![probes::Raw {
                name: "userns".into(),
                ok: Some(true),
                errno: None,
                detail: "unshare".into(),
            }],
            network: Default::default(),
        };
        write(store.path(), &file, &entry).unwrap();
        let back = read(&file).unwrap();
        assert_eq!((back.key, back.raws), (entry.key, entry.raws));
        assert_eq!(fs::read_dir(store.path().join("tmp")).unwrap().count(), 0);
        fs::write(&file, b"{\"format\": 1, \"key\"").unwrap();
        assert!(read(&file).unwrap_err().contains("unreadable"));
        fs::write(&file, b"{\"format\": 999, \"key\": {}, \"probed_at\": 0, \"raws\": [], \"network\": {\"private\": false, \"slirp4netns\": null, \"pasta\": null, \"dev_net_tun\": {\"ok\": false, \"detail\": \"\"}, \"fix\": null}}").unwrap();
        assert!(read(&file).unwrap_err().contains("another version"));
        assert!(drop_entry(store.path()));
        assert!(!drop_entry(store.path()));
    }
}
