"""Record types: the faster constructors build exactly what the plain ones would."""
from __future__ import annotations

import dataclasses
import pickle

import pytest

from flowtel.records import EventKind, MetricKind, MetricPoint, flow_fields
from tests.flowsamples import sample_flows


def test_metric_point_init_is_the_dataclass_init() -> None:
    # MetricPoint's __init__ is generated to store through its slots (flowtel.records,
    # _frozen_slots_init): the same signature, defaults, fresh default dict, frozenness.
    reference = dataclasses.make_dataclass(
        "Reference", [(f.name, f.type, f) for f in dataclasses.fields(MetricPoint)], frozen=True, slots=True)
    args = ("flowtel_x", 2.5, MetricKind.HISTOGRAM, 7)
    extra = {"attributes": {"a": "b"}, "unit": "s", "description": "d", "bounds": (1.0,), "bucket_counts": (1, 2),
             "count": 3, "start_time_ns": 9}
    for kwargs in ({}, extra, {"unit": "By"}):
        point, ref = MetricPoint(*args, **kwargs), reference(*args, **kwargs)
        assert dataclasses.astuple(point) == dataclasses.astuple(ref)
    a, b = MetricPoint(*args), MetricPoint(*args)
    assert a.attributes == {} and a.attributes is not b.attributes
    assert MetricPoint(name="n", value=1, kind=MetricKind.SUM, time_ns=1) == MetricPoint("n", 1, MetricKind.SUM, 1)
    assert dataclasses.replace(a, value=4.0).value == 4.0 and pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.value = 1.0  # type: ignore[misc]  # the point of the test: it is frozen
    with pytest.raises(TypeError):
        MetricPoint("n")  # type: ignore[call-arg]  # the point of the test: required fields


def test_event_kinds_hash_by_identity_and_compare_as_before() -> None:
    kinds = {k: k.value for k in EventKind}
    assert all(kinds[EventKind(v)] == v for v in kinds.values())
    assert pickle.loads(pickle.dumps(EventKind.DROP)) is EventKind.DROP


def test_flow_fields_reads_the_named_fields() -> None:
    flow = sample_flows()["F1"]
    read = flow_fields("src_ip", "kind", "destination")
    assert read(flow) == (flow.src_ip, flow.kind, flow.destination)
    with pytest.raises(ValueError):
        flow_fields("src_ip")
