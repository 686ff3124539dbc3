#!/bin/sh
# Prepare the full-kernel VM tier (idempotent): a stock Debian kernel with its modules
# and a tiny busybox initramfs that mounts the host's / over virtio-9p and runs a command.
#
#   scripts/vm/setup.sh            # prints the cache directory on success
#
# Needs: apt-get, dpkg, kmod (depmod, modprobe), busybox-static, cpio, gzip; run.sh needs qemu-system-x86.
# Environment: BTNS_VM_CACHE (default /var/cache/btns-vm).
#
#   scripts/vm/setup.sh --quick    # no apt query when a kernel is cached and the initramfs is current
set -eu

CACHE=${BTNS_VM_CACHE:-/var/cache/btns-vm}
HERE=$(cd "$(dirname "$0")" && pwd)
BUSYBOX=$(command -v busybox || true)
# The initramfs has no libc: busybox must be the static one (Debian: busybox-static).
if [ -z "$BUSYBOX" ] || ldd "$BUSYBOX" > /dev/null 2>&1; then
    echo "setup.sh: need a static busybox (apt-get install busybox-static)" >&2
    exit 1
fi
STAMP=$(cat "$HERE/init.sh" "$0" "$BUSYBOX" | sha256sum | cut -c1-16)

if [ "${1:-}" = "--quick" ] && [ -f "$CACHE/kver" ]; then
    k=$(cat "$CACHE/kver")
    if [ "$(cat "$CACHE/initramfs-$k.cpio.gz.stamp" 2>/dev/null)" = "$STAMP" ] && [ -e "$CACHE/vmlinuz" ]; then
        echo "$CACHE"
        exit 0
    fi
fi

# The current Debian 12 ABI, e.g. linux-image-6.1.0-57-amd64.
PKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$PKG" ] || { echo "setup.sh: cannot derive the kernel ABI from apt-cache" >&2; exit 1; }
KVER=${PKG#linux-image-}
ROOT=$CACHE/$KVER

mkdir -p "$CACHE"
if [ ! -f "$ROOT/.extracted" ]; then
    tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
    chmod 755 "$tmp"  # apt's _apt user downloads into it
    (cd "$tmp" && apt-get download "$PKG" >&2)
    rm -rf "$ROOT"
    dpkg -x "$tmp"/"$PKG"_*.deb "$ROOT"
    rm -rf "$tmp"
    touch "$ROOT/.extracted"
fi
# Debian ships modules under /lib or /usr/lib depending on the release.
MODBASE=$ROOT
[ -d "$ROOT/lib/modules/$KVER" ] || MODBASE=$ROOT/usr
if [ ! -f "$MODBASE/lib/modules/$KVER/.depmod-done" ]; then
    depmod -b "$MODBASE" "$KVER"
    touch "$MODBASE/lib/modules/$KVER/.depmod-done"
fi

INITRD=$CACHE/initramfs-$KVER.cpio.gz
if [ ! -f "$INITRD" ] || [ "$(cat "$INITRD.stamp" 2>/dev/null)" != "$STAMP" ]; then
    work=$(mktemp -d "$CACHE/initrd.XXXXXX")
    mkdir -p "$work/bin" "$work/mods" "$work/proc" "$work/sys" "$work/dev" "$work/newroot" "$work/lower" \
        "$work/rw" "$work/out"
    cp "$BUSYBOX" "$work/bin/busybox"
    for m in virtio_pci 9pnet_virtio 9p overlay; do
        # insmod order: dependencies first; builtins print "builtin" and are skipped.
        modprobe -d "$MODBASE" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' > "$work/mods/order.host"
    : > "$work/mods/order"
    while read -r ko; do
        base=$(basename "$ko")
        case $base in
            *.ko.xz) xz -dc "$ko" > "$work/mods/${base%.xz}"; base=${base%.xz} ;;
            *.ko.zst) zstd -qdc "$ko" > "$work/mods/${base%.zst}"; base=${base%.zst} ;;
            *) cp "$ko" "$work/mods/$base" ;;
        esac
        echo "$base" >> "$work/mods/order"
    done < "$work/mods/order.host"
    rm "$work/mods/order.host"
    cp "$HERE/init.sh" "$work/init"
    chmod 755 "$work/init" "$work/bin/busybox"
    (cd "$work" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    echo "$STAMP" > "$INITRD.stamp"
    rm -rf "$work"
fi
ln -sfn "$ROOT/boot/vmlinuz-$KVER" "$CACHE/vmlinuz"
ln -sfn "$INITRD" "$CACHE/initramfs.cpio.gz"
ln -sfn "$MODBASE/lib/modules/$KVER" "$CACHE/modules"
echo "$KVER" > "$CACHE/kver"
echo "$CACHE"
