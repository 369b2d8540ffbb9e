//! The walk over the instructions that finds rule violations, in the order BuildKit's converter
//! meets them: instruction parsing (stage names, `as` casing, MAINTAINER, description comments),
//! the whole-file rules (stage names, instruction casing), the base images with default ARG values,
//! then each stage's instructions with the variables that are in scope there.
//!
//! Variable scope follows BuildKit: ARGs before the first FROM (and the automatic platform ARGs)
//! are usable in FROM lines; inside a stage a global ARG is visible only after `ARG NAME`
//! redeclares it; ARG and ENV values accumulate through the stage and are inherited by stages
//! built `FROM` it. Variables a registry base image defines are not known here (no image is
//! pulled), except PATH, which every stage has.

use std::collections::{BTreeMap, BTreeSet};

use super::{CheckConfig, CheckError, Finding, Level, Rule, rule, written_keyword};
use crate::dockerfile::dockerignore::Dockerignore;
use crate::dockerfile::go_quote;
use crate::dockerfile::parser::{Node, ParseResult, levenshtein, parse_heredoc};
use crate::dockerfile::shell::Lex;

/// ARGs BuildKit defines for every build, usable in FROM and redeclarable in a stage.
const PLATFORM_ARGS: [&str; 8] = [
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
];

/// The proxy ARGs Docker predefines: usable without an ARG instruction, never reported, and
/// passed to RUN steps without being recorded in the image.
pub const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// ARGs BuildKit reads itself and never puts in the environment.
const NON_ENV_ARGS: [&str; 2] = ["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];

const RESERVED_STAGE_NAMES: [&str; 2] = ["context", "scratch"];

#[derive(Debug, Clone, Copy)]
struct Span {
    line: usize,
    column: usize,
    end_line: usize,
    end_column: usize,
}

/// What a stage knows while its instructions are walked.
#[derive(Debug, Clone, Default)]
struct Stage {
    /// Lower-cased stage name, empty when the stage has none.
    name: String,
    /// Variables with values: ENV and ARGs that have one.
    env: BTreeMap<String, String>,
    /// Every ARG declared in the stage (BuildKit's `buildArgs`), with a value or not.
    declared: BTreeSet<String>,
    shell_set: bool,
    workdir_set: bool,
}

struct Walker<'a> {
    lines: Vec<&'a str>,
    config: &'a CheckConfig,
    lex: Lex,
    findings: Vec<Finding>,
}

pub(super) fn run(
    source: &str,
    parsed: &ParseResult,
    dockerignore: Option<&Dockerignore>,
    config: &CheckConfig,
) -> Result<Vec<Finding>, CheckError> {
    let mut w = Walker {
        lines: source
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect(),
        config,
        lex: Lex::new(parsed.escape),
        findings: Vec::new(),
    };
    for warning in &parsed.warnings {
        if warning.rule == rule::NO_EMPTY_CONTINUATION.name {
            let span = w.whole_line(warning.line, 1);
            w.report(
                rule::NO_EMPTY_CONTINUATION,
                span,
                "Empty continuation line".to_string(),
            );
        }
    }

    // Split into the global ARGs and the stages, as BuildKit's instructions.Parse does.
    let mut meta_args: Vec<&Node> = Vec::new();
    let mut stages: Vec<(&Node, Vec<&Node>)> = Vec::new();
    for node in &parsed.nodes {
        if node.keyword == "from" {
            stages.push((node, Vec::new()));
        } else if let Some((_, cmds)) = stages.last_mut() {
            cmds.push(node);
        } else if node.keyword == "arg" {
            meta_args.push(node);
        } else {
            return Err(at(node, "no build stage in current context".to_string()));
        }
    }

    w.instruction_rules(parsed)?;
    if stages.is_empty() {
        let node = parsed.nodes.first();
        return Err(CheckError {
            line: node.map_or(1, |n| n.start_line),
            column: node.map_or(1, |n| n.column),
            message: "dockerfile contains no stages to build".to_string(),
        });
    }
    let stage_names: Vec<String> = stages
        .iter()
        .map(|(from, _)| stage_name(from))
        .collect::<Result<_, _>>()?;
    w.stage_name_rules(&stages, &stage_names);
    w.casing_rule(&stages);

    // The global scope: the automatic platform ARGs, then the ARGs before the first FROM with
    // their default values (no --build-arg is considered: checks judge the Dockerfile itself).
    let platform = host_platform();
    let mut global: BTreeMap<String, String> = BTreeMap::new();
    for k in PLATFORM_ARGS {
        let v = match k {
            "TARGETPLATFORM" | "BUILDPLATFORM" => platform.0.clone(),
            "TARGETOS" | "BUILDOS" => "linux".to_string(),
            "TARGETARCH" | "BUILDARCH" => platform.1.clone(),
            _ => String::new(),
        };
        global.insert(k.to_string(), v);
    }
    let mut meta_keys: BTreeSet<String> = BTreeSet::new();
    for node in &meta_args {
        for word in &node.args {
            let (key, value) = split_arg(word);
            if key.is_empty() {
                continue;
            }
            meta_keys.insert(key.to_string());
            if let Some(v) = value {
                // A value that does not expand is the build's error to report, with the
                // build arguments it has; here the ARG just has no default.
                let env = |k: &str| global.get(k).cloned();
                if let Ok(expanded) = w.lex.expand(v, &env) {
                    global.insert(key.to_string(), expanded);
                }
            }
        }
    }
    let mut from_keys: BTreeSet<String> = meta_keys.clone();
    from_keys.extend(global.keys().cloned());
    from_keys.extend(PROXY_ARGS.iter().map(|s| s.to_string()));

    w.default_base_images(&stages, &global);

    let mut done: Vec<Stage> = Vec::new();
    for ((from, cmds), name) in stages.iter().zip(stage_names) {
        let base = w.base_and_platform_rules(from, &name, &global, &from_keys);
        let mut stage = match done
            .iter()
            .rev()
            .find(|s| !s.name.is_empty() && s.name == base)
        {
            Some(parent) => Stage {
                name: name.clone(),
                ..parent.clone()
            },
            None => {
                let mut s = Stage {
                    name: name.clone(),
                    ..Stage::default()
                };
                // BuildKit gives every stage a PATH when its image has none.
                s.env.insert(
                    "PATH".to_string(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                );
                s
            }
        };
        w.dispatch_stage(&mut stage, cmds, &global, dockerignore);
        done.push(stage);
    }
    Ok(w.findings)
}

fn at(node: &Node, message: String) -> CheckError {
    CheckError {
        line: node.start_line,
        column: node.column,
        message,
    }
}

/// `KEY=VALUE` or `KEY` (an ARG word).
fn split_arg(word: &str) -> (&str, Option<&str>) {
    match word.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (word, None),
    }
}

/// The stage name of a FROM (lower-cased, as BuildKit keeps it), validated as BuildKit does.
fn stage_name(from: &Node) -> Result<String, CheckError> {
    match from.args.as_slice() {
        [_] => Ok(String::new()),
        [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
            let lower = name.to_lowercase();
            let mut chars = lower.chars();
            let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
                });
            if valid {
                Ok(lower)
            } else {
                Err(at(
                    from,
                    format!(
                        "invalid name for build stage: {}, name can't start with a number or contain symbols",
                        go_quote(name)
                    ),
                ))
            }
        }
        _ => Err(at(
            from,
            "FROM requires either one or three arguments".to_string(),
        )),
    }
}

/// The value of a `--name=value` flag.
fn flag<'n>(node: &'n Node, name: &str) -> Option<&'n str> {
    node.flags.iter().rev().find_map(|f| {
        let rest = f.strip_prefix("--")?;
        match rest.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if rest == name => Some(""),
            _ => None,
        }
    })
}

/// `(TARGETPLATFORM, TARGETARCH)` for this machine, as BuildKit would default them.
fn host_platform() -> (String, String) {
    let arch = normalize_arch(std::env::consts::ARCH).unwrap_or("amd64");
    (format!("linux/{arch}"), arch.to_string())
}

/// BuildKit's suggestion for a misspelt name (`util/suggest.Search`): the closest option at a
/// Levenshtein distance below 3.
fn suggest<'o>(name: &str, options: impl IntoIterator<Item = &'o String>) -> Option<&'o str> {
    let mut best = None;
    let mut min = 3;
    for opt in options {
        if opt == name {
            return Some(opt);
        }
        let d = levenshtein(name, opt);
        if d < min {
            min = d;
            best = Some(opt.as_str());
        }
    }
    best
}

/// Whether a variable name is a secret by BuildKit's patterns: one of its `_`-separated parts
/// is a secret word and none is an allowed one.
fn looks_secret(key: &str) -> bool {
    const DENY: [&str; 10] = [
        "apikey",
        "auth",
        "credential",
        "credentials",
        "key",
        "password",
        "pword",
        "passwd",
        "secret",
        "token",
    ];
    const ALLOW: [&str; 3] = ["public", "file", "version"];
    let has = |words: &[&str]| {
        key.split('_')
            .any(|part| words.iter().any(|w| part.eq_ignore_ascii_case(w)))
    };
    has(&DENY) && !has(&ALLOW)
}

impl Walker<'_> {
    fn report(&mut self, rule: Rule, span: Span, message: String) {
        if !self.config.enabled(&rule) {
            return;
        }
        self.findings.push(Finding {
            rule: rule.name,
            level: Level::Warning,
            message,
            url: rule.url(),
            line: span.line,
            column: span.column,
            end_line: span.end_line,
            end_column: span.end_column,
        });
    }

    fn line(&self, n: usize) -> &str {
        n.checked_sub(1)
            .and_then(|i| self.lines.get(i))
            .copied()
            .unwrap_or("")
    }

    /// Line `n` from its first non-blank character to its last.
    fn whole_line(&self, n: usize, fallback_col: usize) -> Span {
        let text = self.line(n);
        let lead = text.chars().take_while(|c| c.is_whitespace()).count();
        let len = text.trim_end().chars().count();
        let column = if len > lead { lead + 1 } else { fallback_col };
        Span {
            line: n,
            column,
            end_line: n,
            end_column: len.max(column),
        }
    }

    /// The instruction keyword.
    fn keyword(&self, node: &Node) -> Span {
        let len = written_keyword(node).chars().count().max(1);
        Span {
            line: node.start_line,
            column: node.column,
            end_line: node.start_line,
            end_column: node.column + len - 1,
        }
    }

    /// The instruction's first line from the keyword on.
    fn instruction_line(&self, node: &Node) -> Span {
        let mut s = self.whole_line(node.start_line, node.column);
        s.column = node.column;
        s.end_column = s.end_column.max(s.column);
        s
    }

    /// The last line of the instruction itself (before any heredoc bodies).
    fn instruction_end(node: &Node) -> usize {
        let bodies: usize = node
            .heredocs
            .iter()
            .map(|h| h.content.split_inclusive('\n').count() + 1)
            .sum();
        node.end_line.saturating_sub(bodies).max(node.start_line)
    }

    /// Where `needle` first (or last) appears in the instruction's lines; the keyword when it
    /// does not appear whole on one line.
    fn find(&self, node: &Node, needle: &str, last: bool) -> Span {
        if needle.is_empty() {
            return self.keyword(node);
        }
        let mut lines: Vec<usize> = (node.start_line..=Self::instruction_end(node)).collect();
        if last {
            lines.reverse();
        }
        for n in lines {
            let text = self.line(n);
            let from = if n == node.start_line {
                text.char_indices()
                    .nth(node.column.saturating_sub(1))
                    .map_or(text.len(), |(i, _)| i)
            } else {
                0
            };
            let hay = text.get(from..).unwrap_or("");
            let hit = if last {
                hay.rfind(needle)
            } else {
                hay.find(needle)
            };
            if let Some(i) = hit {
                let column = text.get(..from + i).map_or(0, |s| s.chars().count()) + 1;
                return Span {
                    line: n,
                    column,
                    end_line: n,
                    end_column: column + needle.chars().count() - 1,
                };
            }
        }
        self.keyword(node)
    }

    /// Where a variable reference is written.
    fn find_var(&self, node: &Node, name: &str) -> Span {
        let braced = format!("${{{name}");
        let mut s = self.find(node, &braced, false);
        if s.line != node.start_line || s.column != node.column {
            // Take in the modifier and the closing brace: `${NAME:-x}`.
            let text = self.line(s.line);
            let close = text
                .chars()
                .skip(s.end_column)
                .position(|c| c == '}')
                .map(|i| s.end_column + i + 1);
            s.end_column = close.unwrap_or(s.end_column);
            return s;
        }
        self.find(node, &format!("${name}"), false)
    }

    /// The rules BuildKit runs while turning nodes into instructions.
    fn instruction_rules(&mut self, parsed: &ParseResult) -> Result<(), CheckError> {
        let mut prev_end = 0;
        for node in &parsed.nodes {
            let comment = self.description_comment(node, prev_end);
            prev_end = node.end_line;
            match node.keyword.as_str() {
                "maintainer" => {
                    let span = self.keyword(node);
                    self.report(
                        rule::MAINTAINER_DEPRECATED,
                        span,
                        "Maintainer instruction is deprecated in favor of using label".to_string(),
                    );
                }
                "from" => {
                    let args = &node.args;
                    if let [_, as_kw, name] = args.as_slice() {
                        if *name != name.to_lowercase() {
                            let span = self.find(node, name, true);
                            self.report(
                                rule::STAGE_NAME_CASING,
                                span,
                                format!("Stage name '{name}' should be lowercase"),
                            );
                        }
                        let kw = written_keyword(node);
                        let lower = kw == kw.to_lowercase();
                        let upper = kw == kw.to_uppercase();
                        let mismatch = (lower && *as_kw != as_kw.to_lowercase())
                            || (!lower && upper && *as_kw != as_kw.to_uppercase());
                        if mismatch {
                            let span = self.find_word_before_last(node, as_kw);
                            self.report(
                                rule::FROM_AS_CASING,
                                span,
                                format!("'{as_kw}' and '{kw}' keywords' casing do not match"),
                            );
                        }
                        let name = stage_name(node)?;
                        self.definition_description(node, "FROM", &[name], comment.as_deref());
                    }
                }
                "arg" => {
                    let keys: Vec<String> = node
                        .args
                        .iter()
                        .map(|w| split_arg(w).0.to_string())
                        .collect();
                    self.definition_description(node, "ARG", &keys, comment.as_deref());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The `as` of `FROM image AS name`: the second-to-last word of the instruction.
    fn find_word_before_last(&self, node: &Node, word: &str) -> Span {
        let last_line = Self::instruction_end(node);
        for n in (node.start_line..=last_line).rev() {
            let text = self.line(n);
            let words: Vec<(usize, &str)> = text
                .split(char::is_whitespace)
                .scan(0usize, |pos, w| {
                    let start = *pos;
                    *pos += w.chars().count() + 1;
                    Some((start, w))
                })
                .filter(|(_, w)| !w.is_empty())
                .collect();
            if let Some((col, _)) = words.iter().rev().skip(1).find(|(_, w)| *w == word) {
                return Span {
                    line: n,
                    column: col + 1,
                    end_line: n,
                    end_column: col + word.chars().count(),
                };
            }
        }
        self.find(node, word, true)
    }

    /// The comment on the line right above an instruction, if that line belongs to no other
    /// instruction (`# text` → `text`; an empty `#` is none).
    fn description_comment(&self, node: &Node, prev_end: usize) -> Option<String> {
        let above = node.start_line.checked_sub(1)?;
        if above == 0 || above <= prev_end {
            return None;
        }
        let text = self.line(above).trim_start().strip_prefix('#')?.trim();
        (!text.is_empty()).then(|| text.to_string())
    }

    fn definition_description(
        &mut self,
        node: &Node,
        instruction: &str,
        keys: &[String],
        comment: Option<&str>,
    ) {
        let (Some(comment), Some(first)) = (comment, keys.first()) else {
            return;
        };
        let word = comment.split(' ').next().unwrap_or("");
        if keys.iter().any(|k| k == word) {
            return;
        }
        let example = if keys.len() > 1 { "<arg_key>" } else { first };
        let span = self.keyword(node);
        self.report(
            rule::INVALID_DEFINITION_DESCRIPTION,
            span,
            format!(
                "Comment for {instruction} should follow the format: `# {example} <description>`"
            ),
        );
    }

    fn stage_name_rules(&mut self, stages: &[(&Node, Vec<&Node>)], names: &[String]) {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for ((from, _), name) in stages.iter().zip(names) {
            if name.is_empty() {
                continue;
            }
            let span = self.find(from, from.args.last().map_or("", String::as_str), true);
            if RESERVED_STAGE_NAMES.contains(&name.as_str()) {
                self.report(
                    rule::RESERVED_STAGE_NAME,
                    span,
                    format!(
                        "Stage name should not use the same name as reserved stage {}",
                        go_quote(name)
                    ),
                );
            }
            if !seen.insert(name) {
                self.report(
                    rule::DUPLICATE_STAGE_NAME,
                    span,
                    format!(
                        "Duplicate stage name {}, stage names should be unique",
                        go_quote(name)
                    ),
                );
            }
        }
    }

    /// ConsistentInstructionCasing over the stages' instructions (the global ARGs do not count).
    fn casing_rule(&mut self, stages: &[(&Node, Vec<&Node>)]) {
        let all: Vec<&Node> = stages
            .iter()
            .flat_map(|(from, cmds)| std::iter::once(*from).chain(cmds.iter().copied()))
            .collect();
        let (mut lower, mut upper) = (0, 0);
        for n in &all {
            let kw = written_keyword(n);
            if kw == kw.to_lowercase() {
                lower += 1;
            } else if kw == kw.to_uppercase() {
                upper += 1;
            }
        }
        let majority_lower = lower > upper;
        for n in all {
            let kw = written_keyword(n);
            let casing = if majority_lower && kw != kw.to_lowercase() {
                "lowercase"
            } else if !majority_lower && kw != kw.to_uppercase() {
                "uppercase"
            } else {
                continue;
            };
            let span = self.keyword(n);
            self.report(
                rule::CONSISTENT_INSTRUCTION_CASING,
                span,
                format!("Command '{kw}' should match the case of the command majority ({casing})"),
            );
        }
    }

    /// InvalidDefaultArgInFrom: every base image name, expanded with the default ARG values,
    /// must be a valid image reference.
    fn default_base_images(
        &mut self,
        stages: &[(&Node, Vec<&Node>)],
        global: &BTreeMap<String, String>,
    ) {
        for (from, _) in stages {
            let Some(base) = from.args.first() else {
                continue;
            };
            let env = |k: &str| global.get(k).cloned();
            let Ok(name) = self.lex.expand(base, &env) else {
                return;
            };
            if !valid_reference(&name) {
                let span = self.find(from, base, false);
                self.report(
                    rule::INVALID_DEFAULT_ARG_IN_FROM,
                    span,
                    format!(
                        "Default value for ARG {base} results in empty or invalid base image name"
                    ),
                );
            }
        }
    }

    /// The rules on one FROM line; returns the expanded base name.
    fn base_and_platform_rules(
        &mut self,
        from: &Node,
        stage_name: &str,
        global: &BTreeMap<String, String>,
        from_keys: &BTreeSet<String>,
    ) -> String {
        let env = |k: &str| global.get(k).cloned();
        let base = from.args.first().map_or("", String::as_str);
        // An expansion that fails, or a name that comes out empty, is left to the build, which
        // knows the --build-arg values; InvalidDefaultArgInFrom has warned about the defaults.
        let Ok(r) = self.lex.expand_with_matches(base, &env) else {
            return String::new();
        };
        self.undefined_in_from(from, &r.unmatched, from_keys);
        if let Some(platform) = flag(from, "platform").filter(|p| !p.is_empty())
            && let Ok(p) = self.lex.expand_with_matches(platform, &env)
        {
            self.undefined_in_from(from, &p.unmatched, from_keys);
            let span = self.find(from, "--platform", false);
            if p.matched.len() == 1
                && p.unmatched.is_empty()
                && p.matched.contains("TARGETPLATFORM")
                && global.get("TARGETPLATFORM") == Some(&p.result)
            {
                self.report(
                    rule::REDUNDANT_TARGET_PLATFORM,
                    span,
                    format!(
                        "Setting platform to predefined {platform} in FROM is redundant as this is the default behavior"
                    ),
                );
            }
            if p.matched.is_empty()
                && p.unmatched.is_empty()
                && let Some((os, arch)) = parse_platform(&p.result)
                && !stage_name.contains(&os)
                && !stage_name.contains(&arch)
            {
                self.report(
                    rule::FROM_PLATFORM_FLAG_CONST_DISALLOWED,
                    span,
                    format!(
                        "FROM --platform flag should not use constant value {}",
                        go_quote(&p.result)
                    ),
                );
            }
        }
        r.result
    }

    fn undefined_in_from(
        &mut self,
        from: &Node,
        unmatched: &BTreeSet<String>,
        keys: &BTreeSet<String>,
    ) {
        for name in unmatched {
            if keys.contains(name) {
                continue;
            }
            let mut message = format!("FROM argument '{name}' is not declared");
            if let Some(s) = suggest(name, keys) {
                message.push_str(&format!(" (did you mean {s}?)"));
            }
            let span = self.find_var(from, name);
            self.report(rule::UNDEFINED_ARG_IN_FROM, span, message);
        }
    }

    /// Expands a word the way the instruction will be expanded, reporting UndefinedVar.
    fn expand(&mut self, stage: &Stage, node: &Node, word: &str, raw: bool) -> Option<String> {
        let env = |k: &str| stage.env.get(k).cloned();
        let result = if raw {
            let mut lex = Lex::new('\\');
            lex.skip_process_quotes = true;
            lex.expand_with_matches(word, &env)
        } else {
            self.lex.expand_with_matches(word, &env)
        };
        let r = result.ok()?;
        for name in &r.unmatched {
            if stage.declared.contains(name)
                || NON_ENV_ARGS.contains(&name.as_str())
                || PROXY_ARGS.contains(&name.as_str())
            {
                continue;
            }
            let mut message = format!("Usage of undefined variable '${name}'");
            if let Some(s) = suggest(name, stage.env.keys()) {
                message.push_str(&format!(" (did you mean ${s}?)"));
            }
            let span = self.find_var(node, name);
            self.report(rule::UNDEFINED_VAR, span, message);
        }
        Some(r.result)
    }

    fn dispatch_stage(
        &mut self,
        stage: &mut Stage,
        cmds: &[&Node],
        global: &BTreeMap<String, String>,
        dockerignore: Option<&Dockerignore>,
    ) {
        // The last CMD, ENTRYPOINT and HEALTHCHECK of this stage.
        let mut used_once: BTreeMap<&str, &Node> = BTreeMap::new();
        for &node in cmds {
            let kw = written_keyword(node).to_string();
            match node.keyword.as_str() {
                "env" | "label" => {
                    let mut set = Vec::new();
                    for triple in node.args.chunks(3) {
                        let [k, v, sep] = triple else { continue };
                        let key = self.expand(stage, node, k, false).unwrap_or_default();
                        let value = self.expand(stage, node, v, false).unwrap_or_default();
                        if sep.is_empty() {
                            let span = self.instruction_line(node);
                            self.report(
                                rule::LEGACY_KEY_VALUE_FORMAT,
                                span,
                                format!(
                                    "\"{kw} key=value\" should be used instead of legacy \"{kw} key value\" format"
                                ),
                            );
                        }
                        if node.keyword == "env" {
                            self.secret_check(node, "ENV", &key, k);
                            set.push((key, value));
                        }
                    }
                    stage.env.extend(set);
                }
                "arg" => {
                    for word in &node.args {
                        let (key, default) = split_arg(word);
                        if key.is_empty() {
                            continue;
                        }
                        self.secret_check(node, "ARG", key, key);
                        let value = match default {
                            None => global.get(key).cloned(),
                            Some(v) => self.expand(stage, node, v, false),
                        };
                        if let Some(v) = value
                            && !NON_ENV_ARGS.contains(&key)
                        {
                            stage.env.insert(key.to_string(), v);
                        }
                        stage.declared.insert(key.to_string());
                    }
                }
                "workdir" => {
                    let Some(raw) = node.args.first() else {
                        continue;
                    };
                    let path = self.expand(stage, node, raw, false).unwrap_or_default();
                    if !stage.workdir_set && !path.starts_with('/') {
                        let span = self.find(node, raw, false);
                        self.report(
                            rule::WORKDIR_RELATIVE_PATH,
                            span,
                            format!(
                                "Relative workdir {} can have unexpected results if the base image changes",
                                go_quote(&path)
                            ),
                        );
                    }
                    stage.workdir_set = true;
                }
                "cmd" | "entrypoint" | "healthcheck" => {
                    if let Some(prev) = used_once.insert(node.keyword.as_str(), node) {
                        let span = self.keyword(prev);
                        self.report(
                            rule::MULTIPLE_INSTRUCTIONS_DISALLOWED,
                            span,
                            format!(
                                "Multiple {kw} instructions should not be used in the same stage because only the last one will be used"
                            ),
                        );
                    }
                    if node.keyword != "healthcheck" && !node.json && !stage.shell_set {
                        let span = self.keyword(node);
                        self.report(
                            rule::JSON_ARGS_RECOMMENDED,
                            span,
                            format!(
                                "JSON arguments recommended for {kw} to prevent unintended behavior related to OS signals"
                            ),
                        );
                    }
                }
                "expose" => self.expose(stage, node),
                "user" | "stopsignal" => {
                    if let Some(raw) = node.args.first() {
                        self.expand(stage, node, raw, false);
                    }
                }
                "volume" => {
                    for raw in &node.args {
                        self.expand(stage, node, raw, false);
                    }
                }
                "copy" | "add" => self.copy(stage, node, dockerignore),
                "shell" => stage.shell_set = true,
                _ => {}
            }
        }
    }

    fn secret_check(&mut self, node: &Node, instruction: &str, key: &str, written: &str) {
        if looks_secret(key) {
            let span = self.find(node, written, false);
            self.report(
                rule::SECRETS_USED_IN_ARG_OR_ENV,
                span,
                format!(
                    "Do not use ARG or ENV instructions for sensitive data ({instruction} {})",
                    go_quote(key)
                ),
            );
        }
    }

    fn expose(&mut self, stage: &Stage, node: &Node) {
        let env = |k: &str| stage.env.get(k).cloned();
        for raw in &node.args {
            let Ok(ports) = self.lex.expand_words(raw, &env) else {
                continue;
            };
            for port in ports {
                let (ip, host_port, container) = split_port_parts(&port);
                let proto = split_proto(container);
                let span = self.find(node, raw, false);
                if proto != proto.to_lowercase() {
                    self.report(
                        rule::EXPOSE_PROTO_CASING,
                        span,
                        format!(
                            "Defined protocol '{port}' in EXPOSE instruction should be lowercase"
                        ),
                    );
                }
                if !ip.is_empty() || !host_port.is_empty() {
                    self.report(
                        rule::EXPOSE_INVALID_FORMAT,
                        span,
                        format!(
                            "EXPOSE instruction should not define an IP address or host-port mapping, found '{port}'"
                        ),
                    );
                }
            }
        }
    }

    fn copy(&mut self, stage: &Stage, node: &Node, dockerignore: Option<&Dockerignore>) {
        let is_add = node.keyword == "add";
        let mut flags = vec!["chown", "chmod"];
        if is_add {
            flags.push("checksum");
        }
        for name in flags {
            if let Some(v) = flag(node, name).filter(|v| !v.is_empty()) {
                self.expand(stage, node, v, false);
            }
        }
        let mut paths: Vec<(String, &str)> = Vec::new();
        for (i, word) in node.args.iter().enumerate() {
            if !node.json && parse_heredoc(word).is_some() {
                continue;
            }
            if let Some(p) = self.expand(stage, node, word, false)
                && i + 1 < node.args.len()
            {
                paths.push((p, word));
            }
        }
        for doc in &node.heredocs {
            if doc.expand {
                self.expand(stage, node, &doc.content, true);
            }
        }
        // CopyIgnoredFile: only for the build context, and only when the .dockerignore has no
        // `!` exceptions (BuildKit cannot tell statically what those re-include).
        let from_context = is_add || flag(node, "from").is_none();
        let Some(ignore) = dockerignore.filter(|d| from_context && !d.has_exceptions()) else {
            return;
        };
        for (src, written) in paths {
            if is_add && (src.contains("://") || src.starts_with("git@")) {
                continue;
            }
            let cleaned = clean_path(&src);
            if ignore.is_excluded(&cleaned) {
                let span = self.find(node, written, false);
                let cmd = if is_add { "Add" } else { "Copy" };
                self.report(
                    rule::COPY_IGNORED_FILE,
                    span,
                    format!(
                        "Attempting to {cmd} file {} that is excluded by .dockerignore",
                        go_quote(&cleaned)
                    ),
                );
            }
        }
    }
}

/// `[ip:]hostPort:containerPort` split as go-connections' `splitParts` does.
fn split_port_parts(raw: &str) -> (String, String, &str) {
    let parts: Vec<&str> = raw.split(':').collect();
    let n = parts.len();
    let container = parts.last().copied().unwrap_or("");
    match n {
        0 | 1 => (String::new(), String::new(), container),
        2 => (String::new(), parts[0].to_string(), container),
        3 => (parts[0].to_string(), parts[1].to_string(), container),
        _ => (
            parts[..n - 2].join(":"),
            parts[n - 2].to_string(),
            container,
        ),
    }
}

/// The protocol of `port[/proto]` (`tcp` when none is given), as `splitProtoPort` does.
fn split_proto(raw: &str) -> &str {
    let mut parts = raw.split('/');
    let first = parts.next().unwrap_or("");
    if raw.is_empty() || first.is_empty() {
        return "";
    }
    match parts.next() {
        None | Some("") => "tcp",
        Some(proto) => proto,
    }
}

/// Go's `filepath.Clean` for `/`-separated paths.
fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return ".".to_string();
    }
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.last().is_some_and(|s| *s != "..") {
                    out.pop();
                } else if !rooted {
                    out.push("..");
                }
            }
            s => out.push(s),
        }
    }
    let joined = out.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// containerd's architecture normalisation, for the names it knows.
fn normalize_arch(arch: &str) -> Option<&'static str> {
    Some(match arch.to_lowercase().as_str() {
        "i386" | "386" => "386",
        "x86_64" | "x86-64" | "amd64" => "amd64",
        "aarch64" | "arm64" => "arm64",
        "armhf" | "armel" | "arm" => "arm",
        "ppc64le" => "ppc64le",
        "ppc64" => "ppc64",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "loong64" => "loong64",
        "mips64le" => "mips64le",
        "mips64" => "mips64",
        "mipsle" => "mipsle",
        "mips" => "mips",
        "wasm" => "wasm",
        _ => return None,
    })
}

const KNOWN_OS: [&str; 17] = [
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "hurd",
    "illumos",
    "ios",
    "js",
    "linux",
    "nacl",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "windows",
    "zos",
];

/// containerd's `platforms.Parse`, reduced to the OS and architecture: `None` for text it would
/// refuse.
fn parse_platform(s: &str) -> Option<(String, String)> {
    let valid = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    let parts: Vec<&str> = s.split('/').collect();
    let os_part = |p: &str| {
        let p = p.split('(').next().unwrap_or("");
        valid(p).then(|| p.to_lowercase())
    };
    match parts.as_slice() {
        [one] => {
            let lower = one.to_lowercase();
            if KNOWN_OS.contains(&lower.as_str()) {
                Some((lower, host_platform().1))
            } else {
                normalize_arch(one).map(|a| ("linux".to_string(), a.to_string()))
            }
        }
        [os, arch] | [os, arch, _] => {
            if !valid(arch) {
                return None;
            }
            let arch = normalize_arch(arch).map_or_else(|| arch.to_lowercase(), str::to_string);
            Some((os_part(os)?, arch))
        }
        _ => None,
    }
}

/// Whether `name` parses as an image reference (distribution's `ParseNormalizedNamed`).
fn valid_reference(name: &str) -> bool {
    crate::registry::reference::parse(name).is_ok()
}
