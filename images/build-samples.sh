#!/bin/bash
# Build the sample OCI images offline from Debian's busybox-static.
#
# Usage: images/build-samples.sh OUTDIR MKIMAGE
#   OUTDIR/<name>.oci.tar   OCI image layout archive
#   OUTDIR/<name>.tar       docker-archive
# Images: husk.local/busybox:latest, husk.local/httpd:latest (busybox httpd on :80,
# a second layer over the busybox one), husk.local/pause:latest (a CRI pod's
# sandbox container: the busybox layer, sleeping).
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
# CRI's sandbox image (containerd's sandbox_image): holds the pod's
# namespaces; the same layer, so nothing more to store.
"$mkimage" --name husk.local/pause:latest --layer "$base" \
    --env PATH=/usr/sbin:/usr/bin:/sbin:/bin --entrypoint '["/bin/sleep","2147483647"]' \
    --oci-archive "$outdir/pause.oci.tar" --docker-archive "$outdir/pause.tar"
