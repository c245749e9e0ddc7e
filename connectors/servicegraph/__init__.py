"""The ``servicegraph`` connector: flows into service dependency metrics."""
