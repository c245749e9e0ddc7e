"""The DNS redirect: policed pods' DNS, to any resolver address, over IPv4 and IPv6, into the proxy.

nftables TPROXY in the host netns, one ``inet`` table for both families: a UDP or TCP packet
arriving on a policed veth for port 53 is handed to the proxy's transparent socket *without
being rewritten*, marked, and delivered locally by a policy route (``fwmark`` → a table
holding ``local 0.0.0.0/0 dev lo`` and ``local ::/0 dev lo``; the kernel's forward path drops
a packet that already has a socket, so the route is required). Because the packet keeps its
destination, the proxy reads the resolver the pod asked from the socket itself, at no extra
cost per query: ``IP_RECVORIGDSTADDR`` / ``IPV6_RECVORIGDSTADDR`` on each datagram,
``getsockname`` of each accepted TCP connection. It answers from that same address
(``IP_PKTINFO`` / ``IPV6_PKTINFO`` on a transparent UDP socket; an accepted TCP socket has it
as its local address), so the pod sees its own resolver answer.

The chain runs after DNAT (priority ``dstnat + 10``): a query to the cluster DNS Service IP
has been DNATed by kube-proxy to a DNS endpoint, which the proxy then reads and asks, and
conntrack turns its answer's source back into the Service IP.

Chosen over the DNAT this replaced: DNAT rewrites the destination, and for UDP the only way
back to it is a conntrack netlink lookup per query (``SO_ORIGINAL_DST`` exists for TCP only).
Cilium's DNS proxy uses TPROXY for the same reason.

A redirected packet that finds no proxy socket (the proxy is restarting, or IPv6 without an
IPv6 listener) matches the next rule, a counted drop: DNS from a policed pod never escapes
the proxy. The table is replaced in one nft transaction (atomic), and the policy rules and
routes are added before the first table that marks and never removed by a restart (and put
back each round if something deletes them), so a restart has no window either way. Everything here outlives the process;
:func:`remove` (called by ``flowtel dnsproxy --uninstall``) deletes it.

Listen addresses. IPv4: ``169.254.20.53`` by default, link-local like NodeLocal DNSCache's
169.254.20.10: never routed beyond the node, so it collides with no real address. IPv6:
:data:`LISTEN6_PREFIX`, a Unique Local prefix (RFC 4193) whose 40-bit global ID was drawn at
random for flowtel, so it collides with no site's own ULA; the default address embeds the
IPv4 listen address in its last 32 bits (two proxies with different IPv4 addresses never
share an IPv6 one). An address the host lacks is added to ``lo`` (IPv4 with the label, IPv6
only inside :data:`LISTEN6_PREFIX`: IPv6 addresses carry no label, and the prefix is how
:func:`remove` recognises the addresses it added). Both sockets are transparent, so an IPv6
address outside the prefix need not exist on the host at all.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("flowtel.dnsproxy.redirect")

DEFAULT_LISTEN = "169.254.20.53"
LISTEN6_PREFIX = ipaddress.IPv6Network("fd62:2c24:1612:53::/64")
DNS_PORT = 53
# One bit of the packet mark, ORed in (other bits stay as kube-proxy, Calico or a service mesh
# set them). Clear of kube-proxy (0x4000, 0x8000), Cilium (0x0f00, upper 16 bits), Calico
# (upper 16 bits), Istio (1337) and the AWS VPC CNI (0x80).
DEFAULT_TPROXY_MARK = 0x40
DEFAULT_ROUTE_TABLE = 0xF1D0  # the same number as the tc filter handle
# Before the main table (32766) and before CNIs' per-pod source rules (the AWS VPC CNI uses
# 512 and 1536), which would otherwise route the marked packet off the node.
DEFAULT_RULE_PRIORITY = 90


def default_listen6(listen4: str) -> str:
    """The IPv6 listen address that goes with an IPv4 one: LISTEN6_PREFIX plus its 32 bits."""
    return str(LISTEN6_PREFIX.network_address + int(ipaddress.IPv4Address(listen4)))


@dataclass(frozen=True, slots=True)
class RedirectConfig:
    nft_table: str
    address_label: str
    listen4: str
    listen6: str | None  # None: a host without IPv6; IPv6 DNS of policed pods is then dropped
    port: int = DNS_PORT
    mark: int = DEFAULT_TPROXY_MARK
    route_table: int = DEFAULT_ROUTE_TABLE
    rule_priority: int = DEFAULT_RULE_PRIORITY

    def validate(self) -> None:
        """Raise ValueError with the remedy when the addresses or port cannot work."""
        if ipaddress.ip_address(self.listen4).version != 4:
            raise ValueError(f"--listen {self.listen4}: an IPv4 address is expected (IPv6 goes to --listen6)")
        if self.listen6 is not None and ipaddress.ip_address(self.listen6).version != 6:
            raise ValueError(f"--listen6 {self.listen6}: an IPv6 address is expected")
        if self.port != DNS_PORT:
            # A UDP answer leaves from the socket's own port; the pod asked port 53 and would
            # discard an answer from any other.
            raise ValueError(f"listen port {self.port}: the transparent redirect answers from the port the pod "
                             f"asked, so the proxy must listen on port {DNS_PORT}")
        if not 0 < self.mark < 1 << 32 or self.mark & (self.mark - 1):
            raise ValueError(f"tproxy mark {self.mark:#x}: one bit is expected")


class Redirect:
    """Keeps the nft table, the policy rule/route and the listen addresses in line."""

    def __init__(self, config: RedirectConfig) -> None:
        config.validate()
        self.config = config

    def install_base(self) -> list[str]:
        """Listen addresses, policy rules and routes: added where missing, never removed on
        restart. Cheap (three small netlink dumps), so the proxy calls it every round and
        restores what someone deleted under it. Returns what it had to add."""
        c = self.config
        added = []
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            if not ipr.get_addr(address=c.listen4):
                _add_addr(ipr, lo, c.listen4, 32, label=c.address_label)
                added.append(f"address {c.listen4}")
            families: list[tuple[int, str]] = [(socket.AF_INET, "0.0.0.0/0")]
            if c.listen6 is not None:
                families.append((socket.AF_INET6, "::/0"))
                if ipaddress.IPv6Address(c.listen6) in LISTEN6_PREFIX and not ipr.get_addr(address=c.listen6):
                    _add_addr(ipr, lo, c.listen6, 128)
                    added.append(f"address {c.listen6}")
            for family, default in families:
                if not ipr.get_routes(family=family, table=c.route_table, type="local", dst_len=0):
                    # Scope host, as `ip route add local` sets it (IPv4 refuses another scope).
                    ipr.route("replace", dst=default, type="local", scope=254, table=c.route_table, oif=lo,
                              family=family)
                    added.append(f"route local {default} table {c.route_table}")
                if not _find_rules(ipr, family, c):
                    ipr.rule("add", family=family, table=c.route_table, priority=c.rule_priority,
                             fwmark=c.mark, fwmask=c.mark)
                    # Per family, as remove() names them: a reader (or a test) that sees one
                    # restored knows whether the other still is missing.
                    added.append(f"rule fwmark {c.mark:#x} lookup {c.route_table} "
                                 f"({'IPv4' if family == socket.AF_INET else 'IPv6'})")
        return added

    def sync(self, ifnames: list[str]) -> None:
        """Redirect port 53 arriving on exactly these veths (one atomic nft transaction)."""
        res = subprocess.run([nft_binary(), "-f", "-"], input=self.ruleset(ifnames), text=True, capture_output=True)
        if res.returncode:
            raise RuntimeError(f"nft failed: {res.stderr.strip()}")

    def ruleset(self, ifnames: list[str]) -> str:
        """The nft script :meth:`sync` applies: replace the table (and an older ``ip`` one)."""
        c = self.config
        t = c.nft_table
        elements = ", ".join(f'"{n}"' for n in sorted(ifnames))
        match = "iifname @policed meta l4proto { tcp, udp } th dport 53"
        mark = f"meta mark set meta mark | {c.mark:#x} accept"
        v6_rule = f"    {match} meta nfproto ipv6 tproxy ip6 to [{c.listen6}]:{c.port} {mark}\n" if c.listen6 else ""
        script = (
            f"table inet {t} {{}}\n"
            f"delete table inet {t}\n"
            # The IPv4-only DNAT table of earlier versions goes in the same transaction.
            f"table ip {t} {{}}\n"
            f"delete table ip {t}\n"
            f"table inet {t} {{\n"
            f"  set policed {{ type ifname; {('elements = { ' + elements + ' }') if elements else ''} }}\n"
            f"  counter no_proxy {{}}\n"
            f"  chain prerouting {{\n"
            # After DNAT (kube-proxy's of the cluster DNS Service IP): every packet of a TCP
            # connection must carry the address the accepted socket has, the DNATed one; before
            # DNAT the handshake's ACK would find only the listener and be reset.
            f"    type filter hook prerouting priority dstnat + 10; policy accept;\n"
            f"    {match} meta nfproto ipv4 tproxy ip to {c.listen4}:{c.port} {mark}\n"
            f"{v6_rule}"
            # No proxy socket (restarting; IPv6 without a listener): drop, never let the query
            # reach the resolver itself.
            f"    {match} counter name no_proxy drop\n"
            f"  }}\n"
            f"}}\n"
        )
        return script


def host_has_ipv6() -> bool:
    """False on a kernel booted with ipv6.disable=1 (no IPv6 sockets, rules or routes at all)."""
    return os.path.isdir("/proc/sys/net/ipv6")


def nft_binary() -> str:
    path = shutil.which("nft") or ("/usr/sbin/nft" if os.path.exists("/usr/sbin/nft") else None)
    if path is None:
        raise RuntimeError("nft not found: install nftables (the DNS redirect needs it)")
    return path


def _add_addr(ipr: IPRoute, index: int, ip: str, prefixlen: int, label: str | None = None) -> None:
    kwargs = {"label": label} if label else {}
    try:
        ipr.addr("add", index=index, address=ip, prefixlen=prefixlen, **kwargs)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:  # an earlier round added it
            raise


def _tables_marking(nft: str, mark: int) -> list[str]:
    """nft tables whose TPROXY rules set this mark bit (what :meth:`Redirect.ruleset` writes)."""
    res = subprocess.run([nft, "list", "ruleset"], capture_output=True, text=True)
    users, table = [], ""
    for line in res.stdout.splitlines():
        if line.startswith("table "):
            table = line.split()[2]
        elif "tproxy" in line and f"meta mark | {mark:#010x}" in line and table not in users:
            users.append(table)
    return users


def _find_rules(ipr: IPRoute, family: int, c: RedirectConfig) -> list[object]:
    out = []
    for rule in ipr.get_rules(family=family):
        if (rule.get_attr("FRA_TABLE") == c.route_table and rule.get_attr("FRA_FWMARK") == c.mark
                and rule.get_attr("FRA_FWMASK") == c.mark and (rule.get_attr("FRA_PRIORITY") or 0) == c.rule_priority):
            out.append(rule)
    return out


def remove(*, nft_table: str, address_label: str, listen6: str | None = None, mark: int = DEFAULT_TPROXY_MARK,
           route_table: int = DEFAULT_ROUTE_TABLE, rule_priority: int = DEFAULT_RULE_PRIORITY) -> list[str]:
    """Delete the nft table (and an older version's ``ip`` table), the policy rules and routes,
    and the listen addresses the proxy added: IPv4 ones by label, IPv6 ones inside
    LISTEN6_PREFIX (``listen6``, and the default companion of each labelled IPv4 address).
    Returns what was removed."""
    removed = []
    nft = nft_binary()
    for nft_family in ("inet", "ip"):
        if subprocess.run([nft, "delete", "table", nft_family, nft_table], capture_output=True).returncode == 0:
            removed.append(f"nft table {nft_family} {nft_table}")
    c = RedirectConfig(nft_table, address_label, DEFAULT_LISTEN, default_listen6(DEFAULT_LISTEN),
                       mark=mark, route_table=route_table, rule_priority=rule_priority)
    # The rules and routes are shared by every proxy using this mark (one per node, but tests
    # and benchmarks run several): kept while another flowtel table still marks with it.
    users = _tables_marking(nft, mark)
    with IPRoute() as ipr:
        families = [(socket.AF_INET, "0.0.0.0/0")] + ([(socket.AF_INET6, "::/0")] if host_has_ipv6() else [])
        if users:
            log.warning("kept the policy rules and routes of mark %#x (table %d): still used by nft table %s",
                        mark, route_table, ", ".join(users))
            families = []
        for af, default in families:
            for _ in _find_rules(ipr, af, c):
                ipr.rule("del", family=af, table=route_table, priority=rule_priority, fwmark=mark, fwmask=mark)
                removed.append(f"rule fwmark {mark:#x} lookup {route_table} ({'IPv4' if af == socket.AF_INET else 'IPv6'})")
            try:
                ipr.route("del", dst=default, type="local", scope=254, table=route_table, family=af)
                removed.append(f"route local {default} table {route_table}")
            except NetlinkError:
                pass
        v6s = {listen6} if listen6 and ipaddress.IPv6Address(listen6) in LISTEN6_PREFIX else set()
        for addr in ipr.get_addr(label=address_label):
            ip, plen = addr.get_attr("IFA_ADDRESS"), addr["prefixlen"]
            ipr.addr("del", index=addr["index"], address=ip, prefixlen=plen)
            removed.append(f"address {ip} ({address_label})")
            v6s.add(default_listen6(ip))
        lo = ipr.link_lookup(ifname="lo")[0]
        for v6 in sorted(v6s) if host_has_ipv6() else []:
            for a6 in ipr.get_addr(family=socket.AF_INET6, index=lo, address=v6):
                ipr.addr("del", index=lo, address=v6, prefixlen=a6["prefixlen"])
                removed.append(f"address {v6}")
    return removed
