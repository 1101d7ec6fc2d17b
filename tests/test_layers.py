"""The import contracts (pyproject.toml, [tool.importlinter]) hold, cover every
top-level part of vfnic, and catch a violation, lazy and TYPE_CHECKING imports
included; the device layer imports nothing of QMP."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the vfnic package found in ``root``."""
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"),
                           "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)


def layer_modules() -> set[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in config["contracts"] if c["id"] == "layers")["layers"]
    return {name.strip() for layer in layers for name in layer.split("|")}


def test_the_contracts_hold() -> None:
    out = lint_imports(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_every_part_of_vfnic_is_in_a_layer() -> None:
    named = layer_modules()
    parts = {f"vfnic.{p.stem}" for p in (REPO / "vfnic").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__")
             or (p.is_dir() and (p / "__init__.py").exists())}
    assert parts <= named, f"not in the layers contract: {sorted(parts - named)}"


@pytest.mark.parametrize(("module", "line"), [
    # a function-level import of a higher layer
    ("vfnic/device/nic.py", "\ndef _late() -> None:\n    from vfnic.migrate import follower\n"),
    # a TYPE_CHECKING-only import of a higher layer
    ("vfnic/savevm/migration.py",
     "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vfnic.device import nic\n"),
    # the register table the guest driver uses must stay stdlib only
    ("vfnic/regs/table.py", "\nimport construct\n"),
])
def test_a_violation_breaks_the_lint(tmp_path: Path, module: str, line: str) -> None:
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    shutil.copytree(REPO / "vfnic", tmp_path / "vfnic",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / module, "a") as f:
        f.write(line)
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout, out.stdout


def test_the_nic_server_imports_no_qmp() -> None:
    code = ("import sys, tempfile; from vfnic.device.nic import NicServer; "
            "s = NicServer(tempfile.mkdtemp(prefix='vfl-'), 1); s.start(); s.stop(); "
            "print(sorted(m for m in sys.modules if m.startswith(('qemu', 'vfnic.migrate'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python3")
@pytest.mark.parametrize("module", ["vfnic.bench.guest_regs", "vfnic.bench.guest_server"])
def test_the_bench_guest_programs_need_only_the_stdlib(module: str) -> None:
    # -S: no site-packages, as on the guest's bare python3 (PYTHONPATH=/opt there).
    out = subprocess.run(["/usr/bin/python3", "-S", "-m", module, "--help"],
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and f"python3 -m {module}" in out.stdout, out.stderr
