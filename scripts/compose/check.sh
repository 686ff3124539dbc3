#!/usr/bin/env bash
# Show the SAs of both peers; exit 0 only when both have an ESTABLISHED IKE_SA and an INSTALLED CHILD_SA.
#   scripts/compose/check.sh [--wait SECONDS] [--quiet]
set -euo pipefail
# shellcheck source=scripts/compose/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

wait_secs=0
quiet=no
while [ $# -gt 0 ]; do
    case "$1" in
        --wait) wait_secs="${2:?--wait needs seconds}"; shift 2 ;;
        --quiet) quiet=yes; shift ;;
        *) echo "usage: $0 [--wait SECONDS] [--quiet]" >&2; exit 2 ;;
    esac
done

both_up() {
    local svc id out
    for svc in alice bob; do
        id="$(btns_container "${svc}")"
        [ -n "${id}" ] || return 1
        out="$(btns_engine exec "${id}" swanctl --list-sas --ike btns 2>/dev/null)" || return 1
        grep -q ESTABLISHED <<<"${out}" && grep -q INSTALLED <<<"${out}" || return 1
    done
}

deadline=$((SECONDS + wait_secs))
until both_up; do
    if [ "${SECONDS}" -ge "${deadline}" ]; then
        echo "compose testbed ${BTNS_COMPOSE_PROJECT}: no established IKE_SA + installed CHILD_SA on both peers" >&2
        for svc in alice bob; do
            id="$(btns_container "${svc}" -a)"
            if [ -z "${id}" ]; then echo "--- ${svc}: no container ---" >&2; continue; fi
            echo "--- ${svc}: $(btns_engine ps -a --format '{{.Names}} {{.Status}}' --filter "id=${id}") ---" >&2
            [ -z "$(btns_container "${svc}")" ] || btns_engine exec "${id}" swanctl --list-sas >&2 2>&1 || true
            [ -z "${id}" ] || btns_engine logs --tail 30 "${id}" >&2 2>&1 || true
        done
        exit 1
    fi
    sleep 0.2
done
if [ "${quiet}" = no ]; then
    for svc in alice bob; do
        echo "--- ${svc} ---"
        btns_engine exec "$(btns_container "${svc}")" swanctl --list-sas
    done
fi
