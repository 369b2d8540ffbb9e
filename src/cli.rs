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
                  the user's subordinate IDs, on kernel overlayfs."
)]
pub struct Cli {
    /// Where shmocker keeps its store (blobs, unpacked layers). Default:
    /// $XDG_DATA_HOME/shmocker (~/.local/share/shmocker), or /var/lib/shmocker for root.
    #[arg(long, global = true, env = "SHMOCKER_ROOT", value_name = "DIR")]
    pub root: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build an image from a Dockerfile and a context directory.
    Build(BuildArgs),
    /// Check a Dockerfile against BuildKit's build checks without building it. Exits 0 when
    /// there is no error-level finding, 1 when there is, 2 when the Dockerfile does not parse.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The build context (for its .dockerignore).
    #[arg(value_name = "CONTEXT", default_value = ".")]
    pub context: PathBuf,

    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Output for people (text) or for programs (json; schema in docs/checks.md).
    #[arg(long, value_enum, default_value = "text")]
    pub format: CheckFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckFormat {
    Text,
    Json,
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
}
