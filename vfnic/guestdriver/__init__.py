"""The guest side of the bus: a userspace VF driver model (ixy style) and a TAP bridge.

``bus`` (GuestBus in a Linux guest, HostBus on the host through our vfio-user
client), ``driver`` (VfDriver: rings, mailbox, suspend/resume), ``tapbridge``
(the VF as a TAP interface), ``python3 -m vfnic.guestdriver`` (the guest entry
point). Stdlib only on the guest's code path: the guest has no construct.
"""
