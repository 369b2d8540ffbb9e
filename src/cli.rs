//! Command-line arguments. Parsing only: every command is a thin call into the library.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "shmocker",
    version,
    about = "Build container images from Dockerfiles: no daemon, no root.",
    long_about = "shmocker turns a Dockerfile and a build context into an OCI image and pushes it \
                  to a registry, as an ordinary user: RUN steps run in a user namespace mapped onto \
                  the user's subordinate IDs, on kernel overlayfs; where the machine allows less, \
                  it falls back (`shmocker detect` says what and why)."
)]
pub struct Cli {
    /// Where shmocker keeps its store (blobs, unpacked layers). Default:
    /// $XDG_DATA_HOME/shmocker (~/.local/share/shmocker), or /var/lib/shmocker for root.
    #[arg(long, global = true, env = "SHMOCKER_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build an image from a Dockerfile and a context directory.
    Build(BuildArgs),
    /// Probe what this machine allows a build (user namespaces, ID maps, overlayfs,
    /// fuse-overlayfs, reflinks, the store's filesystem, seccomp and AppArmor), name the CI
    /// environment, and say how to get a stronger mode.
    #[command(visible_alias = "doctor")]
    Detect(DetectArgs),
}

#[derive(Debug, Args)]
pub struct DetectArgs {
    /// `table` for people, `json` for tools (schema: docs/detect.md).
    #[arg(long, value_name = "FORMAT", default_value = "table", value_parser = ["table", "json"])]
    pub format: String,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The build context: the directory whose files COPY can use.
    #[arg(value_name = "CONTEXT")]
    pub context: PathBuf,

    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Name and tag the image (repeatable), e.g. 127.0.0.1:5000/team/app:1.
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tags: Vec<String>,

    /// Push the image to the registry of every tag (the same as --output type=registry).
    #[arg(long)]
    pub push: bool,

    /// Where the result goes: type=oci,dest=FILE (an OCI image layout tarball) or
    /// type=registry (push the tags). Repeatable.
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    pub outputs: Vec<String>,

    /// Set a build-time variable (an ARG): NAME=VALUE, or NAME to take its value from the
    /// environment.
    #[arg(long = "build-arg", value_name = "NAME[=VALUE]")]
    pub build_args: Vec<String>,

    /// Write the image ID (the digest of its config) to FILE.
    #[arg(long, value_name = "FILE")]
    pub iidfile: Option<PathBuf>,

    /// Write build results as JSON to FILE (buildx's keys: containerimage.digest, image.name, ...).
    #[arg(long = "metadata-file", value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,

    /// Talk plain HTTP to this registry (HOST[:PORT]). localhost and 127.0.0.0/8 always are.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,

    /// Use this isolation instead of the strongest that works: root, subordinate-ids,
    /// single-id or chroot. The build fails if it does not work here.
    #[arg(long, value_name = "LEVEL", value_parser = ["root", "subordinate-ids", "single-id", "chroot"])]
    pub isolation: Option<String>,

    /// Refuse to build with an isolation weaker than this (root > subordinate-ids > single-id >
    /// chroot).
    #[arg(long = "min-isolation", value_name = "LEVEL", value_parser = ["root", "subordinate-ids", "single-id", "chroot"])]
    pub min_isolation: Option<String>,

    /// In a single-ID build, give files and processes whose owner the build cannot map (COPY
    /// --chown, USER, WORKDIR) to 0 with a warning, instead of failing the step.
    #[arg(long = "ignore-chown-errors")]
    pub ignore_chown_errors: bool,

    /// How step rootfs are stacked: auto (the fastest that works), overlayfs, fuse-overlayfs or
    /// copy.
    #[arg(long, value_name = "NAME", default_value = "auto", value_parser = ["auto", "overlayfs", "fuse-overlayfs", "copy"])]
    pub snapshotter: String,
}
