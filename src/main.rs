//! The `shmocker` binary: argument parsing and the user namespace entry, then a call into the
//! library. The user namespace must be entered while the process has a single thread, so it
//! happens here, before the tokio runtime exists.

mod cli;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Parser;

use shmocker::detect;
use shmocker::engine::remote_cache::CacheRef;
use shmocker::engine::{self, BuildOptions, BuildResult, Export, Secret};
use shmocker::progress::Reporting;
use shmocker::sandbox::SecretSource;
use shmocker::sandbox::{helper, userns};

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == helper::SUBCOMMAND) {
        return match (args.get(2), args.get(3)) {
            (Some(spec), Some(status)) => helper::main(Path::new(spec), Path::new(status)),
            _ => {
                eprintln!("{} is internal to shmocker", helper::SUBCOMMAND);
                ExitCode::from(2)
            }
        };
    }
    let cli = cli::Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: cli::Cli) -> Result<ExitCode> {
    // A check reads two files and needs neither the store nor a user namespace.
    if let cli::Command::Check(args) = &cli.command {
        return Ok(check(args));
    }
    let root = match cli.root {
        Some(r) => absolute(&r)?,
        None => default_root()?,
    };
    match cli.command {
        cli::Command::Detect(args) => {
            let planned = userns::plan_mapping();
            let report = detect::run(&root, &planned)?;
            let choice = detect::ladder::choose(&report, &planned, &Default::default());
            let mut out = String::new();
            if args.format == "json" {
                let mut doc = serde_json::to_value(&report)?;
                doc["choice"] = match &choice {
                    Ok(c) => serde_json::json!({
                        "isolation": c.isolation.name(),
                        "snapshotter": c.snapshotter.name(),
                        "skipped": c.skipped.iter().map(|s| serde_json::json!({"rung": s.rung, "reason": s.reason})).collect::<Vec<_>>(),
                    }),
                    Err(e) => serde_json::json!({ "refused": e.to_string() }),
                };
                out.push_str(&serde_json::to_string_pretty(&doc)?);
                out.push('\n');
            } else {
                out = detect::render_table(&report, choice.as_ref().ok());
                if let Err(e) = &choice {
                    out.push_str(&format!("\n{e}\n"));
                }
            }
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
            Ok(if choice.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        cli::Command::Check(args) => Ok(check(&args)),
        cli::Command::Build(args) => {
            let request = ladder_request(&args)?;
            let opts = build_options(args, root)?;
            build_in_userns(opts, &request, |opts, result| {
                let result = result?;
                write_results(opts, &result)?;
                println!("{}", result.manifest.digest);
                Ok(ExitCode::SUCCESS)
            })
        }
        cli::Command::Ci(args) => run_ci(args, root),
    }
}

/// Chooses the mode (detect's ladder), enters the user namespace (the parent waits for the
/// child and returns its exit code), runs the build inside it on a fresh tokio runtime, and
/// hands the outcome to `then`.
fn build_in_userns(
    mut opts: BuildOptions,
    request: &detect::ladder::Request,
    then: impl FnOnce(&BuildOptions, Result<BuildResult, engine::BuildError>) -> Result<ExitCode>,
) -> Result<ExitCode> {
    let planned = userns::plan_mapping();
    let store = opts.store_root.clone();
    let (mut report, mut origin) = detect::cache::for_build(&store, &planned)?;
    let mut chosen = detect::ladder::choose(&report, &planned, request);
    if chosen.is_err() && origin.cached() {
        // Never refuse on findings that may be stale: probe now, and decide on those.
        (report, origin) = detect::cache::probe_for_build(&store, &planned)?;
        chosen = detect::ladder::choose(&report, &planned, request);
    }
    let choice = match chosen {
        Ok(c) => c,
        Err(e) => {
            // Refused: the whole report, so the log alone says what to change.
            eprint!("{}", detect::render_table(&report, None));
            return Err(e.into());
        }
    };
    eprint!("{}{}", choice.describe(), origin.describe());
    let cached = origin.cached();
    // A step whose sandbox cannot be set up may be the cached findings gone stale in a way
    // their key cannot see: drop them, so the next build probes afresh.
    let then = move |opts: &BuildOptions, mut result: Result<BuildResult, engine::BuildError>| {
        if cached
            && let Err(engine::BuildError::StepFailed {
                sandbox: true,
                message,
                ..
            }) = &mut result
        {
            message.push_str(&stale_note(&store));
        }
        then(opts, result)
    };
    opts.snapshotter = choice.snapshotter;
    let run = |opts: &BuildOptions| -> Result<Result<BuildResult, engine::BuildError>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        Ok(runtime.block_on(engine::build(opts)))
    };
    if matches!(
        choice.isolation,
        detect::ladder::Isolation::Chroot | detect::ladder::Isolation::InPlace
    ) {
        // No namespace can be made here (or none is wanted): the build runs as this (real
        // root) process.
        opts.chroot = choice.isolation == detect::ladder::Isolation::Chroot;
        // Held until this process ends: one in-place build at a time in a container.
        let _in_place_lock = if choice.isolation == detect::ladder::Isolation::InPlace {
            engine::prepare_in_place(&mut opts)?;
            Some(in_place_lock()?)
        } else {
            None
        };
        // The steps share this process's pid namespace and /proc: a process that is not
        // dumpable keeps its memory and environment (registry credentials) from their reach.
        let _ = nix::sys::prctl::set_dumpable(false);
        opts.mapping = choice.mapping;
        let result = run(&opts)?;
        return then(&opts, result);
    }
    let mapping = choice.mapping;
    let entered = userns::enter(mapping).map_err(|e| {
        if cached {
            anyhow!(
                "{:#}{}",
                anyhow::Error::from(e),
                stale_note(&opts.store_root)
            )
        } else {
            e.into()
        }
    })?;
    match entered {
        userns::Entered::ParentDone(code) => Ok(code),
        userns::Entered::Inside(mapping) => {
            if let userns::IdMapping::Single { reason, .. } = &mapping {
                eprintln!("warning: {}", mapping.describe());
                let _ = reason;
            }
            opts.mapping = mapping;
            let result = run(&opts)?;
            then(&opts, result)
        }
    }
}

/// Drops the cached probe findings of `store` and says so, for an error that stale findings may
/// explain.
fn stale_note(store: &Path) -> String {
    if detect::cache::drop_entry(store) {
        format!(
            "\n  this build used cached probe results ({}); they were dropped, and the next build probes afresh (set {}=0 to probe on every build)",
            detect::cache::path(store).display(),
            detect::cache::ENV
        )
    } else {
        String::new()
    }
}

/// The container-wide lock of in-place builds: another one (whatever its store) would replace
/// `/` under this one. On /dev/shm, which in-place execution always keeps (/dev is kept) and
/// container runtimes give every container its own of.
fn in_place_lock() -> Result<nix::fcntl::Flock<std::fs::File>> {
    let path = Path::new("/dev/shm/shmocker-in-place.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {} (the lock of in-place builds)", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow!(
            "another in-place build is running in this container ({} is locked: {e}); in-place builds replace /, so they run one at a time",
            path.display()
        )
    })
}

/// `shmocker check`: exit 0 without error-level findings, 1 with, 2 when the Dockerfile cannot
/// be read or does not parse.
fn check(args: &cli::CheckArgs) -> ExitCode {
    use shmocker::dockerfile::{self, checks};
    let path = args
        .file
        .clone()
        .unwrap_or_else(|| args.context.join("Dockerfile"));
    let file = path.display().to_string();
    let source = match std::fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read Dockerfile {file}: {e}; name one with -f FILE");
            return ExitCode::from(2);
        }
    };
    let ignore = match read_dockerignore(&args.context, &path) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let report = dockerfile::parse(&source)
        .map_err(|e| (e.line, e.column, e.message))
        .and_then(|parsed| {
            checks::check(&source, &parsed, ignore.as_ref())
                .map_err(|e| (e.line, e.column, e.message))
        });
    let report = match report {
        Ok(r) => r,
        Err((line, column, message)) => {
            eprintln!("{file}:{line}:{column}: error: {message}");
            return ExitCode::from(2);
        }
    };
    match args.format {
        cli::CheckFormat::Json => println!("{}", report.to_json(&file)),
        cli::CheckFormat::Text => {
            print!("{}", report.render_text(&file, &source));
            if report.findings.is_empty() {
                eprintln!("{file}: no findings");
            }
        }
    }
    ExitCode::from(u8::from(report.errors() > 0))
}

/// The .dockerignore a build of `dockerfile` uses: `FILE.dockerignore` beside the Dockerfile,
/// else the context's.
fn read_dockerignore(
    context: &Path,
    dockerfile: &Path,
) -> Result<Option<shmocker::dockerfile::dockerignore::Dockerignore>> {
    let beside = dockerfile
        .file_name()
        .map(|n| dockerfile.with_file_name(format!("{}.dockerignore", n.to_string_lossy())));
    for path in beside.into_iter().chain([context.join(".dockerignore")]) {
        if let Ok(text) = std::fs::read_to_string(&path) {
            return shmocker::dockerfile::dockerignore::Dockerignore::parse(&text)
                .map(Some)
                .with_context(|| path.display().to_string());
        }
    }
    Ok(None)
}

/// `shmocker ci`: the plan from the CI's environment, then the same build as `build`, then
/// the CI's outputs, summary and reports (for a failed build too).
fn run_ci(args: cli::CiArgs, root: PathBuf) -> Result<ExitCode> {
    use shmocker::ci::{self, metadata::split_list};
    let env = ci::Env::from_process();
    let lists = |v: &[String], commas: bool| -> Vec<String> {
        v.iter().flat_map(|s| split_list(s, commas)).collect()
    };
    let mut build = args.build;
    build.labels = lists(&build.labels, false);
    build.build_args = lists(&build.build_args, false);
    build.outputs = lists(&build.outputs, false);
    build.cache_from = lists(&build.cache_from, false);
    build.cache_to = lists(&build.cache_to, false);
    let request = ci::run::Request {
        provider: args.provider,
        default_branch: args.default_branch.clone(),
        context: absolute(&build.context)?,
        images: lists(&args.images, true),
        tags: lists(&build.tags, true),
        labels: parse_labels(&build.labels)?,
        push: build.push,
        #[cfg(feature = "github-api")]
        pr_comment: args.pr_comment,
        #[cfg(not(feature = "github-api"))]
        pr_comment: false,
    };
    let plan = ci::run::plan(&env, &request)?;
    if args.dry_run {
        let shown = serde_json::json!({
            "provider": plan.ctx.provider,
            "act": plan.ctx.act,
            "git": plan.ctx.git,
            "tags": plan.tags,
            "labels": plan.labels,
            "derived": plan.derived,
            "credentials": plan.ctx.credentials.iter().map(|c| format!("{} (user '{}' from {})", c.registry, c.username, c.origin)).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(ExitCode::SUCCESS);
    }
    ci::run::mask_secrets(&plan.ctx);
    build.tags = plan.tags.clone();
    let progress = build.progress;
    let ladder = ladder_request(&build)?;
    let mut opts = build_options(build, root)?;
    let (reporting, recorder) = ci::run::reporter(&plan.ctx, progress);
    opts.reporter = reporting;
    opts.registry_credentials = plan.ctx.credentials.clone();
    opts.labels = plan.labels.clone();
    let report_dir = ci::run::report_dir(&plan.ctx, args.report_dir.as_deref());
    build_in_userns(opts, &ladder, |opts, result| {
        ci::run::after_build(&env, &plan, opts, &recorder, &result, report_dir.as_deref())?;
        let result = result?;
        write_results(opts, &result)?;
        println!("{}", result.manifest.digest);
        Ok(ExitCode::SUCCESS)
    })
}

fn parse_labels(labels: &[String]) -> Result<BTreeMap<String, String>> {
    labels
        .iter()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .ok_or_else(|| anyhow!("label {l:?}: expected KEY=VALUE"))
        })
        .collect()
}

fn ladder_request(args: &cli::BuildArgs) -> Result<detect::ladder::Request> {
    let level = |s: &Option<String>| {
        s.as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: String| anyhow!(e))
    };
    Ok(detect::ladder::Request {
        isolation: level(&args.isolation)?,
        min_isolation: level(&args.min_isolation)?,
        snapshotter: shmocker::sandbox::Snapshotter::ALL
            .into_iter()
            .find(|s| s.name() == args.snapshotter),
    })
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

fn default_root() -> Result<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/shmocker"));
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("shmocker"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            anyhow!("neither XDG_DATA_HOME nor HOME is set; give the store with --root DIR")
        })?;
    Ok(PathBuf::from(home).join(".local/share/shmocker"))
}

fn build_options(args: cli::BuildArgs, root: PathBuf) -> Result<BuildOptions> {
    let mut push = args.push;
    let mut exports = Vec::new();
    // (where it was set, name, level): every --output that names a compression must agree,
    // since one image is built for all of them.
    let mut compression: Option<(String, String, Option<String>)> = args
        .compression
        .clone()
        .map(|c| ("--compression".to_string(), c, None));
    let mut force_compression = false;
    for spec in &args.outputs {
        let fields = parse_kv_list(spec).with_context(|| {
            format!("--output {spec:?}: expected type=oci,dest=FILE or type=registry")
        })?;
        if let Some(v) = fields.get("force-compression") {
            force_compression = match v.as_str() {
                "true" => true,
                "false" => false,
                other => bail!("--output {spec:?}: force-compression={other:?}: use true or false"),
            };
        }
        if fields.contains_key("compression") || fields.contains_key("compression-level") {
            let name = fields
                .get("compression")
                .cloned()
                .or_else(|| compression.as_ref().map(|c| c.1.clone()))
                .unwrap_or_else(|| "gzip".into());
            let level = fields.get("compression-level").cloned();
            if let Some((from, other, other_level)) = &compression
                && (other != &name
                    || (level.is_some() && other_level.is_some() && other_level != &level))
            {
                bail!(
                    "--output {spec:?}: compression {name} differs from {other} set by {from}; one image is built for all outputs: give the same compression everywhere"
                );
            }
            let level = level.or_else(|| compression.as_ref().and_then(|c| c.2.clone()));
            compression = Some((format!("--output {spec:?}"), name, level));
        }
        match fields.get("type").map(String::as_str) {
            Some(kind @ ("oci" | "docker" | "local" | "tar")) => {
                let dest = fields
                    .get("dest")
                    .ok_or_else(|| anyhow!("--output {spec:?}: type={kind} needs dest=PATH"))?;
                let dest = absolute(Path::new(dest))?;
                exports.push(match kind {
                    "oci" => Export::Oci(dest),
                    "docker" => Export::Docker(dest),
                    "local" => Export::Local(dest),
                    _ => bail!(
                        "--output {spec:?}: type=tar is not supported; use type=oci or type=docker"
                    ),
                });
            }
            Some("registry") => push = true,
            Some("image") if fields.get("push").map(String::as_str) == Some("true") => push = true,
            Some(other) => bail!(
                "--output {spec:?}: unsupported output type {other:?}; use type=registry, type=oci,dest=FILE, type=docker,dest=FILE or type=local,dest=DIR"
            ),
            None => {
                bail!("--output {spec:?}: missing type=; use type=oci,dest=FILE or type=registry")
            }
        }
    }
    let format = match args.format.as_str() {
        "oci" => shmocker::image::Format::Oci,
        "docker" => shmocker::image::Format::Docker,
        other => bail!("--format {other:?}: use oci or docker"),
    };
    let compression = match &compression {
        None => shmocker::layer::LayerCompression::default(),
        Some((from, name, level)) => {
            shmocker::layer::LayerCompression::parse(name, level.as_deref())
                .map_err(|e| anyhow!("{from}: {e}"))?
        }
    };
    if format == shmocker::image::Format::Docker
        && matches!(compression, shmocker::layer::LayerCompression::Zstd { .. })
    {
        bail!(
            "--format docker with zstd compression: Docker's image format has no zstd layer media type; use --format oci (the default) or gzip compression"
        );
    }
    if push && args.tags.is_empty() {
        bail!("--push needs at least one image name: add -t REGISTRY/NAME:TAG");
    }
    let mut build_args = BTreeMap::new();
    for a in &args.build_args {
        match a.split_once('=') {
            Some((k, v)) => {
                build_args.insert(k.to_string(), v.to_string());
            }
            None => {
                // As docker does: `--build-arg NAME` takes NAME's value from the environment.
                if let Ok(v) = std::env::var(a) {
                    build_args.insert(a.clone(), v);
                }
            }
        }
    }
    let mut secrets = Vec::new();
    for spec in &args.secrets {
        secrets.push(parse_secret(spec)?);
    }
    // SOURCE_DATE_EPOCH as BuildKit takes it: from the environment, or as a build arg.
    let epoch_text = build_args
        .get("SOURCE_DATE_EPOCH")
        .cloned()
        .or_else(|| std::env::var("SOURCE_DATE_EPOCH").ok())
        .filter(|v| !v.is_empty());
    let source_date_epoch = epoch_text
        .map(|v| {
            v.parse::<i64>().map_err(|_| {
                anyhow!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970")
            })
        })
        .transpose()?;
    let in_place = match args.isolation.as_deref() {
        Some("in-place") => Some(
            args.ignore_paths
                .iter()
                .map(|p| absolute(p))
                .collect::<Result<Vec<_>>>()?,
        ),
        _ if !args.ignore_paths.is_empty() => {
            bail!(
                "--ignore-path is only for --isolation in-place (which leaves those paths of this container alone)"
            )
        }
        _ => None,
    };
    Ok(BuildOptions {
        in_place,
        context: absolute(&args.context)?,
        target: args.target,
        no_cache: args.no_cache,
        pull: args.pull.parse().map_err(|e: String| anyhow!(e))?,
        no_cache_filter: args.no_cache_filter,
        network: match args.network.as_str() {
            "host" | "default" => shmocker::sandbox::Network::Host,
            "none" => shmocker::sandbox::Network::None,
            "private" => shmocker::sandbox::Network::Private,
            other => bail!("--network {other:?}: use host, none or private"),
        },
        allow_hosts: {
            if !args.allow_hosts.is_empty() && args.network != "private" {
                bail!(
                    "--allow-host only applies to --network private (RUN steps in their own network namespace); add --network private"
                );
            }
            let list = args
                .allow_hosts
                .iter()
                .map(|h| h.parse().map_err(|e: String| anyhow!(e)))
                .collect::<Result<Vec<_>>>()?;
            if args.network == "private" && list.is_empty() {
                shmocker::sandbox::net::private_stack_ready().map_err(|e| anyhow!(e))?;
            }
            list
        },
        allow_insecure: {
            for a in &args.allow {
                if a != "security.insecure" {
                    bail!("--allow {a}: the only entitlement is security.insecure");
                }
            }
            !args.allow.is_empty()
        },
        ssh: args
            .ssh
            .iter()
            .map(|spec| {
                let (id, socket) = match spec.split_once('=') {
                    Some((id, path)) => (id.to_string(), PathBuf::from(path)),
                    None => (
                        spec.clone(),
                        std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from).ok_or_else(|| {
                            anyhow!("--ssh {spec}: SSH_AUTH_SOCK is not set; start an agent or give --ssh {spec}=/path/to/socket")
                        })?,
                    ),
                };
                Ok((id, absolute(&socket)?))
            })
            .collect::<Result<_>>()?,
        cache_from: args
            .cache_from
            .iter()
            .map(|c| CacheRef::parse(c).map_err(|e| anyhow!("--cache-from {c:?}: {e}")))
            .collect::<Result<_>>()?,
        cache_to: args
            .cache_to
            .iter()
            .map(|c| CacheRef::parse(c).map_err(|e| anyhow!("--cache-to {c:?}: {e}")))
            .collect::<Result<_>>()?,
        secrets,
        source_date_epoch,
        dockerfile: args.file.as_deref().map(absolute).transpose()?,
        tags: args.tags,
        push,
        exports,
        format,
        compression,
        force_compression,
        build_args,
        iidfile: args.iidfile.as_deref().map(absolute).transpose()?,
        metadata_file: args.metadata_file.as_deref().map(absolute).transpose()?,
        store_root: root,
        insecure_registries: args.insecure_registries,
        mapping: userns::IdMapping::Identity,
        snapshotter: Default::default(),
        reporter: Reporting::from_arc(args.progress.reporter()),
        registry_credentials: vec![],
        labels: parse_labels(&args.labels)?,
        chroot: false,
        ignore_chown_errors: args.ignore_chown_errors,
    })
}

fn parse_secret(spec: &str) -> Result<Secret> {
    let fields = parse_kv_list(spec)
        .with_context(|| format!("--secret {spec:?}: expected id=ID,src=FILE or id=ID,env=VAR"))?;
    let id = fields
        .get("id")
        .cloned()
        .ok_or_else(|| anyhow!("--secret {spec:?}: missing id=ID"))?;
    let source = match (
        fields.get("src").or_else(|| fields.get("source")),
        fields.get("env"),
    ) {
        (Some(src), None) => SecretSource::File(absolute(Path::new(src))?),
        (None, Some(var)) => SecretSource::Env(var.clone()),
        (None, None) => {
            // As docker: `--secret id=X` alone takes the environment variable X.
            SecretSource::Env(id.clone())
        }
        (Some(_), Some(_)) => bail!("--secret {spec:?}: give src= or env=, not both"),
    };
    Ok(Secret { id, source })
}

fn parse_kv_list(spec: &str) -> Result<BTreeMap<String, String>> {
    spec.split(',')
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| anyhow!("{kv:?} is not key=value"))
        })
        .collect()
}

fn write_results(opts: &BuildOptions, result: &BuildResult) -> Result<()> {
    if let Some(path) = &opts.iidfile {
        std::fs::write(path, &result.config_digest)
            .with_context(|| format!("writing --iidfile {}", path.display()))?;
    }
    if let Some(path) = &opts.metadata_file {
        let mut meta = serde_json::json!({
            "containerimage.config.digest": result.config_digest,
            "containerimage.descriptor": result.manifest,
            "containerimage.digest": result.manifest.digest,
        });
        if !opts.tags.is_empty() {
            meta["image.name"] = serde_json::Value::String(opts.tags.join(","));
        }
        let text = serde_json::to_string_pretty(&meta)?;
        std::fs::write(path, text)
            .with_context(|| format!("writing --metadata-file {}", path.display()))?;
    }
    if !opts.push && opts.exports.is_empty() {
        eprintln!(
            "warning: no output specified: the image stays in the store only; add --push or --output (type=oci|docker,dest=FILE or type=local,dest=DIR)"
        );
    }
    Ok(())
}
