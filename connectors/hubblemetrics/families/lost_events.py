"""``lost-events``: hubble_lost_events_total {source}, by where the records were lost."""
from __future__ import annotations

from connectors.hubblemetrics.handler import Emit, Handler, MetricInfo
from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import LostEvents

NAME = "hubble_lost_events_total"


class LostEventsHandler(Handler):
    # Lost events have no endpoints: Hubble gives this family no context labels either.
    metrics = (MetricInfo(NAME, "Number of lost events", ("source",)),)

    def process_lost(self, event: LostEvents, emit: Emit) -> None:
        emit(NAME, (event.source,), event.count)


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return LostEventsHandler()
