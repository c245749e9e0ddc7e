"""Flow-log allow/deny filters and field mask, as Hubble's flow exporter has them.

Shared by the ``file``, ``otlp`` and ``otlphttp`` exporters. The config keys follow
Hubble's exporter (``allowList``, ``denyList``, ``fieldMask``) in flowtel's snake_case:

- ``allow_list`` / ``deny_list``: lists of Cilium ``FlowFilter`` objects in their JSON form,
  as Hubble's exporter takes them, e.g. ``{source_pod: ["kube-system/"]}``,
  ``{verdict: [DROPPED]}`` or ``{event_type: [{type: 1}]}`` (every FlowFilter field; ports
  may be written as numbers, event types also as ``drop``/``l7``/``trace:to-endpoint``).
  Values of one field OR, fields of one object AND, objects of one list OR. A flow is
  exported when it matches some allow object (or the allow list is empty) and no deny
  object. Matching is :mod:`flowtel.lib.hubble.filters`, the one filter implementation
  (Hubble's gRPC API, ``flowtel observe``); lost-events records always pass, as they do
  there.
- ``field_mask``: dotted paths into the Hubble flow JSON (``time``, ``source.namespace``,
  ``IP.source``, ``l4``); only those paths are kept. Empty keeps everything. A path names a
  whole sub-object (``l4``) or a field inside it; lists of objects (``source.workloads``)
  are masked element by element; a sub-object the mask leaves empty is omitted.

  The mask also governs the OTLP log record's attributes, which repeat facts of the body:
  an attribute is sent only when the mask keeps the whole body field it is derived from,
  so a mask that hides addresses or pod names hides them everywhere in the record.

  ===============================================  =====================================
  attribute                                        kept when the mask keeps
  ===============================================  =====================================
  ``source.address`` / ``destination.address``     ``IP.source`` / ``IP.destination``
  ``network.type``                                 ``IP.ipVersion``
  ``source.port`` / ``destination.port``           ``l4.<P>.source_port`` / ``…destination_port``
  ``network.transport``                            any part of ``l4.<P>`` (the body then
                                                   names the protocol ``<P>``)
  ``network.interface.name``                       ``interface.name``
  ``<side>.k8s.namespace.name``                    ``<side>.namespace``
  ``<side>.k8s.pod.name``                          ``<side>.pod_name``
  ``<side>.k8s.<workload kind>.name``              ``<side>.workloads`` (name and kind)
  ``<side>.k8s.cluster.name``                      ``<side>.cluster_name``
  ``<side>.k8s.pod.labels.*``,                     ``<side>.labels``
  ``<side>.k8s.namespace.labels.*``
  any other ``<side>.*`` (``k8s.pod.uid``,         ``<side>``, the whole endpoint: the body
  ``k8s.node.name``, ``k8s.service.name``,         has no field for them
  annotations, custom ``tag_name``)
  ===============================================  =====================================

  (``<side>`` is ``source`` or ``destination``, ``<P>`` the flow's ``TCP``, ``UDP``,
  ``SCTP``, ``ICMPv4`` or ``ICMPv6``.) No attribute of a flow record is kept regardless of
  the mask; what identifies the record itself (time, severity, event name
  ``flowtel.flow``) is not an attribute and is always there. Lost-events records are not
  masked: they hold no flow data.

Everything is validated when the config is loaded, so a wrong field name, value or path
stops the agent with the key path (``exporters.file.allow_list[0].source_pod``) and why.
"""
from __future__ import annotations

import difflib
from typing import Annotated, Any, Sequence

from google.protobuf import json_format
from pydantic import AfterValidator, Field, ValidationInfo, create_model, field_validator, model_validator

from flowtel.component import ComponentConfig
from flowtel.lib.hubble import convert
from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.filters import FilterError, Filters, compile_filters
from flowtel.lib.hubble.flags import MESSAGE_TYPES, TRACE_OBSERVATION_POINTS
from flowtel.records import Flow, Record
from flowtel.recordtables import PROTOCOL_NAMES

# Cilium's FlowFilter fields, all of which the filters evaluate.
FILTER_FIELDS: tuple[str, ...] = tuple(f.name for f in flow_pb2.FlowFilter.DESCRIPTOR.fields)
_STRING_FIELDS = frozenset(f.name for f in flow_pb2.FlowFilter.DESCRIPTOR.fields
                           if f.type == f.TYPE_STRING)
# Names people reach for from `flowtel observe` flags; the error says the Hubble way.
_HINTS = {
    "namespace": "a namespace is a pod prefix in Hubble's filters: source_pod: ['NS/'] or destination_pod: ['NS/']",
    "namespaces": "a namespace is a pod prefix in Hubble's filters: source_pod: ['NS/'] or destination_pod: ['NS/']",
    "pod": "use source_pod or destination_pod (one object each for either end)",
    "ip": "use source_ip or destination_ip (one object each for either end)",
    "port": "use source_port or destination_port (one object each for either end)",
    "label": "use source_label or destination_label",
    "fqdn": "use source_fqdn or destination_fqdn",
    "type": "use event_type",
}

_LEAF = None
_ANY = "any"  # free-form object: any sub-path is accepted

_ENDPOINT = {"ID": _LEAF, "identity": _LEAF, "cluster_name": _LEAF, "namespace": _LEAF, "labels": _LEAF,
             "pod_name": _LEAF, "workloads": {"name": _LEAF, "kind": _LEAF}}
_PORTS = {"source_port": _LEAF, "destination_port": _LEAF}
_SERVICE = {"name": _LEAF, "namespace": _LEAF}
_POLICY = {"name": _LEAF, "namespace": _LEAF, "labels": _LEAF, "revision": _LEAF, "kind": _LEAF}
_ICMP = {"type": _LEAF, "code": _LEAF}

# Cilium's flow.proto Flow message by its JSON (proto) field names: what a mask may name.
FLOW_FIELDS: dict[str, Any] = {
    "time": _LEAF, "uuid": _LEAF, "verdict": _LEAF, "drop_reason": _LEAF, "auth_type": _LEAF,
    "ethernet": {"source": _LEAF, "destination": _LEAF},
    "IP": {"source": _LEAF, "source_xlated": _LEAF, "destination": _LEAF, "ipVersion": _LEAF, "encrypted": _LEAF},
    "l4": {
        "TCP": {**_PORTS, "flags": {f: _LEAF for f in ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")}},
        "UDP": dict(_PORTS), "SCTP": dict(_PORTS), "ICMPv4": dict(_ICMP), "ICMPv6": dict(_ICMP),
        "VRRP": {"type": _LEAF, "vrid": _LEAF, "priority": _LEAF}, "IGMP": {"type": _LEAF, "group_address": _LEAF},
    },
    "source": _ENDPOINT, "destination": _ENDPOINT,
    "Type": _LEAF, "node_name": _LEAF, "node_labels": _LEAF, "source_names": _LEAF, "destination_names": _LEAF,
    "l7": {
        "type": _LEAF, "latency_ns": _LEAF,
        "dns": {k: _LEAF for k in ("query", "ips", "ttl", "cnames", "observation_source", "rcode", "qtypes", "rrtypes")},
        "http": {k: _LEAF for k in ("code", "method", "url", "protocol", "headers")},
        "kafka": {k: _LEAF for k in ("error_code", "api_version", "api_key", "correlation_id", "topic")},
    },
    "reply": _LEAF, "event_type": {"type": _LEAF, "sub_type": _LEAF},
    "source_service": _SERVICE, "destination_service": _SERVICE,
    "traffic_direction": _LEAF, "policy_match_type": _LEAF, "trace_observation_point": _LEAF,
    "trace_reason": _LEAF, "file": {"name": _LEAF, "line": _LEAF}, "drop_reason_desc": _LEAF, "is_reply": _LEAF,
    "debug_capture_point": _LEAF, "interface": {"index": _LEAF, "name": _LEAF}, "proxy_port": _LEAF,
    "trace_context": {"parent": {"trace_id": _LEAF}}, "sock_xlate_point": _LEAF, "socket_cookie": _LEAF,
    "cgroup_id": _LEAF, "Summary": _LEAF,
    "extensions": _ANY,  # flowtel's packets/bytes/tcp_flags/handshake_rtt_ns/ethertype live here
    "egress_allowed_by": _POLICY, "ingress_allowed_by": _POLICY,
    "egress_denied_by": _POLICY, "ingress_denied_by": _POLICY, "policy_log": _LEAF,
}


def _check_path(path: str) -> str:
    parts = path.split(".")
    if not path or any(not p for p in parts):
        raise ValueError(f"expected a dotted path into the Hubble flow JSON such as 'source.namespace', got {path!r}")
    node: Any = FLOW_FIELDS
    where = "the flow"
    for i, part in enumerate(parts):
        if node is _ANY:
            break
        if node is _LEAF:
            raise ValueError(f"{path!r}: {'.'.join(parts[:i])!r} is a value, it has no field {part!r}")
        if part not in node:
            close = [f for f in node if f.lower() == part.lower()] or difflib.get_close_matches(part, node, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path!r}: {part!r} is not a field of {where}{hint}; "
                             f"fields of {where}: {', '.join(node)}")
        node = node[part]
        where = repr(".".join(parts[:i + 1]))
    return path


def _event_type(value: Any) -> Any:
    """``drop``, ``trace:to-endpoint``, ``4:5`` or Hubble's ``{type, sub_type}`` (a sub_type
    given means match it) as the EventTypeFilter JSON."""
    if isinstance(value, str):
        head, _, sub = value.partition(":")
        type_ = MESSAGE_TYPES.get(head.lower(), int(head) if head.isdigit() else None)
        if type_ is None:
            raise ValueError(f"event_type: {value!r} is not a type name ({', '.join(MESSAGE_TYPES)}) nor a number")
        if not sub:
            return {"type": type_}
        sub_type = TRACE_OBSERVATION_POINTS.get(sub, int(sub) if sub.isdigit() else None)
        if sub_type is None:
            raise ValueError(f"event_type: {sub!r} is not a sub-type name nor a number")
        return {"type": type_, "match_sub_type": True, "sub_type": sub_type}
    if isinstance(value, dict) and "sub_type" in value and "match_sub_type" not in value:
        return {**value, "match_sub_type": True}
    return value


def _normalize(key: str, value: Any) -> Any:
    if key != "experimental" and not isinstance(value, list):
        raise ValueError(f"expected a list of values, got {value!r}")
    if key in _STRING_FIELDS:
        return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    if key == "event_type":
        return [_event_type(v) for v in value]
    enum = _ENUMS.get(key)
    if enum is not None:
        out = []
        for v in value:
            name = v.upper() if isinstance(v, str) and key != "ip_version" else v
            if isinstance(name, str) and name not in enum.keys():
                raise ValueError(f"invalid value {v!r}; known: {', '.join(enum.keys())}")
            out.append(name)
        return out
    return value


_ENUMS: dict[str, Any] = {"verdict": flow_pb2.Verdict, "traffic_direction": flow_pb2.TrafficDirection,
          "drop_reason_desc": flow_pb2.DropReason, "ip_version": flow_pb2.IPVersion}


def _parse_field(key: str, value: Any) -> flow_pb2.FlowFilter:
    ff = flow_pb2.FlowFilter()
    try:
        json_format.ParseDict({key: _normalize(key, value)}, ff)
    except json_format.ParseError as exc:
        raise ValueError(str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)) from None
    try:
        compile_filters([ff])
    except FilterError as exc:
        raise ValueError(str(exc).removeprefix("whitelist[0].").removeprefix(f"{key}: ")) from None
    return ff


class _FlowFilterBase(ComponentConfig):
    """One Cilium ``FlowFilter`` object (its JSON form): fields AND, values of a field OR."""

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"expected a filter object such as {{source_pod: ['kube-system/']}}, got {data!r}")
        for key in data:
            if key in FILTER_FIELDS:
                continue
            if key in _HINTS:
                raise ValueError(f"unknown filter field {key!r}: {_HINTS[key]}")
            close = difflib.get_close_matches(key, FILTER_FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{key!r} is not a Hubble FlowFilter field{hint}; fields: {', '.join(FILTER_FIELDS)}")
        if not data:
            raise ValueError("an empty filter object matches every flow; give at least one field")
        return data

    def to_proto(self) -> flow_pb2.FlowFilter:
        out = flow_pb2.FlowFilter()
        for key in FILTER_FIELDS:
            value = getattr(self, key)
            if value is not None:
                out.MergeFrom(_parse_field(key, value))
        return out


def _check(value: Any, info: ValidationInfo) -> Any:
    # Parsed and compiled here, so a bad value stops the config load with its key path.
    _parse_field(info.field_name, value)  # type: ignore[arg-type]  # field_name: set for field validators
    return value


def _proto(ff: Any) -> flow_pb2.FlowFilter:
    proto: flow_pb2.FlowFilter = ff.to_proto()  # FlowFilterConfig is built at run time (Any)
    return proto


FlowFilterConfig: Any = create_model(  # type: ignore[call-overload]  # fields built from the proto's descriptor
    "FlowFilterConfig", __base__=_FlowFilterBase,  # every FlowFilter field, each checked alone
    __validators__={"_values": field_validator(*FILTER_FIELDS)(_check)},
    **{name: (Any, Field(default=None)) for name in FILTER_FIELDS},
)


FieldPath = Annotated[str, AfterValidator(_check_path)]


class FlowLogFilterConfig(ComponentConfig):
    """The keys a flow-log exporter's config gets by inheriting from this class."""


    allow_list: list[FlowFilterConfig] = Field(
        default_factory=list, description="export only flows matching one of these filters (empty: all)")
    deny_list: list[FlowFilterConfig] = Field(
        default_factory=list, description="do not export flows matching any of these filters")
    field_mask: list[FieldPath] = Field(
        default_factory=list, description="keep only these paths of the Hubble flow JSON (empty: all)")


class FieldMask:
    """A compiled ``field_mask``: call it on a Hubble flow object; ask it which OTLP
    attributes may be sent (the table in the module docstring). Without paths it keeps
    everything."""

    def __init__(self, paths: Sequence[str]) -> None:
        self._tree = _mask_tree(paths)
        # (attribute key, IP protocol) -> kept. Keys come from a fixed set plus the
        # k8sattributes extract rules, so this stays small; bounded all the same.
        self._attribute_cache: dict[tuple[str, int], bool] = {}

    @property
    def active(self) -> bool:
        return self._tree is not None

    def __call__(self, flow_obj: dict[str, Any]) -> dict[str, Any]:
        """The Hubble flow object (``flow_to_dict``) with only the masked paths; itself without a mask."""
        if self._tree is None:
            return flow_obj
        masked: dict[str, Any] = _apply(self._tree, flow_obj)
        return masked

    def keeps_attribute(self, key: str, protocol: int) -> bool:
        """Whether a flow record of IP ``protocol`` may carry the OTLP attribute ``key``."""
        if self._tree is None:
            return True
        cache = self._attribute_cache
        kept = cache.get((key, protocol))
        if kept is None:
            if len(cache) >= _ATTRIBUTE_CACHE_SIZE:
                cache.clear()
            kept = cache[(key, protocol)] = _attribute_kept(self._tree, key, _L4_NAMES.get(protocol, ""))
        return kept


_ATTRIBUTE_CACHE_SIZE = 4096
# The key of a flow's protocol in the Hubble object's ``l4``.
_L4_NAMES = PROTOCOL_NAMES
# Attributes that repeat one field of the flow object, by that field's path.
_FLOW_ATTRIBUTES = {
    "source.address": "IP.source",
    "destination.address": "IP.destination",
    "network.type": "IP.ipVersion",
    "network.interface.name": "interface.name",
}
# An endpoint's attributes (after "source." / "destination.") by the endpoint field they repeat.
_ENDPOINT_ATTRIBUTES = {
    "k8s.namespace.name": ("namespace",),
    "k8s.pod.name": ("pod_name",),
    "k8s.cluster.name": ("cluster_name",),
    **{f"k8s.{kind}.name": ("workloads.name", "workloads.kind")
       for kind in ("deployment", "replicaset", "statefulset", "daemonset", "job", "cronjob")},
}
_LABEL_ATTRIBUTE_PREFIXES = ("k8s.pod.labels.", "k8s.namespace.labels.")


def _attribute_kept(tree: dict[str, Any], key: str, l4: str) -> bool:
    path = _FLOW_ATTRIBUTES.get(key)
    if path is not None:
        return _keeps(tree, path)
    if key in ("source.port", "destination.port"):
        return bool(l4) and _keeps(tree, f"l4.{l4}.{key.replace('.', '_')}")
    if key == "network.transport":
        return bool(l4) and _shows(tree, f"l4.{l4}")
    side, _, rest = key.partition(".")
    if side not in ("source", "destination") or not rest:
        return False  # no body field says this: a mask hides it
    fields = _ENDPOINT_ATTRIBUTES.get(rest)
    if fields is None and rest.startswith(_LABEL_ATTRIBUTE_PREFIXES):
        fields = ("labels",)
    if fields is None:
        return _keeps(tree, side)
    return all(_keeps(tree, f"{side}.{field}") for field in fields)


def _mask_node(tree: dict[str, Any], path: str) -> Any:
    """The mask's node for ``path``: None when the mask keeps nothing there, ``_ALL`` when it
    (or a parent) is a mask path, else the sub-tree of the paths kept inside it."""
    node: Any = tree
    for part in path.split("."):
        node = node.get(part)
        if node is None or node is _ALL:
            return node
    return node


def _keeps(tree: dict[str, Any], path: str) -> bool:
    """Whether the mask keeps all of the value at ``path`` (it or a parent is a mask path)."""
    return _mask_node(tree, path) is _ALL


def _shows(tree: dict[str, Any], path: str) -> bool:
    """Whether the mask keeps ``path`` or anything inside it (so the body shows it exists)."""
    return _mask_node(tree, path) is not None


class FlowLogFilter:
    """A compiled allow/deny list and field mask: ``select`` a batch, then ``mask`` each flow dict."""

    def __init__(self, config: FlowLogFilterConfig) -> None:
        self._filters: Filters | None = None
        if config.allow_list or config.deny_list:
            self._filters = compile_filters([_proto(f) for f in config.allow_list],
                                            [_proto(f) for f in config.deny_list])
        # Callable on a flow object like a method; the OTLP encoder also asks it which
        # attributes to send.
        self.mask = FieldMask(config.field_mask)

    @property
    def filtering(self) -> bool:
        return self._filters is not None

    @property
    def masking(self) -> bool:
        return self.mask.active

    def select(self, batch: Sequence[Record]) -> list[Record]:
        """The records to export; lost events always pass."""
        if self._filters is None:
            return list(batch)
        matches = self._filters.matches_flow
        # On the flow's Cilium message (built once per record and shared by every output).
        return [r for r in batch if not isinstance(r, Flow) or matches(convert.to_proto(r))]

    def mask_envelope(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """A ``GetFlowsResponse`` envelope with its ``flow`` masked; other envelopes unchanged."""
        if not self.mask.active or "flow" not in envelope:
            return envelope
        out = dict(envelope)
        out["flow"] = self.mask(envelope["flow"])
        return out


_ALL: dict[str, Any] = {}  # marker: keep the whole value


def _mask_tree(paths: Sequence[str]) -> dict[str, Any] | None:
    if not paths:
        return None
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        parts = path.split(".")
        for i, part in enumerate(parts):
            child = node.get(part)
            if child is _ALL:
                break  # a shorter path already keeps all of it
            if i == len(parts) - 1:
                node[part] = _ALL
            else:
                if child is None:
                    child = node[part] = {}
                node = child
    return tree


def _apply(tree: dict[str, Any], obj: Any) -> Any:
    if isinstance(obj, list):
        return [_apply(tree, item) for item in obj]
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    for key, sub in tree.items():
        if key not in obj:
            continue
        value = obj[key]
        if sub is _ALL:
            out[key] = value
            continue
        masked = _apply(sub, value)
        if masked == {} or (isinstance(masked, list) and all(m == {} for m in masked)):
            continue  # nothing of the masked paths in this flow
        out[key] = masked
    return out


