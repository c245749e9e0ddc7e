"""A quiet test bed of Kubernetes-like "pods": network namespaces joined to the host by veths.

Used by the integration tests and by ``flowtel demo`` (DESIGN.md section 5). Each pod is a
network namespace whose ``eth0`` is one end of a veth pair; the other end stays on the host
as ``{prefix}{index}``. Routing is Calico's: every pod has a /32 (and optionally a ULA /128),
its default route points at the link-local gateway 169.254.1.1 (``fe80::1`` for IPv6), and the
host routes each pod address to the pod's host-side veth.

The bed is *quiet*: neighbour entries are static on both ends of every veth and IPv6 is off
on the veths unless a pod asks for it, so no ARP, RS, ND or MLD frame is ever sent. The only
frames on a host-side veth are the ones a test sends, and ``ip -s link`` counter deltas
(:meth:`Testbed.link_stats`) are the exact truth to compare flowtel's numbers against.
Pods created with ``ipv6=True`` are quiet too (see :meth:`Testbed.add_pod` for how).

Traffic stays on this machine: pod addresses come from a per-testbed /24 in 198.18.0.0/15
(RFC 2544 benchmark range) and the whole /24 is covered by an ``unreachable`` guard route on
the host, so a packet for an address that is not a pod is answered with an ICMP error
instead of following the default route off the machine. IPv6 pods get a /64 in
``fd00:f7::/32`` guarded the same way.

Everything a testbed creates is removed by :meth:`Testbed.close` (also run by ``with`` and at
interpreter exit). Names embed the creating process's pid (netns ``flowtel-{pid}-{pod}``,
host veth ``ft{pid}p{index}``, guard routes carry the pid as their metric), so
:meth:`Testbed.cleanup_stale` can remove what a killed run left behind without touching
the testbeds of live processes running concurrently on the same machine. A second testbed
alive in the same process takes the next letter instead of ``p`` (``ft{pid}q{index}``,
netns ``flowtel-{pid}.q-{pod}``), so globs and names never overlap.

Traffic helpers (:func:`send_ping`, :func:`send_tcp`, :func:`send_udp`) and the sinks are small
Python programs run inside the pods: deterministic, and independent of which network tools a
machine has (iputils ``ping`` is not installed everywhere; :func:`send_ping` sends the same
frames).

Host sysctls ``net.ipv4.ip_forward`` (and, on kernels without the per-interface
``force_forwarding``, ``net.ipv6.conf.all.forwarding``) are switched on and deliberately left
on at close: another testbed in a concurrent process may be relying on them, and restoring
the old value would silently break its pods' connectivity.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import functools
import ipaddress
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

__all__ = [
    "DNS_PROBE_NAME",
    "CommandError",
    "LinkStats",
    "PingResult",
    "Pod",
    "Sent",
    "SinkProcess",
    "Testbed",
    "TestbedError",
    "capture",
    "send_ping",
    "send_tcp",
    "send_udp",
]

log = logging.getLogger(__name__)

#: Name queried by :meth:`Testbed.start_dnsmasq` to learn that dnsmasq answers. ``.invalid``
#: can never be a real name, so it cannot collide with a test's ``hosts``.
DNS_PROBE_NAME = "flowtel-testbed-probe.invalid"

# Route protocol number marking the guard routes as ours (unassigned in rt_protos; the
# metric alone is not enough to tell them apart from someone else's unreachable routes).
GUARD_ROUTE_PROTO = 247

POD_GATEWAY_V4 = "169.254.1.1"
POD_GATEWAY_V6 = "fe80::1"
_V4_SUPERNET = ipaddress.ip_network("198.18.0.0/15")
_V6_SUPERNET = ipaddress.ip_network("fd00:f7::/32")
# Third octets tried for the /24, starting at one derived from the pid.
_V4_OCTETS = range(20, 220)

_IFNAMSIZ = 15
_POD_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
# Names that embed the pid of the process that created them; see Testbed.cleanup_stale.
_NETNS_RE = re.compile(r"^flowtel-(\d+)(?:\.[a-z])?-.+$")
_LINK_RE = re.compile(r"^ft(\d+)[a-z]\d+$")
_TMPDIR_RE = re.compile(r"^flowtel-testbed-(\d+)-")
# One letter per live Testbed of this process, so two testbeds in one process get distinct
# prefixes and netns names; "p" first so that the common case reads ft{pid}p{index}.
_TAG_LETTERS = "pqrstuvwxyzabcdefghijklmno"
_live_tags: set[str] = set()
_live_tags_lock = threading.Lock()

_LOCK_PATH = "/run/lock/flowtel-testbed.lock" if os.path.isdir("/run/lock") else os.path.join(
    tempfile.gettempdir(), "flowtel-testbed.lock"
)

_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21

_TOOL_PACKAGES = {
    "ip": "iproute2",
    "dnsmasq": "dnsmasq-base",
    "dig": "dnsutils",
    "tcpdump": "tcpdump",
}


class TestbedError(RuntimeError):
    """The testbed cannot be built or used on this machine; the message says how to fix it."""

    __test__ = False  # not a pytest test class despite the name


class CommandError(subprocess.CalledProcessError):
    """A command failed; unlike CalledProcessError, str() shows what it printed."""

    def __str__(self) -> str:
        text = super().__str__()
        for name, out in (("stderr", self.stderr), ("stdout", self.output)):
            if out:
                out = out if isinstance(out, str) else out.decode(errors="replace")
                text += f"\n{name}: {out.strip()[-2000:]}"
        return text


@functools.cache
def require_tool(name: str) -> str:
    """Path of a command-line tool the testbed needs, or a TestbedError naming its package."""
    path = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin", "/usr/bin") if os.access(p := os.path.join(d, name), os.X_OK)),
        None,
    )
    if path is None:
        pkg = _TOOL_PACKAGES.get(name, name)
        raise TestbedError(
            f"`{name}` not found; install it with `apt-get install {pkg}` (or run scripts/setup.sh)"
        )
    return path


def _require_privileges() -> None:
    cap_eff = 0
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    cap_eff = int(line.split()[1], 16)
    needed = (1 << _CAP_NET_ADMIN) | (1 << _CAP_SYS_ADMIN)
    if cap_eff & needed != needed:
        raise TestbedError(
            "the flowtel testbed needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network "
            "namespaces, veths and routes; run as root, e.g. `sudo make test`"
        )


def _run(argv: list[str], *, check: bool = True, input: str | None = None,
         timeout: float | None = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=input, text=True, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [require_tool("ip")]
    if netns is not None:
        argv += ["-n", netns]
    return _run(argv + list(args), check=check)


def _ip_json(*args: str, netns: str | None = None) -> list[dict[str, Any]]:
    out = _ip("-j", *args, netns=netns).stdout.strip()
    return json.loads(out) if out else []


def _ip_batch(lines: Iterable[str], *, netns: str | None = None) -> None:
    # One `ip` process for many commands: add_pod would otherwise fork a dozen times.
    argv = [require_tool("ip")]
    if netns is not None:
        argv += ["-n", netns]
    text = "".join(line + "\n" for line in lines)
    proc = _run(argv + ["-batch", "-"], input=text, check=False)
    if proc.returncode != 0:
        raise CommandError(proc.returncode, argv + ["-batch", "-"], text, proc.stderr)


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/run/netns", name))


def _link_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/sys/class/net", name))


def _kill_process_group(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    if proc.poll() is not None:
        return
    # Processes are started in their own session, so the group holds their children too.
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass(frozen=True)
class LinkStats:
    """Kernel counters of one interface. On a host-side veth, rx is what the pod sent."""

    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0
    rx_errors: int = 0
    tx_errors: int = 0

    def __sub__(self, other: LinkStats) -> LinkStats:
        return LinkStats(**{
            f.name: getattr(self, f.name) - getattr(other, f.name) for f in dataclasses.fields(self)
        })


@dataclass(frozen=True)
class Sent:
    """What send_tcp / send_udp put on the wire, with the 5-tuple a flow record should show."""

    protocol: str  # "tcp" or "udp"
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    payload_bytes: int
    datagrams: int | None = None  # UDP only: TCP segmentation is the kernel's business


class SinkProcess(subprocess.Popen):
    """A sink server; it appends one JSON object per line to ``report_path``.

    TCP sink records: ``{"event": "closed", "peer": ip, "peer_port": n, "bytes": n}``, written
    when the peer's EOF arrives and before the sink closes its side, so when a sender has seen
    the sink's FIN the record is already in the file. UDP: ``{"event": "datagram", ...}``.
    """

    report_path: str

    def records(self) -> list[dict[str, Any]]:
        """Records so far, the "listening" one left out."""
        # The last piece is either empty or a line still being written: never parse it.
        lines = _read(self.report_path).split("\n")[:-1]
        return [r for r in map(json.loads, filter(None, lines)) if r.get("event") != "listening"]

    def wait_records(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            recs = self.records()
            if len(recs) >= count or time.monotonic() > deadline:
                return recs
            time.sleep(0.02)


@dataclass
class Pod:
    name: str
    netns: str
    ipv4: str
    ipv6: str | None
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_mac: str
    _testbed: Testbed | None = field(default=None, repr=False, compare=False)

    def _argv(self, argv: list[str]) -> list[str]:
        return [require_tool("ip"), "netns", "exec", self.netns, *argv]

    def exec(self, argv: list[str], *, check: bool = True, timeout: float | None = 30,
             **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run argv inside the pod and wait; text output captured unless kw says otherwise."""
        kw.setdefault("text", True)
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        full = self._argv(argv)
        proc = subprocess.run(full, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, full, proc.stdout, proc.stderr)
        return proc

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running process in the pod; the testbed kills it (and its children) on close."""
        return self._spawn(argv, subprocess.Popen, **kw)

    def _spawn(self, argv: list[str], cls: type[subprocess.Popen[Any]], **kw: Any) -> Any:
        # `ip netns exec` execs argv in place, so the pid is the program's own; its own session
        # lets close() kill whatever it forks as well.
        kw.setdefault("start_new_session", True)
        proc = cls(self._argv(argv), **kw)
        if self._testbed is not None:
            self._testbed._track(proc)
        return proc


@dataclass
class _Created:
    """What a testbed must undo, each object recorded as soon as it exists."""

    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    routes: list[tuple[str, ...]] = field(default_factory=list)  # `ip route del` arguments


class Testbed:
    """A set of pods on this host. Use as a context manager; close() is idempotent."""

    __test__ = False  # not a pytest test class despite the name

    prefix: str
    interface_glob: str
    pods: dict[str, Pod]

    def __init__(self, *, prefix: str | None = None) -> None:
        _require_privileges()
        require_tool("ip")
        self._pid = os.getpid()
        self._closed = False
        self._lock = threading.RLock()
        self._procs: list[subprocess.Popen[Any]] = []
        self._created = _Created()
        self._next_index = 0
        self.pods = {}
        self._tag = self._claim_tag()
        try:
            self.prefix = prefix if prefix is not None else f"ft{self._pid}{self._tag}"
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.prefix) or len(self.prefix) > _IFNAMSIZ - 1:
                raise TestbedError(
                    f"prefix {self.prefix!r}: need 1-{_IFNAMSIZ - 1} characters of [A-Za-z0-9_.-] "
                    "(host veths are named prefix+index, at most 15 characters)"
                )
            self.interface_glob = self.prefix + "*"
            self._netns_stem = f"flowtel-{self._pid}" + ("" if self._tag == "p" else f".{self._tag}")
            self.tmpdir = tempfile.mkdtemp(prefix=f"flowtel-testbed-{self._pid}-")
            atexit.register(self.close)
            self._v4_net, self._v6_net = self._claim_subnets()
            # Pods reach each other through the host; left on at close, see the module docstring.
            _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        except BaseException:
            self.close()
            raise

    # -- allocation ---------------------------------------------------------------------

    @staticmethod
    def _claim_tag() -> str:
        with _live_tags_lock:
            for letter in _TAG_LETTERS:
                if letter not in _live_tags:
                    _live_tags.add(letter)
                    return letter
        raise TestbedError(f"more than {len(_TAG_LETTERS)} live testbeds in one process")

    def _claim_subnets(self) -> tuple[ipaddress.IPv4Network, ipaddress.IPv6Network]:
        # The lock makes "is this /24 free? then take it" atomic between concurrent processes;
        # IPv4 lets routes to one prefix with different metrics coexist, so `ip route add` alone
        # would not refuse a second owner.
        start = self._pid % len(_V4_OCTETS)
        with open(_LOCK_PATH, "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                for i in range(len(_V4_OCTETS)):
                    octet = _V4_OCTETS[(start + i) % len(_V4_OCTETS)]
                    net = ipaddress.IPv4Network(f"198.18.{octet}.0/24")
                    if _ip_json("route", "show", "root", str(net), "table", "all"):
                        continue
                    guard = ("unreachable", str(net), "metric", str(self._pid),
                             "proto", str(GUARD_ROUTE_PROTO))
                    _ip("-4", "route", "add", *guard)
                    self._created.routes.append(("-4", *guard))
                    v6 = ipaddress.IPv6Network(f"fd00:f7:{octet:x}::/64")
                    return net, v6
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)
        raise TestbedError(
            "no free /24 in 198.18.20.0-198.18.219.0; run Testbed.cleanup_stale() to remove "
            "leftovers of killed runs"
        )

    @property
    def ipv4_network(self) -> ipaddress.IPv4Network:
        """The /24 this testbed's pods take their IPv4 addresses from (guarded, see module doc)."""
        return self._v4_net

    @property
    def ipv6_network(self) -> ipaddress.IPv6Network:
        """The /64 of IPv6 pods; guarded once the first IPv6 pod exists."""
        return self._v6_net

    def _track(self, proc: subprocess.Popen[Any]) -> None:
        with self._lock:
            self._procs.append(proc)

    # -- pods ---------------------------------------------------------------------------

    def add_pod(self, name: str, *, ipv6: bool = False) -> Pod:
        """Create a pod: a netns whose eth0 is a veth to the host, routed Calico-style.

        With ``ipv6=True`` the pod also gets a ULA /128 with the same care: no DAD, no RA or RS,
        no link-local address, static neighbours, and the pod's eth0 marked NOARP so that the
        kernel joins no solicited-node multicast group and so sends no MLD report for it (measured
        here: without NOARP each IPv6 pod sends two 90-byte MLDv2 reports in its first second).
        IPv6 pods are therefore as frame-quiet as IPv4 ones. The price of NOARP: a neighbour that
        is not configured statically would resolve to eth0's own MAC and never be reached, which
        cannot happen with the pod's /32, /128 and gateway-only routes.
        """
        with self._lock:
            if self._closed:
                raise TestbedError("testbed is closed")
            if not _POD_NAME_RE.match(name):
                raise TestbedError(f"pod name {name!r}: use lowercase letters, digits, '-' and '.'")
            if name in self.pods:
                raise TestbedError(f"pod {name!r} already exists")
            index = self._next_index
            if index + 2 > 254:
                raise TestbedError("a testbed holds at most 253 pods")
            host_if = f"{self.prefix}{index}"
            if len(host_if) > _IFNAMSIZ:
                raise TestbedError(f"host veth name {host_if!r} is longer than {_IFNAMSIZ} characters")
            netns = f"{self._netns_stem}-{name}"
            ipv4 = str(self._v4_net.network_address + index + 2)
            ipv6_addr = str(self._v6_net.network_address + index + 2) if ipv6 else None
            if ipv6:
                self._ensure_v6_guard()
            # Never reused, so a failed attempt cannot collide with a later one.
            self._next_index += 1
            try:
                pod = self._build_pod(name, netns, host_if, ipv4, ipv6_addr)
            except BaseException:
                self._remove_pod_objects(netns, host_if)
                raise
            self.pods[name] = pod
            return pod

    def _remove_pod_objects(self, netns: str, host_if: str) -> None:
        if host_if in self._created.links:
            _ip("link", "del", "dev", host_if, check=False)
            self._created.links.remove(host_if)
        if netns in self._created.netns:
            _kill_netns_processes(netns)
            _ip("netns", "del", netns, check=False)
            self._created.netns.remove(netns)

    def _build_pod(self, name: str, netns: str, host_if: str, ipv4: str, ipv6_addr: str | None) -> Pod:
        ipv6 = ipv6_addr is not None
        # Recorded only once created: a name that exists already is someone else's to keep.
        _ip("netns", "add", netns)
        self._created.netns.append(netns)
        # Set through `default` so that eth0 is born with these values: a veth created
        # straight into the netns never exists with IPv6 on, so not even a down-state race.
        if ipv6:
            pod_sysctls = [f"net.ipv6.conf.default.{k}={v}" for k, v in _V6_QUIET_SYSCTLS.items()]
        else:
            pod_sysctls = ["net.ipv6.conf.default.disable_ipv6=1"]
        _run([require_tool("ip"), "netns", "exec", netns, "sysctl", "-q", "-w", *pod_sysctls])

        _ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", netns)
        self._created.links.append(host_if)
        # Host end: before it is brought up, so it never sends RS/ND/MLD.
        host_sysctls = dict(_V6_QUIET_SYSCTLS) if ipv6 else {"disable_ipv6": "1"}
        if ipv6:
            host_sysctls.update(self._v6_forwarding_sysctls())
        for key, value in host_sysctls.items():
            _write_sysctl(f"/proc/sys/net/ipv6/conf/{host_if}/{key}", value)

        host_link = _ip_json("link", "show", "dev", host_if)[0]
        pod_link = _ip_json("link", "show", "dev", "eth0", netns=netns)[0]
        host_mac, pod_mac = host_link["address"], pod_link["address"]

        host_cmds = [
            f"link set dev {host_if} up",
            f"route add {ipv4}/32 dev {host_if}",
            f"neigh add {ipv4} lladdr {pod_mac} dev {host_if} nud permanent",
        ]
        pod_cmds = [
            "link set dev lo up",
            f"address add {ipv4}/32 dev eth0",
        ]
        if ipv6_addr:
            host_cmds += [
                f"route add {ipv6_addr}/128 dev {host_if}",
                f"neigh add {ipv6_addr} lladdr {pod_mac} dev {host_if} nud permanent",
            ]
            # NOARP: the kernel joins no solicited-node group, so sends no MLD report for one.
            pod_cmds += ["link set dev eth0 arp off", f"address add {ipv6_addr}/128 dev eth0 nodad"]
        pod_cmds += [
            "link set dev eth0 up",
            f"route add {POD_GATEWAY_V4} dev eth0 scope link",
            f"route add default via {POD_GATEWAY_V4} dev eth0",
            f"neigh add {POD_GATEWAY_V4} lladdr {host_mac} dev eth0 nud permanent",
        ]
        if ipv6_addr:
            pod_cmds += [
                f"route add ::/0 via {POD_GATEWAY_V6} dev eth0",
                f"neigh add {POD_GATEWAY_V6} lladdr {host_mac} dev eth0 nud permanent",
            ]
        _ip_batch(host_cmds)
        _ip_batch(pod_cmds, netns=netns)

        return Pod(name=name, netns=netns, ipv4=ipv4, ipv6=ipv6_addr, host_ifname=host_if,
                   host_ifindex=int(host_link["ifindex"]), host_mac=host_mac, pod_mac=pod_mac,
                   _testbed=self)

    def _ensure_v6_guard(self) -> None:
        guard = ("unreachable", str(self._v6_net), "metric", str(self._pid),
                 "proto", str(GUARD_ROUTE_PROTO))
        if ("-6", *guard) in self._created.routes:
            return
        _ip("-6", "route", "add", *guard)
        self._created.routes.append(("-6", *guard))

    @staticmethod
    def _v6_forwarding_sysctls() -> dict[str, str]:
        # Kernels >= 6.17 can forward IPv6 arriving on one interface only; older ones need the
        # global switch, which also stops the host's own uplink from accepting RAs.
        if os.path.exists("/proc/sys/net/ipv6/conf/all/force_forwarding"):
            return {"force_forwarding": "1"}
        _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        return {}

    # -- observation --------------------------------------------------------------------

    def link_stats(self, pod: Pod) -> LinkStats:
        """Counters of the pod's host-side veth (rx = sent by the pod, tx = delivered to it)."""
        link = _ip_json("-s", "link", "show", "dev", pod.host_ifname)[0]
        st = link["stats64"]
        rx, tx = st["rx"], st["tx"]
        return LinkStats(
            rx_packets=rx["packets"], rx_bytes=rx["bytes"], tx_packets=tx["packets"], tx_bytes=tx["bytes"],
            rx_dropped=rx["dropped"], tx_dropped=tx["dropped"], rx_errors=rx["errors"], tx_errors=tx["errors"],
        )

    # -- servers ------------------------------------------------------------------------

    def start_dnsmasq(self, pod: Pod, *, hosts: dict[str, list[str]] | None = None,
                      log_path: str | None = None, extra_args: Iterable[str] = (),
                      ttl: int = 60) -> subprocess.Popen[Any]:
        """Run dnsmasq in the pod as an authoritative-only server on port 53 (UDP and TCP).

        It listens only on the pod's own addresses and answers from ``hosts`` (name -> IPv4/IPv6
        strings, with ``ttl``). It has no upstream: every other name gets NXDOMAIN, and a
        configured name asked for a type it has no address of gets NOERROR with no answer
        (NODATA). That is ``--local=/#/``; without it dnsmasq 2.90 answers REFUSED (EDE "not
        ready") to everything it cannot answer, NODATA included.

        Returns once dnsmasq has answered a probe query for :data:`DNS_PROBE_NAME`, asked from
        inside the pod over its loopback, so the probe never crosses the veth. With
        ``log_path``, queries are logged there (``--log-queries``) and the file is truncated
        after the probe, so it holds only the queries that come after this call returns.
        """
        require_tool("dig")
        argv = [
            require_tool("dnsmasq"), "--keep-in-foreground", "--conf-file=/dev/null",
            "--no-resolv", "--no-hosts", "--no-poll", "--local=/#/", "--bind-interfaces",
            "--port=53", f"--listen-address={pod.ipv4}", "--pid-file=",
            f"--local-ttl={ttl}",
        ]
        if pod.ipv6:
            argv.append(f"--listen-address={pod.ipv6}")
        for name, addrs in (hosts or {}).items():
            for addr in addrs:
                ipaddress.ip_address(addr)  # a typo should fail here, not as a confusing NODATA
                argv.append(f"--host-record={name},{addr}")
        stem = os.path.join(self.tmpdir, f"dnsmasq-{pod.name}-{len(self._procs)}")
        if log_path is not None:
            argv += [f"--log-facility={os.path.abspath(log_path)}", "--log-queries"]
        else:
            argv.append(f"--log-facility={stem}.log")
        argv += list(extra_args)
        with open(f"{stem}.stderr", "w") as err:
            proc = pod.popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT)

        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise TestbedError(f"dnsmasq in pod {pod.name} exited with {proc.returncode}: "
                                   f"{_tail(stem + '.stderr')}{_tail(log_path or stem + '.log')}")
            probe = pod.exec(["dig", "+time=1", "+tries=1", f"@{pod.ipv4}", DNS_PROBE_NAME],
                             check=False, timeout=5)
            if "status: NXDOMAIN" in probe.stdout:
                break
            if time.monotonic() > deadline:
                _kill_process_group(proc)
                raise TestbedError(f"dnsmasq in pod {pod.name} did not answer within 10s: {probe.stdout}")
            time.sleep(0.05)
        if log_path is not None:
            # dnsmasq logs asynchronously; wait for the probe's answer line so that truncating
            # cannot leave half of the probe's log behind.
            marker = f"config {DNS_PROBE_NAME} is"
            while marker not in _read(log_path):
                if time.monotonic() > deadline:
                    raise TestbedError(f"dnsmasq did not log the probe query to {log_path}")
                time.sleep(0.02)
            os.truncate(log_path, 0)  # dnsmasq opens its log with O_APPEND
        return proc

    def start_tcp_sink(self, pod: Pod, port: int) -> SinkProcess:
        """A server in the pod that accepts connections, reads each to EOF and reports the byte
        count (see :class:`SinkProcess`). Returns when it is listening."""
        return self._start_sink(pod, "tcp", port)

    def start_udp_sink(self, pod: Pod, port: int) -> SinkProcess:
        """A UDP server in the pod reporting each datagram received. Returns when bound."""
        return self._start_sink(pod, "udp", port)

    def _start_sink(self, pod: Pod, proto: str, port: int) -> SinkProcess:
        bind = "::" if pod.ipv6 else "0.0.0.0"
        report = os.path.join(self.tmpdir, f"sink-{proto}-{pod.name}-{port}.jsonl")
        with open(report, "w") as out, open(report + ".stderr", "w") as err:
            proc: SinkProcess = pod._spawn(
                [sys.executable, "-c", _SINK_CODE, proto, bind, str(port)], SinkProcess,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )
        proc.report_path = report
        deadline = time.monotonic() + 10
        while '"listening"' not in _read(report):
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill_process_group(proc)
                raise TestbedError(f"{proto} sink on {pod.name}:{port} did not start: {_tail(report + '.stderr')}")
            time.sleep(0.01)
        return proc

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Kill the pods' processes and remove every netns, link, route and file created.

        Idempotent, tolerant of objects already gone, and a no-op in a forked child (whose
        exit must not tear down its parent's testbed).
        """
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            problems: list[str] = []
            for proc in self._procs:
                _kill_process_group(proc)
            for netns in self._created.netns:
                _kill_netns_processes(netns)
            # Deleting the host end removes the pair at once; deleting only the netns would
            # leave the host end around until the kernel's asynchronous netns cleanup runs.
            for link in self._created.links:
                if _ip("link", "del", "dev", link, check=False).returncode and _link_exists(link):
                    problems.append(f"link {link}")
            for netns in self._created.netns:
                if _ip("netns", "del", netns, check=False).returncode and _netns_exists(netns):
                    problems.append(f"netns {netns}")
            for route in self._created.routes:
                family, *spec = route
                res = _ip(family, "route", "del", *spec, check=False)
                if res.returncode and "No such process" not in res.stderr:
                    problems.append(f"route {' '.join(spec)}: {res.stderr.strip()}")
            if getattr(self, "tmpdir", None):
                shutil.rmtree(self.tmpdir, ignore_errors=True)
            with _live_tags_lock:
                _live_tags.discard(self._tag)
            if problems:
                log.warning("testbed close left behind: %s", "; ".join(problems))

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Remove what testbeds of processes that no longer exist left behind.

        A testbed's objects embed its creator's pid (netns and veth names; the metric of its
        guard routes), so objects of live processes, including concurrent test runs, are
        never touched. Returns a description of each object removed.
        """
        _require_privileges()
        removed: list[str] = []
        for netns in _list_netns():
            m = _NETNS_RE.match(netns)
            if not m or _pid_alive(int(m.group(1))):
                continue
            # Processes of a killed run (dnsmasq, sinks) outlive it and would pin the netns.
            removed += [f"process {pid} in netns {netns}" for pid in _kill_netns_processes(netns)]
            if _ip("netns", "del", netns, check=False).returncode == 0:
                removed.append(f"netns {netns}")
        for link in _ip_json("-d", "link", "show", "type", "veth"):
            m = _LINK_RE.match(link.get("ifname", ""))
            if not m or _pid_alive(int(m.group(1))):
                continue
            if _ip("link", "del", "dev", link["ifname"], check=False).returncode == 0:
                removed.append(f"link {link['ifname']}")
        for family, supernet in (("-4", _V4_SUPERNET), ("-6", _V6_SUPERNET)):
            routes = _ip_json(family, "route", "show", "table", "main", "type", "unreachable",
                              "proto", str(GUARD_ROUTE_PROTO))
            for route in routes:
                dst, metric = route.get("dst", ""), route.get("metric")
                try:
                    inside = ipaddress.ip_network(dst).subnet_of(supernet)  # type: ignore[arg-type]  # another version raises TypeError, caught
                except (ValueError, TypeError):
                    continue
                if not inside or not metric or _pid_alive(int(metric)):
                    continue
                spec = ("unreachable", dst, "metric", str(metric), "proto", str(GUARD_ROUTE_PROTO))
                if _ip(family, "route", "del", *spec, check=False).returncode == 0:
                    removed.append(f"route {' '.join(spec)}")
        tmp = tempfile.gettempdir()
        for entry in os.listdir(tmp):
            m = _TMPDIR_RE.match(entry)
            if m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(os.path.join(tmp, entry), ignore_errors=True)
                removed.append(f"dir {os.path.join(tmp, entry)}")
        return removed


# IPv6 on a veth end without the chatter that needs no answer here: addresses come without
# DAD, no link-local address is generated, and neither RS nor RA is sent or accepted.
_V6_QUIET_SYSCTLS = {
    "accept_ra": "0",
    "router_solicitations": "0",
    "accept_dad": "0",
    "dad_transmits": "0",
    "addr_gen_mode": "1",
    "disable_ipv6": "0",
}


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def _kill_netns_processes(netns: str) -> list[int]:
    if not _netns_exists(netns):
        return []
    res = _ip("netns", "pids", netns, check=False)
    pids = [int(p) for p in res.stdout.split() if p.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _tail(path: str, limit: int = 2000) -> str:
    return _read(path)[-limit:]


# Servers and clients run as `python -c` inside the pod: no tool to install, same behaviour
# everywhere. Sinks print JSON lines to stdout, which the testbed points at a file (a pipe
# nobody reads would fill up and stall the sink).
_SINK_CODE = r"""
import json, socket, sys, threading
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
lock = threading.Lock()
def emit(**rec):
    with lock:
        sys.stdout.write(json.dumps(rec) + "\n")
        sys.stdout.flush()
srv = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if fam == socket.AF_INET6:
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
srv.bind((host, port))
if proto == "udp":
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    emit(event="listening", port=port)
    while True:
        data, peer = srv.recvfrom(65535)
        emit(event="datagram", peer=peer[0].removeprefix("::ffff:"), peer_port=peer[1], bytes=len(data))
srv.listen(128)
emit(event="listening", port=port)
def serve(conn, peer):
    n = 0
    with conn:
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            n += len(chunk)
        # Reported before our FIN goes out: a sender that saw EOF can read the record at once.
        emit(event="closed", peer=peer[0].removeprefix("::ffff:"), peer_port=peer[1], bytes=n)
while True:
    c, p = srv.accept()
    threading.Thread(target=serve, args=(c, p), daemon=True).start()
"""

_SEND_TCP_CODE = r"""
import json, socket, sys
dst, port, nbytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((dst, port), timeout=20)
src = s.getsockname()
block = bytes(range(256)) * 256
left = nbytes
while left:
    k = min(left, len(block))
    s.sendall(block[:k])
    left -= k
s.shutdown(socket.SHUT_WR)
# Wait for the peer's FIN so that the whole exchange is over when we return.
while s.recv(1 << 16):
    pass
s.close()
print(json.dumps({"src_ip": src[0], "src_port": src[1]}))
"""

_SEND_UDP_CODE = r"""
import json, socket, sys, time
dst, port, count, size, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, port))
payload = (bytes(range(256)) * (size // 256 + 1))[:size]
for i in range(count):
    s.send(payload)
    if interval and i + 1 < count:
        time.sleep(interval)
src = s.getsockname()
print(json.dumps({"src_ip": src[0], "src_port": src[1]}))
"""


_PING_CODE = r"""
import json, os, select, socket, struct, sys, time
dst, count, interval, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
v6 = ":" in dst
if v6:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    req_type, rep_type = 128, 129
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    req_type, rep_type = 8, 0
ident = os.getpid() & 0xFFFF
payload = bytes(range(56))  # ping(8)'s default: 56 data bytes, 84-byte IPv4 packets
def checksum(b):
    total = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF
rtts = []
for seq in range(count):
    pkt = struct.pack("!BBHHH", req_type, 0, 0, ident, seq) + payload
    if not v6:  # the kernel fills in the ICMPv6 checksum itself, not the ICMP one
        pkt = pkt[:2] + struct.pack("!H", checksum(pkt)) + pkt[4:]
    t0 = time.monotonic()
    s.sendto(pkt, (dst, 0))
    while True:
        left = t0 + timeout - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            break
        data, addr = s.recvfrom(65535)
        if not v6:
            data = data[(data[0] & 0x0F) * 4:]  # raw IPv4 sockets see the IP header
        if addr[0] != dst or len(data) < 8:
            continue
        typ, _, _, i, q = struct.unpack("!BBHHH", data[:8])
        if typ == rep_type and i == ident and q == seq:
            rtts.append(time.monotonic() - t0)
            break
    if seq + 1 < count:
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
print(json.dumps({"sent": count, "received": len(rtts), "rtts": rtts}))
"""


@dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    rtts: list[float]  # seconds, one per reply


def send_ping(pod: Pod, dst_ip: str, count: int, *, interval: float = 0.2,
              reply_timeout: float = 1.0) -> PingResult:
    """ICMP echo from the pod, like ``ping -c count -i interval`` but needing no ping binary.

    Each request carries 56 data bytes as ping(8)'s do, so with IPv4 every request and
    every reply is one 98-byte frame on a veth (14 Ethernet + 20 IP + 8 ICMP + 56).
    Requests go one at a time: the next is sent after the reply (or ``reply_timeout``) and no
    sooner than ``interval`` after the previous one.
    """
    dst = str(ipaddress.ip_address(dst_ip))  # the canonical form is what recvfrom() reports
    res = pod.exec([sys.executable, "-c", _PING_CODE, dst, str(count), repr(interval), repr(reply_timeout)],
                   timeout=count * (interval + reply_timeout) + 30)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return PingResult(out["sent"], out["received"], out["rtts"])


def send_tcp(pod: Pod, dst_ip: str, port: int, nbytes: int, *, timeout: float = 30) -> Sent:
    """Connect from the pod, send ``nbytes`` of a fixed pattern, half-close and wait for the
    peer to close. Raises CommandError if the connection fails."""
    res = pod.exec([sys.executable, "-c", _SEND_TCP_CODE, dst_ip, str(port), str(nbytes)], timeout=timeout)
    src = json.loads(res.stdout.strip().splitlines()[-1])
    return Sent("tcp", src["src_ip"], int(src["src_port"]), dst_ip, port, nbytes)


def send_udp(pod: Pod, dst_ip: str, port: int, count: int, size: int, *,
             interval: float = 0.0, timeout: float = 30) -> Sent:
    """Send ``count`` datagrams of ``size`` payload bytes from one socket in the pod.

    ``interval`` (seconds) paces them: an unpaced burst of thousands can overflow the
    per-CPU backlog (net.core.netdev_max_backlog) and be dropped by the kernel.
    """
    res = pod.exec([sys.executable, "-c", _SEND_UDP_CODE, dst_ip, str(port), str(count), str(size),
                    repr(interval)], timeout=timeout)
    src = json.loads(res.stdout.strip().splitlines()[-1])
    return Sent("udp", src["src_ip"], int(src["src_port"]), dst_ip, port, count * size, count)


@contextlib.contextmanager
def capture(pod_or_ifname: Pod | str, *, filter_expr: str = "", netns: str | None = None) -> Iterator[list[str]]:
    """tcpdump on an interface while the block runs; yields a list filled with one line per
    frame (``-tt -e -nn``, epoch timestamps first) when the block ends."""
    ifname = pod_or_ifname.host_ifname if isinstance(pod_or_ifname, Pod) else pod_or_ifname
    argv = [require_tool("tcpdump"), "-i", ifname, "-l", "-nn", "-e", "-tt", "--immediate-mode"]
    if filter_expr:
        argv.append(filter_expr)
    if netns is not None:
        argv = [require_tool("ip"), "netns", "exec", netns, *argv]
    lines: list[str] = []
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, start_new_session=True)
        try:
            # tcpdump says "listening on" once its socket is bound: frames after that are seen.
            # Raw reads, because a buffered reader would hide lines from select().
            assert proc.stderr is not None
            fd = proc.stderr.fileno()
            deadline = time.monotonic() + 10
            banner = b""
            while b"listening on" not in banner:
                if time.monotonic() > deadline:
                    raise TestbedError(f"tcpdump on {ifname} did not start: {banner.decode(errors='replace')}")
                if select.select([fd], [], [], 0.1)[0]:
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        raise TestbedError(f"tcpdump on {ifname} failed: {banner.decode(errors='replace')}")
                    banner += chunk
            yield lines
            time.sleep(0.1)  # --immediate-mode still has to get the last frames to stdout
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
            out.seek(0)
            lines.extend(line.rstrip("\n") for line in out if line.strip())
