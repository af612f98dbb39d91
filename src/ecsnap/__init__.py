"""ecsnap: ECS-style instance snapshots and rollback for QEMU/KVM virtual machines."""

__version__ = "0.1.0"
