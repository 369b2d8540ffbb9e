//! One test per rule (a Dockerfile that triggers it, one that does not), the `# check=`
//! directive, and the output formats. Messages are BuildKit's, byte for byte.

use super::*;
use crate::dockerfile::parse;

fn run_with(src: &str, ignore: Option<&Dockerignore>) -> Report {
    let parsed = parse(src).unwrap_or_else(|e| panic!("{e}"));
    check(src, &parsed, ignore).unwrap_or_else(|e| panic!("{e}"))
}

fn run(src: &str) -> Report {
    run_with(src, None)
}

/// The findings of one rule as (line, message).
fn of(report: &Report, rule: &str) -> Vec<(usize, String)> {
    report
        .findings
        .iter()
        .filter(|f| f.rule == rule)
        .map(|f| (f.line, f.message.clone()))
        .collect()
}

fn one(line: usize, msg: &str) -> Vec<(usize, String)> {
    vec![(line, msg.to_string())]
}

fn none() -> Vec<(usize, String)> {
    Vec::new()
}

#[test]
fn stage_name_casing() {
    let r = run("FROM alpine AS BaseImage\nRUN true\n");
    assert_eq!(
        of(&r, "StageNameCasing"),
        one(1, "Stage name 'BaseImage' should be lowercase")
    );
    let f = &r.findings[0];
    assert_eq!((f.column, f.end_column), (16, 24));
    assert_eq!(
        f.url,
        "https://docs.docker.com/go/dockerfile/rule/stage-name-casing/"
    );
    assert_eq!(of(&run("FROM alpine AS base\n"), "StageNameCasing"), none());
}

#[test]
fn from_as_casing() {
    let r = run("FROM alpine as base\n");
    assert_eq!(
        of(&r, "FromAsCasing"),
        one(1, "'as' and 'FROM' keywords' casing do not match")
    );
    assert_eq!((r.findings[0].column, r.findings[0].end_column), (13, 14));
    let r = run("from alpine AS base\n");
    assert_eq!(
        of(&r, "FromAsCasing"),
        one(1, "'AS' and 'from' keywords' casing do not match")
    );
    assert_eq!(of(&run("FROM alpine AS base\n"), "FromAsCasing"), none());
    assert_eq!(of(&run("from alpine as base\n"), "FromAsCasing"), none());
    // Mixed-case FROM is ConsistentInstructionCasing's business, not this rule's.
    assert_eq!(of(&run("From alpine as base\n"), "FromAsCasing"), none());
}

#[test]
fn no_empty_continuation() {
    let r = run("FROM alpine\nRUN echo a \\\n\n  b\n");
    assert_eq!(
        of(&r, "NoEmptyContinuation"),
        one(4, "Empty continuation line")
    );
    assert_eq!(
        of(
            &run("FROM alpine\nRUN echo a \\\n  b\n"),
            "NoEmptyContinuation"
        ),
        none()
    );
}

#[test]
fn consistent_instruction_casing() {
    let r = run("FROM alpine\nrun echo\nRUN echo\nCopy a b\n");
    assert_eq!(
        of(&r, "ConsistentInstructionCasing"),
        vec![
            (
                2,
                "Command 'run' should match the case of the command majority (uppercase)"
                    .to_string()
            ),
            (
                4,
                "Command 'Copy' should match the case of the command majority (uppercase)"
                    .to_string()
            ),
        ]
    );
    let r = run("from alpine\nrun echo\nRUN echo\n");
    assert_eq!(
        of(&r, "ConsistentInstructionCasing"),
        one(
            3,
            "Command 'RUN' should match the case of the command majority (lowercase)"
        )
    );
    // Global ARGs before the first FROM are not counted.
    let r = run("arg A=1\nARG B=2\nFROM alpine\n");
    assert_eq!(of(&r, "ConsistentInstructionCasing"), none());
}

#[test]
fn duplicate_and_reserved_stage_names() {
    let r = run("FROM alpine AS b\nFROM alpine AS B\nFROM alpine AS scratch\n");
    assert_eq!(
        of(&r, "DuplicateStageName"),
        one(
            2,
            "Duplicate stage name \"b\", stage names should be unique"
        )
    );
    assert_eq!(
        of(&r, "ReservedStageName"),
        one(
            3,
            "Stage name should not use the same name as reserved stage \"scratch\""
        )
    );
    let r = run("FROM alpine AS a\nFROM alpine AS b\n");
    assert!(of(&r, "DuplicateStageName").is_empty() && of(&r, "ReservedStageName").is_empty());
}

#[test]
fn json_args_recommended() {
    let r = run("FROM alpine\nENTRYPOINT my-app start\nCMD [\"x\"]\n");
    assert_eq!(
        of(&r, "JSONArgsRecommended"),
        one(
            2,
            "JSON arguments recommended for ENTRYPOINT to prevent unintended behavior related to OS signals"
        )
    );
    // An explicit SHELL means the shell form is intended.
    let r = run("FROM alpine\nSHELL [\"/bin/bash\", \"-c\"]\nCMD my-app\n");
    assert_eq!(of(&r, "JSONArgsRecommended"), none());
    // ... and is inherited by a stage built on this one.
    let r = run("FROM alpine AS a\nSHELL [\"/bin/sh\", \"-c\"]\nFROM a\nCMD my-app\n");
    assert_eq!(of(&r, "JSONArgsRecommended"), none());
}

#[test]
fn maintainer_deprecated() {
    let r = run("FROM alpine\nMAINTAINER me <me@example.com>\n");
    assert_eq!(
        of(&r, "MaintainerDeprecated"),
        one(
            2,
            "Maintainer instruction is deprecated in favor of using label"
        )
    );
    assert_eq!(
        of(
            &run("FROM alpine\nLABEL org.opencontainers.image.authors=me\n"),
            "MaintainerDeprecated"
        ),
        none()
    );
}

#[test]
fn undefined_arg_in_from() {
    let r = run("FROM node:22${VARIANT}\n");
    assert_eq!(
        of(&r, "UndefinedArgInFrom"),
        one(1, "FROM argument 'VARIANT' is not declared")
    );
    let f = &r.findings[0];
    assert_eq!((f.column, f.end_column), (13, 22));
    let r = run("ARG VERSION=3\nFROM alpine:$VERSIO\n");
    assert_eq!(
        of(&r, "UndefinedArgInFrom"),
        one(
            2,
            "FROM argument 'VERSIO' is not declared (did you mean VERSION?)"
        )
    );
    // Declared globally (with or without a value), or predefined.
    for src in [
        "ARG VARIANT=-alpine\nFROM node:22${VARIANT}\n",
        "ARG VARIANT\nFROM node:22${VARIANT}\n",
        "FROM --platform=$BUILDPLATFORM golang AS build\n",
        "FROM busybox:${TARGETARCH}\n",
    ] {
        assert_eq!(of(&run(src), "UndefinedArgInFrom"), none(), "{src}");
    }
    // A platform flag is checked too.
    let r = run("FROM --platform=$PLATFROM alpine\n");
    assert_eq!(
        of(&r, "UndefinedArgInFrom"),
        one(1, "FROM argument 'PLATFROM' is not declared")
    );
}

#[test]
fn workdir_relative_path() {
    let r = run("FROM alpine\nWORKDIR app\nWORKDIR more\n");
    assert_eq!(
        of(&r, "WorkdirRelativePath"),
        one(
            2,
            "Relative workdir \"app\" can have unexpected results if the base image changes"
        )
    );
    assert_eq!(
        of(
            &run("FROM alpine\nWORKDIR /app\nWORKDIR sub\n"),
            "WorkdirRelativePath"
        ),
        none()
    );
    // An absolute WORKDIR in the parent stage counts.
    assert_eq!(
        of(
            &run("FROM alpine AS a\nWORKDIR /app\nFROM a\nWORKDIR sub\n"),
            "WorkdirRelativePath"
        ),
        none()
    );
    // The expanded value decides.
    assert_eq!(
        of(
            &run("FROM alpine\nARG D=/srv\nWORKDIR $D\n"),
            "WorkdirRelativePath"
        ),
        none()
    );
}

#[test]
fn undefined_var_scoping() {
    let r = run("FROM alpine\nENV PATH=$PAHT:/opt/bin\nCOPY $SRC /dst\n");
    assert_eq!(
        of(&r, "UndefinedVar"),
        vec![
            (
                2,
                "Usage of undefined variable '$PAHT' (did you mean $PATH?)".to_string()
            ),
            (3, "Usage of undefined variable '$SRC'".to_string()),
        ]
    );
    let f = r
        .findings
        .iter()
        .find(|f| f.rule == "UndefinedVar")
        .unwrap();
    assert_eq!((f.line, f.column, f.end_column), (2, 10, 14));
    // A global ARG is not visible in a stage until it is redeclared there ...
    let r = run("ARG V=1\nFROM alpine\nLABEL v=$V\n");
    assert_eq!(
        of(&r, "UndefinedVar"),
        one(3, "Usage of undefined variable '$V'")
    );
    // ... after which it is, with or without a value of its own.
    for src in [
        "ARG V=1\nFROM alpine\nARG V\nLABEL v=$V\n",
        "FROM alpine\nARG V\nLABEL v=$V\n",
        "FROM alpine\nARG TARGETARCH\nLABEL arch=$TARGETARCH\n",
        "FROM alpine\nENV A=1\nENV B=$A\n",
        // Proxy ARGs are predefined.
        "FROM alpine\nENV P=$HTTP_PROXY\n",
        // A parent stage's ENV and ARG carry over.
        "FROM alpine AS a\nENV A=1\nARG B\nFROM a\nLABEL x=$A y=$B\n",
        // RUN is expanded by the shell, not by the builder.
        "FROM alpine\nRUN echo $NOPE\n",
        // A quoted heredoc body is not expanded.
        "FROM alpine\nCOPY <<'EOF' /f\n$NOPE\nEOF\n",
    ] {
        assert_eq!(of(&run(src), "UndefinedVar"), none(), "{src}");
    }
    // Platform ARGs are global: inside a stage they need `ARG NAME` like any other.
    let r = run("FROM alpine\nLABEL arch=$TARGETARCH\n");
    assert_eq!(
        of(&r, "UndefinedVar"),
        one(2, "Usage of undefined variable '$TARGETARCH'")
    );
    // An ENV uses the values from before the instruction.
    let r = run("FROM alpine\nENV A=1 B=$A\n");
    assert_eq!(
        of(&r, "UndefinedVar"),
        one(2, "Usage of undefined variable '$A'")
    );
    // An unquoted heredoc body of COPY is expanded.
    let r = run("FROM alpine\nCOPY <<EOF /f\n$NOPE\nEOF\n");
    assert_eq!(
        of(&r, "UndefinedVar"),
        one(2, "Usage of undefined variable '$NOPE'")
    );
    // Stages do not see each other's variables unless built on one another.
    let r = run("FROM alpine AS a\nENV A=1\nFROM alpine\nLABEL a=$A\n");
    assert_eq!(
        of(&r, "UndefinedVar"),
        one(4, "Usage of undefined variable '$A'")
    );
}

#[test]
fn multiple_instructions_disallowed() {
    let r = run(
        "FROM alpine\nCMD [\"a\"]\nCMD [\"b\"]\nENTRYPOINT [\"e\"]\nHEALTHCHECK NONE\nHEALTHCHECK CMD [\"t\"]\n",
    );
    assert_eq!(
        of(&r, "MultipleInstructionsDisallowed"),
        vec![
            (
                2,
                "Multiple CMD instructions should not be used in the same stage because only the last one will be used"
                    .to_string()
            ),
            (
                5,
                "Multiple HEALTHCHECK instructions should not be used in the same stage because only the last one will be used"
                    .to_string()
            ),
        ]
    );
    // One per stage is fine.
    let r = run("FROM alpine AS a\nCMD [\"a\"]\nFROM a\nCMD [\"b\"]\n");
    assert_eq!(of(&r, "MultipleInstructionsDisallowed"), none());
}

#[test]
fn legacy_key_value_format() {
    let r = run("FROM alpine\nENV A 1\nlabel b c\nENV C=1\n");
    assert_eq!(
        of(&r, "LegacyKeyValueFormat"),
        vec![
            (
                2,
                "\"ENV key=value\" should be used instead of legacy \"ENV key value\" format"
                    .to_string()
            ),
            (
                3,
                "\"label key=value\" should be used instead of legacy \"label key value\" format"
                    .to_string()
            ),
        ]
    );
    assert_eq!(
        of(
            &run("FROM alpine\nENV A=1 B=2\nLABEL c=d\n"),
            "LegacyKeyValueFormat"
        ),
        none()
    );
}

#[test]
fn redundant_target_platform() {
    let r = run("FROM --platform=$TARGETPLATFORM alpine\n");
    assert_eq!(
        of(&r, "RedundantTargetPlatform"),
        one(
            1,
            "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior"
        )
    );
    assert_eq!((r.findings[0].column, r.findings[0].end_column), (6, 15));
    let r = run("FROM --platform=${TARGETPLATFORM} alpine\n");
    assert_eq!(of(&r, "RedundantTargetPlatform").len(), 1);
    assert_eq!(
        of(
            &run("FROM --platform=$BUILDPLATFORM alpine\n"),
            "RedundantTargetPlatform"
        ),
        none()
    );
}

#[test]
fn secrets_used_in_arg_or_env() {
    let r = run(
        "FROM alpine\nARG github_token\nENV DATABASE_PASSWORD=x AUTH=y\nENV PUBLIC_KEY=k\nARG KEYBOARD=us\n",
    );
    assert_eq!(
        of(&r, "SecretsUsedInArgOrEnv"),
        vec![
            (
                2,
                "Do not use ARG or ENV instructions for sensitive data (ARG \"github_token\")"
                    .to_string()
            ),
            (
                3,
                "Do not use ARG or ENV instructions for sensitive data (ENV \"DATABASE_PASSWORD\")"
                    .to_string()
            ),
            (
                3,
                "Do not use ARG or ENV instructions for sensitive data (ENV \"AUTH\")".to_string()
            ),
        ]
    );
    // Global ARGs are not checked (BuildKit checks ARGs as a stage declares them).
    assert_eq!(
        of(
            &run("ARG API_KEY=x\nFROM alpine\n"),
            "SecretsUsedInArgOrEnv"
        ),
        none()
    );
}

#[test]
fn invalid_default_arg_in_from() {
    let r = run("ARG TAG\nFROM busybox:${TAG}\n");
    assert_eq!(
        of(&r, "InvalidDefaultArgInFrom"),
        one(
            2,
            "Default value for ARG busybox:${TAG} results in empty or invalid base image name"
        )
    );
    // An empty default is only a warning: the build may be given --build-arg IMAGE=...
    let r = run("ARG IMAGE\nFROM $IMAGE\nFROM ${X:?required}\n");
    assert_eq!(of(&r, "InvalidDefaultArgInFrom").len(), 1);
    for src in [
        "ARG TAG=1.36\nFROM busybox:${TAG}\n",
        "ARG TAG\nFROM busybox:${TAG:-latest}\n",
        "FROM 127.0.0.1:5000/team/app@sha256:0000000000000000000000000000000000000000000000000000000000000000\n",
    ] {
        assert_eq!(of(&run(src), "InvalidDefaultArgInFrom"), none(), "{src}");
    }
    let r = run("ARG R=Upper/Case\nFROM $R\n");
    assert_eq!(of(&r, "InvalidDefaultArgInFrom").len(), 1);
}

#[test]
fn from_platform_flag_const_disallowed() {
    let r = run("FROM --platform=linux/amd64 alpine AS builder\n");
    assert_eq!(
        of(&r, "FromPlatformFlagConstDisallowed"),
        one(
            1,
            "FROM --platform flag should not use constant value \"linux/amd64\""
        )
    );
    for src in [
        // The stage name says what the platform is for.
        "FROM --platform=linux/amd64 alpine AS build_amd64\n",
        "FROM --platform=linux/arm64 alpine AS linux-base\n",
        "FROM --platform=$BUILDPLATFORM alpine\n",
        // Not a platform: left to fail later.
        "FROM --platform=not/a/valid/one alpine\n",
    ] {
        assert_eq!(
            of(&run(src), "FromPlatformFlagConstDisallowed"),
            none(),
            "{src}"
        );
    }
}

#[test]
fn copy_ignored_file_is_experimental() {
    let ignore = Dockerignore::parse("*.log\nsecrets/\n").unwrap();
    let src = "# check=experimental=CopyIgnoredFile\nFROM alpine\nCOPY app.log ./secrets/k /dst/\nADD debug.log /x\nCOPY --from=alpine app.log /y\nCOPY <<EOF /z\nhi\nEOF\n";
    let r = run_with(src, Some(&ignore));
    assert_eq!(
        of(&r, "CopyIgnoredFile"),
        vec![
            (
                3,
                "Attempting to Copy file \"app.log\" that is excluded by .dockerignore".to_string()
            ),
            (
                3,
                "Attempting to Copy file \"secrets/k\" that is excluded by .dockerignore"
                    .to_string()
            ),
            (
                4,
                "Attempting to Add file \"debug.log\" that is excluded by .dockerignore"
                    .to_string()
            ),
        ]
    );
    // Off unless enabled, and off when the .dockerignore has exceptions.
    let plain = src.replacen("# check=experimental=CopyIgnoredFile\n", "", 1);
    assert_eq!(
        of(&run_with(&plain, Some(&ignore)), "CopyIgnoredFile"),
        none()
    );
    let with_exception = Dockerignore::parse("*.log\n!keep.log\n").unwrap();
    assert_eq!(
        of(&run_with(src, Some(&with_exception)), "CopyIgnoredFile"),
        none()
    );
    assert_eq!(of(&run_with(src, None), "CopyIgnoredFile"), none());
}

#[test]
fn invalid_definition_description_is_experimental() {
    let src = "# check=experimental=InvalidDefinitionDescription\n\n# the version to build\nARG VERSION=1\n\n# the base stage\nFROM alpine AS base\n# VERSION2 another\nARG VERSION2\n\n# Foo is ignored: a blank line follows\n\nFROM base AS foo\n";
    let r = run(src);
    assert_eq!(
        of(&r, "InvalidDefinitionDescription"),
        vec![
            (
                4,
                "Comment for ARG should follow the format: `# VERSION <description>`".to_string()
            ),
            (
                7,
                "Comment for FROM should follow the format: `# base <description>`".to_string()
            ),
        ]
    );
    let r = run("# check=experimental=all\n# A and B\nARG A B\nFROM alpine\n");
    assert_eq!(
        of(&r, "InvalidDefinitionDescription"),
        none(),
        "the first word names one of the keys"
    );
    let r = run("# check=experimental=all\n# what\nARG A B\nFROM alpine\n");
    assert_eq!(
        of(&r, "InvalidDefinitionDescription"),
        one(
            3,
            "Comment for ARG should follow the format: `# <arg_key> <description>`"
        )
    );
    assert_eq!(
        of(
            &run("# base stage\nFROM alpine AS x\n"),
            "InvalidDefinitionDescription"
        ),
        none(),
        "experimental: off by default"
    );
}

#[test]
fn expose_rules() {
    let r = run("FROM alpine\nEXPOSE 80/TcP 443/tcp 127.0.0.1:8080:80 53:53/udp\n");
    assert_eq!(
        of(&r, "ExposeProtoCasing"),
        one(
            2,
            "Defined protocol '80/TcP' in EXPOSE instruction should be lowercase"
        )
    );
    assert_eq!(
        of(&r, "ExposeInvalidFormat"),
        vec![
            (
                2,
                "EXPOSE instruction should not define an IP address or host-port mapping, found '127.0.0.1:8080:80'"
                    .to_string()
            ),
            (
                2,
                "EXPOSE instruction should not define an IP address or host-port mapping, found '53:53/udp'"
                    .to_string()
            ),
        ]
    );
    let r = run("FROM alpine\nARG P=8080\nEXPOSE 80 $P/udp 9000-9010\n");
    assert!(of(&r, "ExposeProtoCasing").is_empty() && of(&r, "ExposeInvalidFormat").is_empty());
}

#[test]
fn check_directive_skip_error_and_experimental() {
    let src = "FROM alpine as base\nMAINTAINER me\n";
    assert_eq!(run(src).findings.len(), 2);
    let r = run(&format!("# check=skip=FromAsCasing\n{src}"));
    assert_eq!(
        r.findings.iter().map(|f| f.rule).collect::<Vec<_>>(),
        ["MaintainerDeprecated"]
    );
    let r = run(&format!(
        "# check=skip=FromAsCasing, MaintainerDeprecated\n{src}"
    ));
    assert!(r.findings.is_empty());
    let r = run(&format!("# check=skip=all\n{src}"));
    assert!(r.findings.is_empty());
    let r = run(&format!("# check=error=true\n{src}"));
    assert_eq!((r.errors(), r.warnings()), (2, 0));
    assert!(r.findings.iter().all(|f| f.level == Level::Error));
    let r = run(&format!(
        "# check=skip=MaintainerDeprecated;error=true\n{src}"
    ));
    assert_eq!((r.errors(), r.warnings()), (1, 0));
    // skip=all does not turn off experimental rules that are asked for.
    let r = run(
        "# check=skip=all;experimental=InvalidDefinitionDescription\n# x\nFROM alpine AS base\n",
    );
    assert_eq!(
        r.findings.iter().map(|f| f.rule).collect::<Vec<_>>(),
        ["InvalidDefinitionDescription"]
    );
    assert_eq!(run(&format!("# check=\n{src}")).findings.len(), 2);
}

#[test]
fn check_directive_errors() {
    for (directive, message) in [
        (
            "skip",
            "failed to parse check options: invalid check option \"skip\"",
        ),
        (
            "foo=bar",
            "failed to parse check options: invalid check option \"foo\"",
        ),
        (
            "error=maybe",
            "failed to parse check options: failed to parse check option \"error=maybe\": strconv.ParseBool: parsing \"maybe\": invalid syntax",
        ),
    ] {
        let src = format!("# syntax=docker/dockerfile:1\n# check={directive}\nFROM alpine\n");
        let parsed = parse(&src).unwrap();
        let e = check(&src, &parsed, None).unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (2, message), "{directive}");
    }
    assert_eq!(
        CheckConfig::parse(" skip = A ,B ; error = 1 ").unwrap(),
        CheckConfig {
            skip: vec!["A".into(), "B".into()],
            error: true,
            ..Default::default()
        }
    );
}

#[test]
fn invalid_dockerfiles_are_errors_not_findings() {
    for (src, line, message) in [
        ("RUN x\nFROM a\n", 1, "no build stage in current context"),
        ("ARG A=1\n", 1, "dockerfile contains no stages to build"),
        (
            "FROM a AS 1x\n",
            1,
            "invalid name for build stage: \"1x\", name can't start with a number or contain symbols",
        ),
        (
            "FROM a b\n",
            1,
            "FROM requires either one or three arguments",
        ),
    ] {
        let parsed = parse(src).unwrap();
        let e = check(src, &parsed, None).unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (line, message), "{src}");
    }
}

#[test]
fn clean_dockerfile_has_no_findings() {
    let src = "# syntax=docker/dockerfile:1\nARG BASE=alpine:3.20\nFROM --platform=$BUILDPLATFORM ${BASE} AS build\nARG TARGETOS TARGETARCH\nWORKDIR /src\nENV CGO_ENABLED=0 GOOS=${TARGETOS}\nCOPY --chmod=755 <<EOF /usr/local/bin/hello\n#!/bin/sh\necho $GOOS\nEOF\nRUN --mount=type=cache,target=/root/.cache make\nFROM scratch\nCOPY --from=build /src/app /app\nEXPOSE 8080/tcp\nUSER 65534\nENTRYPOINT [\"/app\"]\n";
    let r = run(src);
    assert_eq!(r.findings, vec![], "{}", r.render_text("Dockerfile", src));
}

#[test]
fn text_output_points_at_the_span() {
    let src = "FROM alpine\n\tENV A 1\n";
    let r = run(src);
    let text = r.render_text("dir/Dockerfile", src);
    assert_eq!(
        text,
        "dir/Dockerfile:2:2: warning: LegacyKeyValueFormat: \"ENV key=value\" should be used instead of legacy \"ENV key value\" format\n   ENV A 1\n   ^^^^^^^\n  https://docs.docker.com/go/dockerfile/rule/legacy-key-value-format/\n"
    );
}

#[test]
fn json_output_shape() {
    let src = "# check=error=true\nFROM alpine AS Build\n";
    let r = run(src);
    let text = r.to_json("Dockerfile");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "version": 1,
            "findings": [{
                "rule": "StageNameCasing",
                "level": "error",
                "message": "Stage name 'Build' should be lowercase",
                "url": "https://docs.docker.com/go/dockerfile/rule/stage-name-casing/",
                "file": "Dockerfile",
                "line": 2,
                "column": 16,
                "end_line": 2,
                "end_column": 20,
            }],
            "errors": 1,
            "warnings": 0,
        })
    );
    // Keys come in the documented order.
    let keys = [
        "\"rule\"",
        "\"level\"",
        "\"message\"",
        "\"url\"",
        "\"file\"",
        "\"line\"",
        "\"column\"",
        "\"end_line\"",
        "\"end_column\"",
    ];
    let at: Vec<usize> = keys.iter().map(|k| text.find(k).unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
    assert!(text.find("\"version\"") < text.find("\"findings\""));
    let empty: serde_json::Value =
        serde_json::from_str(&run("FROM alpine\n").to_json("Dockerfile")).unwrap();
    assert_eq!(
        empty,
        serde_json::json!({"version": 1, "findings": [], "errors": 0, "warnings": 0})
    );
}

#[test]
fn build_gate_fails_only_on_errors() {
    let warn = "FROM alpine as base\n";
    let parsed = parse(warn).unwrap();
    let mut seen = Vec::new();
    assert_eq!(
        run_for_build("Dockerfile", warn, &parsed, None, &mut |f| seen
            .push(f.rule)),
        Ok(())
    );
    assert_eq!(seen, vec!["FromAsCasing"], "every finding is handed on");
    let err = "# check=error=true\nFROM alpine as base\nMAINTAINER x\n";
    let parsed = parse(err).unwrap();
    let e = run_for_build("Dockerfile", err, &parsed, None, &mut |_| {}).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Dockerfile:2:13: lint violation found for rules: FromAsCasing, MaintainerDeprecated; fix them, or drop error=true from the `# check=` directive to only warn"
    );
    let bad = "# check=nope\nFROM alpine\n";
    let parsed = parse(bad).unwrap();
    let e = run_for_build("Dockerfile", bad, &parsed, None, &mut |_| {}).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Dockerfile:1:1: failed to parse check options"),
        "{e}"
    );
}

#[test]
fn every_rule_has_a_documented_url() {
    assert_eq!(RULES.len(), 21);
    for r in RULES {
        assert!(
            r.url()
                .starts_with("https://docs.docker.com/go/dockerfile/rule/")
        );
        assert!(r.url().ends_with(&format!("{}/", r.slug)));
    }
}
