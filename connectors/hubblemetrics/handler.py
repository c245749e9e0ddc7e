"""What every family handler is: the metrics it declares, and one call per flow.

A handler parses its options once (in its ``create``) and calls ``emit`` with the metric
name, the full label values (context labels first, then its own, in the declared order) and
the increment. The series store behind ``emit`` keeps the counters.

The connector hands each handler a whole :class:`Batch` (:meth:`Handler.process_batch`): the
records of one drain that Hubble counts as flow events, their event counts and their
context label values, each computed once per batch for every handler that wants it. The
families that see most records group the batch by what their labels depend on and emit
once per distinct series with the counts summed, so a batch costs a dict update per record
and a series update per distinct label set. :meth:`Handler.process` (one flow) stays the
definition of what a family counts; tests hold the two equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import compress
from typing import Callable, Iterable, Sequence

from connectors.hubblemetrics.options import ContextOptions
from flowtel.records import EventKind, Flow, LostEvents
from flowtel.recordtables import PROTOCOL_NAMES, counts_as_hubble_flow, flow_events

Emit = Callable[[str, tuple[str, ...], float], None]

__all__ = ["Batch", "Emit", "Handler", "MetricInfo", "flow_events", "flow_protocol", "is_packet_flow"]


@dataclass(frozen=True, slots=True)
class MetricInfo:
    name: str
    description: str
    label_names: tuple[str, ...]


_PACKET, _DROP = EventKind.PACKET, EventKind.DROP


class Batch:
    """The flows of one batch that Hubble counts as flow events (:func:`is_packet_flow`), with
    each one's event count (:func:`flow_events`) and, per context option set, its context
    label values: every handler reads them from here rather than working them out again."""

    __slots__ = ("flows", "events", "_contexts")

    def __init__(self, records: Sequence[Flow | LostEvents | object]) -> None:
        flows: list[Flow] = []
        events: list[int] = []
        for r in records:
            if not isinstance(r, Flow):
                continue
            kind = r.kind
            if kind is _PACKET or kind is _DROP:  # the common case inline: flow_events' first rule
                flows.append(r)
                events.append(r.packets if r.packets > 0 else 1)
            elif counts_as_hubble_flow(r):
                flows.append(r)
                events.append(flow_events(r))
        self.flows = flows
        self.events = events
        self._contexts: dict[ContextOptions, list[tuple[str, ...]]] = {}

    def select(self, selectors: Iterable[object]) -> list[tuple[Flow, int]]:
        """``(flow, events)`` of the flows whose selector is true, in order. Families that count
        few of a batch's flows (drops, ICMP, DNS) pass selectors made by C calls over the
        flows (``map`` of a field reader and a comparison), so the flows they skip cost no
        Python bytecode each."""
        return list(compress(zip(self.flows, self.events), selectors))

    def contexts(self, ctx: ContextOptions) -> list[tuple[str, ...]]:
        """``ctx.values`` of every flow, in order; computed once per equal option set (the
        shipped config gives five families the same context)."""
        values = self._contexts.get(ctx)
        if values is None:
            values = self._contexts[ctx] = ctx.values_of(self.flows)
        return values


class Handler:
    """One metric family (a Hubble ``metrics:`` entry). Subclasses override what they count."""

    metrics: tuple[MetricInfo, ...] = ()
    # Said once when the connector is built (e.g. a Hubble family flowtel has no data for).
    notice: str | None = None

    def process(self, flow: Flow, emit: Emit) -> None:
        pass

    def process_batch(self, batch: Batch, emit: Emit) -> None:
        """Every counted flow of ``batch``; families that see many override it to group."""
        process = self.process
        for flow in batch.flows:
            process(flow, emit)

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
