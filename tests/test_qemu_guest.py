"""Real QEMU: a guest booted with the vfnic PF and a VF sees them on its PCI bus
and reaches their registers."""

from __future__ import annotations

import json
import subprocess
import sys

from vfnic.device.nic import NicServer
from vfnic.host.vm import VM, VfioUserFunction, guest_net_args

GUEST = r"""
set -e
for d in /sys/bus/pci/devices/*; do
    case "$(cat $d/device)" in 0x5fe0) PF=$d ;; 0x5fe1) VF=$d ;; esac
done
echo "PF=$PF VF=$VF"
lspci -nn
lspci -vvv -d 1234:
python3 - "$PF" "$VF" <<'PY'
import mmap, os, struct, sys
pf, vf = sys.argv[1], sys.argv[2]
cfg = open(pf + "/config", "rb").read()
# SR-IOV capability body at 0x100 (InitialVFs 0x0c, TotalVFs 0x0e, NumVFs 0x10, VF DID 0x1a)
fields = (0x0c, 0x0e, 0x10, 0x1a)
print("sriov", *(hex(struct.unpack_from("<H", cfg, 0x100 + o)[0]) for o in fields))
fd = os.open(vf + "/config", os.O_RDWR)
cmd = struct.unpack("<H", os.pread(fd, 2, 4))[0]
os.pwrite(fd, struct.pack("<H", cmd | 0x2), 4)  # memory space on
bar = mmap.mmap(os.open(vf + "/resource0", os.O_RDWR | os.O_SYNC), 0x4000)
regs = memoryview(bar).cast("I")
regs[0x28 // 4] = 0x5A5AA5A5  # MTA: RW
regs[0x08 // 4] = 0xFFFFFFFF  # STATUS: RO, must not change
print("mta", hex(regs[0x28 // 4]), "status", hex(regs[0x08 // 4]))
PY
"""


def test_guest_lists_pf_and_vf_and_reads_back_a_register(nic: NicServer) -> None:
    fns = [VfioUserFunction(nic.dir / "pf.sock", "pf0"),
           VfioUserFunction(nic.dir / "vf0.sock", "vf0")]
    # Raw register access from userspace: the VF's kernel driver must not own it.
    with VM(fns, command=GUEST, kernel_args=guest_net_args(driver="python")) as vm:
        status = vm.wait_exec(timeout=180)
        out = vm.output
        # The host sees what the guest wrote, while the guest is still attached.
        regs = json.loads(subprocess.run(
            [sys.executable, "-m", "vfnic.cli", "regs", str(nic.dir), "vf0", "--json"],
            check=True, capture_output=True, text=True).stdout)
    assert status == 0, out
    assert "Ethernet controller [0200]: Device [1234:5fe0]" in out
    assert "Ethernet controller [0200]: Device [1234:5fe1]" in out
    assert "MSI-X: Enable- Count=4" in out
    assert "Express (v2)" in out and "Power Management version 3" in out
    # QEMU's vfio drops the SR-IOV extended capability header (hw/vfio/pci.c,
    # vfio_add_ext_cap), so lspci cannot list it; its registers still reach the guest.
    assert "sriov 0x8 0x8 0x2 0x5fe1" in out
    assert "mta 0x5a5aa5a5 status 0x0" in out
    by_name = {r["name"]: r["value"] for r in regs}
    assert by_name["MTA"] == 0x5A5AA5A5
    assert by_name["STATUS"] == 0


def test_cli_shows_attached_functions(nic: NicServer) -> None:
    fns = [VfioUserFunction(nic.dir / "vf1.sock", "vf1")]
    with VM(fns, command="lspci -d 1234:5fe1") as vm:
        assert vm.wait_exec(timeout=180) == 0
        shown = subprocess.run([sys.executable, "-m", "vfnic.cli", "link", "show", str(nic.dir)],
                               check=True, capture_output=True, text=True).stdout
    assert "vf 1" in shown and "attached" in shown.split("vf 1")[1].splitlines()[0]
    assert "not attached" in shown.split("vf 0")[1].splitlines()[0]


def test_host_lspci_decodes_the_pf_sriov_capability(nic: NicServer) -> None:
    """What the guest's lspci cannot show (see above), the host's can: pciutils decodes
    the config space vfnic presents, SR-IOV capability included."""
    def lspci(fn: str) -> str:
        return subprocess.run([sys.executable, "-m", "vfnic.cli", "lspci", str(nic.dir), fn],
                              check=True, capture_output=True, text=True).stdout

    pf, vf1 = lspci("pf"), lspci("vf1")
    assert pf.startswith("01:00.0 Ethernet controller [0200]: Device [1234:5fe0]")
    assert "Capabilities: [100 v1] Single Root I/O Virtualization (SR-IOV)" in pf
    assert "Initial VFs: 8, Total VFs: 8, Number of VFs: 2" in pf
    assert "VF offset: 1, stride: 1, Device ID: 5fe1" in pf
    assert "MSI-X: Enable- Count=4" in pf and "Express (v2) Endpoint" in pf
    assert vf1.startswith("01:00.2 Ethernet controller [0200]: Device [1234:5fe1]")
    assert "SR-IOV" not in vf1
    dump = subprocess.run([sys.executable, "-m", "vfnic.cli", "lspci", str(nic.dir), "pf", "-x"],
                          check=True, capture_output=True, text=True).stdout.splitlines()
    assert len(dump) == 1 + 4096 // 16 and dump[1].startswith("00: 34 12 e0 5f")
