"""The flow store's ring: a batch larger than the ring keeps what adding its records one by
one keeps, counts every record, and sees every record's namespaces."""
from __future__ import annotations

from flowtel.lib.hubble import convert
from flowtel.lib.hubble.store import FlowStore, Query
from flowtel.records import Endpoint, Flow, LostEvents, Verdict

T0 = 1_700_000_000 * 10**9


def _flows(n: int) -> list[Flow | LostEvents]:
    out: list[Flow | LostEvents] = []
    for i in range(n):
        src = Endpoint(namespace=f"ns-{i}", pod_name=f"a-{i}") if i % 3 else None  # early ones name many namespaces
        dst = Endpoint(namespace="shared", pod_name="b") if i % 2 else None
        out.append(Flow(T0 + i, "node-1", Verdict.FORWARDED, 4, "10.0.0.1", "10.0.0.2", 6, 40000 + i, 80,
                        source=src, destination=dst))
        if i % 97 == 0:
            out.append(LostEvents(T0 + i, "QUEUE_FULL:test", 1, "node-1"))
    return out


def _store(capacity: int) -> FlowStore:
    return FlowStore(node_name="node-1", capacity=capacity, follower_capacity=10_000, max_followers=2,
                     convert=convert.to_response, time_of=lambda r: r.time_ns)


def _times(store: FlowStore) -> list[int]:
    return [r.flow.time.ToNanoseconds() if r.HasField("flow") else -r.time.ToNanoseconds()
            for r in store.query(Query(number=None))]


def test_a_batch_beyond_the_ring_keeps_what_one_by_one_keeps() -> None:
    for records in (_flows(500), [r for r in _flows(500) if isinstance(r, Flow)]):
        batched, single = _store(64), _store(64)
        batched.add(records)
        for r in records:
            single.add([r])
        assert _times(batched) == _times(single) and len(_times(batched)) == 64
        assert batched.stats()["seen_flows"] == single.stats()["seen_flows"] == len(records)
        # Namespaces of the flows the ring dropped count as seen too.
        assert batched.namespaces() == single.namespaces()
        assert ("default", "ns-1") in batched.namespaces() or ("", "ns-1") in batched.namespaces()


def test_a_follower_gets_every_record_of_a_batch_beyond_the_ring() -> None:
    store = _store(64)
    _, follower = store.follow(Query(number=0, follow=True))
    records = _flows(500)
    assert store.add(records) == 0
    got, lost, _ = follower.take(1.0)
    assert lost == 0
    assert [r.flow.time.ToNanoseconds() for r in got if r.HasField("flow")] == \
        [r.time_ns for r in records if isinstance(r, Flow)]
    assert len(_times(store)) == 64
