#!/usr/bin/env bash
# tests/env/teardown.sh — stop the test registries started by setup.sh.
#
#   teardown.sh           stop the registries (by their pid files); keep the
#                         state dir (certificates, password, registry storage,
#                         build contexts), so the next setup.sh is fast and
#                         the credentials stay the same.
#   teardown.sh --purge   also delete the state dir and the CA copies that
#                         setup.sh installed under /etc/{containers,docker}/certs.d.
#
# It never kills a process that setup.sh did not start: a pid is only
# signalled if its command line names the config file in the state dir.
# The Debian packages, the user shmocker-test and the buildah configuration
# are left in place.
set -euo pipefail

STATE_DIR=${SHMOCKER_TESTENV_DIR:-/var/tmp/shmocker-testenv}
TLS_ADDR=127.0.0.1:5056
PURGE=0

log() { printf 'teardown: %s\n' "$*"; }
die() { printf 'teardown: ERROR: %s\n' "$*" >&2; exit 1; }

for arg in "$@"; do
    case $arg in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--purge])" ;;
    esac
done

case $STATE_DIR in
    /*) ;;
    *) die "SHMOCKER_TESTENV_DIR must be an absolute path: $STATE_DIR" ;;
esac
[[ $STATE_DIR != / ]] || die "refusing to use / as the state dir"

stop_registry() {
    local name=$1 dir pidfile pid
    dir=$STATE_DIR/registry-$name
    pidfile=$dir/pid
    if [[ ! -f $pidfile ]]; then
        log "registry $name: not started by setup.sh (no pid file)"
        return
    fi
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/cmdline ]] &&
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$dir/config.yml"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            [[ -d /proc/$pid ]] || break
            sleep 0.1
        done
        if [[ -d /proc/$pid ]]; then
            kill -9 "$pid" 2>/dev/null || true
            sleep 0.2
        fi
        [[ ! -d /proc/$pid ]] || die "registry $name (pid $pid) did not stop"
        log "registry $name: stopped (pid $pid)"
    else
        log "registry $name: not running (stale pid file)"
    fi
    rm -f "$pidfile"
}

if [[ ! -d $STATE_DIR ]]; then
    log "nothing to do ($STATE_DIR does not exist)"
    exit 0
fi
[[ $EUID -eq 0 ]] || die "must be run as root"

# Do not race a running setup.sh.
exec 9>>"$STATE_DIR/.lock"
flock -w 600 9 || die "setup.sh holds $STATE_DIR/.lock"

stop_registry plain
stop_registry tls

if ((PURGE)); then
    for d in /etc/{containers,docker}/certs.d/{"$TLS_ADDR","localhost:${TLS_ADDR##*:}"}; do
        rm -f "$d/ca.crt"
        rmdir "$d" 2>/dev/null || true
    done
    rm -rf "$STATE_DIR"
    log "purged $STATE_DIR"
fi
