"""Metric series shared by the exporters and the DNS proxy: the series store (cumulative/delta, histograms) and the Prometheus text exposition."""
