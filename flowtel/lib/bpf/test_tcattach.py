"""tc attachment follows links, and the link watch decodes only links it cares about.

The framing (:func:`link_events`) is checked against pyroute2 on the kernel's own link dump
and against hand-made bad buffers; the manager against real links on the real kernel: new,
renamed into the globs, deleted, and an overrun of its subscription (a re-list must then still
bring attachments in line). Churn of links the globs do not match is counted as seen, not
decoded.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
from typing import Callable, Iterator

import pytest
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from flowtel.lib.bpf import tcattach
from flowtel.lib.bpf.tcattach import (
    RTM_DELLINK,
    RTM_NEWLINK,
    MalformedNetlink,
    Program,
    TcAttachManager,
    link_events,
)

_NLM_F_REQUEST, _NLM_F_DUMP, _RTM_GETLINK, _NLMSG_DONE = 0x1, 0x300, 18, 3


def _nlmsg(mtype: int, payload: bytes, flags: int = 0) -> bytes:
    body = struct.pack("=IHHII", 16 + len(payload), mtype, flags, 0, 0) + payload
    return body + b"\0" * (-len(body) % 4)


def _attr(atype: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), atype) + value
    return raw + b"\0" * (-len(raw) % 4)


def _link(mtype: int, index: int, *attrs: bytes, change: int = 0) -> bytes:
    return _nlmsg(mtype, struct.pack("=BxHiII", 0, 1, index, 0, change) + b"".join(attrs))


def test_link_events_read_header_and_name_of_each_message() -> None:
    data = (_link(RTM_NEWLINK, 7, _attr(4, b"\0\0\0\1"), _attr(3, b"veth0\0"), change=0xFFFFFFFF)
            + _link(RTM_DELLINK, 9, _attr(3, b"eth1\0"))
            + _nlmsg(_NLMSG_DONE, b"\0\0\0\0"))
    got = [(e.type, e.ifindex, e.change, e.name) for e in link_events(data)]
    assert got == [(RTM_NEWLINK, 7, 0xFFFFFFFF, "veth0"), (RTM_DELLINK, 9, 0, "eth1"), (_NLMSG_DONE, 0, 0, None)]
    first = next(link_events(data))
    assert data[first.start:first.end] == _link(RTM_NEWLINK, 7, _attr(4, b"\0\0\0\1"), _attr(3, b"veth0\0"),
                                                change=0xFFFFFFFF)


def test_link_events_leave_an_unfound_or_bad_name_to_the_full_decode() -> None:
    # No name; a name after more attributes than are searched; an attribute longer than its message.
    many = [_attr(4, b"\0\0\0\1")] * tcattach._NAME_WITHIN_ATTRS
    for msg in (_link(RTM_NEWLINK, 1, _attr(4, b"\0\0\0\1")),
                _link(RTM_NEWLINK, 2, *many, _attr(3, b"late\0")),
                _link(RTM_NEWLINK, 3, struct.pack("=HH", 200, 3) + b"x\0\0\0")):
        [ev] = link_events(msg)
        assert ev.name is None and ev.type == RTM_NEWLINK


@pytest.mark.parametrize("data", [
    b"\x10\0\0",  # shorter than a netlink header
    struct.pack("=IHHII", 15, RTM_NEWLINK, 0, 0, 0),  # length below the header's own
    struct.pack("=IHHII", 64, RTM_NEWLINK, 0, 0, 0),  # length past the buffer (truncated read)
    _nlmsg(RTM_NEWLINK, b"\0" * 8),  # a link message without a whole ifinfomsg
    _link(RTM_DELLINK, 4) + b"\x08\0\0",  # a good message, then a torn one
], ids=["short", "undersized", "truncated", "no-ifinfomsg", "torn-tail"])
def test_link_events_refuse_a_buffer_that_does_not_frame(data: bytes) -> None:
    with pytest.raises(MalformedNetlink):
        list(link_events(data))


def test_malformed_buffer_is_counted_and_relisted_and_deletions_need_no_decode() -> None:
    manager = TcAttachManager(["x*"], Program(-1, "flowtel_x"), Program(-1, "flowtel_x"))
    relists: list[int] = []
    manager._resync = lambda: relists.append(1)  # type: ignore[method-assign]  # no netlink here: count the call
    forgotten: list[int] = []
    manager._forget = forgotten.append  # type: ignore[method-assign]  # record, not act
    manager._handle(MarshalRtnl(), memoryview(_link(RTM_DELLINK, 5) + _link(RTM_NEWLINK, 6, _attr(3, b"eth0\0"))))
    assert (forgotten, manager.seen, manager.decoded, manager.malformed, relists) == ([5], 2, 0, 0, [])
    manager._handle(MarshalRtnl(), memoryview(_link(RTM_DELLINK, 8) + b"\xff\0\0\0"))
    assert (forgotten, manager.malformed, manager.resyncs, relists) == ([5, 8], 1, 1, [1])


# -- on the real kernel ---------------------------------------------------------------------

def _dump_links() -> bytes:
    """RTM_GETLINK dump of this namespace, raw, up to NLMSG_DONE."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        s.bind((0, 0))
        s.send(_nlmsg(_RTM_GETLINK, struct.pack("=BxHiII", 0, 0, 0, 0, 0), _NLM_F_REQUEST | _NLM_F_DUMP))
        out = b""
        while True:
            chunk = s.recv(1 << 20)
            out += chunk
            if any(e.type == _NLMSG_DONE for e in link_events(chunk)):
                return out


@pytest.mark.kernel
def test_link_events_name_every_link_as_pyroute2_does() -> None:
    data = _dump_links()
    ours = [(e.ifindex, e.name) for e in link_events(data) if e.type == RTM_NEWLINK]
    theirs = [(m["index"], m.get_attr("IFLA_IFNAME")) for m in MarshalRtnl().parse(data)
              if m.get("event") == "RTM_NEWLINK"]
    assert ours == theirs and len(ours) >= 1


def _prefix(tag: str) -> str:
    return f"fta{os.getpid() % 100000}{tag}"


def _cleanup(prefix: str) -> None:
    for name in os.listdir("/sys/class/net"):
        if name.startswith(prefix):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


def _ip_batch(lines: list[str]) -> None:
    subprocess.run(["ip", "-batch", "-"], input="".join(f"{line}\n" for line in lines), text=True, check=True)


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _attached(manager: TcAttachManager) -> set[str]:
    return {i.name for i in manager.attached().values()}


def _filters(name: str) -> str:
    return "".join(subprocess.run(["tc", "filter", "show", "dev", name, hook], capture_output=True, text=True).stdout
                   for hook in ("ingress", "egress"))


@pytest.fixture(scope="module")
def program() -> Iterator[Program]:
    from bcc import BPF  # type: ignore[import-untyped]  # Debian's python3-bpfcc has no type information

    bpf = BPF(text="int flowtel_test_pass(struct __sk_buff *skb) { return 0; }")  # TC_ACT_OK
    fn = bpf.load_func("flowtel_test_pass", BPF.SCHED_CLS)
    yield Program(fn.fd, "flowtel_test_pass")
    bpf.cleanup()


@pytest.fixture
def manager_for(program: Program) -> Iterator[Callable[[str], TcAttachManager]]:
    made: list[tuple[TcAttachManager, str]] = []

    def make(prefix: str) -> TcAttachManager:
        _cleanup(prefix)
        m = TcAttachManager([f"{prefix}m*"], program, program)
        made.append((m, prefix))
        return m

    yield make
    for m, prefix in made:
        m.stop()
        _cleanup(prefix)


@pytest.mark.kernel
def test_attaches_to_new_and_renamed_links_and_forgets_deleted_ones(
        manager_for: Callable[[str], TcAttachManager]) -> None:
    p = _prefix("a")
    m = manager_for(p)
    _ip_batch([f"link add {p}m0 type veth peer name {p}o0"])  # before start: found by the initial list
    m.start()
    assert _attached(m) == {f"{p}m0"} and "flowtel_test_pass" in _filters(f"{p}m0")
    _ip_batch([f"link add {p}m1 type veth peer name {p}m2", f"link add {p}o1 type veth peer name {p}o2"])
    _wait(lambda: _attached(m) == {f"{p}m0", f"{p}m1", f"{p}m2"}, "new matching links attached")
    _ip_batch([f"link set {p}o1 name {p}m3", f"link set {p}m1 up"])  # renamed into the globs; up
    _wait(lambda: f"{p}m3" in _attached(m), "renamed link attached")
    assert all("flowtel_test_pass" in _filters(n) for n in _attached(m))
    assert "flowtel_test_pass" not in _filters(f"{p}o2")
    index = {i.name: i.index for i in m.attached().values()}
    _ip_batch([f"link del {p}m1"])  # and its peer m2 with it
    _wait(lambda: _attached(m) == {f"{p}m0", f"{p}m3"}, "deleted links forgotten")
    # Records drained after a link went away are still named; links we never matched are not kept.
    gone = m.interface(index[f"{p}m1"])
    assert gone is not None and gone.name == f"{p}m1" and gone.kind == "veth"
    m.stop()
    assert _filters(f"{p}m0") == "" and _filters(f"{p}m3") == ""  # our filters went at stop


@pytest.mark.kernel
def test_attached_runs_once_both_filters_are_in_place_and_gone_when_the_link_goes(program: Program) -> None:
    """What the DNS receiver keeps its set of pod interfaces by (receiver/ebpf/dnsifaces.py):
    an interface is announced only when both its hooks run the program, and forgotten when
    its link goes away."""
    p = _prefix("c")
    _cleanup(p)
    attached: list[tuple[str, str]] = []
    gone: list[str] = []
    m = TcAttachManager([f"{p}m*"], program, program,
                        on_attached=lambda i: attached.append((i.name, _filters(i.name))),
                        on_gone=lambda i: gone.append(i.name))
    try:
        _ip_batch([f"link add {p}m0 type veth peer name {p}o0"])
        m.start()
        _ip_batch([f"link add {p}m1 type veth peer name {p}o1"])
        _wait(lambda: len(attached) == 2, "both links announced")
        assert sorted(n for n, _ in attached) == [f"{p}m0", f"{p}m1"]
        for _, filters in attached:  # both hooks' filters, at the moment of the call
            assert filters.count("flowtel_test_pass") == 2, filters
        assert gone == []
        _ip_batch([f"link del {p}m1"])
        _wait(lambda: gone == [f"{p}m1"], "the deleted link forgotten")
    finally:
        m.stop()
        _cleanup(p)


@pytest.mark.kernel
def test_churn_of_links_the_globs_do_not_match_is_seen_not_decoded(
        manager_for: Callable[[str], TcAttachManager]) -> None:
    p = _prefix("c")
    m = manager_for(p)
    m.start()
    seen, decoded = m.seen, m.decoded
    pairs = 50
    group = 0x40000000 | (os.getpid() % 0x100000) << 5 | 7
    _ip_batch([f"link add {p}o{i}a group {group} type veth peer name {p}o{i}b group {group}" for i in range(pairs)])
    _ip_batch([f"link set {p}o{i}{e} up" for i in range(pairs) for e in "ab"])
    subprocess.run(["ip", "link", "del", "group", str(group)], check=True)
    # Events come in order: once a link made after the churn is attached, the churn was read.
    _ip_batch([f"link add {p}m0 type veth peer name {p}o0"])
    _wait(lambda: _attached(m) == {f"{p}m0"}, "sentinel link attached")
    # Each churned link made at least a new-link and a delete event; only the sentinel's first
    # event needed pyroute2 (later ones are for an attached link under its known name).
    assert m.seen - seen >= 4 * pairs, m.seen - seen
    assert m.decoded - decoded == 1, m.decoded - decoded


@pytest.mark.kernel
def test_overrun_of_the_subscription_relists(manager_for: Callable[[str], TcAttachManager],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    p = _prefix("o")
    m = manager_for(p)
    # The smallest receive buffer the kernel gives: one queued event fills it.
    monkeypatch.setattr(tcattach, "_EVENT_RCVBUF", 1)
    _ip_batch([f"link add {p}m0 type veth peer name {p}o0"])
    m.start()
    assert _attached(m) == {f"{p}m0"}
    entered, release = threading.Event(), threading.Event()
    handle = m._handle

    def held(marshal: MarshalRtnl, data: memoryview) -> None:
        entered.set()
        release.wait(60)
        handle(marshal, data)

    m._handle = held  # type: ignore[method-assign]  # hold the watch thread while the buffer overflows
    resyncs = m.resyncs
    _ip_batch([f"link add {p}o1 type veth peer name {p}o2"])
    _wait(entered.is_set, "watch thread got an event")
    # While the thread is held: more events than the buffer holds, then the ones that matter.
    _ip_batch([f"link add {p}o{i} type veth" for i in range(3, 13)])
    _ip_batch([f"link add {p}m1 type veth peer name {p}o13", f"link del {p}m0"])
    release.set()
    _wait(lambda: _attached(m) == {f"{p}m1"}, "attachments after the overrun")
    assert m.resyncs > resyncs
