from receiver.ebpf.reply import ReplyInference


def test_tcp_handshake_names_both_directions_and_later_intervals() -> None:
    r = ReplyInference()
    assert r.is_reply(6, "10.0.0.1", 40000, "10.0.0.2", 8080, syn=1) is False
    assert r.is_reply(6, "10.0.0.2", 8080, "10.0.0.1", 40000, synack=1) is True
    # A later interval of the same connection, no handshake in it.
    assert r.is_reply(6, "10.0.0.1", 40000, "10.0.0.2", 8080) is False
    assert r.is_reply(6, "10.0.0.2", 8080, "10.0.0.1", 40000) is True


def test_handshake_beats_the_port_heuristic() -> None:
    # A client on a low port talking to a server on an ephemeral-range port.
    r = ReplyInference()
    assert r.is_reply(6, "10.0.0.1", 1000, "10.0.0.2", 40000, syn=1) is False
    assert r.is_reply(6, "10.0.0.2", 40000, "10.0.0.1", 1000) is True


def test_icmp_echo() -> None:
    r = ReplyInference()
    assert r.is_reply(1, "a", 8, "b", 0) is False
    assert r.is_reply(1, "b", 0, "a", 0) is True
    assert r.is_reply(58, "a", 128, "b", 0) is False
    assert r.is_reply(58, "b", 129, "a", 0) is True
    assert r.is_reply(1, "a", 3, "b", 3) is None  # destination unreachable: neither


def test_ports_and_unknown() -> None:
    r = ReplyInference()
    assert r.is_reply(17, "a", 45000, "b", 53) is False
    assert r.is_reply(17, "b", 53, "a", 45000) is True
    assert r.is_reply(17, "a", 9000, "b", 9001) is None
    assert r.is_reply(17, "a", 40000, "b", 40001) is None


def test_bounded() -> None:
    r = ReplyInference(max_connections=10)
    for port in range(40000, 40100):
        r.is_reply(6, "a", port, "b", 80, syn=1)
    assert len(r) == 10


def test_handshakes_expire_after_their_ttl_and_refresh_on_a_new_one() -> None:
    now = [0.0]
    r = ReplyInference(ttl_s=10.0, clock=lambda: now[0])
    r.is_reply(6, "10.0.0.1", 1000, "10.0.0.2", 2000, syn=1)  # ports say nothing by themselves (both low)
    now[0] = 5.0
    r.is_reply(6, "10.0.0.3", 1000, "10.0.0.2", 2000, syn=1)
    r.is_reply(6, "10.0.0.5", 1000, "10.0.0.2", 2000, syn=1)  # never looked up again: expires at 15
    assert r.is_reply(6, "10.0.0.2", 2000, "10.0.0.1", 1000) is True
    now[0] = 10.0  # the first handshake's time is up
    assert r.is_reply(6, "10.0.0.2", 2000, "10.0.0.1", 1000) is None
    assert r.is_reply(6, "10.0.0.2", 2000, "10.0.0.3", 1000) is True
    r.is_reply(6, "10.0.0.3", 1000, "10.0.0.2", 2000, syn=1)  # seen again: refreshed
    now[0] = 15.0
    r.is_reply(6, "10.0.0.4", 1000, "10.0.0.2", 2000, syn=1)  # an insert drops what expired (.5)
    assert len(r) == 2
    assert r.is_reply(6, "10.0.0.2", 2000, "10.0.0.3", 1000) is True


def test_bounded_keeps_the_newest() -> None:
    r = ReplyInference(max_connections=3)
    for port in range(40000, 40010):
        r.is_reply(6, "a", port, "b", 80, syn=1)
    assert len(r) == 3
    assert r.is_reply(6, "b", 80, "a", 40009) is True and r.is_reply(6, "b", 80, "a", 40000) is True  # ports' answer
    assert r.is_reply(6, "a", 1000, "b", 2000, syn=1) is False and len(r) == 3


def test_expiry_checked_lazily_keeps_what_an_eager_check_keeps() -> None:
    # _learn looks at the oldest handshake only once its deadline has come: the handshakes
    # remembered must be those an eager check on every learn keeps (refreshes, bound, lookups
    # deleting expired ones, the map emptied and refilled), and the answers the same.
    from collections import OrderedDict
    import random

    rng = random.Random(7)
    now = [0.0]
    r = ReplyInference(max_connections=50, ttl_s=10.0, clock=lambda: now[0])
    eager: OrderedDict[tuple[str, int, str, int], float] = OrderedDict()
    for step in range(20000):
        now[0] += rng.choice((0.0, 0.01, 0.1, 1.0, 30.0 if step % 997 == 0 else 0.0))
        port = rng.randrange(1000, 1120)
        if rng.random() < 0.6:
            r.is_reply(6, "a", port, "b", 2000, syn=1)
            eager[("a", port, "b", 2000)] = now[0] + 10.0
            eager.move_to_end(("a", port, "b", 2000))
            while eager and (next(iter(eager.values())) <= now[0] or len(eager) > 50):
                eager.popitem(last=False)
        else:
            deadline = eager.get(("a", port, "b", 2000))
            expected = None if deadline is None or deadline <= now[0] else True
            if deadline is not None and deadline <= now[0]:
                del eager[("a", port, "b", 2000)]
            assert r.is_reply(6, "b", 2000, "a", port) is expected  # both ports low: only a handshake says
        live = {k for k, d in r._clients.items() if d > now[0]}
        assert live == {k for k, d in eager.items() if d > now[0]}
