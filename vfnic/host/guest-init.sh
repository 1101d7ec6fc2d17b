#!/bin/sh
# PID 1 of the vfnic test guest, installed as /sbin/vfnic-init.
# Kernel command line:
#   vfnic.exec=<base64>  run that bash script between markers, then power off
#   vfnic.exec=fw_cfg    same, script read from fw_cfg opt/vfnic/exec
#   vfnic.token=<hex>    tag carried in the markers
#   vfnic.modules=a,b    extra modules to load
#   vfnic.driver=D       the VF's driver: kernel (vfnic_vf.ko, the default) or
#                        python (python3 -m vfnic.guestdriver; vfnic_vf is not loaded)
#   vfnic.ip=ADDR/LEN    put this address on the first VF's interface (vfnic0)
# Without vfnic.exec: an interactive shell on ttyS0; leaving it powers off.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=linux LANG=C.UTF-8
export PYTHONPATH=/opt PYTHONDONTWRITEBYTECODE=1

# Mount unless already there (the initramfs moves /proc, /sys and /dev over).
mnt() {
    grep -q " $2 " /proc/mounts 2>/dev/null && return 0
    mkdir -p "$2" && mount -t "$1" ${3:+-o "$3"} "$1" "$2"
}
mnt proc /proc
mnt sysfs /sys
mnt devtmpfs /dev
mnt devpts /dev/pts gid=5,mode=620
mnt tmpfs /dev/shm
mnt tmpfs /run
mnt tmpfs /tmp
mnt hugetlbfs /dev/hugepages
echo vfnic-guest > /proc/sys/kernel/hostname
ip link set lo up

# Value of key=value on the kernel command line.
karg() {
    for w in $(cat /proc/cmdline); do
        case $w in "$1="*) echo "${w#*=}"; return 0 ;; esac
    done
    return 1
}

mods=$(karg vfnic.modules | tr , ' ')
# virtio_net: no udev runs here, so PCI drivers are not loaded on their own.
modprobe -qa virtio_net $mods

driver=$(karg vfnic.driver || echo kernel)
if [ "$driver" = kernel ]; then
    # Coldplug, as udev would: each network function's driver by its modalias
    # (vfnic_vf for a vfnic VF, through depmod's modules.alias).
    for dev in /sys/bus/pci/devices/*; do
        case $(cat "$dev/class") in
            0x02*) modprobe -q "$(cat "$dev/modalias")" ;;
        esac
    done
    # The VF interfaces are vfnic0, vfnic1.. in PCI order (a udev rule's job).
    n=0
    for net in /sys/class/net/*; do
        drv=$(readlink "$net/device/driver" 2>/dev/null) || continue
        [ "${drv##*/}" = vfnic_vf ] || continue
        ip link set "${net##*/}" name "vfnic$n" && n=$((n + 1))
    done
    # The driver's kernel messages (suspend, resume, moves) in the driver log.
    (dmesg -w | grep --line-buffered vfnic >> /run/vfnic-driver.log) &
fi

poweroff_now() {
    sync
    echo o > /proc/sysrq-trigger
    # PID 1 must not exit; the power-off is asynchronous.
    while :; do sleep 1; done
}

ip_arg=$(karg vfnic.ip)
if [ -n "$ip_arg" ] && [ "$driver" = kernel ]; then
    if [ -e /sys/class/net/vfnic0 ]; then
        ip addr add "$ip_arg" dev vfnic0
        ip link set vfnic0 up
        for _ in $(seq 100); do
            [ "$(cat /sys/class/net/vfnic0/carrier 2>/dev/null)" = 1 ] && break
            sleep 0.05
        done
        bdf=$(basename "$(readlink /sys/class/net/vfnic0/device)")
        echo "ready vfnic0 driver=vfnic_vf bdf=$bdf mac=$(cat /sys/class/net/vfnic0/address)" \
            "carrier=$(cat /sys/class/net/vfnic0/carrier)" >> /run/vfnic-driver.log
    else
        echo "vfnic: no vfnic_vf interface for vfnic.ip" >> /run/vfnic-driver.log
    fi
    cat /run/vfnic-driver.log
elif [ -n "$ip_arg" ]; then
    # The Python driver model: a TAP (vfnic0) bridged to the VF from userspace.
    python3 -m vfnic.guestdriver --ip "$ip_arg" > /run/vfnic-driver.log 2>&1 &
    echo $! > /run/vfnic-driver.pid
    for _ in $(seq 600); do
        grep -q ready /run/vfnic-driver.log 2>/dev/null && break
        kill -0 "$(cat /run/vfnic-driver.pid)" 2>/dev/null || break
        sleep 0.1
    done
    cat /run/vfnic-driver.log
fi

exec_arg=$(karg vfnic.exec)
if [ -n "$exec_arg" ]; then
    token=$(karg vfnic.token)
    script=/run/vfnic-exec.sh
    if [ "$exec_arg" = fw_cfg ]; then
        modprobe -q qemu_fw_cfg
        cat /sys/firmware/qemu_fw_cfg/by_name/opt/vfnic/exec/raw > "$script"
    else
        printf '%s' "$exec_arg" | base64 -d > "$script"
    fi
    printf '\n@@vfnic-exec-begin %s@@\n' "$token"
    cd /root && bash "$script" < /dev/null 2>&1
    status=$?
    printf '\n@@vfnic-exec-end %s status=%d@@\n' "$token" "$status"
    poweroff_now
fi

echo "vfnic guest: shell on ttyS0 (exit powers off)"
setsid -c -w bash -l < /dev/ttyS0 > /dev/ttyS0 2>&1
poweroff_now
