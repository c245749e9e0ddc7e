"""The ``flows`` extension: the flow API (``/flows``, ``/map``, ``/healthz``) of the logs
pipelines it taps, served by the shared flow API library (flowtel/lib/flowapi)."""
from __future__ import annotations

from extensions.flows.config import FlowsConfig
from flowtel.lib.flowapi import FlowAPIExtension


class FlowsExtension(FlowAPIExtension):
    config: FlowsConfig
