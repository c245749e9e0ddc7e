"""Config of the ``file`` exporter, mirroring Hubble's ``--export-file-*`` flags
and its exporter's ``allowList``/``denyList``/``fieldMask`` (``allow_list``, ``deny_list``, ``field_mask``)."""
from __future__ import annotations

from pydantic import Field, field_validator

from flowtel.lib.exporterhelper.flowlog_filter import FlowLogFilterConfig


class FileConfig(FlowLogFilterConfig):
    path: str = Field(description="file to write, e.g. /var/log/flowtel/flows.log (parents are created)")
    max_size_mb: int = Field(default=10, gt=0, description="rotate before the file would exceed this many MiB")
    max_backups: int = Field(default=5, ge=0, description="rotated files to keep; 0 keeps none")
    compress: bool = Field(default=False, description="gzip rotated files")

    @field_validator("path")
    @classmethod
    def _names_a_file(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a file, e.g. /var/log/flowtel/flows.log; got an empty string")
        if value.endswith(("/", "/.", "/..")) or value in (".", ".."):
            raise ValueError(f"must name a file, not a directory, e.g. {value.rstrip('/')}/flows.log; got {value!r}")
        return value
