//! The build summary as one sticky pull-request comment (cargo feature `github-api`, flag
//! `shmocker ci --pr-comment`, the action's `pr-comment` input).
//!
//! On a pull request, the job summary is also posted as a comment on the pull request, and the
//! same comment is updated by every later run rather than a new one added each time: the
//! comment carries the hidden marker [`MARKER`], and a run first looks for a comment with it
//! among the pull request's comments. Three calls of GitHub's REST API (version 2022-11-28),
//! made with the reqwest client the registry code already uses:
//!
//! - `GET  {api}/repos/{owner}/{repo}/issues/{number}/comments?per_page=100&page=N`
//!   (pull requests are issues for comments; pages until one has fewer than 100 entries);
//! - `PATCH {api}/repos/{owner}/{repo}/issues/comments/{id}` with `{"body": ...}` when found;
//! - `POST  {api}/repos/{owner}/{repo}/issues/{number}/comments` with `{"body": ...}` otherwise.
//!
//! (Not octocrab: it would bring a second HTTP stack — hyper-util's client, tower,
//! hyper-rustls with ring — next to reqwest, for these three calls.) The token is the job's
//! `GITHUB_TOKEN`, which needs `pull-requests: write`; it is sent only as the Authorization
//! header, never printed. A comment that cannot be posted is a warning: the build's result
//! stands.

use std::time::Duration;

use serde::Deserialize;

/// Marks the comment this tool owns (invisible when GitHub renders the Markdown).
pub const MARKER: &str = "<!-- shmocker:build-summary -->";

/// GitHub refuses comment bodies longer than this many characters.
pub const MAX_BODY_CHARS: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum CommentError {
    #[error("{what} {url}: {source}")]
    Http {
        what: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "{what} {url}: GitHub answered {status}: {message}{hint}",
        hint = hint(*status)
    )]
    Status {
        what: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("starting the HTTP client: {0}")]
    Runtime(std::io::Error),
}

fn hint(status: u16) -> &'static str {
    match status {
        401 => " (the token is missing or invalid: give the action's github-token)",
        403 | 404 => {
            " (the token may not write comments: give the workflow `permissions: pull-requests: write`; pull requests from forks get a read-only token)"
        }
        _ => "",
    }
}

/// Where the comment goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// `https://api.github.com` (`$GITHUB_API_URL`; GitHub Enterprise has its own).
    pub api: String,
    /// `owner/repo` (`$GITHUB_REPOSITORY`).
    pub repo: String,
    pub pull_request: u64,
}

/// What [`upsert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created { id: u64 },
    Updated { id: u64 },
}

#[derive(Deserialize)]
struct Comment {
    id: u64,
    #[serde(default)]
    body: Option<String>,
}

/// The comment's text: the marker, then `summary`, cut to GitHub's limit with a pointer to
/// the job's page where the whole summary is.
pub fn body(summary: &str, job_url: Option<&str>) -> String {
    let mut text = format!("{MARKER}\n{summary}");
    if text.chars().count() > MAX_BODY_CHARS {
        let note = match job_url {
            Some(u) => format!(
                "\n\n… (cut to GitHub's comment limit; the whole summary is on [the job's page]({u}))\n"
            ),
            None => {
                "\n\n… (cut to GitHub's comment limit; the whole summary is in the job's summary)\n"
                    .to_string()
            }
        };
        let keep = MAX_BODY_CHARS - note.chars().count();
        text = text.chars().take(keep).collect();
        text.push_str(&note);
    }
    text
}

/// Creates the sticky comment, or updates the one an earlier run made.
pub async fn upsert(target: &Target, token: &str, body: &str) -> Result<Outcome, CommentError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .user_agent(concat!("shmocker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|source| CommentError::Http {
            what: "making a client for",
            url: target.api.clone(),
            source,
        })?;
    let api = target.api.trim_end_matches('/');
    let request = |method: reqwest::Method, url: &str| {
        client
            .request(method, url)
            .bearer_auth(token)
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28")
    };
    let send = |what: &'static str, url: String, req: reqwest::RequestBuilder| async move {
        let resp = req.send().await.map_err(|source| CommentError::Http {
            what,
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    v.get("message")
                        .and_then(|m| m.as_str().map(str::to_string))
                })
                .unwrap_or(text);
            return Err(CommentError::Status {
                what,
                url,
                status: status.as_u16(),
                message,
            });
        }
        Ok(resp)
    };

    let mut existing = None;
    for page in 1.. {
        let url = format!(
            "{api}/repos/{}/issues/{}/comments?per_page=100&page={page}",
            target.repo, target.pull_request
        );
        let resp = send(
            "listing the comments of",
            url.clone(),
            request(reqwest::Method::GET, &url),
        )
        .await?;
        let comments: Vec<Comment> = json(resp, "reading the comments of", &url).await?;
        if let Some(c) = comments
            .iter()
            .find(|c| c.body.as_deref().is_some_and(|b| b.contains(MARKER)))
        {
            existing = Some(c.id);
            break;
        }
        if comments.len() < 100 {
            break;
        }
    }
    let payload = serde_json::json!({ "body": body }).to_string();
    match existing {
        Some(id) => {
            let url = format!("{api}/repos/{}/issues/comments/{id}", target.repo);
            send(
                "updating the comment",
                url.clone(),
                request(reqwest::Method::PATCH, &url)
                    .header("Content-Type", "application/json")
                    .body(payload),
            )
            .await?;
            Ok(Outcome::Updated { id })
        }
        None => {
            let url = format!(
                "{api}/repos/{}/issues/{}/comments",
                target.repo, target.pull_request
            );
            let resp = send(
                "commenting on",
                url.clone(),
                request(reqwest::Method::POST, &url)
                    .header("Content-Type", "application/json")
                    .body(payload),
            )
            .await?;
            let made: Comment = json(resp, "reading the new comment from", &url).await?;
            Ok(Outcome::Created { id: made.id })
        }
    }
}

/// A JSON response body.
async fn json<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
    what: &'static str,
    url: &str,
) -> Result<T, CommentError> {
    let bytes = resp.bytes().await.map_err(|source| CommentError::Http {
        what,
        url: url.to_string(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| CommentError::Status {
        what,
        url: url.to_string(),
        status: 200,
        message: format!("not the JSON GitHub documents: {e}"),
    })
}

/// [`upsert`] from synchronous code (after the build's runtime has ended).
pub fn upsert_blocking(target: &Target, token: &str, body: &str) -> Result<Outcome, CommentError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CommentError::Runtime)?;
    rt.block_on(upsert(target, token, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_marked_and_cut_to_githubs_limit() {
        let b = body("### ✅ built", None);
        assert!(b.starts_with(MARKER) && b.ends_with("### ✅ built"));
        let long = "é".repeat(100_000);
        let b = body(&long, Some("https://github.com/o/r/actions/runs/1"));
        assert_eq!(b.chars().count(), MAX_BODY_CHARS);
        assert!(b.starts_with(MARKER));
        assert!(b.ends_with("[the job's page](https://github.com/o/r/actions/runs/1))\n"));
    }
}
