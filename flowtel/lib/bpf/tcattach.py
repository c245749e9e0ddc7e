"""Attaching tc programs to interfaces that match the configured globs, and keeping it so.

A netlink subscription (RTM_NEWLINK / RTM_DELLINK) attaches to interfaces as they appear
(a pod starting) and forgets them as they go. All netlink work happens on one thread: the
subscription is a plain socket parsed by pyroute2's marshal, and the IPRoute used for tc
lives on that thread (pyroute2's sync API is bound to the thread that made it). Filters are recognised as ours by their
handle and program name, so filters left by a killed agent are replaced, never stacked.

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
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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
    ) -> None:
        """``ingress`` and ``egress`` may be the same program (the classid tells it the hook).
        ``slots``: counter slots to give interfaces (None: every filter gets slot part 1);
        ``on_slot(slot)`` runs when a slot is given to a new interface, before its filters exist."""
        if slots is not None and slots.size > HEADER.CLASSID_MAX_SLOTS:
            # A larger slot + 1 would spill into the bits the kernel drops from the classid.
            raise ValueError(f"at most {HEADER.CLASSID_MAX_SLOTS} counter slots fit in a tc classid, not {slots.size}")
        self.globs = tuple(globs)
        self.slots = slots
        self._on_slot = on_slot
        self._slots_full_logged = False
        self.ingress = ingress
        self.egress = egress
        self.priority = priority
        self._ipr: IPRoute | None = None  # created on, and used only by, the watch thread
        self._lock = threading.Lock()
        self._attached: dict[int, Interface] = {}
        self._known: dict[int, Interface] = {}  # live interfaces, to name records
        # Interfaces that went away, so their last drained records are still named; bounded.
        self._gone: TTLCache[int, Interface] = TTLCache(maxsize=4096, ttl=300)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

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
        try:
            while not self._stop.is_set():
                try:
                    ready, _, _ = select.select([events], [], [], 0.5)
                    if not ready:
                        continue
                    data = events.recv(1 << 20)
                except OSError as exc:
                    if exc.errno == errno.ENOBUFS:
                        log.warning("netlink overrun: events were lost, re-listing interfaces")
                        self._resync()
                        continue
                    raise
                try:
                    for msg in marshal.parse(data):
                        event = msg.get("event")
                        if event == "RTM_NEWLINK":
                            self._link_added(msg)
                        elif event == "RTM_DELLINK":
                            self._forget(msg["index"])
                except Exception:  # a bad message must not end attachment for the agent's life
                    log.exception("netlink watch: error handling a link event")
        finally:
            events.close()
            self._detach_all()
            self._ipr.close()

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
            self._known[index] = iface
            if index in self._attached or not self.matches(name):
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
