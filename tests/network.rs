//! The network of RUN steps: `none` reaches nothing of the runner's, `private` reaches the
//! runner's loopback through slirp4netns (10.0.2.2), and `private --allow-host` reaches only the
//! listed hosts through the filtering proxy, with a clear message for everything else. Every
//! server is on 127.0.0.1 of this machine; no other address is ever contacted.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Who, context, env, scratch_dir, shmocker, shmocker_ok, unique_ref, unpack};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A loopback HTTP server answering each request with `body`; returns its port and the number
/// of connections it has accepted.
fn serve_http(body: &'static str) -> (u16, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming().take(16) {
            let Ok(mut s) = stream else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(body.as_bytes());
        }
    });
    (port, hits)
}

/// Builds `dockerfile` with `extra` flags into an OCI archive and unpacks it; returns the kept
/// temp dir, the rootfs and the build's stderr.
fn build(
    who: Who,
    store: &Path,
    dockerfile: &str,
    extra: &[&str],
) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let ctx = context(&[("Dockerfile", dockerfile)]);
    let out_dir = scratch_dir(who);
    let oci = out_dir.path().join("img.tar");
    let base = format!("BASE={}", env().busybox());
    let dest = format!("type=oci,dest={}", oci.display());
    let mut args = vec![
        "build",
        "--progress",
        "plain",
        "--build-arg",
        &base,
        "--output",
        &dest,
    ];
    args.extend_from_slice(extra);
    let ctx_path = ctx.path().to_str().unwrap().to_string();
    args.push(&ctx_path);
    let out = shmocker_ok(who, store, &args);
    let work = scratch_dir(Who::Root);
    let rootfs = unpack(&format!("oci-archive:{}", oci.display()), work.path());
    (work, rootfs, stderr(&out))
}

fn read(rootfs: &Path, name: &str) -> String {
    std::fs::read_to_string(rootfs.join(name))
        .unwrap_or_else(|e| panic!("/{name} missing from the image: {e}"))
}

/// Processes (slirp4netns, the proxy) whose open files are under `store`: none may outlive the
/// build.
fn processes_using(store: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let needle = store.to_string_lossy().into_owned();
    for proc_entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(proc_entry.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) {
            found.push(cmd);
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(store)) {
                found.push(cmd);
                break;
            }
        }
    }
    found
}

fn none_cannot_reach_the_runner(who: Who) {
    let (port, hits) = serve_http("hello\n");
    let dockerfile = format!(
        "ARG BASE\nFROM ${{BASE}}\n\
         RUN wget -q -O /via-host http://127.0.0.1:{port}/\n\
         RUN --network=none (wget -q -O /x http://127.0.0.1:{port}/ && echo reached || echo unreachable) > /loopback \
           && (wget -q -O /y http://10.0.2.2:{port}/ && echo reached || echo unreachable) > /gateway\n"
    );
    let store = scratch_dir(who);
    let (_w, rootfs, _) = build(who, store.path(), &dockerfile, &[]);
    assert_eq!(read(&rootfs, "via-host"), "hello\n", "the server works");
    assert_eq!(read(&rootfs, "loopback"), "unreachable\n");
    assert_eq!(read(&rootfs, "gateway"), "unreachable\n");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "only the host step got through"
    );
}

#[test]
fn none_cannot_reach_the_runner_as_root() {
    none_cannot_reach_the_runner(Who::Root);
}

#[test]
fn none_cannot_reach_the_runner_as_user() {
    none_cannot_reach_the_runner(Who::User);
}

fn private_reaches_the_runner_through_slirp4netns(who: Who) {
    let (port, hits) = serve_http("via slirp\n");
    let dockerfile = format!(
        "ARG BASE\nFROM ${{BASE}}\n\
         RUN wget -q -O /got http://10.0.2.2:{port}/ && cp /etc/resolv.conf /resolv \
           && grep -c tap0 /proc/net/dev > /tap && (env | grep -ci _proxy= || true) > /proxies\n\
         RUN --network=none (wget -q -O /y http://10.0.2.2:{port}/ && echo reached || echo unreachable) > /none\n"
    );
    let store = scratch_dir(who);
    let (_w, rootfs, _) = build(who, store.path(), &dockerfile, &["--network", "private"]);
    assert_eq!(read(&rootfs, "got"), "via slirp\n");
    assert_eq!(read(&rootfs, "resolv"), "nameserver 10.0.2.3\n");
    assert_eq!(read(&rootfs, "tap").trim(), "1", "slirp4netns's tap0");
    assert_eq!(
        read(&rootfs, "proxies").trim(),
        "0",
        "no proxy without --allow-host"
    );
    assert_eq!(
        read(&rootfs, "none"),
        "unreachable\n",
        "RUN --network=none still wins"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        processes_using(store.path()),
        Vec::<String>::new(),
        "left running"
    );
}

#[test]
fn private_reaches_the_runner_through_slirp4netns_as_root() {
    private_reaches_the_runner_through_slirp4netns(Who::Root);
}

#[test]
fn private_reaches_the_runner_through_slirp4netns_as_user() {
    private_reaches_the_runner_through_slirp4netns(Who::User);
}

#[test]
fn run_network_private_in_a_host_build() {
    let (port, _hits) = serve_http("one step\n");
    let dockerfile = format!(
        "ARG BASE\nFROM ${{BASE}}\n\
         RUN --network=private wget -q -O /got http://10.0.2.2:{port}/ && grep -c tap0 /proc/net/dev > /tap\n\
         RUN grep -c tap0 /proc/net/dev > /host-tap || true\n"
    );
    let store = scratch_dir(Who::User);
    let (_w, rootfs, _) = build(Who::User, store.path(), &dockerfile, &[]);
    assert_eq!(read(&rootfs, "got"), "one step\n");
    assert_eq!(read(&rootfs, "tap").trim(), "1");
    assert_eq!(
        read(&rootfs, "host-tap").trim(),
        "0",
        "the next step is on the host"
    );
}

fn allow_list_reaches_only_what_it_lists(who: Who) {
    let (allowed, allowed_hits) = serve_http("allowed\n");
    let (other, other_hits) = serve_http("other\n");
    let dockerfile = format!(
        "ARG BASE\nFROM ${{BASE}}\n\
         RUN wget -q -O /allowed http://10.0.2.2:{allowed}/ \
           && (wget -q -O /x http://10.0.2.2:{other}/ && echo reached || echo blocked) > /other-port \
           && (env -u http_proxy wget -q -O /y http://10.0.2.2:{allowed}/ && echo reached || echo blocked) > /direct \
           && (env -u http_proxy wget -q -O /z http://127.0.0.1:{allowed}/ && echo reached || echo blocked) > /loopback \
           && (nslookup not-allowed.example.test > /dev/null 2>&1 && echo resolved || echo refused) > /dns \
           && cp /etc/resolv.conf /resolv\n"
    );
    let store = scratch_dir(who);
    let allow = format!("10.0.2.2:{allowed}");
    let (_w, rootfs, log) = build(
        who,
        store.path(),
        &dockerfile,
        &["--network", "private", "--allow-host", &allow],
    );
    assert_eq!(read(&rootfs, "allowed"), "allowed\n");
    assert_eq!(read(&rootfs, "other-port"), "blocked\n");
    assert_eq!(
        read(&rootfs, "direct"),
        "blocked\n",
        "no way around the proxy"
    );
    assert_eq!(read(&rootfs, "loopback"), "blocked\n");
    assert_eq!(read(&rootfs, "dns"), "refused\n");
    assert_eq!(read(&rootfs, "resolv"), "nameserver 127.0.0.1\n");
    assert_eq!(allowed_hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        other_hits.load(Ordering::SeqCst),
        0,
        "the other server was reached"
    );
    let want = format!(
        "shmocker: 10.0.2.2:{other} is blocked: not in --allow-host (allowed: 10.0.2.2:{allowed})"
    );
    assert!(log.contains(&want), "no {want:?} in:\n{log}");
    assert!(
        log.contains("shmocker: the DNS lookup of not-allowed.example.test is blocked"),
        "{log}"
    );
    assert_eq!(
        processes_using(store.path()),
        Vec::<String>::new(),
        "left running"
    );
}

#[test]
fn allow_list_reaches_only_what_it_lists_as_root() {
    allow_list_reaches_only_what_it_lists(Who::Root);
}

#[test]
fn allow_list_reaches_only_what_it_lists_as_user() {
    allow_list_reaches_only_what_it_lists(Who::User);
}

/// The `/proc/PID/status` of each allow-list proxy process (named `shmocker-egress`) of the
/// build whose store is `store`.
fn proxies_of(store: &Path) -> Vec<String> {
    let needle = store.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if comm.trim_end() == "shmocker-egress" && String::from_utf8_lossy(&cmd).contains(&needle) {
            found.extend(std::fs::read_to_string(entry.path().join("status")));
        }
    }
    found
}

fn the_proxy_runs_without_privileges(who: Who) {
    let store = scratch_dir(who);
    // The server looks at the proxy while it relays the step's request, so the proxy is alive.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let store_path = store.path().to_path_buf();
    let seen = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.read(&mut [0u8; 4096]);
        let seen = proxies_of(&store_path);
        let _ =
            s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
        seen
    });
    let dockerfile =
        format!("ARG BASE\nFROM ${{BASE}}\nRUN wget -q -O /got http://10.0.2.2:{port}/\n");
    let allow = format!("10.0.2.2:{port}");
    let (_w, rootfs, _) = build(
        who,
        store.path(),
        &dockerfile,
        &["--network", "private", "--allow-host", &allow],
    );
    assert_eq!(read(&rootfs, "got"), "ok\n");
    let seen = seen.join().unwrap();
    assert_eq!(
        seen.len(),
        1,
        "one proxy process while the step ran: {seen:?}"
    );
    let status = &seen[0];
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in:\n{status}"))
            .to_string()
    };
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            field(set),
            "0000000000000000",
            "{set} of the proxy:\n{status}"
        );
    }
    assert_eq!(field("NoNewPrivs"), "1", "{status}");
    assert_eq!(field("Seccomp"), "2", "{status}");
}

#[test]
fn the_proxy_runs_without_privileges_as_root() {
    the_proxy_runs_without_privileges(Who::Root);
}

#[test]
fn the_proxy_runs_without_privileges_as_user() {
    the_proxy_runs_without_privileges(Who::User);
}

#[test]
fn insecure_steps_are_refused_with_an_allow_list() {
    let store = scratch_dir(Who::Root);
    let ctx = context(&[(
        "Dockerfile",
        "FROM scratch\nCOPY Dockerfile /\nRUN --security=insecure true\n",
    )]);
    let out = shmocker(
        Who::Root,
        store.path(),
        &[
            "build",
            "--network",
            "private",
            "--allow-host",
            "deb.debian.org:443",
            "--allow",
            "security.insecure",
            ctx.path().to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("Dockerfile:3")
            && err.contains("RUN --security=insecure cannot run in a build with --allow-host"),
        "{err}"
    );
}

#[test]
fn private_without_allow_list_reaches_any_port_of_the_runner() {
    let (a, _) = serve_http("a\n");
    let (b, _) = serve_http("b\n");
    let dockerfile = format!(
        "ARG BASE\nFROM ${{BASE}}\nRUN wget -q -O /a http://10.0.2.2:{a}/ && wget -q -O /b http://10.0.2.2:{b}/\n"
    );
    let store = scratch_dir(Who::Root);
    let (_w, rootfs, _) = build(
        Who::Root,
        store.path(),
        &dockerfile,
        &["--network", "private"],
    );
    assert_eq!(read(&rootfs, "a") + &read(&rootfs, "b"), "a\nb\n");
}

fn no_trace_of_proxies_or_the_allow_list(who: Who) {
    let (port, _) = serve_http("x\n");
    // The commands name no proxy, so any trace in the config would come from the build.
    let dockerfile =
        "ARG BASE\nFROM ${BASE}\nRUN env > /env.txt\nRUN --network=none env > /env-none.txt\n";
    let ctx = context(&[("Dockerfile", dockerfile)]);
    let store = scratch_dir(who);
    let reference = unique_ref("network-no-trace");
    let base = format!("BASE={}", env().busybox());
    let allow = format!("10.0.2.2:{port}");
    shmocker_ok(
        who,
        store.path(),
        &[
            "build",
            "--build-arg",
            &base,
            "--build-arg",
            "FTP_PROXY=ftp://ftp-proxy.test:21",
            "--build-arg",
            "HTTPS_PROXY=http://user-proxy.test:8080",
            "--network",
            "private",
            "--allow-host",
            &allow,
            "-t",
            &reference,
            "--push",
            ctx.path().to_str().unwrap(),
        ],
    );
    let work = scratch_dir(Who::Root);
    let rootfs = unpack(&format!("docker://{reference}"), work.path());
    let env_private = read(&rootfs, "env.txt");
    assert!(
        env_private.contains("HTTPS_PROXY=http://127.0.0.1:3128\n")
            && env_private.contains("FTP_PROXY=ftp://ftp-proxy.test:21\n"),
        "the step sees the filtering proxy and the proxy ARG:\n{env_private}"
    );
    let env_none = read(&rootfs, "env-none.txt");
    assert!(
        env_none.contains("HTTPS_PROXY=http://user-proxy.test:8080\n")
            && env_none.contains("FTP_PROXY=ftp://ftp-proxy.test:21\n"),
        "a step without the allow-list sees the proxy ARGs as given:\n{env_none}"
    );
    let config = common::remote_config(&reference).to_string();
    for needle in [
        "PROXY",
        "proxy",
        "3128",
        "ftp-proxy.test",
        "user-proxy.test",
        &allow,
        "allow",
    ] {
        assert!(
            !config.contains(needle),
            "{needle:?} in the pushed config: {config}"
        );
    }
    assert!(config.contains("\"history\""), "{config}");
}

#[test]
fn no_trace_of_proxies_or_the_allow_list_as_root() {
    no_trace_of_proxies_or_the_allow_list(Who::Root);
}

#[test]
fn no_trace_of_proxies_or_the_allow_list_as_user() {
    no_trace_of_proxies_or_the_allow_list(Who::User);
}

#[test]
fn allow_host_needs_network_private_and_forbids_run_network_host() {
    let store = scratch_dir(Who::Root);
    let ctx = context(&[(
        "Dockerfile",
        "FROM scratch\nCOPY Dockerfile /\nRUN --network=host true\n",
    )]);
    let out = shmocker(
        Who::Root,
        store.path(),
        &[
            "build",
            "--allow-host",
            "deb.debian.org",
            ctx.path().to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--allow-host only applies to --network private"),
        "{}",
        stderr(&out)
    );
    let out = shmocker(
        Who::Root,
        store.path(),
        &[
            "build",
            "--network",
            "private",
            "--allow-host",
            "bad host",
            ctx.path().to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a host name or IP address"),
        "{}",
        stderr(&out)
    );
    let out = shmocker(
        Who::Root,
        store.path(),
        &[
            "build",
            "--network",
            "private",
            "--allow-host",
            "deb.debian.org:443",
            ctx.path().to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Dockerfile:3") && stderr(&out).contains("would bypass --allow-host"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn private_without_slirp4netns_fails_at_the_start_with_the_fix() {
    let store = scratch_dir(Who::Root);
    let empty = scratch_dir(Who::Root);
    let ctx = context(&[("Dockerfile", "FROM scratch\nCOPY Dockerfile /\n")]);
    let out = Command::new(common::binary())
        .env("PATH", empty.path())
        .arg("--root")
        .arg(store.path())
        .args(["build", "--network", "private"])
        .arg(ctx.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("slirp4netns, which is not on PATH")
            && stderr(&out).contains("apt-get install slirp4netns"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn detect_reports_the_network_stack() {
    let store = scratch_dir(Who::User);
    let out = shmocker_ok(Who::User, store.path(), &["detect", "--format", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let net = &report["network"];
    assert!(
        net["slirp4netns"]["version"]
            .as_str()
            .is_some_and(|v| v.starts_with("slirp4netns version")),
        "slirp4netns missing or without a version (tests/env/setup.sh installs it): {net}"
    );
    assert_eq!(net["dev_net_tun"]["ok"], true, "{net}");
    assert_eq!(net["private"], true, "{net}");
    assert!(net["fix"].is_null(), "{net}");
    assert!(report["probes"].is_array(), "existing keys stay");
    let text = shmocker_ok(Who::User, store.path(), &["detect"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("--network private: available"), "{text}");
}

#[test]
fn run_network_private_without_slirp4netns_fails_at_its_line_with_the_fix() {
    // As root nothing else of PATH is needed (no newuidmap; kernel overlayfs).
    let store = scratch_dir(Who::Root);
    let empty = scratch_dir(Who::Root);
    let ctx = context(&[(
        "Dockerfile",
        &format!(
            "FROM {}\nRUN true\nRUN --network=private true\n",
            env().busybox()
        ),
    )]);
    let out = Command::new(common::binary())
        .env("PATH", empty.path())
        .arg("--root")
        .arg(store.path())
        .args(["build", "--snapshotter", "overlayfs"])
        .arg(ctx.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("Dockerfile:3") && err.contains("apt-get install slirp4netns"),
        "{err}"
    );
}
