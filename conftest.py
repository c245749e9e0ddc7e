"""Shared test fixtures.

Tests marked ``kernel`` need root, eBPF and network namespaces. Where the machine cannot do
that they skip with the reason; under ``FLOWTEL_REQUIRE_KERNEL=1`` (set by ``.ci/run``,
whose machine can) the same condition is a failure, so CI never passes by skipping; so is
every skip a test asks for itself (a missing tool, root, IPv6): on the CI machine each of
them names something setup.sh must provide.
"""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from testbed import Testbed


def _kernel_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_BPF, CAP_NET_ADMIN) for eBPF and network namespaces"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "needs bcc (Debian python3-bpfcc) importable from this Python"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip) for network namespaces"
    if not os.path.isdir("/sys/kernel/tracing/events"):
        return "needs tracefs mounted at /sys/kernel/tracing"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _kernel_unavailable_reason()
    if reason is None:
        return
    strict = os.environ.get("FLOWTEL_REQUIRE_KERNEL") == "1"
    for item in items:
        if "kernel" not in item.keywords:
            continue
        if strict:
            item.add_marker(pytest.mark.usefixtures("_kernel_required_but_missing"))
        else:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def _kernel_required_but_missing() -> None:
    pytest.fail(
        f"FLOWTEL_REQUIRE_KERNEL=1 but this test cannot run: {_kernel_unavailable_reason()}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("FLOWTEL_REQUIRE_KERNEL") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"FLOWTEL_REQUIRE_KERNEL=1: a test may not skip on the CI machine: {reason}"


@pytest.fixture
def bed() -> Iterator[Testbed]:
    """A fresh testbed (pods in their own network namespaces) for one test, removed after it;
    what a crashed earlier run left behind is removed first. A module needing another scope
    or set-up defines its own ``bed``, which takes precedence."""
    from testbed import Testbed  # test tooling: imported only by tests that use a testbed

    Testbed.cleanup_stale()
    with Testbed() as tb:
        yield tb
