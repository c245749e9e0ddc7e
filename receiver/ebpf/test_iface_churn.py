"""Per-interface totals stay exact for any number of links over the node's life.

Links come and go in batches (4200 in all: more than the 4096 entries of the old hash map,
which was never pruned and after that stopped counting new interfaces), with only
``max_interfaces`` = 256 counter slots: a link's slot is reused once it is gone, and its counts
stay in the node's totals. Every link sends or receives one frame, and the totals are checked
against the kernel's own per-device counters (sysfs statistics, read before each link goes).
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from flowtel.component import CreateSettings, Telemetry
from flowtel.records import LostEvents, Record
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.receiver import EbpfReceiver

pytestmark = pytest.mark.kernel

PAIRS_PER_BATCH = 100   # 200 links at once, within the 256 slots
BATCHES = 21            # 4200 links over the test
SLOTS = 256
ETH_P_EXPERIMENTAL = 0x88B5  # IEEE local experimental ethertype: no stack takes it
FRAME = 60


class _Sink:
    def __init__(self) -> None:
        self.records: list[Record] = []

    def wants(self, signal: str) -> bool:
        return signal == "logs"

    def consume(self, batch: list[Record]) -> None:
        self.records.extend(batch)


def _prefix() -> str:
    return f"ftc{os.getpid() % 100000}x"


def _cleanup(prefix: str) -> None:
    for name in os.listdir("/sys/class/net"):
        if name.startswith(prefix) and name.endswith("a"):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


def _stat(name: str, what: str) -> int:
    return int(Path(f"/sys/class/net/{name}/statistics/{what}").read_text())


def _group(batch: int) -> int:
    """A link group of this run's batch: `ip link del group` removes a batch in one netlink
    request, which the kernel unregisters together (one RCU grace period for all, not one per
    link: 100 pairs one by one take 5-20 s here). Never 0, the default group of every link."""
    return 0x40000000 | (os.getpid() % 0x100000) << 5 | batch


def _make_batch(prefix: str, batch: int) -> list[tuple[str, str]]:
    pairs = [(f"{prefix}{batch}n{i}a", f"{prefix}{batch}n{i}b") for i in range(PAIRS_PER_BATCH)]
    group = _group(batch)
    cmds = "".join(f"link add {a} group {group} type veth peer name {b} group {group}\n" for a, b in pairs)
    subprocess.run(["ip", "-batch", "-"], input=cmds, text=True, check=True)
    for a, b in pairs:  # no IPv6 on them: no router solicitations or MLD, only the test's frames
        for name in (a, b):
            Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
    ups = "".join(f"link set {n} up\n" for pair in pairs for n in pair)
    subprocess.run(["ip", "-batch", "-"], input=ups, text=True, check=True)
    return pairs


def _send_frame(ifname: str) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        frame = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + ETH_P_EXPERIMENTAL.to_bytes(2, "big")
        s.send(frame + b"\x00" * (FRAME - len(frame)))


def _wait_attached(receiver: EbpfReceiver, names: set[str], timeout: float = 60) -> None:
    attach = receiver.attach_manager
    assert attach is not None
    deadline = time.monotonic() + timeout
    while True:
        attached = {i.name for i in attach.attached().values()}
        if names <= attached:
            return
        assert time.monotonic() < deadline, f"{len(names - attached)} links not attached"
        time.sleep(0.05)


def _wait_detached(receiver: EbpfReceiver, names: set[str], timeout: float = 60) -> None:
    attach = receiver.attach_manager
    assert attach is not None
    deadline = time.monotonic() + timeout
    while {i.name for i in attach.attached().values()} & names:
        assert time.monotonic() < deadline, "removed links still attached"
        time.sleep(0.05)


def test_totals_stay_exact_over_more_links_than_the_old_map_held() -> None:
    prefix = _prefix()
    _cleanup(prefix)
    sink = _Sink()
    receiver = EbpfReceiver(
        CreateSettings("ebpf", "test-node", Telemetry()),
        EbpfReceiverConfig(interfaces=[f"{prefix}*"], collection_interval=1.0, max_interfaces=SLOTS,
                           dns={"enabled": False},
                           kernel_events={"drops": {"enabled": False}, "tcp": {"enabled": False}}),
        sink,
    )
    receiver.start()
    expected = {0: [0, 0], 1: [0, 0]}  # hook -> packets, bytes, from the kernel's device counters
    links = 0
    try:
        start = receiver.node_totals()
        for batch in range(BATCHES):
            pairs = _make_batch(prefix, batch)
            names = {n for pair in pairs for n in pair}
            links += len(names)
            _wait_attached(receiver, names)
            for a, _ in pairs:
                _send_frame(a)  # out of a (tc egress on a), into b (tc ingress on b)
            time.sleep(0.05)
            if batch in (0, BATCHES - 1):
                # Each live link's own totals, since it got its (possibly reused) slot.
                per_link = receiver.interface_totals()
                index = {i.name: i.index for i in receiver.attach_manager.attached().values()}  # type: ignore[union-attr]
                for a, b in pairs:
                    assert per_link[(index[a], 1)] == (_stat(a, "tx_packets"), _stat(a, "tx_bytes")), a
                    assert per_link[(index[b], 0)] == (_stat(b, "rx_packets"), _stat(b, "rx_bytes")), b
                    assert per_link[(index[a], 0)] == (_stat(a, "rx_packets"), _stat(a, "rx_bytes")) == (0, 0)
            for a, b in pairs:
                expected[1][0] += _stat(a, "tx_packets") + _stat(b, "tx_packets")
                expected[1][1] += _stat(a, "tx_bytes") + _stat(b, "tx_bytes")
                expected[0][0] += _stat(a, "rx_packets") + _stat(b, "rx_packets")
                expected[0][1] += _stat(a, "rx_bytes") + _stat(b, "rx_bytes")
            # Every link of the batch goes at once (a namespace's teardown does the same); the
            # receiver still sees one RTM_DELLINK per link.
            subprocess.run(["ip", "link", "del", "group", str(_group(batch))], check=True)
            _wait_detached(receiver, names)
        end = receiver.node_totals()
    finally:
        receiver.shutdown()
        _cleanup(prefix)
    assert links > 4096
    assert expected[1][0] == BATCHES * PAIRS_PER_BATCH  # the frames, and nothing else, were sent
    for hook in (0, 1):
        got = (end[hook][0] - start[hook][0], end[hook][1] - start[hook][1])
        assert got == tuple(expected[hook]), f"hook {hook}"
    assert not [r for r in sink.records if isinstance(r, LostEvents) and r.source == "INTERFACE_SLOTS_FULL"]


def test_no_free_slot_is_counted_as_lost() -> None:
    prefix = _prefix() + "f"
    _cleanup(prefix)
    sink = _Sink()
    telemetry = Telemetry()
    receiver = EbpfReceiver(
        CreateSettings("ebpf", "test-node", telemetry),
        EbpfReceiverConfig(interfaces=[f"{prefix}*"], collection_interval=0.5, max_interfaces=16,
                           dns={"enabled": False},
                           kernel_events={"drops": {"enabled": False}, "tcp": {"enabled": False}}),
        sink,
    )
    receiver.start()
    try:
        pairs = [(f"{prefix}{i}a", f"{prefix}{i}b") for i in range(10)]  # 20 links, 16 slots
        subprocess.run(["ip", "-batch", "-"], text=True, check=True,
                       input="".join(f"link add {a} type veth peer name {b}\n" for a, b in pairs))
        for a, b in pairs:
            for name in (a, b):
                Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1")
        subprocess.run(["ip", "-batch", "-"], text=True, check=True,
                       input="".join(f"link set {n} up\n" for p in pairs for n in p))
        _wait_attached(receiver, {n for p in pairs for n in p})
        for a, _ in pairs:
            _send_frame(a)
        slotless = [i for i in receiver.attach_manager.attached().values() if i.slot is None]  # type: ignore[union-attr]
        assert len(slotless) == 4

        def missing() -> int:
            return sum(_stat(i.name, "tx_packets") + _stat(i.name, "rx_packets") for i in slotless)

        def reported() -> int:
            return sum(r.count for r in list(sink.records)
                       if isinstance(r, LostEvents) and r.source == "INTERFACE_SLOTS_FULL")

        deadline = time.monotonic() + 30  # drains every 0.5 s: until they have reported the frames
        while not 0 < missing() == reported():
            assert time.monotonic() < deadline, (missing(), reported())
            time.sleep(0.05)
        # Each slotless link saw exactly the frames the kernel counted on it; all were reported
        # (and the drain at shutdown adds none).
        missing_frames = missing()
        # The kernel's link events all framed; the watch's health is in the agent's telemetry.
        gauges = telemetry.snapshot()
        assert gauges[("ebpf", "link_events_malformed")] == 0 and ("ebpf", "link_relists") in gauges
        assert gauges[("ebpf", "interfaces_attached")] == 20
    finally:
        receiver.shutdown()
        _cleanup(prefix)
    lost = sum(r.count for r in sink.records if isinstance(r, LostEvents) and r.source == "INTERFACE_SLOTS_FULL")
    assert missing_frames > 0 and lost == missing_frames
