#!/bin/sh
# Build the bootable guest: a Debian bookworm root with the cloud kernel, python3 and
# the tools the tests use, turned into an ext4 image without loop mounts.
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
echo "vfnic: guest root ready in $GROOT"
