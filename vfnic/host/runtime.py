"""Which QEMU to run, with what environment, and which accelerator.

The system's qemu-system-x86_64 is used when it has the vfio-user client
(QEMU >= 10.1). Otherwise the Debian sid root made by scripts/setup-qemu.sh
is used, its QEMU started through sid's own dynamic loader so that every host
path works as is (no chroot, no bind mounts).
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from vfnic.errors import SetupError

QEMU_NAME = "qemu-system-x86_64"
_SETUP_HINT = "run `make setup`"
_LIBDIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
_FIRMWARE_DIRS = ("usr/share/qemu", "usr/share/seabios")


def repo_root() -> Path:
    """The checkout this package lives in (vfnic/host/runtime.py -> repo)."""
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """$VFNIC_CACHE, else <repo>/.vfnic; created on demand."""
    env = os.environ.get("VFNIC_CACHE")
    path = Path(env) if env else repo_root() / ".vfnic"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def qemu_root() -> Path:
    return cache_dir() / "qemu-root"


def _has_vfio_user(argv: list[str], env: dict[str, str] | None = None) -> bool:
    try:
        out = subprocess.run(
            [*argv, "-device", "help"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return '"vfio-user-pci"' in out


@functools.cache
def _system_qemu() -> str | None:
    """The system QEMU if it has the vfio-user client; $VFNIC_QEMU overrides PATH."""
    path = os.environ.get("VFNIC_QEMU") or shutil.which(QEMU_NAME)
    if path and _has_vfio_user([path]):
        return path
    return None


def _sid_ready(root: Path) -> bool:
    return (root / ".complete").exists() and (root / "usr/bin" / QEMU_NAME).exists()


def qemu_kind() -> str:
    """'system' or 'sid'; SetupError when neither is usable."""
    if _system_qemu():
        return "system"
    if _sid_ready(qemu_root()):
        return "sid"
    raise SetupError(f"no QEMU with vfio-user-pci (needs QEMU >= 10.1): {_SETUP_HINT}")


def qemu_argv() -> list[str]:
    """The argv prefix that starts QEMU (binary, loader and -L firmware flags)."""
    system = _system_qemu()
    if system:
        return [system]
    root = qemu_root()
    if not _sid_ready(root):
        qemu_kind()  # raises the SetupError
    loader = root / "lib64/ld-linux-x86-64.so.2"
    libpath = ":".join(str(root / d) for d in _LIBDIRS)
    argv = [str(loader), "--library-path", libpath, str(root / "usr/bin" / QEMU_NAME)]
    for fw in _FIRMWARE_DIRS:
        argv += ["-L", str(root / fw)]
    return argv


def qemu_env() -> dict[str, str]:
    """The environment QEMU needs (module dir for the sid runtime)."""
    env = dict(os.environ)
    if not _system_qemu():
        env["QEMU_MODULE_DIR"] = str(qemu_root() / "usr/lib/x86_64-linux-gnu/qemu")
    return env


@functools.cache
def qemu_version() -> str:
    """First line of `qemu --version`, e.g. 'QEMU emulator version 11.1.3 (...)'."""
    out = subprocess.run(
        [*qemu_argv(), "--version"],
        capture_output=True,
        text=True,
        env=qemu_env(),
        timeout=30,
        check=False,
    )
    if out.returncode != 0:
        raise SetupError(f"QEMU does not start ({out.stderr.strip()[:200]}): {_SETUP_HINT}")
    return out.stdout.splitlines()[0].strip()


# -- Accelerator ---------------------------------------------------------------------

_PROBE_FILE = "kvm-probe"
PROBE_TIMEOUT = 30.0  # TCG boots in ~6 s; a working KVM is faster


def _probe_key() -> str:
    return f"{qemu_version()} | {platform.release()}"


def write_probe(ok: bool) -> None:
    (cache_dir() / _PROBE_FILE).write_text(f"{_probe_key()}\n{'ok' if ok else 'fail'}\n")


def _read_probe() -> bool | None:
    """Cached probe result for this QEMU and host kernel, or None."""
    try:
        key, result = (cache_dir() / _PROBE_FILE).read_text().splitlines()[:2]
    except (OSError, ValueError):
        return None
    if key != _probe_key():
        return None
    return result == "ok"


def accel(probe: Callable[[], bool] | None = None) -> str:
    """'tcg' unless KVM is forced or has passed a probe boot.

    VFNIC_ACCEL=tcg|kvm forces a choice. KVM hangs Linux guests on some hosts,
    so it is probed (by ``probe``, vfnic.host.vm.probe_kvm boots a guest) only
    with VFNIC_KVM_PROBE=1, and the result is cached.
    """
    forced = os.environ.get("VFNIC_ACCEL")
    if forced:
        return forced
    cached = _read_probe()
    if cached is not None:
        return "kvm" if cached else "tcg"
    if os.environ.get("VFNIC_KVM_PROBE") == "1" and probe is not None and probe():
        return "kvm"
    return "tcg"


def accel_args(name: str) -> list[str]:
    return ["-accel", name]
