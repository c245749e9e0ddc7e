"""The CLI imports only what the invoked command needs (issue 13, point 8).

Measured in a fresh interpreter each, as a user runs it: the resident peak of
`flowtel observe --help`, and which heavy packages a command pulled in.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

# The budget from the issue; a Python with pydantic and the flow filters is ~35 MB here.
OBSERVE_HELP_MAX_RSS_KB = 60 * 1024
# Packages only the agent (run, demo, doctor) or the DNS proxy needs.
HEAVY = ("kubernetes", "pyroute2", "dns", "bcc", "grpc", "opentelemetry")

_PEAK = ("import resource, subprocess, sys; "
         "subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, check=True); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")

_IMPORTED = """
import json, sys
from flowtel.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = {HEAVY!r}
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set(heavy))), file=sys.stderr)
"""


def _imported(*argv: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", _IMPORTED.format(HEAVY=HEAVY), *argv],
                          capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert isinstance(result, list)
    return result


def test_observe_help_stays_under_60_mb_resident() -> None:
    out = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "flowtel.cli", "observe", "--help"],
                         capture_output=True, text=True, timeout=120, check=True)
    peak_kb = int(out.stdout.strip())
    assert 0 < peak_kb < OBSERVE_HELP_MAX_RSS_KB, f"flowtel observe --help peaked at {peak_kb} KB"


@pytest.mark.parametrize("argv", [("observe", "--help"), ("map", "--help"), ("policy", "suggest", "--help"),
                                  ("--help",), ("run", "--help"), ("doctor", "--help")])
def test_client_commands_import_no_agent_or_proxy_packages(argv: tuple[str, ...]) -> None:
    assert _imported(*argv) == []


def test_the_dnsproxy_command_still_gets_its_own_arguments() -> None:
    # The proxy's modules load for its own command only, and its flags are all there.
    assert "kubernetes" in _imported("dnsproxy", "--help")
    from flowtel.cli import build_parser, invoked_command

    assert invoked_command(["--log-level", "debug", "dnsproxy", "--kube"]) == "dnsproxy"
    args = build_parser("dnsproxy").parse_args(["dnsproxy", "--kube", "--pods", "p.yaml"])
    assert args.kube and args.pods == "p.yaml"


def test_top_level_help_still_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "flowtel.cli", "--help"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for command in ("run", "doctor", "demo", "observe", "map", "dnsproxy", "policy"):
        assert f"    {command}" in out, out
    suggest = subprocess.run([sys.executable, "-m", "flowtel.cli", "policy", "suggest", "--help"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    assert "CiliumNetworkPolicy" in suggest
