//! Exporting and importing the build cache (`--cache-to`, `--cache-from`), so that a fresh CI
//! runner reuses layers built elsewhere.
//!
//! The exported cache is an image of its own: its config is the list of cache records (step key,
//! time, layer) and its layers are the layers those records name. In a registry it is pushed as
//! an OCI manifest (config media type [`CACHE_CONFIG_MEDIA_TYPE`]) under the `ref` given; in a
//! directory (`type=local`) it is `records.json` plus `blobs/sha256/`. Importing reads the
//! records into the local cache and fetches a layer only when a record of it is used.
//! `mode=min` exports the records of the final stage's steps, `mode=max` those of every stage.
//! A cache that cannot be read or written only costs a warning: the build goes on.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cache::{Cache, Record};
use crate::registry::{BlobRef, Platform, Registry};
use crate::store::{Store, digest_hex};

pub const CACHE_CONFIG_MEDIA_TYPE: &str = "application/vnd.shmocker.cache.config.v1+json";

/// A `--cache-to` / `--cache-from` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheRef {
    Registry { reference: String, max: bool },
    Local { dir: PathBuf, max: bool },
}

impl CacheRef {
    /// Parses `type=registry,ref=R[,mode=min|max]`, `type=local,dest=DIR|src=DIR`, or a bare
    /// reference (buildx's shorthand for `type=registry,ref=R`).
    pub fn parse(spec: &str) -> Result<CacheRef, String> {
        if !spec.contains('=') {
            return Ok(CacheRef::Registry {
                reference: spec.to_string(),
                max: false,
            });
        }
        let mut fields = BTreeMap::new();
        for kv in spec.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?} is not key=value"))?;
            fields.insert(k.trim().to_string(), v.trim().to_string());
        }
        let max = match fields.get("mode").map(String::as_str) {
            None | Some("min") => false,
            Some("max") => true,
            Some(other) => return Err(format!("mode={other}: use min or max")),
        };
        match fields.get("type").map(String::as_str) {
            Some("registry") => Ok(CacheRef::Registry {
                reference: fields
                    .get("ref")
                    .cloned()
                    .ok_or("type=registry needs ref=REGISTRY/NAME:TAG")?,
                max,
            }),
            Some("local") => Ok(CacheRef::Local {
                dir: fields
                    .get("dest")
                    .or_else(|| fields.get("src"))
                    .map(PathBuf::from)
                    .ok_or("type=local needs dest=DIR (--cache-to) or src=DIR (--cache-from)")?,
                max,
            }),
            Some(other) => Err(format!(
                "type={other} is not supported; use type=registry or type=local"
            )),
            None => Err("missing type=; use type=registry,ref=R or type=local,dest=DIR".into()),
        }
    }

    pub fn is_max(&self) -> bool {
        match self {
            CacheRef::Registry { max, .. } | CacheRef::Local { max, .. } => *max,
        }
    }
}

/// The records of an exported cache.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CacheExport {
    pub records: BTreeMap<String, Record>,
}

/// Where a layer named by an imported record can be fetched from, if not in the store.
#[derive(Debug, Clone)]
pub enum LayerSource {
    Registry(oci_client::Reference),
    Local(PathBuf),
}

/// Imports the records of `from` into the local cache. Returns where their layers are.
pub async fn import(
    from: &CacheRef,
    cache: &Cache,
    registry: &Registry,
) -> Result<(usize, LayerSource), String> {
    let (export, source): (CacheExport, LayerSource) = match from {
        CacheRef::Local { dir, .. } => {
            let bytes = fs::read(dir.join("records.json"))
                .map_err(|e| format!("{}: {e}", dir.join("records.json").display()))?;
            (
                serde_json::from_slice(&bytes).map_err(|e| e.to_string())?,
                LayerSource::Local(dir.clone()),
            )
        }
        CacheRef::Registry { reference, .. } => {
            let r = crate::registry::reference::parse(reference).map_err(|e| e.to_string())?;
            let pulled = registry
                .pull_manifest(&r, &Platform::host())
                .await
                .map_err(|e| e.to_string())?;
            if pulled.manifest.config.media_type != CACHE_CONFIG_MEDIA_TYPE {
                return Err(format!(
                    "{reference} is not a shmocker cache (its config is {})",
                    pulled.manifest.config.media_type
                ));
            }
            (
                serde_json::from_slice(&pulled.config_raw).map_err(|e| e.to_string())?,
                LayerSource::Registry(r),
            )
        }
    };
    let mut n = 0;
    for (key, record) in &export.records {
        if cache.get(key).is_none() {
            cache.put(key, record).map_err(|e| e.to_string())?;
            n += 1;
        }
    }
    Ok((n, source))
}

/// Fetches a layer of an imported record into the store.
pub async fn fetch_layer(
    source: &LayerSource,
    blob: &BlobRef,
    store: &Store,
    registry: &Registry,
) -> Result<(), String> {
    match source {
        LayerSource::Registry(r) => registry
            .fetch_blob(r, blob, store)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        LayerSource::Local(dir) => {
            let hex = digest_hex(&blob.digest).map_err(|e| e.to_string())?;
            let path = dir.join("blobs/sha256").join(hex);
            let mut f = fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut w = store.blob_writer().map_err(|e| e.to_string())?;
            std::io::copy(&mut f, &mut w).map_err(|e| e.to_string())?;
            w.commit(Some(&blob.digest))
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

/// Exports `records` to `to`.
pub async fn export(
    to: &CacheRef,
    records: &BTreeMap<String, Record>,
    store: &Store,
    registry: &Registry,
) -> Result<(), String> {
    let export = CacheExport {
        records: records.clone(),
    };
    let config_raw = serde_json::to_vec(&export).map_err(|e| e.to_string())?;
    let mut layers: Vec<BlobRef> = Vec::new();
    for r in records.values() {
        if let Some(l) = &r.layer
            && !layers.iter().any(|b| b.digest == l.digest)
        {
            layers.push(BlobRef {
                digest: l.digest.clone(),
                size: l.size,
                media_type: l.media_type.clone(),
            });
        }
    }
    match to {
        CacheRef::Local { dir, .. } => {
            let blobs = dir.join("blobs/sha256");
            fs::create_dir_all(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
            for l in &layers {
                let hex = digest_hex(&l.digest).map_err(|e| e.to_string())?;
                let dest = blobs.join(hex);
                if !dest.exists() {
                    copy_atomic(
                        &store.blob_path(&l.digest).map_err(|e| e.to_string())?,
                        &dest,
                    )?;
                }
            }
            let tmp = dir.join(".records.json.partial");
            fs::write(&tmp, &config_raw).map_err(|e| e.to_string())?;
            fs::rename(&tmp, dir.join("records.json")).map_err(|e| e.to_string())
        }
        CacheRef::Registry { reference, .. } => {
            let r = crate::registry::reference::parse(reference).map_err(|e| e.to_string())?;
            let config_digest = store.put_bytes(&config_raw).map_err(|e| e.to_string())?;
            let config = BlobRef {
                digest: config_digest.clone(),
                size: config_raw.len() as u64,
                media_type: CACHE_CONFIG_MEDIA_TYPE.into(),
            };
            let desc = |b: &BlobRef| serde_json::json!({"mediaType": b.media_type, "digest": b.digest, "size": b.size});
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": crate::image::MEDIA_TYPE_OCI_MANIFEST,
                "config": desc(&config),
                "layers": layers.iter().map(desc).collect::<Vec<_>>(),
            });
            let raw = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
            registry
                .push_image(
                    &r,
                    &layers,
                    &config,
                    &raw,
                    crate::image::MEDIA_TYPE_OCI_MANIFEST,
                    store,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

fn copy_atomic(src: &Path, dest: &Path) -> Result<(), String> {
    let tmp = dest.with_extension("partial");
    fs::copy(src, &tmp).map_err(|e| format!("{}: {e}", src.display()))?;
    fs::rename(&tmp, dest).map_err(|e| format!("{}: {e}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_refs_parse_like_buildx() {
        assert_eq!(
            CacheRef::parse("type=registry,ref=r:5000/c:1,mode=max").unwrap(),
            CacheRef::Registry {
                reference: "r:5000/c:1".into(),
                max: true
            }
        );
        assert_eq!(
            CacheRef::parse("r:5000/c:1").unwrap(),
            CacheRef::Registry {
                reference: "r:5000/c:1".into(),
                max: false
            }
        );
        assert_eq!(
            CacheRef::parse("type=local,src=/tmp/c").unwrap(),
            CacheRef::Local {
                dir: "/tmp/c".into(),
                max: false
            }
        );
        assert!(CacheRef::parse("type=gha").is_err());
        assert!(CacheRef::parse("type=registry").is_err());
        assert!(CacheRef::parse("type=local,dest=/x,mode=huge").is_err());
    }
}
