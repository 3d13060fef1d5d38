#!/usr/bin/env bash
# Builds the Docker image `rune-systemd-test:bookworm-2`: a minimal Debian 12 root from debootstrap
# that boots systemd as PID 1, for the tests of runed under a real service manager
# (runed/tests/systemd.rs). Cached: an existing image is kept. No registry is needed; the
# packages come from the Debian mirror of /etc/apt/sources.list (or $DEBIAN_MIRROR).
# Usage: scripts/systemd-image.sh [--force]
set -euo pipefail

# The tag changes with the package list, so an image cached from an older list is not reused.
image=rune-systemd-test:bookworm-2
if [ "${1:-}" != "--force" ] && docker image inspect "$image" >/dev/null 2>&1; then
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "systemd-image.sh: debootstrap is missing (apt-get install debootstrap)" >&2
    exit 1
}
mirror="${DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
    mirror=$(grep -hoE '^deb +(\[[^]]*\] +)?https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '{print $NF}' | head -n 1 || true)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
mirror="${mirror:-http://deb.debian.org/debian}"

root=$(mktemp -d /var/tmp/rune-systemd-root.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "building $image from $mirror (debootstrap, about a minute)"
debootstrap --variant=minbase --include=systemd,systemd-sysv,systemd-resolved,dbus,curl,procps,nftables,bind9-dnsutils bookworm "$root" "$mirror" >/dev/null
# Docker mounts its own /etc/resolv.conf: a symlink left by systemd-resolved would send the
# mount into /run. A test that wants resolved's stub writes the file itself.
rm -f "$root/etc/resolv.conf" && : >"$root/etc/resolv.conf"
# No getty or udev work in a container; journald keeps its journal in memory (/run).
rm -f "$root/etc/systemd/system/getty.target.wants/"* 2>/dev/null || true
mkdir -p "$root/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$root/etc/systemd/journald.conf.d/volatile.conf"
tar -C "$root" -c . | docker import - "$image" >/dev/null
echo "built $image"
