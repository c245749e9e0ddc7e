"""Round trip, as a user debugging connectivity asks it: did the server answer, and how fast?

For a TCP exchange between two pods, flowtel's records show the request and the reply
(``is_reply``) and the client's handshake RTT; for a DNS exchange, the query latency. Checked
through the Hubble JSON that `flowtel run` writes, against what the client measured.
"""
from __future__ import annotations

from tests.support.flowlog import read_flow_log

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import Testbed, send_tcp

pytestmark = pytest.mark.kernel

_TIMED_DIG = """
import socket, struct, sys, time
server, name = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
t0 = time.monotonic_ns()
s.sendto(q, (server, 53))
s.recvfrom(4096)
print(time.monotonic_ns() - t0)
"""


def test_tcp_request_reply_handshake_rtt_and_dns_latency(tmp_path: Path) -> None:
    Testbed.cleanup_stale()
    with Testbed() as bed:
        client, server, dns = bed.add_pod("client"), bed.add_pod("server"), bed.add_pod("dns")
        bed.start_tcp_sink(server, 8080)
        bed.start_dnsmasq(dns, hosts={"server.rt.test": [server.ipv4]})
        flow_log = tmp_path / "flows.log"
        config = tmp_path / "flowtel.yaml"
        config.write_text(f"""
receivers:
  ebpf:
    interfaces: ["{bed.interface_glob}"]
    collection_interval: 500ms
    kernel_events: {{collection_interval: 500ms}}
exporters:
  file: {{path: {flow_log}}}
service:
  pipelines:
    logs: {{receivers: [ebpf], exporters: [file]}}
""")
        log = tmp_path / "agent.log"
        agent = subprocess.Popen([sys.executable, "-m", "flowtel.cli", "run", "--config", str(config)],
                                 stdout=subprocess.DEVNULL, stderr=log.open("w"))
        try:
            # The tracepoint programs attach last (after the tc programs): wait for them.
            deadline = time.monotonic() + 60
            while "kernel events attached" not in log.read_text():
                assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)

            sent = send_tcp(client, server.ipv4, 8080, 50_000)
            client_ns = int(client.exec([sys.executable, "-c", _TIMED_DIG, dns.ipv4, "server.rt.test"]).stdout)
            time.sleep(1.5)
        finally:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0, log.read_text()

        flows = [env["flow"] for env in read_flow_log(flow_log) if "flow" in env]

        def tcp(f: dict) -> dict:
            return f.get("l4", {}).get("TCP", {})

        # Request and reply of the exchange, on the client's veth.
        on_client = [f for f in flows if f.get("interface", {}).get("name") == client.host_ifname
                     and "packets" in f.get("extensions", {})]
        req = [f for f in on_client if f["IP"]["source"] == client.ipv4 and tcp(f).get("source_port") == sent.src_port]
        rep = [f for f in on_client if f["IP"]["source"] == server.ipv4 and tcp(f).get("destination_port") == sent.src_port]
        assert req and all(f["is_reply"] is False for f in req)
        assert rep and all(f["is_reply"] is True for f in rep)

        # The client's handshake RTT, on the connection's ESTABLISHED event (client side).
        est = [f for f in flows if f.get("extensions", {}).get("tcp_event") == "established"
               and f["IP"]["source"] == client.ipv4 and tcp(f).get("source_port") == sent.src_port]
        assert len(est) == 1, est
        rtt = est[0]["extensions"]["handshake_rtt_ns"]
        assert 0 < rtt < 50_000_000  # on veths: well under 50 ms

        # The DNS query's latency, on its one response (counted at the first pod interface it
        # crosses, the DNS server's veth): no more than what the client itself measured around
        # sendto/recvfrom.
        answers = [f for f in flows if f.get("Type") == "L7" and f["l7"]["type"] == "RESPONSE"
                   and f["l7"]["dns"].get("query") == "server.rt.test."]
        assert len(answers) == 1, answers
        assert answers[0]["interface"]["name"] == dns.host_ifname
        latency = int(answers[0]["l7"]["latency_ns"])
        assert answers[0]["l7"]["dns"]["ips"] == [server.ipv4]
        assert 0 < latency <= client_ns, (latency, client_ns)
