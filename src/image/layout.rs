//! Writing an image as an OCI image layout tarball (`--output type=oci,dest=FILE`), the format
//! `skopeo copy oci-archive:FILE`, `umoci` and `docker buildx --output type=oci` share.
//!
//! The tar is written to a temporary file beside the destination and renamed into place only
//! when complete, and blobs are streamed from the store into it, never loaded whole.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::store::{Store, StoreError, digest_hex};

use super::{Descriptor, MEDIA_TYPE_OCI_INDEX};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("writing the OCI layout to {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Writes an OCI layout tar holding `manifest` (and every blob it names) to `dest`.
/// `name` (a full image reference) becomes the `io.containerd.image.name` and
/// `org.opencontainers.image.ref.name` annotations, as buildx writes them.
pub fn write_oci_archive(
    store: &Store,
    dest: &Path,
    manifest: &Descriptor,
    blobs: &[String],
    name: Option<&str>,
) -> Result<(), LayoutError> {
    write_archive(store, dest, manifest, blobs, name, None)
}

/// What `docker load` needs besides the OCI layout: the config and layer paths, and the tags.
pub struct DockerLoad {
    pub config: String,
    pub layers: Vec<String>,
    pub tags: Vec<String>,
}

/// Writes a tar that is both an OCI image layout and loadable by `docker load` (its
/// `manifest.json` names the config and layers inside `blobs/`), as BuildKit's docker exporter.
pub fn write_docker_archive(
    store: &Store,
    dest: &Path,
    manifest: &Descriptor,
    blobs: &[String],
    name: Option<&str>,
    load: &DockerLoad,
) -> Result<(), LayoutError> {
    write_archive(store, dest, manifest, blobs, name, Some(load))
}

fn blob_name(digest: &str) -> Result<String, LayoutError> {
    Ok(format!("blobs/sha256/{}", digest_hex(digest)?))
}

fn write_archive(
    store: &Store,
    dest: &Path,
    manifest: &Descriptor,
    blobs: &[String],
    name: Option<&str>,
    docker: Option<&DockerLoad>,
) -> Result<(), LayoutError> {
    let io_err = |source| LayoutError::Io {
        path: dest.to_path_buf(),
        source,
    };
    let tmp = temp_beside(dest);
    let file = File::create(&tmp).map_err(io_err)?;
    let result = (|| {
        let mut tar = tar::Builder::new(BufWriter::new(file));
        tar.mode(tar::HeaderMode::Deterministic);
        append_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let mut desc = manifest.clone();
        if let Some(name) = name {
            let mut ann = BTreeMap::new();
            ann.insert("io.containerd.image.name".to_string(), name.to_string());
            if let Some(tag) = ref_tag(name) {
                ann.insert("org.opencontainers.image.ref.name".to_string(), tag);
            }
            desc.annotations = Some(ann);
        }
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_OCI_INDEX,
            "manifests": [desc],
        });
        let index = serde_json::to_vec(&index).expect("an index always serialises");
        append_bytes(&mut tar, "index.json", &index)?;
        if let Some(load) = docker {
            let layers: Vec<String> = load
                .layers
                .iter()
                .map(|d| blob_name(d))
                .collect::<Result<_, _>>()?;
            let m = serde_json::json!([{
                "Config": blob_name(&load.config)?,
                "RepoTags": load.tags,
                "Layers": layers,
            }]);
            append_bytes(&mut tar, "manifest.json", m.to_string().as_bytes())?;
        }
        append_dir(&mut tar, "blobs/")?;
        append_dir(&mut tar, "blobs/sha256/")?;
        let mut seen = std::collections::BTreeSet::new();
        for digest in std::iter::once(&manifest.digest).chain(blobs) {
            if !seen.insert(digest.clone()) {
                continue;
            }
            let path = store.blob_path(digest)?;
            let mut f = File::open(&path).map_err(|source| LayoutError::Io {
                path: path.clone(),
                source,
            })?;
            let name = format!("blobs/sha256/{}", digest_hex(digest)?);
            tar.append_file(&name, &mut f).map_err(io_err)?;
        }
        let mut w = tar.into_inner().map_err(io_err)?;
        w.flush().map_err(io_err)?;
        w.get_ref().sync_all().map_err(io_err)?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, dest).map_err(io_err),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn temp_beside(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image.tar".into());
    dest.with_file_name(format!(".{name}.{}.partial", std::process::id()))
}

/// The tag of a reference (`host/repo:tag` -> `tag`), if it has one.
fn ref_tag(name: &str) -> Option<String> {
    let without_digest = name.split('@').next()?;
    let last = without_digest.rsplit('/').next()?;
    last.split_once(':').map(|(_, t)| t.to_string())
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    data: &[u8],
) -> Result<(), LayoutError> {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mtime(0);
    tar.append_data(&mut h, name, data)
        .map_err(|source| LayoutError::Io {
            path: name.into(),
            source,
        })
}

fn append_dir<W: Write>(tar: &mut tar::Builder<W>, name: &str) -> Result<(), LayoutError> {
    let mut h = tar::Header::new_ustar();
    h.set_size(0);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mtime(0);
    tar.append_data(&mut h, name, io::empty())
        .map_err(|source| LayoutError::Io {
            path: name.into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_taken_from_the_last_path_component() {
        assert_eq!(ref_tag("127.0.0.1:5000/a/b:1").as_deref(), Some("1"));
        assert_eq!(ref_tag("127.0.0.1:5000/a/b"), None);
        assert_eq!(ref_tag("a/b:v@sha256:00").as_deref(), Some("v"));
    }
}
