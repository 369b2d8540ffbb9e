//! What a warm build asks of the registry with `--pull=always` (the default): resolving the base
//! tag is one manifest request; the config (and, under an index, the platform's manifest) the
//! store already holds are not fetched again. Counted through tests/common/faultproxy.rs with
//! no faults.

mod common;
// Only its counting is used here.
#[allow(dead_code)]
#[path = "common/faultproxy.rs"]
mod faultproxy;

use common::{Who, context, env, scratch_dir, shmocker_ok};
use faultproxy::{FaultProxy, Plan};

#[test]
fn a_warm_build_resolves_its_base_tag_with_one_manifest_request() {
    let proxy = FaultProxy::start(env().registry(), Plan::rate_limited(Vec::new()));
    let busybox = env().busybox();
    let (_, path) = busybox.split_once('/').expect("registry/repository:tag");
    let base = format!("{}/{path}", proxy.host());
    let ctx = context(&[(
        "Dockerfile",
        &format!("FROM {base}\nRUN echo warm > /warm.txt\n"),
    )]);
    let store = scratch_dir(Who::User);
    let ctx_arg = ctx.path().display().to_string();
    let first = shmocker_ok(Who::User, store.path(), &["build", &ctx_arg]);
    let cold: Vec<String> = proxy
        .seen()
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    let config_gets = cold
        .iter()
        .filter(|r| r.starts_with("GET ") && r.contains("/blobs/"))
        .count();
    assert!(config_gets >= 1, "the cold build fetched no blob: {cold:?}");

    let second = shmocker_ok(Who::User, store.path(), &["build", &ctx_arg]);
    assert_eq!(first.stdout, second.stdout, "a different image");
    let warm: Vec<String> = proxy.seen()[cold.len()..]
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    let manifests: Vec<&String> = warm.iter().filter(|r| r.contains("/manifests/")).collect();
    let blobs: Vec<&String> = warm.iter().filter(|r| r.contains("/blobs/")).collect();
    assert_eq!(manifests.len(), 1, "{warm:?}");
    assert!(manifests[0].ends_with(&format!("/manifests/{}", path.rsplit_once(':').unwrap().1)));
    assert!(
        blobs.is_empty(),
        "the warm build fetched blobs again: {warm:?}"
    );
}
