"""The PF side of the mailbox keeps one message in the VF's mailbox at a time."""

from __future__ import annotations

from vfnic.device.nic import Nic
from vfnic.regs import mailbox as M
from vfnic.regs import table as T


def vf_acks(nic: Nic, vf: int) -> int:
    """Play the VF driver: read the PF message, clear PFSTS, acknowledge it."""
    fn = nic.vfs[vf]
    msg_type = fn.bank.get(f"VFMBMEM{M.PF_BASE}") & M.TYPE_MASK
    fn.region_write(0, 0x100, T.MBX_PFSTS.to_bytes(4, "little"))
    fn.region_write(0, 0x140, (msg_type | M.FLAG_ACK).to_bytes(4, "little"))
    fn.region_write(0, 0x104, T.MBX_ACK.to_bytes(4, "little"))
    return msg_type


def test_a_second_command_waits_for_the_first_to_be_acknowledged() -> None:
    nic = Nic(1)
    fn = nic.vfs[0]
    first = nic.pf_agent.post(fn, M.MsgType.MIGRATE)
    second = nic.pf_agent.post(fn, M.MsgType.SUSPEND)
    assert fn.bank.get(f"VFMBMEM{M.PF_BASE}") == M.MsgType.MIGRATE  # not overwritten
    assert vf_acks(nic, 0) == M.MsgType.MIGRATE and first.acked.is_set()
    assert fn.bank.get("VFMAILBOX") & T.MBX_PFSTS  # the queued one is posted now
    assert vf_acks(nic, 0) == M.MsgType.SUSPEND and second.acked.is_set()


def test_a_link_notification_does_not_hold_back_a_command() -> None:
    nic = Nic(1)
    fn = nic.vfs[0]
    nic.pf_agent.notify_link(fn)
    cmd = nic.pf_agent.post(fn, M.MsgType.SUSPEND)
    assert vf_acks(nic, 0) == M.MsgType.SUSPEND and cmd.acked.is_set()


def test_an_abandoned_command_lets_the_next_one_through() -> None:
    nic = Nic(1)
    try:
        nic.pf_agent.send_and_wait(0, M.MsgType.MIGRATE, timeout=0.05)
    except Exception as exc:  # no driver: MailboxTimeout
        assert "no acknowledgement of migrate" in str(exc)
    nxt = nic.pf_agent.post(nic.vfs[0], M.MsgType.RESUME, [0])
    assert vf_acks(nic, 0) == M.MsgType.RESUME and nxt.acked.is_set()
