//! The content-addressed store on disk.
//!
//! Everything shmocker keeps between builds lives under one root directory (`--root`):
//!
//! ```text
//! <root>/blobs/sha256/<hex>     compressed layers, configs and manifests, named by their digest
//! <root>/tmp/                   partial writes; a crash leaves only files here, never a half blob
//! <root>/snapshots/<id>/        unpacked layers and the upper dirs of running steps (see snapshot/)
//! ```
//!
//! A blob is written to a temporary file, hashed while it is written, synced, and only then renamed
//! under its digest, so a blob that exists under its name is always whole. The registry client
//! streams pulls into a [`BlobWriter`]; the layer differ streams compressed tars into one.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "blob digest mismatch: expected {expected}, got {actual} ({size} bytes); the data was corrupted in transit or the source lies about its digest"
    )]
    DigestMismatch {
        expected: String,
        actual: String,
        size: u64,
    },
    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    InvalidDigest(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `digest` is `sha256:<64 lower-case hex>` and returns the hex part.
pub fn digest_hex(digest: &str) -> Result<&str, StoreError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(StoreError::InvalidDigest(digest.to_string())),
    }
}

/// `sha256:<hex>` of a byte slice (configs and manifests are small; layers go through a BlobWriter).
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating as needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let root = root.into();
        for sub in ["blobs/sha256", "tmp", "snapshots"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this digest lives (whether or not it is there yet).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = digest_hex(digest)?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// A fresh path under `<root>/tmp` for partial work of any kind, named by [`temp_name`].
    pub fn temp_path(&self, prefix: &str) -> PathBuf {
        self.root.join("tmp").join(temp_name(prefix))
    }

    /// Removes what crashed or killed builds left in `<root>/tmp`: every entry named by
    /// [`temp_name`] whose owning process (the pid in its name, in this pid namespace) is gone.
    /// Entries of running builds, of builds in other pid namespaces (whose pids cannot be
    /// checked from here) and entries named otherwise (whose owner cannot be told) are kept.
    /// Nothing is removed when this process cannot tell its own pid namespace (no `/proc`).
    /// Returns how many were removed.
    pub fn clean_stale_tmp(&self) -> usize {
        let tmp = self.root.join("tmp");
        let ours = process_tag().0;
        if ours == 0 {
            return 0;
        }
        let Ok(entries) = fs::read_dir(&tmp) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((pid, ns)) = temp_owner(&name) else {
                continue;
            };
            if ns != ours || process_alive(pid) {
                continue;
            }
            let p = e.path();
            let gone = match e.file_type() {
                Ok(t) if t.is_dir() => remove_tree(&p),
                _ => fs::remove_file(&p).is_ok(),
            };
            removed += usize::from(gone);
        }
        removed
    }

    /// Starts writing a blob; call [`BlobWriter::commit`] to put it in place.
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        let tmp_path = self.temp_path("blob");
        // Never an existing file: no two writers ever share one.
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(io_err(&tmp_path))?;
        Ok(BlobWriter {
            store: self.clone(),
            file: Some(file),
            committed: false,
            tmp_path,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Writes a small blob (a config or manifest) held in memory. A blob the store already has
    /// is not written again (it holds these very bytes), which spares a cached build the fsync.
    pub fn put_bytes(&self, data: &[u8]) -> Result<String, StoreError> {
        let digest = sha256_digest(data);
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let mut w = self.blob_writer()?;
        w.write_all(data).map_err(io_err(&self.root))?;
        Ok(w.commit(None)?.0)
    }

    /// Reads a small blob (config, manifest) whole.
    pub fn read_bytes(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(digest)?;
        fs::read(&p).map_err(io_err(&p))
    }
}

/// Whether a process runs: it exists and is not a zombie. A killed build's process stays a
/// zombie where pid 1 does not reap orphans (a container without an init), and must count as
/// gone.
fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) STATE ...`; comm may hold spaces and parentheses, so after the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// This process's pid namespace (the inode number of `/proc/self/ns/pid`, 0 if unknown) and a
/// random token, both fixed for the life of the process.
fn process_tag() -> (u64, u32) {
    static TAG: std::sync::OnceLock<(u64, u32)> = std::sync::OnceLock::new();
    *TAG.get_or_init(|| {
        use std::hash::{BuildHasher as _, Hasher as _};
        let ns = fs::read_link("/proc/self/ns/pid")
            .ok()
            .and_then(|l| {
                let s = l.to_string_lossy().into_owned();
                s.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
            })
            .unwrap_or(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        (ns, h.finish() as u32)
    })
}

/// A fresh name for partial work in a store's `tmp/`: `PREFIX-PID-NS_TOKEN_N`, with this
/// process's pid, its pid namespace (so that builds in different containers sharing one store
/// never take each other's pids for their own), a random token (so that two processes with the
/// same pid in different namespaces never share a name) and a counter (unique within the
/// process). The prefix may hold anything but `/`; [`Store::clean_stale_tmp`] reads the owner
/// from the end of the name.
pub fn temp_name(prefix: &str) -> String {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let (ns, token) = process_tag();
    format!("{prefix}-{}-{ns}_{token}_{n}", std::process::id())
}

/// The owner of a name made by [`temp_name`]: its pid and pid namespace. Read from the end
/// (`…-PID-NS_TOKEN_N`), whatever the prefix holds; `None` for any other name.
pub fn temp_owner(name: &str) -> Option<(u32, u64)> {
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (rest, tag) = name.rsplit_once('-')?;
    let (prefix, pid) = rest.rsplit_once('-')?;
    let mut parts = tag.split('_');
    let (ns, token, n) = (parts.next()?, parts.next()?, parts.next()?);
    if prefix.is_empty()
        || parts.next().is_some()
        || ![pid, ns, token, n].into_iter().all(all_digits)
    {
        return None;
    }
    Some((pid.parse().ok()?, ns.parse().ok()?))
}

/// Removes a directory tree; true if it is gone. Overlayfs leaves its `work/work` directory
/// with mode 0 (and a whiteout inside), which an unprivileged user outside the build's user
/// namespace cannot list: when a first attempt fails, such directories are opened up (u+rwx)
/// and the removal tried again. Symlinks are never followed.
pub fn remove_tree(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fn open_up(dir: &Path) {
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    open_up(&e.path());
                }
            }
        }
    }
    if fs::remove_dir_all(dir).is_ok() || !dir.exists() {
        return true;
    }
    open_up(dir);
    fs::remove_dir_all(dir).is_ok()
}

/// A blob being written: hashes what passes through, and on [`commit`](Self::commit) syncs the file,
/// checks the digest and renames it into place. Dropped without a successful commit (never
/// committed, or a commit that failed at any point), it deletes its temp file.
pub struct BlobWriter {
    store: Store,
    file: Option<File>,
    /// Set once the temp file is renamed into place; until then Drop removes it.
    committed: bool,
    tmp_path: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Finishes the blob. With `expected`, a different digest is an error and nothing is stored.
    /// Returns the digest and size. On any error the temp file is removed (when `self` drops).
    pub fn commit(mut self, expected: Option<&str>) -> Result<(String, u64), StoreError> {
        let file = self.file.take().expect("commit called once");
        file.sync_all().map_err(io_err(&self.tmp_path))?;
        drop(file);
        let hasher = std::mem::take(&mut self.hasher);
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(StoreError::DigestMismatch {
                expected: expected.to_string(),
                actual: digest,
                size: self.size,
            });
        }
        let dest = self.store.blob_path(&digest)?;
        fs::rename(&self.tmp_path, &dest).map_err(io_err(&dest))?;
        self.committed = true;
        Ok((digest, self.size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.as_mut().expect("write after commit").write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("flush after commit").flush()
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_blob_already_stored_is_not_written_again() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.put_bytes(b"config").unwrap();
        let inode = fs::metadata(store.blob_path(&d).unwrap()).unwrap().ino();
        assert_eq!(store.put_bytes(b"config").unwrap(), d);
        let again = fs::metadata(store.blob_path(&d).unwrap()).unwrap().ino();
        assert_eq!(inode, again, "the blob was replaced");
        assert_eq!(store.read_bytes(&d).unwrap(), b"config");
    }

    #[test]
    fn blob_is_named_by_its_digest_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.put_bytes(b"hello").unwrap();
        assert_eq!(
            d,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(store.read_bytes(&d).unwrap(), b"hello");

        let mut w = store.blob_writer().unwrap();
        w.write_all(b"other").unwrap();
        let err = w.commit(Some(&d)).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        // nothing left behind in tmp
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn dropped_writer_leaves_no_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"partial").unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn stale_temp_files_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tmp = dir.path().join("tmp");
        let ns = process_tag().0;
        let mine = store.temp_path("step");
        fs::create_dir_all(mine.join("upper")).unwrap();
        // pid 0x7ffffffe is never a live process here.
        let dead = tmp.join(format!("step-2147483646-{ns}_99_0"));
        fs::create_dir_all(dead.join("upper/x")).unwrap();
        let dead_blob = tmp.join(format!("blob-2147483646-{ns}_1234_3"));
        fs::write(&dead_blob, b"partial").unwrap();
        // A prefix with dashes in it (the cache mounts' and cache records' temps).
        let dead_mount = tmp.join(format!("cache-mount-2147483646-{ns}_5_7"));
        fs::create_dir_all(dead_mount.join("sub")).unwrap();
        let dead_record = tmp.join(format!("cache-{}-2147483646-{ns}_5_8", "ab".repeat(32)));
        fs::write(&dead_record, b"{}").unwrap();
        // The probes' work dir, with the mode-0 directory overlayfs leaves behind.
        let dead_probe = tmp.join(format!("detect-2147483646-{ns}_5_9"));
        fs::create_dir_all(dead_probe.join("work/work/x")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(
            dead_probe.join("work/work"),
            fs::Permissions::from_mode(0o000),
        )
        .unwrap();
        // The same pid in another pid namespace (another container sharing the store) cannot
        // be checked from here: kept.
        let foreign = tmp.join("blob-2147483646-7_1234_3");
        fs::write(&foreign, b"partial").unwrap();
        // Names without a pid namespace cannot be told apart from another container's: kept.
        let unowned = [
            "step-2147483646-0",
            "detect-2147483646",
            "cache-x.1-2147483646",
        ];
        for n in unowned {
            fs::write(tmp.join(n), b"").unwrap();
        }
        assert_eq!(store.clean_stale_tmp(), 5);
        for gone in [&dead, &dead_blob, &dead_mount, &dead_record, &dead_probe] {
            assert!(!gone.exists(), "{} was kept", gone.display());
        }
        assert!(mine.exists() && foreign.exists());
        for n in unowned {
            assert!(tmp.join(n).exists(), "{n} was removed");
        }
    }

    #[test]
    fn temp_names_are_read_from_their_end() {
        let (ns, _) = process_tag();
        let me = std::process::id();
        for prefix in [
            "blob",
            "step",
            "cache-mount",
            "cache-0123abc",
            "detect",
            "a-b-1-2",
        ] {
            let name = temp_name(prefix);
            assert!(name.starts_with(&format!("{prefix}-")), "{name}");
            assert_eq!(temp_owner(&name), Some((me, ns)), "{name}");
        }
        assert_eq!(temp_owner("cache-mount-12-34_56_78"), Some((12, 34)));
        assert_eq!(temp_owner("x-1-2-3_4_5"), Some((2, 3)));
        for other in [
            "",
            "blob",
            "12-34_56_78",
            "-12-34_56_78",
            "step-12-0",
            "detect-12",
            "cache-key.1-12",
            "cache-file-hashes-12",
            "blob-12-34_56",
            "blob-12-34_56_78_9",
            "blob-x12-34_56_78",
            "blob-12-34_56_7a",
            "blob-99999999999-34_56_78",
        ] {
            assert_eq!(temp_owner(other), None, "{other:?}");
        }
    }

    #[test]
    fn a_failed_commit_removes_its_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // The blob's place is taken by a directory: the rename fails.
        let hello = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        fs::create_dir_all(store.blob_path(hello).unwrap().join("x")).unwrap();
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"hello").unwrap();
        let err = w.commit(Some(hello)).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn zombies_count_as_gone() {
        assert!(process_alive(std::process::id()));
        let child = std::process::Command::new("true").spawn().unwrap();
        // Exited and not reaped: a zombie until `child` is waited for.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_alive(child.id()) {
            assert!(std::time::Instant::now() < deadline, "`true` still runs");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(Path::new(&format!("/proc/{}", child.id())).exists());
        drop(child);
    }

    #[test]
    fn rejects_malformed_digests() {
        assert!(digest_hex("sha256:abc").is_err());
        assert!(digest_hex("md5:00").is_err());
        assert!(digest_hex(&format!("sha256:{}", "A".repeat(64))).is_err());
    }
}
