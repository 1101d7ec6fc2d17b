#!/bin/sh
# Provide a QEMU >= 10.1 with the vfio-user-pci client.
# Uses the system's QEMU when it is new enough, otherwise bootstraps a Debian sid
# root (cached) and runs its QEMU through sid's own dynamic loader.
set -eu
CACHE=${VFNIC_CACHE:-$(pwd)/.vfnic}
ROOT="$CACHE/qemu-root"
mkdir -p "$CACHE"

if command -v qemu-system-x86_64 >/dev/null 2>&1 &&
   qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vfio-user-pci"'; then
    echo "vfnic: using system QEMU: $(command -v qemu-system-x86_64)"
    echo system > "$CACHE/qemu-kind"
    exit 0
fi
if [ -f "$ROOT/.complete" ]; then
    echo "vfnic: QEMU runtime cached in $ROOT"
    echo sid > "$CACHE/qemu-kind"
    exit 0
fi
command -v debootstrap >/dev/null 2>&1 || {
    echo "vfnic: installing debootstrap"; apt-get install -y -q debootstrap >/dev/null; }
echo "vfnic: system QEMU lacks vfio-user-pci; bootstrapping a Debian sid root for QEMU (about 1 min)"
rm -rf "$ROOT"
debootstrap --variant=minbase --include=qemu-system-x86,qemu-utils sid "$ROOT" \
    | sed -u 's/^/  [qemu-root] /'
touch "$ROOT/.complete"
echo sid > "$CACHE/qemu-kind"
