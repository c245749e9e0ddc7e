"""What the ``procfs`` receiver needs from the node: nothing but /proc, unless it reads other
network namespaces (``netns``), which it enters with setns(2)."""
from __future__ import annotations

from typing import Sequence

from flowtel.preflight import Capabilities, Requirement
from receiver.procfs.config import ProcfsReceiverConfig


def preflight(config: ProcfsReceiverConfig) -> Sequence[Requirement]:
    if not config.netns:
        return ()
    return (Capabilities(("CAP_SYS_ADMIN",), "entering the netns namespaces"),)
