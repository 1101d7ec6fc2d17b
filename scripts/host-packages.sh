#!/bin/bash
# Debian packages the host needs (Debian 12 or 13): make, venv, debootstrap for the QEMU
# and guest roots, mkfs.ext4 -d, ip/netns/TAP, ping and arping for the network tests, lspci;
# dbus-daemon (one bus per VM for QEMU's dbus-vmstate); virsh (the libvirtd it talks to runs inside the sid root: scripts/setup-qemu.sh).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(make python3 python3-venv debootstrap debian-archive-keyring gpgv e2fsprogs iproute2
      iputils-ping arping pciutils ca-certificates dbus-daemon)
libvirt_pkgs=(libvirt-clients)

missing_of() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}
mapfile -t missing < <(missing_of "${pkgs[@]}")
mapfile -t missing_libvirt < <(missing_of "${libvirt_pkgs[@]}")
if ((${#missing[@]} + ${#missing_libvirt[@]})); then
    echo "vfnic: installing ${missing[*]} ${missing_libvirt[*]}"
    apt-get update -q
fi
if ((${#missing[@]})); then
    apt-get install -y -q "${missing[@]}"
fi
if ((${#missing_libvirt[@]})); then
    apt-get install -y -q --no-install-recommends "${missing_libvirt[@]}"
fi
