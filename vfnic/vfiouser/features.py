"""VFIO_USER_DEVICE_FEATURE payloads shared by the server and every client.

From linux/vfio.h: the v2 migration states (enum vfio_device_mig_state), the
migration flags (VFIO_MIGRATION_*), struct vfio_device_feature_mig_state and the
DMA logging structs (VFIO_DEVICE_FEATURE_DMA_LOGGING_*). The device side
(vfnic.savevm.migration, vfnic.dma.controller) and any client (the tests'
DeviceLink) read them from here.
"""

from __future__ import annotations

import enum
import struct


class State(enum.IntEnum):
    """enum vfio_device_mig_state."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class Feature(enum.IntEnum):
    """VFIO_DEVICE_FEATURE_* indexes vfnic implements."""

    MIGRATION = 1
    MIG_DEVICE_STATE = 2
    DMA_LOGGING_START = 6
    DMA_LOGGING_STOP = 7
    DMA_LOGGING_REPORT = 8


# struct vfio_device_feature_migration.flags
MIGRATION_STOP_COPY = 1 << 0
MIGRATION_P2P = 1 << 1
MIGRATION_PRE_COPY = 1 << 2

MigState = struct.Struct("<II")  # struct vfio_device_feature_mig_state: device_state, data_fd
LogControl = struct.Struct("<QII")  # vfio_device_feature_dma_logging_control: page_size, nranges
LogRange = struct.Struct("<QQ")  # vfio_device_feature_dma_logging_range: iova, length
LogReport = struct.Struct("<QQQ")  # vfio_device_feature_dma_logging_report: iova, length, pgsize
MAX_LOG_RANGES = 1024
# bytes: the max_bitmap_size a vfnic server advertises and enforces; it must fit in
# one reply (max_data_xfer_size); 1 MiB covers 32 GiB of 4 KiB pages.
MAX_BITMAP = 1 << 20
