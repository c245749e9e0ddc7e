"""The allow-map write path (Datapath.learn / expire) on a real pinned BPF map: what this process
remembers of its own writes never narrows what the map allows, and skipping a write happens
only when the map already allows at least as much for at least as long."""
from __future__ import annotations

import os
import time
from typing import Iterator

import pytest

from dnsproxy.datapath import Datapath, uninstall
from flowtel.lib.policy import L4, PortRange

pytestmark = pytest.mark.kernel

POD, DST = "10.0.0.1", "192.0.2.10"
HTTPS, HTTP = L4(False, (PortRange(443, 443, 6),)), L4(False, (PortRange(80, 80, 6),))


@pytest.fixture
def pins() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (bpf)")
    pin_dir = f"/sys/fs/bpf/flowtel/dnsproxy-learn-{os.getpid()}"
    uninstall(pin_dir, nft_table=f"ftlearn{os.getpid()}", address_label="lo:ftlearn")
    yield pin_dir
    uninstall(pin_dir, nft_table=f"ftlearn{os.getpid()}", address_label="lo:ftlearn")


def _entry(d: Datapath) -> tuple[int, int, L4]:
    from dnsproxy.datapath import _l4_of, addr16

    key = d.allow.Key()
    key.pod[:] = list(addr16(POD))
    key.dst[:] = list(addr16(DST))
    v = d.allow[key]
    return v.expires_ns, v.until_ns, _l4_of(v.l4)


def test_learn_keeps_the_longest_life_and_every_port_across_processes(pins: str) -> None:
    earlier = Datapath(pins, nft_table="x", address_label="lo:x")  # a previous proxy, same pins
    d = Datapath(pins, nft_table="x", address_label="lo:x")
    try:
        earlier.learn([POD], [DST], 100, 0.0, HTTPS)
        long_expires, long_until, _ = _entry(d)
        # A new process that never wrote the entry reads it first: nothing the earlier one allowed is narrowed.
        d.learn([POD], [DST], 10, 0.0, HTTP)
        expires, until, l4 = _entry(d)
        assert (expires, until) == (long_expires, long_until) and set(l4.ports) == {*HTTPS.ports, *HTTP.ports}
        # Already covered (shorter life, known ports): the map keeps what it had.
        d.learn([POD], [DST], 5, 0.0, HTTP)
        assert _entry(d) == (expires, until, l4)
        # A longer life, or grace, moves the deadlines; the ports stay.
        t0 = time.monotonic_ns()
        d.learn([POD], [DST], 300, 2.0, HTTP)
        expires, until, l4 = _entry(d)
        assert expires >= t0 + 300 * 10**9 and until - expires == 2 * 10**9
        assert set(l4.ports) == {*HTTPS.ports, *HTTP.ports}
        # Another port for the same destination: written at once even though the life is covered.
        d.learn([POD], [DST], 1, 0.0, L4(False, (PortRange(8443, 8443, 6),)))
        assert PortRange(8443, 8443, 6) in _entry(d)[2].ports
    finally:
        earlier.close()
        d.close()


def test_an_expired_entry_is_removed_and_learned_again(pins: str) -> None:
    d = Datapath(pins, nft_table="x", address_label="lo:x")
    try:
        d.learn([POD], [DST], 0, 0.05, HTTP)  # TTL 0 (min TTL not applied here), 50 ms grace
        assert (POD, DST) in d.allowed_entries()
        time.sleep(0.1)
        assert d.expire() == 1 and (POD, DST) not in d.allowed_entries()
        # The process's memory of the write went with it: the same answer again is written again.
        d.learn([POD], [DST], 0, 0.05, HTTP)
        assert (POD, DST) in d.allowed_entries()
    finally:
        d.close()
