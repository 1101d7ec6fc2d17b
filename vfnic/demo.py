"""`make demo`: the whole story on one machine, with real QEMU guests.

1. A guest boots with the vfnic PF and a VF: its kernel loaded the VF's driver
   (vfnic_vf) by itself, the VF is the network interface vfnic0 (ip, ethtool),
   and the guest's register dump shows the token the driver keeps in SCRATCH,
   the value the host sees with `vfnic regs`.
2. Two hosts and a peer in network namespaces; the guest on host A talks to the
   peer through its VF (ping, arping).
3. The guest is live-migrated to host B with `vfnic migrate` (plain QMP; the VF
   rides QEMU's stream through each host's VMState1 helper) while the peer pings
   it every 10 ms; the summary and the network downtime are printed, in
   transparent and in cooperative mode.
4. The same guest, defined in libvirt on host A, is moved to host B with
   `virsh migrate --live` (one libvirtd per host), transparently: QEMU carries the
   VF (dbus-vmstate), the VF's counters go on on B, B's NIC announces the MAC; then
   a virtio-net guest is moved the same way, for its network downtime.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vfnic.device.nic import NicServer
from vfnic.host.vm import VM, VfioUserFunction, guest_net_args
from vfnic.libvirt.lab import LibvirtHost
from vfnic.migrate.lab import GUEST_IP, Lab, LabError, Pinger, require_root, sh
from vfnic.migrate.orchestrator import Host, Options, migrate
from vfnic.regs.ids import VENDOR_ID

STEP1 = r"""
lspci -nn -k -d __VENDOR__:
ip -br link show vfnic0
ethtool -i vfnic0 | head -3
ethtool -d vfnic0 raw on | python3 -m vfnic.regs.ethtool | grep -E '^(CTRL|STATUS|RA[LH]|SCRATCH) '
""".replace("__VENDOR__", f"{VENDOR_ID:04x}")


# The guest of steps 2-3: its kernel interface, then the driver's migration counters
# every second on its console (so the destination's console shows them after a move).
GUEST_WATCH = r"""
ip -br addr show vfnic0
ethtool -i vfnic0 | head -1
keys='suspends|resumes|last_suspend_us|last_resume_us|config_restores|msix_restores|moves|pages_touched'
while sleep 1; do
    echo "vfnic0 stats: $(ethtool -S vfnic0 | grep -E " ($keys):" | tr -s ' ' | tr '\n' ' ')"
done
"""


def guest_lines(vm: VM, prefix: str) -> list[str]:
    text = vm.console_log.read_text(errors="replace") if vm.console_log.exists() else ""
    return [line.strip() for line in text.splitlines() if line.startswith(prefix)]


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def step_registers(work: Path) -> None:
    say("1. a guest with the vfnic PF and VF attached through -device vfio-user-pci")
    nic = NicServer(work / "nic", 2)
    nic.start()
    try:
        fns = [VfioUserFunction(nic.dir / "pf.sock", "pf"),
               VfioUserFunction(nic.dir / "vf0.sock", "vf0")]
        with VM(fns, command=STEP1, verbose=True) as vm:
            status = vm.wait_exec(timeout=300, out=sys.stdout)
            regs = {r["name"]: r["value"] for r in nic.nic.regs("vf0")}
        print(f"host: `vfnic regs` sees SCRATCH = {regs['SCRATCH']:#010x}")
        if status != 0 or f"0x{regs['SCRATCH']:08x}" not in vm.output or not regs["SCRATCH"]:
            raise SystemExit("demo step 1 failed")
    finally:
        nic.stop()


def wait_reachable(lab: Lab, timeout: float = 120) -> None:
    try:
        lab.wait_reachable(timeout, "the guest on its VF")
    except LabError as exc:
        raise SystemExit(str(exc)) from None


def step_network_and_migration(work: Path, modes: list[str]) -> None:
    require_root()
    for i, mode in enumerate(modes):
        lab = Lab(work / f"lab{i}")
        lab.workdir.mkdir(parents=True, exist_ok=True)
        lab.up()
        va = vb = None
        try:
            da = lab.start_nic("a", 2, nic_id=1)
            db = lab.start_nic("b", 2, nic_id=2)
            common = dict(command=GUEST_WATCH, kernel_args=guest_net_args(f"{GUEST_IP}/24"),
                          token="demo")
            va = VM([VfioUserFunction(da / "vf0.sock", "vf0")], netns=lab.ns("a"),
                    verbose=True, **common)  # type: ignore[arg-type]
            if i == 0:
                say("2. host A's guest talks to a peer through its VF (uplink TAP, bridge)")
            va.start()
            wait_reachable(lab)
            if i == 0:
                deadline = time.monotonic() + 60  # the guest's command runs after its init
                while not guest_lines(va, "driver: ") and time.monotonic() < deadline:
                    time.sleep(0.2)
                print("guest: " + "\n       ".join(
                    guest_lines(va, "vfnic0 ")[:1] + guest_lines(va, "driver: ")[:1]))
                print(sh("ip", "netns", "exec", lab.ns("peer"), "ping", "-c", "5", "-i", "0.2",
                         GUEST_IP).stdout)
                print(sh("ip", "netns", "exec", lab.ns("peer"), "arping", "-c", "2", "-I",
                         f"{lab.ident}peer0", GUEST_IP, check=False).stdout)
                print(subprocess.run([sys.executable, "-m", "vfnic.cli", "link", "show",
                                      str(da)], capture_output=True, text=True).stdout)
            say(f"3. live migration A -> B, {mode} mode, peer pinging every 10 ms")
            vb = VM([VfioUserFunction(db / "vf0.sock", "vf0")], netns=lab.ns("b"),
                    extra_args=["-S", "-incoming", "tcp:192.168.77.2:4444"],
                    **common)  # type: ignore[arg-type]
            vb.start()
            pinger = Pinger(lab)
            pinger.start()
            time.sleep(2)
            summary = migrate(Host(str(va.qmp_socket), str(da), 0),
                              Host(str(vb.qmp_socket), str(db), 0),
                              Options("tcp:192.168.77.2:4444", mode))
            time.sleep(3)
            pinger.stop()
            print(summary.text())
            after = guest_lines(vb, "vfnic0 stats: ")
            if after:
                print(f"  guest on B, ethtool -S vfnic0: {after[-1][len('vfnic0 stats: '):]}")
            sent, got = pinger.loss()
            print(f"  network downtime  {pinger.downtime_ms():9.1f} ms "
                  f"(peer ping every 10 ms: {sent} sent, {got} answered)")
            print("  timeline (ms)    ", json.dumps(summary.timeline_ms))
            if summary.status != "completed":
                raise SystemExit("demo migration failed")
        finally:
            for vm in (va, vb):
                if vm is not None:
                    vm.stop()
            lab.down()


def _virsh_move(lab: Lab, a: LibvirtHost, b: LibvirtHost, name: str) -> tuple[float, float, int]:
    """virsh migrate --live NAME a -> b with the peer pinging: (seconds, network
    downtime ms, virsh's exit status)."""
    pinger = Pinger(lab)
    pinger.start()
    time.sleep(2)
    cmd = ["migrate", "--live", "--verbose", name, b.uri,
           "--migrateuri", f"tcp://{lab.host_ip('b')}:49152"]
    print(f"$ virsh -c {a.uri} {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    done = subprocess.run(["virsh", "-c", a.uri, *cmd], stdin=subprocess.DEVNULL,
                          check=False)  # --verbose shows its progress here
    took = time.monotonic() - t0
    try:
        lab.wait_reachable(30)
    except LabError:
        pass
    time.sleep(1)
    pinger.stop()
    return took, pinger.downtime_ms(), done.returncode


def step_virsh(work: Path) -> None:
    from vfnic.device.nic import control_call
    from vfnic.libvirt.lab import lab_domain
    from vfnic.migrate.lab import VIRTIO_NETSETUP

    require_root()
    say("4. virsh migrate between two libvirt hosts, the VF carried by QEMU (transparent)")
    lab = Lab(work / "virsh")
    lab.workdir.mkdir(parents=True, exist_ok=True)
    lab.up()
    try:
        lab.start_nic("a", 2, nic_id=1)
        lab.start_nic("b", 2, nic_id=2)
        bridge = lab.bridge_to_lan("a")
        lab.bridge_to_lan("b")
        xml = lab_domain(lab, "vfnic-demo")
        with LibvirtHost(lab, "a") as a, LibvirtHost(lab, "b") as b:
            for host, args in ((a, ["define", str(xml)]), (a, ["start", "vfnic-demo"])):
                print(f"$ virsh -c {host.uri} {' '.join(args)}")
                print(host.virsh(*args).stdout.strip())
            wait_reachable(lab)
            took, vf_down, rc = _virsh_move(lab, a, b, "vfnic-demo")
            print(f"$ virsh -c {b.uri} list")
            print(b.virsh("list").stdout.rstrip())
            src = control_call(lab.nic_dir("a"), {"op": "migrations", "settle": 10})[-1]
            dst = control_call(lab.nic_dir("b"), {"op": "migrations", "settle": 10})[-1]
            regs = {r["name"]: r["value"] for r in
                    control_call(lab.nic_dir("b"), {"op": "regs", "function": "vf0"})}
            print(f"  host A's NIC: Save {src.get('save_ms')} ms, {src.get('bytes')} bytes "
                  f"({src.get('dma_bytes')} bytes the VF wrote by DMA, in {src.get('pages')} "
                  f"pages) in QEMU's stream, {src.get('result')}")
            print(f"  host B's NIC: Load {dst.get('load_ms')} ms, PCI config back in QEMU in "
                  f"{dst.get('replay_ms')} ms, MSI-X table back: "
                  f"{dst.get('msix_restored', False)}, guest ran first: "
                  f"{dst.get('early_access')}, MAC announced: {dst.get('announced', False)}")
            at_stop = src.get("regs", {})
            print(f"  VF counters at the stop on A: GPRC {at_stop.get('GPRC')} GPTC "
                  f"{at_stop.get('GPTC')}; on B now: GPRC {regs['GPRC']} GPTC {regs['GPTC']}")
            print(f"  virsh migrate     {took * 1000:9.0f} ms")
            print(f"  network downtime  {vf_down:9.1f} ms (VF, transparent)")
            if rc != 0 or src.get("result") != "completed":
                raise SystemExit("demo virsh migration failed")
            b.virsh("destroy", "vfnic-demo", check=False)
            say("4b. the same with a virtio-net guest (libvirt TAP on a bridge per host)")
            vxml = lab_domain(lab, "virtio-demo", VIRTIO_NETSETUP + "exec sleep 1000000\n",
                              virtio_bridge=bridge)
            a.virsh("define", str(vxml))
            a.virsh("start", "virtio-demo")
            wait_reachable(lab)
            vtook, vio_down, vrc = _virsh_move(lab, a, b, "virtio-demo")
            b.virsh("destroy", "virtio-demo", check=False)
            print(f"  virsh migrate     {vtook * 1000:9.0f} ms")
            print(f"  network downtime  {vio_down:9.1f} ms (virtio-net) vs {vf_down:.1f} ms "
                  "(VF, transparent)")
            if vrc != 0:
                raise SystemExit("demo virsh migration of the virtio-net guest failed")
    finally:
        lab.down()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vfnic.demo")
    p.add_argument("--modes", default="transparent,cooperative")
    p.add_argument("--no-virsh", action="store_true", help="skip the virsh migrate step")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vfd-", dir="/tmp") as tmp:
        work = Path(tmp)
        step_registers(work)
        step_network_and_migration(work, args.modes.split(","))
        if not args.no_virsh:
            step_virsh(work)
    print("\ndemo done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
