"""Longest-prefix lookup of an address in a set of CIDRs, one dict probe per prefix length.

Clusters use one or two pod-CIDR sizes, so a lookup is one or two dict hits whatever the
number of nodes. Only addresses that no exact-match index knows get here.
"""
from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

V = TypeVar("V")


class PrefixTable(Generic[V]):
    def __init__(self) -> None:
        # (version, prefix length) -> network address as an int -> value; longest first.
        self._tables: dict[tuple[int, int], dict[int, V]] = {}
        self._order: list[tuple[int, int, dict[int, V]]] = []

    def __len__(self) -> int:
        return sum(len(t) for t in self._tables.values())

    def add(self, cidr: str, value: V) -> None:
        net = ipaddress.ip_network(cidr, strict=False)
        key = (net.version, net.prefixlen)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = {}
            self._reorder()
        table[int(net.network_address) >> (net.max_prefixlen - net.prefixlen)] = value

    def remove(self, cidr: str) -> None:
        net = ipaddress.ip_network(cidr, strict=False)
        key = (net.version, net.prefixlen)
        table = self._tables.get(key)
        if table is None:
            return
        table.pop(int(net.network_address) >> (net.max_prefixlen - net.prefixlen), None)
        if not table:
            del self._tables[key]
            self._reorder()

    def lookup(self, ip: str) -> V | None:
        if not self._order:
            return None
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        n, version, bits = int(addr), addr.version, addr.max_prefixlen
        for table_version, prefixlen, table in self._order:
            if table_version == version:
                found = table.get(n >> (bits - prefixlen))
                if found is not None:
                    return found
        return None

    def _reorder(self) -> None:
        # Rebuilt, not changed in place: lookups on other threads iterate the old list.
        self._order = sorted(((v, p, t) for (v, p), t in self._tables.items()), key=lambda e: -e[1])
