"""``flowtel policy suggest``: read flows (a Hubble API — an agent or Hubble Relay — or a
file), print the policy.

From a server, the selection travels as Hubble ``FlowFilter``s (the pods' namespace, pod
prefix or labels, ``since``, ``until``) in a ``GetFlows`` request for the whole ring, so
only the namespace's flows cross the wire; the exact selection (workload, replies,
verdicts) is made here, the same way for a file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import IO, Iterator

from google.protobuf import json_format

from flowtel.lib.hubble.parse import FlowJSONError, parse_time_arg, record_from_envelope
from flowtel.errors import UsageError
from flowtel.lib.hubble.client import ClientError, ObserverClient, add_connection_arguments, connection_from_args
from flowtel.lib.hubble.filters import FilterError
from flowtel.lib.hubble.flags import build_filters
from flowtel.lib.hubble.api.observer import observer_pb2
from flowtel.policysuggest.render import to_json, to_yaml
from flowtel.policysuggest.derive import Options, Selection, SuggestError, suggest
from flowtel.records import Flow, Record

# Longest wait for the next line of a (non-follow) flow API answer.
READ_TIMEOUT = 60.0


# What `flowtel policy suggest` raises for the CLI to print.
CommandError = UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("where the flows come from")
    add_connection_arguments(source)
    source.add_argument("--from-file", metavar="FILE",
                        help="Hubble JSON flows, one per line (the file exporter's flow log, `flowtel observe -o json`, "
                             "the DNS proxy's --flow-log; '-' for stdin) instead of the agent")
    source.add_argument("--since", metavar="TIME", help="only flows since an RFC 3339 time or a duration ago (5m, 1h)")
    source.add_argument("--until", metavar="TIME", help="only flows until an RFC 3339 time or a duration ago")
    select = parser.add_argument_group("which pods the policy is for (one namespace; at least one of the others)")
    select.add_argument("--namespace", "-n", default="default", help="the pods' namespace (default: default)")
    select.add_argument("--workload", metavar="[KIND/]NAME", default="",
                        help="pods whose top-level workload is this (e.g. frontend or Deployment/frontend)")
    select.add_argument("--pod", metavar="PREFIX", default="", help="pods whose name starts with this")
    select.add_argument("--label", metavar="SELECTOR", default="",
                        help="pods matching this label selector (e.g. app=web,tier in (front))")
    out = parser.add_argument_group("the policy")
    out.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml",
                     help="yaml (default, with comments saying what each rule came from) or json")
    out.add_argument("--name", default="", help="metadata.name (default: the workload's name)")
    out.add_argument("--collapse", type=int, default=0, metavar="N",
                     help="write matchPattern \"*.parent\" for N or more sibling names under one parent (N >= 2; "
                          "default 0: never, every name is a matchName)")
    out.add_argument("--include-dropped", action="store_true",
                     help="also allow egress whose verdict was DROPPED (default: FORWARDED and AUDIT only)")


def _time(flag: str, value: str | None, now_ns: int) -> int | None:
    if value is None:
        return None
    try:
        return parse_time_arg(value, now_ns)
    except ValueError as exc:
        raise CommandError(f"{flag}: {exc}", 2) from None


class _Reader:
    """Decodes JSON lines into records; a line that is not a Hubble envelope is counted, not fatal
    (a flow log's last line can be cut by rotation or a crash)."""

    def __init__(self, since_ns: int | None, until_ns: int | None) -> None:
        self.since_ns = since_ns
        self.until_ns = until_ns
        self.bad_lines = 0
        self.first_bad = ""

    def records(self, lines: Iterator[str]) -> Iterator[Record]:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = record_from_envelope(json.loads(raw))
            except (ValueError, FlowJSONError, AttributeError, TypeError) as exc:
                self.bad_lines += 1
                if not self.first_bad:
                    self.first_bad = f"line {number}: {exc}"
                continue
            if record is None:
                continue
            if isinstance(record, Flow) and not self._in_window(record.time_ns):
                continue
            yield record

    def _in_window(self, t: int) -> bool:
        return (self.since_ns is None or t >= self.since_ns) and (self.until_ns is None or t <= self.until_ns)


def flows_request(args: argparse.Namespace, since_ns: int | None, until_ns: int | None) -> observer_pb2.GetFlowsRequest:
    """The whole ring's flows with an end among the selected pods (both directions, so DNS
    answers to them come too)."""
    if args.pod:
        pairs = [("pod", f"{args.namespace}/{args.pod}")]
    else:
        pairs = [("namespace", args.namespace)] + ([("label", args.label)] if args.label else [])
    try:
        whitelist, _ = build_filters(pairs)
    except FilterError as exc:
        raise CommandError(str(exc), 2) from None
    req = observer_pb2.GetFlowsRequest(number=2**64 - 1, whitelist=whitelist)
    if since_ns is not None:
        req.since.FromNanoseconds(since_ns)
    if until_ns is not None:
        req.until.FromNanoseconds(until_ns)
    return req


def _server_lines(args: argparse.Namespace, req: observer_pb2.GetFlowsRequest) -> Iterator[str]:
    try:
        with ObserverClient(connection_from_args(args)) as client:
            for resp in client.get_flows(req, timeout=READ_TIMEOUT):
                yield json.dumps(json_format.MessageToDict(resp, preserving_proto_field_name=True))
    except ClientError as exc:
        raise CommandError(f"{exc} (or use --from-file)", exc.code) from None


def run(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run ``flowtel policy suggest``; returns the exit status. Raises :class:`CommandError`."""
    out = out or sys.stdout
    err = err or sys.stderr
    now = time.time_ns()
    since, until = _time("--since", args.since, now), _time("--until", args.until, now)
    try:
        selection = Selection(args.namespace, workload=args.workload, pod=args.pod, label=args.label)
        source = ("stdin" if args.from_file == "-" else f"file {args.from_file}") if args.from_file else f"server {args.server}"
        options = Options(collapse=args.collapse, include_dropped=args.include_dropped, name=args.name, source=source)
    except SuggestError as exc:
        raise CommandError(str(exc), 2) from None
    reader = _Reader(since, until)
    try:
        if args.from_file:
            try:
                stream = sys.stdin if args.from_file == "-" else open(args.from_file, encoding="utf-8", errors="replace")
            except OSError as exc:
                raise CommandError(f"--from-file: cannot read {args.from_file}: {exc.strerror or exc}", 2) from None
            with stream:
                suggestion = suggest(reader.records(iter(stream)), selection, options)
        else:
            suggestion = suggest(reader.records(_server_lines(args, flows_request(args, since, until))),
                                 selection, options)
    except SuggestError as exc:
        raise CommandError(str(exc)) from None
    if reader.bad_lines:
        suggestion.warnings.append(f"{reader.bad_lines} input lines were not Hubble flow JSON and were skipped "
                                   f"(first: {reader.first_bad})")
    try:
        out.write(to_json(suggestion) if args.output == "json" else to_yaml(suggestion))
        out.flush()
    except BrokenPipeError:
        return 0  # `flowtel policy suggest | head`: the reader had enough
    for warning in suggestion.warnings:
        err.write(f"flowtel policy suggest: warning: {warning}\n")
    return 0
