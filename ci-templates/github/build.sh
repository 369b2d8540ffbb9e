#!/usr/bin/env bash
# The action's build step: `shmocker ci` with the inputs, which arrive as SHMOCKER_*
# environment variables. shmocker itself writes the outputs (imageid, digest, metadata) to
# $GITHUB_OUTPUT and the job summary to $GITHUB_STEP_SUMMARY.
set -euo pipefail
bin=${SHMOCKER_BIN:?the setup step found no shmocker}
args=(ci --provider github "${SHMOCKER_CONTEXT:-.}")
[[ -n "${SHMOCKER_FILE:-}" ]] && args+=(--file "$SHMOCKER_FILE")
# List inputs go as they are; shmocker splits them (tags on newlines and commas, the others on
# newlines only, as docker/build-push-action does).
[[ -n "${SHMOCKER_TAGS:-}" ]] && args+=(--tag "$SHMOCKER_TAGS")
[[ -n "${SHMOCKER_LABELS:-}" ]] && args+=(--label "$SHMOCKER_LABELS")
[[ -n "${SHMOCKER_BUILD_ARGS:-}" ]] && args+=(--build-arg "$SHMOCKER_BUILD_ARGS")
[[ -n "${SHMOCKER_OUTPUTS:-}" ]] && args+=(--output "$SHMOCKER_OUTPUTS")
[[ -n "${SHMOCKER_TARGET:-}" ]] && args+=(--target "$SHMOCKER_TARGET")
[[ -n "${SHMOCKER_CACHE_FROM:-}" ]] && args+=(--cache-from "$SHMOCKER_CACHE_FROM")
[[ -n "${SHMOCKER_CACHE_TO:-}" ]] && args+=(--cache-to "$SHMOCKER_CACHE_TO")
case "${SHMOCKER_NO_CACHE:-false}" in
  true) args+=(--no-cache) ;;
  false | "") ;;
  *)
    echo "::error title=shmocker::no-cache: expected true or false, got '$SHMOCKER_NO_CACHE'"
    exit 1
    ;;
esac
case "${SHMOCKER_PR_COMMENT:-false}" in
  true) args+=(--pr-comment) ;;
  false | "") ;;
  *)
    echo "::error title=shmocker::pr-comment: expected true or false, got '$SHMOCKER_PR_COMMENT'"
    exit 1
    ;;
esac
# secret-files: ID=PATH per line, as build-push-action takes them.
while IFS= read -r line; do
  [[ -z "${line// /}" ]] && continue
  id=${line%%=*}
  path=${line#*=}
  if [[ "$line" != *=* || -z "$id" || -z "$path" ]]; then
    echo "::error title=shmocker::secret-files: expected ID=PATH, got a line without one"
    exit 1
  fi
  args+=(--secret "id=$id,src=$path")
done <<<"${SHMOCKER_SECRET_FILES:-}"
case "${SHMOCKER_PUSH:-false}" in
  true) args+=(--push) ;;
  false | "") ;;
  *)
    echo "::error title=shmocker::push: expected true or false, got '$SHMOCKER_PUSH'"
    exit 1
    ;;
esac
exec "$bin" "${args[@]}"
