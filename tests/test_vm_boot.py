"""Boot the real guest under the real QEMU (TCG) and run commands in it."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vfnic import cli
from vfnic.errors import UsageError
from vfnic.host.vm import VM, ExecParser, VfioUserFunction, VmError, run_command
from vfnic.host.vm import accel as vm_accel

pytestmark = pytest.mark.qemu


def test_exec_output_and_status() -> None:
    out = io.StringIO()
    t0 = time.monotonic()
    status, output = run_command("echo hello; printf tail; exit 3", timeout=120, out=out)
    elapsed = time.monotonic() - t0
    assert status == 3
    assert output == "hello\ntail"
    assert out.getvalue() == output
    print(f"boot+exec under {vm_accel()}: {elapsed:.1f} s")


def test_cli_vm_run_exec() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "vfnic.cli", "vm", "run", "--exec", "echo hello; exit 3"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert res.returncode == 3, res.stderr
    assert res.stdout == "hello\n"


def test_long_command_goes_through_fw_cfg() -> None:
    # Longer than fits on the kernel command line.
    cmd = "x=" + "a" * 3000 + "\necho ${#x}; hostname"
    status, output = run_command(cmd, timeout=120)
    assert (status, output) == (0, "3000\nvfnic-guest\n")


def test_bad_vf_socket_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["vm", "run", "--vf", "/nonexistent/vf0.sock", "--exec", "true"])
    err = capsys.readouterr().err
    assert rc != 0
    assert err == "vfnic: error: no vfio-user socket at /nonexistent/vf0.sock\n"


def test_vf_path_must_be_a_socket(tmp_path: Path) -> None:
    plain = tmp_path / "vf0.sock"
    plain.write_text("")
    with pytest.raises(UsageError, match="not a unix socket"):
        VfioUserFunction(plain, "vf0").check()


def test_qemu_death_is_reported(tmp_path: Path) -> None:
    # A listener that never answers VERSION: QEMU gives up and exits.
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen(1)
        fn = VfioUserFunction(path, "vf0", {"x-msg-timeout": 500})
        vm = VM([fn], command="true", run_dir=tmp_path / "run")
        with pytest.raises(VmError, match="QEMU exited with status 1 while starting: .*vf0"):
            vm.start()
        vm.stop()
        assert not vm.running()


def test_qemu_subcommand_runs_qemu(capfd: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["qemu", "--version"]) == 0
    assert "QEMU emulator version" in capfd.readouterr().out


@pytest.mark.parametrize("split", range(1, 60, 7))
def test_exec_parser_across_chunks(split: int) -> None:
    stream = (
        "boot noise\r\n@@vfnic-exec-begin t1@@\r\nline\r\npart"
        "\r\n@@vfnic-exec-end t1 status=42@@\r\n[ 1.0] sysrq: Power Off\r\n"
    )
    parser = ExecParser("t1")
    got = "".join(parser.feed(stream[i : i + split]) for i in range(0, len(stream), split))
    assert (got, parser.status) == ("line\npart", 42)


def test_exec_parser_ignores_other_tokens() -> None:
    parser = ExecParser("good")
    got = parser.feed("@@vfnic-exec-begin good@@\n@@vfnic-exec-end evil status=0@@\nmore")
    got += parser.feed("\n@@vfnic-exec-end good status=1@@\n")
    assert (got, parser.status) == ("@@vfnic-exec-end evil status=0@@\nmore", 1)
