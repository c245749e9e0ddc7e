"""Attaching tc programs to interfaces that match the configured globs, and keeping it so.

A netlink subscription (RTM_NEWLINK / RTM_DELLINK) attaches to interfaces as they appear
(a pod starting) and forgets them as they go. All netlink work happens on one thread: the
subscription is a plain socket (its events parsed as below), and the IPRoute used for tc
lives on that thread (pyroute2's sync API is bound to the thread that made it). Filters are recognised as ours by their
handle and program name, so filters left by a killed agent are replaced, never stacked.

The watch costs what the links we care about cost, not what the node's link churn costs: every
event's fixed header (nlmsghdr + ifinfomsg) and its IFLA_IFNAME attribute are read straight from
the socket's bytes (:func:`link_events`), and only a message for an interface that matches the
globs, or that we already know, is decoded by pyroute2 (tens of µs each: on a node where other
pods' veths come and go that decode was most of the agent's CPU). A RTM_DELLINK needs only its
index. A buffer that does not parse as netlink is counted and answered with a re-list, as an
overrun is.

Each attached interface gets a counter slot (:class:`SlotAllocator`), passed to the program in
the filter's classid (cls_bpf stores it in ``skb->tc_classid`` before the program runs) with
the hook: ``(slot + 1) << 1 | hook`` (``FLOWTEL_CLASSID_*`` in bpf/flowtel.h; the kernel
keeps 16 bits of it), so that one program can serve both hooks and
per-interface counters are an array element, not a hash entry. A slot is freed when its link
goes away and reused first-freed-first, so any number of links over the node's life need only
as many slots as exist at once. With every slot taken an interface is still attached (slot
part 0): its packets are counted in flows, and the program counts those missing from the
interface totals.
"""
from __future__ import annotations

import fnmatch
import logging
import errno
import select
import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from cachetools import TTLCache
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from flowtel.lib.bpf.constants import HEADER

log = logging.getLogger("flowtel.flowtel.lib.bpf.tcattach")

INGRESS_PARENT = "ffff:fff2"  # clsact ingress hook
EGRESS_PARENT = "ffff:fff3"  # clsact egress hook
FILTER_HANDLE = 0xF10E
PROGRAM_PREFIX = "flowtel_"
_ENOENT, _EEXIST, _ENODEV = 2, 17, 19
_RTMGRP_LINK = 0x1
_EVENT_RCVBUF = 4 << 20  # a burst of pods starting must not overflow the subscription
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # past net.core.rmem_max (212992 by default)
_RECV_BUF = 1 << 20  # one datagram holds one event; a link with many VFs makes tens of kB
_BURST = 256  # datagrams read per wake-up before the stop flag is looked at again
_GATHER_S = 0.02  # after the first event of a burst, the wait for the rest before reading

# rtnetlink's fixed layouts (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h).
_NLMSGHDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
_IFINFOMSG = struct.Struct("=BxHiII")  # ifi_family, pad, ifi_type, ifi_index, ifi_flags, ifi_change
_RTATTR = struct.Struct("=HH")  # rta_len, rta_type
_LINK_HDR = _NLMSGHDR.size + _IFINFOMSG.size
RTM_NEWLINK, RTM_DELLINK = 16, 17
_IFLA_IFNAME = 3
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
# The kernel puts IFLA_IFNAME first (rtnl_fill_ifinfo); a name not among the first few
# attributes is left to pyroute2's full decode rather than searched for.
_NAME_WITHIN_ATTRS = 8


class MalformedNetlink(ValueError):
    """A buffer from the link subscription that is not a sequence of well-formed netlink messages."""


class LinkEvent(NamedTuple):
    """One rtnetlink message's fixed part: its type, and for RTM_NEWLINK / RTM_DELLINK the link's
    ``ifi_index``, ``ifi_change`` and name (None: not found among the first attributes). ``start``/``end``
    delimit the message in the buffer, for a full decode."""

    type: int
    ifindex: int
    change: int
    name: str | None
    start: int
    end: int


def link_events(data: bytes | bytearray | memoryview) -> Iterator[LinkEvent]:
    """The messages of one netlink datagram, header fields only (no attribute beyond the name is
    decoded). Every length is checked against the buffer; :class:`MalformedNetlink` if one does
    not fit (the rest of the datagram cannot be framed then)."""
    view = memoryview(data)
    size = len(view)
    offset = 0
    while offset < size:
        if size - offset < _NLMSGHDR.size:
            raise MalformedNetlink(f"{size - offset} bytes left at offset {offset}, short of a netlink header")
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(view, offset)
        if length < _NLMSGHDR.size or length > size - offset:
            raise MalformedNetlink(f"netlink message length {length} at offset {offset} of a {size}-byte buffer")
        end = offset + length
        if mtype != RTM_NEWLINK and mtype != RTM_DELLINK:
            yield LinkEvent(mtype, 0, 0, None, offset, end)
        elif length < _LINK_HDR:
            raise MalformedNetlink(f"link message of {length} bytes at offset {offset}, short of an ifinfomsg")
        else:
            _family, _type, index, _flags, change = _IFINFOMSG.unpack_from(view, offset + _NLMSGHDR.size)
            yield LinkEvent(mtype, index, change, _ifname(view, offset + _LINK_HDR, end), offset, end)
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return


def _ifname(view: memoryview, offset: int, end: int) -> str | None:
    """IFLA_IFNAME among the first attributes of ``view[offset:end]``; None if absent or malformed
    there (the caller then lets pyroute2 decide)."""
    for _ in range(_NAME_WITHIN_ATTRS):
        if end - offset < _RTATTR.size:
            return None
        length, atype = _RTATTR.unpack_from(view, offset)
        if length < _RTATTR.size or length > end - offset:
            return None
        if atype & _NLA_TYPE_MASK == _IFLA_IFNAME:
            raw = bytes(view[offset + _RTATTR.size:offset + length])
            return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        offset += (length + 3) & ~3  # RTA_ALIGN
    return None


@dataclass(frozen=True, slots=True)
class Program:
    """A loaded SCHED_CLS program: its fd and name (bcc's ``BPF.Function`` has both)."""

    fd: int
    name: str


@dataclass(slots=True)
class Interface:
    index: int
    name: str
    kind: str  # "veth", "bridge", "" for physical devices, …
    created_clsact: bool = False
    slot: int | None = None  # counter slot (the classid's slot part - 1); None: none was free


class SlotAllocator:
    """Counter slots ``0 .. size-1`` for attached interfaces, reused first-freed-first (a
    program still finishing on a removed link then cannot count into a slot just reused)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: deque[int] = deque(range(size))
        self._by_index: dict[int, int] = {}
        self._lock = threading.Lock()

    def assign(self, index: int) -> int | None:
        with self._lock:
            if index in self._by_index:
                return self._by_index[index]
            if not self._free:
                return None
            slot = self._by_index[index] = self._free.popleft()
            return slot

    def release(self, index: int) -> None:
        with self._lock:
            slot = self._by_index.pop(index, None)
            if slot is not None:
                self._free.append(slot)

    def assigned(self) -> dict[int, int]:
        """{ifindex: slot} now."""
        with self._lock:
            return dict(self._by_index)


class TcAttachManager:
    """Keeps ``ingress``/``egress`` programs attached to every interface matching ``globs``."""

    def __init__(
        self,
        globs: Sequence[str],
        ingress: Program,
        egress: Program,
        *,
        priority: int = 1,
        slots: SlotAllocator | None = None,
        on_slot: Callable[[int], None] | None = None,
        on_attached: Callable[[Interface], None] | None = None,
        on_gone: Callable[[Interface], None] | None = None,
    ) -> None:
        """``ingress`` and ``egress`` may be the same program (the classid tells it the hook).
        ``slots``: counter slots to give interfaces (None: every filter gets slot part 1);
        ``on_slot(slot)`` runs when a slot is given to a new interface, before its filters exist;
        ``on_attached(iface)`` once both its filters are in place; ``on_gone(iface)`` when an
        attached interface went away (its filters with it). All on the watch thread."""
        if slots is not None and slots.size > HEADER.CLASSID_MAX_SLOTS:
            # A larger slot + 1 would spill into the bits the kernel drops from the classid.
            raise ValueError(f"at most {HEADER.CLASSID_MAX_SLOTS} counter slots fit in a tc classid, not {slots.size}")
        self.globs = tuple(globs)
        self.slots = slots
        self._on_slot = on_slot
        self._on_attached = on_attached
        self._on_gone = on_gone
        self._slots_full_logged = False
        self.ingress = ingress
        self.egress = egress
        self.priority = priority
        self._ipr: IPRoute | None = None  # created on, and used only by, the watch thread
        self._lock = threading.Lock()
        self._attached: dict[int, Interface] = {}
        self._known: dict[int, Interface] = {}  # live interfaces that match or are attached, to name records
        # Interfaces that went away, so their last drained records are still named; bounded.
        self._gone: TTLCache[int, Interface] = TTLCache(maxsize=4096, ttl=300)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        # Watch counters (read by tests and benchmarks; written by the watch thread only).
        self.seen = 0  # RTM_NEWLINK / RTM_DELLINK events read from the subscription
        self.decoded = 0  # of those, decoded in full by pyroute2 (re-lists not included)
        self.resyncs = 0  # re-lists after an overrun or a malformed buffer
        self.malformed = 0  # buffers that were not well-formed netlink (each also re-lists)

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.globs)

    def start(self, timeout: float = 30.0) -> None:
        """Attach to every matching interface now, then keep watching. Raises if that fails."""
        self._thread = threading.Thread(target=self._watch, name="flowtel-tc-attach", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("attaching tc programs did not finish in time")
        if self._start_error is not None:
            raise self._start_error

    def attached(self) -> dict[int, Interface]:
        with self._lock:
            return dict(self._attached)

    def interface(self, index: int) -> Interface | None:
        with self._lock:
            return self._known.get(index) or self._gone.get(index)

    def _open_events(self) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            # With CAP_NET_ADMIN past net.core.rmem_max, which would otherwise cap the buffer at
            # its default 208 kB: a few hundred link events, each overrun a full re-list.
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _EVENT_RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _EVENT_RCVBUF)
        sock.bind((0, _RTMGRP_LINK))
        return sock

    def _resync(self) -> None:
        """Bring attachments in line with the links that exist now (start, or after an overrun)."""
        assert self._ipr is not None
        present = set()
        for msg in self._ipr.get_links():
            present.add(msg["index"])
            self._link_added(msg)
        with self._lock:
            vanished = [i for i in self._attached if i not in present]
        for index in vanished:
            self._forget(index)

    def _watch(self) -> None:
        try:
            # Subscribe before listing so an interface created in between is not missed.
            events = self._open_events()
            self._ipr = IPRoute()
            self._resync()
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        marshal = MarshalRtnl()
        buf = bytearray(_RECV_BUF)
        try:
            while not self._stop.is_set():
                try:
                    ready, _, _ = select.select([events], [], [], 0.5)
                    if not ready:
                        continue
                    # Let a burst gather first: on a churning node a wake-up per event would
                    # cost more than the events (a new pod waits this much longer, no more).
                    self._stop.wait(_GATHER_S)
                    # Everything queued, one datagram (one event) at a time, then select again.
                    for _ in range(_BURST):
                        try:
                            size = events.recv_into(buf, _RECV_BUF, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            break
                        self._handle(marshal, memoryview(buf)[:size])
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        log.warning("netlink overrun: events were lost, re-listing interfaces")
                        self._relist()
                        continue
                    raise
        finally:
            events.close()
            self._detach_all()
            self._ipr.close()

    def _relist(self) -> None:
        self.resyncs += 1
        self._resync()

    def _handle(self, marshal: MarshalRtnl, data: memoryview) -> None:
        """One datagram of link events: deletions by index, additions decoded only if wanted."""
        try:
            for ev in link_events(data):
                if ev.type == RTM_DELLINK or ev.type == RTM_NEWLINK:
                    self.seen += 1
                if ev.type == RTM_DELLINK:
                    self._forget(ev.ifindex)
                elif ev.type == RTM_NEWLINK and self._wants(ev.ifindex, ev.name):
                    self.decoded += 1
                    for msg in marshal.parse(bytes(data[ev.start:ev.end])):
                        if msg.get("event") == "RTM_NEWLINK":
                            self._link_added(msg)
        except MalformedNetlink as exc:
            # Events in it (or after the bad one) may be lost: count it, and re-list as after an overrun.
            self.malformed += 1
            log.warning("netlink watch: malformed link event buffer (%s), re-listing interfaces", exc)
            self._relist()
        except Exception:  # a bad message must not end attachment for the agent's life
            log.exception("netlink watch: error handling a link event")

    def _wants(self, index: int, name: str | None) -> bool:
        """Whether a RTM_NEWLINK needs its full decode: a link that matches and is not attached
        yet (new, renamed into the globs, or an attach to retry), or one we know by another name
        (renamed). A known link under its known name (carrier, flags, stats changes) needs nothing.
        ``ifi_change`` cannot stand in for this test: a rename is announced with ifi_change 0."""
        if name is None:
            return True  # no name where the kernel puts it: let pyroute2 read the whole message
        with self._lock:
            known = self._known.get(index)
            if known is not None:
                return known.name != name or (index not in self._attached and self.matches(name))
        return self.matches(name)

    def _link_added(self, msg: Any) -> None:  # a pyroute2 netlink message (untyped)
        name = msg.get_attr("IFLA_IFNAME")
        index = msg["index"]
        kind = ""
        try:
            kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""
        except Exception:
            kind = ""
        if not name:
            return
        iface = Interface(index=index, name=name, kind=kind)
        with self._lock:
            attached = index in self._attached
            if not attached and not self.matches(name):
                # Not ours: records never name it, and remembering every link of a churning
                # node would evict, from the bounded _gone, the links whose records still drain.
                self._known.pop(index, None)
                return
            self._known[index] = iface
            if attached:
                return
        slot_id = 1
        if self.slots is not None:
            iface.slot = self.slots.assign(index)
            if iface.slot is None:
                slot_id = 0
                if not self._slots_full_logged:
                    self._slots_full_logged = True
                    log.warning("all %d interface counter slots are in use: %s (and later ones) are not in "
                                "the interface totals until links go away (raise max_interfaces); counted as "
                                "lost events", self.slots.size, name)
            else:
                slot_id = iface.slot + 1
                if self._on_slot is not None:
                    self._on_slot(iface.slot)
        try:
            iface.created_clsact = self._attach(index, slot_id)
        except NetlinkError as exc:
            if self.slots is not None:
                self.slots.release(index)
            if exc.code in (_ENODEV, _ENOENT):
                return  # gone again before we got to it
            log.error("cannot attach tc programs to %s (index %d): %s", name, index, exc)
            return
        with self._lock:
            self._attached[index] = iface
        log.info("attached tc programs to %s (index %d)", name, index)
        if self._on_attached is not None:
            self._on_attached(iface)

    def _forget(self, index: int) -> None:
        with self._lock:
            iface = self._attached.pop(index, None)
            known = self._known.pop(index, None)
            if known is not None:
                self._gone[index] = known
        if self.slots is not None:
            self.slots.release(index)
        if iface is not None:
            log.info("interface %s (index %d) went away; its tc programs went with it", iface.name, index)
            if self._on_gone is not None:
                self._on_gone(iface)

    def _attach(self, index: int, slot_id: int) -> bool:
        assert self._ipr is not None
        created = False
        try:
            self._ipr.tc("add", "clsact", index=index)
            created = True
        except NetlinkError as exc:
            if exc.code != _EEXIST:
                raise
        hooks = ((INGRESS_PARENT, self.ingress, HEADER.HOOK_INGRESS), (EGRESS_PARENT, self.egress, HEADER.HOOK_EGRESS))
        for parent, prog, hook in hooks:
            if not created:  # a clsact qdisc we just made has no filters, a dead agent's or any
                self._remove_stale(index, parent)
            self._ipr.tc(
                "add-filter",
                "bpf",
                index=index,
                handle=FILTER_HANDLE,
                fd=prog.fd,
                name=prog.name,
                parent=parent,
                classid=(slot_id << HEADER.CLASSID_SLOT_SHIFT) | hook,
                direct_action=True,
                prio=self.priority,
            )
        return created

    def _ours(self, index: int, parent: str) -> list[tuple[int, int]]:
        """(priority, handle) of flowtel filters on one hook, ours or a dead agent's."""
        assert self._ipr is not None
        found = []
        for msg in self._ipr.get_filters(index=index, parent=parent):
            if msg.get_attr("TCA_KIND") != "bpf" or not msg.get_attr("TCA_OPTIONS"):
                continue
            name = msg.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") or ""
            if msg["handle"] == FILTER_HANDLE or name.startswith(PROGRAM_PREFIX):
                found.append((msg["info"] >> 16, msg["handle"]))
        return found

    def _remove_stale(self, index: int, parent: str) -> None:
        assert self._ipr is not None
        for prio, handle in self._ours(index, parent):
            log.info("replacing a flowtel filter left on interface index %d (%s)", index, parent)
            self._ipr.tc("del-filter", "bpf", index=index, handle=handle, parent=parent, prio=prio)

    def _detach(self, iface: Interface) -> None:
        assert self._ipr is not None
        for parent in (INGRESS_PARENT, EGRESS_PARENT):
            for prio, handle in self._ours(iface.index, parent):
                self._ipr.tc("del-filter", "bpf", index=iface.index, handle=handle, parent=parent, prio=prio)
        if iface.created_clsact:
            remaining = [
                m
                for parent in (INGRESS_PARENT, EGRESS_PARENT)
                for m in self._ipr.get_filters(index=iface.index, parent=parent)
                if m.get_attr("TCA_KIND")
            ]
            if not remaining:
                self._ipr.tc("del", "clsact", index=iface.index)

    def _detach_all(self) -> None:
        with self._lock:
            attached = list(self._attached.values())
            self._attached.clear()
        for iface in attached:
            try:
                self._detach(iface)
            except NetlinkError as exc:
                if exc.code not in (_ENODEV, _ENOENT):
                    log.warning("detaching from %s: %s", iface.name, exc)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop watching and remove our filters (and a clsact qdisc we added, if now empty)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("tc attach thread did not stop within %.0fs; filters may remain", timeout)
