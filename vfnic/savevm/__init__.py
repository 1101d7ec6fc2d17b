"""Device state: the vfio migration state machine and its data stream, device-agnostic
(the device plugs in through savevm.migration.Device; its snapshot layout is its own)."""
