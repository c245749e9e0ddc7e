"""Contract: records are immutable, so pipelines sharing a receiver cannot see each other's changes.

One receiver feeds two logs pipelines of one agent: ``logs/named`` runs the real
``k8sattributes`` processor (static source) and ``logs/raw`` runs none. Before records were
immutable, the processor in ``logs/named`` changed what ``logs/raw`` exported. The raw
exporter must see the receiver's records exactly as they were sent (the same objects,
unchanged), the named one new records that share the processor's cached endpoints.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from flowtel.component import ComponentConfig, Consumer, CreateSettings, Exporter, Factory, Kind, Receiver
from flowtel.config import parse_config
from flowtel.pipeline import Service
from flowtel.records import EventKind, Flow, Verdict, frozen_extensions, replace
from flowtel.registry import factories_by_kind

STATIC = """
pods:
  - {name: web-0, namespace: shop, ips: [10.0.1.5], labels: {app: web}, workloads: [{kind: StatefulSet, name: web}]}
  - {name: db-0, namespace: shop, ips: [10.0.1.6], labels: {app: db}}
"""


class _Cfg(ComponentConfig):
    pass


class _Emit(Receiver):
    """Sends one batch at shutdown and keeps it, to compare against what came out."""

    sent: list[Flow] = []

    def __init__(self, settings: CreateSettings, cfg: _Cfg, nxt: Consumer) -> None:
        super().__init__(settings, nxt)

    def shutdown(self) -> None:
        batch = [Flow(time_ns=i + 1, node_name="node-1", verdict=Verdict.FORWARDED, ip_version=4,
                      src_ip="10.0.1.5", dst_ip="10.0.1.6", protocol=6, src_port=40000 + i, dst_port=5432,
                      packets=2, bytes=120, extensions=frozen_extensions({"n": i}))
                 for i in range(50)]
        type(self).sent = list(batch)
        self.next_consumer.consume(batch)  # type: ignore[arg-type]  # a list of Flows is a batch of records


class _Keep(Exporter):
    got: dict[str, list[Flow]] = {}
    lock = threading.Lock()

    def __init__(self, settings: CreateSettings, cfg: _Cfg) -> None:
        super().__init__(settings)

    def consume(self, batch: list) -> None:  # type: ignore[type-arg]  # records of any kind
        with self.lock:
            self.got.setdefault(self.settings.id, []).extend(batch)


def test_one_receiver_two_logs_pipelines_one_with_k8sattributes_are_isolated(tmp_path: Path) -> None:
    static = tmp_path / "static.yaml"
    static.write_text(STATIC)
    factories = {kind: dict(by_type) for kind, by_type in factories_by_kind().items()}
    factories[Kind.RECEIVER]["emit"] = Factory("emit", Kind.RECEIVER, _Cfg, _Emit)
    factories[Kind.EXPORTER]["keep"] = Factory("keep", Kind.EXPORTER, _Cfg, _Keep)
    config = parse_config(yaml.safe_load(f"""
receivers: {{emit: {{}}}}
processors:
  k8sattributes: {{source: static, static: {{path: {static}}}}}
exporters: {{keep/raw: {{}}, keep/named: {{}}}}
service:
  pipelines:
    logs/raw: {{receivers: [emit], exporters: [keep/raw]}}
    logs/named: {{receivers: [emit], processors: [k8sattributes], exporters: [keep/named]}}
"""), "isolation.yaml", factories=factories, environ={})
    _Keep.got = {}
    service = Service(config, node_name="node-1", factories=factories)
    service.start()
    service.shutdown()

    sent = _Emit.sent
    raw, named = _Keep.got["keep/raw"], _Keep.got["keep/named"]
    assert len(sent) == len(raw) == len(named) == 50
    # The raw pipeline got the receiver's own records, unchanged: no endpoint was put on them.
    assert all(r is s for r, s in zip(raw, sent))
    assert all(r.source is None and r.destination is None for r in raw)
    # The named pipeline got new records with both ends named, equal otherwise.
    assert all(n is not s for n, s in zip(named, sent))
    assert {(n.source.pod_name, n.destination.pod_name) for n in named} == {("web-0", "db-0")}  # type: ignore[union-attr]
    for n, s in zip(named, sent):
        assert replace(n, source=None, destination=None) == s
    # Cached endpoints are shared, not copied per record.
    assert len({id(n.source) for n in named}) == 1 and len({id(n.destination) for n in named}) == 1


def test_records_refuse_changes() -> None:
    flow = Flow(time_ns=1, node_name="n", verdict=Verdict.FORWARDED, ip_version=4, src_ip="10.0.0.1",
                dst_ip="10.0.0.2", protocol=17, extensions=frozen_extensions({"a": [1, {"b": 2}]}))
    with pytest.raises(AttributeError):
        flow.packets = 3  # type: ignore[misc]  # the point: assignment is refused
    with pytest.raises(TypeError):
        flow.extensions["a"] = 1  # type: ignore[index]  # the point: item assignment is refused
    with pytest.raises(TypeError):
        flow.extensions["a"][1]["c"] = 3  # type: ignore[index]  # nested mappings are frozen too
    assert flow.extensions["a"][0] == 1 and isinstance(flow.extensions["a"], tuple)  # type: ignore[index]  # known shape: a tuple
    assert flow.kind is EventKind.PACKET
