"""The DNS request/response matcher on synthetic timestamps: timeouts, id reuse, the bound."""
from __future__ import annotations

import pytest

from receiver.ebpf.dnsmatch import AddResult, PendingTable

S = 1_000_000_000
TIMEOUT = 5 * S


def key(ifindex: int = 3, dns_id: int = 0x1234, client_port: int = 40000) -> tuple:
    return (ifindex, b"\x0a\x00\x00\x01", client_port, b"\x0a\x00\x00\x02", 53, 17, dns_id)


def test_response_within_timeout_matches_once() -> None:
    t = PendingTable[str](TIMEOUT, 16)
    assert t.add(key(), 100, "q") is AddResult.ADDED
    got = t.take(key(), 100 + 2 * S)
    assert got is not None and got.item == "q" and got.ts_ns == 100
    assert t.take(key(), 100 + 3 * S) is None  # a second response has nothing left to match
    assert len(t) == 0 and t.expire(100 * S) == []


def test_unanswered_expires_at_timeout_not_before() -> None:
    t = PendingTable[str](TIMEOUT, 16)
    t.add(key(dns_id=1), 0, "first")
    t.add(key(dns_id=2), 1 * S, "second")
    assert t.expire(TIMEOUT - 1) == []
    assert [p.item for p in t.expire(TIMEOUT)] == ["first"]
    assert [p.item for p in t.expire(TIMEOUT + 1 * S)] == ["second"]
    assert len(t) == 0


def test_late_response_matches_nothing_and_request_still_expires() -> None:
    t = PendingTable[str](TIMEOUT, 16)
    t.add(key(), 0, "q")
    assert t.take(key(), TIMEOUT) is None  # exactly at the timeout is already late
    assert [p.item for p in t.expire(TIMEOUT)] == ["q"]


def test_retransmission_keeps_the_first_request() -> None:
    t = PendingTable[str](TIMEOUT, 16)
    assert t.add(key(), 0, "first") is AddResult.ADDED
    assert t.add(key(), 1 * S, "retry") is AddResult.DUPLICATE
    got = t.take(key(), 2 * S)
    assert got is not None and got.item == "first" and got.ts_ns == 0


def test_id_reuse_after_response_and_after_expiry_starts_new_exchanges() -> None:
    t = PendingTable[str](TIMEOUT, 16)
    t.add(key(), 0, "one")
    assert t.take(key(), 1 * S).item == "one"  # type: ignore[union-attr]
    assert t.add(key(), 2 * S, "two") is AddResult.ADDED
    assert [p.item for p in t.expire(2 * S + TIMEOUT)] == ["two"]
    assert t.add(key(), 8 * S, "three") is AddResult.ADDED
    got = t.take(key(), 8 * S + 10)
    assert got is not None and got.item == "three" and got.ts_ns == 8 * S


def test_observation_points_are_separate_exchanges() -> None:
    t = PendingTable[str](TIMEOUT, 16)
    t.add(key(ifindex=3), 0, "client veth")
    t.add(key(ifindex=4), 10, "server veth")
    assert t.take(key(ifindex=4), 20).item == "server veth"  # type: ignore[union-attr]
    assert t.take(key(ifindex=3), 30).item == "client veth"  # type: ignore[union-attr]


def test_table_is_bounded_and_frees_room_as_exchanges_end() -> None:
    t = PendingTable[int](TIMEOUT, 3)
    assert [t.add(key(dns_id=i), i, i) for i in range(4)] == [AddResult.ADDED] * 3 + [AddResult.FULL]
    assert len(t) == 3
    assert t.take(key(dns_id=3), 10) is None  # the request that did not fit is not tracked
    t.take(key(dns_id=0), 10)
    assert t.add(key(dns_id=3), 11, 3) is AddResult.ADDED
    assert [p.item for p in t.expire(11 + TIMEOUT)] == [1, 2, 3]


def test_slightly_out_of_order_requests_are_never_expired_early() -> None:
    t = PendingTable[str](TIMEOUT, 16)
    t.add(key(dns_id=1), 1000, "later")  # reached user space first, from another CPU
    t.add(key(dns_id=2), 900, "earlier")
    assert t.expire(900 + TIMEOUT) == []  # "earlier" waits behind "later": late, never early
    assert [p.item for p in t.expire(1000 + TIMEOUT)] == ["later", "earlier"]


def test_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        PendingTable[str](0, 16)
    with pytest.raises(ValueError):
        PendingTable[str](TIMEOUT, 0)
