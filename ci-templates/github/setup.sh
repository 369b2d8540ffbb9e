#!/usr/bin/env bash
# The action's first step: refuse inputs shmocker cannot honour yet, find or install the
# shmocker binary, and make sure it may create user namespaces. Inputs arrive as SHMOCKER_*
# environment variables (never interpolated into this script). Writes `bin` to $GITHUB_OUTPUT.
set -euo pipefail

fail() {
  echo "::error title=shmocker::$1"
  exit 1
}

# Inputs named as docker/build-push-action names them but not supported by this version.
unsupported=()
[[ -n "${SHMOCKER_UNSUPPORTED_SECRETS:-}" ]] && unsupported+=("secrets (inline values; give files with secret-files)")
[[ -n "${SHMOCKER_UNSUPPORTED_PLATFORMS:-}" ]] && unsupported+=("platforms (the runner's own platform is built)")
if ((${#unsupported[@]})); then
  list=$(printf '%s, ' "${unsupported[@]}")
  fail "this version of shmocker does not support these inputs yet: ${list%, }. Remove them from the step's with: block."
fi

action_path=${SHMOCKER_ACTION_PATH:?SHMOCKER_ACTION_PATH is not set}

if [[ -n "${SHMOCKER_BINARY:-}" ]]; then
  bin=$SHMOCKER_BINARY
  [[ -x "$bin" ]] || fail "binary: $bin is not an executable file"
elif [[ -n "${SHMOCKER_VERSION:-}" ]]; then
  version=${SHMOCKER_VERSION#v}
  case "${RUNNER_ARCH:-$(uname -m)}" in
    X64 | x86_64) target=x86_64-unknown-linux-musl ;;
    ARM64 | aarch64) target=aarch64-unknown-linux-musl ;;
    *) fail "version: no shmocker release for runner architecture ${RUNNER_ARCH:-$(uname -m)} (x86_64 and aarch64 Linux only)" ;;
  esac
  [[ "${RUNNER_OS:-Linux}" == Linux ]] || fail "version: shmocker runs on Linux runners only (this one is ${RUNNER_OS})"
  table="$action_path/release-checksums.txt"
  want=$(awk -v v="$version" -v t="$target" '$1 == v && $2 == t { print $3 }' "$table")
  if [[ -z "$want" ]]; then
    if ! grep -qv '^[[:space:]]*\(#\|$\)' "$table"; then
      fail "version: $version cannot be installed: no shmocker release has been published yet (the checksum table release-checksums.txt in this action is empty). Build shmocker yourself and pass its path with binary:."
    fi
    fail "version: $version for $target is not in this action's checksum table (release-checksums.txt); use a listed version, or a newer action ref"
  fi
  dir="${RUNNER_TOOL_CACHE:-${RUNNER_TEMP:-/tmp}}/shmocker/$version/$target"
  bin="$dir/shmocker"
  if [[ ! -x "$bin" ]] || [[ "$(sha256sum "$bin" | cut -d' ' -f1)" != "$want" ]]; then
    mkdir -p "$dir"
    url="https://github.com/shmocker/shmocker/releases/download/v$version/shmocker-$target"
    echo "downloading $url"
    curl -fsSL --retry 3 -o "$dir/shmocker.download" "$url" || fail "version: downloading $url failed"
    got=$(sha256sum "$dir/shmocker.download" | cut -d' ' -f1)
    if [[ "$got" != "$want" ]]; then
      rm -f "$dir/shmocker.download"
      fail "version: $url has sha256 $got, but the checksum table says $want; refusing to run it"
    fi
    chmod 0755 "$dir/shmocker.download"
    mv "$dir/shmocker.download" "$bin"
  fi
elif command -v shmocker >/dev/null; then
  bin=$(command -v shmocker)
else
  fail "no shmocker: set version: (a release) or binary: (a path), or put shmocker on PATH"
fi
bin=$(realpath "$bin")

# Ubuntu 24.04 lets only AppArmor-profiled programs create user namespaces.
restrict=/proc/sys/kernel/apparmor_restrict_unprivileged_userns
fix=${SHMOCKER_USERNS_FIX:-auto}
case "$fix" in
  auto | profile | sysctl | none) ;;
  *) fail "userns-fix: $fix is not one of auto, profile, sysctl, none" ;;
esac
if [[ "$fix" != none && "$(id -u)" != 0 && -r "$restrict" && "$(cat "$restrict")" == 1 ]]; then
  if ! sudo -n true 2>/dev/null; then
    [[ "$fix" == auto ]] && echo "::warning title=shmocker::AppArmor restricts user namespaces here and sudo is not available; builds with RUN steps will fail"
    [[ "$fix" == auto ]] || fail "userns-fix: $fix needs sudo, which this runner does not allow"
  elif [[ "$fix" == sysctl ]]; then
    sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 >/dev/null
    echo "::notice title=shmocker::turned off kernel.apparmor_restrict_unprivileged_userns (userns-fix: sysctl) so that shmocker may create user namespaces"
  else
    name="shmocker-$(echo -n "$bin" | sha256sum | cut -c1-12)"
    printf 'abi <abi/4.0>,\ninclude <tunables/global>\nprofile %s %s flags=(unconfined) {\n  userns,\n}\n' "$name" "$bin" |
      sudo tee "/etc/apparmor.d/$name" >/dev/null
    sudo apparmor_parser -r "/etc/apparmor.d/$name"
    echo "::notice title=shmocker::installed the AppArmor profile /etc/apparmor.d/$name, which lets $bin (and only it) create user namespaces on this runner"
  fi
fi

"$bin" --version
echo "bin=$bin" >>"$GITHUB_OUTPUT"
