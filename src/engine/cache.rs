//! The local build cache: what each filesystem step produced, keyed by everything that decides it.
//!
//! A step's key is the sha256 of its parent's key and a JSON description of the step: for RUN
//! the command, environment, user, working directory and mounts; for COPY the destination,
//! flags and a content hash of every source file; for WORKDIR the path and owner. The chain
//! starts at the base image's manifest digest, so a changed base or an earlier changed step
//! changes every key after it. A record names the layer the step made (or none, for a step that
//! changed nothing) and the time it was first made, which keeps history times — and so the image
//! digest — the same when a build is repeated from cache.
//!
//! ```text
//! <store>/cache/<key hex>.json    one record, written to a temp file and renamed into place
//! ```

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::sandbox::CopyItem;
use crate::store::Store;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CachedLayer {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub diff_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub created: String,
    pub layer: Option<CachedLayer>,
}

#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
    store: Store,
}

impl Cache {
    pub fn new(store: &Store) -> io::Result<Cache> {
        let dir = store.root().join("cache");
        fs::create_dir_all(&dir)?;
        Ok(Cache {
            dir,
            store: store.clone(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// The record for `key`, if there is a readable one. A damaged record is treated as a miss.
    pub fn get(&self, key: &str) -> Option<Record> {
        let bytes = fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn put(&self, key: &str, record: &Record) -> io::Result<()> {
        write_via_temp(
            &self.temp_for(key),
            &serde_json::to_vec(record)?,
            &self.path(key),
        )
    }

    /// A store temp name (`cache-KEY-PID-NS_TOKEN_N`): unique per process, namespace and call
    /// (parallel stages, and builds in other containers, may make the same step), and cleaned
    /// by the next build when its owner was killed.
    fn temp_for(&self, key: &str) -> PathBuf {
        self.store.temp_path(&format!("cache-{key}"))
    }
}

/// Writes `data` to `tmp`, then renames it to `dest`; on failure, `tmp` is removed.
fn write_via_temp(tmp: &Path, data: &[u8], dest: &Path) -> io::Result<()> {
    let done = fs::write(tmp, data).and_then(|()| fs::rename(tmp, dest));
    if done.is_err() {
        let _ = fs::remove_file(tmp);
    }
    done
}

/// The key of a step: its parent's key and a description of the step.
pub fn step_key(parent: &str, material: &serde_json::Value) -> String {
    let mut h = Sha256::new();
    h.update(parent.as_bytes());
    h.update(b"\n");
    h.update(material.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// Remembered content hashes of files, by their identity and change times, so that an unchanged
/// large context is not read again on every build (the file-metadata cache).
#[derive(Debug, Default)]
pub struct FileHashes {
    path: Option<PathBuf>,
    /// The store the hashes belong to, whose `tmp/` takes the partial file.
    store: Option<Store>,
    known: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// The entries this build looked up or added.
    used: std::sync::Mutex<std::collections::HashSet<String>>,
    changed: std::sync::atomic::AtomicBool,
}

/// More remembered file versions than this, and [`FileHashes::save`] keeps only those the build
/// used: contexts in fresh temporary checkouts would otherwise grow the file for ever.
const MAX_FILE_HASHES: usize = 200_000;

/// The path part of a [`FileHashes`] entry's id (`dev:ino:size:mtime:ctime:PATH`).
fn id_path(id: &str) -> &str {
    id.splitn(6, ':').nth(5).unwrap_or("")
}

/// The ctime part (seconds, nanoseconds) of an entry's id; (0, 0) for a malformed one.
fn id_ctime(id: &str) -> (i64, i64) {
    id.split(':')
        .nth(4)
        .and_then(|t| t.split_once('.'))
        .and_then(|(s, n)| Some((s.parse().ok()?, n.parse().ok()?)))
        .unwrap_or((0, 0))
}

impl FileHashes {
    /// Loads the remembered hashes of `store` (none when the file is missing or damaged).
    pub fn load(store: &Store) -> FileHashes {
        let path = store.root().join("cache").join("file-hashes.json");
        let known = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        FileHashes {
            path: Some(path),
            store: Some(store.clone()),
            known: std::sync::Mutex::new(known),
            used: Default::default(),
            changed: Default::default(),
        }
    }

    /// Writes the hashes back (atomically) if any were added.
    pub fn save(&self) -> io::Result<()> {
        let (Some(path), Some(store)) = (&self.path, &self.store) else {
            return Ok(());
        };
        if !self.changed.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        let data = {
            let mut known = self.known.lock().expect("file hashes");
            let used = self.used.lock().expect("file hashes");
            // A file has one version: of the entries for a path, only the newest (by ctime,
            // which no process can set back) can still match it.
            let mut newest: std::collections::HashMap<String, (i64, i64)> = Default::default();
            for id in known.keys() {
                let t = id_ctime(id);
                let e = newest.entry(id_path(id).to_string()).or_insert(t);
                *e = (*e).max(t);
            }
            known.retain(|id, _| newest.get(id_path(id)) == Some(&id_ctime(id)));
            if known.len() > MAX_FILE_HASHES {
                known.retain(|id, _| used.contains(id));
            }
            serde_json::to_vec(&*known)?
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        // A store temp (`cache-file-hashes-PID-NS_TOKEN_N`): a killed build's partial file is
        // cleaned up by the next build, and builds in other containers never share it.
        write_via_temp(&store.temp_path("cache-file-hashes"), &data, path)
    }

    fn hash(&self, path: &Path, meta: &fs::Metadata) -> io::Result<String> {
        use std::os::unix::fs::MetadataExt;
        // Any change to the file changes its ctime; with inode and size that identifies a version.
        let id = format!(
            "{}:{}:{}:{}.{}:{}.{}:{}",
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
            path.display()
        );
        self.used.lock().expect("file hashes").insert(id.clone());
        if let Some(h) = self.known.lock().expect("file hashes").get(&id) {
            return Ok(h.clone());
        }
        let mut h = Sha256::new();
        hash_file(path, &mut h)?;
        let hex = hex::encode(h.finalize());
        self.known
            .lock()
            .expect("file hashes")
            .insert(id, hex.clone());
        self.changed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(hex)
    }
}

/// A content hash of the files a COPY takes: each item's path under the destination, type, mode
/// and contents (or link target). Source paths on the host and modification times do not count,
/// as in BuildKit, so the same files in a fresh checkout hit the same cache (the layer then keeps
/// the times of the build that made it).
pub fn hash_copy_items(items: &[CopyItem], hashes: &FileHashes) -> io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut h = Sha256::new();
    for item in items {
        let meta = fs::symlink_metadata(&item.src)?;
        h.update(item.rel.as_os_str().as_encoded_bytes());
        h.update(format!("\0{:o}\0", meta.mode()).as_bytes());
        if meta.file_type().is_symlink() {
            h.update(fs::read_link(&item.src)?.as_os_str().as_encoded_bytes());
        } else if meta.is_file() {
            h.update(hashes.hash(&item.src, &meta)?.as_bytes());
        }
        h.update(b"\n");
    }
    Ok(hex::encode(h.finalize()))
}

fn hash_file(path: &Path, h: &mut Sha256) -> io::Result<()> {
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_and_records_round_trip() {
        let a = step_key("base", &serde_json::json!({"run": ["echo", "a"]}));
        let b = step_key("base", &serde_json::json!({"run": ["echo", "b"]}));
        let a2 = step_key("other-base", &serde_json::json!({"run": ["echo", "a"]}));
        assert_ne!(a, b);
        assert_ne!(a, a2);
        assert_eq!(
            a,
            step_key("base", &serde_json::json!({"run": ["echo", "a"]}))
        );

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cache = Cache::new(&store).unwrap();
        assert!(cache.get(&a).is_none());
        let rec = Record {
            created: "2020-01-01T00:00:00Z".into(),
            layer: None,
        };
        cache.put(&a, &rec).unwrap();
        assert_eq!(cache.get(&a), Some(rec));
    }

    #[test]
    fn record_temps_are_store_temps_and_a_failed_put_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cache = Cache::new(&store).unwrap();
        let key = "ab".repeat(32);
        let (t1, t2) = (cache.temp_for(&key), cache.temp_for(&key));
        assert_ne!(t1, t2);
        assert_eq!(t1.parent(), Some(dir.path().join("tmp").as_path()));
        let name = t1.file_name().unwrap().to_string_lossy().into_owned();
        let (pid, ns) = crate::store::temp_owner(&name).expect("a store temp name");
        assert_eq!(pid, std::process::id());
        assert_ne!(ns, 0, "{name}: no pid namespace");
        // The record's place is taken by a directory: the rename fails, the temp goes.
        fs::create_dir_all(cache.path(&key).join("x")).unwrap();
        let rec = Record {
            created: "2020-01-01T00:00:00Z".into(),
            layer: None,
        };
        assert!(cache.put(&key, &rec).is_err());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // The file hashes likewise.
        let hashes = FileHashes::load(&store);
        let f = dir.path().join("f");
        fs::write(&f, "x").unwrap();
        hashes.hash(&f, &fs::metadata(&f).unwrap()).unwrap();
        fs::create_dir_all(dir.path().join("cache/file-hashes.json/x")).unwrap();
        assert!(hashes.save().is_err());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn copy_hash_follows_contents_not_location() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        for d in [&d1, &d2] {
            fs::write(d.path().join("f"), "same").unwrap();
        }
        let items = |d: &Path| {
            vec![CopyItem {
                src: d.join("f"),
                rel: "f".into(),
            }]
        };
        let store_dir = tempfile::tempdir().unwrap();
        let store = Store::open(store_dir.path()).unwrap();
        let hashes = FileHashes::load(&store);
        let h1 = hash_copy_items(&items(d1.path()), &hashes).unwrap();
        assert_eq!(h1, hash_copy_items(&items(d2.path()), &hashes).unwrap());
        fs::write(d2.path().join("f"), "diff").unwrap();
        assert_ne!(h1, hash_copy_items(&items(d2.path()), &hashes).unwrap());
        // Remembered across builds, and still right after a change.
        hashes.save().unwrap();
        let again = FileHashes::load(&store);
        assert_eq!(h1, hash_copy_items(&items(d1.path()), &again).unwrap());
        fs::write(d1.path().join("f"), "changed").unwrap();
        assert_ne!(h1, hash_copy_items(&items(d1.path()), &again).unwrap());
        // Saving forgets the versions that changed (d2's first one went with the first save,
        // d1's first one goes now): one entry per file.
        assert_eq!(again.known.lock().unwrap().len(), 3);
        again.save().unwrap();
        let third = FileHashes::load(&store);
        let mut paths: Vec<String> = third
            .known
            .lock()
            .unwrap()
            .keys()
            .map(|id| id_path(id).to_string())
            .collect();
        paths.sort();
        let mut want = vec![
            d1.path().join("f").display().to_string(),
            d2.path().join("f").display().to_string(),
        ];
        want.sort();
        assert_eq!(paths, want);
    }

    #[test]
    fn entry_ids_end_with_the_path_even_with_colons_in_it() {
        assert_eq!(id_path("1:2:3:4.5:6.7:/ctx/a:b/c"), "/ctx/a:b/c");
        assert_eq!(id_path("garbage"), "");
        assert_eq!(id_ctime("1:2:3:4.5:6.7:/ctx/a:b/c"), (6, 7));
        assert_eq!(id_ctime("garbage"), (0, 0));
    }
}
