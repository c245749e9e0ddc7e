"""The component registry: one line per component type, as in the Collector's builder."""
from __future__ import annotations

from flowtel.component import Factory, Kind


def all_factories() -> list[Factory]:
    # Imported here so that loading the config module does not import bcc and friends.
    from connectors.hubblemetrics.factory import FACTORY as hubblemetrics_connector
    from connectors.servicegraph.factory import FACTORY as servicegraph_connector
    from exporters.console.factory import FACTORY as console_exporter
    from exporters.file.factory import FACTORY as file_exporter
    from exporters.otlp.factory import FACTORY as otlp_exporter
    from exporters.otlphttp.factory import FACTORY as otlphttp_exporter
    from exporters.prometheus.factory import FACTORY as prometheus_exporter
    from extensions.flows.factory import FACTORY as flows_extension
    from extensions.health_check.factory import FACTORY as health_check_extension
    from extensions.hubble.factory import FACTORY as hubble_extension
    from extensions.ui.factory import FACTORY as ui_extension
    from processors.flowaggregate.factory import FACTORY as flowaggregate_processor
    from processors.k8sattributes.factory import FACTORY as k8sattributes_processor
    from receiver.ebpf.factory import FACTORY as ebpf_receiver
    from receiver.fqdnpolicy.factory import FACTORY as fqdnpolicy_receiver
    from receiver.procfs.factory import FACTORY as procfs_receiver

    return [
        ebpf_receiver,
        procfs_receiver,
        fqdnpolicy_receiver,
        k8sattributes_processor,
        flowaggregate_processor,
        console_exporter,
        file_exporter,
        otlp_exporter,
        otlphttp_exporter,
        prometheus_exporter,
        servicegraph_connector,
        hubblemetrics_connector,
        flows_extension,
        health_check_extension,
        hubble_extension,
        ui_extension,
    ]


def factories_by_kind() -> dict[Kind, dict[str, Factory]]:
    out: dict[Kind, dict[str, Factory]] = {kind: {} for kind in Kind}
    for factory in all_factories():
        out[factory.kind][factory.type] = factory
    return out
