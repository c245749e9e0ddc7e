"""``flowtel dnsproxy``: the proxy process, its reload loop and its datapath."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time

import dns.rcode

from dnsproxy.datapath import (DEFAULT_ADDRESS_LABEL, DEFAULT_NFT_TABLE, DEFAULT_PIN_DIR, MODE_AUDIT, MODE_ENFORCE,
                               Datapath, uninstall)
from dnsproxy.policy import CidrEntry, PolicySet
from dnsproxy.server import DnsProxy, ProxyConfig, snapshot

log = logging.getLogger("flowtel.dnsproxy")


def _hostport(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    return host.strip("[]"), int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", help="directory of CiliumNetworkPolicy/CiliumClusterwideNetworkPolicy YAML files (reloaded on change)")
    p.add_argument("--pods", help="pods file (processors/k8sattributes static shape: pods: [{name, namespace, ips, labels}])")
    p.add_argument("--upstream", help="upstream DNS server IP[:PORT] (default port 53)")
    p.add_argument("--listen", default="169.254.20.53:53", help="address the proxy answers on; put on the loopback if the host lacks it (default 169.254.20.53:53)")
    p.add_argument("--reject", choices=("refused", "nxdomain"), default="refused", help="answer to a denied name (default refused)")
    p.add_argument("--upstream-timeout", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--min-ttl", type=int, default=0, help="learned IPs stay allowed at least this many seconds")
    p.add_argument("--grace", type=float, default=0.0, help="seconds an IP stays allowed after its TTL (open connections)")
    p.add_argument("--audit", action="store_true", help="report denied traffic as AUDIT instead of dropping it")
    p.add_argument("--flow-log", help="write decisions and datapath drops as Hubble JSON flows to this file")
    p.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help=f"bpffs directory of the pinned maps (default {DEFAULT_PIN_DIR})")
    p.add_argument("--nft-table", default=DEFAULT_NFT_TABLE, help=argparse.SUPPRESS)
    p.add_argument("--address-label", default=DEFAULT_ADDRESS_LABEL, help=argparse.SUPPRESS)
    p.add_argument("--reload-interval", type=float, default=1.0, help="seconds between checks for changed policies/pods")
    p.add_argument("--status-interval", type=float, default=60.0, help="seconds between status log lines (decisions, latency, datapath counters); 0: never")
    p.add_argument("--uninstall", action="store_true", help="remove the filters, redirect and pinned maps a proxy left, then exit")


class Runner:
    """Ties the proxy, the datapath and the reload loop together."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        listen = _hostport(args.listen, 53)
        self.config = ProxyConfig(
            policies_dir=args.policies, pods_file=args.pods, upstream=_hostport(args.upstream, 53), listen=listen,
            refuse_rcode=dns.rcode.NXDOMAIN if args.reject == "nxdomain" else dns.rcode.REFUSED,
            upstream_timeout_s=args.upstream_timeout, min_ttl_s=args.min_ttl, grace_s=args.grace,
            audit=args.audit, flow_log=args.flow_log)
        self.datapath = Datapath(args.pin_dir, nft_table=args.nft_table, address_label=args.address_label)
        self.proxy = DnsProxy(self.config, self.datapath)
        self.stop = threading.Event()
        self._snapshot: tuple[object, ...] = ()
        self._applied_policy: PolicySet | None = None
        self._applied_ifnames: list[str] | None = None
        self._next_status = 0.0
        self._unrouted: set[str] = set()
        self._first_sync = True  # sweep filters an earlier proxy left on interfaces once

    def sync(self) -> None:
        """Policies and pods → endpoints, CIDR entries, attachments and the DNS redirect.

        Runs every round (a pod's veth may have been recreated under the same address), but
        writes maps and nftables only when what they should hold changed.
        """
        policy = self.proxy.policy
        mode = MODE_AUDIT if self.config.audit else MODE_ENFORCE
        modes: dict[str, int] = {}
        cidrs: dict[str, list[CidrEntry]] = {}
        ifindexes: set[int] = set()
        unrouted: set[str] = set()
        for pod in policy.policed_pods():
            entries = policy.cidr_entries(pod) if policy is not self._applied_policy else []
            for ip in pod.ips:
                modes[ip] = mode
                cidrs[ip] = entries
                index = self.datapath.iface_of(ip)
                if index is None:
                    unrouted.add(ip)
                    if ip not in self._unrouted:  # once, not every round
                        log.warning("pod %s: no route to %s, its traffic cannot be policed yet", pod.key, ip)
                else:
                    ifindexes.add(index)
        self._unrouted = unrouted
        # Maps first, then filters: a newly attached program must find its pod's rules.
        if policy is not self._applied_policy:
            self.datapath.sync_endpoints(modes)
            self.datapath.sync_cidrs(cidrs)
            self._applied_policy = policy
        self.datapath.sync_attachments(ifindexes, sweep=self._first_sync)
        self._first_sync = False
        ifnames = sorted(self.datapath.attached.values())
        if ifnames != self._applied_ifnames:
            self.datapath.sync_redirect(ifnames, *self.config.listen)
            self._applied_ifnames = ifnames

    def run(self) -> int:
        self.datapath.ensure_listen_address(self.config.listen[0])
        self.proxy.reload()
        self._snapshot = snapshot([self.config.policies_dir, self.config.pods_file])
        self.sync()
        self.proxy.serve()
        self.datapath.open_events(self.proxy.on_drop)
        events = threading.Thread(target=self._poll_events, name="dnsproxy-events", daemon=True)
        events.start()
        log.info("dnsproxy ready")
        while not self.stop.wait(self.args.reload_interval):
            try:
                snap = snapshot([self.config.policies_dir, self.config.pods_file])
                if snap != self._snapshot:
                    self._snapshot = snap
                    self.proxy.reload()
                # Every round, not only on change: a pod's veth may have been recreated.
                self.sync()
                self.datapath.expire()
                if self.args.status_interval and time.monotonic() >= self._next_status:
                    self._next_status = time.monotonic() + self.args.status_interval
                    log.info("status: %s", json.dumps(self.status(), sort_keys=True))
            except Exception:  # the proxy must keep answering whatever one round hit
                log.exception("reload round failed")
        self.proxy.shutdown()
        events.join(2)
        self.datapath.close()  # filters, maps and redirect stay: enforcement continues
        return 0

    def status(self) -> dict[str, object]:
        """The proxy's health: its decisions, the latency it adds, and the datapath's counters."""
        st = self.proxy.stats
        return {
            "queries_allowed": st.allowed, "queries_refused": st.refused, "upstream_errors": st.upstream_errors,
            "malformed": st.malformed, "learned_ips": st.learned_ips,
            "added_latency_avg_ms": round(st.latency_ns_sum / st.latency_count / 1e6, 3) if st.latency_count else 0.0,
            "policies_rejected": len(self.proxy.policy_errors), "policed_interfaces": len(self.datapath.attached),
            "datapath": self.datapath.counters(),
        }

    def _poll_events(self) -> None:
        while not self.stop.is_set():
            self.datapath.poll_events(200)


def main(args: argparse.Namespace) -> int:
    if args.uninstall:
        for item in uninstall(args.pin_dir, nft_table=args.nft_table, address_label=args.address_label):
            print(f"removed {item}")
        return 0
    missing = [f"--{n}" for n in ("policies", "pods", "upstream") if not getattr(args, n)]
    if missing:
        print(f"flowtel dnsproxy: {', '.join(missing)} required", file=sys.stderr)
        return 2
    runner = Runner(args)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: runner.stop.set())
    return runner.run()
