"""``flowtel dnsproxy``: the proxy process, its reload loop and its datapath."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
import urllib.parse
from typing import Any

import dns.rcode

from dnsproxy.datapath import (DEFAULT_ADDRESS_LABEL, DEFAULT_NFT_TABLE, DEFAULT_PIN_DIR, MODE_AUDIT, MODE_ENFORCE,
                               Datapath, uninstall)
from dnsproxy.bounded import ServerCounters
from dnsproxy.health import DEFAULT_HEALTH_PORT, HealthServer
from dnsproxy.supervise import Supervisor
from dnsproxy.metrics import DEFAULT_METRICS_PORT, MetricsServer, proxy_points
from dnsproxy.kube import KubeSource
from flowtel.lib.policy import (CidrEntry, EndpointIndex, NodeAddresses, PolicyError, PolicySet, load_pods,
                                load_node_addresses, load_policy_dir, load_services)
from dnsproxy.redirect import (DEFAULT_ROUTE_TABLE, DEFAULT_RULE_PRIORITY, DEFAULT_TPROXY_MARK, Redirect,
                               RedirectConfig, default_listen6, host_has_ipv6)
from dnsproxy.server import DnsProxy, ProxyConfig, snapshot
from flowtel.errors import StartError

log = logging.getLogger("flowtel.dnsproxy")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host_of(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname
    return host or ""


def _host_addresses(ipr: Any) -> list[str]:
    """The host's addresses (IPv4 and global IPv6), loopback and link-local left out."""
    out = []
    for msg in ipr.get_addr():
        addr = msg.get_attr("IFA_ADDRESS")
        if not addr:
            continue
        ip = ipaddress.ip_address(addr)
        if not (ip.is_loopback or ip.is_link_local):
            out.append(str(ip))
    return out


def _hostport(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or (text.count(":") > 1 and not text.startswith("[")):
        return text, default_port  # no port, or a bare IPv6 address (its colons are no separator)
    return host.strip("[]"), int(port)


def _listen6(args: argparse.Namespace, listen: tuple[str, int]) -> tuple[str, int] | None:
    """--listen6 as (address, port); by default derived from --listen; None without IPv6."""
    if args.listen6 == "" or not host_has_ipv6():
        return None
    if args.listen6 is None:
        return default_listen6(listen[0]), listen[1]
    return _hostport(args.listen6, listen[1])  # ADDR or [ADDR]:PORT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", help="directory of CiliumNetworkPolicy/CiliumClusterwideNetworkPolicy YAML files (reloaded on change); with --kube, added to the API's policies")
    p.add_argument("--pods", help="pods file (processors/k8sattributes static shape: pods: [{name, namespace, ips, labels, node, service_account}], namespaces: [{name, labels}]); pods of another node than $NODE_NAME are toEndpoints peers only; not with --kube")
    p.add_argument("--kube", action="store_true", help="watch pods (this node's, $NODE_NAME, are policed; every node's are toEndpoints peers), namespaces and cilium.io/v2 policies in the Kubernetes API (in-cluster credentials)")
    p.add_argument("--kubeconfig", help="with --kube (implied): a kubeconfig instead of the in-cluster credentials")
    p.add_argument("--health-listen", default=f"127.0.0.1:{DEFAULT_HEALTH_PORT}",
                   help=f"HOST:PORT of /healthz and /readyz (default 127.0.0.1:{DEFAULT_HEALTH_PORT}; empty: none)")
    p.add_argument("--upstream", help="forward every allowed query to this DNS server IP[:PORT] (default port 53), e.g. a node-local cache; default: to the resolver the pod asked")
    p.add_argument("--listen", default="169.254.20.53:53", help="IPv4 address of the proxy's sockets (port 53); put on the loopback if the host lacks it (default 169.254.20.53:53)")
    p.add_argument("--listen6", help="IPv6 address of the proxy's sockets (default: fd62:2c24:1612:53::/64 plus the --listen address's 32 bits, put on the loopback); empty: no IPv6 (policed pods' IPv6 DNS is then dropped)")
    p.add_argument("--reject", choices=("refused", "nxdomain"), default="refused", help="answer to a denied name (default refused)")
    p.add_argument("--upstream-timeout", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--min-ttl", type=int, default=3600, help="learned IPs stay allowed at least this many seconds (default 3600, Cilium's tofqdns-min-ttl)")
    p.add_argument("--grace", type=float, default=0.0, help="seconds an IP stays allowed after its TTL for new connections (default 0, Cilium's tofqdns-idle-connection-grace-period); open connections stay open while used")
    p.add_argument("--kube-apiserver", default="", help="comma-separated addresses of the toEntities kube-apiserver entity (default with --kube: the kubernetes Service's ClusterIP from $KUBERNETES_SERVICE_HOST and the API server's address)")
    p.add_argument("--services", help="without --kube: Services file (services: [{metadata: {name, namespace, labels}, spec: {clusterIP, ports, selector}}], or `kubectl get svc -A -o yaml`); a ClusterIP is allowed when every backend is (the cluster DNS Service IP for a DNS rule selecting kube-dns); reloaded on change")
    p.add_argument("--remote-node-addresses", default="", help="comma-separated addresses of the other nodes (toEntities remote-node and cluster); default: none known, so remote-node allows nothing")
    p.add_argument("--audit", action="store_true", help="report denied traffic as AUDIT instead of dropping it")
    p.add_argument("--metrics-listen", default=f"127.0.0.1:{DEFAULT_METRICS_PORT}",
                   help=f"HOST:PORT of the proxy's Prometheus /metrics (default 127.0.0.1:{DEFAULT_METRICS_PORT}; empty: none)")
    p.add_argument("--flow-log", help="write decisions and datapath drops as Hubble JSON flows to this file")
    p.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=f"bpffs directory of the pinned maps (default {DEFAULT_PIN_DIR})")
    p.add_argument("--nft-table", default=DEFAULT_NFT_TABLE, help=argparse.SUPPRESS)
    p.add_argument("--address-label", default=DEFAULT_ADDRESS_LABEL, help=argparse.SUPPRESS)
    p.add_argument("--tproxy-mark", type=lambda v: int(v, 0), default=DEFAULT_TPROXY_MARK, help=argparse.SUPPRESS)
    p.add_argument("--route-table", type=int, default=DEFAULT_ROUTE_TABLE, help=argparse.SUPPRESS)
    p.add_argument("--rule-priority", type=int, default=DEFAULT_RULE_PRIORITY, help=argparse.SUPPRESS)
    p.add_argument("--reload-interval", type=float, default=1.0, help="seconds between checks for changed policies/pods")
    p.add_argument("--status-interval", type=float, default=60.0, help="seconds between status log lines (decisions, latency, datapath counters); 0: never")
    p.add_argument("--uninstall", action="store_true", help="remove the filters, redirect and pinned maps a proxy left, then exit")


class Runner:
    """Ties the proxy, the datapath and the reload loop together."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        # Set by stop and by every Kubernetes watch event: the loop acts on it at once.
        self._wake = threading.Event()
        # First, before the datapath compiles: credentials that cannot work stop the start.
        # This node's name: its pods are policed, every other node's are toEndpoints peers.
        self.node_name = os.environ.get("NODE_NAME", "")
        self.kube = KubeSource.connect(args.kubeconfig, self.node_name,
                                       on_change=self._wake.set) if args.kube else None
        try:
            listen = _hostport(args.listen, 53)
            listen6 = _listen6(args, listen)
            self.redirect = Redirect(RedirectConfig(
                args.nft_table, args.address_label, listen[0], listen6[0] if listen6 else None, port=listen[1],
                mark=args.tproxy_mark, route_table=args.route_table, rule_priority=args.rule_priority))
        except ValueError as exc:
            raise StartError("dnsproxy", str(exc), "give --listen an IPv4 address with port 53 and --listen6 an "
                             "IPv6 address (dnsproxy/README.md, DNS redirect)") from exc
        self.config = ProxyConfig(
            policies_dir=args.policies or "", pods_file=args.pods or "",
            upstream=_hostport(args.upstream, 53) if args.upstream else None, listen=listen, listen6=listen6,
            refuse_rcode=dns.rcode.NXDOMAIN if args.reject == "nxdomain" else dns.rcode.REFUSED,
            upstream_timeout_s=args.upstream_timeout, min_ttl_s=args.min_ttl, grace_s=args.grace,
            audit=args.audit, flow_log=args.flow_log)
        self.datapath = Datapath(args.pin_dir, nft_table=args.nft_table, address_label=args.address_label)
        # Every loop and server thread: one that dies fails /healthz and ends the process.
        self.supervisor = Supervisor(on_death=lambda _name: self._wake.set())
        self.proxy = DnsProxy(self.config, self.datapath, self.supervisor)
        self._snapshot: tuple[object, ...] | None = None
        self._kube_version: int | None = None
        self._serving = False
        self._last_round = time.monotonic()
        self.metrics: MetricsServer | None = None
        if args.metrics_listen:
            self.metrics = MetricsServer(*_hostport(args.metrics_listen, DEFAULT_METRICS_PORT),
                                         lambda: proxy_points(self))
        self.health: HealthServer | None = None
        if args.health_listen:
            self.health = HealthServer(*_hostport(args.health_listen, DEFAULT_HEALTH_PORT),
                                       {"/healthz": self._liveness, "/readyz": self._readiness})
        # What the maps were last written from: per policed address its mode and rules, and
        # the endpoint index (object, version) its toEndpoints addresses came from.
        self._applied_inputs: tuple[object, ...] | None = None
        self._applied_cidrs: dict[str, list[CidrEntry]] | None = None
        self._applied_modes: dict[str, int] | None = None
        self._applied_ifnames: list[str] | None = None
        self._next_status = 0.0
        self._unrouted: set[str] = set()
        self._first_sync = True  # sweep filters an earlier proxy left on interfaces once
        self._degraded_logged: set[tuple[str, tuple[str, ...]]] = set()
        self._own_addresses = {a for a in (listen[0], listen6[0] if listen6 else "") if a}
        for text in (args.kube_apiserver, args.remote_node_addresses):
            for a in (x.strip() for x in text.split(",")):
                if a and not _is_ip(a):
                    raise StartError("dnsproxy", f"{a!r} is not an IP address",
                                     "give --kube-apiserver and --remote-node-addresses comma-separated IP addresses")

    def sync(self) -> None:
        """Policies and pods → endpoints, CIDR entries, attachments and the DNS redirect.

        Runs every round (a pod's veth may have been recreated under the same address), but
        writes maps and nftables only when what they should hold changed.
        """
        policy = self.proxy.policy
        mode = MODE_AUDIT if self.config.audit else MODE_ENFORCE
        policed = policy.policed_pods()
        # The LPM entries are a function of these: recomputed only when they change (a policy,
        # a local pod, or an address a toEndpoints selector in use selects on any node).
        endpoints = policy.endpoints
        inputs = (endpoints, endpoints.version, [(pod.ips, policy.rules_for(pod)) for pod in policed])
        recompute = inputs != self._applied_inputs
        modes: dict[str, int] = {}
        cidrs: dict[str, list[CidrEntry]] = {}
        ifindexes: set[int] = set()
        unrouted: set[str] = set()
        for pod in policed:
            entries = policy.cidr_entries(pod) if recompute else []
            for ip in pod.ips:
                modes[ip] = mode
                cidrs[ip] = entries
                index = self.datapath.iface_of(ip)
                if index is None:
                    unrouted.add(ip)
                    if ip not in self._unrouted:  # once, not every round
                        log.warning("pod %s: %s is not routed directly to an interface of this node (no route, or only via a gateway); its traffic cannot be policed yet", pod.key, ip)
                else:
                    ifindexes.add(index)
        self._unrouted = unrouted
        # Maps first, then filters: a newly attached program must find its pod's rules.
        if recompute:
            if modes != self._applied_modes:
                self.datapath.sync_endpoints(modes)
                self._applied_modes = modes
            if cidrs != self._applied_cidrs:
                self.datapath.sync_cidrs(cidrs)
                self._applied_cidrs = cidrs
            endpoints.retain(policy.endpoint_selectors())  # selectors no policy uses any more
            self._applied_inputs = inputs
        self.datapath.sync_attachments(ifindexes, sweep=self._first_sync)
        self._first_sync = False
        ifnames = sorted(self.datapath.attached.values())
        if ifnames != self._applied_ifnames:
            self.redirect.sync(ifnames)
            self._applied_ifnames = ifnames
        # Every round: without its policy route the redirect would black-hole policed pods' DNS.
        restored = self.redirect.install_base()
        if restored:
            log.warning("restored the DNS redirect's %s (removed while the proxy ran)", ", ".join(restored))

    def refresh(self) -> None:
        """Take the policy sources into the proxy when they changed (files: size/mtime; the
        Kubernetes API: a watch event since the last round)."""
        snap = snapshot([p for p in (self.config.policies_dir, self.config.pods_file, self.args.services) if p])
        kube_version = self.kube.version if self.kube is not None else None
        if snap == self._snapshot and kube_version == self._kube_version:
            return
        if self.kube is None:
            self._reload_files()
            self._snapshot = snap
            return
        if not self.kube.synced:
            return  # never a partial view: an unlisted kind would un-police pods
        state = self.kube.state()
        policies, errors = list(state.policies), list(state.errors)
        if self.config.policies_dir:
            result = load_policy_dir(self.config.policies_dir)
            policies += result.policies
            errors += result.errors
        known = set(self.proxy.policy_errors)
        for err in errors:
            if err not in known:  # once per rejected version, not once per watch event
                log.error("policy rejected: %s", err)
        policy = PolicySet(policies, state.pods, node=self.kube.node_name, endpoints=state.endpoints,
                           nodes=self.node_addresses(), services=state.services)
        self._report_degraded(policy)
        # Errors first: the handlers read only `policy`, one reference swapped atomically.
        self.proxy.policy_errors = errors
        self.proxy.policy = policy
        # Only now: if anything above failed, the next round tries again.
        self._snapshot, self._kube_version = snap, state.version
        log.info("applied Kubernetes state %d: %d policies (%d rejected); %d of %d pods on %s policed; "
                 "%d pods in the cluster", state.version, len(policies), len(errors), len(policy.policed_pods()),
                 len(state.pods), self.kube.node_name, self.kube.cluster_pods)

    def _reload_files(self) -> None:
        """--policies and --pods: read both again. The pods file may list every node's pods
        (``node`` per pod): those of another node than $NODE_NAME are toEndpoints peers only."""
        result = load_policy_dir(self.config.policies_dir)
        for err in result.errors:
            log.error("policy rejected: %s", err)
        previous = self.proxy.policy
        try:
            pods = load_pods(self.config.pods_file)
            endpoints = EndpointIndex(pods)
        except PolicyError as exc:
            log.error("%s; keeping the previous pods", exc)
            pods, endpoints = previous.pods, previous.endpoints
        services = previous.services
        if self.args.services:
            try:
                services = tuple(load_services(self.args.services))
            except PolicyError as exc:
                log.error("%s; keeping the previous services", exc)
        policy = PolicySet(result.policies, pods, node=self.node_name, endpoints=endpoints, nodes=self.node_addresses(),
                           services=services)
        self._report_degraded(policy)
        # Errors first: the handlers read only `policy`, one reference swapped atomically.
        self.proxy.policy_errors = result.errors
        self.proxy.policy = policy
        log.info("loaded %d policies (%d rejected); %d of %d pods on %s policed; %d peers on other nodes",
                 len(result.policies), len(result.errors), len(policy.policed_pods()), len(policy.pods),
                 self.node_name or "this node", len(endpoints) - len(policy.pods))

    def node_addresses(self) -> NodeAddresses:
        """What the entities host, remote-node and kube-apiserver are on this node: the host's
        own addresses (the proxy runs in the host's network namespace; the proxy's listen
        addresses left out), and the configured or discovered others."""
        host = sorted(a for a in _host_addresses(self.datapath.ipr) if a not in self._own_addresses)
        api = [a.strip() for a in self.args.kube_apiserver.split(",") if a.strip()]
        if not api and self.kube is not None:
            api = [a for a in (os.environ.get("KUBERNETES_SERVICE_HOST", ""), _host_of(self.kube.server)) if _is_ip(a)]
        remote = [a.strip() for a in self.args.remote_node_addresses.split(",") if a.strip()]
        if self.config.pods_file and self.node_name:
            # The pods file's nodes and kube_apiserver keys (processors/k8sattributes' shape).
            try:
                file_remote, file_api = load_node_addresses(self.config.pods_file, self.node_name)
            except PolicyError as exc:
                log.error("%s", exc)
                file_remote, file_api = [], []
            remote = remote or file_remote
            api = api or file_api
        return NodeAddresses(tuple(host), tuple(dict.fromkeys(remote)), tuple(dict.fromkeys(api)))

    def _report_degraded(self, policy: PolicySet) -> None:
        """Log each degraded policy's notes once per version of it (not once per reload round)."""
        seen = set()
        for ref, notes in sorted(policy.degraded.items()):
            key = (ref, notes)
            seen.add(key)
            if key not in self._degraded_logged:
                for note in notes:
                    log.warning("policy degraded (denied instead of evaluated): %s: %s", ref, note)
        self._degraded_logged = seen

    def _wait_first_sync(self) -> None:
        """Block until every informer listed once: serving with half the policies would answer
        or un-police pods wrongly, while the pinned datapath keeps enforcing meanwhile."""
        assert self.kube is not None
        next_log = time.monotonic() + 10
        while not self.kube.synced and not self.stop.is_set():
            self._last_round = time.monotonic()
            self._wake.wait(0.5)
            self._wake.clear()
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + 30
                log.warning("waiting for the first list from the Kubernetes API server at %s (%s); the pinned "
                            "datapath keeps enforcing what an earlier proxy installed", self.kube.server,
                            ", ".join(self.kube.unsynced()))

    def run(self) -> int:
        self.redirect.install_base()
        if self.health is not None:
            self.health.start(self.supervisor)
        if self.metrics is not None:
            self.metrics.start(self.supervisor)
        if self.kube is not None:
            self.kube.start()
            self._wait_first_sync()
            if self.stop.is_set():
                return self._shutdown(None)
        self.refresh()
        self.sync()
        self.proxy.serve()
        self.datapath.open_events(self.proxy.on_drop)
        events = self.supervisor.start("dnsproxy-events", self._poll_events)
        self._serving = True
        log.info("dnsproxy ready")
        status = 0
        while not self.stop.is_set():
            self._wake.wait(self.args.reload_interval)
            self._wake.clear()  # before refresh() reads the version: no event is missed
            if self.stop.is_set():
                break
            dead = self.supervisor.dead()
            if dead:
                # Not restarted in place: a loop that died once may die again on the same input,
                # and a fresh process starts from a clean state over the same pinned datapath.
                log.error("exiting: %s died (%s); the kubelet restarts the proxy and enforcement continues meanwhile",
                          ", ".join(sorted(dead)), "; ".join(f"{k}: {v}" for k, v in sorted(dead.items())))
                status = 1
                self.stop.set()
                break
            self._last_round = time.monotonic()
            try:
                self.refresh()
                # Every round, not only on change: a pod's veth may have been recreated.
                self.sync()
                self.datapath.expire()
                if self.args.status_interval and time.monotonic() >= self._next_status:
                    self._next_status = time.monotonic() + self.args.status_interval
                    log.info("status: %s", json.dumps(self.status(), sort_keys=True))
            except Exception:  # the proxy must keep answering whatever one round hit
                log.exception("reload round failed")
        self.proxy.shutdown()
        return self._shutdown(events) or status

    def _shutdown(self, events: threading.Thread | None) -> int:
        self.supervisor.stopping = True
        if events is not None:
            events.join(2)
        if self.kube is not None:
            self.kube.shutdown()
        if self.health is not None:
            self.health.shutdown()
        if self.metrics is not None:
            self.metrics.shutdown()
        self.datapath.close()  # filters, maps and redirect stay: enforcement continues
        return 0

    def request_stop(self) -> None:
        self.stop.set()
        self._wake.set()

    def _liveness(self) -> tuple[bool, dict[str, object]]:
        # A round every reload interval; a wedged loop (not a slow one) fails after 30 s; a dead
        # thread (the UDP loop, a TCP server, the event poller, ...) fails at once.
        stalled = time.monotonic() - self._last_round
        threads_ok, details = self.supervisor.check()
        details["last_round_s_ago"] = round(stalled, 1)
        return stalled < max(30.0, 10 * self.args.reload_interval) and threads_ok, details

    def server_counters(self) -> list[ServerCounters]:
        """Client errors and open connections of every bounded server (for /metrics)."""
        out = self.proxy.server_counters()
        out += [s.counters for s in (self.health, self.metrics) if s is not None]
        return out

    def _readiness(self) -> tuple[bool, dict[str, object]]:
        details: dict[str, object] = {"serving": self._serving}
        if self.kube is not None:
            details["kubernetes"] = self.kube.counters()
        return self._serving, details

    def status(self) -> dict[str, object]:
        """The proxy's health: its decisions, the latency it adds, and the datapath's counters."""
        st = self.proxy.stats
        return {
            "queries_allowed": st.allowed, "queries_refused": st.refused, "upstream_errors": st.upstream_errors,
            "malformed": st.malformed, "learned_ips": st.learned_ips,
            "added_latency_avg_ms": round(st.latency_ns_sum / st.latency_count / 1e6, 3) if st.latency_count else 0.0,
            "policies_rejected": len(self.proxy.policy_errors), "policed_interfaces": len(self.datapath.attached),
            "policies_degraded": sorted(self.proxy.policy.degraded),
            "queries_rejected": dict(st.rejected), "queries_resolver_denied": st.resolver_denied,
            "dead_threads": self.supervisor.dead(),
            "datapath": self.datapath.counters(),
            **({"flow_log_lost": sum(self.proxy.flow_log.lost_total().values())}
               if self.proxy.flow_log is not None else {}),
            **({"kubernetes": self.kube.counters()} if self.kube is not None else {}),
        }

    def _poll_events(self) -> None:
        while not self.stop.is_set():
            self.datapath.poll_events(200)


def main(args: argparse.Namespace) -> int:
    if args.uninstall:
        listen6 = _listen6(args, _hostport(args.listen, 53))
        try:
            removed = uninstall(args.pin_dir, nft_table=args.nft_table, address_label=args.address_label,
                                listen6=listen6[0] if listen6 else None, tproxy_mark=args.tproxy_mark,
                                route_table=args.route_table, rule_priority=args.rule_priority)
        except (RuntimeError, OSError) as exc:
            print(f"flowtel dnsproxy --uninstall: {exc}", file=sys.stderr)
            return 1
        for item in removed:
            print(f"removed {item}")
        return 0
    # Policies: files, the API, or both (the API's plus a directory's, e.g. node-local
    # baselines). Pods: one source of truth, the pods file or the API, never both.
    args.kube = args.kube or bool(args.kubeconfig)
    if args.kube and args.pods:
        print("flowtel dnsproxy: --pods and --kube exclude each other: with --kube the pods come from the "
              "Kubernetes API", file=sys.stderr)
        return 2
    required = () if args.kube else ("policies", "pods")
    missing = [f"--{n}" for n in required if not getattr(args, n)]
    if missing:
        print(f"flowtel dnsproxy: {', '.join(missing)} required (or --kube for pods and policies from the API)",
              file=sys.stderr)
        return 2
    if args.kube and not os.environ.get("NODE_NAME"):
        print("flowtel dnsproxy: --kube needs NODE_NAME, this node's name as Kubernetes knows it\n"
              "  fix: set NODE_NAME from the Downward API (fieldRef spec.nodeName), as "
              "deploy/base/dnsproxy/daemonset.yaml does", file=sys.stderr)
        return 2
    try:
        runner = Runner(args)
    except StartError as exc:
        print(f"flowtel dnsproxy: cannot start: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runner.request_stop())
    return runner.run()
