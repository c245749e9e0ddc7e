"""The enforcement datapath: bpf/fqdn_policy.c, its pinned maps, tc filters, the DNS redirect.

Everything here outlives the proxy process on purpose (issue 8, resilience): the maps are
pinned under ``pin_dir``, the tc filters stay on the veths, and the nftables table that
redirects pod DNS to the proxy stays too. A restarted proxy compiles the program again over
the same pinned maps and swaps each filter with ``replace-filter`` (atomic in the kernel), so
no packet ever meets a veth without the program. :func:`uninstall` removes all of it.

DNS redirect: nftables DNAT in the host netns (``iifname`` in a set of policed veths, any
destination, port 53 → the proxy's address). Conntrack reverses it, so answers carry the
address the pod asked. Chosen over rewriting in eBPF because conntrack already does the
reverse mapping for UDP and TCP and the checksum fixups; only IPv4 DNS is redirected.
"""
from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

import bpf as bpf_sources
from dnsproxy.policy import L4, CidrEntry

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


def lpm_dst(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[bytes, int]:
    """(16 bytes, prefix bits) of a destination prefix as the LPM key holds it: IPv4-mapped."""
    if net.version == 4:
        return bytes(10) + b"\xff\xff" + net.network_address.packed, 96 + net.prefixlen
    return net.network_address.packed, net.prefixlen


@dataclass(frozen=True, slots=True)
class DropEvent:
    ts_ns: int  # CLOCK_MONOTONIC
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    protocol: int
    family: int
    ifindex: int
    length: int
    verdict: int  # VERDICT_*
    tcp_flags: int


class _RawEvent(ctypes.Structure):
    """struct fqdn_event of bpf/flowtel.h (bcc cannot derive ring buffer record types itself)."""

    _fields_ = [("ts_ns", ctypes.c_uint64), ("saddr", ctypes.c_uint8 * 16), ("daddr", ctypes.c_uint8 * 16),
                ("ifindex", ctypes.c_uint32), ("len", ctypes.c_uint32), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("family", ctypes.c_uint8), ("protocol", ctypes.c_uint8),
                ("verdict", ctypes.c_uint8), ("tcp_flags", ctypes.c_uint8)]


def _ip_text(raw: bytes, family: int) -> str:
    return str(ipaddress.ip_address(raw[:4] if family == 4 else raw[:16]))


class Datapath:
    """Loads the program over the pinned maps and keeps tc filters, maps and nft in line."""

    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, *, nft_table: str = DEFAULT_NFT_TABLE,
                 address_label: str = DEFAULT_ADDRESS_LABEL, max_allow: int = 65536, ring_pages: int = 64) -> None:
        from bcc import BPF  # bcc is the system's python3-bpfcc; imported late for unit tests

        self.pin_dir = pin_dir
        self.nft_table = nft_table
        self.address_label = address_label
        _ensure_bpffs_dir(pin_dir)
        self.bpf = BPF(text=bpf_sources.source("fqdn_policy.c").encode(),  # bcc warns on str
                       cflags=bpf_sources.cflags(FQDN_PIN_DIR=f'"{pin_dir}"', FQDN_RING_PAGES=ring_pages,
                                                 FQDN_MAX_ALLOW=max_allow))
        self.from_pod = self.bpf.load_func(b"ftfqdn_from_pod", BPF.SCHED_CLS)
        self.to_pod = self.bpf.load_func(b"ftfqdn_to_pod", BPF.SCHED_CLS)
        self.allow = self.bpf[b"fqdn_allow"]
        self.endpoints = self.bpf[b"fqdn_endpoints"]
        self.cidr = self.bpf[b"fqdn_cidr"]
        self.counters_map = self.bpf[b"fqdn_counters"]
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
        """Allow (pod, dst) until the TTL (plus grace) from now; called before the answer is sent."""
        now = time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
        for pod_ip in pod_ips:
            for dst in dst_ips:
                key = self.allow.Key()
                ctypes.memmove(key.pod, addr16(pod_ip), 16)
                ctypes.memmove(key.dst, addr16(dst), 16)
                val = self.allow.Leaf()
                val.expires_ns = now + ttl_s * 1_000_000_000
                val.until_ns = val.expires_ns + int(grace_s * 1e9)
                old = self.allow.get(key)
                merged = l4
                if old is not None and old.until_ns >= now:
                    # Another name may have opened other ports to the same IP: keep both, longest life.
                    val.expires_ns = max(val.expires_ns, old.expires_ns)
                    val.until_ns = max(val.until_ns, old.until_ns)
                    merged = L4.union([l4, _l4_of(old.l4)]) or l4
                self._fill_l4(val.l4, merged)
                self.allow[key] = val

    def expire(self) -> int:
        """Delete entries past their deadline (the datapath already ignores them); returns how many."""
        now = time.monotonic_ns()
        stale = [k for k, v in self.allow.items() if v.until_ns < now]
        for k in stale:
            try:
                del self.allow[k]
            except KeyError:
                pass
        return len(stale)

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
        """Make fqdn_cidr exactly the given entries (pod IP -> its prefixes)."""
        want: dict[tuple[bytes, bytes, int], CidrEntry] = {}
        for pod_ip, items in entries.items():
            for e in items:
                dst, bits = lpm_dst(e.network)
                want[(addr16(pod_ip), dst, 128 + bits)] = e
        for k in list(self.cidr.keys()):
            if (bytes(k.pod), bytes(k.dst), k.prefixlen) not in want:
                del self.cidr[k]
        for (pod, dst, plen), e in want.items():
            key = self.cidr.Key()
            key.prefixlen = plen
            ctypes.memmove(key.pod, pod, 16)
            ctypes.memmove(key.dst, dst, 16)
            val = self.cidr.Leaf()
            val.deny = 1 if e.l4 is None else 0
            self._fill_l4(val.l4, e.l4 or L4(False))
            self.cidr[key] = val

    def counters(self) -> dict[str, int]:
        """Cumulative datapath counters (the map is pinned, so they survive proxy restarts)."""
        out = {}
        for i, name in enumerate(COUNTER_NAMES):
            out[name] = int(sum(self.counters_map[self.counters_map.Key(i)]))
        return out

    def open_events(self, callback: Callable[[DropEvent], None]) -> None:
        def on_record(_ctx: Any, data: Any, _size: int) -> None:
            ev = ctypes.cast(data, ctypes.POINTER(_RawEvent)).contents
            callback(DropEvent(
                ts_ns=ev.ts_ns, src_ip=_ip_text(bytes(ev.saddr), ev.family), dst_ip=_ip_text(bytes(ev.daddr), ev.family),
                src_port=ev.sport, dst_port=ev.dport, protocol=ev.protocol, family=ev.family,
                ifindex=ev.ifindex, length=ev.len, verdict=ev.verdict, tcp_flags=ev.tcp_flags))

        self.bpf[b"fqdn_events"].open_ring_buffer(on_record)

    def poll_events(self, timeout_ms: int) -> None:
        self.bpf.ring_buffer_poll(timeout_ms)

    # -- tc ----------------------------------------------------------------------------------

    def iface_of(self, ip: str) -> int | None:
        """The host-side interface a pod address is routed to (its veth)."""
        try:
            routes = self.ipr.route("get", dst=ip)
        except NetlinkError:
            return None
        for r in routes:
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
        # Filters a previous proxy left on interfaces no longer policed.
        for link in self.ipr.get_links():
            index = link["index"]
            if index not in ifindexes and self._has_ours(index):
                self._detach(index)

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

    # -- DNS redirect ------------------------------------------------------------------------

    def ensure_listen_address(self, ip: str) -> None:
        """Put the proxy's address on the loopback (labelled, so uninstall finds it) unless the
        host has it already. Loopback rather than a dummy device: not every kernel has dummy,
        and DNAT to any local address is delivered locally the same way."""
        if self.ipr.get_addr(address=ip):
            return
        lo = self.ipr.link_lookup(ifname="lo")[0]
        try:
            self.ipr.addr("add", index=lo, address=ip, prefixlen=32 if ":" not in ip else 128,
                          label=self.address_label)
        except NetlinkError as exc:
            if exc.code != _EEXIST:
                raise

    def sync_redirect(self, ifnames: list[str], listen_ip: str, listen_port: int) -> None:
        """DNAT port 53 arriving on the policed veths to the proxy (one atomic nft transaction)."""
        t = self.nft_table
        elements = ", ".join(f'"{n}"' for n in sorted(ifnames))
        script = (
            f"table ip {t} {{}}\n"
            f"delete table ip {t}\n"
            f"table ip {t} {{\n"
            f"  set policed {{ type ifname; {('elements = { ' + elements + ' }') if elements else ''} }}\n"
            f"  chain prerouting {{\n"
            f"    type nat hook prerouting priority dstnat; policy accept;\n"
            f"    iifname @policed meta l4proto {{ tcp, udp }} th dport 53 dnat to {listen_ip}:{listen_port}\n"
            f"  }}\n"
            f"}}\n"
        )
        res = subprocess.run([_nft(), "-f", "-"], input=script, text=True, capture_output=True)
        if res.returncode:
            raise RuntimeError(f"nft failed: {res.stderr.strip()}")

    def close(self) -> None:
        """Leave filters, maps and the redirect in place (see the module doc); free the process side."""
        self.ipr.close()
        self.bpf.cleanup()


def _l4_of(raw: Any) -> L4:
    from dnsproxy.policy import PortRange

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


def _nft() -> str:
    path = shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)
    if path is None:
        raise RuntimeError("nft not found: install nftables (the DNS redirect needs it)")
    return path


def _ensure_bpffs_dir(pin_dir: str) -> None:
    root = Path("/sys/fs/bpf")
    if not os.path.ismount(root):
        subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True)
    Path(pin_dir).mkdir(parents=True, exist_ok=True)


def uninstall(pin_dir: str = DEFAULT_PIN_DIR, *, nft_table: str = DEFAULT_NFT_TABLE,
              address_label: str = DEFAULT_ADDRESS_LABEL) -> list[str]:
    """Remove everything the proxy leaves in place: filters, nft table, listen address, pins."""
    removed = []
    with IPRoute() as ipr:
        for link in ipr.get_links():
            index = link["index"]
            for parent in (INGRESS_PARENT, EGRESS_PARENT):
                try:
                    ipr.tc("del-filter", "bpf", index=index, handle=FILTER_HANDLE, parent=parent, prio=FILTER_PRIO)
                    removed.append(f"filter {link.get_attr('IFLA_IFNAME')} {parent}")
                except NetlinkError:
                    pass
        for addr in ipr.get_addr(label=address_label):
            ip, plen = addr.get_attr("IFA_ADDRESS"), addr["prefixlen"]
            ipr.addr("del", index=addr["index"], address=ip, prefixlen=plen)
            removed.append(f"address {ip} ({address_label})")
    if subprocess.run([_nft(), "delete", "table", "ip", nft_table], capture_output=True).returncode == 0:
        removed.append(f"nft table {nft_table}")
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir, ignore_errors=True)
        removed.append(f"pins {pin_dir}")
    return removed
