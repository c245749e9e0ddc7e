"""The procfs receiver as a component: config, polling a proc tree, problems logged once,
and a Service that carries its points into a metrics pipeline on the interval."""
from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest

from flowtel.component import ComponentConfig, CreateSettings, Exporter, ExporterFactory, Kind, Telemetry
from flowtel.config import ConfigError, parse_config
from flowtel.errors import StartError
from flowtel.pipeline import Service
from flowtel.records import MetricKind, MetricPoint
from flowtel.registry import factories_by_kind
from receiver.procfs.config import ProcfsReceiverConfig
from receiver.procfs.factory import FACTORY
from receiver.procfs.receiver import ProcfsReceiver

TESTDATA = Path(__file__).parent / "testdata"
FILES = ("snmp", "snmp6", "netstat", "dev", "tcp", "tcp6", "udp", "udp6")


class Collect:
    def __init__(self, wants: bool = True) -> None:
        self.batches: list[list[MetricPoint]] = []
        self._wants = wants

    def wants(self, signal: str) -> bool:
        return self._wants and signal == "metrics"

    def consume(self, batch: list) -> None:
        self.batches.append(batch)


def proc_tree(tmp_path: Path, files: tuple[str, ...] = FILES) -> Path:
    """A directory laid out as /proc with the fixture files under net/."""
    (tmp_path / "net").mkdir()
    for name in files:
        shutil.copyfile(TESTDATA / name, tmp_path / "net" / name)
    return tmp_path


def receiver(config: dict, consumer: Collect | None = None) -> ProcfsReceiver:
    cfg = ProcfsReceiverConfig.model_validate(config)
    return ProcfsReceiver(CreateSettings("procfs", "node-1", Telemetry()), cfg, consumer or Collect())


def by_family(points: list[MetricPoint]) -> dict[str, list[MetricPoint]]:
    out: dict[str, list[MetricPoint]] = {}
    for p in points:
        out.setdefault(p.name.removeprefix("networkobservability_"), []).append(p)
    return out


def test_poll_of_a_proc_tree_gives_every_family(tmp_path: Path) -> None:
    rec = receiver({"proc_path": str(proc_tree(tmp_path))})
    fams = by_family(rec.poll_once())
    assert set(fams) == {"tcp_connection_stats", "ip_connection_stats", "udp_connection_stats",
                         "interface_stats", "tcp_state", "tcp_connection_remote", "udp_active_sockets"}
    ip = {p.attributes["statistic_name"]: p.value for p in fams["ip_connection_stats"]}
    assert ip["InOctets"] == 41448227065 and ip["Ip6InOctets"] == 248800
    states = {p.attributes["state"]: p.value for p in fams["tcp_state"]}
    assert states["ESTABLISHED"] == 12 and states["TIME_WAIT"] == 7 and states["LISTEN"] == 3
    assert [p.value for p in fams["udp_active_sockets"]] == [2]
    # Retina's one series: every TCP socket, whatever its state or remote address.
    [remote] = fams["tcp_connection_remote"]
    assert remote.attributes == {"address": "AllIPs"} and remote.kind is MetricKind.GAUGE
    assert remote.value == sum(p.value for p in fams["tcp_state"]) == sum(
        len((TESTDATA / f).read_text().splitlines()) - 1 for f in ("tcp", "tcp6"))
    assert {p.attributes["interface_name"] for p in fams["interface_stats"]} == {"eth0", "ifb0", "ifb1"}
    assert all(p.kind is MetricKind.GAUGE for p in fams["tcp_state"] + fams["udp_active_sockets"])
    assert all(p.kind is MetricKind.SUM for f in ("tcp_connection_stats", "ip_connection_stats",
                                                  "udp_connection_stats", "interface_stats") for p in fams[f])
    assert len({p.time_ns for p in rec.poll_once()}) == 1, "one timestamp per poll"
    assert rec.settings.telemetry.get("procfs", "parse_errors") == 0


def test_disabled_families_and_selection(tmp_path: Path) -> None:
    rec = receiver({
        "proc_path": str(proc_tree(tmp_path, ("snmp", "netstat"))),
        "metrics": {
            "tcp_connection_stats": {"include_statistics": ["TW"], "exclude_statistics": ["TCP.*"]},
            "ip_connection_stats": {"enabled": False},
            "udp_connection_stats": {"enabled": False},
            "interface_stats": {"enabled": False},
            "tcp_state": {"enabled": False},
            "tcp_connection_remote": {"enabled": False},
            "udp_active_sockets": {"enabled": False},
        },
    })
    points = rec.poll_once()
    names = {p.attributes["statistic_name"] for p in points}
    assert {p.name for p in points} == {"networkobservability_tcp_connection_stats"}
    assert "TW" in names and "ListenDrops" in names and "RetransSegs" in names
    assert not [n for n in names if n.startswith("TCP")]
    # Only the files the enabled families need are read: the missing ones are no error.
    assert rec.settings.telemetry.get("procfs", "read_errors") == 0


def test_tcp_connection_remote_without_tcp_state(tmp_path: Path) -> None:
    rec = receiver({"proc_path": str(proc_tree(tmp_path, ("tcp", "tcp6"))),
                    "metrics": {"tcp_state": {"enabled": False}}})
    fams = by_family(rec.poll_once())
    assert "tcp_state" not in fams
    assert [p.value for p in fams["tcp_connection_remote"]] == [
        sum(len((TESTDATA / f).read_text().splitlines()) - 1 for f in ("tcp", "tcp6"))]


def test_ipv4_only_node_is_logged_once_and_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = proc_tree(tmp_path, ("snmp", "netstat", "dev", "tcp", "udp"))
    rec = receiver({"proc_path": str(root)})
    caplog.set_level(logging.INFO, logger="flowtel.receiver.procfs")
    for _ in range(3):
        fams = by_family(rec.poll_once())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings  # snmp6, tcp6, udp6: once each, not once per poll
    assert all("IPv6 is disabled" in w for w in warnings)
    assert rec.settings.telemetry.get("procfs", "read_errors") == 9
    assert not [p for p in fams["ip_connection_stats"] if p.attributes["statistic_name"].startswith("Ip6")]
    assert {p.attributes["state"]: p.value for p in fams["tcp_state"]}["ESTABLISHED"] == 6  # IPv4 only

    caplog.clear()
    shutil.copyfile(TESTDATA / "snmp6", root / "net" / "snmp6")
    fams = by_family(rec.poll_once())
    assert [p for p in fams["ip_connection_stats"] if p.attributes["statistic_name"] == "Ip6InOctets"]
    assert any("can be read again" in r.getMessage() for r in caplog.records)
    caplog.clear()
    (root / "net" / "snmp6").unlink()
    rec.poll_once()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING], "a new failure is reported again"


def test_garbage_is_counted_never_raised(tmp_path: Path) -> None:
    root = proc_tree(tmp_path)
    (root / "net" / "netstat").write_text("TcpExt: A B\nTcpExt: 1\n\x00\x01\x02")
    (root / "net" / "dev").write_bytes(b"\xff\xfe garbage\n")
    (root / "net" / "tcp").write_text("header\nnot a socket\n")
    rec = receiver({"proc_path": str(root)})
    points = rec.poll_once()
    # netstat: short value line, binary line; dev: no header, line without ':'; tcp: one line
    assert rec.settings.telemetry.get("procfs", "parse_errors") == 5
    assert by_family(points)["tcp_state"], "the other files are still reported"
    assert by_family(points)["udp_connection_stats"]


def test_missing_netns_is_skipped_and_host_still_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rec = receiver({"proc_path": str(proc_tree(tmp_path)), "netns": ["flowtel-no-such-netns", "/proc/999999999/ns/net"]})
    for _ in range(2):
        points = rec.poll_once()
    assert points and not [p for p in points if "netns" in p.attributes]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("does not exist" in w for w in warnings)


def test_nothing_is_read_when_no_pipeline_wants_metrics(tmp_path: Path) -> None:
    consumer = Collect(wants=False)
    rec = receiver({"proc_path": str(proc_tree(tmp_path)), "collection_interval": "100ms"}, consumer)
    rec.start()
    time.sleep(0.15)
    rec.shutdown()
    assert consumer.batches == []
    assert rec.settings.telemetry.get("procfs", "polls") == 0


def test_start_refuses_a_proc_path_without_net(tmp_path: Path) -> None:
    rec = receiver({"proc_path": str(tmp_path)})
    with pytest.raises(StartError) as info:
        rec.start()
    assert f"{tmp_path}/net does not exist" in str(info.value) and "proc_path" in info.value.remedy


def _config(receivers: dict) -> dict:
    return {"receivers": receivers, "exporters": {"file": {"path": "/tmp/unused"}},
            "service": {"pipelines": {"metrics": {"receivers": list(receivers), "exporters": ["file"]}}}}


def _config_error(receiver_cfg: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(_config({"procfs": receiver_cfg}), "agent.yaml", environ={}, factories=factories_by_kind())
    return info.value


def test_config_defaults_and_errors() -> None:
    cfg = ProcfsReceiverConfig()
    assert cfg.collection_interval == 10.0
    assert cfg.interfaces == ["*"] and cfg.exclude_interfaces == ["lo"] and cfg.netns == []
    assert cfg.netns_path("pod-a") == "/run/netns/pod-a" and cfg.netns_path("/proc/1/ns/net") == "/proc/1/ns/net"

    err = _config_error({"metrics": {"tcp_connection_stats": {"include_statistics": ["TCP(["]}}})
    assert err.path == "receivers.procfs.metrics.tcp_connection_stats.include_statistics"
    assert "not a valid regular expression" in err.message
    assert _config_error({"metrics": {"tcp_stats": {}}}).message == "unknown key"
    assert _config_error({"metrics": {"tcp_state": {"include_statistics": ["x"]}}}).message == "unknown key"
    assert "at least 100ms" in _config_error({"collection_interval": "10ms"}).message
    assert _config_error({"netns": ["a/b"]}).path == "receivers.procfs.netns"
    assert _config_error({"proc_path": "proc"}).path == "receivers.procfs.proc_path"
    assert _config_error({"interfaces": [" "]}).path == "receivers.procfs.interfaces"


def test_registered_for_metrics_pipelines_only() -> None:
    assert factories_by_kind()[Kind.RECEIVER]["procfs"] is FACTORY
    bad = _config({"procfs": {}})
    bad["service"]["pipelines"] = {"logs": {"receivers": ["procfs"], "exporters": ["file"]}}
    with pytest.raises(ConfigError, match="does not support logs pipelines"):
        parse_config(bad, "agent.yaml", environ={}, factories=factories_by_kind())


# -- in a Service --------------------------------------------------------------------------


class _SinkConfig(ComponentConfig):
    pass


class _Sink(Exporter):
    def __init__(self, settings: CreateSettings, config: _SinkConfig) -> None:
        super().__init__(settings)
        self.batches: list[tuple[int, list[MetricPoint]]] = []
        self.lock = threading.Lock()

    def consume(self, batch: list) -> None:
        with self.lock:
            self.batches.append((time.monotonic_ns(), batch))


def test_service_delivers_points_on_the_interval_and_at_shutdown() -> None:
    factories = {
        Kind.RECEIVER: {"procfs": FACTORY},
        Kind.PROCESSOR: {},
        Kind.EXPORTER: {"sink": ExporterFactory("sink", _SinkConfig, _Sink, signals=("metrics",))},
        Kind.CONNECTOR: {},
        Kind.EXTENSION: {},
    }
    raw = {
        "receivers": {"procfs": {"collection_interval": "200ms"}},  # the real /proc of this machine
        "exporters": {"sink": {}},
        "service": {"pipelines": {"metrics": {"receivers": ["procfs"], "exporters": ["sink"]}}},
    }
    svc = Service(parse_config(raw, "t.yaml", factories=factories, environ={}), node_name="n", factories=factories)
    svc.start()
    sink = svc.exporters["sink"]
    interval = 0.2
    # Until five interval polls arrived (a condition, not a fixed sleep: on a loaded machine the
    # polling thread may be scheduled late; what is checked below is the schedule it keeps).
    deadline = time.monotonic() + 20
    while len(sink.batches) < 5:
        assert time.monotonic() < deadline, sink.batches
        time.sleep(0.02)
    stopping = time.time_ns()
    svc.shutdown()
    times = [batch[0].time_ns for _, batch in sink.batches]
    polls, final = times[:-1], times[-1]
    assert len(polls) >= 5, times
    assert final >= stopping, "the last batch is the poll at shutdown"
    # On the interval: never a burst (the receiver skips missed ticks instead of catching up
    # with back-to-back polls), so at most one poll per tick since the first (one tick of
    # slack: the first poll itself may run late) ...
    span = (polls[-1] - polls[0]) / 1e9
    assert len(polls) - 1 <= span / interval + 1, (span, times)
    # ... and typically one per tick: the median gap is the interval (not the 10 s default, not
    # back to back), whatever one late wake-up of the polling thread did to a single gap.
    gaps = sorted((b - a) / 1e9 for a, b in zip(polls, polls[1:]))
    median = gaps[len(gaps) // 2]
    assert interval / 2 < median < interval * 2, gaps
    for _, batch in sink.batches:
        names = {p.name for p in batch}
        assert "networkobservability_tcp_state" in names and "networkobservability_tcp_connection_stats" in names
        assert all(isinstance(p, MetricPoint) for p in batch)
    assert svc.telemetry.get("procfs", "records_out") == sum(len(b) for _, b in sink.batches)
    assert not [t for t in threading.enumerate() if t.name == "flowtel-procfs" and t.is_alive()]


def test_tcp_state_falls_back_to_proc_files_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def refuse() -> None:
        calls.append(1)
        raise OSError(errno.ENOENT, "No such file or directory")

    monkeypatch.setattr("receiver.procfs.sockdiag.tcp_states", refuse)
    rec = receiver({"metrics": {"tcp_state": {"source": "netlink"}}})  # this machine's /proc
    for _ in range(3):
        states = by_family(rec.poll_once())["tcp_state"]
        assert len(states) >= 11  # from /proc/net/tcp and tcp6, in the same poll as the failure
    assert len(calls) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "/proc/net/tcp" in warnings[0]
