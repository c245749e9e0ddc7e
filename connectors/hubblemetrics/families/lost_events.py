"""``lost-events``: hubble_lost_events_total {source}, by where the records were lost.

``source`` is Hubble's own value: the lower-case name of Cilium's ``LostEventSource``
(``perf_event_ring_buffer``, ``observer_events_queue``, ``hubble_ring_buffer``), what Hubble's
dashboards and alerts select on. flowtel knows more precisely which map, ring or queue lost
them (``FLOW_MAP_FULL``, ``DNS_RING_BUFFER_FULL``, ``QUEUE_FULL:<component>`` …): that is
``flowtel_lost_events_total {source}``, emitted beside it.
"""
from __future__ import annotations

from connectors.hubblemetrics.handler import Emit, Handler, MetricInfo
from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import LostEvents
from flowtel.recordtables import cilium_lost_source

NAME = "hubble_lost_events_total"
PRECISE = "flowtel_lost_events_total"


class LostEventsHandler(Handler):
    # Lost events have no endpoints: Hubble gives this family no context labels either.
    metrics = (
        MetricInfo(NAME, "Number of lost events", ("source",)),
        MetricInfo(PRECISE, "Number of lost events, by the map, ring or queue that lost them", ("source",)),
    )

    def process_lost(self, event: LostEvents, emit: Emit) -> None:
        emit(NAME, (cilium_lost_source(event.source).lower(),), event.count)
        emit(PRECISE, (event.source,), event.count)


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return LostEventsHandler()
