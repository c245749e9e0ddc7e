"""The ``ui`` extension: static assets under ``/`` and the flow API under ``/api``.

It taps the logs pipelines into its own hub rather than calling the flows extension (both serve flowtel/lib/flowapi), so
the UI works whether or not ``flows`` is configured, and the page and its data share one
origin (no cross-origin requests, no CORS). The ring holds references to the same records
as the flows extension's, so a second ring costs little memory.
"""
from __future__ import annotations

import logging
from pathlib import Path

from extensions.ui.config import UiConfig
from flowtel.lib.flowapi import FlowAPIExtension

log = logging.getLogger("flowtel.extensions.ui")

STATIC_DIR = Path(__file__).resolve().parent / "static"


class UiExtension(FlowAPIExtension):
    config: UiConfig

    def start(self) -> None:
        self._serve(api_prefix="/api", static_dir=STATIC_DIR)
        log.info("%s: web UI on http://%s/", self.settings.id, self.endpoint)
