"""``flowtel observe`` and ``flowtel map``: clients of Hubble's Observer API.

``observe`` is the ``hubble observe`` habit: the same flags and output formats, talking
gRPC to an agent's ``hubble`` extension or to Hubble Relay (``--server``), or reading a
flow-log file (``--input-file``). Filters become Cilium ``FlowFilter`` messages
(:mod:`flowtel.lib.hubble.flags`) that the server applies, so a follow stream carries only
what the user asked for; for a file the same messages are applied here by the one filter
implementation (:mod:`flowtel.lib.hubble.filters`). ``-o json`` prints each response's
proto3 JSON mapping (Cilium's field names), one per line, as ``hubble observe -o json``.

``map`` reads the server's ring through the same API and draws the service map of it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Sequence

from google.protobuf import json_format

from flowtel import mapformat
from flowtel.errors import UsageError
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.lib.hubble.api.relay import relay_pb2
from flowtel.lib.hubble.client import ClientError, ObserverClient, add_connection_arguments, connection_from_args
from flowtel.lib.hubble.filters import FilterError, Filters, compile_filters
from flowtel.lib.hubble.flags import FILTER_FLAGS, NOT_FLAG, build_filters
from flowtel.lib.hubble.parse import parse_time_arg, record_from_envelope
from flowtel.lib.hubble import printer
from flowtel.lib.hubble.jsonlines import response_dict, response_json
from flowtel.lib.hubble.store import response_time_ns
from flowtel.records import Flow, LostEvents, Record
from flowtel.servicegraph import ServiceGraph, graph_to_dict

DEFAULT_LAST = 20  # what `hubble observe` shows when neither --last, --first, --since nor --follow is given
OUTPUTS = ("compact", "json", "table", "dict")
ALL = 2**64 - 1  # `hubble observe --all`: more than any ring holds

_FILTER_HELP = {
    "namespace": "flows from or to a pod in this namespace",
    "from-namespace": "flows from a pod in this namespace",
    "to-namespace": "flows to a pod in this namespace",
    "pod": "flows from or to pods whose name starts with this ([namespace/]prefix; bare names are in 'default')",
    "from-pod": "flows from pods matching [namespace/]prefix",
    "to-pod": "flows to pods matching [namespace/]prefix",
    "label": "flows from or to an endpoint matching this label selector (e.g. app=web, k8s:app in (a,b))",
    "from-label": "flows from an endpoint matching this label selector",
    "to-label": "flows to an endpoint matching this label selector",
    "ip": "flows from or to this address or CIDR",
    "from-ip": "flows from this address or CIDR",
    "to-ip": "flows to this address or CIDR",
    "port": "flows from or to this L4 port",
    "from-port": "flows from this L4 port",
    "to-port": "flows to this L4 port",
    "fqdn": "flows from or to this DNS name (wildcards: *.example.com)",
    "from-fqdn": "flows from this DNS name",
    "to-fqdn": "flows to this DNS name",
    "protocol": "tcp, udp, sctp, icmp, icmpv4, icmpv6 or dns",
    "verdict": "FORWARDED, DROPPED, AUDIT, ERROR, …",
    "type": "event type: trace (alias l3_l4), drop, l7, policy-verdict; trace:to-endpoint, trace:from-endpoint",
    "traffic-direction": "ingress or egress",
    "node-name": "flows observed on this node ([cluster/]name, wildcards allowed)",
    "drop-reason-desc": "drops with this Cilium drop reason (e.g. POLICY_DENIED)",
    "identity": "flows from or to this security identity",
    "from-identity": "flows from this security identity",
    "to-identity": "flows to this security identity",
    "uuid": "the flow with this UUID",
}

# What `flowtel observe` and `flowtel map` raise for the CLI to print.
ObserveError = UsageError


class _FilterAction(argparse.Action):
    """Records each filter flag in command-line order, so ``--not`` negates the next one."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        pairs = getattr(namespace, "filter_pairs", None)
        if pairs is None:
            pairs = []
            setattr(namespace, "filter_pairs", pairs)
        name = self.dest.removeprefix("filter_").replace("_", "-")
        pairs.append((name, "" if name == NOT_FLAG else str(values)))


def add_observe_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("--last", type=int, metavar="N",
                        help=f"the last N matching flows (default {DEFAULT_LAST} unless --first, --since or --follow)")
    parser.add_argument("--first", type=int, metavar="N", help="the first N matching flows in the server's ring")
    parser.add_argument("--all", action="store_true", help="every matching flow in the server's ring")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing flows as they arrive")
    parser.add_argument("--since", metavar="TIME", help="flows since an RFC 3339 time or a duration ago (5m, 1h)")
    parser.add_argument("--until", metavar="TIME", help="flows until an RFC 3339 time or a duration ago")
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="compact", help="output format (default compact)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="colors in compact output")
    parser.add_argument("--input-file", metavar="FILE",
                        help="read flows from a flow-log file of Hubble JSON lines ('-' for stdin) instead of a server")
    group = parser.add_argument_group("filters", "Repeated values of one flag OR, different flags AND, as in Hubble")
    group.add_argument("--not", dest="filter_not", nargs=0, action=_FilterAction, help="negate the next filter")
    for name in FILTER_FLAGS:
        group.add_argument(f"--{name}", dest="filter_" + name.replace("-", "_"), action=_FilterAction,
                           metavar="VALUE", help=_FILTER_HELP[name])
    parser.set_defaults(filter_pairs=None)


def add_map_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("-o", "--output", choices=("dot", "mermaid", "json"), default="dot", help="output format (default dot)")
    parser.add_argument("--namespace", action="append", default=[], help="only edges with an end in this namespace (repeatable)")
    parser.add_argument("--granularity", choices=("workload", "pod"), default="workload",
                        help="map nodes are workloads (falling back to pods) or always pods")


# --- the request ------------------------------------------------------------------------


def _time_arg(flag: str, value: str | None, now_ns: int) -> int | None:
    if value is None:
        return None
    try:
        return parse_time_arg(value, now_ns)
    except ValueError as exc:
        raise ObserveError(f"{flag}: {exc}", 2) from None


def flows_request(args: argparse.Namespace, now_ns: int | None = None) -> observer_pb2.GetFlowsRequest:
    """The ``GetFlowsRequest`` for the parsed observe arguments (ObserveError if invalid)."""
    now = time.time_ns() if now_ns is None else now_ns
    for flag in ("last", "first"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise ObserveError(f"--{flag}: expected a number of flows >= 0", 2)
    if args.first is not None and (args.last is not None or args.all):
        raise ObserveError("--first cannot be combined with --last or --all", 2)
    if args.first is not None and args.follow:
        raise ObserveError("--first cannot be combined with --follow", 2)
    if args.follow and args.until:
        raise ObserveError("--until cannot be combined with --follow", 2)
    try:
        whitelist, blacklist = build_filters(args.filter_pairs or ())
    except FilterError as exc:
        raise ObserveError(str(exc), 2) from None
    req = observer_pb2.GetFlowsRequest(whitelist=whitelist, blacklist=blacklist, follow=args.follow)
    since, until = _time_arg("--since", args.since, now), _time_arg("--until", args.until, now)
    if since is not None:
        req.since.FromNanoseconds(since)
    if until is not None:
        req.until.FromNanoseconds(until)
    if args.first is not None:
        req.first, req.number = True, args.first
    elif args.all:
        req.number = ALL
    elif args.last is not None:
        req.number = args.last
    elif not (args.follow or args.since):
        req.number = DEFAULT_LAST
    return req


# --- printing ---------------------------------------------------------------------------


def response_record(resp: observer_pb2.GetFlowsResponse) -> Record | None:
    """The record the printers take, decoded from the response's JSON form."""
    return record_from_envelope(response_dict(resp))


@dataclass(slots=True)
class Printer:
    """Writes responses in one of :data:`OUTPUTS`; lost-event notices go to ``err`` except in JSON."""

    output: str
    out: IO[str]
    err: IO[str]
    color: bool = False
    follow: bool = False
    _rows: list[tuple[str, ...]] = field(default_factory=list)
    _widths: list[int] = field(default_factory=list)
    _header_done: bool = False
    _blocks: int = 0

    def response(self, resp: observer_pb2.GetFlowsResponse, raw: str | None = None) -> None:
        if self.output == "json":
            self.out.write((raw.rstrip("\n") if raw is not None else response_json(resp)) + "\n")
            return
        kind = resp.WhichOneof("response_types")
        if kind == "node_status":  # from Hubble Relay: nodes connecting or leaving
            ns = resp.node_status
            state = relay_pb2.NodeState.Name(ns.state_change)
            self.err.write(f"{state}: {', '.join(ns.node_names)} {ns.message}".rstrip() + "\n")
            return
        record = response_record(resp)
        if isinstance(record, LostEvents):
            self.err.write(printer.lost_compact_line(record) + "\n")
            return
        if not isinstance(record, Flow):
            return
        if self.output == "compact":
            self.out.write(printer.compact_line(record, self.color) + "\n")
        elif self.output == "dict":
            if self._blocks:
                self.out.write(printer.DICT_SEPARATOR + "\n")
            self.out.write(printer.dict_block(record) + "\n")
            self._blocks += 1
        else:
            self._rows.append(printer.table_fields(record))
            if self.follow:
                self.flush()

    def flush(self) -> None:
        """Print buffered table rows, aligned as Go's tabwriter (padding 3) aligns them."""
        if self.output == "table" and (self._rows or not self._header_done):
            rows = ([printer.TABLE_HEADER] if not self._header_done else []) + self._rows
            widths = self._widths or [0] * len(printer.TABLE_HEADER)
            for row in rows:
                widths = [max(w, len(c)) for w, c in zip(widths, row)]
            self._widths = widths
            for row in rows:
                cells = [c.ljust(w + 3) for c, w in zip(row[:-1], widths)]
                self.out.write("".join(cells) + row[-1] + "\n")
            self._header_done = True
            self._rows.clear()
        self.out.flush()


def _color(choice: str, stream: IO[str]) -> bool:
    if choice == "auto":
        return stream.isatty() and "NO_COLOR" not in os.environ
    return choice == "always"


# --- reading a file ---------------------------------------------------------------------


def parse_line(raw: str, where: str) -> observer_pb2.GetFlowsResponse:
    """A flow-log line, parsed strictly as Cilium's GetFlowsResponse (ObserveError if not)."""
    try:
        return json_format.Parse(raw, observer_pb2.GetFlowsResponse())
    except json_format.ParseError as exc:
        raise ObserveError(f"{where}: not a Hubble flow (observer.GetFlowsResponse JSON): {exc}: {raw[:200]!r}") from None


def select_from_file(lines: Iterator[str], req: observer_pb2.GetFlowsRequest, filters: Filters,
                     name: str) -> list[tuple[str, observer_pb2.GetFlowsResponse]]:
    """What a server would answer ``req`` with, had it these lines in its ring."""
    since = req.since.ToNanoseconds() if req.HasField("since") else None
    until = req.until.ToNanoseconds() if req.HasField("until") else None
    selected: list[tuple[str, observer_pb2.GetFlowsResponse]] = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        resp = parse_line(raw, f"{name} line {number}")
        t = response_time_ns(resp)
        if (since is not None and t < since) or (until is not None and t > until) or not filters.matches(resp):
            continue
        selected.append((raw, resp))
        if req.first and req.number and len(selected) >= req.number:
            break
    if not req.first and req.number:
        selected = selected[-req.number:]
    return selected


def _from_file(args: argparse.Namespace, req: observer_pb2.GetFlowsRequest, out: Printer) -> None:
    filters = compile_filters(req.whitelist, req.blacklist)
    name = "stdin" if args.input_file == "-" else args.input_file
    try:
        stream = sys.stdin if args.input_file == "-" else open(args.input_file, encoding="utf-8")
    except OSError as exc:
        raise ObserveError(f"--input-file: cannot read {args.input_file}: {exc.strerror or exc}", 2) from None
    with stream:
        for raw, resp in select_from_file(iter(stream), req, filters, name):
            out.response(resp, raw)


# --- the commands -----------------------------------------------------------------------


def observe(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run ``flowtel observe``; returns the exit status. Raises :class:`ObserveError`."""
    out = out or sys.stdout
    err = err or sys.stderr
    if args.follow and args.input_file:
        raise ObserveError("--follow reads from a server; it cannot be combined with --input-file", 2)
    req = flows_request(args)  # every flag checked before any connection is made
    printer_ = Printer(args.output, out, err, color=_color(args.color, out), follow=args.follow)
    try:
        if args.input_file:
            _from_file(args, req, printer_)
        else:
            conn = connection_from_args(args)
            with ObserverClient(conn) as client:
                for resp in client.get_flows(req, timeout=None if args.follow else 60.0):
                    printer_.response(resp)
                    if args.follow and args.output != "table":
                        out.flush()
        printer_.flush()
    except ClientError as exc:
        raise ObserveError(str(exc), exc.code) from None
    except KeyboardInterrupt:
        printer_.flush()
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            return 0  # `flowtel observe | head`: the reader had enough
        raise ObserveError(f"reading flows failed: {exc}") from None
    return 0


def fetch_records(args: argparse.Namespace, req: observer_pb2.GetFlowsRequest,
                  timeout: float = 60.0) -> Iterator[Record]:
    """Records of the flows a server answers ``req`` with (for map and policy suggest)."""
    try:
        with ObserverClient(connection_from_args(args)) as client:
            for resp in client.get_flows(req, timeout=timeout):
                record = response_record(resp)
                if record is not None:
                    yield record
    except ClientError as exc:
        raise ObserveError(str(exc), exc.code) from None


def service_map(records: Iterator[Record], granularity: str, namespaces: Sequence[str] = ()) -> dict[str, Any]:
    graph = ServiceGraph(granularity=granularity, expire_after=0, max_edges=1_000_000)  # type: ignore[arg-type]  # granularity: the CLI's choices are Granularity's values
    graph.add(records)
    return graph_to_dict(graph.snapshot(), namespaces=namespaces, overflow=graph.overflow)


def print_map(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Run ``flowtel map``: the service map of the flows in the server's ring."""
    out = out or sys.stdout
    req = observer_pb2.GetFlowsRequest(number=ALL)
    if args.namespace:
        req.whitelist.extend(build_filters([("namespace", ns) for ns in args.namespace])[0])
    graph = service_map(fetch_records(args, req), args.granularity, args.namespace)
    if args.output == "json":
        out.write(json.dumps(graph, indent=2) + "\n")
    elif args.output == "mermaid":
        out.write(mapformat.to_mermaid(graph))
    else:
        out.write(mapformat.to_dot(graph))
    return 0
