"""Self-telemetry over OTLP: flowtel_component_* points reach the transport when enabled, with
the component label and the counter/gauge split the prometheus exporter uses; none by default."""
from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

from flowtel.lib.exporterhelper.otlp_exporter import OtlpExporter
from flowtel.lib.exporterhelper.sending import Request, SendResult
from exporters.otlp.config import OtlpGrpcConfig
from flowtel.component import CreateSettings, Telemetry
from flowtel.records import MetricKind, MetricPoint


class _Transport:
    def __init__(self) -> None:
        self.requests: list[Request] = []

    def send(self, request: Request, timeout: float) -> SendResult:
        self.requests.append(request)
        return SendResult(ok=True)

    def close(self) -> None:
        pass


def sent_metrics(self_telemetry: bool) -> dict[str, object]:
    telemetry = Telemetry()
    telemetry.add("ebpf", "records_out", 7)
    transport = _Transport()
    config = OtlpGrpcConfig.model_validate({"endpoint": "localhost:4317", "sending_queue": {"enabled": False},
                                            "self_telemetry": self_telemetry})
    exporter = OtlpExporter(CreateSettings("otlp", "node-1", telemetry), config, transport)
    exporter.consume([MetricPoint("m_total", 1, MetricKind.SUM, 1)])
    exporter.collect()
    out: dict[str, object] = {}
    for request in transport.requests:
        msg = encode_metrics(request.payload)  # type: ignore[arg-type]
        for rm in msg.resource_metrics:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    for dp in getattr(metric, kind).data_points:
                        attrs = {a.key: a.value.string_value for a in dp.attributes}
                        out[f"{metric.name}{attrs}"] = (kind, dp.as_double or dp.as_int)
    return out


def test_self_telemetry_is_sent_when_enabled() -> None:
    got = sent_metrics(True)
    assert got["flowtel_component_records_out{'component': 'ebpf'}"] == ("sum", 7)
    assert got["flowtel_component_records_in{'component': 'otlp'}"] == ("sum", 1)
    assert got["flowtel_component_series{'component': 'otlp'}"][0] == "gauge"  # type: ignore[index]
    assert "m_total{}" in got


def test_self_telemetry_is_off_by_default() -> None:
    assert list(sent_metrics(False)) == ["m_total{}"]
