//! Unpacking a layer: any bytes, as an uncompressed tar, applied to an empty root. It may fail,
//! but never panic, and never create, change or remove anything outside the root, whatever the
//! names, links, whiteouts or PAX records say. A sentinel file beside the root and the root's
//! parent listing are checked after every input.
#![no_main]

use std::fs;

use libfuzzer_sys::fuzz_target;
use shmocker::layer::{ApplyOptions, Compression, apply_layer};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    fs::create_dir(&root).expect("root");
    let sentinel = dir.path().join("sentinel");
    fs::write(&sentinel, b"untouched").expect("sentinel");
    for opts in [
        ApplyOptions::default(),
        ApplyOptions {
            chown: false,
            record_owner: true,
            ..Default::default()
        },
    ] {
        let _ = apply_layer(data, Compression::None, &root, &opts);
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .expect("listing the parent")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["root", "sentinel"], "something was made beside the root");
        assert_eq!(fs::read(&sentinel).expect("sentinel"), b"untouched");
        assert!(
            fs::symlink_metadata(&root).expect("root").is_dir(),
            "the root itself was replaced"
        );
    }
});
