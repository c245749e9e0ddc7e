"""The ``file`` exporter: each record as one line of Hubble's ``GetFlowsResponse`` JSON."""
from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Callable

from flowtel.lib.exporterhelper.flowlog_filter import FlowLogFilter
from exporters.file.config import FileConfig
from exporters.file.rotation import RotatingFile, UnsafeFileError
from flowtel.lib.hubble import convert
from flowtel.component import CreateSettings, Exporter
from flowtel.records import Record

_MIB = 1024 * 1024

_NO_ACCESS = (
    "give the agent write access there (file ownership/mode, the pod's securityContext, "
    "or a writable hostPath/emptyDir volume)"
)
_REMEDIES = {
    errno.EACCES: _NO_ACCESS,
    errno.EPERM: _NO_ACCESS,
    errno.EROFS: "that filesystem is read-only; mount a writable volume at the path's directory",
    errno.ENOSPC: "the disk is full; free space or lower max_size_mb / max_backups",
    errno.EDQUOT: "the disk quota is exhausted; free space or lower max_size_mb / max_backups",
    errno.EISDIR: "the path is a directory; point `path` at a file inside it",
    errno.ENOTDIR: "a parent of the path is a file, not a directory; fix `path`",
    errno.EEXIST: "a parent of the path is a file, not a directory; fix `path`",
    errno.EINVAL: "point `path` at a regular file (not a device, FIFO or socket)",
}


class FileExportError(Exception):
    """Flow logs could not be written; the message says where, why and what to do."""


class FileExporter(Exporter):
    def __init__(self, settings: CreateSettings, config: FileConfig) -> None:
        super().__init__(settings)
        self.config = config
        self._filter = FlowLogFilter(config)
        self._file = RotatingFile(
            Path(config.path),
            max_bytes=config.max_size_mb * _MIB,
            max_backups=config.max_backups,
            compress=config.compress,
            on_rotate=self._count_rotation,
        )
        # consume runs on the exporter's worker; flush/shutdown come from the stopping thread.
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._file.path

    def start(self) -> None:
        # Opening now turns a wrong path or missing permission into a start-up error.
        with self._lock:
            self._guard(self._file.open)

    def consume(self, batch: list[Record]) -> None:
        if not batch:
            return
        selected = self._filter.select(batch)
        # Left out by allow_list/deny_list: counted, not an error.
        self.settings.telemetry.add(self.settings.id, "records_filtered", len(batch) - len(selected))
        if not selected:
            return
        # Encode everything before touching the file: a record that cannot be encoded
        # fails the batch without leaving part of it written.
        if self._filter.mask.active:
            mask = self._filter.mask_envelope
            lines = [convert.encode_json(mask(convert.record_envelope(r))) + b"\n" for r in selected]
        else:  # the whole flow: its shared, once-encoded text
            lines = convert.envelope_lines(selected)
        with self._lock:
            # Reopens after an earlier failure, so the exporter recovers once the cause is fixed.
            self._guard(lambda: self._file.write_lines(lines))
        self.settings.telemetry.add(self.settings.id, "bytes_written", sum(map(len, lines)))

    def flush(self) -> None:
        with self._lock:
            self._guard(self._file.flush)

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def _count_rotation(self) -> None:
        self.settings.telemetry.add(self.settings.id, "file_rotations")

    def _guard(self, action: Callable[[], None]) -> None:
        try:
            action()
        except OSError as exc:
            raise FileExportError(self._describe(exc)) from exc

    def _describe(self, exc: OSError) -> str:
        reason = exc.strerror or str(exc)
        culprit = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(self.path) else ""
        message = f"exporter {self.settings.id}: cannot write flow logs to {self.path}: {reason}{culprit}"
        # An unsafe target's message says what to do itself.
        unsafe = isinstance(exc, UnsafeFileError)
        remedy = _REMEDIES.get(exc.errno) if exc.errno is not None and not unsafe else None
        return f"{message}; {remedy}" if remedy else message
