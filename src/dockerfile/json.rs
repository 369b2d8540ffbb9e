//! Just enough of Go's `encoding/json` for the parser: validating a whole
//! document with Go's grammar and limits, and reading the string members of
//! its top-level array or object. BuildKit decides between the exec (JSON)
//! and shell forms by whether `json.Unmarshal` succeeds, so the validation
//! has to accept and reject exactly what Go does.
//!
//! The scanner is iterative (explicit stack) so that hostile nesting cannot
//! overflow the Rust stack; like Go it gives up past 10000 levels.

/// Go's `maxNestingDepth` in encoding/json.
const MAX_DEPTH: usize = 10000;

/// The top-level value of a valid document, with depth-1 members that are
/// strings as `Some` and any other member as `None`.
#[derive(Debug, PartialEq)]
pub(crate) enum TopLevel {
    Array(Vec<Option<String>>),
    Object(Vec<(String, Option<String>)>),
    Scalar,
}

/// Parses and validates `src` as one JSON document (surrounding whitespace
/// allowed). Returns `None` for anything Go's `json.Unmarshal` would reject
/// as a syntax error.
pub(crate) fn parse(src: &str) -> Option<TopLevel> {
    Scanner {
        b: src.as_bytes(),
        s: src,
        pos: 0,
    }
    .document()
}

struct Scanner<'a> {
    b: &'a [u8],
    s: &'a str,
    pos: usize,
}

struct Frame {
    is_object: bool,
    key: String,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn document(&mut self) -> Option<TopLevel> {
        let mut stack: Vec<Frame> = Vec::new();
        let mut top: Option<TopLevel> = None;
        'value: loop {
            // Expecting a value.
            self.skip_ws();
            let mut done: Option<String>;
            match self.peek()? {
                c @ (b'[' | b'{') => {
                    if stack.len() >= MAX_DEPTH {
                        return None;
                    }
                    let is_object = c == b'{';
                    if stack.is_empty() {
                        top = Some(if is_object {
                            TopLevel::Object(Vec::new())
                        } else {
                            TopLevel::Array(Vec::new())
                        });
                    }
                    self.pos += 1;
                    stack.push(Frame {
                        is_object,
                        key: String::new(),
                    });
                    self.skip_ws();
                    let close = if is_object { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.pos += 1;
                        stack.pop();
                        done = None;
                    } else {
                        if is_object {
                            self.object_key(&mut stack)?;
                        }
                        continue 'value;
                    }
                }
                b'"' => done = Some(self.string()?),
                b't' => {
                    self.literal("true")?;
                    done = None;
                }
                b'f' => {
                    self.literal("false")?;
                    done = None;
                }
                b'n' => {
                    self.literal("null")?;
                    done = None;
                }
                b'-' | b'0'..=b'9' => {
                    self.number()?;
                    done = None;
                }
                _ => return None,
            }
            // A value is complete; record it and unwind closed containers.
            loop {
                let Some(frame) = stack.last() else {
                    if top.is_none() {
                        top = Some(TopLevel::Scalar);
                    }
                    self.skip_ws();
                    return if self.pos == self.b.len() { top } else { None };
                };
                if stack.len() == 1 {
                    match &mut top {
                        Some(TopLevel::Array(v)) => v.push(done.take()),
                        Some(TopLevel::Object(v)) => v.push((frame.key.clone(), done.take())),
                        _ => {}
                    }
                }
                let is_object = frame.is_object;
                self.skip_ws();
                match self.peek()? {
                    b',' => {
                        self.pos += 1;
                        if is_object {
                            self.object_key(&mut stack)?;
                        }
                        continue 'value;
                    }
                    b']' if !is_object => {}
                    b'}' if is_object => {}
                    _ => return None,
                }
                self.pos += 1;
                stack.pop();
                done = None;
            }
        }
    }

    /// Reads `"key" :` inside an object and remembers the key.
    fn object_key(&mut self, stack: &mut [Frame]) -> Option<()> {
        self.skip_ws();
        if self.peek()? != b'"' {
            return None;
        }
        let key = self.string()?;
        self.skip_ws();
        if self.peek()? != b':' {
            return None;
        }
        self.pos += 1;
        if let Some(frame) = stack.last_mut() {
            frame.key = key;
        }
        Some(())
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        if self.b.get(self.pos..self.pos + word.len())? == word.as_bytes() {
            self.pos += word.len();
            Some(())
        } else {
            None
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.pos;
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
        self.pos - start
    }

    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.pos..self.pos + 4)?;
        if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.pos += 4;
        u32::from_str_radix(h, 16).ok()
    }

    /// Reads a string starting at the opening quote, decoding escapes the
    /// way Go does (lone surrogates become U+FFFD).
    fn string(&mut self) -> Option<String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            let start = self.pos;
            while let Some(c) = self.peek() {
                if c == b'"' || c == b'\\' || c < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            // Only ASCII bytes stop the loop, so this is a char boundary.
            out.push_str(self.s.get(start..self.pos)?);
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(out);
                }
                b'\\' => {
                    self.pos += 1;
                    let e = self.peek()?;
                    self.pos += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let u = self.hex4()?;
                            out.push(self.surrogate_aware(u));
                        }
                        _ => return None,
                    }
                }
                _ => return None, // control character
            }
        }
    }

    fn surrogate_aware(&mut self, u: u32) -> char {
        if (0xd800..0xdc00).contains(&u) {
            // A high surrogate combines only with an immediately following
            // `\uDC00`-`\uDFFF`; otherwise Go emits U+FFFD and leaves the
            // following escape to be decoded on its own.
            let save = self.pos;
            if self.b.get(self.pos..self.pos + 2) == Some(b"\\u".as_slice()) {
                self.pos += 2;
                if let Some(lo) = self.hex4()
                    && (0xdc00..0xe000).contains(&lo)
                {
                    let c = 0x10000 + ((u - 0xd800) << 10) + (lo - 0xdc00);
                    return char::from_u32(c).unwrap_or('\u{fffd}');
                }
            }
            self.pos = save;
            return '\u{fffd}';
        }
        char::from_u32(u).unwrap_or('\u{fffd}')
    }
}

#[cfg(test)]
mod tests {
    use super::{TopLevel, parse};

    fn arr(v: &[Option<&str>]) -> Option<TopLevel> {
        Some(TopLevel::Array(
            v.iter().map(|s| s.map(str::to_string)).collect(),
        ))
    }

    #[test]
    fn arrays() {
        assert_eq!(parse("[]"), arr(&[]));
        assert_eq!(parse(" [ \"a\" , \"b\" ] \n"), arr(&[Some("a"), Some("b")]));
        assert_eq!(
            parse(r#"["a", 1, null, [2], {"x":"y"}]"#),
            arr(&[Some("a"), None, None, None, None])
        );
        assert_eq!(
            parse(r#"["\u0041\ud83d\ude00\ud800x"]"#),
            arr(&[Some("A😀\u{fffd}x")])
        );
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in [
            "[",
            "[\"a\"",
            "[\"a\",]",
            "['a']",
            "[\"a\"] x",
            "[01]",
            "[1.]",
            "[1e]",
            "[\"\t\"]",
            "[\"\\x\"]",
            "[tru]",
            "{\"a\" 1}",
            "[,]",
            "",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn objects_and_depth() {
        assert_eq!(
            parse(r#"{"syntax": "x", "n": 1}"#),
            Some(TopLevel::Object(vec![
                ("syntax".into(), Some("x".into())),
                ("n".into(), None)
            ]))
        );
        assert_eq!(parse("1"), Some(TopLevel::Scalar));
        let deep = "[".repeat(10001) + &"]".repeat(10001);
        assert_eq!(parse(&deep), None);
        let ok = "[".repeat(10000) + &"]".repeat(10000);
        assert!(parse(&ok).is_some());
    }
}
