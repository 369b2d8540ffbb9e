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
use shmocker::engine::{self, BuildOptions, BuildResult};
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
        cli::Command::Build(args) => {
            let request = ladder_request(&args)?;
            let mut opts = build_options(args, root)?;
            let planned = userns::plan_mapping();
            let report = detect::run(&opts.store_root, &planned)?;
            let choice = match detect::ladder::choose(&report, &planned, &request) {
                Ok(c) => c,
                Err(e) => {
                    // Refused: the whole report, so the log alone says what to change.
                    eprint!("{}", detect::render_table(&report, None));
                    return Err(e.into());
                }
            };
            eprint!("{}", choice.describe());
            opts.snapshotter = choice.snapshotter;
            if choice.isolation == detect::ladder::Isolation::Chroot {
                // No namespace can be made here: the build runs as this (real root) process.
                opts.chroot = true;
                opts.mapping = choice.mapping;
                return run_build(&opts);
            }
            match userns::enter(choice.mapping)? {
                userns::Entered::ParentDone(code) => Ok(code),
                userns::Entered::Inside(mapping) => {
                    if let userns::IdMapping::Single { reason, .. } = &mapping {
                        eprintln!("warning: {}", mapping.describe());
                        let _ = reason;
                    }
                    opts.mapping = mapping;
                    run_build(&opts)
                }
            }
        }
    }
}

fn run_build(opts: &BuildOptions) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(engine::build(opts))?;
    write_results(opts, &result)?;
    println!("{}", result.manifest.digest);
    Ok(ExitCode::SUCCESS)
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
        snapshotter: Default::default(),
        chroot: false,
        ignore_chown_errors: args.ignore_chown_errors,
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
