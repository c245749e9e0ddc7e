"""C sources of flowtel's eBPF programs and the one header of the structs user space reads."""
from __future__ import annotations

from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent


def source(name: str) -> str:
    """The text of one program, e.g. ``source("tc_flow.c")``."""
    return (BPF_DIR / name).read_text()


def cflags(**defines: int | str) -> list[str]:
    """Compiler flags: the header's directory on the include path and the given -D constants."""
    return [f"-I{BPF_DIR}", *(f"-D{k}={v}" for k, v in defines.items())]
