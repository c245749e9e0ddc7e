"""The ``file`` exporter: Hubble JSON flow logs, one object per line, with size-based rotation."""
