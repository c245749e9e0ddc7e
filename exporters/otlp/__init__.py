"""The ``otlp`` exporter: metrics and flow logs as OTLP over gRPC, with the Collector's options."""
