#!/bin/bash
# Install what husk needs on Debian 12, only what is missing. Idempotent and
# quiet when there is nothing to do. Run as root (or with sudo available).
set -euo pipefail

packages=(
    # guest kernel build (Debian's linux-source-6.12)
    linux-source-6.12 build-essential flex bison bc libelf-dev libssl-dev cpio lz4 kmod
    # seccomp profiles from OCI specs: libcontainer's libseccomp, linked
    # statically into the guest agent (libseccomp.a)
    libseccomp-dev
    # guest root image and sample images
    erofs-utils e2fsprogs busybox-static jq
    # reference VMM and peers used by the tests
    qemu-system-x86 qemu-system-common containerd runc skopeo umoci docker-registry
    # CRI pods under containerd: CNI plugins (/usr/lib/cni); the CRI API
    # client in the tests is generated from its protos (protoc)
    containernetworking-plugins protobuf-compiler
    # huskd: etcd (its state store, started by the tests); etcd-client
    # compiles etcd's protos, which import protobuf's well-known types
    etcd-server libprotobuf-dev
    # the tests' etcd health check (etcdctl)
    etcd-client
    # sandbox networking: NAT for the husk0 bridge (as Docker uses it);
    # test networks: taps in namespaces, ping
    iptables iproute2 iputils-ping
    # test cleanup (pgrep/pkill)
    procps
    # benchmarks
    python3 strace crun
    # scripts/guest-profile: guest kernel symbols (nm)
    binutils
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "setup: installing ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
# The fuzz targets need a nightly toolchain (for sanitizers) and cargo-fuzz.
cargo +nightly --version >/dev/null 2>&1 || { echo "setup: no nightly Rust toolchain (rustup toolchain install nightly)" >&2; exit 1; }
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz" >&2
    cargo install --quiet --locked cargo-fuzz
fi
