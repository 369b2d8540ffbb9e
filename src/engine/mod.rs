//! The build engine: runs a parsed Dockerfile, step by step, into an image.
//!
//! For the stage that is built (the last one, and the stages it starts `FROM`), each instruction
//! either changes the image config only (ENV, LABEL, USER, CMD, ...: an `empty_layer` history
//! entry), or changes the filesystem (RUN, COPY, WORKDIR): the step runs in the sandbox on an
//! overlay of the image's unpacked layers, and what it left in the overlay's upper dir becomes
//! the next layer, which is compressed into the store and kept unpacked as a snapshot for the
//! steps after it. At the end the config and manifest are written, and the image is pushed (blobs
//! first, manifest last) or exported.

pub mod context;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use oci_client::Reference;

use crate::dockerfile::{self, Node, shell::Lex};
use crate::image::{self, ContainerConfig, Descriptor, History, ImageConfig};
use crate::layer::{self, ApplyOptions, Compression, DiffOptions};
use crate::registry::{BlobRef, Platform, Registry, RegistryError, RegistryOptions};
use crate::sandbox::{
    self, Action, CopySpec, IdMapping, ProcessSpec, Snapshotter, StepSpec, StepStatus,
};
use crate::snapshot::Snapshots;
use crate::store::Store;
use context::Context;

/// What to build and where the result goes.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub context: PathBuf,
    /// The Dockerfile; `<context>/Dockerfile` when not given.
    pub dockerfile: Option<PathBuf>,
    pub tags: Vec<String>,
    pub push: bool,
    /// OCI image layout tarballs to write.
    pub oci_outputs: Vec<PathBuf>,
    pub build_args: BTreeMap<String, String>,
    pub iidfile: Option<PathBuf>,
    pub metadata_file: Option<PathBuf>,
    pub store_root: PathBuf,
    pub insecure_registries: Vec<String>,
    pub mapping: IdMapping,
    /// How each step's rootfs is stacked (chosen by `detect::ladder`).
    pub snapshotter: Snapshotter,
    /// Steps run chrooted, without namespaces (the `chroot` isolation).
    pub chroot: bool,
    /// Unmapped owners become 0 instead of failing the step.
    pub ignore_chown_errors: bool,
}

/// What a finished build produced.
#[derive(Debug, Clone)]
pub struct BuildResult {
    pub config_digest: String,
    pub manifest: Descriptor,
    pub pushed: Vec<String>,
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
    },
    #[error("{location}: {source}")]
    Registry {
        location: String,
        #[source]
        source: Box<RegistryError>,
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

/// One layer of the image being built: where it is as a blob and as an unpacked snapshot.
#[derive(Debug, Clone)]
struct Layer {
    blob: BlobRef,
    diff_id: String,
    snapshot: PathBuf,
}

/// The image a stage is building, as it grows.
#[derive(Debug, Clone)]
struct StageState {
    config: ImageConfig,
    layers: Vec<Layer>,
    /// ARGs declared in this stage, with their values (None: declared without a value).
    args: Vec<(String, Option<String>)>,
    cmd_set: bool,
    shell: Vec<String>,
}

impl StageState {
    fn env(&self) -> &ContainerConfig {
        &self.config.config
    }

    /// Variables for word expansion: ARGs, overridden by ENV (as BuildKit does).
    fn lookup(&self, name: &str) -> Option<String> {
        if let Some(v) = self.env().env_get(name) {
            return Some(v.to_string());
        }
        self.args
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.clone())
    }
}

struct Builder<'a> {
    opts: &'a BuildOptions,
    store: Store,
    snapshots: Snapshots,
    registry: Registry,
    file_name: String,
    lex: Lex,
    context: Context,
    step_no: usize,
    scratch: PathBuf,
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
    for w in &parsed.warnings {
        eprintln!("warning: {file_name}:{}: {}", w.line, w.message);
    }
    let ignore = read_dockerignore(context_dir, &dockerfile_path)?;
    let store = Store::open(&opts.store_root).map_err(|e| {
        BuildError::Input(format!(
            "cannot open the store at {}: {e}; pick another with --root DIR",
            opts.store_root.display()
        ))
    })?;
    let snapshots = Snapshots::new(&store).map_err(|e| BuildError::Internal(e.to_string()))?;
    let scratch = store.temp_path("build");
    fs::create_dir_all(&scratch).map_err(|e| internal("build dir")(e.to_string()))?;
    let registry = Registry::new(RegistryOptions {
        insecure_hosts: opts.insecure_registries.clone(),
        ..Default::default()
    });
    let mut b = Builder {
        opts,
        store,
        snapshots,
        registry,
        file_name,
        lex: Lex::new(parsed.escape),
        context: Context::new(context_dir.clone(), ignore),
        step_no: 0,
        scratch: scratch.clone(),
    };
    let result = b.run(&parsed.nodes).await;
    let _ = fs::remove_dir_all(&scratch);
    let result = result?;
    eprintln!(
        "built {} in {:.1}s",
        result.manifest.digest,
        started.elapsed().as_secs_f64()
    );
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

/// The stages of a Dockerfile: the global ARGs before the first FROM, then each stage's nodes.
struct Stages<'n> {
    global_args: Vec<&'n Node>,
    stages: Vec<(Option<String>, Vec<&'n Node>)>,
}

fn split_stages(nodes: &[Node]) -> Stages<'_> {
    let mut s = Stages {
        global_args: vec![],
        stages: vec![],
    };
    for n in nodes {
        if n.keyword == "from" {
            let name = (n.args.len() == 3 && n.args[1].eq_ignore_ascii_case("as"))
                .then(|| n.args[2].to_ascii_lowercase());
            s.stages.push((name, vec![n]));
        } else if let Some((_, stage)) = s.stages.last_mut() {
            stage.push(n);
        } else {
            s.global_args.push(n);
        }
    }
    s
}

impl Builder<'_> {
    fn loc(&self, node: &Node) -> String {
        format!("{}:{}:{}", self.file_name, node.start_line, node.column)
    }

    fn err(&self, node: &Node, message: impl Into<String>) -> BuildError {
        BuildError::At {
            location: self.loc(node),
            message: message.into(),
        }
    }

    async fn run(&mut self, nodes: &[Node]) -> Result<BuildResult, BuildError> {
        let stages = split_stages(nodes);
        if stages.stages.is_empty() {
            return Err(BuildError::Input(format!(
                "{}: the Dockerfile has no FROM instruction; start it with FROM <image> (or FROM scratch)",
                self.file_name
            )));
        }
        let mut global: Vec<(String, Option<String>)> = Vec::new();
        for n in &stages.global_args {
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
                let (name, value) = self.parse_arg(n, arg, &|k| lookup_pairs(&global, k))?;
                global.push((name, value));
            }
        }
        // The target is the last stage; FROM <stage> pulls earlier ones in.
        let target = stages.stages.len() - 1;
        let mut needed = vec![target];
        let mut i = target;
        while let Some(base) = self.stage_base(&stages, i, &global)? {
            needed.push(base);
            i = base;
        }
        needed.reverse();
        let total: usize = needed.iter().map(|&i| stages.stages[i].1.len()).sum();
        let mut built: BTreeMap<usize, StageState> = BTreeMap::new();
        for &idx in &needed {
            let state = self.run_stage(&stages, idx, &global, &built, total).await?;
            built.insert(idx, state);
        }
        let state = built.remove(&target).expect("target stage built");
        self.finish(state).await
    }

    /// The index of the earlier stage that stage `i` is built FROM, if it names one.
    fn stage_base(
        &self,
        stages: &Stages,
        i: usize,
        global: &[(String, Option<String>)],
    ) -> Result<Option<usize>, BuildError> {
        let from = stages.stages[i].1[0];
        let image = self.image_of_from(from, global)?;
        Ok(stages.stages[..i]
            .iter()
            .position(|(name, _)| name.as_deref() == Some(image.to_ascii_lowercase().as_str())))
    }

    fn image_of_from(
        &self,
        node: &Node,
        global: &[(String, Option<String>)],
    ) -> Result<String, BuildError> {
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
        if let Some(f) = node.flags.first() {
            return Err(self.err(
                node,
                format!("FROM flag {f} is not supported by this version of shmocker"),
            ));
        }
        let image = self
            .lex
            .expand(raw, &|k| lookup_pairs(global, k))
            .map_err(|e| self.err(node, format!("FROM {raw}: {e}")))?;
        if image.is_empty() {
            return Err(self.err(
                node,
                format!("FROM {raw} expands to an empty image name; set the ARG it uses"),
            ));
        }
        Ok(image)
    }

    async fn run_stage(
        &mut self,
        stages: &Stages<'_>,
        idx: usize,
        global: &[(String, Option<String>)],
        built: &BTreeMap<usize, StageState>,
        total: usize,
    ) -> Result<StageState, BuildError> {
        let nodes = &stages.stages[idx].1;
        let from = nodes[0];
        let image = self.image_of_from(from, global)?;
        self.step_no += 1;
        let base_stage = stages.stages[..idx]
            .iter()
            .position(|(name, _)| name.as_deref() == Some(image.to_ascii_lowercase().as_str()));
        self.announce(total, &format!("FROM {image}"));
        let mut state = match base_stage {
            Some(i) => {
                let mut s = built
                    .get(&i)
                    .cloned()
                    .ok_or_else(|| BuildError::Internal(format!("stage {i} not built")))?;
                s.args.clear();
                s
            }
            None => self.base_image(from, &image).await?,
        };
        if state.config.config.env_get("PATH").is_none() {
            state.config.config.env_set("PATH", image::DEFAULT_PATH);
        }
        for node in &nodes[1..] {
            self.step_no += 1;
            self.announce(total, &display_instruction(node));
            let started = Instant::now();
            self.dispatch(node, &mut state, global).await?;
            eprintln!(
                "#{} DONE {:.1}s",
                self.step_no,
                started.elapsed().as_secs_f64()
            );
        }
        Ok(state)
    }

    fn announce(&self, total: usize, what: &str) {
        eprintln!("#{} [{}/{}] {}", self.step_no, self.step_no, total, what);
    }

    async fn base_image(&mut self, node: &Node, image: &str) -> Result<StageState, BuildError> {
        let host = Platform::host();
        if image == "scratch" {
            return Ok(StageState {
                config: ImageConfig {
                    architecture: host.architecture.clone(),
                    os: host.os.clone(),
                    variant: host.variant.clone(),
                    ..Default::default()
                },
                layers: vec![],
                args: vec![],
                cmd_set: false,
                shell: default_shell(),
            });
        }
        let reference: Reference = image.parse().map_err(|e| {
            self.err(
                node,
                format!("invalid image reference {image:?}: {e}; expected name[:tag][@digest]"),
            )
        })?;
        let reg_err = |source| BuildError::Registry {
            location: self.loc(node),
            source: Box::new(source),
        };
        let pulled = self
            .registry
            .pull_manifest(&reference, &host)
            .await
            .map_err(reg_err)?;
        eprintln!(
            "#{} resolved {} to {}",
            self.step_no, image, pulled.manifest_digest
        );
        let config: ImageConfig = serde_json::from_slice(&pulled.config_raw).map_err(|e| {
            self.err(
                node,
                format!(
                    "the config of {image} ({}) is not a valid image config: {e}",
                    pulled.manifest.config.digest
                ),
            )
        })?;
        if config.rootfs.diff_ids.len() != pulled.manifest.layers.len() {
            return Err(self.err(
                node,
                format!(
                    "{image}: the manifest names {} layers but the config {} diff IDs",
                    pulled.manifest.layers.len(),
                    config.rootfs.diff_ids.len()
                ),
            ));
        }
        let mut layers = Vec::new();
        for (desc, diff_id) in pulled.manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            let blob = BlobRef {
                digest: desc.digest.clone(),
                size: desc.size as u64,
                media_type: desc.media_type.clone(),
            };
            let snapshot = self
                .snapshots
                .layer_dir(diff_id)
                .map_err(|e| self.err(node, e.to_string()))?;
            if !self.store.has_blob(&blob.digest) || !snapshot.exists() {
                let path = self
                    .registry
                    .fetch_blob(&reference, &blob, &self.store)
                    .await
                    .map_err(reg_err)?;
                if !snapshot.exists() {
                    self.unpack(node, &path, &blob, diff_id, &snapshot).await?;
                }
            }
            layers.push(Layer {
                blob,
                diff_id: diff_id.clone(),
                snapshot,
            });
        }
        Ok(StageState {
            config,
            layers,
            args: vec![],
            cmd_set: false,
            shell: default_shell(),
        })
    }

    async fn unpack(
        &self,
        node: &Node,
        blob_path: &Path,
        blob: &BlobRef,
        diff_id: &str,
        snapshot: &Path,
    ) -> Result<(), BuildError> {
        let compression = Compression::from_media_type(&blob.media_type)
            .map_err(|e| self.err(node, format!("layer {}: {e}", blob.digest)))?;
        let tmp = self.store.temp_path("unpack");
        let blob_path = blob_path.to_path_buf();
        let snapshot = snapshot.to_path_buf();
        let opts = ApplyOptions {
            chown: self.opts.mapping.has_many_ids(),
            ..Default::default()
        };
        let digest = blob.digest.clone();
        let diff_id = diff_id.to_string();
        let res = tokio::task::spawn_blocking(move || -> Result<Vec<String>, String> {
            fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
            let unpacked = unpack_verified(&blob_path, compression, &tmp, &opts, &diff_id);
            let warnings = match unpacked {
                Ok(w) => w,
                Err(e) => {
                    let _ = fs::remove_dir_all(&tmp);
                    return Err(e);
                }
            };
            if let Err(e) = fs::rename(&tmp, &snapshot) {
                let _ = fs::remove_dir_all(&tmp);
                // Another build may have committed the same layer first.
                if !snapshot.exists() {
                    return Err(e.to_string());
                }
            }
            Ok(warnings)
        })
        .await
        .map_err(|e| internal("unpack task")(e.to_string()))?;
        match res {
            Ok(warnings) => {
                for w in warnings {
                    eprintln!("warning: layer {digest}: {w}");
                }
                Ok(())
            }
            Err(e) => Err(self.err(node, format!("unpacking layer {digest}: {e}"))),
        }
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

    fn expand(&self, node: &Node, state: &StageState, word: &str) -> Result<String, BuildError> {
        self.lex
            .expand(word, &|k| state.lookup(k))
            .map_err(|e| self.err(node, format!("{word:?}: {e}")))
    }

    async fn dispatch(
        &mut self,
        node: &Node,
        state: &mut StageState,
        global: &[(String, Option<String>)],
    ) -> Result<(), BuildError> {
        let keyword = node.keyword.as_str();
        let supported_flags: &[&str] = match keyword {
            "copy" => &["--chown", "--chmod"],
            _ => &[],
        };
        for f in &node.flags {
            let name = f.split('=').next().unwrap_or(f);
            if !supported_flags.contains(&name) {
                return Err(self.err(
                    node,
                    format!(
                        "{} flag {name} is not supported by this version of shmocker",
                        keyword.to_uppercase()
                    ),
                ));
            }
        }
        let created_by;
        let mut empty_layer = true;
        match keyword {
            "arg" => {
                for arg in &node.args {
                    let (name, mut value) = self.parse_arg(node, arg, &|k| state.lookup(k))?;
                    if value.is_none() {
                        // A global ARG redeclared without a value takes the global value.
                        value = lookup_pairs(global, &name);
                    }
                    state.args.push((name, value));
                }
                created_by = format!("ARG {}", node.args.join(" "));
            }
            "env" | "label" => {
                let mut pairs = Vec::new();
                for kv in node.args.chunks(3) {
                    let [k, v, _sep] = kv else {
                        return Err(self.err(
                            node,
                            format!("{} needs key=value pairs", keyword.to_uppercase()),
                        ));
                    };
                    let key = if keyword == "label" {
                        self.expand(node, state, k)?
                    } else {
                        k.clone()
                    };
                    let value = self.expand(node, state, v)?;
                    pairs.push((key, value));
                }
                for (k, v) in &pairs {
                    if keyword == "env" {
                        state.config.config.env_set(k, v);
                    } else {
                        state
                            .config
                            .config
                            .labels
                            .get_or_insert_with(BTreeMap::new)
                            .insert(k.clone(), v.clone());
                    }
                }
                let shown: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                created_by = format!("{} {}", keyword.to_uppercase(), shown.join(" "));
            }
            "user" => {
                let user = self.expand(node, state, &self.single_arg(node)?)?;
                state.config.config.user = Some(user.clone());
                created_by = format!("USER {user}");
            }
            "maintainer" => {
                let who = node.args.join(" ");
                state.config.author = Some(who.clone());
                created_by = format!("MAINTAINER {who}");
            }
            "stopsignal" => {
                let sig = self.expand(node, state, &self.single_arg(node)?)?;
                state.config.config.stop_signal = Some(sig.clone());
                created_by = format!("STOPSIGNAL {sig}");
            }
            "expose" => {
                let mut ports = Vec::new();
                for a in &node.args {
                    for word in self
                        .lex
                        .expand_words(a, &|k| state.lookup(k))
                        .map_err(|e| self.err(node, format!("{a:?}: {e}")))?
                    {
                        ports.extend(expose_ports(&word).map_err(|m| self.err(node, m))?);
                    }
                }
                let map = state
                    .config
                    .config
                    .exposed_ports
                    .get_or_insert_with(BTreeMap::new);
                for p in &ports {
                    map.insert(p.clone(), serde_json::json!({}));
                }
                created_by = format!(
                    "EXPOSE map[{}]",
                    ports
                        .iter()
                        .map(|p| format!("{p}:{{}}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
            "volume" => {
                let mut vols = Vec::new();
                for a in &node.args {
                    let v = self.expand(node, state, a)?;
                    if v.trim().is_empty() {
                        return Err(self.err(node, "VOLUME specified can not be an empty string"));
                    }
                    vols.push(v);
                }
                let map = state
                    .config
                    .config
                    .volumes
                    .get_or_insert_with(BTreeMap::new);
                for v in &vols {
                    map.insert(v.clone(), serde_json::json!({}));
                }
                created_by = format!("VOLUME [{}]", vols.join(" "));
            }
            "shell" => {
                if !node.json || node.args.is_empty() {
                    return Err(self.err(
                        node,
                        "SHELL requires the JSON form: SHELL [\"executable\", \"parameters\"]",
                    ));
                }
                state.shell = node.args.clone();
                created_by = format!("SHELL [{}]", node.args.join(" "));
            }
            "cmd" | "entrypoint" => {
                let args = if node.json {
                    node.args.clone()
                } else {
                    let mut a = state.shell.clone();
                    a.push(node.args.join(" "));
                    a
                };
                let shown = serde_json::to_string(&args).unwrap_or_default();
                if keyword == "cmd" {
                    state.config.config.cmd = Some(args);
                    state.cmd_set = true;
                    created_by = format!("CMD {shown}");
                } else {
                    state.config.config.entrypoint = Some(args);
                    if !state.cmd_set {
                        state.config.config.cmd = None;
                    }
                    created_by = format!("ENTRYPOINT {shown}");
                }
            }
            "workdir" => {
                let dir = self.expand(node, state, &self.single_arg(node)?)?;
                let dir = absolute_in(state.config.config.working_dir.as_deref(), &dir);
                state.config.config.working_dir = Some(dir.clone());
                let user = state.config.config.user.clone();
                empty_layer = !self
                    .fs_step(
                        node,
                        state,
                        Action::Mkdir {
                            path: dir.clone(),
                            user,
                        },
                    )
                    .await?;
                created_by = format!("WORKDIR {dir}");
            }
            "run" => {
                if !node.heredocs.is_empty() {
                    return Err(self.err(
                        node,
                        "RUN with a heredoc is not supported by this version of shmocker",
                    ));
                }
                let args = if node.json {
                    node.args.clone()
                } else {
                    let mut a = state.shell.clone();
                    a.push(node.args.join(" "));
                    a
                };
                let build_args: Vec<(String, String)> = state
                    .args
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
                    .collect();
                let mut env: Vec<String> = state.config.config.env.clone().unwrap_or_default();
                for (k, v) in &build_args {
                    if state.config.config.env_get(k).is_none() {
                        env.push(format!("{k}={v}"));
                    }
                }
                let spec = ProcessSpec {
                    args: args.clone(),
                    env,
                    cwd: state
                        .config
                        .config
                        .working_dir
                        .clone()
                        .unwrap_or_else(|| "/".into()),
                    user: state.config.config.user.clone().unwrap_or_default(),
                    hostname: "shmocker".into(),
                    hosts_file: self.scratch.join("hosts"),
                    resolv_conf: self.scratch.join("resolv.conf"),
                };
                self.write_network_files()?;
                empty_layer = !self.fs_step(node, state, Action::Run(spec)).await?;
                let prefix = if build_args.is_empty() {
                    String::new()
                } else {
                    let kv: Vec<String> =
                        build_args.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("|{} {} ", kv.len(), kv.join(" "))
                };
                created_by = format!("RUN {prefix}{} # buildkit", args.join(" "));
            }
            "copy" => {
                let spec = self.copy_spec(node, state)?;
                let shown = node.args.join(" ");
                empty_layer = !self.fs_step(node, state, Action::Copy(spec)).await?;
                created_by = format!("COPY {shown} # buildkit");
            }
            "from" => unreachable!("FROM starts a stage"),
            other => {
                return Err(self.err(
                    node,
                    format!(
                        "{} is not supported by this version of shmocker",
                        other.to_uppercase()
                    ),
                ));
            }
        }
        state.config.history.push(History {
            created: Some(image::now_rfc3339()),
            created_by: Some(created_by),
            comment: Some(image::HISTORY_COMMENT.into()),
            empty_layer,
            ..Default::default()
        });
        Ok(())
    }

    fn single_arg(&self, node: &Node) -> Result<String, BuildError> {
        match node.args.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(self.err(
                node,
                format!(
                    "{} requires exactly one argument",
                    node.keyword.to_uppercase()
                ),
            )),
        }
    }

    fn write_network_files(&self) -> Result<(), BuildError> {
        let hosts = self.scratch.join("hosts");
        if hosts.exists() {
            return Ok(());
        }
        let w = |p: &Path, data: &[u8]| {
            fs::write(p, data).map_err(|e| internal("writing network files")(e.to_string()))
        };
        w(
            &hosts,
            b"127.0.0.1\tlocalhost shmocker\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        )?;
        let resolv = fs::read("/etc/resolv.conf").unwrap_or_default();
        w(&self.scratch.join("resolv.conf"), &resolv)
    }

    fn copy_spec(&self, node: &Node, state: &StageState) -> Result<CopySpec, BuildError> {
        let mut chown = None;
        let mut chmod = None;
        for f in &node.flags {
            if let Some(v) = f.strip_prefix("--chown=") {
                chown = Some(self.expand(node, state, v)?);
            } else if let Some(v) = f.strip_prefix("--chmod=") {
                let v = self.expand(node, state, v)?;
                chmod = Some(
                    u32::from_str_radix(&v, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| {
                            self.err(
                                node,
                                format!("--chmod={v}: expected an octal mode such as 0755"),
                            )
                        })?,
                );
            }
        }
        if !node.heredocs.is_empty() {
            return Err(self.err(
                node,
                "COPY with a heredoc is not supported by this version of shmocker",
            ));
        }
        let words: Vec<String> = node
            .args
            .iter()
            .map(|a| self.expand(node, state, a))
            .collect::<Result<_, _>>()?;
        let [sources @ .., dest] = words.as_slice() else {
            unreachable!()
        };
        if sources.is_empty() {
            return Err(self.err(
                node,
                "COPY requires at least two arguments: COPY <src>... <dest>",
            ));
        }
        let dest_abs = absolute_in(state.config.config.working_dir.as_deref(), dest);
        let mut matched = Vec::new();
        for s in sources {
            matched.extend(
                self.context
                    .matches(s)
                    .map_err(|e| self.err(node, e.to_string()))?,
            );
        }
        let mut items = Vec::new();
        let mut any_dir = false;
        for rel in &matched {
            let before = items.len();
            self.context
                .items(rel, &mut items)
                .map_err(|e| self.err(node, e.to_string()))?;
            any_dir |= items[before].rel.as_os_str().is_empty();
        }
        let dest_is_dir = dest.ends_with('/') || dest == "." || any_dir;
        if matched.len() > 1 && !dest_is_dir {
            return Err(self.err(
                node,
                format!("when using COPY with more than one source file, the destination must be a directory and end with a /: {dest}"),
            ));
        }
        Ok(CopySpec {
            items,
            dest: dest_abs,
            dest_is_dir,
            chown,
            chmod,
        })
    }

    /// Runs a filesystem step on an overlay of the stage's layers; returns whether it made a layer.
    async fn fs_step(
        &mut self,
        node: &Node,
        state: &mut StageState,
        action: Action,
    ) -> Result<bool, BuildError> {
        let dir = self.store.temp_path("step");
        let (upper, work, merged, scratch) = (
            dir.join("upper"),
            dir.join("work"),
            dir.join("merged"),
            dir.join("scratch"),
        );
        for d in [&upper, &work, &merged, &scratch] {
            fs::create_dir_all(d).map_err(|e| internal("step dir")(e.to_string()))?;
        }
        let spec = StepSpec {
            lower: state
                .layers
                .iter()
                .rev()
                .map(|l| l.snapshot.clone())
                .collect(),
            upper: upper.clone(),
            work,
            merged,
            empty_dir: self.snapshots.empty_dir(),
            action,
            snapshotter: self.opts.snapshotter,
            chroot: self.opts.chroot,
            ignore_chown_errors: self.opts.ignore_chown_errors,
        };
        let step_no = self.step_no;
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            sandbox::run_step(&spec, &scratch, |line| {
                eprintln!("#{step_no} {:.3} {line}", started.elapsed().as_secs_f64());
            })
        })
        .await
        .map_err(|e| internal("step task")(e.to_string()))?;
        let cleanup = |dir: &Path| {
            let _ = fs::remove_dir_all(dir);
        };
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                cleanup(&dir);
                return Err(self.err(node, format!("sandbox: {e}")));
            }
        };
        let failure = match &result.status {
            StepStatus::Exited(0) => None,
            StepStatus::Exited(code) => Some(format!(
                "process {:?} did not complete successfully: exit code: {code}",
                display_instruction(node)
            )),
            StepStatus::Signaled(sig) => Some(format!(
                "process {:?} was killed by signal {sig}",
                display_instruction(node)
            )),
            StepStatus::Failed(msg) => Some(msg.clone()),
        };
        if let Some(message) = failure {
            cleanup(&dir);
            return Err(BuildError::StepFailed {
                location: self.loc(node),
                instruction: display_instruction(node),
                message,
                tail: result.tail,
            });
        }
        let store = self.store.clone();
        let snapshots = self.snapshots.clone();
        let upper_c = upper.clone();
        let made = tokio::task::spawn_blocking(move || -> Result<Option<Layer>, String> {
            if layer::is_empty_upper(&upper_c).map_err(|e| e.to_string())? {
                return Ok(None);
            }
            let blob = layer::diff_upper_to_blob(&upper_c, &store, &DiffOptions::default())
                .map_err(|e| e.to_string())?;
            let snapshot = snapshots
                .layer_dir(&blob.diff_id)
                .map_err(|e| e.to_string())?;
            if !snapshot.exists() {
                fs::rename(&upper_c, &snapshot).map_err(|e| e.to_string())?;
            }
            Ok(Some(Layer {
                blob: BlobRef {
                    digest: blob.digest,
                    size: blob.size,
                    media_type: blob.media_type,
                },
                diff_id: blob.diff_id,
                snapshot,
            }))
        })
        .await
        .map_err(|e| internal("diff task")(e.to_string()))?;
        cleanup(&dir);
        match made.map_err(|e| self.err(node, format!("making the layer: {e}")))? {
            Some(layer) => {
                state.config.rootfs.diff_ids.push(layer.diff_id.clone());
                state.layers.push(layer);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn finish(&mut self, mut state: StageState) -> Result<BuildResult, BuildError> {
        state.config.created = Some(image::now_rfc3339());
        let config_raw = serde_json::to_vec(&state.config)
            .map_err(|e| internal("serialising the config")(e.to_string()))?;
        let config_digest = self
            .store
            .put_bytes(&config_raw)
            .map_err(|e| internal("storing the config")(e.to_string()))?;
        let config_desc = Descriptor {
            media_type: image::MEDIA_TYPE_OCI_CONFIG.into(),
            digest: config_digest.clone(),
            size: config_raw.len() as u64,
            annotations: None,
            platform: None,
        };
        let layer_descs: Vec<Descriptor> = state
            .layers
            .iter()
            .map(|l| Descriptor {
                media_type: l.blob.media_type.clone(),
                digest: l.blob.digest.clone(),
                size: l.blob.size,
                annotations: None,
                platform: None,
            })
            .collect();
        let manifest_raw = image::oci_manifest(&config_desc, &layer_descs);
        let manifest_digest = self
            .store
            .put_bytes(&manifest_raw)
            .map_err(|e| internal("storing the manifest")(e.to_string()))?;
        let manifest = Descriptor {
            media_type: image::MEDIA_TYPE_OCI_MANIFEST.into(),
            digest: manifest_digest.clone(),
            size: manifest_raw.len() as u64,
            annotations: None,
            platform: None,
        };
        let blobs: Vec<String> = std::iter::once(config_digest.clone())
            .chain(state.layers.iter().map(|l| l.blob.digest.clone()))
            .collect();
        let name = self.opts.tags.first().map(String::as_str);
        for dest in &self.opts.oci_outputs {
            crate::image::layout::write_oci_archive(&self.store, dest, &manifest, &blobs, name)
                .map_err(|e| BuildError::Input(e.to_string()))?;
            eprintln!("exported OCI layout to {}", dest.display());
        }
        let mut pushed = Vec::new();
        if self.opts.push {
            let config_blob = BlobRef {
                digest: config_digest.clone(),
                size: config_raw.len() as u64,
                media_type: image::MEDIA_TYPE_OCI_CONFIG.into(),
            };
            let layers: Vec<BlobRef> = state.layers.iter().map(|l| l.blob.clone()).collect();
            for tag in &self.opts.tags {
                let reference: Reference = tag
                    .parse()
                    .map_err(|e| BuildError::Input(format!("invalid tag {tag:?}: {e}")))?;
                eprintln!("pushing {tag}");
                let digest = self
                    .registry
                    .push_image(
                        &reference,
                        &layers,
                        &config_blob,
                        &manifest_raw,
                        image::MEDIA_TYPE_OCI_MANIFEST,
                        &self.store,
                    )
                    .await
                    .map_err(|source| BuildError::Registry {
                        location: format!("pushing {tag}"),
                        source: Box::new(source),
                    })?;
                eprintln!("pushed {tag}@{digest}");
                pushed.push(tag.clone());
            }
        }
        Ok(BuildResult {
            config_digest,
            manifest,
            pushed,
        })
    }
}

/// Unpacks a layer blob into `dest`, checking that its uncompressed content has `diff_id`.
fn unpack_verified(
    blob_path: &Path,
    compression: Compression,
    dest: &Path,
    opts: &ApplyOptions,
    diff_id: &str,
) -> Result<Vec<String>, String> {
    let file = std::io::BufReader::new(fs::File::open(blob_path).map_err(|e| e.to_string())?);
    let report = layer::apply_layer(file, compression, dest, opts).map_err(|e| e.to_string())?;
    if report.diff_id != diff_id {
        return Err(format!(
            "its uncompressed content is {} but the image config says {diff_id}",
            report.diff_id
        ));
    }
    Ok(report.warnings)
}

fn default_shell() -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into()]
}

fn lookup_pairs(pairs: &[(String, Option<String>)], key: &str) -> Option<String> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.clone())
}

/// An instruction as the progress output and errors show it (the source text, one line).
fn display_instruction(node: &Node) -> String {
    let one_line: String = node
        .original
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    one_line
}

/// `dir` made absolute against the working directory, as WORKDIR and COPY destinations are.
fn absolute_in(workdir: Option<&str>, dir: &str) -> String {
    let joined = if dir.starts_with('/') {
        dir.to_string()
    } else {
        format!("{}/{}", workdir.unwrap_or("/"), dir)
    };
    let trailing = dir.ends_with('/') && joined.len() > 1;
    let mut parts: Vec<&str> = Vec::new();
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let mut out = format!("/{}", parts.join("/"));
    if trailing && out != "/" {
        out.push('/');
    }
    out
}

/// `EXPOSE` words to `port/proto` keys: `80` -> `80/tcp`, `53/UDP` -> `53/udp`, ranges expanded.
fn expose_ports(word: &str) -> Result<Vec<String>, String> {
    let (ports, proto) = match word.split_once('/') {
        Some((p, proto)) => (p, proto.to_ascii_lowercase()),
        None => (word, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return Err(format!(
            "EXPOSE {word}: invalid protocol {proto:?}; use tcp, udp or sctp"
        ));
    }
    let bad = || {
        format!(
            "EXPOSE {word}: invalid port; expected a number from 1 to 65535, or a range such as 8000-8010"
        )
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((a, b)) => (
            a.parse::<u16>().map_err(|_| bad())?,
            b.parse::<u16>().map_err(|_| bad())?,
        ),
        None => {
            let p = ports.parse::<u16>().map_err(|_| bad())?;
            (p, p)
        }
    };
    if lo == 0 || hi < lo {
        return Err(bad());
    }
    Ok((lo..=hi).map(|p| format!("{p}/{proto}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workdirs_and_destinations_resolve_like_buildkit() {
        assert_eq!(absolute_in(None, "app"), "/app");
        assert_eq!(absolute_in(Some("/app"), "sub/"), "/app/sub/");
        assert_eq!(absolute_in(Some("/app"), "../x"), "/x");
        assert_eq!(absolute_in(Some("/app"), "/abs"), "/abs");
        assert_eq!(absolute_in(Some("/app"), "."), "/app");
    }

    #[test]
    fn exposed_ports_are_normalised() {
        assert_eq!(expose_ports("80").unwrap(), vec!["80/tcp"]);
        assert_eq!(expose_ports("53/UDP").unwrap(), vec!["53/udp"]);
        assert_eq!(expose_ports("8000-8002").unwrap().len(), 3);
        assert!(expose_ports("http").is_err());
        assert!(expose_ports("80/xyz").is_err());
        assert!(expose_ports("0").is_err());
    }
}
