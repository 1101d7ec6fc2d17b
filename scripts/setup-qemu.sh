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
else
    command -v debootstrap >/dev/null 2>&1 || {
        echo "vfnic: installing debootstrap"; apt-get install -y -q debootstrap >/dev/null; }
    echo "vfnic: system QEMU lacks vfio-user-pci; bootstrapping a Debian sid root for QEMU (about 1 min)"
    rm -rf "$ROOT"
    debootstrap --variant=minbase --include=qemu-system-x86,qemu-utils sid "$ROOT" \
        | sed -u 's/^/  [qemu-root] /'
    touch "$ROOT/.complete"
fi
echo sid > "$CACHE/qemu-kind"

# libvirt for `virsh migrate` (vfnic/libvirt/lab.py runs this libvirtd inside the root),
# and dbus-daemon for the libvirt hook that starts a domain's dbus-vmstate bus there:
# Debian 12's libvirt 9.0 cannot migrate QEMU 11.1 (its `migrate` passes `detach`).
# The registry's sid index may be past its Valid-Until date: apt is told to accept it.
if [ ! -f "$ROOT/.libvirt" ]; then
    echo "vfnic: installing libvirt into the sid root (about 20 s)"
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    mount --bind /proc "$ROOT/proc"
    trap 'umount "$ROOT/proc"' EXIT
    apt_sid() {
        DEBIAN_FRONTEND=noninteractive chroot "$ROOT" apt-get -q \
            -o Acquire::Check-Valid-Until=false "$@" >> "$CACHE/libvirt-apt.log" 2>&1 || {
            tail -20 "$CACHE/libvirt-apt.log"; echo "vfnic: apt-get $* in the sid root failed"
            exit 1; }
    }
    apt_sid update
    apt_sid install -y --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu \
        dbus-daemon
    umount "$ROOT/proc"
    trap - EXIT
    touch "$ROOT/.libvirt"
fi
if [ ! -x "$ROOT/usr/bin/dbus-daemon" ]; then
    echo "vfnic: libvirt's hook needs dbus-daemon in the sid root: $ROOT/usr/bin/dbus-daemon" >&2
    exit 1
fi
