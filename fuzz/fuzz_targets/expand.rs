//! Word expansion (`Lex::expand`, `expand_words`, `expand_with_matches`) with a fixed
//! environment, under both escape characters and the parser's raw modes: no input may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shmocker::dockerfile::shell::Lex;

fn env(name: &str) -> Option<String> {
    match name {
        "A" => Some("x y".to_string()),
        "EMPTY" => Some(String::new()),
        "PATH" => Some("/usr/bin:/bin".to_string()),
        "Q" => Some("'\"$A\\".to_string()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(word) = std::str::from_utf8(data) else {
        return;
    };
    for escape in ['\\', '`'] {
        let mut lex = Lex::new(escape);
        let _ = lex.expand(word, &env);
        let _ = lex.expand_words(word, &env);
        lex.raw_quotes = true;
        lex.raw_escapes = true;
        lex.skip_unset_env = true;
        let _ = lex.expand_with_matches(word, &env);
        let mut raw = Lex::new(escape);
        raw.skip_process_quotes = true;
        let _ = raw.expand_with_matches(word, &env);
    }
});
