"""``dns``: hubble_dns_queries_total, hubble_dns_responses_total {rcode, qtypes, ips_returned}
and hubble_dns_response_types_total {type, qtypes}; option ``query`` appends a ``query`` label,
``ignoreAAAA`` skips messages whose only question is AAAA. One count per DNS message (an aggregated
record counts as its ``extensions.count`` messages)."""
from __future__ import annotations

import operator
from itertools import repeat

from connectors.hubblemetrics.handler import Batch, Emit, Handler, MetricInfo, flow_events, is_packet_flow
from connectors.hubblemetrics.options import ContextOptions, take_flag
from flowtel.records import Flow, Verdict
from flowtel.recordtables import rcode_name

QUERIES = "hubble_dns_queries_total"
RESPONSES = "hubble_dns_responses_total"
RESPONSE_TYPES = "hubble_dns_response_types_total"
POLICY_DENIED = "Policy denied"


class DnsHandler(Handler):
    def __init__(self, ctx: ContextOptions, include_query: bool, ignore_aaaa: bool) -> None:
        self.ctx = ctx
        self.include_query = include_query
        self.ignore_aaaa = ignore_aaaa
        extra = ("query",) if include_query else ()
        base = ctx.label_names
        self.metrics = (
            MetricInfo(QUERIES, "Number of DNS queries observed", (*base, "rcode", "qtypes", "ips_returned", *extra)),
            MetricInfo(RESPONSES, "Number of DNS responses observed",
                       (*base, "rcode", "qtypes", "ips_returned", *extra)),
            MetricInfo(RESPONSE_TYPES, "Number of DNS response types", (*base, "type", "qtypes", *extra)),
        )

    def process(self, flow: Flow, emit: Emit) -> None:
        dns = flow.l7
        # The unanswered-query record repeats a request already counted.
        if dns is None or not is_packet_flow(flow):
            return
        if self.ignore_aaaa and dns.qtypes == ("AAAA",):
            return
        qtypes = ",".join(dns.qtypes)
        extra = (dns.query,) if self.include_query else ()
        context = self.ctx.values(flow)
        n = flow_events(flow)
        if flow.verdict == Verdict.DROPPED:
            emit(QUERIES, (*context, POLICY_DENIED, qtypes, "0", *extra), n)
        elif not flow.is_reply:
            emit(QUERIES, (*context, "", qtypes, "0", *extra), n)
        else:
            emit(RESPONSES, (*context, rcode_name(dns.rcode), qtypes, str(len(dns.ips)), *extra), n)
            for rrtype in dns.rrtypes:
                emit(RESPONSE_TYPES, (*context, rrtype, qtypes, *extra), n)


    def process_batch(self, batch: Batch, emit: Emit) -> None:
        process = self.process
        # Most records of a batch are not DNS: selected by C calls (Batch.select).
        for flow, _ in batch.select(map(operator.is_not, map(_l7, batch.flows), repeat(None))):
            process(flow, emit)


_l7 = operator.attrgetter("l7")


def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
    return DnsHandler(ctx, take_flag(options, "query"), take_flag(options, "ignoreAAAA"))
