#!/usr/bin/env bash
# One strongSwan peer of the compose testbed (docker/docker-compose.yml).
#
# Environment:
#   BTNS_NAME, BTNS_PEER            this peer's and the other peer's names (alice, bob)
#   BTNS_LOCAL_ADDR, BTNS_PEER_ADDR their addresses on the testbed network
#   BTNS_INBOUND_FILTER             yes (default) | no: libipsec only, see README "Inbound filter"
#   BTNS_INITIATOR=yes|no           whether this peer brings the SAs up (the other one responds)
#   BTNS_DATAPLANE=xfrm|libipsec    kernel ESP in transport mode | userspace ESP in tunnel mode
#   BTNS_AUTH=pubkey|psk|x509       BTNS raw public keys | pre-shared key | certificates from a testbed CA
#   BTNS_PSK                        optional fixed PSK (else one is made and kept on the shared volume)
#   BTNS_CONN=yes|no                yes: load (and, on the initiator, bring up) the operator conn `btns`;
#                                   no: charon only, no credentials or conn: programs build their own
#                                   connections with btns_vici (set_socket_pToken), as the demo does
#   BTNS_LEAP=yes|no                yes (needs BTNS_CONN=no): also run `btnsd --leap-of-faith` (README
#                                   "Leap of faith"): unprivileged programs get BTNS with a peer nobody
#                                   configured, keys learned over udp/5386 (the inbound filter lets it in)
#
# Credentials are made at first start and exchanged through the shared volume (/shared);
# the conn is (re)loaded whenever what it needs from the peer appears or changes.
set -euo pipefail

: "${BTNS_NAME:?set BTNS_NAME}" "${BTNS_PEER:?set BTNS_PEER}"
: "${BTNS_LOCAL_ADDR:?set BTNS_LOCAL_ADDR}" "${BTNS_PEER_ADDR:?set BTNS_PEER_ADDR}"
BTNS_INITIATOR="${BTNS_INITIATOR:-no}"
BTNS_DATAPLANE="${BTNS_DATAPLANE:-xfrm}"
BTNS_AUTH="${BTNS_AUTH:-pubkey}"
BTNS_PSK="${BTNS_PSK:-}"
BTNS_CONN="${BTNS_CONN:-yes}"
BTNS_LEAP="${BTNS_LEAP:-no}"
SHARED="${BTNS_SHARED:-/shared}"
CONF=/etc/btns/conf
SWANCTL=/etc/swanctl

log() { printf '[btns %s] %s\n' "${BTNS_NAME}" "$*" >&2; }
die() { log "error: $*"; exit 1; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

# Write stdin to $1 atomically (readers never see half a file).
publish() { local tmp; tmp="$1.tmp.$$"; cat >"${tmp}"; mv -f "${tmp}" "$1"; }
# Wait up to $2 seconds for file $1.
await_file() { local i; for ((i = 0; i < $2 * 10; i++)); do [ -s "$1" ] && return 0; sleep 0.1; done; return 1; }

render() { # template output KEY=VALUE...
    python3 - "$@" <<'PY'
import os, re, sys
src, dst, *pairs = sys.argv[1:]
text = open(src).read()
for pair in pairs:
    key, value = pair.split("=", 1)
    text = text.replace(f"@{key}@", value)
left = re.findall(r"@[A-Z_]+@", text)
if left:
    sys.exit(f"{src}: placeholders left unfilled: {left}")
fd = os.open(dst + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    f.write(text)
os.replace(dst + ".tmp", dst)
PY
}

case "${BTNS_DATAPLANE}" in
    xfrm)
        mode=transport
        # Fail fast on a kernel without ESP (the state add also autoloads esp4 where it exists);
        # the probe lives only in this container's network namespace.
        if ! err="$(ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x0b75 mode transport \
            aead 'rfc4106(gcm(aes))' 0x000102030405060708090a0b0c0d0e0f10111213 128 2>&1)"; then
            die "the kernel cannot do ESP (ip xfrm state add: ${err}); use BTNS_DATAPLANE=libipsec"
        fi
        ip xfrm state delete src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x0b75
        ;;
    libipsec)
        mode=tunnel
        [ -c /dev/net/tun ] || die "BTNS_DATAPLANE=libipsec needs the device /dev/net/tun (compose: devices)"
        if [ "${BTNS_INBOUND_FILTER:-yes}" = yes ]; then
            # README "Inbound filter": with kernel-libipsec nothing else stops a clear packet from the
            # peer's address reaching a socket not bound to ipsec0; refuse clear TCP/UDP from it by
            # routing (IKE and ESP-in-UDP excepted), where btns_vici's inbound check sees it.
            fam=-4; case "${BTNS_PEER_ADDR}" in *:*) fam=-6 ;; esac
            dev=$(ip -o "$fam" route get "${BTNS_PEER_ADDR}" | sed -n 's/.* dev \([^ ]*\).*/\1/p')
            ip "$fam" rule add pref 100 lookup local && ip "$fam" rule del pref 0 lookup local
            sel=(iif "$dev" from "${BTNS_PEER_ADDR}" to "${BTNS_LOCAL_ADDR}")
            # protocol numbers, not names: a minimal image has no /etc/protocols (udp 17, tcp 6)
            ports=(500 4500)
            [ "${BTNS_LEAP}" = yes ] && ports+=(5386)  # the leap-of-faith learner, like IKE
            for port in "${ports[@]}"; do ip "$fam" rule add pref 10 "${sel[@]}" ipproto 17 dport "$port" lookup local; done
            for proto in 6 17; do ip "$fam" rule add pref 11 "${sel[@]}" ipproto "$proto" prohibit; done
            log "inbound filter on ${dev}: clear TCP/UDP from ${BTNS_PEER_ADDR} refused"
        fi
        ;;
    *) die "BTNS_DATAPLANE must be xfrm or libipsec, not '${BTNS_DATAPLANE}'" ;;
esac
case "${BTNS_AUTH}" in
    pubkey | psk | x509) ;;
    *) die "BTNS_AUTH must be pubkey, psk or x509, not '${BTNS_AUTH}'" ;;
esac
case "${BTNS_CONN}" in
    yes | no) ;;
    *) die "BTNS_CONN must be yes or no, not '${BTNS_CONN}'" ;;
esac
case "${BTNS_LEAP}" in
    no) ;;
    yes) [ "${BTNS_CONN}" = no ] || die "BTNS_LEAP=yes needs BTNS_CONN=no (the library makes the connections)" ;;
    *) die "BTNS_LEAP must be yes or no, not '${BTNS_LEAP}'" ;;
esac
case "${BTNS_PSK}" in *'"'* | *$'\n'* | *\\*) die "BTNS_PSK must not contain quotes, backslashes or newlines" ;; esac
if [ "${BTNS_INITIATOR}" = yes ]; then dpd_action=restart; else dpd_action=clear; fi

trap 'exit 143' TERM INT  # as PID 1, bash would otherwise ignore `podman stop` until charon runs
mkdir -p "${SHARED}/pubkeys" "${SHARED}/ready" "${SHARED}/ca" "${SWANCTL}"/{conf.d,private,pubkey,x509,x509ca}
chmod 0700 "${SWANCTL}/private"
rm -f "${SHARED}/ready/${BTNS_NAME}"
install -m 0644 "${CONF}/strongswan/strongswan-${BTNS_DATAPLANE}.conf" /etc/strongswan.conf

# --- credentials made at first start -------------------------------------------------------
if [ "${BTNS_CONN}" = yes ]; then
    key="${SWANCTL}/private/${BTNS_NAME}.key.pem"
    if [ ! -s "${key}" ]; then
        pki --gen --type ed25519 --outform pem | publish "${key}"
        chmod 0600 "${key}"
        log "made key ${key}"
    fi
    case "${BTNS_AUTH}" in
        pubkey)
            pki --pub --in "${key}" --outform pem | publish "${SWANCTL}/pubkey/${BTNS_NAME}.pub.pem"
            publish "${SHARED}/pubkeys/${BTNS_NAME}.pub.pem" <"${SWANCTL}/pubkey/${BTNS_NAME}.pub.pem"
            peer_input="${SHARED}/pubkeys/${BTNS_PEER}.pub.pem"   # the conn waits for this
            my_offer="${SWANCTL}/pubkey/${BTNS_NAME}.pub.pem"      # what the peer's conn needs from us
            ;;
        psk)
            if [ -n "${BTNS_PSK}" ]; then
                printf '%s' "${BTNS_PSK}" | publish /run/btns-psk
            else
                # The first peer to get here makes the key; ln is the atomic "create if absent".
                tmp="${SHARED}/psk.tmp.$$"
                printf '0x%s' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >"${tmp}"
                ln "${tmp}" "${SHARED}/psk" 2>/dev/null || true
                rm -f "${tmp}"
                cp "${SHARED}/psk" /run/btns-psk
            fi
            chmod 0600 /run/btns-psk
            peer_input=/run/btns-psk
            my_offer=/run/btns-psk
            ;;
        x509)
            ca="${SHARED}/ca/btns-ca.cert.pem"
            if [ ! -s "${ca}" ] && mkdir "${SHARED}/ca/lock" 2>/dev/null; then
                pki --gen --type ed25519 --outform pem | publish "${SHARED}/ca/btns-ca.key.pem"
                pki --self --ca --lifetime 3650 --type priv --in "${SHARED}/ca/btns-ca.key.pem" \
                    --dn "CN=btns-vici testbed CA" --outform pem | publish "${ca}"
                log "made the testbed CA"
            fi
            await_file "${ca}" 60 || die "no CA appeared at ${ca}"
            if [ ! -s "${SWANCTL}/x509/${BTNS_NAME}.cert.pem" ] \
                || ! cmp -s "${ca}" "${SWANCTL}/x509ca/btns-ca.cert.pem"; then
                pki --issue --cacert "${ca}" --cakey "${SHARED}/ca/btns-ca.key.pem" --type priv --in "${key}" \
                    --dn "CN=${BTNS_NAME}.btns.test" --san "${BTNS_NAME}.btns.test" --lifetime 365 --outform pem \
                    | publish "${SWANCTL}/x509/${BTNS_NAME}.cert.pem"
                log "issued ${BTNS_NAME}.btns.test"
            fi
            publish "${SWANCTL}/x509ca/btns-ca.cert.pem" <"${ca}"
            peer_input="${SWANCTL}/x509ca/btns-ca.cert.pem"
            my_offer="${SWANCTL}/x509ca/btns-ca.cert.pem"
            ;;
    esac
fi

# --- charon ---------------------------------------------------------------------------------
rm -f /var/run/charon.pid /var/run/charon.vici
/usr/lib/ipsec/charon &
charon_pid=$!
btnsd_pid=""
stop() {
    log "stopping charon"
    rm -f "${SHARED}/ready/${BTNS_NAME}"  # first, so that the peer does not call us while we are down
    if [ -n "${btnsd_pid}" ]; then
        kill -TERM "${btnsd_pid}" 2>/dev/null || true
        wait "${btnsd_pid}" 2>/dev/null || true
    fi
    kill -TERM "${charon_pid}" 2>/dev/null || true
    wait "${charon_pid}" 2>/dev/null || true
    exit 0
}
trap stop TERM INT
for ((i = 0; i < 100; i++)); do
    swanctl --stats >/dev/null 2>&1 && break
    kill -0 "${charon_pid}" 2>/dev/null || die "charon exited at start"
    sleep 0.1
done
swanctl --stats >/dev/null 2>&1 || die "charon's VICI socket did not answer"
boot_id="$(cat /proc/sys/kernel/random/uuid)"
if [ "${BTNS_LEAP}" = yes ]; then
    # The broker answers and enforces for unprivileged programs, and its learner exchanges host
    # keys with peers at first contact (the key directory is this container's own, never shared).
    rm -f /run/btns-vici/btnsd.sock
    btnsd --config /etc/btns/conf/btnsd.toml --leap-of-faith -v &
    btnsd_pid=$!
    for ((i = 0; i < 100; i++)); do
        [ -S /run/btns-vici/btnsd.sock ] && break
        kill -0 "${btnsd_pid}" 2>/dev/null || die "btnsd exited at start"
        sleep 0.1
    done
    [ -S /run/btns-vici/btnsd.sock ] || die "btnsd did not start"
    log "btnsd up with leap of faith (udp/5386)"
fi
if [ "${BTNS_CONN}" = no ]; then
    log "charon up (${BTNS_DATAPLANE}), no operator conn (BTNS_CONN=no): waiting for btns_vici programs"
    echo "none ${boot_id}" | publish "${SHARED}/ready/${BTNS_NAME}"
    while kill -0 "${charon_pid}" 2>/dev/null; do
        if [ -n "${btnsd_pid}" ] && ! kill -0 "${btnsd_pid}" 2>/dev/null; then die "btnsd exited"; fi
        sleep 1 &
        wait $! || true
    done
    wait "${charon_pid}" || true
    die "charon exited"
fi
log "charon up (${BTNS_DATAPLANE}, ${mode} mode, auth ${BTNS_AUTH}, initiator ${BTNS_INITIATOR})"

load_conn() {
    local psk=""
    case "${BTNS_AUTH}" in
        pubkey) install -m 0644 "${peer_input}" "${SWANCTL}/pubkey/${BTNS_PEER}.pub.pem" ;;
        psk) psk="$(cat /run/btns-psk)" ;;
    esac
    render "${CONF}/swanctl/btns-${BTNS_AUTH}.conf" "${SWANCTL}/conf.d/btns.conf" \
        "LOCAL_ADDR=${BTNS_LOCAL_ADDR}" "PEER_ADDR=${BTNS_PEER_ADDR}" "LOCAL_NAME=${BTNS_NAME}" \
        "PEER_NAME=${BTNS_PEER}" "MODE=${mode}" "DPD_ACTION=${dpd_action}" "PSK=${psk}"
    swanctl --load-all --noprompt >/run/btns-load.log 2>&1 || { cat /run/btns-load.log >&2; return 1; }
}

child_installed() { swanctl --list-sas --ike btns 2>/dev/null | grep -q 'INSTALLED'; }

loaded=""
last_check=-10
peer_boot=""
while :; do
    kill -0 "${charon_pid}" 2>/dev/null || { wait "${charon_pid}" || true; die "charon exited"; }
    if [ -s "${peer_input}" ]; then
        want="$(sha "${peer_input}")"
        if [ "${want}" != "${loaded}" ] && load_conn; then
            loaded="${want}"
            # Tell the peer which of its inputs we loaded (the hash of what it offers us), and
            # which start of ours this is (a new one means our old SAs are gone).
            echo "${want} ${boot_id}" | publish "${SHARED}/ready/${BTNS_NAME}"
            log "conn btns loaded"
        fi
    fi
    # The initiator (re)starts the CHILD_SA once the peer has loaded what we offer, checking every 3 s.
    # When the peer restarted, its SAs are gone: drop ours at once instead of waiting for DPD.
    if [ "${BTNS_INITIATOR}" = yes ] && [ -n "${loaded}" ] && [ $((SECONDS - last_check)) -ge 3 ]; then
        read -r peer_has peer_now <"${SHARED}/ready/${BTNS_PEER}" 2>/dev/null || peer_has=""
        if [ "${peer_has}" = "$(sha "${my_offer}")" ]; then
            last_check=${SECONDS}
            if [ -n "${peer_boot}" ] && [ "${peer_now}" != "${peer_boot}" ]; then
                log "${BTNS_PEER} restarted: closing the old IKE_SA"
                swanctl --terminate --ike btns --force --timeout 2 >/dev/null 2>&1 || true
                # Its new interface has a new MAC, and it sends us nothing that would update ours.
                ip neigh flush to "${BTNS_PEER_ADDR}" || true
            fi
            peer_boot="${peer_now}"
            if ! child_installed; then
                swanctl --initiate --child host --timeout 5 >/run/btns-initiate.log 2>&1 &
                if wait $!; then log "CHILD_SA host installed"; else log "initiate failed, retrying"; fi
            fi
        fi
    fi
    sleep 0.5 &
    wait $! || true
done
