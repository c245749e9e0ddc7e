"""Filter flags over a fixed set of flows: each flag, OR within a flag, AND across flags,
--not, and Hubble's namespace, conflict and validation rules: the flags become Cilium
FlowFilters (flowtel.lib.hubble.flags), evaluated by flowtel.lib.hubble.filters on each
flow's Cilium message."""
from __future__ import annotations

import argparse
import shlex

import pytest

from flowtel.lib.hubble import convert as hubble, printer, summary as _summary, timefmt
from flowtel.lib.hubble.filters import FilterError, compile_filters
from flowtel.lib.hubble.flags import build_filters
from flowtel.observe import add_observe_arguments
from tests.flowsamples import lost, sample_flows

ALL = ["F1", "F2", "F3", "F4", "F5", "F6", "F7", "F8", "F9"]


def pairs(argv: str) -> list[tuple[str, str]]:
    parser = argparse.ArgumentParser()
    add_observe_arguments(parser)
    return parser.parse_args(shlex.split(argv)).filter_pairs or []


def select(argv: str) -> list[str]:
    """The sample flows `flowtel observe ARGV` shows, parsed by the real command line."""
    filters = compile_filters(*build_filters(pairs(argv)))
    return [name for name, flow in sample_flows().items() if filters.matches_flow(hubble.to_proto(flow))]


@pytest.mark.parametrize("argv, expected", [
    ("", ALL),
    # pods and namespaces: [namespace/]prefix, a bare name is in "default" (Hubble)
    ("--namespace shop", ["F1", "F2", "F3", "F4", "F5", "F6", "F7"]),
    ("--namespace kube-system", ["F4", "F5"]),
    ("--from-namespace default", ["F3", "F7"]),
    ("--to-namespace kube-system", ["F4"]),
    ("--pod frontend", []),
    ("--pod client", ["F3", "F7"]),
    ("--pod shop/frontend", ["F1", "F2", "F3", "F4", "F5", "F6"]),
    ("--pod shop/pay", ["F1", "F2", "F7"]),
    ("--namespace shop --pod frontend", ["F1", "F2", "F3", "F4", "F5", "F6"]),
    ("--from-pod shop/frontend", ["F1", "F4", "F6"]),
    ("--to-pod shop/payments-0", ["F1", "F7"]),
    ("--from-pod shop/frontend --from-pod default/client", ["F1", "F3", "F4", "F6", "F7"]),
    ("--from-pod shop/frontend --to-port 53", ["F4"]),
    # labels: Kubernetes selectors over Cilium's source:key=value labels
    ("--label app=payments", ["F1", "F2", "F7"]),
    ("--from-label k8s:app=frontend", ["F1", "F4", "F6"]),
    ("--to-label 'k8s-app in (kube-dns, other)'", ["F4"]),
    ("--from-label 'app,tier=backend'", ["F2"]),
    ("--from-label '!app'", ["F5", "F8", "F9"]),
    ("--from-label reserved:app", []),
    # addresses
    ("--ip 10.0.0.2", ["F1", "F2", "F7"]),
    ("--from-ip 10.0.0.0/24", ["F1", "F2", "F4", "F6"]),
    ("--to-ip 93.184.216.34", ["F6"]),
    ("--ip fd00::2", ["F9"]),
    ("--ip fd00:0::2", ["F9"]),
    ("--to-ip 10.0.0.1 --to-ip 10.0.9.9", ["F2", "F3", "F4", "F5"]),
    # ports (TCP/UDP/SCTP only; ICMP type/code are not ports)
    ("--port 53", ["F4", "F5"]),
    ("--from-port 8080", ["F2"]),
    ("--to-port 8080 --to-port 80", ["F1", "F3"]),
    ("--to-port 0", []),
    ("--port 8080 --protocol tcp", ["F1", "F2"]),
    # protocols
    ("--protocol tcp", ["F1", "F2", "F3", "F6"]),
    ("--protocol UDP", ["F4", "F5", "F9"]),
    ("--protocol dns", ["F4", "F5"]),
    ("--protocol icmp", ["F7"]),
    ("--protocol icmpv6", []),
    ("--protocol tcp --protocol icmpv4", ["F1", "F2", "F3", "F6", "F7"]),
    # verdicts and event types
    ("--verdict DROPPED", ["F3"]),
    ("--verdict forwarded", ["F1", "F2", "F4", "F5", "F6", "F7", "F8", "F9"]),
    ("--type drop", ["F3"]),
    ("--type l7", ["F4", "F5"]),
    ("--type trace", ["F1", "F2", "F6", "F7", "F8", "F9"]),
    ("--type l3_l4", ["F1", "F2", "F6", "F7", "F8", "F9"]),
    ("--type trace:from-endpoint", ["F1", "F6", "F8"]),
    ("--type trace:to-endpoint", ["F2", "F7", "F9"]),
    ("--type drop --type l7", ["F3", "F4", "F5"]),
    ("--type 129", ["F4", "F5"]),
    # names: source/destination_names, and a DNS flow's query as a destination name
    ("--fqdn www.example.com", ["F4", "F5", "F6"]),
    ("--to-fqdn '*.example.com'", ["F4", "F5", "F6"]),
    ("--fqdn '*.EXAMPLE.com.'", ["F4", "F5", "F6"]),
    ("--to-fqdn 'www.*'", ["F4", "F5", "F6"]),
    ("--to-fqdn example.com", []),
    ("--from-fqdn '*.internal.test'", ["F9"]),
    ("--from-fqdn '*.example.com'", []),
    # different flags AND
    ("--namespace shop --protocol tcp --verdict FORWARDED", ["F1", "F2", "F6"]),
    ("--to-ip 10.0.0.1 --protocol udp", ["F5"]),
    # --not negates the next flag only
    ("--not --namespace shop", ["F8", "F9"]),
    ("--protocol tcp --not --verdict DROPPED", ["F1", "F2", "F6"]),
    ("--not --protocol tcp --not --protocol udp", ["F7", "F8"]),
    ("--not --type trace --verdict FORWARDED", ["F4", "F5"]),
    # Hubble puts all negated flags in one deny list: these two hide flows with address
    # 10.0.0.1 *and* port 53 on the same end, and there are none.
    ("--not --ip 10.0.0.1 --not --port 53", ALL),
    ("--not --from-ip 10.0.0.1 --not --to-port 53", ["F1", "F2", "F3", "F5", "F6", "F7", "F8", "F9"]),
])
def test_filter_flags_select_exactly(argv: str, expected: list[str]) -> None:
    assert select(argv) == expected


def test_either_end_flags_combine_per_end_as_hubble() -> None:
    # (source pod frontend AND source port 8080) OR (destination pod frontend AND destination
    # port 8080): no sample has frontend on port 8080, although F1 has both on different ends.
    assert select("--pod shop/frontend --port 8080") == []
    assert select("--pod shop/payments --port 8080") == ["F1", "F2"]


def test_lost_events_always_pass() -> None:
    for argv in ("--verdict DROPPED", "--not --namespace shop", "--pod nothing/here"):
        assert compile_filters(*build_filters(pairs(argv))).matches(hubble.to_response(lost()))


@pytest.mark.parametrize("argv, message", [
    ("--namespace a --ip 1.2.3.4", "--namespace and --ip cannot be combined"),
    ("--from-pod a/b --namespace a", "--from-pod and --namespace cannot be combined"),
    ("--pod x --from-ip 1.1.1.1", "cannot be combined"),
    ("--port 1 --to-port 2", "--port and --to-port cannot be combined"),
    ("--label a=b --from-label c", "cannot be combined"),
    ("--namespace a --pod b/x", "namespace conflict: 'a' does not contain 'b/x'"),
    ("--not --not --ip 1.1.1.1", "consecutive --not"),
    ("--ip 1.1.1.1 --not", "--not must be followed by a filter"),
    ("--port 70000", "--port: invalid port filter '70000'"),
    ("--to-port http", "--to-port: invalid port"),
    ("--ip 1.2.3", "--ip: invalid IP address in filter: '1.2.3'"),
    ("--from-ip 10.0.0.0/33", "invalid CIDR"),
    ("--verdict MAYBE", "--verdict: invalid verdict 'MAYBE'"),
    ("--protocol gre", "unknown protocol: 'gre'"),
    ("--type bogus", "unable to parse type 'bogus'"),
    ("--type trace:sideways", "unable to parse event sub-type 'sideways'"),
    ("--fqdn 'a b'", "only alphanumeric ASCII characters"),
    ("--pod ''", "must be [namespace/][<name>]"),
    ("--namespace ''", "expected a namespace name"),
    ("--label 'app in (a'", "invalid label selector"),
])
def test_invalid_filters_are_refused_naming_the_flag(argv: str, message: str) -> None:
    with pytest.raises(FilterError, match=None) as exc:
        build_filters(pairs(argv))
    assert message in str(exc.value)


def test_not_conflicts_are_checked_per_list() -> None:
    # --namespace allows and --ip denies: different lists, so Hubble accepts the pair.
    assert select("--namespace shop --not --ip 10.0.0.2") == ["F3", "F4", "F5", "F6"]


def test_unknown_flag_in_wire_form_is_refused() -> None:
    with pytest.raises(FilterError, match="unknown filter --workload"):
        build_filters([("workload", "x")])


def test_type_filters_match_the_event_type_flowtel_emits() -> None:
    # Each sample is matched by the --type of the event_type its Cilium message carries.
    for name, flow in sample_flows().items():
        et = hubble.to_proto(flow).event_type
        assert name in select(f"--type {et.type}:{et.sub_type}"), name


# --- hostile patterns -----------------------------------------------------------------------

_WORST_CASE = """
import sys, time
from flowtel.lib.hubble import convert
from flowtel.lib.hubble.filters import compile_filters
from flowtel.lib.hubble.flags import build_filters
from flowtel.records import replace
from tests.flowsamples import sample_flows
name = ".".join(["a" * 62] * 3) + ".example"
flow = convert.to_proto(replace(sample_flows()["F4"], destination_names=(name,)))
started = time.monotonic()
for stars in (17, 40, 120):
    filters = compile_filters(*build_filters([("to-fqdn", "*" * stars + "q"), ("to-fqdn", "*" * stars + ".example")]))
    assert filters.matches_flow(flow)
    assert not compile_filters(*build_filters([("to-fqdn", "*" * stars + "q")])).matches_flow(flow)
print(time.monotonic() - started)
"""


def test_fqdn_patterns_match_in_linear_time() -> None:
    # In a child process: a backtracking regex runs for hours on this input.
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _WORST_CASE], cwd=repo, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 5.0


def test_fqdn_patterns_are_bounded_in_size() -> None:
    with pytest.raises(FilterError, match="FQDN pattern too long: 257 characters, at most 256"):
        build_filters([("to-fqdn", "*" * 257)])
    build_filters([("to-fqdn", "*" * 256)])


def test_label_selectors_parse_in_linear_time() -> None:
    import time

    started = time.monotonic()
    for _ in range(32):  # a request's worth of label filters, each as long as a value may be
        with pytest.raises(FilterError):
            build_filters([("label", "a" + " " * 1000 + "in" + " " * 10 + "(x")])
    assert time.monotonic() - started < 0.5
