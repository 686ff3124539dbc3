#!/usr/bin/env bash
# Build the peer image and start the two peers; with --wait SECONDS, also wait for the CHILD_SA.
#   BTNS_DATAPLANE=libipsec BTNS_AUTH=pubkey scripts/compose/up.sh [--wait 60] [--no-build]
# --no-build reuses the image as it is (built only if missing).
set -euo pipefail
# shellcheck source=scripts/compose/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

wait_secs=""
build=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --wait) wait_secs="${2:?--wait needs seconds}"; shift 2 ;;
        --no-build) build=no; shift ;;
        *) echo "usage: $0 [--wait SECONDS] [--no-build]" >&2; exit 2 ;;
    esac
done

"$(dirname "${BASH_SOURCE[0]}")/setup.sh" --check

# pip inside the build must trust what this host trusts for PyPI (e.g. a TLS-intercepting
# egress proxy whose CA was added locally). Set BTNS_EXTRA_CA_PEM= (empty) to pass none.
if [ -z "${BTNS_EXTRA_CA_PEM+set}" ]; then
    shopt -s nullglob
    extra=(/usr/local/share/ca-certificates/*.crt)
    shopt -u nullglob
    BTNS_EXTRA_CA_PEM="$(if [ "${#extra[@]}" -gt 0 ]; then cat "${extra[@]}"; fi)"
fi
export BTNS_EXTRA_CA_PEM

if [ -n "$(btns_engine ps -aq --filter "label=com.docker.compose.project=${BTNS_COMPOSE_PROJECT}")" ]; then
    btns_log "project ${BTNS_COMPOSE_PROJECT} exists: taking it down first"
    "$(dirname "${BASH_SOURCE[0]}")/down.sh"
fi

btns_save_sysctls
t0=${EPOCHREALTIME}
log="${BTNS_COMPOSE_CACHE}/${BTNS_COMPOSE_PROJECT}"
if [ "${build}" = yes ] || ! btns_image_exists localhost/btns-cmp-peer:latest; then
    if [ "${BTNS_ENGINE}" = podman ]; then
        # One build at a time (podman-compose would build alice's and bob's identical image in
        # parallel), on the host network (RUN steps then leave podman's default bridge alone).
        btns_compose --parallel 1 --podman-build-args=--network=host build >"${log}.build.log" 2>&1 \
            || { tail -n 40 "${log}.build.log" >&2; exit 1; }
    else
        # Both services name the same image: build it once (the file asks for the host network).
        # Compose v2 can exit 0 after a failed build (seen with 2.40.3 against podman's Docker API):
        # the log is checked too.
        before="$(btns_engine image inspect --format '{{.Id}}' localhost/btns-cmp-peer:latest 2>/dev/null || true)"
        if ! btns_compose build alice >"${log}.build.log" 2>&1 \
            || grep -qE '(^|[^A-Za-z])(ERROR|Error:|error:)|level=error|failed to solve' "${log}.build.log" \
            || ! btns_image_exists localhost/btns-cmp-peer:latest; then
            tail -n 40 "${log}.build.log" >&2
            exit 1
        fi
        after="$(btns_engine image inspect --format '{{.Id}}' localhost/btns-cmp-peer:latest 2>/dev/null || true)"
        [ "${before}" != "${after}" ] || btns_log "build left the image as it was (all layers cached)"
    fi
    btns_log "built in $(btns_since "${t0}") s"
    # Earlier builds' images that this one replaced and the untagged deps stage (it saw the
    # build-time CA): only ours, by the label the Dockerfile sets.
    if ! btns_engine image prune -f --filter label=btns.testbed=btns-cmp >/dev/null 2>"${log}.prune.log"; then
        sleep 1  # an engine may still be removing the build's containers
        btns_engine image prune -f --filter label=btns.testbed=btns-cmp >/dev/null 2>"${log}.prune.log" \
            || btns_log "warning: could not prune the untagged build stages: $(tail -n 1 "${log}.prune.log")"
    fi
fi
t1=${EPOCHREALTIME}
btns_compose up -d >"${log}.up.log" 2>&1 || { cat "${log}.up.log" >&2; exit 1; }
btns_log "up -d in $(btns_since "${t1}") s (dataplane ${BTNS_DATAPLANE}, auth ${BTNS_AUTH})"
if [ -n "${wait_secs}" ]; then
    "$(dirname "${BASH_SOURCE[0]}")/check.sh" --wait "${wait_secs}" --quiet
    btns_log "CHILD_SA installed on both peers $(btns_since "${t1}") s after the start of up -d"
fi
