"""Metric export cost: series per second and cost per export cycle at 1k, 10k and 50k series.

One export cycle is what an exporter does each interval: take a batch of cumulative points
into its series store (update), collect them (cumulative), and encode them — OTLP protobuf
requests for otlp/otlphttp, the text page for prometheus. No network: the cost measured is
flowtel's. CPU time of this thread, median of several cycles; ratios against the 1k-series
cycle of the same run (the machines are shared and noisy).

Run with ``make bench`` or ``python -m bench.exporters [--sizes 1000,10000,50000] [--reps 5]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

from exporters.common.otlp_encoding import OtlpEncoder, resource_attributes
from exporters.common.series import SeriesStore
from exporters.prometheus.exposition import render
from flowtel.records import MetricKind, MetricPoint


@dataclass(slots=True)
class Result:
    series: int
    update_s: float
    otlp_s: float
    prometheus_s: float

    @property
    def cycle_s(self) -> float:
        return self.update_s + self.otlp_s + self.prometheus_s


def _points(n: int, cycle: int) -> list[MetricPoint]:
    # Shaped like hubble_flows_processed_total with pod contexts: 6 labels per series.
    now = time.time_ns()
    return [
        MetricPoint(
            "hubble_flows_processed_total",
            float(cycle * 10 + i % 7),
            MetricKind.SUM,
            now,
            {
                "source": f"ns{i % 50}/pod-{i}",
                "destination": f"ns{(i * 7) % 50}/pod-{(i * 13) % n}",
                "protocol": "TCP",
                "type": "Trace",
                "subtype": "to-endpoint",
                "verdict": "FORWARDED",
            },
        )
        for i in range(n)
    ]


def measure(n: int, reps: int) -> Result:
    store = SeriesStore("bench", cardinality_limit=max(n * 2, 100_000), series_ttl=3600.0)
    encoder = OtlpEncoder(resource_attributes("bench-node"), max_batch_size=8192)
    updates, otlps, proms = [], [], []
    for cycle in range(reps + 1):  # the first cycle creates the series: not counted
        points = _points(n, cycle)
        t0 = time.thread_time()
        store.update(points)
        t1 = time.thread_time()
        families = store.collect("cumulative", time.time_ns())
        size = sum(len(body) for body, _ in encoder.metrics(families, "cumulative", time.time_ns()))
        t2 = time.thread_time()
        page = render(families)
        t3 = time.thread_time()
        assert size > 0 and page
        if cycle:
            updates.append(t1 - t0)
            otlps.append(t2 - t1)
            proms.append(t3 - t2)
    return Result(n, statistics.median(updates), statistics.median(otlps), statistics.median(proms))


def run(sizes: tuple[int, ...] = (1000, 10_000, 50_000), reps: int = 5) -> list[Result]:
    return [measure(n, reps) for n in sizes]


def report(results: list[Result]) -> str:
    base = results[0]
    lines = [f"{'series':>8} {'update ms':>10} {'otlp ms':>9} {'prom ms':>9} {'cycle ms':>9} "
             f"{'series/s':>10} {'cycle vs ' + str(base.series):>14}"]
    for r in results:
        lines.append(
            f"{r.series:>8} {r.update_s * 1e3:>10.1f} {r.otlp_s * 1e3:>9.1f} {r.prometheus_s * 1e3:>9.1f} "
            f"{r.cycle_s * 1e3:>9.1f} {r.series / r.cycle_s:>10.0f} {r.cycle_s / base.cycle_s:>14.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    print(report(run(tuple(int(s) for s in args.sizes.split(",")), args.reps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
