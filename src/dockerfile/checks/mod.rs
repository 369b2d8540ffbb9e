//! Build checks: BuildKit's Dockerfile lint rules (`docker build --check`), run over a parsed
//! Dockerfile without building anything.
//!
//! The story of a check: the parser turns the text into [`Node`]s; [`check`] reads the
//! `# check=` directive into a [`CheckConfig`], walks the instructions stage by stage the way
//! BuildKit's converter does (global `ARG`s, then each `FROM` and its instructions, keeping track
//! of which variables are declared), and returns a [`Report`] of [`Finding`]s. Each finding names
//! its rule, BuildKit's message for it, the documentation URL and the span of the Dockerfile it is
//! about. `shmocker check` prints the report; every build prints it as warnings first and, when the
//! directive says `error=true`, stops before running anything if there is a finding.
//!
//! Everything here is pure text processing; the caller reads the Dockerfile and `.dockerignore`.

mod analyze;
pub use analyze::PROXY_ARGS;
#[cfg(test)]
mod tests;

use std::fmt::Write as _;

use serde::Serialize;

use super::dockerignore::Dockerignore;
use super::parser::{Node, ParseResult, parse_directive};

/// A rule BuildKit documents, with what `shmocker check` needs to know about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// BuildKit's name, used in `# check=skip=` and in the output.
    pub name: &'static str,
    /// The last part of the documentation URL.
    pub slug: &'static str,
    /// One line on what the rule is about (BuildKit's description).
    pub description: &'static str,
    /// Experimental rules run only when `# check=experimental=` names them (or says `all`).
    pub experimental: bool,
}

impl Rule {
    /// `https://docs.docker.com/go/dockerfile/rule/<slug>/`, as BuildKit links it.
    pub fn url(&self) -> String {
        format!("https://docs.docker.com/go/dockerfile/rule/{}/", self.slug)
    }
}

macro_rules! rules {
    ($($id:ident = $name:literal, $slug:literal, $exp:literal, $desc:literal;)*) => {
        /// The rules, by name.
        pub mod rule {
            use super::Rule;
            $(pub const $id: Rule = Rule { name: $name, slug: $slug, description: $desc, experimental: $exp };)*
        }
        /// Every rule `shmocker check` implements, in BuildKit's documentation order.
        pub const RULES: &[Rule] = &[$(rule::$id),*];
    };
}

rules! {
    STAGE_NAME_CASING = "StageNameCasing", "stage-name-casing", false,
        "Stage names should be lowercase";
    FROM_AS_CASING = "FromAsCasing", "from-as-casing", false,
        "The 'as' keyword should match the case of the 'from' keyword";
    NO_EMPTY_CONTINUATION = "NoEmptyContinuation", "no-empty-continuation", false,
        "Empty continuation lines will become errors in a future release";
    CONSISTENT_INSTRUCTION_CASING = "ConsistentInstructionCasing", "consistent-instruction-casing", false,
        "All commands within the Dockerfile should use the same casing (either upper or lower)";
    DUPLICATE_STAGE_NAME = "DuplicateStageName", "duplicate-stage-name", false,
        "Stage names should be unique";
    RESERVED_STAGE_NAME = "ReservedStageName", "reserved-stage-name", false,
        "Reserved words should not be used as stage names";
    JSON_ARGS_RECOMMENDED = "JSONArgsRecommended", "json-args-recommended", false,
        "JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS signals";
    MAINTAINER_DEPRECATED = "MaintainerDeprecated", "maintainer-deprecated", false,
        "The MAINTAINER instruction is deprecated, use a label instead to define an image author";
    UNDEFINED_ARG_IN_FROM = "UndefinedArgInFrom", "undefined-arg-in-from", false,
        "FROM command must use declared ARGs";
    WORKDIR_RELATIVE_PATH = "WorkdirRelativePath", "workdir-relative-path", false,
        "Relative workdir without an absolute workdir declared within the build can have unexpected results if the base image changes";
    UNDEFINED_VAR = "UndefinedVar", "undefined-var", false,
        "Variables should be defined before their use";
    MULTIPLE_INSTRUCTIONS_DISALLOWED = "MultipleInstructionsDisallowed", "multiple-instructions-disallowed", false,
        "Multiple instructions of the same type should not be used in the same stage";
    LEGACY_KEY_VALUE_FORMAT = "LegacyKeyValueFormat", "legacy-key-value-format", false,
        "Legacy key/value format with whitespace separator should not be used";
    REDUNDANT_TARGET_PLATFORM = "RedundantTargetPlatform", "redundant-target-platform", false,
        "Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior";
    SECRETS_USED_IN_ARG_OR_ENV = "SecretsUsedInArgOrEnv", "secrets-used-in-arg-or-env", false,
        "Sensitive data should not be used in the ARG or ENV commands";
    INVALID_DEFAULT_ARG_IN_FROM = "InvalidDefaultArgInFrom", "invalid-default-arg-in-from", false,
        "Default value for global ARG results in an empty or invalid base image name";
    FROM_PLATFORM_FLAG_CONST_DISALLOWED = "FromPlatformFlagConstDisallowed", "from-platform-flag-const-disallowed", false,
        "FROM --platform flag should not use a constant value";
    COPY_IGNORED_FILE = "CopyIgnoredFile", "copy-ignored-file", true,
        "Attempting to Copy file that is excluded by .dockerignore";
    INVALID_DEFINITION_DESCRIPTION = "InvalidDefinitionDescription", "invalid-definition-description", true,
        "Comment for build stage or argument should follow the format: `# <arg/stage name> <description>`";
    EXPOSE_PROTO_CASING = "ExposeProtoCasing", "expose-proto-casing", false,
        "Protocol in EXPOSE instruction should be lowercase";
    EXPOSE_INVALID_FORMAT = "ExposeInvalidFormat", "expose-invalid-format", false,
        "IP address and host-port mapping should not be used in EXPOSE instruction";
}

/// How serious a finding is: every finding is a warning unless the `# check=` directive says
/// `error=true`, which makes every finding an error (BuildKit's `ReturnAsError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One rule violation. Lines and columns are 1-based and count characters; the span runs from
/// (`line`, `column`) to (`end_line`, `end_column`), both ends included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub rule: &'static str,
    pub level: Level,
    pub message: String,
    pub url: String,
    pub line: usize,
    pub column: usize,
    pub end_line: usize,
    pub end_column: usize,
}

/// The `# check=` directive (BuildKit's `linter.Config`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckConfig {
    pub skip_all: bool,
    pub skip: Vec<String>,
    pub experimental_all: bool,
    pub experimental: Vec<String>,
    /// `error=true`: findings are errors and fail the build.
    pub error: bool,
}

impl CheckConfig {
    /// Parses the directive's value as BuildKit's `ParseLintOptions` does:
    /// `skip=Rule1,Rule2|all;error=true|false;experimental=Rule3|all`.
    pub fn parse(value: &str) -> Result<CheckConfig, String> {
        let value = value.trim();
        let mut cfg = CheckConfig::default();
        if value.is_empty() {
            return Ok(cfg);
        }
        let list =
            |v: &str| -> Vec<String> { v.split(',').map(|r| r.trim().to_string()).collect() };
        for part in value.splitn(3, ';') {
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!("invalid check option {}", super::go_quote(part)));
            };
            match k.trim() {
                "skip" => match v.trim() {
                    "all" => cfg.skip_all = true,
                    v => cfg.skip = list(v),
                },
                "experimental" => match v.trim() {
                    "all" => cfg.experimental_all = true,
                    v => cfg.experimental = list(v),
                },
                "error" => {
                    cfg.error = go_parse_bool(v.trim()).ok_or_else(|| {
                        format!(
                            "failed to parse check option {}: strconv.ParseBool: parsing {}: invalid syntax",
                            super::go_quote(part),
                            super::go_quote(v.trim())
                        )
                    })?;
                }
                other => return Err(format!("invalid check option {}", super::go_quote(other))),
            }
        }
        Ok(cfg)
    }

    /// Whether `rule` runs under this configuration (BuildKit's `Linter.Run`): an experimental
    /// rule only when enabled, any other rule unless skipped.
    pub fn enabled(&self, rule: &Rule) -> bool {
        if rule.experimental {
            self.experimental_all || self.experimental.iter().any(|r| r == rule.name)
        } else {
            !self.skip_all && !self.skip.iter().any(|r| r == rule.name)
        }
    }
}

/// Go's `strconv.ParseBool`.
fn go_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Why the checks could not run: the Dockerfile is not one BuildKit would accept. `Display` is
/// `line L:C: message`, like [`super::ParseError`]; the caller prefixes the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}:{column}: {message}")]
pub struct CheckError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// The result of checking one Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Ordered by position in the file.
    pub findings: Vec<Finding>,
    pub config: CheckConfig,
}

impl Report {
    pub fn errors(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.level == Level::Error)
            .count()
    }

    pub fn warnings(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.level == Level::Warning)
            .count()
    }

    /// The findings for people: `file:line:col: level: Rule: message`, the source line with a
    /// caret line under the span, then the URL; one blank line between findings.
    pub fn render_text(&self, file: &str, source: &str) -> String {
        let lines: Vec<&str> = source
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect();
        let mut out = String::new();
        for (i, f) in self.findings.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let _ = writeln!(
                out,
                "{file}:{}:{}: {}: {}: {}",
                f.line,
                f.column,
                f.level.as_str(),
                f.rule,
                f.message
            );
            if let Some(text) = f.line.checked_sub(1).and_then(|i| lines.get(i)) {
                let shown: String = text
                    .chars()
                    .map(|c| if c == '\t' { ' ' } else { c })
                    .collect();
                let last = if f.end_line == f.line {
                    f.end_column
                } else {
                    shown.chars().count()
                };
                let width = last.saturating_sub(f.column) + 1;
                let _ = writeln!(out, "  {shown}");
                let _ = writeln!(
                    out,
                    "  {}{}",
                    " ".repeat(f.column.saturating_sub(1)),
                    "^".repeat(width.max(1))
                );
            }
            let _ = writeln!(out, "  {}", f.url);
        }
        out
    }

    /// The documented JSON form (docs/checks.md), version 1, pretty-printed with the keys in
    /// the documented order.
    pub fn to_json(&self, file: &str) -> String {
        #[derive(Serialize)]
        struct JsonFinding<'a> {
            rule: &'a str,
            level: Level,
            message: &'a str,
            url: &'a str,
            file: &'a str,
            line: usize,
            column: usize,
            end_line: usize,
            end_column: usize,
        }
        #[derive(Serialize)]
        struct JsonReport<'a> {
            version: u32,
            findings: Vec<JsonFinding<'a>>,
            errors: usize,
            warnings: usize,
        }
        let report = JsonReport {
            version: 1,
            findings: self
                .findings
                .iter()
                .map(|f| JsonFinding {
                    rule: f.rule,
                    level: f.level,
                    message: &f.message,
                    url: &f.url,
                    file,
                    line: f.line,
                    column: f.column,
                    end_line: f.end_line,
                    end_column: f.end_column,
                })
                .collect(),
            errors: self.errors(),
            warnings: self.warnings(),
        };
        // Serialising plain strings and numbers cannot fail.
        serde_json::to_string_pretty(&report).unwrap_or_default()
    }
}

/// Checks a parsed Dockerfile. `source` is the text `parsed` came from (for spans and comments);
/// `dockerignore` is the build context's, for CopyIgnoredFile.
pub fn check(
    source: &str,
    parsed: &ParseResult,
    dockerignore: Option<&Dockerignore>,
) -> Result<Report, CheckError> {
    let config = match parse_directive("check", source) {
        Some(d) => CheckConfig::parse(&d.value).map_err(|e| CheckError {
            line: d.line,
            column: 1,
            message: format!("failed to parse check options: {e}"),
        })?,
        None => CheckConfig::default(),
    };
    let mut findings = analyze::run(source, parsed, dockerignore, &config)?;
    let level = if config.error {
        Level::Error
    } else {
        Level::Warning
    };
    for f in &mut findings {
        f.level = level;
    }
    // Stable: findings on one line keep the order BuildKit reports them in.
    findings.sort_by_key(|f| (f.line, f.column));
    Ok(Report { findings, config })
}

/// Why a build stops at its checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildCheckError {
    #[error("{file}:{}:{}: {}", .error.line, .error.column, .error.message)]
    Invalid { file: String, error: CheckError },
    #[error(
        "{file}:{line}:{column}: lint violation found for rules: {rules}; fix them, or drop error=true from the `# check=` directive to only warn"
    )]
    Violations {
        file: String,
        line: usize,
        column: usize,
        rules: String,
    },
}

/// What a build does with the checks: prints every finding to standard error and fails when the
/// `# check=` directive made them errors (BuildKit stops such a build before it runs a step).
/// `on_finding` sees each finding too (the CI reporters turn them into annotations).
pub fn run_for_build(
    file: &str,
    source: &str,
    parsed: &ParseResult,
    dockerignore: Option<&Dockerignore>,
    on_finding: &mut dyn FnMut(&Finding),
) -> Result<(), BuildCheckError> {
    let report = check(source, parsed, dockerignore).map_err(|error| BuildCheckError::Invalid {
        file: file.to_string(),
        error,
    })?;
    if report.findings.is_empty() {
        return Ok(());
    }
    eprint!("{}", report.render_text(file, source));
    for f in &report.findings {
        on_finding(f);
    }
    let Some(first) = report.findings.iter().find(|f| f.level == Level::Error) else {
        return Ok(());
    };
    let mut rules: Vec<&str> = Vec::new();
    for f in &report.findings {
        if f.level == Level::Error && !rules.contains(&f.rule) {
            rules.push(f.rule);
        }
    }
    Err(BuildCheckError::Violations {
        file: file.to_string(),
        line: first.line,
        column: first.column,
        rules: rules.join(", "),
    })
}

/// The instruction keyword as written (`FROM`, `from`, `From`).
pub(crate) fn written_keyword(node: &Node) -> &str {
    node.original
        .split(|c: char| c.is_whitespace())
        .next()
        .unwrap_or("")
}
