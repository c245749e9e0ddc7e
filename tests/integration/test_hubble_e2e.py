"""Hubble's gRPC API from `flowtel run` on the real kernel, read with a client generated from
the project's .proto files, against known traffic: TCP, UDP, ICMP, DNS (an answer, an
NXDOMAIN and an unanswered query), a closed-port drop, an nftables drop, a TCP reset and
retransmits.

The reference for every filter is the agent's own flow log (the file exporter, same
pipeline, independent output): what GetFlows returns for a filter must be exactly the log's
flows that a plain reading of the filter selects. Then follow, since, error statuses (the
agent stays up), ServerStatus/GetNodes/GetNamespaces/agent events, and a test that plays
Hubble Relay across two agents (Peer/Notify from the Kubernetes API stand-in).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
import yaml
from google.protobuf import json_format
from google.protobuf import struct_pb2  # noqa: F401  # registers google.protobuf.Struct, the type extensions wrap

from flowtel.lib.hubble.api.flow import flow_pb2
from flowtel.lib.hubble.api.observer import observer_pb2, observer_pb2_grpc
from flowtel.lib.hubble.api.peer import peer_pb2, peer_pb2_grpc
from flowtel.lib.hubble.api.relay import relay_pb2
from testbed import Pod, Testbed, send_ping, send_tcp, send_udp
from tests.kubeapi import FakeApiServer
from tests.kubeapi import objects as o

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
ALL = 2**64 - 1
DNS_NAME, NX_NAME, LOST_NAME = "web.hubble-e2e.test", "nope.hubble-e2e.test", "lost.hubble-e2e.test"

_CONNECT_REFUSED = r"""
import json, socket, sys
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ports = []
for _ in range(count):
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    ports.append(s.getsockname()[1])
    try:
        s.connect((dst, port))
        raise SystemExit("connected to a closed port?")
    except ConnectionRefusedError:
        pass
    s.close()
print(json.dumps(ports))
"""

_UDP_SENDTO = r"""
import socket, sys
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 0))
for _ in range(count):
    s.sendto(b"x" * 64, (dst, port))
print(s.getsockname()[1])
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nft_drop(pod: Pod, hook: str, match: str) -> None:
    pod.exec(["nft", "-f", "-"], input=f"""table inet hubble_e2e {{
    chain {hook} {{
        type filter hook {hook} priority 0;
        {match} drop
    }}
}}
""")


class Agent:
    """`flowtel run` as a user runs it, with the hubble extension and a file exporter."""

    def __init__(self, tmp: Path, glob: str, endpoint: str, *, node: str = "test-node",
                 kernel_events: bool = True, peers: dict[str, Any] | None = None) -> None:
        self.endpoint = endpoint
        self.flow_log = tmp / f"{node}-flows.log"
        self.stderr = tmp / f"{node}.stderr"
        hubble: dict[str, Any] = {"endpoint": endpoint, "buffer_size": 100_000}
        if peers is not None:
            hubble["peers"] = peers
        ebpf: dict[str, Any] = {"interfaces": [glob], "collection_interval": "300ms", "dns": {"timeout": "1s"}}
        if not kernel_events:
            ebpf["kernel_events"] = {"drops": {"enabled": False}, "tcp": {"enabled": False}}
        else:
            ebpf["kernel_events"] = {"poll_interval": "100ms"}
        config = tmp / f"{node}.yaml"
        config.write_text(yaml.safe_dump({
            "receivers": {"ebpf": ebpf},
            "exporters": {"file": {"path": str(self.flow_log), "max_size_mb": 200}},
            "extensions": {"hubble": hubble},
            "service": {"extensions": ["hubble"],
                        "pipelines": {"logs": {"receivers": ["ebpf"], "exporters": ["file"]}}},
        }))
        self.proc = subprocess.Popen([sys.executable, "-m", "flowtel.cli", "run", "--config", str(config)],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.stderr.open("w"),
                                     env={**os.environ, "NODE_NAME": node, "POD_NAMESPACE": "flowtel"})
        self.channel = grpc.insecure_channel(endpoint)
        self.observer = observer_pb2_grpc.ObserverStub(self.channel)
        self.peer = peer_pb2_grpc.PeerStub(self.channel)

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc.poll() is None, f"agent exited: {self.stderr.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {self.stderr.read_text()[-3000:]}"
            time.sleep(0.1)

    def serving(self) -> bool:
        try:
            self.observer.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False

    def flows(self, **req: Any) -> list[flow_pb2.Flow]:
        request = json_format.ParseDict(req, observer_pb2.GetFlowsRequest())
        if not request.number and not request.follow:
            request.number = ALL
        return [r.flow for r in self.observer.GetFlows(request, timeout=30)
                if r.WhichOneof("response_types") == "flow"]

    def log(self) -> list[flow_pb2.Flow]:
        """The file exporter's flows, each line parsed strictly as Cilium's GetFlowsResponse."""
        out = []
        for line in self.flow_log.read_text().splitlines():
            resp = json_format.Parse(line, observer_pb2.GetFlowsResponse())
            if resp.WhichOneof("response_types") == "flow":
                out.append(resp.flow)
        return out

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(30) == 0, self.stderr.read_text()[-3000:]
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()


def ext(f: flow_pb2.Flow) -> dict[str, Any]:
    return json_format.MessageToDict(f.extensions).get("value", {}) if f.HasField("extensions") else {}


def ports(f: flow_pb2.Flow) -> tuple[int, int] | None:
    which = f.l4.WhichOneof("protocol")
    if which in ("TCP", "UDP"):
        p = getattr(f.l4, which)
        return p.source_port, p.destination_port
    return None


class Traffic:
    def __init__(self, bed: Testbed) -> None:
        self.a, self.b, self.dns = bed.add_pod("hub-a"), bed.add_pod("hub-b"), bed.add_pod("hub-d")
        self.ips = {self.a.ipv4, self.b.ipv4, self.dns.ipv4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, Traffic, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("hubble")
    Testbed.cleanup_stale()
    with Testbed() as bed:
        t = Traffic(bed)
        bed.start_tcp_sink(t.b, 8080)
        bed.start_udp_sink(t.b, 9000)
        bed.start_udp_sink(t.a, 9000)  # for the follow test's datagrams the other way
        rtx_sink = bed.start_tcp_sink(t.b, 47020)
        bed.start_dnsmasq(t.dns, hosts={DNS_NAME: [t.b.ipv4]})
        nft_drop(t.b, "input", "udp dport 47001")  # the nftables drop
        nft_drop(t.b, "input", "udp dport 53")  # a DNS server that never answers
        # Retransmits: one in five segments to 47020 lost (SYNs spared), small GSO packets.
        t.a.exec(["ip", "link", "set", "dev", "eth0", "gso_max_segs", "4"])
        nft_drop(t.b, "input", "tcp dport 47020 tcp flags & syn == 0 numgen random mod 5 == 0")
        agent = Agent(tmp, bed.interface_glob, f"127.0.0.1:{free_port()}")
        try:
            agent.wait(agent.serving, "the Hubble API")
            agent.wait(lambda: all(" bpf " in subprocess.run(["tc", "filter", "show", "dev", p.host_ifname, "ingress"],
                                                            capture_output=True, text=True).stdout
                                   for p in (t.a, t.b, t.dns)), "tc attach")
            agent.wait(lambda: "kernel events attached" in agent.stderr.read_text(), "kernel events")
            facts: dict[str, Any] = {}
            facts["tcp"] = send_tcp(t.a, t.b.ipv4, 8080, 20_000)
            facts["udp"] = send_udp(t.a, t.b.ipv4, 9000, 5, 200, interval=0.002)
            assert send_ping(t.a, t.b.ipv4, 3, interval=0.02).received == 3
            dig = ["dig", "+time=1", "+tries=1", f"@{t.dns.ipv4}"]
            assert "status: NOERROR" in t.a.exec([*dig, DNS_NAME]).stdout
            assert "status: NXDOMAIN" in t.a.exec([*dig, NX_NAME]).stdout
            t.a.exec(["dig", "+time=1", "+tries=1", f"@{t.b.ipv4}", LOST_NAME], check=False)  # unanswered
            facts["closed_port"] = int(t.a.exec([sys.executable, "-c", _UDP_SENDTO, t.b.ipv4, "47000", "2"]).stdout)
            facts["nft_port"] = int(t.a.exec([sys.executable, "-c", _UDP_SENDTO, t.b.ipv4, "47001", "3"]).stdout)
            facts["refused"] = json.loads(t.a.exec([sys.executable, "-c", _CONNECT_REFUSED, t.b.ipv4, "47003", "2"]).stdout)
            facts["rtx"] = send_tcp(t.a, t.b.ipv4, 47020, 200_000, timeout=60)
            assert [r["bytes"] for r in rtx_sink.wait_records(1)] == [200_000]

            def complete() -> bool:
                fl = [f for f in agent.flows() if {f.IP.source, f.IP.destination} & t.ips]
                kinds = {ext(f).get("tcp_event") for f in fl}
                # Drops are aggregated in the kernel: a record holds its packets in extensions.
                dropped = sum(int(ext(f).get("packets", 1)) for f in fl if f.verdict == flow_pb2.DROPPED)
                facts["progress"] = (any(ext(f).get("dns_unanswered") for f in fl), sorted(map(str, kinds)), dropped)
                return (any(ext(f).get("dns_unanswered") for f in fl) and "retransmit" in kinds
                        and "reset_sent" in kinds and dropped >= 2 + 3 + 2)

            try:
                agent.wait(complete, "every kind of flow in the ring", timeout=60)
            except AssertionError:
                raise AssertionError(f"missing kinds: {facts.get('progress')}") from None
            time.sleep(1.0)  # the last drains settle
            yield agent, t, facts
        finally:
            agent.stop()


def ours(agent: Agent, t: Traffic) -> list[flow_pb2.Flow]:
    return [f for f in agent.log() if {f.IP.source, f.IP.destination} & t.ips]


def test_every_kind_of_event_is_served_in_ciliums_shape(setup: tuple[Agent, Traffic, dict[str, Any]]) -> None:
    agent, t, facts = setup
    flows = [f for f in agent.flows() if {f.IP.source, f.IP.destination} & t.ips]
    # The gRPC ring and the flow log carry the same flows (same uuid, same message).
    by_uuid = {f.uuid: f for f in ours(agent, t)}
    missing = [f for f in flows if f.uuid not in by_uuid]
    assert flows and not missing, f"{len(missing)} flows of the ring are not in the log: {missing[:1]}"
    # Compared as JSON: the Struct in extensions is a map, whose serialized byte order is free.
    differ = [(f, by_uuid[f.uuid]) for f in flows
              if json_format.MessageToDict(by_uuid[f.uuid]) != json_format.MessageToDict(f)]
    assert not differ, f"{len(differ)} differ, e.g. ring {json_format.MessageToDict(differ[0][0])} " \
                       f"log {json_format.MessageToDict(differ[0][1])}"
    assert all(f.emitter.name == "flowtel" and f.node_name == "test-node" for f in flows)
    tcp = [f for f in flows if f.l4.WhichOneof("protocol") == "TCP" and ports(f) == (facts["tcp"].src_port, 8080)
           and f.Type == flow_pb2.L3_L4]
    assert tcp and all(f.verdict == flow_pb2.FORWARDED and f.event_type.type == 4 for f in tcp)
    assert sum(ext(f)["packets"] for f in tcp if f.traffic_direction == flow_pb2.EGRESS) > 0
    udp = [f for f in flows if ports(f) == (facts["udp"].src_port, 9000)]
    assert sum(ext(f)["packets"] for f in udp) == 2 * 5  # on a's and b's veth
    assert any(f.l4.WhichOneof("protocol") == "ICMPv4" for f in flows)
    dns = [f for f in flows if f.l7.WhichOneof("record") == "dns"]
    assert any(f.l7.dns.query == DNS_NAME + "." and f.l7.type == flow_pb2.RESPONSE and f.l7.dns.rcode == 0 for f in dns)
    assert any(f.l7.dns.query == NX_NAME + "." and f.l7.type == flow_pb2.RESPONSE and f.l7.dns.rcode == 3 for f in dns)
    lost = [f for f in dns if f.l7.dns.query == LOST_NAME + "." and ext(f).get("dns_unanswered")]
    # One unanswered query, reported where it was seen: on a's veth and on b's.
    assert lost and len(lost) == len({f.interface.index for f in lost}) <= 2
    assert all(f.verdict == flow_pb2.ERROR and f.l7.type != flow_pb2.REQUEST for f in lost)
    drops = [f for f in flows if f.verdict == flow_pb2.DROPPED]
    closed = [f for f in drops if ports(f) == (facts["closed_port"], 47000)]
    nft = [f for f in drops if ports(f) == (facts["nft_port"], 47001)]
    # Aggregated in the kernel per drop flow and interval: the packets add up, not the records.
    assert sum(int(ext(f)["packets"]) for f in closed) == 2 and sum(int(ext(f)["packets"]) for f in nft) == 3
    for f in closed + nft:
        # Hubble's printer shows event_type.sub_type: the Cilium reason's number, when one
        # means the same event (drop_reason_desc and its deprecated numeric twin agree).
        assert f.event_type.type == 1 and f.event_type.sub_type > 0
        if f.drop_reason_desc:
            assert f.event_type.sub_type == f.drop_reason_desc == f.drop_reason
    assert {ext(f)["drop_reason"] for f in closed} == {"NO_SOCKET"}
    assert {ext(f)["drop_reason"] for f in nft} == {"NETFILTER_DROP"}
    events = [f for f in flows if ext(f).get("tcp_event")]
    assert all(f.Type == flow_pb2.SOCK and f.verdict == flow_pb2.TRACED and "packets" not in ext(f) for f in events)
    assert {ext(f)["tcp_event"] for f in events} >= {"reset_sent", "reset_received", "retransmit"}


CASES: list[tuple[dict[str, Any], Callable[[flow_pb2.Flow, Traffic], bool]]] = [
    ({"whitelist": [{"verdict": ["DROPPED"]}]}, lambda f, t: f.verdict == flow_pb2.DROPPED),
    ({"whitelist": [{"event_type": [{"type": 1}]}]}, lambda f, t: f.event_type.type == 1),
    ({"whitelist": [{"event_type": [{"type": 7}]}]}, lambda f, t: f.event_type.type == 7),
    ({"whitelist": [{"protocol": ["icmp"]}]}, lambda f, t: f.l4.WhichOneof("protocol") in ("ICMPv4", "ICMPv6")),
    ({"whitelist": [{"protocol": ["udp"]}], "blacklist": [{"protocol": ["dns"]}]},
     lambda f, t: f.l4.WhichOneof("protocol") == "UDP" and f.l7.WhichOneof("record") != "dns"),
    ({"whitelist": [{"dns_query": ["^nope\\."]}]}, lambda f, t: f.l7.dns.query.startswith("nope.")),
    ({"whitelist": [{"destination_port": ["47000", "47001"]}]}, lambda f, t: (ports(f) or (0, 0))[1] in (47000, 47001)),
    ({"whitelist": [{"source_ip": ["{b}"]}, {"destination_ip": ["{dns}"]}]},
     lambda f, t: f.IP.source == t.b.ipv4 or f.IP.destination == t.dns.ipv4),
    ({"whitelist": [{"traffic_direction": ["INGRESS"], "destination_ip": ["{b}/32"]}]},
     lambda f, t: f.traffic_direction == flow_pb2.INGRESS and f.IP.destination == t.b.ipv4),
    ({"whitelist": [{"reply": [True]}]}, lambda f, t: f.HasField("is_reply") and f.is_reply.value),
    ({"whitelist": [{"tcp_flags": [{"RST": True}]}]}, lambda f, t: f.l4.WhichOneof("protocol") == "TCP" and f.l4.TCP.flags.RST),
    ({"whitelist": [{"node_name": ["test-*"], "verdict": ["ERROR"]}]}, lambda f, t: f.verdict == flow_pb2.ERROR),
    ({"whitelist": [{"drop_reason_desc": ["DROP_REASON_UNKNOWN"], "verdict": ["DROPPED"]}]},
     lambda f, t: f.verdict == flow_pb2.DROPPED and f.drop_reason_desc == 0),
]


@pytest.mark.parametrize("req, expect", CASES, ids=[json.dumps(c[0]) for c in CASES])
def test_each_filter_selects_exactly_what_it_says(setup: tuple[Agent, Traffic, dict[str, Any]],
                                                  req: dict[str, Any], expect: Callable[[flow_pb2.Flow, Traffic], bool]) -> None:
    agent, t, _ = setup
    req = json.loads(json.dumps(req).replace("{a}", t.a.ipv4).replace("{b}", t.b.ipv4).replace("{dns}", t.dns.ipv4))
    got = agent.flows(**req)
    got_ours = [f for f in got if {f.IP.source, f.IP.destination} & t.ips]
    log = ours(agent, t)
    expected = [f for f in log if expect(f, t)]
    assert expected and len(expected) < len(log), "the case must select some of our flows but not all"
    assert all(expect(f, t) for f in got), "a flow the filter should not have passed"
    # Everything the log says should match is in the answer (the ring holds all of it).
    got_ids = {f.uuid for f in got_ours}
    assert [f.uuid for f in expected if f.uuid not in got_ids] == []


def test_follow_receives_new_flows_and_since_cuts(setup: tuple[Agent, Traffic, dict[str, Any]]) -> None:
    agent, t, _ = setup
    before = time.time_ns()
    call = agent.observer.GetFlows(json_format.ParseDict(
        {"follow": True, "whitelist": [{"destination_port": ["9000"], "source_ip": [t.b.ipv4]}]},
        observer_pb2.GetFlowsRequest()), timeout=60)
    got: list[flow_pb2.Flow] = []
    reader = threading.Thread(target=lambda: got.extend(r.flow for r in call if r.WhichOneof("response_types") == "flow"),
                              daemon=True)
    reader.start()
    time.sleep(1.0)
    sent = send_udp(t.b, t.a.ipv4, 9000, 3, 50)  # counted on b's veth and on a's
    deadline = time.monotonic() + 20
    while sum(ext(f).get("packets", 0) for f in got if f.verdict == flow_pb2.FORWARDED) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    call.cancel()
    fwd = [f for f in got if f.verdict == flow_pb2.FORWARDED]
    assert sum(ext(f)["packets"] for f in fwd) == 6 and all(ports(f) == (sent.src_port, 9000) for f in fwd)
    # since: the old traffic is cut, this test's is in.
    recent = agent.flows(since=json_format.MessageToDict(_ts(before)))
    assert recent and all(f.time.ToNanoseconds() >= before for f in recent)
    assert any(ports(f) == (sent.src_port, 9000) for f in recent)
    assert not any(f.l7.dns.query == NX_NAME + "." for f in recent)


def _ts(ns: int) -> Any:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


@pytest.mark.parametrize("req, message", [
    ({"whitelist": [{"source_ip": ["10.0.0.300"]}]}, "invalid IP address"),
    ({"whitelist": [{"protocol": ["quic"]}]}, "unknown protocol"),
    ({"blacklist": [{"dns_query": ["(unclosed"]}]}, "invalid regular expression"),
    ({"since": "2030-01-01T00:00:00Z", "until": "2020-01-01T00:00:00Z"}, "since must not be after until"),
    ({"first": True, "follow": True}, "first cannot be specified with follow"),
])
def test_errors_are_statuses_and_the_agent_stays_up(setup: tuple[Agent, Traffic, dict[str, Any]],
                                                     req: dict[str, Any], message: str) -> None:
    agent, _, _ = setup
    with pytest.raises(grpc.RpcError) as info:
        agent.flows(**req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
    assert agent.proc.poll() is None and agent.serving()


def test_status_nodes_namespaces_events(setup: tuple[Agent, Traffic, dict[str, Any]]) -> None:
    agent, _, _ = setup
    st = agent.observer.ServerStatus(observer_pb2.ServerStatusRequest(), timeout=10)
    assert st.num_flows > 0 and st.max_flows == 100_000 and st.seen_flows >= st.num_flows
    assert st.version.startswith("flowtel") and st.num_connected_nodes.value == 1
    (node,) = agent.observer.GetNodes(observer_pb2.GetNodesRequest(), timeout=10).nodes
    assert (node.name, node.state, node.address) == ("test-node", relay_pb2.NODE_CONNECTED, agent.endpoint)
    # No Kubernetes metadata in this pipeline: no namespaces seen.
    assert list(agent.observer.GetNamespaces(observer_pb2.GetNamespacesRequest(), timeout=10).namespaces) == []
    assert list(agent.observer.GetAgentEvents(observer_pb2.GetAgentEventsRequest(number=5), timeout=10)) == []
    # An absurd number is the whole ring, not an error or a hang.
    n = sum(1 for _ in agent.observer.GetFlows(observer_pb2.GetFlowsRequest(number=ALL), timeout=30))
    assert n >= st.num_flows


def test_observe_json_lines_parse_strictly(setup: tuple[Agent, Traffic, dict[str, Any]]) -> None:
    agent, t, _ = setup
    out = subprocess.run([sys.executable, "-m", "flowtel.cli", "observe", "--server", agent.endpoint, "--all",
                          "-o", "json", "--ip", t.a.ipv4], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines
    for line in lines:
        json_format.Parse(line, observer_pb2.GetFlowsResponse())  # no unknown field, every enum known


# --- playing Hubble Relay across two agents ---------------------------------------------


def test_relay_gets_every_agent_from_peer_notify_and_merges_their_flows(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.2", port))  # the same port must be free on both agents' addresses
    Testbed.cleanup_stale()
    with Testbed() as bed_a, Testbed() as bed_b, FakeApiServer(bookmark_interval=0.2) as api:
        pa, pb = bed_a.add_pod("rel-a"), bed_b.add_pod("rel-b")
        qa, qb = bed_a.add_pod("rel-a2"), bed_b.add_pod("rel-b2")
        bed_a.start_udp_sink(qa, 9100)
        bed_b.start_udp_sink(qb, 9200)
        labels = {"app.kubernetes.io/name": "flowtel"}
        api.create("pods", o.pod("flowtel-a", "flowtel", ip="127.0.0.1", node="node-a", labels=labels))
        api.create("pods", o.pod("flowtel-b", "flowtel", ip="127.0.0.2", node="node-b", labels=labels))
        peers = {"auth_type": "kubeConfig", "kubeconfig": api.write_kubeconfig(str(tmp_path / "kubeconfig")),
                 "namespace": "flowtel"}
        a = Agent(tmp_path, bed_a.interface_glob, f"127.0.0.1:{port}", node="node-a", kernel_events=False, peers=peers)
        b = Agent(tmp_path, bed_b.interface_glob, f"127.0.0.2:{port}", node="node-b", kernel_events=False, peers=peers)
        try:
            for agent in (a, b):
                agent.wait(agent.serving, "the Hubble API")
            for agent, pods in ((a, (pa, qa)), (b, (pb, qb))):
                agent.wait(lambda: all(" bpf " in subprocess.run(["tc", "filter", "show", "dev", p.host_ifname,
                                                                  "ingress"], capture_output=True, text=True).stdout
                                       for p in pods), "tc attach")
            sent_a = send_udp(pa, qa.ipv4, 9100, 4, 100)
            sent_b = send_udp(pb, qb.ipv4, 9200, 4, 100)

            # Relay: Notify on one agent (the hubble-peer Service picks any) ...
            call = a.peer.Notify(peer_pb2.NotifyRequest(), timeout=30)
            notes = [next(call), next(call)]
            call.cancel()
            assert sorted((n.name, n.address, n.type, n.HasField("tls")) for n in notes) == [
                ("node-a", f"127.0.0.1:{port}", peer_pb2.PEER_ADDED, False),
                ("node-b", f"127.0.0.2:{port}", peer_pb2.PEER_ADDED, False),
            ]
            # ... then dials every address it was given and merges the flows by time.
            merged: list[observer_pb2.GetFlowsResponse] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                merged = []
                for n in notes:
                    with grpc.insecure_channel(n.address) as ch:
                        merged += list(observer_pb2_grpc.ObserverStub(ch).GetFlows(json_format.ParseDict(
                            {"number": str(ALL), "whitelist": [{"destination_port": ["9100", "9200"]}]},
                            observer_pb2.GetFlowsRequest()), timeout=30))
                per_node = {node: sum(ext(r.flow).get("packets", 0) for r in merged if r.node_name == node)
                            for node in ("node-a", "node-b")}
                if per_node == {"node-a": 8, "node-b": 8}:
                    break
                time.sleep(0.3)
            merged.sort(key=lambda r: r.flow.time.ToNanoseconds())
            assert per_node == {"node-a": 8, "node-b": 8}  # 4 datagrams, each on two veths
            assert {ports(r.flow) for r in merged if r.node_name == "node-a"} == {(sent_a.src_port, 9100)}
            assert {ports(r.flow) for r in merged if r.node_name == "node-b"} == {(sent_b.src_port, 9200)}
            assert all(r.flow.node_name == r.node_name for r in merged)
        finally:
            a.stop()
            b.stop()
