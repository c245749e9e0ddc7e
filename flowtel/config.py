"""Loading the Collector-shaped YAML config into typed, validated objects.

Every error names the file, the key path and what was expected, because an agent that
starts with half a config is worse than one that refuses to start.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pydantic
import yaml

from flowtel.component import ComponentConfig, Factory, Kind

SIGNALS = ("metrics", "logs")
TOP_LEVEL_KEYS = ("receivers", "processors", "connectors", "exporters", "extensions", "service")
_ID_RE = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?$")
# ${env:NAME} or ${env:NAME:-default}; "$$" escapes a literal "$".
_ENV_RE = re.compile(r"\$\$|\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# A config is a few KiB (a ConfigMap holds at most 1 MiB): anything far larger is a mistake.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Alias expansion limits, as Go's yaml.v3 (decode.go allowedAliasRatio), which the
# Collector's config loader uses, plus an absolute bound on the expanded document.
_ALIAS_RATIO_LOW = 400_000
_ALIAS_RATIO_HIGH = 4_000_000
_MAX_DECODED = _ALIAS_RATIO_HIGH

DEFAULT_CONFIG_CANDIDATES = (
    Path("/etc/flowtel/config.yaml"),
    Path(__file__).resolve().parent.parent / "config" / "flowtel.yaml",
)


class ConfigError(Exception):
    """A config problem a user must fix: names the file, the key path and the expectation."""

    def __init__(self, source: str, path: str, message: str) -> None:
        self.source = source
        self.path = path
        self.message = message
        where = f"{source}: {path}" if path else source
        super().__init__(f"config error in {where}: {message}")


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    id: str
    signal: str
    receivers: tuple[str, ...]
    processors: tuple[str, ...]
    exporters: tuple[str, ...]


@dataclass(slots=True)
class AgentConfig:
    source: str
    # kind -> component id -> validated config
    components: dict[Kind, dict[str, ComponentConfig]] = field(default_factory=dict)
    pipelines: dict[str, PipelineSpec] = field(default_factory=dict)
    extensions: tuple[str, ...] = ()

    def component(self, kind: Kind, component_id: str) -> ComponentConfig:
        return self.components[kind][component_id]


def component_type(component_id: str) -> str:
    return component_id.split("/", 1)[0]


def default_config_path() -> Path:
    env = os.environ.get("FLOWTEL_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_CONFIG_CANDIDATES:
        if candidate.is_file():
            return candidate
    return DEFAULT_CONFIG_CANDIDATES[-1]


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    factories: Mapping[Kind, Mapping[str, Factory]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Read, expand and validate a config file (the default one when ``path`` is None)."""
    file = Path(path) if path is not None else default_config_path()
    source = str(file)
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read the file: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(source, "", f"the file is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB; "
                                      "is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, "", f"not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        data = _load_yaml(text, source)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, "", f"not valid YAML{at}: {problem}") from None
    return parse_config(data, source, factories=factories, environ=environ)


def _load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with the node graph checked before anything is built from it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_aliases(node, source)
        return loader.construct_document(node)
    except RecursionError:
        # PyYAML composes and constructs recursively: thousands of nested brackets.
        raise ConfigError(source, "", "nested too deeply (thousands of levels); a config is a few levels deep") from None
    finally:
        loader.dispose()


def allowed_alias_ratio(decoded: int) -> float:
    """The share of decoded nodes that may come from alias expansion: Go's yaml.v3 rule
    (99% for documents up to 400,000 nodes, scaling down to 10% at 4,000,000)."""
    if decoded <= _ALIAS_RATIO_LOW:
        return 0.99
    if decoded >= _ALIAS_RATIO_HIGH:
        return 0.10
    return 0.99 - 0.89 * (decoded - _ALIAS_RATIO_LOW) / (_ALIAS_RATIO_HIGH - _ALIAS_RATIO_LOW)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_aliases(root: yaml.Node, source: str) -> None:
    """Refuse a recursive alias and excessive aliasing (a "billion laughs" document) in the
    composed node graph, where an alias is a second reference to the same node, before
    the document is built: PyYAML shares aliased objects, but everything that walks the
    config afterwards (``${env:…}`` expansion, validation) pays for the expanded tree."""
    size: dict[int, int] = {}  # id(node) -> nodes in its expansion, itself included
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            if size[key] > _MAX_DECODED:
                break
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                mark = child.start_mark
                raise ConfigError(source, "", f"recursive alias at line {mark.line + 1}, column {mark.column + 1}: "
                                              "an anchor's value refers to itself; a config must be a tree")
            if id(child) not in size:
                stack.append((child, False))
    decoded = size.get(id(root), _MAX_DECODED + 1)
    aliased = decoded - len(size)
    if decoded > _MAX_DECODED or (aliased > 100 and decoded > 1000
                                  and aliased / decoded > allowed_alias_ratio(decoded)):
        shown = (f"more than {_MAX_DECODED:,} nodes" if decoded > _MAX_DECODED
                 else f"{decoded:,} nodes, {aliased / decoded:.0%} of them through aliases")
        raise ConfigError(source, "", f"excessive aliasing: the document expands to {shown}; write the values "
                                      "out or use fewer nested aliases")


def parse_config(
    data: Any,
    source: str,
    *,
    factories: Mapping[Kind, Mapping[str, Factory]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    if factories is None:
        from flowtel.registry import factories_by_kind

        factories = factories_by_kind()
    env = os.environ if environ is None else environ
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", f"expected a mapping at the top level, got {_type_name(data)}")
    data = _expand_env(data, source, "", env)

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(
                source, str(key), f"unknown top-level key; expected one of {', '.join(TOP_LEVEL_KEYS)}"
            )

    config = AgentConfig(source=source)
    for kind in Kind:
        section = data.get(kind.value) or {}
        if not isinstance(section, dict):
            raise ConfigError(source, kind.value, f"expected a mapping of component ids, got {_type_name(section)}")
        config.components[kind] = {}
        known = factories.get(kind, {})
        for raw_id, raw_cfg in section.items():
            cid = str(raw_id)
            path = f"{kind.value}.{cid}"
            if not _ID_RE.match(cid):
                raise ConfigError(source, path, "expected a component id of the form 'type' or 'type/name'")
            ctype = component_type(cid)
            factory = known.get(ctype)
            if factory is None:
                choices = ", ".join(sorted(known)) or "none available"
                raise ConfigError(source, path, f"unknown {kind.value[:-1]} type '{ctype}'; known types: {choices}")
            config.components[kind][cid] = _validate_component(factory, raw_cfg, source, path)

    service = data.get("service")
    if service is None:
        raise ConfigError(source, "service", "missing; expected 'service.pipelines' naming at least one pipeline")
    if not isinstance(service, dict):
        raise ConfigError(source, "service", f"expected a mapping, got {_type_name(service)}")
    for key in service:
        if key not in ("pipelines", "extensions", "telemetry"):
            raise ConfigError(source, f"service.{key}", "unknown key; expected pipelines, extensions or telemetry")

    exts = service.get("extensions") or []
    if not isinstance(exts, list) or not all(isinstance(e, str) for e in exts):
        raise ConfigError(source, "service.extensions", "expected a list of extension ids")
    for i, ext in enumerate(exts):
        if ext not in config.components[Kind.EXTENSION]:
            raise ConfigError(
                source, f"service.extensions[{i}]", f"'{ext}' is not defined under the top-level 'extensions'"
            )
    config.extensions = tuple(exts)

    pipelines = service.get("pipelines")
    if not isinstance(pipelines, dict) or not pipelines:
        raise ConfigError(source, "service.pipelines", "expected a mapping with at least one pipeline (metrics or logs)")
    for raw_pid, spec in pipelines.items():
        pid = str(raw_pid)
        config.pipelines[pid] = _parse_pipeline(pid, spec, config, factories, source)
    _check_connectors(config, source)
    return config


def _validate_component(factory: Factory, raw: Any, source: str, path: str) -> ComponentConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, path, f"expected a mapping of settings, got {_type_name(raw)}")
    try:
        return factory.config_class.model_validate(raw)
    except pydantic.ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
        full = f"{path}.{loc}" if loc else path
        message = _describe_pydantic_error(err)
        raise ConfigError(source, full, message) from None


def _describe_pydantic_error(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if "input" in err and kind not in ("value_error",):
        value = err["input"]
        return f"{msg[0].lower()}{msg[1:]}; got {_type_name(value)} {value!r}"
    return msg


def _parse_pipeline(
    pid: str,
    spec: Any,
    config: AgentConfig,
    factories: Mapping[Kind, Mapping[str, Factory]],
    source: str,
) -> PipelineSpec:
    path = f"service.pipelines.{pid}"
    signal = component_type(pid)
    if signal not in SIGNALS or not _ID_RE.match(pid):
        raise ConfigError(source, path, f"pipeline ids are 'metrics' or 'logs', optionally '/name'; got '{pid}'")
    if not isinstance(spec, dict):
        raise ConfigError(source, path, f"expected a mapping with receivers and exporters, got {_type_name(spec)}")
    for key in spec:
        if key not in ("receivers", "processors", "exporters"):
            raise ConfigError(source, f"{path}.{key}", "unknown key; expected receivers, processors or exporters")
    lists: dict[str, tuple[str, ...]] = {}
    for key, kinds, required in (
        ("receivers", (Kind.RECEIVER, Kind.CONNECTOR), True),
        ("processors", (Kind.PROCESSOR,), False),
        ("exporters", (Kind.EXPORTER, Kind.CONNECTOR), True),
    ):
        value = spec.get(key)
        if value is None:
            value = []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, f"{path}.{key}", f"expected a list of component ids, got {_type_name(value)}")
        if required and not value:
            raise ConfigError(source, f"{path}.{key}", "expected at least one component id")
        for i, cid in enumerate(value):
            kind = next((k for k in kinds if cid in config.components[k]), None)
            if kind is None:
                where = " or ".join(k.value for k in kinds)
                raise ConfigError(source, f"{path}.{key}[{i}]", f"'{cid}' is not defined under {where}")
            factory = factories[kind][component_type(cid)]
            if signal not in factory.signals:
                raise ConfigError(
                    source,
                    f"{path}.{key}[{i}]",
                    f"'{cid}' does not support {signal} pipelines (supports: {', '.join(factory.signals)})",
                )
        if len(set(value)) != len(value):
            raise ConfigError(source, f"{path}.{key}", "lists the same component twice")
        lists[key] = tuple(value)
    return PipelineSpec(pid, signal, lists["receivers"], lists["processors"], lists["exporters"])


def _check_connectors(config: AgentConfig, source: str) -> None:
    for cid in config.components[Kind.CONNECTOR]:
        as_exporter = [p.id for p in config.pipelines.values() if cid in p.exporters]
        as_receiver = [p.id for p in config.pipelines.values() if cid in p.receivers]
        if bool(as_exporter) != bool(as_receiver):
            raise ConfigError(
                source,
                f"connectors.{cid}",
                "a connector must be an exporter of one pipeline and a receiver of another",
            )


def _expand_env(node: Any, source: str, path: str, env: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v, source, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, source, f"{path}[{i}]", env) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(source, path, f"environment variable {name} is not set (write ${{env:{name}:-default}} for a default)")

    whole = _ENV_RE.fullmatch(node)
    expanded = _ENV_RE.sub(replace, node)
    if whole and whole.group(0) != "$$":
        # A value that is only a reference takes the variable's YAML type (ports, booleans).
        try:
            typed = yaml.safe_load(expanded)
        except yaml.YAMLError:
            return expanded
        return typed if isinstance(typed, (int, float, bool)) else expanded
    return expanded


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )
