"""The device's view of client memory: DMA_MAP'd regions, DMA access, dirty logging."""
