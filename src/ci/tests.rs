//! Each CI's documented variables replayed, and the tags and labels they give.

use super::metadata::{SemVer, derive, sanitize_tag, split_list, tag_names};
use super::*;

const SHA: &str = "90dd6032fac8bda1b6c4436a2e65de27961ed071";

fn ctx(pairs: &[(&str, &str)]) -> CiContext {
    detect(
        &Env::from_pairs(pairs.iter().copied()),
        None,
        None,
        Path::new("/nonexistent"),
    )
}

fn github_event(default_branch: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        f.path(),
        format!(r#"{{"repository":{{"default_branch":"{default_branch}"}}}}"#),
    )
    .unwrap();
    f
}

fn tags(c: &CiContext) -> Vec<String> {
    let image = c.default_image.clone().unwrap();
    derive(&c.git, &[image], "2026-01-01T00:00:00Z").tags
}

#[test]
fn github_push_to_the_default_branch() {
    let ev = github_event("main");
    let c = ctx(&[
        ("CI", "true"),
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_REF", "refs/heads/main"),
        ("GITHUB_REF_NAME", "main"),
        ("GITHUB_SHA", SHA),
        ("GITHUB_REPOSITORY", "Octo-Org/Hello-World"),
        ("GITHUB_SERVER_URL", "https://github.com"),
        ("GITHUB_RUN_ID", "42"),
        ("GITHUB_ACTOR", "octocat"),
        ("GITHUB_TOKEN", "ghs_secret"),
        ("GITHUB_WORKSPACE", "/home/runner/work/x"),
        ("GITHUB_EVENT_PATH", ev.path().to_str().unwrap()),
    ]);
    assert_eq!(c.provider, Provider::Github);
    assert!(!c.act);
    assert_eq!(
        c.default_image.as_deref(),
        Some("ghcr.io/Octo-Org/Hello-World")
    );
    assert_eq!(
        tags(&c),
        [
            "ghcr.io/octo-org/hello-world:main",
            "ghcr.io/octo-org/hello-world:latest",
            "ghcr.io/octo-org/hello-world:sha-90dd603",
        ]
    );
    let m = derive(&c.git, &["ghcr.io/o/r".into()], "2026-01-01T00:00:00Z");
    let l = |k: &str| m.labels[&format!("org.opencontainers.image.{k}")].clone();
    assert_eq!(l("source"), "https://github.com/Octo-Org/Hello-World");
    assert_eq!(l("url"), "https://github.com/Octo-Org/Hello-World");
    assert_eq!(l("title"), "Hello-World");
    assert_eq!(l("revision"), SHA);
    assert_eq!(l("version"), "main");
    assert_eq!(l("created"), "2026-01-01T00:00:00Z");
    assert_eq!(c.credentials.len(), 1);
    assert_eq!(c.credentials[0].registry, "ghcr.io");
    assert_eq!(c.credentials[0].username, "octocat");
    assert_eq!(
        c.job_url.as_deref(),
        Some("https://github.com/Octo-Org/Hello-World/actions/runs/42")
    );
}

#[test]
fn github_feature_branch_pull_request_and_semver_tags() {
    let ev = github_event("main");
    let base = [
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_SHA", SHA),
        ("GITHUB_REPOSITORY", "o/r"),
        ("GITHUB_EVENT_PATH", ev.path().to_str().unwrap()),
    ];
    let with = |r: &str| {
        let mut v = base.to_vec();
        v.push(("GITHUB_REF", r));
        ctx(&v)
    };
    assert_eq!(
        tags(&with("refs/heads/feature/New+Thing")),
        ["ghcr.io/o/r:feature-New-Thing", "ghcr.io/o/r:sha-90dd603"]
    );
    assert_eq!(
        tags(&with("refs/pull/17/merge")),
        ["ghcr.io/o/r:pr-17", "ghcr.io/o/r:sha-90dd603"]
    );
    assert_eq!(
        tags(&with("refs/tags/v1.2.3")),
        [
            "ghcr.io/o/r:1.2.3",
            "ghcr.io/o/r:1.2",
            "ghcr.io/o/r:1",
            "ghcr.io/o/r:sha-90dd603"
        ]
    );
    // A pre-release gets {{version}} only; major zero gets no {{major}}.
    assert_eq!(
        tags(&with("refs/tags/v2.0.8-beta.67")),
        ["ghcr.io/o/r:2.0.8-beta.67", "ghcr.io/o/r:sha-90dd603"]
    );
    assert_eq!(
        tags(&with("refs/tags/v0.1.2")),
        [
            "ghcr.io/o/r:0.1.2",
            "ghcr.io/o/r:0.1",
            "ghcr.io/o/r:sha-90dd603"
        ]
    );
    // A tag that is not a version is used as it is.
    assert_eq!(
        tags(&with("refs/tags/release-candidate")),
        ["ghcr.io/o/r:release-candidate", "ghcr.io/o/r:sha-90dd603"]
    );
}

#[test]
fn act_is_github() {
    let c = ctx(&[("ACT", "true"), ("GITHUB_REPOSITORY", "o/r")]);
    assert_eq!(c.provider, Provider::Github);
    assert!(c.act);
}

#[test]
fn gitlab_branch_tag_and_merge_request_pipelines() {
    let base = [
        ("GITLAB_CI", "true"),
        ("CI_COMMIT_SHA", SHA),
        ("CI_DEFAULT_BRANCH", "main"),
        ("CI_PROJECT_URL", "https://gitlab.example.com/Group/Proj"),
        ("CI_PROJECT_NAME", "Proj"),
        ("CI_PROJECT_DIR", "/builds/group/proj"),
        ("CI_REGISTRY", "registry.example.com"),
        ("CI_REGISTRY_IMAGE", "registry.example.com/Group/Proj"),
        ("CI_REGISTRY_USER", "gitlab-ci-token"),
        ("CI_REGISTRY_PASSWORD", "glcbt-secret"),
        (
            "CI_JOB_URL",
            "https://gitlab.example.com/Group/Proj/-/jobs/7",
        ),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        ctx(&v)
    };
    let main = with(&[("CI_COMMIT_BRANCH", "main"), ("CI_COMMIT_REF_NAME", "main")]);
    assert_eq!(main.provider, Provider::Gitlab);
    assert_eq!(
        tags(&main),
        [
            "registry.example.com/group/proj:main",
            "registry.example.com/group/proj:latest",
            "registry.example.com/group/proj:sha-90dd603"
        ]
    );
    assert_eq!(main.credentials[0].registry, "registry.example.com");
    assert_eq!(main.credentials[0].username, "gitlab-ci-token");
    assert_eq!(main.credentials[0].secret, "glcbt-secret");
    let mr = with(&[
        ("CI_MERGE_REQUEST_IID", "5"),
        ("CI_COMMIT_REF_NAME", "topic"),
    ]);
    assert_eq!(
        tags(&mr),
        [
            "registry.example.com/group/proj:pr-5",
            "registry.example.com/group/proj:sha-90dd603"
        ]
    );
    let tag = with(&[("CI_COMMIT_TAG", "v3.1.0")]);
    assert_eq!(
        tags(&tag)[..3],
        [
            "registry.example.com/group/proj:3.1.0",
            "registry.example.com/group/proj:3.1",
            "registry.example.com/group/proj:3"
        ]
    );
    let m = derive(&main.git, &["i".into()], "t");
    assert_eq!(
        m.labels["org.opencontainers.image.source"],
        "https://gitlab.example.com/Group/Proj"
    );
}

#[test]
fn gitlab_is_recognised_by_server_url_and_job_id() {
    let c = ctx(&[
        ("CI_SERVER_URL", "https://gitlab.example.com"),
        ("CI_JOB_ID", "9"),
    ]);
    assert_eq!(c.provider, Provider::Gitlab);
    assert_eq!(
        ctx(&[("CI_SERVER_URL", "https://gitlab.example.com")]).provider,
        Provider::None
    );
}

#[test]
fn circleci_branch_and_pull_request() {
    let base = [
        ("CI", "true"),
        ("CIRCLECI", "true"),
        ("CIRCLE_SHA1", SHA),
        ("CIRCLE_PROJECT_USERNAME", "org"),
        ("CIRCLE_PROJECT_REPONAME", "app"),
        ("CIRCLE_REPOSITORY_URL", "git@github.com:org/app.git"),
        ("CIRCLE_BUILD_URL", "https://circleci.com/gh/org/app/12"),
    ];
    let mut v = base.to_vec();
    v.push(("CIRCLE_BRANCH", "main"));
    let env = Env::from_pairs(v.iter().copied());
    let c = detect(&env, None, Some("main"), Path::new("/nonexistent"));
    assert_eq!(c.provider, Provider::Circleci);
    assert_eq!(
        c.git.repo_url.as_deref(),
        Some("https://github.com/org/app")
    );
    let t = tag_names(&c.git);
    assert_eq!(t, ["main", "latest", "sha-90dd603"]);
    // Without a default branch (CircleCI does not say), no `latest`.
    let c = detect(&env, None, None, Path::new("/nonexistent"));
    assert_eq!(tag_names(&c.git), ["main", "sha-90dd603"]);

    let mut v = base.to_vec();
    v.push(("CIRCLE_BRANCH", "pull/33"));
    v.push(("CIRCLE_PULL_REQUEST", "https://github.com/org/app/pull/33"));
    let c = ctx(&v);
    assert_eq!(tag_names(&c.git), ["pr-33", "sha-90dd603"]);
}

#[test]
fn registry_credentials_from_shmocker_variables_in_any_ci() {
    let req = run::Request {
        images: vec!["registry.example.com/team/app".into()],
        ..Default::default()
    };
    let base = [
        ("CIRCLECI", "true"),
        ("CIRCLE_SHA1", SHA),
        ("CIRCLE_BRANCH", "main"),
        ("SHMOCKER_REGISTRY", "registry.example.com"),
    ];
    let mut v = base.to_vec();
    v.push(("SHMOCKER_REGISTRY_USERNAME", "robot"));
    v.push(("SHMOCKER_REGISTRY_PASSWORD", "s3cret"));
    let plan = run::plan(&Env::from_pairs(v.iter().copied()), &req).unwrap();
    assert_eq!(plan.ctx.credentials.len(), 1);
    let c = &plan.ctx.credentials[0];
    assert_eq!(
        (c.registry.as_str(), c.username.as_str(), c.secret.as_str()),
        ("registry.example.com", "robot", "s3cret")
    );
    // Beside GitLab's own registry, not instead of it.
    let gl = [
        ("GITLAB_CI", "true"),
        ("CI_COMMIT_SHA", SHA),
        ("CI_REGISTRY", "registry.gitlab.com"),
        ("CI_REGISTRY_USER", "gitlab-ci-token"),
        ("CI_REGISTRY_PASSWORD", "job-token"),
        ("SHMOCKER_REGISTRY", "docker.io"),
        ("SHMOCKER_REGISTRY_USERNAME", "me"),
        ("SHMOCKER_REGISTRY_PASSWORD", "hub-token"),
    ];
    let plan = run::plan(&Env::from_pairs(gl), &req).unwrap();
    let regs: Vec<_> = plan
        .ctx
        .credentials
        .iter()
        .map(|c| c.registry.as_str())
        .collect();
    assert_eq!(regs, ["registry.gitlab.com", "docker.io"]);

    // Half a set is refused, naming what is missing, and the secret is never in the message.
    let mut v = base.to_vec();
    v.push(("SHMOCKER_REGISTRY_USERNAME", "robot"));
    let e = run::plan(&Env::from_pairs(v.iter().copied()), &req)
        .unwrap_err()
        .to_string();
    assert!(e.contains("SHMOCKER_REGISTRY_PASSWORD is empty"), "{e}");
    assert!(e.contains("registry.example.com"), "{e}");
    let mut v = base.to_vec();
    v.push(("SHMOCKER_REGISTRY_PASSWORD", "s3cret"));
    let e = run::plan(&Env::from_pairs(v.iter().copied()), &req)
        .unwrap_err()
        .to_string();
    assert!(e.contains("SHMOCKER_REGISTRY_USERNAME is empty"), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
}

#[test]
fn no_ci_and_provider_override() {
    let c = ctx(&[("CI", "true")]);
    assert_eq!(c.provider, Provider::None);
    assert!(c.default_image.is_none());
    let env = Env::from_pairs([("GITLAB_CI", "true")]);
    let c = detect(&env, Some(Provider::None), None, Path::new("/nonexistent"));
    assert_eq!(c.provider, Provider::None);
    assert_eq!(c.git, GitFacts::default());
}

#[test]
fn semver_parsing_follows_semver_2() {
    assert_eq!(SemVer::parse("v1.2.3").unwrap().version(), "1.2.3");
    assert_eq!(
        SemVer::parse("1.2.3-rc.1+b5").unwrap().version(),
        "1.2.3-rc.1+b5"
    );
    for bad in [
        "1.2",
        "1.2.3.4",
        "01.2.3",
        "x1.2.3",
        "1.2.3-",
        "1.2.3-a..b",
        "",
    ] {
        assert!(SemVer::parse(bad).is_none(), "{bad}");
    }
    // `+` cannot be in a tag.
    let g = GitFacts {
        tag: Some("v1.0.0+build.7".into()),
        ..Default::default()
    };
    assert_eq!(tag_names(&g), ["1.0.0-build.7", "1.0", "1"]);
}

#[test]
fn tags_are_sanitized() {
    assert_eq!(sanitize_tag("feature/a b"), "feature-a-b");
    assert_eq!(sanitize_tag("--x"), "x");
    assert_eq!(sanitize_tag(&"a".repeat(200)).len(), 128);
    assert_eq!(
        sanitize_tag("dependabot/npm_and_yarn/x-1.2"),
        "dependabot-npm_and_yarn-x-1.2"
    );
}

#[test]
fn list_inputs_split_like_build_push_action() {
    assert_eq!(
        split_list("a,b\nc\n\n# note\n d ", true),
        ["a", "b", "c", "d"]
    );
    assert_eq!(split_list("A=1,2\nB=3", false), ["A=1,2", "B=3"]);
}

#[test]
fn created_honours_source_date_epoch() {
    assert_eq!(
        metadata::created_time(Some("1700000000")),
        "2023-11-14T22:13:20Z"
    );
    assert!(metadata::created_time(None).ends_with('Z'));
}
