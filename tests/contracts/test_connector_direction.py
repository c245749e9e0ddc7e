"""A connector is used in its direction or the config is refused, naming it (issue 13,
point 3). Wired backwards (receiver of its input signal, exporter of its output) it would
start and silently produce nothing; now the agent does not start."""
from __future__ import annotations

from typing import Any

import pytest

from flowtel.component import ConnectorFactory, Kind
from flowtel.config import ConfigError, parse_config
from flowtel.pipeline import Service
from flowtel.registry import factories_by_kind

FACTORIES = factories_by_kind()
CONNECTORS = sorted(FACTORIES[Kind.CONNECTOR].values(), key=lambda f: f.type)


def _config(connector: str, *, as_exporter_of: str, as_receiver_of: str) -> dict[str, Any]:
    exporters = {"logs": "console", "metrics": "prometheus"}
    return {
        "receivers": {"procfs": {}, "ebpf": {}},
        "connectors": {connector: {}},
        "exporters": {"console": {}, "prometheus": {"endpoint": "127.0.0.1:0"}},
        "service": {"pipelines": {
            f"{as_exporter_of}/in": {"receivers": ["ebpf" if as_exporter_of == "logs" else "procfs"],
                                     "exporters": [connector]},
            f"{as_receiver_of}/out": {"receivers": [connector], "exporters": [exporters[as_receiver_of]]},
        }},
    }


def test_every_connector_declares_its_direction() -> None:
    assert CONNECTORS, "no connector registered"
    for factory in CONNECTORS:
        assert isinstance(factory, ConnectorFactory)
        assert (factory.consumes, factory.emits) == ("logs", "metrics"), factory.type


@pytest.mark.parametrize("factory", CONNECTORS, ids=lambda f: f.type)
def test_a_connector_wired_backwards_is_refused_naming_it(factory: ConnectorFactory[Any]) -> None:
    assert isinstance(factory, ConnectorFactory)
    backwards = _config(factory.type, as_exporter_of=factory.emits, as_receiver_of=factory.consumes)
    with pytest.raises(ConfigError) as info:
        parse_config(backwards, "agent.yaml", factories=FACTORIES, environ={})
    err = info.value
    assert err.path == f"service.pipelines.{factory.emits}/in.exporters[0]"
    assert f"connector '{factory.type}' consumes {factory.consumes} and emits {factory.emits}" in err.message
    assert "agent.yaml" in str(err)


@pytest.mark.parametrize("factory", CONNECTORS, ids=lambda f: f.type)
def test_a_connector_as_receiver_of_its_input_signal_is_refused(factory: ConnectorFactory[Any]) -> None:
    half = _config(factory.type, as_exporter_of=factory.consumes, as_receiver_of=factory.consumes)
    with pytest.raises(ConfigError) as info:
        parse_config(half, "agent.yaml", factories=FACTORIES, environ={})
    assert info.value.path == f"service.pipelines.{factory.consumes}/out.receivers[0]"
    assert f"'{factory.type}'" in info.value.message and "as a receiver" in info.value.message


@pytest.mark.parametrize("factory", CONNECTORS, ids=lambda f: f.type)
def test_a_connector_in_its_direction_builds(factory: ConnectorFactory[Any]) -> None:
    cfg = parse_config(_config(factory.type, as_exporter_of=factory.consumes, as_receiver_of=factory.emits),
                       "agent.yaml", factories=FACTORIES, environ={})
    service = Service(cfg, node_name="node-1")  # built, not started: no kernel needed
    assert list(service.connectors) == [factory.type]


def test_every_registered_factory_is_typed_for_its_kind() -> None:
    from flowtel.component import (ConnectorFactory, ExporterFactory, ExtensionFactory, ProcessorFactory,
                                   ReceiverFactory)

    classes = {Kind.RECEIVER: ReceiverFactory, Kind.PROCESSOR: ProcessorFactory, Kind.CONNECTOR: ConnectorFactory,
               Kind.EXPORTER: ExporterFactory, Kind.EXTENSION: ExtensionFactory}
    for kind, by_type in FACTORIES.items():
        for type_name, factory in by_type.items():
            assert isinstance(factory, classes[kind]) and factory.kind is kind and factory.type == type_name
