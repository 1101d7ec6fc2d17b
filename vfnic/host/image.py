"""The guest disk image: the cached guest root plus vfnic and its init.

scripts/build-guest.sh makes the Debian root (<cache>/guest-root). This module
copies the repo's vfnic package to /opt/vfnic (with its pure-Python
dependencies beside it), the init script to /sbin/vfnic-init, and turns the
root into an ext4 image with `mkfs.ext4 -d` (no loop mounts). A content hash
stamp rebuilds the image whenever the copied files change.

Run as `python -m vfnic.host.image` to build or refresh the image.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vfnic.errors import SetupError
from vfnic.host import kmod
from vfnic.host.runtime import cache_dir

IMAGE_NAME = "guest.img"
IMAGE_SIZE = "1G"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the vfnic package
INIT_SCRIPT = Path(__file__).with_name("guest-init.sh")
GUEST_INIT = "sbin/vfnic-init"
# Pure-Python packages vfnic imports that the guest's python3 lacks.
GUEST_DEPS = ("construct",)
GUEST_PYTHON = (3, 11)  # bookworm's python3
_SETUP_HINT = "run `make setup`"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")


def guest_root() -> Path:
    root = cache_dir() / "guest-root"
    if not (root / ".complete").exists():
        raise SetupError(f"no guest root in {root}: {_SETUP_HINT}")
    return root


def _newest(root: Path, pattern: str) -> Path:
    found = sorted((root / "boot").glob(pattern))
    if not found:
        raise SetupError(f"no {pattern} in {root / 'boot'}: {_SETUP_HINT}")
    return found[-1]


def kernel() -> Path:
    return _newest(guest_root(), "vmlinuz-*")


def initrd() -> Path:
    return _newest(guest_root(), "initrd.img-*")


def image_path() -> Path:
    return cache_dir() / IMAGE_NAME


def _sources() -> list[tuple[str, Path]]:
    """(destination inside the root, source dir or file) for every extra file tree."""
    out = [("opt/vfnic", PACKAGE_DIR)]
    for name in GUEST_DEPS:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SetupError(f"python package {name} is missing: {_SETUP_HINT}")
        out.append((f"opt/{name}", Path(next(iter(spec.submodule_search_locations)))))
    out.append((GUEST_INIT, INIT_SCRIPT))
    return out


def _walk(src: Path) -> Iterator[Path]:
    if src.is_file():
        yield src
        return
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if not name.endswith((".pyc", ".pyo")):
                yield Path(dirpath) / name


def content_hash() -> str:
    """Hash of everything the image adds to the guest root (the VF kernel module
    included), and of the root's own stamp."""
    h = hashlib.sha256()
    h.update(f"size={IMAGE_SIZE}\n".encode())
    root = guest_root()
    complete = root / ".complete"
    h.update(f"root={complete.stat().st_mtime_ns}\n".encode())
    module = kmod.installed_module(root)
    h.update(b"kmod\0" + (module.read_bytes() if module.exists() else b"") + b"\0")
    for dest, src in _sources():
        for path in _walk(src):
            rel = path.relative_to(src) if src.is_dir() else Path()
            h.update(f"{dest}/{rel}\0".encode())
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()


def _install_extras(root: Path) -> None:
    """Copy vfnic, its dependencies and the init into the (cached) guest root."""
    for dest, src in _sources():
        target = root / dest
        if src.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(src, target, ignore=_IGNORE)
        else:
            target.unlink(missing_ok=True)
            shutil.copyfile(src, target)
            target.chmod(0o755)
    # Byte-compile here (same Python minor as the guest's python3): imports
    # under TCG are several times faster with .pyc files present.
    if sys.version_info[:2] == GUEST_PYTHON:
        dirs = [str(root / dest) for dest, src in _sources() if src.is_dir()]
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", *dirs], check=False, capture_output=True
        )


def _mkfs(root: Path, image: Path) -> None:
    mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
    if not Path(mkfs).exists():
        raise SetupError(f"mkfs.ext4 not found (install e2fsprogs): {_SETUP_HINT}")
    tmp = image.with_name(image.name + ".tmp")
    tmp.unlink(missing_ok=True)
    res = subprocess.run(
        [mkfs, "-q", "-F", "-d", str(root), "-L", "root", str(tmp), IMAGE_SIZE],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        raise SetupError(f"mkfs.ext4 failed: {last}")
    # Atomic swap: a running VM keeps its (snapshot) view of the old file.
    os.replace(tmp, image)


def ensure_image(verbose: bool = True) -> Path:
    """The up-to-date guest image, rebuilt when its content hash changed."""
    image = image_path()
    stamp = image.with_name(image.name + ".stamp")
    with open(cache_dir() / "image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # The VF driver, rebuilt in the root when kmod/ changed (cheap otherwise).
        kmod.ensure_module(guest_root(), verbose)
        digest = content_hash()
        # Another process may have built it while we waited.
        if image.exists() and stamp.exists() and stamp.read_text().strip() == digest:
            return image
        if verbose:
            print(f"vfnic: building guest image {image}", file=sys.stderr)
        t0 = time.monotonic()
        root = guest_root()
        _install_extras(root)
        _mkfs(root, image)
        stamp.write_text(digest + "\n")
        if verbose:
            print(f"vfnic: guest image ready ({time.monotonic() - t0:.1f} s)", file=sys.stderr)
    return image


def main() -> int:
    try:
        path = ensure_image()
    except SetupError as exc:
        print(f"vfnic: error: {exc}", file=sys.stderr)
        return 1
    print(f"vfnic: guest image {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
