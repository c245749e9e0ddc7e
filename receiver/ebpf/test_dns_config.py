"""The ``dns`` section of the ebpf receiver's config: defaults, and errors that name the key."""
from __future__ import annotations

import re

import pytest

from flowtel.component import Kind
from flowtel.config import ConfigError, parse_config
from flowtel.histogram import DNS_LATENCY_BOUNDS, bucket_index
from flowtel.registry import factories_by_kind
from receiver.ebpf.config import DnsConfig
from receiver.ebpf.dnsring import cflags, latency_bucket_expr


def load(dns: object) -> object:
    return parse_config(
        {"receivers": {"ebpf": {"dns": dns}}, "exporters": {"console": {}},
         "service": {"pipelines": {"logs": {"receivers": ["ebpf"], "exporters": ["console"]}}}},
        "flowtel.yaml", environ={}, factories=factories_by_kind()).component(Kind.RECEIVER, "ebpf").dns  # type: ignore[attr-defined]


def test_defaults_and_durations() -> None:
    d = load({})
    assert (d.enabled, d.ports, d.timeout, d.max_pending, d.capture_bytes) == (True, [53], 5.0, 65536, 512)
    assert (d.sample_rate, d.max_aggregates) == (100, 16384)
    d = load({"ports": [53, 5353], "timeout": "1500ms", "capture_bytes": 1024, "enabled": False})
    assert (d.ports, d.timeout, d.capture_bytes, d.enabled) == ([53, 5353], 1.5, 1024, False)


@pytest.mark.parametrize("dns, path, words", [
    ({"ports": []}, "receivers.ebpf.dns.ports", "at least 1"),
    ({"ports": [0]}, "receivers.ebpf.dns.ports", "1..65535"),
    ({"ports": [53, 53]}, "receivers.ebpf.dns.ports", "repeat"),
    ({"ports": list(range(1, 18))}, "receivers.ebpf.dns.ports", "at most 16"),
    ({"timeout": "0s"}, "receivers.ebpf.dns.timeout", "100ms"),
    ({"timeout": "soon"}, "receivers.ebpf.dns.timeout", "duration"),
    ({"max_pending": 1}, "receivers.ebpf.dns.max_pending", "16"),
    ({"capture_bytes": 500}, "receivers.ebpf.dns.capture_bytes", "power of two"),
    ({"capture_bytes": 16384}, "receivers.ebpf.dns.capture_bytes", "8192"),
    ({"ring_buffer_kb": 100}, "receivers.ebpf.dns.ring_buffer_kb", "power of two"),
    ({"port": 53}, "receivers.ebpf.dns.port", "unknown key"),
    ({"sample_rate": 0}, "receivers.ebpf.dns.sample_rate", "10"),
    ({"max_aggregates": 10}, "receivers.ebpf.dns.max_aggregates", "256"),
])
def test_errors_name_the_key(dns: dict, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(dns)
    assert info.value.path == path and words in info.value.message, info.value


def test_port_list_becomes_one_compiled_comparison_per_port() -> None:
    flags = cflags(DnsConfig.model_validate({"ports": [53, 5353], "sample_rate": 1000, "timeout": 2.0}))
    assert flags["FLOWTEL_IS_DNS_PORT(p)"] == "(((p)==53)||((p)==5353))"
    assert flags["FLOWTEL_DNS_CAPTURE"] == 512 and flags["FLOWTEL_DNS"] == 1
    assert flags["FLOWTEL_DNS_SAMPLE_COST_NS"] == "1000000ULL"  # 1000 samples a second per CPU
    assert flags["FLOWTEL_DNS_TIMEOUT_NS"] == "2000000000ULL"


@pytest.mark.parametrize("ns", [0, 1, 499_999, 500_000, 500_001, 1_000_000, 9_999_999_999, 10_000_000_000,
                                10_000_000_001, 10**15])
def test_kernel_latency_buckets_are_the_histograms_own(ns: int) -> None:
    # The kernel's bucket expression (C) evaluated as Python: same grammar for ?: aside.
    expr = latency_bucket_expr(DNS_LATENCY_BOUNDS).replace("ULL", "")
    py = expr
    while "?" in py:  # ((ns)<=B?i:rest) -> (i if ns<=B else rest), innermost first
        py = re.sub(r"\(\(ns\)<=(\d+)\?(\d+):([^()]*|\([^?]*\))\)", r"(\2 if ns<=\1 else \3)", py)
    assert eval(py, {"ns": ns}) == bucket_index(DNS_LATENCY_BOUNDS, ns / 1e9)
