"""`flowtel doctor` checks what the components need, from the components' own declarations
(issue 13, point 5): each factory's ``preflight(config)``. Here the doctor and the ebpf
receiver judge the same tracefs tree, and agree: what the doctor passes the receiver reads,
and a missing tracepoint or field fails both.

The tree is built from real format files of Linux 6.18 (tests/fixtures/tracefs).
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
    KubernetesAccess,
    Requirement,
    Tracefs,
    Tracepoint,
)
from flowtel.registry import all_factories, factories_by_kind
from receiver.ebpf import btf as btf_mod
from receiver.ebpf import tracefs
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.kernel_events import program
from receiver.ebpf.preflight import preflight as ebpf_preflight

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "tracefs"
REQUIREMENT_TYPES = (BccCompile, Btf, Tracefs, Tracepoint, Bpffs, BpfPrivileges, Capabilities, KubernetesAccess)


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
