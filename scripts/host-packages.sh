#!/bin/bash
# Debian packages the host needs (Debian 12 or 13): make, venv, debootstrap for the QEMU
# and guest roots, mkfs.ext4 -d, ip/netns/TAP, ping and arping for the network tests.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(make python3 python3-venv debootstrap debian-archive-keyring gpgv e2fsprogs iproute2
      iputils-ping arping ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "vfnic: installing ${missing[*]}"
    apt-get update -q
    apt-get install -y -q "${missing[@]}"
fi
