"""The kernel's set of observed pod interfaces (``dns_pod_ifaces``, bpf/dns.h), kept in step
with the attach manager, so that a DNS message is counted once: at the first pod interface it
crosses, not again where ``skb->ingress_ifindex`` names one of these."""
from __future__ import annotations

import ctypes
import logging
from typing import Any

from flowtel.lib.bpf.constants import HEADER
from flowtel.lib.bpf.tcattach import Interface
from receiver.ebpf.direction import is_pod_interface

log = logging.getLogger(__name__)

POD_IFACE = HEADER.DNS_POD_IFACE


class PodInterfaces:
    """Callbacks for :class:`~flowtel.lib.bpf.tcattach.TcAttachManager` (its watch thread only)."""

    def __init__(self, bpf: Any) -> None:
        self._map = bpf["dns_pod_ifaces"]
        # Pod interfaces the map had no room for: their DNS messages are counted at both pod
        # interfaces they cross (as before this map), which the warning says.
        self.not_tracked = 0

    def attached(self, iface: Interface) -> None:
        """After both filters are in place: from now on its messages are counted at its ingress
        (before, a message it received was not counted there, so it must still count where it
        leaves)."""
        if not is_pod_interface(iface):
            return
        try:
            self._map[ctypes.c_uint32(iface.index)] = ctypes.c_uint8(POD_IFACE)
        except Exception as exc:  # bcc raises a bare Exception for a full map
            self.not_tracked += 1
            log.warning("DNS: pod interface %s (index %d) not tracked (%s; raise max_interfaces): the DNS "
                        "messages between it and other pods are counted twice", iface.name, iface.index, exc)

    def gone(self, iface: Interface) -> None:
        """The link went away with its filters: its index may be reused by a link flowtel does
        not observe, whose messages must then be counted where they reach a pod."""
        try:
            del self._map[ctypes.c_uint32(iface.index)]
        except KeyError:
            pass
