"""The ``flows`` extension: the local flow API (ring, follow stream, service map)."""
