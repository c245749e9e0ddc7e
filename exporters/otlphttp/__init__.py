"""The ``otlphttp`` exporter: metrics and flow logs as OTLP/HTTP protobuf, with the Collector's options."""
