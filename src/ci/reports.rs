//! What a CI shows after a build, made from the build's [`Record`] and result:
//!
//! - `summary.md`: the job summary (GitHub's `$GITHUB_STEP_SUMMARY`, and an artifact
//!   elsewhere): image, tags, digest, size, layers, steps with their results and times, the
//!   isolation mode and why; always under [`SUMMARY_LIMIT`].
//! - `junit.xml`: one test case per build step (GitLab `reports:junit`, CircleCI
//!   `store_test_results`); a failed step is a failed case with its last output lines.
//! - `codequality.json`: GitLab's Code Climate subset, one issue per failing step and per
//!   warning at a Dockerfile line.
//! - `shmocker.env`: GitLab `reports:dotenv`: `SHMOCKER_IMAGE`, `SHMOCKER_TAGS`,
//!   `SHMOCKER_DIGEST`, `SHMOCKER_IMAGEID` for later jobs.
//! - `annotations.json`: GitLab `reports:annotations`: links to the pushed image.
//! - `metadata.json`: buildx's result keys (`containerimage.digest`, ...), the action's
//!   `metadata` output.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::progress::{Outcome, Record};

/// GitHub refuses job summaries over 1 MiB; stay well under.
pub const SUMMARY_LIMIT: usize = 1024 * 1024 - 16 * 1024;

/// What a build produced, for reports.
#[derive(Debug, Clone, Default)]
pub struct BuildFacts {
    /// The CI's name ("GitHub Actions").
    pub provider: String,
    /// The Dockerfile as the reader knows it (relative to the checkout).
    pub dockerfile: String,
    pub tags: Vec<String>,
    pub pushed: Vec<String>,
    pub digest: Option<String>,
    pub image_id: Option<String>,
    /// Compressed size: config plus layers, as a registry stores them.
    pub size: Option<u64>,
    pub layers: Option<usize>,
    /// The isolation chosen and why.
    pub mode: String,
    pub record: Record,
    /// The build's error, when it failed.
    pub error: Option<String>,
    pub job_url: Option<String>,
    /// The project's web page (GitLab: its container registry lives under it).
    pub repo_url: Option<String>,
    /// The checkout, to make Dockerfile paths relative.
    pub workspace: Option<PathBuf>,
}

impl BuildFacts {
    /// `path` relative to the checkout when it lies inside it.
    pub fn relative(&self, path: &str) -> String {
        self.workspace
            .as_deref()
            .and_then(|w| Path::new(path).strip_prefix(w).ok())
            .map(|r| r.display().to_string())
            .unwrap_or_else(|| path.to_string())
    }

    fn cached_steps(&self) -> usize {
        self.record
            .steps
            .iter()
            .filter(|s| s.outcome == Outcome::Cached)
            .count()
    }
}

/// Bytes in a unit people read: `1.5 MiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Markdown table cells hold no `|` or newline.
fn cell(s: &str) -> String {
    let one: String = s.replace('|', "\\|").replace(['\n', '\r'], " ");
    if one.chars().count() > 120 {
        let mut t: String = one.chars().take(119).collect();
        t.push('…');
        t
    } else {
        one
    }
}

/// Code spans must not be broken by backticks in the content.
fn code(s: &str) -> String {
    format!("`{}`", cell(s).replace('`', "'"))
}

pub fn summary_markdown(f: &BuildFacts) -> String {
    let mut s = String::new();
    match &f.error {
        None => s.push_str("### ✅ shmocker build succeeded\n\n"),
        Some(_) => s.push_str("### ❌ shmocker build failed\n\n"),
    }
    s.push_str("| | |\n| --- | --- |\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(s, "| {k} | {v} |");
    };
    row("Dockerfile", code(&f.dockerfile));
    if !f.tags.is_empty() {
        row(
            "Tags",
            f.tags
                .iter()
                .map(|t| code(t))
                .collect::<Vec<_>>()
                .join("<br>"),
        );
    }
    row(
        "Pushed",
        if f.pushed.is_empty() {
            "no".to_string()
        } else {
            format!("{} tag(s)", f.pushed.len())
        },
    );
    if let Some(d) = &f.digest {
        row("Digest", code(d));
    }
    if let Some(d) = &f.image_id {
        row("Image ID", code(d));
    }
    if let Some(n) = f.size {
        row("Size", format!("{} (compressed)", human_size(n)));
    }
    if let Some(n) = f.layers {
        row("Layers", n.to_string());
    }
    row(
        "Cached steps",
        format!("{} of {}", f.cached_steps(), f.record.steps.len()),
    );
    row("Mode", cell(&f.mode));
    if let Some(t) = f.record.elapsed {
        row("Time", format!("{:.1}s", t.as_secs_f64()));
    }
    if let Some(u) = &f.job_url {
        row("Job", cell(u));
    }
    if let Some(e) = &f.error {
        let _ = write!(
            s,
            "\n**Error**\n\n```text\n{}\n```\n",
            e.replace("```", "'''")
        );
    }
    s.push_str("\n<details><summary>Steps</summary>\n\n");
    s.push_str("| # | Instruction | Line | Result | Time |\n| --- | --- | --- | --- | --- |\n");
    let total = f.record.steps.len();
    for (i, step) in f.record.steps.iter().enumerate() {
        let result = match &step.outcome {
            Outcome::Done => "done".to_string(),
            Outcome::Cached => "cached".to_string(),
            Outcome::Running => "not finished".to_string(),
            Outcome::Failed(m) => format!("**failed**: {}", cell(m)),
        };
        let row = format!(
            "| {} | {} | {}:{} | {} | {:.1}s |\n",
            step.step,
            code(&step.instruction),
            cell(&f.relative(&step.location.file)),
            step.location.line,
            result,
            step.elapsed.as_secs_f64()
        );
        if s.len() + row.len() + 200 > SUMMARY_LIMIT {
            let _ = writeln!(
                s,
                "\n… {} more steps not shown (summary size limit)",
                total - i
            );
            break;
        }
        s.push_str(&row);
    }
    s.push_str("\n</details>\n");
    s
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 cannot hold most control characters, even escaped.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

pub fn junit_xml(f: &BuildFacts) -> String {
    let steps = &f.record.steps;
    let failures = steps
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Failed(_)))
        .count();
    let skipped = steps
        .iter()
        .filter(|s| s.outcome == Outcome::Running)
        .count();
    let time: f64 = steps.iter().map(|s| s.elapsed.as_secs_f64()).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites name=\"shmocker\" tests=\"{}\" failures=\"{failures}\" time=\"{time:.3}\">",
        steps.len()
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"shmocker build {}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{time:.3}\">",
        xml_escape(&f.dockerfile),
        steps.len()
    );
    for s in steps {
        let _ = write!(
            x,
            "    <testcase classname=\"{}\" name=\"#{} {}\" file=\"{}\" line=\"{}\" time=\"{:.3}\"",
            xml_escape(&f.dockerfile),
            s.step,
            xml_escape(&s.instruction),
            xml_escape(&f.relative(&s.location.file)),
            s.location.line,
            s.elapsed.as_secs_f64()
        );
        match &s.outcome {
            Outcome::Failed(m) => {
                let _ = writeln!(
                    x,
                    ">\n      <failure message=\"{}\">{}:{}: {}\n{}</failure>\n    </testcase>",
                    xml_escape(m),
                    xml_escape(&f.relative(&s.location.file)),
                    s.location.line,
                    xml_escape(m),
                    xml_escape(&s.tail.join("\n"))
                );
            }
            Outcome::Running => {
                let _ = writeln!(
                    x,
                    ">\n      <skipped message=\"the build stopped before this step finished\"/>\n    </testcase>"
                );
            }
            _ => x.push_str("/>\n"),
        }
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

/// GitLab's code quality report (a Code Climate subset).
pub fn codequality_json(f: &BuildFacts) -> String {
    let mut issues = Vec::new();
    for s in &f.record.steps {
        if let Outcome::Failed(m) = &s.outcome {
            let path = f.relative(&s.location.file);
            issues.push(json!({
                "description": format!("{}: {m}", s.instruction),
                "check_name": "shmocker-step-failed",
                "fingerprint": crate::store::sha256_digest(format!("step-failed:{path}:{}:{}", s.location.line, s.instruction).as_bytes()),
                "severity": "major",
                "location": { "path": path, "lines": { "begin": s.location.line } },
            }));
        }
    }
    for (loc, m) in &f.record.warnings {
        if let Some(loc) = loc {
            let path = f.relative(&loc.file);
            issues.push(json!({
                "description": m,
                "check_name": "shmocker-warning",
                "fingerprint": crate::store::sha256_digest(format!("warning:{path}:{}:{m}", loc.line).as_bytes()),
                "severity": "minor",
                "location": { "path": path, "lines": { "begin": loc.line } },
            }));
        }
    }
    serde_json::to_string_pretty(&issues).unwrap_or_else(|_| "[]".into())
}

/// dotenv lines: one `KEY=value` each, values on one line.
pub fn dotenv(f: &BuildFacts) -> String {
    let one = |s: &str| s.replace(['\n', '\r'], " ");
    let mut s = String::new();
    let image = f
        .tags
        .first()
        .map(|t| image_name(t).to_string())
        .unwrap_or_default();
    let _ = writeln!(s, "SHMOCKER_IMAGE={}", one(&image));
    let _ = writeln!(s, "SHMOCKER_TAGS={}", one(&f.tags.join(",")));
    let _ = writeln!(s, "SHMOCKER_DIGEST={}", f.digest.as_deref().unwrap_or(""));
    let _ = writeln!(
        s,
        "SHMOCKER_IMAGEID={}",
        f.image_id.as_deref().unwrap_or("")
    );
    s
}

/// `registry/path/name` of `registry/path/name:tag` (a `:` after the last `/`).
pub fn image_name(tag: &str) -> &str {
    match tag.rfind(':') {
        Some(i) if !tag[i..].contains('/') => &tag[..i],
        _ => tag,
    }
}

/// GitLab's annotations report: a link per pushed tag (to the project's container registry
/// when there is a project URL, else to the registry's host).
pub fn annotations_json(f: &BuildFacts) -> String {
    let links: Vec<serde_json::Value> = f
        .pushed
        .iter()
        .map(|tag| {
            let url = match &f.repo_url {
                Some(u) => format!("{}/container_registry", u.trim_end_matches('/')),
                None => format!("https://{tag}"),
            };
            let label = match &f.digest {
                Some(d) => format!("{tag} ({d})"),
                None => tag.clone(),
            };
            json!({ "external_link": { "label": label, "url": url } })
        })
        .collect();
    serde_json::to_string_pretty(&json!({ "shmocker_images": links })).unwrap_or_default()
}

/// buildx's metadata keys, as `--metadata-file` writes them.
pub fn metadata_json(
    image_id: &str,
    manifest: &crate::image::Descriptor,
    tags: &[String],
) -> serde_json::Value {
    let mut meta = json!({
        "containerimage.config.digest": image_id,
        "containerimage.descriptor": manifest,
        "containerimage.digest": manifest.digest,
    });
    if !tags.is_empty() {
        meta["image.name"] = serde_json::Value::String(tags.join(","));
    }
    meta
}

/// Writes every report into `dir` (created if missing); returns the files written.
pub fn write_all(
    dir: &Path,
    f: &BuildFacts,
    metadata: Option<&serde_json::Value>,
) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut files = vec![
        ("summary.md", summary_markdown(f)),
        ("junit.xml", junit_xml(f)),
        ("codequality.json", codequality_json(f)),
        ("shmocker.env", dotenv(f)),
        ("annotations.json", annotations_json(f)),
    ];
    if let Some(m) = metadata {
        files.push((
            "metadata.json",
            serde_json::to_string_pretty(m).unwrap_or_default(),
        ));
    }
    let mut written = Vec::new();
    for (name, text) in files {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::{Location, StepRecord};
    use std::time::Duration;

    fn facts() -> BuildFacts {
        let step = |n: usize, instr: &str, outcome: Outcome| StepRecord {
            step: n,
            stage: "stage-0".into(),
            instruction: instr.into(),
            location: Location::new("/p/Dockerfile", n, 1),
            outcome,
            elapsed: Duration::from_millis(1500),
            tail: vec!["boom <&>".into()],
        };
        BuildFacts {
            provider: "GitLab CI".into(),
            dockerfile: "Dockerfile".into(),
            tags: vec![
                "reg.example/g/p:main".into(),
                "reg.example/g/p:sha-abcdef0".into(),
            ],
            pushed: vec!["reg.example/g/p:main".into()],
            digest: Some("sha256:aa".into()),
            image_id: Some("sha256:bb".into()),
            size: Some(3 * 1024 * 1024 / 2),
            layers: Some(2),
            mode: "root: user namespace with the full ID map".into(),
            record: Record {
                steps: vec![
                    step(1, "FROM busybox", Outcome::Done),
                    step(2, "RUN false | x", Outcome::Failed("exit code: 1".into())),
                ],
                warnings: vec![(Some(Location::new("/p/Dockerfile", 1, 1)), "w".into())],
                ..Default::default()
            },
            error: Some("Dockerfile:2:1: RUN false: exit code: 1".into()),
            job_url: None,
            repo_url: Some("https://gitlab.example/g/p".into()),
            workspace: Some("/p".into()),
        }
    }

    #[test]
    fn the_summary_shows_the_fields_and_escapes_tables() {
        let s = summary_markdown(&facts());
        assert!(s.starts_with("### ❌ shmocker build failed"));
        assert!(s.contains("| Digest | `sha256:aa` |"));
        assert!(s.contains("| Size | 1.5 MiB (compressed) |"));
        assert!(s.contains("| Cached steps | 0 of 2 |"));
        assert!(s.contains(
            "| 2 | `RUN false \\| x` | Dockerfile:2 | **failed**: exit code: 1 | 1.5s |"
        ));
    }

    #[test]
    fn the_summary_stays_under_the_limit() {
        let mut f = facts();
        let big = f.record.steps[0].clone();
        f.record.steps = (0..20000)
            .map(|i| {
                let mut s = big.clone();
                s.step = i;
                s.instruction = "RUN ".to_string() + &"x".repeat(200);
                s
            })
            .collect();
        let s = summary_markdown(&f);
        assert!(s.len() < SUMMARY_LIMIT, "{}", s.len());
        assert!(s.contains("more steps not shown"));
    }

    #[test]
    fn junit_has_a_case_per_step_and_the_failure() {
        let x = junit_xml(&facts());
        assert!(x.contains("tests=\"2\" failures=\"1\""));
        assert!(x.contains("name=\"#2 RUN false | x\" file=\"Dockerfile\" line=\"2\""));
        assert!(x.contains("<failure message=\"exit code: 1\">Dockerfile:2: exit code: 1\nboom &lt;&amp;&gt;</failure>"));
    }

    #[test]
    fn gitlab_reports_have_their_documented_shapes() {
        let f = facts();
        let cq: serde_json::Value = serde_json::from_str(&codequality_json(&f)).unwrap();
        assert_eq!(cq[0]["location"]["path"], "Dockerfile");
        assert_eq!(cq[0]["location"]["lines"]["begin"], 2);
        assert_eq!(cq[0]["severity"], "major");
        assert_eq!(cq[1]["severity"], "minor");
        assert!(
            cq[0]["fingerprint"]
                .as_str()
                .unwrap()
                .starts_with("sha256:")
        );
        let env = dotenv(&f);
        assert!(env.contains("SHMOCKER_IMAGE=reg.example/g/p\n"));
        assert!(env.contains("SHMOCKER_DIGEST=sha256:aa\n"));
        let a: serde_json::Value = serde_json::from_str(&annotations_json(&f)).unwrap();
        assert_eq!(
            a["shmocker_images"][0]["external_link"]["url"],
            "https://gitlab.example/g/p/container_registry"
        );
        assert_eq!(image_name("127.0.0.1:5055/a/b:1"), "127.0.0.1:5055/a/b");
        assert_eq!(image_name("127.0.0.1:5055/a/b"), "127.0.0.1:5055/a/b");
    }
}
