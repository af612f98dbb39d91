"""Metadata store. Services see only the Protocols in `base.py`."""
