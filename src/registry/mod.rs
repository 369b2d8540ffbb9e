//! The OCI distribution client: pulls base images and pushes built ones, over `oci-client`.
//!
//! This is the only part of shmocker that talks to the network. Its guarantees:
//!
//! - **Everything is verified.** Manifests are checked against the digest they were asked for
//!   (and the registry's `Docker-Content-Digest`), configs and blobs against their descriptors;
//!   a blob only lands in the [`Store`] after [`BlobWriter::commit`](crate::store::BlobWriter)
//!   has checked its digest.
//! - **Blobs stream.** A pulled blob goes from the socket into a store [`BlobWriter`](crate::store::BlobWriter)
//!   chunk by chunk; a pushed blob is read from its store file as the upload proceeds. No layer is
//!   ever held whole in memory (manifests and configs, which are small, are).
//! - **The manifest goes last.** A push uploads every blob the registry lacks, checks that all of
//!   them are present, and only then puts the manifest. A failed blob means no manifest, so a tag
//!   never points at an incomplete image.
//! - **Transient failures are retried, per request.** A 5xx, 429, reset, timeout or truncated
//!   body makes that one request (a manifest GET, a blob HEAD, a blob GET with its whole body, a
//!   whole blob upload, a manifest PUT) start again after a backoff with jitter, within a bounded
//!   budget; a pulled blob starts again in a fresh temp file, an upload in a fresh session. See
//!   `retry`.
//! - **Secrets are never printed.** Passwords and tokens live only inside
//!   [`oci_client::secrets::RegistryAuth`], whose `Debug` redacts them; errors and `Debug` output
//!   name the user and the file the credentials came from, never the secret.
//!
//! Transport rules (plain HTTP for loopback and `--insecure-registry` hosts, certs.d CAs) are in
//! `transport`, credential lookup (docker config.json, credential helpers, podman auth.json) in
//! `auth`, which failures are retried and how long to wait in `retry`, and the wording of every
//! error in `error`.

mod auth;
mod error;
mod pulled;
pub mod reference;
mod retry;
mod transport;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _, stream};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciImageManifest,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;

use crate::store::{Store, StoreError, sha256_digest};

pub use error::RegistryError;
use error::{Ctx, Op, classify, classify_io};
pub use pulled::PullPolicy;
use retry::Failure;
pub use retry::{ATTEMPTS_ENV, RetryNotice, RetryPolicy};

/// Manifest media types we ask for and accept.
const ACCEPTED_MANIFEST_TYPES: &[&str] = &[
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

/// Blobs uploaded at once; more only contends for the same uplink.
const MAX_PARALLEL_UPLOADS: usize = 4;
/// Read size when streaming a store file into an upload.
const UPLOAD_READ_CHUNK: usize = 256 * 1024;
/// A config larger than this is not a config; refuse rather than allocate for it.
const MAX_CONFIG_SIZE: u64 = 64 * 1024 * 1024;
const USER_AGENT: &str = concat!("shmocker/", env!("CARGO_PKG_VERSION"));

/// How to reach registries and where to find credentials and CA certificates.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Hosts (`host:port`, or `host` for every port) spoken to over plain HTTP.
    pub insecure_hosts: Vec<String>,
    /// Where docker's `config.json` is; default `$DOCKER_CONFIG`, else `~/.docker`.
    pub docker_config_dir: Option<PathBuf>,
    /// Credential files read after docker's config.json, in order. `None`: podman's
    /// (`$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
    /// `$XDG_CONFIG_HOME/containers/auth.json`).
    pub extra_auth_files: Option<Vec<PathBuf>>,
    /// certs.d roots holding `<host:port>/*.crt` CA files. `None`: `/etc/docker/certs.d`,
    /// `/etc/containers/certs.d`, `$XDG_CONFIG_HOME/containers/certs.d`.
    pub certs_dirs: Option<Vec<PathBuf>>,
    /// Credentials handed over by the caller (a CI job's token), used for their registry
    /// before any file is read.
    pub credentials: Vec<ExplicitCredentials>,
    /// How failed requests are retried; `None`: [`RetryPolicy::default`].
    pub retry: Option<RetryPolicy>,
    /// Told about each retry (e.g. to print a warning).
    pub on_retry: Option<RetryNotice>,
    /// Told how far each blob transfer has got, after every chunk (the receiver throttles).
    pub on_transfer: Option<TransferNotice>,
}

/// Which way a blob goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Pull,
    Push,
}

/// How far one blob transfer has got.
#[derive(Debug, Clone)]
pub struct Transfer<'a> {
    pub direction: Direction,
    /// The image, as shown to the user.
    pub image: &'a str,
    pub digest: &'a str,
    /// Bytes moved so far in this attempt, and the blob's size.
    pub done: u64,
    pub total: u64,
}

/// A callback for [`Transfer`] updates.
#[derive(Clone)]
pub struct TransferNotice(Arc<dyn Fn(&Transfer<'_>) + Send + Sync>);

impl TransferNotice {
    pub fn new(f: impl Fn(&Transfer<'_>) + Send + Sync + 'static) -> TransferNotice {
        TransferNotice(Arc::new(f))
    }

    fn tell(&self, t: &Transfer<'_>) {
        (self.0)(t)
    }
}

impl fmt::Debug for TransferNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TransferNotice")
    }
}

/// A user name and secret for one registry, given explicitly rather than found in a file.
/// `Debug` shows the user and where it came from, never the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ExplicitCredentials {
    /// The registry as image references name it: `ghcr.io`, `registry.gitlab.com`, `host:port`.
    pub registry: String,
    pub username: String,
    pub secret: String,
    /// Where they came from, for messages: "GITHUB_TOKEN", "CI_REGISTRY_PASSWORD".
    pub origin: String,
}

impl fmt::Debug for ExplicitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExplicitCredentials")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .field("origin", &self.origin)
            .finish()
    }
}

/// An OS/architecture pair as OCI names them (`linux/amd64`, `linux/arm64`, `linux/arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on, in OCI's (Go's) names.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "powerpc64" => ("ppc64", None),
            "loongarch64" => ("loong64", None),
            "mips64" if cfg!(target_endian = "little") => ("mips64le", None),
            other => (other, None), // s390x, riscv64 are spelled the same
        };
        Platform {
            os: "linux".to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// Parses `os/arch[/variant]`, e.g. `linux/arm64/v8`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut it = s.split('/');
        let os = it.next().filter(|p| !p.is_empty())?;
        let architecture = it.next().filter(|p| !p.is_empty())?;
        let variant = it.next().filter(|p| !p.is_empty());
        if it.next().is_some() {
            return None;
        }
        Some(Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        })
    }

    /// The variant with defaults removed: `arm64/v8` and `amd64/v1` are the plain architectures.
    fn normalized_variant(&self) -> Option<&str> {
        match (self.architecture.as_str(), self.variant.as_deref()) {
            (_, Some("")) | ("arm64", Some("v8")) | ("amd64", Some("v1")) => None,
            (_, v) => v,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest (and its config) fetched from a registry, ready for its layers to be fetched.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The image, fully qualified: registry, repository, the tag asked for (if any) and the digest
    /// of the platform's image manifest, e.g. `docker.io/library/busybox:latest@sha256:…`.
    pub reference: Reference,
    /// Digest of the image manifest (not of the index it was chosen from).
    pub manifest_digest: String,
    /// Digest of the index / manifest list the manifest was chosen from, if there was one.
    pub index_digest: Option<String>,
    /// The parsed manifest. Docker schema2 manifests are accepted; their media types are kept.
    pub manifest: OciImageManifest,
    /// The manifest exactly as served (it hashes to `manifest_digest`).
    pub manifest_raw: Vec<u8>,
    /// The config blob exactly as served (its digest was checked).
    pub config_raw: Vec<u8>,
    /// The index exactly as served (it hashes to `index_digest`), when the registry sent one.
    pub index_raw: Option<Vec<u8>>,
}

/// A blob in the [`Store`], as a manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

/// What a push did.
#[derive(Debug, Clone, Default)]
pub struct PushReport {
    /// Digest of the manifest that was put.
    pub manifest_digest: String,
    /// Blobs uploaded by this push.
    pub uploaded: Vec<String>,
    /// Blobs the registry already had.
    pub skipped: Vec<String>,
}

/// A client for OCI registries.
///
/// A pull of `busybox` begins with the name: it becomes `docker.io/library/busybox:latest`.
/// The first request to a registry sets up its connection: plain HTTP or HTTPS with the
/// certs.d CAs for that host, and the credentials found in docker's or podman's files (or
/// none), all kept for the next requests to that host. [`pull_manifest`](Self::pull_manifest)
/// asks for the manifest; if the registry answers with an index it picks the entry for the
/// wanted [`Platform`] and fetches that manifest by its digest, then the config. Every byte is
/// checked against its digest. The layers follow one by one through
/// [`fetch_blob`](Self::fetch_blob), each streamed into the [`Store`] and committed under its
/// digest, or skipped because the store already has it.
///
/// A push of the built image goes the other way: [`push_image`](Self::push_image) asks the
/// registry which blobs it already has (a `HEAD` each), streams the others from their store
/// files, a few at a time, asks again that every one is there, and only then puts the manifest
/// that names them. When anything fails before that, the registry is left with some unreferenced
/// blobs and no new tag.
pub struct Registry {
    certs_dirs: Vec<PathBuf>,
    auth_files: Vec<PathBuf>,
    insecure_hosts: Vec<String>,
    explicit: Vec<ExplicitCredentials>,
    retry: RetryPolicy,
    on_retry: Option<RetryNotice>,
    on_transfer: Option<TransferNotice>,
    /// One client per registry host: the scheme, CAs and credentials differ by host.
    hosts: tokio::sync::Mutex<HashMap<String, Arc<Host>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("certs_dirs", &self.certs_dirs)
            .field("auth_files", &self.auth_files)
            .field("insecure_hosts", &self.insecure_hosts)
            .finish_non_exhaustive()
    }
}

/// The connection state for one registry host.
struct Host {
    /// `host[:port]` as requests go to it.
    registry: String,
    scheme: &'static str,
    client: Client,
    auth: RegistryAuth,
    /// Where the credentials came from, for error messages (never the secret).
    credentials: String,
    retry: RetryPolicy,
    on_retry: Option<RetryNotice>,
}

impl Host {
    fn ctx<'a>(&'a self, reference: &'a str, op: Op<'a>) -> Ctx<'a> {
        Ctx {
            reference,
            host: &self.registry,
            scheme: self.scheme,
            credentials: &self.credentials,
            op,
        }
    }

    /// Runs one request with this host's retry policy; `what` names it in retry notices,
    /// `shown` and `op` in the error of an attempt that ran out of time. Each attempt gets the
    /// policy's transfer limit for a blob of `blob_size` bytes, or its request limit (`None`).
    async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        shown: &str,
        op: Op<'_>,
        blob_size: Option<u64>,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let limit = match blob_size {
            Some(size) => self.retry.transfer_timeout(size),
            None => self.retry.request_timeout,
        };
        let timed_out = |limit: Duration| {
            self.ctx(shown, op).other(format!(
                "no complete answer within {}s, the time one attempt gets; the registry or the network stalled or is too slow",
                limit.as_secs_f64()
            ))
        };
        retry::run(
            &self.retry,
            self.on_retry.as_ref(),
            what,
            limit,
            timed_out,
            attempt,
        )
        .await
    }

    /// Fetches a manifest or index, checked against the reference's digest if it has one.
    async fn manifest_raw(
        &self,
        image: &Reference,
        shown: &str,
    ) -> Result<(Vec<u8>, String), RegistryError> {
        let what = format!("pulling the manifest of {}", image.whole());
        self.retrying(&what, shown, Op::PullManifest, None, || async {
            let (body, digest) = self
                .client
                .pull_manifest_raw(image, &self.auth, ACCEPTED_MANIFEST_TYPES)
                .await
                .map_err(|e| {
                    Failure::from_oci(e, |e| classify(e, &self.ctx(shown, Op::PullManifest)))
                })?;
            Ok((body.to_vec(), digest))
        })
        .await
    }

    /// Whether the registry has `digest` in `image`'s repository (a `HEAD`).
    async fn blob_exists(
        &self,
        image: &Reference,
        shown: &str,
        digest: &str,
    ) -> Result<bool, RegistryError> {
        let what = format!("checking for blob {digest} in {shown}");
        self.retrying(&what, shown, Op::CheckBlob(digest), None, || async {
            self.client.blob_exists(image, digest).await.map_err(|e| {
                Failure::from_oci(e, |e| classify(e, &self.ctx(shown, Op::CheckBlob(digest))))
            })
        })
        .await
    }

    /// Puts a manifest or index (after everything it names is in place).
    async fn put_manifest(
        &self,
        target: &Reference,
        shown: &str,
        raw: &[u8],
        content_type: &reqwest::header::HeaderValue,
    ) -> Result<(), RegistryError> {
        let what = format!("pushing the manifest of {shown}");
        self.retrying(&what, shown, Op::PushManifest, None, || async {
            self.client
                .push_manifest_raw(target, raw.to_vec(), content_type.clone())
                .await
                .map(drop)
                .map_err(|e| {
                    Failure::from_oci(e, |e| classify(e, &self.ctx(shown, Op::PushManifest)))
                })
        })
        .await
    }
}

fn store_err(
    action: impl Into<String>,
    reference: &str,
) -> impl FnOnce(StoreError) -> RegistryError {
    let action = action.into();
    let reference = reference.to_string();
    move |source| match source {
        StoreError::DigestMismatch {
            expected, actual, ..
        } => RegistryError::DigestMismatch {
            reference,
            what: format!("blob {expected}"),
            expected,
            actual,
        },
        source => RegistryError::Store {
            action,
            reference,
            source,
        },
    }
}

/// `image` (its tag kept, if it has one) pinned to the manifest `digest`.
pub(crate) fn pinned(image: &Reference, digest: &str) -> Reference {
    match image.tag() {
        Some(tag) => Reference::with_tag_and_digest(
            image.registry().to_string(),
            image.repository().to_string(),
            tag.to_string(),
            digest.to_string(),
        ),
        None => Reference::with_digest(
            image.registry().to_string(),
            image.repository().to_string(),
            digest.to_string(),
        ),
    }
}

/// The files and directories the registry settings are read from when no option names others
/// (docker's and podman's credential files, the certs.d directories).
pub fn settings_paths() -> Vec<PathBuf> {
    let mut paths = transport::default_certs_dirs();
    paths.extend(auth::auth_files(None, None));
    paths
}

impl Registry {
    pub fn new(opts: RegistryOptions) -> Self {
        Registry {
            certs_dirs: opts
                .certs_dirs
                .unwrap_or_else(transport::default_certs_dirs),
            auth_files: auth::auth_files(
                opts.docker_config_dir.as_deref(),
                opts.extra_auth_files.as_deref(),
            ),
            insecure_hosts: opts.insecure_hosts,
            explicit: opts.credentials,
            retry: opts.retry.unwrap_or_default(),
            on_retry: opts.on_retry,
            on_transfer: opts.on_transfer,
            hosts: Default::default(),
        }
    }

    /// Sets up the client for `image`'s registry now (CA certificates read, credentials looked
    /// up, a credential helper run), without a request: for in-place builds, before `/` is
    /// replaced by the image's files.
    pub async fn prepare(&self, image: &Reference) -> Result<(), RegistryError> {
        self.host(image).await.map(drop)
    }

    /// The client for `image`'s registry, set up on first use.
    async fn host(&self, image: &Reference) -> Result<Arc<Host>, RegistryError> {
        let registry = image.resolve_registry().to_string();
        // Held while setting up, so that concurrent first uses run a credential helper once.
        let mut hosts = self.hosts.lock().await;
        if let Some(h) = hosts.get(&registry) {
            return Ok(h.clone());
        }

        let mut certs = transport::load_certs(&registry, &self.certs_dirs)?;
        if image.registry() != registry {
            certs.extend(transport::load_certs(image.registry(), &self.certs_dirs)?);
        }
        let plain = transport::is_insecure(&registry, &self.insecure_hosts)
            || transport::is_insecure(image.registry(), &self.insecure_hosts)
            || (transport::is_loopback(&registry) && certs.is_empty());

        let name = image.registry().to_string();
        let files = self.auth_files.clone();
        let creds = match auth::explicit(&name, &registry, &self.explicit) {
            Some(c) => c,
            None => tokio::task::spawn_blocking(move || auth::resolve(&name, &files))
                .await
                .map_err(|e| RegistryError::Credentials {
                    host: registry.clone(),
                    source_path: "credential lookup".to_string(),
                    detail: e.to_string(),
                })??,
        };

        let config = ClientConfig {
            protocol: if plain {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates: certs,
            // We pick the platform ourselves, to honour variants and list what is available.
            platform_resolver: None,
            // A single PUT whose body streams from the file. oci-client's chunked mode sends one
            // PATCH per stream item, which for a file stream means thousands of tiny requests.
            use_monolithic_push: true,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(300)),
            user_agent: USER_AGENT,
            ..Default::default()
        };
        // `Client::new` would fall back to a default client on error; we want to know.
        let client = Client::try_from(config).map_err(|e| RegistryError::TlsConfig {
            host: registry.clone(),
            path: self
                .certs_dirs
                .iter()
                .map(|d| d.join(&registry).display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            detail: error::truncate(&e.to_string(), 300),
        })?;
        client.store_auth_if_needed(&registry, &creds.auth).await;

        let host = Arc::new(Host {
            registry: registry.clone(),
            scheme: if plain { "http" } else { "https" },
            client,
            auth: creds.auth,
            credentials: creds.description,
            retry: self.retry.clone(),
            on_retry: self.on_retry.clone(),
        });
        hosts.insert(registry, host.clone());
        Ok(host)
    }

    /// Fetches the image manifest of `image` for `platform`, and its config.
    ///
    /// An index / manifest list is followed to the platform's manifest. A digest in `image` is
    /// verified against what the registry sends.
    pub async fn pull_manifest(
        &self,
        image: &Reference,
        platform: &Platform,
    ) -> Result<PulledImage, RegistryError> {
        self.pull_manifest_using(image, platform, None).await
    }

    /// [`pull_manifest`](Self::pull_manifest), taking the platform's manifest (under an index)
    /// and the config from `stored` when it holds them (checked against their digests) rather
    /// than asking the registry again: a tag resolved on every build costs one request.
    pub(crate) async fn pull_manifest_using(
        &self,
        image: &Reference,
        platform: &Platform,
        stored: Option<&crate::store::Store>,
    ) -> Result<PulledImage, RegistryError> {
        let shown = image.whole();
        let host = self.host(image).await?;
        let (raw, digest) = host.manifest_raw(image, &shown).await?;
        let from_store = |d: &str| stored.and_then(|s| pulled::stored_document(s, d).ok());

        let (manifest, manifest_raw, manifest_digest, index_digest, index_raw) =
            match read_document(&raw, &digest, platform, &shown)? {
                Document::Manifest(m) => (*m, raw, digest, None, None),
                Document::Index { chosen } => {
                    let (child_raw, child_digest) = match from_store(&chosen) {
                        Some(raw) => (raw, chosen),
                        None => {
                            let child = image.clone_with_digest(chosen);
                            host.manifest_raw(&child, &shown).await?
                        }
                    };
                    match read_document(&child_raw, &child_digest, platform, &shown)? {
                        Document::Manifest(m) => {
                            (*m, child_raw, child_digest, Some(digest), Some(raw))
                        }
                        Document::Index { .. } => {
                            return Err(RegistryError::InvalidManifest {
                                reference: shown,
                                detail: format!(
                                    "the index entry for {platform} ({child_digest}) is itself an index; nested indexes are not supported"
                                ),
                            });
                        }
                    }
                }
            };

        let config_digest = manifest.config.digest.clone();
        let config_size = u64::try_from(manifest.config.size).unwrap_or(u64::MAX);
        if config_size > MAX_CONFIG_SIZE {
            return Err(RegistryError::InvalidManifest {
                reference: shown,
                detail: format!("its config {config_digest} claims {config_size} bytes"),
            });
        }
        let what = format!("pulling config {config_digest} of {shown}");
        let config_op = Op::PullBlob(&config_digest);
        let config_raw = match from_store(&config_digest) {
            Some(raw) => raw,
            None => {
                host.retrying(&what, &shown, config_op, Some(config_size), || async {
                    let mut raw = Vec::with_capacity(config_size as usize);
                    host.client
                        .pull_blob(image, &manifest.config, &mut raw)
                        .await
                        .map_err(|e| {
                            Failure::from_oci(e, |e| {
                                classify(e, &host.ctx(&shown, Op::PullBlob(&config_digest)))
                            })
                        })?;
                    Ok(raw)
                })
                .await?
            }
        };
        if config_raw.len() as u64 != config_size {
            return Err(RegistryError::SizeMismatch {
                reference: shown,
                digest: config_digest,
                expected: config_size,
                actual: config_raw.len() as u64,
            });
        }

        Ok(PulledImage {
            reference: pinned(image, &manifest_digest),
            manifest_digest,
            index_digest,
            manifest,
            manifest_raw,
            config_raw,
            index_raw,
        })
    }

    /// Makes sure `blob` of `image` is in `store`, and returns its path there.
    ///
    /// Nothing is fetched if the store has it. Otherwise it streams from the registry into a
    /// store writer, which commits it only if the digest (and size) match.
    pub async fn fetch_blob(
        &self,
        image: &Reference,
        blob: &BlobRef,
        store: &Store,
    ) -> Result<PathBuf, RegistryError> {
        let shown = image.whole();
        let path = store
            .blob_path(&blob.digest)
            .map_err(store_err(format!("fetching blob {}", blob.digest), &shown))?;
        if store.has_blob(&blob.digest) {
            return Ok(path);
        }
        let host = self.host(image).await?;
        let what = format!("pulling blob {} of {shown}", blob.digest);
        // Each attempt streams into a fresh temp file; a failed one's file is dropped (deleted),
        // so only a whole blob whose digest matched is ever renamed under its name.
        let op = Op::PullBlob(&blob.digest);
        host.retrying(&what, &shown, op, Some(blob.size), || {
            self.fetch_blob_once(&host, image, &shown, blob, store)
        })
        .await?;
        Ok(path)
    }

    /// One attempt of [`fetch_blob`](Self::fetch_blob): GET, stream into a store writer, commit.
    async fn fetch_blob_once(
        &self,
        host: &Host,
        image: &Reference,
        shown: &str,
        blob: &BlobRef,
        store: &Store,
    ) -> Result<(), Failure> {
        let ctx = host.ctx(shown, Op::PullBlob(&blob.digest));
        let size_mismatch = |actual: u64| RegistryError::SizeMismatch {
            reference: shown.to_string(),
            digest: blob.digest.clone(),
            expected: blob.size,
            actual,
        };

        let mut stream = host
            .client
            .pull_blob_stream(image, blob.digest.as_str())
            .await
            .map_err(|e| Failure::from_oci(e, |e| classify(e, &ctx)))?;
        if let Some(len) = stream.content_length
            && len != blob.size
        {
            return Err(size_mismatch(len).into());
        }
        let mut writer = store
            .blob_writer()
            .map_err(store_err(format!("fetching blob {}", blob.digest), shown))?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                let error = classify_io(&e, &ctx);
                match retry::io_transient(&e) {
                    Some(_) => Failure::transient(error),
                    None => Failure::Final(error),
                }
            })?;
            // Never write more than the descriptor promised, whatever the server sends.
            if writer.size() + chunk.len() as u64 > blob.size {
                return Err(size_mismatch(writer.size() + chunk.len() as u64).into());
            }
            writer.write_all(&chunk).map_err(|e| {
                store_err(format!("writing blob {}", blob.digest), shown)(StoreError::Io {
                    path: store.root().join("tmp"),
                    source: e,
                })
            })?;
            if let Some(n) = &self.on_transfer {
                n.tell(&Transfer {
                    direction: Direction::Pull,
                    image: shown,
                    digest: &blob.digest,
                    done: writer.size(),
                    total: blob.size,
                });
            }
        }
        if writer.size() != blob.size {
            // The body ended early (a connection closed mid-blob): a new attempt starts over.
            return Err(Failure::transient(ctx.other(format!(
                "the body ended after {} of {} bytes",
                writer.size(),
                blob.size
            ))));
        }
        // A digest mismatch is final: the registry holds (or a man in the middle sends) other
        // content, which another attempt would get again. The temp file is gone either way.
        writer
            .commit(Some(&blob.digest))
            .map_err(store_err(format!("storing blob {}", blob.digest), shown))?;
        Ok(())
    }

    /// Pushes an image: its blobs from `store`, then the manifest. Returns the manifest digest.
    ///
    /// See [`push_image_with_report`](Self::push_image_with_report).
    pub async fn push_image(
        &self,
        target: &Reference,
        layers: &[BlobRef],
        config: &BlobRef,
        manifest_raw: &[u8],
        manifest_media_type: &str,
        store: &Store,
    ) -> Result<String, RegistryError> {
        self.push_image_with_report(
            target,
            layers,
            config,
            manifest_raw,
            manifest_media_type,
            store,
        )
        .await
        .map(|r| r.manifest_digest)
    }

    /// Pushes an image and says which blobs were uploaded and which the registry already had.
    ///
    /// Blobs the registry lacks are streamed from their store files, a few in parallel. Once
    /// every blob is confirmed present, the manifest is put under `target` (its tag, or its
    /// digest). If any blob fails, the manifest is not pushed.
    pub async fn push_image_with_report(
        &self,
        target: &Reference,
        layers: &[BlobRef],
        config: &BlobRef,
        manifest_raw: &[u8],
        manifest_media_type: &str,
        store: &Store,
    ) -> Result<PushReport, RegistryError> {
        let shown = target.whole();
        let manifest_digest = sha256_digest(manifest_raw);
        let invalid = |detail: String| RegistryError::InvalidRequest {
            action: "push",
            reference: shown.clone(),
            detail,
        };
        if let Some(d) = target.digest()
            && d != manifest_digest
        {
            return Err(invalid(format!(
                "the target names digest {d} but the manifest's digest is {manifest_digest}"
            )));
        }
        let content_type = reqwest::header::HeaderValue::from_str(manifest_media_type)
            .map_err(|_| invalid(format!("bad media type {manifest_media_type:?}")))?;

        // Each distinct blob once (an image may repeat a layer).
        let mut seen = HashSet::new();
        let blobs: Vec<&BlobRef> = layers
            .iter()
            .chain(std::iter::once(config))
            .filter(|b| seen.insert(b.digest.as_str()))
            .collect();
        check_manifest_names_blobs(manifest_raw, manifest_media_type, &seen).map_err(invalid)?;

        let host = self.host(target).await?;
        let outcomes: Vec<(String, bool)> = stream::iter(blobs.iter().copied())
            .map(|blob| self.push_blob(&host, target, &shown, blob, store))
            .buffer_unordered(MAX_PARALLEL_UPLOADS)
            .try_collect()
            .await?;

        // The registry said yes to each upload; make sure before a manifest depends on it.
        stream::iter(blobs.iter().copied())
            .map(|blob| {
                let (host, shown) = (&host, &shown);
                async move {
                    let present = host.blob_exists(target, shown, &blob.digest).await?;
                    if present {
                        Ok(())
                    } else {
                        Err(RegistryError::BlobNotPresentAfterPush {
                            reference: shown.clone(),
                            host: host.registry.clone(),
                            digest: blob.digest.clone(),
                        })
                    }
                }
            })
            .buffer_unordered(MAX_PARALLEL_UPLOADS)
            .try_collect::<Vec<()>>()
            .await?;

        host.put_manifest(target, &shown, manifest_raw, &content_type)
            .await?;

        let mut report = PushReport {
            manifest_digest,
            ..Default::default()
        };
        for (digest, uploaded) in outcomes {
            if uploaded {
                report.uploaded.push(digest);
            } else {
                report.skipped.push(digest);
            }
        }
        Ok(report)
    }

    /// Pushes an index (manifest list) whose manifests are already in the target repository,
    /// e.g. after one [`push_image`](Self::push_image) per platform. Returns the index digest.
    ///
    /// Each manifest it names is checked to be present first, so a tag never points at an index
    /// with holes.
    pub async fn push_index(
        &self,
        target: &Reference,
        index_raw: &[u8],
        media_type: &str,
    ) -> Result<String, RegistryError> {
        let shown = target.whole();
        let invalid = |detail: String| RegistryError::InvalidRequest {
            action: "push",
            reference: shown.clone(),
            detail,
        };
        if ![OCI_IMAGE_INDEX_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE].contains(&media_type) {
            return Err(invalid(format!("{media_type} is not an index media type")));
        }
        let index_digest = sha256_digest(index_raw);
        if let Some(d) = target.digest()
            && d != index_digest
        {
            return Err(invalid(format!(
                "the target names digest {d} but the index's digest is {index_digest}"
            )));
        }
        let content_type = reqwest::header::HeaderValue::from_str(media_type)
            .map_err(|_| invalid(format!("bad media type {media_type:?}")))?;
        let index: IndexDoc = serde_json::from_slice(index_raw)
            .map_err(|e| invalid(format!("the index does not parse: {e}")))?;

        let host = self.host(target).await?;
        for entry in &index.manifests {
            let child = target.clone_with_digest(entry.digest.clone());
            let child_shown = child.whole();
            let what = format!("checking for manifest {child_shown}");
            host.retrying(&what, &child_shown, Op::PullManifest, None, || async {
                host.client
                    .fetch_manifest_digest(&child, &host.auth)
                    .await
                    .map_err(|e| {
                        Failure::from_oci(e, |e| {
                            classify(e, &host.ctx(&child_shown, Op::PullManifest))
                        })
                    })
            })
            .await?;
        }
        host.put_manifest(target, &shown, index_raw, &content_type)
            .await?;
        Ok(index_digest)
    }

    /// Uploads one blob unless the registry has it; `true` if it was uploaded.
    async fn push_blob(
        &self,
        host: &Host,
        target: &Reference,
        shown: &str,
        blob: &BlobRef,
        store: &Store,
    ) -> Result<(String, bool), RegistryError> {
        if host.blob_exists(target, shown, &blob.digest).await? {
            return Ok((blob.digest.clone(), false));
        }
        let what = format!("pushing blob {} to {shown}", blob.digest);
        // Each attempt is a whole upload: a fresh session (POST), then the PUT whose body
        // streams from the file, reopened from its start. A session that failed part way is
        // never resumed; the registry discards it.
        let op = Op::PushBlob(&blob.digest);
        host.retrying(&what, shown, op, Some(blob.size), || {
            self.push_blob_once(host, target, shown, blob, store)
        })
        .await?;
        Ok((blob.digest.clone(), true))
    }

    /// One attempt of [`push_blob`](Self::push_blob)'s upload.
    async fn push_blob_once(
        &self,
        host: &Host,
        target: &Reference,
        shown: &str,
        blob: &BlobRef,
        store: &Store,
    ) -> Result<(), Failure> {
        let action = format!("pushing blob {}", blob.digest);
        let path = store
            .blob_path(&blob.digest)
            .map_err(store_err(&action, shown))?;
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RegistryError::MissingLocalBlob {
                    reference: shown.to_string(),
                    digest: blob.digest.clone(),
                    path: path.display().to_string(),
                }
                .into());
            }
            Err(source) => {
                return Err(store_err(&action, shown)(StoreError::Io { path, source }).into());
            }
        };
        let len = match file.metadata().await {
            Ok(m) => m.len(),
            Err(source) => {
                return Err(store_err(&action, shown)(StoreError::Io { path, source }).into());
            }
        };
        if len != blob.size {
            return Err(RegistryError::SizeMismatch {
                reference: shown.to_string(),
                digest: blob.digest.clone(),
                expected: blob.size,
                actual: len,
            }
            .into());
        }
        // The body streams from the file; the registry checks the digest when the upload closes.
        let mut sent = 0u64;
        let notice = self.on_transfer.clone();
        let (image, digest) = (shown.to_string(), blob.digest.clone());
        let body = tokio_util::io::ReaderStream::with_capacity(file, UPLOAD_READ_CHUNK)
            .inspect_ok(move |chunk| {
                sent += chunk.len() as u64;
                if let Some(n) = &notice {
                    n.tell(&Transfer {
                        direction: Direction::Push,
                        image: &image,
                        digest: &digest,
                        done: sent,
                        total: len,
                    });
                }
            })
            .map_err(OciDistributionError::from);
        host.client
            .push_blob_stream(target, body, &blob.digest, Some(len))
            .await
            .map_err(|e| {
                Failure::from_oci(e, |e| {
                    classify(e, &host.ctx(shown, Op::PushBlob(&blob.digest)))
                })
            })?;
        Ok(())
    }
}

/// A manifest document as fetched: an image manifest, or an index and the digest of its entry
/// for the wanted platform.
#[derive(Debug)]
pub enum Document {
    Manifest(Box<OciImageManifest>),
    Index { chosen: String },
}

/// Reads a fetched manifest document (`digest` names it in messages; `shown` is the image):
/// what it is, the platform's entry of an index, or the parsed schema-2 image manifest. No
/// network: this is all of the parsing a pull does on what a registry sent (the fuzz target
/// `manifest` runs it on any bytes).
pub fn read_document(
    raw: &[u8],
    digest: &str,
    platform: &Platform,
    shown: &str,
) -> Result<Document, RegistryError> {
    if kind(raw, shown)? == Kind::Index {
        return Ok(Document::Index {
            chosen: choose_platform(raw, platform, shown)?,
        });
    }
    let manifest: OciImageManifest =
        serde_json::from_slice(raw).map_err(|e| RegistryError::InvalidManifest {
            reference: shown.to_string(),
            detail: format!("cannot parse the image manifest {digest}: {e}"),
        })?;
    if manifest.schema_version != 2 {
        return Err(RegistryError::InvalidManifest {
            reference: shown.to_string(),
            detail: format!(
                "schema version {} is not supported (only 2)",
                manifest.schema_version
            ),
        });
    }
    Ok(Document::Manifest(Box::new(manifest)))
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Manifest,
    Index,
}

/// Just enough of a manifest to tell an image manifest from an index.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    media_type: Option<String>,
    manifests: Option<serde::de::IgnoredAny>,
}

fn kind(raw: &[u8], shown: &str) -> Result<Kind, RegistryError> {
    let probe: Probe = serde_json::from_slice(raw).map_err(|e| RegistryError::InvalidManifest {
        reference: shown.to_string(),
        detail: format!("not a JSON manifest: {e}"),
    })?;
    match probe.media_type.as_deref() {
        Some(OCI_IMAGE_INDEX_MEDIA_TYPE | IMAGE_MANIFEST_LIST_MEDIA_TYPE) => Ok(Kind::Index),
        Some(OCI_IMAGE_MEDIA_TYPE | IMAGE_MANIFEST_MEDIA_TYPE) => Ok(Kind::Manifest),
        // OCI allows omitting mediaType; an index is the one with `manifests`.
        None if probe.manifests.is_some() => Ok(Kind::Index),
        None => Ok(Kind::Manifest),
        Some(other) => Err(RegistryError::InvalidManifest {
            reference: shown.to_string(),
            detail: format!(
                "unsupported manifest media type {other} (supported: {})",
                ACCEPTED_MANIFEST_TYPES.join(", ")
            ),
        }),
    }
}

#[derive(Deserialize)]
struct IndexDoc {
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
struct IndexEntry {
    digest: String,
    platform: Option<IndexPlatform>,
}

#[derive(Deserialize)]
struct IndexPlatform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

/// Picks the index entry for `wanted`: same OS and architecture, and the same variant when one is
/// wanted (an older ARM variant will do when the exact one is absent, as containerd does).
fn choose_platform(raw: &[u8], wanted: &Platform, shown: &str) -> Result<String, RegistryError> {
    let index: IndexDoc =
        serde_json::from_slice(raw).map_err(|e| RegistryError::InvalidManifest {
            reference: shown.to_string(),
            detail: format!("cannot parse the index: {e}"),
        })?;
    let entries: Vec<(Platform, &str)> = index
        .manifests
        .iter()
        .filter_map(|e| {
            let p = e.platform.as_ref()?;
            Some((
                Platform {
                    os: p.os.clone(),
                    architecture: p.architecture.clone(),
                    variant: p.variant.clone(),
                },
                e.digest.as_str(),
            ))
        })
        .collect();
    let same_arch = |p: &Platform| p.os == wanted.os && p.architecture == wanted.architecture;
    let want_variant = wanted.normalized_variant();

    let exact = entries
        .iter()
        .find(|(p, _)| same_arch(p) && p.normalized_variant() == want_variant);
    let any_variant = || {
        entries
            .iter()
            .find(|(p, _)| same_arch(p) && want_variant.is_none())
    };
    let older_arm = || {
        let wanted_n = arm_variant_number(want_variant?)?;
        entries
            .iter()
            .filter(|(p, _)| same_arch(p) && wanted.architecture == "arm")
            .filter_map(|(p, d)| Some((arm_variant_number(p.normalized_variant()?)?, d)))
            .filter(|(n, _)| *n < wanted_n)
            .max_by_key(|(n, _)| *n)
            .map(|(_, d)| *d)
    };
    if let Some(d) = exact
        .map(|(_, d)| *d)
        .or_else(|| any_variant().map(|(_, d)| *d))
        .or_else(older_arm)
    {
        return Ok(d.to_string());
    }

    let mut available: Vec<String> = Vec::new();
    for (p, _) in &entries {
        let s = p.to_string();
        // Attestation manifests (buildkit's unknown/unknown) are not platforms.
        if p.os != "unknown" && !available.contains(&s) {
            available.push(s);
        }
    }
    Err(RegistryError::NoMatchingPlatform {
        reference: shown.to_string(),
        wanted: wanted.to_string(),
        available,
    })
}

fn arm_variant_number(v: &str) -> Option<u32> {
    v.strip_prefix('v')?.parse().ok()
}

/// The manifest about to be pushed must only name blobs that are being pushed, and say the
/// media type it is pushed as; otherwise the registry would reject it after the uploads, or
/// worse, accept it naming blobs that were never checked.
fn check_manifest_names_blobs(
    manifest_raw: &[u8],
    media_type: &str,
    pushed: &HashSet<&str>,
) -> Result<(), String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Desc {
        digest: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Doc {
        media_type: Option<String>,
        config: Desc,
        #[serde(default)]
        layers: Vec<Desc>,
    }
    let doc: Doc = serde_json::from_slice(manifest_raw)
        .map_err(|e| format!("the manifest is not an image manifest: {e}"))?;
    if let Some(mt) = &doc.media_type
        && mt != media_type
    {
        return Err(format!(
            "the manifest says its media type is {mt}, but it is being pushed as {media_type}"
        ));
    }
    for d in std::iter::once(&doc.config).chain(&doc.layers) {
        if !pushed.contains(d.digest.as_str()) {
            return Err(format!(
                "the manifest names blob {} which is not among the blobs given to push",
                d.digest
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, Option<&str>, &str)]) -> Vec<u8> {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .map(|(os, arch, variant, digest)| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    p["variant"] = serde_json::json!(v);
                }
                serde_json::json!({"mediaType": OCI_IMAGE_MEDIA_TYPE, "digest": digest, "size": 1, "platform": p})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": manifests}))
            .unwrap()
    }

    #[test]
    fn platform_choice_honours_variants_and_lists_alternatives() {
        let raw = index(&[
            ("linux", "amd64", None, "sha256:a"),
            ("linux", "arm64", Some("v8"), "sha256:b"),
            ("linux", "arm", Some("v6"), "sha256:c"),
            ("unknown", "unknown", None, "sha256:d"),
        ]);
        let p = |s| Platform::parse(s).unwrap();
        assert_eq!(
            choose_platform(&raw, &p("linux/amd64"), "x").unwrap(),
            "sha256:a"
        );
        assert_eq!(
            choose_platform(&raw, &p("linux/arm64"), "x").unwrap(),
            "sha256:b"
        );
        assert_eq!(
            choose_platform(&raw, &p("linux/arm/v7"), "x").unwrap(),
            "sha256:c"
        );
        let err = choose_platform(&raw, &p("linux/s390x"), "reg/x:1").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("linux/amd64, linux/arm64/v8, linux/arm/v6") && !msg.contains("unknown"),
            "{msg}"
        );
    }

    #[test]
    fn host_platform_uses_oci_names() {
        let p = Platform::host();
        assert_eq!(p.os, "linux");
        assert!(!["x86_64", "aarch64"].contains(&p.architecture.as_str()));
        assert_eq!(Platform::parse(&p.to_string()), Some(p));
        assert_eq!(Platform::parse("linux"), None);
    }

    #[test]
    fn manifest_kind_is_detected() {
        assert_eq!(
            kind(br#"{"schemaVersion":2,"manifests":[]}"#, "x").unwrap(),
            Kind::Index
        );
        let docker = format!(r#"{{"mediaType":"{IMAGE_MANIFEST_MEDIA_TYPE}"}}"#);
        assert_eq!(kind(docker.as_bytes(), "x").unwrap(), Kind::Manifest);
        let v1 = r#"{"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws"}"#;
        assert!(kind(v1.as_bytes(), "x").is_err());
    }

    #[test]
    fn names_are_normalised_like_docker() {
        let r = reference::parse("busybox").unwrap();
        assert_eq!(r.whole(), "docker.io/library/busybox:latest");
        assert_eq!(r.resolve_registry(), "index.docker.io");
        let r = reference::parse("127.0.0.1:5000/x/y:z").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "x/y", Some("z"))
        );
    }
}
