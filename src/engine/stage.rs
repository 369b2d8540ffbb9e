//! One stage of a build: its image as it grows, and what each instruction does to it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use oci_client::Reference;

use super::cache::{self, CachedLayer, Record};
use super::{BuildError, Builder, FromRef, StageDef, internal, stage_index};
use crate::dockerfile::Node;
use crate::image::{self, ContainerConfig, History, ImageConfig};
use crate::layer::{self, ApplyOptions, Compression, DiffOptions};
use crate::progress::{Event, Location};
use crate::registry::{BlobRef, Platform, PullPolicy, RegistryError, reference};
use crate::sandbox::{
    self, Action, CopyFrom, CopyItem, CopySpec, MountKind, Network, ProcessSpec, RunMount,
    SecretSource, StepSpec, StepStatus,
};

/// One layer of the image being built: where it is as a blob and as an unpacked snapshot.
#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub blob: BlobRef,
    pub diff_id: String,
    pub snapshot: PathBuf,
    /// Pulled with a base image (kept in its own compression unless `force-compression`).
    pub base: bool,
}

impl Layer {
    /// A layer a step of this build made, with its snapshot's place (which may not exist).
    fn made(blob: layer::LayerBlob, snapshot: PathBuf) -> Layer {
        Layer {
            blob: BlobRef {
                digest: blob.digest,
                size: blob.size,
                media_type: blob.media_type,
            },
            diff_id: blob.diff_id,
            snapshot,
            base: false,
        }
    }
}

/// The image a stage is building, as it grows.
#[derive(Debug, Clone)]
pub(super) struct StageState {
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
    /// ARGs declared in this stage, with their values (None: declared without a value).
    pub args: Vec<(String, Option<String>)>,
    pub cmd_set: bool,
    pub shell: Vec<String>,
    /// The cache key of the image so far (see `cache`).
    pub cache_key: String,
    /// The time of the last history entry, given to config-only steps so that a rebuild from
    /// cache writes the same config.
    pub last_created: String,
    /// The cache records of the steps that made this image, for `--cache-to`.
    pub records: Vec<(String, Record)>,
    /// The stage's name (`AS name`), for `--no-cache-filter`.
    pub stage_name: Option<String>,
    /// The copy snapshotter's tree of the last step, kept for the next one (see
    /// [`WarmTree`]).
    pub warm: Option<WarmTree>,
    /// Set while the step being run is the last one of the target stage to touch its files
    /// (only config instructions follow): nothing reads the step's files afterwards.
    pub tree_unused_after: bool,
}

/// A step's rootfs as the copy snapshotter left it: exactly what `layers` stack to, so the next
/// step of the stage can start from it instead of copying every layer again. It lives in the
/// build's scratch directory (removed with it) and belongs to one stage.
#[derive(Debug, Clone)]
pub(super) struct WarmTree {
    pub path: PathBuf,
    /// The snapshots of the layers it shows, bottom first.
    pub layers: Vec<PathBuf>,
}

impl StageState {
    /// The warm tree if it still shows this stage's layers (no cached step came between), or
    /// the tree to discard.
    fn take_warm(&mut self) -> (Option<PathBuf>, Option<PathBuf>) {
        let Some(warm) = self.warm.take() else {
            return (None, None);
        };
        let current: Vec<&PathBuf> = self.layers.iter().map(|l| &l.snapshot).collect();
        if warm.layers.iter().collect::<Vec<_>>() == current {
            (Some(warm.path), None)
        } else {
            (None, Some(warm.path))
        }
    }

    /// Removes the warm tree (the stage is done, or its state is copied for another stage).
    pub fn drop_warm(&mut self) {
        if let Some(w) = self.warm.take() {
            discard_tree(w.path);
        }
    }
}

/// Removes a warm tree in the background (it is no one's any more; the build's scratch
/// directory, removed at the end, holds it meanwhile).
fn discard_tree(path: PathBuf) {
    tokio::task::spawn_blocking(move || crate::store::remove_tree(&path));
}

impl StageState {
    fn env(&self) -> &ContainerConfig {
        &self.config.config
    }

    /// Variables for word expansion: ARGs, overridden by ENV (as BuildKit does).
    pub fn lookup(&self, name: &str) -> Option<String> {
        if let Some(v) = self.env().env_get(name) {
            return Some(v.to_string());
        }
        lookup_pairs(&self.args, name)
    }

    /// ARGs with a value, as RUN sees them.
    fn build_args(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (k, v) in &self.args {
            if let Some(v) = v {
                out.retain(|(ek, _)| ek != k);
                out.push((k.clone(), v.clone()));
            }
        }
        out
    }
}

pub(super) fn lookup_pairs(pairs: &[(String, Option<String>)], key: &str) -> Option<String> {
    pairs
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.clone())
}

/// BuildKit's automatic platform ARGs, usable in FROM lines and, once declared, in a stage.
pub(super) fn platform_args() -> Vec<(String, Option<String>)> {
    let host = Platform::host();
    let platform = match &host.variant {
        Some(v) => format!("{}/{}/{v}", host.os, host.architecture),
        None => format!("{}/{}", host.os, host.architecture),
    };
    let variant = host.variant.clone().unwrap_or_default();
    let mut out = Vec::new();
    for prefix in ["BUILD", "TARGET"] {
        out.push((format!("{prefix}PLATFORM"), Some(platform.clone())));
        out.push((format!("{prefix}OS"), Some(host.os.clone())));
        out.push((format!("{prefix}ARCH"), Some(host.architecture.clone())));
        out.push((format!("{prefix}VARIANT"), Some(variant.clone())));
    }
    out
}

use crate::dockerfile::checks::PROXY_ARGS;

/// The `--from=` values of an instruction (COPY --from, RUN --mount=...,from=).
pub(super) fn from_references(node: &Node) -> Vec<String> {
    let mut out = Vec::new();
    for f in &node.flags {
        if let Some(v) = f.strip_prefix("--from=") {
            out.push(v.to_string());
        } else if let Some(v) = f.strip_prefix("--mount=")
            && let Some(from) = parse_kv(v).get("from")
        {
            out.push(from.clone());
        }
    }
    out
}

/// `a=b,c=d,flag` -> {a: b, c: d, flag: "true"}
fn parse_kv(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), v.trim().to_string()),
            None => (p.trim().to_ascii_lowercase(), "true".to_string()),
        })
        .collect()
}

fn default_shell() -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into()]
}

/// An instruction as the progress output and errors show it (the source text, one line).
pub(super) fn display_instruction(node: &Node) -> String {
    node.original
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl Builder<'_> {
    fn announce(
        &self,
        node: &Node,
        step: usize,
        stage: &str,
        index: usize,
        count: usize,
        what: &str,
    ) {
        self.opts.reporter.report(Event::StepStarted {
            step,
            stage: stage.to_string(),
            index,
            count,
            instruction: what.to_string(),
            location: Location::new(&self.file_name, node.start_line, node.column),
        });
    }

    fn report_failure<T>(&self, node: &Node, step: usize, result: &Result<T, BuildError>) {
        if let Err(e) = result {
            self.opts.reporter.report(Event::StepFailed {
                step,
                location: Location::new(&self.file_name, node.start_line, node.column),
                message: match e {
                    BuildError::At { message, .. } | BuildError::StepFailed { message, .. } => {
                        message.clone()
                    }
                    other => other.to_string(),
                },
            });
        }
    }

    pub(super) async fn run_stage(
        &self,
        stages: &[StageDef<'_>],
        idx: usize,
        built: &BTreeMap<usize, Arc<StageState>>,
        target: bool,
    ) -> Result<StageState, BuildError> {
        let nodes = &stages[idx].nodes;
        let from = nodes[0];
        let image = self.image_of_from(from)?;
        let label = stages[idx]
            .name
            .clone()
            .unwrap_or_else(|| format!("stage-{idx}"));
        let n = nodes.len();
        let step = self.next_step();
        self.opts.reporter.report(Event::StageStarted {
            stage: idx,
            name: stages[idx].name.clone(),
            base: image.clone(),
        });
        self.announce(from, step, &label, 1, n, &format!("FROM {image}"));
        let mut state = match stage_index(stages, &image, idx, false) {
            Some(i) => {
                let mut s = (*built
                    .get(&i)
                    .ok_or_else(|| BuildError::Internal(format!("stage {i} not built")))?
                    .clone())
                .clone();
                s.args.clear();
                s
            }
            None => {
                let pulled = self.image_state(from, &image, step).await;
                self.report_failure(from, step, &pulled);
                (*pulled?).clone()
            }
        };

        state.stage_name = stages[idx].name.clone();
        if state.config.config.env_get("PATH").is_none() {
            state.config.config.env_set("PATH", image::DEFAULT_PATH);
        }
        // ONBUILD triggers of the base image run first, then leave the image (as in BuildKit).
        if let Some(serde_json::Value::Array(triggers)) = state.config.config.rest.remove("OnBuild")
        {
            for t in triggers.iter().filter_map(|t| t.as_str()) {
                let parsed = crate::dockerfile::parse(t).map_err(|e| {
                    self.err(
                        from,
                        format!(
                            "ONBUILD trigger {t:?} of the base image does not parse: {}",
                            e.message
                        ),
                    )
                })?;
                for trigger in &parsed.nodes {
                    if matches!(trigger.keyword.as_str(), "from" | "onbuild" | "maintainer") {
                        return Err(self.err(
                            from,
                            format!(
                                "{} is not allowed as an ONBUILD trigger",
                                trigger.keyword.to_uppercase()
                            ),
                        ));
                    }
                    let step = self.next_step();
                    let shown = format!("ONBUILD {}", display_instruction(trigger));
                    self.announce(from, step, &label, 1, n, &shown);
                    let mut located = trigger.clone();
                    located.start_line = from.start_line;
                    located.column = from.column;
                    Box::pin(self.dispatch(&located, &mut state, step, stages, built)).await?;
                }
            }
        }
        for (i, node) in nodes[1..].iter().enumerate() {
            // Whether anything after this step reads the stage's files: another stage can
            // (not the target's), and so can every instruction but the config-only ones.
            state.tree_unused_after = target
                && nodes[i + 2..].iter().all(|n| {
                    matches!(
                        n.keyword.as_str(),
                        "env"
                            | "label"
                            | "cmd"
                            | "entrypoint"
                            | "expose"
                            | "user"
                            | "stopsignal"
                            | "healthcheck"
                            | "arg"
                            | "shell"
                            | "volume"
                            | "onbuild"
                            | "maintainer"
                    )
                });
            let step = self.next_step();
            self.announce(node, step, &label, i + 2, n, &display_instruction(node));
            let started = Instant::now();
            let dispatched = self.dispatch(node, &mut state, step, stages, built).await;
            self.report_failure(node, step, &dispatched);
            if dispatched? {
                self.opts.reporter.report(Event::StepCached { step });
            } else {
                self.opts.reporter.report(Event::StepDone {
                    step,
                    elapsed_secs: started.elapsed().as_secs_f64(),
                });
            }
        }
        Ok(state)
    }

    /// The state of an image from a registry (pulled and unpacked once per build), or `scratch`.
    async fn image_state(
        &self,
        node: &Node,
        image: &str,
        step: usize,
    ) -> Result<Arc<StageState>, BuildError> {
        let mut images = self.images.lock().await;
        if let Some(s) = images.get(image) {
            return Ok(s.clone());
        }
        let state = Arc::new(self.pull_image(node, image, step).await?);
        images.insert(image.to_string(), state.clone());
        Ok(state)
    }

    async fn pull_image(
        &self,
        node: &Node,
        image: &str,
        step: usize,
    ) -> Result<StageState, BuildError> {
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
                cache_key: "scratch".into(),
                last_created: self.now_or_epoch0(),
                records: vec![],
                stage_name: None,
                warm: None,
                tree_unused_after: false,
            });
        }
        let reference: Reference =
            reference::parse(image).map_err(|e| self.err(node, e.to_string()))?;
        let reg_err = |source| BuildError::Registry {
            location: self.loc(node),
            error: Box::new(source),
        };
        let pulled = self
            .registry
            .resolve_image(&reference, &host, &self.store, self.opts.pull)
            .await
            .map_err(reg_err)?;
        self.opts.reporter.report(Event::Pulled {
            step,
            image: image.to_string(),
            digest: pulled.manifest_digest.clone(),
        });
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
                // A stored blob is unpacked without asking the registry (fetch_blob returns it).
                if self.opts.pull == PullPolicy::Never && !self.store.has_blob(&blob.digest) {
                    return Err(reg_err(RegistryError::NotStored {
                        reference: pulled.reference.whole(),
                        missing: format!("layer {} is not", blob.digest),
                    }));
                }
                let path = self
                    .registry
                    .fetch_blob(&reference, &blob, &self.store)
                    .await
                    .map_err(reg_err)?;
                if !snapshot.exists() {
                    self.unpack(Some(node), &path, &blob, diff_id, &snapshot)
                        .await?;
                }
            }
            layers.push(Layer {
                blob,
                diff_id: diff_id.clone(),
                snapshot,
                base: true,
            });
        }
        // A base image's SHELL carries over to the stages built on it.
        let shell = config
            .config
            .rest
            .get("Shell")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .filter(|s: &Vec<String>| !s.is_empty())
            .unwrap_or_else(default_shell);
        let last_created = config
            .history
            .last()
            .and_then(|h| h.created.clone())
            .or_else(|| config.created.clone())
            .unwrap_or_else(|| self.now_or_epoch0());
        Ok(StageState {
            config,
            layers,
            args: vec![],
            cmd_set: false,
            shell,
            cache_key: pulled.manifest_digest.clone(),
            last_created,
            records: vec![],
            stage_name: None,
            warm: None,
            tree_unused_after: false,
        })
    }

    fn now_or_epoch0(&self) -> String {
        super::epoch_rfc3339(self.opts.source_date_epoch.unwrap_or(0))
    }

    async fn unpack(
        &self,
        node: Option<&Node>,
        blob_path: &Path,
        blob: &BlobRef,
        diff_id: &str,
        snapshot: &Path,
    ) -> Result<(), BuildError> {
        let at = |message: String| self.err_at(node, message);
        let compression = Compression::from_media_type(&blob.media_type)
            .map_err(|e| at(format!("layer {}: {e}", blob.digest)))?;
        let tmp = self.store.temp_path("unpack");
        let blob_path = blob_path.to_path_buf();
        let snapshot = snapshot.to_path_buf();
        let opts = ApplyOptions {
            chown: self.opts.mapping.has_many_ids(),
            record_owner: !self.opts.mapping.has_many_ids(),
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
                    self.opts.reporter.report(Event::Warning {
                        location: None,
                        message: format!("layer {digest}: {w}"),
                    });
                }
                Ok(())
            }
            Err(e) => Err(at(format!("unpacking layer {digest}: {e}"))),
        }
    }

    fn expand(&self, node: &Node, state: &StageState, word: &str) -> Result<String, BuildError> {
        self.lex
            .expand(word, &|k| state.lookup(k))
            .map_err(|e| self.err(node, format!("{word:?}: {e}")))
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

    /// Applies one instruction to the stage. Returns whether its result came from the cache.
    async fn dispatch(
        &self,
        node: &Node,
        state: &mut StageState,
        step: usize,
        stages: &[StageDef<'_>],
        built: &BTreeMap<usize, Arc<StageState>>,
    ) -> Result<bool, BuildError> {
        let keyword = node.keyword.as_str();
        let supported_flags: &[&str] = match keyword {
            "copy" => &[
                "--chown",
                "--chmod",
                "--from",
                "--link",
                "--exclude",
                "--parents",
            ],
            "add" => &[
                "--chown",
                "--chmod",
                "--link",
                "--exclude",
                "--checksum",
                "--unpack",
                "--keep-git-dir",
            ],
            "run" => &["--mount", "--network", "--security"],
            "healthcheck" => &[
                "--interval",
                "--timeout",
                "--start-period",
                "--start-interval",
                "--retries",
            ],
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
        let mut outcome = StepOutcome::ConfigOnly;
        match keyword {
            "arg" => {
                for arg in &node.args {
                    let (name, mut value) = self.parse_arg(node, arg, &|k| state.lookup(k))?;
                    if value.is_none() {
                        // A global ARG (or automatic platform ARG) redeclared without a value
                        // takes the global value.
                        value = lookup_pairs(&self.global_args, &name);
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
                add_keys(&mut state.config.config.exposed_ports, &ports);
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
                add_keys(&mut state.config.config.volumes, &vols);
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
                // Docker's config field, as BuildKit writes it; later stages FROM this image
                // start with this shell.
                state
                    .config
                    .config
                    .rest
                    .insert("Shell".into(), serde_json::json!(node.args));
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
                let key = serde_json::json!({"mkdir": {"path": dir, "user": user}});
                outcome = self
                    .fs_step(
                        node,
                        state,
                        step,
                        key,
                        Action::Mkdir {
                            path: dir.clone(),
                            user,
                        },
                        vec![],
                        vec![],
                    )
                    .await?;
                created_by = format!("WORKDIR {dir}");
            }
            "run" => {
                let (spec, helper_env, key, shown, reads) =
                    self.run_spec(node, state, stages, built).await?;
                outcome = self
                    .fs_step(node, state, step, key, Action::Run(spec), helper_env, reads)
                    .await?;
                created_by = shown;
            }
            "copy" | "add" => {
                let (spec, key, reads) = self.copy_spec(node, state, stages, built).await?;
                outcome = self
                    .fs_step(node, state, step, key, Action::Copy(spec), vec![], reads)
                    .await?;
                created_by = format!(
                    "{} {} # buildkit",
                    keyword.to_uppercase(),
                    node.args.join(" ")
                );
            }
            "healthcheck" => {
                let hc = healthcheck(node).map_err(|m| self.err(node, m))?;
                created_by = format!(
                    "HEALTHCHECK {}",
                    node.original
                        .split_once(char::is_whitespace)
                        .map(|(_, r)| r.trim())
                        .unwrap_or("")
                );
                state.config.config.rest.insert("Healthcheck".into(), hc);
            }
            "onbuild" => {
                let trigger = node.args.first().cloned().ok_or_else(|| {
                    self.err(node, "ONBUILD needs an instruction: ONBUILD RUN ...")
                })?;
                let list = state
                    .config
                    .config
                    .rest
                    .entry("OnBuild")
                    .or_insert_with(|| serde_json::json!([]));
                if let Some(a) = list.as_array_mut() {
                    a.push(serde_json::Value::String(trigger.clone()));
                }
                created_by = format!("ONBUILD {trigger}");
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
        let (created, empty_layer, cached) = match outcome {
            StepOutcome::ConfigOnly => (state.last_created.clone(), true, false),
            StepOutcome::Step {
                created,
                layer,
                cached,
            } => (created, !layer, cached),
        };
        state.last_created = created.clone();
        state.config.history.push(History {
            created: Some(created),
            created_by: Some(created_by),
            comment: Some(image::HISTORY_COMMENT.into()),
            empty_layer,
            ..Default::default()
        });
        Ok(cached)
    }

    /// The state of what a `--from=` names: an earlier-built stage, or an image.
    async fn state_of_from(
        &self,
        node: &Node,
        state: &StageState,
        value: &str,
        stages: &[StageDef<'_>],
        built: &BTreeMap<usize, Arc<StageState>>,
        step: usize,
    ) -> Result<Arc<StageState>, BuildError> {
        let value = self.expand(node, state, value)?;
        let current = stages.len();
        let target = match stage_index(stages, &value, current, true) {
            Some(i) => FromRef::Stage(i),
            None => FromRef::Image(value.clone()),
        };
        match target {
            FromRef::Stage(i) => built.get(&i).cloned().ok_or_else(|| {
                self.err(
                    node,
                    format!("stage {value:?} is not built before this step"),
                )
            }),
            FromRef::Image(image) => {
                if reference::parse(&image).is_err() || !looks_like_image(&image) {
                    return Err(self.err(
                        node,
                        format!(
                            "--from={image}: no stage of that name in this Dockerfile, and it is not an image reference"
                        ),
                    ));
                }
                self.image_state(node, &image, step).await
            }
        }
    }

    async fn run_spec(
        &self,
        node: &Node,
        state: &StageState,
        stages: &[StageDef<'_>],
        built: &BTreeMap<usize, Arc<StageState>>,
    ) -> Result<
        (
            ProcessSpec,
            Vec<(String, String)>,
            serde_json::Value,
            String,
            Vec<Layer>,
        ),
        BuildError,
    > {
        let mut reads = Vec::new();
        let mut network = self.opts.network;
        let mut insecure = false;
        let mut mounts = Vec::new();
        let mut key_mounts = Vec::new();
        let mut helper_env = Vec::new();
        let step = self.steps.load(std::sync::atomic::Ordering::SeqCst);
        for f in &node.flags {
            if let Some(v) = f.strip_prefix("--network=") {
                network = match v {
                    "none" => Network::None,
                    "host" => Network::Host,
                    // Not BuildKit's: a step of its own in an otherwise host build.
                    "private" => Network::Private,
                    "default" => self.opts.network,
                    other => {
                        return Err(self.err(
                            node,
                            format!(
                                "RUN --network={other}: expected none, host, private or default"
                            ),
                        ));
                    }
                };
            } else if let Some(v) = f.strip_prefix("--security=") {
                insecure = match v {
                    "insecure" if self.opts.allow_insecure => true,
                    "insecure" => {
                        return Err(self.err(
                            node,
                            "RUN --security=insecure needs the build to allow it: add --allow security.insecure",
                        ));
                    }
                    "sandbox" => false,
                    other => {
                        return Err(self.err(
                            node,
                            format!("RUN --security={other}: expected sandbox or insecure"),
                        ));
                    }
                };
            } else if let Some(v) = f.strip_prefix("--mount=") {
                let (mount, key) = self
                    .run_mount(
                        node,
                        state,
                        v,
                        stages,
                        built,
                        step,
                        &mut helper_env,
                        &mut reads,
                    )
                    .await?;
                mounts.push(mount);
                key_mounts.push(key);
            }
        }
        let args = self.run_args(node, state)?;
        let build_args = state.build_args();
        let mut env: Vec<String> = state.config.config.env.clone().unwrap_or_default();
        for (k, v) in &build_args {
            if state.config.config.env_get(k).is_none() {
                env.push(format!("{k}={v}"));
            }
        }
        // Proxy settings reach the step as BuildKit's predefined ARGs do: in its environment,
        // never in the image or its history (and not in the cache key).
        let mut proxy_env = Vec::new();
        for name in PROXY_ARGS {
            if let Some(v) = self.opts.build_args.get(name)
                && state.config.config.env_get(name).is_none()
            {
                proxy_env.push(format!("{name}={v}"));
            }
        }
        let spec = ProcessSpec {
            args: args.clone(),
            env: env.clone(),
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
            mounts,
            network,
            insecure,
            allow_hosts: match network {
                Network::Private => self.opts.allow_hosts.clone(),
                _ => Vec::new(),
            },
        };
        if insecure && !self.opts.allow_hosts.is_empty() {
            return Err(self.err(
                node,
                "RUN --security=insecure cannot run in a build with --allow-host: an insecure step can trace and take over the allow-list proxy; remove --security=insecure from the step, or build without --allow-host",
            ));
        }
        if network == Network::Host && !self.opts.allow_hosts.is_empty() {
            return Err(self.err(
                node,
                "RUN --network=host would bypass --allow-host: remove the flag from the step, or build without --allow-host",
            ));
        }
        let key = serde_json::json!({"run": {
            "args": spec.args, "env": spec.env, "cwd": spec.cwd, "user": spec.user,
            "network": format!("{:?}", spec.network), "mounts": key_mounts, "insecure": spec.insecure,
        }});
        // A result made with more egress than this build allows must not be reused.
        let mut key = key;
        if !spec.allow_hosts.is_empty() {
            key["run"]["allow_hosts"] = spec.allow_hosts.iter().map(|a| a.to_string()).collect();
        }
        let mut spec = spec;
        spec.env.extend(proxy_env);
        if let Some((_, sock)) = helper_env
            .iter()
            .find(|(k, _)| k.starts_with("SHMOCKER_SSH_"))
        {
            spec.env.push(format!("SSH_AUTH_SOCK={sock}"));
        }
        self.write_network_files()?;
        let prefix = if build_args.is_empty() {
            String::new()
        } else {
            let kv: Vec<String> = build_args.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("|{} {} ", kv.len(), kv.join(" "))
        };
        let shown = format!("RUN {prefix}{} # buildkit", args.join(" "));
        Ok((spec, helper_env, key, shown, reads))
    }

    /// The command of a RUN: exec form as is; shell form through the stage's SHELL, with
    /// heredocs handed to the shell as BuildKit does.
    fn run_args(&self, node: &Node, state: &StageState) -> Result<Vec<String>, BuildError> {
        if node.json {
            return Ok(node.args.clone());
        }
        let line = node.args.join(" ");
        let mut script = line.clone();
        if !node.heredocs.is_empty() {
            let only_heredoc = node.heredocs.len() == 1
                && line.trim_start().starts_with("<<")
                && !line.contains(' ');
            if only_heredoc {
                // The shell expands variables in the script itself, as with any RUN.
                let content = heredoc_body(&node.heredocs[0]);
                if content.starts_with("#!") {
                    return Err(self.err(
                        node,
                        "RUN heredocs with a #! interpreter line are not supported by this version of shmocker; call the interpreter explicitly (RUN python3 <<EOF)",
                    ));
                }
                script = content;
            } else {
                // The shell reads the heredocs itself: give it the command and the bodies.
                for doc in &node.heredocs {
                    script.push('\n');
                    script.push_str(&doc.content);
                    if !doc.content.ends_with('\n') && !doc.content.is_empty() {
                        script.push('\n');
                    }
                    script.push_str(&doc.name);
                }
            }
        }
        let mut a = state.shell.clone();
        a.push(script);
        Ok(a)
    }

    fn heredoc_content(
        &self,
        node: &Node,
        state: &StageState,
        doc: &crate::dockerfile::Heredoc,
    ) -> Result<String, BuildError> {
        let content = heredoc_body(doc);
        if doc.expand {
            // Expand variables, keeping quotes and backslashes as written.
            let mut lex = crate::dockerfile::shell::Lex::new('\\');
            lex.raw_quotes = true;
            lex.raw_escapes = true;
            lex.expand(&content, &|k| state.lookup(k))
                .map_err(|e| self.err(node, format!("heredoc {}: {e}", doc.name)))
        } else {
            Ok(content)
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_mount(
        &self,
        node: &Node,
        state: &StageState,
        spec: &str,
        stages: &[StageDef<'_>],
        built: &BTreeMap<usize, Arc<StageState>>,
        step: usize,
        helper_env: &mut Vec<(String, String)>,
        reads: &mut Vec<Layer>,
    ) -> Result<(RunMount, serde_json::Value), BuildError> {
        let spec = self.expand(node, state, spec)?;
        let kv = parse_kv(&spec);
        let kind = kv.get("type").map(String::as_str).unwrap_or("bind");
        let target = kv
            .get("target")
            .or_else(|| kv.get("dst"))
            .or_else(|| kv.get("destination"))
            .cloned();
        let workdir = state.config.config.working_dir.clone();
        let abs = |t: &str| absolute_in(workdir.as_deref(), t);
        let bad = |m: &str| self.err(node, format!("--mount={spec}: {m}"));
        let num = |k: &str, default: u32, radix: u32| -> Result<u32, BuildError> {
            match kv.get(k) {
                Some(v) => u32::from_str_radix(v, radix)
                    .map_err(|_| bad(&format!("{k}={v} is not a number"))),
                None => Ok(default),
            }
        };
        let readonly = kv
            .get("readonly")
            .or_else(|| kv.get("ro"))
            .map(|v| v == "true")
            .unwrap_or(false);
        match kind {
            "cache" => {
                let target = abs(&target.ok_or_else(|| bad("type=cache needs target=PATH"))?);
                let id = kv.get("id").cloned().unwrap_or_else(|| target.clone());
                let (uid, gid, mode) = (
                    num("uid", 0, 10)?,
                    num("gid", 0, 10)?,
                    num("mode", 0o755, 8)?,
                );
                let sharing = kv.get("sharing").map(String::as_str).unwrap_or("shared");
                if !matches!(sharing, "shared" | "private" | "locked") {
                    return Err(bad("sharing must be shared, private or locked"));
                }
                let dir = self
                    .cache_mount_dir(&id, uid, gid, mode)
                    .map_err(|e| bad(&e))?;
                Ok((
                    RunMount {
                        target: target.clone(),
                        kind: MountKind::Bind { source: dir },
                        readonly,
                    },
                    // The contents of a cache mount never decide a step's key, as in BuildKit.
                    serde_json::json!({"cache": id, "target": target}),
                ))
            }
            "secret" => {
                let id = kv
                    .get("id")
                    .cloned()
                    .or_else(|| {
                        target
                            .as_ref()
                            .and_then(|t| Path::new(t).file_name())
                            .map(|n| n.to_string_lossy().into_owned())
                    })
                    .ok_or_else(|| bad("type=secret needs id=ID"))?;
                let target = abs(&target.unwrap_or_else(|| format!("/run/secrets/{id}")));
                let required = kv.get("required").is_some_and(|v| v == "true");
                let Some(secret) = self.opts.secrets.iter().find(|s| s.id == id) else {
                    if required {
                        return Err(self.err(
                            node,
                            format!("secret {id:?} is required but was not given; pass it with --secret id={id},src=FILE or --secret id={id},env=VAR"),
                        ));
                    }
                    // BuildKit skips an optional secret that was not given.
                    return Ok(absent_mount("secret-absent", &id, target));
                };
                let source = match &secret.source {
                    SecretSource::Env(var) => {
                        let value = std::env::var(var).map_err(|_| {
                            self.err(
                                node,
                                format!("secret {id:?}: the environment variable {var} is not set"),
                            )
                        })?;
                        let helper_var = format!("SHMOCKER_SECRET_{}", helper_env.len());
                        helper_env.push((helper_var.clone(), value));
                        SecretSource::Env(helper_var)
                    }
                    SecretSource::File(p) => {
                        if !p.is_file() {
                            return Err(self.err(
                                node,
                                format!("secret {id:?}: {} is not a readable file", p.display()),
                            ));
                        }
                        SecretSource::File(p.clone())
                    }
                };
                let (uid, gid, mode) = (
                    num("uid", 0, 10)?,
                    num("gid", 0, 10)?,
                    num("mode", 0o400, 8)?,
                );
                Ok((
                    RunMount {
                        target: target.clone(),
                        kind: MountKind::Secret {
                            source,
                            uid,
                            gid,
                            mode,
                        },
                        readonly: true,
                    },
                    // The id and place, never the value.
                    serde_json::json!({"secret": id, "target": target}),
                ))
            }
            "tmpfs" => {
                let target = abs(&target.ok_or_else(|| bad("type=tmpfs needs target=PATH"))?);
                let size = match kv.get("size") {
                    Some(s) => Some(
                        parse_size(s)
                            .ok_or_else(|| bad("size must be bytes or a number with k, m or g"))?,
                    ),
                    None => None,
                };
                Ok((
                    RunMount {
                        target: target.clone(),
                        kind: MountKind::Tmpfs { size },
                        readonly: false,
                    },
                    serde_json::json!({"tmpfs": target}),
                ))
            }
            "bind" => {
                let target = abs(&target.ok_or_else(|| bad("type=bind needs target=PATH"))?);
                let source = kv
                    .get("source")
                    .or_else(|| kv.get("src"))
                    .cloned()
                    .unwrap_or_default();
                let rw = kv
                    .get("rw")
                    .or_else(|| kv.get("readwrite"))
                    .is_some_and(|v| v == "true");
                match kv.get("from") {
                    Some(from) => {
                        let other = self
                            .state_of_from(node, state, from, stages, built, step)
                            .await?;
                        reads.extend(other.layers.iter().cloned());
                        let lower: Vec<PathBuf> = other
                            .layers
                            .iter()
                            .rev()
                            .map(|l| l.snapshot.clone())
                            .collect();
                        Ok((
                            RunMount {
                                target: target.clone(),
                                kind: MountKind::Layers {
                                    lower,
                                    subpath: source.clone(),
                                },
                                readonly: !rw,
                            },
                            serde_json::json!({"bind-from": other.cache_key, "source": source, "target": target, "rw": rw}),
                        ))
                    }
                    None => {
                        let rel = super::context::clean_relative(&source)
                            .ok_or_else(|| bad("source is outside the build context"))?;
                        let path = self.context.root().join(&rel);
                        if fs::symlink_metadata(&path).is_err() {
                            return Err(bad(&format!(
                                "source {source:?} is not in the build context"
                            )));
                        }
                        let mut items = Vec::new();
                        self.context
                            .items(&rel, &mut items)
                            .map_err(|e| self.err(node, e.to_string()))?;
                        let hash =
                            cache::hash_copy_items(&items, &self.file_hashes).map_err(|e| {
                                self.err(node, format!("hashing the mount source: {e}"))
                            })?;
                        Ok((
                            RunMount {
                                target: target.clone(),
                                kind: MountKind::Bind { source: path },
                                // Writes to a context bind are discarded by BuildKit; a read-only
                                // mount says so instead of losing them silently.
                                readonly: true,
                            },
                            serde_json::json!({"bind-context": hash, "target": target}),
                        ))
                    }
                }
            }
            "ssh" => {
                let id = kv.get("id").cloned().unwrap_or_else(|| "default".into());
                let n = helper_env
                    .iter()
                    .filter(|(k, _)| k.starts_with("SHMOCKER_SSH_"))
                    .count();
                let target = abs(&target.unwrap_or_else(|| format!("/run/buildkit/ssh_agent.{n}")));
                let required = kv.get("required").is_some_and(|v| v == "true");
                let Some((_, socket)) = self.opts.ssh.iter().find(|(i, _)| *i == id) else {
                    if required {
                        return Err(self.err(
                            node,
                            format!("ssh agent {id:?} is required but was not given; pass --ssh {id} (uses $SSH_AUTH_SOCK) or --ssh {id}=/path/to/agent.sock"),
                        ));
                    }
                    return Ok(absent_mount("ssh-absent", &id, target));
                };
                // The step finds the agent where BuildKit puts it, through SSH_AUTH_SOCK.
                helper_env.push((format!("SHMOCKER_SSH_{n}"), target.clone()));
                Ok((
                    RunMount {
                        target: target.clone(),
                        kind: MountKind::Bind {
                            source: socket.clone(),
                        },
                        readonly: false,
                    },
                    serde_json::json!({"ssh": id, "target": target}),
                ))
            }

            other => Err(bad(&format!(
                "unknown mount type {other:?}; use cache, secret, tmpfs or bind"
            ))),
        }
    }

    /// Downloads an ADD URL into the build's scratch dir (streamed), checks `--checksum`, and
    /// returns the file (named after the URL's last path segment, mode 0600 as Docker does) and
    /// its sha256.
    async fn download(
        &self,
        node: &Node,
        url: &str,
        checksum: Option<&str>,
    ) -> Result<(PathBuf, String), BuildError> {
        use futures_util::StreamExt;
        use sha2::Digest as _;
        use std::io::Write;
        let fail = |m: String| self.err(node, format!("ADD {url}: {m}"));
        let resp = reqwest::get(url)
            .await
            .map_err(|e| fail(format!("{e}; check the URL and the network")))?;
        if !resp.status().is_success() {
            return Err(fail(format!("the server answered {}", resp.status())));
        }
        let name = url
            .split(['?', '#'])
            .next()
            .and_then(|u| u.rsplit('/').next())
            .filter(|n| !n.is_empty() && !n.contains(':'))
            .unwrap_or("download")
            .to_string();
        let dir = self.scratch.join(format!(
            "add-{}",
            hex::encode(sha2::Sha256::digest(url.as_bytes()))
        ));
        fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
        let path = dir.join(&name);
        let mut file = fs::File::create(&path).map_err(|e| fail(e.to_string()))?;
        let mut hasher = sha2::Sha256::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fail(format!("download interrupted: {e}")))?;
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(|e| fail(e.to_string()))?;
        }
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        if let Some(expected) = checksum
            && expected != digest
        {
            return Err(fail(format!(
                "checksum mismatch: --checksum={expected} but the download is {digest}"
            )));
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
            .map_err(|e| fail(e.to_string()))?;
        Ok((path, digest))
    }

    /// Fetches the layer of an imported cache record from where `--cache-from` found it.
    async fn fetch_cached_layer(&self, l: &CachedLayer) -> bool {
        let blob = BlobRef {
            digest: l.digest.clone(),
            size: l.size,
            media_type: l.media_type.clone(),
        };
        for source in &self.layer_sources {
            match super::remote_cache::fetch_layer(source, &blob, &self.store, &self.registry).await
            {
                Ok(()) => return true,
                Err(e) => self.opts.reporter.report(Event::Warning {
                    location: None,
                    message: format!(
                        "cache layer {} could not be fetched ({e}); the step runs instead",
                        l.digest
                    ),
                }),
            }
        }
        false
    }

    /// ADD from git: a shallow clone of `source` (`URL[#REF[:SUBDIR]]`, as BuildKit takes it)
    /// into the build's scratch dir with the host's `git`. Returns the directory to copy (the
    /// subdirectory, if one is named) and the commit checked out.
    async fn git_checkout(
        &self,
        node: &Node,
        source: &str,
        keep_git_dir: bool,
    ) -> Result<(PathBuf, String), BuildError> {
        use sha2::Digest as _;
        let fail = |m: String| self.err(node, format!("ADD {source}: {m}"));
        let (url, fragment) = match source.split_once('#') {
            Some((u, f)) => (u.to_string(), f.to_string()),
            None => (source.to_string(), String::new()),
        };
        let (reference, subdir) = match fragment.split_once(':') {
            Some((r, d)) => (r.to_string(), d.to_string()),
            None => (fragment, String::new()),
        };
        let dir = self.scratch.join(format!(
            "git-{}",
            hex::encode(sha2::Sha256::digest(source.as_bytes()))
        ));
        let _ = fs::remove_dir_all(&dir);
        let git = |args: Vec<String>, cwd: Option<PathBuf>| async move {
            let mut cmd = tokio::process::Command::new("git");
            cmd.args(&args).env("GIT_TERMINAL_PROMPT", "0");
            if let Some(c) = cwd {
                cmd.current_dir(c);
            }
            // git dies with the build. It is spawned on a runtime worker thread, which lasts
            // as long as the build.
            crate::sandbox::die_with_spawner(cmd.as_std_mut());
            cmd.output().await
        };
        let dir_s = dir.display().to_string();
        let mut clone = vec![
            "clone".to_string(),
            "--quiet".into(),
            "--depth".into(),
            "1".into(),
        ];
        if !reference.is_empty() {
            clone.push("--branch".into());
            clone.push(reference.clone());
        }
        clone.push(url.clone());
        clone.push(dir_s.clone());
        let out = git(clone, None)
            .await
            .map_err(|e| fail(format!("running git: {e}; install git on the runner")))?;
        if !out.status.success() {
            // A commit id is not a branch or tag: fetch everything and check it out.
            let _ = fs::remove_dir_all(&dir);
            let full = git(
                vec!["clone".into(), "--quiet".into(), url.clone(), dir_s.clone()],
                None,
            )
            .await
            .map_err(|e| fail(e.to_string()))?;
            let checked_out = full.status.success()
                && (reference.is_empty()
                    || git(
                        vec!["checkout".into(), "--quiet".into(), reference.clone()],
                        Some(dir.clone()),
                    )
                    .await
                    .map(|o| o.status.success())
                    .unwrap_or(false));
            if !checked_out {
                return Err(fail(format!(
                    "git could not clone it{}: {}",
                    if reference.is_empty() {
                        String::new()
                    } else {
                        format!(" at {reference}")
                    },
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        let head = git(vec!["rev-parse".into(), "HEAD".into()], Some(dir.clone()))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let commit = String::from_utf8_lossy(&head.stdout).trim().to_string();
        if !keep_git_dir {
            let _ = fs::remove_dir_all(dir.join(".git"));
        }
        let root = if subdir.is_empty() {
            dir
        } else {
            let rel = super::context::clean_relative(&subdir)
                .ok_or_else(|| fail(format!("subdirectory {subdir:?} leaves the repository")))?;
            let d = dir.join(rel);
            if !d.is_dir() {
                return Err(fail(format!(
                    "{subdir:?} is not a directory of the repository"
                )));
            }
            d
        };
        Ok((root, commit))
    }

    /// The directory of a cache mount, kept in the store between builds.
    fn cache_mount_dir(&self, id: &str, uid: u32, gid: u32, mode: u32) -> Result<PathBuf, String> {
        use sha2::Digest as _;
        let name = hex::encode(sha2::Sha256::digest(id.as_bytes()));
        let dir = self.store.root().join("cache-mounts").join(&name[..32]);
        if !dir.exists() {
            let tmp = self.store.temp_path("cache-mount");
            fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
            std::os::unix::fs::chown(&tmp, Some(uid), Some(gid)).map_err(|e| {
                format!("chown of the cache directory to {uid}:{gid}: {e} (is that ID mapped?)")
            })?;
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
                .map_err(|e| e.to_string())?;
            fs::create_dir_all(dir.parent().expect("has a parent")).map_err(|e| e.to_string())?;
            if fs::rename(&tmp, &dir).is_err() {
                let _ = fs::remove_dir(&tmp);
            }
        }
        Ok(dir)
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

    async fn copy_spec(
        &self,
        node: &Node,
        state: &StageState,
        stages: &[StageDef<'_>],
        built: &BTreeMap<usize, Arc<StageState>>,
    ) -> Result<(CopySpec, serde_json::Value, Vec<Layer>), BuildError> {
        let mut chown = None;
        let mut chmod = None;
        let mut from = None;
        let mut excludes: Vec<String> = Vec::new();
        let mut parents = false;
        let mut link = false;
        let is_add = node.keyword == "add";
        let mut checksum: Option<String> = None;
        let mut unpack: Option<bool> = None;
        let mut keep_git_dir = false;
        let mut archives: Vec<PathBuf> = Vec::new();
        let mut extra_key: Vec<String> = Vec::new();
        for f in &node.flags {
            if let Some(v) = f.strip_prefix("--chown=") {
                chown = Some(self.expand(node, state, v)?);
            } else if let Some(v) = f.strip_prefix("--chmod=") {
                let v = self.expand(node, state, v)?;
                crate::sandbox::rootfs::chmod_mode(&v, 0o644, false)
                    .map_err(|e| self.err(node, e.to_string()))?;
                chmod = Some(v);
            } else if let Some(v) = f.strip_prefix("--from=") {
                from = Some(v.to_string());
            } else if let Some(v) = f.strip_prefix("--exclude=") {
                excludes.push(self.expand(node, state, v)?);
            } else if f == "--parents" || f == "--parents=true" {
                parents = true;
            } else if f == "--link" || f == "--link=true" {
                link = true;
            } else if let Some(v) = f.strip_prefix("--checksum=") {
                checksum = Some(self.expand(node, state, v)?);
            } else if f == "--unpack" || f == "--unpack=true" {
                unpack = Some(true);
            } else if f == "--unpack=false" {
                unpack = Some(false);
            } else if f == "--keep-git-dir" || f == "--keep-git-dir=true" {
                keep_git_dir = true;
            }
        }
        let words: Vec<String> = node
            .args
            .iter()
            .map(|a| self.expand(node, state, a))
            .collect::<Result<_, _>>()?;
        let Some((dest, sources)) = words.split_last() else {
            return Err(self.err(
                node,
                "COPY requires at least two arguments: COPY <src>... <dest>",
            ));
        };
        let dest_abs = absolute_in(state.config.config.working_dir.as_deref(), dest);
        let dest_dir_syntax = dest.ends_with('/') || dest == ".";
        let flags_key = serde_json::json!({"dest": dest_abs, "dest_dir": dest_dir_syntax, "chown": chown, "chmod": chmod, "exclude": excludes, "parents": parents, "link": link});
        let exclude = if excludes.is_empty() {
            None
        } else {
            Some(
                crate::dockerfile::dockerignore::Dockerignore::parse(&excludes.join("\n"))
                    .map_err(|e| self.err(node, format!("--exclude: {e}")))?,
            )
        };
        if from.is_some() && (exclude.is_some() || parents) {
            return Err(self.err(
                node,
                "COPY --from with --exclude or --parents is not supported by this version of shmocker",
            ));
        }

        if let Some(from) = from {
            if !node.heredocs.is_empty() {
                return Err(self.err(node, "COPY --from cannot be combined with a heredoc"));
            }
            let step = self.steps.load(std::sync::atomic::Ordering::SeqCst);
            let other = self
                .state_of_from(node, state, &from, stages, built, step)
                .await?;
            let lower: Vec<PathBuf> = other
                .layers
                .iter()
                .rev()
                .map(|l| l.snapshot.clone())
                .collect();
            let key = serde_json::json!({"copy-from": other.cache_key, "sources": sources, "flags": flags_key});
            return Ok((
                CopySpec {
                    items: vec![],
                    dest: dest_abs,
                    dest_is_dir: dest_dir_syntax,
                    chown,
                    chmod,
                    from: Some(CopyFrom {
                        lower,
                        sources: sources.to_vec(),
                        name: from.clone(),
                    }),
                    link,
                    archives: vec![],
                },
                key,
                other.layers.clone(),
            ));
        }

        let mut items = Vec::new();
        let mut matched = 0usize;
        let mut any_dir = false;
        if !node.heredocs.is_empty() {
            // `COPY <<EOF /dest`: each heredoc becomes a file named after its delimiter.
            let dir = self.scratch.join(format!("heredoc-{}", node.start_line));
            fs::create_dir_all(&dir).map_err(|e| internal("heredoc dir")(e.to_string()))?;
            for doc in &node.heredocs {
                let content = self.heredoc_content(node, state, doc)?;
                let file = dir.join(&doc.name);
                fs::write(&file, content).map_err(|e| internal("heredoc file")(e.to_string()))?;
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&file, fs::Permissions::from_mode(0o644))
                    .map_err(|e| internal("heredoc file")(e.to_string()))?;
                items.push(CopyItem {
                    src: file,
                    rel: PathBuf::from(&doc.name),
                });
                matched += 1;
            }
        } else {
            if sources.is_empty() {
                return Err(self.err(
                    node,
                    "COPY requires at least two arguments: COPY <src>... <dest>",
                ));
            }
            if checksum.is_some() && !sources.iter().all(|s| is_url(s) || is_git_source(s)) {
                return Err(self.err(node, "ADD --checksum applies to URL sources only"));
            }
            for s in sources {
                if is_add && is_git_source(s) {
                    let (dir, commit) = self.git_checkout(node, s, keep_git_dir).await?;
                    if let Some(expected) = &checksum
                        && !commit.starts_with(expected.as_str())
                    {
                        return Err(self.err(
                            node,
                            format!("ADD {s}: checksum mismatch: --checksum={expected} but the checked-out commit is {commit}"),
                        ));
                    }
                    matched += 1;
                    any_dir = true;
                    extra_key.push(format!("{s}@{commit}"));
                    let ctx = super::context::Context::new(dir, None);
                    ctx.items("", &mut items)
                        .map_err(|e| self.err(node, e.to_string()))?;
                    continue;
                }
                if is_add && is_url(s) {
                    let (file, hash) = self.download(node, s, checksum.as_deref()).await?;
                    matched += 1;
                    extra_key.push(format!("{s}@{hash}"));
                    if unpack == Some(true)
                        && matches!(layer::archive_kind(&file), Ok(layer::ArchiveKind::Tar(_)))
                    {
                        archives.push(file);
                        any_dir = true;
                    } else {
                        let name = PathBuf::from(file.file_name().unwrap_or_default());
                        items.push(CopyItem {
                            src: file,
                            rel: name,
                        });
                    }
                    continue;
                }
                for rel in self
                    .context
                    .matches(s)
                    .map_err(|e| self.err(node, e.to_string()))?
                {
                    if is_add && unpack != Some(false) {
                        let path = self.context.root().join(&rel);
                        if path.is_file()
                            && let Ok(layer::ArchiveKind::Tar(_)) = layer::archive_kind(&path)
                        {
                            matched += 1;
                            any_dir = true;
                            extra_key.push(
                                cache::hash_copy_items(
                                    &[CopyItem {
                                        src: path.clone(),
                                        rel: PathBuf::from(&rel),
                                    }],
                                    &self.file_hashes,
                                )
                                .map_err(|e| self.err(node, e.to_string()))?,
                            );
                            archives.push(path);
                            continue;
                        }
                    }
                    matched += 1;
                    let before = items.len();
                    self.context
                        .items(&rel, &mut items)
                        .map_err(|e| self.err(node, e.to_string()))?;
                    if let Some(ex) = &exclude {
                        // --exclude patterns apply to paths below the source and to its own.
                        let mut kept = items.split_off(before);
                        kept.retain(|i| {
                            let under = Path::new(&rel).join(&i.rel);
                            !ex.is_excluded(&i.rel.to_string_lossy())
                                && !ex.is_excluded(&under.to_string_lossy())
                        });
                        items.extend(kept);
                        if items.len() == before {
                            continue;
                        }
                    }
                    if parents {
                        // --parents keeps the source's path under the destination.
                        let prefix = Path::new(&rel).to_path_buf();
                        let top_is_dir = items[before].rel.as_os_str().is_empty();
                        for item in &mut items[before..] {
                            item.rel = if top_is_dir {
                                prefix.join(&item.rel)
                            } else {
                                prefix.clone()
                            };
                        }
                        any_dir = true;
                    } else {
                        any_dir |= items[before].rel.as_os_str().is_empty();
                    }
                }
            }
        }
        let dest_is_dir = dest_dir_syntax || any_dir;
        if matched > 1 && !dest_is_dir {
            return Err(self.err(
                node,
                format!(
                    "when using COPY with more than one source file, the destination must be a directory and end with a /: {dest}"
                ),
            ));
        }
        let hash_items = items.clone();
        let hashes = self.file_hashes.clone();
        let hash =
            tokio::task::spawn_blocking(move || cache::hash_copy_items(&hash_items, &hashes))
                .await
                .map_err(|e| internal("hash task")(e.to_string()))?
                .map_err(|e| self.err(node, format!("reading the COPY sources: {e}")))?;
        let key = serde_json::json!({"copy": hash, "flags": flags_key, "dest_is_dir": dest_is_dir, "add": extra_key});
        Ok((
            CopySpec {
                items,
                dest: dest_abs,
                dest_is_dir,
                chown,
                chmod,
                from: None,
                link,
                archives,
            },
            key,
            vec![],
        ))
    }

    /// Runs a filesystem step on an overlay of the stage's layers, or takes its result from the
    /// cache.
    #[allow(clippy::too_many_arguments)]
    async fn fs_step(
        &self,
        node: &Node,
        state: &mut StageState,
        step: usize,
        key_material: serde_json::Value,
        action: Action,
        helper_env: Vec<(String, String)>,
        reads: Vec<Layer>,
    ) -> Result<StepOutcome, BuildError> {
        let key = cache::step_key(&state.cache_key, &key_material);
        let filtered = state.stage_name.as_ref().is_some_and(|n| {
            self.opts
                .no_cache_filter
                .iter()
                .any(|f| f.eq_ignore_ascii_case(n))
        });
        if !self.opts.no_cache
            && !filtered
            && let Some(record) = self.cache.get(&key)
            && let Some(outcome) = self.use_cached(node, state, &key, &record).await?
        {
            return Ok(outcome);
        }
        // COPY --link makes its layer on its own, independent of the layers below.
        let linked = matches!(&action, Action::Copy(c) if c.link);
        if !linked {
            self.ensure_trees(Some(node), &state.layers).await?;
        }
        // Other stages' files the step reads (COPY --from, RUN --mount=from=).
        self.ensure_trees(Some(node), &reads).await?;
        if let Action::Copy(copy) = &action
            && let Some(outcome) = self.direct_copy(node, state, &key, copy, linked).await?
        {
            return Ok(outcome);
        }
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
        // The copy snapshotter starts from the last step's tree when it can: in the user
        // namespace only, where every process of a step dies with its pid namespace (chrooted
        // or in-place steps can leave a daemon writing on into the tree).
        let reuses = self.opts.snapshotter == crate::sandbox::Snapshotter::Copy
            && self.in_place.is_none()
            && !self.opts.chroot
            && !linked;
        let (reuse, stale) = if reuses {
            state.take_warm()
        } else {
            (None, state.warm.take().map(|w| w.path))
        };
        if let Some(stale) = stale {
            discard_tree(stale);
        }
        let spec = StepSpec {
            reuse,
            lower: if linked {
                vec![]
            } else {
                state
                    .layers
                    .iter()
                    .rev()
                    .map(|l| l.snapshot.clone())
                    .collect()
            },
            upper: upper.clone(),
            work,
            merged,
            empty_dir: self.snapshots.empty_dir(),
            scratch,
            snapshotter: self.opts.snapshotter,
            chroot: self.opts.chroot,
            in_place: self.in_place.as_ref().map(|(keep, _)| keep.clone()),
            ignore_chown_errors: self.opts.ignore_chown_errors,
            action,
        };
        // In place, `/` is every step's rootfs: one step at a time.
        let _turn = match &self.in_place {
            Some((_, lock)) => Some(lock.lock().await),
            None => None,
        };
        let started = Instant::now();
        let reporter = self.opts.reporter.clone();
        let result = tokio::task::spawn_blocking(move || {
            sandbox::run_step(&spec, &helper_env, |line| {
                reporter.report(Event::StepOutput {
                    step,
                    elapsed_secs: started.elapsed().as_secs_f64(),
                    line: line.to_string(),
                });
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
            StepStatus::Failed(msg) | StepStatus::Unavailable(msg) => Some(msg.clone()),
        };
        if let Some(message) = failure {
            cleanup(&dir);
            return Err(BuildError::StepFailed {
                location: self.loc(node),
                instruction: display_instruction(node),
                message,
                tail: result.tail,
                sandbox: matches!(result.status, StepStatus::Unavailable(_)),
            });
        }
        let store = self.store.clone();
        let snapshots = self.snapshots.clone();
        let diff_opts = self.diff_options();
        let made = tokio::task::spawn_blocking(move || -> Result<Option<(Layer, bool)>, String> {
            if layer::is_empty_upper(&upper).map_err(|e| e.to_string())? {
                return Ok(None);
            }
            let blob =
                layer::diff_upper_to_blob(&upper, &store, &diff_opts).map_err(|e| e.to_string())?;
            let snapshot = snapshots
                .layer_dir(&blob.diff_id)
                .map_err(|e| e.to_string())?;
            // Whether the snapshot is this step's own files (else one made before, with the
            // same diff ID but maybe other sub-second times, is used).
            let ours = !snapshot.exists() && fs::rename(&upper, &snapshot).is_ok();
            if !ours && !snapshot.exists() {
                return Err(format!("committing the layer to {}", snapshot.display()));
            }
            Ok(Some((Layer::made(blob, snapshot), ours)))
        })
        .await
        .map_err(|e| internal("diff task")(e.to_string()))?;
        // The step's tree is what the layers plus this step's changes make, the next step's
        // rootfs: unless the layer is a snapshot made before, or the diff left something of the
        // tree out of the layer (the helper then leaves a mark).
        let warm = self.scratch.join(format!("warm-{step}"));
        let kept = reuses
            && matches!(&made, Ok(None) | Ok(Some((_, true))))
            && !dir
                .join("scratch")
                .join(crate::sandbox::TREE_DIFFERS)
                .exists()
            && fs::rename(dir.join("merged"), &warm).is_ok();
        cleanup(&dir);
        let made = made.map(|m| m.map(|(layer, _)| layer));
        self.commit_step(node, state, key, made, kept.then_some(warm))
    }

    /// Records a step's outcome (its layer, if it made one) in the build cache and the stage.
    /// `warm`: the step's tree, kept for the next step (copy snapshotter).
    fn commit_step(
        &self,
        node: &Node,
        state: &mut StageState,
        key: String,
        made: Result<Option<Layer>, String>,
        warm: Option<PathBuf>,
    ) -> Result<StepOutcome, BuildError> {
        let made = made.map_err(|e| self.err(node, format!("making the layer: {e}")))?;
        let created = self.now();
        let record = Record {
            created: created.clone(),
            layer: made.as_ref().map(|l| CachedLayer {
                digest: l.blob.digest.clone(),
                size: l.blob.size,
                media_type: l.blob.media_type.clone(),
                diff_id: l.diff_id.clone(),
            }),
        };
        if let Err(e) = self.cache.put(&key, &record) {
            self.opts.reporter.report(Event::Warning {
                location: None,
                message: format!(
                    "could not write the build cache: {e}; the build goes on without it"
                ),
            });
        }
        state.records.push((key.clone(), record));
        state.cache_key = key;
        let has_layer = made.is_some();
        if let Some(layer) = made {
            state.config.rootfs.diff_ids.push(layer.diff_id.clone());
            state.layers.push(layer);
        }
        if let Some(path) = warm {
            state.warm = Some(WarmTree {
                path,
                layers: state.layers.iter().map(|l| l.snapshot.clone()).collect(),
            });
        }
        Ok(StepOutcome::Step {
            created,
            layer: has_layer,
            cached: false,
        })
    }

    /// An error at `node`'s line, or one of the build's input without it.
    fn err_at(&self, node: Option<&Node>, message: String) -> BuildError {
        match node {
            Some(node) => self.err(node, message),
            None => BuildError::Input(message),
        }
    }

    fn diff_options(&self) -> DiffOptions {
        DiffOptions {
            source_date_epoch: self.opts.source_date_epoch,
            compression: self.opts.compression,
            threads: None,
            recorded_owners: !self.opts.mapping.has_many_ids(),
        }
    }

    /// Unpacks the snapshot of every layer in `layers` that has none yet: a cached step's
    /// layer, or a COPY's made without its files (see [`Self::direct_copy`]), once a step
    /// needs its files after all.
    /// `node`: the instruction whose step needs them, for messages (none for an export).
    pub(super) async fn ensure_trees(
        &self,
        node: Option<&Node>,
        layers: &[Layer],
    ) -> Result<(), BuildError> {
        for l in layers.iter().filter(|l| !l.snapshot.exists()) {
            if !self.store.has_blob(&l.blob.digest) {
                let message = format!(
                    "layer {} is neither unpacked nor stored in {}; build again with --no-cache",
                    l.blob.digest,
                    self.store.root().display()
                );
                return Err(self.err_at(node, message));
            }
            let path = self
                .store
                .blob_path(&l.blob.digest)
                .map_err(|e| self.err_at(node, e.to_string()))?;
            self.unpack(node, &path, &l.blob, &l.diff_id, &l.snapshot)
                .await?;
        }
        Ok(())
    }

    /// A COPY from the build context as the last step of the target stage that touches its
    /// files (only config instructions follow): its layer is written straight from the
    /// context, without copying the files into a snapshot first, since nothing reads them.
    /// The snapshot is unpacked from the layer later if a build does need it
    /// ([`Self::ensure_trees`]). `None` when the COPY is not of the simple kind
    /// [`direct_copy::plan`] takes: it then runs in the sandbox as usual.
    /// `SHMOCKER_DIRECT_COPY=0` turns this off.
    async fn direct_copy(
        &self,
        node: &Node,
        state: &mut StageState,
        key: &str,
        copy: &CopySpec,
        linked: bool,
    ) -> Result<Option<StepOutcome>, BuildError> {
        // An export of the filesystem reads the files at once: the sandbox's copy is as cheap.
        let exports_files = self
            .opts
            .exports
            .iter()
            .any(|e| matches!(e, super::Export::Local(_)));
        if !state.tree_unused_after
            || exports_files
            || self.opts.chroot
            || self.in_place.is_some()
            || std::env::var_os("SHMOCKER_DIRECT_COPY").is_some_and(|v| v == "0")
        {
            return Ok(None);
        }
        let lowers: Vec<PathBuf> = if linked {
            vec![]
        } else {
            state.layers.iter().map(|l| l.snapshot.clone()).collect()
        };
        let copy = copy.clone();
        let recorded_owners = !self.opts.mapping.has_many_ids();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let Some(mut entries) = tokio::task::spawn_blocking(move || {
            super::direct_copy::plan(&copy, &lowers, now, recorded_owners)
        })
        .await
        .map_err(|e| internal("copy task")(e.to_string()))?
        else {
            return Ok(None);
        };
        if let Some(stale) = state.warm.take() {
            discard_tree(stale.path);
        }
        let store = self.store.clone();
        let snapshots = self.snapshots.clone();
        let diff_opts = self.diff_options();
        let made = tokio::task::spawn_blocking(move || -> Result<Option<Layer>, String> {
            let blob = layer::entries_to_blob(&mut entries, &store, &diff_opts)
                .map_err(|e| e.to_string())?;
            let snapshot = snapshots
                .layer_dir(&blob.diff_id)
                .map_err(|e| e.to_string())?;
            Ok(Some(Layer::made(blob, snapshot)))
        })
        .await
        .map_err(|e| internal("copy task")(e.to_string()))?;
        self.commit_step(node, state, key.to_string(), made, None)
            .map(Some)
    }

    /// Applies a cache record, if what it names is still in the store (re-unpacking a snapshot
    /// that was removed). `None` when the record cannot be used: the step then runs.
    async fn use_cached(
        &self,
        node: &Node,
        state: &mut StageState,
        key: &str,
        record: &Record,
    ) -> Result<Option<StepOutcome>, BuildError> {
        if let Some(l) = &record.layer {
            if !self.store.has_blob(&l.digest) && !self.fetch_cached_layer(l).await {
                return Ok(None);
            }
            let snapshot = self
                .snapshots
                .layer_dir(&l.diff_id)
                .map_err(|e| self.err(node, e.to_string()))?;
            let blob = BlobRef {
                digest: l.digest.clone(),
                size: l.size,
                media_type: l.media_type.clone(),
            };
            // The snapshot is unpacked when a step needs it (ensure_trees), if ever.
            state.config.rootfs.diff_ids.push(l.diff_id.clone());
            state.layers.push(Layer {
                blob,
                diff_id: l.diff_id.clone(),
                snapshot,
                base: false,
            });
        }
        state.cache_key = key.to_string();
        state.records.push((key.to_string(), record.clone()));
        let created = match self.opts.source_date_epoch {
            Some(_) => self.now(),
            None => record.created.clone(),
        };
        Ok(Some(StepOutcome::Step {
            created,
            layer: record.layer.is_some(),
            cached: true,
        }))
    }
}

enum StepOutcome {
    ConfigOnly,
    Step {
        created: String,
        layer: bool,
        cached: bool,
    },
}

/// The `Healthcheck` config field of a HEALTHCHECK instruction, as BuildKit writes it.
fn healthcheck(node: &Node) -> Result<serde_json::Value, String> {
    let kind = node.args.first().map(|s| s.to_ascii_uppercase());
    let mut hc = serde_json::Map::new();
    match kind.as_deref() {
        Some("NONE") => {
            if node.args.len() > 1 || !node.flags.is_empty() {
                return Err("HEALTHCHECK NONE takes no arguments or options".into());
            }
            hc.insert("Test".into(), serde_json::json!(["NONE"]));
            return Ok(serde_json::Value::Object(hc));
        }
        Some("CMD") => {}
        _ => return Err("HEALTHCHECK must be followed by CMD <command> or NONE".into()),
    }
    let rest = &node.args[1..];
    if rest.is_empty() {
        return Err("HEALTHCHECK CMD needs a command".into());
    }
    let test: Vec<String> = if node.json {
        std::iter::once("CMD".to_string())
            .chain(rest.iter().cloned())
            .collect()
    } else {
        vec!["CMD-SHELL".into(), rest.join(" ")]
    };
    hc.insert("Test".into(), serde_json::json!(test));
    for f in &node.flags {
        let (name, value) = f
            .split_once('=')
            .ok_or_else(|| format!("{f}: expected --name=value"))?;
        let key = match name {
            "--interval" => "Interval",
            "--timeout" => "Timeout",
            "--start-period" => "StartPeriod",
            "--start-interval" => "StartInterval",
            "--retries" => {
                let n: i64 = value
                    .parse()
                    .map_err(|_| format!("--retries={value}: not a number"))?;
                if n < 0 {
                    return Err("--retries cannot be negative".into());
                }
                if n > 0 {
                    hc.insert("Retries".into(), serde_json::json!(n));
                }
                continue;
            }
            other => return Err(format!("unknown HEALTHCHECK option {other}")),
        };
        let ns = parse_go_duration(value)
            .ok_or_else(|| format!("{name}={value}: not a duration such as 30s or 1m30s"))?;
        if ns != 0 && ns < 1_000_000 {
            return Err(format!("{name}={value} cannot be less than 1ms"));
        }
        if ns > 0 {
            hc.insert(key.into(), serde_json::json!(ns));
        }
    }
    Ok(serde_json::Value::Object(hc))
}

/// A Go duration (`1h2m3.5s`, `300ms`, `0`) in nanoseconds.
fn parse_go_duration(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    if s.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += value * mult;
        rest = &rest[unit_end..];
    }
    Some(total as i64)
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// A git source as BuildKit recognises one for ADD.
fn is_git_source(s: &str) -> bool {
    s.starts_with("git@")
        || s.starts_with("git://")
        || (is_url(s) && (s.ends_with(".git") || s.contains(".git#") || s.contains(".git?")))
}

/// A heredoc's text, with leading tabs removed for `<<-`.
fn heredoc_body(doc: &crate::dockerfile::Heredoc) -> String {
    if doc.chomp {
        doc.content
            .lines()
            .map(|l| format!("{}\n", l.trim_start_matches('\t')))
            .collect()
    } else {
        doc.content.clone()
    }
}

/// An optional secret or agent that was not given: an empty read-only tmpfs at its target, so
/// the step sees the place but nothing in it.
fn absent_mount(kind: &str, id: &str, target: String) -> (RunMount, serde_json::Value) {
    let key = serde_json::json!({ kind: id, "target": target });
    (
        RunMount {
            target,
            kind: MountKind::Tmpfs { size: Some(4096) },
            readonly: true,
        },
        key,
    )
}

/// Whether a `--from` value that names no stage can be an image reference.
fn looks_like_image(value: &str) -> bool {
    !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
}

/// `64k`, `10m`, `1g` or plain bytes.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s.as_str(), 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
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

/// Adds `keys` to a config set written as a map to empty objects (ExposedPorts, Volumes).
fn add_keys(set: &mut Option<BTreeMap<String, serde_json::Value>>, keys: &[String]) {
    let map = set.get_or_insert_with(BTreeMap::new);
    for k in keys {
        map.insert(k.clone(), serde_json::json!({}));
    }
}

/// `dir` made absolute against the working directory, as WORKDIR and COPY destinations are.
pub(super) fn absolute_in(workdir: Option<&str>, dir: &str) -> String {
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

    #[test]
    fn mount_options_and_sizes_parse() {
        let kv = parse_kv("type=cache,target=/root/.cache,sharing=locked,ro");
        assert_eq!(kv["type"], "cache");
        assert_eq!(kv["target"], "/root/.cache");
        assert_eq!(kv["ro"], "true");
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("2m"), Some(2 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("x"), None);
    }

    #[test]
    fn healthchecks_and_durations_follow_buildkit() {
        assert_eq!(parse_go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_go_duration("500ms"), Some(500_000_000));
        assert_eq!(parse_go_duration("1.5h"), Some(5_400_000_000_000));
        assert_eq!(parse_go_duration("3"), None);
        let parsed = crate::dockerfile::parse(
            "FROM scratch\nHEALTHCHECK --interval=5s --retries=3 CMD curl -f http://localhost/\nHEALTHCHECK CMD [\"/bin/check\", \"-q\"]\nHEALTHCHECK NONE\n",
        )
        .unwrap();
        let hc = healthcheck(&parsed.nodes[1]).unwrap();
        assert_eq!(
            hc["Test"],
            serde_json::json!(["CMD-SHELL", "curl -f http://localhost/"])
        );
        assert_eq!(hc["Interval"], 5_000_000_000i64);
        assert_eq!(hc["Retries"], 3);
        assert_eq!(
            healthcheck(&parsed.nodes[2]).unwrap()["Test"],
            serde_json::json!(["CMD", "/bin/check", "-q"])
        );
        assert_eq!(
            healthcheck(&parsed.nodes[3]).unwrap()["Test"],
            serde_json::json!(["NONE"])
        );
    }

    #[test]
    fn platform_args_name_this_machine() {
        let args = platform_args();
        let get = |k: &str| lookup_pairs(&args, k).unwrap();
        assert_eq!(get("TARGETOS"), "linux");
        assert_eq!(get("TARGETARCH"), crate::image::host_architecture());
        assert!(get("BUILDPLATFORM").starts_with("linux/"));
    }
}
