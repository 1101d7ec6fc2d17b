"""DEVICE_SET_IRQS: eventfds for MSI-X vectors, the device signalling them, masking,
and the errors."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest

from vfnic.device.function import PciFunction
from vfnic.vfiouser import wire
from vfnic.vfiouser.client import VfioUserClient

# Shared fixtures and helpers (tests/conftest_proto.py), rewritten for assert messages.
pytest.register_assert_rewrite("conftest_proto")
pytest_plugins = ["conftest_proto"]
from conftest_proto import (  # noqa: E402
    BAR0,
    CFG_COMMAND,
    CFG_MSIX_FLAGS,
    MSIX_ENABLE,
    REG_EICR,
    REG_EICS,
    REG_EIMS,
    VENDOR_ID,
    RawConn,
    close_all,
    eventfd_count,
    expect_errno,
    irq_set_payload,
    make_eventfds,
    msg,
    open_fds,
    sock_path,
    u32,
    wait_detached,
    wait_until,
)

SET_IRQS = wire.Command.DEVICE_SET_IRQS
MSIX = wire.PciIrq.MSIX
INTX = wire.PciIrq.INTX
NONE = wire.VFIO_IRQ_SET_DATA_NONE
BOOL = wire.VFIO_IRQ_SET_DATA_BOOL
EVENTFD = wire.VFIO_IRQ_SET_DATA_EVENTFD
MASK = wire.VFIO_IRQ_SET_ACTION_MASK
UNMASK = wire.VFIO_IRQ_SET_ACTION_UNMASK
TRIGGER = wire.VFIO_IRQ_SET_ACTION_TRIGGER

# EICR cause bit -> MSI-X vector
CAUSE_VECTORS = [(0, 0), (1, 1), (30, 2), (31, 3)]


@pytest.fixture
def efds() -> Iterator[list[int]]:
    fds = make_eventfds(4)
    yield fds
    close_all(fds)


def enable_msix(c: VfioUserClient) -> None:
    c.config_write(CFG_MSIX_FLAGS, 2, MSIX_ENABLE)
    assert c.config_read(CFG_MSIX_FLAGS, 2) & MSIX_ENABLE


def fire(c: VfioUserClient, cause: int) -> None:
    """Unmask only ``cause`` in EIMS and raise it through EICS (after clearing EICR)."""
    c.write32(BAR0, REG_EICR, 0xFFFFFFFF)  # W1C: no stale causes
    c.write32(BAR0, REG_EIMS, 1 << cause)
    c.write32(BAR0, REG_EICS, 1 << cause)


def counts(fds: list[int]) -> list[int]:
    return [eventfd_count(fd) for fd in fds]


def irq_state(fn: PciFunction) -> tuple[list[tuple[int, int]], set[tuple[int, int]]]:
    with fn.lock:
        return sorted(fn.irq_fds), set(fn.irq_masked)


# -- signalling -------------------------------------------------------------------------


def test_msix_eventfds_are_signalled_per_cause(client: VfioUserClient, vf0: PciFunction,
                                               efds: list[int]) -> None:
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, fds=efds)
    assert irq_state(vf0)[0] == [(MSIX, v) for v in range(4)]
    enable_msix(client)
    for cause, vector in CAUSE_VECTORS:
        fire(client, cause)
        expected = [0, 0, 0, 0]
        expected[vector] = 1
        assert counts(efds) == expected, f"cause bit {cause}"


def test_msix_not_signalled_while_msix_disabled(client: VfioUserClient,
                                                efds: list[int]) -> None:
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, fds=efds)
    fire(client, 0)
    assert counts(efds) == [0, 0, 0, 0]


def test_msix_not_signalled_while_cause_masked_in_eims(client: VfioUserClient,
                                                       efds: list[int]) -> None:
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, fds=efds)
    enable_msix(client)
    client.write32(BAR0, REG_EIMS, 0)
    client.write32(BAR0, REG_EICS, 1 << 1)
    assert counts(efds) == [0, 0, 0, 0]
    client.write32(BAR0, REG_EIMS, 1 << 1)  # unmasking a pending cause delivers it
    assert counts(efds) == [0, 1, 0, 0]


def test_msix_single_vector_eventfd(client: VfioUserClient, efds: list[int]) -> None:
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 2, 1, fds=[efds[2]])
    enable_msix(client)
    fire(client, 30)
    assert counts(efds) == [0, 0, 1, 0]
    fire(client, 0)  # vector 0 has no eventfd: nothing anywhere
    assert counts(efds) == [0, 0, 0, 0]


def test_set_irqs_trigger_signals_from_the_server(client: VfioUserClient,
                                                  efds: list[int]) -> None:
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, fds=efds)
    client.set_irqs(MSIX, NONE | TRIGGER, 1, 2)
    assert counts(efds) == [0, 1, 1, 0]
    client.set_irqs(MSIX, BOOL | TRIGGER, 0, 4, data=bytes([1, 0, 0, 1]))
    assert counts(efds) == [1, 0, 0, 1]


def test_msix_masked_via_set_irqs_is_not_signalled(client: VfioUserClient, vf0: PciFunction,
                                                   efds: list[int]) -> None:
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, fds=efds)
    enable_msix(client)
    client.set_irqs(MSIX, NONE | MASK, 1, 1)
    assert irq_state(vf0)[1] == {(MSIX, 1)}
    fire(client, 1)
    assert counts(efds) == [0, 0, 0, 0]
    fire(client, 0)  # other vectors are unaffected
    assert counts(efds) == [1, 0, 0, 0]
    client.set_irqs(MSIX, NONE | UNMASK, 1, 1)
    fire(client, 1)
    assert counts(efds) == [0, 1, 0, 0]


def test_msix_mask_with_bools(client: VfioUserClient, vf0: PciFunction,
                              efds: list[int]) -> None:
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, fds=efds)
    client.set_irqs(MSIX, BOOL | MASK, 0, 4, data=bytes([1, 0, 1, 0]))
    assert irq_state(vf0)[1] == {(MSIX, 0), (MSIX, 2)}
    client.set_irqs(MSIX, NONE | TRIGGER, 0, 4)
    assert counts(efds) == [0, 1, 0, 1]
    client.set_irqs(MSIX, BOOL | UNMASK, 0, 4, data=bytes([0, 0, 1, 0]))
    assert irq_state(vf0)[1] == {(MSIX, 0)}


def test_count_0_data_none_trigger_disables(client: VfioUserClient, vf0: PciFunction,
                                            efds: list[int]) -> None:
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, fds=efds)
    before = open_fds()
    client.set_irqs(MSIX, NONE | TRIGGER, 0, 0)
    assert irq_state(vf0)[0] == []
    assert open_fds() == before - 4  # the server closed its copies
    enable_msix(client)
    for cause, _ in CAUSE_VECTORS:
        fire(client, cause)
    assert counts(efds) == [0, 0, 0, 0]


def test_eventfd_without_fds_deassigns(client: VfioUserClient, vf0: PciFunction,
                                       efds: list[int]) -> None:
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, fds=efds)
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 1, 2)
    assert irq_state(vf0)[0] == [(MSIX, 0), (MSIX, 3)]


def test_replacing_an_eventfd_closes_the_old_one(client: VfioUserClient,
                                                 efds: list[int]) -> None:
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 1, fds=[efds[0]])
    before = open_fds()
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 1, fds=[efds[1]])
    assert open_fds() == before
    client.set_irqs(MSIX, NONE | TRIGGER, 0, 1)
    assert counts(efds) == [0, 1, 0, 0]


def test_eventfds_are_dropped_when_the_client_disconnects(nic_server: Any, vf0: PciFunction,
                                                          efds: list[int]) -> None:
    before = open_fds()
    c = VfioUserClient(sock_path(nic_server))
    c.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, fds=efds)
    c.close()
    wait_detached(nic_server)
    assert irq_state(vf0)[0] == []
    wait_until(lambda: open_fds() == before, what="fds released")


def test_pf_intx_signalled_when_msix_disabled(pf_client: VfioUserClient, pf: PciFunction,
                                              efds: list[int]) -> None:
    pf_client.set_irqs(INTX, EVENTFD | TRIGGER, 0, 1, fds=[efds[0]])
    fire(pf_client, 0)
    assert counts(efds) == [1, 0, 0, 0]
    # INTx Disable in the command register silences it.
    pf_client.config_write(CFG_COMMAND, 2, 1 << 10)
    fire(pf_client, 0)
    assert counts(efds) == [0, 0, 0, 0]


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [0, NONE, TRIGGER, NONE | BOOL | TRIGGER, NONE | EVENTFD | TRIGGER, NONE | MASK | TRIGGER,
     NONE | MASK | UNMASK, BOOL | UNMASK | TRIGGER, NONE | TRIGGER | (1 << 6),
     NONE | TRIGGER | (1 << 31)],
    ids=["zero", "no-action", "no-data", "none+bool", "none+eventfd", "mask+trigger",
         "mask+unmask", "unmask+trigger", "bit6", "bit31"],
)
def test_set_irqs_bad_flag_combination_is_einval(conn: RawConn, vf0: PciFunction,
                                                 flags: int) -> None:
    before = irq_state(vf0)
    msg(conn, SET_IRQS, irq_set_payload(MSIX, flags, 0, 1, b"\1"), expect=errno.EINVAL)
    assert irq_state(vf0) == before


def test_set_irqs_eventfd_mask_is_enotsup(conn: RawConn, efds: list[int]) -> None:
    msg(conn, SET_IRQS, irq_set_payload(MSIX, EVENTFD | MASK, 0, 1), expect=errno.ENOTSUP,
        fds=[efds[0]])


@pytest.mark.parametrize(
    "start,count",
    [(0, 5), (3, 2), (4, 1), (5, 0), (0xFFFFFFFF, 1), (1, 0xFFFFFFFF)],
)
def test_set_irqs_beyond_vector_count_is_einval(conn: RawConn, vf0: PciFunction, start: int,
                                                count: int) -> None:
    msg(conn, SET_IRQS, irq_set_payload(MSIX, NONE | TRIGGER, start, count), expect=errno.EINVAL)
    msg(conn, SET_IRQS, irq_set_payload(MSIX, NONE | MASK, start, count), expect=errno.EINVAL)
    assert irq_state(vf0) == ([], set())


def test_set_irqs_vf_intx_has_no_vectors(conn: RawConn) -> None:
    msg(conn, SET_IRQS, irq_set_payload(INTX, NONE | TRIGGER, 0, 1), expect=errno.EINVAL)
    msg(conn, SET_IRQS, irq_set_payload(INTX, NONE | TRIGGER, 0, 0))  # disabling is fine


def test_set_irqs_count_0_needs_start_0(conn: RawConn) -> None:
    msg(conn, SET_IRQS, irq_set_payload(MSIX, NONE | TRIGGER, 1, 0), expect=errno.EINVAL)


def test_set_irqs_eventfd_count_0_is_einval(conn: RawConn) -> None:
    msg(conn, SET_IRQS, irq_set_payload(MSIX, EVENTFD | TRIGGER, 0, 0), expect=errno.EINVAL)


@pytest.mark.parametrize("nfds,count", [(2, 1), (1, 2), (3, 4), (4, 3)])
def test_set_irqs_fd_count_mismatch_is_einval_and_closes_fds(conn: RawConn, vf0: PciFunction,
                                                             efds: list[int], nfds: int,
                                                             count: int) -> None:
    before = open_fds()
    msg(conn, SET_IRQS, irq_set_payload(MSIX, EVENTFD | TRIGGER, 0, count), expect=errno.EINVAL,
        fds=efds[:nfds])
    assert open_fds() == before
    assert irq_state(vf0) == ([], set())


def test_set_irqs_fds_without_data_eventfd_is_einval(conn: RawConn, vf0: PciFunction,
                                                     efds: list[int]) -> None:
    before = open_fds()
    msg(conn, SET_IRQS, irq_set_payload(MSIX, NONE | TRIGGER, 0, 1), expect=errno.EINVAL,
        fds=[efds[0]])
    msg(conn, SET_IRQS, irq_set_payload(MSIX, NONE | TRIGGER, 0, 0), expect=errno.EINVAL,
        fds=[efds[0]])
    assert open_fds() == before
    assert irq_state(vf0) == ([], set())


def test_set_irqs_fewer_bools_than_count_is_einval(conn: RawConn, vf0: PciFunction) -> None:
    msg(conn, SET_IRQS, irq_set_payload(MSIX, BOOL | MASK, 0, 4, b"\1\1\1"), expect=errno.EINVAL)
    assert irq_state(vf0) == ([], set())


@pytest.mark.parametrize("index", [5, 0xFFFFFFFF])
def test_set_irqs_bad_index_is_einval(conn: RawConn, index: int) -> None:
    msg(conn, SET_IRQS, irq_set_payload(index, NONE | TRIGGER, 0, 0), expect=errno.EINVAL)


@pytest.mark.parametrize("size", [0, 8, 16, 19])
def test_set_irqs_short_payload_is_einval(conn: RawConn, size: int) -> None:
    payload = irq_set_payload(MSIX, NONE | TRIGGER, 0, 0)[:size]
    msg(conn, SET_IRQS, payload, expect=errno.EINVAL)


@pytest.mark.parametrize("argsz", [0, 16, 19])
def test_set_irqs_argsz_too_small_is_einval(conn: RawConn, argsz: int) -> None:
    msg(conn, SET_IRQS, irq_set_payload(MSIX, NONE | TRIGGER, 0, 0, argsz=argsz),
        expect=errno.EINVAL)


def test_set_irqs_errors_leave_the_connection_serving(client: VfioUserClient,
                                                      efds: list[int]) -> None:
    expect_errno(errno.EINVAL, client.set_irqs, MSIX, EVENTFD | TRIGGER, 0, 2, fds=efds[:1])
    assert client.config_read(0, 2) == VENDOR_ID
    client.set_irqs(MSIX, EVENTFD | TRIGGER, 0, 4, fds=efds)
    client.set_irqs(MSIX, NONE | TRIGGER, 0, 1)
    assert counts(efds) == [1, 0, 0, 0]


def test_enable_msix_keeps_table_size(client: VfioUserClient) -> None:
    enable_msix(client)
    assert client.config_read(CFG_MSIX_FLAGS, 2) & 0x7FF == 3  # 4 vectors
    client.config_write(CFG_MSIX_FLAGS, 2, 0)
    assert client.config_read(CFG_MSIX_FLAGS, 2) == 3


def test_eics_write_does_not_stick(client: VfioUserClient) -> None:
    client.write32(BAR0, REG_EICS, 1)
    assert client.read32(BAR0, REG_EICS) == 0  # write-only doorbell
    assert client.read32(BAR0, REG_EICR) & 1
    client.region_write(BAR0, REG_EICR, u32(1))
    assert client.read32(BAR0, REG_EICR) & 1 == 0
