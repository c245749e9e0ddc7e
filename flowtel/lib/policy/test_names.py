"""FQDN selectors against Cilium's own cases, written as our tables.

Sources (cilium/cilium, the current release): pkg/fqdn/matchpattern/matchpattern_test.go
(TestAnchoredMatchPatternMatching, TestMatchPatternSanitize), pkg/policy/api/fqdn.go and the
CRD's validation patterns for matchName / matchPattern (maxLength 255). Names are given as
Cilium writes them (FQDN form, trailing dot); ours compare without it, which is the same.
Cilium's rejects of "" and of names without the trailing dot are about its FQDN form and
have no counterpart here: our names are normalized before matching.
"""
from __future__ import annotations

import time

import pytest

from flowtel.lib.policy import MAX_FQDN_LENGTH, PolicyError, is_dns_name, parse_fqdn_selector

# (pattern, names it accepts, names it rejects): TestAnchoredMatchPatternMatching.
CILIUM_MATCH_PATTERN = [
    ("cilium.io.", ["cilium.io."], ["anysub.cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io."]),
    ("*.cilium.io.", ["anysub.cilium.io."], ["cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io."]),
    ("*.ci*.io.", ["anysub.cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io."],
     ["ci.io", "cilium.io.", "service.namesace.svc.cluster.local."]),
    ("*", [".", "io.", "cilium.io.", "svc.cluster.local.", "service.namesace.svc.cluster.local.",
           "_foobar._tcp.cilium.io."], []),
    ("_foobar._tcp.cilium.io.", ["_foobar._tcp.cilium.io."], ["_tcp.cilium.io.", "cilium.io."]),
    ("*.*.cilium.io.", ["_foobar._tcp.cilium.io."], []),
    ("**.cilium.io.", ["anysub.cilium.io.", "_foobar._tcp.cilium.io.", "sub11.sub22.sub33._foobar._tcp.cilium.io."],
     ["cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io.", "1._foobar_tcp.cilium.trio."]),
    ("*.**.cilium.io.", ["_foobar._tcp.cilium.io.", "2._foobar._tcp.cilium.io."], ["_tcp.cilium.io."]),
    ("**.ci*.io.", ["anysub.cilium.io.", "anysub.ci.io.", "1.anysub.ciliumandmore.io.",
                    "service.namesace.svc.ciuster.io."], ["cilium.io."]),
    ("**.*.io.", ["anysub.cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io.", "service.namesace.svc.ciuster.io."],
     ["io.", "cilium.io."]),
    ("*.**.io.", ["anysub.cilium.io.", "anysub.ci.io.", "anysub.ciliumandmore.io.", "service.namesace.svc.ciuster.io."],
     ["io."]),
    ("**", [".", "io.", "cilium.io.", "svc.cluster.local.", "service.namesace.svc.cluster.local.",
            "_foobar._tcp.cilium.io."], []),
    ("**.", ["io.", "cilium.io.", "svc.cluster.local.", "service.namesace.svc.cluster.local.",
             "_foobar._tcp.cilium.io."], []),
    ("1.**.*io.", ["1._foobar._tcp.cilium.io.", "1.2._foobar._tcp.cilium.io.", "1._foobar_tcp.cilium.trio."],
     ["_tcp.cilium.io.", "_foobar._tcp.cilium.io.", "2._foobar._tcp.cilium.io.", "1_foobar._tcp.cilium.trio."]),
    ("subdomain.**.*ili*.io.", ["subdomain._foobar._tcp.cilium.io.", "subdomain.1.2._foobar._tcp.cili.io.",
                                "subdomain._foobar_tcp.ilium.io."],
     ["_tcp.cilium.io.", "_foobar._tcp.cilium.io.", "subdomain.cilium.trio."]),
    ("1.**.cilium.io.", ["1._foobar._tcp.cilium.io.", "1.2._foobar._tcp.cilium.io."],
     ["_tcp.cilium.io.", "_foobar._tcp.cilium.io.", "2._foobar._tcp.cilium.io."]),
    ("*.1.**.cilium.io.", ["_sub.1._foobar._tcp.cilium.io.", "_sub.1.2._foobar._tcp.cilium.io."],
     ["_sub._tcp.1.cilium.io.", "_foobar._tcp.cilium.io.", "2._foobar._tcp.cilium.io.", "2._foobar.1._tcp.cilium.io."]),
    # flowtel's own, in the same spirit: case, runs of stars inside a label, dots stay literal.
    ("*.example.com", ["A.Example.COM."], ["a.b.example.com", "aexample.com"]),
    ("a**b.test", ["ab.test", "axxb.test"], ["a.b.test"]),
    ("example.com", ["example.com"], ["examplexcom"]),
]


@pytest.mark.parametrize(("pattern", "accept", "reject"), CILIUM_MATCH_PATTERN)
def test_match_pattern_as_cilium(pattern: str, accept: list[str], reject: list[str]) -> None:
    sel = parse_fqdn_selector({"matchPattern": pattern}, "t")
    assert [n for n in accept if not sel.matches(n)] == []
    assert [n for n in reject if sel.matches(n)] == []


@pytest.mark.parametrize(("pattern", "canonical"), [
    # TestMatchPatternSanitize: every all-star pattern is the match-all; others get their FQDN form.
    ("**", "*"), ("**.", "*"), ("*", "*"), ("*.", "*"), ("*.com", "*.com"), ("*.COM.", "*.com"),
])
def test_sanitize(pattern: str, canonical: str) -> None:
    assert parse_fqdn_selector({"matchPattern": pattern}, "t").match_pattern == canonical


@pytest.mark.parametrize(("field", "value"), [
    # The CRD's patterns: ^([-a-zA-Z0-9_]+[.]?)+$ and ^([-a-zA-Z0-9_*]+[.]?)+$, maxLength 255.
    ("matchName", ""), ("matchName", ".example.com"), ("matchName", "a..b"), ("matchName", " example.com"),
    ("matchName", "example.com "), ("matchName", "ex ample.com"), ("matchName", "*.example.com"),
    ("matchName", "ex/ample.com"), ("matchName", "a" * 256), ("matchName", "."),
    ("matchPattern", ""), ("matchPattern", ".example.com"), ("matchPattern", "*..com"), ("matchPattern", " *.com"),
    ("matchPattern", "*.com\n"), ("matchPattern", "[a-z].com"), ("matchPattern", "a+.com"), ("matchPattern", "{a,b}"),
    ("matchPattern", "*" * 256), ("matchPattern", "."),
])
def test_crd_invalid_selectors_are_rejected(field: str, value: str) -> None:
    with pytest.raises(PolicyError, match=field):
        parse_fqdn_selector({field: value}, "t")


@pytest.mark.parametrize(("field", "value"), [
    ("matchName", "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61 + "."),  # 255 with the dot
    ("matchName", "_srv._tcp.example.com"), ("matchName", "Example.COM."),
    ("matchPattern", "*" * 255), ("matchPattern", "*.*.*.example.com."),
])
def test_crd_valid_selectors_are_accepted(field: str, value: str) -> None:
    assert len(value) <= MAX_FQDN_LENGTH
    parse_fqdn_selector({field: value}, "t")


def test_match_name_is_exact_and_case_insensitive() -> None:
    sel = parse_fqdn_selector({"matchName": "API.example.com."}, "t")
    assert sel.matches("api.example.com") and sel.matches("API.EXAMPLE.COM.")
    assert not sel.matches("x.api.example.com")


def test_matching_is_linear_in_the_name_for_any_pattern() -> None:
    # Python's backtracking `re` takes seconds to minutes on these (the defect this fixes):
    # stars that can each match a run of one label, against a long name that almost matches.
    patterns = ["*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b.test", "**.*a*a*a*a*a*a*a*a*a*a*a*a*a*b.**.test",
                "*" * 10 + "a" + "*" * 10 + "a" * 20 + "*c"]
    names = ["a" * 63 + "." + "a" * 63 + "." + "a" * 63 + "." + "a" * 57 + ".test", "a" * 240 + ".test.",
             ".".join(["a" * 5] * 40)]
    for p in patterns:
        sel = parse_fqdn_selector({"matchPattern": p}, "t")
        for n in names:
            started = time.process_time()
            assert not sel.matches(n)
            # One pass over 250 bytes takes microseconds; even a loaded CPU stays far below this.
            assert time.process_time() - started < 0.05, (p, n)


def test_dns_name_check_used_by_policy_suggest_is_linear() -> None:
    started = time.process_time()
    assert not is_dns_name("a" * 5000 + "!")  # the CRD pattern in Python's re: exponential
    assert not is_dns_name("-" * 30 + "." * 2 + "x")
    assert is_dns_name("api.example.com.")
    assert time.process_time() - started < 0.05
