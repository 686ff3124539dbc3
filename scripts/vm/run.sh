#!/bin/sh
# Run one command inside the full-kernel VM and return its exit status.
#
#   scripts/vm/run.sh CMD [ARG...]
#
# The guest sees the host's / read-only (writes go to a tmpfs overlay and are lost),
# runs CMD as root in the caller's working directory, then powers off. Output streams to
# stdout. Files the command writes under $BTNS_VM_OUT (a host directory shared read-write,
# same path inside the guest) survive. Environment variables named BTNS_* are passed in.
#
# Environment: BTNS_VM_CACHE (default /var/cache/btns-vm), BTNS_VM_TIMEOUT (seconds, default 600),
# BTNS_VM_OUT (default: a fresh temporary dir, removed afterwards), BTNS_VM_SMP (default 2),
# BTNS_VM_MEM (MiB, default 512), BTNS_VM_BIOS (firmware; default qboot.rom when installed, "" for SeaBIOS).
# Exit status: CMD's, or 124 on timeout, or 125 when the VM did not report one (boot failure).
set -eu
[ $# -ge 1 ] || { echo "usage: $0 CMD [ARG...]" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${BTNS_VM_CACHE:-/var/cache/btns-vm}
"$HERE/setup.sh" --quick > /dev/null  # a no-op when the cache is current
# qboot starts faster than SeaBIOS and prints nothing.
[ -n "${BTNS_VM_BIOS+set}" ] || { [ -f /usr/share/qemu/qboot.rom ] && BTNS_VM_BIOS=/usr/share/qemu/qboot.rom; }
TIMEOUT=${BTNS_VM_TIMEOUT:-600}

own_out=
if [ -z "${BTNS_VM_OUT:-}" ]; then
    BTNS_VM_OUT=$(mktemp -d /tmp/btns-vm-out.XXXXXX)
    own_out=1
fi
mkdir -p "$BTNS_VM_OUT"
BTNS_VM_OUT=$(cd "$BTNS_VM_OUT" && pwd)
export BTNS_VM_OUT
trap '[ -n "$own_out" ] && rm -rf "$BTNS_VM_OUT"' EXIT
rm -f "$BTNS_VM_OUT/rc"

# The guest's script: the caller's cwd, the BTNS_* environment, the command, quoted.
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
    echo "cd $(quote "$PWD") || exit 125"
    env | grep '^BTNS_[A-Za-z0-9_]*=' | while IFS= read -r kv; do
        echo "export ${kv%%=*}=$(quote "${kv#*=}")"
    done
    printf 'exec'
    for a in "$@"; do printf ' %s' "$(quote "$a")"; done
    echo
} > "$BTNS_VM_OUT/cmd.sh"

# The guest mounts fresh tmpfs on /tmp, /run and /dev/shm: a checkout there (CI may clone into /tmp)
# is shared on its own and overlaid at the same path.
WORK=$(git -C "$PWD" rev-parse --show-toplevel 2>/dev/null || printf '%s' "$PWD")
set --
case "$WORK" in
    /tmp|/tmp/*|/run|/run/*|/dev/shm|/dev/shm/*)
        set -- -virtfs "local,path=$WORK,mount_tag=btnswork,security_model=none,readonly=on,multidevs=remap"
        WORK_ARG=" btns_work=$WORK" ;;
    *) WORK_ARG= ;;
esac

set +e
timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg,thread=multi,tb-size=256 -cpu max -m "${BTNS_VM_MEM:-512}" -smp "${BTNS_VM_SMP:-2}" \
    -nodefaults -no-user-config -nographic -no-reboot -serial stdio -nic none ${BTNS_VM_BIOS:+-bios "$BTNS_VM_BIOS"} \
    -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 btns_out=$BTNS_VM_OUT btns_modules=$(readlink -f "$CACHE/modules")$WORK_ARG" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$BTNS_VM_OUT,mount_tag=btnsout,security_model=none" "$@"
qrc=$?
set -e
if [ $qrc -eq 124 ] || [ $qrc -eq 137 ]; then
    echo "run.sh: VM timed out after ${TIMEOUT}s" >&2
    exit 124
fi
if [ ! -s "$BTNS_VM_OUT/rc" ]; then
    echo "run.sh: the VM reported no exit status (qemu exit $qrc): boot failure?" >&2
    exit 125
fi
exit "$(cat "$BTNS_VM_OUT/rc")"
