"""The file exporter in a directory someone else can write to (a hostPath): links and
look-alike files planted where it writes are refused or left alone, never written through.

The agent runs as root, so these run as root too where they can: root is the case where
following a link would overwrite any file of the node."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from exporters.file.test_file import make_exporter, numbered
from exporters.file.exporter import FileExportError

VICTIM_TEXT = "root:x:0:0:do not touch\n"


def victim(tmp_path: Path) -> Path:
    # Outside the log directory, as /etc/shadow would be.
    target = tmp_path / "elsewhere" / "victim"
    target.parent.mkdir()
    target.write_text(VICTIM_TEXT)
    os.chmod(target, 0o644)
    return target


def untouched(target: Path) -> bool:
    return target.read_text() == VICTIM_TEXT and target.stat().st_nlink == 1


def test_a_link_planted_at_the_log_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = victim(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "flows.log").symlink_to(target)
    exporter, _ = make_exporter(logs / "flows.log")
    with pytest.raises(FileExportError) as info:
        exporter.start()
    assert "is a symbolic link; the agent does not write through links" in str(info.value)
    assert "give the agent write access" not in str(info.value)  # the right remedy, not a generic one
    with pytest.raises(FileExportError, match="symbolic link"):
        exporter.consume(numbered(3))
    assert untouched(target)
    # Once the operator removes the link, the next batch is written to a new regular file.
    (logs / "flows.log").unlink()
    exporter.consume(numbered(3))
    exporter.shutdown()
    assert not (logs / "flows.log").is_symlink() and len((logs / "flows.log").read_text().splitlines()) == 3


def test_a_link_planted_at_the_log_between_rotations_is_not_followed(tmp_path: Path) -> None:
    target = victim(tmp_path)
    path = tmp_path / "flows.log"
    exporter, _ = make_exporter(path, max_size_mb=1, max_backups=5)
    exporter.start()
    exporter.consume(numbered(10))
    # Swapped for a link while the agent runs: the open file is the old one; at rotation the
    # link itself is moved aside and the new log is created with O_EXCL.
    path.unlink()
    path.symlink_to(target)
    exporter.consume(numbered(3000))  # > 1 MiB: rotates
    exporter.shutdown()
    assert untouched(target)
    assert path.is_file() and not path.is_symlink()


def test_a_hard_link_at_the_log_is_refused(tmp_path: Path) -> None:
    target = victim(tmp_path)
    path = tmp_path / "elsewhere" / "flows.log"  # a hard link needs the same filesystem
    os.link(target, path)
    exporter, _ = make_exporter(path)
    with pytest.raises(FileExportError, match="has 2 hard links"):
        exporter.start()
    assert target.read_text() == VICTIM_TEXT


def test_a_link_planted_at_the_compression_temp_name_is_never_opened(tmp_path: Path) -> None:
    target = victim(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    leftover = logs / "flows-2020-01-01T00-00-00.000.log"  # a backup a crash left uncompressed
    leftover.write_text('{"old":1}\n')
    (logs / (leftover.name + ".gz.tmp")).symlink_to(target)
    exporter, _ = make_exporter(logs / "flows.log", max_size_mb=1, compress=True)
    exporter.consume(numbered(3000))
    exporter.shutdown()
    assert untouched(target)
    assert not (logs / (leftover.name + ".gz.tmp")).exists()
    with gzip.open(logs / (leftover.name + ".gz"), "rt") as fh:
        assert fh.read() == '{"old":1}\n'


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_only_backups_it_created_are_pruned_or_compressed(tmp_path: Path) -> None:
    target = victim(tmp_path)
    logs = tmp_path / "logs"
    logs.mkdir()
    # Backup-shaped names older than anything the exporter writes, so pruning reaches them first.
    planted_link = logs / "flows-2020-01-01T00-00-00.000.log"
    planted_link.symlink_to(target)
    foreign = logs / "flows-2020-01-01T00-00-00.001.log"
    foreign.write_text("someone else's\n")
    os.chown(foreign, 65534, 65534)
    exporter, _ = make_exporter(logs / "flows.log", max_size_mb=1, max_backups=1, compress=True)
    for _ in range(4):  # four rotations, max_backups=1: three of ours pruned
        exporter.consume(numbered(3000))
    exporter.shutdown()
    assert untouched(target)
    assert planted_link.is_symlink() and foreign.read_text() == "someone else's\n"
    assert not (logs / (foreign.name + ".gz")).exists()
    ours = sorted(p.name for p in logs.iterdir() if p.name.endswith(".gz"))
    assert len(ours) == 1, sorted(p.name for p in logs.iterdir())


def test_rotation_falls_back_to_rename_where_hard_links_are_refused(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A fault only some filesystems produce (vfat, some FUSE mounts): EPERM from link().
    import errno

    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "flows.log"
    exporter, _ = make_exporter(path, max_size_mb=1, max_backups=5)
    exporter.consume(numbered(3000))
    exporter.consume(numbered(3000, 3000))
    exporter.shutdown()
    backups = sorted(p.name for p in tmp_path.iterdir() if p.name != "flows.log")
    assert backups and all(name.startswith("flows-") for name in backups)
    lines = sum(len(p.read_text().splitlines()) for p in tmp_path.iterdir())
    assert lines == 6000
