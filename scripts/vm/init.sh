#!/bin/busybox sh
# /init of the btns-vici VM initramfs (copied in by setup.sh; never run on the host).
# Loads virtio/9p/overlay, mounts the host's / read-only over virtio-9p under a tmpfs
# overlay, mounts the run.sh output share, switches root to it, runs $btns_out/cmd.sh, writes its
# exit status to $btns_out/rc and powers off. Kernel parameters arrive as environment:
# btns_out (host path of the shared output dir), btns_modules (host path of the kernel's modules),
# btns_work (optional: a host checkout under a path that is tmpfs in the guest, e.g. /tmp/x,
# shared separately and overlaid at the same path).
/bin/busybox --install -s /bin
export PATH=/bin
: "${btns_out:=}" "${btns_modules:=}" "${btns_work:=}"
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do insmod "/mods/$m" 2>/dev/null; done < /mods/order

die() { echo "btns-vm init: $*" > /dev/console; sync; poweroff -f; }

mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro hostroot /lower \
    || die "cannot mount the host root over 9p"
mount -t tmpfs -o mode=755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || die "cannot mount the overlay root"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t tmpfs -o mode=755 run $R/run
if [ -n "$btns_work" ]; then  # the checkout lives where the guest has a fresh tmpfs
    mkdir -p /wlower /rw/wupper /rw/wwork "$R$btns_work"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro btnswork /wlower \
        || die "cannot mount the work share"
    mount -t overlay -o lowerdir=/wlower,upperdir=/rw/wupper,workdir=/rw/wwork overlay "$R$btns_work" \
        || die "cannot overlay the work share"
fi
# The kernel's modules live in the host's cache dir; make modprobe find them.
KVER=$(uname -r)
[ -n "$btns_modules" ] || die "no btns_modules= on the kernel command line"
rm -rf "$R/lib/modules/$KVER"
mkdir -p "$R/lib/modules"
ln -s "$btns_modules" "$R/lib/modules/$KVER"
[ -n "$btns_out" ] || die "no btns_out= on the kernel command line"
mkdir -p "$R$btns_out"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none btnsout "$R$btns_out" \
    || die "cannot mount the output share"
hostname btns-vm
ip link set lo up
# Stage 2 runs in the real root (switch_root, not chroot: the kernel's own helpers, e.g.
# module autoloading for crypto algorithms, must see the host's /sbin/modprobe).
mkdir -p $R/run/btns-vm
cp /bin/busybox $R/run/btns-vm/busybox
cat > $R/run/btns-vm/stage2.sh <<'STAGE2'
cd / || exit 1
/bin/sh "$btns_out/cmd.sh" < /dev/null > /dev/console 2>&1
echo $? > "$btns_out/rc"
sync
/run/btns-vm/busybox umount "$btns_out" 2>/dev/null
/run/btns-vm/busybox poweroff -f
STAGE2
export HOME=/root TERM=dumb LANG=C.UTF-8 BTNS_VM_GUEST=1 btns_out \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec switch_root $R /run/btns-vm/busybox sh /run/btns-vm/stage2.sh
