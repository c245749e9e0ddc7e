"""The flow log writer: records reach the file in order, off the caller's thread; a full queue
and a failing file lose records counted, never blocking the caller."""
from __future__ import annotations

import json
import time
from pathlib import Path

from dnsproxy.flowlog import FlowLogWriter
from flowtel.records import Flow, Verdict


def _flow(port: int) -> Flow:
    return Flow(time_ns=1_700_000_000_000_000_000 + port, node_name="node-a", verdict=Verdict.DROPPED,
                ip_version=4, src_ip="10.0.0.1", dst_ip="192.0.2.1", protocol=6, src_port=40000, dst_port=port,
                drop_reason="POLICY_DENIED")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_reach_the_file_in_order_within_the_flush_interval(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    w = FlowLogWriter(str(path), flush_interval_s=0.02)
    try:
        for port in range(1, 201):
            w.write(_flow(port))
        deadline = time.monotonic() + 5
        while w.written < 200:
            assert time.monotonic() < deadline, f"only {w.written} written"
            time.sleep(0.01)
        records = _lines(path)  # flushed: readable by another process as whole lines
        assert [r["flow"]["l4"]["TCP"]["destination_port"] for r in records] == list(range(1, 201))
        assert records[0]["node_name"] == "node-a" and records[0]["flow"]["verdict"] == "DROPPED"
        assert records[0]["time"] == records[0]["flow"]["time"]
    finally:
        w.close()
    assert w.lost_total() == {"queue_full": 0, "write_error": 0}


def test_a_full_queue_loses_records_counted_without_waiting(tmp_path: Path) -> None:
    path = tmp_path / "flows.log"
    w = FlowLogWriter(str(path), max_queued=3, flush_interval_s=60)  # the writer does not drain meanwhile
    t = time.perf_counter()
    for port in range(1, 6):
        w.write(_flow(port))
    assert time.perf_counter() - t < 0.5
    assert w.lost_total()["queue_full"] == 2
    w.close()  # writes what was queued
    assert [r["flow"]["l4"]["TCP"]["destination_port"] for r in _lines(path)] == [1, 2, 3]


def test_a_failing_file_counts_the_lost_records() -> None:
    w = FlowLogWriter("/dev/full", flush_interval_s=0.02)  # every write: ENOSPC
    try:
        for port in range(1, 11):
            w.write(_flow(port))
        deadline = time.monotonic() + 5
        while w.lost_total()["write_error"] < 10:
            assert time.monotonic() < deadline, w.lost_total()
            time.sleep(0.01)
        assert w.written == 0
    finally:
        w.close()
