//! `shmocker ci`: a build driven by the CI system it runs in.
//!
//! A CI job is described by its environment. [`detect`] reads it into a [`CiContext`]: which
//! system (GitHub Actions, also under `act`; GitLab; CircleCI; none), which commit, branch, tag
//! or pull request, the repository's URL and default branch, the registry credentials the job
//! was given. [`metadata::derive`] turns that into image names, tags and OCI labels the way
//! docker/metadata-action does. The build itself is an ordinary [`crate::engine::build`];
//! its events go through the provider's reporter ([`github`], [`gitlab`]), which speaks the
//! CI's language (log groups, annotations), and afterwards [`reports`] writes what the CI
//! shows: GitHub's job summary and step outputs, GitLab's and CircleCI's junit, code quality
//! and dotenv reports.
//!
//! Nothing here reads the process environment directly: everything goes through [`Env`], so
//! the tests replay each CI's documented variables.

#[cfg(feature = "github-api")]
pub mod comment;
pub mod github;
pub mod gitlab;
pub mod metadata;
pub mod reports;
pub mod run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::registry::ExplicitCredentials;

/// A snapshot of environment variables (empty values count as unset, as CI systems set many
/// variables to "" when they do not apply).
#[derive(Debug, Clone, Default)]
pub struct Env(BTreeMap<String, String>);

impl Env {
    pub fn from_process() -> Env {
        Env(std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect())
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Env {
        Env(pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn is_true(&self, key: &str) -> bool {
        self.get(key)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}

/// The CI system a job runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// GitHub Actions (and nektos/act, which sets ACT=true as well).
    Github,
    Gitlab,
    Circleci,
    /// No CI: facts come from `git` in the context directory, if it is a repository.
    None,
}

impl Provider {
    /// Which CI the environment describes.
    pub fn detect(env: &Env) -> Provider {
        if env.is_true("GITHUB_ACTIONS") || env.is_true("ACT") {
            Provider::Github
        } else if env.is_true("GITLAB_CI")
            || (env.get("CI_SERVER_URL").is_some() && env.get("CI_JOB_ID").is_some())
        {
            Provider::Gitlab
        } else if env.is_true("CIRCLECI") {
            Provider::Circleci
        } else {
            Provider::None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Provider::Github => "GitHub Actions",
            Provider::Gitlab => "GitLab CI",
            Provider::Circleci => "CircleCI",
            Provider::None => "no CI",
        }
    }
}

/// What the CI says about the commit being built.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GitFacts {
    /// The full commit SHA.
    pub sha: Option<String>,
    /// The branch, when the job runs for a branch push.
    pub branch: Option<String>,
    /// The git tag, when the job runs for a tag.
    pub tag: Option<String>,
    /// The pull (merge) request number.
    pub pull_request: Option<u64>,
    pub default_branch: Option<String>,
    /// The repository's web page.
    pub repo_url: Option<String>,
    /// The repository's name (without owner), the image title.
    pub repo_name: Option<String>,
}

/// Everything `shmocker ci` takes from its environment.
#[derive(Debug, Clone)]
pub struct CiContext {
    pub provider: Provider,
    /// Running under nektos/act rather than on GitHub.
    pub act: bool,
    pub git: GitFacts,
    /// The image name when none is given: ghcr.io/<owner>/<repo>, $CI_REGISTRY_IMAGE.
    pub default_image: Option<String>,
    /// Registry credentials the job was given (never printed).
    pub credentials: Vec<ExplicitCredentials>,
    /// The job's web page, for summaries.
    pub job_url: Option<String>,
    /// The checkout directory, to show Dockerfile paths relative to it.
    pub workspace: Option<PathBuf>,
}

/// Reads the CI's environment. `provider` overrides detection; `default_branch` fills in what
/// the CI does not say (CircleCI never does). `context` is the build context, where `git` is
/// asked when there is no CI.
pub fn detect(
    env: &Env,
    provider: Option<Provider>,
    default_branch: Option<&str>,
    context: &Path,
) -> CiContext {
    let provider = provider.unwrap_or_else(|| Provider::detect(env));
    let mut ctx = match provider {
        Provider::Github => github_context(env),
        Provider::Gitlab => gitlab_context(env),
        Provider::Circleci => circleci_context(env),
        Provider::None => local_context(context),
    };
    if let Some(b) = default_branch.filter(|b| !b.is_empty()) {
        ctx.git.default_branch = Some(b.to_string());
    }
    ctx
}

fn github_context(env: &Env) -> CiContext {
    let mut git = GitFacts {
        sha: env.get("GITHUB_SHA").map(str::to_string),
        ..Default::default()
    };
    match env.get("GITHUB_REF") {
        Some(r) if r.starts_with("refs/heads/") => {
            git.branch = Some(r["refs/heads/".len()..].to_string());
        }
        Some(r) if r.starts_with("refs/tags/") => {
            git.tag = Some(r["refs/tags/".len()..].to_string());
        }
        Some(r) if r.starts_with("refs/pull/") => {
            // refs/pull/<number>/merge (or /head)
            git.pull_request = r["refs/pull/".len()..]
                .split('/')
                .next()
                .and_then(|n| n.parse().ok());
        }
        _ => {}
    }
    let server = env.get("GITHUB_SERVER_URL").unwrap_or("https://github.com");
    let repo = env.get("GITHUB_REPOSITORY");
    if let Some(repo) = repo {
        git.repo_url = Some(format!("{}/{repo}", server.trim_end_matches('/')));
        git.repo_name = repo.rsplit('/').next().map(str::to_string);
    }
    // The default branch is only in the event payload (`repository.default_branch`).
    if let Some(path) = env.get("GITHUB_EVENT_PATH")
        && let Ok(text) = std::fs::read_to_string(path)
        && let Ok(event) = serde_json::from_str::<serde_json::Value>(&text)
    {
        if let Some(b) = event
            .pointer("/repository/default_branch")
            .and_then(|v| v.as_str())
        {
            git.default_branch = Some(b.to_string());
        }
        if git.pull_request.is_none()
            && let Some(n) = event
                .pointer("/pull_request/number")
                .and_then(|v| v.as_u64())
        {
            git.pull_request = Some(n);
        }
    }
    let mut credentials = Vec::new();
    if let Some(token) = env.get("GITHUB_TOKEN") {
        credentials.push(ExplicitCredentials {
            registry: "ghcr.io".to_string(),
            // ghcr.io accepts any user name with a token; the actor is the honest one.
            username: env
                .get("GITHUB_ACTOR")
                .unwrap_or("github-actions")
                .to_string(),
            secret: token.to_string(),
            origin: "the github-token input (GITHUB_TOKEN)".to_string(),
        });
    }
    let job_url = match (repo, env.get("GITHUB_RUN_ID")) {
        (Some(repo), Some(run)) => Some(format!(
            "{}/{repo}/actions/runs/{run}",
            server.trim_end_matches('/')
        )),
        _ => None,
    };
    CiContext {
        provider: Provider::Github,
        act: env.is_true("ACT"),
        git,
        default_image: repo.map(|r| format!("ghcr.io/{r}")),
        credentials,
        job_url,
        workspace: env.get("GITHUB_WORKSPACE").map(PathBuf::from),
    }
}

fn gitlab_context(env: &Env) -> CiContext {
    let git = GitFacts {
        sha: env.get("CI_COMMIT_SHA").map(str::to_string),
        // CI_COMMIT_BRANCH is unset in merge request pipelines and for tags.
        branch: env.get("CI_COMMIT_BRANCH").map(str::to_string),
        tag: env.get("CI_COMMIT_TAG").map(str::to_string),
        pull_request: env.get("CI_MERGE_REQUEST_IID").and_then(|n| n.parse().ok()),
        default_branch: env.get("CI_DEFAULT_BRANCH").map(str::to_string),
        repo_url: env.get("CI_PROJECT_URL").map(str::to_string),
        repo_name: env.get("CI_PROJECT_NAME").map(str::to_string),
    };
    let mut credentials = Vec::new();
    if let (Some(registry), Some(user), Some(password)) = (
        env.get("CI_REGISTRY"),
        env.get("CI_REGISTRY_USER"),
        env.get("CI_REGISTRY_PASSWORD"),
    ) {
        credentials.push(ExplicitCredentials {
            registry: registry.to_string(),
            username: user.to_string(),
            secret: password.to_string(),
            origin: "CI_REGISTRY_USER/CI_REGISTRY_PASSWORD".to_string(),
        });
    }
    CiContext {
        provider: Provider::Gitlab,
        act: false,
        git,
        default_image: env.get("CI_REGISTRY_IMAGE").map(str::to_string),
        credentials,
        job_url: env.get("CI_JOB_URL").map(str::to_string),
        workspace: env.get("CI_PROJECT_DIR").map(PathBuf::from),
    }
}

/// `git@github.com:org/repo.git` or `https://github.com/org/repo.git` as a web URL.
fn web_url(repo_url: &str) -> String {
    let url = repo_url.trim_end_matches(".git");
    match url.strip_prefix("git@") {
        Some(rest) => format!("https://{}", rest.replacen(':', "/", 1)),
        None => url.to_string(),
    }
}

fn circleci_context(env: &Env) -> CiContext {
    // CIRCLE_PULL_REQUEST is the PR's URL (…/pull/42); CIRCLE_PR_NUMBER is only set for forks.
    let pull_request = env
        .get("CIRCLE_PR_NUMBER")
        .and_then(|n| n.parse().ok())
        .or_else(|| {
            env.get("CIRCLE_PULL_REQUEST")
                .and_then(|u| u.rsplit('/').next())
                .and_then(|n| n.parse().ok())
        });
    let git = GitFacts {
        sha: env.get("CIRCLE_SHA1").map(str::to_string),
        branch: env.get("CIRCLE_BRANCH").map(str::to_string),
        tag: env.get("CIRCLE_TAG").map(str::to_string),
        pull_request,
        default_branch: None,
        repo_url: env.get("CIRCLE_REPOSITORY_URL").map(web_url),
        repo_name: env.get("CIRCLE_PROJECT_REPONAME").map(str::to_string),
    };
    CiContext {
        provider: Provider::Circleci,
        act: false,
        git,
        default_image: None,
        credentials: Vec::new(),
        job_url: env.get("CIRCLE_BUILD_URL").map(str::to_string),
        workspace: env.get("CIRCLE_WORKING_DIRECTORY").map(PathBuf::from),
    }
}

/// Facts from `git` in the context directory; none when it is not a repository or git is
/// missing (a local build simply gets no derived tags).
fn local_context(context: &Path) -> CiContext {
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(context)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !s.is_empty()).then_some(s)
    };
    let facts = GitFacts {
        sha: git(&["rev-parse", "HEAD"]),
        branch: git(&["symbolic-ref", "--short", "-q", "HEAD"]),
        tag: git(&["describe", "--tags", "--exact-match", "HEAD"]),
        pull_request: None,
        default_branch: None,
        repo_url: git(&["remote", "get-url", "origin"]).map(|u| web_url(&u)),
        repo_name: git(&["rev-parse", "--show-toplevel"]).and_then(|top| {
            Path::new(&top)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        }),
    };
    CiContext {
        provider: Provider::None,
        act: false,
        git: facts,
        default_image: None,
        credentials: Vec::new(),
        job_url: None,
        workspace: git(&["rev-parse", "--show-toplevel"]).map(PathBuf::from),
    }
}

#[cfg(test)]
mod tests;
