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
    /// Build in a CI job: tags, labels and registry credentials come from the CI's environment
    /// (GitHub Actions, GitLab CI, CircleCI), and results go where the CI shows them.
    Ci(CiArgs),
    /// Probe what this machine allows a build (user namespaces, ID maps, overlayfs,
    /// fuse-overlayfs, reflinks, the store's filesystem, seccomp and AppArmor), name the CI
    /// environment, and say how to get a stronger mode.
    #[command(visible_alias = "doctor")]
    Detect(DetectArgs),
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

    /// Where the result goes (repeatable): type=registry (push the tags), type=oci,dest=FILE
    /// (an OCI image layout tarball), type=docker,dest=FILE (a tarball for `docker load`), or
    /// type=local,dest=DIR (the image's filesystem).
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    pub outputs: Vec<String>,

    /// Set a build-time variable (an ARG): NAME=VALUE, or NAME to take its value from the
    /// environment.
    #[arg(long = "build-arg", value_name = "NAME[=VALUE]")]
    pub build_args: Vec<String>,

    /// Media types of the image: oci (default) or docker.
    #[arg(long, value_name = "oci|docker", default_value = "oci")]
    pub format: String,

    /// How the layers the build makes are compressed: gzip (default) or zstd (OCI media types
    /// only). `--output` also takes buildx's compression=, compression-level= and
    /// force-compression=true (recompress the base image's layers too).
    #[arg(long, value_name = "gzip|zstd")]
    pub compression: Option<String>,

    /// Build this stage (by its `AS` name) instead of the last one; only the stages it needs run.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,

    /// Run every step even when the cache holds its result.
    #[arg(long = "no-cache")]
    pub no_cache: bool,

    /// When base images are asked of the registry: always (the default: resolve each tag on
    /// every build, as BuildKit), missing (use the image a tag was last pulled as, if the store
    /// has it; podman's default) or never (the store only). `--pull` alone is always; buildah's
    /// true ("if newer") and false are always and missing here. Images pinned by digest come
    /// from the store whenever it has them.
    #[arg(
        long,
        value_name = "always|missing|never",
        num_args = 0..=1,
        require_equals = true,
        default_value = "always",
        default_missing_value = "always"
    )]
    pub pull: String,

    /// Do not use the cache for these stages (by name; repeatable or comma-separated).
    #[arg(long = "no-cache-filter", value_name = "STAGE", value_delimiter = ',')]
    pub no_cache_filter: Vec<String>,

    /// The network of RUN steps: host (the runner's, the default), none (loopback only) or
    /// private (a namespace of its own, outbound through slirp4netns). `RUN --network=...`
    /// overrides it for one step.
    #[arg(long, value_name = "host|none|private", default_value = "host")]
    pub network: String,

    /// With --network private: RUN steps may resolve and reach only these hosts (repeatable;
    /// NAME, NAME:PORT, an IP address, or 10.0.2.2[:PORT] for the runner's loopback), through
    /// a filtering proxy (HTTP_PROXY/HTTPS_PROXY) and resolver.
    #[arg(long = "allow-host", value_name = "NAME[:PORT]")]
    pub allow_hosts: Vec<String>,

    /// Allow an extra privilege: security.insecure lets `RUN --security=insecure` run without
    /// the sandbox's restrictions (masked /proc paths, reduced capabilities, no_new_privs).
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    pub allow: Vec<String>,

    /// An SSH agent for `RUN --mount=type=ssh`: ID (the agent at $SSH_AUTH_SOCK) or
    /// ID=SOCKET; `default` is the id mounts use when they name none.
    #[arg(long = "ssh", value_name = "ID[=SOCKET]")]
    pub ssh: Vec<String>,

    /// Import build cache: type=registry,ref=REF or type=local,src=DIR (repeatable).
    #[arg(long = "cache-from", value_name = "SPEC")]
    pub cache_from: Vec<String>,

    /// Export build cache: type=registry,ref=REF[,mode=min|max] or type=local,dest=DIR[,mode=...].
    #[arg(long = "cache-to", value_name = "SPEC")]
    pub cache_to: Vec<String>,

    /// A secret for `RUN --mount=type=secret`: id=ID,src=FILE or id=ID,env=VAR. It is mounted
    /// only while the step runs and never reaches a layer, the config or the cache key.
    #[arg(long = "secret", value_name = "id=ID,src=FILE|env=VAR")]
    pub secrets: Vec<String>,

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
    /// single-id or chroot. The build fails if it does not work here. `in-place` (never chosen
    /// on its own) runs the steps on this container's own filesystem, replacing it with the
    /// image's: only for a throwaway container that runs nothing else (see docs/detect.md).
    #[arg(long, value_name = "LEVEL", value_parser = ["root", "subordinate-ids", "single-id", "chroot", "in-place"])]
    pub isolation: Option<String>,

    /// Refuse to build with an isolation weaker than this (root > subordinate-ids > single-id >
    /// chroot > in-place).
    #[arg(long = "min-isolation", value_name = "LEVEL", value_parser = ["root", "subordinate-ids", "single-id", "chroot", "in-place"])]
    pub min_isolation: Option<String>,

    /// With --isolation in-place: leave PATH of this container alone, neither replaced by the
    /// image's files nor put in a layer, as kaniko's --ignore-path (repeatable). Mount points,
    /// /proc, /sys, /dev and shmocker's own files always are.
    #[arg(long = "ignore-path", value_name = "PATH")]
    pub ignore_paths: Vec<PathBuf>,

    /// In a single-ID build, give files and processes whose owner the build cannot map (COPY
    /// --chown, USER, WORKDIR) to 0 with a warning, instead of failing the step.
    #[arg(long = "ignore-chown-errors")]
    pub ignore_chown_errors: bool,

    /// How step rootfs are stacked: auto (the fastest that works), overlayfs, fuse-overlayfs or
    /// copy.
    #[arg(long, value_name = "NAME", default_value = "auto", value_parser = ["auto", "overlayfs", "fuse-overlayfs", "copy"])]
    pub snapshotter: String,

    /// Set a label on the image: KEY=VALUE (repeatable; wins over the Dockerfile's LABEL).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,

    /// How progress is shown: bars on a terminal (auto), plain lines, JSON lines, or nothing.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
}

#[derive(Debug, Args)]
pub struct CiArgs {
    /// Everything `build` takes. In `ci`, list values (`--tag`, `--label`, `--build-arg`,
    /// `--output`) may also hold several entries, newline-separated (tags also comma-separated),
    /// as the action's inputs do; with no `--tag`, tags are derived from the CI.
    #[command(flatten)]
    pub build: BuildArgs,

    /// Image names to tag with the derived tags (repeatable, or a comma/newline list).
    /// Default: ghcr.io/OWNER/REPO on GitHub, $CI_REGISTRY_IMAGE on GitLab.
    #[arg(long = "image", value_name = "NAME")]
    pub images: Vec<String>,

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

    /// Print what would be built (CI, tags, labels) as JSON and stop.
    #[arg(long = "dry-run")]
    pub dry_run: bool,

    /// On a GitHub pull request, post the build summary as a comment, and update that same
    /// comment on later runs (needs GITHUB_TOKEN with `pull-requests: write`).
    #[cfg(feature = "github-api")]
    #[arg(long = "pr-comment")]
    pub pr_comment: bool,
}
