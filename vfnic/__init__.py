"""vfnic: a software SR-IOV NIC served over vfio-user to real QEMU."""

__version__ = "0.1.0"
