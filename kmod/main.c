// SPDX-License-Identifier: GPL-2.0
/*
 * vfnic VF driver: probe, the netdev, NAPI on queue 0, MSI-X, and the 2015
 * prototype's migration hooks (migrate, suspend, resume) driven by the PF
 * mailbox.
 *
 * The VF is vfnic's software SR-IOV NIC (a vfio-user device). Rings follow the
 * 82599 legacy model (datasheet 7.1 RX, 7.2 TX): descriptors in [head, tail)
 * belong to the device. Registers and bits come from vfnic_regs.h, generated
 * from vfnic/regs/table.py. vfnic/guestdriver/driver.py is the executable
 * reference of the same protocol.
 */
#include <linux/delay.h>
#include <linux/etherdevice.h>
#include <linux/if_vlan.h>
#include <linux/interrupt.h>
#include <linux/iopoll.h>
#include <linux/module.h>
#include <linux/random.h>
#include <linux/rtnetlink.h>

#include "vfnic_vf.h"

static const struct pci_device_id vfnic_pci_tbl[] = {
	{ PCI_DEVICE(VFNIC_VENDOR_ID, VFNIC_VF_DEVICE_ID) },
	{ }
};
MODULE_DEVICE_TABLE(pci, vfnic_pci_tbl);

static unsigned int watchdog_ms = VFNIC_WATCHDOG_MS;
module_param(watchdog_ms, uint, 0644);
MODULE_PARM_DESC(watchdog_ms, "interval of the lost-config, move and mailbox checks (ms)");

static unsigned int rx_usecs = VFNIC_DEFAULT_ITR_US;
module_param(rx_usecs, uint, 0444);
MODULE_PARM_DESC(rx_usecs, "initial queue interrupt throttle, EITR (us); ethtool -C rx-usecs changes it");

static bool tx_bql = true;
module_param(tx_bql, bool, 0444);
MODULE_PARM_DESC(tx_bql, "byte queue limits on TX (burst doorbells through xmit_more)");

/*
 * Checksum offload, off by default: the device computes checksums in its
 * host process, which costs the host more than it saves the guest here.
 */
static bool rx_csum;
module_param(rx_csum, bool, 0444);
MODULE_PARM_DESC(rx_csum, "RX checksum offload at probe (RXCSUM.PCSE); ethtool -K rx changes it");

static bool tx_csum;
module_param(tx_csum, bool, 0444);
MODULE_PARM_DESC(tx_csum, "TX checksum offload at probe (CMD.IC); ethtool -K tx changes it");

static unsigned int rx_buffer_write = VFNIC_RX_BUFFER_WRITE;
module_param(rx_buffer_write, uint, 0444);
MODULE_PARM_DESC(rx_buffer_write, "RX descriptors re-armed per RDT write (1: every NAPI poll)");

/*
 * Device reads that back up an interrupt (QERR, VFMAILBOX) every 10th watchdog
 * tick: each is a round trip to the device that stalls the vCPU. VFMAILBOX is
 * read every tick only while a migration runs (MIGRATE to RESUME).
 */
#define SLOW_CHECK_TICKS	10

static inline u16 vfnic_tx_unused(struct vfnic_ring *ring)
{
	u16 ntc = READ_ONCE(ring->next_to_clean), ntu = ring->next_to_use;

	return ((ntc > ntu) ? 0 : ring->count) + ntc - ntu - 1;
}

/* --- dirty logging for the PF's migration (MIGRATE .. CANCEL_MIGRATION) -- */

/*
 * The device wrote [addr, addr + len) by DMA, which the hypervisor's dirty
 * tracking does not see: read and write back one byte per page so it does.
 */
static void vfnic_touch(struct vfnic_adapter *adapter, u8 *addr,
			unsigned int len)
{
	u8 *end = addr + max(len, 1U);
	u8 *p;

	for (p = addr; p < end;
	     p = PTR_ALIGN(p + 1, PAGE_SIZE)) {
		WRITE_ONCE(*p, READ_ONCE(*p));
		adapter->stats.pages_touched++;
	}
}

/* --- rings ---------------------------------------------------------------- */

static int vfnic_alloc_ring(struct vfnic_adapter *adapter,
			    struct vfnic_ring *ring, u16 count)
{
	struct device *dev = &adapter->pdev->dev;

	ring->count = count;
	ring->size = count * VFNIC_DESC_SIZE;	/* RDLEN: a multiple of 128 */
	ring->buf = kcalloc(count, sizeof(*ring->buf), GFP_KERNEL);
	if (!ring->buf)
		return -ENOMEM;
	ring->desc = dma_alloc_coherent(dev, ring->size, &ring->dma,
					GFP_KERNEL);
	if (!ring->desc) {
		kfree(ring->buf);
		ring->buf = NULL;
		return -ENOMEM;
	}
	ring->next_to_use = 0;
	ring->next_to_clean = 0;
	ring->rs_every = clamp(count / 4, 1, VFNIC_TX_RS_EVERY);
	ring->post_every = clamp_t(u16, min(count / 4U, rx_buffer_write), 1,
				   VFNIC_MAX_RING);
	ring->unposted = 0;
	return 0;
}

static void vfnic_free_ring(struct vfnic_adapter *adapter,
			    struct vfnic_ring *ring)
{
	if (ring->desc)
		dma_free_coherent(&adapter->pdev->dev, ring->size, ring->desc,
				  ring->dma);
	ring->desc = NULL;
	kfree(ring->buf);
	ring->buf = NULL;
}

static int vfnic_alloc_rx_buffer(struct vfnic_adapter *adapter,
				 struct vfnic_buffer *buf, bool napi)
{
	struct sk_buff *skb;
	dma_addr_t dma;

	skb = napi ? napi_alloc_skb(&adapter->napi, VFNIC_RX_BUFFER_SIZE) :
		     netdev_alloc_skb_ip_align(adapter->netdev,
					       VFNIC_RX_BUFFER_SIZE);
	if (!skb)
		return -ENOMEM;
	dma = dma_map_single(&adapter->pdev->dev, skb->data,
			     VFNIC_RX_BUFFER_SIZE, DMA_FROM_DEVICE);
	if (dma_mapping_error(&adapter->pdev->dev, dma)) {
		dev_kfree_skb_any(skb);
		return -ENOMEM;
	}
	buf->skb = skb;
	buf->dma = dma;
	return 0;
}

static void vfnic_rx_arm(struct vfnic_ring *ring, u16 i)
{
	struct vfnic_rx_desc *desc = (struct vfnic_rx_desc *)ring->desc + i;

	desc->addr = cpu_to_le64(ring->buf[i].dma);
	desc->length = 0;
	desc->csum = 0;
	desc->errors = 0;
	desc->vlan = 0;
	WRITE_ONCE(desc->status, 0);
}

static void vfnic_free_rx_buffers(struct vfnic_adapter *adapter)
{
	struct vfnic_ring *ring = &adapter->rx_ring;
	u16 i;

	for (i = 0; ring->buf && i < ring->count; i++) {
		if (!ring->buf[i].skb)
			continue;
		dma_unmap_single(&adapter->pdev->dev, ring->buf[i].dma,
				 VFNIC_RX_BUFFER_SIZE, DMA_FROM_DEVICE);
		dev_kfree_skb_any(ring->buf[i].skb);
		ring->buf[i].skb = NULL;
	}
}

static void vfnic_free_rings(struct vfnic_adapter *adapter)
{
	vfnic_free_rx_buffers(adapter);
	vfnic_free_ring(adapter, &adapter->rx_ring);
	vfnic_free_ring(adapter, &adapter->tx_ring);
}

static int vfnic_alloc_rings(struct vfnic_adapter *adapter)
{
	struct vfnic_ring *rx = &adapter->rx_ring;
	int err;
	u16 i;

	err = vfnic_alloc_ring(adapter, rx, adapter->rx_ring_count);
	if (err)
		return err;
	err = vfnic_alloc_ring(adapter, &adapter->tx_ring,
			       adapter->tx_ring_count);
	if (err)
		goto err_free;
	for (i = 0; i < rx->count; i++) {
		err = vfnic_alloc_rx_buffer(adapter, &rx->buf[i], false);
		if (err)
			goto err_free;
	}
	return 0;
err_free:
	vfnic_free_rings(adapter);
	return err;
}

/* --- receive (82599 7.1) -------------------------------------------------- */

/*
 * Take every done descriptor from next_to_clean on, up to budget, and give
 * each back with a fresh buffer; RDT then points at the last one taken (one
 * descriptor always stays ours, so RDT never catches up with RDH). RDT is
 * written once post_every descriptors are re-armed, as ixgbevf does: a lone
 * frame (a ping) costs no MMIO write, and the device keeps all but a few.
 */
static int vfnic_clean_rx(struct vfnic_adapter *adapter, int budget,
			  bool napi)
{
	struct vfnic_ring *ring = &adapter->rx_ring;
	struct net_device *netdev = adapter->netdev;
	bool dirtying = test_bit(__VFNIC_DIRTYING, &adapter->state);
	u64 packets = 0, bytes = 0;
	int last = -1;

	while (packets < budget) {
		u16 i = ring->next_to_clean;
		struct vfnic_rx_desc *desc = (struct vfnic_rx_desc *)ring->desc + i;
		struct vfnic_buffer *buf = &ring->buf[i];
		struct vfnic_buffer fresh;
		struct sk_buff *skb;
		u8 status = READ_ONCE(desc->status);
		unsigned int len;

		if (!(status & VFNIC_STAT_DD))
			break;
		dma_rmb();	/* the rest of the write-back after DD */
		len = le16_to_cpu(desc->length);
		if (!(status & VFNIC_STAT_EOP) || desc->errors || !len ||
		    len > VFNIC_RX_BUFFER_SIZE) {
			adapter->stats.rx_errors++;
			goto rearm;	/* the buffer stays with the descriptor */
		}
		if (vfnic_alloc_rx_buffer(adapter, &fresh, napi)) {
			adapter->stats.rx_alloc_failed++;
			netdev->stats.rx_dropped++;
			goto rearm;
		}
		skb = buf->skb;
		dma_unmap_single(&adapter->pdev->dev, buf->dma,
				 VFNIC_RX_BUFFER_SIZE, DMA_FROM_DEVICE);
		*buf = fresh;
		if (dirtying)
			vfnic_touch(adapter, skb->data, len);
		skb_put(skb, len);
		/*
		 * The packet checksum, the sum of everything after the MAC
		 * header (RXCSUM.PCSE); 0 when the device computed none.
		 */
		BUILD_BUG_ON(VFNIC_PACKET_CSUM_START != ETH_HLEN);
		if (desc->csum && (netdev->features & NETIF_F_RXCSUM)) {
			skb->csum = csum_unfold((__force __sum16)desc->csum);
			skb->ip_summed = CHECKSUM_COMPLETE;
		}
		skb->protocol = eth_type_trans(skb, netdev);
		packets++;
		bytes += len;
		if (napi)
			napi_gro_receive(&adapter->napi, skb);
		else
			netif_rx(skb);
rearm:
		vfnic_rx_arm(ring, i);	/* a CPU write: dirties the descriptor */
		ring->unposted++;
		last = i;
		ring->next_to_clean = (i + 1) % ring->count;
		if (!napi && packets >= budget)
			break;
	}
	if (last >= 0 && ring->unposted >= ring->post_every) {
		vfnic_wr32(adapter, VFNIC_RDT(VFNIC_QUEUE), last);
		ring->unposted = 0;
	}
	u64_stats_update_begin(&adapter->syncp);
	adapter->stats.rx_packets += packets;
	adapter->stats.rx_bytes += bytes;
	u64_stats_update_end(&adapter->syncp);
	return packets;
}

static bool vfnic_rx_pending(struct vfnic_adapter *adapter)
{
	struct vfnic_ring *ring = &adapter->rx_ring;
	struct vfnic_rx_desc *desc = (struct vfnic_rx_desc *)ring->desc +
				     ring->next_to_clean;

	return READ_ONCE(desc->status) & VFNIC_STAT_DD;
}

/* --- transmit (82599 7.2) ------------------------------------------------- */

static void vfnic_unmap_tx(struct vfnic_adapter *adapter,
			   struct vfnic_buffer *buf, int budget)
{
	dma_unmap_single(&adapter->pdev->dev, buf->dma, buf->len,
			 DMA_TO_DEVICE);
	napi_consume_skb(buf->skb, budget);
	buf->skb = NULL;
}

/*
 * Free what the device has sent. It writes DD only into descriptors with RS
 * (one in VFNIC_TX_RS_EVERY), and sends in order: a done RS descriptor means
 * every one before it is done too. The tail after the last RS descriptor is
 * freed up to TDH when the watchdog finds it idle (upto_tdh).
 */
static bool vfnic_clean_tx(struct vfnic_adapter *adapter, int budget,
			   bool upto_tdh)
{
	struct vfnic_ring *ring = &adapter->tx_ring;
	u16 ntc = ring->next_to_clean, ntu = ring->next_to_use;
	u64 packets = 0, bytes = 0;
	u16 i, done = ntc;

	for (i = ntc; i != ntu; i = (i + 1) % ring->count) {
		struct vfnic_tx_desc *desc = (struct vfnic_tx_desc *)ring->desc + i;

		if (!(desc->cmd & VFNIC_CMD_RS))
			continue;
		if (!(READ_ONCE(desc->status) & VFNIC_STAT_DD))
			break;
		/* the device wrote DD: clearing it is the dummy write */
		WRITE_ONCE(desc->status, 0);
		done = (i + 1) % ring->count;
	}
	if (upto_tdh && done == ntc && ntc != ntu)
		done = vfnic_rd32(adapter, VFNIC_TDH(VFNIC_QUEUE)) % ring->count;
	for (i = ntc; i != done; i = (i + 1) % ring->count) {
		packets++;
		bytes += ring->buf[i].len;
		vfnic_unmap_tx(adapter, &ring->buf[i], budget);
	}
	smp_store_release(&ring->next_to_clean, done);
	if (tx_bql)
		netdev_tx_completed_queue(netdev_get_tx_queue(adapter->netdev, 0),
					  packets, bytes);
	u64_stats_update_begin(&adapter->syncp);
	adapter->stats.tx_packets += packets;
	adapter->stats.tx_bytes += bytes;
	u64_stats_update_end(&adapter->syncp);

	if (packets && netif_queue_stopped(adapter->netdev) &&
	    vfnic_tx_unused(ring) >= 2 &&
	    !test_bit(__VFNIC_DOWN, &adapter->state) &&
	    !test_bit(__VFNIC_SUSPENDED, &adapter->state))
		netif_wake_queue(adapter->netdev);
	return done != ntu;
}

/* Drop everything still queued (the queue is stopped). */
static void vfnic_drop_tx(struct vfnic_adapter *adapter)
{
	struct vfnic_ring *ring = &adapter->tx_ring;

	vfnic_clean_tx(adapter, 0, true);
	while (ring->next_to_clean != ring->next_to_use) {
		vfnic_unmap_tx(adapter, &ring->buf[ring->next_to_clean], 0);
		adapter->stats.tx_dropped++;
		ring->next_to_clean = (ring->next_to_clean + 1) % ring->count;
	}
	netdev_tx_reset_queue(netdev_get_tx_queue(adapter->netdev, 0));
}

static netdev_tx_t vfnic_xmit_frame(struct sk_buff *skb,
				    struct net_device *netdev)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);
	struct netdev_queue *txq = netdev_get_tx_queue(netdev, 0);
	struct vfnic_ring *ring = &adapter->tx_ring;
	struct vfnic_tx_desc *desc;
	unsigned int len = skb->len;
	u8 cmd = VFNIC_CMD_EOP, css = 0, cso = 0;
	dma_addr_t dma;
	bool kick;
	u16 i;

	if (skb->len < VFNIC_MIN_FRAME || skb->len > VFNIC_MAX_FRAME ||
	    skb_linearize(skb))
		goto drop;
	/* The device inserts the checksum (CMD.IC) if CSS and CSO fit a byte. */
	if (skb->ip_summed == CHECKSUM_PARTIAL) {
		unsigned int start = skb_checksum_start_offset(skb);
		unsigned int at = start + skb->csum_offset;

		if (at > U8_MAX) {
			if (skb_checksum_help(skb))
				goto drop;
		} else {
			css = start;
			cso = at;
			cmd |= VFNIC_CMD_IC;
		}
	}
	if (unlikely(!vfnic_tx_unused(ring))) {
		netif_stop_queue(netdev);
		adapter->stats.tx_busy++;
		return NETDEV_TX_BUSY;
	}
	dma = dma_map_single(&adapter->pdev->dev, skb->data, skb->len,
			     DMA_TO_DEVICE);
	if (dma_mapping_error(&adapter->pdev->dev, dma))
		goto drop;

	i = ring->next_to_use;
	ring->buf[i].skb = skb;
	ring->buf[i].dma = dma;
	ring->buf[i].len = skb->len;
	desc = (struct vfnic_tx_desc *)ring->desc + i;
	desc->addr = cpu_to_le64(dma);
	desc->length = cpu_to_le16(skb->len);
	desc->cso = cso;
	desc->css = css;
	desc->vlan = 0;
	desc->status = 0;
	ring->next_to_use = (i + 1) % ring->count;
	skb_tx_timestamp(skb);

	if (unlikely(vfnic_tx_unused(ring) < 2)) {
		netif_stop_queue(netdev);
		smp_mb();	/* clean_tx may have freed some meanwhile */
		if (vfnic_tx_unused(ring) >= 2)
			netif_start_queue(netdev);
	}
	/*
	 * Byte queue limits: frames the device has not reported stop the queue
	 * beyond a limit; the stack then queues and hands them over in bursts
	 * (xmit_more), one doorbell each. kick: no more coming, or stopped.
	 */
	if (tx_bql)
		kick = __netdev_tx_sent_queue(txq, len, netdev_xmit_more());
	else
		kick = !netdev_xmit_more() || netif_xmit_stopped(txq);
	/*
	 * RS (a write-back and an interrupt) once per VFNIC_TX_RS_EVERY frames,
	 * and on the frame that stopped the queue: its report restarts it.
	 */
	if ((i + 1) % ring->rs_every == 0 || netif_xmit_stopped(txq))
		cmd |= VFNIC_CMD_RS;
	desc->cmd = cmd;
	/* The doorbell: the device sends [TDH, TDT). Once per burst. */
	if (kick)
		vfnic_wr32(adapter, VFNIC_TDT(VFNIC_QUEUE), ring->next_to_use);
	return NETDEV_TX_OK;
drop:
	adapter->stats.tx_dropped++;
	dev_kfree_skb_any(skb);
	return NETDEV_TX_OK;
}

/* --- NAPI and interrupts --------------------------------------------------- */

static int vfnic_poll(struct napi_struct *napi, int budget)
{
	struct vfnic_adapter *adapter = container_of(napi, struct vfnic_adapter,
						     napi);
	bool upto_tdh = test_and_clear_bit(__VFNIC_TX_IDLE, &adapter->state);
	int done;

	vfnic_clean_tx(adapter, budget, upto_tdh);
	done = vfnic_clean_rx(adapter, budget, true);
	/* the device raises no cause for a frame we saw half of */
	if (done < budget && napi_complete_done(napi, done) &&
	    vfnic_rx_pending(adapter))
		napi_schedule(napi);
	return min(done, budget);
}

/* Queue 0's vector: every RX write-back and TX completion batch. */
static irqreturn_t vfnic_msix_rtxq(int irq, void *data)
{
	struct vfnic_adapter *adapter = data;

	napi_schedule_irqoff(&adapter->napi);
	return IRQ_HANDLED;
}

static void vfnic_update_carrier(struct vfnic_adapter *adapter)
{
	struct net_device *netdev = adapter->netdev;

	if (adapter->link_up && !test_bit(__VFNIC_DOWN, &adapter->state) &&
	    !test_bit(__VFNIC_SUSPENDED, &adapter->state)) {
		if (!netif_carrier_ok(netdev))
			netif_carrier_on(netdev);
	} else if (netif_carrier_ok(netdev)) {
		netif_carrier_off(netdev);
	}
}

void vfnic_on_link_change(struct vfnic_adapter *adapter, bool up)
{
	if (adapter->link_up != up)
		adapter->stats.link_changes++;
	adapter->link_up = up;
	vfnic_update_carrier(adapter);
}

/* Mailbox vector (threaded): PF messages. */
static irqreturn_t vfnic_msix_mbx(int irq, void *data)
{
	struct vfnic_adapter *adapter = data;

	if (test_bit(__VFNIC_REMOVING, &adapter->state))
		return IRQ_HANDLED;
	vfnic_wr32(adapter, VFNIC_EICR, VFNIC_EICR_MAILBOX);
	rtnl_lock();
	while (vfnic_mbx_check_pf(adapter))
		;
	rtnl_unlock();
	return IRQ_HANDLED;
}

/* Link vector (threaded): STATUS.LU changed. */
static irqreturn_t vfnic_msix_lsc(int irq, void *data)
{
	struct vfnic_adapter *adapter = data;
	bool up;

	if (test_bit(__VFNIC_REMOVING, &adapter->state))
		return IRQ_HANDLED;
	vfnic_wr32(adapter, VFNIC_EICR, VFNIC_EICR_LSC);
	up = vfnic_rd32(adapter, VFNIC_STATUS) & VFNIC_STATUS_LU;
	rtnl_lock();
	vfnic_on_link_change(adapter, up);
	rtnl_unlock();
	return IRQ_HANDLED;
}

static int vfnic_request_irqs(struct vfnic_adapter *adapter)
{
	struct pci_dev *pdev = adapter->pdev;
	struct device *dev = &pdev->dev;
	int err;

	err = pci_alloc_irq_vectors(pdev, VFNIC_MSIX_VECTORS,
				    VFNIC_MSIX_VECTORS, PCI_IRQ_MSIX);
	if (err < 0) {
		dev_err(dev, "no MSI-X vectors: %d\n", err);
		return err;
	}
	err = devm_request_irq(dev, pci_irq_vector(pdev, VFNIC_VEC_RTXQ0),
			       vfnic_msix_rtxq, 0, "vfnic_vf-rxtx-0", adapter);
	if (err)
		return err;
	err = devm_request_threaded_irq(dev,
					pci_irq_vector(pdev, VFNIC_VEC_MAILBOX),
					NULL, vfnic_msix_mbx, IRQF_ONESHOT,
					"vfnic_vf-mailbox", adapter);
	if (err)
		return err;
	return devm_request_threaded_irq(dev,
					 pci_irq_vector(pdev, VFNIC_VEC_LSC),
					 NULL, vfnic_msix_lsc, IRQF_ONESHOT,
					 "vfnic_vf-link", adapter);
}

/* --- bring-up --------------------------------------------------------------- */

static void vfnic_set_rar(struct vfnic_adapter *adapter, const u8 *mac)
{
	vfnic_wr32(adapter, VFNIC_RAL, mac[0] | mac[1] << 8 | mac[2] << 16 |
		   (u32)mac[3] << 24);
	vfnic_wr32(adapter, VFNIC_RAH, mac[4] | mac[5] << 8 | VFNIC_RAH_AV);
}

/* EITR of the queue vector: the minimum interval between its interrupts. */
void vfnic_write_itr(struct vfnic_adapter *adapter)
{
	vfnic_wr32(adapter, VFNIC_EITR(VFNIC_VEC_RTXQ0), adapter->rx_itr_us);
}

/* RXCSUM.PCSE: the packet checksum in RX descriptors, while RXCSUM is on. */
static void vfnic_write_rxcsum(struct vfnic_adapter *adapter,
			       netdev_features_t features)
{
	vfnic_wr32(adapter, VFNIC_RXCSUM,
		   features & NETIF_F_RXCSUM ? VFNIC_RXCSUM_PCSE : 0);
}

static u32 vfnic_eims(struct vfnic_adapter *adapter)
{
	if (test_bit(__VFNIC_DOWN, &adapter->state))
		return VFNIC_EICR_MAILBOX | VFNIC_EICR_LSC;
	return VFNIC_EIMS_ENABLED;
}

/*
 * The VF reset handshake: CTRL.RST, stale causes and mailbox events dropped,
 * our token in SCRATCH (which the device never changes: a VF that nobody
 * restored after a migration does not have it), then RESET through the
 * mailbox for the MAC and link the PF gives us.
 */
static int vfnic_reset_hw(struct vfnic_adapter *adapter, u8 *mac)
{
	u32 ctrl;
	int err;

	vfnic_wr32(adapter, VFNIC_CTRL, VFNIC_CTRL_RST);
	err = read_poll_timeout(vfnic_rd32, ctrl, !(ctrl & VFNIC_CTRL_RST),
				100, VFNIC_RST_TIMEOUT_US, false, adapter,
				VFNIC_CTRL);
	if (err) {
		dev_err(&adapter->pdev->dev, "CTRL.RST did not clear\n");
		return err;
	}
	vfnic_wr32(adapter, VFNIC_EIMS, 0);
	vfnic_wr32(adapter, VFNIC_EICR, ~0U);
	vfnic_write_itr(adapter);
	vfnic_wr32(adapter, VFNIC_VFMAILBOX, VFNIC_MBX_PFSTS | VFNIC_MBX_PFACK);
	do {
		adapter->token = get_random_u32();
	} while (!adapter->token || adapter->token == ~0U);
	vfnic_wr32(adapter, VFNIC_SCRATCH, adapter->token);
	return vfnic_mbx_reset(adapter, mac, &adapter->link_up);
}

/* Program (program=true) and enable both rings of queue 0, start NAPI. */
static void vfnic_start_queues(struct vfnic_adapter *adapter, bool program)
{
	struct vfnic_ring *rx = &adapter->rx_ring, *tx = &adapter->tx_ring;
	u16 i;

	for (i = 0; i < rx->count; i++)
		vfnic_rx_arm(rx, i);
	memset(tx->desc, 0, tx->size);
	rx->next_to_clean = 0;
	rx->unposted = 0;
	tx->next_to_use = 0;
	tx->next_to_clean = 0;
	if (program) {
		vfnic_wr32(adapter, VFNIC_RXDCTL(VFNIC_QUEUE), 0);
		vfnic_wr32(adapter, VFNIC_TXDCTL(VFNIC_QUEUE), 0);
		vfnic_wr32(adapter, VFNIC_RDBAL(VFNIC_QUEUE), lower_32_bits(rx->dma));
		vfnic_wr32(adapter, VFNIC_RDBAH(VFNIC_QUEUE), upper_32_bits(rx->dma));
		vfnic_wr32(adapter, VFNIC_RDLEN(VFNIC_QUEUE), rx->size);
		vfnic_wr32(adapter, VFNIC_TDBAL(VFNIC_QUEUE), lower_32_bits(tx->dma));
		vfnic_wr32(adapter, VFNIC_TDBAH(VFNIC_QUEUE), upper_32_bits(tx->dma));
		vfnic_wr32(adapter, VFNIC_TDLEN(VFNIC_QUEUE), tx->size);
		vfnic_write_rxcsum(adapter, adapter->netdev->features);
	}
	/* Enabling a queue resets its head to 0; TDT must be 0 by then. */
	vfnic_wr32(adapter, VFNIC_TDT(VFNIC_QUEUE), 0);
	vfnic_wr32(adapter, VFNIC_TXDCTL(VFNIC_QUEUE), VFNIC_QCTL_ENABLE);
	vfnic_wr32(adapter, VFNIC_RXDCTL(VFNIC_QUEUE), VFNIC_QCTL_ENABLE);
	vfnic_wr32(adapter, VFNIC_RDT(VFNIC_QUEUE), rx->count - 1);
	netdev_tx_reset_queue(netdev_get_tx_queue(adapter->netdev, 0));
	napi_enable(&adapter->napi);
	netif_tx_wake_all_queues(adapter->netdev);
}

/*
 * Stop queue 0: no more transmits, NAPI off, both rings disabled (clearing
 * ENABLE stops the device at once). Frames already received are delivered
 * (deliver=true) or dropped; frames not yet sent are dropped.
 */
static void vfnic_stop_queues(struct vfnic_adapter *adapter, bool deliver)
{
	netif_tx_disable(adapter->netdev);
	napi_disable(&adapter->napi);
	vfnic_wr32(adapter, VFNIC_RXDCTL(VFNIC_QUEUE), 0);
	vfnic_wr32(adapter, VFNIC_TXDCTL(VFNIC_QUEUE), 0);
	if (deliver)
		vfnic_clean_rx(adapter, adapter->rx_ring.count, false);
	vfnic_drop_tx(adapter);
}

int vfnic_open(struct net_device *netdev)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);
	int err;

	err = vfnic_alloc_rings(adapter);
	if (err)
		return err;
	clear_bit(__VFNIC_DOWN, &adapter->state);
	if (!test_bit(__VFNIC_SUSPENDED, &adapter->state))
		vfnic_start_queues(adapter, true);
	vfnic_wr32(adapter, VFNIC_CTRL, VFNIC_CTRL_SLU);
	adapter->link_up = vfnic_rd32(adapter, VFNIC_STATUS) & VFNIC_STATUS_LU;
	vfnic_wr32(adapter, VFNIC_EIMS, vfnic_eims(adapter));
	vfnic_update_carrier(adapter);
	return 0;
}

int vfnic_close(struct net_device *netdev)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);

	set_bit(__VFNIC_DOWN, &adapter->state);
	vfnic_update_carrier(adapter);
	vfnic_wr32(adapter, VFNIC_EIMS, vfnic_eims(adapter));
	if (!test_bit(__VFNIC_SUSPENDED, &adapter->state))
		vfnic_stop_queues(adapter, false);
	vfnic_wr32(adapter, VFNIC_CTRL, 0);	/* link down, the PF is told */
	vfnic_free_rings(adapter);
	return 0;
}

/* --- the PF's migration commands (rtnl and mbx_lock held) ------------------ */

/* SUSPEND: queues quiesced, state kept, carrier off. Returns microseconds. */
u32 vfnic_suspend(struct vfnic_adapter *adapter)
{
	ktime_t t0 = ktime_get();

	if (!test_and_set_bit(__VFNIC_SUSPENDED, &adapter->state)) {
		vfnic_update_carrier(adapter);
		if (!test_bit(__VFNIC_DOWN, &adapter->state))
			vfnic_stop_queues(adapter, true);
		adapter->stats.suspends++;
	}
	adapter->stats.last_suspend_us = ktime_us_delta(ktime_get(), t0);
	return adapter->stats.last_suspend_us;
}

static u32 __vfnic_resume(struct vfnic_adapter *adapter, bool notify,
			  bool program)
{
	ktime_t t0 = ktime_get();

	if (test_and_clear_bit(__VFNIC_SUSPENDED, &adapter->state)) {
		if (!test_bit(__VFNIC_DOWN, &adapter->state))
			vfnic_start_queues(adapter, program);
		/* a VF we reset tells its link; ours kept it (LSC, LINK_CHANGE) */
		if (program)
			adapter->link_up = vfnic_rd32(adapter, VFNIC_STATUS) &
					   VFNIC_STATUS_LU;
		vfnic_update_carrier(adapter);
		/* gratuitous ARP and unsolicited NA: peers find us here */
		if (notify && netif_carrier_ok(adapter->netdev))
			__netdev_notify_peers(adapter->netdev);
		adapter->stats.resumes++;
	}
	adapter->stats.last_resume_us = ktime_us_delta(ktime_get(), t0);
	return adapter->stats.last_resume_us;
}

/* RESUME: the VF kept its registers (or had them restored): rings restart. */
u32 vfnic_resume(struct vfnic_adapter *adapter, bool notify)
{
	return __vfnic_resume(adapter, notify, false);
}

/*
 * Reset the VF and bring it back to what the driver had programmed: after an
 * FLR, or on a fresh VF found under us after a migration that moved no device
 * state. Keeps our MAC unless the PF refuses it. rtnl held.
 */
static int vfnic_reinit(struct vfnic_adapter *adapter)
{
	struct net_device *netdev = adapter->netdev;
	bool was_suspended;
	u8 mac[ETH_ALEN];
	int err;

	/* quiesce as SUSPEND would, then take the new VF as RESUME would */
	was_suspended = test_bit(__VFNIC_SUSPENDED, &adapter->state);
	vfnic_suspend(adapter);
	err = vfnic_reset_hw(adapter, mac);
	if (err)
		return err;
	if (!ether_addr_equal(mac, netdev->dev_addr) &&
	    vfnic_mbx_set_mac(adapter, netdev->dev_addr)) {
		netdev_warn(netdev, "the PF refuses %pM, using %pM\n",
			    netdev->dev_addr, mac);
		eth_hw_addr_set(netdev, mac);
	}
	vfnic_set_rar(adapter, netdev->dev_addr);
	clear_bit(__VFNIC_DIRTYING, &adapter->state);
	if (!test_bit(__VFNIC_DOWN, &adapter->state))
		vfnic_wr32(adapter, VFNIC_CTRL, VFNIC_CTRL_SLU);
	vfnic_wr32(adapter, VFNIC_EIMS, vfnic_eims(adapter));
	__vfnic_resume(adapter, true, true);
	if (was_suspended)	/* the PF that suspended us is gone */
		netdev_info(netdev, "resumed on a new VF\n");
	return 0;
}

/* --- watchdog: lost PCI config, a new VF under us, queue errors ------------ */

static void vfnic_check_function(struct vfnic_adapter *adapter, bool lost)
{
	struct net_device *netdev = adapter->netdev;
	struct pci_dev *pdev = adapter->pdev;
	ktime_t t0 = ktime_get();
	bool ours = vfnic_rd32(adapter, VFNIC_SCRATCH) == adapter->token;
	bool msix_only = lost && ours;
	s64 us;

	if (lost) {
		/*
		 * QEMU does not migrate a vfio-user function's config or MSI-X
		 * table. BAR0 answering with our token: the host put the BARs
		 * and command back, only the MSI-X state QEMU emulates is gone.
		 * Else put back everything we saved at probe.
		 */
		if (msix_only) {
			pci_restore_msi_state(pdev);
			adapter->stats.msix_restores++;
		} else {
			pci_restore_state(pdev);
			pci_save_state(pdev);
			ours = vfnic_rd32(adapter, VFNIC_SCRATCH) == adapter->token;
		}
		adapter->stats.config_restores++;
	}
	if (!ours) {
		if (vfnic_reinit(adapter)) {
			netdev_err(netdev, "taking over the new VF failed\n");
			return;
		}
		us = ktime_us_delta(ktime_get(), t0);
		adapter->stats.moves++;
		netdev_info(netdev, "migrated onto a new VF, mac %pM, link %s, taken over in %lld.%03lld ms\n",
			    netdev->dev_addr, adapter->link_up ? "up" : "down",
			    us / 1000, us % 1000);
		return;
	}
	if (lost) {
		netdev_info(netdev, "%s restored in %lld us\n",
			    msix_only ? "MSI-X" : "PCI config",
			    ktime_us_delta(ktime_get(), t0));
		/* interrupts raised while it was lost went nowhere */
		while (vfnic_mbx_check_pf(adapter))
			;
		adapter->link_up = vfnic_rd32(adapter, VFNIC_STATUS) &
				   VFNIC_STATUS_LU;
		vfnic_update_carrier(adapter);
		if (!test_bit(__VFNIC_DOWN, &adapter->state) &&
		    !test_bit(__VFNIC_SUSPENDED, &adapter->state)) {
			local_bh_disable();
			napi_schedule(&adapter->napi);
			local_bh_enable();
		}
	}
}

/* QERR: the device disabled a ring. Clear the cause, restart the queue. */
static void vfnic_check_queue(struct vfnic_adapter *adapter)
{
	u32 qerr;

	if (test_bit(__VFNIC_DOWN, &adapter->state) ||
	    test_bit(__VFNIC_SUSPENDED, &adapter->state))
		return;
	qerr = vfnic_rd32(adapter, VFNIC_QERR(VFNIC_QUEUE));
	if (!qerr || qerr == ~0U)
		return;
	netdev_warn(adapter->netdev, "queue %d error %#x: restarting it\n",
		    VFNIC_QUEUE, qerr);
	vfnic_wr32(adapter, VFNIC_QERR(VFNIC_QUEUE), qerr);
	vfnic_stop_queues(adapter, true);
	vfnic_start_queues(adapter, true);
	adapter->stats.queue_resets++;
}

/* Frames after the last RS descriptor report nothing: free them once idle. */
static void vfnic_check_tx_tail(struct vfnic_adapter *adapter)
{
	struct vfnic_ring *ring = &adapter->tx_ring;
	u16 ntc = READ_ONCE(ring->next_to_clean);

	if (test_bit(__VFNIC_DOWN, &adapter->state) ||
	    test_bit(__VFNIC_SUSPENDED, &adapter->state) ||
	    ntc == READ_ONCE(ring->next_to_use)) {
		adapter->tx_idle_ntc = -1;
		return;
	}
	if (adapter->tx_idle_ntc == ntc) {
		set_bit(__VFNIC_TX_IDLE, &adapter->state);
		local_bh_disable();
		napi_schedule(&adapter->napi);
		local_bh_enable();
	}
	adapter->tx_idle_ntc = ntc;
}

static void vfnic_watchdog_task(struct work_struct *work)
{
	struct vfnic_adapter *adapter = container_of(to_delayed_work(work),
						     struct vfnic_adapter,
						     watchdog_task);
	struct pci_dev *pdev = adapter->pdev;
	bool lost, pending, slow, suspended;
	u16 flags = 0;

	if (test_bit(__VFNIC_REMOVING, &adapter->state))
		return;
	vfnic_check_tx_tail(adapter);
	/* One config read: MSI-X off means our function lost its config. */
	pci_read_config_word(pdev, pdev->msix_cap + PCI_MSIX_FLAGS, &flags);
	lost = flags == 0xffff || !(flags & PCI_MSIX_FLAGS_ENABLE);
	slow = ++adapter->watchdog_ticks % SLOW_CHECK_TICKS == 0;
	suspended = test_bit(__VFNIC_SUSPENDED, &adapter->state);
	/* and a PF message whose interrupt has not been handled */
	pending = !lost &&
		  (slow || suspended ||
		   test_bit(__VFNIC_DIRTYING, &adapter->state)) &&
		  vfnic_rd32(adapter, VFNIC_VFMAILBOX) & VFNIC_MBX_PFSTS;
	if (lost || pending || suspended || slow) {
		rtnl_lock();
		if (lost || suspended)
			vfnic_check_function(adapter, lost);
		else
			vfnic_check_queue(adapter);
		if (pending && vfnic_mbx_check_pf(adapter)) {
			adapter->stats.mbx_polled++;
			while (vfnic_mbx_check_pf(adapter))
				;
		}
		rtnl_unlock();
	}
	schedule_delayed_work(&adapter->watchdog_task,
			      msecs_to_jiffies(max(watchdog_ms, 1U)));
}

/* --- netdev ops --------------------------------------------------------------- */

static void vfnic_get_stats64(struct net_device *netdev,
			      struct rtnl_link_stats64 *stats)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);
	unsigned int start;

	do {
		start = u64_stats_fetch_begin(&adapter->syncp);
		stats->rx_packets = adapter->stats.rx_packets;
		stats->rx_bytes = adapter->stats.rx_bytes;
		stats->tx_packets = adapter->stats.tx_packets;
		stats->tx_bytes = adapter->stats.tx_bytes;
	} while (u64_stats_fetch_retry(&adapter->syncp, start));
	stats->rx_errors = adapter->stats.rx_errors;
	stats->rx_dropped = netdev->stats.rx_dropped;
	stats->tx_dropped = adapter->stats.tx_dropped;
}

static int vfnic_set_mac(struct net_device *netdev, void *p)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);
	struct sockaddr *addr = p;
	int err;

	if (!is_valid_ether_addr(addr->sa_data))
		return -EADDRNOTAVAIL;
	err = vfnic_mbx_set_mac(adapter, addr->sa_data);
	if (err)
		return err == -EPERM ? -EADDRNOTAVAIL : err;
	eth_hw_addr_set(netdev, addr->sa_data);
	vfnic_set_rar(adapter, netdev->dev_addr);
	return 0;
}

/* MTA bit of a multicast address: the top 5 bits of its CRC. */
static void vfnic_mc_task(struct work_struct *work)
{
	struct vfnic_adapter *adapter = container_of(work, struct vfnic_adapter,
						     mc_task);
	struct net_device *netdev = adapter->netdev;
	struct netdev_hw_addr *ha;
	u32 hash = 0, count;

	netif_addr_lock_bh(netdev);
	count = netdev_mc_count(netdev);
	if (netdev->flags & (IFF_ALLMULTI | IFF_PROMISC))
		hash = ~0U;
	else
		netdev_for_each_mc_addr(ha, netdev)
			hash |= BIT(ether_crc(ETH_ALEN, ha->addr) >> 27);
	netif_addr_unlock_bh(netdev);
	if (hash == adapter->mc_hash)
		return;
	if (!vfnic_mbx_set_multicast(adapter, count ? count : !!hash, hash))
		adapter->mc_hash = hash;
}

static void vfnic_set_rx_mode(struct net_device *netdev)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);

	schedule_work(&adapter->mc_task);
}

static int vfnic_set_features(struct net_device *netdev,
			      netdev_features_t features)
{
	struct vfnic_adapter *adapter = netdev_priv(netdev);

	if ((features ^ netdev->features) & NETIF_F_RXCSUM &&
	    !test_bit(__VFNIC_DOWN, &adapter->state))
		vfnic_write_rxcsum(adapter, features);
	return 0;
}

static void vfnic_tx_timeout(struct net_device *netdev, unsigned int txqueue)
{
	netdev_warn(netdev, "transmit timed out (TDH %#x TDT %#x)\n",
		    vfnic_rd32(netdev_priv(netdev), VFNIC_TDH(VFNIC_QUEUE)),
		    vfnic_rd32(netdev_priv(netdev), VFNIC_TDT(VFNIC_QUEUE)));
}

static const struct net_device_ops vfnic_netdev_ops = {
	.ndo_open		= vfnic_open,
	.ndo_stop		= vfnic_close,
	.ndo_start_xmit		= vfnic_xmit_frame,
	.ndo_get_stats64	= vfnic_get_stats64,
	.ndo_set_rx_mode	= vfnic_set_rx_mode,
	.ndo_set_features	= vfnic_set_features,
	.ndo_set_mac_address	= vfnic_set_mac,
	.ndo_validate_addr	= eth_validate_addr,
	.ndo_tx_timeout		= vfnic_tx_timeout,
};

/* --- PCI ------------------------------------------------------------------------ */

static int vfnic_probe(struct pci_dev *pdev, const struct pci_device_id *ent)
{
	struct net_device *netdev;
	struct vfnic_adapter *adapter;
	u8 mac[ETH_ALEN];
	int err;

	err = pcim_enable_device(pdev);
	if (err)
		return err;
	err = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(64));
	if (err)
		return err;
	err = pcim_iomap_regions(pdev, BIT(0), VFNIC_DRV_NAME);
	if (err)
		return err;
	pci_set_master(pdev);

	netdev = devm_alloc_etherdev(&pdev->dev, sizeof(*adapter));
	if (!netdev)
		return -ENOMEM;
	SET_NETDEV_DEV(netdev, &pdev->dev);
	pci_set_drvdata(pdev, netdev);
	adapter = netdev_priv(netdev);
	adapter->netdev = netdev;
	adapter->pdev = pdev;
	adapter->hw_addr = pcim_iomap_table(pdev)[0];
	adapter->rx_ring_count = VFNIC_DEFAULT_RING;
	adapter->tx_ring_count = VFNIC_DEFAULT_RING;
	adapter->tx_idle_ntc = -1;
	adapter->rx_itr_us = min(rx_usecs, (unsigned int)VFNIC_EITR_MAX_US);
	set_bit(__VFNIC_DOWN, &adapter->state);
	mutex_init(&adapter->mbx_lock);
	u64_stats_init(&adapter->syncp);
	INIT_WORK(&adapter->mc_task, vfnic_mc_task);
	INIT_DELAYED_WORK(&adapter->watchdog_task, vfnic_watchdog_task);
	netif_napi_add(netdev, &adapter->napi, vfnic_poll);

	err = vfnic_request_irqs(adapter);
	if (err)
		goto err_napi;
	err = vfnic_reset_hw(adapter, mac);
	if (err)
		goto err_napi;
	if (!is_valid_ether_addr(mac)) {
		eth_random_addr(mac);
		dev_warn(&pdev->dev, "the PF gave no valid MAC, using %pM\n", mac);
	}
	eth_hw_addr_set(netdev, mac);
	vfnic_set_rar(adapter, mac);

	netdev->netdev_ops = &vfnic_netdev_ops;
	vfnic_set_ethtool_ops(netdev);
	netdev->watchdog_timeo = 5 * HZ;
	netdev->min_mtu = ETH_MIN_MTU;
	netdev->max_mtu = VFNIC_MAX_FRAME - ETH_HLEN - VLAN_HLEN;
	netdev->hw_features = NETIF_F_HW_CSUM | NETIF_F_RXCSUM;
	if (rx_csum)
		netdev->features |= NETIF_F_RXCSUM;
	if (tx_csum)
		netdev->features |= NETIF_F_HW_CSUM;

	vfnic_wr32(adapter, VFNIC_EIMS, vfnic_eims(adapter));
	pci_save_state(pdev);	/* what a lost config is restored from */
	netif_carrier_off(netdev);
	err = register_netdev(netdev);
	if (err)
		goto err_napi;
	schedule_delayed_work(&adapter->watchdog_task,
			      msecs_to_jiffies(watchdog_ms));
	netdev_info(netdev, "vfnic VF %s, mac %pM, link %s\n", pci_name(pdev),
		    netdev->dev_addr, adapter->link_up ? "up" : "down");
	return 0;

err_napi:
	netif_napi_del(&adapter->napi);
	return err;
}

static void vfnic_remove(struct pci_dev *pdev)
{
	struct net_device *netdev = pci_get_drvdata(pdev);
	struct vfnic_adapter *adapter = netdev_priv(netdev);

	set_bit(__VFNIC_REMOVING, &adapter->state);
	cancel_delayed_work_sync(&adapter->watchdog_task);
	unregister_netdev(netdev);
	cancel_work_sync(&adapter->mc_task);
	vfnic_wr32(adapter, VFNIC_EIMS, 0);
	vfnic_wr32(adapter, VFNIC_CTRL, 0);
	netif_napi_del(&adapter->napi);
}

/* FLR (e.g. echo 1 > /sys/bus/pci/devices/.../reset): the core saves and
 * restores the config around it; the VF's registers start over. */
static void vfnic_reset_prepare(struct pci_dev *pdev)
{
	struct vfnic_adapter *adapter = netdev_priv(pci_get_drvdata(pdev));

	cancel_delayed_work_sync(&adapter->watchdog_task);
	rtnl_lock();
	vfnic_suspend(adapter);
	rtnl_unlock();
}

static void vfnic_reset_done(struct pci_dev *pdev)
{
	struct vfnic_adapter *adapter = netdev_priv(pci_get_drvdata(pdev));

	pci_save_state(pdev);	/* the core's restore used up our copy */
	rtnl_lock();
	if (vfnic_reinit(adapter))
		netdev_err(adapter->netdev, "reset after FLR failed\n");
	rtnl_unlock();
	schedule_delayed_work(&adapter->watchdog_task,
			      msecs_to_jiffies(watchdog_ms));
}

static const struct pci_error_handlers vfnic_err_handler = {
	.reset_prepare = vfnic_reset_prepare,
	.reset_done = vfnic_reset_done,
};

static struct pci_driver vfnic_driver = {
	.name		= VFNIC_DRV_NAME,
	.id_table	= vfnic_pci_tbl,
	.probe		= vfnic_probe,
	.remove		= vfnic_remove,
	.err_handler	= &vfnic_err_handler,
};
module_pci_driver(vfnic_driver);

MODULE_AUTHOR("vfnic");
MODULE_DESCRIPTION("vfnic SR-IOV virtual function network driver");
MODULE_LICENSE("GPL");
MODULE_VERSION(VFNIC_DRV_VERSION);
