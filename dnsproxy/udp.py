"""The proxy's UDP side: one event loop holding every query that waits for its upstream.

Each thread of the design this replaced did one blocking upstream round trip at a time, and
16 of them contending for the GIL capped the proxy at a few thousand queries per second. Here
one thread reads queries from the listening sockets (IPv4 and IPv6), decides each
(:meth:`DnsProxy.begin <dnsproxy.server.DnsProxy.begin>`), sends the allowed ones upstream
and goes on reading; answers are taken as they arrive, learned into the allow map and only
then released to the pod (:meth:`DnsProxy.finish <dnsproxy.server.DnsProxy.finish>`).

Each forwarded query gets its own connected, non-blocking socket, as the blocking design had:
the kernel gives it a random source port, so an off-path spoofer must guess port and ID
(RFC 5452), a connected socket takes datagrams from the upstream's address only, and an ICMP
error (a closed port upstream) fails exactly the query it belongs to, at once. The answer
must carry the query's ID and question, or it is ignored as stray. A query unanswered after
the upstream timeout is answered SERVFAIL; one upstream that never answers holds only its
own queries' sockets, never the loop.

At most ``max_in_flight`` queries wait at once (each holds a descriptor): beyond that the loop
stops reading new queries until answers come back, and they wait in the listening socket's
buffer (4 MiB), as they did in front of the busy workers before.
"""
from __future__ import annotations

import collections
import logging
import resource
import selectors
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dns.exception

if TYPE_CHECKING:
    from dnsproxy.server import DnsProxy, Forward

log = logging.getLogger("flowtel.dnsproxy")

# Socket options Python's socket module does not name (linux/in.h, linux/in6.h).
_SOL_IP, _SOL_IPV6 = 0, 41
_IP_PKTINFO, _IP_TRANSPARENT, _IP_RECVORIGDSTADDR = 8, 19, 20
_IPV6_RECVORIGDSTADDR, _IPV6_TRANSPARENT = 74, 75
_ANCILLARY_SIZE = socket.CMSG_SPACE(28)  # one sockaddr_in6, the larger of the two
_SO_RCVBUFFORCE = 33  # asm-generic/socket.h; Python's socket module does not name it
RECEIVE_BUFFER = 4 << 20  # bytes of queries a listening socket holds while the loop is busy
# Datagrams read from one listening socket per wake-up before the loop looks at answers again:
# amortizes the wait for events under load, and bounds how long answers wait behind queries.
BATCH = 64
# Descriptors kept for everything but upstream sockets (TCP connections, maps, HTTP servers).
_FD_RESERVE = 512


def make_transparent(sock: socket.socket) -> None:
    """Let ``sock`` take packets for (and send from) addresses that are not the host's."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(_SOL_IPV6, _IPV6_TRANSPARENT, 1)
        sock.setsockopt(_SOL_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own socket
    else:
        sock.setsockopt(_SOL_IP, _IP_TRANSPARENT, 1)


def udp_listen_socket(host: str, port: int) -> socket.socket:
    """A transparent UDP socket on (host, port) reporting each datagram's original destination."""
    v6 = ":" in host
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            # Past net.core.rmem_max (208 KiB on many nodes): bursts wait here, not in drops.
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:  # without CAP_NET_ADMIN: what rmem_max allows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        make_transparent(sock)
        # The destination each datagram had before the redirect: the resolver the pod asked.
        if v6:
            sock.setsockopt(_SOL_IPV6, _IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(_SOL_IP, _IP_RECVORIGDSTADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def orig_dst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """(address, port) from an IP_ORIGDSTADDR / IPV6_ORIGDSTADDR message (a sockaddr_in[6])."""
    for level, kind, data in ancdata:
        if level == _SOL_IP and kind == _IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntop(socket.AF_INET, data[4:8]), struct.unpack("!H", data[2:4])[0]
        if level == _SOL_IPV6 and kind == _IPV6_RECVORIGDSTADDR and len(data) >= 24:
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), struct.unpack("!H", data[2:4])[0]
    return None


def pktinfo(src: str, v6: bool) -> tuple[int, int, bytes]:
    """Ancillary data choosing a datagram's source address (in_pktinfo / in6_pktinfo, any interface)."""
    if v6:
        return _SOL_IPV6, socket.IPV6_PKTINFO, socket.inet_pton(socket.AF_INET6, src) + struct.pack("=I", 0)
    return _SOL_IP, _IP_PKTINFO, struct.pack("=I", 0) + socket.inet_pton(socket.AF_INET, src) + bytes(4)


def fd_budget(wanted: int) -> int:
    """How many upstream sockets may be open at once: ``wanted``, raising the soft descriptor
    limit toward the hard one if it is too low, else what the limit leaves."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + _FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft - _FD_RESERVE >= wanted:
        return wanted
    budget = min(wanted, max(16, soft - _FD_RESERVE))  # a tiny limit still leaves some concurrency
    if budget < wanted:
        log.warning("at most %d UDP queries can wait for their upstream at once (descriptor limit %d; "
                    "raise it to at least %d for %d)", budget, soft, need, wanted)
    return budget


@dataclass(slots=True)
class _Listener:
    sock: socket.socket
    bound: tuple[str, int]
    v6: bool


@dataclass(slots=True, eq=False)
class _Pending:
    fwd: Forward
    sock: socket.socket  # connected to the upstream
    listener: _Listener  # the answer leaves from here
    peer: Any  # the pod's address, as recvmsg gave it
    reply_from: str  # the resolver the pod asked: the answer's source
    deadline: float
    done: bool = False


_STOP = object()


class UdpLoop:
    """Serves the given listening sockets until :meth:`stop`; run :meth:`run` on its own thread."""

    def __init__(self, proxy: DnsProxy, listeners: list[tuple[socket.socket, tuple[str, int]]],
                 timeout_s: float, max_in_flight: int) -> None:
        self.proxy = proxy
        self.timeout_s = timeout_s
        self.max_in_flight = fd_budget(max_in_flight)
        self.in_flight = 0
        self._sel = selectors.DefaultSelector()
        self._listeners = [_Listener(sock, bound, sock.family == socket.AF_INET6) for sock, bound in listeners]
        for lst in self._listeners:
            lst.sock.setblocking(False)
        self._reading = False
        self._resume_reading()
        # Pending queries in the order they were sent: with one timeout for all, also the
        # order of their deadlines. Answered ones are dropped when they reach the front.
        self._deadlines: collections.deque[_Pending] = collections.deque()
        self._pktinfo: dict[str, tuple[int, int, bytes]] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _STOP)
        self._stopping = False

    def stop(self) -> None:
        """Ask the loop to end (from another thread); it closes every socket it holds."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def run(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._deadlines:
                    timeout = max(0.0, self._deadlines[0].deadline - time.monotonic())
                for key, _ in self._sel.select(timeout):
                    data = key.data
                    if data is _STOP:
                        return
                    if isinstance(data, _Pending):
                        self._read_answer(data)
                    else:
                        self._read_queries(data)
                self._expire(time.monotonic())
        finally:
            self._close()

    # -- queries -----------------------------------------------------------------------------

    def _read_queries(self, lst: _Listener) -> None:
        if not self._reading:
            return  # paused by the other family's socket earlier in this round of events
        proxy = self.proxy
        for _ in range(BATCH):
            try:
                wire, ancdata, _flags, peer = lst.sock.recvmsg(65535, _ANCILLARY_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:  # not expected on an unconnected socket; never fatal to the loop
                log.warning("reading a UDP query on %s: %s", lst.bound[0], exc)
                return
            try:
                orig = orig_dst(ancdata) or lst.bound
                step = proxy.begin(wire, peer[0], False, orig)
                if step is None:
                    continue
                if isinstance(step, bytes):
                    self._reply(lst, peer, orig[0], step)
                else:
                    self._send_upstream(step, lst, peer, orig[0])
            except Exception:  # one bad exchange must not take the loop away
                log.exception("handling a UDP query from %s", peer[0])
            if self.in_flight >= self.max_in_flight:
                return  # _send_upstream stopped reading; the rest waits in the socket buffer

    def _send_upstream(self, fwd: Forward, lst: _Listener, peer: Any, reply_from: str) -> None:
        host, port = fwd.target
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((host, port))
            fwd.asked_ns = time.monotonic_ns()
            sock.send(fwd.wire)
        except OSError as exc:  # no route, unreachable: the upstream failed at once
            sock.close()
            self._reply(lst, peer, reply_from, self.proxy.fail(fwd, exc))
            return
        pending = _Pending(fwd, sock, lst, peer, reply_from, time.monotonic() + self.timeout_s)
        self._sel.register(sock, selectors.EVENT_READ, pending)
        self._deadlines.append(pending)
        self.in_flight += 1
        if self.in_flight >= self.max_in_flight:
            self._pause_reading()

    # -- answers -----------------------------------------------------------------------------

    def _read_answer(self, p: _Pending) -> None:
        while not p.done:
            try:
                data = p.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError as exc:  # an ICMP error: refused, unreachable
                self._complete(p, self.proxy.fail(p.fwd, exc))
                return
            resp: bytes | None
            try:
                answer = self.proxy.match(p.fwd, data)
                if answer is None:
                    continue  # another ID or question: stray or spoofed; keep waiting for ours
                resp = self.proxy.finish(p.fwd, data, answer)
            except dns.exception.DNSException as exc:  # not DNS at all
                resp = self.proxy.fail(p.fwd, exc)
            except Exception:
                # E.g. the allow map refused the write: the answer must not reach the pod without
                # its addresses allowed, so it gets none (its resolver retries), as before.
                log.exception("completing the UDP query from %s", p.peer[0])
                resp = None
            self._complete(p, resp)

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        # Answered ones leave from the front too, so the queue holds about what is in flight.
        while deadlines and (deadlines[0].done or deadlines[0].deadline <= now):
            p = deadlines.popleft()
            if not p.done:
                self._complete(p, self.proxy.fail(p.fwd, TimeoutError(f"no answer within {self.timeout_s:g} s")))

    def _complete(self, p: _Pending, resp: bytes | None) -> None:
        p.done = True
        self._sel.unregister(p.sock)
        p.sock.close()
        self.in_flight -= 1
        if not self._reading and self.in_flight < self.max_in_flight:
            self._resume_reading()
        if resp is not None:
            self._reply(p.listener, p.peer, p.reply_from, resp)

    # -- plumbing ----------------------------------------------------------------------------

    def _reply(self, lst: _Listener, peer: Any, reply_from: str, resp: bytes) -> None:
        info = self._pktinfo.get(reply_from)
        if info is None:
            info = pktinfo(reply_from, lst.v6)
            if len(self._pktinfo) < 1024:  # resolvers pods ask: a handful; bounded all the same
                self._pktinfo[reply_from] = info
        try:
            # From the address the pod asked, or it would discard the answer.
            lst.sock.sendmsg([resp], [info], 0, peer)
        except OSError as exc:
            log.warning("sending the answer to %s: %s", peer[0], exc)

    def _pause_reading(self) -> None:
        if not self._reading:
            return
        for lst in self._listeners:
            self._sel.unregister(lst.sock)
        self._reading = False

    def _resume_reading(self) -> None:
        for lst in self._listeners:
            self._sel.register(lst.sock, selectors.EVENT_READ, lst)
        self._reading = True

    def _close(self) -> None:
        for p in self._deadlines:
            if not p.done:
                p.sock.close()
        self._deadlines.clear()
        self._sel.close()
        for lst in self._listeners:
            lst.sock.close()
        self._wake_r.close()
        self._wake_w.close()
