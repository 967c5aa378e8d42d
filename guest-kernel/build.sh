#!/bin/bash
# Build the husk guest kernel from Debian's linux-source-6.12 package.
#
# Output: $HUSK_CACHE/kernel/<key>/{vmlinux,bzImage,config,build-info}, where
# <key> hashes the source package version, the config fragment, the patches and
# this script. A second run with the same inputs only prints the path.
#
# Usage: guest-kernel/build.sh [--print-dir]
#   HUSK_CACHE         cache root (default ~/.cache/husk)
#   HUSK_LINUX_SOURCE  source tarball (default /usr/src/linux-source-6.12.tar.xz)
#   JOBS               make -j (default: nproc)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${HUSK_CACHE:-$HOME/.cache/husk}
tarball=${HUSK_LINUX_SOURCE:-/usr/src/linux-source-6.12.tar.xz}
jobs=${JOBS:-$(nproc)}

die() { echo "guest-kernel: $*" >&2; exit 1; }

[ -r "$tarball" ] || die "no kernel source at $tarball (apt-get install linux-source-6.12)"
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null || true)
# Without dpkg metadata (a tarball given by hand) its content identifies it.
[ -n "$srcver" ] && [ -z "${HUSK_LINUX_SOURCE:-}" ] || srcver=$(sha256sum "$tarball" | cut -d' ' -f1)

key=$( {
    echo "source $srcver"
    cat "$here/husk.config"
    for p in "$here"/patches/*.patch; do echo "patch $(basename "$p")"; cat "$p"; done
    cat "$here/build.sh"
} | sha256sum | cut -c1-16)
out=$cache/kernel/$key

if [ "${1:-}" = "--print-dir" ]; then echo "$out"; exit 0; fi

if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
    echo "guest-kernel: cached $out" >&2
    echo "$out"
    exit 0
fi

mkdir -p "$cache/kernel"
work=$(mktemp -d "$cache/kernel/build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

echo "guest-kernel: building $key from $tarball ($srcver) in $work" >&2
tar -xf "$tarball" -C "$work"
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)
for p in "$here"/patches/*.patch; do
    echo "guest-kernel: applying $(basename "$p")" >&2
    patch -d "$src" -p1 --forward --quiet < "$p" || die "patch $(basename "$p") does not apply to $srcver"
done

# Reproducible build metadata: same inputs, same bytes.
export KBUILD_BUILD_TIMESTAMP="1970-01-01" KBUILD_BUILD_USER=husk KBUILD_BUILD_HOST=husk KBUILD_BUILD_VERSION=1
mk() { make -C "$src" -s "$@"; }
mk tinyconfig >/dev/null
(cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "$here/husk.config" >/dev/null)
mk olddefconfig >/dev/null

# Every line of the fragment must hold in the final config.
bad=0
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=*)
        grep -qxF "$line" "$src/.config" || { echo "guest-kernel: config did not stick: $line (got: $(grep "^${line%%=*}=" "$src/.config" || echo unset))" >&2; bad=1; } ;;
    "# CONFIG_"*" is not set")
        sym=${line#\# }; sym=${sym%% *}
        if grep -q "^$sym=" "$src/.config"; then echo "guest-kernel: config did not stick: $line" >&2; bad=1; fi ;;
    esac
done < "$here/husk.config"
[ $bad = 0 ] || die "config fragment does not hold; fix husk.config"

mk -j"$jobs" vmlinux bzImage
end=$(date +%s)

mkdir -p "$work/out"
cp "$src/vmlinux" "$work/out/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$work/out/bzImage"
cp "$src/.config" "$work/out/config"
cat > "$work/out/build-info" <<EOF
source=$srcver
key=$key
build_seconds=$((end - start))
jobs=$jobs
vmlinux_bytes=$(stat -c %s "$src/vmlinux")
bzImage_bytes=$(stat -c %s "$src/arch/x86/boot/bzImage")
EOF
rm -rf "$out"
mv "$work/out" "$out"
echo "guest-kernel: built in $((end - start)) s -> $out" >&2
echo "$out"
