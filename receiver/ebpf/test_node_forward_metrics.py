"""networkobservability_forward_count/_bytes from the kernel's per-interface totals summed by
hook (the node's view, removed interfaces included), and the drain sending them only to a
consumer that takes metrics."""
from __future__ import annotations

from typing import Iterator

import pytest

from flowtel.component import CreateSettings, Telemetry
from flowtel.records import MetricKind, MetricPoint, Record
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.nodemetrics import forward_points
from receiver.ebpf.receiver import EbpfReceiver

# hook: 0 is tc ingress (into the node), 1 tc egress (out of it).
TOTALS = {0: (11, 1060), 1: (24, 3400)}


def by_name(points: list[MetricPoint]) -> dict[tuple[str, str], float]:
    return {(p.name, p.attributes["direction"]): p.value for p in points}


def test_forward_points_by_direction() -> None:
    points = forward_points(TOTALS, 123)
    assert by_name(points) == {
        ("networkobservability_forward_count", "ingress"): 11,
        ("networkobservability_forward_bytes", "ingress"): 1060,
        ("networkobservability_forward_count", "egress"): 24,
        ("networkobservability_forward_bytes", "egress"): 3400,
    }
    assert all(p.kind is MetricKind.SUM and p.time_ns == 123 and list(p.attributes) == ["direction"]
               for p in points)


def test_no_traffic_still_gives_both_directions() -> None:
    assert set(by_name(forward_points({}, 1)).values()) == {0}
    assert len(forward_points({}, 1)) == 4


class _Empty:
    """A take of an empty map (DoubleBuffer.take's contract)."""

    evicted = 0
    entries = 0

    def chunks(self, chunk: int) -> Iterator[list[object]]:
        return iter(())


class _Buffer:
    max_entries = 1024

    def take(self, *, writers_stopped: bool = False) -> _Empty:
        return _Empty()

    def fill(self) -> int:
        return 0


class _Maps:
    buffer = _Buffer()

    def failures(self) -> tuple[int, int]:
        return 0, 0


class _Sink:
    def __init__(self, signals: set[str]) -> None:
        self.signals = signals
        self.batches: list[list[Record]] = []

    def wants(self, signal: str) -> bool:
        return signal in self.signals

    def consume(self, batch: list[Record]) -> None:
        self.batches.append(batch)


@pytest.mark.parametrize("signals, expect_points", [({"logs", "metrics"}, True), ({"logs"}, False)])
def test_drain_sends_forward_points_when_metrics_are_wanted(monkeypatch: pytest.MonkeyPatch, signals: set[str],
                                                            expect_points: bool) -> None:
    sink = _Sink(signals)
    receiver = EbpfReceiver(CreateSettings("ebpf", "node-1", Telemetry()), EbpfReceiverConfig(), sink)
    receiver._maps = _Maps()  # type: ignore[assignment]
    receiver._attach = object()  # type: ignore[assignment]
    receiver._bpf = object()  # type: ignore[assignment]

    monkeypatch.setattr(receiver, "node_totals", lambda: TOTALS)
    receiver._drain_once(writers_stopped=False)
    if expect_points:
        [batch] = sink.batches
        assert by_name(batch)[("networkobservability_forward_count", "egress")] == 24  # type: ignore[arg-type]
    else:
        assert sink.batches == []
