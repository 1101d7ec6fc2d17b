#!/bin/sh
# PID 1 of the vfnic test guest, installed as /sbin/vfnic-init.
# Kernel command line:
#   vfnic.exec=<base64>  run that bash script between markers, then power off
#   vfnic.exec=fw_cfg    same, script read from fw_cfg opt/vfnic/exec
#   vfnic.token=<hex>    tag carried in the markers
#   vfnic.modules=a,b    extra modules to load
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

poweroff_now() {
    sync
    echo o > /proc/sysrq-trigger
    # PID 1 must not exit; the power-off is asynchronous.
    while :; do sleep 1; done
}

# vfnic.ip=ADDR/LEN: start the vfnic guest driver on the first VF at boot.
ip_arg=$(karg vfnic.ip)
if [ -n "$ip_arg" ]; then
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
