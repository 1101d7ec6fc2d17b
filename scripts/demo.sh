#!/bin/sh
# make demo: boot, ping and live-migrate real guests with a vfnic VF (see vfnic/demo.py).
set -eu
exec .venv/bin/python -m vfnic.demo "$@"
