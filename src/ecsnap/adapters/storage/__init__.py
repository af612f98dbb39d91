"""Block storage backends. Services see only the Protocols in `base.py`."""
