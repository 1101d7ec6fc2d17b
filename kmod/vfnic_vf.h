/* SPDX-License-Identifier: GPL-2.0 */
/* vfnic VF driver: shared definitions (main.c, mbx.c, ethtool.c). */
#ifndef _VFNIC_VF_H_
#define _VFNIC_VF_H_

#include <linux/io.h>
#include <linux/mutex.h>
#include <linux/netdevice.h>
#include <linux/pci.h>
#include <linux/u64_stats_sync.h>
#include <linux/workqueue.h>

#include "vfnic_regs.h"

#define VFNIC_DRV_NAME		"vfnic_vf"
#define VFNIC_DRV_VERSION	"1.0"

#define VFNIC_QUEUE		0	/* the driver runs queue 0 of the VF */
#define VFNIC_DEFAULT_RING	256	/* descriptors per ring */
#define VFNIC_MIN_RING		8	/* RDLEN/TDLEN: a multiple of 128 bytes */
#define VFNIC_MAX_RING		4096
#define VFNIC_RING_ALIGN	8
#define VFNIC_MBX_TIMEOUT_US	1000000
#define VFNIC_RST_TIMEOUT_US	1000000
#define VFNIC_WATCHDOG_MS	10	/* lost PCI config, moves, pending mailbox */
#define VFNIC_TX_RS_EVERY	32	/* TX descriptors per report (RS) */
#define VFNIC_RX_BUFFER_WRITE	16	/* RX descriptors re-armed per RDT write */
#define VFNIC_DEFAULT_ITR_US	50	/* EITR of the queue vector (ethtool -C rx-usecs) */

/* The interrupt causes the driver enables (EIMS) */
#define VFNIC_EIMS_ENABLED	(BIT(VFNIC_QUEUE) | VFNIC_EICR_MAILBOX | VFNIC_EICR_LSC)

struct vfnic_buffer {
	struct sk_buff *skb;
	dma_addr_t dma;
	unsigned int len;
};

struct vfnic_ring {
	void *desc;			/* vfnic_rx_desc[] or vfnic_tx_desc[] */
	dma_addr_t dma;
	unsigned int size;		/* bytes of descriptors */
	struct vfnic_buffer *buf;
	u16 count;
	u16 next_to_use;		/* TX: next free descriptor (our TDT) */
	u16 next_to_clean;		/* RX: next to receive; TX: oldest in flight */
	u16 rs_every;			/* TX: RS on every rs_every-th descriptor */
	u16 post_every;			/* RX: RDT once per post_every re-armed */
	u16 unposted;			/* RX: re-armed since the last RDT write */
};

/* The driver's own counters (ethtool -S, after the device's registers). */
struct vfnic_sw_stats {
	u64 rx_packets;
	u64 rx_bytes;
	u64 rx_errors;
	u64 rx_alloc_failed;
	u64 tx_packets;
	u64 tx_bytes;
	u64 tx_dropped;
	u64 tx_busy;
	u64 queue_resets;
	u64 pf_messages;
	u64 mbx_polled;		/* PF messages found pending by the watchdog */
	u64 pages_touched;	/* dummy writes while the PF migrates us */
	u64 config_restores;	/* PCI config found lost and restored */
	u64 msix_restores;	/* of those, only MSI-X (the host put the rest back) */
	u64 moves;		/* taken over a fresh VF after a migration */
	u64 suspends;
	u64 resumes;
	u64 last_suspend_us;
	u64 last_resume_us;
	u64 link_changes;
};

enum vfnic_state_bits {
	__VFNIC_DOWN,		/* rings not running (ndo_stop, reset) */
	__VFNIC_SUSPENDED,	/* SUSPEND from the PF: queues quiesced */
	__VFNIC_DIRTYING,	/* between MIGRATE and CANCEL_MIGRATION */
	__VFNIC_REMOVING,
	__VFNIC_TX_IDLE,	/* the watchdog found unreported frames: use TDH */
};

struct vfnic_adapter {
	struct net_device *netdev;
	struct pci_dev *pdev;
	u8 __iomem *hw_addr;		/* BAR0 */
	unsigned long state;

	struct napi_struct napi;
	struct vfnic_ring rx_ring;
	struct vfnic_ring tx_ring;
	u16 rx_ring_count;
	u16 tx_ring_count;

	struct mutex mbx_lock;		/* VFMBMEM0.. and the doorbell */
	u32 token;			/* ours, in SCRATCH */
	bool link_up;			/* STATUS.LU as last seen */
	u32 mc_hash;
	struct work_struct mc_task;
	struct delayed_work watchdog_task;
	unsigned int watchdog_ticks;
	int tx_idle_ntc;		/* next_to_clean at the last watchdog tick */
	u32 rx_itr_us;			/* EITR of the queue vector: ethtool -C rx-usecs */

	struct u64_stats_sync syncp;
	struct vfnic_sw_stats stats;
};

static inline u32 vfnic_rd32(struct vfnic_adapter *adapter, u32 reg)
{
	return readl(adapter->hw_addr + reg);
}

static inline void vfnic_wr32(struct vfnic_adapter *adapter, u32 reg, u32 val)
{
	writel(val, adapter->hw_addr + reg);
}

/* mbx.c */
int vfnic_mbx_reset(struct vfnic_adapter *adapter, u8 *mac, bool *link_up);
int vfnic_mbx_set_mac(struct vfnic_adapter *adapter, const u8 *mac);
int vfnic_mbx_set_multicast(struct vfnic_adapter *adapter, u32 count, u32 hash);
bool vfnic_mbx_check_pf(struct vfnic_adapter *adapter);

/* main.c: the PF message hooks and the queues */
void vfnic_on_link_change(struct vfnic_adapter *adapter, bool up);
u32 vfnic_suspend(struct vfnic_adapter *adapter);
u32 vfnic_resume(struct vfnic_adapter *adapter, bool notify);
int vfnic_open(struct net_device *netdev);
int vfnic_close(struct net_device *netdev);
void vfnic_write_itr(struct vfnic_adapter *adapter);

/* ethtool.c */
void vfnic_set_ethtool_ops(struct net_device *netdev);

#endif /* _VFNIC_VF_H_ */
