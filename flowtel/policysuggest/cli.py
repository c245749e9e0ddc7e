"""``flowtel policy suggest``: read flows (a running agent's flow API, or a file), print the policy.

From the agent, the selection travels as the flow API's own filters (``namespace``, ``pod``,
``label``, ``since``, ``until``), so only the namespace's flows cross the wire; the exact
selection (workload, replies, verdicts) is made here, the same way for a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import IO, Iterator
from urllib.parse import urlencode

from extensions.flows.config import DEFAULT_ENDPOINT
from flowtel.lib.hubble.parse import FlowJSONError, parse_time_arg, record_from_envelope
from flowtel.errors import UsageError
from flowtel.observe import connect_flow_api
from flowtel.policysuggest.render import to_json, to_yaml
from flowtel.policysuggest.derive import Options, Selection, SuggestError, suggest
from flowtel.records import Flow, Record

# Longest wait for the next line of a (non-follow) flow API answer.
READ_TIMEOUT = 60.0


# What `flowtel policy suggest` raises for the CLI to print.
CommandError = UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("where the flows come from")
    source.add_argument("--server", default=os.environ.get("FLOWTEL_SERVER", DEFAULT_ENDPOINT), metavar="HOST:PORT",
                        help=f"a running agent's flows extension (default: $FLOWTEL_SERVER or {DEFAULT_ENDPOINT})")
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


def _query(args: argparse.Namespace) -> str:
    params: list[tuple[str, str]] = []
    if args.since:
        params.append(("since", args.since))
    if args.until:
        params.append(("until", args.until))
    # The flow API's Hubble filters: flows with an end among the selected pods (both
    # directions, so DNS answers to them come too).
    if args.pod:
        params.append(("pod", f"{args.namespace}/{args.pod}"))
    else:
        params.append(("namespace", args.namespace))
        if args.label:
            params.append(("label", args.label))
    return "/flows?" + urlencode(params)


def _agent_lines(server: str, path: str) -> Iterator[str]:
    resp = connect_flow_api(server, path, READ_TIMEOUT, hint="Point --server at it, or use --from-file.")
    try:
        while True:
            raw = resp.readline()
            if not raw:
                return
            yield raw.decode(errors="replace")
    except OSError as exc:
        raise CommandError(f"reading flows from the flow API at {server} failed: {exc.strerror or exc}") from None
    finally:
        resp.close()


def run(args: argparse.Namespace, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run ``flowtel policy suggest``; returns the exit status. Raises :class:`CommandError`."""
    out = out or sys.stdout
    err = err or sys.stderr
    now = time.time_ns()
    since, until = _time("--since", args.since, now), _time("--until", args.until, now)
    try:
        selection = Selection(args.namespace, workload=args.workload, pod=args.pod, label=args.label)
        source = ("stdin" if args.from_file == "-" else f"file {args.from_file}") if args.from_file else f"agent {args.server}"
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
            suggestion = suggest(reader.records(_agent_lines(args.server, _query(args))), selection, options)
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
