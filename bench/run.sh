#!/usr/bin/env bash
# bench/run.sh — shmocker against buildah on the corpus in bench/corpus/ (issue 7).
#
# Run as root on a machine prepared by tests/env/setup.sh (registry 127.0.0.1:5055 with
# base/busybox:1, the unprivileged user shmocker-test). Every build runs ROOTLESS as
# shmocker-test; root only prepares the contexts, the Debian base image and the stores.
#
#   cargo build --release && bench/run.sh                       # everything, 3 runs
#   bench/run.sh --runs 1 --entries tiny --pairs overlay        # a quick check
#
# Options (or the environment variable in brackets):
#   --runs N          runs per measurement, the table shows medians          [BENCH_RUNS=3]
#   --entries LIST    tiny files20k bigfile multistage debian steps40        [BENCH_ENTRIES]
#   --pairs LIST      storage pairs (below)                                  [BENCH_PAIRS]
#   --modes LIST      cold warm incremental push                             [BENCH_MODES]
#   --out FILE        the Markdown report (default WORK/results-STAMP.md)    [BENCH_OUT]
#   --work DIR        contexts, stores, logs (default /var/tmp/shmocker-bench) [BENCH_WORK]
#   --bin PATH        shmocker (default target/release/shmocker)             [SHMOCKER_BIN]
#   --pull POLICY     base-image pull policy for both tools: always, missing  [BENCH_PULL]
#                     or never, the same --pull=POLICY to both; empty
#                     (the default) leaves each tool its own default (shmocker: always,
#                     buildah 1.28: true, "if newer": it asks the registry too)
#
# Storage pairs, shmocker snapshotter against buildah's matching storage driver:
#   overlay  --snapshotter overlayfs       vs  --storage-driver overlay (native kernel overlay)
#   copy     --snapshotter copy            vs  --storage-driver vfs
#   fuse     --snapshotter fuse-overlayfs  vs  --storage-driver overlay with
#                                              overlay.mount_program=/usr/bin/fuse-overlayfs
#
# Modes, in this order for each entry, each tool with its own store per pair:
#   cold         the store emptied first: pull the base, run every step
#   warm         the same build again: every step cached
#   incremental  files20k only: one of the 20,000 files changed, then the build again
#   push         the warm build and a push to a fresh repository of 127.0.0.1:5055
#                (shmocker build --push; buildah bud --layers, then buildah push)
# shmocker and buildah alternate step by step (who goes first alternates per run), so the load
# of a shared machine hits both alike. Wall time, peak RSS and CPU time come from GNU time
# (`%e %M %U %S`: the RSS is the largest single process of the build, RUN steps included; the
# CPU time is user + system of the tool and every process it waited for, which a busy machine
# distorts less than the wall time).
#
# Any failed build stops the script with its log's tail and a non-zero exit.
set -euo pipefail
umask 022

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CORPUS=$ROOT_DIR/bench/corpus
RUNS=${BENCH_RUNS:-3}
ENTRIES=${BENCH_ENTRIES:-"tiny files20k bigfile multistage debian steps40"}
PAIRS=${BENCH_PAIRS:-"overlay copy fuse"}
MODES=${BENCH_MODES:-"cold warm incremental push"}
WORK=${BENCH_WORK:-/var/tmp/shmocker-bench}
SHMOCKER_SRC=${SHMOCKER_BIN:-$ROOT_DIR/target/release/shmocker}
OUT=${BENCH_OUT:-}
PULL=${BENCH_PULL:-}

REG=127.0.0.1:5055
TEST_USER=shmocker-test
TEST_HOME=/home/$TEST_USER
GEN_VERSION=1    # bump when gen.py's output changes

die() { printf 'bench: ERROR: %s\n' "$*" >&2; exit 1; }
log() { printf 'bench: %s\n' "$*" >&2; }

while (($#)); do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --entries) ENTRIES=$2; shift 2 ;;
        --pairs) PAIRS=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --bin) SHMOCKER_SRC=$2; shift 2 ;;
        --pull) PULL=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive number, not '$RUNS'"
for e in $ENTRIES; do
    [[ -f $CORPUS/$e/Dockerfile ]] || die "no corpus entry '$e' (bench/corpus/$e/Dockerfile)"
done
for p in $PAIRS; do
    case $p in overlay|copy|fuse) ;; *) die "unknown pair '$p' (overlay, copy, fuse)" ;; esac
done
case $PULL in
    '') SHMOCKER_PULL=(); BUILDAH_PULL=() ;;
    always|never) SHMOCKER_PULL=(--pull="$PULL"); BUILDAH_PULL=(--pull="$PULL") ;;
    missing) SHMOCKER_PULL=(--pull=missing); BUILDAH_PULL=(--pull=missing) ;;
    *) die "--pull must be always, missing or never, not '$PULL'" ;;
esac
for m in $MODES; do
    case $m in cold|warm|incremental|push) ;; *) die "unknown mode '$m'" ;; esac
done

# ------------------------------------------------------------------ checks
[[ $EUID -eq 0 ]] || die "run as root (builds run rootless as $TEST_USER via runuser)"
id "$TEST_USER" >/dev/null 2>&1 || die "no user $TEST_USER: run tests/env/setup.sh first"
for tool in buildah runc fuse-overlayfs python3 curl runuser debootstrap tar; do
    command -v "$tool" >/dev/null || die "'$tool' not found (apt-get install ${tool/runuser/util-linux})"
done
[[ -x /usr/bin/time ]] || die "GNU time not found at /usr/bin/time (apt-get install time)"
[[ -x $SHMOCKER_SRC ]] || die "no shmocker binary at $SHMOCKER_SRC (cargo build --release, or --bin)"
[[ $(curl -s -o /dev/null -w '%{http_code}' "http://$REG/v2/") == 200 ]] \
    || die "registry $REG does not answer: run tests/env/setup.sh"

MANIFEST_ACCEPT='application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json'
have_image() { # REPO TAG
    [[ $(curl -s -o /dev/null -w '%{http_code}' -H "Accept: $MANIFEST_ACCEPT" \
        "http://$REG/v2/$1/manifests/$2") == 200 ]]
}
have_image base/busybox 1 \
    || die "$REG/base/busybox:1 is missing: run SHMOCKER_BIN=$SHMOCKER_SRC tests/env/setup.sh"

TUID=$(id -u "$TEST_USER")
TGRP=$(id -gn "$TEST_USER")
RUNTIME_DIR=/run/user/$TUID
install -d -m 0755 -o "$TEST_USER" -g "$TGRP" "$WORK" "$WORK/bin" "$WORK/ctx" "$WORK/store" \
    "$WORK/logs" "$WORK/tmp"
[[ -d $RUNTIME_DIR ]] || install -d -m 0700 -o "$TEST_USER" -g "$TGRP" "$RUNTIME_DIR"
# One run per work dir: they would share the stores and the binary.
exec 9>"$WORK/.lock"
flock -n 9 || die "another bench/run.sh is using $WORK (pass --work DIR to run one beside it)"
# The test user may not be able to read the worktree: run a copy.
SHMOCKER=$WORK/bin/shmocker
install -m 0755 "$SHMOCKER_SRC" "$SHMOCKER"

as_test_user() {
    runuser -u "$TEST_USER" -- env -i PATH=/usr/local/bin:/usr/bin:/bin \
        HOME="$TEST_HOME" USER="$TEST_USER" LOGNAME="$TEST_USER" \
        XDG_RUNTIME_DIR="$RUNTIME_DIR" "$@"
}

# ------------------------------------------------------------ the contexts
prepare_contexts() {
    local stamp=$WORK/ctx/.generated-v$GEN_VERSION e
    if [[ ! -f $stamp ]]; then
        log "generating the contexts in $WORK/ctx (200 MB of small files, 16 MiB of seeds)"
        rm -rf "$WORK/ctx/files20k" "$WORK/ctx/bigfile"
        as_test_user python3 "$CORPUS/gen.py" "$WORK/ctx" || die "bench/corpus/gen.py failed"
        touch "$stamp"
    fi
    for e in $ENTRIES; do
        install -d -m 0755 -o "$TEST_USER" -g "$TGRP" "$WORK/ctx/$e"
        install -m 0644 -o "$TEST_USER" -g "$TGRP" "$CORPUS/$e/Dockerfile" "$WORK/ctx/$e/Dockerfile"
    done
}

# The Debian base: debootstrap once (cached as rootfs.tar), built as root with shmocker from
# scratch and pushed to $REG/base/debian:bookworm once.
prepare_debian_base() {
    have_image base/debian bookworm && return
    local dir=$WORK/debian
    install -d -m 0700 "$dir" "$dir/ctx"
    if [[ ! -s $dir/rootfs.tar ]]; then
        if [[ ! -x $dir/rootfs.tmp/bin/bash ]]; then
            log "debootstrap --variant=minbase bookworm (once; cached in $dir)"
            rm -rf "$dir/rootfs.tmp"
            debootstrap --variant=minbase bookworm "$dir/rootfs.tmp" http://deb.debian.org/debian \
                >"$dir/debootstrap.log" 2>&1 || { tail -20 "$dir/debootstrap.log" >&2; die "debootstrap failed"; }
        fi
        tar --numeric-owner --xattrs -C "$dir/rootfs.tmp" -cf "$dir/rootfs.tar.tmp" . \
            || die "tar of the debootstrap root failed"
        mv "$dir/rootfs.tar.tmp" "$dir/rootfs.tar"
    fi
    cp "$CORPUS/debian-base/Dockerfile" "$dir/ctx/Dockerfile"
    ln -f "$dir/rootfs.tar" "$dir/ctx/rootfs.tar"
    log "building and pushing $REG/base/debian:bookworm (as root, FROM scratch + ADD rootfs.tar)"
    "$SHMOCKER" build --root "$dir/store" --progress plain -t "$REG/base/debian:bookworm" --push \
        "$dir/ctx" >"$dir/build.log" 2>&1 || { tail -30 "$dir/build.log" >&2; die "building the Debian base failed"; }
}

# ------------------------------------------------------------- the builds

shmocker_snapshotter() {
    case $1 in overlay) echo overlayfs ;; copy) echo copy ;; fuse) echo fuse-overlayfs ;; esac
}
buildah_storage() { # PAIR -> the global options in BUILDAH_STORAGE
    case $1 in
        overlay) BUILDAH_STORAGE=(--storage-driver overlay) ;;
        copy) BUILDAH_STORAGE=(--storage-driver vfs) ;;
        fuse) BUILDAH_STORAGE=(--storage-driver overlay
                  --storage-opt overlay.mount_program=/usr/bin/fuse-overlayfs) ;;
    esac
}

reset_store() { # TOOL PAIR
    local store=$WORK/store/$1-$2
    rm -rf "$store" "$RUNTIME_DIR/bench-$1-$2"
    install -d -m 0700 -o "$TEST_USER" -g "$TGRP" "$store"
}

# timed TOOL PAIR ENTRY MODE RUN CMD...: one measured command as the test user; appends
# "pair tool entry mode run seconds kilobytes cpu-seconds" to $RESULTS; dies with the log on
# failure.
timed() {
    local tool=$1 pair=$2 entry=$3 mode=$4 run=$5; shift 5
    local name=$pair-$tool-$entry-$mode-r$run
    local logf=$WORK/logs/$STAMP/$name.log tf=$WORK/tmp/$name.time
    rm -f "$tf"
    install -m 0644 -o "$TEST_USER" -g "$TGRP" /dev/null "$logf"
    if ! as_test_user /usr/bin/time -f '%e %M %U %S' -o "$tf" "$@" >"$logf" 2>&1; then
        printf '\n---- %s (%s) ----\n' "$logf" "$*" >&2
        tail -n 40 "$logf" >&2
        die "build failed: $tool $mode $entry ($pair, run $run); full log: $logf"
    fi
    local secs kb user sys cpu
    read -r secs kb user sys < <(tail -n 1 "$tf")
    [[ $secs =~ ^[0-9.]+$ && $kb =~ ^[0-9]+$ && $user =~ ^[0-9.]+$ && $sys =~ ^[0-9.]+$ ]] \
        || die "cannot read GNU time's output in $tf"
    cpu=$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.2f", u + s }')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$pair" "$tool" "$entry" "$mode" "$run" "$secs" "$kb" "$cpu" >>"$RESULTS"
    log "$(printf '%-8s %-8s %-10s %-11s run %s: %6ss %7s KB %6ss CPU' "$pair" "$tool" "$entry" "$mode" "$run" "$secs" "$kb" "$cpu")"
}

# build TOOL PAIR ENTRY MODE RUN
build() {
    local tool=$1 pair=$2 entry=$3 mode=$4 run=$5
    local store=$WORK/store/$tool-$pair ctx=$WORK/ctx/$entry
    local repo=bench/$tool-$pair-$entry-r$run-$STAMP
    if [[ $tool == shmocker ]]; then
        local args=(build --root "$store" --snapshotter "$(shmocker_snapshotter "$pair")"
            --progress plain "${SHMOCKER_PULL[@]}")
        if [[ $mode == push ]]; then
            args+=(-t "$REG/$repo:1" --push)
        else
            args+=(-t "bench/$entry")
        fi
        timed "$tool" "$pair" "$entry" "$mode" "$run" "$SHMOCKER" "${args[@]}" "$ctx"
    else
        buildah_storage "$pair"
        local gl=(--root "$store" --runroot "$RUNTIME_DIR/bench-$tool-$pair" "${BUILDAH_STORAGE[@]}")
        if [[ $mode == push ]]; then
            # shellcheck disable=SC2016 # expanded by the inner sh
            timed "$tool" "$pair" "$entry" "$mode" "$run" sh -c \
                'img=$1 dest=$2 ctx=$3 pull=$4; shift 4
                 buildah "$@" bud --layers --runtime runc --network host --tls-verify=false \
                     ${pull:+"$pull"} -t "$img" "$ctx" >&2 \
                 && exec buildah "$@" push --tls-verify=false "$img" "$dest"' \
                sh "bench/$entry" "docker://$REG/$repo:1" "$ctx" "${BUILDAH_PULL[0]:-}" "${gl[@]}"
        else
            timed "$tool" "$pair" "$entry" "$mode" "$run" buildah "${gl[@]}" bud --layers \
                --runtime runc --network host --tls-verify=false "${BUILDAH_PULL[@]}" \
                -t "bench/$entry" "$ctx"
        fi
    fi
}

# bench_entry PAIR ENTRY RUN: every mode, the two tools alternating.
bench_entry() {
    local pair=$1 entry=$2 run=$3 mode tool tools
    if ((run % 2)); then tools="shmocker buildah"; else tools="buildah shmocker"; fi
    for tool in $tools; do reset_store "$tool" "$pair"; done
    for mode in cold warm incremental push; do
        [[ $mode == incremental && $entry != files20k ]] && continue
        if [[ $mode == incremental ]]; then
            # One file of 20,000 changes (content and mtime), the same change for both tools.
            printf 'changed in %s run %s\n' "$pair" "$run" >>"$WORK/ctx/files20k/files/d100/f10000"
        fi
        for tool in $tools; do
            if [[ " $MODES " == *" $mode "* ]]; then
                build "$tool" "$pair" "$entry" "$mode" "$run"
            elif [[ $mode == cold ]]; then
                # Not measured, but the later modes need a built store.
                build "$tool" "$pair" "$entry" prime "$run"
            fi
        done
    done
}

machine() {
    local cpu mem
    cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
    mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    printf -- '- CPU: %s cores, %s; %s RAM\n' "$(nproc)" "$cpu" "$mem"
    # shellcheck disable=SC1091
    printf -- '- kernel %s; %s\n' "$(uname -r)" "$(. /etc/os-release && echo "$PRETTY_NAME")"
    printf -- '- store filesystem: %s\n' "$(df -T "$WORK" | awk 'NR == 2 { print $2 }')"
    printf -- '- shmocker %s (release build, git %s); %s; runc %s; fuse-overlayfs %s\n' \
        "$("$SHMOCKER" --version | awk '{ print $2 }')" \
        "$(git -C "$ROOT_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "$(buildah --version | awk '{ print $1, $3 }')" \
        "$(runc --version | awk 'NR == 1 { print $3 }')" \
        "$(fuse-overlayfs --version 2>&1 | awk '/fuse-overlayfs/ { print $3; exit }')"
}

# ------------------------------------------------------------------- main
STAMP=$(date -u +%Y%m%d%H%M%S)
RESULTS=$WORK/results-$STAMP.tsv
OUT=${OUT:-$WORK/results-$STAMP.md}
install -d -m 0755 -o "$TEST_USER" -g "$TGRP" "$WORK/logs/$STAMP"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
prepare_contexts
[[ " $ENTRIES " == *" debian "* ]] && prepare_debian_base
: >"$RESULTS"
START=$(date -u +'%Y-%m-%d %H:%M UTC')
for run in $(seq 1 "$RUNS"); do
    for pair in $PAIRS; do
        for entry in $ENTRIES; do
            bench_entry "$pair" "$entry" "$run"
        done
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
for pair in $PAIRS; do for tool in shmocker buildah; do reset_store "$tool" "$pair"; done; done

{
    printf '## Run of %s\n\n' "$START"
    machine
    printf -- '- load average (1, 5, 15 min) before: %s; after: %s\n' "$LOAD_BEFORE" "$LOAD_AFTER"
    # shellcheck disable=SC2016 # Markdown backquotes
    printf -- '- `bench/run.sh --runs %s --entries "%s" --pairs "%s" --modes "%s" --pull "%s"`\n' \
        "$RUNS" "$ENTRIES" "$PAIRS" "$MODES" "$PULL"
    printf -- '- pull policy: shmocker %s, buildah %s\n\n' "${SHMOCKER_PULL[*]:-default (always)}" \
        "${BUILDAH_PULL[*]:-default (--pull=true)}"
    python3 "$ROOT_DIR/bench/report.py" "$RESULTS"
} >"$OUT"
chown "$TEST_USER:$TGRP" "$OUT" 2>/dev/null || true
log "raw figures: $RESULTS"
log "report: $OUT"
cat "$OUT"
