"""What the DNS proxy needs from the node (`flowtel doctor --dnsproxy` checks exactly this).

The proxy is its own process and DaemonSet, not a pipeline component, so its requirements
depend on its flags rather than on an agent config: the kubernetes access of ``--kube``
(the same value :meth:`dnsproxy.kube.KubeSource.connect` connects with) and the pin
directory.
"""
from __future__ import annotations

from typing import Sequence

from dnsproxy.kube import kube_access
from flowtel.preflight import BccCompile, Bpffs, Capabilities, Executable, Requirement


def preflight(*, kube: bool, kubeconfig: str | None, pin_dir: str) -> Sequence[Requirement]:
    out: list[Requirement] = [
        BccCompile("the enforcement program (bpf/fqdn_policy.c) is compiled at start-up"),
        Bpffs(f"the allow-list and denied-packet maps pinned under {pin_dir}, shared with the agent"),
        # As the DaemonSet bounds it (deploy/base/dnsproxy/daemonset.yaml): no CAP_PERFMON,
        # no tracepoints; port 53 needs NET_BIND_SERVICE.
        Capabilities(("CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"),
                     "loading the program, tc filters and the redirect, binding port 53"),
        Executable("nft", "nftables", "the DNS redirect (an nft table of its own)"),
        Executable("bpftool", "bpftool", "telling its own tc filters from others' at start-up and --uninstall"),
    ]
    if kube or kubeconfig:
        out.append(kube_access(kubeconfig))
    return out
