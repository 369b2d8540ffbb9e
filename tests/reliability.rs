//! Reliability: pushes and pulls through a registry that fails (tests/common/faultproxy.rs),
//! builds sharing one store at once, and builds killed with SIGKILL at random moments.
//!
//! Every build runs as the unprivileged test user against the real test registry; skopeo reads
//! the registry back. After every scenario the store is verified: each file under
//! `blobs/sha256/` must hash to its name (a half-written blob addressed by its digest would be
//! the corruption these tests exist to catch).

mod common;
#[path = "common/faultproxy.rs"]
mod faultproxy;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Who, env, scratch_dir};
use faultproxy::{Fault, FaultProxy, Kind, Plan, RateLimit, RetryAfter, Seen};
use sha2::{Digest, Sha256};

const EPOCH: &str = "SOURCE_DATE_EPOCH=1700000000";

/// `runuser -u TEST_USER -- env HOME=... VARS... shmocker --root STORE ARGS...`, not yet run.
fn user_command(store: &Path, args: &[&str], vars: &[(&str, &str)]) -> Command {
    let user = env().user();
    let mut c = Command::new("runuser");
    c.args(["-u", user, "--", "env", &format!("HOME=/home/{user}")]);
    for (k, v) in vars {
        c.arg(format!("{k}={v}"));
    }
    c.arg(common::binary())
        .arg("--root")
        .arg(store)
        .args(args)
        .current_dir("/")
        .env_remove("SHMOCKER_ROOT");
    c
}

fn run_user(store: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let out = user_command(store, args, vars).output().expect("runuser");
    eprintln!(
        "--- shmocker {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `shmocker build --progress plain -t TAG --push CONTEXT` as the test user.
fn push_build(store: &Path, tag: &str, context: &str, vars: &[(&str, &str)]) -> Output {
    run_user(
        store,
        &["build", "--progress", "plain", "-t", tag, "--push", context],
        vars,
    )
}

/// The request `after_seconds` (method, path part) was refused with `Retry-After: 2` and
/// retried no sooner; the request `after_date` was refused with an HTTP-date and retried no
/// sooner than that date.
fn assert_retried_as_asked(
    proxy: &FaultProxy,
    after_seconds: (&str, &str),
    after_date: (&str, &str),
) {
    let seen = proxy.seen();
    let (refused, retry) = refused_and_retry(&seen, after_seconds.0, after_seconds.1);
    let gap = retry.at - refused.at;
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    let (refused, retry) = refused_and_retry(&seen, after_date.0, after_date.1);
    let date = refused.retry_at.expect("an HTTP-date");
    assert!(
        retry.wall >= date,
        "retried at {:?}, before the date asked for ({date:?})",
        retry.wall
    );
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The digest a build printed (its last line of standard output).
fn printed_digest(out: &Output) -> String {
    let text = stdout(out);
    let d = text.lines().last().unwrap_or_default().trim().to_string();
    assert!(d.starts_with("sha256:"), "no digest on stdout: {text:?}");
    d
}

/// Checks the store's invariants: every blob hashes to its name, and no temp file is left
/// behind by a process that is gone (after `clean` ran, i.e. after a build). Returns the number
/// of blobs.
fn verify_store(store: &Path) -> usize {
    let dir = store.join("blobs/sha256");
    let mut n = 0;
    // A build killed before its first blob has not made the directory yet.
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    for e in entries {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let mut f = fs::File::open(e.path()).unwrap();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let k = f.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
        }
        assert_eq!(
            hex::encode(h.finalize()),
            name,
            "blob {} does not hash to its name: a partial or damaged blob is addressed by digest",
            e.path().display()
        );
        n += 1;
    }
    n
}

/// A Dockerfile of three RUN steps, each a layer of `mb` MB that does not compress.
fn noisy_dockerfile(from: &str, mb: usize) -> String {
    let bytes = mb * 1024 * 1024;
    format!(
        "FROM {from}\n\
         RUN head -c {bytes} /dev/urandom > /a\n\
         RUN head -c {bytes} /dev/urandom > /b\n\
         RUN head -c {bytes} /dev/urandom > /c\n"
    )
}

fn busybox_via(host: &str) -> String {
    let busybox = env().busybox();
    let (_, rest) = busybox.split_once('/').unwrap();
    format!("{host}/{rest}")
}

fn layer_digests(manifest: &serde_json::Value) -> Vec<String> {
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn push_and_pull_through_a_flaky_registry_succeed() {
    let proxy = FaultProxy::start(env().registry(), Plan::flaky(0x5eed_0001));
    let tag = format!("flaky:{}", common::unique());
    let via_proxy = format!("{}/tests/{tag}", proxy.host());
    let direct = format!("{}/tests/{tag}", env().registry());

    // Build from the base image pulled through the proxy, push through it: about 6 MB of layers.
    let ctx = common::context(&[(
        "Dockerfile",
        &noisy_dockerfile(&busybox_via(&proxy.host()), 2),
    )]);
    let store = scratch_dir(Who::User);
    let out = push_build(
        store.path(),
        &via_proxy,
        &ctx.path().display().to_string(),
        &[],
    );
    eprintln!("proxy log:\n{}", proxy.log());
    assert!(
        out.status.success(),
        "the push through the flaky proxy failed"
    );
    let counts = proxy.counts();
    eprintln!("injected: {counts:?} in {} requests", proxy.requests());
    for kind in [
        Fault::Unavailable503,
        Fault::TooMany429,
        Fault::ResetBeforeResponse,
        Fault::TruncatedBlob,
        Fault::UploadPut500,
    ] {
        assert!(
            counts.get(&kind).copied().unwrap_or(0) > 0,
            "no {kind:?} was injected"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("retrying in"),
        "no retry was reported: {stderr}"
    );

    // The real registry has the image the build printed, whole.
    let digest = printed_digest(&out);
    let raw = run_ok_raw(&direct);
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&raw))),
        digest
    );
    let manifest: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let pushed_layers = layer_digests(&manifest);
    assert!(pushed_layers.len() >= 4, "{manifest}");
    run_ok_skopeo_copy(&direct);
    verify_store(store.path());

    // Pull it back as a base image, into a fresh store, through a second flaky proxy (its own
    // count, every kind again: the first blob GET is cut short).
    let proxy2 = FaultProxy::start(env().registry(), Plan::flaky(0x5eed_0003));
    let from_proxy = format!("{}/tests/{tag}@{digest}", proxy2.host());
    let ctx2 = common::context(&[(
        "Dockerfile",
        &format!(
            "FROM {from_proxy}\nRUN test \"$(cat /a /b /c | wc -c)\" -eq {}\n",
            3 * 2 * 1024 * 1024
        ),
    )]);
    let store2 = scratch_dir(Who::User);
    let out2_ref = format!(
        "{}/tests/flaky-child:{}",
        env().registry(),
        common::unique()
    );
    let out2 = push_build(
        store2.path(),
        &out2_ref,
        &ctx2.path().display().to_string(),
        &[],
    );
    eprintln!("proxy log:\n{}", proxy2.log());
    assert!(
        out2.status.success(),
        "the pull through the flaky proxy failed"
    );
    let counts = proxy2.counts();
    eprintln!("injected: {counts:?} in {} requests", proxy2.requests());
    assert!(
        counts.get(&Fault::TruncatedBlob).copied().unwrap_or(0) > 0 && proxy2.total_faults() >= 3,
        "too few faults were injected during the pull: {counts:?}"
    );
    let child = common::remote_manifest(&out2_ref);
    let child_layers = layer_digests(&child);
    assert_eq!(
        &child_layers[..pushed_layers.len()],
        &pushed_layers[..],
        "the pulled base layers differ from the pushed ones"
    );
    let blobs = verify_store(store2.path());
    assert!(blobs >= pushed_layers.len(), "{blobs} blobs in the store");
}

/// The raw manifest of `reference` as the registry serves it.
fn run_ok_raw(reference: &str) -> Vec<u8> {
    common::run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("docker://{reference}"),
    ]))
    .stdout
}

/// skopeo copies the image out of the registry: every blob is there and matches its digest.
fn run_ok_skopeo_copy(reference: &str) {
    let dir = tempfile::tempdir().unwrap();
    common::run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:img", dir.path().join("layout").display()),
    ]));
}

#[test]
fn a_push_that_gives_up_leaves_no_manifest() {
    let proxy = FaultProxy::start(
        env().registry(),
        Plan {
            seed: 0x5eed_0002,
            rate: 0.0,
            each_kind_once: false,
            fail_all_upload_puts: true,
            trickle_blob_gets: 0,
            rate_limits: Vec::new(),
        },
    );
    let tag = format!("giveup:{}", common::unique());
    let via_proxy = format!("{}/tests/{tag}", proxy.host());
    let direct = format!("{}/tests/{tag}", env().registry());
    let ctx = common::context(&[("Dockerfile", &noisy_dockerfile(env().busybox(), 1))]);
    let store = scratch_dir(Who::User);
    let out = run_user(
        store.path(),
        &[
            "build",
            "--progress",
            "plain",
            "-t",
            &via_proxy,
            "--push",
            &ctx.path().display().to_string(),
        ],
        &[("SHMOCKER_REGISTRY_ATTEMPTS", "3")],
    );
    assert!(
        !out.status.success(),
        "the push succeeded although every upload failed"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "gave up after 3 attempts",
        "HTTP 500",
        proxy.host().as_str(),
        via_proxy.as_str(),
        "push blob sha256:",
    ] {
        assert!(
            stderr.contains(needle),
            "the error does not say {needle:?}: {stderr}"
        );
    }
    assert!(
        proxy.counts()[&Fault::UploadPut500] >= 3,
        "{:?}",
        proxy.counts()
    );
    assert!(
        !common::remote_exists(&direct),
        "the registry has a manifest for {direct} although its blobs never arrived"
    );
    verify_store(store.path());
}

/// A client of the test registry through `proxy`, whose blob transfers get 2 s per attempt, and
/// the retry notices it gives.
fn impatient_client(
    attempts: u32,
) -> (
    shmocker::registry::Registry,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    noticing_client(shmocker::registry::RetryPolicy {
        attempts,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(100),
        min_transfer_timeout: Duration::from_secs(2),
        min_transfer_rate: u64::MAX,
        ..Default::default()
    })
}

/// A client with `policy`, and the retry notices it gives.
fn noticing_client(
    policy: shmocker::registry::RetryPolicy,
) -> (
    shmocker::registry::Registry,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use shmocker::registry::{Registry, RegistryOptions, RetryNotice};
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = notices.clone();
    let reg = Registry::new(RegistryOptions {
        extra_auth_files: Some(vec![]),
        docker_config_dir: Some(std::env::temp_dir().join("shmocker-no-docker-config")),
        retry: Some(policy),
        on_retry: Some(RetryNotice::new(move |m| {
            seen.lock().unwrap().push(m.to_string())
        })),
        ..Default::default()
    });
    (reg, notices)
}

/// The first `method` request whose path contains `part` that was refused with `Retry-After`,
/// and the next request to the same path (its retry).
fn refused_and_retry(seen: &[Seen], method: &str, part: &str) -> (Seen, Seen) {
    let i = seen
        .iter()
        .position(|s| {
            s.fault == Some(Fault::RetryAfter429) && s.method == method && s.path.contains(part)
        })
        .unwrap_or_else(|| panic!("no {method} of {part} was refused: {seen:#?}"));
    let refused = seen[i].clone();
    let retry = seen[i + 1..]
        .iter()
        .find(|s| s.method == method && s.path == refused.path)
        .unwrap_or_else(|| panic!("the refused {method} {} was not retried", refused.path))
        .clone();
    (refused, retry)
}

/// A small image of its own (one COPY of unique content on the base image), to push.
fn small_context() -> tempfile::TempDir {
    common::context(&[
        (
            "Dockerfile",
            &format!(
                "FROM {}
COPY data.txt /data.txt
",
                env().busybox()
            ),
        ),
        ("data.txt", &common::unique()),
    ])
}

/// A registry that refuses with `Retry-After` (seconds for the manifest PUT, an HTTP-date for a
/// blob HEAD) is waited for as long as it asked, and the push succeeds.
#[test]
fn a_push_waits_as_long_as_retry_after_asks() {
    let proxy = FaultProxy::start(
        env().registry(),
        Plan::rate_limited(vec![
            RateLimit {
                kind: Kind::ManifestPut,
                first: 1,
                retry_after: RetryAfter::Seconds(2),
            },
            RateLimit {
                kind: Kind::BlobHead,
                first: 1,
                retry_after: RetryAfter::DateIn(2),
            },
        ]),
    );
    let tag = format!("retry-after:{}", common::unique());
    let via_proxy = format!("{}/tests/{tag}", proxy.host());
    let direct = format!("{}/tests/{tag}", env().registry());
    let ctx = small_context();
    let store = scratch_dir(Who::User);
    let out = push_build(
        store.path(),
        &via_proxy,
        &ctx.path().display().to_string(),
        &[],
    );
    eprintln!("proxy log:\n{}", proxy.log());
    assert!(out.status.success(), "the push failed");
    assert_eq!(proxy.counts()[&Fault::RetryAfter429], 2);

    // The build log says where each wait came from.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let notice = |what: &str| {
        stderr
            .lines()
            .find(|l| l.contains(what) && l.contains("retrying in"))
            .unwrap_or_else(|| panic!("no retry notice for {what:?}: {stderr}"))
            .to_string()
    };
    let manifest = notice(&format!("pushing the manifest of {via_proxy}"));
    assert!(
        manifest.contains("HTTP 429")
            && manifest.contains("as the registry asked with Retry-After (2s)"),
        "{manifest}"
    );
    let head = notice("checking for blob sha256:");
    assert!(
        head.contains("as the registry asked with Retry-After ("),
        "{head}"
    );

    // And each retry came no sooner than asked.
    assert_retried_as_asked(&proxy, ("PUT", "/manifests/"), ("HEAD", "/blobs/"));

    let digest = printed_digest(&out);
    let raw = run_ok_raw(&direct);
    assert_eq!(
        format!("sha256:{}", hex::encode(Sha256::digest(&raw))),
        digest
    );
    run_ok_skopeo_copy(&direct);
}

/// Pulls honour `Retry-After` too: a manifest GET refused for 2 s, a config GET refused until
/// an HTTP-date.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_waits_as_long_as_retry_after_asks() {
    use shmocker::registry::{BlobRef, Platform, RetryPolicy};
    let proxy = FaultProxy::start(
        env().registry(),
        Plan::rate_limited(vec![
            RateLimit {
                kind: Kind::ManifestGet,
                first: 1,
                retry_after: RetryAfter::Seconds(2),
            },
            RateLimit {
                kind: Kind::BlobGet,
                first: 1,
                retry_after: RetryAfter::DateIn(1),
            },
        ]),
    );
    let image: oci_client::Reference = busybox_via(&proxy.host()).parse().unwrap();
    let (reg, notices) = noticing_client(RetryPolicy::default());
    let store_dir = scratch_dir(Who::Root);
    let store = shmocker::store::Store::open(store_dir.path()).unwrap();
    // The manifest GET and then the config GET are refused once each.
    let pulled = reg.pull_manifest(&image, &Platform::host()).await.unwrap();
    let layer = &pulled.manifest.layers[0];
    let blob = BlobRef {
        digest: layer.digest.clone(),
        size: layer.size as u64,
        media_type: layer.media_type.clone(),
    };
    let path = reg.fetch_blob(&image, &blob, &store).await.unwrap();
    eprintln!("proxy log:\n{}", proxy.log());
    assert_eq!(proxy.counts()[&Fault::RetryAfter429], 2);
    let notices = notices.lock().unwrap().clone();
    assert_eq!(notices.len(), 2, "{notices:#?}");
    assert!(
        notices[0].contains("pulling the manifest of")
            && notices[0].contains("as the registry asked with Retry-After (2s)"),
        "{}",
        notices[0]
    );
    assert!(
        notices[1].contains("pulling config sha256:")
            && notices[1].contains("as the registry asked with Retry-After ("),
        "{}",
        notices[1]
    );
    assert_retried_as_asked(&proxy, ("GET", "/manifests/"), ("GET", "/blobs/"));
    let data = fs::read(&path).unwrap();
    assert_eq!(shmocker::store::sha256_digest(&data), blob.digest);
}

/// A registry asking for a longer wait than the request's retry budget ends the push at once,
/// with an error that says so, and no manifest is pushed; `SHMOCKER_REGISTRY_MAX_WAIT` sets the
/// budget.
#[test]
fn a_retry_after_beyond_the_budget_fails_the_push_at_once() {
    let ctx = small_context();
    let ctx_arg = ctx.path().display().to_string();
    let store = scratch_dir(Who::User);
    // (Retry-After, SHMOCKER_REGISTRY_MAX_WAIT, the budget the error names)
    for (asked, max_wait, budget) in [(3600, None, "40s"), (2, Some("1"), "1s")] {
        let proxy = FaultProxy::start(
            env().registry(),
            Plan::rate_limited(vec![RateLimit {
                kind: Kind::UploadPost,
                first: u64::MAX,
                retry_after: RetryAfter::Seconds(asked),
            }]),
        );
        let tag = format!("retry-after-budget:{}", common::unique());
        let via_proxy = format!("{}/tests/{tag}", proxy.host());
        let direct = format!("{}/tests/{tag}", env().registry());
        let vars: Vec<(&str, &str)> = max_wait
            .map(|v| ("SHMOCKER_REGISTRY_MAX_WAIT", v))
            .into_iter()
            .collect();
        let out = push_build(store.path(), &via_proxy, &ctx_arg, &vars);
        eprintln!("proxy log:\n{}", proxy.log());
        assert!(
            !out.status.success(),
            "the push succeeded although every upload was refused"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        for needle in [
            format!("registry {}", proxy.host()),
            via_proxy.clone(),
            "push blob sha256:".to_string(),
            "HTTP 429".to_string(),
            format!("the registry asked to be retried in {asked}s with Retry-After"),
            format!("this request's retry budget of {budget}"),
            "try again later".to_string(),
            "SHMOCKER_REGISTRY_MAX_WAIT=SECONDS".to_string(),
        ] {
            assert!(
                stderr.contains(&needle),
                "the error does not say {needle:?}: {stderr}"
            );
        }
        // Not one retry: the refused uploads were never tried again.
        assert!(!stderr.contains("retrying in"), "{stderr}");
        assert!(proxy.counts()[&Fault::RetryAfter429] >= 1);
        assert!(
            !common::remote_exists(&direct),
            "the registry has a manifest for {direct} although its blobs never arrived"
        );
    }
    verify_store(store.path());
}

/// A blob transfer that trickles (a byte every half second, so no read ever times out) is cut
/// off at its per-attempt limit and retried, in pulls of configs and of layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_transfer_is_cut_off_and_retried() {
    use shmocker::registry::{BlobRef, Platform};
    let proxy = FaultProxy::start(
        env().registry(),
        Plan {
            seed: 0x5eed_0004,
            rate: 0.0,
            each_kind_once: false,
            fail_all_upload_puts: false,
            trickle_blob_gets: 2,
            rate_limits: Vec::new(),
        },
    );
    let image: oci_client::Reference = busybox_via(&proxy.host()).parse().unwrap();
    let (reg, notices) = impatient_client(3);
    let store_dir = scratch_dir(Who::Root);
    let store = shmocker::store::Store::open(store_dir.path()).unwrap();
    let started = Instant::now();
    // The config's GET trickles: the pull retries it.
    let pulled = reg.pull_manifest(&image, &Platform::host()).await.unwrap();
    let layer = &pulled.manifest.layers[0];
    let blob = BlobRef {
        digest: layer.digest.clone(),
        size: layer.size as u64,
        media_type: layer.media_type.clone(),
    };
    // And so does the layer's first GET.
    let path = reg.fetch_blob(&image, &blob, &store).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(proxy.counts()[&Fault::TrickleBlob], 2, "{}", proxy.log());
    let notices = notices.lock().unwrap().clone();
    assert_eq!(notices.len(), 2, "{notices:#?}");
    for n in &notices {
        assert!(
            n.contains("no complete answer within 2s") && n.contains(&proxy.host()),
            "{n}"
        );
    }
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    let data = fs::read(&path).unwrap();
    assert_eq!(shmocker::store::sha256_digest(&data), blob.digest);
    assert_eq!(
        fs::read_dir(store_dir.path().join("tmp")).unwrap().count(),
        0
    );
}

/// A registry that only ever trickles ends in a bounded give-up that says so, and leaves no
/// partial blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_only_trickles_gives_up_in_bounded_time() {
    use shmocker::registry::{BlobRef, Platform};
    // The manifest straight from the registry; the blob through the proxy, which trickles it.
    let direct: oci_client::Reference = env().busybox().parse().unwrap();
    let (reg, _) = impatient_client(2);
    let pulled = reg.pull_manifest(&direct, &Platform::host()).await.unwrap();
    let layer = &pulled.manifest.layers[0];
    let blob = BlobRef {
        digest: layer.digest.clone(),
        size: layer.size as u64,
        media_type: layer.media_type.clone(),
    };
    let proxy = FaultProxy::start(
        env().registry(),
        Plan {
            seed: 0x5eed_0005,
            rate: 0.0,
            each_kind_once: false,
            fail_all_upload_puts: false,
            trickle_blob_gets: u64::MAX,
            rate_limits: Vec::new(),
        },
    );
    let image: oci_client::Reference = busybox_via(&proxy.host()).parse().unwrap();
    let store_dir = scratch_dir(Who::Root);
    let store = shmocker::store::Store::open(store_dir.path()).unwrap();
    let started = Instant::now();
    let e = reg.fetch_blob(&image, &blob, &store).await.unwrap_err();
    let elapsed = started.elapsed();
    let msg = e.to_string();
    for needle in [
        "gave up after 2 attempts",
        "no complete answer within 2s",
        blob.digest.as_str(),
        proxy.host().as_str(),
    ] {
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    assert!(!store.has_blob(&blob.digest));
    assert_eq!(
        fs::read_dir(store_dir.path().join("tmp")).unwrap().count(),
        0
    );
}

/// A context whose build takes a few seconds and whose result is reproducible: fixed contents,
/// SOURCE_DATE_EPOCH for every time.
fn steady_context() -> tempfile::TempDir {
    common::context(&[
        (
            "Dockerfile",
            &format!(
                "FROM {}\n\
                 COPY data.txt /data.txt\n\
                 RUN sleep 2 && seq 1 200000 > /seq\n\
                 RUN head -c 3000000 /dev/zero | tr '\\0' x > /xs && sleep 2\n\
                 RUN cat /data.txt /seq | md5sum > /sum\n",
                env().busybox()
            ),
        ),
        ("data.txt", "the same input every time\n"),
    ])
}

#[test]
fn four_builds_sharing_a_store_agree() {
    let ctx = steady_context();
    let store = scratch_dir(Who::User);
    let ctx_arg = ctx.path().display().to_string();
    let children: Vec<_> = (0..4)
        .map(|_| {
            user_command(
                store.path(),
                &[
                    "build",
                    "--progress",
                    "plain",
                    "--build-arg",
                    EPOCH,
                    &ctx_arg,
                ],
                &[],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let mut digests = Vec::new();
    for (i, out) in outs.iter().enumerate() {
        eprintln!(
            "--- build {i}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "build {i} failed");
        digests.push(printed_digest(out));
    }
    assert!(
        digests.iter().all(|d| d == &digests[0]),
        "the builds disagree: {digests:?}"
    );
    verify_store(store.path());
    // And a fifth, alone, from the cache they left, agrees too.
    let again = run_user(
        store.path(),
        &[
            "build",
            "--progress",
            "plain",
            "--build-arg",
            EPOCH,
            &ctx_arg,
        ],
        &[],
    );
    assert!(again.status.success());
    assert_eq!(printed_digest(&again), digests[0]);
}

/// Every process whose parent chain leads to `root` (root included).
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else {
            continue;
        };
        if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            // A zombie is dead; only its parent has not reaped it yet.
            s.rsplit_once(')')
                .and_then(|(_, a)| a.split_whitespace().next().map(|st| st != "Z"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

/// splitmix64, for reproducible "random" kill moments.
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn builds_killed_at_random_moments_leave_a_usable_store() {
    let ctx = steady_context();
    let ctx_arg = ctx.path().display().to_string();
    let target = common::unique_ref("crash");

    // The expected result, from a store no crash has touched.
    let clean = scratch_dir(Who::User);
    let out = run_user(
        clean.path(),
        &[
            "build",
            "--progress",
            "plain",
            "--build-arg",
            EPOCH,
            &ctx_arg,
        ],
        &[],
    );
    assert!(out.status.success());
    let expected = printed_digest(&out);

    // Kill moments: a few fixed ones across the build and push, and seeded random ones.
    let mut moments_ms: Vec<u64> = vec![300, 1000, 2500, 4500];
    moments_ms.extend((0..3).map(|i| 200 + mix(0x5eed_0004, i) % 6000));
    eprintln!("kill moments (ms): {moments_ms:?}");

    let mut killed_while_running = 0;
    for (round, ms) in moments_ms.iter().enumerate() {
        // A fresh store each round, so that every kill lands in real work, not in cache hits.
        let store = scratch_dir(Who::User);
        // Each round pushes to its own tag, so that a push finished before the kill is visible.
        let tag = format!("{target}-{round}");
        let mut runuser = user_command(
            store.path(),
            &[
                "build",
                "--progress",
                "plain",
                "--build-arg",
                EPOCH,
                "-t",
                &tag,
                "--push",
                &ctx_arg,
            ],
            &[],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let started = Instant::now();
        // runuser forks; the shmocker process is its child (env execs it).
        let shmocker = loop {
            let kids: Vec<u32> = descendants(runuser.id()).into_iter().skip(1).collect();
            if let Some(&k) = kids.first() {
                break k;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "shmocker did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        std::thread::sleep(Duration::from_millis(*ms).saturating_sub(started.elapsed()));
        let tree = descendants(shmocker);
        let running = runuser.try_wait().unwrap().is_none();
        let _ = Command::new("kill")
            .args(["-9", &shmocker.to_string()])
            .status();
        let _ = runuser.wait();
        if running {
            killed_while_running += 1;
        }
        // Nothing of the build runs on: the build process and every step die with it, at once
        // (a build left running would finish its steps, which sleep for seconds).
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let left: Vec<u32> = tree.iter().copied().filter(|p| alive(*p)).collect();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: processes of the killed build still run: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        verify_store(store.path());
        if common::remote_exists(&tag) {
            // A manifest was pushed before the kill: then it names a whole image.
            run_ok_skopeo_copy(&tag);
        }

        // The next build with the same store succeeds, with the same result as a clean one.
        let out = run_user(
            store.path(),
            &[
                "build",
                "--progress",
                "plain",
                "--build-arg",
                EPOCH,
                &ctx_arg,
            ],
            &[],
        );
        assert!(
            out.status.success(),
            "round {round}: the build after the kill at {ms} ms failed"
        );
        assert_eq!(printed_digest(&out), expected, "round {round}");
        verify_store(store.path());
        // What the killed build left in tmp/ (named after its pids) is gone.
        let left: Vec<String> = fs::read_dir(store.path().join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| {
                name.split(['-', '_'])
                    .any(|part| tree.iter().any(|pid| part == pid.to_string()))
            })
            .collect();
        assert!(
            left.is_empty(),
            "round {round}: the killed build's files remain in tmp/: {left:?}"
        );
        eprintln!("round {round}: killed at {ms} ms, store verified, rebuild agrees");
    }
    assert!(
        killed_while_running >= 3,
        "only {killed_while_running} kills hit a running build"
    );
}
