"""The ``prometheus`` exporter: serves the latest metric values on ``/metrics`` for a scraper."""
