"""Datapath.sync_cidrs on a real pinned LPM map: per-pod diffs leave the map exactly what was
asked, across pods added, changed and removed, and across a restart over the pinned map."""
from __future__ import annotations

import ipaddress
import os
from typing import Iterator

import pytest

from dnsproxy.datapath import Datapath, _l4_of, _ip_text, uninstall
from flowtel.lib.policy import L4, CidrEntry, PortRange

pytestmark = pytest.mark.kernel

HTTPS = L4(False, (PortRange(443, 443, 6),))
ANY = L4(True)


@pytest.fixture
def pins() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (bpf)")
    pin_dir = f"/sys/fs/bpf/flowtel/dnsproxy-cidr-{os.getpid()}"
    uninstall(pin_dir, nft_table=f"ftcidr{os.getpid()}", address_label="lo:ftcidr")
    yield pin_dir
    uninstall(pin_dir, nft_table=f"ftcidr{os.getpid()}", address_label="lo:ftcidr")


def _e(net: str, l4: L4 | None) -> CidrEntry:
    return CidrEntry(ipaddress.ip_network(net), l4)


def _map(d: Datapath) -> set[tuple[str, str, L4 | None]]:
    """The kernel map as (pod, destination prefix, ports or None for a hole)."""
    out = set()
    for k, v in d.cidr.items():
        pod = _ip_text(bytes(k.pod), 4 if bytes(k.pod)[4:] == bytes(12) else 6)
        dst, bits = bytes(k.dst), k.prefixlen - 128
        if dst[:12] == bytes(10) + b"\xff\xff":  # IPv4-mapped
            net = ipaddress.ip_network((dst[12:], bits - 96))
        else:
            net = ipaddress.ip_network((dst, bits))
        out.add((pod, str(net), None if v.deny else _l4_of(v.l4)))
    return out


def _expected(entries: dict[str, list[CidrEntry]]) -> set[tuple[str, str, L4 | None]]:
    return {(pod, str(e.network), e.l4) for pod, items in entries.items() for e in items}


def test_per_pod_diffs_keep_the_map_exact(pins: str) -> None:
    d = Datapath(pins, nft_table="x", address_label="lo:x")
    try:
        want = {"10.0.0.1": [_e("192.0.2.0/24", HTTPS), _e("192.0.2.128/25", None)],
                "10.0.0.2": [_e("198.51.100.7/32", ANY)],
                "fd00::1": [_e("2001:db8::/32", HTTPS)]}
        d.sync_cidrs(want)
        assert _map(d) == _expected(want)
        # One pod's prefix replaced and its ports changed, one pod gone, one new; the rest untouched.
        want = {"10.0.0.1": [_e("192.0.2.0/24", ANY), _e("203.0.113.0/24", None)],
                "fd00::1": want["fd00::1"],
                "10.0.0.3": [_e("0.0.0.0/0", HTTPS)]}
        d.sync_cidrs(want)
        assert _map(d) == _expected(want)
        d.sync_cidrs({})
        assert _map(d) == set()
    finally:
        d.close()


def test_a_restarted_proxy_diffs_the_pinned_map(pins: str) -> None:
    earlier = Datapath(pins, nft_table="x", address_label="lo:x")
    earlier.sync_cidrs({"10.0.0.1": [_e("192.0.2.0/24", HTTPS)], "10.0.0.2": [_e("198.51.100.0/24", ANY)]})
    earlier.close()
    d = Datapath(pins, nft_table="x", address_label="lo:x")  # a new process over the same pins
    try:
        want = {"10.0.0.1": [_e("192.0.2.0/24", HTTPS)], "10.0.0.4": [_e("203.0.113.9/32", ANY)]}
        d.sync_cidrs(want)  # 10.0.0.2's entry was never written by this process: removed anyway
        assert _map(d) == _expected(want)
        # A failed sync (here: an address that is none) leaves the map unknown to the proxy: the
        # next sync diffs the whole map again, restoring an entry deleted behind its back.
        for k in list(d.cidr.keys()):
            del d.cidr[k]
        with pytest.raises(ValueError):
            d.sync_cidrs({**want, "not-an-address": [_e("192.0.2.1/32", ANY)]})
        d.sync_cidrs(want)
        assert _map(d) == _expected(want)
    finally:
        d.close()
