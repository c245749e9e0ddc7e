"""TCP sockets per state from the kernel's socket-diagnostics netlink interface, through
pyroute2's ``DiagSocket``.

``/proc/net/tcp`` and ``/proc/net/tcp6`` print a text line per socket. A ``NETLINK_SOCK_DIAG``
dump (what ``ss`` uses; no privilege needed) sends binary ``inet_diag_msg`` records instead,
one ``SOCK_DIAG_BY_FAMILY`` request per address family, IPv4 then IPv6, which together count
the same sockets as the two files. pyroute2 builds the requests and decodes every record.

The request is ``DiagSocket.get_sock_stats``'s, sent with ``nlm_request`` directly for one
reason: pyroute2's sock_diag marshal does not recognise error replies, and the kernel reports
a request it cannot serve (no ``tcp_diag``/``inet_diag`` for the protocol, or a dump that
fails part-way) as an ``NLMSG_DONE`` carrying ``-errno``, which ``get_sock_stats`` takes for
an empty (or complete) dump. The callback reads that status so such a dump raises OSError
and the receiver falls back to the /proc files rather than reporting zeros.

pyroute2 creates the netlink socket in ``DiagSocket()`` itself, in the calling thread, so it
belongs to the network namespace that thread is in (entered with setns for a ``netns``
entry); it is created, used and closed within one call, by one thread, as pyroute2's sync
API requires.
"""
from __future__ import annotations

import os
import socket
from collections import Counter

from pyroute2 import DiagSocket
from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, nlmsg
from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_req
from pyroute2.netlink.exceptions import NetlinkDecodeError, NetlinkError

FAMILIES = (socket.AF_INET, socket.AF_INET6)
PROTOCOL = socket.IPPROTO_TCP
# Every state bit, as ``ss -a`` asks: pyroute2's SS_ALL (states 0 to 11) would leave out
# TCPF_BOUND_INACTIVE (kernel 6.6+), under which the kernel adds the sockets that are bound
# but neither listening nor connected, in state CLOSE. /proc/net/tcp does not list those.
ALL_STATES = 0xFFFFFFFF


class _status(nlmsg):
    """The int NLMSG_DONE and NLMSG_ERROR carry: 0, or -errno."""

    fields = (("error", "i"),)


class _Dump:
    """One family's dump: the state of each record, and how it ended."""

    def __init__(self, states: Counter[int]) -> None:
        self.states = states
        self.errors = 0
        self.errno = 0

    def status(self, msg: nlmsg) -> bool:
        # Called by pyroute2 for every message it parsed, before it decides whether the dump
        # has ended; returning False leaves the message to it.
        if msg["header"]["type"] in (NLMSG_DONE, NLMSG_ERROR) and msg["header"]["length"] >= 20:
            end = _status(msg.data, offset=msg.offset)
            end.decode()
            if end["error"] < 0:
                self.errno = -end["error"]
        return False

    def count(self, msg: nlmsg) -> None:
        state = msg.get("idiag_state") if msg["header"]["type"] == SOCK_DIAG_BY_FAMILY else None
        if state is None:
            # NLMSG_ERROR is handed on too (it ends the dump); status() has read it.
            if msg["header"]["type"] != NLMSG_ERROR:
                self.errors += 1
        else:
            self.states[state] += 1


def _dump(ds: DiagSocket, family: int, states: Counter[int]) -> int:
    req = inet_diag_req()
    req["sdiag_family"] = family
    req["sdiag_protocol"] = PROTOCOL
    req["idiag_states"] = ALL_STATES
    dump = _Dump(states)
    try:
        for msg in ds.nlm_request(req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, callback=dump.status):
            dump.count(msg)
    except NetlinkDecodeError:
        # pyroute2 stops the dump at a record it cannot decode: counted, and the records
        # before it are kept (the rest of the dump is not read).
        dump.errors += 1
    except NetlinkError as exc:
        raise OSError(exc.code, str(exc)) from exc
    if dump.errno:
        raise OSError(dump.errno, f"sock_diag dump of address family {family}: {os.strerror(dump.errno)}")
    return dump.errors


def tcp_states() -> tuple[Counter[int], int]:
    """TCP sockets per state code in the calling thread's network namespace, IPv4 and IPv6,
    and the number of malformed messages. Raises OSError when the interface is missing or
    refuses."""
    states: Counter[int] = Counter()
    errors = 0
    for family in FAMILIES:
        # A socket per family: a dump pyroute2 stopped reading (an undecodable record) is
        # still running in the kernel, which refuses the next request on that socket (EBUSY).
        with DiagSocket() as ds:
            ds.bind()
            errors += _dump(ds, family, states)
    return states, errors
