//! `.dockerignore` handling with the semantics of moby/patternmatcher (and
//! its `ignorefile` reader), which BuildKit uses to filter the build
//! context: `#` comments, `!` exceptions, the last matching pattern wins,
//! patterns are cleaned like paths (leading `/` and `./` dropped, trailing
//! `/` removed), `*` and `?` stay within a path segment, `**` crosses
//! segments, and a pattern that matches a directory excludes everything
//! below it.

use std::fmt;

/// An invalid pattern (BuildKit refuses to build with one).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid .dockerignore pattern {pattern:?} (line {line}): {message}")]
pub struct DockerignoreError {
    /// 1-based line in the file (or position in the pattern list).
    pub line: usize,
    pub pattern: String,
    pub message: String,
}

/// A compiled set of `.dockerignore` patterns.
#[derive(Clone)]
pub struct Dockerignore {
    patterns: Vec<Pattern>,
    exclusions: bool,
}

impl fmt::Debug for Dockerignore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dockerignore")
            .field("patterns", &self.patterns())
            .finish()
    }
}

/// Reads the pattern lines of a `.dockerignore` file the way
/// `ignorefile.ReadAll` does: a BOM on the first line is dropped, lines
/// starting with `#` are comments, surrounding whitespace is trimmed, and
/// patterns are cleaned as paths and made relative (`/a/b` → `a/b`).
pub fn read_patterns(contents: &str) -> Vec<(usize, String)> {
    let contents = contents.strip_prefix('\u{feff}').unwrap_or(contents);
    let mut out = Vec::new();
    for (i, line) in contents.split_inclusive('\n').enumerate() {
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        // A comment only when `#` is the very first character.
        if line.starts_with('#') {
            continue;
        }
        let mut pattern = line.trim();
        if pattern.is_empty() {
            continue;
        }
        let invert = pattern.starts_with('!');
        if invert {
            pattern = pattern.get(1..).unwrap_or("").trim();
        }
        let mut p = String::new();
        if !pattern.is_empty() {
            p = clean(pattern);
            if p.len() > 1
                && let Some(rel) = p.strip_prefix('/')
            {
                p = rel.to_string();
            }
        }
        if invert {
            p.insert(0, '!');
        }
        out.push((i + 1, p));
    }
    out
}

impl Dockerignore {
    /// Parses the contents of a `.dockerignore` file.
    pub fn parse(contents: &str) -> Result<Dockerignore, DockerignoreError> {
        Self::from_numbered(read_patterns(contents))
    }

    /// Compiles patterns that were already read (one per entry, `!` for
    /// exceptions), as `patternmatcher.New` does.
    pub fn from_patterns<I, S>(patterns: I) -> Result<Dockerignore, DockerignoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::from_numbered(
            patterns
                .into_iter()
                .enumerate()
                .map(|(i, p)| (i + 1, p.as_ref().to_string())),
        )
    }

    fn from_numbered(
        patterns: impl IntoIterator<Item = (usize, String)>,
    ) -> Result<Dockerignore, DockerignoreError> {
        let mut out = Vec::new();
        let mut exclusions = false;
        for (line, raw) in patterns {
            let err = |message: &str| DockerignoreError {
                line,
                pattern: raw.clone(),
                message: message.to_string(),
            };
            let p = raw.trim();
            if p.is_empty() {
                continue;
            }
            let p = clean(p);
            let (exclusion, p) = match p.strip_prefix('!') {
                Some("") => return Err(err("illegal exclusion pattern: \"!\"")),
                Some(rest) => (true, rest.to_string()),
                None => (false, p),
            };
            exclusions |= exclusion;
            validate_syntax(&p).map_err(|()| err("syntax error in pattern"))?;
            out.push(Pattern::compile(p, exclusion).map_err(|m| err(&m))?);
        }
        Ok(Dockerignore {
            patterns: out,
            exclusions,
        })
    }

    /// Whether `rel_path` (relative to the context root, `/`-separated) is
    /// excluded: the last pattern matching it or one of its parent
    /// directories decides (patternmatcher's `MatchesOrParentMatches`).
    /// The context root itself is never excluded.
    pub fn is_excluded(&self, rel_path: &str) -> bool {
        let cleaned = clean(rel_path);
        let file = cleaned.trim_start_matches('/');
        if file.is_empty() || file == "." {
            return false;
        }
        let parents: Vec<&str> = match file.rsplit_once('/') {
            Some((dir, _)) => {
                // Every ancestor directory, shortest first: "a", "a/b", ...
                let mut v = Vec::new();
                for (i, c) in dir.char_indices() {
                    if c == '/' {
                        v.push(dir.get(..i).unwrap_or(dir));
                    }
                }
                v.push(dir);
                v
            }
            None => Vec::new(),
        };
        let mut matched = false;
        for p in &self.patterns {
            // An exception only matters once something matched, and an
            // exclusion only while nothing did.
            if p.exclusion != matched {
                continue;
            }
            if p.matches(file) || parents.iter().any(|d| p.matches(d)) {
                matched = !p.exclusion;
            }
        }
        matched
    }

    /// Whether any `!` exception exists: a walker must then look inside
    /// excluded directories, since something below may be re-included.
    pub fn has_exceptions(&self) -> bool {
        self.exclusions
    }

    /// The compiled patterns as cleaned, exceptions prefixed with `!`.
    pub fn patterns(&self) -> Vec<String> {
        self.patterns
            .iter()
            .map(|p| {
                if p.exclusion {
                    format!("!{}", p.text)
                } else {
                    p.text.clone()
                }
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// Go's `filepath.Clean` for `/`-separated paths.
fn clean(path: &str) -> String {
    if path.is_empty() {
        return ".".to_string();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            s => parts.push(s),
        }
    }
    let joined = parts.join("/");
    if rooted {
        format!("/{joined}")
    } else if joined.is_empty() {
        ".".to_string()
    } else {
        joined
    }
}

/// The syntax check `filepath.Match` applies: escapes need a character
/// after them, and `[...]` classes must be closed and well formed.
fn validate_syntax(pattern: &str) -> Result<(), ()> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    // One class member: a character (possibly escaped) that is not `-` or
    // `]`, and that is not the last thing in the pattern.
    let esc = |i: &mut usize| -> Result<(), ()> {
        match chars.get(*i) {
            None | Some('-' | ']') => return Err(()),
            Some('\\') => *i += 1,
            Some(_) => {}
        }
        chars.get(*i).ok_or(())?;
        *i += 1;
        if *i >= chars.len() {
            return Err(());
        }
        Ok(())
    };
    while let Some(&c) = chars.get(i) {
        i += 1;
        match c {
            '\\' => {
                chars.get(i).ok_or(())?;
                i += 1;
            }
            '[' => {
                if chars.get(i) == Some(&'^') {
                    i += 1;
                }
                let mut nrange = 0;
                loop {
                    if chars.get(i) == Some(&']') && nrange > 0 {
                        i += 1;
                        break;
                    }
                    esc(&mut i)?;
                    if chars.get(i) == Some(&'-') {
                        i += 1;
                        esc(&mut i)?;
                    }
                    nrange += 1;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[derive(Clone)]
enum Kind {
    Exact,
    Prefix(String),
    Suffix(String),
    Regex(Nfa),
}

#[derive(Clone)]
struct Pattern {
    text: String,
    exclusion: bool,
    kind: Kind,
}

/// The pieces patternmatcher turns a pattern into (as regex fragments).
#[derive(Debug, Clone)]
enum Tok {
    Lit(char),
    /// `?` → `[^/]`
    AnyNoSlash,
    /// `*` → `[^/]*`
    StarNoSlash,
    /// `**/` in the middle → `(.*/)?`
    OptDirs,
    /// `**` at the end (after other wildcards) → `.*`
    DotStar,
    Class(Class),
}

#[derive(Debug, Clone)]
struct Class {
    negated: bool,
    ranges: Vec<(char, char)>,
}

impl Class {
    fn of(negated: bool, ranges: &[(char, char)]) -> Class {
        Class {
            negated,
            ranges: ranges.to_vec(),
        }
    }

    fn matches(&self, c: char) -> bool {
        self.ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != self.negated
    }
}

impl Pattern {
    /// patternmatcher's `Pattern.compile`: plain patterns become exact,
    /// prefix (`foo**`) or suffix (`**foo`) comparisons, anything else a
    /// regular expression, here an NFA over the same pieces.
    fn compile(text: String, exclusion: bool) -> Result<Pattern, String> {
        let body = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let chars: Vec<char> = body.chars().collect();
        #[derive(PartialEq)]
        enum Mt {
            Exact,
            Prefix,
            Suffix,
            Regex,
        }
        let mut toks = Vec::new();
        let mut mt = Mt::Exact;
        let mut i = 0;
        while let Some(&ch) = chars.get(i) {
            let first = i == 0;
            i += 1;
            match ch {
                '*' if chars.get(i) == Some(&'*') => {
                    i += 1;
                    // `**/` is treated as `**`.
                    if chars.get(i) == Some(&'/') {
                        i += 1;
                    }
                    if i < chars.len() {
                        toks.push(Tok::OptDirs);
                        mt = Mt::Regex;
                    } else if mt == Mt::Exact {
                        mt = Mt::Prefix;
                    } else {
                        toks.push(Tok::DotStar);
                        mt = Mt::Regex;
                    }
                    if first {
                        mt = Mt::Suffix;
                    }
                }
                '*' => {
                    toks.push(Tok::StarNoSlash);
                    mt = Mt::Regex;
                }
                '?' => {
                    toks.push(Tok::AnyNoSlash);
                    mt = Mt::Regex;
                }
                '\\' => match chars.get(i) {
                    // A trailing backslash is a literal backslash.
                    None => toks.push(Tok::Lit('\\')),
                    Some(&c) => {
                        i += 1;
                        toks.push(escaped(c)?);
                        mt = Mt::Regex;
                    }
                },
                '[' => {
                    toks.push(Tok::Class(parse_class(&chars, &mut i)?));
                    mt = Mt::Regex;
                }
                ']' => {
                    toks.push(Tok::Lit(']'));
                    mt = Mt::Regex;
                }
                c => toks.push(Tok::Lit(c)),
            }
        }
        let kind = match mt {
            Mt::Regex => Kind::Regex(Nfa::build(&toks)),
            // Everything after the leading `**`.
            Mt::Suffix => Kind::Suffix(body.get(2..).unwrap_or("").to_string()),
            // Everything before the trailing `**`.
            Mt::Prefix => Kind::Prefix(
                body.get(..body.len().saturating_sub(2))
                    .unwrap_or("")
                    .to_string(),
            ),
            Mt::Exact => Kind::Exact,
        };
        Ok(Pattern {
            text,
            exclusion,
            kind,
        })
    }

    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact => path == self.text,
            Kind::Prefix(p) => path.starts_with(p.as_str()),
            Kind::Suffix(s) => {
                // `**/foo` also matches `foo` itself.
                path.ends_with(s.as_str()) || s.strip_prefix('/').is_some_and(|r| path == r)
            }
            Kind::Regex(nfa) => nfa.matches(path),
        }
    }
}

/// What Go's regexp makes of `\c` (the pattern's escape is passed through
/// to the regular expression).
fn escaped(c: char) -> Result<Tok, String> {
    const DIGIT: &[(char, char)] = &[('0', '9')];
    const SPACE: &[(char, char)] = &[('\t', '\n'), ('\u{c}', '\r'), (' ', ' ')];
    const WORD: &[(char, char)] = &[('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z')];
    Ok(match c {
        c if c.is_ascii() && !c.is_ascii_alphanumeric() => Tok::Lit(c),
        'a' => Tok::Lit('\u{7}'),
        'f' => Tok::Lit('\u{c}'),
        't' => Tok::Lit('\t'),
        'n' => Tok::Lit('\n'),
        'r' => Tok::Lit('\r'),
        'v' => Tok::Lit('\u{b}'),
        'd' => Tok::Class(Class::of(false, DIGIT)),
        'D' => Tok::Class(Class::of(true, DIGIT)),
        's' => Tok::Class(Class::of(false, SPACE)),
        'S' => Tok::Class(Class::of(true, SPACE)),
        'w' => Tok::Class(Class::of(false, WORD)),
        'W' => Tok::Class(Class::of(true, WORD)),
        c => return Err(format!("unsupported escape sequence \\{c}")),
    })
}

/// Reads a `[...]` class after its `[` (syntax already validated).
fn parse_class(chars: &[char], i: &mut usize) -> Result<Class, String> {
    let mut class = Class {
        negated: false,
        ranges: Vec::new(),
    };
    if chars.get(*i) == Some(&'^') {
        class.negated = true;
        *i += 1;
    }
    let one = |i: &mut usize| -> Result<char, String> {
        let mut c = chars
            .get(*i)
            .copied()
            .ok_or("unterminated character class")?;
        *i += 1;
        if c == '\\' {
            c = chars
                .get(*i)
                .copied()
                .ok_or("unterminated character class")?;
            *i += 1;
        }
        Ok(c)
    };
    loop {
        if chars.get(*i) == Some(&']') && !class.ranges.is_empty() {
            *i += 1;
            return Ok(class);
        }
        let lo = one(i)?;
        let mut hi = lo;
        if chars.get(*i) == Some(&'-') && chars.get(*i + 1).is_some_and(|&c| c != ']') {
            *i += 1;
            hi = one(i)?;
        }
        if hi < lo {
            return Err("invalid character class range".to_string());
        }
        class.ranges.push((lo, hi));
    }
}

#[derive(Debug, Clone)]
enum Pred {
    Is(char),
    NotSlash,
    /// Go's `.`, which does not match a newline.
    NotNewline,
    Class(Class),
}

impl Pred {
    fn matches(&self, c: char) -> bool {
        match self {
            Pred::Is(x) => *x == c,
            Pred::NotSlash => c != '/',
            Pred::NotNewline => c != '\n',
            Pred::Class(cl) => cl.matches(c),
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    Char(Pred, usize),
    Split(usize, usize),
    Match,
}

/// A Thompson NFA for the anchored regex patternmatcher would build;
/// simulated in linear time, so no pattern can make matching blow up.
#[derive(Debug, Clone)]
struct Nfa {
    states: Vec<State>,
    start: usize,
}

impl Nfa {
    fn build(toks: &[Tok]) -> Nfa {
        let mut states = vec![State::Match];
        let mut next = 0;
        // Built back to front so each piece knows its successor.
        fn push(states: &mut Vec<State>, s: State) -> usize {
            states.push(s);
            states.len() - 1
        }
        fn set(states: &mut [State], at: usize, s: State) {
            if let Some(slot) = states.get_mut(at) {
                *slot = s;
            }
        }
        for tok in toks.iter().rev() {
            let st = &mut states;
            next = match tok {
                Tok::Lit(c) => push(st, State::Char(Pred::Is(*c), next)),
                Tok::AnyNoSlash => push(st, State::Char(Pred::NotSlash, next)),
                Tok::Class(c) => push(st, State::Char(Pred::Class(c.clone()), next)),
                Tok::StarNoSlash | Tok::DotStar => {
                    let pred = if matches!(tok, Tok::StarNoSlash) {
                        Pred::NotSlash
                    } else {
                        Pred::NotNewline
                    };
                    // split -> (char -> split) | next
                    let split = push(st, State::Split(0, next));
                    let ch = push(st, State::Char(pred, split));
                    set(st, split, State::Split(ch, next));
                    split
                }
                Tok::OptDirs => {
                    // (.*/)? : skip, or any characters then a slash.
                    let slash = push(st, State::Char(Pred::Is('/'), next));
                    let lp = push(st, State::Split(0, 0));
                    let any = push(st, State::Char(Pred::NotNewline, lp));
                    set(st, lp, State::Split(any, slash));
                    push(st, State::Split(lp, next))
                }
            };
        }
        Nfa {
            states,
            start: next,
        }
    }

    /// Adds `s` and everything reachable from it without consuming a
    /// character. `mark[i] == gen` means state `i` is already in `set`.
    fn add(&self, set: &mut Vec<usize>, mark: &mut [u32], generation: u32, s: usize) {
        let mut stack = vec![s];
        while let Some(s) = stack.pop() {
            match mark.get_mut(s) {
                Some(m) if *m != generation => *m = generation,
                _ => continue,
            }
            set.push(s);
            if let Some(State::Split(a, b)) = self.states.get(s) {
                stack.push(*b);
                stack.push(*a);
            }
        }
    }

    fn matches(&self, text: &str) -> bool {
        let mut mark = vec![0u32; self.states.len()];
        let mut generation = 1;
        let mut cur = Vec::new();
        let mut next = Vec::new();
        self.add(&mut cur, &mut mark, generation, self.start);
        for c in text.chars() {
            generation += 1;
            next.clear();
            for &s in &cur {
                if let Some(State::Char(p, to)) = self.states.get(s)
                    && p.matches(c)
                {
                    self.add(&mut next, &mut mark, generation, *to);
                }
            }
            if next.is_empty() {
                return false;
            }
            std::mem::swap(&mut cur, &mut next);
        }
        cur.iter()
            .any(|&s| matches!(self.states.get(s), Some(State::Match)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn di(s: &str) -> Dockerignore {
        Dockerignore::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn double_star_extension() {
        let d = di("**/*.log\n");
        assert!(d.is_excluded("a.log"));
        assert!(d.is_excluded("x/y/z.log"));
        assert!(!d.is_excluded("a.log.txt"));
        assert!(!d.is_excluded("logs/a.txt"));
    }

    #[test]
    fn exception_after_exclusion_and_last_match_wins() {
        let d = di("*.log\n!keep.log\n");
        assert!(d.is_excluded("a.log"));
        assert!(!d.is_excluded("keep.log"));
        assert!(d.has_exceptions());
        // Single-segment `*` does not reach into directories.
        assert!(!d.is_excluded("dir/a.log"));
        let d = di("!keep.log\n*.log\n");
        assert!(d.is_excluded("keep.log"));
        assert!(!di("*.log\n").has_exceptions());
    }

    #[test]
    fn directory_pattern_excludes_contents() {
        let d = di("dir\n");
        assert!(d.is_excluded("dir"));
        assert!(d.is_excluded("dir/sub/file"));
        assert!(!d.is_excluded("dir2/file"));
        assert!(!d.is_excluded("other/dir"));
        let d = di("dir/\n!dir/sub/keep\n");
        assert!(d.is_excluded("dir/sub/file"));
        assert!(!d.is_excluded("dir/sub/keep"));
    }

    #[test]
    fn comments_and_whitespace() {
        let d = di("# comment\n  \n foo \n #bar\n");
        assert_eq!(d.patterns(), vec!["foo", "#bar"]);
        assert!(d.is_excluded("foo"));
        assert!(!d.is_excluded("# comment"));
        assert!(d.is_excluded("#bar"));
    }

    #[test]
    fn absolute_and_dot_patterns_are_relative() {
        let d = di("/abs\n./rel/\n! /abs/keep\na/../b\n");
        assert_eq!(d.patterns(), vec!["abs", "rel", "!abs/keep", "b"]);
        assert!(d.is_excluded("abs/x"));
        assert!(!d.is_excluded("abs/keep"));
        assert!(d.is_excluded("rel/y"));
        assert!(d.is_excluded("b"));
        assert!(!d.is_excluded("a"));
        // Paths given with a leading slash or ./ are cleaned too.
        assert!(d.is_excluded("/abs/x"));
        assert!(d.is_excluded("./rel"));
        assert!(!d.is_excluded("."));
    }

    #[test]
    fn wildcards_and_classes() {
        let d = di("a?c\n[xy]z\nn[^0-9]\n**\\*\nlit.txt\nfoo**\n");
        assert!(d.is_excluded("abc"));
        assert!(!d.is_excluded("a/c"));
        assert!(d.is_excluded("xz") && d.is_excluded("yz") && !d.is_excluded("zz"));
        assert!(d.is_excluded("nq") && !d.is_excluded("n5"));
        assert!(d.is_excluded("deep/*") && d.is_excluded("*") && !d.is_excluded("deep/x*"));
        assert!(d.is_excluded("lit.txt") && !d.is_excluded("litxtxt"));
        assert!(d.is_excluded("foobar/x") && d.is_excluded("foo.d"));
        let d = di("a/**/b\n");
        assert!(d.is_excluded("a/b") && d.is_excluded("a/x/y/b") && !d.is_excluded("a/xb"));
        let d = di("**\n!keep\n");
        assert!(d.is_excluded("anything/at/all") && !d.is_excluded("keep"));
        let d = di("**/node_modules\n");
        assert!(d.is_excluded("node_modules/x") && d.is_excluded("a/node_modules"));
        assert!(!d.is_excluded("a/my_node_modules"));
    }

    #[test]
    fn patternmatcher_semantics_table() {
        // (pattern, path, excluded) checked against moby/patternmatcher's
        // behaviour.
        let cases: &[(&str, &str, bool)] = &[
            ("**", "file", true),
            ("**/", "dir/file", true),
            ("**/**", "dir/file", true),
            ("dir/**", "dir/dir2/file", true),
            ("abc/**", "abc", false),
            ("abc/**", "abc/def/ghi", true),
            ("**/dir2/*", "dir/dir2/file", true),
            ("**file", "dir/dir/file", true),
            ("**/file*.txt", "dir/dir/file.txt", true),
            ("**/**/*.txt2", "dir/dir/file.txt", false),
            ("**/*.txt", "file.txt", true),
            ("a**/*.txt", "a/dir/dir/file.txt", true),
            ("a/*.txt", "a/dir/file.txt", false),
            ("a/*.txt**", "a/file.txt", true),
            ("a[b-d]e", "ace", true),
            ("a[b-d]e", "aae", false),
            ("a[^b-d]e", "aze", true),
            (".*", ".foo", true),
            (".*", "foo", false),
            ("abc.def", "abcZdef", false),
            ("abc?def", "abcZdef", true),
            ("abc?def", "abcdef", false),
            ("a\\\\", "a\\", true),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("**/.foo", "bar.foo", false),
            ("a(b)c/def", "a(b)c/def", true),
            ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
            ("dist/*.whl", "dist/p.y-2.4.0rc3+g08-py3-none-any.whl", true),
        ];
        for &(pattern, path, want) in cases {
            let d = Dockerignore::from_patterns([pattern]).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                d.is_excluded(path),
                want,
                "pattern {pattern:?} path {path:?}"
            );
        }
        let d =
            Dockerignore::from_patterns(["**", "!util/docker/web", "util/docker/web/foo"]).unwrap();
        assert!(d.is_excluded("util/docker/web/foo"));
        assert!(!d.is_excluded("util/docker/web/bar"));
    }

    #[test]
    fn bad_patterns_are_errors() {
        for bad in ["!\n", "[\n", "a[\n", "[]\n", "[a-]\n", "x\\\n", "\\q\n"] {
            assert!(Dockerignore::parse(bad).is_err(), "{bad:?}");
        }
        let e = Dockerignore::parse("ok\n[\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(
            Dockerignore::from_patterns(["a", "!b"])
                .unwrap()
                .has_exceptions()
        );
    }
}
