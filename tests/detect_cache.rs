//! Builds reuse the probes' findings (`<store>/cache/detect.json`) while nothing they depend on
//! changed: the second build says so and gives the same image; a real change to an input (the
//! fuse-overlayfs found on PATH) re-probes; a damaged entry is replaced; `SHMOCKER_DETECT_CACHE=0`
//! probes every time; `shmocker detect` never uses the entry; and findings gone stale in a way
//! the key cannot see (an entry claiming fuse-overlayfs works where it is not installed) fail the
//! step, drop the entry and say so, and the next build decides on fresh probes.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{Who, binary, context, env, run_ok, scratch_dir};

/// Runs `shmocker --root STORE ARGS` as the test user with `path` as PATH and `extra` variables.
fn shmocker_with(path: &str, extra: &[&str], store: &Path, args: &[&str]) -> Output {
    let user = env().user();
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user, "--", "env"])
        .arg(format!("PATH={path}"))
        .arg(format!("HOME=/home/{user}"))
        .args(extra)
        .arg(binary())
        .arg("--root")
        .arg(store)
        .args(args)
        .current_dir("/")
        .env_remove("SHMOCKER_ROOT")
        .env_remove("SHMOCKER_DETECT_CACHE");
    let out = cmd.output().expect("running shmocker");
    eprintln!(
        "--- shmocker {args:?} with PATH={path} {extra:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The digest a successful build printed.
fn digest(out: &Output) -> String {
    assert!(out.status.success(), "the build failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

const CACHED: &str = "probes: cached results from ";

/// Runs a build that should reuse the findings. Other tests add and remove users (and their
/// /etc/subuid and /etc/subgid lines) meanwhile, which rightly re-probes: then it runs again.
fn cached_build(path: &str, store: &Path, args: &[&str]) -> Output {
    for _ in 0..5 {
        let out = shmocker_with(path, &[], store, args);
        let err = stderr(&out);
        let others = err.lines().any(|l| {
            l.starts_with(RAN)
                && l.contains("file./etc/sub")
                && !l.contains("tool.")
                && !l.contains("ns.")
        });
        if !others {
            assert!(err.contains(CACHED), "{err}");
            return out;
        }
    }
    panic!("/etc/subuid or /etc/subgid changed under five builds in a row");
}
const RAN: &str = "probes: ran in ";

/// A PATH directory of its own, readable by the test user, with the ID-map helpers and
/// (when `fuse`) a copy of fuse-overlayfs whose mtime the test may change.
fn bin_dir(fuse: bool) -> tempfile::TempDir {
    let bin = scratch_dir(Who::Root);
    fs::set_permissions(bin.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for tool in ["newuidmap", "newgidmap"] {
        std::os::unix::fs::symlink(format!("/usr/bin/{tool}"), bin.path().join(tool)).unwrap();
    }
    if fuse {
        let found = Command::new("sh")
            .args(["-c", "command -v fuse-overlayfs"])
            .output()
            .unwrap();
        let src = String::from_utf8_lossy(&found.stdout).trim().to_string();
        assert!(
            !src.is_empty(),
            "fuse-overlayfs is not installed: run tests/env/setup.sh"
        );
        run_ok(Command::new("cp").arg(&src).arg(bin.path()));
    }
    bin
}

/// A Dockerfile whose RUN step is new to every store (so that its sandbox is set up).
fn run_context() -> tempfile::TempDir {
    context(&[(
        "Dockerfile",
        "ARG BASE\nARG N\nFROM $BASE\nARG N\nRUN echo \"$N\" > /n.txt\n",
    )])
}

fn build_args<'a>(ctx: &'a Path, base: &'a str, n: &'a str) -> Vec<&'a str> {
    vec![
        "build",
        "--build-arg",
        base,
        "--build-arg",
        n,
        ctx.to_str().unwrap(),
    ]
}

#[test]
fn a_second_build_reuses_the_findings_and_a_changed_tool_reprobes() {
    let bin = bin_dir(true);
    let path = format!("{}:/usr/bin", bin.path().display());
    let store = scratch_dir(Who::User);
    let ctx = run_context();
    let base = format!("BASE={}", env().busybox());
    let args = build_args(ctx.path(), &base, "N=1");
    let first = shmocker_with(&path, &[], store.path(), &args);
    assert!(stderr(&first).contains(RAN), "{}", stderr(&first));
    assert!(stderr(&first).contains("no cached results"));
    assert!(store.path().join("cache/detect.json").is_file());
    let second = cached_build(&path, store.path(), &args);
    assert!(!stderr(&second).contains(RAN));
    assert_eq!(digest(&first), digest(&second));
    // The same mode from the cached findings, with --snapshotter going through the ladder.
    let forced = [
        &["build", "--snapshotter", "fuse-overlayfs"][..],
        &args[1..],
    ]
    .concat();
    let out = cached_build(&path, store.path(), &forced);
    assert!(stderr(&out).contains("snapshotter: fuse-overlayfs"));
    digest(&out);

    // A new version of fuse-overlayfs (here: its mtime) re-probes.
    let copy = bin.path().join("fuse-overlayfs");
    fs::File::options()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1))
        .unwrap();
    let out = shmocker_with(&path, &[], store.path(), &args);
    let err = stderr(&out);
    assert!(
        err.lines()
            .any(|l| l.starts_with(RAN) && l.contains("tool.fuse-overlayfs")),
        "{err}"
    );
    assert_eq!(digest(&out), digest(&first));
    // So does a PATH without it.
    let without = bin_dir(false);
    let path_without = without.path().display().to_string();
    let out = shmocker_with(&path_without, &[], store.path(), &args);
    let err = stderr(&out);
    assert!(
        err.lines()
            .any(|l| l.starts_with(RAN) && l.contains("tool.fuse-overlayfs")),
        "{err}"
    );
    digest(&out);
    cached_build(&path_without, store.path(), &args);
}

#[test]
fn a_damaged_entry_is_replaced_and_the_cache_can_be_switched_off() {
    let bin = bin_dir(true);
    let path = format!("{}:/usr/bin", bin.path().display());
    let store = scratch_dir(Who::User);
    let ctx = run_context();
    let base = format!("BASE={}", env().busybox());
    let args = build_args(ctx.path(), &base, "N=2");
    let entry = store.path().join("cache/detect.json");
    fs::create_dir_all(entry.parent().unwrap()).unwrap();
    run_ok(
        Command::new("chown")
            .arg(env().user())
            .arg(entry.parent().unwrap()),
    );
    fs::write(&entry, b"{\"format\": 1, \"key\": {\"boot\": ").unwrap();
    run_ok(Command::new("chown").arg(env().user()).arg(&entry));
    let out = shmocker_with(&path, &[], store.path(), &args);
    let err = stderr(&out);
    assert!(err.contains(RAN) && err.contains("unreadable"), "{err}");
    let first = digest(&out);
    let doc: serde_json::Value =
        serde_json::from_slice(&fs::read(&entry).unwrap()).expect("the entry was replaced");
    assert!(
        doc["raws"].as_array().is_some_and(|r| !r.is_empty()),
        "{doc}"
    );

    // Off: probes every time, and leaves the entry alone.
    let before = fs::read(&entry).unwrap();
    for _ in 0..2 {
        let out = shmocker_with(&path, &["SHMOCKER_DETECT_CACHE=0"], store.path(), &args);
        let err = stderr(&out);
        assert!(
            err.contains(RAN) && err.contains("SHMOCKER_DETECT_CACHE=0") && !err.contains(CACHED),
            "{err}"
        );
        assert_eq!(digest(&out), first);
    }
    assert_eq!(fs::read(&entry).unwrap(), before);
    cached_build(&path, store.path(), &args);
}

#[test]
fn stale_findings_fail_the_step_drop_the_entry_and_detect_never_uses_them() {
    // No fuse-overlayfs on this PATH; the entry is then made to claim that it works, with a key
    // that holds (nothing the key sees changed).
    let bin = bin_dir(false);
    let path = bin.path().display().to_string();
    let store = scratch_dir(Who::User);
    let ctx = run_context();
    let base = format!("BASE={}", env().busybox());
    digest(&shmocker_with(
        &path,
        &[],
        store.path(),
        &build_args(ctx.path(), &base, "N=3"),
    ));
    let entry = store.path().join("cache/detect.json");
    forge_working_fuse(&entry);

    // detect probes for real.
    let out = shmocker_with(&path, &[], store.path(), &["detect", "--format", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let probe = report["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "fuse-overlayfs")
        .unwrap();
    assert_eq!(probe["status"], "failed", "{probe}");
    assert!(entry.is_file(), "detect must leave the build's entry alone");

    // The build believes the entry, and its step cannot be set up.
    let forced = [
        &["build", "--snapshotter", "fuse-overlayfs"][..],
        &build_args(ctx.path(), &base, "N=4")[1..],
    ]
    .concat();
    let mut tries = 0;
    let out = loop {
        let out = shmocker_with(&path, &[], store.path(), &forced);
        // Another test changed /etc/subuid meanwhile: the entry was probed afresh.
        if stderr(&out).contains(CACHED) || tries == 5 {
            break out;
        }
        tries += 1;
        forge_working_fuse(&entry);
    };
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(CACHED), "{err}");
    assert!(err.contains("starting fuse-overlayfs"), "{err}");
    assert!(
        err.contains("this build used cached probe results")
            && err.contains("they were dropped, and the next build probes afresh"),
        "{err}"
    );
    assert!(!entry.exists(), "the stale entry is still there");

    // The next build probes, and refuses cleanly.
    let out = shmocker_with(&path, &[], store.path(), &forced);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--snapshotter fuse-overlayfs cannot be used here")
            && err.contains("install fuse-overlayfs"),
        "{err}"
    );
    // Without --snapshotter it builds, on fresh findings.
    digest(&cached_build(
        &path,
        store.path(),
        &build_args(ctx.path(), &base, "N=4"),
    ));
}

/// Makes the entry claim that fuse-overlayfs works (its key unchanged).
fn forge_working_fuse(entry: &Path) {
    let mut doc: serde_json::Value = serde_json::from_slice(&fs::read(entry).unwrap()).unwrap();
    let fuse = doc["raws"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["name"] == "fuse-overlayfs")
        .expect("a fuse-overlayfs finding");
    assert_eq!(fuse["ok"], false, "{fuse}");
    fuse["ok"] = true.into();
    fuse["errno"] = serde_json::Value::Null;
    fuse["detail"] = "works (not really)".into();
    fs::write(entry, serde_json::to_vec(&doc).unwrap()).unwrap();
}

#[test]
fn findings_that_refuse_the_build_are_checked_by_probing_first() {
    // The entry claims no user namespace can be made; the build must not refuse on that.
    let bin = bin_dir(false);
    let path = bin.path().display().to_string();
    let store = scratch_dir(Who::User);
    let ctx = run_context();
    let base = format!("BASE={}", env().busybox());
    let args = build_args(ctx.path(), &base, "N=5");
    let first = digest(&shmocker_with(&path, &[], store.path(), &args));
    let entry = store.path().join("cache/detect.json");
    let mut doc: serde_json::Value = serde_json::from_slice(&fs::read(&entry).unwrap()).unwrap();
    for raw in doc["raws"].as_array_mut().unwrap() {
        raw["ok"] = false.into();
        raw["errno"] = "EPERM".into();
    }
    fs::write(&entry, serde_json::to_vec(&doc).unwrap()).unwrap();
    let out = shmocker_with(&path, &[], store.path(), &args);
    let err = stderr(&out);
    assert!(
        err.contains(RAN)
            && err.contains("the cached results would have refused this build")
            && !err.contains(CACHED),
        "{err}"
    );
    assert_eq!(digest(&out), first);
}
