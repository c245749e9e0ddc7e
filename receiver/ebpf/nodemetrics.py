"""Node-level ``networkobservability_forward_*`` points from the kernel's per-interface totals.

Direction is the node's, as Retina's packetforward plugin gives it: what a hook at tc ingress
counts entered the node through that interface (``ingress``), what tc egress counts left it
(``egress``). Retina counts only the node's uplink; flowtel sums every attached interface
(host-side veths included), so pod-to-pod traffic on one node counts once into the node (at
the sender's veth) and once out of it (at the receiver's veth). Restrict ``interfaces`` to the
uplink for Retina's exact numbers.
"""
from __future__ import annotations

from flowtel.lib.bpf.constants import HEADER
from flowtel.records import MetricKind, MetricPoint

HOOK_INGRESS = HEADER.HOOK_INGRESS
FORWARD_COUNT = "networkobservability_forward_count"
FORWARD_BYTES = "networkobservability_forward_bytes"


def forward_points(totals: dict[int, tuple[int, int]], now_ns: int) -> list[MetricPoint]:
    """Cumulative packets and bytes by direction, from the node's ``{hook: (packets, bytes)}``.

    Both directions are always emitted (0 until traffic), so a dashboard's rate() has a series
    from the first scrape on.
    """
    sums = {"ingress": [0, 0], "egress": [0, 0]}
    for hook, (packets, nbytes) in totals.items():
        s = sums["ingress" if hook == HOOK_INGRESS else "egress"]
        s[0] += packets
        s[1] += nbytes
    out: list[MetricPoint] = []
    for direction, (packets, nbytes) in sums.items():
        labels = {"direction": direction}
        out.append(MetricPoint(FORWARD_COUNT, packets, MetricKind.SUM, now_ns, dict(labels), "1",
                               "Total forwarded packets"))
        out.append(MetricPoint(FORWARD_BYTES, nbytes, MetricKind.SUM, now_ns, labels, "By",
                               "Total forwarded bytes"))
    return out
