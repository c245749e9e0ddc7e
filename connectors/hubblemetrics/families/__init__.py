"""Family handlers of the ``hubblemetrics`` connector, by the name a ``metrics:`` entry uses."""
from __future__ import annotations

from typing import Callable

from connectors.hubblemetrics.families import (
    dns, drop, flow, flows_to_world, icmp, lost_events, port_distribution, tcp, unobserved,
)
from connectors.hubblemetrics.handler import Handler
from connectors.hubblemetrics.options import ContextOptions

# create(own options, context) -> handler; a create removes the options it understands.
FAMILIES: dict[str, Callable[[dict[str, str], ContextOptions], Handler]] = {
    "flow": flow.create,
    "drop": drop.create,
    "tcp": tcp.create,
    "dns": dns.create,
    "lost-events": lost_events.create,
    "port-distribution": port_distribution.create,
    "icmp": icmp.create,
    "flows-to-world": flows_to_world.create,
    # Hubble's L7 families flowtel cannot fill: accepted, validated, no series (a warning).
    **{name: unobserved.factory(name) for name in unobserved.NAMES},
}
