#!/bin/sh
# Build the bootable guest: a Debian bookworm root with the cloud kernel, python3 and
# the tools the tests use, turned into an ext4 image without loop mounts. The kernel's
# headers and gcc go in too: vfnic's VF driver (kmod/) is built there, against the
# guest's own kernel (vfnic/host/kmod.py).
set -eu
CACHE=${VFNIC_CACHE:-$(pwd)/.vfnic}
GROOT="$CACHE/guest-root"
mkdir -p "$CACHE"
if [ ! -f "$GROOT/.complete" ]; then
    command -v debootstrap >/dev/null 2>&1 || {
        echo "vfnic: installing debootstrap"; apt-get install -y -q debootstrap >/dev/null; }
    echo "vfnic: bootstrapping the guest root (about 70 s)"
    rm -rf "$GROOT"
    debootstrap --variant=minbase \
        --include=linux-image-cloud-amd64,initramfs-tools,python3,iproute2,iputils-ping,arping,pciutils,kmod,udev,ethtool \
        bookworm "$GROOT" | sed -u 's/^/  [guest-root] /'
    touch "$GROOT/.complete"
fi
KVER=$(ls "$GROOT/lib/modules" | sort | tail -n 1)
if [ ! -f "$GROOT/.kbuild-$KVER" ]; then
    echo "vfnic: installing the guest kernel's headers and gcc into the guest root"
    # apt needs proc and dev; unmount them before mkfs.ext4 -d walks the root.
    mount -t proc proc "$GROOT/proc"
    mount --bind /dev "$GROOT/dev"
    rc=0
    { chroot "$GROOT" apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive chroot "$GROOT" apt-get install -y -q \
        --no-install-recommends "linux-headers-$KVER" gcc make; } 2>&1 |
        sed -u 's/^/  [guest-root] /' || rc=$?
    chroot "$GROOT" apt-get clean || true
    umount "$GROOT/dev"
    umount "$GROOT/proc"
    [ "$rc" -eq 0 ] && [ -d "$GROOT/usr/src/linux-headers-$KVER" ] || {
        echo "vfnic: installing linux-headers-$KVER failed" >&2; exit 1; }
    touch "$GROOT/.kbuild-$KVER"
fi
echo "vfnic: guest root ready in $GROOT"
