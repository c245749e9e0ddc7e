"""The HTTP flow API the ``flows`` and ``ui`` extensions serve (README.md here): Hubble's flow
store behind ``GET /flows``, the service map behind ``GET /map``, on the bounded HTTP server."""
from flowtel.lib.flowapi.service import FlowAPIExtension, bind, hub_from_config
from flowtel.lib.flowapi.settings import FlowAPISettings, ServiceMapConfig, split_endpoint

__all__ = ["FlowAPIExtension", "FlowAPISettings", "ServiceMapConfig", "bind", "hub_from_config", "split_endpoint"]
