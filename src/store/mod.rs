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

    /// A fresh path under `<root>/tmp` for partial work of any kind:
    /// `PREFIX-PID-NS_TOKEN_N`, with this process's pid, its pid namespace (so that builds in
    /// different containers sharing one store never take each other's pids for their own) and a
    /// random token (so that two processes with the same pid in different namespaces never
    /// share a path).
    pub fn temp_path(&self, prefix: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let (ns, token) = process_tag();
        self.root
            .join("tmp")
            .join(format!("{prefix}-{}-{ns}_{token}_{n}", std::process::id()))
    }

    /// Removes what crashed or killed builds left in `<root>/tmp`: every entry whose owning
    /// process (the pid in its name, in this pid namespace) is gone. Entries of running builds,
    /// and of builds in other pid namespaces (whose pids cannot be checked from here), are kept.
    /// Returns how many were removed.
    pub fn clean_stale_tmp(&self) -> usize {
        let tmp = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&tmp) else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = owner_pid(&name) else {
                continue;
            };
            if owner_ns(&name).is_some_and(|ns| ns != process_tag().0) {
                continue;
            }
            if process_alive(pid) {
                continue;
            }
            let p = e.path();
            let gone = match e.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&p).is_ok(),
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
            tmp_path,
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Writes a small blob (a config or manifest) held in memory.
    pub fn put_bytes(&self, data: &[u8]) -> Result<String, StoreError> {
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

/// The pid namespace in a temp name made by [`Store::temp_path`] (`prefix-PID-NS_TOKEN_N`);
/// `None` for names without one (older builds, cache records).
fn owner_ns(name: &str) -> Option<u64> {
    let last = name.rsplit('-').next()?;
    let (ns, _) = last.split_once('_')?;
    ns.parse().ok()
}

/// The pid in a temp name made by [`Store::temp_path`] (`prefix-PID-NS_TOKEN_N`, or
/// `prefix-PID-N` from older builds), in a cache record's temp name (`cache-KEY-PID`), or in
/// the probes' work directory (`detect-PID`).
fn owner_pid(name: &str) -> Option<u32> {
    let mut parts = name.rsplit('-');
    let last = parts.next()?;
    let before = parts.next()?;
    // prefix-PID-N: the pid is the second to last part; cache-KEY-PID, detect-PID: the last.
    if name.starts_with("cache-") || name.starts_with("detect-") {
        last.parse().ok()
    } else {
        before.parse().ok()
    }
}

/// A blob being written: hashes what passes through, and on [`commit`](Self::commit) syncs the file,
/// checks the digest and renames it into place. Dropped without commit, it deletes its temp file.
pub struct BlobWriter {
    store: Store,
    file: Option<File>,
    tmp_path: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Finishes the blob. With `expected`, a different digest is an error and nothing is stored.
    /// Returns the digest and size.
    pub fn commit(mut self, expected: Option<&str>) -> Result<(String, u64), StoreError> {
        let file = self.file.take().expect("commit called once");
        file.sync_all().map_err(io_err(&self.tmp_path))?;
        drop(file);
        let hasher = std::mem::take(&mut self.hasher);
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        if let Some(expected) = expected
            && expected != digest
        {
            let _ = fs::remove_file(&self.tmp_path);
            return Err(StoreError::DigestMismatch {
                expected: expected.to_string(),
                actual: digest,
                size: self.size,
            });
        }
        let dest = self.store.blob_path(&digest)?;
        fs::rename(&self.tmp_path, &dest).map_err(io_err(&dest))?;
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
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mine = store.temp_path("step");
        fs::create_dir_all(mine.join("upper")).unwrap();
        // pid 0x7ffffffe is never a live process here.
        let dead = dir.path().join("tmp").join("step-2147483646-0");
        fs::create_dir_all(dead.join("upper/x")).unwrap();
        let dead_blob = dir
            .path()
            .join("tmp")
            .join(format!("blob-2147483646-{}_1234_3", process_tag().0));
        fs::write(&dead_blob, b"partial").unwrap();
        // The same pid in another pid namespace (another container sharing the store) cannot
        // be checked from here: kept.
        let foreign = dir.path().join("tmp").join("blob-2147483646-7_1234_3");
        fs::write(&foreign, b"partial").unwrap();
        let probes = dir.path().join("tmp").join("detect-2147483646");
        fs::create_dir_all(probes.join("work")).unwrap();
        assert_eq!(store.clean_stale_tmp(), 3);
        assert!(!probes.exists());
        assert!(mine.exists() && !dead.exists() && !dead_blob.exists() && foreign.exists());
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
