// SPDX-License-Identifier: GPL-2.0
/*
 * vfnic VF driver: the PF-VF mailbox (vfnic/regs/mailbox.py).
 *
 * VF request: the message in VFMBMEM0.. (word 0 = type), VFMBDOORBELL = REQ.
 * The PF writes its reply over it, with ACK or NACK in word 0, and sets
 * VFMAILBOX.PFACK, which the VF clears (W1C).
 *
 * PF message: in VFMBMEM8.., announced by VFMAILBOX.PFSTS and the mailbox
 * interrupt. The VF clears PFSTS (W1C) first, handles the message, writes its
 * acknowledgement (type | ACK, then the words) in VFMBMEM0.. and rings
 * VFMBDOORBELL = ACK.
 */
#include <linux/delay.h>
#include <linux/etherdevice.h>
#include <linux/iopoll.h>
#include <linux/rtnetlink.h>

#include "vfnic_vf.h"

static void vfnic_mbx_write(struct vfnic_adapter *adapter, u32 word0,
			    const u32 *words, int nwords)
{
	int i;

	vfnic_wr32(adapter, VFNIC_VFMBMEM(VFNIC_MBX_REQ_BASE), word0);
	for (i = 0; i < nwords && i < VFNIC_MBX_MSG_WORDS - 1; i++)
		vfnic_wr32(adapter, VFNIC_VFMBMEM(VFNIC_MBX_REQ_BASE + 1 + i),
			   words[i]);
}

/* Caller holds mbx_lock. */
static int vfnic_mbx_request_locked(struct vfnic_adapter *adapter, u32 type,
				    const u32 *words, int nwords,
				    u32 *reply, int nreply)
{
	u32 mbx, word0;
	int err, i;

	vfnic_mbx_write(adapter, type, words, nwords);
	vfnic_wr32(adapter, VFNIC_VFMBDOORBELL, VFNIC_MBX_REQ);
	err = read_poll_timeout(vfnic_rd32, mbx, mbx & VFNIC_MBX_PFACK, 20,
				VFNIC_MBX_TIMEOUT_US, false, adapter,
				VFNIC_VFMAILBOX);
	if (err) {
		netdev_err(adapter->netdev,
			   "no answer from the PF to mailbox request %#x\n", type);
		return err;
	}
	word0 = vfnic_rd32(adapter, VFNIC_VFMBMEM(VFNIC_MBX_REQ_BASE));
	for (i = 0; i < nreply && i < VFNIC_MBX_MSG_WORDS - 1; i++)
		reply[i] = vfnic_rd32(adapter,
				      VFNIC_VFMBMEM(VFNIC_MBX_REQ_BASE + 1 + i));
	vfnic_wr32(adapter, VFNIC_VFMAILBOX, VFNIC_MBX_PFACK);
	if ((word0 & VFNIC_MBX_TYPE_MASK) != type ||
	    !(word0 & VFNIC_MBX_FLAG_ACK))
		return -EPERM;
	return 0;
}

static int vfnic_mbx_request(struct vfnic_adapter *adapter, u32 type,
			     const u32 *words, int nwords, u32 *reply, int nreply)
{
	int err;

	mutex_lock(&adapter->mbx_lock);
	err = vfnic_mbx_request_locked(adapter, type, words, nwords,
				       reply, nreply);
	mutex_unlock(&adapter->mbx_lock);
	return err;
}

static void vfnic_mac_to_words(const u8 *mac, u32 *words)
{
	words[0] = mac[0] | mac[1] << 8 | mac[2] << 16 | (u32)mac[3] << 24;
	words[1] = mac[4] | mac[5] << 8;
}

/* RESET: the PF answers with our MAC (words 1-2) and the link (word 3). */
int vfnic_mbx_reset(struct vfnic_adapter *adapter, u8 *mac, bool *link_up)
{
	u32 reply[4];
	int err;

	err = vfnic_mbx_request(adapter, VFNIC_MBX_MSG_RESET, NULL, 0,
				reply, ARRAY_SIZE(reply));
	if (err)
		return err;
	mac[0] = reply[0];
	mac[1] = reply[0] >> 8;
	mac[2] = reply[0] >> 16;
	mac[3] = reply[0] >> 24;
	mac[4] = reply[1];
	mac[5] = reply[1] >> 8;
	*link_up = reply[2] == 1;
	return 0;
}

/* SET_MAC: NACKed when the host set another MAC for this VF. */
int vfnic_mbx_set_mac(struct vfnic_adapter *adapter, const u8 *mac)
{
	u32 words[2];

	vfnic_mac_to_words(mac, words);
	return vfnic_mbx_request(adapter, VFNIC_MBX_MSG_SET_MAC, words, 2,
				 NULL, 0);
}

/* SET_MULTICAST: word 1 the number of addresses, word 2 their hash bits (MTA). */
int vfnic_mbx_set_multicast(struct vfnic_adapter *adapter, u32 count, u32 hash)
{
	u32 words[2] = { count, hash };

	return vfnic_mbx_request(adapter, VFNIC_MBX_MSG_SET_MULTICAST, words, 2,
				 NULL, 0);
}

static void vfnic_mbx_ack(struct vfnic_adapter *adapter, u32 word0,
			  const u32 *words, int nwords)
{
	vfnic_mbx_write(adapter, word0, words, nwords);
	vfnic_wr32(adapter, VFNIC_VFMBDOORBELL, VFNIC_MBX_ACK);
}

/*
 * Handle a PF message if VFMAILBOX.PFSTS says one waits. Process context,
 * rtnl held (SUSPEND and RESUME stop and start the queues).
 */
bool vfnic_mbx_check_pf(struct vfnic_adapter *adapter)
{
	u32 mbx, type, arg, ack[1];
	int nack = 0;
	bool ok = true;

	ASSERT_RTNL();
	mutex_lock(&adapter->mbx_lock);
	mbx = vfnic_rd32(adapter, VFNIC_VFMAILBOX);
	/* all ones: the function is gone or its config lost, no message */
	if (mbx == ~0U || !(mbx & VFNIC_MBX_PFSTS)) {
		mutex_unlock(&adapter->mbx_lock);
		return false;
	}
	/* W1C first: a later message sets it again */
	vfnic_wr32(adapter, VFNIC_VFMAILBOX, VFNIC_MBX_PFSTS);
	type = vfnic_rd32(adapter, VFNIC_VFMBMEM(VFNIC_MBX_PF_BASE)) &
	       VFNIC_MBX_TYPE_MASK;
	adapter->stats.pf_messages++;

	switch (type) {
	case VFNIC_MBX_MSG_LINK_CHANGE:
		arg = vfnic_rd32(adapter, VFNIC_VFMBMEM(VFNIC_MBX_PF_BASE + 1));
		vfnic_on_link_change(adapter, arg == 1);
		break;
	case VFNIC_MBX_MSG_MIGRATE:
		set_bit(__VFNIC_DIRTYING, &adapter->state);
		break;
	case VFNIC_MBX_MSG_CANCEL_MIGRATION:
		clear_bit(__VFNIC_DIRTYING, &adapter->state);
		break;
	case VFNIC_MBX_MSG_SUSPEND:
		ack[nack++] = vfnic_suspend(adapter);
		break;
	case VFNIC_MBX_MSG_RESUME:
		/* the migration is over, completed or rolled back */
		clear_bit(__VFNIC_DIRTYING, &adapter->state);
		arg = vfnic_rd32(adapter, VFNIC_VFMBMEM(VFNIC_MBX_PF_BASE + 1));
		ack[nack++] = vfnic_resume(adapter,
					   !(arg & VFNIC_MBX_RESUME_NO_GARP));
		break;
	default:
		if (net_ratelimit())
			netdev_warn(adapter->netdev, "unknown PF message %#x\n",
				    type);
		ok = false;
		break;
	}
	vfnic_mbx_ack(adapter, type | (ok ? VFNIC_MBX_FLAG_ACK :
				       VFNIC_MBX_FLAG_NACK), ack, nack);
	mutex_unlock(&adapter->mbx_lock);
	return true;
}
