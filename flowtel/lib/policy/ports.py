"""``toPorts`` and ``icmps``: which L4 destinations an allowance covers.

Cilium's limits (pkg/policy/api/rule_validation.go): at most 40 ports per ``toPorts`` item
and 40 ICMP fields per ``icmps`` item; ``endPort`` ranges, but not on DNS rules; L7 rules
not on port 0. The datapath holds :data:`MAX_PORTS` ranges per destination
(``FLOWTEL_FQDN_MAX_PORTS``): ranges are merged first, and what still does not fit is denied
and reported (a degraded policy), never widened to every port.

ICMP types are ranges of the ICMP protocol (1, or 58 for ICMPv6) whose "port" is the type:
the datapath reads the type where a TCP/UDP packet has its destination port.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from flowtel.lib.bpf.constants import HEADER
from flowtel.lib.policy.errors import PolicyError
from flowtel.lib.policy.names import FqdnSelector, parse_fqdn_selector
from flowtel.lib.policy.selectors import only

MAX_PORTS = HEADER.FQDN_MAX_PORTS
CILIUM_MAX_PORTS = 40  # maxPorts in Cilium's rule validation
CILIUM_MAX_ICMP_FIELDS = 40  # maxICMPFields
DNS_PORT = 53
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ANY": 0}
ICMP, ICMPV6 = 1, 58
# Cilium's ICMP type names (pkg/policy/api/icmp.go), per family.
_ICMP4_TYPES = {"EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
                "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
                "Timestamp": 13, "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42,
                "ExtendedEchoReply": 43}
_ICMP6_TYPES = {"DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
                "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130,
                "MulticastListenerReport": 131, "MulticastListenerDone": 132, "RouterSolicitation": 133,
                "RouterAdvertisement": 134, "NeighborSolicitation": 135, "NeighborAdvertisement": 136,
                "RedirectMessage": 137, "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139,
                "ICMPNodeInformationResponse": 140, "InverseNeighborDiscoverySolicitation": 141,
                "InverseNeighborDiscoveryAdvertisement": 142, "HomeAgentAddressDiscoveryRequest": 144,
                "HomeAgentAddressDiscoveryReply": 145, "MobilePrefixSolicitation": 146,
                "MobilePrefixAdvertisement": 147, "DuplicateAddressRequestCodeSuffix": 157,
                "DuplicateAddressConfirmationCodeSuffix": 158, "ExtendedEchoRequest": 160,
                "ExtendedEchoReply": 161}


@dataclass(frozen=True, slots=True)
class PortRange:
    port: int  # 0 = any port
    end_port: int
    protocol: int  # IANA number; 0 = any

    def covers(self, port: int, protocol: int) -> bool:
        if self.protocol and self.protocol != protocol:
            return False
        return self.port == 0 or self.port <= port <= self.end_port


@dataclass(frozen=True, slots=True)
class L4:
    """Ports an allowance covers: every port, or a list of ranges."""

    any_port: bool
    ports: tuple[PortRange, ...] = ()

    def covers(self, port: int, protocol: int) -> bool:
        return self.any_port or any(p.covers(port, protocol) for p in self.ports)

    @staticmethod
    def union(items: Iterable[L4 | None]) -> L4 | None:
        present = [i for i in items if i is not None]
        if not present:
            return None
        if any(i.any_port for i in present):
            return ALL_PORTS
        return L4(False, merge_ranges(p for i in present for p in i.ports))


ALL_PORTS = L4(True)


def merge_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """The same ports in as few ranges as possible (per protocol; overlapping and adjacent
    ranges joined), in a stable order: first appearance of each protocol, then by port."""
    by_proto: dict[int, list[PortRange]] = {}
    for r in ranges:
        by_proto.setdefault(r.protocol, []).append(r)
    out: list[PortRange] = []
    for proto, items in by_proto.items():
        if any(r.port == 0 for r in items):
            out.append(PortRange(0, 0, proto))
            continue
        items.sort(key=lambda r: (r.port, r.end_port))
        start, end = items[0].port, items[0].end_port
        for r in items[1:]:
            if r.port <= end + 1:
                end = max(end, r.end_port)
            else:
                out.append(PortRange(start, end, proto))
                start, end = r.port, r.end_port
        out.append(PortRange(start, end, proto))
    # A range of protocol ANY covers the same range of every protocol: drop those it covers.
    anys = [r for r in out if r.protocol == 0]
    return tuple(r for r in out if r.protocol == 0 or not any(
        a.port == 0 or (a.port <= r.port and r.end_port <= a.end_port) for a in anys))


@dataclass(frozen=True, slots=True)
class PortRule:
    """One ``toPorts`` item: its enforceable ranges and its DNS rules.

    ``dns`` is None for an L4-only item (no ``rules``, or an empty ``rules.dns`` list): Cilium
    then allows every name on those ports, as the proxy does. ``unresolved`` counts ports
    flowtel cannot resolve (named ports): they allow nothing."""

    ports: tuple[PortRange, ...]
    dns: tuple[FqdnSelector, ...] | None
    unresolved: int = 0

    @property
    def any_port(self) -> bool:
        return not self.ports and not self.unresolved


def _is_service_name(name: str) -> bool:
    """An IANA service name (RFC 6335 5.1; Cilium's iana.IsSvcName): 1-15 of a-z, 0-9, '-',
    a letter somewhere, no hyphen at either end or twice in a row."""
    return (0 < len(name) <= 15 and all(c.isascii() and (c.isalnum() or c == "-") for c in name)
            and any(c.isalpha() for c in name) and not name.startswith("-") and not name.endswith("-")
            and "--" not in name)


def _parse_port(p: Any, w: str, dns: bool, notes: list[str]) -> list[PortRange]:
    if not isinstance(p, dict) or "port" not in p:
        raise PolicyError(f"{w}: expected port (and optionally protocol, endPort)")
    only(p, ("port", "protocol", "endPort"), w)
    proto_name = str(p.get("protocol") or "ANY").upper()
    if proto_name not in PROTOCOLS:
        raise PolicyError(f"{w}.protocol: {proto_name!r} is not TCP, UDP, SCTP or ANY")
    raw_port = str(p["port"]).strip()
    try:
        port = int(raw_port, 0) if raw_port.isascii() and raw_port[:1].isdigit() else None
    except ValueError:
        port = None
    if port is None:
        # An IANA service name (a container port's name): Cilium resolves it per destination pod.
        if not _is_service_name(raw_port):
            raise PolicyError(f"{w}.port: {raw_port!r} is neither a port number nor a port name")
        notes.append(f"{w}.port: named port {raw_port!r} cannot be resolved by flowtel (no container ports); "
                     "traffic to it is denied")
        return []
    try:
        end = int(p.get("endPort") or 0)
    except (TypeError, ValueError):
        raise PolicyError(f"{w}.endPort: {p.get('endPort')!r} is not a number") from None
    if dns and end > port:
        raise PolicyError(f"{w}: DNS rules do not support port ranges")
    end = max(end, port)
    if not 0 <= port <= 65535 or end > 65535 or (port == 0 and end != 0):
        raise PolicyError(f"{w}: port {port} / endPort {end} is not a valid range")
    proto = PROTOCOLS[proto_name]
    if dns and proto == 0:  # Cilium: DNS on ANY is DNS over UDP and TCP
        return [PortRange(port, end, 17), PortRange(port, end, 6)]
    return [PortRange(port, end, proto)]


def parse_port_rule(raw: Any, where: str, notes: list[str]) -> PortRule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping")
    only(raw, ("ports", "rules", "serverNames", "terminatingTLS", "originatingTLS", "listener"), where)
    for key in ("serverNames", "terminatingTLS", "originatingTLS", "listener"):
        if raw.get(key):
            raise PolicyError(f"{where}.{key}: TLS inspection and listeners are not supported by flowtel")
    raw_ports = raw.get("ports") or []
    if not isinstance(raw_ports, list):
        raise PolicyError(f"{where}.ports: expected a list")
    if len(raw_ports) > CILIUM_MAX_PORTS:
        raise PolicyError(f"{where}.ports: too many ports, the max is {CILIUM_MAX_PORTS}")
    dns: tuple[FqdnSelector, ...] | None = None
    rules = raw.get("rules")
    has_dns = False
    if rules is not None:
        if not isinstance(rules, dict):
            raise PolicyError(f"{where}.rules: expected a mapping")
        unsupported = sorted(k for k, v in rules.items() if k != "dns" and v)
        if unsupported:
            raise PolicyError(f"{where}.rules: only dns rules are supported, not {unsupported}")
        raw_dns = rules.get("dns")
        if raw_dns is not None and not isinstance(raw_dns, list):
            raise PolicyError(f"{where}.rules.dns: expected a list")
        has_dns = bool(raw_dns)
        if has_dns:
            dns = tuple(parse_fqdn_selector(d, f"{where}.rules.dns[{i}]") for i, d in enumerate(raw_dns or []))
            if not raw_ports:
                raise PolicyError(f"{where}.rules.dns: port 53 must be specified for DNS rules")
    ports: list[PortRange] = []
    unresolved = 0
    for i, p in enumerate(raw_ports):
        got = _parse_port(p, f"{where}.ports[{i}]", has_dns, notes)
        if not got:
            unresolved += 1
        ports.extend(got)
    if has_dns:
        if any(p.port == 0 for p in ports):
            raise PolicyError(f"{where}: L7 rules can not be used when a port is 0")
        other = sorted({p.port for p in ports if p.port != DNS_PORT})
        if other:
            # Cilium proxies DNS on any port; flowtel's redirect takes port 53 only.
            notes.append(f"{where}.rules.dns: DNS rules on ports other than 53 ({', '.join(map(str, other))}) are "
                         "not proxied by flowtel; traffic to those ports is denied")
            ports = [p for p in ports if p.port == DNS_PORT]
            unresolved += 1
    merged = merge_ranges(ports)
    if len(merged) > MAX_PORTS:
        notes.append(f"{where}.ports: {len(merged)} port ranges after merging, the datapath holds {MAX_PORTS} per "
                     "destination; the others are denied")
    return PortRule(merged, dns, unresolved)


def parse_icmps(raw: Any, where: str) -> tuple[PortRange, ...]:
    """``icmps: [{fields: [{type, family}]}]`` as ICMP / ICMPv6 "port" ranges of the type."""
    if not isinstance(raw, list):
        raise PolicyError(f"{where}: expected a list")
    out: list[PortRange] = []
    for i, item in enumerate(raw):
        w = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise PolicyError(f"{w}: expected a mapping with fields")
        only(item, ("fields",), w)
        fields = item.get("fields") or []
        if not isinstance(fields, list):
            raise PolicyError(f"{w}.fields: expected a list")
        if len(fields) > CILIUM_MAX_ICMP_FIELDS:
            raise PolicyError(f"{w}.fields: too many types, the max is {CILIUM_MAX_ICMP_FIELDS}")
        for j, f in enumerate(fields):
            fw = f"{w}.fields[{j}]"
            if not isinstance(f, dict) or "type" not in f:
                raise PolicyError(f"{fw}: expected type (and optionally family)")
            only(f, ("type", "family"), fw)
            family = str(f.get("family") or "IPv4")
            if family not in ("IPv4", "IPv6"):
                raise PolicyError(f"{fw}.family: wrong family: {family} (IPv4 or IPv6)")
            names = _ICMP4_TYPES if family == "IPv4" else _ICMP6_TYPES
            t = f["type"]
            if isinstance(t, int) and not isinstance(t, bool):
                value = t
            elif str(t).isdigit():
                value = int(str(t))
            elif str(t) in names:
                value = names[str(t)]
            else:
                raise PolicyError(f"{fw}.type: {t!r} is not an {family} ICMP type number or name")
            if not 0 <= value <= 255:
                raise PolicyError(f"{fw}.type: {value} is not 0-255")
            out.append(PortRange(value, value, ICMP if family == "IPv4" else ICMPV6))
    return tuple(out)
