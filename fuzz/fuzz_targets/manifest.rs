//! What a registry sends: any bytes as a manifest document (image manifest, or an index whose
//! entry for a platform is chosen) and as an image config. Parsing may fail, with an error that
//! names the image; it may never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shmocker::image::ImageConfig;
use shmocker::registry::{Platform, read_document};

fuzz_target!(|data: &[u8]| {
    for p in ["linux/amd64", "linux/arm64/v8", "linux/arm/v7", "windows/amd64"] {
        let platform = Platform::parse(p).expect("a valid platform");
        if let Err(e) = read_document(data, "sha256:0", &platform, "fuzz.example/image:1") {
            assert!(e.to_string().contains("fuzz.example/image:1"), "{e}");
        }
    }
    if let Ok(mut config) = serde_json::from_slice::<ImageConfig>(data) {
        let _ = config.config.env_get("PATH");
        config.config.env_set("PATH", "/bin");
        let _ = serde_json::to_vec(&config);
    }
});
