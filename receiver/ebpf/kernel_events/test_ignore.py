"""The drop-reason ignore list: config validation and the C expression the loader compiles in."""
from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from receiver.ebpf.kernel_events import KernelEventsConfig
from receiver.ebpf.kernel_events.config import DEFAULT_IGNORED_REASONS
from receiver.ebpf.kernel_events.program import ignored_reasons_expression

REASONS = {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 4: "SOCKET_CLOSE", 12: "NETFILTER_DROP", 104: "QUEUE_PURGE"}


def test_defaults_ignore_frees_that_are_not_network_drops() -> None:
    drops = KernelEventsConfig().drops
    assert drops.ignore_reasons == list(DEFAULT_IGNORED_REASONS)
    assert {"SOCKET_CLOSE", "QUEUE_PURGE"} <= set(drops.ignore_reasons)
    assert "NO_SOCKET" not in drops.ignore_reasons and "NETFILTER_DROP" not in drops.ignore_reasons
    assert drops.report_unclaimed_echo_replies is False


def test_expression_names_exactly_the_values_this_kernel_has(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        expr = ignored_reasons_expression(REASONS, ["QUEUE_PURGE", "SOCKET_CLOSE", "UNIX_DISCONNECT"])
    assert expr == "((r) == 4 || (r) == 104)"
    assert "UNIX_DISCONNECT" in caplog.text  # absent on this kernel: said, not fatal
    assert eval(expr.replace("(r)", "r").replace("||", "or"), {"r": 104})  # noqa: S307 - a literal we built
    assert not eval(expr.replace("(r)", "r").replace("||", "or"), {"r": 3})  # noqa: S307


def test_empty_list_reports_every_reason() -> None:
    assert ignored_reasons_expression(REASONS, []) == "0"


@pytest.mark.parametrize("bad", ["socket_close", "SOCKET CLOSE", "", "4"])
def test_a_name_that_cannot_be_a_reason_is_a_config_error(bad: str) -> None:
    with pytest.raises(ValidationError, match="drop reason names"):
        KernelEventsConfig(drops={"ignore_reasons": [bad]})
