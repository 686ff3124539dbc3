#!/bin/sh
# Download libreswan and its tools with apt-get download and unpack them with dpkg -x into a
# private root; never install them (Debian's libreswan conflicts with strongSwan).
# Idempotent: a complete root is reused. Prints the root on stdout.
# Usage: fetch-libreswan.sh [CACHE_DIR]   (default: $BTNS_LIBRESWAN_CACHE or /var/cache/btns-libreswan)
set -eu
cache="${1:-${BTNS_LIBRESWAN_CACHE:-/var/cache/btns-libreswan}}"
root="$cache/root"
pkgs="libreswan libnss3-tools libevent-pthreads-2.1-7 libldns3 dns-root-data"
if [ -x "$root/usr/libexec/ipsec/pluto" ] && [ -x "$root/usr/bin/certutil" ] && [ -f "$root/.complete" ]; then
    echo "$root"
    exit 0
fi
mkdir -p "$cache/debs"
tmp="$(mktemp -d "$cache/root.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
cd "$cache/debs"
for p in $pkgs; do
    ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download "$p" >&2 || {
        apt-get update >&2 && apt-get download "$p" >&2
    }
done
for deb in "$cache"/debs/*.deb; do
    dpkg -x "$deb" "$tmp"
done
touch "$tmp/.complete"
rm -rf "$root"
mv "$tmp" "$root"
trap - EXIT
echo "$root"
