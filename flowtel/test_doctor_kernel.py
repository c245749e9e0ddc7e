"""flowtel doctor on the real node: bcc really compiles, and the node passes."""
from __future__ import annotations

import pytest

from flowtel.doctor import Status, check_bcc_compile, main, run_checks

pytestmark = pytest.mark.kernel


def test_real_node_has_no_fail_and_bcc_compiles() -> None:
    results = run_checks()
    by_name = {r.name: r for r in results}

    assert [r for r in results if r.status is Status.FAIL] == []
    assert by_name["bcc compile"].status is Status.OK
    assert by_name["bcc compile"].detail.startswith("compiled and loaded a SCHED_CLS program")
    assert by_name["kernel headers"].status is Status.OK


def test_main_exits_0_on_the_real_node(capsys: pytest.CaptureFixture[str]) -> None:
    assert main() == 0
    out = capsys.readouterr().out
    assert "[ OK ] bcc compile:" in out
    assert " 0 FAIL: flowtel can run on this node" in out.rstrip().splitlines()[-1]


def test_compile_error_reports_the_first_error_line() -> None:
    program = (
        "#include <uapi/linux/bpf.h>\n"
        "#include <uapi/linux/flowtel_no_such_header.h>\n"
        "int flowtel_doctor_probe(struct __sk_buff *skb) { return 0; }\n"
    )
    result = check_bcc_compile(program=program)

    assert result.status is Status.FAIL
    assert "error: 'uapi/linux/flowtel_no_such_header.h' file not found" in result.detail
    assert "kernel headers" in result.remedy


def test_compile_error_in_program_text() -> None:
    result = check_bcc_compile(
        program="int flowtel_doctor_probe(struct __sk_buff *skb) { return no_such_symbol; }\n"
    )
    assert result.status is Status.FAIL
    assert "error: use of undeclared identifier 'no_such_symbol'" in result.detail


def test_compile_that_overruns_its_timeout_is_a_fail_not_a_hang() -> None:
    result = check_bcc_compile(timeout=0.01)
    assert result.status is Status.FAIL
    assert "within 0.01 s" in result.detail
