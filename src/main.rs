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

use shmocker::engine::{self, BuildOptions, BuildResult};
use shmocker::progress::Reporting;
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
    let root = match cli.root {
        Some(r) => absolute(&r)?,
        None => default_root()?,
    };
    match cli.command {
        cli::Command::Build(args) => {
            let opts = build_options(args, root)?;
            build_in_userns(opts, |opts, result| {
                let result = result?;
                write_results(opts, &result)?;
                println!("{}", result.manifest.digest);
                Ok(ExitCode::SUCCESS)
            })
        }
        cli::Command::Ci(args) => run_ci(args, root),
    }
}

/// Enters the user namespace (the parent waits for the child and returns its exit code), runs
/// the build inside it on a fresh tokio runtime, and hands the outcome to `then`.
fn build_in_userns(
    mut opts: BuildOptions,
    then: impl FnOnce(&BuildOptions, Result<BuildResult, engine::BuildError>) -> Result<ExitCode>,
) -> Result<ExitCode> {
    let mapping = userns::plan_mapping();
    match userns::enter(mapping)? {
        userns::Entered::ParentDone(code) => Ok(code),
        userns::Entered::Inside(mapping) => {
            if let userns::IdMapping::Single { reason, .. } = &mapping {
                eprintln!("warning: {}", mapping.describe());
                let _ = reason;
            }
            opts.mapping = mapping;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let result = runtime.block_on(engine::build(&opts));
            then(&opts, result)
        }
    }
}

/// `shmocker ci`: the plan from the CI's environment, then the same build as `build`, then
/// the CI's outputs, summary and reports (for a failed build too).
fn run_ci(args: cli::CiArgs, root: PathBuf) -> Result<ExitCode> {
    use shmocker::ci::{self, metadata::split_list};
    let env = ci::Env::from_process();
    let lists = |v: &[String], commas: bool| -> Vec<String> {
        v.iter().flat_map(|s| split_list(s, commas)).collect()
    };
    let context = absolute(&args.context)?;
    let labels = parse_labels(&lists(&args.labels, false))?;
    let request = ci::run::Request {
        provider: args.provider,
        default_branch: args.default_branch.clone(),
        context: context.clone(),
        images: lists(&args.images, true),
        tags: lists(&args.tags, true),
        labels: labels.clone(),
        push: args.push,
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
    let build_args = cli::BuildArgs {
        context,
        file: args.file,
        tags: plan.tags.clone(),
        push: args.push,
        outputs: lists(&args.outputs, false),
        build_args: lists(&args.build_args, false),
        iidfile: args.iidfile,
        metadata_file: args.metadata_file,
        insecure_registries: args.insecure_registries,
        labels: vec![],
        progress: args.progress,
    };
    let mut opts = build_options(build_args, root)?;
    let (reporting, recorder) = ci::run::reporter(&plan.ctx, args.progress);
    opts.reporter = reporting;
    opts.registry_credentials = plan.ctx.credentials.clone();
    opts.labels = plan.labels.clone();
    let report_dir = ci::run::report_dir(&plan.ctx, args.report_dir.as_deref());
    build_in_userns(opts, |opts, result| {
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
    let mut oci_outputs = Vec::new();
    for spec in &args.outputs {
        let fields = parse_kv_list(spec).with_context(|| {
            format!("--output {spec:?}: expected type=oci,dest=FILE or type=registry")
        })?;
        match fields.get("type").map(String::as_str) {
            Some("oci") => {
                let dest = fields
                    .get("dest")
                    .ok_or_else(|| anyhow!("--output {spec:?}: type=oci needs dest=FILE"))?;
                oci_outputs.push(absolute(Path::new(dest))?);
            }
            Some("registry") => push = true,
            Some("image") if fields.get("push").map(String::as_str) == Some("true") => push = true,
            Some(other) => bail!(
                "--output {spec:?}: unsupported output type {other:?}; this version writes type=oci,dest=FILE or type=registry"
            ),
            None => {
                bail!("--output {spec:?}: missing type=; use type=oci,dest=FILE or type=registry")
            }
        }
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
    Ok(BuildOptions {
        context: absolute(&args.context)?,
        dockerfile: args.file.as_deref().map(absolute).transpose()?,
        tags: args.tags,
        push,
        oci_outputs,
        build_args,
        iidfile: args.iidfile.as_deref().map(absolute).transpose()?,
        metadata_file: args.metadata_file.as_deref().map(absolute).transpose()?,
        store_root: root,
        insecure_registries: args.insecure_registries,
        mapping: userns::IdMapping::Identity,
        reporter: Reporting::from_arc(args.progress.reporter()),
        registry_credentials: vec![],
        labels: parse_labels(&args.labels)?,
    })
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
    if !opts.push && opts.oci_outputs.is_empty() {
        eprintln!(
            "warning: no output specified: the image stays in the store only; add --push or --output type=oci,dest=FILE"
        );
    }
    Ok(())
}
