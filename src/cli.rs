//! Command-line arguments. Parsing only: every command is a thin call into the library.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use shmocker::ci::Provider;
use shmocker::progress::ProgressMode;

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
    /// Build in a CI job: tags, labels and registry credentials come from the CI's environment
    /// (GitHub Actions, GitLab CI, CircleCI), and results go where the CI shows them.
    Ci(CiArgs),
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

    /// Set a label on the image: KEY=VALUE (repeatable; wins over the Dockerfile's LABEL).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,

    /// How progress is shown: bars on a terminal (auto), plain lines, JSON lines, or nothing.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
}

#[derive(Debug, Args)]
pub struct CiArgs {
    /// The build context.
    #[arg(value_name = "CONTEXT", default_value = ".")]
    pub context: PathBuf,

    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Image names to tag with the derived tags (repeatable, or a comma/newline list).
    /// Default: ghcr.io/OWNER/REPO on GitHub, $CI_REGISTRY_IMAGE on GitLab.
    #[arg(long = "image", value_name = "NAME")]
    pub images: Vec<String>,

    /// Full image references (repeatable, or a comma/newline list); when given, no tags are
    /// derived from the CI.
    #[arg(short = 't', long = "tag", value_name = "NAME:TAG")]
    pub tags: Vec<String>,

    /// KEY=VALUE labels (repeatable, or a newline list); they win over the derived OCI labels.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,

    /// Build-time variables, NAME=VALUE (repeatable, or a newline list).
    #[arg(long = "build-arg", value_name = "NAME[=VALUE]")]
    pub build_args: Vec<String>,

    /// Push every tag to its registry.
    #[arg(long)]
    pub push: bool,

    /// Outputs, as for build (repeatable, or a newline list).
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    pub outputs: Vec<String>,

    /// The CI to act for (default: detected from the environment).
    #[arg(long, value_enum)]
    pub provider: Option<Provider>,

    /// The repository's default branch, which gets `latest` (GitHub and GitLab say it
    /// themselves; CircleCI does not).
    #[arg(long = "default-branch", value_name = "BRANCH")]
    pub default_branch: Option<String>,

    /// Where to write junit.xml, summary.md, codequality.json, shmocker.env, annotations.json
    /// and metadata.json. Default: ./shmocker-reports on GitLab, /tmp/shmocker-reports on
    /// CircleCI, none elsewhere.
    #[arg(long = "report-dir", value_name = "DIR")]
    pub report_dir: Option<PathBuf>,

    /// Write the image ID (the digest of its config) to FILE.
    #[arg(long, value_name = "FILE")]
    pub iidfile: Option<PathBuf>,

    /// Write build results as JSON to FILE (buildx's keys).
    #[arg(long = "metadata-file", value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,

    /// Talk plain HTTP to this registry (HOST[:PORT]).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,

    /// How progress is shown; auto speaks the CI's language (GitHub groups and annotations,
    /// GitLab sections).
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,

    /// Print what would be built (CI, tags, labels) as JSON and stop.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
}
