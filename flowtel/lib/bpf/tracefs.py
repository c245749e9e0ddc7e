"""Tracepoint record layouts and enum names, as the running kernel states them in tracefs.

Every tracepoint has a ``format`` file (``/sys/kernel/tracing/events/<category>/<event>/format``)
listing the fields of its record with offsets and sizes, and a ``print fmt`` whose
``__print_symbolic(REC->field, { value, "NAME" }, …)`` tables name enum values, e.g. the
``skb:kfree_skb`` drop reasons. These differ between kernels (fields are added, renamed,
retyped; enum values shift), so flowtel reads them at start-up instead of trusting headers.

Pure parsing lives here; :func:`read_format` is the only function that touches the filesystem.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

TRACEFS_ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")

_FIELD_RE = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d+);"
)
_ARRAY_RE = re.compile(r"^(?P<type>.*?)\s*(?P<name>\w+)\s*\[(?P<len>\d*)\]$")
_SYMBOLIC_RE = re.compile(r"__print_symbolic\(\s*REC->(?P<field>\w+)\s*,")
_ENTRY_RE = re.compile(r'\{\s*(?P<value>[^,{}]+?)\s*,\s*"(?P<name>[^"]*)"\s*\}')


class TracefsError(RuntimeError):
    """A tracepoint cannot be read or lacks what flowtel needs; the message says what to do."""


@dataclass(frozen=True, slots=True)
class TraceField:
    name: str
    type: str  # as declared, e.g. "enum skb_drop_reason", "__u8", "void *"
    offset: int
    size: int
    signed: bool
    array_len: int = 0  # elements, for "__u8 saddr[16]"; 0 for scalars

    @property
    def is_common(self) -> bool:
        return self.name.startswith("common_")


@dataclass(frozen=True, slots=True)
class TracepointFormat:
    category: str
    event: str
    id: int
    fields: dict[str, TraceField]
    print_fmt: str
    # field name -> {value: NAME}, from the first __print_symbolic table of that field.
    symbols: dict[str, dict[int, str]] = field(default_factory=dict)

    @property
    def record_size(self) -> int:
        return max((f.offset + f.size for f in self.fields.values()), default=0)

    def require(self, *names: str) -> None:
        missing = [n for n in names if n not in self.fields]
        if missing:
            raise TracefsError(
                f"tracepoint {self.category}:{self.event} has no field {', '.join(missing)} on this kernel "
                f"(fields: {', '.join(self.fields)})"
            )


def _parse_decl(decl: str) -> tuple[str, str, int]:
    """``"__u8 saddr[4]"`` -> (``"__u8"``, ``"saddr"``, 4); ``"void * skbaddr"`` -> (``"void *"``, ``"skbaddr"``, 0)."""
    decl = decl.strip()
    m = _ARRAY_RE.match(decl)
    if m:
        return m.group("type").strip(), m.group("name"), int(m.group("len") or 0)
    m = re.match(r"^(?P<type>.*?)(?P<name>\w+)$", decl)
    if not m:
        raise TracefsError(f"cannot parse tracepoint field declaration {decl!r}")
    return m.group("type").strip(), m.group("name"), 0


def _parse_int(text: str) -> int | None:
    text = text.strip()
    try:
        return int(text, 0)
    except ValueError:
        return None  # an enum the kernel did not resolve (printed as its C name): unusable


def _symbol_tables(print_fmt: str) -> dict[str, dict[int, str]]:
    tables: dict[str, dict[int, str]] = {}
    for m in _SYMBOLIC_RE.finditer(print_fmt):
        # The table runs to the parenthesis that closes this __print_symbolic( call.
        depth, i = 1, print_fmt.index("(", m.start()) + 1
        start = i
        while i < len(print_fmt) and depth:
            ch = print_fmt[i]
            if ch == '"':
                i = print_fmt.index('"', i + 1)
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            i += 1
        table: dict[int, str] = {}
        for entry in _ENTRY_RE.finditer(print_fmt, start, i):
            value = _parse_int(entry.group("value"))
            if value is not None:
                table[value] = entry.group("name")
        # oldstate and newstate each have a table; a field's first one wins.
        if table:
            tables.setdefault(m.group("field"), table)
    return tables


def parse_format(text: str, category: str = "", event: str = "") -> TracepointFormat:
    """Parse the text of a tracefs ``format`` file."""
    name = event
    ident = 0
    fields: dict[str, TraceField] = {}
    print_fmt = ""
    for line in text.splitlines():
        if line.startswith("name:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("ID:"):
            ident = int(line.split(":", 1)[1])
        elif line.startswith("print fmt:"):
            print_fmt = line.split(":", 1)[1].strip()
        else:
            m = _FIELD_RE.match(line)
            if m:
                ftype, fname, alen = _parse_decl(m.group("decl"))
                fields[fname] = TraceField(
                    name=fname,
                    type=ftype,
                    offset=int(m.group("offset")),
                    size=int(m.group("size")),
                    signed=m.group("signed") == "1",
                    array_len=alen,
                )
    if not fields:
        raise TracefsError(f"tracepoint format of {category}:{name} lists no fields")
    return TracepointFormat(category, name, ident, fields, print_fmt, _symbol_tables(print_fmt))


def tracefs_root() -> str:
    """Where tracefs is mounted; a :class:`TracefsError` with the mount command if nowhere."""
    for root in TRACEFS_ROOTS:
        if os.path.isdir(os.path.join(root, "events")):
            return root
    raise TracefsError(
        "tracefs is not mounted; mount it with `mount -t tracefs tracefs /sys/kernel/tracing` "
        "(in a container: mount the host's /sys/kernel/tracing, or run privileged)"
    )


def read_format(category: str, event: str, root: str | None = None) -> TracepointFormat:
    path = os.path.join(root or tracefs_root(), "events", category, event, "format")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise TracefsError(
            f"tracepoint {category}:{event} does not exist on this kernel ({path} is missing)"
        ) from None
    except PermissionError:
        raise TracefsError(f"cannot read {path}: run flowtel as root (it needs CAP_BPF and CAP_PERFMON)") from None
    return parse_format(text, category, event)


_SCALARS = {(1, False): "__u8", (2, False): "__u16", (4, False): "__u32", (8, False): "__u64",
            (1, True): "__s8", (2, True): "__s16", (4, True): "__s32", (8, True): "__s64"}


def _c_type(f: TraceField) -> tuple[str, str]:
    """C type and declarator suffix for a field, chosen by size: the kernel's own type name
    (an enum, a typedef) may not exist in the headers the program is compiled against."""
    if f.array_len:
        elem = f.size // f.array_len
        base = _SCALARS.get((elem, False), "__u8")
        n = f.array_len if base != "__u8" else f.size
        return base, f"[{n}]"
    if f.type.startswith("__data_loc"):
        return "__u32", ""
    scalar = _SCALARS.get((f.size, f.signed))
    if scalar is None:
        return "__u8", f"[{f.size}]"
    return scalar, ""


def c_struct(fmt: TracepointFormat, struct_name: str) -> str:
    """A C struct of the tracepoint's record with every field at the kernel's offset.

    bcc's TRACEPOINT_PROBE generates the same from the same file, but copies field types
    verbatim, and ``enum skb_drop_reason`` or ``enum sk_rst_reason`` may not exist in the
    headers bcc compiles against. Here each field is typed by its size; ``_Static_assert``
    makes a layout the compiler would pad differently a compile error, not a misread.
    A ``<PREFIX>_<FIELD>`` macro (the field's size) is defined for each field, so programs
    can adapt to fields that differ between kernels with ``#ifdef``.
    """
    prefix = struct_name.upper()
    lines = [f"/* {fmt.category}:{fmt.event}, from its tracefs format */", f"struct {struct_name} {{"]
    pos = 0
    asserts = []
    defines = []
    for f in sorted(fmt.fields.values(), key=lambda x: x.offset):
        if f.is_common:
            continue
        if f.offset > pos:
            lines.append(f"    __u8 __pad_{pos}[{f.offset - pos}];")
        elif f.offset < pos:
            raise TracefsError(f"{fmt.category}:{fmt.event}: field {f.name} overlaps the previous one")
        ctype, suffix = _c_type(f)
        lines.append(f"    {ctype} {f.name}{suffix};")
        asserts.append(
            f'_Static_assert(__builtin_offsetof(struct {struct_name}, {f.name}) == {f.offset}, '
            f'"{fmt.category}:{fmt.event}.{f.name} offset");'
        )
        defines.append(f"#define {prefix}_{f.name.upper()} {f.size}")
        pos = f.offset + f.size
    lines.append("};")
    return "\n".join([*lines, *asserts, *defines, ""])
