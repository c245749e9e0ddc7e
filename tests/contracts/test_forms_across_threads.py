"""A record's Hubble form is shared by every consumer (flowtel.lib.hubble.convert), each on
its own thread in the agent: the file exporter (filtered: the message first; unfiltered: the
batch's lines make the forms), OTLP logs as map and as JSON string bodies, the line a flow
API or ``hubble`` consumer asks for one record at a time, and enrichment making a named copy
while the original is being encoded. Run together on the same records with the interpreter
switching threads as often as it can, every consumer writes the same flow (one uuid, one
time, the same fields) and a copy has a form of its own.

A fresh-clone run of test_otlp_outage_e2e once saw an OTLP body that the flow file did not
hold; this looked for a race here and found none (the likely cause: the test backend's abrupt
stop, tests/support/otlp_receiver.py). It does catch one: with wire_form's check under
_memo_lock removed, 20-35 of its 12,000 records carried two uuids (3 runs of 3 failed), and with
Flow.with_endpoints handing the copy its original's memo, the copy's check fails.
"""
from __future__ import annotations

import json
import random
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from exporters.file.config import FileConfig
from exporters.file.exporter import FileExporter
from flowtel.component import CreateSettings, Telemetry
from flowtel.lib.exporterhelper.otlp_encoding import OtlpEncoder, any_value_to_python
from flowtel.lib.hubble import convert
from flowtel.records import Endpoint, Flow, TrafficDirection, Workload, packet_flow, tcp_flag_counts

ROUNDS = 60
BATCH = 200


@pytest.fixture(autouse=True)
def switch_often() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # a thread switch every few bytecodes: races show in seconds
    yield
    sys.setswitchinterval(before)


def batch(rng: random.Random, t0: int) -> list[Flow]:
    out = []
    for _ in range(BATCH):
        proto = rng.choice((6, 17))
        out.append(packet_flow(
            t0 + rng.randrange(3_000_000_000), "test-node", 4, f"10.0.0.{rng.randrange(1, 5)}",
            f"10.0.1.{rng.randrange(1, 5)}", proto, rng.randrange(1, 65536), 9447, rng.choice(list(TrafficDirection)),
            rng.choice((None, True, False)), 0x800, rng.randrange(1, 40), f"veth{rng.randrange(5)}",
            rng.randrange(1, 9), rng.randrange(1, 2000), rng.randrange(256) if proto == 6 else 0,
            tcp_flag_counts(1, rng.randrange(2), 0, 0) if proto == 6 else None))
    return out


def otlp_bodies(records: list[Flow], body: str) -> list[Any]:
    out = []
    for payload, _ in OtlpEncoder({}, 64, body).logs(records, 0):  # type: ignore[arg-type]
        for lr in ExportLogsServiceRequest.FromString(payload).resource_logs[0].scope_logs[0].log_records:
            value = any_value_to_python(lr.body)
            out.append(value if body == "map" else json.loads(value))  # type: ignore[arg-type]
    return out


def file_exporter(path: Path, **cfg: Any) -> FileExporter:
    exporter = FileExporter(CreateSettings(id="file", node_name="test-node", telemetry=Telemetry()),
                            FileConfig(path=str(path), **cfg))
    exporter.start()
    return exporter


def file_bodies(path: Path) -> list[Any]:
    return [json.loads(line)["flow"] for line in path.read_text().splitlines()]


def test_every_consumer_on_its_own_thread_writes_the_same_flow(tmp_path: Path) -> None:
    rng = random.Random(17)
    pod = Endpoint(namespace="shop", pod_name="frontend-7c9d", labels=("k8s:app=frontend",),
                   workloads=(Workload("frontend", "Deployment"),))
    mismatched = []
    for n in range(ROUNDS):
        records = batch(rng, 1_765_000_000_000_000_000 + n * 10**9)
        filtered = file_exporter(tmp_path / f"filtered{n}.log", allow_list=[{"destination_port": ["9447"]}])
        whole = file_exporter(tmp_path / f"whole{n}.log")
        got: dict[str, list[Any]] = {}
        enriched: list[Flow] = []

        def enrich() -> None:
            for r in records:
                convert.flow_json(r)  # the original's form exists, or is being made elsewhere
                enriched.append(r.with_endpoints(pod, None))
            got["enriched"] = otlp_bodies(enriched, "map")

        jobs: dict[str, Callable[[], None]] = {
            "filtered": lambda: filtered.consume(list(records)),
            "whole": lambda: whole.consume(list(records)),
            "map": lambda: got.__setitem__("map", otlp_bodies(records, "map")),
            "json": lambda: got.__setitem__("json", otlp_bodies(records, "json")),
            "line": lambda: got.__setitem__("line", [json.loads(convert.envelope_line_bytes(r))["flow"]
                                                     for r in records]),
            "enrich": enrich,
        }
        threads = [threading.Thread(target=job) for job in jobs.values()]
        rng.shuffle(threads)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for exporter in (filtered, whole):
            exporter.shutdown()
        got["filtered"] = file_bodies(tmp_path / f"filtered{n}.log")
        got["whole"] = file_bodies(tmp_path / f"whole{n}.log")
        for i, record in enumerate(records):
            want = convert.flow_json(record)
            wrong = {name: bodies[i] for name, bodies in got.items() if name != "enriched" and bodies[i] != want}
            if wrong:
                mismatched.append((n, i, want, wrong))
        for original, copy, body in zip(records, enriched, got["enriched"]):
            assert body == convert.flow_json(copy) and body["uuid"] != convert.flow_json(original)["uuid"]
            assert body["source"] == convert.endpoint_json(pod) and "source" not in convert.flow_json(original)
    assert not mismatched, (len(mismatched), mismatched[:3])
