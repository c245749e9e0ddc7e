"""What the ``ebpf`` receiver needs from the node, for its config: ``flowtel doctor`` checks
exactly this. The tracepoints and their fields are the kernel-events programs' own tables,
so a tracepoint the receiver attaches to cannot be missing from the doctor's list."""
from __future__ import annotations

from typing import Sequence

from flowtel.preflight import BccCompile, BpfPrivileges, Btf, Requirement, Tracefs, Tracepoint
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.kernel_events.program import DROP_PROGRAMS, REQUIRED_FIELDS, TCP_PROGRAMS, programs_for

# What each program's tracepoint gives the user, for the doctor's lines.
_PURPOSES = {
    **{fn: "drop metrics and DROPPED flows (drop_count, hubble_drop_total)" for fn in DROP_PROGRAMS},
    "flowtel_state": "TCP state metrics and connection events (networkobservability_tcp_state)",
    "flowtel_retrans": "TCP retransmission counts and retransmit events",
    "flowtel_synack": "retransmitted SYN-ACKs in the retransmission counts",
    "flowtel_rst_tx": "reset_sent TCP events",
    "flowtel_rst_rx": "reset_received TCP events",
}
assert set(_PURPOSES) == set(DROP_PROGRAMS) | set(TCP_PROGRAMS), "every program's tracepoint has a purpose"


def preflight(config: EbpfReceiverConfig) -> Sequence[Requirement]:
    out: list[Requirement] = [
        BccCompile("the tc flow and DNS programs are compiled at start-up"),
        BpfPrivileges("loading the programs and attaching them to interfaces with tc"),
    ]
    programs = programs_for(config.kernel_events)
    if programs:
        out.append(Btf("drop attribution and TCP events read kernel struct offsets (sk_buff, sock) from BTF"))
        out.append(Tracefs("drops and TCP health come from tracepoints"))
        out += [Tracepoint(category, event, tuple(REQUIRED_FIELDS[event]), _PURPOSES[fn])
                for fn, (category, event) in programs.items()]
    return out
