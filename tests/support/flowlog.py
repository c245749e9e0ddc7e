"""Reading flowtel's JSON flow lines in tests, strictly as Cilium's schema reads them.

Every line is parsed with ``json_format.Parse`` into the project's ``observer.GetFlowsResponse``
(unknown fields are errors), so any test that reads a flow log from real traffic also proves
that line is valid Hubble JSON. The returned envelopes are the lines' JSON with each flow's
``extensions`` Any unwrapped to its Struct (``flow["extensions"]["packets"]``), which is what
the tests read counts from.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from google.protobuf import json_format

from flowtel.lib.hubble import convert  # noqa: F401  # registers google.protobuf.Struct for Any
from flowtel.lib.hubble.api.observer import observer_pb2

STRUCT_TYPE_URL = "type.googleapis.com/google.protobuf.Struct"


def parse_line(line: str) -> dict[str, Any]:
    """One line as a GetFlowsResponse (strictly), returned as JSON with extensions unwrapped."""
    json_format.Parse(line, observer_pb2.GetFlowsResponse(), ignore_unknown_fields=False)
    env: dict[str, Any] = json.loads(line)
    flow = env.get("flow")
    if flow is not None:
        assert flow.get("uuid") and flow.get("emitter", {}).get("name") == "flowtel", flow
        ext = flow.get("extensions")
        if ext is not None:
            assert ext.get("@type") == STRUCT_TYPE_URL, ext
            flow["extensions"] = ext.get("value", {})
    return env


def parse_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    return [parse_line(line) for line in lines if line.strip()]


def read_flow_log(path: Path) -> list[dict[str, Any]]:
    """Every envelope of a flow-log file (the file exporter's or the DNS proxy's)."""
    return parse_lines(path.read_text().splitlines())


def unwrap_flow(flow: dict[str, Any]) -> dict[str, Any]:
    """A flow object (not an envelope), checked through its envelope and unwrapped."""
    return parse_line(json.dumps({"flow": flow}))["flow"]  # type: ignore[no-any-return]  # a flow object


def check_wire_form(record: Any) -> dict[str, Any]:
    """A record's envelope line parsed strictly, with the shape rules a consumer ignoring
    ``extensions`` relies on: TCP events are socket traces (never packet traces), drops carry
    a Cilium DropReason number in ``event_type.sub_type`` (never 0, which reads "Success")."""
    from flowtel.records import EventKind, Verdict

    env = parse_line(json.dumps(convert.envelope(record), separators=(",", ":")))
    flow = env["flow"]
    if record.kind.is_tcp_event:
        assert flow["Type"] == "SOCK" and flow["event_type"] == {"type": 7}, flow
        assert flow["extensions"]["tcp_event"] == record.kind.value and "packets" not in flow["extensions"], flow
    elif record.kind is EventKind.DROP and record.verdict is Verdict.DROPPED:
        assert flow["event_type"]["type"] == 1 and flow["event_type"].get("sub_type", 0) != 0, flow
        assert flow["extensions"]["drop_reason"] == record.drop_reason, flow
    return env
