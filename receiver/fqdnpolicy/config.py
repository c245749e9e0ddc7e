"""Config of the ``fqdnpolicy`` receiver."""
from __future__ import annotations

from pydantic import field_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import CollectionInterval

# The dnsproxy's default --pin-dir (dnsproxy/datapath.py DEFAULT_PIN_DIR); kept literal here so
# that loading the agent's config does not import the proxy.
DEFAULT_PIN_DIR = "/sys/fs/bpf/flowtel/dnsproxy"


class FqdnPolicyReceiverConfig(ComponentConfig):
    # Where the dnsproxy pins its maps (its --pin-dir).
    pin_dir: str = DEFAULT_PIN_DIR
    collection_interval: CollectionInterval = 10.0

    @field_validator("pin_dir")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"pin_dir must be an absolute path on a bpf filesystem, got {value!r}")
        return value.rstrip("/") or "/"
