"""The pure parts: stripping, identities and labels, workloads, extract rules, IP claims, CIDRs."""
from __future__ import annotations

import re
import sys
import time

import pytest

from flowtel.lib import identity
from processors.k8sattributes.addresses import PrefixTable
from processors.k8sattributes.extract import Extractor, Rule
from processors.k8sattributes.internal.kube.objects import (
    JobMeta,
    OwnerRef,
    PodMeta,
    ReplicaSetMeta,
    strip_node,
    strip_pod,
    strip_service,
)
from processors.k8sattributes.pod_association import PodAssociation
from processors.k8sattributes.workload import OwnerResolver
from tests.kubeapi import objects as o


def meta(uid: str, ip: str, created: float, *, name: str | None = None, terminal: bool = False) -> PodMeta:
    return PodMeta(uid=uid, namespace="ns", name=name or uid, node_name="node-1", ips=(ip,), terminal=terminal,
                   created=created, labels=(), annotations=(), owner=None, service_account="default")


# --- stripping --------------------------------------------------------------------------


def test_pod_is_stripped_to_what_flowtel_reads() -> None:
    raw = o.pod("web-7c9d-x", "shop", ips=("10.0.0.5", "fd00:0:0::5"), labels={"app": "web", "pod-template-hash": "7c9d"},
                annotations={"owner": "team-a", "kubectl.kubernetes.io/last-applied-configuration": "{" + "x" * 5000 + "}"},
                owner=("ReplicaSet", "web-7c9d"), created="2024-11-26T11:45:45Z")
    raw["metadata"]["uid"] = "u1"
    pod = strip_pod(raw, keep_annotation=lambda k: k == "owner")
    assert pod is not None
    assert pod.ips == ("10.0.0.5", "fd00::5")  # canonical text, as the kernel side prints it
    assert pod.owner == OwnerRef("ReplicaSet", "web-7c9d") and pod.node_name == "node-1"
    assert pod.annotations == (("owner", "team-a"),)  # the 5 kB annotation is not kept
    assert pod.created == 1732621545.0 and not pod.terminal
    assert not hasattr(pod, "__dict__")  # slotted: no per-object dict
    assert sys.getsizeof(pod) < 200
    # Equal stripped objects are how no-op updates (status heartbeats) are skipped.
    raw["status"]["conditions"][0]["lastTransitionTime"] = "2030-01-01T00:00:00Z"
    assert strip_pod(raw, keep_annotation=lambda k: k == "owner") == pod


def test_host_network_pods_are_not_cached_and_terminal_pods_are_marked() -> None:
    assert strip_pod(o.pod("kube-proxy-x", ip="192.168.0.1", host_network=True)) is None
    done = strip_pod(o.pod("job-x", ip="10.0.0.9", phase="Succeeded"))
    assert done is not None and done.terminal


def test_service_and_node_stripping() -> None:
    assert strip_service(o.service("db", cluster_ip="None")).cluster_ips == ()
    assert strip_service(o.service("web", cluster_ip="10.96.0.9", cluster_ips=("10.96.0.9", "fd00::9"))).cluster_ips == ("10.96.0.9", "fd00::9")
    n = strip_node(o.node("n1", internal_ip="192.168.0.1", external_ip="203.0.113.1", pod_cidr="10.0.1.0/24"))
    assert n.internal_ips == ("192.168.0.1",) and n.external_ips == ("203.0.113.1",) and n.pod_cidrs == ("10.0.1.0/24",)


# --- identities and Hubble labels -------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "kept"),
    [
        ("app", True),
        ("app.kubernetes.io/name", True),
        ("pod-template-hash", False),
        ("controller-revision-hash", False),
        ("pod-template-generation", False),
        ("statefulset.kubernetes.io/pod-name", False),
        ("apps.kubernetes.io/pod-index", False),
        ("batch.kubernetes.io/controller-uid", False),
        ("controller-uid", False),
        ("kubernetes.io/hostname", False),
        ("beta.kubernetes.io/arch", False),
        ("io.kubernetes.container.name", False),
        ("io.kubernetes.pod.namespace", True),
        ("io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name", True),
        ("job-name", True),
    ],
)
def test_identity_label_filter_is_ciliums_default(key: str, kept: bool) -> None:
    assert identity.is_identity_label(key) is kept


def test_pod_labels_and_identity() -> None:
    labels = identity.pod_labels([("app", "web"), ("pod-template-hash", "7c9d")], "shop", [("team", "pay")], "web-sa", "default")
    assert labels == (
        "k8s:app=web",
        "k8s:io.cilium.k8s.namespace.labels.team=pay",
        "k8s:io.cilium.k8s.policy.cluster=default",
        "k8s:io.cilium.k8s.policy.serviceaccount=web-sa",
        "k8s:io.kubernetes.pod.namespace=shop",
    )
    n = identity.identity_of(labels)
    assert 256 <= n <= 65535 and n == identity.identity_of(reversed(labels))
    # Replicas (different pod-template-hash) share one identity; another namespace does not.
    other_hash = identity.pod_labels([("app", "web"), ("pod-template-hash", "aaaa")], "shop", [("team", "pay")], "web-sa", "default")
    assert identity.identity_of(other_hash) == n
    assert identity.identity_of(identity.pod_labels([("app", "web")], "dev", [], "web-sa", "default")) != n


def test_reserved_identities_combine_as_in_cilium() -> None:
    assert identity.reserved() == (2, ("reserved:world",))
    assert identity.reserved(host=True) == (1, ("reserved:host",))
    assert identity.reserved(remote_node=True) == (6, ("reserved:remote-node",))
    assert identity.reserved(kube_apiserver=True) == (7, ("reserved:kube-apiserver",))
    assert identity.reserved(remote_node=True, kube_apiserver=True) == (7, ("reserved:kube-apiserver", "reserved:remote-node"))
    assert identity.reserved(host=True, kube_apiserver=True) == (1, ("reserved:host", "reserved:kube-apiserver"))


# --- workloads ----------------------------------------------------------------------------


def owned(kind: str, name: str, labels: tuple[tuple[str, str], ...] = ()) -> PodMeta:
    return PodMeta(uid="u", namespace="shop", name=f"{name}-x", node_name="n", ips=(), terminal=False, created=0,
                   labels=labels, annotations=(), owner=OwnerRef(kind, name), service_account="default")


def test_workloads_from_watched_owners_then_from_names() -> None:
    rs = {"shop/web-7c9d": ReplicaSetMeta("shop", "web-7c9d", "web"), "shop/bare-rs": ReplicaSetMeta("shop", "bare-rs", None)}
    jobs = {"shop/report-28843200": JobMeta("shop", "report-28843200", "report"), "shop/migrate": JobMeta("shop", "migrate", None)}
    r = OwnerResolver(replicasets=lambda: rs, jobs=lambda: jobs, cache_size=100, cache_ttl=60)
    hashed = (("pod-template-hash", "7c9d"),)
    assert r.chain(owned("ReplicaSet", "web-7c9d", hashed)) == (("Deployment", "web"), ("ReplicaSet", "web-7c9d"))
    assert r.chain(owned("ReplicaSet", "bare-rs")) == (("ReplicaSet", "bare-rs"),)
    # Not (yet) in the watched store: the name and pod-template-hash tell.
    assert r.chain(owned("ReplicaSet", "api-5f6b", (("pod-template-hash", "5f6b"),))) == (("Deployment", "api"), ("ReplicaSet", "api-5f6b"))
    assert r.chain(owned("Job", "report-28843200")) == (("CronJob", "report"), ("Job", "report-28843200"))
    assert r.chain(owned("Job", "migrate")) == (("Job", "migrate"),)
    assert r.chain(owned("StatefulSet", "db")) == (("StatefulSet", "db"),)
    assert r.chain(owned("DaemonSet", "agent")) == (("DaemonSet", "agent"),)
    bare = PodMeta(uid="u", namespace="shop", name="debug", node_name="n", ips=(), terminal=False, created=0,
                   labels=(), annotations=(), owner=None, service_account="default")
    assert r.chain(bare) == ()


def test_workloads_without_watches_use_names_only() -> None:
    r = OwnerResolver(replicasets=None, jobs=None, cache_size=100, cache_ttl=60)
    assert r.chain(owned("ReplicaSet", "web-7c9d", (("pod-template-hash", "7c9d"),)))[0] == ("Deployment", "web")
    assert r.chain(owned("ReplicaSet", "web-abcd")) == (("ReplicaSet", "web-abcd"),)  # no hash label: a bare ReplicaSet
    assert r.chain(owned("Job", "backup-2884320012"))[0] == ("CronJob", "backup")
    assert r.chain(owned("Job", "backup-1"))[0] == ("Job", "backup-1")  # too few digits for a schedule time


def test_owner_cache_is_bounded_expires_and_is_invalidated() -> None:
    store: dict[str, ReplicaSetMeta] = {}
    r = OwnerResolver(replicasets=lambda: store, jobs=None, cache_size=3, cache_ttl=0.2)
    for i in range(10):
        r.chain(owned("ReplicaSet", f"rs{i}"))
    assert len(r) == 3
    r.chain(owned("ReplicaSet", "rs9"))
    assert r.hits == 1
    store["shop/rs9"] = ReplicaSetMeta("shop", "rs9", "dep")
    assert r.chain(owned("ReplicaSet", "rs9")) == (("ReplicaSet", "rs9"),)  # cached until invalidated
    r.invalidate("shop", "ReplicaSet", "rs9")
    assert r.chain(owned("ReplicaSet", "rs9"))[0] == ("Deployment", "dep")
    time.sleep(0.25)
    assert len(r) == 0  # expired


# --- extract rules ------------------------------------------------------------------------


def test_extract_rules_as_the_collector() -> None:
    ex = Extractor([
        Rule("pod", "labels", "app", None, None),
        Rule("pod", "labels", None, re.compile(r"app\.kubernetes\.io/(?P<part>.*)"), "app.${part}"),
        Rule("pod", "labels", None, re.compile(r"tier|zone"), None),
        Rule("pod", "annotations", None, re.compile(r"team/(.*)"), "team.$1"),
        Rule("namespace", "labels", "env", None, None),
        Rule("namespace", "annotations", "contact", None, "owner.contact"),
    ])
    attrs = dict(ex.attributes(
        [("app", "web"), ("app.kubernetes.io/version", "1.2"), ("tier", "front"), ("tiers", "x")],
        [("team/name", "pay")],
        [("env", "prod")],
        [("contact", "a@b")],
    ))
    assert attrs == {
        "k8s.pod.labels.app": "web",
        "app.version": "1.2",
        "k8s.pod.labels.tier": "front",  # key_regex must match the whole key: not "tiers"
        "team.name": "pay",
        "k8s.namespace.labels.env": "prod",
        "owner.contact": "a@b",
    }
    assert ex.keeps("pod", "annotations", "team/name") and not ex.keeps("pod", "annotations", "other")


# --- IP claims ----------------------------------------------------------------------------


def test_reused_ip_resolves_by_the_records_time() -> None:
    a = PodAssociation(grace=120)
    old, new = meta("old", "10.0.0.5", 1000), meta("new", "10.0.0.5", 1050)
    a.upsert(old, now=1001)
    a.remove(old, now=1100)  # deleted at 1100
    a.upsert(new, now=1101)  # the address is reused right away
    assert a.lookup("10.0.0.5", 1099.9).uid == "old"  # a late record from before the deletion
    assert a.lookup("10.0.0.5", 1100.5).uid == "new"  # the new pod cannot have had it before 1100
    assert a.lookup("10.0.0.5", 5000).uid == "new"


def test_deleted_pod_resolves_within_grace_then_leaves() -> None:
    forgotten: list[str] = []
    a = PodAssociation(grace=10, on_forget=forgotten.append)
    p = meta("p", "10.0.0.5", 1000)
    a.upsert(p, now=1000)
    a.remove(p, now=1100)
    assert a.lookup("10.0.0.5", 1105).uid == "p" and a.deleted_count == 1
    assert a.lookup("10.0.0.5", 1110.5) is None  # a record after the grace is not named
    a.expire(1109)
    assert "p" in a.pods
    a.expire(1110.1)
    assert a.pods == {} and a.by_ip == {} and a.deleted_count == 0 and forgotten == ["p"]


def test_records_from_before_the_only_known_pod_allow_clock_skew_only() -> None:
    a = PodAssociation(grace=60)
    a.upsert(meta("p", "10.0.0.5", 1000), now=1001)
    assert a.lookup("10.0.0.5", 999).uid == "p"  # the API server's clock may run ahead
    assert a.lookup("10.0.0.5", 990) is None  # long before: someone no longer known


def test_newer_pod_seen_before_the_old_ones_deletion_takes_over() -> None:
    a = PodAssociation(grace=60)
    a.upsert(meta("old", "10.0.0.5", 1000), now=1000)
    # The new pod was created long ago (Pending) and got the address now, before the
    # old pod's DELETED event arrived.
    a.upsert(meta("new", "10.0.0.5", 1010), now=2000)
    assert a.lookup("10.0.0.5", 1999).uid == "old"
    assert a.lookup("10.0.0.5", 2000.1).uid == "new"
    a.remove(meta("old", "10.0.0.5", 1000), now=2001)
    assert a.lookup("10.0.0.5", 2500).uid == "new"


def test_out_of_order_older_pod_does_not_take_the_address() -> None:
    a = PodAssociation(grace=60)
    a.upsert(meta("new", "10.0.0.5", 2000), now=2100)
    a.upsert(meta("old", "10.0.0.5", 1000), now=2100)  # relist order: older pod after the newer
    assert a.lookup("10.0.0.5", 2100).uid == "new"
    assert a.lookup("10.0.0.5", 1500).uid == "old"


def test_terminal_pod_releases_its_address() -> None:
    a = PodAssociation(grace=5)
    a.upsert(meta("job", "10.0.0.7", 1000), now=1000)
    a.upsert(meta("job", "10.0.0.7", 1000, terminal=True), now=1200)
    assert a.lookup("10.0.0.7", 1204).uid == "job"
    a.upsert(meta("web", "10.0.0.7", 1300), now=1300)
    assert a.lookup("10.0.0.7", 1301).uid == "web"
    a.expire(1300)
    assert set(a.pods) == {"web"}  # the completed pod left with its grace


def test_claims_stay_bounded_under_churn() -> None:
    a = PodAssociation(grace=1)
    now = 1000.0
    for i in range(2000):
        p = meta(f"p{i}", f"10.0.{i % 8}.1", now)
        a.upsert(p, now)
        now += 0.01
        a.remove(p, now)
        a.expire(now)
    a.expire(now + 2)
    assert a.pods == {} and a.by_ip == {}


def test_a_span_answers_as_lookup_at_every_time_it_covers() -> None:
    # The processor reuses an address's answer for the batch's records within the span the
    # index gives: at every time inside it lookup must give that answer, and the span must
    # hold the time asked, for each claim history above (one pod, deleted, reused, none).
    a = PodAssociation(grace=10)
    a.upsert(meta("one", "10.0.0.1", 1000), now=1001)
    p = meta("gone", "10.0.0.2", 1000)
    a.upsert(p, now=1000)
    a.remove(p, now=1100)
    old, new = meta("old", "10.0.0.3", 1000), meta("new", "10.0.0.3", 1050)
    a.upsert(old, now=1001)
    a.remove(old, now=1100)
    a.upsert(new, now=1101)
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.9.9.9"):
        for when in (990.0, 998.5, 1000.0, 1099.9, 1100.5, 1109.0, 1111.0, 5000.0):
            pod, lo, hi = a.span(ip, when)
            assert lo <= when <= hi and pod is a.lookup(ip, when), (ip, when)
            for t in (lo, (lo + when) / 2 if lo > -1e300 else when - 1e6, when, (when + hi) / 2 if hi < 1e300 else when + 1e6, hi):
                if -1e300 < t < 1e300:
                    assert a.lookup(ip, t) is pod, (ip, when, t)
    assert a.span("10.0.0.1", 1500)[1:] == (998.0, float("inf"))  # one pod: its whole claim
    assert a.span("10.0.0.2", 1105)[1:] == (998.0, 1110.0)  # deleted: until its grace ends
    assert a.span("10.0.0.3", 1105)[1:] == (1105, 1105)  # several claims: that time only


# --- CIDRs --------------------------------------------------------------------------------


def test_prefix_table_longest_match() -> None:
    t: PrefixTable[str] = PrefixTable()
    t.add("10.0.0.0/8", "wide")
    t.add("10.1.0.0/16", "narrow")
    t.add("fd00::/64", "v6")
    assert t.lookup("10.1.2.3") == "narrow" and t.lookup("10.2.0.1") == "wide"
    assert t.lookup("fd00::1") == "v6" and t.lookup("fd01::1") is None and t.lookup("nonsense") is None
    t.remove("10.1.0.0/16")
    assert t.lookup("10.1.2.3") == "wide" and len(t) == 2


def test_loopback_is_the_host_not_the_world() -> None:
    from processors.k8sattributes.metadata import WORLD, fallback

    for ip in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
        view = fallback(ip)
        assert view.identity == 1 and view.labels == ("reserved:host",), ip
    assert fallback("203.0.113.9") is WORLD
