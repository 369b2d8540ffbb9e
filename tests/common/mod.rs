//! Shared test harness: the environment made by tests/env/setup.sh (registries on 127.0.0.1, the
//! unprivileged test user, base images), running shmocker as root or as that user, and reading
//! results back with independent tools (skopeo, umoci, buildah).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

pub struct TestEnv {
    vars: HashMap<String, String>,
}

/// The environment written by tests/env/setup.sh. Fails loudly when it is missing: a test that
/// cannot reach its registry must not pass.
pub fn env() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = std::env::var("SHMOCKER_TESTENV_DIR")
            .unwrap_or_else(|_| "/var/tmp/shmocker-testenv".into());
        let path = Path::new(&dir).join("env");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: the test environment is not set up; run scripts/test.sh (or tests/env/setup.sh as root)",
                path.display()
            )
        });
        let vars: HashMap<String, String> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        for key in ["SHMOCKER_TEST_REGISTRY", "SHMOCKER_TEST_USER", "SHMOCKER_TEST_BUSYBOX_IMAGE"] {
            assert!(
                vars.contains_key(key),
                "{key} missing from {}: run scripts/test.sh, which builds the base images",
                path.display()
            );
        }
        TestEnv { vars }
    })
}

impl TestEnv {
    pub fn var(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from the test env file"))
    }
    pub fn registry(&self) -> &str {
        self.var("SHMOCKER_TEST_REGISTRY")
    }
    pub fn busybox(&self) -> &str {
        self.var("SHMOCKER_TEST_BUSYBOX_IMAGE")
    }
    pub fn user(&self) -> &str {
        self.var("SHMOCKER_TEST_USER")
    }
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from(
            self.vars
                .get("SHMOCKER_TEST_STATE_DIR")
                .cloned()
                .unwrap_or_else(|| "/var/tmp/shmocker-testenv".into()),
        )
    }
}

/// A fresh tag in the plain test registry.
pub fn unique_ref(name: &str) -> String {
    format!("{}/tests/{name}:{}", env().registry(), unique())
}

pub fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "t{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Root,
    /// The unprivileged test user, with subordinate ID ranges.
    User,
}

/// A directory the given user owns and can use as a store or output dir; removed on drop.
pub fn scratch_dir(who: Who) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("shmocker-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    if who == Who::User {
        run_ok(Command::new("chown").arg(env().user()).arg(dir.path()));
    }
    dir
}

/// A build context with the given files (path -> contents), readable by the test user.
pub fn context(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = scratch_dir(Who::Root);
    for (path, contents) in files {
        let p = dir.path().join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, contents).unwrap();
    }
    run_ok(Command::new("chmod").arg("-R").arg("a+rX").arg(dir.path()));
    dir
}

/// Copies a directory of tests/ (a Dockerfile and its context) to a place the test user can read.
pub fn fixture(name: &str) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/dockerfiles")
        .join(name);
    let dir = scratch_dir(Who::Root);
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(dir.path()),
    );
    run_ok(Command::new("chmod").arg("-R").arg("a+rX").arg(dir.path()));
    dir
}

/// The shmocker binary, at a path the test user can execute. One copy per build of the binary
/// (named by its size and mtime), shared by every test process, made once (atomically).
/// scripts/test.sh removes copies older than an hour.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_BIN_EXE_shmocker"));
        let meta = fs::metadata(src).unwrap();
        let mtime = meta
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = env().state_dir().join("bin");
        fs::create_dir_all(&dir).unwrap();
        let name = format!("shmocker-test-{}-{mtime}", meta.len());
        let dest = dir.join(&name);
        if !dest.exists() {
            let tmp = dir.join(format!("{name}.{}.partial", std::process::id()));
            fs::copy(src, &tmp).unwrap();
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
            // The first copy stays: a binary replaced under a running test would look like an
            // upgrade to it (a new inode re-runs the build's probes, see src/detect/cache.rs).
            if let Err(e) = fs::hard_link(&tmp, &dest) {
                assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
            }
            let _ = fs::remove_file(&tmp);
        }
        dest
    })
}

/// Runs `shmocker --root STORE ARGS...` as `who`.
pub fn shmocker(who: Who, store: &Path, args: &[&str]) -> Output {
    shmocker_env(who, store, args, &[])
}

/// [`shmocker`] with environment variables set for it.
pub fn shmocker_env(who: Who, store: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut cmd = match who {
        Who::Root => Command::new(binary()),
        Who::User => {
            let user = env().user();
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", "env", &format!("HOME=/home/{user}")])
                .arg(binary());
            c
        }
    };
    cmd.arg("--root").arg(store).args(args).current_dir("/");
    cmd.env_remove("SHMOCKER_ROOT");
    cmd.envs(vars.iter().copied());
    let out = cmd.output().expect("running shmocker");
    eprintln!(
        "--- shmocker {args:?} as {who:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Like [`shmocker`], and asserts success.
pub fn shmocker_ok(who: Who, store: &Path, args: &[&str]) -> Output {
    let out = shmocker(who, store, args);
    assert!(out.status.success(), "shmocker {args:?} failed");
    out
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The image config of a pushed image, read by skopeo (the raw bytes, every field kept).
pub fn remote_config(reference: &str) -> serde_json::Value {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--config",
        "--raw",
        &format!("docker://{reference}"),
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The manifest of a pushed image, read by skopeo.
pub fn remote_manifest(reference: &str) -> serde_json::Value {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("docker://{reference}"),
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether the registry has this tag (skopeo asks it directly).
pub fn remote_exists(reference: &str) -> bool {
    Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--raw",
            &format!("docker://{reference}"),
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Unpacks an image with skopeo + umoci into `dir/bundle/rootfs` and returns the rootfs path.
/// `source` is a skopeo transport reference (`docker://...`, `oci-archive:...`).
pub fn unpack(source: &str, dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        source,
        &format!("oci:{}:img", layout.display()),
    ]));
    let bundle = dir.join("bundle");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:img", layout.display()))
            .arg(&bundle),
    );
    bundle.join("rootfs")
}

/// One filesystem entry as compared between builders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub sha256: Option<String>,
    pub link: Option<String>,
    pub nlink_group: Option<u64>,
}

/// Every entry below `root` (paths relative, with a leading `/`).
pub fn tree(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
    let mut entries: Vec<_> = fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_file() {
            'f'
        } else {
            'o'
        };
        let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
        out.insert(
            rel,
            Entry {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if kind == 'f' { m.len() } else { 0 },
                sha256: (kind == 'f').then(|| hex::encode(Sha256::digest(fs::read(&p).unwrap()))),
                link: (kind == 'l').then(|| fs::read_link(&p).unwrap().display().to_string()),
                nlink_group: (kind == 'f' && m.nlink() > 1).then_some(m.nlink()),
            },
        );
        if ft.is_dir() {
            walk(root, &p, out);
        }
    }
}
