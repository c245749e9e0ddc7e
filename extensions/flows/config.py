"""Config of the ``flows`` extension: the flow API's settings on its own port."""
from __future__ import annotations

from pydantic import Field

from flowtel.lib.flowapi import FlowAPISettings

DEFAULT_ENDPOINT = "127.0.0.1:4245"


class FlowsConfig(FlowAPISettings):
    # Loopback by default: the API is unauthenticated and shows every flow of the node.
    endpoint: str = Field(default=DEFAULT_ENDPOINT, description="HOST:PORT the flow API listens on")
