"""The series store: latest value per series, expiry, the cardinality limit, delta baselines."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flowtel.lib.metrics.series import SeriesStore
from flowtel.config import load_config
from flowtel.registry import factories_by_kind
from flowtel.records import MetricKind, MetricPoint


def p(name: str, value: float, t: int = 1, kind: MetricKind = MetricKind.SUM, **attrs: str) -> MetricPoint:
    return MetricPoint(name, value, kind, t, attrs)


def values(store: SeriesStore, temporality: str = "cumulative", now_ns: int = 100) -> dict[tuple, tuple]:
    out = {}
    for family in store.collect(temporality, now_ns):  # type: ignore[arg-type]
        for attrs, value, start in family.points:
            out[(family.name, tuple(sorted(attrs.items())))] = (value, start)
    return out


def test_latest_value_wins_and_attribute_order_does_not_matter() -> None:
    store = SeriesStore("t", 10, 0)
    store.update([p("m", 1, a="1", b="2"), p("m", 5, t=2, b="2", a="1"), p("g", 3, kind=MetricKind.GAUGE)])
    assert values(store) == {("m", (("a", "1"), ("b", "2"))): (5, 1), ("g", ()): (3, 1)}
    assert len(store) == 2


def test_idle_series_expire_and_ttl_zero_keeps_them() -> None:
    store = SeriesStore("t", 10, 60)
    store.update([p("m", 1, pod="a"), p("m", 1, pod="b")], now=0)
    store.update([p("m", 2, pod="a")], now=50)
    assert store.expire(now=70) == 1
    assert list(values(store)) == [("m", (("pod", "a"),))]
    assert store.expire(now=200) == 1 and len(store) == 0 and values(store) == {}
    forever = SeriesStore("t", 10, 0)
    forever.update([p("m", 1)], now=0)
    assert forever.expire(now=1e9) == 0 and len(forever) == 1


def test_limit_refuses_new_series_only_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    store = SeriesStore("exp", 2, 0)
    with caplog.at_level(logging.WARNING):
        result = store.update([p("m", 1, i="1"), p("m", 1, i="2"), p("m", 1, i="3"), p("m", 7, i="1"), p("n", 1)])
    assert (result.accepted, result.refused) == (4, 1)
    assert len(store) == 3
    assert "exp: metric m has 2 series, the cardinality_limit" in caplog.text


def test_a_name_keeps_its_first_kind() -> None:
    store = SeriesStore("t", 10, 0)
    result = store.update([p("m", 1), p("m", 2, kind=MetricKind.GAUGE, other="x")])
    assert (result.accepted, result.refused) == (1, 1)


def test_delta_baselines_and_counter_reset() -> None:
    store = SeriesStore("t", 10, 0)
    store.update([p("m", 10, t=5)])
    assert values(store, "delta", 100) == {("m", ()): (10, 5)}
    store.update([p("m", 15, t=150)])
    assert values(store, "delta", 200) == {("m", ()): (5, 100)}
    assert values(store, "delta", 300) == {("m", ()): (0, 200)}
    store.update([p("m", 4, t=350)])  # went backwards: the source restarted
    assert values(store, "delta", 400) == {("m", ()): (4, 350)}
    assert values(store, "cumulative", 500) == {("m", ()): (4, 350)}
    gauge = SeriesStore("t", 10, 0)
    gauge.update([p("g", 9, kind=MetricKind.GAUGE), p("g", 3, kind=MetricKind.GAUGE)])
    assert values(gauge, "delta") == {("g", ()): (3, 1)}


def test_the_example_config_loads() -> None:
    path = Path(__file__).resolve().parents[3] / "config" / "otlp-prometheus.yaml"
    config = load_config(path, factories=factories_by_kind())
    assert config.pipelines["metrics"].exporters == ("otlp", "prometheus")
    assert config.pipelines["logs"].exporters == ("otlp",)
