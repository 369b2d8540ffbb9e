//! `shmocker detect` and the build-time ladder, each under a constraint made for real: a user
//! without subordinate IDs, a seccomp filter like Docker's default, a store on tmpfs and on an
//! overlay mount, fuse-overlayfs missing from PATH, /dev/fuse not accessible. In each, detect must
//! name the cause and the fix, and build must succeed in the mode detect chose or refuse cleanly.
//! Plus: every snapshotter gives the same layers for the same Dockerfile, and in-place execution
//! (run in a throwaway root made for it, never on this machine's own `/`) gives them too.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    Who, binary, context, env, remote_config, run_ok, scratch_dir, shmocker, shmocker_ok,
    unique_ref,
};

/// A wrapper that puts the command under a seccomp filter like Docker's default profile
/// (tests/env/seccomp-deny-ns; needs python3-seccomp, installed by tests/env/setup.sh).
fn seccomp_wrapper() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/env/seccomp-deny-ns");
    let check = Command::new("/usr/bin/python3")
        .args(["-c", "import seccomp"])
        .output()
        .expect("running /usr/bin/python3");
    assert!(
        check.status.success(),
        "python3-seccomp is missing: run tests/env/setup.sh (apt-get install python3-seccomp)"
    );
    p
}

/// Runs `shmocker --root STORE ARGS` as `user`, through `prefix` (a wrapper command), with `path`
/// as PATH.
fn shmocker_as(user: &str, prefix: &[&str], path: &str, store: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user, "--"])
        .args(prefix)
        .arg("env")
        .arg(format!("PATH={path}"))
        .arg("HOME=/tmp")
        .arg(binary())
        .arg("--root")
        .arg(store)
        .args(args)
        .current_dir("/")
        .env_remove("SHMOCKER_ROOT");
    let out = cmd.output().expect("running shmocker");
    eprintln!(
        "--- shmocker {args:?} as {user} via {prefix:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

fn detect_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "detect --format json printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn probe<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no probe {name} in {doc:#}"))
}

fn simple_context() -> tempfile::TempDir {
    context(&[(
        "Dockerfile",
        "ARG BASE\nFROM $BASE\nRUN echo built > /built.txt\n",
    )])
}

fn base_arg() -> String {
    format!("BASE={}", env().busybox())
}

fn chown_to(path: &Path, user: &str) {
    run_ok(Command::new("chown").arg(user).arg(path));
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn detect_reports_every_probe_with_a_stable_schema() {
    let store = scratch_dir(Who::User);
    let out = shmocker_as(
        env().user(),
        &[],
        DEFAULT_PATH,
        store.path(),
        &["detect", "--format", "json"],
    );
    assert!(out.status.success(), "detect failed");
    let doc = detect_json(&out);
    assert_eq!(doc["schema_version"], 1);
    for name in [
        "userns",
        "map-single",
        "map-subordinate",
        "mount-ns",
        "mount-tmpfs",
        "overlay-userxattr",
        "overlay-trusted",
        "fuse-overlayfs",
        "proc-pidns",
        "reflink",
    ] {
        let p = probe(&doc, name);
        assert!(p["status"].is_string() && p["detail"].is_string(), "{p}");
    }
    for name in [
        "userns",
        "map-subordinate",
        "overlay-userxattr",
        "fuse-overlayfs",
    ] {
        assert_eq!(probe(&doc, name)["status"], "ok", "{name} on this machine");
    }
    assert_eq!(doc["choice"]["isolation"], "subordinate-ids");
    assert_eq!(doc["choice"]["snapshotter"], "overlayfs");
    assert!(doc["host"]["store"]["fs_type"].is_string());
    assert!(doc["host"]["seccomp"].is_number());
    // The probes clean up after themselves, overlayfs' mode-0 work dir included.
    let left: Vec<_> = fs::read_dir(store.path().join("tmp"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the store's tmp/: {left:?}");

    // The alias and the table.
    let out = shmocker_as(env().user(), &[], DEFAULT_PATH, store.path(), &["doctor"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("overlay-userxattr"), "{table}");
    assert!(table.contains("isolation: subordinate-ids"), "{table}");
}

/// A second unprivileged user with no /etc/subuid or /etc/subgid lines, removed again on drop.
struct NoSubUser;

const NOSUB: &str = "shmocker-nosub";

impl NoSubUser {
    fn create() -> NoSubUser {
        let exists = Command::new("id")
            .arg(NOSUB)
            .output()
            .unwrap()
            .status
            .success();
        if !exists {
            run_ok(Command::new("useradd").args(["--no-create-home", "--shell", "/bin/sh", NOSUB]));
        }
        // useradd may have granted ranges (SUB_UID_COUNT in login.defs): take them away.
        for file in ["/etc/subuid", "/etc/subgid"] {
            run_ok(Command::new("sed").args(["-i", &format!("/^{NOSUB}:/d"), file]));
        }
        NoSubUser
    }
}

impl Drop for NoSubUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(NOSUB).output();
        for file in ["/etc/subuid", "/etc/subgid"] {
            let _ = Command::new("sed")
                .args(["-i", &format!("/^{NOSUB}:/d"), file])
                .output();
        }
    }
}

#[test]
fn a_user_without_subordinate_ids_builds_with_a_single_id() {
    let _user = NoSubUser::create();
    let store = scratch_dir(Who::Root);
    chown_to(store.path(), NOSUB);
    let out = shmocker_as(
        NOSUB,
        &[],
        DEFAULT_PATH,
        store.path(),
        &["detect", "--format", "json"],
    );
    let doc = detect_json(&out);
    let map = probe(&doc, "map-subordinate");
    assert_eq!(map["status"], "failed");
    assert_eq!(map["problem"], "no-subids");
    let fix = map["fix"].as_str().unwrap();
    assert!(
        fix.contains("usermod --add-subuids") && fix.contains(NOSUB),
        "fix names usermod and the user: {fix}"
    );
    assert_eq!(doc["choice"]["isolation"], "single-id");

    let ctx = simple_context();
    let ctx_arg = ctx.path().to_str().unwrap();
    let tag = unique_ref("nosub");
    let out = shmocker_as(
        NOSUB,
        &[],
        DEFAULT_PATH,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base_arg(),
            "-t",
            &tag,
            "--push",
            ctx_arg,
        ],
    );
    assert!(out.status.success(), "single-ID build failed");
    let err = stderr(&out);
    assert!(err.contains("isolation: single-id"), "{err}");
    assert!(err.contains("skipped isolation subordinate-ids"), "{err}");
    assert_eq!(
        remote_config(&tag)["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Ownership other than 0 cannot exist with a single ID: the build says so.
    let chown_ctx = context(&[
        (
            "Dockerfile",
            "ARG BASE\nFROM $BASE\nCOPY --chown=1000:1000 f /f\n",
        ),
        ("f", "x\n"),
    ]);
    let out = shmocker_as(
        NOSUB,
        &[],
        DEFAULT_PATH,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base_arg(),
            chown_ctx.path().to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("1000:1000") && err.contains("not mapped"),
        "{err}"
    );
    // ... or, asked to, squashes those owners to 0 (COPY --chown and USER alike).
    let squash_ctx = context(&[
        (
            "Dockerfile",
            "ARG BASE\nFROM $BASE\nCOPY --chown=1000:1000 f /f\nUSER 1000\nRUN id -u > /tmp/uid\n",
        ),
        ("f", "x\n"),
    ]);
    let squash_tag = unique_ref("nosub-squash");
    let out = shmocker_as(
        NOSUB,
        &[],
        DEFAULT_PATH,
        store.path(),
        &[
            "build",
            "--ignore-chown-errors",
            "--build-arg",
            &base_arg(),
            "-t",
            &squash_tag,
            "--push",
            squash_ctx.path().to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "--ignore-chown-errors build failed");
    let err = stderr(&out);
    assert!(err.contains("--ignore-chown-errors"), "warned: {err}");
    let work = scratch_dir(Who::Root);
    let rootfs = common::unpack(&format!("docker://{squash_tag}"), work.path());
    let t = common::tree(&rootfs);
    let f = t.get("/f").expect("/f in the image");
    assert_eq!((f.uid, f.gid), (0, 0), "{f:?}");
    assert_eq!(fs::read_to_string(rootfs.join("tmp/uid")).unwrap(), "0\n");

    // A floor refuses the downgrade, naming the cause.
    let out = shmocker_as(
        NOSUB,
        &[],
        DEFAULT_PATH,
        store.path(),
        &[
            "build",
            "--min-isolation",
            "subordinate-ids",
            "--build-arg",
            &base_arg(),
            ctx_arg,
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--min-isolation subordinate-ids") && err.contains("usermod"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // Owners the base image has are kept in the layers of files a step changes, with every
    // snapshotter, although only one ID exists in the namespace (they are recorded at unpack).
    let owned_base = unique_ref("owned-base");
    let base_ctx = context(&[
        (
            "Dockerfile",
            "ARG BASE\nFROM $BASE\nCOPY --chown=1000:1001 owned /owned\n",
        ),
        ("owned/file", "one\n"),
    ]);
    let root_store = scratch_dir(Who::Root);
    common::shmocker_ok(
        Who::Root,
        root_store.path(),
        &[
            "build",
            "--build-arg",
            &base_arg(),
            "-t",
            &owned_base,
            "--push",
            base_ctx.path().to_str().unwrap(),
        ],
    );
    let change_ctx = context(&[(
        "Dockerfile",
        "ARG BASE\nFROM $BASE\nRUN echo two >> /owned/file && echo new > /owned/new\n",
    )]);
    for snapshotter in ["overlayfs", "fuse-overlayfs", "copy"] {
        let store = scratch_dir(Who::Root);
        chown_to(store.path(), NOSUB);
        let tag = unique_ref(&format!("owned-{snapshotter}"));
        let out = shmocker_as(
            NOSUB,
            &[],
            DEFAULT_PATH,
            store.path(),
            &[
                "build",
                "--snapshotter",
                snapshotter,
                "--build-arg",
                &format!("BASE={owned_base}"),
                "-t",
                &tag,
                "--push",
                change_ctx.path().to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{snapshotter}: {}", stderr(&out));
        assert!(stderr(&out).contains("isolation: single-id"));
        let work = scratch_dir(Who::Root);
        let rootfs = common::unpack(&format!("docker://{tag}"), work.path());
        let t = common::tree(&rootfs);
        let owner = |p: &str| {
            let e = t
                .get(p)
                .unwrap_or_else(|| panic!("{snapshotter}: {p} missing"));
            (e.uid, e.gid)
        };
        assert_eq!(owner("/owned/file"), (1000, 1001), "{snapshotter}");
        assert_eq!(owner("/owned"), (1000, 1001), "{snapshotter}");
        assert_eq!(
            owner("/owned/new"),
            (0, 0),
            "{snapshotter}: made by the step"
        );
        assert_eq!(
            fs::read_to_string(rootfs.join("owned/file")).unwrap(),
            "one\ntwo\n"
        );
    }
}

#[test]
fn under_dockers_seccomp_profile_detect_names_seccomp_and_build_refuses() {
    let wrapper = seccomp_wrapper();
    let wrapper = wrapper.to_str().unwrap();
    let store = scratch_dir(Who::User);
    let out = shmocker_as(
        env().user(),
        &[wrapper],
        DEFAULT_PATH,
        store.path(),
        &["detect", "--format", "json"],
    );
    assert!(
        !out.status.success(),
        "detect exits non-zero when nothing works"
    );
    let doc = detect_json(&out);
    assert_eq!(doc["host"]["seccomp"], 2);
    let userns = probe(&doc, "userns");
    assert_eq!(userns["status"], "failed");
    assert_eq!(userns["errno"], "EPERM");
    assert_eq!(userns["problem"], "userns-seccomp");
    assert!(
        userns["fix"]
            .as_str()
            .unwrap()
            .contains("seccomp=unconfined"),
        "{userns}"
    );
    assert_eq!(probe(&doc, "overlay-userxattr")["status"], "skipped");
    assert!(doc["choice"]["refused"].is_string());

    let ctx = simple_context();
    let out = shmocker_as(
        env().user(),
        &[wrapper],
        DEFAULT_PATH,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base_arg(),
            ctx.path().to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("no isolation works here"), "{err}");
    assert!(
        err.contains("probe ") && err.contains("overlay-userxattr"),
        "the report: {err}"
    );
    assert!(err.contains("seccomp=unconfined"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A mount made for one test, unmounted (and its directory removed) on drop.
struct TestMount {
    dir: tempfile::TempDir,
    target: PathBuf,
}

impl Drop for TestMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.target).output();
        let _ = &self.dir;
    }
}

fn tmpfs_store() -> TestMount {
    let dir = scratch_dir(Who::Root);
    let target = dir.path().join("store");
    fs::create_dir(&target).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=512m", "tmpfs"])
            .arg(&target),
    );
    chown_to(&target, env().user());
    TestMount { dir, target }
}

fn overlay_store() -> TestMount {
    let dir = scratch_dir(Who::Root);
    let p = dir.path();
    for d in ["lower", "upper", "work", "store"] {
        fs::create_dir(p.join(d)).unwrap();
    }
    let target = p.join("store");
    run_ok(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                p.join("lower").display(),
                p.join("upper").display(),
                p.join("work").display()
            ))
            .arg(&target),
    );
    chown_to(&target, env().user());
    TestMount { dir, target }
}

/// detect, then a build in auto mode that must run with the snapshotter detect chose.
fn detect_then_build(store: &Path) -> (serde_json::Value, String) {
    let out = shmocker_as(
        env().user(),
        &[],
        DEFAULT_PATH,
        store,
        &["detect", "--format", "json"],
    );
    let doc = detect_json(&out);
    let chosen = doc["choice"]["snapshotter"]
        .as_str()
        .unwrap_or_else(|| panic!("no snapshotter chosen: {doc:#}"))
        .to_string();
    let ctx = simple_context();
    let tag = unique_ref("store-fs");
    let out = shmocker_as(
        env().user(),
        &[],
        DEFAULT_PATH,
        store,
        &[
            "build",
            "--build-arg",
            &base_arg(),
            "-t",
            &tag,
            "--push",
            ctx.path().to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "build failed");
    let err = stderr(&out);
    assert!(err.contains(&format!("snapshotter: {chosen}")), "{err}");
    (doc, chosen)
}

#[test]
fn a_store_on_tmpfs_is_recognised_and_builds() {
    let m = tmpfs_store();
    let (doc, _) = detect_then_build(&m.target);
    assert_eq!(doc["host"]["store"]["fs_type"], "tmpfs");
    // Linux >= 6.6 gives tmpfs user xattrs, which overlayfs with userxattr needs.
    assert_eq!(probe(&doc, "overlay-userxattr")["status"], "ok");
}

#[test]
fn a_store_on_overlayfs_falls_back_and_says_to_use_a_volume() {
    let m = overlay_store();
    let (doc, chosen) = detect_then_build(&m.target);
    assert_eq!(doc["host"]["store"]["fs_type"], "overlay");
    let ov = probe(&doc, "overlay-userxattr");
    assert_eq!(ov["status"], "failed");
    assert_eq!(ov["problem"], "overlay-store-on-overlay");
    assert!(ov["fix"].as_str().unwrap().contains("volume"), "{ov}");
    assert_ne!(chosen, "overlayfs");
}

#[test]
fn without_fuse_overlayfs_in_path_detect_says_to_install_it() {
    // A PATH with the ID-map helpers but not fuse-overlayfs (which lives beside them).
    let bin = scratch_dir(Who::Root);
    fs::set_permissions(bin.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for tool in ["newuidmap", "newgidmap"] {
        std::os::unix::fs::symlink(format!("/usr/bin/{tool}"), bin.path().join(tool)).unwrap();
    }
    let path = bin.path().to_str().unwrap();
    let store = scratch_dir(Who::User);
    let out = shmocker_as(
        env().user(),
        &[],
        path,
        store.path(),
        &["detect", "--format", "json"],
    );
    let doc = detect_json(&out);
    let fuse = probe(&doc, "fuse-overlayfs");
    assert_eq!(fuse["status"], "failed");
    assert_eq!(fuse["problem"], "no-fuse-overlayfs");
    assert!(
        fuse["fix"]
            .as_str()
            .unwrap()
            .contains("install fuse-overlayfs"),
        "{fuse}"
    );
    // Forcing it refuses cleanly; auto still builds (overlayfs works).
    let ctx = simple_context();
    let ctx_arg = ctx.path().to_str().unwrap();
    let out = shmocker_as(
        env().user(),
        &[],
        path,
        store.path(),
        &[
            "build",
            "--snapshotter",
            "fuse-overlayfs",
            "--build-arg",
            &base_arg(),
            ctx_arg,
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--snapshotter fuse-overlayfs cannot be used here")
            && err.contains("install fuse-overlayfs"),
        "{err}"
    );
    let out = shmocker_as(
        env().user(),
        &[],
        path,
        store.path(),
        &["build", "--build-arg", &base_arg(), ctx_arg],
    );
    assert!(out.status.success());
    assert!(stderr(&out).contains("snapshotter: overlayfs"));
}

#[test]
fn with_dev_fuse_inaccessible_detect_names_it_and_copy_still_builds() {
    // A private mount namespace where /dev/fuse is covered by a file nobody may open; the
    // machine's /dev/fuse is untouched.
    let dir = scratch_dir(Who::Root);
    let blocker = dir.path().join("no-fuse");
    fs::write(&blocker, b"").unwrap();
    fs::set_permissions(&blocker, fs::Permissions::from_mode(0o000)).unwrap();
    let cover = format!(
        "mount --bind {} /dev/fuse && exec \"$@\"",
        blocker.display()
    );
    let prefix = ["unshare", "-m", "sh", "-c", cover.as_str(), "sh"];
    let store = scratch_dir(Who::User);
    let mut cmd = Command::new(prefix[0]);
    cmd.args(&prefix[1..])
        .args(["runuser", "-u", env().user(), "--", "env"])
        .arg(format!("PATH={DEFAULT_PATH}"))
        .arg(binary())
        .arg("--root")
        .arg(store.path())
        .args(["detect", "--format", "json"]);
    let out = cmd.output().unwrap();
    let doc = detect_json(&out);
    let fuse = probe(&doc, "fuse-overlayfs");
    assert_eq!(fuse["status"], "failed");
    assert_eq!(fuse["errno"], "EACCES");
    assert_eq!(fuse["problem"], "dev-fuse-denied");

    let ctx = simple_context();
    let build = |snapshotter: &str| {
        let mut cmd = Command::new(prefix[0]);
        cmd.args(&prefix[1..])
            .args(["runuser", "-u", env().user(), "--", "env"])
            .arg(format!("PATH={DEFAULT_PATH}"))
            .arg(binary())
            .arg("--root")
            .arg(store.path())
            .args([
                "build",
                "--snapshotter",
                snapshotter,
                "--build-arg",
                &base_arg(),
            ])
            .arg(ctx.path());
        let out = cmd.output().unwrap();
        eprintln!(
            "--- build --snapshotter {snapshotter}: {}\n{}",
            out.status,
            stderr(&out)
        );
        out
    };
    let out = build("fuse-overlayfs");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/dev/fuse"), "{}", stderr(&out));
    let out = build("copy");
    assert!(out.status.success(), "copy snapshotter without /dev/fuse");
    assert!(stderr(&out).contains("snapshotter: copy"));
}

const SNAPSHOT_DOCKERFILE: &str = r#"ARG BASE
FROM $BASE
COPY data.txt /data.txt
RUN mkdir -p /app/sub && echo hello > /app/sub/f && ln -s f /app/sub/link && ln /app/sub/f /app/sub/hard && chmod 640 /app/sub/f && touch -h -t 200001010000 /app/sub/link /app/sub/f /app/sub /app
RUN rm /bin/[[ && rm -rf /home && mkdir /home && echo x > /home/new && touch -t 200001010000 /home/new /home /bin
RUN echo extra:x:5000:5000::/:/bin/sh >> /etc/passwd && touch -t 200001010000 /etc/passwd /etc
RUN rm -rf /app/sub && mkdir /app/sub && echo again > /app/sub/g && touch -t 200001010000 /app/sub/g /app/sub /app
"#;

#[test]
fn every_snapshotter_gives_the_same_layers() {
    let ctx = context(&[("Dockerfile", SNAPSHOT_DOCKERFILE), ("data.txt", "data\n")]);
    let mut results = Vec::new();
    for snapshotter in ["overlayfs", "fuse-overlayfs", "copy"] {
        let store = scratch_dir(Who::User);
        let tag = unique_ref(&format!("snap-{snapshotter}"));
        let out = shmocker_as(
            env().user(),
            &[],
            DEFAULT_PATH,
            store.path(),
            &[
                "build",
                "--snapshotter",
                snapshotter,
                "--build-arg",
                &base_arg(),
                "-t",
                &tag,
                "--push",
                ctx.path().to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "build with {snapshotter} failed");
        assert!(stderr(&out).contains(&format!("snapshotter: {snapshotter}")));
        let config = remote_config(&tag);
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            diff_ids.len(),
            6,
            "{snapshotter}: base + COPY + 4 RUN layers"
        );
        results.push((snapshotter, diff_ids, tag));
    }
    for (name, ids, _) in &results[1..] {
        assert_eq!(
            ids, &results[0].1,
            "{name} and overlayfs made different layers"
        );
    }
    // And the result is what the Dockerfile says (read back by umoci).
    let work = scratch_dir(Who::Root);
    let rootfs = common::unpack(&format!("docker://{}", results[2].2), work.path());
    assert!(!rootfs.join("bin/[[").exists());
    assert!(rootfs.join("bin/[").exists());
    assert_eq!(fs::read_to_string(rootfs.join("home/new")).unwrap(), "x\n");
    assert!(!rootfs.join("app/sub/f").exists());
    assert_eq!(
        fs::read_to_string(rootfs.join("app/sub/g")).unwrap(),
        "again\n"
    );
    assert!(
        fs::read_to_string(rootfs.join("etc/passwd"))
            .unwrap()
            .contains("extra:x:5000")
    );
    assert!(
        !rootfs.join("etc/hosts").exists(),
        "mount stubs left in the image"
    );
}

/// The copy snapshotter starts each step from the tree the step before ran in, except when
/// that step's layer was already in the store (made by an earlier build with other sub-second
/// times): a rebuild with `--no-cache` and `SOURCE_DATE_EPOCH` must give the same image.
#[test]
fn copy_snapshotter_rebuilds_with_no_cache_give_the_same_image() {
    let ctx = context(&[(
        "Dockerfile",
        "ARG BASE\nFROM $BASE\nRUN mkdir -p /a/b && echo 1 > /a/b/f\nRUN echo 2 > /a/b/g\nRUN echo 3 > /c && echo 4 > /a/h\nRUN true\n",
    )]);
    let store = scratch_dir(Who::User);
    let mut digests = Vec::new();
    for _ in 0..2 {
        let out = shmocker_as(
            env().user(),
            &[],
            DEFAULT_PATH,
            store.path(),
            &[
                "build",
                "--no-cache",
                "--snapshotter",
                "copy",
                "--build-arg",
                &base_arg(),
                "--build-arg",
                "SOURCE_DATE_EPOCH=1700000000",
                ctx.path().to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "copy build failed");
        digests.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert_eq!(
        digests[0], digests[1],
        "a --no-cache rebuild changed the image"
    );
}

#[test]
fn as_root_under_dockers_seccomp_profile_steps_run_chrooted_with_the_same_layers() {
    let wrapper = seccomp_wrapper();
    // COPY --from too: without mounts, the stage's files are copied out to be read.
    let main_stage = SNAPSHOT_DOCKERFILE.strip_prefix("ARG BASE\n").unwrap();
    let dockerfile = format!(
        "ARG BASE\nFROM $BASE AS tools\nRUN echo tool > /tool && touch -t 200001010000 /tool\n\
         {main_stage}COPY --from=tools /tool /tool\n\
         RUN echo quiet > /dev/null && echo y > /app/y && touch -t 200001010000 /app/y /app\n"
    );
    let ctx = context(&[("Dockerfile", &dockerfile), ("data.txt", "data\n")]);
    let mut diff_ids = Vec::new();
    for under_seccomp in [false, true] {
        let store = scratch_dir(Who::Root);
        let tag = unique_ref("chroot");
        let mut cmd = if under_seccomp {
            let mut c = Command::new(&wrapper);
            c.arg(binary());
            c
        } else {
            Command::new(binary())
        };
        cmd.arg("--root")
            .arg(store.path())
            .args(["build", "--build-arg", &base_arg(), "-t", &tag, "--push"])
            .arg(ctx.path())
            .env_remove("SHMOCKER_ROOT");
        let out = cmd.output().unwrap();
        let err = stderr(&out);
        eprintln!(
            "--- as root, seccomp {under_seccomp}: {}\n{err}",
            out.status
        );
        assert!(out.status.success(), "build failed");
        if under_seccomp {
            assert!(err.contains("isolation: chroot"), "{err}");
            assert!(err.contains("snapshotter: copy"), "{err}");
            assert!(
                err.contains("seccomp=unconfined"),
                "the skip names the fix: {err}"
            );
        } else {
            assert!(err.contains("isolation: root"), "{err}");
        }
        let config = remote_config(&tag);
        diff_ids.push(config["rootfs"]["diff_ids"].clone());
        if under_seccomp {
            let work = scratch_dir(Who::Root);
            let rootfs = common::unpack(&format!("docker://{tag}"), work.path());
            assert_eq!(fs::read_to_string(rootfs.join("app/y")).unwrap(), "y\n");
            assert_eq!(fs::read_to_string(rootfs.join("tool")).unwrap(), "tool\n");
            assert!(
                !rootfs.join("dev/null").exists(),
                "device stubs left in the image"
            );
        }
    }
    assert_eq!(
        diff_ids[0], diff_ids[1],
        "chroot and root builds made different layers"
    );
}

#[test]
fn detect_names_the_environment_and_gives_its_own_fix() {
    // A pod under the "restricted" Pod Security Standard, as far as a process can tell: the
    // Kubernetes service variable, no_new_privs set, and a seccomp filter that denies namespaces.
    let wrapper = seccomp_wrapper();
    let store = scratch_dir(Who::User);
    let out = shmocker_as(
        env().user(),
        &[
            wrapper.to_str().unwrap(),
            "env",
            "-i",
            "KUBERNETES_SERVICE_HOST=10.0.0.1",
        ],
        DEFAULT_PATH,
        store.path(),
        &["detect"],
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("(kubernetes-pss-restricted)"),
        "environment not named:\n{table}"
    );
    // The matrix's fix for this environment, not the general one.
    assert!(
        table.contains("fix: securityContext: { seccompProfile: { type: Localhost"),
        "{table}"
    );
    assert!(table.contains("fixes known for"), "{table}");
}

/// Makes a throwaway root for in-place execution: a directory `T` holding a copy of the shmocker
/// binary and the libraries it loads, a static busybox for the harness, a container marker, the
/// build context and store, and some "runner" files the build must replace. The build runs with
/// `T` as its `/` (see [`run_in_throwaway_root`]), so a mistake can never reach this machine's
/// own `/`.
struct ThrowawayRoot {
    dir: tempfile::TempDir,
    /// The libraries the binary loads, as paths inside the root (kept with --ignore-path: a
    /// released shmocker is static and needs none).
    libs: Vec<String>,
}

impl ThrowawayRoot {
    fn new(context_files: &[(&str, &str)], container_marker: bool) -> ThrowawayRoot {
        let dir = scratch_dir(Who::Root);
        let t = dir.path();
        let put = |rel: &str, contents: &[u8]| {
            let p = t.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, contents).unwrap();
        };
        fs::create_dir_all(t.join("shmocker")).unwrap();
        fs::copy(binary(), t.join("shmocker/shmocker")).unwrap();
        let ldd = run_ok(Command::new("ldd").arg(binary()));
        let mut libs = Vec::new();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            let Some(path) = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(str::to_string)
            else {
                continue;
            };
            let dest = t.join(path.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::copy(&path, &dest).unwrap_or_else(|e| panic!("copying {path}: {e}"));
            libs.push(path);
        }
        assert!(!libs.is_empty(), "ldd found no libraries: {ldd:?}");
        fs::create_dir_all(t.join(".harness/old")).unwrap();
        fs::copy("/usr/bin/busybox", t.join(".harness/busybox")).unwrap();
        put(".harness/hosts", b"10.9.8.7 from-the-runtime\n");
        if container_marker {
            put(".dockerenv", b"");
        }
        for d in ["proc", "dev", "volume", "etc", "store"] {
            fs::create_dir_all(t.join(d)).unwrap();
        }
        put("etc/hosts", b"");
        put("etc/runner.conf", b"the runner's own file\n");
        // A container image's CA bundle: TLS set-up reads it before the first step replaces it.
        put(
            "etc/ssl/certs/ca-certificates.crt",
            &fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap(),
        );
        put("usr/bin/runner-tool", b"#!/bin/sh\n");
        for (path, contents) in context_files {
            put(&format!("ctx/{path}"), contents.as_bytes());
        }
        ThrowawayRoot { dir, libs }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `shmocker` arguments for an in-place build of /ctx with the busybox base, the store at
    /// /store, the libraries kept if `keep_libs`, and `extra`.
    fn build_args(&self, keep_libs: bool, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["--root", "/store", "build", "--isolation", "in-place"]
            .map(String::from)
            .into();
        args.extend(["--build-arg".into(), base_arg()]);
        if keep_libs {
            args.extend(self.libs.iter().map(|l| format!("--ignore-path={l}")));
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push("/ctx".into());
        args
    }
}

/// Runs `/shmocker/shmocker ARGS` with `root` as `/`: in a private mount namespace, `root` gets
/// /proc, /dev (with its own /dev/shm), a tmpfs volume at /volume and a runtime /etc/hosts bound over the image's (as a
/// container runtime makes them), then becomes `/` by pivot_root, and the old root is detached
/// before shmocker starts.
fn run_in_throwaway_root(root: &ThrowawayRoot, args: &[&str]) -> Output {
    run_in_throwaway_root_via(&[], root, args)
}

/// [`run_in_throwaway_root`] with a wrapper command (`setpriv ...`) in front of it all.
fn run_in_throwaway_root_via(wrapper: &[&str], root: &ThrowawayRoot, args: &[&str]) -> Output {
    let script = r#"set -eu
T=$1; shift
mount --bind "$T" "$T"
mount -t proc proc "$T/proc"
mount --rbind /dev "$T/dev"
mount -t tmpfs -o size=1m tmpfs "$T/dev/shm"
mount -t tmpfs -o size=1m tmpfs "$T/volume"
echo 'a volume of the container' > "$T/volume/file"
mount --bind "$T/.harness/hosts" "$T/etc/hosts"
cd "$T"
pivot_root . .harness/old
exec /.harness/busybox sh -c '/.harness/busybox umount -l /.harness/old && exec "$@"' sh "$@"
"#;
    let mut cmd = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg("unshare");
            c
        }
        None => Command::new("unshare"),
    };
    let out = cmd
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(root.path())
        .arg("/shmocker/shmocker")
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .output()
        .expect("running unshare");
    eprintln!(
        "--- in a throwaway root: shmocker {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn in_place_execution_replaces_the_containers_root_and_gives_the_same_layers() {
    // Outside the throwaway root: must survive untouched.
    let outside = scratch_dir(Who::Root);
    fs::write(outside.path().join("sentinel"), "here\n").unwrap();
    // Two stages (which would run at once, and take turns with `/`), COPY --from, and a step
    // that reads what the container runtime mounted.
    let main_stage = SNAPSHOT_DOCKERFILE.strip_prefix("ARG BASE\n").unwrap();
    let dockerfile = format!(
        "ARG BASE\nFROM $BASE AS tools\nRUN echo tool > /tool && touch -t 200001010000 /tool\n\
         {main_stage}COPY --from=tools /tool /tool\n\
         RUN cat /etc/hosts /volume/file > /seen && touch -t 200001010000 /seen\n"
    );
    let files = [("Dockerfile", dockerfile.as_str()), ("data.txt", "data\n")];
    let root = ThrowawayRoot::new(&files, true);
    let t = root.path();
    // The reference build's context: the same data.txt (bytes and times), and the Dockerfile
    // without the last step, which reads what only the container has.
    let ctx = context(&[("Dockerfile", SNAPSHOT_DOCKERFILE), ("data.txt", "data\n")]);
    run_ok(
        Command::new("touch")
            .arg("-r")
            .arg(t.join("ctx/data.txt"))
            .arg(ctx.path().join("data.txt")),
    );

    let in_place_tag = unique_ref("in-place");
    let args = root.build_args(true, &["-t", &in_place_tag, "--push"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_in_throwaway_root(&root, &args);
    let err = stderr(&out);
    assert!(out.status.success(), "in-place build failed: {err}");
    assert!(err.contains("isolation: in-place"), "{err}");
    assert!(err.contains("snapshotter: copy"), "{err}");

    // The reference: the same Dockerfile and context built the usual way.
    let store = scratch_dir(Who::Root);
    let usual_tag = unique_ref("in-place-reference");
    shmocker_ok(
        Who::Root,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base_arg(),
            "-t",
            &usual_tag,
            "--push",
            ctx.path().to_str().unwrap(),
        ],
    );
    let in_place = remote_config(&in_place_tag)["rootfs"]["diff_ids"].clone();
    let usual = remote_config(&usual_tag)["rootfs"]["diff_ids"].clone();
    let (in_place, usual) = (in_place.as_array().unwrap(), usual.as_array().unwrap());
    assert_eq!(in_place.len(), usual.len() + 2);
    assert_eq!(
        in_place[..usual.len()],
        usual[..],
        "in-place and usual builds made different layers"
    );

    let work = scratch_dir(Who::Root);
    let rootfs = common::unpack(&format!("docker://{in_place_tag}"), work.path());
    assert_eq!(
        fs::read_to_string(rootfs.join("seen")).unwrap(),
        "10.9.8.7 from-the-runtime\na volume of the container\n",
        "steps see the container's mounts"
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("app/sub/g")).unwrap(),
        "again\n"
    );
    assert_eq!(fs::read_to_string(rootfs.join("tool")).unwrap(), "tool\n");
    for gone in [
        "etc/hosts",
        "volume",
        "shmocker",
        "store",
        "ctx",
        "proc/1",
        "lib64",
        ".harness",
        ".dockerenv",
        "etc/runner.conf",
        "usr/bin/runner-tool",
    ] {
        assert!(
            !rootfs.join(gone).exists(),
            "{gone} of the container reached the image"
        );
    }

    // The container's root now holds the image (the last step's rootfs) and what was kept.
    assert!(t.join("app/sub/g").exists());
    assert!(t.join("bin/busybox").exists());
    for gone in ["etc/runner.conf", "usr/bin/runner-tool", ".harness/busybox"] {
        assert!(!t.join(gone).exists(), "{gone} was not replaced");
    }
    for kept in ["shmocker/shmocker", "ctx/Dockerfile", ".dockerenv"] {
        assert!(t.join(kept).exists(), "{kept} was not kept");
    }
    assert!(t.join("store").read_dir().unwrap().next().is_some());
    assert_eq!(
        fs::read_to_string(outside.path().join("sentinel")).unwrap(),
        "here\n"
    );
}

#[test]
fn in_place_execution_refuses_what_cannot_work_before_touching_anything() {
    // (container mark, libraries kept, Dockerfile, what the error says)
    let cases = [
        (
            false,
            true,
            "FROM scratch\nCOPY Dockerfile /\n",
            "--isolation in-place cannot be used here: probe in-place failed: no sign of a container",
        ),
        (
            true,
            false,
            "FROM scratch\nCOPY Dockerfile /\n",
            "this shmocker is dynamically linked",
        ),
        (
            true,
            true,
            "ARG BASE\nFROM $BASE\nWORKDIR /ctx/sub\n",
            "WORKDIR /ctx/sub is in /ctx, which in-place execution leaves as it is",
        ),
        (
            true,
            true,
            "ARG BASE\nFROM $BASE\nRUN --mount=type=tmpfs,target=/t true\n",
            "RUN --mount needs mounts, which the in-place isolation cannot make",
        ),
    ];
    // Root without CAP_CHOWN (as a container with capabilities dropped) could not give the
    // image's files their owners: detect says so.
    let root = ThrowawayRoot::new(&[("Dockerfile", "FROM scratch\n")], true);
    let out = run_in_throwaway_root_via(
        &["setpriv", "--bounding-set=-chown", "--"],
        &root,
        &["--root", "/store", "detect"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CAP_CHOWN is missing here"),
        "detect without CAP_CHOWN: {text}"
    );
    for (marked, libs_kept, dockerfile, expected) in cases {
        let root = ThrowawayRoot::new(&[("Dockerfile", dockerfile)], marked);
        let args = root.build_args(libs_kept, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_in_throwaway_root(&root, &args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{dockerfile}");
        assert!(err.contains(expected), "{expected:?} not in: {err}");
        assert!(
            root.path().join("etc/runner.conf").exists(),
            "a refused build changed the root ({expected})"
        );
    }

    let store = scratch_dir(Who::Root);
    let out = shmocker(
        Who::Root,
        store.path(),
        &["build", "--ignore-path", "/x", "/nonexistent"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--ignore-path is only for --isolation in-place"),
        "{}",
        stderr(&out)
    );
}
