"""Connectors: exporters of one pipeline that feed another (flows into metrics)."""
