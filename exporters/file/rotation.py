"""A size-rotated append-only file, in the manner of lumberjack (what Hubble's exporter uses).

Before a write would take the file past ``max_bytes`` it is renamed to
``<stem>-<UTC time>.<ext>`` (lumberjack's ``2006-01-02T15-04-05.000`` layout, e.g.
``flows-2024-11-26T11-45-45.123.log``), optionally gzipped to ``….log.gz``, and a new file
is started; only the newest ``max_backups`` rotated files are kept (0 keeps none). Names
sort in time order, and two rotations within one millisecond still get distinct names.

Differences from lumberjack: a single line longer than ``max_bytes`` is written alone to a
fresh file instead of being refused (losing a record is worse than an oversized file), and
compression runs in the writer's thread (the exporter already has its own).

The agent writes as root into a directory that may be a hostPath others can write to, so
every name in it is looked up relative to the directory's own descriptor (``openat``) and
never through a symbolic link: the log is opened with ``O_NOFOLLOW`` (a link planted at its
name is refused with a clear error), new files are created with ``O_EXCL`` (a name that
exists, link or not, is never truncated or written through), rotation links the file to
its backup name without replacing anything, and only regular files owned by this process's
user with this file's backup names are ever compressed or deleted.
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
_MAX_REPORTED = 100  # look-alike backups logged by name; a directory full of them is not kept in memory


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
        self._dir_fd: int | None = None
        self._size = 0
        self._last_backup_ms = 0
        self._skipped: set[str] = set()  # backup-shaped names not ours, reported once each

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
        dir_fd = self._open_dir()
        name = self.path.name
        try:
            fd = _open_log(name, dir_fd, self.path)
        except BaseException:
            self._close_dir()
            raise
        try:
            size = os.fstat(fd).st_size
            # A write cut short earlier (disk full, crash) leaves half a line; start on a
            # fresh line so that only that fragment, not the next record, is unparsable.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                _write_all(fd, b"\n")
                size += 1
        except BaseException:
            os.close(fd)
            self._close_dir()
            raise
        self._fd = fd
        self._size = size

    def _open_dir(self) -> int:
        if self._dir_fd is None:
            # The directory itself is the operator's choice (it may be a link, e.g. /var/log);
            # the names inside it are not.
            self._dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._dir_fd

    def _close_dir(self) -> None:
        dir_fd, self._dir_fd = self._dir_fd, None
        if dir_fd is not None:
            os.close(dir_fd)

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
        self._close_file()
        self._close_dir()

    def _close_file(self) -> None:
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
        """Backups this writer may touch: its backup names, regular files, owned by our user."""
        parent = self.path.parent
        out = []
        try:
            dir_fd = self._open_dir()
        except FileNotFoundError:
            return []
        uid = os.geteuid()
        for name in os.listdir(dir_fd):
            m = self._backup_re.match(name)
            if m is None:
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_nlink != 1:
                if name not in self._skipped and len(self._skipped) < _MAX_REPORTED:
                    self._skipped.add(name)
                    log.warning("leaving %s alone: named like a flow-log backup but not one this agent wrote "
                                "(a link, not a regular file, or owned by uid %d)", parent / name, st.st_uid)
                continue
            out.append((m.group(1), parent / name))
        return out

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        _write_all(self._fd, data)
        self._size += len(data)

    def _rotate(self) -> None:
        self._close_file()
        dir_fd = self._open_dir()
        while True:
            backup = self._next_backup_path()
            try:
                # A hard link, then unlink: unlike rename it never replaces what is at the
                # backup name (a file or link someone planted there).
                os.link(self.path.name, backup.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                continue  # taken since we looked: the next millisecond's name
            except FileNotFoundError:
                break  # removed behind our back: nothing to keep, just start afresh
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                    raise
                # A filesystem without hard links: rename, which never follows a link either
                # (at worst it replaces an entry planted at a name we just saw free).
                try:
                    os.rename(self.path.name, backup.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
                break
            os.unlink(self.path.name, dir_fd=dir_fd)
            break
        self.open()
        if self._on_rotate is not None:
            self._on_rotate()
        self._prune()  # also gzips the new backup (and any a crash left uncompressed)

    def _next_backup_path(self) -> Path:
        ms = max(time.time_ns() // 1_000_000, self._last_backup_ms + 1)
        parent = self.path.parent
        dir_fd = self._open_dir()
        while True:
            sec, milli = divmod(ms, 1000)
            stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime(sec)) + f".{milli:03d}"
            candidate = parent / f"{self._stem}-{stamp}{self._ext}"
            if not _exists(candidate.name, dir_fd) and not _exists(candidate.name + ".gz", dir_fd):
                self._last_backup_ms = ms
                return candidate
            ms += 1

    def _compress(self, src: Path) -> None:
        dir_fd = self._open_dir()
        dst = src.name + ".gz"
        tmp = src.name + ".gz.tmp"
        try:
            in_fd = os.open(src.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
            with open(in_fd, "rb") as plain:
                st = os.fstat(in_fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    raise UnsafeFileError(errno.EPERM, "is not a regular file of the agent's", str(src))
                out_fd = _create_exclusive(tmp, dir_fd)
                try:
                    with open(out_fd, "wb") as raw, gzip.GzipFile(filename=src.name, mode="wb", fileobj=raw) as gz:
                        shutil.copyfileobj(plain, gz, 1 << 20)
                    if _exists(dst, dir_fd):
                        raise OSError(errno.EEXIST, "already exists", str(src.with_name(dst)))
                    os.rename(tmp, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                except BaseException:
                    _unlink_quietly(tmp, dir_fd)
                    raise
            os.unlink(src.name, dir_fd=dir_fd)
        except OSError as exc:
            # The plain backup is intact and still counted; compression is retried at the
            # next rotation. Failing the batch here would lose records over a nicety.
            log.warning("could not gzip %s (kept uncompressed, will retry): %s", src, exc)

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
                self._remove(p)
        if self.compress:
            for paths in by_time.values():
                names = {p.name for p in paths}
                for p in paths:
                    if p.name.endswith(".gz"):
                        continue
                    if p.name + ".gz" in names:
                        self._remove(p)  # a crash left both; the .gz is whole (it is renamed into place)
                    else:
                        self._compress(p)


    def _remove(self, path: Path) -> None:
        # Cleaning up old backups must not fail the write that triggered it.
        try:
            os.unlink(path.name, dir_fd=self._open_dir())
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove old flow log %s: %s", path, exc)


class UnsafeFileError(OSError):
    """The flow log's name holds something the agent must not write to; the message says
    what and what to do."""


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _create_exclusive(name: str, dir_fd: int) -> int:
    """A new file at ``name``: whatever is there (a crash's leftover, a planted link) is
    unlinked, never opened, and O_EXCL makes sure the file opened is the one created."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(5):
        try:
            return os.open(name, flags, _FILE_MODE, dir_fd=dir_fd)
        except FileExistsError:
            _unlink_quietly(name, dir_fd)
    raise OSError(errno.EEXIST, "keeps reappearing; something else writes there", name)


def _open_log(name: str, dir_fd: int, path: Path) -> int:
    """The flow log for appending, created if missing; never through a link, never a file
    that is not a regular file of ours."""
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL, _FILE_MODE, dir_fd=dir_fd)
        except FileExistsError:  # created between the two calls: open what is there now
            fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(errno.ELOOP, "is a symbolic link; the agent does not write through links "
                                       "(remove it, or point `path` at the link's target)", str(path)) from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader
            raise OSError(errno.EINVAL, "exists and is not a regular file", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "exists and is not a regular file", str(path))
        if st.st_nlink != 1:
            raise UnsafeFileError(errno.EPERM, f"has {st.st_nlink} hard links; the agent writes only to a file "
                                       "nothing else links to (remove the other links, or the file)", str(path))
        if st.st_uid != os.geteuid():
            raise UnsafeFileError(errno.EPERM, f"is owned by uid {st.st_uid}, not by the agent's uid {os.geteuid()} "
                                       "(remove it or chown it)", str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
