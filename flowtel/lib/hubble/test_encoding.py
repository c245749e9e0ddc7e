"""The shared JSON text of a flow: byte for byte orjson's encoding of the JSON mapping, built from
per-shape templates and once-encoded endpoints."""
from __future__ import annotations

import json
from typing import Any

import orjson

from flowtel.lib.hubble import convert
from flowtel.records import Endpoint, Flow, TcpFlagCounts, TrafficDirection, Workload, replace
from tests.flowsamples import sample_flows


def test_non_ascii_is_utf8_and_the_same_json() -> None:
    ep = Endpoint(namespace="shop", pod_name="café-ü", labels=("k8s:app=naïve",), workloads=(Workload("ü", "Deployment"),))
    flow = replace(sample_flows()["F1"], source=ep)
    data = convert.envelope_bytes(flow)
    assert "café-ü".encode() in data
    assert json.loads(data) == convert.envelope(flow)
    assert convert.envelope_line(flow) == data.decode()


def test_lone_surrogates_fall_back_to_the_standard_library() -> None:
    # orjson refuses them; what the standard library wrote before is still written.
    ep = Endpoint(namespace="shop", pod_name="bad\udc80name")
    flow = replace(sample_flows()["F1"], destination=ep)
    line = convert.envelope_line(flow)
    assert "\\udc80" in line and json.loads(line) == convert.envelope(flow)


def test_endpoint_text_is_encoded_once_and_spliced_into_every_flow() -> None:
    flows = sample_flows()
    f1, f4 = flows["F1"], flows["F4"]  # both from the same FRONTEND endpoint object
    assert f1.source is f4.source
    frag = convert._endpoint_form(f1.source).text()  # type: ignore[arg-type]  # F1 has a source
    convert.envelope_bytes(f1)
    convert.envelope_bytes(f4)
    assert convert._endpoint_form(f4.source).text() is frag  # type: ignore[arg-type]  # F4 has a source
    for flow in flows.values():
        assert json.loads(convert.envelope_bytes(flow)) == convert.envelope(flow)


def _variants() -> list[Flow]:
    """Every kind of record, and each one changed in what the text's parts depend on: ports
    and counts present or not, ends named or not, interface, direction, reply bit, node, names,
    characters JSON must escape (and ``%``, which the templates use)."""
    from tests.contracts.test_wire_form import every_kind

    ep = Endpoint(namespace="n%s", pod_name='p"\\é%d', labels=("k8s:app=a%%b",))
    out = []
    for flow in every_kind().values():
        out.append(flow)
        out.extend([
            replace(flow, src_port=0), replace(flow, dst_port=0), replace(flow, src_port=0, dst_port=0),
            replace(flow, packets=0, bytes=0), replace(flow, packets=7, bytes=0),
            replace(flow, source=None, destination=None), replace(flow, source=ep), replace(flow, destination=ep),
            replace(flow, ifindex=0, ifname=""), replace(flow, ifindex=3, ifname="eth%s0"),
            replace(flow, traffic_direction=TrafficDirection.EGRESS, is_reply=None),
            replace(flow, traffic_direction=TrafficDirection.INGRESS, is_reply=True),
            replace(flow, node_name=""), replace(flow, node_name='n"%d'),
            replace(flow, source_names=("a.example.",), destination_names=("b%s.example.",)),
            replace(flow, tcp_flags=0x3F, tcp_flag_counts=TcpFlagCounts(1, 2, 3, 4)),
            replace(flow, tcp_flag_counts=None), replace(flow, protocol=17), replace(flow, protocol=132),
            replace(flow, protocol=1, src_port=3, dst_port=3), replace(flow, protocol=99),
            replace(flow, ip_version=6, src_ip="fd00::1", dst_ip="fd00::2"),
            replace(flow, src_ip='1"%s', dst_ip="\\"),
        ])
    return out


def test_the_text_is_the_mapping_encoded_byte_for_byte() -> None:
    # The text is built from per-shape templates and parts, never from the mapping: it must be
    # exactly what encoding the mapping gives, for every shape (twice: the second from the caches).
    for _ in range(2):
        for flow in _variants():
            form = convert.wire_form(flow)
            text = convert.flow_text_bytes(flow)
            assert text == orjson.dumps(convert._flow_dict(flow, form.uuid, form.time)), flow
            assert json.loads(text) == convert.flow_json(flow)
            assert convert.envelope_line_bytes(flow) == convert.envelope_bytes(flow) + b"\n"


def test_the_mapping_is_built_only_when_asked_for_and_carries_the_same_ids() -> None:
    flow = sample_flows()["F1"]
    form = convert.wire_form(flow)
    line = json.loads(convert.envelope_bytes(flow))
    assert form.json is None  # the file exporter's path never builds it
    body = convert.flow_json(flow)
    assert body["uuid"] == line["flow"]["uuid"] == form.uuid and body["time"] == line["time"]
    assert convert.to_proto(flow).uuid == form.uuid


def test_the_line_made_first_holds_the_same_text() -> None:
    # The file exporter asks for the envelope line first (one format from the line's template);
    # a later consumer of the body (OTLP string bodies) gets it cut from that line.
    for flow in _variants():
        line = convert.envelope_line_bytes(flow)
        form = convert.wire_form(flow)
        text = convert.flow_text_bytes(flow)
        assert text == orjson.dumps(convert._flow_dict(flow, form.uuid, form.time)), flow
        assert line == convert.envelope_bytes(flow) + b"\n" and line is convert.envelope_line_bytes(flow)
        assert json.loads(line) == convert.envelope(flow)


def test_a_batch_of_lines_is_each_records_line_with_its_own_form() -> None:
    # The file exporter takes a batch's lines at once (one lock, each second formatted once):
    # the same bytes as record by record, over every shape, every time precision (0/3/6/9
    # fraction digits, across a second's boundary), records that already had a form or a
    # text, and lost-event records between them.
    from flowtel.records import LostEvents
    from flowtel.lib.hubble.timefmt import format_time

    base = 1_764_000_000 * 1_000_000_000
    times = [base, base + 5_000_000, base + 5_000, base + 5, base + 999_999_999, base + 1_000_000_001]
    batch: list[Any] = []
    for i, flow in enumerate(_variants()):
        batch.append(replace(flow, time_ns=times[i % len(times)]))
        if i % 7 == 0:
            batch.append(LostEvents(times[i % len(times)], "QUEUE_FULL:file", 3, "node-0"))
    batch.append(replace(batch[0], source=Endpoint(pod_name="lone \ud800 surrogate")))  # orjson refuses it
    convert.flow_text_bytes(batch[3])  # a text first: the line is made around it
    convert.envelope_line_bytes(batch[5])  # a line first: the batch shares it
    known = convert.wire_form(batch[5])
    lines = convert.envelope_lines(batch)
    assert len(lines) == len(batch)
    uuids = set()
    for record, line in zip(batch, lines):
        assert line == convert.envelope_line_bytes(record)
        assert json.loads(line) == convert.record_envelope(record)
        if isinstance(record, Flow):
            form = convert.wire_form(record)
            assert form.time == format_time(record.time_ns) and line is form.line
            assert convert.encode_json(convert._flow_dict(record, form.uuid, form.time)) == convert.flow_text_bytes(record)
            uuids.add(form.uuid)
    assert convert.wire_form(batch[5]) is known
    assert len(uuids) == sum(isinstance(r, Flow) for r in batch)  # every flow its own id
    assert convert.envelope_lines(batch) == lines  # and again, from the kept lines
    # Copies without forms, now that every address, interface and endpoint text is cached:
    # the common shapes take envelope_lines' own fill (not _flow_text's), the same bytes.
    copies = [replace(r, time_ns=r.time_ns + 1) for r in batch]
    for record, line in zip(copies, convert.envelope_lines(copies)):
        if isinstance(record, Flow):
            form = convert.wire_form(record)
            body = convert.encode_json(convert._flow_dict(record, form.uuid, form.time))
            assert line == convert.encode_json(convert.envelope(record)) + b"\n" and convert.flow_text_bytes(record) == body
