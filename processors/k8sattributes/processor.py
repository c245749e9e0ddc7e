"""The ``k8sattributes`` processor: who is talking to whom, on both ends of every flow.

``process`` runs on the pipeline thread and only reads caches: two lookups per flow (one
per address), each a dict hit or two, and a new record carrying the two cached, shared
:class:`~flowtel.records.Endpoint` objects (records are immutable and shared with other
pipelines, so the input record is never changed and nothing is copied per record).
The caches are filled by the metadata source's own threads (informers for the API, a file
read at start for ``static``), so a slow or absent API server never slows the pipeline:
records pass through with what is known.

Processors are built once per pipeline (as in the Collector), but one API connection and
one set of caches per component id is enough: pipelines using the same ``k8sattributes``
share them.
"""
from __future__ import annotations

import functools
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from flowtel.component import CreateSettings, Processor, Status
from flowtel.records import Flow, Record, flow_fields
from processors.k8sattributes.config import K8sAttributesConfig
from processors.k8sattributes.extract import Extractor, Rule
from processors.k8sattributes.metadata import EndpointView, MetadataSource, ViewBuilder


def _gauge(source: MetadataSource, name: str) -> float:
    return float(source.gauges().get(name, 0.0))


def build_extractor(config: K8sAttributesConfig) -> Extractor:
    rules = []
    for field, items in (("labels", config.extract.labels), ("annotations", config.extract.annotations)):
        for item in items:
            regex = re.compile(item.key_regex) if item.key_regex is not None else None
            rules.append(Rule(item.from_, field, item.key, regex, item.tag_name))
    return Extractor(rules)


def build_source(
    settings: CreateSettings, config: K8sAttributesConfig, on_health: Callable[[str | None], None] | None = None,
) -> MetadataSource:
    builder = ViewBuilder(cluster_name=config.cluster_name, metadata=config.extract.metadata,
                          extractor=build_extractor(config))
    if config.source == "static":
        from processors.k8sattributes.static_source import StaticSource

        assert config.static is not None
        return StaticSource(settings.id, config.static.path, node_name=settings.node_name, builder=builder)
    # Imported here: the kubernetes client costs ~35 MB resident to import, which hosts
    # on the static source (and the demo) do not need to pay.
    from processors.k8sattributes.kube_source import KubeSource

    return KubeSource(settings.id, config, node_name=settings.node_name, telemetry=settings.telemetry,
                      builder=builder, on_health=on_health)


@dataclass(slots=True)
class _Shared:
    source: MetadataSource
    users: int


_shared: dict[tuple[str, str, int], _Shared] = {}
_shared_lock = threading.Lock()


class K8sAttributesProcessor(Processor):
    def __init__(self, settings: CreateSettings, config: K8sAttributesConfig) -> None:
        super().__init__(settings)
        self.config = config
        self.source: MetadataSource | None = None
        self._key = (settings.id, settings.node_name, id(settings.telemetry))

    def start(self) -> None:
        with _shared_lock:
            shared = _shared.get(self._key)
            if shared is None:
                source = build_source(self.settings, self.config, on_health=self._report_api_health)
                source.start()  # a StartError (credentials, static file) stops the agent here
                shared = _shared[self._key] = _Shared(source, 0)
                telemetry = self.settings.telemetry
                for name in source.gauges():
                    telemetry.register_gauge(self.settings.id, name, functools.partial(_gauge, source, name))
            shared.users += 1
            self.source = shared.source

    def _report_api_health(self, error: str | None) -> None:
        # Recoverable: records keep flowing and the caches catch up by themselves, so the
        # health_check extension shows it without making the agent unready or restarting it.
        if error is None:
            self.report_status(Status.OK)
        else:
            self.report_status(Status.RECOVERABLE_ERROR, error)

    def shutdown(self) -> None:
        with _shared_lock:
            shared = _shared.get(self._key)
            if shared is None or self.source is None:
                return
            self.source = None
            shared.users -= 1
            if shared.users > 0:
                return
            del _shared[self._key]
        shared.source.shutdown()

    def process(self, batch: list[Record]) -> list[Record]:
        source = self.source
        if source is None:
            return batch
        span = source.lookup_span
        # Per distinct address of the batch: its view and the span of times it holds for
        # (the source says; the whole interval for an address one pod holds), so most
        # records cost two dict hits, not two lookups.
        spans: dict[str, tuple[EndpointView, float, float]] = {}
        kinds: list[str] = []
        note = kinds.append
        now = time.time()
        out: list[Record] = []
        append = out.append
        with_endpoints = Flow.with_endpoints  # records are shared with other pipelines: a new one each
        for record in batch:
            if record.__class__ is not Flow or not record.ip_version:
                if isinstance(record, Flow) and record.ip_version:
                    append(self._named(record, now))  # a subclass of Flow: the general path
                else:
                    append(record)  # metric points, lost-event records and non-IP frames have no ends to name
                continue
            flow = record
            time_ns, src_ip, dst_ip, given_src, given_dst = _ends(flow)
            when = time_ns * 1e-9 if time_ns > 0 else now
            hit = spans.get(src_ip)
            if hit is not None and hit[1] <= when <= hit[2]:
                src = hit[0]
            else:
                hit = spans[src_ip] = span(src_ip, when)
                src = hit[0]
            hit = spans.get(dst_ip)
            if hit is not None and hit[1] <= when <= hit[2]:
                dst = hit[0]
            else:
                hit = spans[dst_ip] = span(dst_ip, when)
                dst = hit[0]
            note(src.kind)
            note(dst.kind)
            append(with_endpoints(flow, src.shared if given_src is None else src.merged(given_src),
                                  dst.shared if given_dst is None else dst.merged(given_dst)))
        telemetry = self.settings.telemetry
        for kind, n in Counter(kinds).items():
            telemetry.add(self.settings.id, f"resolved_{kind}", n)
        return out

    def _named(self, flow: Flow, now: float) -> Flow:
        assert self.source is not None
        when = flow.time_ns * 1e-9 if flow.time_ns > 0 else now
        src = self.source.lookup(flow.src_ip, when)
        dst = self.source.lookup(flow.dst_ip, when)
        self.settings.telemetry.add(self.settings.id, f"resolved_{src.kind}")
        self.settings.telemetry.add(self.settings.id, f"resolved_{dst.kind}")
        return flow.with_endpoints(src.shared if flow.source is None else src.merged(flow.source),
                                   dst.shared if flow.destination is None else dst.merged(flow.destination))


_ends = flow_fields("time_ns", "src_ip", "dst_ip", "source", "destination")
