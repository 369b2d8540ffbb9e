//! End to end: build as the unprivileged test user and as root, push to the real registry, and
//! check the result with independent tools (skopeo reads the registry, umoci unpacks the layers).

mod common;

use common::{
    Who, env, fixture, remote_config, remote_manifest, scratch_dir, shmocker_ok, tree, unique_ref,
    unpack,
};

fn fs_basics(who: Who) {
    let ctx = fixture("fs-basics");
    let store = scratch_dir(who);
    let tag = unique_ref("fs-basics");
    let base = format!("BASE={}", env().busybox());
    let out = shmocker_ok(
        who,
        store.path(),
        &[
            "build",
            "-t",
            &tag,
            "--push",
            "--build-arg",
            &base,
            ctx.path().to_str().unwrap(),
        ],
    );
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let manifest = remote_manifest(&tag);
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let raw = std::process::Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            "--format",
            "{{.Digest}}",
            &format!("docker://{tag}"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&raw.stdout).trim(),
        printed,
        "printed digest is the pushed one"
    );

    let work = scratch_dir(Who::Root);
    let rootfs = unpack(&format!("docker://{tag}"), work.path());
    let t = tree(&rootfs);
    let e = |p: &str| {
        t.get(p)
            .unwrap_or_else(|| panic!("{p} missing from the image"))
    };
    assert_eq!(
        std::fs::read_to_string(rootfs.join("hello")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        (e("/hello").mode, e("/hello").uid, e("/hello").gid),
        (0o640, 1234, 4321)
    );
    assert_eq!((e("/data/sub/f").uid, e("/data/sub/f").gid), (1000, 1000));
    assert_eq!((e("/data").uid, e("/data/sub").uid), (1000, 1000));
    assert_eq!(e("/link").link.as_deref(), Some("/hello"));
    assert_eq!(e("/data/rel").link.as_deref(), Some("../hello"));
    assert_eq!(e("/data/hard").nlink_group, Some(2), "hard link kept");
    assert!(
        !t.contains_key("/bin/vi"),
        "a file deleted from a lower layer is gone"
    );
    assert!(
        !t.contains_key("/etc/group"),
        "a file deleted from a lower layer is gone"
    );
    assert!(
        t.contains_key("/bin/sh"),
        "files of the base image are there"
    );
    assert_eq!(e("/s").mode, 0o4755, "setuid survives");
    assert_eq!(e("/sticky").mode, 0o1777);
    let d: Vec<&String> = t.keys().filter(|k| k.starts_with("/d/")).collect();
    assert_eq!(
        d,
        vec!["/d/c"],
        "a replaced directory holds only its new content"
    );
    assert!(
        !t.keys().any(|k| k.contains(".wh.")),
        "no whiteout files in the unpacked image"
    );
    // The sandbox's mount points must not leak into layers.
    for stub in ["/etc/hosts", "/etc/resolv.conf"] {
        assert!(!t.contains_key(stub), "{stub} leaked into the image");
    }

    let config = remote_config(&tag);
    let history = config["history"].as_array().unwrap();
    let runs: Vec<&serde_json::Value> = history
        .iter()
        .filter(|h| h["created_by"].as_str().unwrap_or("").starts_with("RUN "))
        .collect();
    assert_eq!(runs.len(), 7);
    assert!(
        runs.iter()
            .all(|h| h["empty_layer"].as_bool() != Some(true))
    );
    let layers = manifest["layers"].as_array().unwrap().len();
    let non_empty = history
        .iter()
        .filter(|h| h["empty_layer"].as_bool() != Some(true))
        .count();
    assert_eq!(layers, non_empty, "one layer per non-empty history entry");
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().unwrap().len(),
        layers
    );
}

#[test]
fn fs_basics_as_unprivileged_user() {
    fs_basics(Who::User);
}

#[test]
fn fs_basics_as_root() {
    fs_basics(Who::Root);
}

fn copy_config(who: Who) {
    let ctx = fixture("copy-config");
    let store = scratch_dir(who);
    let out_dir = scratch_dir(who);
    let tag = unique_ref("copy-config");
    let base = format!("BASE={}", env().busybox());
    let oci = out_dir.path().join("app.tar");
    let meta = out_dir.path().join("meta.json");
    let iid = out_dir.path().join("iid");
    shmocker_ok(
        who,
        store.path(),
        &[
            "build",
            "-t",
            &tag,
            "--build-arg",
            &base,
            "--build-arg",
            "VERSION=2.5",
            "--output",
            &format!("type=oci,dest={}", oci.display()),
            "--metadata-file",
            meta.to_str().unwrap(),
            "--iidfile",
            iid.to_str().unwrap(),
            ctx.path().to_str().unwrap(),
        ],
    );
    let work = scratch_dir(Who::Root);
    let rootfs = unpack(&format!("oci-archive:{}", oci.display()), work.path());
    let t = tree(&rootfs);
    let e = |p: &str| {
        t.get(p)
            .unwrap_or_else(|| panic!("{p} missing from the image"))
    };
    assert_eq!(
        std::fs::read_to_string(rootfs.join("srv/app/main.txt")).unwrap(),
        "main\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("srv/app/sub/nested.txt")).unwrap(),
        "nested\n"
    );
    assert!(
        !t.contains_key("/srv/app/debug.log"),
        ".dockerignore honoured"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("srv/app/version.txt")).unwrap(),
        "2.5 prod\n"
    );
    assert_eq!(
        (e("/etc/app/config.txt").uid, e("/etc/app/config.txt").gid),
        (1000, 1000)
    );
    assert_eq!(e("/usr/local/bin/run.sh").mode, 0o755);
    assert_eq!(
        e("/srv/app/main.txt").uid,
        0,
        "COPY without --chown gives root"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("tmp/whoami")).unwrap(),
        "1000\n"
    );
    assert_eq!(e("/tmp/made-by-app").uid, 1000, "RUN as USER app");

    let layout = work.path().join("layout");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = |d: &str| -> serde_json::Value {
        serde_json::from_slice(
            &std::fs::read(
                layout
                    .join("blobs/sha256")
                    .join(d.trim_start_matches("sha256:")),
            )
            .unwrap(),
        )
        .unwrap()
    };
    let manifest = blob(&mdigest);
    let cfg_digest = manifest["config"]["digest"].as_str().unwrap();
    let image_config = blob(cfg_digest);
    let c = &image_config["config"];
    let env_list: Vec<&str> = c["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env_list.contains(&"APP_HOME=/srv/app") && env_list.contains(&"MODE=prod"),
        "{env_list:?}"
    );
    assert!(env_list.iter().any(|e| e.starts_with("PATH=")), "PATH kept");
    assert!(
        !env_list.iter().any(|e| e.starts_with("VERSION=")),
        "ARGs are not persisted"
    );
    assert_eq!(c["WorkingDir"], "/srv/app");
    assert_eq!(c["User"], "app");
    assert_eq!(c["Labels"]["org.example.version"], "2.5");
    assert_eq!(c["Labels"]["org.example.title"], "copy config");
    assert_eq!(
        c["ExposedPorts"],
        serde_json::json!({"8080/tcp": {}, "53/udp": {}})
    );
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/run.sh"])
    );
    assert_eq!(c["Cmd"], serde_json::json!(["--serve"]));
    let history = image_config["history"].as_array().unwrap();
    let by: Vec<&str> = history
        .iter()
        .map(|h| h["created_by"].as_str().unwrap_or(""))
        .collect();
    let find = |prefix: &str| {
        history
            .iter()
            .find(|h| h["created_by"].as_str().unwrap_or("").starts_with(prefix))
            .unwrap_or_else(|| panic!("no history entry {prefix}: {by:?}"))
    };
    assert_eq!(find("ENV ")["empty_layer"], true);
    assert_eq!(find("LABEL ")["empty_layer"], true);
    assert_eq!(find("USER ")["empty_layer"], true);
    assert_eq!(find("CMD ")["empty_layer"], true);
    assert_ne!(find("COPY app/")["empty_layer"], true);
    assert!(find("RUN |1 VERSION=2.5 /bin/sh -c").is_object());
    assert!(history.iter().all(|h| {
        h["comment"] == "buildkit.dockerfile.v0"
            || !h["created_by"]
                .as_str()
                .unwrap_or("")
                .ends_with("# buildkit")
    }));

    let iid_text = std::fs::read_to_string(&iid).unwrap();
    assert_eq!(
        iid_text, cfg_digest,
        "--iidfile holds the image ID (config digest)"
    );
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    assert_eq!(meta["containerimage.digest"], mdigest.as_str());
    assert_eq!(meta["containerimage.config.digest"], cfg_digest);
    assert_eq!(meta["image.name"], tag.as_str());
    assert!(
        !common::remote_exists(&tag),
        "nothing pushed without --push"
    );
}

#[test]
fn copy_and_config_as_unprivileged_user() {
    copy_config(Who::User);
}

#[test]
fn copy_and_config_as_root() {
    copy_config(Who::Root);
}

#[test]
fn version_is_printed() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shmocker"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("shmocker {}", env!("CARGO_PKG_VERSION"))
    );
}

/// A stage of 45 RUN layers: with the store's absolute paths the overlayfs options pass the
/// kernel's one-page limit around the 35th layer, so the later steps and the `COPY --from` view
/// of the stage must mount through short links. Every step must see every earlier step's file.
#[test]
fn many_layers_mount_as_unprivileged_user() {
    const STEPS: usize = 45;
    let mut dockerfile = format!("FROM {} AS many\n", env().busybox());
    for i in 0..STEPS {
        dockerfile.push_str(&format!(
            "RUN test \"$(ls /layers 2>/dev/null | wc -l)\" = {i} && mkdir -p /layers && echo {i} > /layers/{i}\n"
        ));
    }
    dockerfile.push_str(&format!(
        "FROM {}\nCOPY --from=many /layers /copied\n",
        env().busybox()
    ));
    let ctx = common::context(&[("Dockerfile", &dockerfile)]);
    let store = scratch_dir(Who::User);
    let out = scratch_dir(Who::User);
    let dest = out.path().join("fs");
    shmocker_ok(
        Who::User,
        store.path(),
        &[
            "build",
            "--snapshotter",
            "overlayfs",
            "--output",
            &format!("type=local,dest={}", dest.display()),
            ctx.path().to_str().unwrap(),
        ],
    );
    for i in 0..STEPS {
        assert_eq!(
            std::fs::read_to_string(dest.join(format!("copied/{i}"))).unwrap(),
            format!("{i}\n"),
            "layer {i}'s file in the COPY --from result"
        );
    }
}

/// A TCP forwarder from a loopback port of its own to the test registry: the same registry
/// under another name (`127.0.0.1:PORT/...`), which the test can make unreachable by stopping
/// the forwarder (the port then refuses connections).
struct Forwarder {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    fn start() -> Forwarder {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let target = env().registry().to_string();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let server = std::net::TcpStream::connect(&target).unwrap();
                        for (mut from, mut to) in [
                            (client.try_clone().unwrap(), server.try_clone().unwrap()),
                            (server, client),
                        ] {
                            std::thread::spawn(move || {
                                let _ = std::io::copy(&mut from, &mut to);
                                let _ = to.shutdown(std::net::Shutdown::Write);
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
            // The listener is dropped here: the port refuses connections from now on.
        });
        Forwarder {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err(),
            "the forwarder's port still accepts connections"
        );
    }
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `--pull=missing` and `--pull=never` build from the store with the registry unreachable,
/// once the tag was pulled; `always` (the default) then fails, since it asks the registry; a
/// reference pinned by digest needs no registry whatever the policy; `never` fails clearly
/// when the store lacks the image.
#[test]
fn pull_policies_with_the_registry_unreachable() {
    let mut fwd = Forwarder::start();
    // The base image under a name no store has seen: this registry, through the forwarder.
    let base = env()
        .busybox()
        .replacen(env().registry(), &format!("127.0.0.1:{}", fwd.port), 1);
    let dockerfile = format!("FROM {base}\nRUN echo built > /built\n");
    let ctx = common::context(&[("Dockerfile", &dockerfile)]);
    let store = scratch_dir(Who::User);
    let build = |extra: &[&str]| {
        let mut args = vec!["build", "--no-cache"];
        args.extend_from_slice(extra);
        args.push(ctx.path().to_str().unwrap());
        common::shmocker(Who::User, store.path(), &args)
    };

    let out = build(&["--pull=never"]);
    assert!(
        !out.status.success(),
        "--pull=never built from an empty store"
    );
    let err = stderr_of(&out);
    assert!(
        err.contains("is not in the local store") && err.contains("--pull=never"),
        "{err}"
    );
    assert!(err.contains(&base) || err.contains("base/busybox"), "{err}");

    let out = build(&["--pull=missing"]);
    assert!(
        out.status.success(),
        "first --pull=missing build (registry reachable)"
    );
    let err = stderr_of(&out);
    let digest = err
        .split_whitespace()
        .skip_while(|w| *w != "resolved")
        .nth(3)
        .filter(|d| d.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no 'resolved IMAGE to DIGEST' line in:\n{err}"))
        .to_string();

    fwd.stop();

    for policy in ["--pull=missing", "--pull=never"] {
        let out = build(&[policy]);
        assert!(
            out.status.success(),
            "{policy} with the registry unreachable: {}",
            stderr_of(&out)
        );
    }
    let out = build(&[]);
    assert!(
        !out.status.success(),
        "the default policy built without its registry"
    );
    let err = stderr_of(&out);
    assert!(err.contains("cannot reach registry"), "{err}");
    let out = build(&["--pull"]);
    assert!(
        !out.status.success(),
        "--pull (always) built without its registry"
    );

    // Pinned by digest: from the store, even with the default policy.
    let repo = base.rsplit_once(':').unwrap().0;
    let pinned = common::context(&[(
        "Dockerfile",
        &format!("FROM {repo}@{digest}\nRUN echo built > /built\n"),
    )]);
    let out = common::shmocker(
        Who::User,
        store.path(),
        &["build", "--no-cache", pinned.path().to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "a digest-pinned base with its blobs stored: {}",
        stderr_of(&out)
    );
}

/// `always` (the default) sees a tag pushed again; `missing` keeps the image the store has.
#[test]
fn pull_always_sees_a_repushed_tag_and_missing_keeps_the_stored_one() {
    let tag = unique_ref("pull-policy");
    let push = |marker: &str| {
        let ctx = common::context(&[
            (
                "Dockerfile",
                &format!("FROM {}\nCOPY marker /marker\n", env().busybox()),
            ),
            ("marker", marker),
        ]);
        let store = scratch_dir(Who::Root);
        shmocker_ok(
            Who::Root,
            store.path(),
            &["build", "--push", "-t", &tag, ctx.path().to_str().unwrap()],
        );
    };
    let ctx = common::context(&[("Dockerfile", &format!("FROM {tag}\nRUN cat /marker\n"))]);
    let store = scratch_dir(Who::User);
    let out = scratch_dir(Who::User);
    let marker = |policy: &str| {
        let dest = out.path().join(common::unique());
        shmocker_ok(
            Who::User,
            store.path(),
            &[
                "build",
                policy,
                "--output",
                &format!("type=local,dest={}", dest.display()),
                ctx.path().to_str().unwrap(),
            ],
        );
        std::fs::read_to_string(dest.join("marker")).unwrap()
    };

    push("first");
    assert_eq!(marker("--pull=always"), "first");
    push("second");
    assert_eq!(
        marker("--pull=missing"),
        "first",
        "missing asked the registry"
    );
    assert_eq!(marker("--pull=false"), "first", "--pull=false is missing");
    assert_eq!(
        marker("--pull=always"),
        "second",
        "always kept the old image"
    );
    push("third");
    assert_eq!(marker("--pull"), "third", "--pull alone is always");
    assert_eq!(
        marker("--pull=missing"),
        "third",
        "missing: the tag's last pull"
    );
}
