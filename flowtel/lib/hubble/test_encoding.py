"""The shared JSON text of a flow: orjson's encoding of the JSON mapping, endpoints spliced in."""
from __future__ import annotations

import json

from flowtel.lib.hubble import convert
from flowtel.records import Endpoint, Workload, replace
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
    frag = convert._endpoint_form(f1.source).fragment()  # type: ignore[arg-type]  # F1 has a source
    convert.envelope_bytes(f1)
    convert.envelope_bytes(f4)
    assert convert._endpoint_form(f4.source).fragment() is frag  # type: ignore[arg-type]  # F4 has a source
    for flow in flows.values():
        assert json.loads(convert.envelope_bytes(flow)) == convert.envelope(flow)
