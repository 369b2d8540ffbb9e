//! Conformance of the Dockerfile front end against BuildKit's own test data
//! (shared/conformance/buildkit, see its README): parse dumps, rejected
//! Dockerfiles, word expansion and word splitting.
//!
//! The data is found through `$SHMOCKER_CONFORMANCE_DIR` or beside the
//! checkout; when it is missing every test here fails and says where it
//! looked, so a clone without it never passes silently.

use std::fs;
use std::path::{Path, PathBuf};

use shmocker::dockerfile::parser::{dump, parse};
use shmocker::dockerfile::shell::Lex;

/// Case counts of the pinned BuildKit data, for the message when it is
/// missing.
const PARSER_CASES: usize = 33;
const NEGATIVE_CASES: usize = 4;

fn data_dir(suite: &str, cases: &str) -> PathBuf {
    let root = std::env::var_os("SHMOCKER_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../shared/conformance"
            ))
        });
    let dir = root.join("buildkit/frontend/dockerfile");
    assert!(
        dir.is_dir(),
        "conformance data not found: looked in {} (set SHMOCKER_CONFORMANCE_DIR to the folder \
         holding buildkit/); {suite}: {cases} could not run",
        dir.display()
    );
    dir
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn case_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    v
}

fn name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A line diff that is enough to see what differs: aligned lines, `-` for
/// expected and `+` for actual.
fn diff(expected: &str, actual: &str) -> String {
    let e: Vec<&str> = expected.split_inclusive('\n').collect();
    let a: Vec<&str> = actual.split_inclusive('\n').collect();
    let mut out = String::new();
    for i in 0..e.len().max(a.len()) {
        match (e.get(i), a.get(i)) {
            (Some(x), Some(y)) if x == y => out.push_str(&format!("  {}", show(x))),
            (x, y) => {
                if let Some(x) = x {
                    out.push_str(&format!("- {}", show(x)));
                }
                if let Some(y) = y {
                    out.push_str(&format!("+ {}", show(y)));
                }
            }
        }
    }
    out
}

fn show(line: &str) -> String {
    match line.strip_suffix('\n') {
        Some(l) => format!("{l}\n"),
        None => format!("{line}⏎(no newline at end)\n"),
    }
}

fn finish(suite: &str, total: usize, failures: &[String]) {
    eprintln!("{suite}: {}/{total} cases", total - failures.len());
    assert!(total > 0, "{suite}: no cases found");
    assert!(
        failures.is_empty(),
        "{suite}: {} of {total} cases failed:\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn parser_testfiles_dump_like_buildkit() {
    let dir =
        data_dir("parser", &format!("all {PARSER_CASES} testfiles cases")).join("parser/testfiles");
    let cases = case_dirs(&dir);
    let mut failures = Vec::new();
    for case in &cases {
        let df = read(&case.join("Dockerfile"));
        let expected = read(&case.join("result"));
        match parse(&df) {
            Err(e) => failures.push(format!("{}: parse error: {e}\n", name(case))),
            Ok(r) => {
                let actual = dump(&r);
                if actual != expected {
                    failures.push(format!("{}:\n{}", name(case), diff(&expected, &actual)));
                }
            }
        }
    }
    if cases.len() != PARSER_CASES {
        eprintln!(
            "parser: expected {PARSER_CASES} cases, found {}",
            cases.len()
        );
    }
    finish("parser", cases.len(), &failures);
}

#[test]
fn parser_negative_testfiles_are_rejected() {
    let dir = data_dir(
        "parser negative",
        &format!("all {NEGATIVE_CASES} testfiles-negative cases"),
    )
    .join("parser/testfiles-negative");
    let cases = case_dirs(&dir);
    let mut failures = Vec::new();
    for case in &cases {
        let df = read(&case.join("Dockerfile"));
        match parse(&df) {
            Err(e) => eprintln!("  {}: rejected: {e}", name(case)),
            Ok(r) => failures.push(format!(
                "{}: expected an error, parsed as:\n{}",
                name(case),
                dump(&r)
            )),
        }
    }
    finish("parser negative", cases.len(), &failures);
}

#[test]
fn shell_env_var_test() {
    let path = data_dir("envVarTest", "all envVarTest cases").join("shell/envVarTest");
    let content = read(&path);
    let env = |k: &str| -> Option<String> {
        match k {
            "PWD" => Some("/home".into()),
            "SHELL" => Some("bash".into()),
            "KOREAN" => Some("한국어".into()),
            "NULL" => Some(String::new()),
            _ => None,
        }
    };
    let lex = Lex::new('\\');
    let (mut total, mut skipped) = (0, 0);
    let mut failures = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split('|').collect();
        let [platform, input, expected] = parts.as_slice() else {
            failures.push(format!("line {}: malformed test line {line:?}", i + 1));
            continue;
        };
        let (platform, input, expected) = (platform.trim(), input.trim(), expected.trim());
        if platform == "W" {
            skipped += 1;
            continue;
        }
        total += 1;
        let got = lex.expand(input, &env);
        let ok = match (&got, expected) {
            (Err(_), "error") => true,
            (Ok(v), e) => v == e,
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "line {} ({platform}) {input:?}:\n- {expected:?}\n+ {got:?}\n",
                i + 1
            ));
        }
    }
    eprintln!("envVarTest: {skipped} Windows-only (W) cases skipped");
    finish("envVarTest A+U", total, &failures);
}

#[test]
fn shell_words_test() {
    let path = data_dir("wordsTest", "all wordsTest cases").join("shell/wordsTest");
    let content = read(&path);
    let lex = Lex::new('\\');
    let mut envs: Vec<(String, String)> = Vec::new();
    let mut total = 0;
    let mut failures = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("ENV ") {
            let kv = rest.trim_start_matches(' ');
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            envs.retain(|(ek, _)| ek != k);
            envs.push((k.to_string(), v.to_string()));
            continue;
        }
        let parts: Vec<&str> = line.split('|').collect();
        let [input, expected] = parts.as_slice() else {
            failures.push(format!("line {}: malformed test line {line:?}", i + 1));
            continue;
        };
        total += 1;
        let input = input.trim();
        // Only the left side is trimmed: trailing spaces are part of the
        // expected last word.
        let expected: Vec<&str> = expected.trim_start_matches(' ').split(',').collect();
        let env = |k: &str| envs.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.clone());
        let got = match lex.expand_words(input, &env) {
            Ok(w) => w,
            Err(_) => vec!["error".to_string()],
        };
        if got != expected {
            failures.push(format!(
                "line {} {input:?}:\n- {expected:?}\n+ {got:?}\n",
                i + 1
            ));
        }
    }
    finish("wordsTest", total, &failures);
}
