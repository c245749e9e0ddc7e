"""The flows extension over real HTTP on loopback: ring, queries, server-side filters,
follow streams, slow followers' losses, the map, errors."""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest
from pydantic import ValidationError

from extensions.flows.config import FlowsConfig
from flowtel.lib.flowapi import split_endpoint
from extensions.flows.extension import FlowsExtension
from extensions.flows.factory import FACTORY
from flowtel.lib.flowapi.hub import LOST_SOURCE_SLOW_CLIENT
from flowtel.lib.flowapi.server import parse_query
from flowtel.lib.hubble import convert as hubble, printer, summary as _summary, timefmt
from flowtel.component import CreateSettings, Kind, Telemetry
from flowtel.errors import StartError
from flowtel.lib.hubble.parse import parse_rfc3339
from flowtel.records import Record
from flowtel.lib.hubble.api.observer import observer_pb2
from google.protobuf import json_format
from flowtel.records import Record, replace
from tests.flowsamples import T0, lost, sample_flows

_encode = json.JSONEncoder(separators=(",", ":")).encode


@pytest.fixture
def ext() -> Iterator[FlowsExtension]:
    extension = make(FlowsConfig(endpoint="127.0.0.1:0"))
    yield extension
    extension.shutdown()


def make(config: FlowsConfig, telemetry: Telemetry | None = None) -> FlowsExtension:
    extension = FACTORY.create(CreateSettings("flows", "node-1", telemetry or Telemetry()), config)
    assert isinstance(extension, FlowsExtension)
    extension.start()
    return extension


def get(ext: FlowsExtension, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{ext.endpoint}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def lines(body: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines()]


def names_of(body: str) -> list[str]:
    """Sample-flow names of the flows in a response, by their unique timestamps."""
    by_time = {timefmt.format_time(f.time_ns): n for n, f in sample_flows().items()}
    return [by_time[env["time"]] for env in lines(body) if "flow" in env]


def test_last_returns_hubble_envelopes_exactly(ext: FlowsExtension) -> None:
    flows = list(sample_flows().values())
    ext.consume(flows)
    status, body = get(ext, "/flows?last=3")
    assert status == 200
    assert lines(body) == [hubble.envelope(f) for f in flows[-3:]]
    for line in body.splitlines():  # strictly Cilium's GetFlowsResponse, no unknown field
        json_format.Parse(line, observer_pb2.GetFlowsResponse())
    assert lines(get(ext, "/flows")[1]) == [hubble.envelope(f) for f in flows]
    assert get(ext, "/flows?last=0")[1] == ""


def test_filters_are_applied_by_the_server_in_order(ext: FlowsExtension) -> None:
    ext.consume(list(sample_flows().values()))
    assert names_of(get(ext, "/flows?namespace=shop&not&verdict=DROPPED")[1]) == ["F1", "F2", "F4", "F5", "F6", "F7"]
    assert names_of(get(ext, "/flows?not&namespace=shop")[1]) == ["F8", "F9"]
    assert names_of(get(ext, "/flows?to-port=8080&to-port=80")[1]) == ["F1", "F3"]
    assert names_of(get(ext, "/flows?protocol=tcp&last=2")[1]) == ["F3", "F6"]
    assert names_of(get(ext, "/flows?to-fqdn=*.example.com")[1]) == ["F4", "F5", "F6"]


def test_since_and_until(ext: FlowsExtension) -> None:
    ext.consume(list(sample_flows().values()))
    since = timefmt.format_time(T0 + 7_000_000_000)
    assert names_of(get(ext, f"/flows?since={since}")[1]) == ["F7", "F8", "F9"]
    until = "2024-11-26T12:45:47+01:00"  # T0 + 2 s
    assert names_of(get(ext, f"/flows?until={urllib.request.quote(until)}")[1]) == ["F1", "F2"]
    # A duration goes back from the server's clock: the samples are from 2024.
    assert get(ext, "/flows?since=5m")[1] == ""


def test_lost_events_in_the_pipeline_are_served_whatever_the_filter(ext: FlowsExtension) -> None:
    ext.consume([*sample_flows().values(), lost()])
    body = get(ext, "/flows?verdict=DROPPED")[1]
    assert lines(body)[-1] == hubble.lost_envelope(lost())
    assert names_of(body) == ["F3"]


def test_ring_keeps_the_newest_buffer_size_records() -> None:
    ext = make(FlowsConfig(endpoint="127.0.0.1:0", buffer_size=4))
    try:
        flows = list(sample_flows().values())
        ext.consume(flows[:5])
        ext.consume(flows[5:])
        assert names_of(get(ext, "/flows")[1]) == ["F6", "F7", "F8", "F9"]
        health = json.loads(get(ext, "/healthz")[1])
        assert health["ring_size"] == 4 and health["ring_capacity"] == 4 and health["records_seen"] == 9
    finally:
        ext.shutdown()


@pytest.mark.parametrize("query, message", [
    ("ip=1.2.3", "--ip: invalid IP address"),
    ("namespace=a&ip=1.1.1.1", "cannot be combined"),
    ("last=many", "last: expected a number"),
    ("since=yesterday", "expected an RFC 3339 time"),
    ("follow=1&until=2024-01-01T00:00:00Z", "until cannot be combined with follow"),
    ("colour=red", "unknown parameter 'colour'"),
])
def test_bad_requests_say_what_is_wrong(ext: FlowsExtension, query: str, message: str) -> None:
    status, body = get(ext, f"/flows?{query}")
    assert status == 400
    assert message in json.loads(body)["error"]


def test_unknown_path_and_health(ext: FlowsExtension) -> None:
    status, body = get(ext, "/nope")
    assert status == 404 and "/flows" in json.loads(body)["error"]
    status, body = get(ext, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"


class Stream:
    """A raw follow client: it reads only when asked to, like a slow `flowtel observe`."""

    def __init__(self, ext: FlowsExtension, query: str, rcvbuf: int | None = None) -> None:
        host, port = split_endpoint(ext.endpoint)
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, port))
        self.sock.sendall(f"GET /flows?{query} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        self.buf = b""
        self.body_started = False
        self.got: list[dict[str, Any]] = []

    def read_until(self, pred: Any, timeout: float = 10) -> list[dict[str, Any]]:
        """Lines received so far once ``pred(lines)`` holds, or all of them at end of stream."""
        deadline = time.monotonic() + timeout
        while not (self.body_started and pred(self.got)):
            if time.monotonic() > deadline:
                raise AssertionError(f"stream did not deliver in time; have {len(self.got)} lines")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not chunk:
                break
            self._parse(chunk)
        return self.got

    def _parse(self, chunk: bytes) -> None:
        self.buf += chunk
        if not self.body_started:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            assert head.startswith(b"HTTP/1.0 200"), head
            self.body_started, self.buf = True, rest
        # The last piece is empty or a line still arriving: keep it for the next chunk.
        *complete, self.buf = self.buf.split(b"\n")
        self.got.extend(json.loads(x) for x in complete if x.strip())

    def close(self) -> None:
        self.sock.close()


def wait_followers(ext: FlowsExtension, n: int) -> None:
    deadline = time.monotonic() + 5
    while ext.hub.status()["followers"] != n:
        assert time.monotonic() < deadline, ext.hub.status()
        time.sleep(0.01)


def test_follow_streams_new_matching_flows_after_history(ext: FlowsExtension) -> None:
    flows = sample_flows()
    ext.consume([flows["F1"], flows["F2"], flows["F3"]])
    stream = Stream(ext, "follow=1&last=1&protocol=tcp&not&verdict=DROPPED")
    try:
        wait_followers(ext, 1)
        ext.consume([flows["F4"], flows["F5"], flows["F6"], flows["F7"]])
        got = stream.read_until(lambda g: len(g) >= 2)
        assert [e["flow"]["time"] for e in got] == [timefmt.format_time(flows[n].time_ns) for n in ("F2", "F6")]
    finally:
        stream.close()
    wait_followers(ext, 0)  # a client that left is noticed and unregistered


def test_follow_without_last_or_since_starts_from_now(ext: FlowsExtension) -> None:
    flows = sample_flows()
    ext.consume([flows["F1"]])
    stream = Stream(ext, "follow=1")
    try:
        wait_followers(ext, 1)
        ext.consume([flows["F2"]])
        got = stream.read_until(lambda g: len(g) >= 1)
        assert got == [hubble.envelope(flows["F2"])]
    finally:
        stream.close()


def test_a_follower_that_cannot_keep_up_is_told_how_many_it_lost() -> None:
    telemetry = Telemetry()
    ext = make(FlowsConfig(endpoint="127.0.0.1:0", client_buffer_size=10), telemetry)
    stream = Stream(ext, "follow=1")
    try:
        wait_followers(ext, 1)
        template = sample_flows()["F1"]
        batch = [replace(template, time_ns=T0 + i) for i in range(25)]
        ext.consume(batch)  # one batch larger than the client's queue: 15 cannot be queued
        got = stream.read_until(lambda g: any("lost_events" in e for e in g))
        lost_lines = [e["lost_events"] for e in got if "lost_events" in e]
        assert lost_lines == [{"source": LOST_SOURCE_SLOW_CLIENT, "num_events_lost": "15"}]
        assert [e["flow"]["time"] for e in got if "flow" in e] == [timefmt.format_time(T0 + i) for i in range(10)]
        # The report comes right after the flows it kept, where the gap is (as GetFlows).
        assert "lost_events" in got[10]
        assert telemetry.get("flows", "follower_records_lost") == 15
    finally:
        stream.close()
        ext.shutdown()


def test_a_stalled_follower_never_blocks_the_pipeline_and_learns_its_losses() -> None:
    ext = make(FlowsConfig(endpoint="127.0.0.1:0", client_buffer_size=100))
    stream = Stream(ext, "follow=1&protocol=tcp", rcvbuf=4096)
    try:
        wait_followers(ext, 1)
        template = sample_flows()["F1"]
        udp = sample_flows()["F9"]
        sent = 0
        # ~12 MB of JSON for a client that reads nothing: far beyond the socket buffers.
        batches: list[list[Record]] = []
        for b in range(120):
            batch: list[Record] = [replace(template, time_ns=T0 + b * 1000 + i) for i in range(200)]
            batch.append(udp)  # filtered out by the server: neither queued nor counted as lost
            batches.append(batch)
        for batch in batches:  # each record's wire form once, outside the timing (as the agent's
            for r in batch:    # first consumer pays it for every later one)
                hubble.to_response(r)
        started = time.monotonic()
        for batch in batches:
            ext.consume(batch)
            sent += 200
        assert time.monotonic() - started < 20  # consume never waited for the client
        ext.hub.close()  # end the stream so the client can read to its end
        got = stream.read_until(lambda g: False, timeout=30)
    finally:
        stream.close()
        ext.shutdown()
    flows = [e for e in got if "flow" in e]
    lost_count = sum(int(e["lost_events"]["num_events_lost"]) for e in got if "lost_events" in e)
    assert lost_count > 0
    assert len(flows) + lost_count == sent
    assert all(e["flow"]["l4"].get("TCP") for e in flows)
    times = [parse_rfc3339(e["time"]) for e in flows]
    assert times == sorted(times)


def test_too_many_followers_is_refused() -> None:
    ext = make(FlowsConfig(endpoint="127.0.0.1:0", max_followers=1))
    first = Stream(ext, "follow=1")
    try:
        wait_followers(ext, 1)
        status, body = get(ext, "/flows?follow=1")
        assert status == 503 and "max_followers" in json.loads(body)["error"]
    finally:
        first.close()
        ext.shutdown()


def test_map_endpoint_serves_the_graph(ext: FlowsExtension) -> None:
    ext.consume(list(sample_flows().values()))
    graph = json.loads(get(ext, "/map")[1])
    pairs = {(e["client"], e["server"], e["protocol"], e["port"], e["verdict"]) for e in graph["edges"]}
    assert ("shop/frontend", "shop/payments", "TCP", "8080", "FORWARDED") in pairs
    assert ("default/client-1", "shop/frontend", "TCP", "80", "DROPPED") in pairs
    assert graph["namespaces"] == ["default", "kube-system", "shop"]
    only = json.loads(get(ext, "/map?namespace=kube-system")[1])
    assert {(e["client"], e["server"]) for e in only["edges"]} == {("shop/frontend", "kube-system/coredns")}
    assert only["namespaces"] == graph["namespaces"]


def test_shutdown_ends_follow_streams(ext: FlowsExtension) -> None:
    stream = Stream(ext, "follow=1")
    wait_followers(ext, 1)
    done = threading.Event()

    def read() -> None:
        stream.read_until(lambda g: False, timeout=10)
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ext.shutdown()
    assert done.wait(5), "the follow stream stayed open after shutdown"
    stream.close()


def test_port_in_use_is_a_start_error_with_a_remedy(ext: FlowsExtension) -> None:
    second = FlowsExtension(CreateSettings("flows", "node-1", Telemetry()), FlowsConfig(endpoint=ext.endpoint))
    with pytest.raises(StartError, match="cannot listen on 127.0.0.1:.*Address already in use") as exc:
        second.start()
    assert "extensions.flows.endpoint" in exc.value.remedy


def test_config_validation_and_factory() -> None:
    cfg = FlowsConfig()
    assert (cfg.endpoint, cfg.buffer_size, cfg.client_buffer_size) == ("127.0.0.1:4245", 4095, 1024)
    assert split_endpoint("[::1]:4245") == ("::1", 4245)
    for bad in ("4245", "localhost", "::1:4245", "host:99999"):
        with pytest.raises(ValidationError, match="HOST:PORT|brackets"):
            FlowsConfig(endpoint=bad)
    with pytest.raises(ValidationError):
        FlowsConfig(buffer_size=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        FlowsConfig.model_validate({"ring": 5})
    assert FACTORY.kind is Kind.EXTENSION and FACTORY.type == "flows"
    assert FlowsExtension.taps == ("logs",)


def test_parse_query_keeps_filter_order() -> None:
    q = parse_query("last=5&not&namespace=shop&protocol=tcp&follow=true")
    assert (q.number, q.follow) == (5, True)
    # --not negated only the namespace: a shop pod at either end is hidden; tcp is required.
    assert len(q.filters.blacklist) == 2 and len(q.filters.whitelist) == 1
