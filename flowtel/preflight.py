"""What a component needs from the node before it can start: its preflight requirements.

Each component's factory declares them (``preflight(config)``), next to the code that needs
them, and ``flowtel doctor`` checks exactly what the configured components declare. So a
tracepoint the receiver attaches to is checked by the doctor, and a missing one is a FAIL
in both: the two cannot drift, because there is one list.

These are plain data (frozen, typed): the checks themselves live in ``flowtel.doctor``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True, slots=True)
class BccCompile:
    """bcc imports and compiles a program here (needs bcc, kernel headers, a working clang)."""

    purpose: str


@dataclass(frozen=True, slots=True)
class Btf:
    """``/sys/kernel/btf/vmlinux``: kernel struct offsets are read from it at start-up.

    ``required``: the component fails to start without it (else it degrades, and the doctor
    warns with ``purpose`` saying what is lost)."""

    purpose: str
    required: bool = True


@dataclass(frozen=True, slots=True)
class Tracefs:
    """A mounted, readable tracefs (tracepoint formats and attaching to tracepoints)."""

    purpose: str


@dataclass(frozen=True, slots=True)
class Tracepoint:
    """A tracepoint the component attaches to, and the fields of its record it reads."""

    category: str
    event: str
    fields: tuple[str, ...]
    purpose: str

    @property
    def name(self) -> str:
        return f"{self.category}:{self.event}"


@dataclass(frozen=True, slots=True)
class Bpffs:
    """The bpf filesystem at /sys/fs/bpf (maps pinned there, or read from there)."""

    purpose: str


@dataclass(frozen=True, slots=True)
class BpfPrivileges:
    """CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN) and CAP_NET_ADMIN: load programs, attach tc."""

    purpose: str


@dataclass(frozen=True, slots=True)
class Capabilities:
    """Linux capabilities besides the BPF ones, by name (``CAP_SYS_ADMIN``)."""

    names: tuple[str, ...]
    purpose: str


@dataclass(frozen=True, slots=True)
class Executable:
    """A program the component runs (``nft``), and the Debian package that has it."""

    name: str
    package: str
    purpose: str


@dataclass(frozen=True, slots=True)
class KubernetesAccess:
    """List/watch access to the API server with a component's own credential settings.

    The same value connects the component (``flowtel.lib.kube.client.connect``) and drives
    the doctor's check, so both give the same problems and the same remedies, worded in the
    component's own settings."""

    component: str  # "k8sattributes", "dnsproxy": who connects, in messages
    auth_type: str  # "serviceAccount" | "kubeConfig"
    kubeconfig: str | None
    context: str | None
    # (API group, plural) of every resource the component lists and watches ("" = core).
    resources: tuple[tuple[str, str], ...]
    # How the user switches to a kubeconfig, in the component's own settings.
    use_kubeconfig: str
    # The setting that names the kubeconfig file ("processors.k8sattributes.kubeconfig").
    kubeconfig_setting: str
    # How the component runs in a cluster with its ServiceAccount.
    in_cluster: str
    # The manifest with the component's RBAC.
    rbac_manifest: str
    purpose: str


Requirement = Union[
    BccCompile, Btf, Tracefs, Tracepoint, Bpffs, BpfPrivileges, Capabilities, Executable, KubernetesAccess,
]
