#!/bin/bash
# Boot the husk guest under qemu's microvm machine (the reference VMM until
# husk-vmm exists, and the peer it is measured against afterwards).
#
# Usage: guest-kernel/boot-qemu.sh VMLINUX ROOTFS [EXTRA KERNEL ARGS...]
#   HUSK_HOST_PROFILE  host profile name (guest-kernel/host-profiles/NAME.json),
#                      "none" for hardware KVM; detected when unset
#   HUSK_VCPUS, HUSK_MEM_MIB   (default 1, 256)
# The console is this script's stdout. The guest's reboot (reboot=k, i8042
# reset) ends qemu (-no-reboot).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernel=${1:?usage: boot-qemu.sh VMLINUX ROOTFS [KERNEL ARGS...]}
rootfs=${2:?usage: boot-qemu.sh VMLINUX ROOTFS [KERNEL ARGS...]}
shift 2
[ -r "$kernel" ] || { echo "boot-qemu: no kernel at $kernel" >&2; exit 1; }
[ -r "$rootfs" ] || { echo "boot-qemu: no root image at $rootfs" >&2; exit 1; }
[ -w /dev/kvm ] || { echo "boot-qemu: /dev/kvm is not usable by $(id -un)" >&2; exit 1; }

profile=${HUSK_HOST_PROFILE:-}
if [ -z "$profile" ]; then
    profile=none
    for f in "$here"/host-profiles/*.json; do
        mod=$(jq -r '.detect.sysfs_module // empty' "$f")
        if [ -n "$mod" ] && [ -d "/sys/module/$mod" ]; then profile=$(jq -r .name "$f"); fi
    done
fi
cpu=host
profile_args=()
if [ "$profile" != none ]; then
    pf=$here/host-profiles/$profile.json
    [ -r "$pf" ] || { echo "boot-qemu: unknown host profile $profile" >&2; exit 1; }
    cpu=$(jq -r .qemu_cpu "$pf")
    mapfile -t profile_args < <(jq -r '.kernel_args[]' "$pf")
fi
echo "boot-qemu: host profile: $profile (cpu $cpu; kernel args: ${profile_args[*]:-none})" >&2

# Base arguments every husk guest gets: serial console, i8042 reboot so the VMM
# exits, no PCI probing, read-only erofs root, no fs-type probing.
args=(console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro rootfstype=erofs init=/init
      "${profile_args[@]}" "$@")

exec qemu-system-x86_64 \
    -M microvm,acpi=off,pic=on,pit=on,rtc=off,x-option-roms=off,isa-serial=on \
    -accel kvm -cpu "$cpu" -smp "${HUSK_VCPUS:-1}" -m "${HUSK_MEM_MIB:-256}" \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -device i8042 \
    -kernel "$kernel" -append "${args[*]}" \
    -drive id=root,file="$rootfs",format=raw,if=none,readonly=on \
    -device virtio-blk-device,drive=root
