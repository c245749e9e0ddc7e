"""Config of the ``ebpf`` receiver."""
from __future__ import annotations

from pydantic import Field, field_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import Duration


class EbpfReceiverConfig(ComponentConfig):
    interfaces: list[str] = Field(default_factory=lambda: ["veth*", "eth0"], min_length=1)
    collection_interval: Duration = 10.0
    max_flows: int = Field(65536, ge=1024, le=4_194_304)
    tc_priority: int = Field(1, ge=1, le=65535)

    @field_validator("interfaces")
    @classmethod
    def _globs_not_empty(cls, value: list[str]) -> list[str]:
        for glob in value:
            if not glob.strip():
                raise ValueError("interface globs must not be empty strings")
        return value

    @field_validator("collection_interval")
    @classmethod
    def _interval_positive(cls, value: float) -> float:
        if value < 0.1:
            raise ValueError("collection_interval must be at least 100ms")
        return value
