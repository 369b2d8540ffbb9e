#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine, as root. Sets up what the tests need
# (Debian packages, two registries on 127.0.0.1, an unprivileged user with subordinate IDs, base
# images built by shmocker itself), then runs every test. Extra arguments go to cargo nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
tests/env/setup.sh
# Every cargo feature is on (github-api's code is tested too), in the build and the tests alike.
cargo build --locked --all-features --bin shmocker
SHMOCKER_BIN="$PWD/target/debug/shmocker" tests/env/setup.sh
# The tests copy the binary where the unprivileged test user can run it; drop old copies.
find "${SHMOCKER_TESTENV_DIR:-/var/tmp/shmocker-testenv}/bin" -name 'shmocker-test-*' -mmin +60 -delete 2>/dev/null || true
cargo nextest run --locked --all-features --no-fail-fast "$@"
