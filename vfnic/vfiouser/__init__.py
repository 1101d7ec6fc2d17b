"""The vfio-user protocol (docs/interop/vfio-user.rst in qemu/qemu), in Python.

Layers: ``wire`` (message layouts, no I/O) -> ``transport`` (socket framing, fds,
request/reply matching) -> ``server`` (command dispatch, errno replies) and
``client`` (our own client, for tests, the orchestrator and the host-side driver).
"""
