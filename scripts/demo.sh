#!/usr/bin/env bash
# A real build on a fresh Debian 12 machine, as root: installs what is needed, starts a registry
# on 127.0.0.1:5055, builds shmocker, and then, as the unprivileged user shmocker-test, builds
# examples/hello (RUN steps in a rootless user namespace) and pushes it. Prints the pushed image.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/env/setup.sh
cargo build --locked --release --bin shmocker
SHMOCKER_BIN="$PWD/target/release/shmocker" tests/env/setup.sh
# shellcheck disable=SC1091
. /var/tmp/shmocker-testenv/env
bin=/var/tmp/shmocker-testenv/bin/shmocker-demo
ctx=/var/tmp/shmocker-testenv/contexts/hello
install -D -m 0755 target/release/shmocker "$bin"
rm -rf "$ctx" && mkdir -p "$ctx" && cp -a examples/hello/. "$ctx/" && chmod -R a+rX "$ctx"
image="$SHMOCKER_TEST_REGISTRY/demo/hello:1"
runuser -u "$SHMOCKER_TEST_USER" -- env HOME="/home/$SHMOCKER_TEST_USER" \
    "$bin" build -t "$image" --push "$ctx"
skopeo inspect --tls-verify=false "docker://$image" | jq '{Name, Digest, Layers}'
