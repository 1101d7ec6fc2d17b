"""EITRn, interrupt moderation per MSI-X vector (vfnic/regs/table.py): the minimum
interval between two interrupts of a vector; a cause pending after the interval is
signalled at once, one pending earlier at the interval's end, if still pending and
enabled then. Against a real `NicServer`, through a vfio-user client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from vfnic.device.function import PciFunction
from vfnic.device.nic import NicServer
from vfnic.regs import table as T
from vfnic.vfiouser import wire
from vfnic.vfiouser.client import VfioUserClient

pytest.register_assert_rewrite("conftest_proto")
pytest_plugins = ["conftest_proto"]
from conftest_proto import (  # noqa: E402
    BAR0,
    CFG_MSIX_FLAGS,
    MSIX_ENABLE,
    REG_EICR,
    REG_EICS,
    REG_EIMS,
    close_all,
    eventfd_count,
    make_eventfds,
    wait_until,
)

MSIX = wire.PciIrq.MSIX
EVENTFD = wire.VFIO_IRQ_SET_DATA_EVENTFD
TRIGGER = wire.VFIO_IRQ_SET_ACTION_TRIGGER
INTERVAL_US = 4000  # long enough to tell "at once" from "at the interval's end"
INTERVAL = INTERVAL_US / 1e6
TRIES = 50  # a loaded machine may let an interval pass between two register writes


def within_one_interval(client: VfioUserClient, nic_server: NicServer, vf0: PciFunction,
                        efds: list[int], writes: Callable[[], None]) -> float:
    """Vector 0 idle for two intervals, drained, one cause signalled at once, then
    ``writes``, retried until they are done within that interrupt's interval (what
    the moderation tests assume). Returns its time."""
    throttle = nic_server.nic.throttle

    def settled() -> bool:  # also a deferred interrupt that a late timer thread holds
        time.sleep(INTERVAL)
        return not throttle.waiting(vf0, 0) and \
            time.monotonic() - throttle.last.get((vf0, 0), 0.0) >= 2 * INTERVAL

    for _ in range(TRIES):
        wait_until(settled, 5.0, "vector 0 idle for an interval")
        client.write32(BAR0, REG_EICR, 0xFFFFFFFF)  # as the fixture left it: none pending,
        client.write32(BAR0, REG_EIMS, 0xFFFFFFFF)  # every cause enabled
        for fd in efds:
            eventfd_count(fd)  # drained
        client.write32(BAR0, REG_EICS, 1 << 0)
        if eventfd_count(efds[0]) != 1:
            continue  # a late deferred interrupt came in between (lone cause: its own test)
        first = throttle.last[(vf0, 0)]
        writes()
        if time.monotonic() - first < 0.9 * INTERVAL:  # their replies came: handled by then
            return first
    pytest.fail(f"no writes within the interval of the interrupt in {TRIES} tries")


@pytest.fixture
def efds(client: VfioUserClient) -> Iterator[list[int]]:
    """vf0 with MSI-X on, an eventfd per vector, every cause enabled, none pending."""
    fds = make_eventfds(T.NUM_VECTORS)
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, T.NUM_VECTORS, fds=fds)
    client.config_write(CFG_MSIX_FLAGS, 2, MSIX_ENABLE)
    client.write32(BAR0, REG_EICR, 0xFFFFFFFF)
    client.write32(BAR0, REG_EIMS, 0xFFFFFFFF)
    yield fds
    close_all(fds)


def test_eitr_is_one_register_per_vector_reset_0_and_12_bits(client: VfioUserClient) -> None:
    for v in range(T.NUM_VECTORS):
        assert client.read32(BAR0, T.EITR(v)) == 0
    client.write32(BAR0, T.EITR(1), 0xFFFFFFFF)
    client.write32(BAR0, T.EITR(2), 250)
    assert client.read32(BAR0, T.EITR(1)) == T.EITR_MAX_US
    assert client.read32(BAR0, T.EITR(2)) == 250
    assert client.read32(BAR0, T.EITR(0)) == 0 and client.read32(BAR0, T.EITR(3)) == 0


def test_without_eitr_every_cause_interrupts_at_once(client: VfioUserClient,
                                                     efds: list[int]) -> None:
    for _ in range(3):
        client.write32(BAR0, REG_EICS, 1 << 0)
    assert eventfd_count(efds[0]) == 3


def test_a_lone_cause_is_signalled_at_once(client: VfioUserClient, efds: list[int]) -> None:
    client.write32(BAR0, T.EITR(0), INTERVAL_US)
    client.write32(BAR0, REG_EICS, 1 << 0)
    assert eventfd_count(efds[0]) == 1  # before the write's reply: not delayed
    time.sleep(2 * INTERVAL_US / 1e6)
    assert eventfd_count(efds[0]) == 0
    client.write32(BAR0, REG_EICS, 1 << 0)  # the interval has passed: at once again
    assert eventfd_count(efds[0]) == 1


def test_causes_within_the_interval_share_one_interrupt_at_its_end(
        client: VfioUserClient, vf0: PciFunction, nic_server: NicServer,
        efds: list[int]) -> None:
    client.write32(BAR0, T.EITR(0), INTERVAL_US)

    def two_causes() -> None:
        client.write32(BAR0, REG_EICS, 1 << 0)
        client.write32(BAR0, REG_EICS, 1 << 0)

    first = within_one_interval(client, nic_server, vf0, efds, two_causes)
    got = 0

    def arrived() -> bool:
        nonlocal got
        got += eventfd_count(efds[0])
        return got > 0

    wait_until(arrived, 2.0, "the deferred interrupt")
    assert time.monotonic() - first >= INTERVAL_US / 1e6  # not before the interval's end
    time.sleep(2 * INTERVAL_US / 1e6)
    assert got + eventfd_count(efds[0]) == 1  # both causes, one interrupt
    assert eventfd_count(efds[1]) == eventfd_count(efds[2]) == 0


def test_throttling_is_per_vector(client: VfioUserClient, vf0: PciFunction,
                                 nic_server: NicServer, efds: list[int]) -> None:
    client.write32(BAR0, T.EITR(0), INTERVAL_US)

    def vector_1_twice() -> None:  # vector 1: EITR1 is 0
        client.write32(BAR0, REG_EICS, 1 << 1)
        client.write32(BAR0, REG_EICS, 1 << 1)

    within_one_interval(client, nic_server, vf0, efds, vector_1_twice)
    assert eventfd_count(efds[1]) == 2  # both at once, whatever vector 0's interval
    assert eventfd_count(efds[0]) <= 1  # vector 0: its deferred one, if due already


@pytest.mark.parametrize("how", ["cleared", "masked"])
def test_a_deferred_interrupt_is_dropped_if_its_cause_went_away(
        client: VfioUserClient, vf0: PciFunction, nic_server: NicServer,
        efds: list[int], how: str) -> None:
    client.write32(BAR0, T.EITR(0), INTERVAL_US)

    def deferred_then_gone() -> None:
        client.write32(BAR0, REG_EICS, 1 << 0)  # deferred
        if how == "cleared":
            client.write32(BAR0, REG_EICR, 1 << 0)
        else:
            client.write32(BAR0, REG_EIMS, 0)

    within_one_interval(client, nic_server, vf0, efds, deferred_then_gone)
    time.sleep(3 * INTERVAL)
    assert eventfd_count(efds[0]) == 0


def test_ctrl_rst_resets_eitr(client: VfioUserClient) -> None:
    client.write32(BAR0, T.EITR(0), 123)
    client.write32(BAR0, T.CTRL, T.CTRL_RST)
    assert client.read32(BAR0, T.EITR(0)) == 0
