//! The pull policy for base images (`--pull`), and what the store remembers of pulls.
//!
//! Every pull stores the documents it read as blobs (the index, when there is one, the
//! platform's manifest and the config, each under its sha256 digest) and, for a reference by
//! tag, which digest the tag pointed at: `<store>/pulled/<sha256 of the reference>`, a file
//! holding the digest and the reference on two lines. With that an image can be resolved
//! without the registry:
//!
//! - `always` (the default, as BuildKit): a reference by tag is resolved in the registry on every
//!   build; the layers already in the store are not fetched again.
//! - `missing` (podman's default; buildah's `--pull=missing` or `false`): a tag pulled before
//!   is taken from the store.
//! - `never`: only the store; an image (or layer) not in it is an error.
//!
//! A reference pinned by digest is taken from the store whenever its documents are there,
//! whatever the policy: its content cannot have changed.

use std::fs;
use std::io::Write as _;
use std::str::FromStr;

use oci_client::Reference;

use super::{Document, PulledImage, Registry, RegistryError, read_document};
use crate::registry::Platform;
use crate::store::{Store, sha256_digest};

/// When a base image is asked of the registry (`--pull`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Resolve tags in the registry on every build (BuildKit's behaviour).
    #[default]
    Always,
    /// Use the image the store has for the tag; pull only what it lacks.
    Missing,
    /// Never ask the registry; fail if the store lacks the image.
    Never,
}

impl FromStr for PullPolicy {
    type Err = String;

    /// `always`, `missing`, `never`; and buildah's `true` (= always) and `false` (= missing).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" | "true" => Ok(PullPolicy::Always),
            "missing" | "false" => Ok(PullPolicy::Missing),
            "never" => Ok(PullPolicy::Never),
            other => Err(format!(
                "--pull={other}: use always (resolve the tag in the registry on every build), missing (use the stored image if the tag was pulled before) or never (only the local store)"
            )),
        }
    }
}

/// Where the store records the digest `reference`'s tag pointed at when it was last pulled.
fn record_path(store: &Store, reference: &Reference) -> std::path::PathBuf {
    let key = sha256_digest(reference.whole().as_bytes());
    store
        .root()
        .join("pulled")
        .join(key.trim_start_matches("sha256:"))
}

/// The digest (of the index or manifest) the store recorded for `reference`'s tag, if any.
pub fn recorded_digest(store: &Store, reference: &Reference) -> Option<String> {
    let text = fs::read_to_string(record_path(store, reference)).ok()?;
    let mut lines = text.lines();
    let digest = lines.next()?;
    // A record is only taken for the very reference it was written for.
    (lines.next() == Some(reference.whole().as_str())).then(|| digest.to_string())
}

/// Records that `reference`'s tag pointed at `digest` (written whole, then renamed into place).
fn record_digest(store: &Store, reference: &Reference, digest: &str) -> std::io::Result<()> {
    let path = record_path(store, reference);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = store.temp_path("pulled");
    let mut f = fs::File::create(&tmp)?;
    writeln!(f, "{digest}\n{}", reference.whole())?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, &path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// The stored document `d` (a manifest, index or config), checked against its digest: one
/// damaged on disk is removed, so that the next pull writes it again, and taken as missing.
pub(super) fn stored_document(store: &Store, d: &str) -> Result<Vec<u8>, String> {
    let bytes = store
        .read_bytes(d)
        .map_err(|_| format!("no document {d} in the store"))?;
    if sha256_digest(&bytes) != d {
        if let Ok(path) = store.blob_path(d) {
            let _ = fs::remove_file(path);
        }
        return Err(format!(
            "the stored document {d} does not match its digest (removed)"
        ));
    }
    Ok(bytes)
}

/// The image `digest` (of an index or a manifest) names, for `platform`, from the store alone;
/// `Err` names what the store lacks.
fn stored_image(
    store: &Store,
    image: &Reference,
    digest: &str,
    platform: &Platform,
) -> Result<PulledImage, String> {
    let shown = image.whole();
    let read = |d: &str| stored_document(store, d);
    let top = read(digest)?;
    let (manifest, manifest_raw, manifest_digest, index_digest) =
        match read_document(&top, digest, platform, &shown).map_err(|e| e.to_string())? {
            Document::Manifest(m) => (*m, top, digest.to_string(), None),
            Document::Index { chosen } => {
                let raw = read(&chosen)?;
                match read_document(&raw, &chosen, platform, &shown).map_err(|e| e.to_string())? {
                    Document::Manifest(m) => (*m, raw, chosen, Some(digest.to_string())),
                    Document::Index { .. } => return Err(format!("{chosen} is a nested index")),
                }
            }
        };
    let config_raw = read(&manifest.config.digest)?;
    Ok(PulledImage {
        reference: super::pinned(image, &manifest_digest),
        manifest_digest,
        index_digest,
        manifest,
        manifest_raw,
        config_raw,
        index_raw: None,
    })
}

impl Registry {
    /// The manifest and config of `image` for `platform`, from the store or the registry as
    /// `policy` says (see the module documentation). What a pull read is stored, and a tag's
    /// digest recorded, for later builds.
    pub async fn resolve_image(
        &self,
        image: &Reference,
        platform: &Platform,
        store: &Store,
        policy: PullPolicy,
    ) -> Result<PulledImage, RegistryError> {
        let local = match image.digest() {
            Some(d) => Some(d.to_string()),
            None if policy != PullPolicy::Always => recorded_digest(store, image),
            None => None,
        };
        let missing = match local.as_deref() {
            Some(d) => match stored_image(store, image, d, platform) {
                Ok(pulled) => return Ok(pulled),
                Err(why) => why,
            },
            None => "the tag was never pulled into it".to_string(),
        };
        if policy == PullPolicy::Never {
            return Err(RegistryError::NotStored {
                reference: image.whole(),
                missing,
            });
        }
        let pulled = self
            .pull_manifest_using(image, platform, Some(store))
            .await?;
        let shown = image.whole();
        let store_err = |source| RegistryError::Store {
            action: "recording the pull of".into(),
            reference: shown.clone(),
            source,
        };
        // Only sha256 documents can be stored by digest (the store's only algorithm).
        let top = pulled
            .index_digest
            .as_ref()
            .unwrap_or(&pulled.manifest_digest);
        if top.starts_with("sha256:") && pulled.manifest_digest.starts_with("sha256:") {
            if let Some(raw) = &pulled.index_raw {
                store.put_bytes(raw).map_err(store_err)?;
            }
            store.put_bytes(&pulled.manifest_raw).map_err(store_err)?;
            store.put_bytes(&pulled.config_raw).map_err(store_err)?;
            if image.digest().is_none() && recorded_digest(store, image).as_deref() != Some(top) {
                record_digest(store, image, top).map_err(|e| RegistryError::Store {
                    action: "recording the tag of".into(),
                    reference: shown.clone(),
                    source: crate::store::StoreError::Io {
                        path: record_path(store, image),
                        source: e,
                    },
                })?;
            }
        }
        Ok(pulled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_as_buildah_and_docker_spell_them() {
        for (s, p) in [
            ("always", PullPolicy::Always),
            ("true", PullPolicy::Always),
            ("missing", PullPolicy::Missing),
            ("false", PullPolicy::Missing),
            ("never", PullPolicy::Never),
        ] {
            assert_eq!(s.parse::<PullPolicy>(), Ok(p), "{s}");
        }
        let e = "sometimes".parse::<PullPolicy>().unwrap_err();
        assert!(
            e.contains("--pull=sometimes") && e.contains("missing"),
            "{e}"
        );
    }

    #[test]
    fn a_tag_record_is_only_read_back_for_its_own_reference() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = crate::registry::reference::parse("x.io/a:1").unwrap();
        let b = crate::registry::reference::parse("x.io/a:2").unwrap();
        assert_eq!(recorded_digest(&store, &a), None);
        record_digest(&store, &a, "sha256:00").unwrap();
        assert_eq!(recorded_digest(&store, &a).as_deref(), Some("sha256:00"));
        assert_eq!(recorded_digest(&store, &b), None);
        record_digest(&store, &a, "sha256:11").unwrap();
        assert_eq!(recorded_digest(&store, &a).as_deref(), Some("sha256:11"));
    }

    #[test]
    fn a_stored_document_that_does_not_match_its_digest_is_removed_and_missing() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_digest = store.put_bytes(config).unwrap();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[]}}"#,
            config.len()
        );
        let manifest_digest = store.put_bytes(manifest.as_bytes()).unwrap();
        let image = crate::registry::reference::parse("x.io/a:1").unwrap();
        let platform = Platform::host();
        assert!(stored_image(&store, &image, &manifest_digest, &platform).is_ok());

        // A flipped byte inside a string still parses as JSON: only the digest shows it.
        let path = store.blob_path(&config_digest).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(
            &path,
            String::from_utf8_lossy(config).replace("amd64", "amd65"),
        )
        .unwrap();
        let e = stored_image(&store, &image, &manifest_digest, &platform).unwrap_err();
        assert!(e.contains("does not match its digest"), "{e}");
        assert!(!path.exists(), "the damaged blob was left in place");
        // The next pull's write is not skipped.
        assert_eq!(store.put_bytes(config).unwrap(), config_digest);
        assert!(stored_image(&store, &image, &manifest_digest, &platform).is_ok());
    }
}
