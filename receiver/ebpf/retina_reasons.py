"""How Retina files a kernel drop in ``networkobservability_drop_count`` / ``_drop_bytes``.

Retina's dropreason plugin (microsoft/retina ``pkg/plugin/dropreason``) names drops by the
kernel function its probe caught, not by the kernel's ``skb_drop_reason``: ``IPTABLE_RULE_DROP``
(a netfilter rule's verdict, ``nf_hook_slow``), ``IPTABLE_NAT_DROP``, ``TCP_CONNECT_BASIC``,
``TCP_ACCEPT_BASIC``, ``TCP_CLOSE_BASIC``, ``CONNTRACK_ADD_DROP``. Its direction is ``egress``
for ``TCP_CONNECT_BASIC``, ``ingress`` for ``TCP_ACCEPT_BASIC`` and ``unknown`` for every other
reason (its probes do not see which way the packet was going).

For the same event flowtel reports Retina's name and Retina's direction in those two
families, so Retina's dashboards and alerts match. Only one kernel reason is the same event
as one of Retina's: ``NETFILTER_DROP`` is a netfilter rule's drop (``nf_hook_slow``), so
``IPTABLE_RULE_DROP``. (A NAT or conntrack drop is also ``NETFILTER_DROP`` to the kernel and
cannot be told apart; the TCP_* reasons are failed socket calls, not packet drops.) Every
other kernel reason keeps its kernel name and the kernel's direction. The exact kernel reason
and direction stay in the drop flows (``extensions``) and flowtel's own families.
"""
from __future__ import annotations

# kernel skb_drop_reason name -> (Retina's reason, Retina's direction for it)
RETINA_REASONS: dict[str, tuple[str, str]] = {
    "NETFILTER_DROP": ("IPTABLE_RULE_DROP", "unknown"),
}
UNKNOWN_DIRECTION = "unknown"


def retina_drop(kernel_reason: str, kernel_direction: str) -> tuple[str, str]:
    """(reason, direction) as Retina files the drop; the kernel's where Retina has no name."""
    return RETINA_REASONS.get(kernel_reason, (kernel_reason, kernel_direction))
