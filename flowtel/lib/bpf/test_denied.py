"""DeniedDiff: cumulative per-entry counts → per-read deltas and evictions (no kernel needed).

The kernel side (real map, real packets, evictions of a live datapath) is exercised by
tests/integration/test_fqdn_drops_e2e.py; here the arithmetic, including the races a reader
meets (an entry recreated under the same key, the created counter read before the map)."""
from __future__ import annotations

import pytest

from receiver.fqdnpolicy.config import FqdnPolicyReceiverConfig
from flowtel.lib.bpf.denied import DeniedDiff


def decode(raw: bytes) -> tuple[str, str, int, int, int, int, int]:
    # Test keys are b"<dst last octet>": enough to tell entries apart.
    return "10.0.0.1", f"192.0.2.{raw[0]}", 7, 443, 4, 6, 1


def stats(packets: int, nbytes: int, first_ns: int, last_ns: int = 0) -> tuple[int, int, int, int, int, int]:
    return packets, nbytes, first_ns, last_ns or first_ns, 40000, 0x02


def test_baseline_is_not_reported_and_later_packets_are() -> None:
    diff = DeniedDiff()
    diff.baseline({b"\x01": stats(5, 500, 100)}, created=1)
    result = diff.update({b"\x01": stats(8, 800, 100, 900), b"\x02": stats(2, 120, 950)}, created=2, decode=decode)
    got = {(d.dst_ip, d.packets, d.bytes) for d in result.deltas}
    assert got == {("192.0.2.1", 3, 300), ("192.0.2.2", 2, 120)}
    assert result.evicted == 0 and result.live == 2
    first = next(d for d in result.deltas if d.dst_ip == "192.0.2.1")
    assert (first.src_port, first.last_ns, first.tcp_flags, first.ifindex) == (40000, 900, 0x02, 7)


def test_unchanged_entries_yield_nothing() -> None:
    diff = DeniedDiff()
    diff.baseline({}, created=0)
    snap = {b"\x01": stats(4, 400, 100)}
    assert [d.packets for d in diff.update(snap, 1, decode).deltas] == [4]
    assert diff.update(dict(snap), 1, decode).deltas == []


def test_an_entry_evicted_and_recreated_is_reported_whole_and_the_eviction_counted() -> None:
    diff = DeniedDiff()
    diff.baseline({}, created=0)
    diff.update({b"\x01": stats(10, 1000, 100)}, created=1, decode=decode)
    # Evicted, then the next denied packets created it again (new first_ns): fewer packets than before.
    result = diff.update({b"\x01": stats(3, 300, 5000)}, created=2, decode=decode)
    assert [(d.packets, d.bytes) for d in result.deltas] == [(3, 300)]
    assert result.evicted == 1


def test_entries_created_and_evicted_between_two_reads_are_counted_once() -> None:
    diff = DeniedDiff()
    diff.baseline({b"\x01": stats(1, 60, 100)}, created=1)
    # 5 more entries were created; the map holds 2 now: 4 were evicted.
    result = diff.update({b"\x01": stats(1, 60, 100), b"\x09": stats(1, 60, 900)}, created=6, decode=decode)
    assert result.evicted == 4
    assert diff.update({b"\x01": stats(1, 60, 100), b"\x09": stats(1, 60, 900)}, created=6, decode=decode).evicted == 0


def test_created_read_before_a_racing_insert_never_reports_a_false_loss() -> None:
    diff = DeniedDiff()
    diff.baseline({}, created=0)
    # The counter said 1, but by the time the map was read a second entry was there.
    result = diff.update({b"\x01": stats(1, 60, 100), b"\x02": stats(1, 60, 200)}, created=1, decode=decode)
    assert result.evicted == 0 and len(result.deltas) == 2
    # The next read catches the counter up: still nothing evicted.
    assert diff.update({b"\x01": stats(1, 60, 100), b"\x02": stats(1, 60, 200)}, created=2, decode=decode).evicted == 0


def test_evictions_before_the_baseline_belong_to_nobody() -> None:
    diff = DeniedDiff()
    diff.baseline({b"\x01": stats(1, 60, 100)}, created=50)  # 49 evicted before this reader came
    assert diff.update({b"\x01": stats(1, 60, 100)}, created=50, decode=decode).evicted == 0


def test_config_rejects_a_relative_pin_dir_and_too_short_intervals() -> None:
    with pytest.raises(ValueError, match="absolute"):
        FqdnPolicyReceiverConfig(pin_dir="flowtel/dnsproxy")
    with pytest.raises(ValueError, match="100ms"):
        FqdnPolicyReceiverConfig(collection_interval="10ms")
    assert FqdnPolicyReceiverConfig(pin_dir="/sys/fs/bpf/x/").pin_dir == "/sys/fs/bpf/x"
