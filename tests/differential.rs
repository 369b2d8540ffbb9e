//! Differential: the same Dockerfile built by shmocker and by `buildah bud` (same user, same base
//! image) must give the same filesystem, entry by entry, and the same config.
//!
//! The one known difference: buildah leaves empty stub files for /etc/hosts, /etc/resolv.conf,
//! /etc/hostname and a /run directory behind in the image (they are its RUN mount points);
//! shmocker removes its mount points. Those are ignored when they are empty on buildah's side.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{Entry, Who, env, fixture, run_ok, scratch_dir, shmocker_ok, tree, unique, unpack};

const BUILDAH_STUBS: [&str; 4] = ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/run"];

fn buildah(who: Who) -> Command {
    let mut c = match who {
        Who::Root => Command::new("buildah"),
        Who::User => {
            let user = env().user();
            let uid =
                String::from_utf8(run_ok(Command::new("id").args(["-u", user])).stdout).unwrap();
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", "env"])
                .arg(format!("HOME=/home/{user}"))
                .arg(format!("XDG_RUNTIME_DIR=/run/user/{}", uid.trim()))
                .arg("buildah");
            c
        }
    };
    c.current_dir("/");
    c
}

fn differential(name: &str, who: Who) {
    differential_with(name, who, |_| {});
}

/// [`differential`] on a fixture that `prepare` completes first (files too many to keep in git).
fn differential_with(name: &str, who: Who, prepare: impl Fn(&std::path::Path)) {
    let ctx = fixture(name);
    prepare(ctx.path());
    run_ok(Command::new("chmod").arg("-R").arg("a+rX").arg(ctx.path()));
    let ctx_path = ctx.path().to_str().unwrap();
    let base = format!("BASE={}", env().busybox());
    let out = scratch_dir(who);
    let ours = out.path().join("shmocker.tar");
    let theirs = out.path().join("buildah.tar");

    let store = scratch_dir(who);
    shmocker_ok(
        who,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "--output",
            &format!("type=oci,dest={}", ours.display()),
            ctx_path,
        ],
    );

    let image = format!("localhost/shmocker-differential-{}", unique());
    run_ok(buildah(who).args([
        "bud",
        "--runtime",
        "runc",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--build-arg",
        &base,
        "-t",
        &image,
        ctx_path,
    ]));
    run_ok(buildah(who).args(["push", &image, &format!("oci-archive:{}", theirs.display())]));
    let _ = buildah(who).args(["rmi", &image]).output();

    let work_ours = scratch_dir(Who::Root);
    let work_theirs = scratch_dir(Who::Root);
    let ours_tree = tree(&unpack(
        &format!("oci-archive:{}", ours.display()),
        work_ours.path(),
    ));
    let theirs_tree = tree(&unpack(
        &format!("oci-archive:{}", theirs.display()),
        work_theirs.path(),
    ));
    let diffs = compare(&ours_tree, &theirs_tree);
    assert!(
        diffs.is_empty(),
        "{name} as {who:?}: shmocker and buildah differ:\n{}",
        diffs.join("\n")
    );
    assert!(
        ours_tree.len() > 100,
        "the comparison saw the base image too"
    );

    let ours_cfg = image_config(work_ours.path());
    let theirs_cfg = image_config(work_theirs.path());
    for field in [
        "Env",
        "Cmd",
        "Entrypoint",
        "WorkingDir",
        "User",
        "ExposedPorts",
    ] {
        assert_eq!(
            ours_cfg["config"][field], theirs_cfg["config"][field],
            "{name}: config field {field}"
        );
    }
    let mut their_labels = theirs_cfg["config"]["Labels"].clone();
    if let Some(m) = their_labels.as_object_mut() {
        m.remove("io.buildah.version");
        if m.is_empty() {
            their_labels = serde_json::Value::Null;
        }
    }
    assert_eq!(ours_cfg["config"]["Labels"], their_labels, "{name}: labels");
}

fn image_config(work: &std::path::Path) -> serde_json::Value {
    let layout = work.join("layout");
    let read = |rel: String| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(layout.join(rel)).unwrap()).unwrap()
    };
    let index = read("index.json".into());
    let blob = |d: &serde_json::Value| {
        format!(
            "blobs/sha256/{}",
            d.as_str().unwrap().trim_start_matches("sha256:")
        )
    };
    let manifest = read(blob(&index["manifests"][0]["digest"]));
    read(blob(&manifest["config"]["digest"]))
}

fn compare(ours: &BTreeMap<String, Entry>, theirs: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut diffs = Vec::new();
    for (path, theirs_e) in theirs {
        match ours.get(path) {
            Some(ours_e) if ours_e == theirs_e => {}
            Some(ours_e) => diffs.push(format!(
                "{path}: shmocker {ours_e:?} vs buildah {theirs_e:?}"
            )),
            None => {
                let stub = BUILDAH_STUBS
                    .iter()
                    .any(|s| path == s || path.starts_with(&format!("{s}/")));
                if !(stub && theirs_e.size == 0) {
                    diffs.push(format!("{path}: only in buildah's image ({theirs_e:?})"));
                }
            }
        }
    }
    for path in ours.keys().filter(|p| !theirs.contains_key(*p)) {
        diffs.push(format!(
            "{path}: only in shmocker's image ({:?})",
            ours[path]
        ));
    }
    diffs
}

#[test]
fn fs_basics_matches_buildah_as_root() {
    differential("fs-basics", Who::Root);
}

#[test]
fn fs_basics_matches_buildah_as_unprivileged_user() {
    differential("fs-basics", Who::User);
}

#[test]
fn copy_config_matches_buildah_as_root() {
    differential("copy-config", Who::Root);
}

#[test]
fn copy_config_matches_buildah_as_unprivileged_user() {
    differential("copy-config", Who::User);
}

/// Enough files that the COPY helper copies them on several threads (sandbox/rootfs.rs
/// `FileQueue`), with names that two sources share (the later source's file, symlink or
/// directory must win, as when the files are copied one after the other), symlinks, modes and sizes from empty to 5 MB.
fn many_files(ctx: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    for (src, dirs) in [("src1", 12), ("src2", 4)] {
        for d in 0..dirs {
            let dir = ctx.join(src).join(format!("d{d}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..40 {
                let path = dir.join(format!("f{f}"));
                let len = if f == 7 && d == 1 {
                    5 << 20
                } else {
                    (d * 40 + f) * 97 % 6000
                };
                let body: Vec<u8> = (0..len)
                    .map(|i| (i * 31 + f + d + src.len()) as u8)
                    .collect();
                std::fs::write(&path, body).unwrap();
                let mode = [0o644, 0o755, 0o600, 0o640][f % 4];
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            }
            std::os::unix::fs::symlink("f3", dir.join("link-to-f3")).unwrap();
        }
    }
    // Where src1 has files, src2 has a symlink and a directory: they replace the files.
    let d0 = ctx.join("src2/d0");
    std::fs::remove_file(d0.join("f5")).unwrap();
    std::os::unix::fs::symlink("f3", d0.join("f5")).unwrap();
    std::fs::remove_file(d0.join("f6")).unwrap();
    std::fs::create_dir(d0.join("f6")).unwrap();
    std::fs::write(d0.join("f6/inner"), "inner").unwrap();
}

#[test]
fn copy_of_many_files_matches_buildah_as_root() {
    differential_with("copy-many", Who::Root, many_files);
}

#[test]
fn copy_of_many_files_matches_buildah_as_unprivileged_user() {
    differential_with("copy-many", Who::User, many_files);
}
