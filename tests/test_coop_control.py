"""The cooperative source's interleavings that a real migration cannot be made to
produce on demand (tests/test_migration_lab.py and tests/test_libvirt_lab.py run the
same code against real QEMUs and guests): QEMU switching over before the VF driver
acknowledged SUSPEND (it does at downtime-limit 0 when a dirty-bitmap sync finds
nothing), failing meanwhile, and a source QEMU gone before its migration's end was
read. QEMU's side is a script of query-migrate answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from qemu.qmp import EventListener

from vfnic.migrate import control

RAM = 1 << 30
BANDWIDTH = 1 << 27


def ram(remaining: int, syncs: int) -> dict[str, Any]:
    return {"total": RAM, "remaining": remaining, "dirty-sync-count": syncs}


class ScriptedQemu:
    """Answers query-migrate from ``script`` (its last answer repeats), records
    migrate-set-parameters."""

    def __init__(self, script: list[dict[str, Any]]) -> None:
        self.script = script
        self.set: list[dict[str, Any]] = []

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        await asyncio.sleep(0)  # a reply comes later than the request
        if cmd == "query-migrate":
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if cmd == "query-migrate-parameters":
            return {"downtime-limit": 300, "max-bandwidth": BANDWIDTH}
        if cmd == "migrate-set-parameters":
            self.set.append(dict(args or {}))
            return {}
        raise AssertionError(f"unexpected command {cmd}")


class Driver:
    """The mailbox: acknowledges `migrate` at once, `suspend` when ``ack`` is set."""

    def __init__(self) -> None:
        self.ack = asyncio.Event()
        self.sent: list[str] = []

    async def __call__(self, state: str, words: list[int]) -> dict[str, Any]:
        self.sent.append(state)
        if state == "suspend":
            await self.ack.wait()
        return {"acked": True, "mailbox_ms": 1.0, "driver_us": 100}


ACTIVE_AT_SUSPEND_POINT = {"status": "active", "ram": ram(RAM // 64, 1)}


def run(script: list[dict[str, Any]], acks: bool,
        after: float = 0.05) -> tuple[ScriptedQemu, control.CooperativeSource, Any]:
    qemu = ScriptedQemu(script)

    async def main() -> Any:
        driver = Driver()
        coop = control.CooperativeSource(qemu, driver, precopy_timeout=5.0)  # type: ignore[arg-type]
        await coop.start()
        if acks:
            asyncio.get_running_loop().call_later(after, driver.ack.set)
        try:
            return coop, await asyncio.wait_for(coop.suspend(), 3.0)
        except (control.MigrationError, TimeoutError) as exc:
            return coop, exc
        finally:
            await coop.release()

    coop, outcome = asyncio.run(main())
    return qemu, coop, outcome


def test_acknowledged_suspend_leaves_the_bandwidth_alone() -> None:
    """QEMU's pass goes on at the user's max-bandwidth (no bandwidth trick: below
    10 B/s QEMU lifts its limit), the downtime-limit comes back after pass 1."""
    qemu, coop, ack = run([ACTIVE_AT_SUSPEND_POINT, {"status": "active", "ram": ram(0, 2)}],
                          acks=True)
    assert ack["acked"] and coop.suspended and coop.released_sync == 2
    assert coop.point == {"syncs": 1, "left_pct": round(100 / 64, 2)}
    assert qemu.set == [{"downtime-limit": 0}, {"downtime-limit": 300}]


def test_qemu_switching_over_before_the_acknowledgement_overtakes_the_suspend() -> None:
    """No acknowledgement is awaited from a stopped guest: SuspendOvertaken at once
    (not the mailbox's timeout), QEMU's bandwidth and limit back."""
    qemu, coop, outcome = run([ACTIVE_AT_SUSPEND_POINT, ACTIVE_AT_SUSPEND_POINT,
                               {"status": "device", "ram": ram(0, 3)}], acks=False)
    assert isinstance(outcome, control.SuspendOvertaken), outcome
    assert coop.suspended  # the SUSPEND was sent: a rollback resumes the driver
    assert qemu.set == [{"downtime-limit": 0}, {"downtime-limit": 300}]


def test_a_migration_failing_before_the_acknowledgement_is_no_overtaken_suspend() -> None:
    _, _, outcome = run([ACTIVE_AT_SUSPEND_POINT, ACTIVE_AT_SUSPEND_POINT,
                         {"status": "failed", "error-desc": "connection reset"}], acks=False)
    assert isinstance(outcome, control.MigrationError)
    assert not isinstance(outcome, control.SuspendOvertaken)
    assert "failed" in str(outcome) and "connection reset" in str(outcome)


def test_an_acknowledgement_racing_the_switchover_counts() -> None:
    """The acknowledgement that came with QEMU's last pre-copy answer is the driver's:
    not overtaken."""
    qemu, coop, ack = run([ACTIVE_AT_SUSPEND_POINT, {"status": "active", "ram": ram(0, 2)},
                           {"status": "completed"}], acks=True, after=0.0)
    assert ack["acked"] and coop.suspend_ack is ack


@pytest.mark.parametrize(("statuses", "ended"), [
    (["setup", "active", "device", "completed"], "completed"),
    (["setup", "active", "failed"], "failed"),
    (["setup", "active"], "source-gone after active"),
    ([], "source-gone after active"),
])
def test_a_gone_source_ends_as_its_last_event_said(statuses: list[str], ended: str) -> None:
    async def main() -> str:
        events = EventListener("MIGRATION")
        for st in statuses:
            await events.put({"event": "MIGRATION", "data": {"status": st}})
        events.clear()  # read already: history keeps them
        return control.ended_as(events)

    assert asyncio.run(main()) == ended
