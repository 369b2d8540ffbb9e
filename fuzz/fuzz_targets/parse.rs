//! The Dockerfile parser, then the build checks on whatever it accepts: neither may panic,
//! whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shmocker::dockerfile::{self, checks, dockerignore::Dockerignore};

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = dockerfile::parse(source) {
        let _ = checks::check(source, &parsed, None);
        // CopyIgnoredFile needs a .dockerignore: one that ignores something, and its rules on.
        let ignore = Dockerignore::parse("*.log\nsecret*\n**/tmp\n").ok();
        let with_all = format!("# check=experimental=all\n{source}");
        if let Ok(parsed) = dockerfile::parse(&with_all) {
            let _ = checks::check(&with_all, &parsed, ignore.as_ref());
        }
    }
});
