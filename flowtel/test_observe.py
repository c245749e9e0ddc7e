"""`flowtel observe` and `flowtel map` against the hubble extension's gRPC API on loopback (no
kernel): output formats, filters on the wire, follow, --input-file, errors."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from google.protobuf import json_format

from extensions.hubble.config import HubbleConfig
from extensions.hubble.extension import HubbleExtension
from flowtel import mapformat
from flowtel.lib.hubble import convert as hubble, printer, timefmt
from flowtel.cli import main
from flowtel.component import CreateSettings, Telemetry
from flowtel.lib.hubble.parse import flow_from_json as flow_from_dict
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.observe import response_record, service_map
from flowtel.records import replace
from tests.flowsamples import T0, lost, sample_flows


class Served:
    """The extension and the very records it was fed (a record's uuid is fixed once encoded)."""

    def __init__(self) -> None:
        self.ext = HubbleExtension(CreateSettings("hubble", "node-1", Telemetry()), HubbleConfig(endpoint="127.0.0.1:0"))
        self.ext.start()
        self.flows = sample_flows()
        self.lost = lost()
        self.ext.consume([*self.flows.values(), self.lost])
        self.endpoint = self.ext.endpoint

    def consume(self, records: list) -> None:
        self.ext.consume(records)


@pytest.fixture
def ext() -> Iterator[Served]:
    served = Served()
    yield served
    served.ext.shutdown()


# The records the flow API serves: the same objects, so their wire forms (uuid included) match.
SERVED = sample_flows()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_json_prints_hubble_envelopes_exactly(ext: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "observe", "--server", ext.endpoint, "--all", "-o", "json")
    assert code == 0
    got = [json.loads(line) for line in out.splitlines()]
    flows = [g for g in got if "flow" in g]
    assert [g["flow"] for g in flows] == [hubble.flow_json(f) for f in ext.flows.values()]
    assert all(g["node_name"] == "node-1" for g in got)
    assert got[-1]["lost_events"] == hubble.lost_envelope(ext.lost)["lost_events"]
    for line in out.splitlines():  # strictly Cilium's GetFlowsResponse, no unknown field
        json_format.Parse(line, observer_pb2.GetFlowsResponse())
    for g in flows:
        assert hubble.flow_json(flow_from_dict(g["flow"])) | {"uuid": g["flow"]["uuid"]} == g["flow"]


def test_compact_is_the_shared_compact_line(ext: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "observe", "--server", ext.endpoint, "--last", "3", "--color", "never")
    assert code == 0
    flows = list(ext.flows.values())
    # The newest three records: F8, F9 and the lost-events report (on stderr, as a notice).
    assert out.splitlines() == [printer.compact_line(f) for f in flows[-2:]]
    assert err.splitlines() == [printer.lost_compact_line(ext.lost)]


def test_default_is_the_last_twenty(ext: Served, capsys: pytest.CaptureFixture[str]) -> None:
    ext.consume(list(sample_flows().values()) * 3)
    _, out, _ = run(capsys, "observe", "--server", ext.endpoint, "--color", "never")
    assert len(out.splitlines()) == 20


def test_filters_reach_the_server_in_order(ext: Served, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "observe", "--server", ext.endpoint, "--all", "-o", "json",
                    "--namespace", "shop", "--not", "--verdict", "DROPPED", "--protocol", "tcp")
    times = [json.loads(line)["time"] for line in out.splitlines() if '"flow"' in line]
    flows = sample_flows()
    assert times == [timefmt.format_time(flows[n].time_ns) for n in ("F1", "F2", "F6")]


def test_table_and_dict(ext: Served, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "observe", "--server", ext.endpoint, "--all", "-o", "table", "--to-port", "8080",
                    "--to-port", "80")
    lines = out.splitlines()
    assert lines[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    # Columns line up: every column starts where its header does.
    starts = [lines[0].index(h) for h in ("SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")]
    for line in lines[1:]:
        assert all(line[s - 3:s] == "   " and line[s] != " " for s in starts), line
    assert "shop/frontend-7c9d:41000" in lines[1] and "NETFILTER_DROP" in lines[2]
    _, out, _ = run(capsys, "observe", "--server", ext.endpoint, "--all", "-o", "dict", "--protocol", "dns")
    blocks = out.rstrip("\n").split("\n------------\n")
    flows = sample_flows()
    assert blocks == [printer.dict_block(flows["F4"]), printer.dict_block(flows["F5"])]


def test_since_duration_and_time(ext: Served, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "observe", "--server", ext.endpoint, "--since", "10m", "-o", "json")
    assert out == ""  # the samples are from 2024
    _, out, _ = run(capsys, "observe", "--server", ext.endpoint, "-o", "json", "--since",
                    timefmt.format_time(T0 + 9_000_000_000))
    assert [json.loads(line)["time"] for line in out.splitlines()] == [
        timefmt.format_time(T0 + 9_000_000_000), timefmt.format_time(lost().time_ns)]


def test_follow_receives_flows_that_arrive_after_it_started(ext: Served, tmp_path: Path) -> None:
    err = (tmp_path / "err").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "flowtel.cli", "observe", "--server", ext.endpoint, "--follow",
                             "-o", "json", "--to-port", "443"], stdout=subprocess.PIPE, stderr=err, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 20
        while ext.ext.store.stats()["followers"] == 0:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "err").read_text()
            time.sleep(0.05)
        new = replace(sample_flows()["F6"], time_ns=T0 + 60_000_000_000)
        ext.consume([sample_flows()["F1"], new])
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert json.loads(line)["flow"] == hubble.flow_json(new)
    finally:
        proc.terminate()
        proc.wait(10)


def test_input_file_filters_here(ext: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "flows.log"
    log.write_text("".join(json.dumps(hubble.envelope(f)) + "\n" for f in sample_flows().values()))
    _, out, _ = run(capsys, "observe", "--input-file", str(log), "--all", "--to-fqdn", "*.example.com", "-o", "json")
    flows = sample_flows()
    assert [json.loads(line)["time"] for line in out.splitlines()] == [
        timefmt.format_time(flows[n].time_ns) for n in ("F4", "F5", "F6")]
    _, out, _ = run(capsys, "observe", "--input-file", str(log), "--last", "1", "--color", "never")
    assert out == printer.compact_line(flows["F9"]) + "\n"


def test_errors(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code, _, err = run(capsys, "observe", "--server", f"127.0.0.1:{port}")
    assert code == 1
    assert f"cannot reach a Hubble API at 127.0.0.1:{port}" in err and "service.extensions: [hubble]" in err
    # A bad filter fails before any connection is tried.
    code, _, err = run(capsys, "observe", "--server", f"127.0.0.1:{port}", "--ip", "300.1.1.1")
    assert code == 2 and "invalid IP address in filter: '300.1.1.1'" in err
    code, _, err = run(capsys, "observe", "--server", "nonsense")
    assert code == 2 and "--server: expected HOST:PORT" in err
    code, _, err = run(capsys, "observe", "--since", "last tuesday", "--input-file", "/dev/null")
    assert code == 2 and "--since: expected an RFC 3339 time" in err
    code, _, err = run(capsys, "observe", "--follow", "--input-file", "/dev/null")
    assert code == 2 and "cannot be combined with --input-file" in err
    code, _, err = run(capsys, "observe", "--follow", "--until", "1m", "--server", f"127.0.0.1:{port}")
    assert code == 2 and "--until cannot be combined with --follow" in err


def test_map_outputs(ext: Served, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "map", "--server", ext.endpoint, "-o", "json")
    graph = json.loads(out)
    # The map of the server's ring is the service graph of the flows it was fed, as they read
    # back from Cilium's wire form. (extensions is a Struct, whose numbers are doubles:
    # handshake_rtt_ns comes back as a float, which the service graph does not count yet.)
    wire = [response_record(hubble.to_response(f)) for f in ext.flows.values()]
    assert code == 0 and graph == service_map(iter(wire), "workload")
    _, dot, _ = run(capsys, "map", "--server", ext.endpoint)
    assert dot == mapformat.to_dot(graph)
    _, mermaid, _ = run(capsys, "map", "--server", ext.endpoint, "-o", "mermaid", "--namespace", "kube-system")
    assert mermaid == mapformat.to_mermaid(service_map(iter(wire), "workload", ["kube-system"]))
    assert "coredns" in mermaid and "payments" not in mermaid


def test_server_from_environment(ext: Served, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWTEL_SERVER", ext.endpoint)
    code, out, _ = run(capsys, "observe", "--last", "1", "-o", "json")
    assert code == 0 and "lost_events" in out
    assert os.environ["FLOWTEL_SERVER"] == ext.endpoint
