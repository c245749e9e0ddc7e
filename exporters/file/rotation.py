"""A size-rotated append-only file, in the manner of lumberjack (what Hubble's exporter uses).

Before a write would take the file past ``max_bytes`` it is renamed to
``<stem>-<UTC time>.<ext>`` (lumberjack's ``2006-01-02T15-04-05.000`` layout, e.g.
``flows-2024-11-26T11-45-45.123.log``), optionally gzipped to ``….log.gz``, and a new file
is started; only the newest ``max_backups`` rotated files are kept (0 keeps none). Names
sort in time order, and two rotations within one millisecond still get distinct names.

Differences from lumberjack: a single line longer than ``max_bytes`` is written alone to a
fresh file instead of being refused (losing a record is worse than an oversized file), and
compression runs in the writer's thread (the exporter already has its own).
"""
from __future__ import annotations

import errno
import gzip
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("flowtel.exporters.file")

_FILE_MODE = 0o600  # flow logs name pods and addresses: readable by the agent (and root) only
_DIR_MODE = 0o755
_TIME_RE = r"\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}\.\d{3}"


class RotatingFile:
    """Not thread-safe: the owner serialises calls."""

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        max_backups: int,
        compress: bool,
        on_rotate: Callable[[], None] | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if max_backups < 0:
            raise ValueError("max_backups must be >= 0")
        self.path = path
        self.max_bytes = max_bytes
        self.max_backups = max_backups
        self.compress = compress
        self._on_rotate = on_rotate
        self._stem, self._ext = os.path.splitext(path.name)
        self._backup_re = re.compile(
            re.escape(self._stem) + "-(" + _TIME_RE + ")" + re.escape(self._ext) + r"(\.gz)?\Z"
        )
        self._fd: int | None = None
        self._size = 0
        self._last_backup_ms = 0

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    @property
    def size(self) -> int:
        """Bytes in the current file as far as this writer knows."""
        return self._size

    def open(self) -> None:
        """Open (creating parents and the file) for appending; a no-op when already open."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            pass
        else:
            # Opening a FIFO for writing would block, and rotating would rename a device.
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.EINVAL, "exists and is not a regular file", str(self.path))
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            size = os.fstat(fd).st_size
            # A write cut short earlier (disk full, crash) leaves half a line; start on a
            # fresh line so that only that fragment, not the next record, is unparsable.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                _write_all(fd, b"\n")
                size += 1
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = size

    def write_lines(self, lines: list[bytes]) -> None:
        """Append whole lines (each ending in ``\\n``), rotating between lines as needed.

        One ``write`` per file touched: normally one per call. On an error the file is
        closed, so the next call reopens it (the error is raised to the caller).
        """
        if self._fd is None:
            self.open()
        try:
            total = sum(map(len, lines))
            if self._size + total <= self.max_bytes:
                self._write(b"".join(lines))
                return
            chunk: list[bytes] = []
            chunk_bytes = 0
            for line in lines:
                n = len(line)
                filled = self._size + chunk_bytes
                if filled and filled + n > self.max_bytes:
                    if chunk:
                        self._write(b"".join(chunk))
                        chunk, chunk_bytes = [], 0
                    self._rotate()
                chunk.append(line)
                chunk_bytes += n
            if chunk:
                self._write(b"".join(chunk))
        except BaseException:
            self.close()
            raise

    def flush(self) -> None:
        """Writes are unbuffered; make them durable (called once, when the agent stops)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:  # the data was already written; nothing to retry
                log.warning("closing %s: %s", self.path, exc)

    def backups(self) -> list[Path]:
        """Rotated files of this path, oldest first."""
        return [p for _, p in sorted(self._scan_backups())]

    def _scan_backups(self) -> list[tuple[str, Path]]:
        parent = self.path.parent
        out = []
        try:
            entries = os.listdir(parent)
        except FileNotFoundError:
            return []
        for name in entries:
            m = self._backup_re.match(name)
            if m is not None:
                out.append((m.group(1), parent / name))
        return out

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        _write_all(self._fd, data)
        self._size += len(data)

    def _rotate(self) -> None:
        self.close()
        backup = self._next_backup_path()
        try:
            os.rename(self.path, backup)
        except FileNotFoundError:
            pass  # removed behind our back: nothing to keep, just start afresh
        self.open()
        if self._on_rotate is not None:
            self._on_rotate()
        self._prune()  # also gzips the new backup (and any a crash left uncompressed)

    def _next_backup_path(self) -> Path:
        ms = max(time.time_ns() // 1_000_000, self._last_backup_ms + 1)
        parent = self.path.parent
        while True:
            sec, milli = divmod(ms, 1000)
            stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime(sec)) + f".{milli:03d}"
            candidate = parent / f"{self._stem}-{stamp}{self._ext}"
            if not candidate.exists() and not candidate.with_name(candidate.name + ".gz").exists():
                self._last_backup_ms = ms
                return candidate
            ms += 1

    def _compress(self, src: Path) -> None:
        dst = src.with_name(src.name + ".gz")
        tmp = src.with_name(src.name + ".gz.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
            with open(fd, "wb") as raw, gzip.GzipFile(filename=src.name, mode="wb", fileobj=raw) as gz:
                with open(src, "rb") as plain:
                    shutil.copyfileobj(plain, gz, 1 << 20)
            os.replace(tmp, dst)
            os.unlink(src)
        except OSError as exc:
            # The plain backup is intact and still counted; compression is retried at the
            # next rotation. Failing the batch here would lose records over a nicety.
            log.warning("could not gzip %s (kept uncompressed, will retry): %s", src, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _prune(self) -> None:
        """Delete all but the newest ``max_backups``; with ``compress``, gzip the rest."""
        try:
            found = self._scan_backups()
        except OSError as exc:
            log.warning("could not list old flow logs beside %s: %s", self.path, exc)
            return
        by_time: dict[str, list[Path]] = {}
        for stamp, p in found:
            by_time.setdefault(stamp, []).append(p)
        stamps = sorted(by_time)
        for stamp in stamps[: max(len(stamps) - self.max_backups, 0)]:
            for p in by_time.pop(stamp):
                _remove(p)
        if self.compress:
            for paths in by_time.values():
                names = {p.name for p in paths}
                for p in paths:
                    if p.name.endswith(".gz"):
                        continue
                    if p.name + ".gz" in names:
                        _remove(p)  # a crash left both; the .gz is whole (it is renamed into place)
                    else:
                        self._compress(p)


def _remove(path: Path) -> None:
    # Cleaning up old backups must not fail the write that triggered it.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove old flow log %s: %s", path, exc)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
