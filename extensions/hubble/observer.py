"""Hubble's ``observer.Observer`` service over the flow store.

Semantics are Hubble's (cilium ``pkg/hubble/observer``): ``GetFlows`` sends the last
``number`` matching flows (the first, with ``first``) between ``since`` and ``until`` and,
with ``follow``, new ones as they arrive; ``number`` 0 without ``follow`` and a ``number``
beyond the ring both mean the whole ring. Requests are validated completely before any
flow is sent, and what Hubble refuses gets ``INVALID_ARGUMENT`` with the reason. The agent
and debug event RPCs answer as Hubble does when its agent has none: nothing, and with
``follow`` an open stream until the client leaves. ``GetNodes`` and ``ServerStatus``
answer as Hubble Relay does for a cluster of this one node.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterator

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2

from flowtel.component import Telemetry
from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.api.observer import observer_pb2, observer_pb2_grpc
from flowtel.lib.hubble.api.relay import relay_pb2
from flowtel.lib.hubble.filters import FilterError, compile_filters
from flowtel.lib.hubble.store import FlowStore, Query, TooManyFollowers

log = logging.getLogger("flowtel.extensions.hubble")

POLL_SECONDS = 1.0  # how often an idle stream checks for a gone client or shutdown
# Timestamp's valid range (0001-01-01 to 9999-12-31), as protobuf and Go's time define it.
_TS_MIN, _TS_MAX = -62135596800, 253402300799


class InvalidRequest(Exception):
    """A request Hubble would refuse: INVALID_ARGUMENT with this message."""


def _timestamp_ns(ts: timestamp_pb2.Timestamp, name: str) -> int:
    if not (_TS_MIN <= ts.seconds <= _TS_MAX) or not (0 <= ts.nanos < 1_000_000_000):
        raise InvalidRequest(f"invalid {name} timestamp: seconds {ts.seconds}, nanos {ts.nanos} "
                             "is outside 0001-01-01..9999-12-31")
    return ts.seconds * 1_000_000_000 + ts.nanos


def parse_request(req: observer_pb2.GetFlowsRequest, capacity: int) -> tuple[Query, field_mask_pb2.FieldMask | None]:
    """The store query and field mask of a request; InvalidRequest says what Hubble refuses."""
    if req.first and req.follow:
        raise InvalidRequest("first cannot be specified with follow")
    since = _timestamp_ns(req.since, "since") if req.HasField("since") else None
    until = _timestamp_ns(req.until, "until") if req.HasField("until") else None
    if since is not None and until is not None and since > until:
        raise InvalidRequest("since must not be after until")
    if req.HasField("extensions"):
        raise InvalidRequest(f"request extensions ({req.extensions.type_url or 'empty Any'}) are not supported")
    mask = None
    if req.HasField("field_mask") and req.field_mask.paths:
        if not req.field_mask.IsValidForDescriptor(flow_pb2.Flow.DESCRIPTOR):
            raise InvalidRequest(f"invalid field_mask {list(req.field_mask.paths)}: every path must name a "
                                 "field of flow.Flow (e.g. time, source.namespace, l4)")
        mask = field_mask_pb2.FieldMask()
        mask.CopyFrom(req.field_mask)
    try:
        filters = compile_filters(req.whitelist, req.blacklist)
    except FilterError as exc:
        raise InvalidRequest(str(exc)) from None
    number: int | None
    if req.number == 0:
        # follow alone: only new flows; with since (or without follow): all that match
        number = 0 if req.follow and since is None else None
    else:
        number = min(req.number, capacity)  # more than the ring holds is the whole ring
    return Query(filters, number, req.first, since, until, req.follow), mask


def _masked(resp: observer_pb2.GetFlowsResponse, mask: field_mask_pb2.FieldMask | None) -> observer_pb2.GetFlowsResponse:
    if mask is None or resp.WhichOneof("response_types") != "flow":
        return resp
    out = observer_pb2.GetFlowsResponse(node_name=resp.node_name)
    out.time.CopyFrom(resp.time)
    mask.MergeMessage(resp.flow, out.flow)
    return out


class NodeInfo:
    """What this node says about itself in GetNodes, ServerStatus and Peer/Notify."""

    def __init__(self, name: str, version: str, tls_server_name: str | None) -> None:
        self.name = name
        self.version = version
        self.tls_server_name = tls_server_name
        self.address = ""  # set once the server listens


class ObserverService(observer_pb2_grpc.ObserverServicer):
    def __init__(self, store: FlowStore, node: NodeInfo, telemetry: Telemetry, owner: str,
                 stopping: threading.Event) -> None:
        self.store = store
        self.node = node
        self._telemetry = telemetry
        self._owner = owner
        self._stopping = stopping

    def _count(self, name: str, n: int = 1) -> None:
        self._telemetry.add(self._owner, name, n)

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self._count("requests_refused")
        context.abort(code, message)

    def _alive(self, context: grpc.ServicerContext) -> bool:
        return context.is_active() and not self._stopping.is_set()

    # --- GetFlows ------------------------------------------------------------------------

    def GetFlows(self, request: observer_pb2.GetFlowsRequest,
                 context: grpc.ServicerContext) -> Iterator[observer_pb2.GetFlowsResponse]:
        try:
            query, mask = parse_request(request, self.store.capacity)
        except InvalidRequest as exc:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        self._count("get_flows")
        if not query.follow:
            for resp in self.store.query(query):
                yield _masked(resp, mask)
            return
        try:
            history, follower = self.store.follow(query)
        except TooManyFollowers as exc:
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{exc}; retry later")
            return
        try:
            for resp in history:
                yield _masked(resp, mask)
            while self._alive(context):
                batch, lost, closed = follower.take(POLL_SECONDS)
                for resp in batch:
                    yield _masked(resp, mask)
                if lost:  # after the flows it kept, where the gap is
                    self._count("follower_flows_lost", lost)
                    yield self.store.lost_response(lost)
                if closed:
                    return
                if query.until_ns is not None and time.time_ns() > query.until_ns:
                    return
        finally:
            self.store.unfollow(follower)

    # --- events this agent does not have -------------------------------------------------

    def _no_events(self, follow: bool, context: grpc.ServicerContext) -> None:
        # Hubble without agent/debug events: a plain request ends at once; a follow stream
        # stays open (sending nothing) until the client or the server goes away.
        while follow and self._alive(context):
            self._stopping.wait(POLL_SECONDS)

    def GetAgentEvents(self, request: observer_pb2.GetAgentEventsRequest,
                       context: grpc.ServicerContext) -> Iterator[observer_pb2.GetAgentEventsResponse]:
        self._no_events(request.follow, context)
        return iter(())

    def GetDebugEvents(self, request: observer_pb2.GetDebugEventsRequest,
                       context: grpc.ServicerContext) -> Iterator[observer_pb2.GetDebugEventsResponse]:
        self._no_events(request.follow, context)
        return iter(())

    # --- status --------------------------------------------------------------------------

    def ServerStatus(self, request: observer_pb2.ServerStatusRequest,
                     context: grpc.ServicerContext) -> observer_pb2.ServerStatusResponse:
        s = self.store.stats()
        resp = observer_pb2.ServerStatusResponse(
            num_flows=int(s["num_flows"]), max_flows=int(s["max_flows"]), seen_flows=int(s["seen_flows"]),
            uptime_ns=int(s["uptime_ns"]), version=self.node.version, flows_rate=float(s["flows_rate"]),
        )
        resp.num_connected_nodes.value = 1
        resp.num_unavailable_nodes.value = 0
        return resp

    def GetNodes(self, request: observer_pb2.GetNodesRequest,
                 context: grpc.ServicerContext) -> observer_pb2.GetNodesResponse:
        s = self.store.stats()
        node = observer_pb2.Node(
            name=self.node.name, version=self.node.version, address=self.node.address,
            state=relay_pb2.NODE_CONNECTED, uptime_ns=int(s["uptime_ns"]),
            num_flows=int(s["num_flows"]), max_flows=int(s["max_flows"]), seen_flows=int(s["seen_flows"]),
        )
        node.tls.enabled = self.node.tls_server_name is not None
        node.tls.server_name = self.node.tls_server_name or ""
        return observer_pb2.GetNodesResponse(nodes=[node])

    def GetNamespaces(self, request: observer_pb2.GetNamespacesRequest,
                      context: grpc.ServicerContext) -> observer_pb2.GetNamespacesResponse:
        return observer_pb2.GetNamespacesResponse(namespaces=[
            observer_pb2.Namespace(cluster=cluster, namespace=ns) for cluster, ns in self.store.namespaces()
        ])

