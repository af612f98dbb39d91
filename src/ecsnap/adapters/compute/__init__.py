"""Hypervisor drivers. Services see only the Protocol in `base.py`."""
