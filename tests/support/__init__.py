"""Real-protocol stand-ins the tests run against (OTLP receivers, …)."""
