"""The ``ui`` extension: the web UI (service map, live flows), served by the agent."""
