//! Any string as an image reference: shmocker's hand-written parser
//! (`registry::reference::parse`) against `oci_client::Reference::from_str` (oci-spec's
//! regular expression). Both must accept the same strings and give the same registry,
//! repository, tag and digest, except for the four inputs where shmocker follows docker
//! (`registry::reference::departure`); neither may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci_spec::distribution::Reference;
use shmocker::registry::reference::{departure, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let ours = parse(input);
    let theirs = input.parse::<Reference>();
    let same = match (&ours, &theirs) {
        (Ok(a), Ok(b)) => a == b && a.whole() == b.whole(),
        (Err(_), Err(_)) => true,
        _ => false,
    };
    if !same {
        assert!(
            departure(input, &ours, &theirs).is_some(),
            "{input:?}: shmocker {ours:?}, oci-client {theirs:?}"
        );
    }
    if let Err(e) = &ours {
        assert!(e.to_string().contains(&format!("{input:?}")), "{e}");
    }
});
