#!/usr/bin/env bash
# The main job: set everything up, then run the two-peer demo: a TCP connection whose two ends
# demand encryption and BTNS with set_socket_pToken, both ends' pTokens and iTokens printed and
# checked to agree. On the compose testbed (docker/: two containers, podman or docker) when a
# container engine is usable, else on the network-namespace testbed (two charons in netns).
#
#   scripts/demo.sh [--compose | --netns] [OPTIONS]
#     --compose   the compose testbed only (fail when no engine is usable)
#     --netns     the network-namespace testbed only
#     OPTIONS     compose: --keep --no-build --engine podman|docker --dataplane xfrm|libipsec
#                 netns:   --ipv6
#   Environment: BTNS_ENGINE=podman|docker; BTNS_DATAPLANE=xfrm|libipsec (compose; default xfrm
#   when this kernel can do ESP, else libipsec).
# Exit 0 when every check passes, 1 when a check or the connection failed, 2 when the demo cannot run
# here, 3 when the compose testbed did not come up (--compose; otherwise the netns demo runs instead).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'demo: %s\n' "$*" >&2; }

want=auto
args=()
for arg in "$@"; do
    case "${arg}" in
        --compose) want=compose ;;
        --netns) want=netns ;;
        -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) args+=("${arg}") ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    say "must run as root: it installs Debian packages and runs strongSwan in network namespaces or containers"
    exit 2
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    say "needs a Debian (12) machine: apt-get and dpkg-query are missing"
    exit 2
fi

scripts/setup.sh
if [ ! -x /usr/lib/ipsec/charon ] || ! command -v swanctl >/dev/null 2>&1; then
    say "strongSwan (charon, swanctl) is not installed although setup ran: see its output above"
    exit 2
fi

# Sets ENGINE to the engine the compose demo will use and returns 0, or sets WHY and returns 1.
ENGINE=""
WHY=""
compose_engine() {
    local engine="${BTNS_ENGINE:-}"
    if [ -z "${engine}" ]; then
        if command -v podman >/dev/null 2>&1; then
            engine=podman
        elif command -v docker >/dev/null 2>&1; then
            engine=docker
        else
            WHY="neither podman nor docker is installed"
            return 1
        fi
    fi
    case "${engine}" in
        podman)
            command -v podman >/dev/null 2>&1 || { WHY="podman is not installed"; return 1; }
            # podman-compose, the engine settings and the base image (idempotent, quick when done).
            scripts/compose/setup.sh || { WHY="scripts/compose/setup.sh failed (see above)"; return 1; }
            CONTAINERS_CONF="${CONTAINERS_CONF:-${BTNS_COMPOSE_CACHE:-/var/cache/btns-compose}/containers.conf}" \
                podman info >/dev/null 2>&1 || { WHY="podman does not work here (podman info failed)"; return 1; }
            ;;
        docker)
            command -v docker >/dev/null 2>&1 || { WHY="docker is not installed"; return 1; }
            docker compose version >/dev/null 2>&1 || { WHY="docker has no compose plugin"; return 1; }
            docker info >/dev/null 2>&1 || { WHY="the docker engine does not answer (docker info failed)"; return 1; }
            ;;
        *) WHY="BTNS_ENGINE must be podman or docker, not '${engine}'"; return 1 ;;
    esac
    ENGINE="${engine}"
}

if [ "${want}" != netns ]; then
    if compose_engine; then
        say "running the demo on the compose testbed (${ENGINE})"
        rc=0
        .venv/bin/python -m btns_lab.compose --engine "${ENGINE}" ${args[@]+"${args[@]}"} || rc=$?
        # 2: it cannot run here, 3: the testbed did not come up; anything else is the demo's verdict.
        if { [ "${rc}" -ne 2 ] && [ "${rc}" -ne 3 ]; } || [ "${want}" = compose ]; then
            exit "${rc}"
        fi
        say "the compose testbed is not usable here (see above): running the demo on the network-namespace testbed"
    elif [ "${want}" = compose ]; then
        say "no usable container engine for the compose demo: ${WHY}"
        exit 2
    else
        say "no usable container engine (${WHY}): running the demo on the network-namespace testbed"
    fi
else
    say "running the demo on the network-namespace testbed (--netns)"
fi
exec .venv/bin/python -m btns_lab.demo ${args[@]+"${args[@]}"}
