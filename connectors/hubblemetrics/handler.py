"""What every family handler is: the metrics it declares, and one call per flow.

A handler parses its options once (in its ``create``) and, per flow, calls ``emit`` with the
metric name, the full label values (context labels first, then its own, in the declared order)
and the increment. The series store behind ``emit`` keeps the counters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from flowtel.records import Flow, LostEvents
from flowtel.recordtables import PROTOCOL_NAMES, counts_as_hubble_flow, flow_events

Emit = Callable[[str, tuple[str, ...], float], None]

__all__ = ["Emit", "Handler", "MetricInfo", "flow_events", "flow_protocol", "is_packet_flow"]


@dataclass(frozen=True, slots=True)
class MetricInfo:
    name: str
    description: str
    label_names: tuple[str, ...]


class Handler:
    """One metric family (a Hubble ``metrics:`` entry). Subclasses override what they count."""

    metrics: tuple[MetricInfo, ...] = ()
    # Said once when the connector is built (e.g. a Hubble family flowtel has no data for).
    notice: str | None = None

    def process(self, flow: Flow, emit: Emit) -> None:
        pass

    def process_lost(self, event: LostEvents, emit: Emit) -> None:
        pass


def flow_protocol(flow: Flow) -> str:
    """Hubble's ``FlowProtocol``: the L7 protocol for L7 flows, else the L4 protocol name."""
    if flow.kind.is_dns:
        return "DNS" if flow.l7 is not None else "Unknown L7"
    return PROTOCOL_NAMES.get(flow.protocol, "Unknown L4")


def is_packet_flow(flow: Flow) -> bool:
    """Whether Hubble would have counted the record as flow events (not a TCP socket event,
    not the record of an unanswered DNS query): :func:`flowtel.recordtables.counts_as_hubble_flow`."""
    return counts_as_hubble_flow(flow)
