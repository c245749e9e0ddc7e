"""Every constant Python takes from bpf/flowtel.h equals what the C compiler sees.

flowtel.lib.bpf.constants parses the header's ``#define FLOWTEL_<NAME> <integer>`` lines; this
checks the result against the C preprocessor's own view of the same header (``cpp -dM``), so a
constant written in a form the parser misreads (an expression, a macro of a macro) fails here
instead of meaning something else in Python. And no Python module may keep its own copy:
modules that name kernel counters, kinds or hooks read them from the header.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flowtel.lib.bpf.constants import HEADER, HEADER_PATH, parse_header

ROOT = Path(__file__).resolve().parents[2]


def _preprocessor_values() -> dict[str, int]:
    cpp = shutil.which("cpp") or shutil.which("gcc")
    if cpp is None:
        pytest.skip("no C preprocessor (cpp/gcc) to check the header against")
    argv = [cpp, "-dM", "-D__u8=unsigned char", "-D__u16=unsigned short", "-D__u32=unsigned int",
            "-D__u64=unsigned long long", "-D__s32=int", "-D__s64=long long", str(HEADER_PATH)]
    if Path(cpp).name == "gcc":
        argv.insert(1, "-E")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    values: dict[str, int] = {}
    names = [m.group(1) for m in re.finditer(r"^#define FLOWTEL_([A-Z0-9_]+) ", out, re.MULTILINE)]
    # Let the preprocessor expand each macro itself: what C code using it would get.
    probe = "\n".join(f"FLOWTEL_VALUE_{n} = FLOWTEL_{n}" for n in names)
    src = f'#include "{HEADER_PATH}"\n{probe}\n'
    if Path(cpp).name == "gcc":
        expanded = subprocess.run([cpp, "-E", "-P", "-"], input=src, capture_output=True, text=True, check=True).stdout
    else:
        expanded = subprocess.run([cpp, "-P", "-"], input=src, capture_output=True, text=True, check=True).stdout
    for name, expr in re.findall(r"^FLOWTEL_VALUE_([A-Z0-9_]+) = (.+)$", expanded, re.MULTILINE):
        try:
            values[name] = int(eval(expr.replace("ULL", "").replace("U", ""), {"__builtins__": {}}))
        except Exception:
            continue  # not an integer constant (a string, a function-like macro)
    return values


def test_parsed_constants_equal_the_preprocessors() -> None:
    c = _preprocessor_values()
    parsed = HEADER.items()
    assert parsed, "no constants parsed from bpf/flowtel.h"
    for name, value in parsed.items():
        assert name in c, f"FLOWTEL_{name} parsed from the header but not a C integer constant"
        assert c[name] == value, f"FLOWTEL_{name}: Python reads {value}, C sees {c[name]}"
    # Every integer constant of the header is available to Python, none silently skipped.
    assert set(c) <= set(parsed), sorted(set(c) - set(parsed))


def test_parser_reads_hex_and_ignores_other_macros() -> None:
    text = "#define FLOWTEL_A 0x10\n#define FLOWTEL_B 7  /* c */\n#define FLOWTEL_F(x) (x)\n#define OTHER 3\n"
    assert parse_header(text) == {"A": 16, "B": 7}


def test_unknown_constant_is_an_error() -> None:
    with pytest.raises(AttributeError, match="FLOWTEL_NO_SUCH"):
        HEADER.NO_SUCH  # noqa: B018


# Names of bpf/flowtel.h's constant families; a Python module assigning one of these from an
# integer literal keeps a copy of the header by hand.
_COPY = re.compile(r"^(?:KIND_[A-Z_]+|CNT_[A-Z_0-9]+|HOOK_[A-Z]+|FLAG_LIFETIME|KEV_[A-Z_]+)\s*=\s*\(?\s*\d"
                   r"|^[A-Z_][A-Z0-9_, ]* = [\d, ()]+\s*#.*FLOWTEL_", re.MULTILINE)


def test_no_python_module_copies_a_kernel_constant() -> None:
    offenders = []
    for path in [*ROOT.glob("receiver/**/*.py"), *ROOT.glob("flowtel/**/*.py"), *ROOT.glob("dnsproxy/**/*.py")]:
        if ".venv" in path.parts:
            continue
        for m in _COPY.finditer(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert offenders == [], "read these from flowtel.lib.bpf.constants.HEADER: " + "; ".join(offenders)
