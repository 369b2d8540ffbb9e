//! Snapshots: image layers kept unpacked on disk, ready to be stacked as overlayfs lower dirs.
//!
//! Words, as containerd uses them: a *committed* snapshot is one layer's files, unpacked once and
//! never changed again; an *active* snapshot is the upper dir of a running step. Committed
//! snapshots are named by the layer's diff ID (the digest of its uncompressed tar), so the same
//! layer is unpacked once however many images or builds share it. Whiteouts and opaque
//! directories are stored in overlayfs' own form (0/0 character devices, `user.overlay.opaque`),
//! which is also exactly what a step's upper dir holds when the step ends — so a step's upper dir
//! is committed by renaming it, without unpacking the layer it produced.
//!
//! ```text
//! <store>/snapshots/<diff-id hex>/   one committed layer
//! <store>/snapshots/empty/           the lower dir of an image with no layers (FROM scratch)
//! ```

use std::fs;
use std::path::PathBuf;

use crate::store::{Store, StoreError, digest_hex};

#[derive(Debug, Clone)]
pub struct Snapshots {
    dir: PathBuf,
}

impl Snapshots {
    pub fn new(store: &Store) -> Result<Snapshots, StoreError> {
        let dir = store.root().join("snapshots");
        let empty = dir.join("empty");
        fs::create_dir_all(&empty).map_err(|source| StoreError::Io {
            path: empty.clone(),
            source,
        })?;
        Ok(Snapshots { dir })
    }

    /// Where the committed snapshot of the layer with this diff ID lives (it may not exist yet).
    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf, StoreError> {
        Ok(self.dir.join(digest_hex(diff_id)?))
    }

    pub fn empty_dir(&self) -> PathBuf {
        self.dir.join("empty")
    }
}
