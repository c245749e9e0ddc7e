"""Config of the ``ui`` extension: the flow API's settings with the UI's own port."""
from __future__ import annotations

from pydantic import Field

from flowtel.lib.flowapi import FlowAPISettings

DEFAULT_ENDPOINT = "127.0.0.1:12000"


class UiConfig(FlowAPISettings):
    endpoint: str = Field(default=DEFAULT_ENDPOINT, description="HOST:PORT the web UI listens on")
