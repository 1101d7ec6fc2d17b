"""The SR-IOV NIC model: PCI functions, the NIC (PF + VFs) and its management socket."""
