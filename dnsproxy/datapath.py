"""The enforcement datapath: bpf/fqdn_policy.c, its pinned maps, tc filters, the DNS redirect.

Everything here outlives the proxy process on purpose (issue 8, resilience): the maps are
pinned under ``pin_dir``, the tc filters stay on the veths, and the nftables table that
redirects pod DNS to the proxy stays too. A restarted proxy compiles the program again over
the same pinned maps and swaps each filter with ``replace-filter`` (atomic in the kernel), so
no packet ever meets a veth without the program. :func:`uninstall` removes all of it, and
only its own: another proxy's filters (another pin dir) stay.

The DNS redirect (nftables TPROXY, IPv4 and IPv6, with its policy route and listen
addresses) is dnsproxy/redirect.py; :func:`uninstall` removes it too.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

import bpf as bpf_sources
from dnsproxy import redirect
from flowtel.lib.policy import L4, CidrEntry
from flowtel.lib.bpf.denied import DeniedDiff, DeniedLayout, DeniedMapReader
from flowtel.lib.bpf.release import release_compiler_memory

log = logging.getLogger("flowtel.dnsproxy.datapath")

DEFAULT_PIN_DIR = "/sys/fs/bpf/flowtel/dnsproxy"
DEFAULT_NFT_TABLE = "flowtel_dnsproxy"
DEFAULT_ADDRESS_LABEL = "lo:ftdnsproxy"
INGRESS_PARENT = "ffff:fff2"
EGRESS_PARENT = "ffff:fff3"
FILTER_HANDLE = 0xF1D0
# After the agent's observation filter (priority 1), which returns TC_ACT_UNSPEC to go on.
FILTER_PRIO = 2
MODE_ENFORCE, MODE_AUDIT = 1, 2
VERDICT_DROPPED, VERDICT_AUDIT = 1, 2
COUNTER_NAMES = ("allowed_fqdn", "allowed_cidr", "allowed_dns", "allowed_reply", "dropped", "audit",
                 "events_lost", "expired")
_EEXIST, _ENOENT, _ENODEV = errno.EEXIST, errno.ENOENT, errno.ENODEV


def addr16(ip: str) -> bytes:
    """An address as flowtel.h lays it out: 16 bytes, IPv4 in the first 4."""
    packed = ipaddress.ip_address(ip).packed
    return packed + bytes(16 - len(packed))


@functools.lru_cache(maxsize=65536)
def _addr16_cached(ip: str) -> bytes:
    # Pods and answers repeat the same few addresses; parsing text costs more than the map write.
    return addr16(ip)


def lpm_dst(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[bytes, int]:
    """(16 bytes, prefix bits) of a destination prefix as the LPM key holds it: IPv4-mapped."""
    if net.version == 4:
        return bytes(10) + b"\xff\xff" + net.network_address.packed, 96 + net.prefixlen
    return net.network_address.packed, net.prefixlen


@dataclass(frozen=True, slots=True)
class DropEvent:
    """Denied packets of one (pod, interface, destination, port, protocol, verdict) since the
    previous read of the kernel's fqdn_denied counters."""

    ts_ns: int  # CLOCK_MONOTONIC of the most recent packet
    src_ip: str
    dst_ip: str
    src_port: int  # the most recent packet's
    dst_port: int
    protocol: int
    family: int
    ifindex: int
    length: int  # bytes of all the packets
    verdict: int  # VERDICT_*
    tcp_flags: int  # union since the kernel's entry was created
    packets: int = 1


@dataclass(slots=True, eq=False)
class _Written:
    """An fqdn_allow entry as this process last wrote it, with its key and value structs kept
    for the next write (building them costs more than the write itself)."""

    key: Any
    leaf: Any
    expires_ns: int = 0
    until_ns: int = 0
    l4: L4 | None = None  # None: not written yet


# The proxy reads the denied counters for its flow log at most this often (seconds): an
# aggregated record per entry per read, whatever the packet rate.
DENIED_READ_INTERVAL_S = 1.0


def _ip_text(raw: bytes, family: int) -> str:
    return str(ipaddress.ip_address(raw[:4] if family == 4 else raw[:16]))


class Datapath:
    """Loads the program over the pinned maps and keeps tc filters, maps and nft in line."""

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, *, nft_table: str = DEFAULT_NFT_TABLE,
                 address_label: str = DEFAULT_ADDRESS_LABEL, max_allow: int = 65536, max_denied: int = 16384) -> None:
        from bcc import BPF  # bcc is the system's python3-bpfcc; imported late for unit tests

        self.pin_dir = pin_dir
        self.nft_table = nft_table
        self.address_label = address_label
        _ensure_bpffs_dir(pin_dir)
        self.bpf = BPF(text=bpf_sources.source("fqdn_policy.c").encode(),  # bcc warns on str
                       cflags=bpf_sources.cflags(FQDN_PIN_DIR=f'"{pin_dir}"', FQDN_MAX_DENIED=max_denied,
                                                 FQDN_MAX_ALLOW=max_allow))
        self.from_pod = self.bpf.load_func(b"ftfqdn_from_pod", BPF.SCHED_CLS)
        self.to_pod = self.bpf.load_func(b"ftfqdn_to_pod", BPF.SCHED_CLS)
        self.allow = self.bpf[b"fqdn_allow"]
        self.endpoints = self.bpf[b"fqdn_endpoints"]
        self.cidr = self.bpf[b"fqdn_cidr"]
        self.counters_map = self.bpf[b"fqdn_counters"]
        denied = self.bpf[b"fqdn_denied"]
        self._denied = DeniedMapReader(denied.get_fd(), DeniedLayout(denied.Key, denied.Leaf), denied.max_entries)
        self._denied_created = self.bpf[b"fqdn_denied_created"]
        # The proxy's only compile is done: LLVM's freed heap and code pages go back (~100 MB).
        release_compiler_memory()
        self._denied_diff: DeniedDiff | None = None
        self._denied_callback: Callable[[DropEvent], None] | None = None
        self._denied_next = 0.0
        self.live_allowances = 0  # fqdn_allow entries not past their deadline at the last expire()
        # (pod, dst) as 16-byte addresses -> the fqdn_allow entry as this process last wrote it;
        # read and written under _learn_lock only.
        self._written: dict[tuple[bytes, bytes], _Written] = {}
        self._learn_lock = threading.Lock()
        # What sync_cidrs last made the map hold: per pod IP its input list and its LPM keys.
        # None until the first sync, which diffs the whole (pinned, maybe older) map.
        self._cidr_applied: dict[str, list[CidrEntry]] | None = None
        self._cidr_keys: dict[str, dict[tuple[bytes, bytes, int], CidrEntry]] = {}
        self.ipr = IPRoute()
        self.attached: dict[int, str] = {}

    # -- maps ------------------------------------------------------------------------------

    @staticmethod
    def _fill_l4(dst: Any, l4: L4) -> None:
        dst.any_port = 1 if l4.any_port else 0
        ports = l4.ports[: len(dst.ports)]
        if len(l4.ports) > len(dst.ports):
            # Fail closed: the rest are not allowed rather than every port being allowed.
            log.error("more than %d port ranges for one destination; only the first are allowed", len(dst.ports))
        dst.nports = len(ports)
        for i, p in enumerate(ports):
            dst.ports[i].port, dst.ports[i].end_port, dst.ports[i].protocol = p.port, p.end_port, p.protocol

    def learn(self, pod_ips: list[str], dst_ips: list[str], ttl_s: int, grace_s: float, l4: L4) -> None:
        """Allow (pod, dst) until the TTL (plus grace) from now; called before the answer is sent.

        What this process last wrote per entry is remembered: an entry whose deadlines and ports
        already cover the new ones is not written again (an upstream cache counting a TTL down
        answers with the same deadline over and over), and a rewrite merges with the remembered
        value instead of reading the map. An entry this process has not written (a previous
        proxy's, pinned) is read first, so nothing it allowed is narrowed."""
        now = time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        expires = now + ttl_s * 1_000_000_000
        until = expires + int(grace_s * 1e9)
        with self._learn_lock:  # the UDP loop and TCP handlers learn concurrently
            for pod_ip in pod_ips:
                pod = _addr16_cached(pod_ip)
                for dst in dst_ips:
                    raw = (pod, _addr16_cached(dst))
                    entry = self._written.get(raw)
                    fresh = False
                    if entry is not None and entry.until_ns >= now:
                        merged = l4 if entry.l4 in (l4, None) else (L4.union([l4, entry.l4]) or l4)
                        if entry.expires_ns >= expires and entry.until_ns >= until and merged == entry.l4:
                            continue  # the map already allows this for at least as long
                        # Another name may have opened other ports to the same IP: keep both, longest life.
                        new_expires, new_until = max(expires, entry.expires_ns), max(until, entry.until_ns)
                    else:
                        new_expires, new_until, merged = expires, until, l4
                        if entry is None:
                            fresh = True
                            entry = _Written(self.allow.Key(), self.allow.Leaf())
                            ctypes.memmove(entry.key.pod, raw[0], 16)
                            ctypes.memmove(entry.key.dst, raw[1], 16)
                            old = self.allow.get(entry.key)
                            if old is not None and old.until_ns >= now:
                                new_expires = max(new_expires, old.expires_ns)
                                new_until = max(new_until, old.until_ns)
                                merged = L4.union([l4, _l4_of(old.l4)]) or l4
                    leaf = entry.leaf
                    leaf.expires_ns, leaf.until_ns = new_expires, new_until
                    if merged != entry.l4:
                        self._fill_l4(leaf.l4, merged)
                    self.allow[entry.key] = leaf
                    entry.expires_ns, entry.until_ns, entry.l4 = new_expires, new_until, merged
                    if fresh:  # only once written: a failed first write reads the map again next time
                        self._written[raw] = entry

    def expire(self) -> int:
        """Delete entries past their deadline (the datapath already ignores them); returns how many."""
        now = time.monotonic_ns()
        entries = self.allow.items()
        stale = [k for k, v in entries if v.until_ns < now]
        self.live_allowances = len(entries) - len(stale)
        removed = 0
        with self._learn_lock:
            for k in stale:
                raw = (bytes(k.pod), bytes(k.dst))
                written = self._written.get(raw)
                if written is not None and written.until_ns >= now:
                    continue  # learned again since the read above: the map holds the new value
                self._written.pop(raw, None)
                try:
                    del self.allow[k]
                    removed += 1
                except KeyError:
                    pass
            for raw in [r for r, w in self._written.items() if w.until_ns < now]:
                del self._written[raw]  # what an earlier round left (the map entry is gone or stale)
        return removed

    def allowed_entries(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(pod, dst) -> (expires_ns, until_ns) of every learned entry (for tests and status)."""
        out = {}
        for k, v in self.allow.items():
            fam = 4 if bytes(k.pod)[4:] == bytes(12) else 6
            out[(_ip_text(bytes(k.pod), fam), _ip_text(bytes(k.dst), 4 if bytes(k.dst)[4:] == bytes(12) else 6))] = (
                v.expires_ns, v.until_ns)
        return out

    def sync_endpoints(self, modes: dict[str, int]) -> None:
        """Make fqdn_endpoints exactly ``modes`` (pod IP -> MODE_*)."""
        want = {addr16(ip): mode for ip, mode in modes.items()}
        for k in list(self.endpoints.keys()):
            if bytes(k.addr) not in want:
                del self.endpoints[k]
        for raw, mode in want.items():
            key = self.endpoints.Key()
            ctypes.memmove(key.addr, raw, 16)
            val = self.endpoints.Leaf()
            val.mode = mode
            self.endpoints[key] = val

    def sync_cidrs(self, entries: dict[str, list[CidrEntry]]) -> None:
        """Make fqdn_cidr exactly the given entries (pod IP -> its prefixes).

        The first call diffs the whole map (a restarted proxy finds the previous one's pinned
        entries); later calls touch only the pods whose list changed since the previous call
        and, of those, write only the entries that differ: a peer relabelled in a 50,000-pod
        cluster changes the lists of a few pods, not the whole map. If a write fails, what the
        map holds is unknown, so the next call diffs the whole map again."""
        try:
            if self._cidr_applied is None:
                self._sync_cidrs_full(entries)
            else:
                self._sync_cidrs_changed(entries)
        except BaseException:
            self._cidr_applied = None
            raise

    @staticmethod
    def _cidr_want(pod_ip: str, items: list[CidrEntry]) -> dict[tuple[bytes, bytes, int], CidrEntry]:
        pod = addr16(pod_ip)
        want = {}
        for e in items:
            dst, bits = lpm_dst(e.network)
            want[(pod, dst, 128 + bits)] = e
        return want

    def _write_cidr(self, raw: tuple[bytes, bytes, int], e: CidrEntry) -> None:
        key = self.cidr.Key()
        key.prefixlen = raw[2]
        ctypes.memmove(key.pod, raw[0], 16)
        ctypes.memmove(key.dst, raw[1], 16)
        val = self.cidr.Leaf()
        # FLOWTEL_FQDN_CIDR_DENY / _EXCEPT / _ALLOW (bpf/flowtel.h)
        val.deny = 2 if e.deny else (1 if e.l4 is None else 0)
        self._fill_l4(val.l4, e.l4 or L4(False))
        self.cidr[key] = val

    def _delete_cidr(self, raw: tuple[bytes, bytes, int]) -> None:
        key = self.cidr.Key()
        key.prefixlen = raw[2]
        ctypes.memmove(key.pod, raw[0], 16)
        ctypes.memmove(key.dst, raw[1], 16)
        try:
            del self.cidr[key]
        except KeyError:
            pass  # already gone (deleted by hand, or a failed earlier round)

    def _sync_cidrs_full(self, entries: dict[str, list[CidrEntry]]) -> None:
        by_pod = {pod_ip: self._cidr_want(pod_ip, items) for pod_ip, items in entries.items()}
        want = {raw: e for keys in by_pod.values() for raw, e in keys.items()}
        for k in list(self.cidr.keys()):
            if (bytes(k.pod), bytes(k.dst), k.prefixlen) not in want:
                del self.cidr[k]
        for raw, e in want.items():
            self._write_cidr(raw, e)
        self._cidr_keys = by_pod
        self._cidr_applied = dict(entries)

    def _sync_cidrs_changed(self, entries: dict[str, list[CidrEntry]]) -> None:
        applied = self._cidr_applied
        assert applied is not None
        for pod_ip in [p for p in applied if p not in entries]:
            for raw in self._cidr_keys.pop(pod_ip, {}):
                self._delete_cidr(raw)
            del applied[pod_ip]
        for pod_ip, items in entries.items():
            if applied.get(pod_ip) == items:  # identical lists compare element by identity first: cheap
                continue
            new = self._cidr_want(pod_ip, items)
            old = self._cidr_keys.get(pod_ip, {})
            for raw in old.keys() - new.keys():
                self._delete_cidr(raw)
            for raw, e in new.items():
                if old.get(raw) != e:
                    self._write_cidr(raw, e)
            self._cidr_keys[pod_ip] = new
            applied[pod_ip] = items

    def counters(self) -> dict[str, int]:
        """Cumulative datapath counters (the map is pinned, so they survive proxy restarts)."""
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            out[name] = int(sum(self.counters_map[self.counters_map.Key(i)]))
        return out

    def denied_created(self) -> int:
        """Entries ever inserted into fqdn_denied (cumulative, pinned)."""
        return int(sum(self._denied_created[self._denied_created.Key(0)]))

    def open_events(self, callback: Callable[[DropEvent], None]) -> None:
        """Report denied packets to ``callback`` from :meth:`poll_events` on. What the pinned
        counters held before (an earlier proxy's) is the starting point, not reported again."""
        created = self.denied_created()
        self._denied_diff = DeniedDiff()
        self._denied_diff.baseline(self._denied.read(), created)
        self._denied_callback = callback
        self._denied_next = time.monotonic() + DENIED_READ_INTERVAL_S

    def poll_events(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms``; once per DENIED_READ_INTERVAL_S, read the denied counters
        and pass each entry that counted packets since the previous read to the callback."""
        time.sleep(timeout_ms / 1000)
        if self._denied_diff is None or self._denied_callback is None or time.monotonic() < self._denied_next:
            return
        self._denied_next = time.monotonic() + DENIED_READ_INTERVAL_S
        result = self._denied_diff.update(self._denied.read(), self.denied_created(), self._denied.decode_key)
        if result.evicted:
            log.warning("%d denied-packet entries were evicted from fqdn_denied before they were read; "
                        "their latest counts are missing from the flow log", result.evicted)
        for d in result.deltas:
            self._denied_callback(DropEvent(
                ts_ns=d.last_ns, src_ip=d.src_ip, dst_ip=d.dst_ip, src_port=d.src_port, dst_port=d.dst_port,
                protocol=d.protocol, family=d.family, ifindex=d.ifindex, length=d.bytes, verdict=d.verdict,
                tcp_flags=d.tcp_flags, packets=d.packets))

    # -- tc ----------------------------------------------------------------------------------

    def iface_of(self, ip: str) -> int | None:
        """The host-side interface a pod address is routed to (its veth), or None.

        Only a direct route counts: an address reached through a gateway (the default route,
        a pod on another node) would put the policy program on the node's uplink and police
        everything that leaves the node."""
        try:
            routes = self.ipr.route("get", dst=ip)
        except NetlinkError:
            return None
        for r in routes:
            if r.get_attr("RTA_GATEWAY") or r.get_attr("RTA_VIA"):
                return None
            oif = r.get_attr("RTA_OIF")
            if oif:
                return int(oif)
        return None

    def sync_attachments(self, ifindexes: set[int], *, sweep: bool = False) -> None:
        """Filters on exactly these interfaces: (re)placed atomically on each, removed elsewhere.

        ``sweep`` also looks at every other interface for filters an earlier proxy left (one
        netlink dump per interface, so only at start)."""
        for index in ifindexes:
            if index in self.attached:
                continue
            try:
                self._attach(index)
            except NetlinkError as exc:
                if exc.code not in (_ENODEV, _ENOENT):
                    log.error("cannot attach the FQDN policy program to interface %d: %s", index, exc)
                continue
            self.attached[index] = _ifname(self.ipr, index)
            log.info("FQDN policy enforced on %s (index %d)", self.attached[index], index)
        for index in [i for i in self.attached if i not in ifindexes]:
            self._detach(index)
            del self.attached[index]
        if not sweep:
            return
        # Filters a previous proxy over these pins left on interfaces no longer policed. Only
        # those whose program uses this datapath's maps: another proxy's (another pin dir)
        # polices its own pods and is none of this one's business.
        try:
            owned = _pinned_map_ids(self.pin_dir)
            programs = _prog_map_ids()
        except RuntimeError as exc:  # a leftover filter is untidy, not unsafe: keep serving
            log.error("not looking for filters an earlier proxy left: %s", exc)
            return
        for index, parent, prog_id in _policy_filters(self.ipr):
            if index not in ifindexes and prog_id is not None and programs.get(prog_id, set()) & owned:
                _del_filter(self.ipr, index, parent)

    def _attach(self, index: int) -> None:
        try:
            self.ipr.tc("add", "clsact", index=index)
        except NetlinkError as exc:
            if exc.code != _EEXIST:
                raise
        for parent, prog in ((INGRESS_PARENT, self.from_pod), (EGRESS_PARENT, self.to_pod)):
            kwargs = dict(index=index, handle=FILTER_HANDLE, fd=prog.fd, name=_text(prog.name), parent=parent,
                          classid=1, direct_action=True, prio=FILTER_PRIO)
            if self._has_ours(index, parent):
                self.ipr.tc("replace-filter", "bpf", **kwargs)  # atomic swap: no unpoliced instant
            else:
                self.ipr.tc("add-filter", "bpf", **kwargs)

    def _has_ours(self, index: int, parent: str | None = None) -> bool:
        parents = (parent,) if parent else (INGRESS_PARENT, EGRESS_PARENT)
        for p in parents:
            try:
                filters = self.ipr.get_filters(index=index, parent=p)
            except NetlinkError:
                return False
            for msg in filters:
                if msg.get_attr("TCA_KIND") == "bpf" and msg["handle"] == FILTER_HANDLE:
                    return True
        return False

    def _detach(self, index: int) -> None:
        for parent in (INGRESS_PARENT, EGRESS_PARENT):
            try:
                self.ipr.tc("del-filter", "bpf", index=index, handle=FILTER_HANDLE, parent=parent, prio=FILTER_PRIO)
            except NetlinkError as exc:
                if exc.code not in (_ENODEV, _ENOENT, errno.EINVAL):
                    log.warning("removing the FQDN policy filter from interface %d: %s", index, exc)

    def close(self) -> None:
        """Leave filters, maps and the redirect in place (see the module doc); free the process side."""
        self.ipr.close()
        self.bpf.cleanup()


def _l4_of(raw: Any) -> L4:
    from flowtel.lib.policy import PortRange

    if raw.any_port:
        return L4(True)
    return L4(False, tuple(PortRange(raw.ports[i].port, raw.ports[i].end_port, raw.ports[i].protocol)
                           for i in range(raw.nports)))


def _text(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name


def _ifname(ipr: IPRoute, index: int) -> str:
    try:
        return str(ipr.get_links(index)[0].get_attr("IFLA_IFNAME"))
    except (NetlinkError, IndexError):
        return f"if{index}"


def _ensure_bpffs_dir(pin_dir: str) -> None:
    root = Path("/sys/fs/bpf")
    if not os.path.ismount(root):
        subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    Path(pin_dir).mkdir(parents=True, exist_ok=True)


def uninstall(pin_dir: str = DEFAULT_PIN_DIR, *, nft_table: str = DEFAULT_NFT_TABLE,
              address_label: str = DEFAULT_ADDRESS_LABEL, listen6: str | None = None,
              tproxy_mark: int = redirect.DEFAULT_TPROXY_MARK, route_table: int = redirect.DEFAULT_ROUTE_TABLE,
              rule_priority: int = redirect.DEFAULT_RULE_PRIORITY) -> list[str]:
    """Remove what the proxy of ``pin_dir`` leaves in place: its filters, its redirect (nft
    table, listen addresses; the policy rules and routes unless another proxy's table still
    uses them), its pins. Another proxy's filters (another pin dir) stay: see
    :func:`_owned_filters` for how a filter is told to be this proxy's."""
    removed = []
    with IPRoute() as ipr:
        for index, parent in _owned_filters(ipr, pin_dir):
            if _del_filter(ipr, index, parent):
                removed.append(f"filter {_ifname(ipr, index)} {parent}")
    removed += redirect.remove(nft_table=nft_table, address_label=address_label, listen6=listen6, mark=tproxy_mark,
                               route_table=route_table, rule_priority=rule_priority)
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir, ignore_errors=True)
        removed.append(f"pins {pin_dir}")
    return removed


# pyroute2 (0.9.7) does not name TCA_BPF_ID, the id of a tc bpf filter's program; it keeps the
# attribute as UNKNOWN with its type number (include/uapi/linux/pkt_cls.h).
_TCA_BPF_ID = 11


def _filter_prog_id(msg: Any) -> int | None:
    """The program id of a tc bpf filter message, or None when the kernel did not say."""
    opts = msg.get_attr("TCA_OPTIONS")
    if opts is None:
        return None
    for name, value in opts["attrs"]:
        if name == "TCA_BPF_ID":  # a pyroute2 that decodes it
            return int(value)
        if name == "UNKNOWN" and value["header"]["type"] == _TCA_BPF_ID and value["header"]["length"] == 8:
            return int.from_bytes(bytes(value.data[value.offset + 4:value.offset + 8]), "little")
    return None


def _policy_filters(ipr: IPRoute) -> list[tuple[int, str, int | None]]:
    """(ifindex, parent, program id) of every filter at the policy's handle and priority on
    this netns's interfaces, whichever proxy attached it."""
    out = []
    for link in ipr.get_links():
        index = link["index"]
        for parent in (INGRESS_PARENT, EGRESS_PARENT):
            try:
                filters = ipr.get_filters(index=index, parent=parent)
            except NetlinkError:
                continue  # no clsact qdisc, or the interface just went
            for msg in filters:
                if msg.get_attr("TCA_KIND") == "bpf" and msg["handle"] == FILTER_HANDLE \
                        and msg["info"] >> 16 == FILTER_PRIO:
                    out.append((index, parent, _filter_prog_id(msg)))
    return out


def _bpftool(*argv: str) -> Any:
    tool = shutil.which("bpftool") or next((p for p in ("/usr/sbin/bpftool", "/sbin/bpftool")
                                             if os.access(p, os.X_OK)), None)
    if tool is None:
        raise RuntimeError("bpftool not found: install it (scripts/setup.sh does); the proxy needs it to tell its "
                           "own tc filters from another proxy's")
    res = subprocess.run([tool, "-j", *argv], capture_output=True, text=True)
    if res.returncode:
        detail = res.stderr.strip()
        try:  # with -j, bpftool reports its error as JSON on stdout
            detail = detail or str(json.loads(res.stdout).get("error", ""))
        except (ValueError, AttributeError):
            detail = detail or res.stdout.strip()
        hint = (" (listing loaded BPF programs and maps, to tell this proxy's tc filters from others', takes "
                "CAP_SYS_ADMIN: BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_NEXT_ID)"
                if "not permitted" in detail.lower() or not detail else "")
        raise RuntimeError(f"bpftool {' '.join(argv)} failed: {detail or f'exit status {res.returncode}'}{hint}")
    return json.loads(res.stdout or "[]")


def _prog_map_ids() -> dict[int, set[int]]:
    """Every loaded program's id -> the ids of the maps it uses."""
    return {int(p["id"]): set(p.get("map_ids", ())) for p in _bpftool("prog", "show")}


def _map_pins() -> dict[int, list[str]]:
    """Every map's id -> the bpffs paths it is pinned at (none: not pinned)."""
    return {int(m["id"]): list(m.get("pinned", ())) for m in _bpftool("-f", "map", "show")}


def _pinned_map_ids(pin_dir: str) -> set[int]:
    """Ids of the maps pinned under ``pin_dir``: the maps of this proxy's datapath."""
    prefix = os.path.realpath(pin_dir).rstrip("/") + "/"
    return {map_id for map_id, paths in _map_pins().items() if any(p.startswith(prefix) for p in paths)}


def _owned_filters(ipr: IPRoute, pin_dir: str) -> list[tuple[int, str]]:
    """The policy filters that belong to the proxy of ``pin_dir``.

    A filter is this proxy's when its program uses a map pinned under ``pin_dir`` (a restarted
    proxy's new program uses the same pinned maps, so every generation counts). When nothing is
    pinned there any more (the pins were deleted first, or an uninstall was cut short), nothing
    can tell this proxy's filters from another's, so only orphans go: filters whose program's
    maps are pinned nowhere. No running proxy can update such a filter's maps after a restart,
    while a proxy whose pins exist keeps its filters."""
    pins = _map_pins()
    programs = _prog_map_ids()
    prefix = os.path.realpath(pin_dir).rstrip("/") + "/"
    owned = {map_id for map_id, paths in pins.items() if any(p.startswith(prefix) for p in paths)}
    out = []
    for index, parent, prog_id in _policy_filters(ipr):
        maps = programs.get(prog_id, set()) if prog_id is not None else set()
        if owned:
            mine = bool(maps & owned)
        else:
            # Orphan: a known program none of whose maps has a pin (a program with no maps at
            # all is not flowtel's policy program, which always uses its pinned maps).
            mine = bool(maps) and not any(pins.get(m) for m in maps)
        if mine:
            out.append((index, parent))
    return out


def _del_filter(ipr: IPRoute, index: int, parent: str) -> bool:
    try:
        ipr.tc("del-filter", "bpf", index=index, handle=FILTER_HANDLE, parent=parent, prio=FILTER_PRIO)
        return True
    except NetlinkError as exc:
        if exc.code not in (_ENODEV, _ENOENT, errno.EINVAL):
            log.warning("removing the FQDN policy filter from interface %d %s: %s", index, parent, exc)
        return False
