"""Node drops as Retina files them: its reason names and directions (microsoft/retina
pkg/plugin/dropreason getDirection and pkg/metrics DropReasonType), written as our own table."""
from __future__ import annotations

import pytest

from receiver.ebpf.kernel_events.decode import drop_points
from receiver.ebpf.retina_reasons import retina_drop


class _Names:
    def __init__(self, names: dict[int, str]) -> None:
        self._names = names

    def drop_reason(self, value: int) -> str:
        return self._names.get(value, f"UNKNOWN_{value}")


@pytest.mark.parametrize("kernel, retina", [
    (("NETFILTER_DROP", "ingress"), ("IPTABLE_RULE_DROP", "unknown")),
    (("NETFILTER_DROP", "egress"), ("IPTABLE_RULE_DROP", "unknown")),
    (("NO_SOCKET", "ingress"), ("NO_SOCKET", "ingress")),
    (("TCP_CSUM", "egress"), ("TCP_CSUM", "egress")),
])
def test_retina_names_and_directions(kernel: tuple[str, str], retina: tuple[str, str]) -> None:
    assert retina_drop(*kernel) == retina


def test_node_drop_points_merge_by_retina_key_and_keep_unknown_directions() -> None:
    names = _Names({2: "NO_SOCKET", 6: "NETFILTER_DROP"})
    # (kernel reason value, kernel direction value) -> (packets, bytes); 7 is a direction the
    # kernel side does not define: unknown, not folded into egress.
    stats = {(6, 0): (4, 400), (6, 1): (6, 600), (2, 0): (8, 80), (2, 7): (1, 10)}
    got = {(p.name, p.attributes["reason"], p.attributes["direction"]): p.value for p in drop_points(stats, names, 1)}
    assert got == {
        ("networkobservability_drop_count", "IPTABLE_RULE_DROP", "unknown"): 10,
        ("networkobservability_drop_bytes", "IPTABLE_RULE_DROP", "unknown"): 1000,
        ("networkobservability_drop_count", "NO_SOCKET", "ingress"): 8,
        ("networkobservability_drop_bytes", "NO_SOCKET", "ingress"): 80,
        ("networkobservability_drop_count", "NO_SOCKET", "unknown"): 1,
        ("networkobservability_drop_bytes", "NO_SOCKET", "unknown"): 10,
    }
