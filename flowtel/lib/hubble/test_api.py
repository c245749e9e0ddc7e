"""Hubble's protos: the checked-in modules are current, and the wire facts clients rely on
(proto packages, gRPC method paths, Any type URLs, field numbers) are Cilium's."""
from __future__ import annotations

import json

import pytest
from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import FieldDescriptor

from flowtel.lib.hubble.api import generate
from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.api.observer import observer_pb2, observer_pb2_grpc
from flowtel.lib.hubble.api.peer import peer_pb2, peer_pb2_grpc


def test_generated_modules_are_current() -> None:
    assert generate.main(["--check"]) == 0, "run: python -m flowtel.lib.hubble.api.generate"


def test_method_paths_are_hubbles() -> None:
    observer = observer_pb2.DESCRIPTOR.services_by_name["Observer"]
    assert [m.full_name for m in observer.methods] == [
        "observer.Observer.GetFlows", "observer.Observer.GetAgentEvents",
        "observer.Observer.GetDebugEvents", "observer.Observer.GetNodes",
        "observer.Observer.GetNamespaces", "observer.Observer.ServerStatus",
    ]
    assert peer_pb2.DESCRIPTOR.services_by_name["Peer"].methods[0].full_name == "peer.Peer.Notify"
    assert hasattr(observer_pb2_grpc, "ObserverStub") and hasattr(peer_pb2_grpc, "PeerStub")


# (message, field, number, type, repeated) from Cilium's api/v1 protos: a table of the
# facts a Hubble client decodes by. A wrong number here is a silently garbled flow there.
_T = FieldDescriptor
WIRE = [
    (flow_pb2.Flow, "time", 1, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "uuid", 34, _T.TYPE_STRING, False),
    (flow_pb2.Flow, "emitter", 41, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "verdict", 2, _T.TYPE_ENUM, False),
    (flow_pb2.Flow, "drop_reason", 3, _T.TYPE_UINT32, False),
    (flow_pb2.Flow, "ethernet", 4, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "IP", 5, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "l4", 6, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "source", 8, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "destination", 9, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "Type", 10, _T.TYPE_ENUM, False),
    (flow_pb2.Flow, "node_name", 11, _T.TYPE_STRING, False),
    (flow_pb2.Flow, "node_labels", 37, _T.TYPE_STRING, True),
    (flow_pb2.Flow, "source_names", 13, _T.TYPE_STRING, True),
    (flow_pb2.Flow, "destination_names", 14, _T.TYPE_STRING, True),
    (flow_pb2.Flow, "l7", 15, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "reply", 16, _T.TYPE_BOOL, False),
    (flow_pb2.Flow, "event_type", 19, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "source_service", 20, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "destination_service", 21, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "traffic_direction", 22, _T.TYPE_ENUM, False),
    (flow_pb2.Flow, "policy_match_type", 23, _T.TYPE_UINT32, False),
    (flow_pb2.Flow, "trace_observation_point", 24, _T.TYPE_ENUM, False),
    (flow_pb2.Flow, "trace_reason", 36, _T.TYPE_ENUM, False),
    (flow_pb2.Flow, "drop_reason_desc", 25, _T.TYPE_ENUM, False),
    (flow_pb2.Flow, "is_reply", 26, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "interface", 28, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "socket_cookie", 32, _T.TYPE_UINT64, False),
    (flow_pb2.Flow, "cgroup_id", 33, _T.TYPE_UINT64, False),
    (flow_pb2.Flow, "Summary", 100000, _T.TYPE_STRING, False),
    (flow_pb2.Flow, "extensions", 150000, _T.TYPE_MESSAGE, False),
    (flow_pb2.Flow, "egress_denied_by", 21004, _T.TYPE_MESSAGE, True),
    (flow_pb2.Layer4, "ICMPv6", 4, _T.TYPE_MESSAGE, False),
    (flow_pb2.Layer7, "dns", 100, _T.TYPE_MESSAGE, False),
    (flow_pb2.Endpoint, "cluster_name", 7, _T.TYPE_STRING, False),
    (flow_pb2.IP, "source_xlated", 5, _T.TYPE_STRING, False),
    (flow_pb2.DNS, "rrtypes", 8, _T.TYPE_STRING, True),
    (flow_pb2.LostEvent, "cpu", 3, _T.TYPE_MESSAGE, False),
    (flow_pb2.FlowFilter, "uuid", 29, _T.TYPE_STRING, True),
    (flow_pb2.FlowFilter, "source_ip_xlated", 34, _T.TYPE_STRING, True),
    (flow_pb2.FlowFilter, "source_workload", 26, _T.TYPE_MESSAGE, True),
    (flow_pb2.FlowFilter, "source_cluster_name", 37, _T.TYPE_STRING, True),
    (flow_pb2.FlowFilter, "drop_reason_desc", 33, _T.TYPE_ENUM, True),
    (flow_pb2.FlowFilter, "interface", 35, _T.TYPE_MESSAGE, True),
    (flow_pb2.FlowFilter, "reply", 15, _T.TYPE_BOOL, True),
    (flow_pb2.FlowFilter, "source_identity", 19, _T.TYPE_UINT32, True),
    (flow_pb2.FlowFilter, "http_header", 32, _T.TYPE_MESSAGE, True),
    (flow_pb2.FlowFilter, "tcp_flags", 23, _T.TYPE_MESSAGE, True),
    (flow_pb2.FlowFilter, "node_labels", 36, _T.TYPE_STRING, True),
    (flow_pb2.FlowFilter, "ip_version", 25, _T.TYPE_ENUM, True),
    (flow_pb2.FlowFilter, "trace_id", 28, _T.TYPE_STRING, True),
    (flow_pb2.FlowFilter, "ip_trace_id", 39, _T.TYPE_UINT64, True),
    (flow_pb2.FlowFilter, "encrypted", 40, _T.TYPE_BOOL, True),
    (flow_pb2.FlowFilter, "experimental", 999, _T.TYPE_MESSAGE, False),
    (observer_pb2.GetFlowsRequest, "number", 1, _T.TYPE_UINT64, False),
    (observer_pb2.GetFlowsRequest, "first", 9, _T.TYPE_BOOL, False),
    (observer_pb2.GetFlowsRequest, "follow", 3, _T.TYPE_BOOL, False),
    (observer_pb2.GetFlowsRequest, "blacklist", 5, _T.TYPE_MESSAGE, True),
    (observer_pb2.GetFlowsRequest, "whitelist", 6, _T.TYPE_MESSAGE, True),
    (observer_pb2.GetFlowsRequest, "since", 7, _T.TYPE_MESSAGE, False),
    (observer_pb2.GetFlowsRequest, "until", 8, _T.TYPE_MESSAGE, False),
    (observer_pb2.GetFlowsRequest, "field_mask", 10, _T.TYPE_MESSAGE, False),
    (observer_pb2.GetFlowsRequest, "extensions", 150000, _T.TYPE_MESSAGE, False),
    (observer_pb2.GetFlowsResponse, "flow", 1, _T.TYPE_MESSAGE, False),
    (observer_pb2.GetFlowsResponse, "node_status", 2, _T.TYPE_MESSAGE, False),
    (observer_pb2.GetFlowsResponse, "lost_events", 3, _T.TYPE_MESSAGE, False),
    (observer_pb2.GetFlowsResponse, "node_name", 1000, _T.TYPE_STRING, False),
    (observer_pb2.GetFlowsResponse, "time", 1001, _T.TYPE_MESSAGE, False),
    (observer_pb2.ServerStatusResponse, "flows_rate", 9, _T.TYPE_DOUBLE, False),
    (observer_pb2.Node, "tls", 5, _T.TYPE_MESSAGE, False),
    (peer_pb2.ChangeNotification, "tls", 4, _T.TYPE_MESSAGE, False),
    (peer_pb2.ChangeNotification, "type", 3, _T.TYPE_ENUM, False),
]


@pytest.mark.parametrize("message,name,number,type_,repeated", WIRE,
                         ids=[f"{m.DESCRIPTOR.name}.{n}" for m, n, *_ in WIRE])
def test_wire_format_is_ciliums(message: type, name: str, number: int, type_: int, repeated: bool) -> None:
    fd = message.DESCRIPTOR.fields_by_name[name]  # type: ignore[attr-defined]
    assert (fd.number, fd.type, fd.is_repeated) == (number, type_, repeated)


def test_flow_filter_and_requests_are_complete() -> None:
    # Cilium's FlowFilter has 40 fields and the Experimental sub-message; a client's field
    # we did not declare would be dropped while decoding, and its filter silently widened.
    assert len(flow_pb2.FlowFilter.DESCRIPTOR.fields) == 41
    assert len(observer_pb2.GetFlowsRequest.DESCRIPTOR.fields) == 10
    assert len(observer_pb2.GetAgentEventsRequest.DESCRIPTOR.fields) == 5


def test_enums_carry_ciliums_numbers() -> None:
    assert flow_pb2.DropReason.Value("POLICY_DENIED") == 133
    assert flow_pb2.DropReason.Value("DROP_PUNT_PROXY") == 205
    assert len(flow_pb2.DropReason.DESCRIPTOR.values) == 76
    assert flow_pb2.TraceObservationPoint.Value("TO_ENDPOINT") == 101
    assert flow_pb2.LostEventSource.Value("HUBBLE_RING_BUFFER") == 3


def test_extensions_any_reads_as_hubble_cli_reads_it() -> None:
    # Retina's form: a Struct in the Any, which protojson resolves without registration.
    ext = struct_pb2.Struct()
    ext.update({"packets": 3, "bytes": 180})
    resp = observer_pb2.GetFlowsResponse(node_name="n1")
    resp.flow.extensions.Pack(ext)
    text = json_format.MessageToJson(resp)
    doc = json.loads(text)
    assert doc["flow"]["extensions"]["@type"] == "type.googleapis.com/google.protobuf.Struct"
    back = json_format.Parse(text, observer_pb2.GetFlowsResponse())
    # (a Struct is a map: compared by content, its serialized order is free)
    assert json_format.MessageToDict(back) == json_format.MessageToDict(resp)
