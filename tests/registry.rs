//! The registry client against real registries: Debian's `docker-registry` (distribution 2.8),
//! started by each test on a loopback port, plain or with TLS and htpasswd auth; `skopeo` as an
//! independent reader. Missing tools fail the tests loudly instead of skipping them.

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use oci_client::Reference;
use shmocker::registry::{
    BlobRef, Platform, PulledImage, Registry, RegistryError, RegistryOptions,
};
use shmocker::store::{Store, sha256_digest};
use tempfile::TempDir;

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const USER: &str = "shmo";
const PASSWORD: &str = "pa55-Wörd-very-secret";

// ---------------------------------------------------------------------------------------------
// Harness

fn require_tool(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: these tests need a real registry. Install it with `apt-get install -y {package}`"
    );
}

/// A free port in 5100–5199; the lock keeps this process's tests from picking the same one.
fn free_port() -> u16 {
    static NEXT: Mutex<u16> = Mutex::new(0);
    let mut next = NEXT.lock().unwrap();
    if *next == 0 {
        // Test runners like nextest run each test in its own process: start apart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        *next = 5100 + ((std::process::id() ^ nanos) % 100) as u16;
    }
    for _ in 0..100 {
        let port = *next;
        *next = if port >= 5199 { 5100 } else { port + 1 };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 127.0.0.1:5100-5199");
}

struct TestRegistry {
    child: Child,
    port: u16,
    dir: TempDir,
    /// certs.d root with the CA for this registry (TLS only).
    certs_root: Option<PathBuf>,
}

impl TestRegistry {
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn reference(&self, repo_tag: &str) -> Reference {
        format!("{}/{repo_tag}", self.host()).parse().unwrap()
    }

    fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    fn plain() -> TestRegistry {
        Self::start(false)
    }

    fn tls_with_auth() -> TestRegistry {
        Self::start(true)
    }

    fn start(tls: bool) -> TestRegistry {
        require_tool(REGISTRY_BIN, "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        if tls {
            require_tool("/usr/bin/openssl", "openssl");
            require_tool("/usr/bin/htpasswd", "apache2-utils");
            make_certs(dir.path());
            let htpasswd = run("htpasswd", &["-Bbn", USER, PASSWORD], None);
            std::fs::write(dir.path().join("htpasswd"), htpasswd).unwrap();
        }
        // Another test process may take the same free port between our check and the
        // registry's bind; then the registry exits and we try the next port.
        for _ in 0..5 {
            let port = free_port();
            let mut config = format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: test-secret\n",
                dir.path().join("storage").display()
            );
            let mut certs_root = None;
            if tls {
                config += &format!(
                    "  tls:\n    certificate: {d}/server.crt\n    key: {d}/server.key\nauth:\n  htpasswd:\n    realm: shmocker-test\n    path: {d}/htpasswd\n",
                    d = dir.path().display()
                );
                let root = dir.path().join(format!("certs.d-{port}"));
                let host_dir = root.join(format!("127.0.0.1:{port}"));
                std::fs::create_dir_all(&host_dir).unwrap();
                std::fs::copy(dir.path().join("ca.crt"), host_dir.join("ca.crt")).unwrap();
                certs_root = Some(root);
            }
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).unwrap();
            let log_path = dir.path().join("registry.log");
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start docker-registry");
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    return TestRegistry {
                        child,
                        port,
                        dir,
                        certs_root,
                    };
                }
                Err(status) => {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if !log.contains("address already in use") {
                        panic!("docker-registry exited ({status}) before listening:\n{log}");
                    }
                }
            }
        }
        panic!("docker-registry found no free port in 127.0.0.1:5100-5199 after 5 tries");
    }
}

/// Waits until the registry listens; `Err` with its exit status if it died instead.
fn wait_ready(child: &mut Child, port: u16) -> Result<(), std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(status);
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            // What answered may be another test's registry that won the port; ours then
            // exits at once on its failed bind.
            std::thread::sleep(Duration::from_millis(100));
            return match child.try_wait().unwrap() {
                Some(status) => Err(status),
                None => Ok(()),
            };
        }
        assert!(
            Instant::now() < deadline,
            "docker-registry did not listen on {port} within 20s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl TestRegistry {
    /// Options for a client of this registry: no system credentials or CAs, only the test's.
    fn options(&self, docker_config_dir: &Path) -> RegistryOptions {
        RegistryOptions {
            insecure_hosts: vec![],
            docker_config_dir: Some(docker_config_dir.to_path_buf()),
            extra_auth_files: Some(vec![]),
            certs_dirs: Some(self.certs_root.iter().cloned().collect()),
            credentials: vec![],
            ..Default::default()
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &str, args: &[&str], cwd: Option<&Path>) -> Vec<u8> {
    let mut c = Command::new(cmd);
    c.args(args);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let out = c.output().unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A throwaway CA and a server certificate for 127.0.0.1 signed by it.
fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=shmocker test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run("openssl", &args, Some(dir));
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run("openssl", &args, Some(dir));
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
        Some(dir),
    );
}

/// Pseudo-random bytes (xorshift), so each image is new to the registry.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ u64::from(std::process::id()) << 32
        | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An image in `store`: one layer of `layer_size` random bytes, a config for `platform`, and an
/// OCI manifest naming them.
struct TestImage {
    layers: Vec<BlobRef>,
    config: BlobRef,
    manifest: Vec<u8>,
    manifest_digest: String,
}

fn put_blob(store: &Store, data: &[u8], media_type: &str) -> BlobRef {
    let mut w = store.blob_writer().unwrap();
    w.write_all(data).unwrap();
    let (digest, size) = w.commit(None).unwrap();
    BlobRef {
        digest,
        size,
        media_type: media_type.to_string(),
    }
}

fn make_image(store: &Store, layer_size: usize, platform: &Platform) -> TestImage {
    let layer = put_blob(store, &random_bytes(layer_size), OCI_LAYER);
    let config = serde_json::json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        "config": {},
    });
    let config = put_blob(store, &serde_json::to_vec(&config).unwrap(), OCI_CONFIG);
    let desc = |b: &BlobRef| serde_json::json!({"mediaType": b.media_type, "digest": b.digest, "size": b.size});
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(&config),
        "layers": [desc(&layer)],
    }))
    .unwrap();
    TestImage {
        manifest_digest: sha256_digest(&manifest),
        layers: vec![layer],
        config,
        manifest,
    }
}

async fn push(reg: &Registry, target: &Reference, img: &TestImage, store: &Store) -> String {
    reg.push_image(
        target,
        &img.layers,
        &img.config,
        &img.manifest,
        OCI_MANIFEST,
        store,
    )
    .await
    .unwrap_or_else(|e| panic!("push {target}: {e}"))
}

fn file_digest(path: &Path) -> String {
    sha256_digest(&std::fs::read(path).unwrap())
}

fn store_in(dir: &TempDir, name: &str) -> Store {
    Store::open(dir.path().join(name)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn push_then_pull_round_trip_and_skopeo_sees_the_digest() {
    let server = TestRegistry::plain();
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, "push-store");
    let reg = Registry::new(server.options(tmp.path()));
    let img = make_image(&store, 6 * 1024 * 1024 + 123, &Platform::host());
    let target = server.reference("shmocker/roundtrip:v1");

    let digest = push(&reg, &target, &img, &store).await;
    assert_eq!(digest, img.manifest_digest);

    // Pull it back with a fresh client and store.
    let reg2 = Registry::new(server.options(tmp.path()));
    let pulled: PulledImage = reg2
        .pull_manifest(&target, &Platform::host())
        .await
        .unwrap();
    assert_eq!(pulled.manifest_digest, img.manifest_digest);
    assert_eq!(pulled.index_digest, None);
    assert_eq!(pulled.manifest_raw, img.manifest);
    assert_eq!(sha256_digest(&pulled.config_raw), img.config.digest);
    assert_eq!(pulled.manifest.layers[0].digest, img.layers[0].digest);
    assert_eq!(
        pulled.reference.whole(),
        format!(
            "{}/shmocker/roundtrip:v1@{}",
            server.host(),
            img.manifest_digest
        )
    );

    let store2 = store_in(&tmp, "pull-store");
    let layer = &img.layers[0];
    let path = reg2.fetch_blob(&target, layer, &store2).await.unwrap();
    assert_eq!(file_digest(&path), layer.digest);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), layer.size);
    assert!(store2.has_blob(&layer.digest));

    // Pulling by digest works and is verified.
    let by_digest = target.clone_with_digest(img.manifest_digest.clone());
    let again = reg2
        .pull_manifest(&by_digest, &Platform::host())
        .await
        .unwrap();
    assert_eq!(again.manifest_digest, img.manifest_digest);

    // An independent client agrees on what is there.
    require_tool("/usr/bin/skopeo", "skopeo");
    let out = run(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--raw",
            &format!("docker://{}", target.whole()),
        ],
        None,
    );
    assert_eq!(sha256_digest(&out), img.manifest_digest);
    let out = run(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{}", target.whole()),
        ],
        None,
    );
    let info: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(info["Digest"], img.manifest_digest.as_str());
    assert_eq!(info["Layers"][0], layer.digest.as_str());
}

#[tokio::test]
async fn pushing_again_skips_existing_blobs() {
    let server = TestRegistry::plain();
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, "store");
    let reg = Registry::new(server.options(tmp.path()));
    let img = make_image(&store, 3 * 1024 * 1024, &Platform::host());
    let target = server.reference("shmocker/skip:v1");
    let all = vec![img.layers[0].digest.clone(), img.config.digest.clone()];

    let first = reg
        .push_image_with_report(
            &target,
            &img.layers,
            &img.config,
            &img.manifest,
            OCI_MANIFEST,
            &store,
        )
        .await
        .unwrap();
    let mut uploaded = first.uploaded.clone();
    uploaded.sort();
    let mut want = all.clone();
    want.sort();
    assert_eq!(uploaded, want);
    assert!(first.skipped.is_empty());

    // Same repository, another tag: every blob is already there.
    let second = reg
        .push_image_with_report(
            &server.reference("shmocker/skip:v2"),
            &img.layers,
            &img.config,
            &img.manifest,
            OCI_MANIFEST,
            &store,
        )
        .await
        .unwrap();
    assert!(second.uploaded.is_empty(), "{second:?}");
    assert_eq!(second.skipped.len(), 2);
    assert_eq!(second.manifest_digest, first.manifest_digest);

    // Skipping does not need the local files: the registry's HEAD is enough.
    let empty_store = store_in(&tmp, "empty");
    let third = reg
        .push_image_with_report(
            &target,
            &img.layers,
            &img.config,
            &img.manifest,
            OCI_MANIFEST,
            &empty_store,
        )
        .await
        .unwrap();
    assert!(third.uploaded.is_empty());
}

#[tokio::test]
async fn manifest_is_not_pushed_when_a_blob_is_missing() {
    let server = TestRegistry::plain();
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, "store");
    let reg = Registry::new(server.options(tmp.path()));
    let mut img = make_image(&store, 1024 * 1024, &Platform::host());

    // A second layer that the store does not have (and the registry never saw).
    let ghost = BlobRef {
        digest: sha256_digest(b"a layer that was never written"),
        size: 30,
        media_type: OCI_LAYER.to_string(),
    };
    img.layers.push(ghost.clone());
    let mut manifest: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    manifest["layers"].as_array_mut().unwrap().push(
        serde_json::json!({"mediaType": OCI_LAYER, "digest": ghost.digest, "size": ghost.size}),
    );
    img.manifest = serde_json::to_vec(&manifest).unwrap();

    let target = server.reference("shmocker/missing:v1");
    let err = reg
        .push_image(
            &target,
            &img.layers,
            &img.config,
            &img.manifest,
            OCI_MANIFEST,
            &store,
        )
        .await
        .unwrap_err();
    eprintln!("MissingLocalBlob: {err}");
    assert!(
        matches!(err, RegistryError::MissingLocalBlob { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&ghost.digest) && msg.contains("manifest was not pushed"),
        "{msg}"
    );

    // No tag appeared.
    let err = reg
        .pull_manifest(&target, &Platform::host())
        .await
        .unwrap_err();
    eprintln!("ManifestNotFound: {err}");
    assert!(
        matches!(err, RegistryError::ManifestNotFound { .. }),
        "{err}"
    );

    // A manifest that names a blob not given to push is refused before any upload.
    let err = reg
        .push_image(
            &target,
            &img.layers[..1],
            &img.config,
            &img.manifest,
            OCI_MANIFEST,
            &store,
        )
        .await
        .unwrap_err();
    eprintln!("InvalidRequest: {err}");
    assert!(matches!(err, RegistryError::InvalidRequest { .. }), "{err}");
}

#[tokio::test]
async fn unknown_tag_and_repository_are_not_found() {
    let server = TestRegistry::plain();
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, "store");
    let reg = Registry::new(server.options(tmp.path()));
    let img = make_image(&store, 1000, &Platform::host());
    push(&reg, &server.reference("shmocker/known:v1"), &img, &store).await;

    for missing in ["shmocker/known:nope", "shmocker/unknown-repo:v1"] {
        let r = server.reference(missing);
        let err = reg.pull_manifest(&r, &Platform::host()).await.unwrap_err();
        eprintln!("ManifestNotFound: {err}");
        assert!(
            matches!(err, RegistryError::ManifestNotFound { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "image {} not found: no such tag/repository",
                r.whole()
            )),
            "{msg}"
        );
    }

    // A blob the registry does not have.
    let ghost = BlobRef {
        digest: sha256_digest(b"nothing"),
        size: 7,
        media_type: OCI_LAYER.to_string(),
    };
    let err = reg
        .fetch_blob(&server.reference("shmocker/known:v1"), &ghost, &store)
        .await
        .unwrap_err();
    eprintln!("BlobNotFound: {err}");
    assert!(matches!(err, RegistryError::BlobNotFound { .. }), "{err}");
}

#[tokio::test]
async fn connection_refused_names_the_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port(); // nothing listens there
    let reg = Registry::new(RegistryOptions {
        docker_config_dir: Some(tmp.path().to_path_buf()),
        extra_auth_files: Some(vec![]),
        certs_dirs: Some(vec![]),
        ..Default::default()
    });
    let r: Reference = format!("127.0.0.1:{port}/x/y:z").parse().unwrap();
    let err = reg.pull_manifest(&r, &Platform::host()).await.unwrap_err();
    eprintln!("Unreachable: {err}");
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(msg.contains("running"), "{msg}");

    // A blob the store has needs no registry at all.
    let store = store_in(&tmp, "store");
    let blob = put_blob(&store, b"cached", OCI_LAYER);
    let path = reg.fetch_blob(&r, &blob, &store).await.unwrap();
    assert_eq!(file_digest(&path), blob.digest);

    // Spoken to over HTTPS (a CA is configured for it), the hint also offers --insecure-registry.
    let certs = tmp.path().join("certs.d");
    let host_dir = certs.join(format!("127.0.0.1:{port}"));
    std::fs::create_dir_all(&host_dir).unwrap();
    make_certs(tmp.path());
    std::fs::copy(tmp.path().join("ca.crt"), host_dir.join("ca.crt")).unwrap();
    let reg = Registry::new(RegistryOptions {
        docker_config_dir: Some(tmp.path().to_path_buf()),
        extra_auth_files: Some(vec![]),
        certs_dirs: Some(vec![certs]),
        ..Default::default()
    });
    let err = reg.pull_manifest(&r, &Platform::host()).await.unwrap_err();
    eprintln!("Unreachable: {err}");
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("(https)") && msg.contains(&format!("--insecure-registry 127.0.0.1:{port}")),
        "{msg}"
    );
}

#[tokio::test]
async fn tls_registry_with_auth_uses_docker_config_credentials() {
    let server = TestRegistry::tls_with_auth();
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, "store");
    let img = make_image(&store, 5 * 1024 * 1024, &Platform::host());
    let target = server.reference("private/app:1.0");

    // Credentials as `docker login` writes them: base64 of user:password.
    let good = tmp.path().join("good");
    std::fs::create_dir_all(&good).unwrap();
    let auth = {
        let mut child = Command::new("base64")
            .arg("-w0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{USER}:{PASSWORD}").as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    std::fs::write(
        good.join("config.json"),
        serde_json::json!({"auths": {server.host(): {"auth": auth}}}).to_string(),
    )
    .unwrap();

    let reg = Registry::new(server.options(&good));
    let digest = push(&reg, &target, &img, &store).await;
    let pulled = reg.pull_manifest(&target, &Platform::host()).await.unwrap();
    assert_eq!(pulled.manifest_digest, digest);
    let store2 = store_in(&tmp, "store2");
    let path = reg
        .fetch_blob(&target, &img.layers[0], &store2)
        .await
        .unwrap();
    assert_eq!(file_digest(&path), img.layers[0].digest);
    assert!(!format!("{reg:?}").contains(PASSWORD));

    // No credentials at all.
    let none = tmp.path().join("none");
    std::fs::create_dir_all(&none).unwrap();
    let reg = Registry::new(server.options(&none));
    let err = reg
        .pull_manifest(&target, &Platform::host())
        .await
        .unwrap_err();
    eprintln!("Unauthorized: {err}");
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&server.host()) && msg.contains("docker login"),
        "{msg}"
    );
    assert!(!msg.contains(PASSWORD), "{msg}");
    let err = reg
        .push_image(
            &server.reference("private/other:1"),
            &img.layers,
            &img.config,
            &img.manifest,
            OCI_MANIFEST,
            &store,
        )
        .await
        .unwrap_err();
    eprintln!("Unauthorized: {err}");
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");

    // Wrong password, given as username/password fields: refused, and neither password shows.
    let wrong_password = "not-the-Secret-42";
    let bad = tmp.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("config.json"),
        serde_json::json!({"auths": {format!("https://{}", server.host()): {"username": USER, "password": wrong_password}}}).to_string(),
    )
    .unwrap();
    let reg = Registry::new(server.options(&bad));
    let err = reg
        .pull_manifest(&target, &Platform::host())
        .await
        .unwrap_err();
    eprintln!("Unauthorized: {err}");
    assert!(matches!(err, RegistryError::Unauthorized { .. }), "{err}");
    let shown = format!("{err} {err:?}");
    assert!(shown.contains(USER), "{shown}");
    assert!(
        !shown.contains(wrong_password) && !shown.contains(PASSWORD),
        "{shown}"
    );

    // Without the CA the TLS registry is spoken to in plain HTTP (it is on loopback), and the
    // error says how to fix that.
    let reg = Registry::new(RegistryOptions {
        certs_dirs: Some(vec![]),
        ..server.options(&good)
    });
    let err = reg
        .pull_manifest(&target, &Platform::host())
        .await
        .unwrap_err();
    eprintln!("Unreachable: {err}");
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("certs.d"), "{err}");
}

#[tokio::test]
async fn tls_without_trusted_ca_is_unreachable_with_a_hint() {
    let server = TestRegistry::tls_with_auth();
    let tmp = tempfile::tempdir().unwrap();
    // A certs.d entry whose CA is not the one that signed the server: TLS is used, and fails.
    let other_ca = tempfile::tempdir().unwrap();
    make_certs(other_ca.path());
    let root = tmp.path().join("certs.d");
    let host_dir = root.join(server.host());
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::copy(other_ca.path().join("ca.crt"), host_dir.join("ca.crt")).unwrap();
    let reg = Registry::new(RegistryOptions {
        certs_dirs: Some(vec![root]),
        ..server.options(tmp.path())
    });
    let err = reg
        .pull_manifest(&server.reference("private/app:1.0"), &Platform::host())
        .await
        .unwrap_err();
    eprintln!("Unreachable: {err}");
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&server.host()) && msg.contains("certs.d"),
        "{msg}"
    );
    assert!(msg.contains("--insecure-registry"), "{msg}");
}

/// Another platform than the host's, and a second one, for building indexes.
fn foreign_platforms() -> (Platform, Platform) {
    let host = Platform::host();
    let mut others = ["s390x", "ppc64le", "riscv64"]
        .into_iter()
        .filter(|a| *a != host.architecture)
        .map(|a| Platform::parse(&format!("linux/{a}")).unwrap());
    (others.next().unwrap(), others.next().unwrap())
}

async fn push_index(
    reg: &Registry,
    server: &TestRegistry,
    store: &Store,
    repo: &str,
    platforms: &[Platform],
) -> (Reference, Vec<TestImage>, String) {
    let mut images = Vec::new();
    let mut entries = Vec::new();
    for p in platforms {
        let img = make_image(store, 200 * 1024, p);
        let by_digest = server
            .reference(repo)
            .clone_with_digest(img.manifest_digest.clone());
        push(reg, &by_digest, &img, store).await;
        let mut platform = serde_json::json!({"os": p.os, "architecture": p.architecture});
        if let Some(v) = &p.variant {
            platform["variant"] = serde_json::json!(v);
        }
        entries.push(serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": img.manifest_digest,
            "size": img.manifest.len(),
            "platform": platform,
        }));
        images.push(img);
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    }))
    .unwrap();
    let target = server.reference(&format!("{repo}:multi"));
    let digest = reg.push_index(&target, &index, OCI_INDEX).await.unwrap();
    assert_eq!(digest, sha256_digest(&index));
    (target, images, digest)
}

#[tokio::test]
async fn index_resolves_to_the_host_platform() {
    let server = TestRegistry::plain();
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, "store");
    let reg = Registry::new(server.options(tmp.path()));
    let (other, _) = foreign_platforms();
    let (target, images, index_digest) = push_index(
        &reg,
        &server,
        &store,
        "shmocker/multi",
        &[other, Platform::host()],
    )
    .await;

    let pulled = reg.pull_manifest(&target, &Platform::host()).await.unwrap();
    assert_eq!(pulled.manifest_digest, images[1].manifest_digest);
    assert_eq!(pulled.index_digest.as_deref(), Some(index_digest.as_str()));
    assert_eq!(pulled.manifest_raw, images[1].manifest);
    let config: serde_json::Value = serde_json::from_slice(&pulled.config_raw).unwrap();
    assert_eq!(
        config["architecture"],
        Platform::host().architecture.as_str()
    );

    // Asking for the other platform picks the other entry; by index digest too.
    let (other, _) = foreign_platforms();
    let by_digest = target.clone_with_digest(index_digest);
    let pulled = reg.pull_manifest(&by_digest, &other).await.unwrap();
    assert_eq!(pulled.manifest_digest, images[0].manifest_digest);

    // skopeo sees the index.
    require_tool("/usr/bin/skopeo", "skopeo");
    let raw = run(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--raw",
            &format!("docker://{}", target.whole()),
        ],
        None,
    );
    assert_eq!(
        Some(sha256_digest(&raw).as_str()),
        reg.pull_manifest(&target, &Platform::host())
            .await
            .unwrap()
            .index_digest
            .as_deref()
    );
}

#[tokio::test]
async fn index_without_the_host_platform_lists_what_it_has() {
    let server = TestRegistry::plain();
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, "store");
    let reg = Registry::new(server.options(tmp.path()));
    let (a, b) = foreign_platforms();
    let (target, _, _) = push_index(
        &reg,
        &server,
        &store,
        "shmocker/foreign",
        &[a.clone(), b.clone()],
    )
    .await;

    let err = reg
        .pull_manifest(&target, &Platform::host())
        .await
        .unwrap_err();
    eprintln!("NoMatchingPlatform: {err}");
    assert!(
        matches!(err, RegistryError::NoMatchingPlatform { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&target.whole())
            && msg.contains(&a.to_string())
            && msg.contains(&b.to_string()),
        "{msg}"
    );
    assert!(msg.contains(&Platform::host().to_string()), "{msg}");
}

#[tokio::test]
async fn corrupted_blob_in_the_registry_is_a_digest_mismatch() {
    let server = TestRegistry::plain();
    let tmp = tempfile::tempdir().unwrap();
    let store = store_in(&tmp, "store");
    let reg = Registry::new(server.options(tmp.path()));
    let img = make_image(&store, 2 * 1024 * 1024, &Platform::host());
    let target = server.reference("shmocker/corrupt:v1");
    push(&reg, &target, &img, &store).await;

    // Flip bytes in the registry's copy of the layer (same size, different content).
    let layer = &img.layers[0];
    let hex = layer.digest.strip_prefix("sha256:").unwrap();
    let data = server.storage().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let store2 = store_in(&tmp, "store2");
    let err = reg.fetch_blob(&target, layer, &store2).await.unwrap_err();
    eprintln!("DigestMismatch: {err}");
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer.digest), "{err}");
    assert!(!store2.has_blob(&layer.digest));
    assert_eq!(
        std::fs::read_dir(store2.root().join("tmp"))
            .unwrap()
            .count(),
        0
    );

    // A descriptor with the wrong size is refused before anything is stored.
    let wrong = BlobRef {
        size: layer.size - 1,
        ..layer.clone()
    };
    let err = reg.fetch_blob(&target, &wrong, &store2).await.unwrap_err();
    eprintln!("SizeMismatch: {err}");
    assert!(matches!(err, RegistryError::SizeMismatch { .. }), "{err}");
}
