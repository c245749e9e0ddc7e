"""Hubble JSON back into records (flowtel.hubble_parse) and the table/dict formats."""
from __future__ import annotations

import json

import pytest

from flowtel.lib.hubble import convert as hubble, printer, summary as _summary, timefmt
from flowtel.lib.hubble.parse import FlowJSONError, flow_from_json as flow_from_dict, parse_rfc3339, record_from_envelope
from tests.flowsamples import T0, lost, sample_flows


@pytest.mark.parametrize("name", list(sample_flows()))
def test_round_trip_is_exact(name: str) -> None:
    flow = sample_flows()[name]
    d = json.loads(json.dumps(hubble.flow_json(flow)))
    back = flow_from_dict(d)
    assert hubble.flow_json(back) == d
    assert printer.compact_line(back) == printer.compact_line(flow)
    assert printer.table_fields(back) == printer.table_fields(flow)


def test_envelopes_decode_to_records() -> None:
    flow = sample_flows()["F3"]
    assert hubble.envelope(record_from_envelope(hubble.envelope(flow))) == hubble.envelope(flow)  # type: ignore[arg-type]
    got = record_from_envelope(json.loads(json.dumps(hubble.lost_envelope(lost()))))
    assert got == lost()
    assert record_from_envelope({"node_status": {}}) is None


def test_not_a_flow_is_an_error() -> None:
    with pytest.raises(FlowJSONError, match="not a Hubble GetFlowsResponse"):
        record_from_envelope({"flow": {"verdict": "FORWARDED", "packets": 3}})  # not a field of flow.Flow
    with pytest.raises(FlowJSONError):
        record_from_envelope({"flow": {"time": "yesterday", "verdict": "FORWARDED"}})
    with pytest.raises(FlowJSONError):
        record_from_envelope(["not", "an", "object"])  # type: ignore[arg-type]  # the point: refused


@pytest.mark.parametrize("text, ns", [
    ("2024-11-26T11:45:45Z", T0),
    ("2024-11-26T11:45:45.5Z", T0 + 500_000_000),
    ("2024-11-26T11:45:45.000000001Z", T0 + 1),
    ("2024-11-26T12:45:45+01:00", T0),
    ("2024-11-26T10:15:45-01:30", T0),
])
def test_parse_rfc3339(text: str, ns: int) -> None:
    assert parse_rfc3339(text) == ns
    assert parse_rfc3339(timefmt.format_time(ns)) == ns


def test_parse_rfc3339_refuses_other_text() -> None:
    with pytest.raises(ValueError, match="not an RFC 3339 timestamp"):
        parse_rfc3339("5m")


def test_table_and_dict_formats() -> None:
    flows = sample_flows()
    assert printer.table_fields(flows["F1"]) == (
        "Nov 26 11:45:46.000", "shop/frontend-7c9d:41000", "shop/payments-0:8080", "from-endpoint", "FORWARDED",
        "TCP Flags: SYN")
    # Replies keep their recorded ends in the table (only the compact line swaps them).
    assert printer.table_fields(flows["F2"])[1:3] == ("shop/payments-0:8080", "shop/frontend-7c9d:41000")
    assert printer.table_fields(flows["F3"])[3:5] == ("NETFILTER_DROP", "DROPPED")
    assert printer.table_fields(flows["F6"])[2] == "www.example.com:443"
    assert printer.table_fields(flows["F9"])[1] == "api.internal.test:5000"
    assert printer.dict_block(flows["F4"]) == (
        "  TIMESTAMP: Nov 26 11:45:49.000\n"
        "     SOURCE: shop/frontend-7c9d:50000\n"
        "DESTINATION: kube-system/coredns-abc:53\n"
        "       TYPE: dns-request ebpf\n"
        "    VERDICT: FORWARDED\n"
        "    SUMMARY: DNS Query www.example.com. A"
    )
