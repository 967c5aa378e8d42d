#!/bin/bash
# Build the sample OCI images offline from Debian's busybox-static.
#
# Usage: images/build-samples.sh OUTDIR MKIMAGE
#   OUTDIR/<name>.oci.tar   OCI image layout archive
#   OUTDIR/<name>.tar       docker-archive
# Images: husk.local/busybox:latest, husk.local/httpd:latest (busybox httpd on :80,
# a second layer over the busybox one), husk.local/pause:latest (a CRI pod's
# sandbox container: the busybox layer, sleeping), husk.local/dash:latest
# (a dynamically linked shell: its loader and libc from this host).
set -euo pipefail
outdir=${1:?usage: build-samples.sh OUTDIR MKIMAGE}
mkimage=${2:?usage: build-samples.sh OUTDIR MKIMAGE}
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "build-samples: no $busybox (apt-get install busybox-static)" >&2; exit 1; }
if readelf -l "$busybox" 2>/dev/null | grep -q "program interpreter"; then
    echo "build-samples: $busybox is not static (install busybox-static)" >&2; exit 1
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
base=$stage/busybox
mkdir -p "$base"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,proc,sys,dev,run,var/log,www}
chmod 1777 "$base/tmp"
chmod 0700 "$base/root"
install -m 0755 "$busybox" "$base/bin/busybox"
# One symlink per applet, at the path busybox itself reports.
"$busybox" --list-full | sort | while read -r applet; do
    [ "$applet" = bin/busybox ] && continue
    dir=$(dirname "$applet")
    rel=$(realpath -s -m --relative-to="/$dir" /bin/busybox)
    ln -sf "$rel" "$base/$applet"
done
cat > "$base/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$base/etc/group" <<'G'
root:x:0:
nogroup:x:65534:
G
rmdir "$base/www"

www=$stage/httpd
mkdir -p "$www/www"
cat > "$www/www/index.html" <<'H'
<!doctype html>
<title>husk</title>
<p>hello from a husk microVM</p>
H

"$mkimage" --name husk.local/busybox:latest --layer "$base" \
    --env PATH=/usr/sbin:/usr/bin:/sbin:/bin --cmd '["sh"]' \
    --oci-archive "$outdir/busybox.oci.tar" --docker-archive "$outdir/busybox.tar"
"$mkimage" --name husk.local/httpd:latest --layer "$base" --layer "$www" \
    --env PATH=/usr/sbin:/usr/bin:/sbin:/bin --workdir /www --expose 80/tcp \
    --cmd '["httpd","-f","-v","-p","80","-h","/www"]' \
    --oci-archive "$outdir/httpd.oci.tar" --docker-archive "$outdir/httpd.tar"
# A dynamically linked program: Debian's dash with its loader and libc,
# copied from this (Debian) host over the busybox layer. The loader is
# reached as on Debian, through /lib64's absolute symlink.
dash=$stage/dash
interp=$(readelf -l /usr/bin/dash | sed -n 's/.*program interpreter: \(.*\)]/\1/p')
[ -n "$interp" ] || { echo "build-samples: /usr/bin/dash has no program interpreter" >&2; exit 1; }
libs=$(ldd /usr/bin/dash | awk '$2 == "=>" && $3 ~ /^\// { print $3 }')
case "$libs" in
*libc.so*) ;;
*) echo "build-samples: ldd /usr/bin/dash named no libc: $libs" >&2; exit 1 ;;
esac
loader=$(readlink -f "$interp")
mkdir -p "$dash/usr/bin" "$dash/$(dirname "$interp")"
install -m 0755 /usr/bin/dash "$dash/usr/bin/dash"
for lib in $libs "$loader"; do
    real=$(readlink -f "$lib")
    # Under /lib as the loader looks (Debian's /lib is a link to usr/lib).
    dest=$dash/${real#/usr}
    mkdir -p "$(dirname "$dest")"
    install -m 0755 "$real" "$dest"
done
ln -sf "${loader#/usr}" "$dash$interp"
[ -f "$dash${loader#/usr}" ] || { echo "build-samples: the loader link $interp -> ${loader#/usr} leads nowhere" >&2; exit 1; }
"$mkimage" --name husk.local/dash:latest --layer "$base" --layer "$dash" \
    --env PATH=/usr/sbin:/usr/bin:/sbin:/bin --cmd '["dash"]' \
    --oci-archive "$outdir/dash.oci.tar" --docker-archive "$outdir/dash.tar"
# CRI's sandbox image (containerd's sandbox_image): holds the pod's
# namespaces; the same layer, so nothing more to store.
"$mkimage" --name husk.local/pause:latest --layer "$base" \
    --env PATH=/usr/sbin:/usr/bin:/sbin:/bin --entrypoint '["/bin/sleep","2147483647"]' \
    --oci-archive "$outdir/pause.oci.tar" --docker-archive "$outdir/pause.tar"
