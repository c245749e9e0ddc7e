"""The direct message builder equals ``json_format.ParseDict`` on every kind of record."""
from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format

from flowtel.lib.hubble import convert, message
from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.timefmt import format_time, parse_time
from flowtel.records import Flow, LostEvents, replace
from tests.contracts.test_wire_form import every_kind
from tests.flowsamples import sample_flows

KINDS: dict[str, Flow] = {**{f"sample_{k}": f for k, f in sample_flows().items()}, **every_kind()}


def _parsed(mapping: dict[str, Any]) -> flow_pb2.Flow:
    msg = flow_pb2.Flow()
    json_format.ParseDict(mapping, msg)
    return msg


@pytest.mark.parametrize("name", sorted(KINDS))
def test_direct_builder_equals_parsedict(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mapping = convert.flow_json(KINDS[name])
    expected = _parsed(mapping)

    def no_fallback(*_a: object, **_k: object) -> None:
        raise AssertionError(f"{name}: the builder fell back to ParseDict")

    monkeypatch.setattr(message.json_format, "ParseDict", no_fallback)
    built = message.flow_message(mapping)
    assert built == expected
    # Byte for byte too (an Any's packed Struct compares as bytes).
    assert built.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    assert json_format.MessageToDict(built, preserving_proto_field_name=True) == mapping


def test_to_proto_and_to_response_use_the_shared_form() -> None:
    flow = KINDS["sample_F5"]
    assert convert.to_proto(flow) is convert.to_proto(flow)
    resp = convert.to_response(flow)
    assert resp.flow == _parsed(convert.flow_json(flow)) and resp.flow.uuid == convert.flow_json(flow)["uuid"]
    assert resp.time.ToNanoseconds() == flow.time_ns and resp.node_name == flow.node_name


def test_a_field_the_builder_does_not_know_goes_through_parsedict() -> None:
    mapping = dict(convert.flow_json(KINDS["sample_F1"]))
    mapping["source_service"] = {"name": "payments", "namespace": "shop"}  # in the schema, never written by convert
    assert message.flow_message(mapping) == _parsed(mapping)
    mapping["no_such_field"] = 1
    with pytest.raises(json_format.ParseError):
        message.flow_message(mapping)


@pytest.mark.parametrize("time_ns", [0, 1, 1_000, 1_000_000, 1732621545_123456789, 4102444800_000000000])
def test_timestamps_round_trip(time_ns: int) -> None:
    text = format_time(time_ns)
    assert parse_time(text) == divmod(time_ns, 1_000_000_000)
    flow = replace(KINDS["sample_F1"], time_ns=time_ns)
    assert convert.to_proto(flow).time.ToNanoseconds() == time_ns
    assert convert.to_proto(flow) == _parsed(convert.flow_json(flow))


@pytest.mark.parametrize("text", ["2024-11-26 11:45:45Z", "2024-11-26T11:45:45", "2024-11-26T11:45:45.12Z",
                                  "2024-11-26T11:45:45+01:00", "garbage"])
def test_other_timestamp_forms_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


def test_lost_events_response() -> None:
    lost = LostEvents(1732621545_000000000, "QUEUE_FULL:exporter/file", 7, node_name="node-1")
    resp = convert.to_response(lost)
    expected = json_format.ParseDict(convert.lost_envelope(lost), type(resp)())
    assert resp == expected
