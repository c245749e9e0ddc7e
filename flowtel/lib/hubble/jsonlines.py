"""The JSON line of a ``GetFlowsResponse``: its proto3 JSON mapping with Cilium's field names
(what ``hubble observe -o json`` prints and the file exporter writes), compact.

``extensions`` holds a ``google.protobuf.Struct``, whose numbers are doubles; Go's protojson
(Hubble) prints an integral double as ``3``, Python's ``json`` as ``3.0``. Counts are
written as Hubble and the file exporter write them.
"""
from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf import struct_pb2  # noqa: F401  # registers google.protobuf.Struct, the type extensions wrap

from flowtel.lib.hubble.api.observer import observer_pb2

_encode = json.JSONEncoder(separators=(",", ":")).encode
_EXACT = 2**53  # doubles are integers exactly up to here


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < _EXACT:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def response_dict(resp: observer_pb2.GetFlowsResponse) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(resp, preserving_proto_field_name=True)
    ext = out.get("flow", {}).get("extensions")
    if ext is not None and "value" in ext:
        ext["value"] = _integral(ext["value"])
    return out


def response_json(resp: observer_pb2.GetFlowsResponse) -> str:
    return _encode(response_dict(resp))
