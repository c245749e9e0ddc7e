"""The ``console`` exporter: one Hubble-style line per flow on stdout."""
