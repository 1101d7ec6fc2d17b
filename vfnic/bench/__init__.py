"""The benchmark suite: `python -m vfnic.bench` (what `make bench` runs).

Sections (each also alone with ``--only``):
  regs       register round trips through our client and from inside a TCG guest
  datapath   packets through a VF: host-side driver model, and a TCG guest on the
             VF next to the same guest on virtio-net
  migration  migration time, VM and network downtime per configuration, the
             device-side suspend/resume costs, and docs/bench/migration.png
Results go to BENCHMARKS.md with the date, the machine and the command.
"""
