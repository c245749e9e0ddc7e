"""Each component's README config table and its config class name the same keys (issue 13,
point 9): a key the code accepts is documented, and a documented key exists.

A README table is one whose first column is ``key``; a cell may name several keys
(`` `tls.cert_file`, `tls.key_file` ``), nested keys are dotted, and a ``<placeholder>``
segment stands for every key at its place (`` `metrics.<family>.enabled` ``). Documenting a
nested section as a whole (``backoff``) covers its keys. A nested section whose config class
lives in a folder with its own README (``receiver/ebpf/kernel_events``) is documented there,
with keys relative to the section.
"""
from __future__ import annotations

import re
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from flowtel.component import Factory
from flowtel.registry import all_factories

ROOT = Path(__file__).resolve().parents[2]
_ROW = re.compile(r"^\|(?P<first>[^|]*)\|")


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models a field holds directly (X, X | None), not in lists or maps."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def config_paths(model: type[BaseModel], prefix: str = "",
                 sections: dict[str, type[BaseModel]] | None = None) -> dict[str, bool]:
    """Every key path of ``model`` -> whether it is a leaf (True) or a nested section;
    ``sections`` collects each nested section's path and class."""
    out: dict[str, bool] = {}
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        nested = _models_in(field.annotation)
        out[path] = not nested
        for sub in nested:
            if sections is not None:
                sections[path] = sub
            out.update(config_paths(sub, path + ".", sections))
    return out


def documented_keys(readme: str) -> set[str]:
    keys: set[str] = set()
    in_table = False
    for line in readme.splitlines():
        m = _ROW.match(line.strip())
        if not m:
            in_table = False
            continue
        first = m.group("first").strip()
        if not in_table:
            in_table = first.lower() == "key"  # a table's header row
            continue
        if set(first) <= set("-: "):
            continue  # the separator row
        keys.update(re.findall(r"`([A-Za-z_<][A-Za-z0-9_.<>]*)`", first))
    return keys


def _folder_of(cls: type) -> Path:
    module = sys.modules[cls.__module__]
    assert module.__file__ is not None
    return Path(module.__file__).resolve().parent


def _readme_in(folder: Path) -> Path:
    while not (folder / "README.md").is_file() and folder != ROOT:
        folder = folder.parent
    return folder / "README.md"


def _matches(documented: str, path: str) -> bool:
    """``documented`` names ``path`` (a ``<placeholder>`` segment matches any one key)."""
    d, p = documented.split("."), path.split(".")
    return len(d) == len(p) and all(a == b or (a.startswith("<") and a.endswith(">")) for a, b in zip(d, p))


@pytest.mark.parametrize("factory", all_factories(), ids=lambda f: f"{f.kind.value}.{f.type}")
def test_readme_table_and_config_class_agree(factory: Factory) -> None:
    readme = _readme_in(_folder_of(factory.config_class))
    documented = documented_keys(readme.read_text())
    sections: dict[str, type[BaseModel]] = {}
    paths = config_paths(factory.config_class, sections=sections)
    used = {readme}
    for path, section in sorted(sections.items(), key=lambda kv: kv[0].count(".")):
        own = _readme_in(_folder_of(section))
        if own not in used and own.is_relative_to(readme.parent):  # a sub-folder's README
            used.add(own)
            documented |= {f"{path}.{key}" for key in documented_keys(own.read_text())}

    def covered(path: str) -> bool:
        parts = path.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(_matches(d, p) for d in documented for p in prefixes)

    undocumented = sorted(p for p, leaf in paths.items() if leaf and not covered(p))
    unknown = sorted(d for d in documented if not any(_matches(d, p) for p in paths))
    assert not undocumented, f"{readme.relative_to(ROOT)} lacks config keys {undocumented}"
    assert not unknown, f"{readme.relative_to(ROOT)} documents keys its config class does not have: {unknown}"


def test_the_table_parser_reads_what_a_table_says() -> None:
    text = ("| key | default |\n|---|---|\n| `a` | 1 |\n| `b.c`, `b.d` | x |\n| `m.<x>.on` | y |\n\n"
            "| metric | labels |\n|---|---|\n| `not_a_key` | - |\n")
    assert documented_keys(text) == {"a", "b.c", "b.d", "m.<x>.on"}
    assert _matches("m.<x>.on", "m.tcp.on") and not _matches("m.<x>.on", "m.tcp.off")
