//! Known CI environments, as data: one YAML file per environment in `matrix/`, embedded in the
//! binary. Each names its fingerprint (environment variables, files, /proc/self/status fields),
//! the constraints it usually puts on a build, and the fix for each problem `detect` can name,
//! in that environment's own terms (a workflow's `options:`, a runner's `config.toml`, a pod's
//! `securityContext`). See docs/detect.md for the format.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One file of `matrix/`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    pub id: String,
    pub name: String,
    /// The troubleshooting page its fixes belong to: docs/troubleshooting/<ci>.md.
    pub ci: String,
    pub fingerprint: Fingerprint,
    #[serde(default)]
    pub constraints: Vec<String>,
    /// Problem id (see `detect::Problem`) -> what to do about it here.
    #[serde(default)]
    pub fixes: BTreeMap<String, String>,
    /// Where the facts come from (vendor documentation).
    #[serde(default)]
    pub sources: Vec<String>,
}

/// Every condition must hold; the environment with the most conditions that all hold wins.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    /// Variable -> value; `"*"` means "set to anything".
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub env_absent: Vec<String>,
    #[serde(default)]
    pub files: Vec<String>,
    #[serde(default)]
    pub files_absent: Vec<String>,
    /// Path -> a string the file must contain.
    #[serde(default)]
    pub file_contains: BTreeMap<String, String>,
    /// A field of /proc/self/status -> its value (e.g. `NoNewPrivs: "1"`).
    #[serde(default)]
    pub proc_status: BTreeMap<String, String>,
}

macro_rules! matrix_files {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../matrix/", $name)))),*]
    };
}

/// The embedded files, (file name, text).
pub const FILES: &[(&str, &str)] = matrix_files!(
    "github-ubuntu-22.04.yaml",
    "github-ubuntu-24.04.yaml",
    "github-container-job.yaml",
    "github-arc-kubernetes.yaml",
    "gitlab-hosted.yaml",
    "gitlab-docker-executor.yaml",
    "gitlab-kubernetes-executor.yaml",
    "circleci-docker.yaml",
    "circleci-machine.yaml",
    "act.yaml",
    "kubernetes-pss-baseline.yaml",
    "kubernetes-pss-restricted.yaml",
    "alpine.yaml",
    "rhel-8.yaml",
    "rhel-9.yaml",
);

#[derive(Debug, thiserror::Error)]
#[error("matrix/{file}: {message}")]
pub struct MatrixError {
    pub file: String,
    pub message: String,
}

/// Parses every embedded file.
pub fn environments() -> Result<Vec<Environment>, MatrixError> {
    FILES
        .iter()
        .map(|(file, text)| {
            let env: Environment = serde_saphyr::from_str(text).map_err(|e| MatrixError {
                file: file.to_string(),
                message: e.to_string(),
            })?;
            if format!("{}.yaml", env.id) != *file {
                return Err(MatrixError {
                    file: file.to_string(),
                    message: format!("id {:?} does not match the file name", env.id),
                });
            }
            Ok(env)
        })
        .collect()
}

/// Reads a file's text, if it exists.
pub type ReadFile = Box<dyn Fn(&str) -> Option<String>>;

/// What a fingerprint is checked against; [`Host::current`] reads this process's.
pub struct Host {
    pub env: BTreeMap<String, String>,
    pub exists: Box<dyn Fn(&str) -> bool>,
    pub read: ReadFile,
    pub status: BTreeMap<String, String>,
}

impl Host {
    pub fn current(status: BTreeMap<String, String>) -> Host {
        Host {
            env: std::env::vars().collect(),
            exists: Box::new(|p| std::path::Path::new(p).exists()),
            read: Box::new(|p| std::fs::read_to_string(p).ok()),
            status,
        }
    }
}

impl Fingerprint {
    /// The number of conditions, when all hold.
    pub fn score(&self, host: &Host) -> Option<usize> {
        let env_ok = self.env.iter().all(|(k, v)| match host.env.get(k) {
            Some(actual) => v == "*" || actual == v,
            None => false,
        });
        let ok = env_ok
            && self.env_absent.iter().all(|k| !host.env.contains_key(k))
            && self.files.iter().all(|f| (host.exists)(f))
            && self.files_absent.iter().all(|f| !(host.exists)(f))
            && self
                .file_contains
                .iter()
                .all(|(f, s)| (host.read)(f).is_some_and(|t| t.contains(s.as_str())))
            && self
                .proc_status
                .iter()
                .all(|(k, v)| host.status.get(k) == Some(v));
        let n = self.env.len()
            + self.env_absent.len()
            + self.files.len()
            + self.files_absent.len()
            + self.file_contains.len()
            + self.proc_status.len();
        (ok && n > 0).then_some(n)
    }
}

/// The environment whose fingerprint holds with the most conditions.
pub fn recognise<'a>(envs: &'a [Environment], host: &Host) -> Option<&'a Environment> {
    envs.iter()
        .filter_map(|e| e.fingerprint.score(host).map(|s| (s, e)))
        .max_by_key(|(s, _)| *s)
        .map(|(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(env: &[(&str, &str)], files: &'static [&'static str]) -> Host {
        Host {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            exists: Box::new(move |p| files.contains(&p)),
            read: Box::new(|_| None),
            status: BTreeMap::new(),
        }
    }

    #[test]
    fn every_matrix_file_parses_and_names_its_problems() {
        let envs = environments().unwrap();
        assert_eq!(envs.len(), FILES.len());
        for e in &envs {
            assert!(
                ["github", "gitlab", "circleci", "kubernetes", "local"].contains(&e.ci.as_str()),
                "{}: unknown ci {:?}",
                e.id,
                e.ci
            );
            assert!(!e.sources.is_empty(), "{}: no sources", e.id);
            for problem in e.fixes.keys() {
                assert!(
                    super::super::Problem::from_id(problem).is_some(),
                    "{}: unknown problem id {problem:?}",
                    e.id
                );
            }
        }
    }

    #[test]
    fn the_most_specific_fingerprint_wins() {
        let envs = environments().unwrap();
        let gh24 = host(
            &[
                ("GITHUB_ACTIONS", "true"),
                ("RUNNER_ENVIRONMENT", "github-hosted"),
                ("ImageOS", "ubuntu24"),
            ],
            &[],
        );
        assert_eq!(recognise(&envs, &gh24).unwrap().id, "github-ubuntu-24.04");
        let job = host(&[("GITHUB_ACTIONS", "true")], &["/.dockerenv"]);
        assert_eq!(recognise(&envs, &job).unwrap().id, "github-container-job");
        let gl = host(&[("GITLAB_CI", "true")], &["/.dockerenv"]);
        assert_eq!(recognise(&envs, &gl).unwrap().id, "gitlab-docker-executor");
        let act = host(
            &[("GITHUB_ACTIONS", "true"), ("ACT", "true")],
            &["/.dockerenv"],
        );
        assert_eq!(recognise(&envs, &act).unwrap().id, "act");
        assert!(recognise(&envs, &host(&[], &[])).is_none());
    }
}
