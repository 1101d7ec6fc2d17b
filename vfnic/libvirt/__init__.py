"""libvirt: domain XML for a vfnic guest and libvirtd instances for the two-host lab."""
