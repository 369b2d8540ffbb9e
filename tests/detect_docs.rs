//! The troubleshooting pages and the environment matrix agree: every fix a matrix file gives
//! appears word for word on the page of its CI system (docs/troubleshooting/<ci>.md), so what
//! `shmocker detect` prints in an environment can always be found, with its context, in the docs.
//! (The direction is matrix -> docs: the pages may say more than the matrix.)

use std::path::Path;

use shmocker::detect::matrix;

#[test]
fn every_matrix_fix_is_on_its_troubleshooting_page() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let envs = matrix::environments().expect("matrix files parse");
    let mut missing = Vec::new();
    for env in &envs {
        let page = root.join(format!("docs/troubleshooting/{}.md", env.ci));
        let text = std::fs::read_to_string(&page).unwrap_or_else(|e| {
            panic!("{}: {e} (named by matrix/{}.yaml)", page.display(), env.id)
        });
        for (problem, fix) in &env.fixes {
            if !text.contains(fix.as_str()) {
                missing.push(format!(
                    "{}: {problem}: {fix:?} not in {}",
                    env.id,
                    page.display()
                ));
            }
        }
        assert!(
            text.contains(&format!("matrix/{}.yaml", env.id)),
            "{} does not describe matrix/{}.yaml",
            page.display(),
            env.id
        );
    }
    assert!(
        missing.is_empty(),
        "fixes missing from the docs:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_troubleshooting_page_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for ci in ["github", "gitlab", "circleci", "kubernetes", "local"] {
        assert!(
            root.join(format!("docs/troubleshooting/{ci}.md")).is_file(),
            "docs/troubleshooting/{ci}.md is missing"
        );
    }
}
