//! One `shmocker ci` run, around the build: [`plan`] before it (what to build, with which
//! tags, labels and credentials, reported how), [`after_build`] once it ended (reporter closed,
//! GitHub outputs and job summary, report files).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::reports::{self, BuildFacts};
use super::{CiContext, Env, Provider, github, gitlab, metadata};
use crate::engine::{BuildError, BuildOptions, BuildResult};
use crate::progress::{Fanout, ProgressMode, Recorder, Reporter, Reporting, StageOrder};
use crate::registry::ExplicitCredentials;

#[derive(Debug, thiserror::Error)]
pub enum CiError {
    #[error(
        "no image name: {0} does not provide one; name it with --image REGISTRY/NAME (the action's `tags` input, or `images`)"
    )]
    NoImage(&'static str),
    #[error(
        "no tags could be derived from {0} (no branch, tag, pull request or commit in its environment); give full names with --tag REGISTRY/NAME:TAG"
    )]
    NoTags(&'static str),
    #[error(
        "SHMOCKER_REGISTRY is {registry} but {missing} is empty: set both SHMOCKER_REGISTRY_USERNAME and SHMOCKER_REGISTRY_PASSWORD (the CircleCI orb fills them from the variables named by its registry-username and registry-password parameters), or unset SHMOCKER_REGISTRY"
    )]
    IncompleteCredentials {
        registry: String,
        missing: &'static str,
    },
    #[error("{what} {path}: {source}")]
    Write {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the CI asks for, decided before the build starts.
#[derive(Debug, Clone)]
pub struct Plan {
    pub ctx: CiContext,
    /// Full image references to tag (and push).
    pub tags: Vec<String>,
    /// Labels for the image: derived OCI labels, overridden by the user's.
    pub labels: BTreeMap<String, String>,
    /// True when the tags came from the CI rather than from --tag.
    pub derived: bool,
    /// See [`Request::pr_comment`].
    pub pr_comment: bool,
}

/// The inputs of [`plan`] that come from the command line.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub provider: Option<Provider>,
    pub default_branch: Option<String>,
    pub context: PathBuf,
    /// Image names to tag with derived tags (default: the CI's).
    pub images: Vec<String>,
    /// Full references; when given, nothing is derived.
    pub tags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Whether the image is pushed (derived tags then need an image name).
    pub push: bool,
    /// Post the summary as a sticky pull-request comment (GitHub, feature `github-api`).
    pub pr_comment: bool,
}

pub fn plan(env: &Env, req: &Request) -> Result<Plan, CiError> {
    let mut ctx = super::detect(
        env,
        req.provider,
        req.default_branch.as_deref(),
        &req.context,
    );
    if let Some(c) = env_credentials(env)? {
        ctx.credentials.push(c);
    }
    let created = metadata::created_time(env.get("SOURCE_DATE_EPOCH"));
    let images: Vec<String> = if req.images.is_empty() {
        ctx.default_image.iter().cloned().collect()
    } else {
        req.images.clone()
    };
    let meta = metadata::derive(&ctx.git, &images, &created);
    let derived = req.tags.is_empty();
    let tags = if derived {
        if images.is_empty() && req.push {
            return Err(CiError::NoImage(ctx.provider.name()));
        }
        if meta.tags.is_empty() && req.push {
            return Err(CiError::NoTags(ctx.provider.name()));
        }
        meta.tags.clone()
    } else {
        req.tags.clone()
    };
    let mut labels = meta.labels;
    labels.extend(req.labels.clone());
    Ok(Plan {
        ctx,
        tags,
        labels,
        derived,
        pr_comment: req.pr_comment,
    })
}

/// Credentials for one more registry, in any CI: `SHMOCKER_REGISTRY` (a host, e.g.
/// `registry.example.com` or `docker.io`), `SHMOCKER_REGISTRY_USERNAME` and
/// `SHMOCKER_REGISTRY_PASSWORD` (a password or token). CircleCI has no registry of its own, so
/// this is how its orb logs in; on GitHub and GitLab it adds a registry beside ghcr.io or
/// `$CI_REGISTRY`. Half a set is an error rather than an anonymous push that fails later.
fn env_credentials(env: &Env) -> Result<Option<ExplicitCredentials>, CiError> {
    let Some(registry) = env.get("SHMOCKER_REGISTRY") else {
        return Ok(None);
    };
    let missing = |name| CiError::IncompleteCredentials {
        registry: registry.to_string(),
        missing: name,
    };
    let username = env
        .get("SHMOCKER_REGISTRY_USERNAME")
        .ok_or_else(|| missing("SHMOCKER_REGISTRY_USERNAME"))?;
    let secret = env
        .get("SHMOCKER_REGISTRY_PASSWORD")
        .ok_or_else(|| missing("SHMOCKER_REGISTRY_PASSWORD"))?;
    Ok(Some(ExplicitCredentials {
        registry: registry.to_string(),
        username: username.to_string(),
        secret: secret.to_string(),
        origin: "SHMOCKER_REGISTRY_USERNAME/SHMOCKER_REGISTRY_PASSWORD".to_string(),
    }))
}

/// The reporter for this CI and `--progress`, and the recorder that feeds the reports.
///
/// `auto` on GitHub or GitLab means their log language; an explicit mode is honoured as is
/// (GitHub's secrets are masked all the same, by [`mask_secrets`]).
pub fn reporter(ctx: &CiContext, mode: ProgressMode) -> (Reporting, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::new());
    let shown: Arc<dyn Reporter> = match (ctx.provider, mode) {
        // Log groups and sections hold one stage each, so parallel stages are shown in turn.
        // Step output is capped as in every text log (progress::limited).
        (Provider::Github, ProgressMode::Auto) => crate::progress::limited(StageOrder::new(
            github::GithubReporter::stdout(ctx.workspace.clone()),
        )),
        (Provider::Gitlab, ProgressMode::Auto) => {
            crate::progress::limited(StageOrder::new(gitlab::GitlabReporter::stdout()))
        }
        (Provider::None, m) => m.reporter(),
        // In a CI, auto never means bars: there is no terminal to draw them on.
        (_, ProgressMode::Auto) => ProgressMode::Plain.reporter(),
        (_, m) => m.reporter(),
    };
    let fan = Fanout(vec![shown, recorder.clone() as Arc<dyn Reporter>]);
    (Reporting::new(fan), recorder)
}

/// On GitHub, tells the runner to hide every secret the job handed over, before any output.
pub fn mask_secrets(ctx: &CiContext) {
    if ctx.provider == Provider::Github {
        let r = github::GithubReporter::stdout(None);
        for c in &ctx.credentials {
            r.mask(&c.secret);
        }
    }
}

/// Where report files go: `--report-dir`, else `shmocker-reports` in the project on GitLab
/// and `/tmp/shmocker-reports` on CircleCI (the orb stores both as artifacts); none elsewhere.
pub fn report_dir(ctx: &CiContext, given: Option<&Path>) -> Option<PathBuf> {
    if let Some(d) = given {
        return Some(d.to_path_buf());
    }
    match ctx.provider {
        Provider::Gitlab => Some(
            ctx.workspace
                .clone()
                .unwrap_or_else(|| PathBuf::from("."))
                .join("shmocker-reports"),
        ),
        Provider::Circleci => Some(PathBuf::from("/tmp/shmocker-reports")),
        _ => None,
    }
}

/// Size (config plus layers, compressed) and layer count of the built manifest, from the
/// store; `None` when it cannot be read.
fn manifest_facts(store_root: &Path, digest: &str) -> Option<(u64, usize)> {
    let store = crate::store::Store::open(store_root).ok()?;
    let raw = store.read_bytes(digest).ok()?;
    let m: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    let layers = m.get("layers")?.as_array()?;
    let size = m
        .pointer("/config/size")
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
        + layers
            .iter()
            .filter_map(|l| l.get("size").and_then(|s| s.as_u64()))
            .sum::<u64>();
    Some((size, layers.len()))
}

/// Closes the reporter and writes what the CI shows: GitHub's outputs and job summary (when
/// `$GITHUB_OUTPUT` / `$GITHUB_STEP_SUMMARY` are set), and the report files in `report_dir`.
/// Runs for failed builds too, so the summary and junit name the failing step.
pub fn after_build(
    env: &Env,
    plan: &Plan,
    opts: &BuildOptions,
    recorder: &Recorder,
    result: &Result<BuildResult, BuildError>,
    report_dir: Option<&Path>,
) -> Result<(), CiError> {
    opts.reporter.finish();
    let dockerfile = opts
        .dockerfile
        .clone()
        .unwrap_or_else(|| opts.context.join("Dockerfile"));
    let mut facts = BuildFacts {
        provider: plan.ctx.provider.name().to_string(),
        tags: plan.tags.clone(),
        mode: format!(
            "{}; snapshotter {}",
            opts.mapping.describe(),
            opts.snapshotter.name()
        ),
        record: recorder.snapshot(),
        job_url: plan.ctx.job_url.clone(),
        repo_url: plan.ctx.git.repo_url.clone(),
        workspace: plan.ctx.workspace.clone(),
        ..Default::default()
    };
    facts.dockerfile = facts.relative(&dockerfile.display().to_string());
    let mut metadata = None;
    match result {
        Ok(r) => {
            facts.digest = Some(r.manifest.digest.clone());
            facts.image_id = Some(r.config_digest.clone());
            facts.pushed = r.pushed.clone();
            if let Some((size, layers)) = manifest_facts(&opts.store_root, &r.manifest.digest) {
                facts.size = Some(size);
                facts.layers = Some(layers);
            }
            metadata = Some(reports::metadata_json(
                &r.config_digest,
                &r.manifest,
                &plan.tags,
            ));
        }
        Err(e) => facts.error = Some(e.to_string()),
    }
    let write_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CiError::Write { what, path, source }
    };
    if plan.ctx.provider == Provider::Github {
        if let (Some(path), Ok(r)) = (env.get("GITHUB_OUTPUT"), result) {
            let path = Path::new(path);
            let meta = metadata
                .as_ref()
                .map(|m| serde_json::to_string(m).unwrap_or_default())
                .unwrap_or_default();
            github::write_outputs(
                path,
                &[
                    ("imageid", r.config_digest.clone()),
                    ("digest", r.manifest.digest.clone()),
                    ("metadata", meta),
                ],
            )
            .map_err(write_err("writing step outputs to $GITHUB_OUTPUT", path))?;
        }
        #[cfg(feature = "github-api")]
        if plan.pr_comment {
            pr_comment(env, plan, &facts);
        }
        if let Some(path) = env.get("GITHUB_STEP_SUMMARY") {
            let path = Path::new(path);
            let text = reports::summary_markdown(&facts);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
                .map_err(write_err(
                    "writing the job summary to $GITHUB_STEP_SUMMARY",
                    path,
                ))?;
        }
    }
    if let Some(dir) = report_dir {
        reports::write_all(dir, &facts, metadata.as_ref())
            .map_err(write_err("writing reports to", dir))?;
    }
    Ok(())
}

/// `--pr-comment`: the summary as the pull request's sticky comment; what happened is said on
/// standard error, and a failure is a warning, never the build's result.
#[cfg(feature = "github-api")]
fn pr_comment(env: &Env, plan: &Plan, facts: &BuildFacts) {
    use super::comment;
    let Some(number) = plan.ctx.git.pull_request else {
        eprintln!("--pr-comment: this run is not for a pull request; no comment");
        return;
    };
    let (Some(repo), Some(token)) = (env.get("GITHUB_REPOSITORY"), env.get("GITHUB_TOKEN")) else {
        eprintln!(
            "warning: --pr-comment: no GITHUB_REPOSITORY or GITHUB_TOKEN (the action's github-token) in the environment; no comment"
        );
        return;
    };
    let target = comment::Target {
        api: env
            .get("GITHUB_API_URL")
            .unwrap_or("https://api.github.com")
            .to_string(),
        repo: repo.to_string(),
        pull_request: number,
    };
    let body = comment::body(
        &reports::summary_markdown(facts),
        plan.ctx.job_url.as_deref(),
    );
    match comment::upsert_blocking(&target, token, &body) {
        Ok(comment::Outcome::Created { id }) => {
            eprintln!("commented on pull request #{number} (comment {id})")
        }
        Ok(comment::Outcome::Updated { id }) => {
            eprintln!("updated the comment on pull request #{number} (comment {id})")
        }
        Err(e) => eprintln!("warning: --pr-comment: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_without_an_image_name_says_what_to_give() {
        let env = Env::from_pairs([("CIRCLECI", "true"), ("CIRCLE_BRANCH", "main")]);
        let req = Request {
            context: "/nonexistent".into(),
            push: true,
            ..Default::default()
        };
        let err = plan(&env, &req).unwrap_err().to_string();
        assert!(err.contains("CircleCI") && err.contains("--image"), "{err}");

        let req = Request {
            images: vec!["Reg.example/App".into()],
            labels: [(
                "org.opencontainers.image.title".to_string(),
                "mine".to_string(),
            )]
            .into(),
            ..req
        };
        let p = plan(&env, &req).unwrap();
        assert!(p.derived);
        assert_eq!(p.tags, ["reg.example/app:main"]);
        assert_eq!(p.labels["org.opencontainers.image.title"], "mine");
    }

    #[test]
    fn explicit_tags_win_over_derived_ones() {
        let env = Env::from_pairs([("GITHUB_ACTIONS", "true"), ("GITHUB_REPOSITORY", "o/r")]);
        let req = Request {
            context: "/nonexistent".into(),
            tags: vec!["127.0.0.1:5055/x:1".into()],
            push: true,
            ..Default::default()
        };
        let p = plan(&env, &req).unwrap();
        assert!(!p.derived);
        assert_eq!(p.tags, ["127.0.0.1:5055/x:1"]);
    }
}
