"""The ``hubblemetrics`` connector: flows (logs) into Hubble's ``hubble_*`` metric families."""
