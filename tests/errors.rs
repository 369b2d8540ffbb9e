//! Bad input: each case exits non-zero with a short, precise message, and pushes nothing.

mod common;

use common::{Who, context, env, remote_exists, scratch_dir, shmocker, unique_ref};

/// Builds `files` as `who` with `--push`, expects failure; returns stderr.
fn fails(who: Who, files: &[(&str, &str)], extra: &[&str]) -> (String, String) {
    let ctx = context(files);
    let store = scratch_dir(who);
    let tag = unique_ref("bad");
    let mut args = vec!["build", "-t", &tag, "--push"];
    args.extend_from_slice(extra);
    let ctx_path = ctx.path().to_str().unwrap().to_string();
    args.push(&ctx_path);
    let out = shmocker(who, store.path(), &args);
    assert!(!out.status.success(), "the build should have failed");
    assert!(!remote_exists(&tag), "a failed build pushed {tag}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
    (stderr, ctx_path)
}

#[test]
fn missing_dockerfile() {
    let (err, ctx) = fails(Who::User, &[("README", "x")], &[]);
    assert!(
        err.contains(&format!("cannot read Dockerfile {ctx}/Dockerfile")),
        "{err}"
    );
    assert!(err.contains("-f FILE"), "says what to do: {err}");
}

#[test]
fn missing_dockerfile_given_with_f() {
    let (err, _) = fails(
        Who::Root,
        &[("Dockerfile", "FROM scratch\n")],
        &["-f", "/nonexistent/Dockerfile.x"],
    );
    assert!(
        err.contains("cannot read Dockerfile /nonexistent/Dockerfile.x"),
        "{err}"
    );
}

#[test]
fn missing_context() {
    let store = scratch_dir(Who::Root);
    let tag = unique_ref("bad");
    let out = shmocker(
        Who::Root,
        store.path(),
        &["build", "-t", &tag, "--push", "/nonexistent-context"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("build context /nonexistent-context"), "{err}");
    assert!(!remote_exists(&tag));
}

#[test]
fn syntax_error_has_file_line_and_column() {
    let (err, ctx) = fails(
        Who::User,
        &[("Dockerfile", "FROM scratch\nCOPY a /a\nFROBNICATE now\n")],
        &[],
    );
    assert!(err.contains(&format!("{ctx}/Dockerfile:3:1")), "{err}");
    assert!(err.to_lowercase().contains("frobnicate"), "{err}");
}

#[test]
fn unknown_base_image_tag() {
    let image = format!("{}/base/busybox:no-such-tag", env().registry());
    let (err, ctx) = fails(
        Who::User,
        &[("Dockerfile", &format!("FROM {image}\nRUN true\n"))],
        &[],
    );
    assert!(err.contains(&format!("{ctx}/Dockerfile:1:1")), "{err}");
    assert!(err.contains("no-such-tag"), "names the tag: {err}");
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn unknown_base_repository() {
    let image = format!("{}/no/such-repo:1", env().registry());
    let (err, _) = fails(
        Who::Root,
        &[("Dockerfile", &format!("FROM {image}\n"))],
        &[],
    );
    assert!(err.contains("no/such-repo"), "{err}");
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn failing_run_reports_code_line_and_output() {
    let dockerfile = format!(
        "FROM {}\nRUN echo fine\nRUN echo first-line && echo the-last-words >&2 && exit 3\nRUN echo never\n",
        env().busybox()
    );
    let (err, ctx) = fails(Who::User, &[("Dockerfile", &dockerfile)], &[]);
    assert!(err.contains(&format!("{ctx}/Dockerfile:3:1")), "{err}");
    assert!(err.contains("exit code: 3"), "{err}");
    assert!(
        err.contains("the-last-words"),
        "shows the step's last output: {err}"
    );
    assert!(
        !err.contains("#4 [4/4]"),
        "stops at the failing step: {err}"
    );
}

#[test]
fn missing_command_in_run() {
    let dockerfile = format!("FROM {}\nRUN [\"/no/such/program\"]\n", env().busybox());
    let (err, ctx) = fails(Who::User, &[("Dockerfile", &dockerfile)], &[]);
    assert!(err.contains(&format!("{ctx}/Dockerfile:2:1")), "{err}");
    assert!(err.contains("/no/such/program"), "{err}");
}

#[test]
fn unreachable_registry() {
    // Port 9 (discard) on loopback: nothing listens there.
    let ctx = context(&[("Dockerfile", "FROM scratch\nCOPY f /f\n"), ("f", "x")]);
    let store = scratch_dir(Who::User);
    let out = shmocker(
        Who::User,
        store.path(),
        &[
            "build",
            "-t",
            "127.0.0.1:9/demo/app:1",
            "--push",
            ctx.path().to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("127.0.0.1:9"), "names the registry: {err}");
}

#[test]
fn unreachable_base_registry() {
    let (err, ctx) = fails(
        Who::Root,
        &[("Dockerfile", "FROM 127.0.0.1:9/base/x:1\n")],
        &[],
    );
    assert!(err.contains(&format!("{ctx}/Dockerfile:1:1")), "{err}");
    assert!(err.contains("127.0.0.1:9"), "{err}");
}

#[test]
fn copy_source_missing() {
    let (err, ctx) = fails(
        Who::User,
        &[("Dockerfile", "FROM scratch\nCOPY nothere /x\n")],
        &[],
    );
    assert!(err.contains(&format!("{ctx}/Dockerfile:2:1")), "{err}");
    assert!(err.contains("nothere"), "{err}");
}

#[test]
fn copy_from_a_stage_without_the_source_names_the_stage() {
    let dockerfile = format!(
        "FROM {} AS tools\nRUN echo x > /made\nFROM scratch\nCOPY --from=tools /not-made /x\n",
        env().busybox()
    );
    let (err, ctx) = fails(Who::User, &[("Dockerfile", &dockerfile)], &[]);
    assert!(err.contains(&format!("{ctx}/Dockerfile:4:1")), "{err}");
    assert!(
        err.contains("/not-made: not found in --from=tools"),
        "{err}"
    );
    // Not the build context, and no path inside shmocker's store.
    assert!(!err.contains("build context"), "{err}");
    assert!(!err.contains("/tmp/step-"), "{err}");
}

#[test]
fn copy_source_outside_context() {
    let (err, _) = fails(
        Who::User,
        &[("Dockerfile", "FROM scratch\nCOPY ../etc/passwd /x\n")],
        &[],
    );
    assert!(err.contains("outside the build context"), "{err}");
}

#[test]
fn push_without_a_tag() {
    let ctx = context(&[("Dockerfile", "FROM scratch\n")]);
    let store = scratch_dir(Who::Root);
    let out = shmocker(
        Who::Root,
        store.path(),
        &["build", "--push", ctx.path().to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--push needs at least one image name"));
}
