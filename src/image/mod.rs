//! Image metadata: the image config (what `docker inspect` shows), the manifest that names the
//! config and layers, and the OCI image layout that `--output type=oci` writes.
//!
//! The config is kept as typed fields for what the builder changes and a `rest` map for every
//! other field, so a base image's fields that shmocker does not know survive into the new image
//! unchanged. Raw bytes are what get hashed: a config or manifest is serialised once, stored as
//! a blob, and only ever referred to by the digest of those bytes.

pub mod layout;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The PATH BuildKit gives a stage whose image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Which family of media types an image is written with (`--format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Oci,
    Docker,
}

impl Format {
    pub fn manifest(self) -> &'static str {
        match self {
            Format::Oci => MEDIA_TYPE_OCI_MANIFEST,
            Format::Docker => MEDIA_TYPE_DOCKER_MANIFEST,
        }
    }
    pub fn config(self) -> &'static str {
        match self {
            Format::Oci => MEDIA_TYPE_OCI_CONFIG,
            Format::Docker => MEDIA_TYPE_DOCKER_CONFIG,
        }
    }
    /// The media type of a gzip layer in this format; other layer types are kept as they are.
    pub fn layer(self, media_type: &str) -> String {
        let gzip = matches!(
            media_type,
            MEDIA_TYPE_OCI_LAYER_GZIP | MEDIA_TYPE_DOCKER_LAYER_GZIP
        );
        match (self, gzip) {
            (Format::Oci, true) => MEDIA_TYPE_OCI_LAYER_GZIP.into(),
            (Format::Docker, true) => MEDIA_TYPE_DOCKER_LAYER_GZIP.into(),
            _ => media_type.into(),
        }
    }
}

/// Comment BuildKit puts on every history entry of a Dockerfile build.
pub const HISTORY_COMMENT: &str = "buildkit.dockerfile.v0";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: ContainerConfig,
    #[serde(default)]
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ContainerConfig {
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(
        rename = "ExposedPorts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub exposed_ports: Option<BTreeMap<String, Value>>,
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Volumes", default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, Value>>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(rename = "Labels", default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(
        rename = "StopSignal",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_signal: Option<String>,
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            kind: "layers".into(),
            diff_ids: vec![],
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

impl ContainerConfig {
    /// The value of an environment variable in `Env`.
    pub fn env_get(&self, key: &str) -> Option<&str> {
        self.env.iter().flatten().find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then_some(v)
        })
    }

    /// Sets `key=value` in `Env`, replacing an existing entry in place (as Docker does).
    pub fn env_set(&mut self, key: &str, value: &str) {
        let env = self.env.get_or_insert_with(Vec::new);
        let entry = format!("{key}={value}");
        match env
            .iter_mut()
            .find(|kv| kv.split_once('=').map(|(k, _)| k) == Some(key) || kv.as_str() == key)
        {
            Some(slot) => *slot = entry,
            None => env.push(entry),
        }
    }
}

/// A descriptor, as manifests and indexes write it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Value>,
}

/// The image manifest for a config and its layers, serialised (the bytes that get hashed).
pub fn manifest(format: Format, config: &Descriptor, layers: &[Descriptor]) -> Vec<u8> {
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": format.manifest(),
        "config": config,
        "layers": layers,
    });
    serde_json::to_vec_pretty(&manifest).expect("a manifest always serialises")
}

/// The current time as BuildKit writes it in configs (RFC 3339, UTC, nanoseconds).
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

/// The OCI name of this machine's architecture.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let raw = r#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"Healthcheck":{"Test":["NONE"]}},"rootfs":{"type":"layers","diff_ids":[]},"moby.buildkit.buildinfo.v1":"x"}"#;
        let cfg: ImageConfig = serde_json::from_str(raw).unwrap();
        let out = serde_json::to_value(&cfg).unwrap();
        assert_eq!(out["config"]["Healthcheck"]["Test"][0], "NONE");
        assert_eq!(out["moby.buildkit.buildinfo.v1"], "x");
    }

    #[test]
    fn env_set_replaces_in_place() {
        let mut c = ContainerConfig {
            env: Some(vec!["PATH=/bin".into(), "A=1".into()]),
            ..Default::default()
        };
        c.env_set("PATH", "/usr/bin");
        c.env_set("B", "2");
        assert_eq!(
            c.env.as_deref().unwrap(),
            ["PATH=/usr/bin", "A=1", "B=2"].map(String::from)
        );
        assert_eq!(c.env_get("A"), Some("1"));
        assert_eq!(c.env_get("C"), None);
    }
}
