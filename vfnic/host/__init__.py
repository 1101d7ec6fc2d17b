"""Host side: the QEMU runtime, the guest image and VMs with vfnic functions attached."""
