//! Image tags and labels from the git context, by docker/metadata-action's rules.
//!
//! The tags, highest priority first (metadata-action's priorities: semver 900, ref 600, raw
//! 200, sha 100):
//!
//! - a git tag that is a semantic version (`v1.2.3`, `1.2.3-rc.1`): `{{version}}` (`1.2.3`),
//!   and for a release (no pre-release part) also `{{major}}.{{minor}}` (`1.2`) and `{{major}}`
//!   (`1`), except for major version zero, whose `0` would promise a stability semver does
//!   not (metadata-action's "Major version zero" note);
//! - a git tag that is not a version: the tag itself;
//! - a branch: the branch name, with every run of characters a tag cannot hold (`/`, `+`, ...)
//!   made `-`;
//! - a pull or merge request: `pr-<number>`;
//! - the default branch also gets `latest`;
//! - always, when the commit is known: `sha-<first 7 hex digits>`.
//!
//! A tag holds `[A-Za-z0-9_.-]`, starts with neither `.` nor `-`, and has at most 128
//! characters. Image names are lower-cased (GitHub owners and repositories may not be).
//!
//! Labels are the OCI annotations metadata-action sets: `org.opencontainers.image.title`
//! (the repository's name), `source` and `url` (its web page), `revision` (the commit),
//! `created` (now, or `SOURCE_DATE_EPOCH`), `version` (the highest-priority tag).

use std::collections::BTreeMap;

use super::GitFacts;

/// Tags and labels for a build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Metadata {
    /// Full references: `ghcr.io/owner/repo:main`.
    pub tags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// The highest-priority tag (without the image name).
    pub version: Option<String>,
}

/// A parsed semantic version (semver 2.0), as a git tag may hold one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SemVer {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    pub pre: Option<String>,
    pub build: Option<String>,
}

impl SemVer {
    /// Parses `1.2.3`, `v1.2.3`, `1.2.3-rc.1+build.5` (a leading `v` or `=` is dropped, as
    /// node-semver's `clean` does); anything else is not a version.
    pub fn parse(tag: &str) -> Option<SemVer> {
        let s = tag.trim().trim_start_matches(['=', 'v', 'V']);
        let (s, build) = match s.split_once('+') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let (core, pre) = match s.split_once('-') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let num = |p: &str| -> Option<u64> {
            if p.is_empty() || (p.len() > 1 && p.starts_with('0')) {
                return None;
            }
            if !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let ident_ok = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|id| {
                    !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        };
        let mut parts = core.split('.');
        let (major, minor, patch) = (
            num(parts.next()?)?,
            num(parts.next()?)?,
            num(parts.next()?)?,
        );
        if parts.next().is_some() {
            return None;
        }
        if pre.is_some_and(|p| !ident_ok(p)) || build.is_some_and(|b| !ident_ok(b)) {
            return None;
        }
        Some(SemVer {
            major,
            minor,
            patch,
            pre: pre.map(str::to_string),
            build: build.map(str::to_string),
        })
    }

    /// `{{version}}`: the cleaned version, with its pre-release and build parts.
    pub fn version(&self) -> String {
        let mut s = format!("{}.{}.{}", self.major, self.minor, self.patch);
        if let Some(p) = &self.pre {
            s.push('-');
            s.push_str(p);
        }
        if let Some(b) = &self.build {
            s.push('+');
            s.push_str(b);
        }
        s
    }
}

/// A string made a valid tag: runs of other characters become `-`, no leading `.` or `-`,
/// at most 128 characters.
pub fn sanitize_tag(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_bad_run = false;
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
            out.push(c);
            in_bad_run = false;
        } else if !in_bad_run {
            out.push('-');
            in_bad_run = true;
        }
    }
    let trimmed = out.trim_start_matches(['.', '-']);
    trimmed.chars().take(128).collect()
}

/// The tags (without image names) for `git`, highest priority first, without duplicates.
pub fn tag_names(git: &GitFacts) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    if let Some(tag) = &git.tag {
        match SemVer::parse(tag) {
            Some(v) => {
                tags.push(v.version());
                if v.pre.is_none() {
                    tags.push(format!("{}.{}", v.major, v.minor));
                    if v.major > 0 {
                        tags.push(v.major.to_string());
                    }
                }
            }
            None => tags.push(tag.clone()),
        }
    }
    if let Some(n) = git.pull_request {
        tags.push(format!("pr-{n}"));
    } else if let Some(branch) = &git.branch {
        tags.push(branch.clone());
    }
    if git.pull_request.is_none()
        && git.tag.is_none()
        && git.branch.is_some()
        && git.branch == git.default_branch
    {
        tags.push("latest".to_string());
    }
    if let Some(sha) = &git.sha {
        tags.push(format!("sha-{}", &sha[..sha.len().min(7)]));
    }
    let mut seen = std::collections::HashSet::new();
    tags.into_iter()
        .map(|t| sanitize_tag(&t))
        .filter(|t| !t.is_empty() && seen.insert(t.clone()))
        .collect()
}

/// Tags for every image and the OCI labels. `created` is an RFC 3339 time.
pub fn derive(git: &GitFacts, images: &[String], created: &str) -> Metadata {
    let names = tag_names(git);
    let tags = images
        .iter()
        .map(|i| i.to_ascii_lowercase())
        .flat_map(|image| names.iter().map(move |t| format!("{image}:{t}")))
        .collect();
    let mut labels = BTreeMap::new();
    let mut put = |k: &str, v: Option<&String>| {
        if let Some(v) = v {
            labels.insert(format!("org.opencontainers.image.{k}"), v.clone());
        }
    };
    put("title", git.repo_name.as_ref());
    put("source", git.repo_url.as_ref());
    put("url", git.repo_url.as_ref());
    put("revision", git.sha.as_ref());
    put("version", names.first());
    put("created", Some(&created.to_string()));
    Metadata {
        tags,
        labels,
        version: names.first().cloned(),
    }
}

/// The `created` time: `SOURCE_DATE_EPOCH` when set (reproducible builds), else now.
pub fn created_time(source_date_epoch: Option<&str>) -> String {
    source_date_epoch
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|secs| jiff::Timestamp::from_second(secs).ok())
        .map(|t| t.to_string())
        .unwrap_or_else(crate::image::now_rfc3339)
}

/// Splits a list input on newlines, and on commas too when `commas` (blank and `#` comment
/// lines dropped), as docker/build-push-action reads its list inputs: `tags` split on both,
/// `build-args` and `labels` on newlines only, since their values may hold commas.
pub fn split_list(input: &str, commas: bool) -> Vec<String> {
    input
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| {
            if commas {
                l.split(',').collect::<Vec<_>>()
            } else {
                vec![l]
            }
        })
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}
