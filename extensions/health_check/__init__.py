"""The ``health_check`` extension: HTTP readiness and liveness of the agent, as the Collector's."""
