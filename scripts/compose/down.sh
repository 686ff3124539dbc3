#!/usr/bin/env bash
# Stop and remove the testbed: containers, network, volumes; put back the host sysctls.
#   scripts/compose/down.sh [--rmi]   (--rmi also removes the peer image)
set -euo pipefail
# shellcheck source=scripts/compose/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

label="label=com.docker.compose.project=${BTNS_COMPOSE_PROJECT}"
# By the project label rather than `compose down --volumes`: same result, one engine
# call per kind instead of one per container (about 1 s instead of 3-5 s).
mapfile -t ids < <(btns_engine ps -aq --filter "${label}")
if [ "${#ids[@]}" -gt 0 ]; then
    if [ "${BTNS_ENGINE}" = podman ]; then
        podman rm -f -t 5 "${ids[@]}" >/dev/null
    else
        docker stop -t 5 "${ids[@]}" >/dev/null || true
        docker rm -f "${ids[@]}" >/dev/null
    fi
fi
mapfile -t vols < <(btns_engine volume ls -q --filter "${label}")
[ "${#vols[@]}" -eq 0 ] || btns_engine volume rm -f "${vols[@]}" >/dev/null
mapfile -t nets < <(btns_engine network ls --format '{{.Name}}' --filter "${label}")
for net in "${nets[@]}"; do
    bridge=""
    if [ "${BTNS_ENGINE}" = podman ]; then
        # With the CNI backend the bridge outlives its network: remove the one this network made.
        bridge="$(podman network inspect --format '{{.NetworkInterface}}' "${net}" 2>/dev/null || true)"
    fi
    btns_engine network rm "${net}" >/dev/null
    if [ -n "${bridge}" ] && ip link show "${bridge}" >/dev/null 2>&1; then
        ip link delete "${bridge}"
    fi
    # ... and so does its host-local IPAM state.
    case "${net}" in btns-cmp*) rm -rf "/var/lib/cni/networks/${net}" ;; esac
done
if [ "${1:-}" = "--rmi" ]; then
    btns_engine rmi -f localhost/btns-cmp-peer:latest >/dev/null 2>&1 || true
fi
btns_restore_sysctls
btns_log "project ${BTNS_COMPOSE_PROJECT} is down"
