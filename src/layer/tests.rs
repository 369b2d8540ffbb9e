//! Tests of unpacking and diffing, with real overlay mounts made in a user namespace
//! (`unshare --user --map-root-user --mount`). They need to run as root (for chown to other IDs
//! and mknod of real devices) on Linux >= 5.11 with overlayfs.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};
use tar::EntryType;

use super::*;
use crate::store::Store;

// ---------------------------------------------------------------------------------------------
// Helpers

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Appends a member with a raw name and link name (no validation by the tar crate, so hostile
/// names can be written).
#[allow(clippy::too_many_arguments)]
fn raw_entry(
    b: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: EntryType,
    mode: u32,
    ids: (u64, u64),
    mtime: u64,
    link: &str,
    data: &[u8],
) {
    let mut h = tar::Header::new_ustar();
    {
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(ids.0);
    h.set_gid(ids.1);
    h.set_mtime(mtime);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32, data: &[u8]) {
    raw_entry(b, name, EntryType::Regular, mode, (0, 0), 1000, "", data);
}

fn dir(b: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32) {
    raw_entry(b, name, EntryType::Directory, mode, (0, 0), 1000, "", b"");
}

fn link(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: EntryType, target: &str) {
    raw_entry(b, name, kind, 0o777, (0, 0), 1000, target, b"");
}

fn pax_record(key: &str, value: &str) -> String {
    let base = key.len() + value.len() + 3;
    let mut n = base + base.to_string().len();
    if n.to_string().len() + base != n {
        n = base + n.to_string().len();
    }
    format!("{n} {key}={value}\n")
}

fn finish(b: tar::Builder<Vec<u8>>) -> Vec<u8> {
    b.into_inner().unwrap()
}

fn apply(tar: &[u8], dest: &Path) -> Result<ApplyReport, LayerError> {
    apply_layer(tar, Compression::None, dest, &ApplyOptions::default())
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p)
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
}

/// Runs `script` in a shell with cwd = the merged dir of an overlay mount made in a new user and
/// mount namespace (`userxattr`, as the builder mounts). Returns stdout.
fn overlay_run(lowers: &[&Path], upper: &Path, work: &Path, merged: &Path, script: &str) -> String {
    let lowerdir = lowers
        .iter()
        .map(|p| p.to_str().unwrap())
        .collect::<Vec<_>>()
        .join(":");
    let mount = format!(
        "mount -t overlay overlay -o lowerdir={lowerdir},upperdir={},workdir={},userxattr {} && cd {} && {script}",
        upper.display(),
        work.display(),
        merged.display(),
        merged.display()
    );
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-ec", &mount])
        .output()
        .expect("running unshare");
    assert!(
        out.status.success(),
        "overlay script failed: {}\nstdout: {}\nstderr: {}",
        script,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fresh upper, work and merged dirs under `base/name-*`.
fn overlay_dirs(base: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let u = base.join(format!("{name}-upper"));
    let w = base.join(format!("{name}-work"));
    let m = base.join(format!("{name}-merged"));
    for d in [&u, &w, &m] {
        fs::create_dir_all(d).unwrap();
    }
    (u, w, m)
}

/// What a merged view looks like: every path with its type, mode, uid and link target, then the
/// checksum of every regular file.
const LISTING: &str = "find . -mindepth 1 -printf '%p %y %m %U %l\\n' | LC_ALL=C sort; \
                       find . -type f -exec md5sum {} + | LC_ALL=C sort";

/// One member of a layer as read back.
#[derive(Debug, Clone, PartialEq)]
struct Member {
    name: String,
    kind: EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    link: Option<String>,
    data: Vec<u8>,
    pax: Vec<(String, String)>,
}

fn read_members(tar_bytes: &[u8]) -> Vec<Member> {
    let mut ar = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let pax = match e.pax_extensions().unwrap() {
            Some(exts) => exts
                .map(|x| {
                    let x = x.unwrap();
                    (x.key().unwrap().to_string(), x.value().unwrap().to_string())
                })
                .collect(),
            None => Vec::new(),
        };
        let h = e.header().clone();
        let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8(l.into_owned()).unwrap());
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push(Member {
            name,
            kind: h.entry_type(),
            mode: h.mode().unwrap(),
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            mtime: h.mtime().unwrap(),
            size: h.size().unwrap(),
            link,
            data,
            pax,
        });
    }
    out
}

/// The raw type flags of all headers, extension headers included.
fn raw_typeflags(tar_bytes: &[u8]) -> Vec<(u8, String)> {
    let mut ar = tar::Archive::new(tar_bytes);
    ar.entries()
        .unwrap()
        .raw(true)
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                h.as_bytes()[156],
                String::from_utf8_lossy(&h.as_bytes()[..100])
                    .trim_end_matches('\0')
                    .to_string(),
            )
        })
        .collect()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Reads a committed layer back and checks its digest, diff_id, size and media type.
fn read_blob(store: &Store, blob: &LayerBlob) -> Vec<u8> {
    let gz = fs::read(store.blob_path(&blob.digest).unwrap()).unwrap();
    assert_eq!(sha256(&gz), blob.digest, "digest is the sha256 of the blob");
    // Deterministic gzip header: no mtime, no name, default level, OS unknown.
    assert_eq!(&gz[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
    assert_eq!(gz.len() as u64, blob.size);
    assert_eq!(
        blob.media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let tar = gunzip(&gz);
    assert_eq!(
        sha256(&tar),
        blob.diff_id,
        "diff_id is the sha256 of the tar"
    );
    tar
}

// ---------------------------------------------------------------------------------------------
// Media types

#[test]
fn compression_from_media_type() {
    use Compression::*;
    for (t, c) in [
        ("application/vnd.oci.image.layer.v1.tar", None),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
        (
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
            Gzip,
        ),
    ] {
        assert_eq!(Compression::from_media_type(t).unwrap(), c, "{t}");
    }
    for t in [
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
    ] {
        assert_eq!(Compression::from_media_type(t).unwrap(), Zstd, "{t}");
    }
    let e = Compression::from_media_type("application/json")
        .unwrap_err()
        .to_string();
    assert!(e.contains("application/json"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Unpacking

#[test]
fn apply_restores_types_owners_modes_and_mtimes() {
    let t = tempfile::tempdir().unwrap();
    let dest = t.path().join("dest");
    fs::create_dir(&dest).unwrap();

    let mut b = tar::Builder::new(Vec::new());
    raw_entry(
        &mut b,
        "./",
        EntryType::Directory,
        0o755,
        (0, 0),
        500,
        "",
        b"",
    );
    dir(&mut b, "./etc/", 0o755);
    file(&mut b, "./etc/hostname", 0o644, b"box\n");
    // A read-only directory whose contents come after it, and whose mtime must survive them.
    raw_entry(
        &mut b,
        "data/",
        EntryType::Directory,
        0o555,
        (1000, 1000),
        12345,
        "",
        b"",
    );
    file(&mut b, "data/f", 0o600, b"in a read-only dir");
    raw_entry(
        &mut b,
        "bin/su",
        EntryType::Regular,
        0o4755,
        (1000, 1000),
        777,
        "",
        b"#!su",
    );
    raw_entry(
        &mut b,
        "bin/sgid",
        EntryType::Regular,
        0o2755,
        (0, 1000),
        777,
        "",
        b"g",
    );
    raw_entry(
        &mut b,
        "bin/sh",
        EntryType::Symlink,
        0o777,
        (1000, 1001),
        888,
        "busybox",
        b"",
    );
    link(&mut b, "bin/su2", EntryType::Link, "bin/su");
    raw_entry(
        &mut b,
        "run/fifo",
        EntryType::Fifo,
        0o640,
        (1000, 0),
        999,
        "",
        b"",
    );
    let mut h = tar::Header::new_ustar();
    h.set_path("dev/null").unwrap();
    h.set_entry_type(EntryType::Char);
    h.set_mode(0o666);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    let tar = finish(b);

    let rep = apply(&tar, &dest).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert_eq!(rep.entries, 11);
    assert_eq!(rep.diff_id, sha256(&tar));

    assert_eq!(fs::read(dest.join("etc/hostname")).unwrap(), b"box\n");
    assert_eq!(
        fs::read(dest.join("data/f")).unwrap(),
        b"in a read-only dir"
    );
    let data = fs::metadata(dest.join("data")).unwrap();
    assert_eq!(data.mode() & 0o7777, 0o555);
    assert_eq!(data.mtime(), 12345, "dir mtime is set after its contents");
    assert_eq!((data.uid(), data.gid()), (1000, 1000));
    assert_eq!(
        fs::metadata(&dest).unwrap().mtime(),
        500,
        "root entry applies to dest"
    );

    let su = fs::metadata(dest.join("bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755, "setuid survives the chown");
    assert_eq!((su.uid(), su.gid()), (1000, 1000));
    assert_eq!(su.mtime(), 777);
    assert_eq!(mode_of(&dest.join("bin/sgid")), 0o2755);
    assert_eq!(fs::metadata(dest.join("bin/sgid")).unwrap().gid(), 1000);

    let sh = fs::symlink_metadata(dest.join("bin/sh")).unwrap();
    assert!(sh.file_type().is_symlink());
    assert_eq!(
        fs::read_link(dest.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!((sh.uid(), sh.gid()), (1000, 1001));
    assert_eq!(sh.mtime(), 888);

    let su2 = fs::metadata(dest.join("bin/su2")).unwrap();
    assert_eq!(su2.ino(), su.ino(), "hardlink shares the inode");
    assert_eq!(su2.nlink(), 2);

    let fifo = fs::symlink_metadata(dest.join("run/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o640);
    assert_eq!(fifo.uid(), 1000);
    assert_eq!(
        mode_of(&dest.join("run")),
        0o755,
        "implicit parents are 0755"
    );

    let null = fs::symlink_metadata(dest.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(
        (
            nix::sys::stat::major(null.rdev()),
            nix::sys::stat::minor(null.rdev())
        ),
        (1, 3)
    );
}

#[test]
fn apply_honours_pax_names_ids_and_times() {
    let t = tempfile::tempdir().unwrap();
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(130));
    let mut b = tar::Builder::new(Vec::new());
    let recs = pax_record("path", &long)
        + &pax_record("uid", "3000000")
        + &pax_record("mtime", "1700000000.25");
    raw_entry(
        &mut b,
        "PaxHeaders.0/x",
        EntryType::XHeader,
        0,
        (0, 0),
        0,
        "",
        recs.as_bytes(),
    );
    file(&mut b, "truncated-name", 0o644, b"long");
    // A global header is ignored.
    raw_entry(
        &mut b,
        "pax_global_header",
        EntryType::XGlobalHeader,
        0,
        (0, 0),
        0,
        "",
        pax_record("comment", "hi").as_bytes(),
    );
    let tar = finish(b);
    let rep = apply(&tar, t.path()).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    let md = fs::metadata(t.path().join(&long)).unwrap();
    assert_eq!(md.uid(), 3_000_000);
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_700_000_000, 250_000_000));
    assert!(!t.path().join("truncated-name").exists());
}

#[test]
fn apply_turns_oci_whiteouts_into_overlay_whiteouts() {
    let t = tempfile::tempdir().unwrap();
    let (base, layer) = (t.path().join("base"), t.path().join("layer"));
    fs::create_dir_all(base.join("opq")).unwrap();
    fs::create_dir_all(base.join("keep")).unwrap();
    fs::write(base.join("gone"), "base").unwrap();
    fs::write(base.join("opq/hidden"), "base").unwrap();
    fs::write(base.join("keep/x"), "base").unwrap();
    fs::write(base.join("keep/y"), "base").unwrap();
    fs::create_dir(&layer).unwrap();

    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, ".wh.gone", 0, b"");
    dir(&mut b, "opq/", 0o755);
    file(&mut b, "opq/.wh..wh..opq", 0, b"");
    file(&mut b, "opq/new", 0o644, b"layer");
    file(&mut b, "keep/.wh.x", 0, b"");
    // The marker for a directory not listed in the layer creates it.
    file(&mut b, "implicit/.wh..wh..opq", 0, b"");
    file(&mut b, ".wh..wh.plnk", 0, b""); // aufs metadata: skipped
    let tar = finish(b);
    let rep = apply(&tar, &layer).unwrap();
    assert_eq!(rep.warnings.len(), 1, "{:?}", rep.warnings);

    assert!(is_whiteout(&layer.join("gone")));
    assert!(is_whiteout(&layer.join("keep/x")));
    assert!(!layer.join(".wh.gone").exists());
    assert!(!layer.join("keep/.wh.x").exists());
    assert!(!layer.join("opq/.wh..wh..opq").exists());
    assert!(!layer.join(".wh..wh.plnk").exists());
    assert_eq!(
        xattr::get(layer.join("opq"), "user.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(
        xattr::get(layer.join("implicit"), "user.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(
        xattr::get(layer.join("keep"), "user.overlay.opaque").unwrap(),
        None
    );

    // The kernel agrees: in the merged view the whited-out and opaque-hidden files are gone.
    let (u, w, m) = overlay_dirs(t.path(), "check");
    let out = overlay_run(
        &[&layer, &base],
        &u,
        &w,
        &m,
        "find . -mindepth 1 | LC_ALL=C sort",
    );
    let seen: Vec<&str> = out.lines().collect();
    assert_eq!(
        seen,
        ["./implicit", "./keep", "./keep/y", "./opq", "./opq/new"]
    );
}

#[test]
fn apply_with_trusted_xattrs_marks_opaque_with_trusted() {
    let t = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "d/.wh..wh..opq", 0, b"");
    let tar = finish(b);
    let opts = ApplyOptions {
        overlay_xattrs: OverlayXattrs::Trusted,
        ..Default::default()
    };
    apply_layer(&tar[..], Compression::None, t.path(), &opts).unwrap();
    assert_eq!(
        xattr::get(t.path().join("d"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert_eq!(
        xattr::get(t.path().join("d"), "user.overlay.opaque").unwrap(),
        None
    );
}

#[test]
fn apply_replaces_entries_of_another_type() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "a", 0o644, b"file first");
    dir(&mut b, "a/", 0o711); // dir over file
    file(&mut b, "a/inside", 0o644, b"x");
    dir(&mut b, "b/", 0o755);
    file(&mut b, "b/c", 0o644, b"x");
    file(&mut b, "b", 0o600, b"file over dir");
    link(&mut b, "s", EntryType::Symlink, "a");
    dir(&mut b, "s/", 0o755); // dir over a symlink to a dir: replaces the symlink
    file(&mut b, "f", 0o644, b"one");
    file(&mut b, "f", 0o644, b"two"); // file over file
    file(&mut b, "g", 0o644, b"shared");
    link(&mut b, "h", EntryType::Link, "g");
    file(&mut b, "h", 0o644, b"replaced"); // must not write through the hardlink into g
    dir(&mut b, "keep/", 0o700);
    file(&mut b, "keep/child", 0o644, b"stays");
    dir(&mut b, "keep/", 0o750); // dir over dir keeps the contents, takes the new mode
    let tar = finish(b);
    apply(&tar, d).unwrap();

    assert!(d.join("a").is_dir());
    assert_eq!(mode_of(&d.join("a")), 0o711);
    assert_eq!(fs::read(d.join("a/inside")).unwrap(), b"x");
    assert!(fs::symlink_metadata(d.join("b")).unwrap().is_file());
    assert_eq!(fs::read(d.join("b")).unwrap(), b"file over dir");
    assert!(fs::symlink_metadata(d.join("s")).unwrap().is_dir());
    assert!(!d.join("a/s").exists());
    assert_eq!(fs::read(d.join("f")).unwrap(), b"two");
    assert_eq!(fs::read(d.join("g")).unwrap(), b"shared");
    assert_eq!(fs::read(d.join("h")).unwrap(), b"replaced");
    assert_eq!(fs::read(d.join("keep/child")).unwrap(), b"stays");
    assert_eq!(mode_of(&d.join("keep")), 0o750);
}

#[test]
fn apply_reads_gzip_and_checks_the_whole_stream() {
    let t = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "hello", 0o644, &vec![b'h'; 300_000]);
    let tar = finish(b);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();

    let rep = apply_layer(
        &gz[..],
        Compression::Gzip,
        t.path(),
        &ApplyOptions::default(),
    )
    .unwrap();
    assert_eq!(rep.diff_id, sha256(&tar));
    assert_eq!(fs::read(t.path().join("hello")).unwrap().len(), 300_000);

    // A truncated gzip stream is an error, not a silently short layer.
    let t2 = tempfile::tempdir().unwrap();
    let err = apply_layer(
        &gz[..gz.len() - 20],
        Compression::Gzip,
        t2.path(),
        &ApplyOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, LayerError::Read { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Hostile layers: nothing may be written or linked outside dest.

struct Jail {
    _t: tempfile::TempDir,
    dest: PathBuf,
    outside: PathBuf,
}

fn jail() -> Jail {
    let t = tempfile::tempdir().unwrap();
    // dest is two levels deep so that `../x` and `../../x` both land in the tempdir.
    let dest = t.path().join("a/dest");
    let outside = t.path().join("outside");
    fs::create_dir_all(&dest).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), "secret").unwrap();
    Jail {
        _t: t,
        dest,
        outside,
    }
}

impl Jail {
    /// Everything in the tempdir outside dest, with sizes: must not change.
    fn outside_state(&self) -> Vec<(PathBuf, u64, u64)> {
        let root = self.outside.parent().unwrap();
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p == self.dest {
                    continue;
                }
                let md = fs::symlink_metadata(&p).unwrap();
                out.push((p.clone(), md.len(), md.nlink()));
                if md.is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }
}

#[test]
fn hostile_dotdot_names_are_rejected() {
    for name in ["../x", "../../x", "ok/../../x", "./../x"] {
        let j = jail();
        let before = j.outside_state();
        let mut b = tar::Builder::new(Vec::new());
        file(&mut b, name, 0o644, b"pwned");
        let err = apply(&finish(b), &j.dest).unwrap_err();
        assert!(
            matches!(err, LayerError::UnsafePath { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(".."), "{err}");
        assert_eq!(j.outside_state(), before, "{name}");
    }
}

#[test]
fn hostile_absolute_names_are_made_relative() {
    let j = jail();
    let abs = j.outside.join("abs-target");
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, abs.to_str().unwrap(), 0o644, b"pwned");
    let rep = apply(&finish(b), &j.dest).unwrap();
    assert!(!abs.exists(), "wrote to the absolute path");
    let inside = j.dest.join(abs.strip_prefix("/").unwrap());
    assert_eq!(fs::read(inside).unwrap(), b"pwned");
    assert_eq!(rep.warnings.len(), 1);
    assert!(rep.warnings[0].contains("absolute"), "{:?}", rep.warnings);
}

#[test]
fn hostile_symlink_parents_are_not_followed() {
    let j = jail();
    let before = j.outside_state();
    let mut b = tar::Builder::new(Vec::new());
    link(
        &mut b,
        "evil",
        EntryType::Symlink,
        j.outside.to_str().unwrap(),
    );
    file(&mut b, "evil/file", 0o644, b"pwned");
    let err = apply(&finish(b), &j.dest).unwrap_err();
    assert!(matches!(err, LayerError::NotADirectory { .. }), "{err}");
    assert!(err.to_string().contains("evil"), "{err}");
    assert!(!j.outside.join("file").exists());
    assert_eq!(j.outside_state(), before);

    // The same through a relative symlink climbing out, and through an opaque marker and a
    // whiteout under the symlink.
    for second in ["evil/file", "evil/.wh..wh..opq", "evil/.wh.secret"] {
        let j = jail();
        let before = j.outside_state();
        let mut b = tar::Builder::new(Vec::new());
        link(&mut b, "evil", EntryType::Symlink, "../../outside");
        file(&mut b, second, 0, b"");
        let err = apply(&finish(b), &j.dest).unwrap_err();
        assert!(
            matches!(err, LayerError::NotADirectory { .. }),
            "{second}: {err}"
        );
        assert_eq!(j.outside_state(), before, "{second}");
        assert_eq!(xattr::get(&j.outside, "user.overlay.opaque").unwrap(), None);
        assert!(
            fs::symlink_metadata(j.outside.join("secret"))
                .unwrap()
                .is_file()
        );
    }
}

#[test]
fn hostile_leaf_symlinks_are_replaced_not_written_through() {
    let j = jail();
    let before = j.outside_state();
    let mut b = tar::Builder::new(Vec::new());
    link(
        &mut b,
        "evil",
        EntryType::Symlink,
        j.outside.join("secret").to_str().unwrap(),
    );
    file(&mut b, "evil", 0o644, b"pwned");
    link(
        &mut b,
        "evil2",
        EntryType::Symlink,
        j.outside.to_str().unwrap(),
    );
    dir(&mut b, "evil2/", 0o777);
    let rep = apply(&finish(b), &j.dest).unwrap();
    assert!(rep.warnings.is_empty());
    assert_eq!(fs::read(j.outside.join("secret")).unwrap(), b"secret");
    assert_eq!(fs::read(j.dest.join("evil")).unwrap(), b"pwned");
    assert!(fs::symlink_metadata(j.dest.join("evil2")).unwrap().is_dir());
    assert_eq!(mode_of(&j.outside), 0o755, "chmod went through the symlink");
    assert_eq!(j.outside_state(), before);
}

#[test]
fn hostile_hardlinks_are_rejected() {
    let j = jail();
    let before = j.outside_state();
    let mut b = tar::Builder::new(Vec::new());
    link(&mut b, "hl", EntryType::Link, "../../outside/secret");
    let err = apply(&finish(b), &j.dest).unwrap_err();
    assert!(matches!(err, LayerError::UnsafePath { .. }), "{err}");
    assert!(!j.dest.join("hl").exists());

    // Through a symlinked directory in the layer.
    let mut b = tar::Builder::new(Vec::new());
    link(
        &mut b,
        "evil",
        EntryType::Symlink,
        j.outside.to_str().unwrap(),
    );
    link(&mut b, "hl", EntryType::Link, "evil/secret");
    let err = apply(&finish(b), &j.dest).unwrap_err();
    assert!(matches!(err, LayerError::NotADirectory { .. }), "{err}");
    assert!(!j.dest.join("hl").exists());

    // An absolute target is taken relative to dest, where it doesn't exist.
    let mut b = tar::Builder::new(Vec::new());
    link(
        &mut b,
        "hl",
        EntryType::Link,
        j.outside.join("secret").to_str().unwrap(),
    );
    let err = apply(&finish(b), &j.dest).unwrap_err();
    assert!(matches!(err, LayerError::HardlinkTarget { .. }), "{err}");
    assert!(!j.dest.join("hl").exists());

    // A hardlink to a symlink that points outside links the symlink, not its target.
    let mut b = tar::Builder::new(Vec::new());
    link(
        &mut b,
        "sym",
        EntryType::Symlink,
        j.outside.join("secret").to_str().unwrap(),
    );
    link(&mut b, "hl2", EntryType::Link, "sym");
    apply(&finish(b), &j.dest).unwrap();
    assert!(
        fs::symlink_metadata(j.dest.join("hl2"))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    assert_eq!(j.outside_state(), before);
    assert_eq!(fs::metadata(j.outside.join("secret")).unwrap().nlink(), 1);
}

#[test]
fn hostile_pax_paths_are_checked_too() {
    for (key, value, kind) in [
        ("path", "../pax-escape", EntryType::Regular),
        ("path", "/../../pax-escape", EntryType::Regular),
        ("linkpath", "../../outside/secret", EntryType::Link),
    ] {
        let j = jail();
        let before = j.outside_state();
        let mut b = tar::Builder::new(Vec::new());
        let rec = pax_record(key, value);
        raw_entry(
            &mut b,
            "PaxHeaders.0/x",
            EntryType::XHeader,
            0,
            (0, 0),
            0,
            "",
            rec.as_bytes(),
        );
        raw_entry(
            &mut b,
            "innocent",
            kind,
            0o644,
            (0, 0),
            0,
            "innocent-target",
            b"",
        );
        let err = apply(&finish(b), &j.dest).unwrap_err();
        assert!(
            matches!(err, LayerError::UnsafePath { .. }),
            "{value}: {err}"
        );
        assert_eq!(j.outside_state(), before, "{value}");
        assert!(!j.dest.join("innocent").exists());
    }
}

#[test]
fn hostile_whiteouts_of_dot_names_are_rejected() {
    for name in ["x/.wh..", "x/.wh...", ".wh."] {
        let j = jail();
        let before = j.outside_state();
        let mut b = tar::Builder::new(Vec::new());
        file(&mut b, name, 0, b"");
        let err = apply(&finish(b), &j.dest).unwrap_err();
        assert!(
            matches!(err, LayerError::UnsafePath { .. }),
            "{name}: {err}"
        );
        assert_eq!(j.outside_state(), before);
    }
}

// ---------------------------------------------------------------------------------------------
// Inside a user namespace (the test binary re-runs itself under `unshare`).

const IN_USERNS: &str = "SHMOCKER_LAYER_TEST_IN_USERNS";

/// Runs the named test of this binary again inside `unshare --user --map-root-user` (only ID 0
/// mapped). Returns true when the caller is that inner run and should do the work.
fn in_userns(test: &str) -> bool {
    if std::env::var_os(IN_USERNS).is_some() {
        return true;
    }
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(IN_USERNS, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "inner run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

#[test]
fn userns_unmapped_owner_fails_clearly_and_devices_are_skipped() {
    if !in_userns("layer::tests::userns_unmapped_owner_fails_clearly_and_devices_are_skipped") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    raw_entry(
        &mut b,
        "home/user/file",
        EntryType::Regular,
        0o644,
        (1000, 1000),
        0,
        "",
        b"x",
    );
    let tar = finish(b);

    let err = apply(&tar, t.path()).unwrap_err();
    assert!(
        matches!(
            err,
            LayerError::Chown {
                uid: 1000,
                gid: 1000,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("home/user/file") && msg.contains("1000:1000"),
        "{msg}"
    );
    assert!(msg.contains("subuid"), "{msg}");

    // Single-ID mode: no chown, everything owned by the namespace's root.
    let t = tempfile::tempdir().unwrap();
    let opts = ApplyOptions {
        chown: false,
        ..Default::default()
    };
    apply_layer(&tar[..], Compression::None, t.path(), &opts).unwrap();
    assert_eq!(
        fs::metadata(t.path().join("home/user/file")).unwrap().uid(),
        0
    );
    assert_eq!(
        xattr::get(t.path().join("home/user/file"), OWNER_XATTR).unwrap(),
        None,
        "nothing is recorded unless asked"
    );

    // ... and with the owners recorded, a layer written from those files has them back.
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    fs::create_dir(&upper).unwrap();
    let opts = ApplyOptions {
        chown: false,
        record_owner: true,
        ..Default::default()
    };
    apply_layer(&tar[..], Compression::None, &upper, &opts).unwrap();
    let f = upper.join("home/user/file");
    assert_eq!(fs::metadata(&f).unwrap().uid(), 0);
    assert_eq!(
        xattr::get(&f, OWNER_XATTR).unwrap().as_deref(),
        Some(&b"1000:1000"[..])
    );
    // Directories the tar does not list (made as the namespace's root) carry nothing.
    assert_eq!(xattr::get(upper.join("home"), OWNER_XATTR).unwrap(), None);
    let store = Store::open(t.path().join("store")).unwrap();
    let owners = |recorded: bool| -> Vec<(String, u64, u64)> {
        let opts = DiffOptions {
            recorded_owners: recorded,
            ..Default::default()
        };
        let blob = diff_upper_to_blob(&upper, &store, &opts).unwrap();
        read_members(&read_blob(&store, &blob))
            .into_iter()
            .map(|m| (m.name, m.uid, m.gid))
            .collect()
    };
    let with = owners(true);
    assert!(
        with.contains(&("home/user/file".into(), 1000, 1000)),
        "{with:?}"
    );
    assert!(with.contains(&("home/".into(), 0, 0)), "{with:?}");
    // The xattr itself is never in a layer.
    let blob = diff_upper_to_blob(
        &upper,
        &store,
        &DiffOptions {
            recorded_owners: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        read_members(&read_blob(&store, &blob))
            .iter()
            .all(|m| m.pax.iter().all(|(k, _)| !k.contains("shmocker"))),
    );
    let without = owners(false);
    assert!(
        without.contains(&("home/user/file".into(), 0, 0)),
        "{without:?}"
    );

    // Devices can't be made here: skipped with a warning; whiteouts still work.
    let t = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("dev/null").unwrap();
    h.set_entry_type(EntryType::Char);
    h.set_mode(0o666);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    file(&mut b, ".wh.gone", 0, b"");
    let rep = apply(&finish(b), t.path()).unwrap();
    assert_eq!(rep.warnings.len(), 1, "{:?}", rep.warnings);
    assert!(rep.warnings[0].contains("dev/null"), "{:?}", rep.warnings);
    assert!(!t.path().join("dev/null").exists());
    assert!(is_whiteout(&t.path().join("gone")));
}

// ---------------------------------------------------------------------------------------------
// Diffing a real overlay upper dir

/// A lower dir and the upper dir of a RUN that changed it in every way. Returns (lower, upper,
/// listing of the merged view as the RUN left it).
fn run_scenario(base: &Path) -> (PathBuf, PathBuf, String) {
    let lower = base.join("lower");
    fs::create_dir_all(lower.join("olddir/sub")).unwrap();
    fs::write(lower.join("olddir/x"), "old x").unwrap();
    fs::write(lower.join("olddir/sub/y"), "old y").unwrap();
    fs::write(lower.join("mod.txt"), "lower\n").unwrap();
    fs::write(lower.join("del.txt"), "delete me").unwrap();
    fs::write(lower.join("chm.sh"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(lower.join("chm.sh"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(lower.join("untouched"), "same").unwrap();
    fs::create_dir_all(lower.join("a")).unwrap();
    let (u, w, m) = overlay_dirs(base, "run");
    let script = format!(
        "echo new > new.txt; echo changed >> mod.txt; rm del.txt; \
         rm -rf olddir && mkdir olddir && echo z > olddir/z; chmod 0755 chm.sh; \
         ln -s new.txt sym; ln new.txt hard; mkdir -p deep/er && echo q > deep/er/q; \
         touch a/x a-b; mkfifo pipe; chown 0:0 new.txt; {LISTING}"
    );
    let listing = overlay_run(&[&lower], &u, &w, &m, &script);
    (lower, u, listing)
}

#[test]
fn diff_of_a_real_overlay_upper() {
    let t = tempfile::tempdir().unwrap();
    let (_lower, upper, _) = run_scenario(t.path());
    // The kernel wrote what we expect to translate.
    assert!(is_whiteout(&upper.join("del.txt")));
    assert_eq!(
        xattr::get(upper.join("olddir"), "user.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );

    let store = Store::open(t.path().join("store")).unwrap();
    let blob = diff_upper_to_blob(&upper, &store, &DiffOptions::default()).unwrap();
    assert!(blob.warnings.is_empty(), "{:?}", blob.warnings);
    let tar = read_blob(&store, &blob);
    let members = read_members(&tar);
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "a/",
            "a/x",
            "a-b",
            "chm.sh",
            "deep/",
            "deep/er/",
            "deep/er/q",
            ".wh.del.txt",
            "hard",
            "mod.txt",
            "new.txt",
            "olddir/",
            "olddir/.wh..wh..opq",
            "olddir/z",
            "pipe",
            "sym",
        ]
    );
    let by: BTreeMap<&str, &Member> = members.iter().map(|m| (m.name.as_str(), m)).collect();

    for marker in [".wh.del.txt", "olddir/.wh..wh..opq"] {
        let m = by[marker];
        assert_eq!(
            (m.kind, m.mode, m.uid, m.gid, m.mtime, m.size),
            (EntryType::Regular, 0, 0, 0, 0, 0),
            "{marker}"
        );
    }
    assert_eq!(by["a/"].kind, EntryType::Directory);
    assert_eq!(by["chm.sh"].mode, 0o755);
    assert_eq!(by["chm.sh"].data, b"#!/bin/sh\n");
    assert_eq!(by["mod.txt"].data, b"lower\nchanged\n");
    assert_eq!(by["hard"].kind, EntryType::Regular);
    assert_eq!(by["hard"].data, b"new\n");
    assert_eq!(by["new.txt"].kind, EntryType::Link);
    assert_eq!(by["new.txt"].link.as_deref(), Some("hard"));
    assert_eq!(by["new.txt"].size, 0);
    assert_eq!(by["sym"].kind, EntryType::Symlink);
    assert_eq!(by["sym"].link.as_deref(), Some("new.txt"));
    assert_eq!(by["pipe"].kind, EntryType::Fifo);
    assert_eq!(by["olddir/z"].data, b"z\n");
    assert!(!by.contains_key("untouched"));
    assert!(!by.contains_key("olddir/x"));
    // Real mtimes are kept (the RUN happened just now).
    assert!(by["mod.txt"].mtime > 1_600_000_000);

    // No device entries for whiteouts, no xattrs, no PAX headers at all.
    assert!(members.iter().all(|m| m.kind != EntryType::Char));
    assert!(members.iter().all(|m| m.pax.is_empty()));
    assert!(
        raw_typeflags(&tar)
            .iter()
            .all(|(f, _)| *f != b'x' && *f != b'g')
    );
    let has = |needle: &[u8]| tar.windows(needle.len()).any(|w| w == needle);
    assert!(!has(b"overlay."), "overlay xattrs leaked into the layer");
    // Mode fields without file type bits, empty user/group names.
    let first = &tar[..512];
    assert_eq!(&first[100..108], b"0000755\0");
    assert_eq!(&first[265..297], &[0u8; 32]);

    // Deterministic: the same upper gives the same blob.
    let again = diff_upper_to_blob(&upper, &store, &DiffOptions::default()).unwrap();
    assert_eq!(again, blob);
}

#[test]
fn round_trip_reproduces_the_merged_view() {
    let t = tempfile::tempdir().unwrap();
    let (lower, upper, listing) = run_scenario(t.path());
    let store = Store::open(t.path().join("store")).unwrap();
    let blob = diff_upper_to_blob(&upper, &store, &DiffOptions::default()).unwrap();

    let layer = t.path().join("layer");
    fs::create_dir(&layer).unwrap();
    let gz = fs::File::open(store.blob_path(&blob.digest).unwrap()).unwrap();
    let rep = apply_layer(gz, Compression::Gzip, &layer, &ApplyOptions::default()).unwrap();
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert_eq!(rep.diff_id, blob.diff_id);

    // The applied layer stacked on the lower shows what the RUN saw.
    let (u, w, m) = overlay_dirs(t.path(), "again");
    let seen = overlay_run(&[&layer, &lower], &u, &w, &m, LISTING);
    assert!(listing.contains("./olddir/z"), "{listing}");
    assert!(!listing.contains("./del.txt "), "{listing}");
    assert_eq!(seen, listing);

    // And the applied layer, diffed as an upper dir, gives the very same tar.
    let blob2 = diff_upper_to_blob(&layer, &store, &DiffOptions::default()).unwrap();
    assert_eq!(blob2.diff_id, blob.diff_id);
    assert_eq!(blob2.digest, blob.digest);
}

#[test]
fn diff_refuses_redirect_and_metacopy() {
    for (what, attr) in [
        ("dir", "user.overlay.redirect"),
        ("file", "user.overlay.metacopy"),
        ("file", "trusted.overlay.metacopy"),
    ] {
        let t = tempfile::tempdir().unwrap();
        let up = t.path().join("upper");
        fs::create_dir_all(up.join("d")).unwrap();
        fs::write(up.join("d/f"), "x").unwrap();
        let target = if what == "dir" {
            up.join("d")
        } else {
            up.join("d/f")
        };
        xattr::set(&target, attr, b"/elsewhere").unwrap();
        let store = Store::open(t.path().join("store")).unwrap();
        let err = diff_upper_to_blob(&up, &store, &DiffOptions::default()).unwrap_err();
        assert!(
            matches!(&err, LayerError::UnsupportedOverlayFeature { path, xattr } if *path == target && xattr == attr),
            "{err}"
        );
        // The partial blob was dropped.
        assert_eq!(fs::read_dir(t.path().join("store/tmp")).unwrap().count(), 0);
        assert_eq!(
            fs::read_dir(t.path().join("store/blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
        // A plain tree doesn't care.
        dir_to_blob(&up, &store, &DiffOptions::default()).unwrap();
    }
}

#[test]
fn diff_refuses_files_named_like_whiteouts() {
    let t = tempfile::tempdir().unwrap();
    let up = t.path().join("upper");
    fs::create_dir_all(up.join("d")).unwrap();
    fs::write(up.join("d/.wh.sneaky"), "x").unwrap();
    let store = Store::open(t.path().join("store")).unwrap();
    let err = diff_upper_to_blob(&up, &store, &DiffOptions::default()).unwrap_err();
    assert!(matches!(err, LayerError::WhiteoutName { .. }), "{err}");
    assert!(err.to_string().contains(".wh.sneaky"), "{err}");
}

#[test]
fn diff_clamps_mtimes_to_source_date_epoch() {
    let t = tempfile::tempdir().unwrap();
    let up = t.path().join("upper");
    fs::create_dir_all(up.join("d")).unwrap();
    let set = |p: &Path, secs: u64| {
        let f = fs::File::options().read(true).open(p).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .unwrap();
    };
    fs::write(up.join("d/old"), "o").unwrap();
    fs::write(up.join("d/new"), "n").unwrap();
    nix::sys::stat::mknod(
        &up.join("gone"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    set(&up.join("d/old"), 100);
    set(&up.join("d/new"), 2_000_000_000);
    set(&up.join("d"), 2_000_000_000);

    let store = Store::open(t.path().join("store")).unwrap();
    let opts = DiffOptions {
        source_date_epoch: Some(1_000_000),
        ..Default::default()
    };
    let blob = diff_upper_to_blob(&up, &store, &opts).unwrap();
    let members = read_members(&read_blob(&store, &blob));
    let mt: Vec<(&str, u64)> = members.iter().map(|m| (m.name.as_str(), m.mtime)).collect();
    assert_eq!(
        mt,
        [
            ("d/", 1_000_000),
            ("d/new", 1_000_000),
            ("d/old", 100),
            (".wh.gone", 1_000_000)
        ]
    );

    let unclamped = diff_upper_to_blob(&up, &store, &DiffOptions::default()).unwrap();
    assert_ne!(unclamped.diff_id, blob.diff_id);
    let members = read_members(&read_blob(&store, &unclamped));
    assert_eq!(members[0].mtime, 2_000_000_000);
    assert_eq!(members[3].mtime, 0, "whiteouts get mtime 0");
}

#[test]
fn long_names_and_big_ids_use_pax_only_when_needed() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("tree");
    // 121 bytes with the '/', splittable at the inner '/' (a single 120-byte component is not).
    let split_dir = format!("{}/{}", "d".repeat(60), "e".repeat(59));
    let split_name = format!("{split_dir}/{}", "f".repeat(50));
    let long_file = "L".repeat(150);
    let long_target = format!("/{}", "t".repeat(149));
    fs::create_dir_all(root.join(&split_dir)).unwrap();
    fs::write(root.join(&split_name), "split").unwrap();
    fs::write(root.join(&long_file), "pax").unwrap();
    fs::write(root.join("höhe"), "utf8").unwrap();
    symlink(&long_target, root.join("ln")).unwrap();
    fs::write(root.join("big"), "ids").unwrap();
    nix::unistd::chown(
        &root.join("big"),
        Some(nix::unistd::Uid::from_raw(3_000_000)),
        Some(nix::unistd::Gid::from_raw(5)),
    )
    .unwrap();

    let store = Store::open(t.path().join("store")).unwrap();
    let blob = dir_to_blob(&root, &store, &DiffOptions::default()).unwrap();
    let tar = read_blob(&store, &blob);
    let members = read_members(&tar);
    let by: BTreeMap<&str, &Member> = members.iter().map(|m| (m.name.as_str(), m)).collect();

    assert!(
        by[split_name.as_str()].pax.is_empty(),
        "splittable: USTAR prefix"
    );
    assert!(by[format!("{split_dir}/").as_str()].pax.is_empty());
    assert_eq!(by[split_name.as_str()].data, b"split");
    assert_eq!(
        by[long_file.as_str()].pax,
        [("path".to_string(), long_file.clone())]
    );
    assert_eq!(by["höhe"].pax, [("path".to_string(), "höhe".to_string())]);
    assert_eq!(
        by["ln"].pax,
        [("linkpath".to_string(), long_target.clone())]
    );
    assert_eq!(by["ln"].link.as_deref(), Some(long_target.as_str()));
    assert_eq!(by["big"].pax, [("uid".to_string(), "3000000".to_string())]);
    assert_eq!(by["big"].gid, 5);
    let pax_headers: Vec<String> = raw_typeflags(&tar)
        .into_iter()
        .filter(|(f, _)| *f == b'x')
        .map(|(_, n)| n)
        .collect();
    assert_eq!(
        pax_headers,
        [
            format!("PaxHeaders.0/{}", &long_file[..100 - 13]),
            "PaxHeaders.0/big".to_string(),
            "PaxHeaders.0/hhe".to_string(),
            "PaxHeaders.0/ln".to_string(),
        ]
    );

    // And it unpacks to the same tree.
    let dest = t.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let gz = fs::File::open(store.blob_path(&blob.digest).unwrap()).unwrap();
    apply_layer(gz, Compression::Gzip, &dest, &ApplyOptions::default()).unwrap();
    assert_eq!(fs::read(dest.join(&split_name)).unwrap(), b"split");
    assert_eq!(fs::read(dest.join(&long_file)).unwrap(), b"pax");
    assert_eq!(fs::read(dest.join("höhe")).unwrap(), b"utf8");
    assert_eq!(
        fs::read_link(dest.join("ln")).unwrap(),
        Path::new(&long_target)
    );
    assert_eq!(fs::metadata(dest.join("big")).unwrap().uid(), 3_000_000);
}

#[test]
fn plain_trees_keep_devices_upper_dirs_turn_them_into_whiteouts() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("tree");
    fs::create_dir(&root).unwrap();
    let mk = |name: &str, dev| {
        nix::sys::stat::mknod(
            &root.join(name),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            dev,
        )
        .unwrap()
    };
    mk("null", nix::sys::stat::makedev(1, 3));
    mk("zero-zero", 0);
    fs::set_permissions(root.join("null"), fs::Permissions::from_mode(0o666)).unwrap();
    let store = Store::open(t.path().join("store")).unwrap();

    let plain = read_members(&read_blob(
        &store,
        &dir_to_blob(&root, &store, &DiffOptions::default()).unwrap(),
    ));
    let kinds: Vec<(&str, EntryType)> = plain.iter().map(|m| (m.name.as_str(), m.kind)).collect();
    assert_eq!(
        kinds,
        [("null", EntryType::Char), ("zero-zero", EntryType::Char)]
    );
    assert_eq!(plain[0].mode, 0o666);

    let upper = read_members(&read_blob(
        &store,
        &diff_upper_to_blob(&root, &store, &DiffOptions::default()).unwrap(),
    ));
    let kinds: Vec<(&str, EntryType)> = upper.iter().map(|m| (m.name.as_str(), m.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("null", EntryType::Char),
            (".wh.zero-zero", EntryType::Regular)
        ]
    );
}

#[test]
fn sockets_are_left_out_with_a_warning() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("tree");
    fs::create_dir(&root).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    fs::write(root.join("file"), "x").unwrap();
    let store = Store::open(t.path().join("store")).unwrap();
    let blob = diff_upper_to_blob(&root, &store, &DiffOptions::default()).unwrap();
    assert_eq!(blob.warnings.len(), 1);
    assert!(blob.warnings[0].contains("sock"), "{:?}", blob.warnings);
    let names: Vec<String> = read_members(&read_blob(&store, &blob))
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["file"]);
}

#[test]
fn empty_upper_detection_and_empty_layer() {
    let t = tempfile::tempdir().unwrap();
    let up = t.path().join("upper");
    fs::create_dir(&up).unwrap();
    assert!(is_empty_upper(&up).unwrap());
    let store = Store::open(t.path().join("store")).unwrap();
    let blob = diff_upper_to_blob(&up, &store, &DiffOptions::default()).unwrap();
    let tar = read_blob(&store, &blob);
    assert_eq!(
        tar,
        vec![0u8; 1024],
        "an empty layer is just the end-of-archive blocks"
    );

    nix::sys::stat::mknod(
        &up.join("gone"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    assert!(!is_empty_upper(&up).unwrap(), "a whiteout is a change");
    assert!(is_empty_upper(&t.path().join("missing")).is_err());
}

// ---------------------------------------------------------------------------------------------
// Compression: parallel gzip, zstd, ADD's archive formats

/// A tree with a few files, one of them ~3 MB of mixed compressibility (many gzip blocks).
fn compressible_tree(root: &Path) {
    fs::create_dir_all(root.join("d/e")).unwrap();
    fs::write(root.join("d/small"), b"small file\n").unwrap();
    let mut big = Vec::with_capacity(3 << 20);
    let mut x: u32 = 12345;
    while big.len() < 3 << 20 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        if x.is_multiple_of(4) {
            big.extend((0..512).map(|i| (x >> (i % 24)) as u8));
        } else {
            big.extend_from_slice(format!("line {} of a log file\n", x % 1000).as_bytes());
        }
    }
    fs::write(root.join("d/e/big"), &big).unwrap();
    for p in ["d", "d/e", "d/small", "d/e/big"] {
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        fs::File::options()
            .write(p != "d" && p != "d/e")
            .read(true)
            .open(root.join(p))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
}

fn tool_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (install it: apt-get install gzip zstd)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn layer_bytes_are_the_same_for_1_2_and_4_compression_threads() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    compressible_tree(&tree);
    let store = Store::open(t.path().join("store")).unwrap();
    for compression in [
        LayerCompression::default(),
        LayerCompression::Zstd { level: 3 },
    ] {
        let blobs: Vec<LayerBlob> = [1, 2, 4]
            .iter()
            .map(|&threads| {
                let opts = DiffOptions {
                    compression,
                    threads: Some(threads),
                    ..Default::default()
                };
                dir_to_blob(&tree, &store, &opts).unwrap()
            })
            .collect();
        assert!(blobs[0].size > 100_000, "{compression:?}: {:?}", blobs[0]);
        assert!(
            blobs[0].size < 3 << 20,
            "{compression:?} compresses: {:?}",
            blobs[0]
        );
        for b in &blobs[1..] {
            assert_eq!(b, &blobs[0], "{compression:?}");
        }
        assert_eq!(blobs[0].media_type, compression.media_type());

        // Other tools read it, and it unpacks to the same tar.
        let path = store.blob_path(&blobs[0].digest).unwrap();
        let tar = match compression {
            LayerCompression::Gzip { .. } => {
                assert_eq!(read_blob(&store, &blobs[0]).len() as u64 % 512, 0);
                tool_ok(Command::new("gzip").arg("-t").arg(&path));
                tool_ok(Command::new("zcat").arg(&path))
            }
            LayerCompression::Zstd { .. } => {
                tool_ok(Command::new("zstd").arg("-t").arg(&path));
                tool_ok(Command::new("zstd").arg("-dc").arg(&path))
            }
        };
        assert_eq!(sha256(&tar), blobs[0].diff_id);
        let names: Vec<String> = read_members(&tar).into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["d/", "d/e/", "d/e/big", "d/small"]);

        // Round trip: unpacked and written again, the same blob.
        let dest = t.path().join(format!("unpacked-{}", compression.label()));
        fs::create_dir(&dest).unwrap();
        let rep = apply_layer(
            fs::File::open(&path).unwrap(),
            compression.compression(),
            &dest,
            &ApplyOptions::default(),
        )
        .unwrap();
        assert_eq!(rep.diff_id, blobs[0].diff_id);
        assert_eq!(
            fs::read(dest.join("d/e/big")).unwrap(),
            fs::read(tree.join("d/e/big")).unwrap()
        );
        let again = dir_to_blob(
            &dest,
            &store,
            &DiffOptions {
                compression,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(again, blobs[0]);
    }
}

#[test]
fn recompress_keeps_the_diff_id_and_matches_a_direct_write() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    compressible_tree(&tree);
    let store = Store::open(t.path().join("store")).unwrap();
    let gz = dir_to_blob(&tree, &store, &DiffOptions::default()).unwrap();
    let zstd = LayerCompression::Zstd { level: 3 };
    let direct = dir_to_blob(
        &tree,
        &store,
        &DiffOptions {
            compression: zstd,
            ..Default::default()
        },
    )
    .unwrap();
    let converted = recompress(
        &store.blob_path(&gz.digest).unwrap(),
        Compression::Gzip,
        zstd,
        &store,
        Some(2),
    )
    .unwrap();
    assert_eq!(converted, direct);
    let back = recompress(
        &store.blob_path(&converted.digest).unwrap(),
        Compression::Zstd,
        LayerCompression::default(),
        &store,
        Some(1),
    )
    .unwrap();
    assert_eq!(back, gz);
}

#[test]
fn layer_compression_names_and_levels() {
    assert_eq!(
        LayerCompression::parse("gzip", None).unwrap(),
        LayerCompression::Gzip { level: 5 }
    );
    assert_eq!(
        LayerCompression::parse("zstd", Some("19")).unwrap(),
        LayerCompression::Zstd { level: 19 }
    );
    for (name, level, want) in [
        ("gzip", Some("10"), "0-9"),
        ("zstd", Some("0"), "1-22"),
        ("zstd", Some("x"), "not a number"),
        ("estargz", None, "use gzip or zstd"),
    ] {
        let e = LayerCompression::parse(name, level).unwrap_err();
        assert!(e.contains(want), "{name} {level:?}: {e}");
    }
}

#[test]
fn add_archives_in_every_compression_docker_unpacks() {
    let t = tempfile::tempdir().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "pkg/", 0o755);
    file(&mut b, "pkg/hello.txt", 0o644, b"hello from the archive\n");
    let tar = finish(b);

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    bz.write_all(&tar).unwrap();
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
    xz.write_all(&tar).unwrap();
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for (name, bytes, want) in [
        ("a.tar", tar.clone(), Compression::None),
        ("a.tgz", gz.finish().unwrap(), Compression::Gzip),
        ("a.tar.bz2", bz.finish().unwrap(), Compression::Bzip2),
        ("a.tar.xz", xz.finish().unwrap(), Compression::Xz),
        ("a.tar.zst", zst, Compression::Zstd),
    ] {
        let path = t.path().join(name);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(
            archive_kind(&path).unwrap(),
            ArchiveKind::Tar(want),
            "{name}"
        );
        assert_eq!(sniff_compression(&path).unwrap(), want, "{name}");
        let dest = t.path().join(format!("out-{name}"));
        fs::create_dir(&dest).unwrap();
        let rep = apply_layer(
            fs::File::open(&path).unwrap(),
            want,
            &dest,
            &ApplyOptions::default(),
        )
        .unwrap();
        assert_eq!(rep.diff_id, sha256(&tar), "{name}");
        assert_eq!(
            fs::read(dest.join("pkg/hello.txt")).unwrap(),
            b"hello from the archive\n",
            "{name}"
        );
    }

    // Compressed files that hold no tar are copied by ADD, not unpacked.
    let not_tar = t.path().join("notes.txt.zst");
    fs::write(&not_tar, zstd::encode_all(&b"just text"[..], 3).unwrap()).unwrap();
    assert_eq!(archive_kind(&not_tar).unwrap(), ArchiveKind::NotAnArchive);
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
    bz.write_all(b"just text").unwrap();
    let not_tar = t.path().join("notes.txt.bz2");
    fs::write(&not_tar, bz.finish().unwrap()).unwrap();
    assert_eq!(archive_kind(&not_tar).unwrap(), ArchiveKind::NotAnArchive);
}
