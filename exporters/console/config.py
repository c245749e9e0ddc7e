"""Config of the ``console`` exporter."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from flowtel.component import ComponentConfig


class ConsoleConfig(ComponentConfig):
    # "compact" is `hubble observe -o compact`; "json" is `hubble observe -o json` (the envelope).
    verbosity: Literal["compact", "json"] = Field(
        default="compact", description="line format: compact (one readable line) or json (Hubble's envelope)"
    )
    # Explicit rather than detected: the agent's stdout is usually a container log, not a tty.
    color: bool = Field(default=False, description="ANSI colors in compact lines, as hubble's --color always")
