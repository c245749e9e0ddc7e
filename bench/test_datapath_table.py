"""The pure half of the datapath benchmark (bench/datapath_table.py): the parsers against the
clients' real output (iperf3 3.12 JSON and dnsperf 2.10 text, captured on this machine, cut
to the fields read) and the medians/ratios of the table. The benchmark itself is not a test."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from bench.datapath_table import (FLOWTEL, NONE, TCPDUMP, Check, Sample, iperf3_tcp_bits_per_second,
                                  iperf3_udp_received_per_second, parse_conn_client, parse_dnsperf, proc_stat_ticks,
                                  prometheus_sums, render, render_checks, summarize, tcpdump_drops)

IPERF3_TCP = json.loads("""{"start": {}, "intervals": [], "end": {
 "sum_sent": {"start": 0, "end": 1.000339, "seconds": 1.000339, "bytes": 1622671360,
              "bits_per_second": 12976971686.598242, "retransmits": 2, "sender": true},
 "sum_received": {"start": 0, "end": 1.002493, "seconds": 1.002493, "bytes": 1620443136,
                  "bits_per_second": 12931307338.80436, "sender": true}}}""")
IPERF3_UDP = json.loads("""{"start": {}, "intervals": [], "end": {
 "sum": {"start": 0, "end": 1.000272, "seconds": 1.000272, "bytes": 8315520, "bits_per_second": 66519902.72622552,
         "jitter_ms": 0.0045, "lost_packets": 45711, "packets": 129930, "lost_percent": 35.18, "sender": true},
 "sum_sent": {"start": 0, "end": 1.000064, "seconds": 1.000064, "bytes": 8315520, "bits_per_second": 66519902.7,
              "jitter_ms": 0, "lost_packets": 0, "packets": 129930, "lost_percent": 0, "sender": true},
 "sum_received": {"start": 0, "end": 1.000272, "seconds": 1.000272, "bytes": 5390016,
                  "bits_per_second": 43108402.51451605, "jitter_ms": 0.0045, "lost_packets": 45711,
                  "packets": 129930, "lost_percent": 35.18, "sender": false}}}""")
DNSPERF = """DNS Performance Testing Tool
Version 2.10.0

[Status] Command line: dnsperf -s 127.0.0.1 -p 57612 -d /tmp/q.txt -l 2
[Status] Sending queries (to 127.0.0.1:57612)
[Status] Started at: Mon Dec  7 01:09:29 2026
[Status] Stopping after 2.000000 seconds
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         121752
  Queries completed:    121750 (100.00%)
  Queries lost:         2 (0.00%)

  Response codes:       NOERROR 60876 (50.00%), NXDOMAIN 60874 (50.00%)
  Average packet size:  request 32, response 40
  Run time (s):         2.004758
  Queries per second:   60731.519715

  Average Latency (s):  0.001379 (min 0.000026, max 0.010155)
  Latency StdDev (s):   0.000924
"""


def test_iperf3_tcp_is_the_receivers_rate() -> None:
    assert iperf3_tcp_bits_per_second(IPERF3_TCP) == pytest.approx(12931307338.80436)


def test_iperf3_udp_counts_only_what_the_server_received() -> None:
    # 129 930 sent, 45 711 lost at the server: 84 219 received = its 5 390 016 bytes / 64.
    got = iperf3_udp_received_per_second(IPERF3_UDP)
    assert got == pytest.approx((129930 - 45711) / 1.000272)
    assert got * 1.000272 * 64 == pytest.approx(5390016)


def test_iperf3_error_is_raised_not_read_as_zero() -> None:
    with pytest.raises(ValueError, match="Connection refused"):
        iperf3_tcp_bits_per_second({"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"})


def test_dnsperf_statistics() -> None:
    r = parse_dnsperf(DNSPERF)
    assert (r.sent, r.completed, r.lost) == (121752, 121750, 2)
    assert r.run_time_s == pytest.approx(2.004758)
    assert r.qps == pytest.approx(60731.519715)


def test_dnsperf_without_statistics_is_an_error() -> None:
    with pytest.raises(ValueError, match="Queries per second"):
        parse_dnsperf(DNSPERF.split("Statistics:")[0])


def test_conn_client_line() -> None:
    assert parse_conn_client('{"connections": 7000, "errors": 3, "seconds": 2.0}\n') == 3500.0
    with pytest.raises(ValueError, match="5 errors"):
        parse_conn_client('{"connections": 0, "errors": 5, "seconds": 2.0}')


def test_proc_stat_counts_from_the_last_parenthesis() -> None:
    # A command name may hold spaces and ')': fields are counted after the last ')'.
    stat = "6058 (we ird) x) R 5823 5823 29097 0 -1 4194304 99 0 0 0 17 5 0 0 20 0 1 0 467295 3133440 382"
    assert proc_stat_ticks(stat) == (5823, 22)
    real = open("/proc/self/stat").read()
    ppid, _ = proc_stat_ticks(real)
    import os
    assert ppid == os.getppid()


def test_tcpdump_summary() -> None:
    err = "listening on x\n10 packets captured\n1035404 packets received by filter\n6212 packets dropped by kernel\n"
    assert tcpdump_drops(err) == (1035404, 6212)
    assert tcpdump_drops("listening on x\n") is None


def _samples() -> list[Sample]:
    # Three rounds of the UDP flood: no observer 100/110/90, flowtel 99/100/50, tcpdump 80/88/72.
    out = []
    for r, (n, f, t) in enumerate([(100, 99, 80), (110, 100, 88), (90, 50, 72)]):
        out.append(Sample("udp64", NONE, r, n))
        out.append(Sample("udp64", FLOWTEL, r, f, observer_cores=0.01 * (r + 1), busy_after_tail=r == 2))
        out.append(Sample("udp64", TCPDUMP, r, t, observer_cores=0.2))
    return out


def test_summary_is_ratio_of_medians_with_per_round_spread() -> None:
    (row,) = summarize(_samples())
    assert row.workload.key == "udp64" and row.rounds == 3
    assert row.base == 100
    assert row.ratio[FLOWTEL] == pytest.approx(0.99)  # median 99 / median 100
    assert row.ratio[TCPDUMP] == pytest.approx(0.80)
    assert row.spread[FLOWTEL] == pytest.approx((50 / 90, 0.99))  # round 3 was bad, round 1 best
    assert row.flowtel_vs_tcpdump == pytest.approx(0.99 / 0.80)
    assert row.cores[FLOWTEL] == pytest.approx(0.02)
    assert row.cores[TCPDUMP] == pytest.approx(0.2)
    assert row.cores_lower_bound == {FLOWTEL: True, TCPDUMP: False}


def test_render_says_which_targets_are_missed() -> None:
    rows = summarize(_samples() + [Sample("tcp", NONE, 0, 10e9), Sample("tcp", FLOWTEL, 0, 9.0e9, 0.2),
                                   Sample("tcp", TCPDUMP, 0, 9.5e9, 0.1)])
    text = render(rows, idle_cores=0.02, rss_mb=250)
    lines = text.splitlines()
    tcp = next(line for line in lines if line.startswith("| TCP, 1 stream"))
    udp = next(line for line in lines if line.startswith("| UDP 64-byte"))
    assert "10 Gbit/s" in tcp and "0.90 (0.90–0.90)" in tcp and tcp.count("**no**") == 3
    assert "0.1 k/s" in udp and "0.99 (0.56–0.99)" in udp and "**no**" not in udp
    assert "| ≥ 0.020 |" in udp and "lower bound" in text and "| 0.200 |" in udp
    assert "idle: 0.0200 cores (target ≤ 0.01: **no**)" in text
    assert "250 MB" in text


def test_prometheus_sums_add_every_series_of_a_name() -> None:
    text = """# HELP networkobservability_forward_count Total forwarded packets
# TYPE networkobservability_forward_count counter
networkobservability_forward_count{direction="ingress"} 149759
networkobservability_forward_count{direction="egress"} 10 1700000000000
hubble_lost_events_total{source="perf_event_ring_buffer",note="a } in a value"} 5
hubble_lost_events_total{source="observer_events_queue"} 2.5
networkobservability_forward_count_created 1.7e9
"""
    got = prometheus_sums(text, ["networkobservability_forward_count", "hubble_lost_events_total", "absent"])
    assert got == {"networkobservability_forward_count": 149769.0, "hubble_lost_events_total": 7.5}


def test_checks_table_shows_counted_over_truth() -> None:
    text = render_checks([Check(0, 149759, 149759, 100, 200, 20413, 16624, 25863)])
    row = text.splitlines()[-1]
    assert row.startswith("| 1 | 149,759 / 149,759 = 1.0000 | 100 / 200 = 0.5000 | 20,413 / 16,624 = 1.2279 | 25,863 |")
    assert "/ 0 |" in render_checks([Check(1, 5, 0, 0, 0, 0, 0, 0)])


def test_the_bench_runs_the_shipped_config_with_only_the_shared_machine_changes(tmp_path: Path) -> None:
    """bench/datapath.py claims to measure config/flowtel.yaml as shipped: the rewritten file
    must validate as an agent config and differ only in interfaces, the flow log, endpoints
    and the fqdnpolicy pin directory."""
    from bench.datapath import SHIPPED_CONFIG, shipped_config
    from flowtel.config import load_config
    from flowtel.registry import factories_by_kind

    path, prometheus = shipped_config("ftb1234p*", tmp_path)
    load_config(path, factories=factories_by_kind())  # raises ConfigError naming the key on anything the agent would reject
    shipped, bench = yaml.safe_load(SHIPPED_CONFIG.read_text()), yaml.safe_load(path.read_text())
    assert bench["receivers"]["ebpf"]["interfaces"] == ["ftb1234p*"]
    assert Path(bench["exporters"]["file"]["path"]).parent == tmp_path
    assert prometheus == bench["exporters"]["prometheus"]["endpoint"]
    endpoints = [prometheus] + [e["endpoint"] for e in bench["extensions"].values() if "endpoint" in e]
    assert all(e.startswith("127.0.0.1:") and e not in ("127.0.0.1:9965", "127.0.0.1:4245") for e in endpoints)
    assert Path(bench["receivers"]["fqdnpolicy"]["pin_dir"]).parent == tmp_path

    def without_changes(cfg: dict[str, Any]) -> dict[str, Any]:
        cfg = copy.deepcopy(cfg)
        for keys in (("receivers", "ebpf", "interfaces"), ("receivers", "fqdnpolicy", "pin_dir"),
                     ("exporters", "file", "path"), ("exporters", "prometheus", "endpoint")):
            node = cfg
            for k in keys[:-1]:
                node = node[k]
            node.pop(keys[-1])
        for ext in cfg.get("extensions", {}).values():
            if isinstance(ext, dict):
                ext.pop("endpoint", None)
        return cfg

    assert without_changes(bench) == without_changes(shipped)
