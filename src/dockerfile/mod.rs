//! Dockerfile front end: turns Dockerfile text into instruction nodes the way
//! BuildKit's parser does, expands words with BuildKit's shell lexer, and
//! matches `.dockerignore` patterns with moby/patternmatcher semantics.
//!
//! Everything here is pure text processing (no I/O) so it can be tested
//! against BuildKit's own test data byte for byte.

pub mod checks;
pub mod dockerignore;
mod json;
pub mod parser;
mod quote;
pub mod shell;

pub use parser::{
    Directive, Heredoc, Node, ParseError, ParseResult, Warning, chomp_heredoc_content,
    detect_syntax, parse, parse_directive,
};
pub use quote::go_quote;

#[cfg(test)]
mod tests {
    use super::dockerignore::Dockerignore;
    use super::shell::Lex;

    /// Feeds many generated strings built from the characters that matter
    /// to the parsers through every entry point: none may panic.
    #[test]
    fn generated_input_never_panics() {
        const ALPHABET: &[char] = &[
            '\\', '`', '"', '\'', '$', '{', '}', ':', '-', '+', '?', '#', '%', '/', '*', '<', '\n',
            '\r', '\t', ' ', 'a', 'E', 'O', 'F', '[', ']', ',', '=', '!', '^', 'R', 'U', 'N', '0',
            '3', '\u{feff}', 'é', '한', '\u{a0}', '.',
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let prefixes = [
            "",
            "RUN ",
            "COPY <<",
            "ENV ",
            "CMD [",
            "ONBUILD ",
            "# escape=`\n",
            "FROM a\nRUN <<E\n",
        ];
        let env = |k: &str| (k == "A").then(|| "x y".to_string());
        for i in 0..4000 {
            let len = (next() % 48) as usize;
            let mut s: String = prefixes[i % prefixes.len()].to_string();
            for _ in 0..len {
                s.push(ALPHABET[(next() % ALPHABET.len() as u64) as usize]);
            }
            if let Ok(parsed) = super::parse(&s) {
                let _ = super::checks::check(&s, &parsed, None);
            }
            for escape in ['\\', '`'] {
                let mut lex = Lex::new(escape);
                let _ = lex.expand(&s, &env);
                let _ = lex.expand_words(&s, &env);
                lex.raw_quotes = true;
                lex.raw_escapes = true;
                lex.skip_unset_env = true;
                let _ = lex.expand_with_matches(&s, &env);
            }
            if let Ok(d) = Dockerignore::parse(&s) {
                let _ = d.is_excluded(&s);
                let _ = d.is_excluded("a/E/F.txt");
            }
        }
    }
}
