"""`flowtel doctor` checks what the components need, from the components' own declarations
(issue 13, point 5): each factory's ``preflight(config)``. Here the doctor and the ebpf
receiver judge the same tracefs tree, and agree: what the doctor passes the receiver reads,
and a missing tracepoint or field fails both.

The tree is built from real format files of Linux 6.18 (flowtel/lib/bpf/testdata/tracefs).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from flowtel import doctor
from flowtel.component import Factory
from flowtel.config import parse_config
from flowtel.preflight import (
    BccCompile,
    BpfPrivileges,
    Bpffs,
    Btf,
    Capabilities,
    Executable,
    KubernetesAccess,
    Requirement,
    Tracefs,
    Tracepoint,
)
from flowtel.registry import all_factories, factories_by_kind
from flowtel.lib.bpf import btf as btf_mod
from flowtel.lib.bpf import tracefs
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.kernel_events import program
from receiver.ebpf.preflight import preflight as ebpf_preflight

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "flowtel" / "lib" / "bpf" / "testdata" / "tracefs"
REQUIREMENT_TYPES = (BccCompile, Btf, Tracefs, Tracepoint, Bpffs, BpfPrivileges, Capabilities, Executable,
                     KubernetesAccess)


def _tracepoints(config: EbpfReceiverConfig) -> list[Tracepoint]:
    return [r for r in ebpf_preflight(config) if isinstance(r, Tracepoint)]


def _node(tmp_path: Path, *, skip: str = "", drop_field: tuple[str, str] | None = None) -> Path:
    """A node tree whose tracefs holds the real format files, less what a test removes."""
    base = tmp_path / "node"
    for fmt in FIXTURES.glob("*.format"):
        category, event = fmt.stem.split("_", 1)
        if f"{category}:{event}" == skip:
            continue
        text = fmt.read_text()
        if drop_field is not None and drop_field[0] == event:
            text = "".join(line for line in text.splitlines(keepends=True)
                           if not re.search(rf"\b{drop_field[1]};", line))
        target = base / "sys/kernel/tracing/events" / category / event / "format"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return base


def _receiver_reads(base: Path, config: EbpfReceiverConfig) -> str | None:
    """None when the receiver reads every format it needs from the tree, else its error."""
    try:
        program.read_kernel_facts(config.kernel_events, tracefs_root=str(base / "sys/kernel/tracing"),
                                  btf=_BTF_NOT_REACHED)
    except tracefs.TracefsError as exc:
        return str(exc)
    except _BtfReached:
        return None  # formats all read and checked: next comes BTF, which this test leaves out
    return None


class _BtfReached(Exception):
    pass


class _NoBtf(btf_mod.Btf):
    """Stops read_kernel_facts where tracefs ends (BTF is its own doctor check)."""

    def __init__(self) -> None:
        pass

    def offset(self, path: str, size: int | None = None) -> int:
        raise _BtfReached


_BTF_NOT_REACHED = _NoBtf()


def test_the_receiver_declares_every_program_kernel_events_c_defines() -> None:
    source = (ROOT / "bpf" / "kernel_events.c").read_text()
    in_c = set(re.findall(r"^int (flowtel_\w+)\(struct flowtel_tp_(\w+) \*", source, re.M))
    declared = {(fn, event) for fn, (_, event) in {**program.DROP_PROGRAMS, **program.TCP_PROGRAMS}.items()}
    assert in_c == declared
    names = {tp.event for tp in _tracepoints(EbpfReceiverConfig())}
    assert names == {event for _, event in in_c} and len(names) == 6


def test_the_doctor_passes_what_the_receiver_reads(tmp_path: Path) -> None:
    base = _node(tmp_path)
    config = EbpfReceiverConfig()
    results = doctor.check_tracepoints(doctor.Root(str(base)), _tracepoints(config))
    assert [r.name for r in results] == [tp.name for tp in _tracepoints(config)]
    assert all(r.status is doctor.Status.OK for r in results), results
    assert _receiver_reads(base, config) is None


@pytest.mark.parametrize("tracepoint", [tp.name for tp in _tracepoints(EbpfReceiverConfig())])
def test_a_missing_tracepoint_fails_the_doctor_and_the_receiver(tmp_path: Path, tracepoint: str) -> None:
    base = _node(tmp_path, skip=tracepoint)
    config = EbpfReceiverConfig()
    by_name = {r.name: r for r in doctor.check_tracepoints(doctor.Root(str(base)), _tracepoints(config))}
    assert by_name[tracepoint].status is doctor.Status.FAIL
    assert all(r.status is doctor.Status.OK for n, r in by_name.items() if n != tracepoint)
    error = _receiver_reads(base, config)
    assert error is not None and tracepoint in error


def test_a_missing_field_fails_the_doctor_and_the_receiver(tmp_path: Path) -> None:
    base = _node(tmp_path, drop_field=("kfree_skb", "reason"))  # a kernel before 5.17
    config = EbpfReceiverConfig()
    result = {r.name: r for r in doctor.check_tracepoints(doctor.Root(str(base)), _tracepoints(config))}
    assert result["skb:kfree_skb"].status is doctor.Status.FAIL and "reason" in result["skb:kfree_skb"].detail
    error = _receiver_reads(base, config)
    assert error is not None and "reason" in error


def test_what_a_config_turns_off_neither_needs(tmp_path: Path) -> None:
    base = _node(tmp_path, skip="skb:kfree_skb")
    config = EbpfReceiverConfig.model_validate({"kernel_events": {"drops": {"enabled": False}}})
    assert "skb:kfree_skb" not in [tp.name for tp in _tracepoints(config)]
    assert all(r.status is doctor.Status.OK
               for r in doctor.check_tracepoints(doctor.Root(str(base)), _tracepoints(config)))
    assert _receiver_reads(base, config) is None


def test_the_doctor_runs_the_checks_the_configured_components_declare(tmp_path: Path) -> None:
    base = _node(tmp_path)
    (base / "proc/sys/kernel").mkdir(parents=True)
    (base / "proc/sys/kernel/osrelease").write_text("6.18.0\n")
    factories = factories_by_kind()

    def checks(receivers: dict[str, object], pipelines: dict[str, object]) -> set[str]:
        cfg = parse_config({"receivers": receivers, "exporters": {"console": {}, "prometheus": {"endpoint": "127.0.0.1:0"}},
                            "service": {"pipelines": pipelines}}, "t.yaml", factories=factories, environ={})
        return {r.name for r in doctor.run_checks(cfg, root=str(base), factories=factories)}

    # procfs declares nothing: only the node facts every run states; with netns, CAP_SYS_ADMIN.
    metrics = {"metrics": {"receivers": ["procfs"], "exporters": ["prometheus"]}}
    assert checks({"procfs": {}}, metrics) == {"config", "kernel", "kprobes"}
    assert checks({"procfs": {"netns": ["blue"]}}, metrics) == {"config", "kernel", "kprobes", "capabilities"}
    # ebpf without kernel events: bcc and privileges, no tracefs, BTF or tracepoints.
    ebpf = checks({"ebpf": {"kernel_events": {"drops": {"enabled": False}, "tcp": {"enabled": False}}}},
                  {"logs": {"receivers": ["ebpf"], "exporters": ["console"]}})
    assert {"bcc", "kernel headers", "bcc compile", "capabilities"} <= ebpf
    assert not ebpf & {"BTF", "tracefs", "bpffs"} and not any(":" in name for name in ebpf)
    # fqdnpolicy: the bpf filesystem where the proxy pins its maps.
    assert "bpffs" in checks({"fqdnpolicy": {}}, {"logs": {"receivers": ["fqdnpolicy"], "exporters": ["console"]}})


# The settings a component cannot do without (the rest default).
REQUIRED_SETTINGS: dict[str, dict[str, object]] = {
    "file": {"path": "/var/log/flowtel/flows.log"},
    "otlp": {"endpoint": "localhost:4317"},
    "otlphttp": {"endpoint": "http://localhost:4318"},
}


@pytest.mark.parametrize("factory", all_factories(), ids=lambda f: f"{f.kind.value}.{f.type}")
def test_every_factory_declares_typed_requirements(factory: Factory) -> None:
    config = factory.config_class.model_validate(REQUIRED_SETTINGS.get(factory.type, {}))
    requirements: list[Requirement] = list(factory.preflight(config))
    assert all(isinstance(r, REQUIREMENT_TYPES) for r in requirements), requirements
    hash(tuple(requirements))  # the doctor deduplicates them: they are values


def test_no_tracefs_fails_the_doctor_and_the_receiver(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _receiver_reads(empty, EbpfReceiverConfig()) is not None
    results = doctor.check_tracepoints(doctor.Root(str(empty)), _tracepoints(EbpfReceiverConfig()))
    assert [r.status for r in results] == [doctor.Status.FAIL]


# --- the DNS proxy: its own process, its requirements from its flags ----------------------------


def _daemonset_capabilities(path: Path) -> set[str]:
    import yaml

    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "DaemonSet"]
    (ds,) = docs
    (container,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "dnsproxy"]
    return {f"CAP_{name}" for name in container["securityContext"]["capabilities"]["add"]}


def test_the_proxy_declares_the_capabilities_its_daemonset_grants() -> None:
    from dnsproxy.preflight import preflight

    (caps,) = [r for r in preflight(kube=False, kubeconfig=None, pin_dir="/sys/fs/bpf/x") if isinstance(r, Capabilities)]
    granted = _daemonset_capabilities(ROOT / "deploy/base/dnsproxy/daemonset.yaml")
    # What it needs is granted; SYS_RESOURCE is granted only for kernels < 5.11 (map memlock).
    assert set(caps.names) == granted - {"CAP_SYS_RESOURCE"}


def test_the_proxy_needs_kubernetes_access_only_with_kube() -> None:
    from dnsproxy.preflight import preflight

    assert not [r for r in preflight(kube=False, kubeconfig=None, pin_dir="/p") if isinstance(r, KubernetesAccess)]
    (access,) = [r for r in preflight(kube=True, kubeconfig=None, pin_dir="/p") if isinstance(r, KubernetesAccess)]
    assert access.auth_type == "serviceAccount" and access.component == "dnsproxy"
    # What it declares is what its informers watch (built, not started: no API server needed).
    from kubernetes import client as k8s

    from dnsproxy.kube import KubeSource

    source = KubeSource(k8s.ApiClient(), "node-1")
    assert {plural for _, plural in access.resources} == set(source.informers)
    (with_file,) = [r for r in preflight(kube=False, kubeconfig="/k", pin_dir="/p") if isinstance(r, KubernetesAccess)]
    assert (with_file.auth_type, with_file.kubeconfig) == ("kubeConfig", "/k")


def test_doctor_dnsproxy_checks_what_the_proxy_needs(tmp_path: Path) -> None:
    base = tmp_path / "node"
    (base / "proc/sys/kernel").mkdir(parents=True)
    (base / "proc/sys/kernel/osrelease").write_text("6.18.0\n")
    (base / "proc/self").mkdir(parents=True)
    # BPF, NET_ADMIN and NET_BIND_SERVICE, as the DaemonSet bounds it: no PERFMON, no SYS_ADMIN.
    mask = (1 << 39) | (1 << 12) | (1 << 10)
    (base / "proc/self/status").write_text(f"CapEff:\t{mask:016x}\n")
    (base / "proc/self/mounts").write_text("bpf /sys/fs/bpf bpf rw 0 0\n")
    (base / "usr/sbin").mkdir(parents=True)
    (base / "usr/sbin/bpftool").write_text("")

    results = {r.name: r for r in doctor.run_dnsproxy_checks(kube=False, kubeconfig=None, pin_dir="/sys/fs/bpf/p",
                                                             root=str(base))}
    assert results["capabilities"].status is doctor.Status.OK, results["capabilities"]
    assert results["bpffs"].status is doctor.Status.OK
    assert results["bpftool"].status is doctor.Status.OK
    assert results["nft"].status is doctor.Status.FAIL and "apt-get install nftables" in results["nft"].remedy
    assert {"bcc", "kernel headers", "bcc compile"} <= set(results)
    assert "kubernetes (dnsproxy)" not in results and not any(":" in n for n in results)  # no tracepoints

    (base / "usr/sbin/nft").write_text("")
    again = {r.name: r for r in doctor.run_dnsproxy_checks(kube=False, kubeconfig=None, pin_dir="/p", root=str(base))}
    assert again["nft"].status is doctor.Status.OK

    with_kube = {r.name: r for r in doctor.run_dnsproxy_checks(
        kube=False, kubeconfig=str(tmp_path / "missing"), pin_dir="/p", root=str(base))}
    kube = with_kube["kubernetes (dnsproxy)"]
    assert kube.status is doctor.Status.FAIL and "--kubeconfig" in kube.remedy


def _granted(rbac: Path) -> set[tuple[str, str]]:
    """(API group, plural) a manifest's ClusterRoles allow to list and watch."""
    import yaml

    out: set[tuple[str, str]] = set()
    for doc in yaml.safe_load_all(rbac.read_text()):
        if not doc or doc.get("kind") != "ClusterRole":
            continue
        for rule in doc.get("rules", []):
            if {"list", "watch"} <= set(rule.get("verbs", ())):
                out |= {(g, r) for g in rule.get("apiGroups", ()) for r in rule.get("resources", ())}
    return out


def test_the_rbac_manifests_grant_what_the_components_declare() -> None:
    from dnsproxy.kube import kube_access as proxy_access
    from processors.k8sattributes.access import kube_access as k8s_access
    from processors.k8sattributes.config import K8sAttributesConfig

    for access in (k8s_access(K8sAttributesConfig()), proxy_access(None)):
        assert access is not None
        granted = _granted(ROOT / access.rbac_manifest)
        missing = [r for r in access.resources if r not in granted]
        assert not missing, f"{access.rbac_manifest} does not grant list/watch on {missing} ({access.component})"
