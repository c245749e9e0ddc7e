"""What the metric and OTLP exporters share: the series store, OTLP encoding, the sending queue."""
