"""The receiver opens the DNS proxy's pinned maps read-only: the kernel itself refuses a
write through its fd, while lookups (all the receiver does) work."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from receiver.fqdnpolicy import pinned

pytestmark = pytest.mark.kernel


@pytest.fixture
def pinned_map() -> Iterator[str]:
    if shutil.which("bpftool") is None:
        pytest.skip("needs bpftool (Debian bpftool)")
    pin_dir = Path(f"/sys/fs/bpf/flowtel-test-pinned-ro-{os.getpid()}")
    shutil.rmtree(pin_dir, ignore_errors=True)
    pin_dir.mkdir()
    path = str(pin_dir / "counters")
    try:
        subprocess.run(["bpftool", "map", "create", path, "type", "array", "key", "4", "value", "8",
                        "entries", "4", "name", "ftest_ro"], check=True, capture_output=True)
        subprocess.run(["bpftool", "map", "update", "pinned", path, "key", "1", "0", "0", "0",
                        "value", "7", "0", "0", "0", "0", "0", "0", "0"], check=True, capture_output=True)
        yield path
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


def test_pinned_maps_are_opened_read_only(pinned_map: str) -> None:
    from bcc.libbcc import lib

    fd = pinned.open_pinned(pinned_map)
    assert fd is not None
    try:
        info = pinned.map_info(fd)
        assert (info.key_size, info.value_size, info.max_entries) == (4, 8, 4)
        key, value = ctypes.c_uint32(1), ctypes.c_uint64(0)
        assert lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0
        assert value.value == 7
        value.value = 99
        lib.bpf_update_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulonglong]
        result = lib.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(value), 0)
        assert result != 0, "the kernel accepted a write through the receiver's fd"
    finally:
        os.close(fd)
    dump = subprocess.run(["bpftool", "-j", "map", "lookup", "pinned", pinned_map, "key", "1", "0", "0", "0"],
                          check=True, capture_output=True, text=True).stdout
    assert '"0x07"' in dump  # unchanged


def test_nothing_pinned_is_none() -> None:
    assert pinned.open_pinned(f"/sys/fs/bpf/flowtel-test-pinned-none-{os.getpid()}/x") is None
