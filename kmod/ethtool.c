// SPDX-License-Identifier: GPL-2.0
/* vfnic VF driver: ethtool -i, -S, -d, -g/-G, -l. */
#include <linux/ethtool.h>
#include <linux/netdevice.h>
#include <linux/pci.h>
#include <linux/rtnetlink.h>

#include "vfnic_vf.h"

/* ethtool -d: every BAR0 register, in the order of vfnic/regs/table.py */
#define VFNIC_REG_OFFSET(name, offset) offset,
static const u32 vfnic_reg_offsets[] = { VFNIC_REG_LIST(VFNIC_REG_OFFSET) };
#define VFNIC_REGS_VERSION	1

/* ethtool -S: the VF's statistics registers, then the driver's counters */
struct vfnic_hw_stat {
	char name[ETH_GSTRING_LEN];
	u32 low;
	u32 high;	/* 0: a 32-bit counter */
};

static const struct vfnic_hw_stat vfnic_hw_stats[] = {
	{ "GPRC", VFNIC_GPRC, 0 },
	{ "GPTC", VFNIC_GPTC, 0 },
	{ "GORC", VFNIC_GORCL, VFNIC_GORCH },
	{ "GOTC", VFNIC_GOTCL, VFNIC_GOTCH },
	{ "RXERRC", VFNIC_RXERRC, 0 },
	{ "TXERRC", VFNIC_TXERRC, 0 },
	{ "MPC", VFNIC_MPC, 0 },
};

#define VFNIC_SW_STAT(m) { #m, offsetof(struct vfnic_sw_stats, m) }
static const struct {
	char name[ETH_GSTRING_LEN];
	size_t offset;
} vfnic_sw_stats[] = {
	VFNIC_SW_STAT(rx_packets),
	VFNIC_SW_STAT(rx_bytes),
	VFNIC_SW_STAT(rx_errors),
	VFNIC_SW_STAT(rx_alloc_failed),
	VFNIC_SW_STAT(tx_packets),
	VFNIC_SW_STAT(tx_bytes),
	VFNIC_SW_STAT(tx_dropped),
	VFNIC_SW_STAT(tx_busy),
	VFNIC_SW_STAT(queue_resets),
	VFNIC_SW_STAT(pf_messages),
	VFNIC_SW_STAT(mbx_polled),
	VFNIC_SW_STAT(pages_touched),
	VFNIC_SW_STAT(config_restores),
	VFNIC_SW_STAT(msix_restores),
	VFNIC_SW_STAT(moves),
	VFNIC_SW_STAT(suspends),
	VFNIC_SW_STAT(resumes),
	VFNIC_SW_STAT(last_suspend_us),
	VFNIC_SW_STAT(last_resume_us),
	VFNIC_SW_STAT(link_changes),
};

#define VFNIC_STATS_LEN (ARRAY_SIZE(vfnic_hw_stats) + ARRAY_SIZE(vfnic_sw_stats))

static void vfnic_get_drvinfo(struct net_device *netdev,
			      struct ethtool_drvinfo *drvinfo)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);

	strscpy(drvinfo->driver, VFNIC_DRV_NAME, sizeof(drvinfo->driver));
	strscpy(drvinfo->version, VFNIC_DRV_VERSION, sizeof(drvinfo->version));
	strscpy(drvinfo->bus_info, pci_name(adapter->pdev),
		sizeof(drvinfo->bus_info));
}

static int vfnic_get_regs_len(struct net_device *netdev)
{
	return sizeof(vfnic_reg_offsets);
}

static void vfnic_get_regs(struct net_device *netdev,
			   struct ethtool_regs *regs, void *p)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);
	u32 *buf = p;
	int i;

	regs->version = VFNIC_REGS_VERSION;
	for (i = 0; i < ARRAY_SIZE(vfnic_reg_offsets); i++)
		buf[i] = vfnic_rd32(adapter, vfnic_reg_offsets[i]);
}

static int vfnic_get_sset_count(struct net_device *netdev, int sset)
{
	return sset == ETH_SS_STATS ? VFNIC_STATS_LEN : -EOPNOTSUPP;
}

static void vfnic_get_strings(struct net_device *netdev, u32 sset, u8 *data)
{
	int i;

	if (sset != ETH_SS_STATS)
		return;
	for (i = 0; i < ARRAY_SIZE(vfnic_hw_stats); i++)
		ethtool_sprintf(&data, "%s", vfnic_hw_stats[i].name);
	for (i = 0; i < ARRAY_SIZE(vfnic_sw_stats); i++)
		ethtool_sprintf(&data, "%s", vfnic_sw_stats[i].name);
}

static void vfnic_get_ethtool_stats(struct net_device *netdev,
				    struct ethtool_stats *stats, u64 *data)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);
	const struct vfnic_hw_stat *hw;
	int i;

	for (i = 0; i < ARRAY_SIZE(vfnic_hw_stats); i++) {
		hw = &vfnic_hw_stats[i];
		*data = vfnic_rd32(adapter, hw->low);
		if (hw->high)
			*data |= (u64)vfnic_rd32(adapter, hw->high) << 32;
		data++;
	}
	for (i = 0; i < ARRAY_SIZE(vfnic_sw_stats); i++)
		*data++ = *(u64 *)((u8 *)&adapter->stats + vfnic_sw_stats[i].offset);
}

static void vfnic_get_ringparam(struct net_device *netdev,
				struct ethtool_ringparam *ring,
				struct kernel_ethtool_ringparam *kring,
				struct netlink_ext_ack *extack)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);

	ring->rx_max_pending = VFNIC_MAX_RING;
	ring->tx_max_pending = VFNIC_MAX_RING;
	ring->rx_pending = adapter->rx_ring_count;
	ring->tx_pending = adapter->tx_ring_count;
}

/* RDLEN/TDLEN: a multiple of 128 bytes, so of 8 descriptors */
static int vfnic_set_ringparam(struct net_device *netdev,
			       struct ethtool_ringparam *ring,
			       struct kernel_ethtool_ringparam *kring,
			       struct netlink_ext_ack *extack)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);
	u32 rx, tx;

	if (ring->rx_mini_pending || ring->rx_jumbo_pending)
		return -EINVAL;
	rx = clamp_t(u32, ALIGN(ring->rx_pending, VFNIC_RING_ALIGN),
		     VFNIC_MIN_RING, VFNIC_MAX_RING);
	tx = clamp_t(u32, ALIGN(ring->tx_pending, VFNIC_RING_ALIGN),
		     VFNIC_MIN_RING, VFNIC_MAX_RING);
	if (rx == adapter->rx_ring_count && tx == adapter->tx_ring_count)
		return 0;
	if (netif_running(netdev))
		vfnic_close(netdev);
	adapter->rx_ring_count = rx;
	adapter->tx_ring_count = tx;
	if (netif_running(netdev))
		return vfnic_open(netdev);
	return 0;
}

/* The VF has VFNIC_NUM_QUEUES queue pairs; the driver runs queue 0. */
static void vfnic_get_channels(struct net_device *netdev,
			       struct ethtool_channels *ch)
{
	ch->max_combined = 1;
	ch->combined_count = 1;
	ch->max_other = 2;	/* the mailbox and link vectors */
	ch->other_count = 2;
}

/*
 * Interrupt moderation: EITR of the queue vector, the minimum interval (us)
 * between two of its interrupts. The vector carries RX and TX causes, so
 * rx-usecs moderates both; 0 turns moderation off.
 */
static int vfnic_get_coalesce(struct net_device *netdev,
			      struct ethtool_coalesce *ec,
			      struct kernel_ethtool_coalesce *kec,
			      struct netlink_ext_ack *extack)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);

	ec->rx_coalesce_usecs = adapter->rx_itr_us;
	return 0;
}

static int vfnic_set_coalesce(struct net_device *netdev,
			      struct ethtool_coalesce *ec,
			      struct kernel_ethtool_coalesce *kec,
			      struct netlink_ext_ack *extack)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);

	if (ec->rx_coalesce_usecs > VFNIC_EITR_MAX_US) {
		NL_SET_ERR_MSG_MOD(extack, "rx-usecs above the EITR maximum ("
				   __stringify(VFNIC_EITR_MAX_US) ")");
		return -EINVAL;
	}
	adapter->rx_itr_us = ec->rx_coalesce_usecs;
	vfnic_write_itr(adapter);
	return 0;
}

static const struct ethtool_ops vfnic_ethtool_ops = {
	.supported_coalesce_params = ETHTOOL_COALESCE_RX_USECS,
	.get_coalesce		= vfnic_get_coalesce,
	.set_coalesce		= vfnic_set_coalesce,
	.get_drvinfo		= vfnic_get_drvinfo,
	.get_regs_len		= vfnic_get_regs_len,
	.get_regs		= vfnic_get_regs,
	.get_link		= ethtool_op_get_link,
	.get_ringparam		= vfnic_get_ringparam,
	.set_ringparam		= vfnic_set_ringparam,
	.get_channels		= vfnic_get_channels,
	.get_strings		= vfnic_get_strings,
	.get_sset_count		= vfnic_get_sset_count,
	.get_ethtool_stats	= vfnic_get_ethtool_stats,
};

void vfnic_set_ethtool_ops(struct net_device *netdev)
{
	netdev->ethtool_ops = &vfnic_ethtool_ops;
}
