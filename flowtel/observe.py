"""``flowtel observe`` and ``flowtel map``: clients of the flows extension's HTTP API.

``observe`` is the ``hubble observe`` habit: the same flags, filter semantics
(:mod:`flowtel.flowfilter`) and output formats (:mod:`flowtel.hubble`). Filters travel to
the agent as the request's query, in command-line order, and are applied there, so a
follow stream carries only what the user asked for. ``--input-file`` applies the same
filters here to a flow-log file instead.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Sequence
from urllib.parse import urlencode

from extensions.flows.config import DEFAULT_ENDPOINT, split_endpoint
from flowtel import mapformat
from flowtel.lib.hubble import printer
from flowtel.errors import UsageError
from flowtel.flowfilter import FILTER_FLAGS, NOT_FLAG, FilterError, Filters, build_filters
from flowtel.lib.hubble.parse import FlowJSONError, parse_time_arg, record_from_envelope
from flowtel.records import Flow, LostEvents, Record

DEFAULT_LAST = 20  # what `hubble observe` shows when neither --last, --since nor --follow is given
CONNECT_TIMEOUT = 5.0
OUTPUTS = ("compact", "json", "table", "dict")

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
    "to-fqdn": "flows to this DNS name, DNS lookups of it included",
    "protocol": "tcp, udp, sctp, icmp, icmpv4, icmpv6 or dns",
    "verdict": "FORWARDED, DROPPED, AUDIT, ERROR, …",
    "type": "event type: trace (alias l3_l4), drop, l7, policy-verdict; trace:to-endpoint, trace:from-endpoint",
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


def _add_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default=os.environ.get("FLOWTEL_SERVER", DEFAULT_ENDPOINT), metavar="HOST:PORT",
        help=f"the agent's flows extension (default: $FLOWTEL_SERVER or {DEFAULT_ENDPOINT})",
    )


def add_observe_arguments(parser: argparse.ArgumentParser) -> None:
    _add_server(parser)
    parser.add_argument("--last", type=int, metavar="N", help=f"the last N matching flows (default {DEFAULT_LAST} unless --since or --follow)")
    parser.add_argument("--all", action="store_true", help="every matching flow in the agent's ring")
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing flows as they arrive")
    parser.add_argument("--since", metavar="TIME", help="flows since an RFC 3339 time or a duration ago (5m, 1h)")
    parser.add_argument("--until", metavar="TIME", help="flows until an RFC 3339 time or a duration ago")
    parser.add_argument("-o", "--output", choices=OUTPUTS, default="compact", help="output format (default compact)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="colors in compact output")
    parser.add_argument("--input-file", metavar="FILE",
                        help="read flows from a flow-log file of Hubble JSON lines ('-' for stdin) instead of the agent")
    group = parser.add_argument_group("filters", "Repeated values of one flag OR, different flags AND, as in Hubble")
    group.add_argument("--not", dest="filter_not", nargs=0, action=_FilterAction, help="negate the next filter")
    for name in FILTER_FLAGS:
        group.add_argument(f"--{name}", dest="filter_" + name.replace("-", "_"), action=_FilterAction,
                           metavar="VALUE", help=_FILTER_HELP[name])
    parser.set_defaults(filter_pairs=None)


def add_map_arguments(parser: argparse.ArgumentParser) -> None:
    _add_server(parser)
    parser.add_argument("-o", "--output", choices=("dot", "mermaid", "json"), default="dot", help="output format (default dot)")
    parser.add_argument("--namespace", action="append", default=[], help="only edges with an end in this namespace (repeatable)")


# --- talking to the agent ---------------------------------------------------------------


def connect_flow_api(server: str, path: str, timeout: float | None, *,
                     hint: str = "Point --server at its endpoint.") -> http.client.HTTPResponse:
    """GET ``path`` from the agent's flow API (NDJSON); raises :class:`ObserveError` with a
    message a user can act on when the agent is unreachable or refuses the request."""
    try:
        host, port = split_endpoint(server)
    except ValueError as exc:
        raise ObserveError(f"--server: {exc}", 2) from None
    conn = http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        conn.request("GET", path, headers={"Accept": "application/x-ndjson"})
        resp = conn.getresponse()
    except OSError as exc:
        raise ObserveError(
            f"cannot reach the flow API at {server}: {exc.strerror or exc}. Is the agent running with the "
            f"flows extension (service.extensions: [flows])? {hint}"
        ) from None
    if resp.status != 200:
        body = resp.read().decode(errors="replace")
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = body.strip() or resp.reason
        raise ObserveError(f"the agent refused the request ({resp.status}): {message}", 2 if resp.status == 400 else 1)
    return resp


def flows_path(args: argparse.Namespace) -> str:
    """``/flows?…`` for the parsed observe arguments (filters in their command-line order)."""
    params: list[tuple[str, str]] = []
    last = args.last
    if last is None and not (args.all or args.follow or args.since):
        last = DEFAULT_LAST
    if last is not None and not args.all:
        params.append(("last", str(last)))
    if args.since:
        params.append(("since", args.since))
    if args.until:
        params.append(("until", args.until))
    if args.follow:
        params.append(("follow", "1"))
    params.extend(args.filter_pairs or ())
    return "/flows?" + urlencode(params) if params else "/flows"


def fetch_map(server: str, namespaces: Sequence[str] = ()) -> dict[str, Any]:
    path = "/map" + ("?" + urlencode([("namespace", ns) for ns in namespaces]) if namespaces else "")
    resp = connect_flow_api(server, path, 30.0)
    try:
        return json.loads(resp.read())
    except ValueError as exc:
        raise ObserveError(f"the agent sent a map that is not JSON: {exc}") from None


# --- printing ---------------------------------------------------------------------------


@dataclass(slots=True)
class Printer:
    """Writes records in one of :data:`OUTPUTS`; lost-event notices go to ``err`` except in JSON."""

    output: str
    out: IO[str]
    err: IO[str]
    color: bool = False
    follow: bool = False
    _rows: list[tuple[str, ...]] = field(default_factory=list)
    _widths: list[int] = field(default_factory=list)
    _header_done: bool = False
    _blocks: int = 0

    def line(self, raw: str, record: Record | None) -> None:
        """One received JSON line (printed as is for ``json``) and its decoded record."""
        if self.output == "json":
            self.out.write(raw.rstrip("\n") + "\n")
            return
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


def _decode(raw: str) -> Record | None:
    try:
        return record_from_envelope(json.loads(raw))
    except (ValueError, FlowJSONError) as exc:
        raise ObserveError(f"cannot read a flow line: {exc}: {raw[:200]!r}") from None


def _time_arg(flag: str, value: str | None, now_ns: int) -> int | None:
    if value is None:
        return None
    try:
        return parse_time_arg(value, now_ns)
    except ValueError as exc:
        raise ObserveError(f"{flag}: {exc}", 2) from None


def _from_file(args: argparse.Namespace, filters: Filters, printer: Printer) -> None:
    now = time.time_ns()
    since, until = _time_arg("--since", args.since, now), _time_arg("--until", args.until, now)
    stream = sys.stdin if args.input_file == "-" else open(args.input_file)
    selected: list[tuple[str, Record]] = []
    with stream:
        for raw in stream:
            if not raw.strip():
                continue
            record = _decode(raw)
            if record is None or not filters.matches(record):
                continue
            if (since is not None and record.time_ns < since) or (until is not None and record.time_ns > until):
                continue
            selected.append((raw, record))
    last = args.last if args.last is not None else (None if args.all or args.since else DEFAULT_LAST)
    if last is not None:
        selected = selected[-last:] if last else []
    for raw, record in selected:
        printer.line(raw, record)


def _stream_lines(resp: http.client.HTTPResponse) -> Iterator[str]:
    while True:
        raw = resp.readline()
        if not raw:
            return
        yield raw.decode()


def observe(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run ``flowtel observe``; returns the exit status. Raises :class:`ObserveError`."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        # Built here too, so a bad flag is reported before any connection is made.
        filters = build_filters(args.filter_pairs or ())
    except FilterError as exc:
        raise ObserveError(str(exc), 2) from None
    if args.last is not None and args.last < 0:
        raise ObserveError("--last: expected a number of flows >= 0", 2)
    if args.follow and args.input_file:
        raise ObserveError("--follow reads from the agent; it cannot be combined with --input-file", 2)
    if args.follow and args.until:
        raise ObserveError("--until cannot be combined with --follow", 2)
    now = time.time_ns()
    _time_arg("--since", args.since, now)
    _time_arg("--until", args.until, now)
    printer = Printer(args.output, out, err, color=_color(args.color, out), follow=args.follow)
    try:
        if args.input_file:
            _from_file(args, filters, printer)
        else:
            resp = connect_flow_api(args.server, flows_path(args), None if args.follow else 60.0)
            for raw in _stream_lines(resp):
                printer.line(raw, None if args.output == "json" else _decode(raw))
                if args.follow and args.output != "table":
                    out.flush()
        printer.flush()
    except KeyboardInterrupt:
        printer.flush()
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            return 0  # `flowtel observe | head`: the reader had enough
        raise ObserveError(f"reading flows failed: {exc}") from None
    return 0


def print_map(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """Run ``flowtel map``; returns the exit status. Raises :class:`ObserveError`."""
    out = out or sys.stdout
    graph = fetch_map(args.server, args.namespace)
    if args.output == "json":
        out.write(json.dumps(graph, indent=2) + "\n")
    elif args.output == "mermaid":
        out.write(mapformat.to_mermaid(graph))
    else:
        out.write(mapformat.to_dot(graph))
    return 0

