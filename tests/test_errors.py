"""The exception tree drawn in vfnic/errors.py's docstring is the real one, and the
errors reach a user as the branch says (errno reply, transport, operator)."""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vfnic
from vfnic import errors
from vfnic.device.nic import control_call
from vfnic.errors import (
    OperatorError,
    ReplyError,
    ServerUnreachable,
    TransportError,
    UsageError,
    VfnicError,
)


def drawn_tree() -> dict[str, str]:
    """class name -> parent name, from the box drawing in the docstring."""
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^(\s*(?:[│ ]   |[├└]── )*)(?:[├└]── )?([A-Z]\w+)", line)
        if not m or not re.search(r"(VfnicError|── )", line):
            continue
        depth = line.index(m.group(2))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[m.group(2)] = stack[-1][1]
        stack.append((depth, m.group(2)))
    return parents


def all_error_classes() -> dict[str, type[VfnicError]]:
    for info in pkgutil.walk_packages(vfnic.__path__, "vfnic."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    found: dict[str, type[VfnicError]] = {}
    todo: list[type[VfnicError]] = [VfnicError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("vfnic."):
                found[sub.__name__] = sub
                todo.append(sub)
    return found


def test_the_drawn_tree_is_the_class_tree() -> None:
    drawn = drawn_tree()
    real = {name: cls.__bases__[0].__name__ for name, cls in all_error_classes().items()}
    assert drawn == real


def test_three_branches_under_one_root() -> None:
    roots = {drawn_tree()[b] for b in ("ReplyError", "TransportError", "OperatorError")}
    assert roots == {"VfnicError"}
    assert sorted(c for c, p in drawn_tree().items() if p == "VfnicError") == [
        "OperatorError", "ReplyError", "TransportError"]


@pytest.mark.parametrize(("name", "branch"), [
    ("ProtocolError", ReplyError), ("DmaError", ReplyError), ("SnapshotError", ReplyError),
    ("ConnectionClosed", TransportError), ("RemoteError", TransportError),
    ("ServerUnreachable", TransportError), ("UsageError", OperatorError),
    ("SetupError", OperatorError), ("VmError", OperatorError), ("MigrationError", OperatorError),
])
def test_each_error_is_in_its_branch(name: str, branch: type[VfnicError]) -> None:
    assert issubclass(all_error_classes()[name], branch)


def test_a_missing_server_is_a_transport_error_not_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(ServerUnreachable) as err:
        control_call(tmp_path, {"op": "link-show"})
    assert not isinstance(err.value, UsageError)
    (tmp_path / "control.sock").touch()  # a stale file: nobody listens
    with pytest.raises(ServerUnreachable):
        control_call(tmp_path, {"op": "link-show"})


def test_the_command_line_says_one_line_and_exits_1(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "vfnic.cli", "link", "show", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert out.stderr == f"vfnic: error: no vfnic server in {tmp_path} (no control.sock)\n"
