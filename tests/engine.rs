//! The build engine end to end: multi-stage graphs, the layer cache, heredocs, RUN mounts and
//! networks, secrets and reproducible output — each checked in the pushed or exported image.

mod common;

use std::process::Command;

use common::{
    Who, context, env, scratch_dir, shmocker, shmocker_env, shmocker_ok, tree, unique_ref, unpack,
};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn digest(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Builds `files` as `who` into an OCI archive, unpacks it, returns (rootfs tree dir, stderr).
fn build_and_unpack(
    who: Who,
    store: &std::path::Path,
    files: &[(&str, &str)],
    extra: &[&str],
) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let ctx = context(files);
    build_dir_and_unpack(who, store, ctx.path(), extra)
}

/// [`build_and_unpack`] for a context directory the test prepared itself (BASE is the busybox
/// test image).
fn build_dir_and_unpack(
    who: Who,
    store: &std::path::Path,
    ctx: &std::path::Path,
    extra: &[&str],
) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let out_dir = scratch_dir(who);
    let oci = out_dir.path().join("img.tar");
    let base = format!("BASE={}", env().busybox());
    let dest = format!("type=oci,dest={}", oci.display());
    let mut args = vec!["build", "--build-arg", &base, "--output", &dest];
    args.extend_from_slice(extra);
    let ctx_path = ctx.to_str().unwrap().to_string();
    args.push(&ctx_path);
    let out = shmocker_ok(who, store, &args);
    let work = scratch_dir(Who::Root);
    let rootfs = unpack(&format!("oci-archive:{}", oci.display()), work.path());
    (work, rootfs, stderr(&out))
}

const MULTISTAGE: &str = r#"ARG BASE
FROM ${BASE} AS base
RUN echo base > /base.txt

FROM base AS builder
RUN echo built > /artifact && mkdir -p /out/sub && echo x > /out/sub/x

FROM ${BASE} AS unused
RUN echo "the unused stage ran" && exit 1

FROM ${BASE} AS other
RUN echo other > /other.txt

FROM ${BASE}
ARG BASE
COPY --from=builder /artifact /artifact
COPY --from=builder /out/ /copied/
COPY --from=other /other.txt /
COPY --from=${BASE} /bin/busybox /from-image/busybox
COPY --from=1 /base.txt /by-index.txt
"#;

#[test]
fn multistage_builds_only_what_the_target_needs() {
    let store = scratch_dir(Who::User);
    let (_w, rootfs, err) =
        build_and_unpack(Who::User, store.path(), &[("Dockerfile", MULTISTAGE)], &[]);
    assert!(
        !err.contains("the unused stage ran"),
        "an unneeded stage ran: {err}"
    );
    let read =
        |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("artifact"), "built\n");
    assert_eq!(read("copied/sub/x"), "x\n");
    assert_eq!(read("other.txt"), "other\n");
    assert_eq!(read("by-index.txt"), "base\n");
    assert!(rootfs.join("from-image/busybox").is_file());
    assert!(
        !rootfs.join("base.txt").exists(),
        "the final stage is FROM BASE, not FROM base"
    );

    let (_w, rootfs, err) = build_and_unpack(
        Who::User,
        store.path(),
        &[("Dockerfile", MULTISTAGE)],
        &["--target", "builder"],
    );
    assert!(rootfs.join("artifact").is_file() && rootfs.join("base.txt").is_file());
    assert!(!rootfs.join("other.txt").exists());
    assert!(
        !err.contains("[other"),
        "the target does not need stage other: {err}"
    );
}

/// Runs a build that must fail; asserts each needle is in its error output.
fn fails_with(dockerfile: &str, extra: &[&str], needles: &[&str]) {
    let store = scratch_dir(Who::Root);
    let ctx = context(&[("Dockerfile", dockerfile)]);
    let mut args = vec!["build"];
    args.extend_from_slice(extra);
    args.push(ctx.path().to_str().unwrap());
    let out = shmocker(Who::Root, store.path(), &args);
    assert!(!out.status.success(), "the build should fail");
    let err = stderr(&out);
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
}

#[test]
fn unknown_target_and_stage_cycles_are_clear_errors() {
    // The message lists the stages there are.
    fails_with(
        MULTISTAGE,
        &["--target", "nope"],
        &["target stage \"nope\" could not be found", "builder"],
    );
    let cyclic = "FROM scratch AS a\nCOPY --from=b /x /x\nFROM scratch AS b\nCOPY --from=a /y /y\n";
    fails_with(
        cyclic,
        &["--target", "b"],
        &["circular dependency", "Dockerfile:"],
    );
}

#[test]
fn unchanged_rebuild_is_cached_and_gives_the_same_digest() {
    let dockerfile = r#"ARG BASE
FROM ${BASE}
RUN echo one > /one
COPY data /data
ARG FLAVOUR=plain
RUN --mount=type=cache,target=/cache echo run >> /cache/log && wc -l < /cache/log > /cache-count && echo $FLAVOUR > /flavour
WORKDIR /w
"#;
    let files = [("Dockerfile", dockerfile), ("data", "payload\n")];
    let ctx = context(&files);
    let store = scratch_dir(Who::User);
    let base = format!("BASE={}", env().busybox());
    let ctx_path = ctx.path().to_str().unwrap();
    let tag = unique_ref("cache");
    let first = shmocker_ok(
        Who::User,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "-t",
            &tag,
            "--push",
            ctx_path,
        ],
    );
    let second = shmocker_ok(
        Who::User,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "-t",
            &tag,
            "--push",
            ctx_path,
        ],
    );
    assert_eq!(
        digest(&first),
        digest(&second),
        "a rebuild from cache gives the same digest"
    );
    let err = stderr(&second);
    assert_eq!(
        err.matches(" CACHED").count(),
        4,
        "every filesystem step is CACHED: {err}"
    );
    assert_eq!(
        err.matches(" DONE ").count(),
        1,
        "only the config-only ARG step is DONE: {err}"
    );

    // A changed ARG: the steps before its declaration stay cached, the RUN after it re-runs,
    // and the cache mount keeps what the first run wrote.
    let third = shmocker_ok(
        Who::User,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "--build-arg",
            "FLAVOUR=spicy",
            "-t",
            &tag,
            "--push",
            ctx_path,
        ],
    );
    let err = stderr(&third);
    assert_eq!(
        err.matches(" CACHED").count(),
        2,
        "RUN one and COPY cached: {err}"
    );
    assert_ne!(digest(&third), digest(&first));
    let work = scratch_dir(Who::Root);
    let rootfs = unpack(&format!("docker://{tag}"), work.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("flavour")).unwrap(),
        "spicy\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("cache-count"))
            .unwrap()
            .trim(),
        "2",
        "the cache mount kept the first run's line"
    );
    assert!(
        !rootfs.join("cache").join("log").exists(),
        "cache mount contents stay out of the layer"
    );

    // --no-cache runs everything again.
    let fourth = shmocker_ok(
        Who::User,
        store.path(),
        &["build", "--no-cache", "--build-arg", &base, ctx_path],
    );
    assert_eq!(stderr(&fourth).matches(" CACHED").count(), 0);
}

#[test]
fn source_date_epoch_makes_builds_reproducible() {
    let dockerfile =
        "ARG BASE\nFROM ${BASE}\nRUN echo hi > /hi && mkdir /d && touch /d/f\nCOPY f /f\nENV X=1\n";
    let ctx = context(&[("Dockerfile", dockerfile), ("f", "file\n")]);
    let base = format!("BASE={}", env().busybox());
    let mut digests = Vec::new();
    for _ in 0..2 {
        let store = scratch_dir(Who::User);
        let out = shmocker_ok(
            Who::User,
            store.path(),
            &[
                "build",
                "--build-arg",
                &base,
                "--build-arg",
                "SOURCE_DATE_EPOCH=1700000000",
                ctx.path().to_str().unwrap(),
            ],
        );
        digests.push(digest(&out));
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert_eq!(
        digests[0], digests[1],
        "two clean builds with SOURCE_DATE_EPOCH give one digest"
    );
}

#[test]
fn heredocs_in_run_and_copy() {
    let dockerfile = "ARG BASE\nFROM ${BASE}\nENV NAME=world\nRUN <<EOF\necho one > /h1\necho two >> /h1\nEOF\nRUN cat > /h2 <<EOT\nhello $NAME\nEOT\nCOPY <<EOF /etc/greeting\nhi ${NAME}\nEOF\nCOPY <<'RAW' /raw\nkeep $NAME\nRAW\n";
    let store = scratch_dir(Who::User);
    let (_w, rootfs, _) =
        build_and_unpack(Who::User, store.path(), &[("Dockerfile", dockerfile)], &[]);
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
    assert_eq!(read("h1"), "one\ntwo\n");
    assert_eq!(read("h2"), "hello world\n");
    assert_eq!(read("etc/greeting"), "hi world\n");
    assert_eq!(read("raw"), "keep $NAME\n");
}

#[test]
fn run_mounts_secrets_and_tmpfs_leave_nothing_behind() {
    let secret_value = format!("s3cr3t-{}", common::unique());
    let secret_dir = scratch_dir(Who::User);
    let secret_file = secret_dir.path().join("token");
    std::fs::write(&secret_file, &secret_value).unwrap();
    Command::new("chmod")
        .arg("a+r")
        .arg(&secret_file)
        .status()
        .unwrap();
    let dockerfile = r#"ARG BASE
FROM ${BASE}
RUN --mount=type=secret,id=token,required=true test "$(cat /run/secrets/token)" != "" && wc -c < /run/secrets/token > /secret-length
RUN --mount=type=secret,id=envsecret,target=/etc/s2 wc -c < /etc/s2 > /env-secret-length
RUN --mount=type=tmpfs,target=/scratch echo junk > /scratch/junk && ls /scratch > /tmpfs-listing
RUN --mount=type=bind,source=data,target=/mnt/data cat /mnt/data/x > /from-bind
"#;
    let env_secret = format!("env-{}", common::unique());
    let ctx = context(&[("Dockerfile", dockerfile), ("data/x", "bound\n")]);
    let out_dir = scratch_dir(Who::User);
    let oci = out_dir.path().join("img.tar");
    let base = format!("BASE={}", env().busybox());
    let store = scratch_dir(Who::User);
    let user = env().user();
    let out = Command::new("runuser")
        .args([
            "-u",
            user,
            "--",
            "env",
            &format!("HOME=/home/{user}"),
            &format!("MY_SECRET={env_secret}"),
        ])
        .arg(common::binary())
        .arg("--root")
        .arg(store.path())
        .args(["build", "--build-arg", &base, "--secret"])
        .arg(format!("id=token,src={}", secret_file.display()))
        .args(["--secret", "id=envsecret,env=MY_SECRET", "--output"])
        .arg(format!("type=oci,dest={}", oci.display()))
        .arg(ctx.path())
        .current_dir("/")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let work = scratch_dir(Who::Root);
    let rootfs = unpack(&format!("oci-archive:{}", oci.display()), work.path());
    let read = |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap();
    assert_eq!(read("secret-length").trim(), secret_value.len().to_string());
    assert_eq!(
        read("env-secret-length").trim(),
        env_secret.len().to_string()
    );
    assert_eq!(read("tmpfs-listing"), "junk\n");
    assert_eq!(read("from-bind"), "bound\n");
    let t = tree(&rootfs);
    for gone in [
        "/run/secrets/token",
        "/etc/s2",
        "/scratch/junk",
        "/mnt/data/x",
        "/mnt/data",
        "/scratch",
    ] {
        assert!(!t.contains_key(gone), "{gone} leaked into the image");
    }
    // The secrets appear nowhere: not in any blob of the image, the store, or the output.
    let tar_bytes = std::fs::read(&oci).unwrap();
    let layout_blobs = work.path().join("layout/blobs/sha256");
    for value in [&secret_value, &env_secret] {
        assert!(!err.contains(value.as_str()), "secret in the build output");
        assert!(
            !contains(&tar_bytes, value.as_bytes()),
            "secret in the OCI archive"
        );
        for entry in std::fs::read_dir(&layout_blobs).unwrap() {
            let blob = std::fs::read(entry.unwrap().path()).unwrap();
            let text = gunzip_or_raw(&blob);
            assert!(
                !contains(&text, value.as_bytes()),
                "secret inside a layer or the config"
            );
        }
        let grep = Command::new("grep")
            .args(["-r", "-l", "-a", value.as_str()])
            .arg(store.path())
            .output()
            .unwrap();
        assert!(
            grep.stdout.is_empty(),
            "secret in the store: {}",
            String::from_utf8_lossy(&grep.stdout)
        );
    }

    // A required secret that was not given fails the build at its line.
    let out = shmocker(
        Who::User,
        store.path(),
        &["build", "--build-arg", &base, ctx.path().to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Dockerfile:3:1"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("secret \"token\" is required"),
        "{}",
        stderr(&out)
    );
}

/// A loopback HTTP server answering every request (up to 4) with `body`; returns its port.
fn serve_http(body: Vec<u8>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming().take(4) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    port
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn gunzip_or_raw(data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match flate2::read::GzDecoder::new(data).read_to_end(&mut out) {
        Ok(_) => out,
        Err(_) => data.to_vec(),
    }
}

#[test]
fn network_none_cannot_reach_the_host_but_host_can() {
    let port = serve_http(b"hello\n".to_vec());
    let dockerfile = format!(
        "ARG BASE\nFROM ${{BASE}}\nRUN wget -q -O /via-host http://127.0.0.1:{port}/\nRUN --network=none (wget -q -T 3 -O /via-none http://127.0.0.1:{port}/ && echo reached || echo unreachable) > /none-result && grep -c : /proc/net/dev > /interfaces\n"
    );
    let store = scratch_dir(Who::User);
    let (_w, rootfs, _) =
        build_and_unpack(Who::User, store.path(), &[("Dockerfile", &dockerfile)], &[]);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("via-host")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("none-result")).unwrap(),
        "unreachable\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("interfaces"))
            .unwrap()
            .trim(),
        "1",
        "only loopback"
    );
}

#[test]
fn copy_from_a_missing_stage_names_the_line() {
    let store = scratch_dir(Who::Root);
    let ctx = context(&[(
        "Dockerfile",
        "FROM scratch\nCOPY --from=127.0.0.1:9/nosuch/stage:1 /x /x\n",
    )]);
    let out = shmocker(
        Who::Root,
        store.path(),
        &["build", ctx.path().to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Dockerfile:2:1"), "{}", stderr(&out));
}

#[test]
fn add_unpacks_local_archives_and_fetches_urls_with_checksums() {
    // A local tar.gz and a file served over HTTP on loopback.
    let staging = scratch_dir(Who::Root);
    std::fs::create_dir_all(staging.path().join("pkg/inner")).unwrap();
    std::fs::write(
        staging.path().join("pkg/inner/file.txt"),
        "from the archive\n",
    )
    .unwrap();
    let ctx = context(&[("plain.txt", "plain\n")]);
    common::run_ok(
        Command::new("tar")
            .arg("-czf")
            .arg(ctx.path().join("bundle.tar.gz"))
            .arg("-C")
            .arg(staging.path())
            .arg("pkg"),
    );
    let served = b"served over http\n".to_vec();
    let port = serve_http(served.clone());
    use sha2::Digest;
    let sum = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&served)));
    let dockerfile = format!(
        "ARG BASE\nFROM ${{BASE}}\nADD bundle.tar.gz /opt/\nADD plain.txt /plain.txt\nADD --checksum={sum} http://127.0.0.1:{port}/files/served.txt /downloads/\n"
    );
    std::fs::write(ctx.path().join("Dockerfile"), &dockerfile).unwrap();
    common::run_ok(Command::new("chmod").arg("-R").arg("a+rX").arg(ctx.path()));
    let store = scratch_dir(Who::User);
    let (_work, rootfs, _) = build_dir_and_unpack(Who::User, store.path(), ctx.path(), &[]);
    let read =
        |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("opt/pkg/inner/file.txt"), "from the archive\n");
    assert!(
        !rootfs.join("opt/bundle.tar.gz").exists(),
        "the archive itself is not copied"
    );
    assert_eq!(read("plain.txt"), "plain\n");
    assert_eq!(read("downloads/served.txt"), "served over http\n");
    let t = tree(&rootfs);
    assert_eq!(
        t["/downloads/served.txt"].mode, 0o600,
        "remote files are 0600, as in Docker"
    );

    // A wrong checksum fails at the line and says both digests.
    let bad = dockerfile.replace(&sum, &format!("sha256:{}", "0".repeat(64)));
    std::fs::write(ctx.path().join("Dockerfile"), bad).unwrap();
    let base = format!("BASE={}", env().busybox());
    let out = shmocker(
        Who::User,
        store.path(),
        &["build", "--build-arg", &base, ctx.path().to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("Dockerfile:5:1") && err.contains("checksum mismatch") && err.contains(&sum),
        "{err}"
    );
}

#[test]
fn copy_flags_link_exclude_parents() {
    let dockerfile = "ARG BASE\nFROM ${BASE}\nRUN ln -s /etc /linked && mkdir -p /etc/myapp /app && ln -s /etc/myapp /app/config\nCOPY --link a.txt /linked/a.txt\nCOPY --exclude=*.log logs/ /logs/\nCOPY --parents src/deep/one.txt /p/\nCOPY --parents config/app.ini /app/\nCOPY --chmod=u+x,go-r a.txt /sym.txt\n";
    let store = scratch_dir(Who::User);
    let (_w, rootfs, _) = build_and_unpack(
        Who::User,
        store.path(),
        &[
            ("Dockerfile", dockerfile),
            ("a.txt", "a\n"),
            ("logs/keep.txt", "keep\n"),
            ("logs/drop.log", "drop\n"),
            ("src/deep/one.txt", "one\n"),
            ("config/app.ini", "ini\n"),
        ],
        &[],
    );
    let t = tree(&rootfs);
    // The image's absolute symlink /app/config leads to /etc/myapp, from the rootfs's `/`.
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/myapp/app.ini")).unwrap(),
        "ini\n"
    );
    assert!(!t.contains_key("/app/etc/myapp/app.ini"));
    // --link: the layer is made on its own, so /linked stays the symlink from the RUN below it
    // and the linked layer's /linked directory replaces it (as BuildKit's --link does).
    assert!(
        t.contains_key("/linked/a.txt"),
        "{:?}",
        t.keys()
            .filter(|k| k.starts_with("/linked"))
            .collect::<Vec<_>>()
    );
    assert!(t.contains_key("/logs/keep.txt"));
    assert!(!t.contains_key("/logs/drop.log"), "--exclude honoured");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("p/src/deep/one.txt")).unwrap(),
        "one\n"
    );
    assert_eq!(
        t["/sym.txt"].mode, 0o700,
        "symbolic --chmod applied to the file's 0644"
    );
}

#[test]
fn healthcheck_onbuild_and_docker_format() {
    let parent = "ARG BASE\nFROM ${BASE}\nSHELL [\"/bin/sh\", \"-ec\"]\nHEALTHCHECK --interval=30s --retries=2 CMD wget -q -O- http://localhost/ || exit 1\nONBUILD RUN echo triggered > /onbuild-ran\nSTOPSIGNAL SIGTERM\n";
    let ctx = context(&[("Dockerfile", parent)]);
    let store = scratch_dir(Who::Root);
    let tag = unique_ref("onbuild-parent");
    let base = format!("BASE={}", env().busybox());
    shmocker_ok(
        Who::Root,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "-t",
            &tag,
            "--push",
            "--format",
            "docker",
            ctx.path().to_str().unwrap(),
        ],
    );
    let manifest = common::remote_manifest(&tag);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    assert!(
        manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip")
    );
    let config = common::remote_config(&tag);
    assert_eq!(
        config["config"]["Healthcheck"]["Test"],
        serde_json::json!(["CMD-SHELL", "wget -q -O- http://localhost/ || exit 1"])
    );
    assert_eq!(
        config["config"]["Healthcheck"]["Interval"],
        30_000_000_000i64
    );
    assert_eq!(config["config"]["Healthcheck"]["Retries"], 2);
    assert_eq!(
        config["config"]["OnBuild"],
        serde_json::json!(["RUN echo triggered > /onbuild-ran"])
    );
    assert_eq!(config["config"]["StopSignal"], "SIGTERM");
    assert_eq!(
        config["config"]["Shell"],
        serde_json::json!(["/bin/sh", "-ec"])
    );

    // The child runs the trigger, and its own config no longer carries it.
    let child = context(&[(
        "Dockerfile",
        &format!("FROM {tag}\nRUN test -f /onbuild-ran\n"),
    )]);
    let out_dir = scratch_dir(Who::Root);
    let docker_tar = out_dir.path().join("docker.tar");
    let local = out_dir.path().join("rootfs");
    shmocker_ok(
        Who::Root,
        store.path(),
        &[
            "build",
            "-t",
            "example.test/child:1",
            "--output",
            &format!("type=docker,dest={}", docker_tar.display()),
            "--output",
            &format!("type=local,dest={}", local.display()),
            child.path().to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(local.join("onbuild-ran")).unwrap(),
        "triggered\n"
    );
    assert!(
        local.join("bin/busybox").is_file(),
        "type=local holds the whole filesystem"
    );
    let listing =
        String::from_utf8(common::run_ok(Command::new("tar").arg("-tf").arg(&docker_tar)).stdout)
            .unwrap();
    assert!(
        listing.lines().any(|l| l == "manifest.json") && listing.lines().any(|l| l == "index.json"),
        "{listing}"
    );
    let extract = scratch_dir(Who::Root);
    common::run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&docker_tar)
            .arg("-C")
            .arg(extract.path()),
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(extract.path().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        m[0]["RepoTags"],
        serde_json::json!(["example.test/child:1"])
    );
    let cfg_path = extract.path().join(m[0]["Config"].as_str().unwrap());
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(cfg_path).unwrap()).unwrap();
    assert!(
        cfg["config"]["OnBuild"].is_null(),
        "triggers do not pass to the child"
    );
    for layer in m[0]["Layers"].as_array().unwrap() {
        assert!(extract.path().join(layer.as_str().unwrap()).is_file());
    }
    // skopeo reads the same archive as an OCI layout.
    let work = scratch_dir(Who::Root);
    let rootfs = unpack(
        &format!("oci-archive:{}", docker_tar.display()),
        work.path(),
    );
    assert!(rootfs.join("onbuild-ran").is_file());
}

#[test]
fn cache_exported_to_a_registry_or_directory_is_reused_by_an_empty_store() {
    let dockerfile = "ARG BASE\nFROM ${BASE} AS build\nRUN echo built > /artifact\nFROM ${BASE}\nCOPY --from=build /artifact /artifact\nRUN echo $RANDOM > /random\n";
    let ctx = context(&[("Dockerfile", dockerfile)]);
    let ctx_path = ctx.path().to_str().unwrap();
    let base = format!("BASE={}", env().busybox());
    let cache_ref = unique_ref("buildcache");
    let local_dir = scratch_dir(Who::User);
    let local_cache = local_dir.path().join("cache");
    let first_store = scratch_dir(Who::User);
    let first = shmocker_ok(
        Who::User,
        first_store.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "--cache-to",
            &format!("type=registry,ref={cache_ref},mode=max"),
            "--cache-to",
            &format!("type=local,dest={}", local_cache.display()),
            ctx_path,
        ],
    );
    assert!(common::remote_exists(&cache_ref), "the cache was pushed");
    // mode=max (the registry) has every stage's steps; mode=min (the directory) only the final
    // stage's, so the build stage's RUN runs again there.
    for (from, cached) in [
        (format!("type=registry,ref={cache_ref}"), 3),
        (format!("type=local,src={}", local_cache.display()), 2),
    ] {
        let empty_store = scratch_dir(Who::User);
        let again = shmocker_ok(
            Who::User,
            empty_store.path(),
            &[
                "build",
                "--build-arg",
                &base,
                "--cache-from",
                &from,
                ctx_path,
            ],
        );
        assert_eq!(digest(&again), digest(&first), "same digest from {from}");
        let err = stderr(&again);
        assert_eq!(
            err.matches(" CACHED").count(),
            cached,
            "cached steps with {from}: {err}"
        );
    }
    // An unreadable cache only warns.
    let empty_store = scratch_dir(Who::User);
    let out = shmocker_ok(
        Who::User,
        empty_store.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "--cache-from",
            &format!("type=registry,ref={}/no/cache:here", env().registry()),
            ctx_path,
        ],
    );
    assert!(
        stderr(&out).contains("warning: --cache-from"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn no_cache_filter_reruns_only_the_named_stage() {
    let store = scratch_dir(Who::User);
    let ctx = context(&[("Dockerfile", MULTISTAGE)]);
    let base = format!("BASE={}", env().busybox());
    let args = [
        "build",
        "--build-arg",
        &base,
        "--target",
        "builder",
        ctx.path().to_str().unwrap(),
    ];
    shmocker_ok(Who::User, store.path(), &args);
    let mut filtered = args.to_vec();
    filtered.insert(1, "--no-cache-filter=builder");
    let err = stderr(&shmocker_ok(Who::User, store.path(), &filtered));
    let lines: Vec<&str> = err.lines().collect();
    let after = |needle: &str| {
        let i = lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle}: {err}"));
        lines[i + 1]
    };
    assert!(
        after("RUN echo base > /base.txt").ends_with("CACHED"),
        "{err}"
    );
    assert!(
        after("RUN echo built > /artifact").contains("DONE"),
        "{err}"
    );
}

#[test]
fn ssh_mount_forwards_the_agent_socket() {
    let user = env().user();
    let agent_dir = scratch_dir(Who::User);
    let sock = agent_dir.path().join("agent.sock");
    let agent = Command::new("runuser")
        .args(["-u", user, "--", "ssh-agent", "-D", "-a"])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent (openssh-client) must be installed");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            // runuser passes SIGTERM on to the agent; SIGKILL would leave the agent behind.
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = self.0.wait();
        }
    }
    let _agent = Kill(agent);
    for _ in 0..50 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let dockerfile = "ARG BASE\nFROM ${BASE}\nRUN --mount=type=ssh test -S \"$SSH_AUTH_SOCK\" && echo \"$SSH_AUTH_SOCK\" > /ssh-ok\n";
    let store = scratch_dir(Who::User);
    let ssh = format!("default={}", sock.display());
    let (_w, rootfs, _) = build_and_unpack(
        Who::User,
        store.path(),
        &[("Dockerfile", dockerfile)],
        &["--ssh", &ssh],
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("ssh-ok")).unwrap(),
        "/run/buildkit/ssh_agent.0\n"
    );
    assert!(
        !rootfs.join("run/buildkit").exists(),
        "the socket's mount point left no trace"
    );
}

#[test]
fn run_steps_are_hardened_unless_insecure_is_allowed() {
    // `unshare -U -r` makes a user namespace: no capability is needed for that, only the
    // seccomp filter stops it (as Docker's profile does); insecure steps may.
    let dockerfile = "ARG BASE\nFROM ${BASE}\nRUN grep -E '^(CapBnd|CapEff|NoNewPrivs|Seccomp):' /proc/self/status > /status && wc -c < /proc/interrupts > /kcore-size && (echo 1 > /proc/sys/kernel/domainname && echo writable || echo read-only) > /proc-sys && (unshare -U -r true 2>/unshare-err && echo allowed || echo denied) > /unshare\nRUN --security=insecure grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status > /insecure-status && (unshare -U -r true && echo allowed || echo denied) > /insecure-unshare\n";
    let store = scratch_dir(Who::User);
    let (_w, rootfs, _) = build_and_unpack(
        Who::User,
        store.path(),
        &[("Dockerfile", dockerfile)],
        &["--allow", "security.insecure"],
    );
    let status = std::fs::read_to_string(rootfs.join("status")).unwrap();
    // Docker's default capability set.
    assert!(status.contains("CapBnd:\t00000000a80425fb"), "{status}");
    assert!(status.contains("CapEff:\t00000000a80425fb"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // Mode 2: a seccomp filter.
    assert!(status.contains("Seccomp:\t2"), "{status}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("unshare")).unwrap(),
        "denied\n"
    );
    let why = std::fs::read_to_string(rootfs.join("unshare-err")).unwrap();
    assert!(why.contains("Operation not permitted"), "{why}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("kcore-size"))
            .unwrap()
            .trim(),
        "0",
        "/proc/interrupts masked"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("proc-sys")).unwrap(),
        "read-only\n"
    );
    let insecure = std::fs::read_to_string(rootfs.join("insecure-status")).unwrap();
    assert!(
        !insecure.contains("a80425fb")
            && insecure.contains("NoNewPrivs:\t0")
            && insecure.contains("Seccomp:\t0"),
        "{insecure}"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("insecure-unshare")).unwrap(),
        "allowed\n"
    );

    // Without --allow, --security=insecure is refused at its line.
    let ctx = context(&[("Dockerfile", dockerfile)]);
    let base = format!("BASE={}", env().busybox());
    let out = shmocker(
        Who::User,
        store.path(),
        &["build", "--build-arg", &base, ctx.path().to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Dockerfile:4:1")
            && stderr(&out).contains("--allow security.insecure"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn build_network_none_applies_to_every_run_unless_a_step_overrides_it() {
    let port = serve_http(b"ok\n".to_vec());
    let dockerfile = format!(
        "ARG BASE\nFROM ${{BASE}}\nRUN (wget -q -T 3 -O /a http://127.0.0.1:{port}/ && echo reached || echo unreachable) > /default-step\nRUN --network=host wget -q -O /b http://127.0.0.1:{port}/\n"
    );
    let store = scratch_dir(Who::User);
    let (_w, rootfs, _) = build_and_unpack(
        Who::User,
        store.path(),
        &[("Dockerfile", &dockerfile)],
        &["--network", "none"],
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("default-step")).unwrap(),
        "unreachable\n"
    );
    assert_eq!(std::fs::read_to_string(rootfs.join("b")).unwrap(), "ok\n");
}

#[test]
fn add_clones_git_sources_at_a_ref_and_subdirectory() {
    // A repository served over git's dumb HTTP protocol from loopback.
    let served = scratch_dir(Who::Root);
    let work = scratch_dir(Who::Root);
    let src = work.path().join("src");
    let git = |args: &[&str], dir: &std::path::Path| {
        common::run_ok(
            Command::new("git")
                .args([
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@example.test",
                    "-c",
                    "init.defaultBranch=main",
                ])
                .args(args)
                .current_dir(dir),
        )
    };
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("README"), "tagged\n").unwrap();
    std::fs::write(src.join("sub/inner.txt"), "inner\n").unwrap();
    git(&["init", "-q", "."], &src);
    git(&["add", "."], &src);
    git(&["commit", "-q", "-m", "one"], &src);
    git(&["tag", "v1"], &src);
    std::fs::write(src.join("README"), "later\n").unwrap();
    git(&["commit", "-q", "-am", "two"], &src);
    let bare = served.path().join("repo.git");
    git(
        &[
            "clone",
            "-q",
            "--bare",
            src.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
        work.path(),
    );
    git(&["update-server-info"], &bare);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
            "--directory",
        ])
        .arg(served.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 serves the repository");
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let url = format!("http://127.0.0.1:{port}/repo.git");
    let dockerfile = format!(
        "ARG BASE\nFROM ${{BASE}}\nADD {url}#v1 /tagged/\nADD {url}#v1:sub /only-sub/\nADD --keep-git-dir {url} /head/\n"
    );
    let store = scratch_dir(Who::User);
    let (_w, rootfs, _) =
        build_and_unpack(Who::User, store.path(), &[("Dockerfile", &dockerfile)], &[]);
    let _ = server.kill();
    let _ = server.wait();
    let read =
        |p: &str| std::fs::read_to_string(rootfs.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("tagged/README"), "tagged\n");
    assert!(
        !rootfs.join("tagged/.git").exists(),
        ".git left out unless --keep-git-dir"
    );
    assert_eq!(read("only-sub/inner.txt"), "inner\n");
    assert!(!rootfs.join("only-sub/README").exists());
    assert_eq!(read("head/README"), "later\n");
    assert!(rootfs.join("head/.git").is_dir(), "--keep-git-dir keeps it");
}

#[test]
fn add_unpacks_bzip2_xz_and_zstd_archives() {
    let staging = scratch_dir(Who::Root);
    std::fs::create_dir_all(staging.path().join("pkg/inner")).unwrap();
    std::fs::write(staging.path().join("pkg/inner/file.txt"), "packed\n").unwrap();
    let ctx = context(&[]);
    // GNU tar runs bzip2, xz and zstd itself: archives as the usual tools make them.
    for (flag, name) in [
        ("--bzip2", "a.tar.bz2"),
        ("--xz", "b.tar.xz"),
        ("--zstd", "c.tar.zst"),
    ] {
        common::run_ok(
            Command::new("tar")
                .arg("-cf")
                .arg(ctx.path().join(name))
                .arg(flag)
                .arg("-C")
                .arg(staging.path())
                .arg("pkg"),
        );
    }
    // A compressed file that is no tar is copied as it is.
    common::run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("echo not a tar | zstd -q -o notes.txt.zst")
            .current_dir(ctx.path()),
    );
    let dockerfile = "ARG BASE\nFROM ${BASE}\nADD a.tar.bz2 /bz2/\nADD b.tar.xz /xz/\nADD c.tar.zst /zst/\nADD notes.txt.zst /notes/\n";
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
    common::run_ok(Command::new("chmod").arg("-R").arg("a+rX").arg(ctx.path()));
    let store = scratch_dir(Who::User);
    let (_work, rootfs, _) = build_dir_and_unpack(Who::User, store.path(), ctx.path(), &[]);
    for dir in ["bz2", "xz", "zst"] {
        let p = rootfs.join(dir).join("pkg/inner/file.txt");
        assert_eq!(
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            "packed\n"
        );
        assert_eq!(
            std::fs::read_dir(rootfs.join(dir)).unwrap().count(),
            1,
            "{dir}: only the archive's contents, not the archive"
        );
    }
    let notes = std::fs::read(rootfs.join("notes/notes.txt.zst")).unwrap();
    assert_eq!(&notes[..4], &[0x28, 0xb5, 0x2f, 0xfd], "copied, still zstd");
}

/// Layer media types of a pushed image, as skopeo reads its manifest.
fn layer_media_types(reference: &str) -> Vec<String> {
    common::remote_manifest(reference)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap().to_string())
        .collect()
}

/// As `common::unpack`, with skopeo decompressing zstd layers (into gzip) on the way, since
/// umoci 0.4 reads no zstd.
fn unpack_via_gzip(source: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let layout = dir.join("layout");
    common::run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--dest-compress",
        "--dest-compress-format",
        "gzip",
        source,
        &format!("oci:{}:img", layout.display()),
    ]));
    let bundle = dir.join("bundle");
    common::run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:img", layout.display()))
            .arg(&bundle),
    );
    bundle.join("rootfs")
}

const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

#[test]
fn zstd_layers_are_pushed_unpacked_and_used_as_a_base() {
    let dockerfile =
        "ARG BASE\nFROM ${BASE}\nRUN mkdir /z && seq 1 5000 > /z/numbers\nCOPY f /z/f\n";
    let ctx = context(&[("Dockerfile", dockerfile), ("f", "from the context\n")]);
    let base = format!("BASE={}", env().busybox());
    let base_layers = layer_media_types(env().busybox()).len();
    let epoch = "SOURCE_DATE_EPOCH=1700000000";
    let ctx_path = ctx.path().to_str().unwrap();

    // Built with gzip first, then with zstd in the same store: the cached gzip layers are
    // recompressed, and the image is the one a clean zstd build makes.
    let warm = scratch_dir(Who::User);
    let gz_ref = unique_ref("zstd-gz");
    shmocker_ok(
        Who::User,
        warm.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "--build-arg",
            epoch,
            "-t",
            &gz_ref,
            "--push",
            ctx_path,
        ],
    );
    assert_eq!(layer_media_types(&gz_ref), vec![GZIP; base_layers + 2]);
    let z_ref = unique_ref("zstd");
    let warm_out = shmocker_ok(
        Who::User,
        warm.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "--build-arg",
            epoch,
            "-t",
            &z_ref,
            "--compression",
            "zstd",
            "--push",
            ctx_path,
        ],
    );
    let clean = scratch_dir(Who::User);
    let z2_ref = unique_ref("zstd-clean");
    let clean_out = shmocker_ok(
        Who::User,
        clean.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "--build-arg",
            epoch,
            "-t",
            &z2_ref,
            "--output",
            "type=registry,compression=zstd",
            ctx_path,
        ],
    );
    assert_eq!(
        digest(&warm_out),
        digest(&clean_out),
        "recompressed cached layers give the image a clean zstd build gives"
    );
    let mut want = vec![GZIP; base_layers];
    want.extend([ZSTD, ZSTD]);
    assert_eq!(
        layer_media_types(&z_ref),
        want,
        "base layers are kept as they are"
    );

    // zstd's own tool checks each zstd blob as pushed, and skopeo decompresses them (into gzip,
    // as umoci 0.4 reads no zstd) for umoci to unpack.
    let work = scratch_dir(Who::Root);
    let raw = work.path().join("raw");
    common::run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{z_ref}"),
        &format!("dir:{}", raw.display()),
    ]));
    let manifest = common::remote_manifest(&z_ref);
    for l in manifest["layers"].as_array().unwrap() {
        if l["mediaType"] == ZSTD {
            let hex = l["digest"].as_str().unwrap().trim_start_matches("sha256:");
            common::run_ok(Command::new("zstd").arg("-qt").arg(raw.join(hex)));
        }
    }
    let rootfs = unpack_via_gzip(&format!("docker://{z_ref}"), work.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("z/f")).unwrap(),
        "from the context\n"
    );
    assert!(
        std::fs::read_to_string(rootfs.join("z/numbers"))
            .unwrap()
            .ends_with("\n5000\n")
    );

    // force-compression and a level: every layer zstd, the base image's too.
    let all_ref = unique_ref("zstd-all");
    shmocker_ok(
        Who::User,
        clean.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "-t",
            &all_ref,
            "--output",
            "type=registry,compression=zstd,compression-level=19,force-compression=true",
            ctx_path,
        ],
    );
    assert_eq!(layer_media_types(&all_ref), vec![ZSTD; base_layers + 2]);

    // The zstd image as a base: its layers are pulled and unpacked by shmocker.
    let next = context(&[(
        "Dockerfile",
        "ARG BASE\nFROM ${BASE}\nRUN cat /z/f /z/numbers | wc -l > /lines\n",
    )]);
    let fresh = scratch_dir(Who::User);
    let out_dir = scratch_dir(Who::User);
    let oci = out_dir.path().join("img.tar");
    shmocker_ok(
        Who::User,
        fresh.path(),
        &[
            "build",
            "--build-arg",
            &format!("BASE={all_ref}"),
            "--output",
            &format!("type=oci,dest={}", oci.display()),
            next.path().to_str().unwrap(),
        ],
    );
    let work = scratch_dir(Who::Root);
    let rootfs = unpack_via_gzip(&format!("oci-archive:{}", oci.display()), work.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("lines"))
            .unwrap()
            .trim(),
        "5001"
    );
}

#[test]
fn zstd_with_docker_media_types_or_bad_levels_is_refused() {
    let ctx = context(&[("Dockerfile", "FROM scratch\n")]);
    let store = scratch_dir(Who::User);
    for (args, needle) in [
        (
            &["--format", "docker", "--compression", "zstd"][..],
            "Docker's image format has no zstd",
        ),
        (
            &[
                "--output",
                "type=registry,compression=zstd,compression-level=30",
            ][..],
            "use 1-22",
        ),
        (&["--compression", "lz4"][..], "use gzip or zstd"),
        (
            &[
                "--compression",
                "gzip",
                "--output",
                "type=oci,dest=/tmp/x.tar,compression=zstd",
            ][..],
            "give the same compression everywhere",
        ),
    ] {
        let mut all = vec!["build"];
        all.extend_from_slice(args);
        all.push(ctx.path().to_str().unwrap());
        let out = shmocker(Who::User, store.path(), &all);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = stderr(&out);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_step_printing_megabytes_is_clipped_in_the_log_as_buildkit_does() {
    // 40,000 lines of 100 bytes: about 4 MB of output, twice BuildKit's 2 MiB limit.
    let dockerfile = format!(
        "FROM {}\nRUN i=0; while [ $i -lt 40000 ]; do printf '%099d\\n' $i; i=$((i+1)); done; echo finished > /done\n",
        env().busybox()
    );
    let ctx = context(&[("Dockerfile", &dockerfile)]);
    let run = |limit: Option<&str>| {
        let store = scratch_dir(Who::Root);
        let mut cmd = std::process::Command::new(common::binary());
        cmd.arg("--root")
            .arg(store.path())
            .args(["build", "--progress=plain"])
            .arg(ctx.path())
            .env_remove("SHMOCKER_ROOT")
            .env_remove("BUILDKIT_STEP_LOG_MAX_SIZE")
            .env_remove("SHMOCKER_STEP_LOG_MAX_SIZE");
        if let Some(l) = limit {
            cmd.env("SHMOCKER_STEP_LOG_MAX_SIZE", l);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    let clipped = run(None);
    let output_lines = |log: &str| {
        log.lines()
            .filter(|l| {
                l.starts_with("#2 ") && l.ends_with(|c: char| c.is_ascii_digit()) && l.len() > 100
            })
            .count()
    };
    assert!(
        clipped.contains("#2 ") && clipped.contains("[output clipped, log limit 2MiB reached]"),
        "{}",
        &clipped[clipped.len().saturating_sub(2000)..]
    );
    assert!(clipped.contains("#2 DONE"), "the result line still comes");
    let shown = output_lines(&clipped);
    assert!(shown > 15_000 && shown < 22_000, "{shown} lines shown");
    assert!(
        clipped.len() < 3 * 1024 * 1024,
        "{} bytes of log",
        clipped.len()
    );

    // -1 lifts the limit: every line is there.
    let full = run(Some("-1"));
    assert!(!full.contains("output clipped"));
    assert_eq!(output_lines(&full), 40_000);
}

/// The snapshots (unpacked layers) a store holds.
fn snapshot_count(store: &std::path::Path) -> usize {
    std::fs::read_dir(store.join("snapshots"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name() != "empty")
        .count()
}

/// A context for the direct COPY tests: directories, modes, a symlink, an empty directory and
/// a file of some megabytes.
fn direct_copy_context(dockerfile: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let big: String = (0..200_000).map(|i| format!("{i:09}\n")).collect();
    let ctx = context(&[
        ("Dockerfile", dockerfile),
        ("tree/a.txt", "a\n"),
        ("tree/sub/b.sh", "#!/bin/sh\necho b\n"),
        ("tree/sub/deeper/big.txt", &big),
        ("src2/other.txt", "other\n"),
        ("conf/conf.d/site.conf", "site\n"),
    ]);
    let t = ctx.path().join("tree");
    std::fs::set_permissions(t.join("sub/b.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(t.join("sub"), std::fs::Permissions::from_mode(0o775)).unwrap();
    std::os::unix::fs::symlink("sub/b.sh", t.join("link")).unwrap();
    std::fs::create_dir(t.join("empty")).unwrap();
    run_cmd(Command::new("chmod").args(["-R", "a+r"]).arg(ctx.path()));
    // Times before SOURCE_DATE_EPOCH, so that they reach the layer unclamped and are compared.
    run_cmd(Command::new("find").arg(ctx.path()).args([
        "-exec",
        "touch",
        "-h",
        "-d",
        "2001-02-03 04:05:06",
        "{}",
        "+",
    ]));
    ctx
}

fn run_cmd(cmd: &mut Command) {
    assert!(cmd.status().unwrap().success(), "{cmd:?}");
}

/// Builds `ctx` as `who` in a fresh store with SOURCE_DATE_EPOCH, with the direct COPY on or
/// off; returns the image digest and the store's snapshot count.
fn build_direct_or_not(who: Who, ctx: &std::path::Path, direct: bool) -> (String, usize) {
    let store = scratch_dir(who);
    let base = format!("BASE={}", env().busybox());
    let out = shmocker_env(
        who,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "--build-arg",
            "SOURCE_DATE_EPOCH=1700000000",
            ctx.to_str().unwrap(),
        ],
        &[("SHMOCKER_DIRECT_COPY", if direct { "1" } else { "0" })],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    (digest(&out), snapshot_count(store.path()))
}

#[test]
fn a_last_copy_is_written_straight_from_the_context_and_gives_the_same_image() {
    // As the test user: the COPY is the target stage's last step that touches files.
    same_image_either_way(
        Who::User,
        "ARG BASE\nFROM ${BASE}\nRUN echo hi > /hi\nCOPY --chown=1000:1000 tree/ src2/ /data/sub/\nENV X=1\nCMD [\"sh\"]\n",
        "into a new directory",
    );
    // As root, COPY --link into a directory the image has: --link needs nothing below.
    same_image_either_way(
        Who::Root,
        "ARG BASE\nFROM ${BASE}\nCOPY --link --chmod=0640 tree/ /etc/linked/\nLABEL x=y\n",
        "COPY --link",
    );
    // Into directories the image has, with their own owners, modes and old mtimes (which
    // SOURCE_DATE_EPOCH leaves alone): as overlayfs copies them up, the deepest one with a new
    // mtime. As the test user with subordinate IDs.
    same_image_either_way(
        Who::User,
        "ARG BASE\nFROM ${BASE}\nRUN mkdir -p /opt/a/b && chown 7:8 /opt/a && chmod 0751 /opt/a && touch -t 200101010000 /opt/a/b /opt/a /opt\nWORKDIR /opt/a/b\nCOPY tree/ ./\nRUN touch -t 200101010000 /opt/a/b\nCOPY tree/ src2/ ./\n",
        "into the image's directories",
    );
    // Into an existing directory where only a directory it has gets new entries: its own
    // mtime (2001) stays, as with overlayfs's copy-up.
    same_image_either_way(
        Who::Root,
        "ARG BASE\nFROM ${BASE}\nRUN mkdir -p /etc/nginx/conf.d && touch -t 200101010000 /etc/nginx/conf.d /etc/nginx\nCOPY conf/ /etc/nginx/\n",
        "a directory the image has",
    );
}

/// Builds `dockerfile` with the direct COPY and without: the same image, and one snapshot less
/// with it (the direct COPY's files were never copied).
fn same_image_either_way(who: Who, dockerfile: &str, what: &str) {
    let ctx = direct_copy_context(dockerfile);
    let (direct, direct_snapshots) = build_direct_or_not(who, ctx.path(), true);
    let (sandboxed, sandboxed_snapshots) = build_direct_or_not(who, ctx.path(), false);
    assert_eq!(
        direct, sandboxed,
        "{what}: the layer written from the context is the one the sandbox's copy gives"
    );
    assert_eq!(
        direct_snapshots + 1,
        sandboxed_snapshots,
        "{what}: the direct COPY left no snapshot"
    );
}

#[test]
fn a_step_after_a_cached_direct_copy_sees_its_files() {
    // The first build writes the COPY's layer without a snapshot; the second has a RUN after
    // the (cached) COPY, which needs the files: they are unpacked from the layer.
    let first = "ARG BASE\nFROM ${BASE}\nCOPY tree/ /data/\n";
    let ctx = direct_copy_context(first);
    let store = scratch_dir(Who::User);
    let base = format!("BASE={}", env().busybox());
    shmocker_ok(
        Who::User,
        store.path(),
        &["build", "--build-arg", &base, ctx.path().to_str().unwrap()],
    );
    let before = snapshot_count(store.path());
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("{first}RUN wc -c < /data/sub/deeper/big.txt > /size && /data/link > /ran\n"),
    )
    .unwrap();
    let (_w, rootfs, err) = build_dir_and_unpack(Who::User, store.path(), ctx.path(), &[]);
    assert!(
        err.contains("CACHED"),
        "the COPY came from the cache:\n{err}"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("size")).unwrap().trim(),
        "2000000"
    );
    assert_eq!(std::fs::read_to_string(rootfs.join("ran")).unwrap(), "b\n");
    assert_eq!(
        snapshot_count(store.path()),
        before + 2,
        "the COPY's snapshot was unpacked for the RUN, which made one of its own"
    );
}

#[test]
fn a_cached_build_unpacks_only_the_layers_a_running_step_reads() {
    // Snapshots removed (as in a fresh runner with the cache imported): a fully cached build
    // unpacks the base image only, and steps that run unpack what they read: the COPY --from
    // and the RUN's mount the build stage, the RUN its own stage.
    let dockerfile = |out: &str| {
        format!(
            "ARG BASE\nFROM ${{BASE}} AS build\nRUN mkdir /out && echo built > /out/x\n\nFROM ${{BASE}}\nCOPY --from=build /out /{out}-copied\nRUN --mount=type=bind,from=build,source=/out,target=/m cat /m/x /{out}-copied/x > /{out}\n"
        )
    };
    let ctx = context(&[("Dockerfile", &dockerfile("seen"))]);
    let store = scratch_dir(Who::User);
    let base = format!("BASE={}", env().busybox());
    let build = || {
        shmocker_ok(
            Who::User,
            store.path(),
            &["build", "--build-arg", &base, ctx.path().to_str().unwrap()],
        )
    };
    let clear_snapshots = || {
        for e in std::fs::read_dir(store.path().join("snapshots")).unwrap() {
            let e = e.unwrap();
            if e.file_name() != "empty" {
                run_cmd(Command::new("rm").arg("-rf").arg(e.path()));
            }
        }
    };
    build();
    clear_snapshots();
    let out = build();
    assert!(
        stderr(&out).matches("CACHED").count() >= 3,
        "{}",
        stderr(&out)
    );
    assert_eq!(
        snapshot_count(store.path()),
        1,
        "a fully cached build unpacked only the base image's layer"
    );
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile("seen2")).unwrap();
    let (_w, rootfs, _) = build_dir_and_unpack(Who::User, store.path(), ctx.path(), &[]);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("seen2")).unwrap(),
        "built\nbuilt\n"
    );
    assert_eq!(
        snapshot_count(store.path()),
        4,
        "the COPY --from and the RUN that ran unpacked the build stage's layer and made their own"
    );
}

#[test]
fn an_image_can_have_the_same_layer_twice() {
    // The second RUN makes the very layer the first made (the same directory, the same
    // metadata): one snapshot, twice in the stack, which overlayfs refuses as a lower
    // directory given twice (ELOOP) unless the lower copy is left out.
    let dockerfile = "ARG BASE\nFROM ${BASE}\nRUN mkdir /x && touch -t 200101010000 /x\nRUN touch -t 200101010000 /x\nRUN ls -ld /x > /seen\n";
    let store = scratch_dir(Who::User);
    let (work, rootfs, _) =
        build_and_unpack(Who::User, store.path(), &[("Dockerfile", dockerfile)], &[]);
    let config = Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("oci:{}:img", work.path().join("layout").display()))
        .output()
        .expect("skopeo");
    assert!(config.status.success(), "{}", stderr(&config));
    let config: serde_json::Value = serde_json::from_slice(&config.stdout).unwrap();
    let ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(ids[1], ids[2], "the two RUNs made the same layer");
    assert!(
        std::fs::read_to_string(rootfs.join("seen"))
            .unwrap()
            .contains(" /x"),
        "the third RUN ran on the stack with the layer twice"
    );
}

#[test]
fn an_empty_stage_can_be_mounted() {
    // A stage without layers (FROM scratch): the read-only view of it has only empty
    // directories, which overlayfs takes only if they are not the same one twice.
    let dockerfile = "ARG BASE\nFROM scratch AS empty\n\nFROM ${BASE}\nRUN --mount=type=bind,from=empty,target=/e ls -A /e > /listed && echo ok >> /listed\n";
    let store = scratch_dir(Who::User);
    let (_w, rootfs, err) =
        build_and_unpack(Who::User, store.path(), &[("Dockerfile", dockerfile)], &[]);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("listed")).unwrap(),
        "ok\n",
        "{err}"
    );
}
