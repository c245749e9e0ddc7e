"""What the ``fqdnpolicy`` receiver needs from the node: the bpf filesystem where the
dnsproxy pins its maps, bcc (it reads the map layouts as bcc compiles bpf/flowtel.h), and
the privileges to open pinned maps."""
from __future__ import annotations

from typing import Sequence

from flowtel.preflight import BccCompile, BpfPrivileges, Bpffs, Requirement
from receiver.fqdnpolicy.config import FqdnPolicyReceiverConfig


def preflight(config: FqdnPolicyReceiverConfig) -> Sequence[Requirement]:
    return [
        Bpffs(f"the dnsproxy's pinned maps under {config.pin_dir} (the FQDN allow-list and denied packets)"),
        BccCompile("the pinned maps' layouts come from bpf/flowtel.h as bcc compiles it"),
        BpfPrivileges("opening the pinned maps"),
    ]
