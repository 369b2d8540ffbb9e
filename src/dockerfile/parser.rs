//! The Dockerfile parser: BuildKit's `frontend/dockerfile/parser` rules for
//! lines, comments, parser directives, line continuations, per-instruction
//! argument shapes, JSON (exec) forms and heredocs, producing one [`Node`]
//! per instruction whose [`Node::dump`] matches BuildKit's parse dump.
//!
//! Arguments are kept raw (quotes, escapes and `$VAR` untouched); expansion
//! is the caller's job, with [`crate::dockerfile::shell::Lex`], once the
//! build arguments and environment are known.

use super::json::{self, TopLevel};
use super::quote::go_quote;
use super::shell::Lex;

/// One instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Lower-case instruction name: "from", "run", "copy", "env", ...
    pub keyword: String,
    /// Flags as written, quotes removed (`--from=build`, `--chown=1:1`).
    /// A bare `--` ends the flags and is dropped.
    pub flags: Vec<String>,
    /// BuildKit's `Next` chain values, exactly as in the dump: ENV and LABEL
    /// as key, value, separator triples (separator `""` for the legacy
    /// `ENV key value` form, `"="` otherwise); ARG as its words;
    /// HEALTHCHECK as the type (`CMD`, `NONE`) then the command; for ONBUILD
    /// the trigger instruction's text (parsed in [`Node::trigger`]).
    /// Values are raw, unexpanded.
    pub args: Vec<String>,
    /// True when the exec (JSON array) form parsed as valid JSON.
    pub json: bool,
    /// The instruction's text: leading whitespace and comment lines removed,
    /// continuation lines joined without their escape characters.
    pub original: String,
    /// Heredoc bodies, in the order their markers appear. For ONBUILD they
    /// are attached here, to the ONBUILD node, as BuildKit does.
    pub heredocs: Vec<Heredoc>,
    /// First line of the instruction (1-based).
    pub start_line: usize,
    /// Last line of the instruction, including continuation lines and heredoc
    /// bodies (1-based).
    pub end_line: usize,
    /// Column of the keyword on `start_line` (1-based, in characters); 1
    /// when the first line holds only a line continuation.
    pub column: usize,
    /// For ONBUILD, the parsed trigger instruction (its lines and column
    /// are those of the ONBUILD node).
    pub trigger: Option<Box<Node>>,
}

/// A heredoc attached to RUN, COPY or ADD (`<<EOF`, `<<-EOF`, `3<<EOF`).
#[derive(Debug, Clone, PartialEq)]
pub struct Heredoc {
    /// The terminator word with quotes removed.
    pub name: String,
    /// The body exactly as in the file, line endings included, terminator
    /// line excluded. Leading tabs are *not* removed for `<<-` here (BuildKit
    /// does that later); see [`chomp_heredoc_content`].
    pub content: String,
    /// False when any part of the terminator word was quoted: the body is
    /// then not subject to variable expansion.
    pub expand: bool,
    /// `<<-`: leading tabs are stripped from the body and the terminator.
    pub chomp: bool,
    /// The file descriptor written before `<<` (0 when none).
    pub file_descriptor: u32,
}

/// A parser directive (`# escape=`, `# syntax=`, `# check=`).
#[derive(Debug, Clone, PartialEq)]
pub struct Directive {
    /// Lower-case directive name.
    pub name: String,
    pub value: String,
    /// 1-based line.
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct ParseResult {
    pub nodes: Vec<Node>,
    /// The escape character in effect (`\` unless `# escape=` changed it).
    pub escape: char,
    /// The `syntax` directive's value, found as BuildKit's `DetectSyntax`
    /// does (also after a `#!` line, as `// syntax=` or in a JSON file).
    pub syntax: Option<String>,
    /// The `check` directive's value (BuildKit's `ParseDirective("check")`).
    pub check: Option<String>,
    pub warnings: Vec<Warning>,
    /// The directives the parser honoured at the top of the file.
    pub directives: Vec<Directive>,
}

/// A parse-time warning (BuildKit's lint rule NoEmptyContinuation).
#[derive(Debug, Clone, PartialEq)]
pub struct Warning {
    /// 1-based line (the instruction's last line, as BuildKit reports it).
    pub line: usize,
    pub message: String,
    /// BuildKit's rule name.
    pub rule: String,
    pub url: String,
    pub detail: String,
}

/// A parse error; `Display` is `line L:C: message`, the caller prefixes
/// the file name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}:{column}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Every instruction BuildKit knows.
const KEYWORDS: &[&str] = &[
    "add",
    "arg",
    "cmd",
    "copy",
    "entrypoint",
    "env",
    "expose",
    "from",
    "healthcheck",
    "label",
    "maintainer",
    "onbuild",
    "run",
    "shell",
    "stopsignal",
    "user",
    "volume",
    "workdir",
];

const NOT_STRING_ARRAY: &str =
    "when using JSON array syntax, arrays must be comprised of strings only";

/// Parses a Dockerfile.
pub fn parse(source: &str) -> Result<ParseResult, ParseError> {
    // Lines keep their endings: heredoc bodies are taken verbatim.
    let lines: Vec<&str> = source.split_inclusive('\n').collect();
    let mut idx = 0; // lines consumed so far == 1-based number of the last one
    let mut escape = '\\';
    let mut dp = DirectiveParser::default();
    let mut directives = Vec::new();
    let mut nodes = Vec::new();
    let mut warnings = Vec::new();

    while let Some(&line) = lines.get(idx) {
        let raw = if idx == 0 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        idx += 1;
        let start_line = idx;
        let no_nl = trim_newline(raw);
        let token = no_nl.trim_start();
        let column = no_nl.len().saturating_sub(token.len());
        let column = no_nl.get(..column).map_or(0, |s| s.chars().count()) + 1;

        let err = |message: String| ParseError {
            line: start_line,
            column,
            message,
        };
        if let Some((name, value)) = dp.parse_line(token, "#").map_err(err)? {
            if name == "escape" {
                escape = match value.as_str() {
                    "`" => '`',
                    "\\" => '\\',
                    _ => {
                        return Err(err(format!(
                            "invalid escape token '{value}' does not match ` or \\"
                        )));
                    }
                };
            }
            directives.push(Directive {
                name,
                value,
                line: start_line,
            });
        }
        let content = if is_comment(token) { "" } else { token };
        let (first, mut end_of_line) = trim_continuation(content, escape);
        if end_of_line && first.is_empty() {
            continue;
        }
        let column = if first.is_empty() { 1 } else { column };
        let err = |message: String| ParseError {
            line: start_line,
            column,
            message,
        };

        let mut buf = first.to_string();
        let mut has_empty_continuation = false;
        while !end_of_line && let Some(&raw) = lines.get(idx) {
            idx += 1;
            // Comment lines inside a continuation are dropped entirely.
            if is_comment(raw) {
                continue;
            }
            let no_nl = trim_newline(raw);
            if no_nl.trim_start().is_empty() {
                has_empty_continuation = true;
                continue;
            }
            let (piece, eol) = trim_continuation(no_nl, escape);
            end_of_line = eol;
            buf.push_str(piece);
        }

        if has_empty_continuation {
            warnings.push(Warning {
                line: idx,
                message: format!("Empty continuation line found in: {buf}"),
                rule: "NoEmptyContinuation".to_string(),
                url: "https://docs.docker.com/go/dockerfile/rule/no-empty-continuation/"
                    .to_string(),
                detail: "Empty continuation lines will become errors in a future release"
                    .to_string(),
            });
        }

        let mut node = node_from_line(&buf, escape).map_err(err)?;
        let instruction_end = idx;

        if can_contain_heredoc(&node) && buf.contains("<<") {
            for (mut doc, word) in heredocs_from_line(&buf).map_err(err)? {
                let mut terminated = false;
                while let Some(&raw) = lines.get(idx) {
                    idx += 1;
                    let mut candidate = trim_newline(raw);
                    if doc.chomp {
                        candidate = candidate.trim_start_matches('\t');
                    }
                    if candidate == doc.name {
                        terminated = true;
                        break;
                    }
                    doc.content.push_str(raw);
                }
                if !terminated {
                    let (line, column) = locate(&lines, start_line, instruction_end, &word)
                        .unwrap_or((start_line, column));
                    return Err(ParseError {
                        line,
                        column,
                        message: format!(
                            "unterminated heredoc {}: expected a line {} to end it before the end of the file",
                            go_quote(&word),
                            go_quote(&doc.name)
                        ),
                    });
                }
                node.heredocs.push(doc);
            }
        }

        node.start_line = start_line;
        node.end_line = idx;
        node.column = column;
        if let Some(t) = node.trigger.as_deref_mut() {
            t.start_line = start_line;
            t.end_line = idx;
            t.column = column;
        }
        nodes.push(node);
    }

    if nodes.is_empty() {
        return Err(ParseError {
            line: idx.max(1),
            column: 1,
            message: "file with no instructions".to_string(),
        });
    }

    Ok(ParseResult {
        nodes,
        escape,
        syntax: detect_syntax(source).map(|d| d.value),
        check: parse_directive("check", source).map(|d| d.value),
        warnings,
        directives,
    })
}

/// Finds `needle` in the source lines `first..=last` (1-based) and returns
/// its 1-based line and column, for pointing errors at the right place.
fn locate(lines: &[&str], first: usize, last: usize, needle: &str) -> Option<(usize, usize)> {
    (first..=last).find_map(|n| {
        let l = lines.get(n.checked_sub(1)?)?;
        let at = l.find(needle)?;
        Some((n, l.get(..at)?.chars().count() + 1))
    })
}

impl Node {
    /// One line in BuildKit's dump format: `(keyword ["--flag"] "arg" ...)`.
    pub fn dump(&self) -> String {
        format!("({})", self.dump_inner())
    }

    fn dump_inner(&self) -> String {
        let mut s = self.keyword.clone();
        if !self.flags.is_empty() {
            let flags: Vec<String> = self.flags.iter().map(|f| go_quote(f)).collect();
            s.push_str(" [");
            s.push_str(&flags.join(" "));
            s.push(']');
        }
        if let Some(t) = &self.trigger {
            s.push_str(" (");
            s.push_str(&t.dump_inner());
            s.push(')');
        } else {
            for a in &self.args {
                s.push(' ');
                s.push_str(&go_quote(a));
            }
        }
        s.trim().to_string()
    }
}

/// The whole parse in BuildKit's dump format: one node per line, each line
/// newline-terminated.
pub fn dump(result: &ParseResult) -> String {
    let mut out = String::new();
    for n in &result.nodes {
        out.push_str(&n.dump());
        out.push('\n');
    }
    out
}

/// Removes the leading tabs of every line, as BuildKit does to the body of
/// a `<<-` heredoc before using it.
pub fn chomp_heredoc_content(src: &str) -> String {
    src.split_inclusive('\n')
        .map(|l| l.trim_start_matches('\t'))
        .collect()
}

// --- lines ---------------------------------------------------------------

/// Go's `bytes.TrimRight(line, "\r\n")`.
fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// BuildKit's line-continuation rule: the escape character followed only by
/// spaces or tabs ends a line that continues, unless the escape character
/// is itself escaped. Returns the line without it and whether the
/// instruction ends here.
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let body = line.trim_end_matches([' ', '\t']);
    let Some(before) = body.strip_suffix(escape) else {
        return (line, true);
    };
    if before.ends_with(escape) {
        return (line, true);
    }
    (before, false)
}

/// `[\t\v\f\r ]`, BuildKit's `reWhitespace`.
fn is_re_ws(c: char) -> bool {
    matches!(c, '\t' | '\u{b}' | '\u{c}' | '\r' | ' ')
}

// --- directives ----------------------------------------------------------

#[derive(Default)]
struct DirectiveParser {
    done: bool,
    seen: Vec<String>,
}

impl DirectiveParser {
    /// Looks at one line while directives may still appear; the first line
    /// that is not a known directive ends the search for good.
    fn parse_line(&mut self, line: &str, prefix: &str) -> Result<Option<(String, String)>, String> {
        if self.done {
            return Ok(None);
        }
        let Some((key, value)) = match_directive(line, prefix) else {
            self.done = true;
            return Ok(None);
        };
        let key = key.to_ascii_lowercase();
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(None);
        }
        if self.seen.contains(&key) {
            return Err(format!("only one {key} parser directive can be used"));
        }
        self.seen.push(key.clone());
        Ok(Some((key, value.to_string())))
    }
}

/// `^PREFIX\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$` with Go's `\s`.
fn match_directive<'a>(line: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let re_space = |c: char| matches!(c, '\t' | '\n' | '\u{c}' | '\r' | ' ');
    let rest = line.strip_prefix(prefix)?.trim_start_matches(re_space);
    if !rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let key_end = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let (key, rest) = rest.split_at(key_end);
    let rest = rest.trim_start_matches(re_space).strip_prefix('=')?;
    let trimmed = rest.trim_start_matches(re_space);
    let value = if trimmed.is_empty() {
        // Only whitespace: the lazy group still needs one character and
        // takes the last one `.` can match.
        let (i, c) = rest.char_indices().rev().find(|&(_, c)| c != '\n')?;
        rest.get(i..i + c.len_utf8())?
    } else {
        trimmed.trim_end_matches(re_space)
    };
    if value.contains('\n') {
        return None;
    }
    Some((key, value))
}

/// Finds the `syntax` directive the way BuildKit's `DetectSyntax` does:
/// after an optional BOM and `#!` line, as `# syntax=`, else `// syntax=`,
/// else a top-level `"syntax"` string if the whole file is a JSON object.
pub fn detect_syntax(source: &str) -> Option<Directive> {
    find_directive("syntax", source, true)
}

/// Finds a `# key=value` directive at the top of `source` the way
/// BuildKit's `ParseDirective` does (BOM and a `#!` line skipped).
pub fn parse_directive(key: &str, source: &str) -> Option<Directive> {
    find_directive(key, source, false)
}

fn find_directive(key: &str, source: &str, any_format: bool) -> Option<Directive> {
    let src = source.strip_prefix('\u{feff}').unwrap_or(source);
    let first = src.split('\n').next().unwrap_or("");
    let (src, offset) = if first.starts_with("#!") {
        (src.get(first.len() + 1..).unwrap_or(""), 1)
    } else {
        (src, 0)
    };
    let scan = |prefix: &str| {
        let mut p = DirectiveParser::default();
        for (i, l) in src.split_inclusive('\n').enumerate() {
            let l = l.strip_suffix('\n').unwrap_or(l);
            let l = l.strip_suffix('\r').unwrap_or(l);
            if p.done {
                break;
            }
            match p.parse_line(l, prefix) {
                Err(_) => break,
                Ok(Some((name, value))) if name == key => {
                    return Some(Directive {
                        name,
                        value,
                        line: offset + i + 1,
                    });
                }
                Ok(_) => {}
            }
        }
        None
    };
    if let Some(d) = scan("#") {
        return Some(d);
    }
    if !any_format {
        return None;
    }
    if let Some(d) = scan("//") {
        return Some(d);
    }
    match json::parse(src) {
        Some(TopLevel::Object(members)) => {
            let (_, v) = members.into_iter().rev().find(|(k, _)| k == key)?;
            Some(Directive {
                name: key.to_string(),
                value: v?,
                line: offset + 1,
            })
        }
        _ => None,
    }
}

// --- instructions --------------------------------------------------------

/// Splits an instruction into keyword (as written), flags and the rest.
fn split_command(line: &str) -> (&str, Vec<String>, String) {
    let trimmed = line.trim();
    match trimmed.find(is_re_ws) {
        None => (trimmed, Vec::new(), String::new()),
        Some(i) => {
            let (cmd, rest) = trimmed.split_at(i);
            let (args, flags) = extract_builder_flags(rest.trim_start_matches(is_re_ws));
            (cmd, flags, args.trim().to_string())
        }
    }
}

/// BuildKit's `extractBuilderFlags`: leading `--words` are flags (quotes
/// removed, `\` escapes the next character); the first word not starting
/// with `--`, or a bare `--`, ends them.
fn extract_builder_flags(line: &str) -> (&str, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let rest_at = |pos: usize| {
        chars
            .get(pos)
            .map_or("", |&(b, _)| line.get(b..).unwrap_or(""))
    };
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut pos = 0;
    loop {
        let Some(&(_, ch)) = chars.get(pos) else {
            if phase != Phase::Spaces && word != "--" && (blank_ok || !word.is_empty()) {
                words.push(word);
            }
            return ("", words);
        };
        let mut ch = ch;
        if phase == Phase::Spaces {
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            let dash_dash = ch == '-' && chars.get(pos + 1).is_some_and(|&(_, c)| c == '-');
            if !dash_dash {
                return (rest_at(pos), words);
            }
            phase = Phase::Word;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if word == "--" {
                    return (rest_at(pos), words);
                }
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
            if ch == '\\' {
                pos += 1;
                match chars.get(pos) {
                    None => continue, // a trailing `\` is dropped
                    Some(&(_, c)) => ch = c,
                }
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // Inside quotes.
        if ch == quote {
            phase = Phase::Word;
            pos += 1;
            continue;
        }
        if ch == '\\' {
            pos += 1;
            match chars.get(pos) {
                None => {
                    phase = Phase::Word;
                    continue;
                }
                Some(&(_, c)) => ch = c,
            }
        }
        word.push(ch);
        pos += 1;
    }
}

/// BuildKit's `newNodeFromLine` plus the instruction-name check BuildKit
/// does right after parsing.
fn node_from_line(line: &str, escape: char) -> Result<Node, String> {
    let (cmd, flags, rest) = split_command(line);
    let keyword = cmd.to_lowercase();
    let mut node = Node {
        keyword,
        flags,
        args: Vec::new(),
        json: false,
        original: line.to_string(),
        heredocs: Vec::new(),
        start_line: 0,
        end_line: 0,
        column: 0,
        trigger: None,
    };
    match node.keyword.as_str() {
        "add" | "copy" | "volume" => match parse_json(&rest)? {
            Some(v) => (node.args, node.json) = (v, true),
            None => node.args = split_whitespace(&rest),
        },
        "cmd" | "entrypoint" | "run" | "shell" => {
            (node.args, node.json) = parse_maybe_json(&rest)?;
        }
        "arg" => node.args = parse_words(&rest, escape),
        "env" => node.args = parse_name_val(&rest, "ENV", escape)?,
        "label" => node.args = parse_name_val(&rest, "LABEL", escape)?,
        "expose" | "from" => node.args = split_whitespace(&rest),
        "healthcheck" => {
            let sep = rest.find(char::is_whitespace).unwrap_or(rest.len());
            if sep > 0 {
                let (typ, cmd) = rest.split_at(sep);
                let (mut args, json) = parse_maybe_json(cmd.trim_start())?;
                args.insert(0, typ.to_string());
                (node.args, node.json) = (args, json);
            }
        }
        "maintainer" | "stopsignal" | "user" | "workdir" => {
            if !rest.is_empty() {
                node.args = vec![rest];
            }
        }
        "onbuild" => {
            if !rest.is_empty() {
                // Checked before parsing the trigger so that a chain of
                // ONBUILDs cannot recurse.
                let (trigger_cmd, _, _) = split_command(&rest);
                match trigger_cmd.to_uppercase().as_str() {
                    "ONBUILD" => {
                        return Err(
                            "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".to_string()
                        );
                    }
                    t @ ("FROM" | "MAINTAINER") => {
                        return Err(format!("{t} isn't allowed as an ONBUILD trigger"));
                    }
                    _ => {}
                }
                let trigger = node_from_line(&rest, escape)?;
                node.args = vec![rest];
                node.trigger = Some(Box::new(trigger));
            }
        }
        _ => return Err(unknown_instruction(cmd)),
    }
    Ok(node)
}

/// BuildKit's message, with its "did you mean" suggestion (Levenshtein
/// distance below 3, case matched to what was written).
fn unknown_instruction(cmd: &str) -> String {
    if cmd.is_empty() {
        return "unknown instruction: the line holds only line continuations".to_string();
    }
    let lower = cmd.to_lowercase();
    let mut best: Option<&str> = None;
    let mut min = 3;
    for k in KEYWORDS {
        let d = levenshtein(&lower, k);
        if d < min {
            min = d;
            best = Some(k);
        }
    }
    let mut msg = format!("unknown instruction: {cmd}");
    if let Some(k) = best {
        let k = if cmd == cmd.to_uppercase() {
            k.to_uppercase()
        } else {
            k.to_string()
        };
        msg.push_str(&format!(" (did you mean {k}?)"));
    }
    msg
}

pub(crate) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev.get(j).copied().unwrap_or(0) + usize::from(ca != cb);
            let del = prev.get(j + 1).copied().unwrap_or(0) + 1;
            let ins = cur.get(j).copied().unwrap_or(0) + 1;
            if let Some(c) = cur.get_mut(j + 1) {
                *c = sub.min(del).min(ins);
            }
        }
        prev = cur;
    }
    prev.last().copied().unwrap_or(0)
}

/// `reWhitespace.Split` of an already trimmed string.
fn split_whitespace(rest: &str) -> Vec<String> {
    rest.split(is_re_ws)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// The exec form: `Some(elements)` when `rest` is a valid JSON array of
/// strings, `None` when it is not JSON (the shell form applies), and an
/// error for a valid JSON array holding something other than strings.
fn parse_json(rest: &str) -> Result<Option<Vec<String>>, String> {
    let rest = rest.trim_start();
    if !rest.starts_with('[') {
        return Ok(None);
    }
    match json::parse(rest) {
        Some(TopLevel::Array(items)) => items
            .into_iter()
            .map(|i| i.ok_or_else(|| NOT_STRING_ARRAY.to_string()))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        _ => Ok(None),
    }
}

/// The exec form, or else the whole rest as one shell-form string.
fn parse_maybe_json(rest: &str) -> Result<(Vec<String>, bool), String> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    Ok(match parse_json(rest)? {
        Some(v) => (v, true),
        None => (vec![rest.to_string()], false),
    })
}

/// BuildKit's `parseWords`: splits on whitespace outside quotes, keeping
/// quotes and escapes in the words (they are removed at expansion time).
fn parse_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word = String::new();
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut pos = 0;
    loop {
        let Some(&c) = chars.get(pos) else {
            if phase != Phase::Spaces && (blank_ok || !word.is_empty()) {
                words.push(word);
            }
            return words;
        };
        let mut ch = c;
        if phase == Phase::Spaces {
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                let Some(&n) = chars.get(pos + 1) else {
                    pos += 1; // an escape at the very end is dropped
                    continue;
                };
                // Outside quotes an escape and the next character are kept
                // together, even when that character is a quote.
                word.push(ch);
                pos += 1;
                ch = n;
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // Inside quotes; nothing can be escaped inside single quotes.
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            let Some(&n) = chars.get(pos + 1) else {
                phase = Phase::Word;
                pos += 1;
                continue;
            };
            word.push(ch);
            pos += 1;
            ch = n;
        }
        word.push(ch);
        pos += 1;
    }
}

/// ENV and LABEL: `key value` (legacy, one pair, value is the rest of the
/// line) or `key=value ...`, as key, value, separator triples.
fn parse_name_val(rest: &str, key: &str, escape: char) -> Result<Vec<String>, String> {
    let words = parse_words(rest, escape);
    let Some(first) = words.first() else {
        return Ok(Vec::new());
    };
    if !first.contains('=') {
        let Some(i) = rest.find(is_re_ws) else {
            return Err(format!("{key} must have two arguments"));
        };
        let (k, v) = rest.split_at(i);
        return Ok(vec![
            k.to_string(),
            v.trim_start_matches(is_re_ws).to_string(),
            String::new(),
        ]);
    }
    let mut out = Vec::with_capacity(words.len() * 3);
    for word in &words {
        let Some((k, v)) = word.split_once('=') else {
            return Err(format!(
                "Syntax error - can't find = in {}. Must be of the form: name=value",
                go_quote(word)
            ));
        };
        out.extend([k.to_string(), v.to_string(), "=".to_string()]);
    }
    Ok(out)
}

// --- heredocs ------------------------------------------------------------

fn can_contain_heredoc(node: &Node) -> bool {
    let n = match (&node.trigger, node.keyword.as_str()) {
        (Some(t), "onbuild") => t,
        _ => node,
    };
    matches!(n.keyword.as_str(), "add" | "copy" | "run") && !n.json
}

/// The heredocs an instruction line opens, each with the word it came from.
fn heredocs_from_line(line: &str) -> Result<Vec<(Heredoc, String)>, String> {
    let mut lex = Lex::new('\\');
    lex.raw_quotes = true;
    lex.raw_escapes = true;
    lex.skip_unset_env = true;
    let words = lex.expand_words(line, &|_| None).unwrap_or_default();
    let mut docs = Vec::new();
    for w in words {
        if let Some(h) = heredoc_from_word(&w)? {
            docs.push((h, w));
        }
    }
    Ok(docs)
}

/// Recognises a heredoc marker word (`^(\d*)<<(-?)([^<]*)$`), as BuildKit's
/// `ParseHeredoc` does; `None` when the word is not one. Useful to tell a
/// heredoc source (`COPY <<EOF /dst`) from a file name.
pub fn parse_heredoc(word: &str) -> Option<Heredoc> {
    heredoc_from_word(word).ok().flatten()
}

fn heredoc_from_word(word: &str) -> Result<Option<Heredoc>, String> {
    let digits = word
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(word.len());
    let (fd, rest) = word.split_at(digits);
    let Some(rest) = rest.strip_prefix("<<") else {
        return Ok(None);
    };
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    if rest.is_empty() || rest.contains('<') {
        return Ok(None);
    }
    // Go ignores the parse error; an overflowing number saturates.
    let file_descriptor = if fd.is_empty() {
        0
    } else {
        fd.parse::<u32>().unwrap_or(u32::MAX)
    };

    // Lex the word with and without quote removal: if the counts of quote
    // characters differ, part of it was quoted and the body is literal.
    let mut lex = Lex::new('\\');
    lex.skip_unset_env = true;
    let none = |_: &str| None;
    let words = lex.expand_words(rest, &none).map_err(|e| e.to_string())?;
    let [name] = words.as_slice() else {
        return Ok(None);
    };
    lex.raw_quotes = true;
    let raw = lex.expand_words(rest, &none).map_err(|e| e.to_string())?;
    let [raw_name] = raw.as_slice() else {
        return Err(format!(
            "internal lexing of heredoc produced inconsistent results: {rest}"
        ));
    };
    let quotes = |s: &str| s.chars().filter(|&c| c == '\'' || c == '"').count();
    Ok(Some(Heredoc {
        name: name.clone(),
        content: String::new(),
        expand: quotes(name) == quotes(raw_name),
        chomp,
        file_descriptor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(src: &str) -> ParseResult {
        parse(src).unwrap_or_else(|e| panic!("{e}"))
    }

    fn perr(src: &str) -> ParseError {
        parse(src).expect_err("expected a parse error")
    }

    #[test]
    fn heredoc_basic_and_multiple() {
        let r = p(
            "FROM a\nRUN <<EOF\necho hi\n  echo $X\nEOF\nCOPY <<one <<\"two\" /dst/\n1\none\n2\ntwo\nRUN x\n",
        );
        let run = &r.nodes[1];
        assert_eq!(run.dump(), r#"(run "<<EOF")"#);
        assert_eq!(run.heredocs.len(), 1);
        assert_eq!(run.heredocs[0].name, "EOF");
        assert_eq!(run.heredocs[0].content, "echo hi\n  echo $X\n");
        assert!(run.heredocs[0].expand);
        assert_eq!((run.start_line, run.end_line), (2, 5));
        let copy = &r.nodes[2];
        assert_eq!(copy.args, vec!["<<one", "<<\"two\"", "/dst/"]);
        let names: Vec<_> = copy
            .heredocs
            .iter()
            .map(|h| (h.name.as_str(), h.content.as_str(), h.expand))
            .collect();
        assert_eq!(names, vec![("one", "1\n", true), ("two", "2\n", false)]);
        assert_eq!((copy.start_line, copy.end_line), (6, 10));
        assert_eq!(r.nodes[3].start_line, 11);
    }

    #[test]
    fn heredoc_chomp_fd_and_quotes() {
        let r = p("FROM a\nRUN 3<<-'END' cat\n\tbody\n\t\tEND\nRUN x\n");
        let h = &r.nodes[1].heredocs[0];
        assert_eq!(h.name, "END");
        assert!(h.chomp && !h.expand);
        assert_eq!(h.file_descriptor, 3);
        // The terminator may be indented with tabs; the body keeps its tabs.
        assert_eq!(h.content, "\tbody\n");
        assert_eq!(chomp_heredoc_content("\tbody\n\t\tx\n  y"), "body\nx\n  y");
        let r = p("FROM a\nRUN <<E\"O\"F\nx\nEOF\n");
        assert!(!r.nodes[1].heredocs[0].expand);
    }

    #[test]
    fn heredoc_only_where_buildkit_allows() {
        // JSON form and other instructions do not open heredocs.
        let r = p("FROM a\nRUN [\"<<EOF\"]\nENV A=<<EOF\nLABEL b=c\n");
        assert!(r.nodes.iter().all(|n| n.heredocs.is_empty()));
        assert_eq!(r.nodes.len(), 4);
        // ONBUILD RUN does, and the body is attached to the ONBUILD node.
        let r = p("FROM a\nONBUILD RUN <<EOF\nhi\nEOF\n");
        assert_eq!(r.nodes[1].dump(), r#"(onbuild (run "<<EOF"))"#);
        assert_eq!(r.nodes[1].heredocs[0].content, "hi\n");
        // `<<` inside quotes or in a longer word is not a heredoc.
        let r = p("FROM a\nRUN echo '<<EOF' a<<EOF\nRUN b\n");
        assert!(r.nodes[1].heredocs.is_empty());
    }

    #[test]
    fn heredoc_marker_forms() {
        for w in [
            "<<EOF",
            "<<'EOF'",
            "<<\"EOF\"",
            "<<-EOF",
            "<<-'EOF'",
            "<<-\"EOF\"",
        ] {
            assert_eq!(
                parse_heredoc(w).map(|h| h.name),
                Some("EOF".to_string()),
                "{w}"
            );
        }
        for w in ["", "EOF", "<<", "<<-", "<EOF", "<<<EOF", "x<<EOF", "<<'EOF"] {
            assert!(parse_heredoc(w).is_none(), "{w}");
        }
        // An unbalanced quote in the marker is an error, not "no heredoc".
        assert!(heredoc_from_word("<<'EOF").is_err());
        assert!(heredoc_from_word("<<EOF\"").is_err());
        // Each body ends at its own terminator, even if it names the other.
        let r = p("FROM a\nCOPY <<X <<Y /dest\nY\nX\nX\nY\n");
        let docs: Vec<_> = r.nodes[1]
            .heredocs
            .iter()
            .map(|h| (h.name.as_str(), h.content.as_str()))
            .collect();
        assert_eq!(docs, vec![("X", "Y\n"), ("Y", "X\n")]);
        // A heredoc body is not parsed: comments and blank lines are kept.
        let r = p("FROM a\nRUN <<EOF\n# c\n\nx \\\nEOF\n");
        assert_eq!(r.nodes[1].heredocs[0].content, "# c\n\nx \\\n");
        assert!(r.warnings.is_empty());
    }

    #[test]
    fn heredoc_unterminated_points_at_marker() {
        let e = perr("FROM a\nRUN echo x && \\\n  cat <<EOF\nline\n");
        assert_eq!((e.line, e.column), (3, 7));
        assert!(e.message.contains("unterminated heredoc"), "{e}");
        assert!(e.message.contains("\"EOF\""), "{e}");
        assert!(e.to_string().starts_with("line 3:7: "), "{e}");
    }

    #[test]
    fn flags_parsing() {
        let r = p(
            "FROM --platform=$BUILDPLATFORM img AS b\nCOPY --from=b --chown=\"1:1\" --link -- --notflag /x\nRUN --mount=type=cache,target=/c --network=none make\nADD --chmod=755 a b\n",
        );
        assert_eq!(r.nodes[0].flags, vec!["--platform=$BUILDPLATFORM"]);
        assert_eq!(r.nodes[0].args, vec!["img", "AS", "b"]);
        assert_eq!(r.nodes[1].flags, vec!["--from=b", "--chown=1:1", "--link"]);
        assert_eq!(r.nodes[1].args, vec!["--notflag", "/x"]);
        assert_eq!(
            r.nodes[2].flags,
            vec!["--mount=type=cache,target=/c", "--network=none"]
        );
        assert_eq!(r.nodes[2].args, vec!["make"]);
        assert_eq!(
            r.nodes[1].dump(),
            r#"(copy ["--from=b" "--chown=1:1" "--link"] "--notflag" "/x")"#
        );
        assert_eq!(r.nodes[3].dump(), r#"(add ["--chmod=755"] "a" "b")"#);
        // A single dash is not a flag.
        let r = p("RUN -x\n");
        assert!(r.nodes[0].flags.is_empty());
        assert_eq!(r.nodes[0].args, vec!["-x"]);
    }

    #[test]
    fn spans_lines_and_columns() {
        let src = "# comment\n\n  FROM a\nRUN a \\\n  # inside\n  b \\\n\n  c\n\tCMD [\"x\"]\n";
        let r = p(src);
        let n = &r.nodes;
        assert_eq!((n[0].start_line, n[0].end_line, n[0].column), (3, 3, 3));
        assert_eq!((n[1].start_line, n[1].end_line, n[1].column), (4, 8, 1));
        assert_eq!(n[1].original, "RUN a   b   c");
        assert!(n[2].json);
        assert_eq!((n[2].start_line, n[2].column), (9, 2));
        assert_eq!(r.warnings.len(), 1);
        assert_eq!(r.warnings[0].line, 8);
        assert_eq!(r.warnings[0].rule, "NoEmptyContinuation");
        assert!(r.warnings[0].message.contains("RUN a   b   c"));
    }

    #[test]
    fn unknown_instruction_errors() {
        let e = perr("FROM a\n\n  FORM b\n");
        assert_eq!((e.line, e.column), (3, 3));
        assert_eq!(e.message, "unknown instruction: FORM (did you mean FROM?)");
        assert_eq!(
            e.to_string(),
            "line 3:3: unknown instruction: FORM (did you mean FROM?)"
        );
        assert_eq!(
            perr("FROM a\nfoo\n").message,
            "unknown instruction: foo (did you mean from?)"
        );
        assert_eq!(
            perr("FROM a\nxyzzy\n").message,
            "unknown instruction: xyzzy"
        );
        assert!(
            perr("FROM a\nONBUILD ONBUILD RUN x\n")
                .message
                .contains("Chaining ONBUILD")
        );
        assert!(
            perr("FROM a\nONBUILD FROM x\n")
                .message
                .contains("FROM isn't allowed")
        );
        assert!(
            perr("FROM a\nONBUILD BOGUS x\n")
                .message
                .contains("unknown instruction: BOGUS")
        );
    }

    #[test]
    fn directives_only_at_top() {
        let r = p(
            "# syntax=docker/dockerfile:1\n# check=skip=all\n# escape=`\nFROM a\nRUN a `\n  b\n# escape=\\\nRUN c `\n d\n",
        );
        assert_eq!(r.escape, '`');
        assert_eq!(r.syntax.as_deref(), Some("docker/dockerfile:1"));
        assert_eq!(r.check.as_deref(), Some("skip=all"));
        assert_eq!(r.nodes[1].args, vec!["a   b"]);
        assert_eq!(r.nodes[2].args, vec!["c  d"]);
        assert_eq!(r.directives.len(), 3);
        assert_eq!(r.directives[2].line, 3);
        // A directive after a comment is just a comment.
        let r = p("# hello\n# escape=`\nFROM a\n");
        assert_eq!(r.escape, '\\');
        assert!(r.directives.is_empty());
        let e = perr("# escape=`\n# escape=\\\nFROM a\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("only one escape parser directive"));
        let e = perr("# escape=x\nFROM a\n");
        assert!(e.message.contains("invalid escape token 'x'"), "{e}");
    }

    #[test]
    fn syntax_detection_fallbacks() {
        assert_eq!(
            detect_syntax("#!/usr/bin/env x\n# syntax = a/b:1 c\nFROM a")
                .map(|d| (d.value, d.line)),
            Some(("a/b:1 c".to_string(), 2))
        );
        assert_eq!(
            detect_syntax("// syntax=x/y\n").map(|d| d.value),
            Some("x/y".to_string())
        );
        assert_eq!(
            detect_syntax("{\"syntax\": \"j/k\"}").map(|d| d.value),
            Some("j/k".to_string())
        );
        assert_eq!(detect_syntax("FROM a\n# syntax=x\n"), None);
        assert_eq!(parse_directive("check", "// check=x\n"), None);
    }

    #[test]
    fn json_and_shell_forms() {
        let r = p(
            "CMD [\"a\", \"b\"]\nCMD [\"a\" \"b\"]\nENTRYPOINT []\nSHELL [\"sh\", \"-c\"]\nVOLUME [\"/a\"] \nVOLUME /a /b\n",
        );
        assert!(r.nodes[0].json && r.nodes[0].args == vec!["a", "b"]);
        assert!(!r.nodes[1].json && r.nodes[1].args == vec!["[\"a\" \"b\"]"]);
        assert!(r.nodes[2].json && r.nodes[2].args.is_empty());
        assert_eq!(r.nodes[4].args, vec!["/a"]);
        assert_eq!(r.nodes[5].args, vec!["/a", "/b"]);
        assert!(perr("CMD [\"a\", 1]\n").message.contains("strings only"));
    }

    #[test]
    fn env_label_arg_shapes() {
        let r = p(
            "ENV a b c\nENV a=1 b=\"2 3\"\nLABEL x=y\nARG A B=c\nHEALTHCHECK NONE\nHEALTHCHECK --interval=1s CMD [\"t\"]\nSTOPSIGNAL SIGTERM\n",
        );
        assert_eq!(r.nodes[0].args, vec!["a", "b c", ""]);
        assert_eq!(r.nodes[1].args, vec!["a", "1", "=", "b", "\"2 3\"", "="]);
        assert_eq!(r.nodes[3].args, vec!["A", "B=c"]);
        assert_eq!(r.nodes[4].args, vec!["NONE"]);
        assert!(r.nodes[5].json);
        assert_eq!(
            r.nodes[5].dump(),
            r#"(healthcheck ["--interval=1s"] "CMD" "t")"#
        );
        assert_eq!(
            perr("FROM a\nENV PATH\n").message,
            "ENV must have two arguments"
        );
        assert!(
            perr("LABEL a=b c\n")
                .message
                .contains("can't find = in \"c\"")
        );
    }

    #[test]
    fn empty_and_comment_only_files_fail() {
        assert_eq!(perr("").message, "file with no instructions");
        assert_eq!(perr("# a\n\n   \n").message, "file with no instructions");
    }

    #[test]
    fn odd_input_does_not_panic() {
        for src in [
            "\\",
            "\\\n \\\n",
            "\u{feff}FROM a",
            "RUN <<",
            "RUN <<\"",
            "COPY 9999999999999<<E a\nE\n",
            "RUN \u{a0}\u{2028}x",
            "FROM\r\n",
            "RUN a\\\r\n b\r\n",
            "ENV \u{85}a=\u{85}",
            "ONBUILD",
            "HEALTHCHECK",
            "RUN --",
            "RUN --a\\",
            "RUN --a=\"b",
            "#escape= ",
            "CMD [\"\\ud800\"]",
        ] {
            let _ = parse(src);
        }
        assert_eq!(p("RUN a\\\r\n b\r\n").nodes[0].args, vec!["a b"]);
        assert_eq!(p("\u{feff}  FROM a").nodes[0].column, 3);
    }

    // --- the project's own cases, beyond BuildKit's test data -------------------------------

    #[test]
    fn heredoc_several_in_one_run_with_a_command() {
        let r = p(
            "FROM a\nRUN cat <<A <<-\"B\" > /out && \\\n    wc -l /out\nfirst $X\nA\n\tsecond $X\n\tB\nRUN after\n",
        );
        let run = &r.nodes[1];
        assert_eq!(run.keyword, "run");
        assert!(!run.json);
        assert_eq!(run.args, vec!["cat <<A <<-\"B\" > /out &&     wc -l /out"]);
        let docs: Vec<_> = run
            .heredocs
            .iter()
            .map(|h| (h.name.as_str(), h.content.as_str(), h.expand, h.chomp))
            .collect();
        assert_eq!(
            docs,
            vec![
                ("A", "first $X\n", true, false),
                ("B", "\tsecond $X\n", false, true),
            ]
        );
        assert_eq!((run.start_line, run.end_line, run.column), (2, 7, 1));
        assert_eq!(
            chomp_heredoc_content(&run.heredocs[1].content),
            "second $X\n"
        );
        assert_eq!(r.nodes[2].start_line, 8);
    }

    #[test]
    fn heredoc_quoted_delimiters_and_copy() {
        // Single quotes, double quotes and a partly quoted word all make the body literal.
        for (marker, name) in [("<<'EOT'", "EOT"), ("<<\"EOT\"", "EOT"), ("<<E'O'T", "EOT")] {
            let src = format!("FROM a\nRUN {marker}\n$HOME\nEOT\n");
            let doc = &p(&src).nodes[1].heredocs[0];
            assert_eq!((doc.name.as_str(), doc.expand), (name, false), "{marker}");
            assert_eq!(doc.content, "$HOME\n");
        }
        let r = p(
            "FROM a\nCOPY --chmod=0755 <<-EOF /usr/local/bin/run.sh\n\t#!/bin/sh\n\techo hi\n\tEOF\nADD <<one <<two /dest/\n1\none\n2\ntwo\n",
        );
        let copy = &r.nodes[1];
        assert_eq!(copy.flags, vec!["--chmod=0755"]);
        assert_eq!(copy.args, vec!["<<-EOF", "/usr/local/bin/run.sh"]);
        assert!(copy.heredocs[0].chomp && copy.heredocs[0].expand);
        assert_eq!(copy.heredocs[0].content, "\t#!/bin/sh\n\techo hi\n");
        assert_eq!((copy.start_line, copy.end_line), (2, 5));
        let add = &r.nodes[2];
        assert_eq!(add.keyword, "add");
        assert_eq!(add.args, vec!["<<one", "<<two", "/dest/"]);
        assert_eq!(add.heredocs.len(), 2);
        assert_eq!((add.start_line, add.end_line), (6, 10));
    }

    #[test]
    fn run_flags() {
        let r = p(
            "FROM a\nRUN --mount=type=cache,target=/x,sharing=locked --network=none --security=insecure make all\nRUN --mount=type=secret,id=tok,required=true [\"sh\", \"-c\", \"x\"]\n",
        );
        let n = &r.nodes[1];
        assert_eq!(
            n.flags,
            vec![
                "--mount=type=cache,target=/x,sharing=locked",
                "--network=none",
                "--security=insecure"
            ]
        );
        assert_eq!(n.args, vec!["make all"]);
        assert!(!n.json);
        let n = &r.nodes[2];
        assert_eq!(n.flags, vec!["--mount=type=secret,id=tok,required=true"]);
        assert!(n.json);
        assert_eq!(n.args, vec!["sh", "-c", "x"]);
    }

    #[test]
    fn copy_and_add_flags() {
        let r = p(concat!(
            "FROM a\n",
            "COPY --from=build --chown=app:app --chmod=755 --link /out/app /usr/bin/\n",
            "COPY --chmod=u+x,g-w --parents --exclude=*.md --exclude=tmp/ src/ ./dst/\n",
            "ADD --checksum=sha256:24454f830cdd571e2c4ad15481119c43b0cafe48a52a06a39fefcc0abfc4ea1c https://example.com/a.tgz /a.tgz\n",
            "ADD --keep-git-dir=true --unpack=false https://github.com/moby/buildkit.git#v0.14.0 /src\n",
            "COPY [\"--not-a-flag\", \"/d\"]\n",
        ));
        let n = &r.nodes;
        assert_eq!(
            n[1].flags,
            vec!["--from=build", "--chown=app:app", "--chmod=755", "--link"]
        );
        assert_eq!(n[1].args, vec!["/out/app", "/usr/bin/"]);
        assert_eq!(
            n[2].flags,
            vec![
                "--chmod=u+x,g-w",
                "--parents",
                "--exclude=*.md",
                "--exclude=tmp/"
            ]
        );
        assert_eq!(n[2].args, vec!["src/", "./dst/"]);
        assert_eq!(
            n[3].flags,
            vec![
                "--checksum=sha256:24454f830cdd571e2c4ad15481119c43b0cafe48a52a06a39fefcc0abfc4ea1c"
            ]
        );
        assert_eq!(n[3].args, vec!["https://example.com/a.tgz", "/a.tgz"]);
        assert_eq!(n[4].flags, vec!["--keep-git-dir=true", "--unpack=false"]);
        assert_eq!(
            n[4].args,
            vec!["https://github.com/moby/buildkit.git#v0.14.0", "/src"]
        );
        assert!(n[5].flags.is_empty() && n[5].json);
        assert_eq!(n[5].args, vec!["--not-a-flag", "/d"]);
    }

    #[test]
    fn from_platform_and_healthcheck_options() {
        let r = p(concat!(
            "FROM --platform=linux/arm64/v8 busybox:1.36 AS arm\n",
            "HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --start-interval=1s --retries=3 \\\n",
            "  CMD curl -f http://localhost/ || exit 1\n",
            "HEALTHCHECK CMD [\"/bin/check\", \"--fast\"]\n",
        ));
        let from = &r.nodes[0];
        assert_eq!(from.flags, vec!["--platform=linux/arm64/v8"]);
        assert_eq!(from.args, vec!["busybox:1.36", "AS", "arm"]);
        let hc = &r.nodes[1];
        assert_eq!(
            hc.flags,
            vec![
                "--interval=30s",
                "--timeout=3s",
                "--start-period=5s",
                "--start-interval=1s",
                "--retries=3"
            ]
        );
        assert_eq!(hc.args, vec!["CMD", "curl -f http://localhost/ || exit 1"]);
        assert!(!hc.json);
        assert_eq!((hc.start_line, hc.end_line), (2, 3));
        let hc = &r.nodes[2];
        assert!(hc.flags.is_empty() && hc.json);
        assert_eq!(hc.args, vec!["CMD", "/bin/check", "--fast"]);
    }
}
