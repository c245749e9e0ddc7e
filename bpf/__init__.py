"""C sources of flowtel's eBPF programs and the one header of the structs user space reads."""
from __future__ import annotations

import re
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parent


# `#include "part.h"` of a program part (e.g. dns.h) is expanded here, not by the compiler:
# bcc rewrites map method calls (`m.lookup(&k)`) only in the text it is given, never in
# included files. flowtel.h holds only declarations and stays an ordinary include.
_PART_INCLUDE = re.compile(r'^#include "(?!flowtel\.h")([A-Za-z0-9_]+\.h)"[ \t]*$', re.M)


def source(name: str) -> str:
    """The text of one program, e.g. ``source("tc_flow.c")``, with its parts expanded."""
    text = (BPF_DIR / name).read_text()
    return _PART_INCLUDE.sub(lambda m: (BPF_DIR / m.group(1)).read_text(), text)


def cflags(**defines: int | str) -> list[str]:
    """Compiler flags: the header's directory on the include path and the given -D constants."""
    return [f"-I{BPF_DIR}", *(f"-D{k}={v}" for k, v in defines.items())]
