//! BuildKit's shell lexer (`frontend/dockerfile/shell/lex.go`): quote
//! removal, escapes, and `$VAR` / `${VAR...}` expansion for instruction
//! arguments, plus word splitting after expansion.
//!
//! This is not a shell: there is no command substitution, globbing or
//! arithmetic, only what BuildKit does to Dockerfile words.

use std::collections::BTreeSet;

/// Deepest `${...}` nesting accepted. Go grows its stack without limit;
/// here a bound keeps hostile input from overflowing ours.
const MAX_NESTING: usize = 100;

/// A word-expansion error: the reason, where in the word it was found
/// (0-based character offset) and the word itself.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("failed to process {}: {message}", crate::dockerfile::go_quote(word))]
pub struct ExpandError {
    pub message: String,
    pub position: usize,
    pub word: String,
}

/// The outcome of an expansion with bookkeeping of which variables were
/// looked up (BuildKit's `ProcessWordResult`, used for the UndefinedVar
/// check).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessWordResult {
    /// The expanded word (spaces kept), as `Lex::expand` returns it.
    pub result: String,
    /// The word split after expansion, as `Lex::expand_words` returns it.
    pub words: Vec<String>,
    /// Variables that were referenced and set.
    pub matched: BTreeSet<String>,
    /// Variables that were referenced but not set.
    pub unmatched: BTreeSet<String>,
}

/// The lexer configuration. The option fields mirror the Go struct's and are
/// used by the parser itself (heredoc detection); `Lex::new` gives the
/// ordinary behaviour.
#[derive(Debug, Clone)]
pub struct Lex {
    escape: char,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
    /// Leave references to unset variables as written instead of
    /// expanding them to nothing.
    pub skip_unset_env: bool,
}

impl Lex {
    pub fn new(escape: char) -> Self {
        Lex {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_process_quotes: false,
            skip_unset_env: false,
        }
    }

    /// The escape character this lexer was made with.
    pub fn escape(&self) -> char {
        self.escape
    }

    /// Expands `word` (BuildKit's `ProcessWord`): quotes removed, escapes
    /// applied, variables substituted, spaces kept.
    pub fn expand(
        &self,
        word: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<String, ExpandError> {
        self.expand_with_matches(word, env).map(|r| r.result)
    }

    /// Expands `word` and splits it into words (BuildKit's `ProcessWords`).
    /// Splitting happens after expansion, on unquoted whitespace, including
    /// whitespace that came from an unquoted variable's value.
    pub fn expand_words(
        &self,
        word: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, ExpandError> {
        self.expand_with_matches(word, env).map(|r| r.words)
    }

    /// Expands `word` and also reports which variables were used and which
    /// were unset (BuildKit's `ProcessWordWithMatches`).
    pub fn expand_with_matches(
        &self,
        word: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ProcessWordResult, ExpandError> {
        let mut sw = ShellWord {
            chars: scanner_chars(word),
            pos: 0,
            lex: self,
            env,
            raw_escapes: self.raw_escapes,
            depth: 0,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        };
        match sw.process_stop_on(None, self.raw_escapes) {
            Ok((result, words)) => Ok(ProcessWordResult {
                result,
                words,
                matched: sw.matched,
                unmatched: sw.unmatched,
            }),
            Err(f) => Err(ExpandError {
                message: f.message,
                position: f.position,
                word: word.to_string(),
            }),
        }
    }
}

/// The characters Go's `text/scanner` yields for `s`: it silently drops a
/// byte-order mark at the very start.
fn scanner_chars(s: &str) -> Vec<char> {
    s.strip_prefix('\u{feff}').unwrap_or(s).chars().collect()
}

struct Fail {
    message: String,
    position: usize,
}

struct ShellWord<'a> {
    chars: Vec<char>,
    pos: usize,
    lex: &'a Lex,
    env: &'a dyn Fn(&str) -> Option<String>,
    raw_escapes: bool,
    depth: usize,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

/// Word splitting state (Go's `wordsStruct`).
#[derive(Default)]
struct Words {
    buf: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() && self.in_word {
            if !self.buf.is_empty() {
                self.words.push(std::mem::take(&mut self.buf));
                self.in_word = false;
            }
        } else if !ch.is_whitespace() {
            self.add_raw_char(ch);
        }
    }

    fn add_raw_char(&mut self, ch: char) {
        self.buf.push(ch);
        self.in_word = true;
    }

    fn add_string(&mut self, s: &str) {
        for ch in s.chars() {
            self.add_char(ch);
        }
    }

    fn add_raw_string(&mut self, s: &str) {
        self.buf.push_str(s);
        self.in_word = true;
    }

    fn finish(mut self) -> Vec<String> {
        if !self.buf.is_empty() {
            self.words.push(std::mem::take(&mut self.buf));
        }
        self.words
    }
}

/// Go's `unicode.IsDigit` (approximated by Rust's numeric property).
fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric())
}

/// Go's `unicode.IsLetter` (approximated by Rust's alphabetic property).
fn is_letter(c: char) -> bool {
    c.is_alphabetic()
}

fn is_special_param(c: char) -> bool {
    matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0')
}

impl ShellWord<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, Fail> {
        Err(Fail {
            message: message.into(),
            position: self.pos,
        })
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        let v = (self.env)(name);
        if v.is_some() {
            self.matched.insert(name.to_string());
        } else {
            self.unmatched.insert(name.to_string());
        }
        v
    }

    /// Processes characters until `stop` (consumed) or the end of input,
    /// returning the expanded text and its split words.
    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), Fail> {
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        let r = self.process_stop_on_inner(stop);
        self.raw_escapes = saved;
        r
    }

    fn process_stop_on_inner(&mut self, stop: Option<char>) -> Result<(String, Vec<String>), Fail> {
        let mut result = String::new();
        let mut words = Words::default();
        let quotes = !self.lex.skip_process_quotes;
        while let Some(ch) = self.peek() {
            if stop == Some(ch) {
                self.next();
                return Ok((result, words.finish()));
            }
            if ch == '$' {
                let tmp = self.process_dollar()?;
                result.push_str(&tmp);
                // Unquoted expansions are subject to word splitting.
                words.add_string(&tmp);
                continue;
            }
            if quotes && (ch == '\'' || ch == '"') {
                let tmp = if ch == '\'' {
                    self.process_single_quote()?
                } else {
                    self.process_double_quote()?
                };
                result.push_str(&tmp);
                words.add_raw_string(&tmp);
                continue;
            }
            self.next();
            let mut ch = ch;
            if ch == self.lex.escape {
                if self.raw_escapes {
                    words.add_raw_char(ch);
                    result.push(ch);
                }
                // An escape escapes the next character, except at the end.
                match self.next() {
                    None => break,
                    Some(c) => {
                        ch = c;
                        words.add_raw_char(ch);
                    }
                }
            } else {
                words.add_char(ch);
            }
            result.push(ch);
        }
        if let Some(stop) = stop {
            return self.fail(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.finish()))
    }

    fn process_single_quote(&mut self) -> Result<String, Fail> {
        // Everything up to the next single quote is literal; a single quote
        // cannot be escaped inside single quotes.
        let mut result = String::new();
        self.next();
        if self.lex.raw_quotes {
            result.push('\'');
        }
        loop {
            match self.next() {
                None => {
                    return self.fail(
                        "unexpected end of statement while looking for matching single-quote",
                    );
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> Result<String, Fail> {
        // Literal except `$` expansions; the escape character only escapes
        // `"`, `$` and itself, other escapes are kept as written.
        let mut result = String::new();
        self.next();
        if self.lex.raw_quotes {
            result.push('"');
        }
        loop {
            match self.peek() {
                None => {
                    return self.fail(
                        "unexpected end of statement while looking for matching double-quote",
                    );
                }
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let v = self.process_dollar()?;
                    result.push_str(&v);
                }
                Some(c) => {
                    self.next();
                    let mut ch = c;
                    if ch == self.lex.escape {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            // An escape at the very end is dropped (and the
                            // missing quote reported on the next turn).
                            None => continue,
                            Some(n) if n == '"' || n == '$' || n == self.lex.escape => {
                                self.next();
                                ch = n;
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn process_dollar(&mut self) -> Result<String, Fail> {
        if self.depth >= MAX_NESTING {
            return self.fail("variable substitutions nested too deeply");
        }
        self.depth += 1;
        let r = self.process_dollar_inner();
        self.depth -= 1;
        r
    }

    fn process_dollar_inner(&mut self) -> Result<String, Fail> {
        self.next();

        // $xxx
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }

        self.next();
        match self.peek() {
            None => return self.fail("syntax error: missing '}'"),
            Some('{' | '}' | ':') => return self.fail("syntax error: bad substitution"),
            Some(_) => {}
        }
        let name = self.process_name();
        let Some(ch) = self.next() else {
            return self.fail("syntax error: missing '}'");
        };
        let mut chs = ch.to_string();
        match ch {
            '}' => Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            ':' | '+' | '-' | '?' | '#' | '%' => {
                let mut ch = ch;
                let null_is_unset = ch == ':';
                if null_is_unset {
                    let Some(m) = self.next() else {
                        return self.fail("syntax error: missing '}'");
                    };
                    ch = m;
                    chs.push(m);
                }
                // Trim patterns keep their escapes so `\*` stays literal.
                let raw = ch == '#' || ch == '%';
                if null_is_unset && raw {
                    return self.fail(format!("unsupported modifier ({chs}) in substitution"));
                }
                let word = self.sub_word('}', raw, "syntax error: missing '}'")?;
                let value = self.get_env(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}{chs}{word}}}"));
                }
                let empty = value
                    .as_deref()
                    .is_none_or(|v| null_is_unset && v.is_empty());
                match ch {
                    '-' => Ok(if empty {
                        word
                    } else {
                        value.unwrap_or_default()
                    }),
                    '+' => Ok(if empty { String::new() } else { word }),
                    '?' => {
                        let problem = match &value {
                            None => Some("is not allowed to be unset"),
                            Some(v) if null_is_unset && v.is_empty() => {
                                Some("is not allowed to be empty")
                            }
                            Some(_) => None,
                        };
                        match problem {
                            None => Ok(value.unwrap_or_default()),
                            Some(p) => {
                                let msg = if word.is_empty() { p } else { word.as_str() };
                                self.fail(format!("{name}: {msg}"))
                            }
                        }
                    }
                    '%' | '#' => {
                        // `%`/`#` remove the shortest match, `%%`/`##` the longest.
                        let (greedy, pattern) = match word.strip_prefix(ch) {
                            Some(rest) => (true, rest.to_string()),
                            None => (false, word),
                        };
                        let value = value.unwrap_or_default();
                        let r = if ch == '%' {
                            trim_suffix(&pattern, &value, greedy)
                        } else {
                            trim_prefix(&pattern, &value, greedy)
                        };
                        r.or_else(|e| {
                            self.fail(format!("invalid pattern ({pattern}) in substitution: {e}"))
                        })
                    }
                    _ => self.fail(format!("unsupported modifier ({chs}) in substitution")),
                }
            }
            '/' => {
                let replace_all = self.peek() == Some('/');
                if replace_all {
                    self.next();
                }
                let pattern = self.sub_word('/', true, "syntax error: missing '/' in ${}")?;
                let replacement = self.sub_word('}', true, "syntax error: missing '}'")?;
                let value = self.get_env(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
                }
                let value = value.unwrap_or_default();
                let toks = match compile_pattern(&pattern) {
                    Ok(t) => t,
                    Err(e) => {
                        return self
                            .fail(format!("invalid pattern ({pattern}) in substitution: {e}"));
                    }
                };
                Ok(replace(&toks, &value, &replacement, replace_all))
            }
            _ => self.fail(format!("unsupported modifier ({chs}) in substitution")),
        }
    }

    /// Processes the operand of a `${name<op>...}` form up to `stop`.
    fn sub_word(&mut self, stop: char, raw: bool, missing: &str) -> Result<String, Fail> {
        match self.process_stop_on(Some(stop), raw) {
            Ok((w, _)) => Ok(w),
            Err(_) if self.peek().is_none() => self.fail(missing),
            Err(e) => Err(e),
        }
    }

    /// Reads a variable name: a run of digits (positional parameter), one
    /// special parameter character, or letters, digits and `_`.
    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_digit(ch) {
                while let Some(c) = self.peek()
                    && is_digit(c)
                {
                    self.next();
                    name.push(c);
                }
                return name;
            }
            if name.is_empty() && is_special_param(ch) {
                self.next();
                return ch.to_string();
            }
            if !is_letter(ch) && !is_digit(ch) && ch != '_' {
                break;
            }
            self.next();
            name.push(ch);
        }
        name
    }
}

// --- shell patterns for ${VAR#p} ${VAR%p} ${VAR/p/r} ---------------------
//
// BuildKit turns these patterns into Go regular expressions (`*` becomes
// `.*` or `.*?`, `?` becomes `.`) and relies on Go's leftmost-first match
// semantics. The matcher below reproduces exactly that for the three token
// kinds, including that `.` does not match a newline.

#[derive(Debug, Clone, Copy, PartialEq)]
enum PTok {
    Star,
    Any,
    Lit(char),
}

/// Go's `convertShellPatternToRegex`, producing tokens instead of a regex.
fn compile_pattern(pattern: &str) -> Result<Vec<PTok>, String> {
    let chars = scanner_chars(pattern);
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&tok) = chars.get(i) {
        i += 1;
        match tok {
            '*' => out.push(PTok::Star),
            '?' => out.push(PTok::Any),
            '\\' => {
                // `\}` and `\/` were needed to write the pattern inside
                // `${}`; the backslash is not part of the pattern.
                if let Some('}' | '/') = chars.get(i) {
                    continue;
                }
                let next = chars.get(i).copied();
                i += 1;
                match next {
                    Some(c @ ('*' | '?' | '\\')) => out.push(PTok::Lit(c)),
                    Some(c) => return Err(format!("invalid escape '\\{c}'")),
                    None => return Err("invalid escape '\\\u{fffd}'".to_string()),
                }
            }
            c => out.push(PTok::Lit(c)),
        }
    }
    Ok(out)
}

/// Finds the first match of `toks` starting exactly at `start`, preferring
/// matches the way a backtracking engine (and Go's leftmost-first RE2)
/// does, and returns its end. `failed` memoizes states known not to lead to
/// a match, which keeps the search linear in `toks.len() * chars.len()`.
fn match_at(
    toks: &[PTok],
    chars: &[char],
    start: usize,
    greedy: bool,
    failed: &mut std::collections::HashSet<(usize, usize)>,
) -> Option<usize> {
    let mut stack: Vec<(usize, usize, u8)> = vec![(0, start, 0)];
    while let Some(top) = stack.last_mut() {
        let (ti, si, choice) = *top;
        let Some(tok) = toks.get(ti) else {
            return Some(si);
        };
        top.2 += 1;
        let avail = chars.get(si).copied();
        let next = match (*tok, choice) {
            (PTok::Lit(c), 0) => (avail == Some(c)).then_some((ti + 1, si + 1)),
            (PTok::Any, 0) => avail.is_some_and(|c| c != '\n').then_some((ti + 1, si + 1)),
            (PTok::Star, 0 | 1) => {
                let consume = avail.is_some_and(|c| c != '\n').then_some((ti, si + 1));
                let skip = Some((ti + 1, si));
                if (choice == 0) == greedy {
                    consume
                } else {
                    skip
                }
            }
            _ => {
                failed.insert((ti, si));
                stack.pop();
                continue;
            }
        };
        if let Some(state) = next
            && !failed.contains(&state)
        {
            stack.push((state.0, state.1, 0));
        }
    }
    None
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Result<String, String> {
    let toks = compile_pattern(pattern)?;
    let chars: Vec<char> = value.chars().collect();
    let mut failed = std::collections::HashSet::new();
    Ok(match match_at(&toks, &chars, 0, greedy, &mut failed) {
        Some(end) => chars.get(end..).unwrap_or_default().iter().collect(),
        None => value.to_string(),
    })
}

/// Go's `reversePattern`: reverses a pattern but keeps each escape in front
/// of the character it escapes.
fn reverse_pattern(pattern: &str) -> String {
    // Split into units (an escape with its character, or one character)
    // from the front, then emit the units in reverse order.
    let mut units: Vec<String> = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        let mut unit = c.to_string();
        if c == '\\'
            && let Some(n) = chars.next()
        {
            unit.push(n);
        }
        units.push(unit);
    }
    units.into_iter().rev().collect()
}

fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Result<String, String> {
    // Shortest/longest rightmost matching becomes a leftmost search by
    // reversing both the pattern and the value.
    let rev: String = value.chars().rev().collect();
    let r = trim_prefix(&reverse_pattern(pattern), &rev, greedy)?;
    Ok(r.chars().rev().collect())
}

/// `${VAR/p/r}` (first match, replacement taken literally) and `${VAR//p/r}`
/// (Go's `ReplaceAllString`, which expands `$0`/`${0}` in the replacement
/// to the match and other `$name` references to nothing).
fn replace(toks: &[PTok], value: &str, replacement: &str, all: bool) -> String {
    let chars: Vec<char> = value.chars().collect();
    let mut failed = std::collections::HashSet::new();
    let find = |from: usize, failed: &mut std::collections::HashSet<(usize, usize)>| {
        (from..=chars.len()).find_map(|s| match_at(toks, &chars, s, true, failed).map(|e| (s, e)))
    };
    let slice =
        |a: usize, b: usize| -> String { chars.get(a..b).unwrap_or_default().iter().collect() };
    if !all {
        return match find(0, &mut failed) {
            Some((s, e)) => slice(0, s) + replacement + &slice(e, chars.len()),
            None => value.to_string(),
        };
    }
    let mut out = String::new();
    let mut last_end = 0;
    let mut search = 0;
    while search <= chars.len() {
        let Some((s, e)) = find(search, &mut failed) else {
            break;
        };
        out.push_str(&slice(last_end, s));
        // No replacement for an empty match right after a previous match.
        if e > last_end || s == 0 {
            expand_template(&mut out, replacement, &slice(s, e));
        }
        last_end = e;
        // Always advance at least one character.
        search = if search + 1 > e { search + 1 } else { e };
    }
    out.push_str(&slice(last_end, chars.len()));
    out
}

/// Go's `Regexp.expand` for a regex without capture groups.
fn expand_template(out: &mut String, template: &str, whole: &str) {
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let (brace, body) = match rest.strip_prefix('{') {
            Some(b) => (true, b),
            None => (false, rest),
        };
        let name_len: usize = body
            .chars()
            .take_while(|&c| is_letter(c) || is_digit(c) || c == '_')
            .map(char::len_utf8)
            .sum();
        let name = &body[..name_len];
        let mut after = &body[name_len..];
        let ok = !name.is_empty()
            && (!brace || {
                match after.strip_prefix('}') {
                    Some(a) => {
                        after = a;
                        true
                    }
                    None => false,
                }
            });
        if !ok {
            // Malformed reference: the `$` is kept as text.
            out.push('$');
            continue;
        }
        if name == "0" {
            out.push_str(whole);
        }
        rest = after;
    }
    out.push_str(rest);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PWD" => Some("/home".into()),
            "EMPTY" => Some(String::new()),
            "P" => Some("foo/bar/baz.tar.gz".into()),
            "S" => Some("a b  c".into()),
            _ => None,
        }
    }

    fn x(w: &str) -> String {
        Lex::new('\\')
            .expand(w, &env)
            .unwrap_or_else(|e| format!("ERR {e}"))
    }

    #[test]
    fn trims_and_replaces() {
        assert_eq!(x("${P#*/}"), "bar/baz.tar.gz");
        assert_eq!(x("${P##*/}"), "baz.tar.gz");
        assert_eq!(x("${P%.*}"), "foo/bar/baz.tar");
        assert_eq!(x("${P%%.*}"), "foo/bar/baz");
        assert_eq!(x("${P/bar/X}"), "foo/X/baz.tar.gz");
        assert_eq!(x("${P//a/_}"), "foo/b_r/b_z.t_r.gz");
        assert_eq!(x("${P//?/}"), "");
        assert_eq!(x("${P/\\*/x}"), "foo/bar/baz.tar.gz");
        // `$0` in the replacement is Go's template for the whole match.
        assert_eq!(x("${PWD//o/[\\$0]}"), "/h[\\o]me");
        assert_eq!(x("${PWD//o/[$0]}"), "/h[]me");
        assert_eq!(x("${PWD//x*/y}"), "/home");
        assert_eq!(x("${PWD//*/y}"), "y");
        assert_eq!(x("${PWD/#/y}"), "/home");
        assert!(x("${P#\\a}").starts_with("ERR"));
        assert!(x("${P:#x}").starts_with("ERR"));
    }

    #[test]
    fn modifiers_distinguish_unset_and_empty() {
        assert_eq!(x("${EMPTY-d}"), "");
        assert_eq!(x("${EMPTY:-d}"), "d");
        assert_eq!(x("${NOPE-d}"), "d");
        assert_eq!(x("${EMPTY+a}"), "a");
        assert_eq!(x("${EMPTY:+a}"), "");
        assert_eq!(x("${EMPTY?}"), "");
        assert!(x("${EMPTY:?boom}").contains("EMPTY: boom"));
        assert!(x("${NOPE?}").contains("NOPE: is not allowed to be unset"));
    }

    #[test]
    fn matches_and_unset_reported() {
        let r = Lex::new('\\')
            .expand_with_matches("$PWD ${NOPE:-x} ${EMPTY}", &env)
            .unwrap();
        assert_eq!(r.result, "/home x ");
        assert_eq!(r.words, vec!["/home", "x"]);
        assert!(r.matched.contains("PWD") && r.matched.contains("EMPTY"));
        assert_eq!(r.unmatched.iter().collect::<Vec<_>>(), vec!["NOPE"]);
    }

    #[test]
    fn words_keep_prefix_before_nested_default() {
        let w = Lex::new('\\').expand_words("a${NOPE:-b} c", &env).unwrap();
        assert_eq!(w, vec!["ab", "c"]);
        let w = Lex::new('\\').expand_words("$S\"$S\"", &env).unwrap();
        assert_eq!(w, vec!["a", "b", "ca b  c"]);
    }

    #[test]
    fn skip_unset_and_raw_modes() {
        let mut l = Lex::new('\\');
        l.skip_unset_env = true;
        assert_eq!(
            l.expand("$NOPE ${NOPE} ${NOPE:-x} ${NOPE//a/b}", &env)
                .unwrap(),
            "$NOPE ${NOPE} ${NOPE:-x} ${NOPE/a/b}"
        );
        let mut l = Lex::new('\\');
        l.raw_quotes = true;
        l.raw_escapes = true;
        assert_eq!(
            l.expand(r#"'a' "b\x" \c"#, &env).unwrap(),
            r#"'a' "b\\x" \c"#
        );
    }

    #[test]
    fn backtick_escape_and_errors_do_not_panic() {
        assert_eq!(Lex::new('`').expand("a`$PWD\\", &env).unwrap(), "a$PWD\\");
        let deep = "${a:-".repeat(500);
        let e = Lex::new('\\').expand(&deep, &env).unwrap_err();
        assert!(
            e.message.contains("nested") || e.message.contains("missing"),
            "{e}"
        );
        for w in [
            "${",
            "${a",
            "${a:",
            "${a/",
            "${a//b",
            "\"\\",
            "'",
            "$",
            "${a#\\",
            "\u{feff}x",
        ] {
            let _ = Lex::new('\\').expand(w, &env);
        }
        assert_eq!(reverse_pattern("a\\*c"), "c\\*a");
        assert_eq!(reverse_pattern("ab\\"), "\\ba");
    }
}
