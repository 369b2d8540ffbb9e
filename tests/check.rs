//! `shmocker check` as a user runs it (exit codes, the text and JSON outputs), and the checks a
//! build prints before it runs anything.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Who, env, scratch_dir, shmocker};

/// Runs `shmocker check ARGS...` in `dir`. A check needs no store, registry or user namespace.
fn check(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_shmocker"))
        .arg("check")
        .args(args)
        .current_dir(dir)
        .env_remove("SHMOCKER_ROOT")
        .output()
        .expect("running shmocker check");
    eprintln!(
        "--- shmocker check {args:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[test]
fn check_clean_dockerfile_exits_0() {
    let d = dir_with(&[("Dockerfile", "FROM alpine AS base\nCMD [\"sh\"]\n")]);
    let out = check(d.path(), &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
}

#[test]
fn check_warnings_exit_0_with_caret_output() {
    let d = dir_with(&[("Dockerfile", "FROM alpine as base\nWORKDIR app\n")]);
    let out = check(d.path(), &["."]);
    assert_eq!(out.status.code(), Some(0), "warnings alone do not fail");
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text,
        "./Dockerfile:1:13: warning: FromAsCasing: 'as' and 'FROM' keywords' casing do not match\n  \
         FROM alpine as base\n              ^^\n  \
         https://docs.docker.com/go/dockerfile/rule/from-as-casing/\n\n\
         ./Dockerfile:2:9: warning: WorkdirRelativePath: Relative workdir \"app\" can have unexpected results if the base image changes\n  \
         WORKDIR app\n          ^^^\n  \
         https://docs.docker.com/go/dockerfile/rule/workdir-relative-path/\n"
    );
}

#[test]
fn check_error_directive_exits_1() {
    let d = dir_with(&[(
        "app.Dockerfile",
        "# check=error=true;skip=WorkdirRelativePath\nFROM alpine\nWORKDIR app\nMAINTAINER me\n",
    )]);
    let out = check(d.path(), &["-f", "app.Dockerfile"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("app.Dockerfile:4:1: error: MaintainerDeprecated: "),
        "{text}"
    );
    assert!(!text.contains("WorkdirRelativePath"), "skipped");
}

#[test]
fn check_unparsable_dockerfile_exits_2_with_location() {
    let d = dir_with(&[("Dockerfile", "FROM alpine\n\n  FORM x\n")]);
    let out = check(d.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "./Dockerfile:3:3: error: unknown instruction: FORM (did you mean FROM?)"
    );
    // A broken `# check=` directive and a missing file are errors too.
    let d = dir_with(&[("Dockerfile", "# check=skip\nFROM alpine\n")]);
    let out = check(d.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "./Dockerfile:1:1: error: failed to parse check options: invalid check option \"skip\""
    ));
    let out = check(d.path(), &["-f", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read Dockerfile nope"));
}

#[test]
fn check_json_output_and_dockerignore() {
    let d = dir_with(&[
        (
            "Dockerfile",
            "# check=experimental=CopyIgnoredFile\nFROM alpine\nCOPY debug.log /x\nENV A 1\n",
        ),
        (".dockerignore", "*.log\n"),
    ]);
    let out = check(d.path(), &["--format", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(
        (v["errors"].as_u64(), v["warnings"].as_u64()),
        (Some(0), Some(2))
    );
    let findings = v["findings"].as_array().unwrap();
    assert_eq!(findings[0]["rule"], "CopyIgnoredFile");
    assert_eq!(
        findings[0]["message"],
        "Attempting to Copy file \"debug.log\" that is excluded by .dockerignore"
    );
    assert_eq!(findings[0]["file"], "./Dockerfile");
    assert_eq!(
        (
            &findings[0]["line"],
            &findings[0]["column"],
            &findings[0]["end_column"]
        ),
        (
            &serde_json::json!(3),
            &serde_json::json!(6),
            &serde_json::json!(14)
        )
    );
    assert_eq!(findings[1]["rule"], "LegacyKeyValueFormat");
    assert_eq!(findings[1]["level"], "warning");
    for key in [
        "rule",
        "level",
        "message",
        "url",
        "file",
        "line",
        "column",
        "end_line",
        "end_column",
    ] {
        assert!(findings[1].get(key).is_some(), "{key} missing");
    }
}

/// A build prints the same findings as warnings, and `error=true` stops it before any step runs.
#[test]
fn build_prints_check_warnings_and_error_true_stops_it() {
    let store = scratch_dir(Who::Root);
    let ctx = common::context(&[(
        "Dockerfile",
        &format!(
            "FROM {} as base\nRUN echo built > /built\n",
            env().busybox()
        ),
    )]);
    let out = shmocker(
        Who::Root,
        store.path(),
        &["build", ctx.path().to_str().unwrap()],
    );
    assert!(out.status.success(), "warnings do not fail a build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/Dockerfile:1:")
            && stderr
                .contains(": warning: FromAsCasing: 'as' and 'FROM' keywords' casing do not match"),
        "{stderr}"
    );
    assert!(stderr.contains("https://docs.docker.com/go/dockerfile/rule/from-as-casing/"));

    let ctx = common::context(&[(
        "Dockerfile",
        &format!(
            "# check=error=true\nFROM {} as base\nRUN echo built > /built\n",
            env().busybox()
        ),
    )]);
    let out = shmocker(
        Who::Root,
        store.path(),
        &["build", ctx.path().to_str().unwrap()],
    );
    assert!(!out.status.success(), "error=true fails the build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(": error: FromAsCasing: ")
            && stderr.contains("lint violation found for rules: FromAsCasing"),
        "{stderr}"
    );
    assert!(!stderr.contains("#1 ["), "no step ran: {stderr}");
}
