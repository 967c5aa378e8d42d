#!/bin/bash
# Build the guest root image: a read-only erofs holding the static guest init.
#
# Usage: images/build-rootfs.sh OUT.erofs INIT_BINARY [AGENT_BINARY]
#
# INIT_BINARY becomes /init (boot with init=/init); AGENT_BINARY, if given,
# /sbin/husk-agent (boot with init=/sbin/husk-agent).
#
# The guest mounts it as root=/dev/vda ro rootfstype=erofs; nothing is
# unpacked in the guest (a gzip initramfs cost ~120 s of emulated guest time).
# Same inputs give the same bytes: fixed timestamps, UUID and owners.
set -euo pipefail
out=${1:?usage: build-rootfs.sh OUT INIT_BINARY}
init=${2:?usage: build-rootfs.sh OUT INIT_BINARY [AGENT_BINARY]}
agent=${3:-}
for bin in "$init" $agent; do
    [ -x "$bin" ] || { echo "build-rootfs: $bin is not an executable" >&2; exit 1; }
    if readelf -l "$bin" 2>/dev/null | grep -q "program interpreter"; then
        echo "build-rootfs: $bin is dynamically linked; the guest has no libc" >&2
        exit 1
    fi
done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# Mount points the init and later the agent use; the image itself stays ro.
for d in dev proc sys run tmp sbin mnt; do mkdir -p "$stage/$d"; done
chmod 0755 "$stage"/*
chmod 1777 "$stage/tmp"
install -m 0755 "$init" "$stage/init"
ln -s ../init "$stage/sbin/init"
[ -z "$agent" ] || install -m 0755 "$agent" "$stage/sbin/husk-agent"

mkdir -p "$(dirname "$out")"
# A fixed UUID and timestamp make the image reproducible.
mkfs.erofs --quiet --all-root -T0 -U 6875736b-0000-4000-8000-000000000001 "$out.tmp" "$stage"
# An unchanged image keeps its file (and mtime): husk-runtime's templates are
# keyed by it, so a no-op rebuild must not make them stale.
if cmp -s "$out.tmp" "$out"; then
    rm -f "$out.tmp"
    echo "build-rootfs: $out unchanged" >&2
else
    mv "$out.tmp" "$out"
    echo "build-rootfs: $out ($(stat -c %s "$out") bytes)" >&2
fi
