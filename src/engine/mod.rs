//! The build engine: runs a parsed Dockerfile, stage by stage and step by step, into an image.
//!
//! The Dockerfile is split into stages; the target stage (`--target`, or the last one) and the
//! stages it needs (`FROM <stage>`, `COPY --from=<stage>`, `RUN --mount=from=<stage>`) form a
//! graph, and stages whose dependencies are built run in parallel. Within a stage each
//! instruction either changes the image config only (ENV, LABEL, USER, CMD, ...: an
//! `empty_layer` history entry), or changes the filesystem (RUN, COPY, WORKDIR): the step runs
//! in the sandbox on an overlay of the image's unpacked layers, and what it left in the overlay's
//! upper dir becomes the next layer, compressed into the store and kept unpacked as a snapshot
//! for the steps after it. Every filesystem step is looked up in the cache first (see `cache`).
//! At the end the config and manifest are written, and the image is pushed (blobs first,
//! manifest last) or exported.

pub mod cache;
pub mod context;
mod direct_copy;
pub mod remote_cache;
mod stage;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use oci_client::Reference;

use crate::dockerfile::{self, Node, shell::Lex};
use crate::image::{self, Descriptor};
use crate::progress::{Event, Reporting};
use crate::registry::{BlobRef, ExplicitCredentials, Registry, RegistryError, RegistryOptions};
use crate::sandbox::IdMapping;
use crate::snapshot::Snapshots;
use crate::store::Store;
use context::Context;
use stage::StageState;

/// What to build and where the result goes.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub context: PathBuf,
    /// The Dockerfile; `<context>/Dockerfile` when not given.
    pub dockerfile: Option<PathBuf>,
    pub tags: Vec<String>,
    pub push: bool,
    /// Files and directories to export the image to (`--output`).
    pub exports: Vec<Export>,
    /// OCI or Docker media types (`--format`).
    pub format: image::Format,
    /// How the layers this build makes are compressed (`--compression`, `compression=` on
    /// `--output`).
    pub compression: crate::layer::LayerCompression,
    /// Recompress the base image's layers too (`force-compression=true` on `--output`).
    pub force_compression: bool,
    pub build_args: BTreeMap<String, String>,
    /// The stage to build (`--target`); the last stage when not given.
    pub target: Option<String>,
    /// Run every step, ignoring the cache (`--no-cache`); results still go into the cache.
    pub no_cache: bool,
    /// When base images are asked of the registry (`--pull`).
    pub pull: crate::registry::PullPolicy,
    /// The network of RUN steps that do not choose one (`--network`).
    pub network: crate::sandbox::Network,
    /// `--allow-host`: the only destinations of `private` RUN steps (empty: no filter).
    pub allow_hosts: Vec<crate::sandbox::egress::AllowHost>,
    /// `--allow security.insecure`: RUN steps may ask for `--security=insecure`.
    pub allow_insecure: bool,
    /// SSH agent sockets for `RUN --mount=type=ssh` (`--ssh ID[=SOCKET]`), by id.
    pub ssh: Vec<(String, PathBuf)>,
    /// Stages whose steps always run (`--no-cache-filter`).
    pub no_cache_filter: Vec<String>,
    /// Caches to import before the build (`--cache-from`).
    pub cache_from: Vec<remote_cache::CacheRef>,
    /// Where to export the cache after the build (`--cache-to`).
    pub cache_to: Vec<remote_cache::CacheRef>,
    /// Secrets for `RUN --mount=type=secret` (`--secret id=ID,src=FILE|env=VAR`).
    pub secrets: Vec<Secret>,
    /// `SOURCE_DATE_EPOCH`: every time in the image (history, config, file mtimes newer than it)
    /// is this one, so two builds of the same input give the same digest.
    pub source_date_epoch: Option<i64>,
    pub iidfile: Option<PathBuf>,
    pub metadata_file: Option<PathBuf>,
    pub store_root: PathBuf,
    pub insecure_registries: Vec<String>,
    pub mapping: IdMapping,
    /// How each step's rootfs is stacked (chosen by `detect::ladder`).
    pub snapshotter: crate::sandbox::Snapshotter,
    /// Where progress events go (plain lines on standard error by default).
    pub reporter: Reporting,
    /// Registry credentials given by the caller (a CI's token); they win over docker's files.
    pub registry_credentials: Vec<ExplicitCredentials>,
    /// Labels set on the image after the Dockerfile's own (`--label`; they win, as in docker).
    pub labels: BTreeMap<String, String>,
    /// Steps run chrooted, without namespaces (the `chroot` isolation).
    pub chroot: bool,
    /// Steps run on this system's own `/` (the `in-place` isolation, opt-in), leaving these
    /// paths (`--ignore-path`) alone besides the ones the build always keeps (see
    /// [`in_place_keep`]).
    pub in_place: Option<Vec<PathBuf>>,
    /// Unmapped owners become 0 instead of failing the step.
    pub ignore_chown_errors: bool,
}

/// An `--output` other than the registry.
#[derive(Debug, Clone, PartialEq)]
pub enum Export {
    /// An OCI image layout tarball.
    Oci(PathBuf),
    /// A tarball for `docker load` (also an OCI layout).
    Docker(PathBuf),
    /// The image's filesystem, into a directory.
    Local(PathBuf),
}

/// A `--secret`: its id and where its value is read (never the value itself).
#[derive(Debug, Clone, PartialEq)]
pub struct Secret {
    pub id: String,
    pub source: crate::sandbox::SecretSource,
}

/// What a finished build produced.
#[derive(Debug, Clone)]
pub struct BuildResult {
    pub config_digest: String,
    pub manifest: Descriptor,
    pub pushed: Vec<String>,
}

/// First progress line of a blob transfer after this long (quick ones print none)...
const TRANSFER_FIRST: std::time::Duration = std::time::Duration::from_secs(2);
/// ... then at most one line per this long, and one when it completes.
const TRANSFER_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Decides which transfer updates become lines: none for the first [`TRANSFER_FIRST`], then
/// one per [`TRANSFER_EVERY`], and one at completion if any was shown.
#[derive(Debug, Default)]
struct TransferThrottle {
    /// (pull?, digest) -> (started, last line shown)
    seen:
        std::collections::HashMap<(bool, String), (std::time::Instant, Option<std::time::Instant>)>,
}

impl TransferThrottle {
    /// `Some(seconds since the transfer started)` when this update is to be shown.
    fn due(
        &mut self,
        pull: bool,
        digest: &str,
        done: u64,
        total: u64,
        now: std::time::Instant,
    ) -> Option<f64> {
        let key = (pull, digest.to_string());
        let (started, last) = *self.seen.entry(key.clone()).or_insert((now, None));
        let finished = done >= total;
        let due = if finished {
            last.is_some()
        } else {
            now.duration_since(started) >= TRANSFER_FIRST
                && last.is_none_or(|l| now.duration_since(l) >= TRANSFER_EVERY)
        };
        if finished {
            self.seen.remove(&key);
        } else if due {
            self.seen.insert(key, (started, Some(now)));
        }
        due.then(|| now.duration_since(started).as_secs_f64())
    }
}

/// Turns the registry's per-chunk transfer updates into throttled [`Event::Transfer`]s, so that
/// a long pull or push shows it is moving in a CI log without a line per chunk.
fn transfer_progress(reporter: Reporting) -> crate::registry::TransferNotice {
    let throttle = Mutex::new(TransferThrottle::default());
    crate::registry::TransferNotice::new(move |t| {
        let pull = t.direction == crate::registry::Direction::Pull;
        let due = match throttle.lock() {
            Ok(mut th) => th.due(pull, t.digest, t.done, t.total, std::time::Instant::now()),
            Err(_) => None,
        };
        if let Some(elapsed_secs) = due {
            reporter.report(Event::Transfer {
                direction: if pull { "pulling" } else { "pushing" }.to_string(),
                image: t.image.to_string(),
                digest: t.digest.to_string(),
                done: t.done,
                total: t.total,
                elapsed_secs,
            });
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Bad input the user can fix; the message says what, where and what to do.
    #[error("{0}")]
    Input(String),
    #[error("{location}: {message}")]
    At { location: String, message: String },
    #[error("{location}: {instruction}: {message}{}", tail_text(.tail))]
    StepFailed {
        location: String,
        instruction: String,
        message: String,
        tail: Vec<String>,
        /// The sandbox helper could not set up or run the step (its mounts, namespaces, ID
        /// map, fuse-overlayfs...), as opposed to the step's own command failing.
        sandbox: bool,
    },
    /// The registry error's text already holds its causes, so it is not also the `source`
    /// (an error chain would print them twice).
    #[error("{location}: {error}")]
    Registry {
        location: String,
        error: Box<RegistryError>,
    },
    #[error("{0}")]
    Internal(String),
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        return String::new();
    }
    let mut s = String::from("\n  last output:");
    for line in tail {
        s.push_str("\n    ");
        s.push_str(line);
    }
    s
}

fn internal(what: &str) -> impl FnOnce(String) -> BuildError + '_ {
    move |e| BuildError::Internal(format!("{what}: {e}"))
}

/// One stage of the Dockerfile.
struct StageDef<'n> {
    /// The name given with `AS`, lower-cased.
    name: Option<String>,
    nodes: Vec<&'n Node>,
}

/// Everything a build shares across its stages.
struct Builder<'a> {
    opts: &'a BuildOptions,
    store: Store,
    snapshots: Snapshots,
    cache: cache::Cache,
    registry: Registry,
    file_name: String,
    lex: Lex,
    context: Context,
    steps: AtomicUsize,
    scratch: PathBuf,
    global_args: Vec<(String, Option<String>)>,
    /// Images pulled for `COPY --from=<image>` and `--mount=from=<image>`, by name.
    images: tokio::sync::Mutex<BTreeMap<String, Arc<StageState>>>,
    /// Where the layers of imported cache records can be fetched.
    layer_sources: Vec<remote_cache::LayerSource>,
    /// Content hashes of context files, remembered between builds.
    file_hashes: Arc<cache::FileHashes>,
    /// In-place execution: every path left alone, and the lock that lets one step at a time
    /// have `/` (stages otherwise run at once).
    in_place: Option<(Vec<PathBuf>, tokio::sync::Mutex<()>)>,
}

/// Everything an in-place build leaves alone besides the mount points (see
/// `sandbox::StepSpec::in_place`): `--ignore-path`'s paths, the store, the context and
/// Dockerfile, the executable, where results are written, local caches, the container runtime's
/// marks, and the builder's registry settings that exist (docker's and podman's credential
/// files, certs.d directories, `SSL_CERT_FILE`/`SSL_CERT_DIR`), so that pulls and pushes after
/// the first step still find them. Call [`prepare_in_place`] first, which makes the paths real.
pub fn in_place_keep(opts: &BuildOptions) -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut paths: Vec<PathBuf> = opts.in_place.clone().unwrap_or_default();
    paths.extend([opts.store_root.clone(), opts.context.clone()]);
    paths.extend(opts.dockerfile.clone());
    paths.extend(std::env::current_exe().ok());
    paths.extend(opts.iidfile.clone());
    paths.extend(opts.metadata_file.clone());
    paths.extend(opts.exports.iter().map(|e| match e {
        Export::Oci(p) | Export::Docker(p) | Export::Local(p) => p.clone(),
    }));
    for c in opts.cache_from.iter().chain(&opts.cache_to) {
        if let remote_cache::CacheRef::Local { dir, .. } = c {
            paths.push(dir.clone());
        }
    }
    // Only those there now: the image's own copies of the others are the image's.
    let settings = crate::registry::settings_paths()
        .into_iter()
        .chain(
            ["SSL_CERT_FILE", "SSL_CERT_DIR"]
                .iter()
                .filter_map(|k| env(k)),
        )
        // The container runtime's marks, which say that in-place execution may run here.
        .chain(["/.dockerenv", "/run/.containerenv"].map(PathBuf::from))
        .filter(|p| fs::symlink_metadata(p).is_ok());
    paths.extend(settings);
    paths.into_iter().map(|p| real_path(&p)).collect()
}

/// `p` made absolute, with `.` and `..` worked out and its longest existing part free of
/// symlinks, as /proc/self/mountinfo names mount points and as in-place execution compares.
fn real_path(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut lexical = PathBuf::from("/");
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                lexical.pop();
            }
            std::path::Component::Normal(n) => lexical.push(n),
            _ => {}
        }
    }
    let mut existing = lexical.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = fs::canonicalize(existing) {
            return rest.iter().rev().fold(real, |acc: PathBuf, n| acc.join(n));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => return lexical,
        }
    }
}

/// Readies `opts` for in-place execution, before anything is touched: the paths shmocker
/// itself uses become real ones (a symlink on the way to the store would be replaced by the
/// image's files), and what cannot work is refused now rather than after `/` was replaced: a
/// kept path that is `/` itself, a non-empty `--output type=local` directory, and a shmocker
/// whose dynamic loader would be gone.
pub fn prepare_in_place(opts: &mut BuildOptions) -> Result<(), BuildError> {
    opts.store_root = real_path(&opts.store_root);
    opts.context = real_path(&opts.context);
    for p in [
        opts.dockerfile.as_mut(),
        opts.iidfile.as_mut(),
        opts.metadata_file.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        *p = real_path(p);
    }
    for e in &mut opts.exports {
        let (Export::Oci(p) | Export::Docker(p) | Export::Local(p)) = e;
        *p = real_path(p);
    }
    for c in opts.cache_from.iter_mut().chain(opts.cache_to.iter_mut()) {
        if let remote_cache::CacheRef::Local { dir, .. } = c {
            *dir = real_path(dir);
        }
    }
    if let Some(ignore) = opts.in_place.as_mut() {
        for p in ignore.iter_mut() {
            *p = real_path(p);
        }
    }
    let keep = in_place_keep(opts);
    if keep.iter().any(|p| p == Path::new("/")) {
        return Err(BuildError::Input(
            "in-place execution replaces / with the image's files, but / is also one of the paths it must keep (the context, the store, a result file or --ignore-path); give a directory below /".into(),
        ));
    }
    for e in &opts.exports {
        if let Export::Local(dest) = e
            && fs::read_dir(dest).is_ok_and(|mut d| d.next().is_some())
        {
            return Err(BuildError::Input(format!(
                "--output type=local,dest={}: the directory is not empty; in-place builds export only into an empty (or new) directory",
                dest.display()
            )));
        }
    }
    // Kept, and reached without a symlink (the symlink itself would be replaced).
    if let Some(loader) = std::env::current_exe()
        .ok()
        .and_then(|exe| elf_interpreter(&exe))
        && (real_path(&loader) != loader || !keep.iter().any(|k| loader.starts_with(k)))
    {
        return Err(BuildError::Input(format!(
            "this shmocker is dynamically linked (its loader is {}), and in-place execution replaces / with the image's files, so the step helper could not start; use a static shmocker (the released binaries are), or keep its loader and libraries with --ignore-path",
            loader.display()
        )));
    }
    Ok(())
}

/// The program interpreter (dynamic loader) an ELF executable names, if any. Written here
/// rather than with an ELF crate: one field of a 64-bit little-endian header (other layouts
/// answer None, as a static binary does).
fn elf_interpreter(exe: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(exe).ok()?;
    let mut head = [0u8; 64];
    f.read_exact(&mut head).ok()?;
    // "\x7fELF", ELFCLASS64, ELFDATA2LSB.
    if head[..4] != *b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let (phoff, phentsize, phnum) = (
        u64_at(&head, 0x20),
        u16_at(&head, 0x36),
        u16_at(&head, 0x38),
    );
    if phentsize < 0x38 {
        return None;
    }
    let mut ph = vec![0u8; phentsize as usize];
    for i in 0..phnum {
        f.seek(SeekFrom::Start(phoff + i * phentsize)).ok()?;
        f.read_exact(&mut ph).ok()?;
        // PT_INTERP
        if u32::from_le_bytes(ph[..4].try_into().expect("4 bytes")) == 3 {
            let (offset, size) = (u64_at(&ph, 0x08), u64_at(&ph, 0x20));
            let mut name = vec![0u8; size.min(4096) as usize];
            f.seek(SeekFrom::Start(offset)).ok()?;
            f.read_exact(&mut name).ok()?;
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            use std::os::unix::ffi::OsStrExt;
            return Some(PathBuf::from(std::ffi::OsStr::from_bytes(&name[..end])));
        }
    }
    None
}

/// Runs the build described by `opts`.
pub async fn build(opts: &BuildOptions) -> Result<BuildResult, BuildError> {
    let started = Instant::now();
    let context_dir = &opts.context;
    match fs::metadata(context_dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(BuildError::Input(format!(
                "build context {} is not a directory",
                context_dir.display()
            )));
        }
        Err(e) => {
            return Err(BuildError::Input(format!(
                "build context {}: {e}; give the directory to build as the last argument",
                context_dir.display()
            )));
        }
    }
    let dockerfile_path = opts
        .dockerfile
        .clone()
        .unwrap_or_else(|| context_dir.join("Dockerfile"));
    let source = fs::read_to_string(&dockerfile_path).map_err(|e| {
        BuildError::Input(format!(
            "cannot read Dockerfile {}: {e}{}",
            dockerfile_path.display(),
            if opts.dockerfile.is_none() {
                "; put a Dockerfile in the context or name one with -f FILE"
            } else {
                ""
            }
        ))
    })?;
    let file_name = dockerfile_path.display().to_string();
    let parsed = dockerfile::parse(&source).map_err(|e| BuildError::At {
        location: format!("{file_name}:{}:{}", e.line, e.column),
        message: e.message.clone(),
    })?;
    let ignore = read_dockerignore(context_dir, &dockerfile_path)?;
    dockerfile::checks::run_for_build(&file_name, &source, &parsed, ignore.as_ref(), &mut |f| {
        opts.reporter.report(Event::CheckFinding {
            location: crate::progress::Location::new(&file_name, f.line, f.column),
            level: if f.level == dockerfile::checks::Level::Error {
                "error".into()
            } else {
                "warning".into()
            },
            rule: f.rule.to_string(),
            message: f.message.clone(),
            url: f.url.clone(),
        })
    })
    .map_err(|e| BuildError::Input(e.to_string()))?;
    let store = Store::open(&opts.store_root).map_err(|e| {
        BuildError::Input(format!(
            "cannot open the store at {}: {e}; pick another with --root DIR",
            opts.store_root.display()
        ))
    })?;
    let snapshots = Snapshots::new(&store).map_err(|e| BuildError::Internal(e.to_string()))?;
    let stale = store.clean_stale_tmp();
    if stale > 0 {
        opts.reporter.report(Event::Info {
            message: format!("#0 removed {stale} leftovers of interrupted builds from the store"),
        });
    }
    let cache =
        cache::Cache::new(&store).map_err(|e| internal("opening the cache")(e.to_string()))?;
    let scratch = store.temp_path("build");
    fs::create_dir_all(&scratch).map_err(|e| internal("build dir")(e.to_string()))?;
    let retry = crate::registry::RetryPolicy::from_env().map_err(BuildError::Input)?;
    let retry_reporter = opts.reporter.clone();
    let registry = Registry::new(RegistryOptions {
        insecure_hosts: opts.insecure_registries.clone(),
        credentials: opts.registry_credentials.clone(),
        retry: Some(retry),
        on_retry: Some(crate::registry::RetryNotice::new(move |message| {
            retry_reporter.report(Event::Warning {
                location: None,
                message: message.to_string(),
            })
        })),
        on_transfer: Some(transfer_progress(opts.reporter.clone())),
        ..Default::default()
    });
    let store_for_hashes = store.clone();
    let mut b = Builder {
        opts,
        store,
        snapshots,
        cache,
        registry,
        file_name,
        lex: Lex::new(parsed.escape),
        context: Context::new(context_dir.clone(), ignore),
        steps: AtomicUsize::new(0),
        scratch: scratch.clone(),
        global_args: Vec::new(),
        images: tokio::sync::Mutex::new(BTreeMap::new()),
        layer_sources: Vec::new(),
        file_hashes: Arc::new(cache::FileHashes::load(&store_for_hashes)),
        in_place: opts
            .in_place
            .is_some()
            .then(|| (in_place_keep(opts), tokio::sync::Mutex::new(()))),
    };

    for from in &opts.cache_from {
        match remote_cache::import(from, &b.cache, &b.registry).await {
            Ok((n, source)) => {
                opts.reporter.report(Event::Info {
                    message: format!("#0 imported {n} cache records from {from:?}"),
                });
                b.layer_sources.push(source);
            }
            Err(e) => opts.reporter.report(Event::Warning {
                location: None,
                message: format!(
                    "--cache-from {from:?} could not be read ({e}); building without it"
                ),
            }),
        }
    }
    let result = b.run(&parsed.nodes).await;
    if let Err(e) = b.file_hashes.save() {
        opts.reporter.report(Event::Warning {
            location: None,
            message: format!("could not save the context hash cache: {e}"),
        });
    }
    let _ = fs::remove_dir_all(&scratch);
    let result = result?;
    opts.reporter.report(Event::Finished {
        digest: result.manifest.digest.clone(),
        elapsed_secs: started.elapsed().as_secs_f64(),
    });
    Ok(result)
}

fn read_dockerignore(
    context: &Path,
    dockerfile: &Path,
) -> Result<Option<dockerfile::dockerignore::Dockerignore>, BuildError> {
    // `<name>.dockerignore` beside the Dockerfile wins over the context's .dockerignore.
    let beside = dockerfile
        .file_name()
        .map(|n| dockerfile.with_file_name(format!("{}.dockerignore", n.to_string_lossy())));
    let candidates = beside.into_iter().chain([context.join(".dockerignore")]);
    for path in candidates {
        if let Ok(text) = fs::read_to_string(&path) {
            return dockerfile::dockerignore::Dockerignore::parse(&text)
                .map(Some)
                .map_err(|e| BuildError::Input(format!("{}: {e}", path.display())));
        }
    }
    Ok(None)
}

/// The stages of a Dockerfile and the global ARG nodes before the first FROM.
fn split_stages(nodes: &[Node]) -> (Vec<&Node>, Vec<StageDef<'_>>) {
    let mut global = vec![];
    let mut stages: Vec<StageDef> = vec![];
    for n in nodes {
        if n.keyword == "from" {
            let name = (n.args.len() == 3 && n.args[1].eq_ignore_ascii_case("as"))
                .then(|| n.args[2].to_ascii_lowercase());
            stages.push(StageDef {
                name,
                nodes: vec![n],
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.nodes.push(n);
        } else {
            global.push(n);
        }
    }
    (global, stages)
}

/// The value of a `--from=` or `from=`: a stage (by name or index), or an image reference.
enum FromRef {
    Stage(usize),
    Image(String),
}

impl<'a> Builder<'a> {
    fn loc(&self, node: &Node) -> String {
        format!("{}:{}:{}", self.file_name, node.start_line, node.column)
    }

    fn err(&self, node: &Node, message: impl Into<String>) -> BuildError {
        BuildError::At {
            location: self.loc(node),
            message: message.into(),
        }
    }

    fn next_step(&self) -> usize {
        self.steps.fetch_add(1, Ordering::SeqCst) + 1
    }

    async fn run(&mut self, nodes: &[Node]) -> Result<BuildResult, BuildError> {
        let (global_nodes, stages) = split_stages(nodes);
        if stages.is_empty() {
            return Err(BuildError::Input(format!(
                "{}: the Dockerfile has no FROM instruction; start it with FROM <image> (or FROM scratch)",
                self.file_name
            )));
        }
        let mut global: Vec<(String, Option<String>)> = stage::platform_args();
        for n in &global_nodes {
            if n.keyword != "arg" {
                return Err(self.err(
                    n,
                    format!(
                        "{} before the first FROM: only ARG may come before FROM",
                        n.keyword.to_uppercase()
                    ),
                ));
            }
            for arg in &n.args {
                let (name, value) = self.parse_arg(n, arg, &|k| stage::lookup_pairs(&global, k))?;
                global.push((name, value));
            }
        }
        self.global_args = global;
        let target = match &self.opts.target {
            None => stages.len() - 1,
            Some(t) => stages
                .iter()
                .position(|s| s.name.as_deref() == Some(t.to_ascii_lowercase().as_str()))
                .ok_or_else(|| {
                    let names: Vec<&str> = stages.iter().filter_map(|s| s.name.as_deref()).collect();
                    BuildError::Input(format!(
                        "target stage {t:?} could not be found in {}; the stages named there are: {}",
                        self.file_name,
                        if names.is_empty() { "(none)".to_string() } else { names.join(", ") }
                    ))
                })?,
        };
        let deps = self.stage_dependencies(&stages)?;
        let needed = needed_stages(target, &deps, &stages, |i| {
            self.err(stages[i].nodes[0], "circular dependency between stages: a stage cannot depend on itself through FROM, COPY --from or RUN --mount=from")
        })?;
        if self.in_place.is_some() {
            self.prepare_registries(&stages, &needed).await?;
        }
        let total: usize = needed.iter().map(|&i| stages[i].nodes.len()).sum();
        self.opts.reporter.report(Event::Info {
            message: format!("#0 building {} stage(s), {} steps", needed.len(), total),
        });
        let built: Mutex<BTreeMap<usize, Arc<StageState>>> = Mutex::new(BTreeMap::new());
        let mut remaining: BTreeSet<usize> = needed.iter().copied().collect();
        let this: &Builder = self;
        while !remaining.is_empty() {
            let ready: Vec<usize> = {
                let done = built.lock().expect("stage map");
                remaining
                    .iter()
                    .copied()
                    .filter(|i| deps[*i].iter().all(|d| done.contains_key(d)))
                    .collect()
            };
            // A cycle would leave nothing ready; needed_stages has ruled that out.
            let ready_set: Vec<_> = ready.clone();
            let runs = ready_set.iter().map(|&i| {
                let built = &built;
                let stages = &stages;
                async move {
                    let deps_built: BTreeMap<usize, Arc<StageState>> = {
                        let done = built.lock().expect("stage map");
                        done.iter().map(|(k, v)| (*k, v.clone())).collect()
                    };
                    let mut state = this.run_stage(stages, i, &deps_built, i == target).await?;
                    // Other stages start from copies of this state, never from its tree.
                    state.drop_warm();
                    this.opts.reporter.report(Event::StageDone { stage: i });
                    built.lock().expect("stage map").insert(i, Arc::new(state));
                    Ok::<(), BuildError>(())
                }
            });
            futures_util::future::try_join_all(runs).await?;
            for i in ready {
                remaining.remove(&i);
            }
        }
        let state = built
            .lock()
            .expect("stage map")
            .remove(&target)
            .expect("target stage built");
        let state = Arc::try_unwrap(state).unwrap_or_else(|arc| (*arc).clone());
        let all_records: BTreeMap<String, cache::Record> = built
            .lock()
            .expect("stage map")
            .values()
            .flat_map(|s| s.records.iter().cloned())
            .chain(state.records.iter().cloned())
            .collect();
        let target_records: BTreeMap<String, cache::Record> =
            state.records.iter().cloned().collect();
        let result = self.finish(state).await?;
        for to in &self.opts.cache_to {
            let records = if to.is_max() {
                &all_records
            } else {
                &target_records
            };
            match remote_cache::export(to, records, &self.store, &self.registry).await {
                Ok(()) => self.opts.reporter.report(Event::Info {
                    message: format!("exported {} cache records to {to:?}", records.len()),
                }),
                Err(e) => self.opts.reporter.report(Event::Warning {
                    location: None,
                    message: format!(
                        "--cache-to {to:?} could not be written ({e}); the image is built all the same"
                    ),
                }),
            }
        }
        Ok(result)
    }

    /// For each stage, the stages it needs first.
    fn stage_dependencies(&self, stages: &[StageDef]) -> Result<Vec<BTreeSet<usize>>, BuildError> {
        let mut deps = vec![BTreeSet::new(); stages.len()];
        for (i, stage) in stages.iter().enumerate() {
            let from = stage.nodes[0];
            let image = self.image_of_from(from)?;
            if let Some(d) = stage_index(stages, &image, i, false) {
                deps[i].insert(d);
            }
            for node in &stage.nodes[1..] {
                for value in self.sources_of(node) {
                    if let Some(d) = stage_index(stages, &value, i, true) {
                        if d == i {
                            return Err(self.err(
                                node,
                                format!("{value:?} refers to the stage it is in; a stage cannot copy from itself"),
                            ));
                        }
                        deps[i].insert(d);
                    }
                }
            }
        }
        Ok(deps)
    }

    /// The stages or images `node` copies or mounts from (`--from=`, `from=`), with the global
    /// ARGs expanded.
    fn sources_of(&self, node: &Node) -> Vec<String> {
        stage::from_references(node)
            .into_iter()
            .map(|f| {
                self.lex
                    .expand(&f, &|k| stage::lookup_pairs(&self.global_args, k))
                    .unwrap_or(f)
            })
            .collect()
    }

    /// In place: sets up every registry the build may reach (base images, `COPY --from` and
    /// `--mount=from` images, caches, the tags pushed) before the first step replaces `/`, with
    /// the CA files and credential helpers of this container.
    async fn prepare_registries(
        &self,
        stages: &[StageDef<'_>],
        needed: &[usize],
    ) -> Result<(), BuildError> {
        let mut images: BTreeSet<String> = BTreeSet::new();
        for &i in needed {
            let stage = &stages[i];
            let image = self.image_of_from(stage.nodes[0])?;
            if stage_index(stages, &image, i, false).is_none() && image != "scratch" {
                images.insert(image);
            }
            for node in &stage.nodes[1..] {
                for value in self.sources_of(node) {
                    if stage_index(stages, &value, i, true).is_none() {
                        images.insert(value);
                    }
                }
            }
        }
        for c in self.opts.cache_from.iter().chain(&self.opts.cache_to) {
            if let remote_cache::CacheRef::Registry { reference, .. } = c {
                images.insert(reference.clone());
            }
        }
        if self.opts.push {
            images.extend(self.opts.tags.iter().cloned());
        }
        for image in images {
            // A name that does not parse fails where it is used, with its place in the file.
            let Ok(r) = crate::registry::reference::parse(&image) else {
                continue;
            };
            self.registry
                .prepare(&r)
                .await
                .map_err(|source| BuildError::Registry {
                    location: format!("setting up the registry of {image} before the first step"),
                    error: Box::new(source),
                })?;
        }
        Ok(())
    }

    fn image_of_from(&self, node: &Node) -> Result<String, BuildError> {
        let raw = node.args.first().ok_or_else(|| {
            self.err(
                node,
                "FROM needs an image: FROM <image>[:tag|@digest] [AS name]",
            )
        })?;
        if !(node.args.len() == 1
            || (node.args.len() == 3 && node.args[1].eq_ignore_ascii_case("as")))
        {
            return Err(self.err(
                node,
                "FROM takes an image and an optional `AS name`: FROM <image> [AS <name>]",
            ));
        }
        for f in &node.flags {
            let name = f.split('=').next().unwrap_or(f);
            if name != "--platform" {
                return Err(self.err(
                    node,
                    format!("FROM flag {name} is not supported by this version of shmocker"),
                ));
            }
        }
        let image = self
            .lex
            .expand(raw, &|k| stage::lookup_pairs(&self.global_args, k))
            .map_err(|e| self.err(node, format!("FROM {raw}: {e}")))?;
        if image.is_empty() {
            return Err(self.err(
                node,
                format!("FROM {raw} expands to an empty image name; set the ARG it uses"),
            ));
        }
        Ok(image)
    }

    fn parse_arg(
        &self,
        node: &Node,
        arg: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(String, Option<String>), BuildError> {
        let (name, default) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v)),
            None => (arg.to_string(), None),
        };
        if name.is_empty() {
            return Err(self.err(node, format!("ARG {arg:?}: the name is empty")));
        }
        if let Some(v) = self.opts.build_args.get(&name) {
            return Ok((name, Some(v.clone())));
        }
        let value = match default {
            Some(v) => Some(
                self.lex
                    .expand(v, lookup)
                    .map_err(|e| self.err(node, format!("ARG {arg}: {e}")))?,
            ),
            None => None,
        };
        Ok((name, value))
    }

    /// The layer's blob in the build's output compression: a layer this build made (or found in
    /// the cache) in another compression is written again in this one, as is a base image's
    /// layer with `force-compression`. Recompressed blobs are remembered in the cache, so a warm
    /// build does not redo it.
    async fn in_output_compression(&self, l: &stage::Layer) -> Result<BlobRef, BuildError> {
        let want = self.opts.compression;
        let have = crate::layer::Compression::from_media_type(&l.blob.media_type).ok();
        if have == Some(want.compression()) || (l.base && !self.opts.force_compression) {
            return Ok(l.blob.clone());
        }
        let Some(from) = have else {
            return Ok(l.blob.clone());
        };
        let key = cache::step_key(
            "recompress",
            &serde_json::json!({ "blob": l.blob.digest, "to": want.label() }),
        );
        if let Some(cache::Record { layer: Some(c), .. }) = self.cache.get(&key)
            && c.diff_id == l.diff_id
            && self.store.has_blob(&c.digest)
        {
            return Ok(BlobRef {
                digest: c.digest,
                size: c.size,
                media_type: c.media_type,
            });
        }
        let src = self
            .store
            .blob_path(&l.blob.digest)
            .map_err(|e| internal("recompressing a layer")(e.to_string()))?;
        let store = self.store.clone();
        let made = tokio::task::spawn_blocking(move || {
            crate::layer::recompress(&src, from, want, &store, None)
        })
        .await
        .map_err(|e| internal("recompress task")(e.to_string()))?
        .map_err(|e| {
            BuildError::Input(format!(
                "recompressing layer {} as {}: {e}",
                l.blob.digest,
                want.label()
            ))
        })?;
        if made.diff_id != l.diff_id {
            return Err(BuildError::Input(format!(
                "layer {}: its uncompressed content is {} but the image says {}; the store is damaged: remove {} and build again",
                l.blob.digest,
                made.diff_id,
                l.diff_id,
                self.store.root().display()
            )));
        }
        let record = cache::Record {
            created: String::new(),
            layer: Some(cache::CachedLayer {
                digest: made.digest.clone(),
                size: made.size,
                media_type: made.media_type.clone(),
                diff_id: made.diff_id,
            }),
        };
        // Only a shortcut for the next build: failing to remember it costs time, not correctness.
        let _ = self.cache.put(&key, &record);
        Ok(BlobRef {
            digest: made.digest,
            size: made.size,
            media_type: made.media_type,
        })
    }

    async fn finish(&self, state: StageState) -> Result<BuildResult, BuildError> {
        let format = self.opts.format;
        let mut config = state.config.clone();
        config.created = config
            .history
            .last()
            .and_then(|h| h.created.clone())
            .or_else(|| Some(self.now()));
        if !self.opts.labels.is_empty() {
            let labels = config.config.labels.get_or_insert_with(BTreeMap::new);
            labels.extend(self.opts.labels.clone());
        }
        let config_raw = serde_json::to_vec(&config)
            .map_err(|e| internal("serialising the config")(e.to_string()))?;
        let config_digest = self
            .store
            .put_bytes(&config_raw)
            .map_err(|e| internal("storing the config")(e.to_string()))?;
        let config_desc = Descriptor {
            media_type: format.config().into(),
            digest: config_digest.clone(),
            size: config_raw.len() as u64,
            annotations: None,
            platform: None,
        };
        let mut layers: Vec<BlobRef> = Vec::with_capacity(state.layers.len());
        for l in &state.layers {
            let blob = self.in_output_compression(l).await?;
            layers.push(BlobRef {
                media_type: format.layer(&blob.media_type),
                ..blob
            });
        }
        let layer_descs: Vec<Descriptor> = layers
            .iter()
            .map(|l| Descriptor {
                media_type: l.media_type.clone(),
                digest: l.digest.clone(),
                size: l.size,
                annotations: None,
                platform: None,
            })
            .collect();
        let manifest_raw = image::manifest(format, &config_desc, &layer_descs);
        let manifest_digest = self
            .store
            .put_bytes(&manifest_raw)
            .map_err(|e| internal("storing the manifest")(e.to_string()))?;
        let manifest = Descriptor {
            media_type: format.manifest().into(),
            digest: manifest_digest.clone(),
            size: manifest_raw.len() as u64,
            annotations: None,
            platform: None,
        };
        let blobs: Vec<String> = std::iter::once(config_digest.clone())
            .chain(layers.iter().map(|l| l.digest.clone()))
            .collect();
        let name = self.opts.tags.first().map(String::as_str);
        for export in &self.opts.exports {
            match export {
                Export::Oci(dest) => {
                    image::layout::write_oci_archive(&self.store, dest, &manifest, &blobs, name)
                        .map_err(|e| BuildError::Input(e.to_string()))?;
                    self.opts.reporter.report(Event::Exported {
                        what: "an OCI image layout".into(),
                        dest: dest.display().to_string(),
                    });
                }
                Export::Docker(dest) => {
                    let load = image::layout::DockerLoad {
                        config: config_digest.clone(),
                        layers: layers.iter().map(|l| l.digest.clone()).collect(),
                        tags: self.opts.tags.clone(),
                    };
                    image::layout::write_docker_archive(
                        &self.store,
                        dest,
                        &manifest,
                        &blobs,
                        name,
                        &load,
                    )
                    .map_err(|e| BuildError::Input(e.to_string()))?;
                    self.opts.reporter.report(Event::Exported {
                        what: "a docker-loadable image".into(),
                        dest: dest.display().to_string(),
                    });
                }
                Export::Local(dest) => {
                    self.export_local(&state, dest).await?;
                    self.opts.reporter.report(Event::Exported {
                        what: "the image's filesystem".into(),
                        dest: dest.display().to_string(),
                    });
                }
            }
        }
        let mut pushed = Vec::new();
        if self.opts.push {
            let config_blob = BlobRef {
                digest: config_digest.clone(),
                size: config_raw.len() as u64,
                media_type: format.config().into(),
            };
            for tag in &self.opts.tags {
                let reference: Reference = crate::registry::reference::parse(tag)
                    .map_err(|e| BuildError::Input(format!("--tag: {e}")))?;
                self.opts
                    .reporter
                    .report(Event::Pushing { tag: tag.clone() });
                let digest = self
                    .registry
                    .push_image(
                        &reference,
                        &layers,
                        &config_blob,
                        &manifest_raw,
                        format.manifest(),
                        &self.store,
                    )
                    .await
                    .map_err(|source| BuildError::Registry {
                        location: format!("pushing {tag}"),
                        error: Box::new(source),
                    })?;
                self.opts.reporter.report(Event::Pushed {
                    tag: tag.clone(),
                    digest: digest.clone(),
                });
                pushed.push(tag.clone());
            }
        }
        Ok(BuildResult {
            config_digest,
            manifest,
            pushed,
        })
    }

    /// Copies the image's filesystem into `dest` (created if missing), owners and modes kept.
    async fn export_local(&self, state: &StageState, dest: &Path) -> Result<(), BuildError> {
        self.ensure_trees(None, &state.layers).await?;
        let dir = self.store.temp_path("export");
        let scratch = dir.join("scratch");
        for d in [
            dir.join("upper"),
            dir.join("work"),
            dir.join("merged"),
            scratch.clone(),
        ] {
            fs::create_dir_all(&d).map_err(|e| internal("export dir")(e.to_string()))?;
        }
        fs::create_dir_all(dest).map_err(|e| {
            BuildError::Input(format!("--output type=local,dest={}: {e}", dest.display()))
        })?;
        let spec = crate::sandbox::StepSpec {
            lower: state
                .layers
                .iter()
                .rev()
                .map(|l| l.snapshot.clone())
                .collect(),
            upper: dir.join("upper"),
            work: dir.join("work"),
            merged: dir.join("merged"),
            empty_dir: self.snapshots.empty_dir(),
            scratch,
            snapshotter: self.opts.snapshotter,
            chroot: self.opts.chroot,
            in_place: self.in_place.as_ref().map(|(keep, _)| keep.clone()),
            reuse: None,
            ignore_chown_errors: self.opts.ignore_chown_errors,
            action: crate::sandbox::Action::Export {
                dest: dest.to_path_buf(),
            },
        };
        let result = tokio::task::spawn_blocking(move || {
            crate::sandbox::run_step(&spec, &[], |line| eprintln!("export: {line}"))
        })
        .await
        .map_err(|e| internal("export task")(e.to_string()))?;
        let _ = fs::remove_dir_all(&dir);
        match result.map(|r| r.status) {
            Ok(crate::sandbox::StepStatus::Exited(0)) => Ok(()),
            Ok(other) => Err(BuildError::Input(format!(
                "exporting the filesystem to {} failed: {other:?}",
                dest.display()
            ))),
            Err(e) => Err(BuildError::Input(format!(
                "exporting the filesystem to {}: {e}",
                dest.display()
            ))),
        }
    }

    /// The time to record for something made now: `SOURCE_DATE_EPOCH` when set.
    fn now(&self) -> String {
        match self.opts.source_date_epoch {
            Some(epoch) => epoch_rfc3339(epoch),
            None => image::now_rfc3339(),
        }
    }
}

fn epoch_rfc3339(epoch: i64) -> String {
    jiff::Timestamp::from_second(epoch)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// The index of the stage a `FROM` (or `--from`) value names: a stage name defined before
/// `current` (or any stage, for `--from`), or a stage number for `--from`.
fn stage_index(
    stages: &[StageDef],
    value: &str,
    current: usize,
    allow_index: bool,
) -> Option<usize> {
    let lower = value.to_ascii_lowercase();
    let by_name = stages
        .iter()
        .enumerate()
        .filter(|(i, _)| allow_index || *i < current)
        .find(|(_, s)| s.name.as_deref() == Some(lower.as_str()))
        .map(|(i, _)| i);
    by_name.or_else(|| {
        allow_index
            .then(|| value.parse::<usize>().ok())
            .flatten()
            .filter(|i| *i < stages.len())
    })
}

/// The stages `target` needs, each after its dependencies; an error naming a stage on a cycle.
fn needed_stages(
    target: usize,
    deps: &[BTreeSet<usize>],
    _stages: &[StageDef],
    cycle: impl Fn(usize) -> BuildError,
) -> Result<Vec<usize>, BuildError> {
    fn visit(
        i: usize,
        deps: &[BTreeSet<usize>],
        state: &mut Vec<u8>,
        out: &mut Vec<usize>,
    ) -> Result<(), usize> {
        match state[i] {
            2 => return Ok(()),
            1 => return Err(i),
            _ => {}
        }
        state[i] = 1;
        for &d in &deps[i] {
            visit(d, deps, state, out)?;
        }
        state[i] = 2;
        out.push(i);
        Ok(())
    }
    let mut state = vec![0u8; deps.len()];
    let mut out = Vec::new();
    visit(target, deps, &mut state, &mut out).map_err(cycle)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_place_paths_are_real_and_the_loader_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let real = fs::canonicalize(tmp.path()).unwrap();
        fs::create_dir(real.join("store")).unwrap();
        std::os::unix::fs::symlink(real.join("store"), real.join("link")).unwrap();
        // Through a symlink, with `.` and `..`, and below it a part that does not exist yet.
        assert_eq!(
            real_path(&real.join("link/./x/../new/file")),
            real.join("store/new/file")
        );
        assert_eq!(real_path(Path::new("/../..")), PathBuf::from("/"));
        // Tests are dynamically linked; busybox (from busybox-static) is not.
        let exe = std::env::current_exe().unwrap();
        let loader = elf_interpreter(&exe).expect("a test binary has a loader");
        assert!(loader.to_string_lossy().contains("ld-linux"), "{loader:?}");
        assert_eq!(elf_interpreter(Path::new("/usr/bin/busybox")), None);
        assert_eq!(elf_interpreter(Path::new("/etc/hostname")), None);
    }

    #[test]
    fn transfer_lines_are_throttled() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let mut th = TransferThrottle::default();
        const MB: u64 = 1_000_000;
        // A quick transfer shows nothing, not even its end.
        assert_eq!(th.due(true, "sha256:a", MB, 10 * MB, at(0)), None);
        assert_eq!(th.due(true, "sha256:a", 10 * MB, 10 * MB, at(900)), None);
        // A long one: first after 2 s, then every 5 s, and its end.
        let shown: Vec<u64> = (0..=130)
            .map(|i| i * 100)
            .filter(|&ms| {
                th.due(false, "sha256:b", ms * 1000, 20 * MB, at(ms))
                    .is_some()
            })
            .collect();
        assert_eq!(shown, [2000, 7000, 12000]);
        assert_eq!(
            th.due(false, "sha256:b", 20 * MB, 20 * MB, at(13050)),
            Some(13.05)
        );
        // Pull and push of one digest are told apart; finished ones are forgotten.
        assert_eq!(th.due(true, "sha256:b", 0, MB, at(13100)), None);
        assert!(th.seen.len() == 1);
    }

    #[test]
    fn needed_stages_skip_the_unused_and_find_cycles() {
        let deps = vec![
            BTreeSet::new(),
            BTreeSet::from([0]),
            BTreeSet::new(),
            BTreeSet::from([1, 2]),
        ];
        let err = |_| BuildError::Input("cycle".into());
        assert_eq!(needed_stages(3, &deps, &[], err).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(needed_stages(1, &deps, &[], err).unwrap(), vec![0, 1]);
        let cyclic = vec![BTreeSet::from([1]), BTreeSet::from([0])];
        assert!(needed_stages(0, &cyclic, &[], err).is_err());
    }

    #[test]
    fn epochs_format_as_rfc3339() {
        assert_eq!(epoch_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(epoch_rfc3339(1700000000), "2023-11-14T22:13:20Z");
    }
}
