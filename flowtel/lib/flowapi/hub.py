"""The flow hub behind the HTTP flow API: a thin view of Hubble's flow store.

The ring, the follow streams with their bounded per-client queues and counted losses,
and the selection (``last``, ``since``, ``until``, filters) are the ``hubble`` extension's
own: :class:`flowtel.lib.hubble.store.FlowStore` and :mod:`flowtel.lib.hubble.filters`.
Records become Cilium ``GetFlowsResponse`` messages (``convert.to_response``) when first
read, so the HTTP view serves what ``GetFlows`` serves. The hub adds the service graph
the ``/map`` endpoint draws.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

from flowtel.component import Telemetry
from flowtel.lib.hubble import convert
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.lib.hubble.store import FlowStore, Follower, Query, TooManyFollowers
from flowtel.records import Record
from flowtel.servicegraph import ServiceGraph, graph_to_dict

LOST_SOURCE_SLOW_CLIENT = "HUBBLE_RING_BUFFER"

__all__ = ["FlowHub", "Follower", "LOST_SOURCE_SLOW_CLIENT", "Query", "TooManyFollowers"]


class FlowHub:
    def __init__(
        self,
        *,
        owner: str,
        node_name: str,
        telemetry: Telemetry,
        buffer_size: int,
        client_buffer_size: int,
        max_followers: int,
        graph: ServiceGraph,
    ) -> None:
        self.owner = owner
        self.node_name = node_name
        self.graph = graph
        self.store = FlowStore(node_name=node_name, capacity=buffer_size, follower_capacity=client_buffer_size,
                               max_followers=max_followers, convert=convert.to_response,
                               time_of=operator.attrgetter("time_ns"))
        self._telemetry = telemetry
        telemetry.register_gauge(owner, "ring_size", lambda: self.store.stats()["num_flows"])
        telemetry.register_gauge(owner, "followers", lambda: self.store.stats()["followers"])

    def add(self, batch: Sequence[Record]) -> None:
        if not batch:
            return
        lost = self.store.add(batch)  # encoded when first read, as the hubble extension's
        self._telemetry.add(self.owner, "records_in", len(batch))
        self._telemetry.add(self.owner, "follower_records_lost", lost)
        self.graph.add(batch)

    def query(self, q: Query) -> list[observer_pb2.GetFlowsResponse]:
        return self.store.query(q)

    def follow(self, q: Query) -> tuple[list[observer_pb2.GetFlowsResponse], Follower]:
        return self.store.follow(q)

    def unfollow(self, follower: Follower) -> None:
        self.store.unfollow(follower)

    def lost_record(self, count: int) -> observer_pb2.GetFlowsResponse:
        return self.store.lost_response(count)

    def service_map(self, namespaces: Sequence[str] = ()) -> dict[str, Any]:
        self.graph.expire()
        return graph_to_dict(self.graph.snapshot(), namespaces=namespaces, overflow=self.graph.overflow)

    def status(self) -> dict[str, Any]:
        s = self.store.stats()
        return {
            "status": "ok",
            "node_name": self.node_name,
            "ring_size": int(s["num_flows"]),
            "ring_capacity": int(s["max_flows"]),
            "records_seen": int(s["seen_flows"]),
            "followers": int(s["followers"]),
        }

    def close(self) -> None:
        self.store.close()
