"""Traffic direction from the pod's point of view (Hubble's), for every tc-path record."""
from __future__ import annotations

from flowtel.lib.bpf.constants import HEADER
from flowtel.lib.bpf.tcattach import Interface
from flowtel.records import TrafficDirection

HOOK_INGRESS = HEADER.HOOK_INGRESS


def is_pod_interface(iface: Interface) -> bool:
    """A host-side pod interface: the host end of a veth pair (every common CNI's: veth*,
    lxc*, azv*, cali*); anything else (the node's uplink, bridges, tunnels) is not."""
    return iface.kind == "veth"


def traffic_direction(iface: Interface | None, hook: int) -> TrafficDirection:
    """On a host-side veth what the interface receives is what the pod sent (EGRESS); on
    other interfaces (the node's uplink) what it receives is INGRESS."""
    received = hook == HOOK_INGRESS
    if iface is not None and is_pod_interface(iface):
        return TrafficDirection.EGRESS if received else TrafficDirection.INGRESS
    return TrafficDirection.INGRESS if received else TrafficDirection.EGRESS
