"""Compiling and attaching ``bpf/kernel_events.c`` for the running kernel.

What the program must know about the kernel is read once, here: tracepoint record layouts
and enum names from tracefs, and the few kernel struct offsets from BTF. They become the
generated tracepoint structs prepended to the source and ``-D`` constants.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

import bpf as bpf_sources
from flowtel.histogram import TCP_HANDSHAKE_RTT_BOUNDS
from flowtel.lib.bpf.constants import HEADER
from flowtel.lib.bpf import btf as btf_mod
from flowtel.lib.bpf import tracefs
from receiver.ebpf.kernel_events.config import KernelEventsConfig

log = logging.getLogger("flowtel.receiver.ebpf.kernel_events")

SOURCE = "kernel_events.c"

# Program (function in kernel_events.c) -> tracepoint. Names stay within the kernel's 15
# characters so `bpftool prog show` prints them whole.
DROP_PROGRAMS = {"flowtel_drop": ("skb", "kfree_skb")}
TCP_PROGRAMS = {
    "flowtel_state": ("sock", "inet_sock_set_state"),
    "flowtel_retrans": ("tcp", "tcp_retransmit_skb"),
    "flowtel_synack": ("tcp", "tcp_retransmit_synack"),
    "flowtel_rst_tx": ("tcp", "tcp_send_reset"),
    "flowtel_rst_rx": ("tcp", "tcp_receive_reset"),
}

# Fields each program reads, checked up front so a kernel without one gets a message
# naming it instead of a compiler error.
REQUIRED_FIELDS = {
    "kfree_skb": ("skbaddr", "location", "protocol", "reason"),
    "inet_sock_set_state": ("skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol",
                            "saddr", "daddr", "saddr_v6", "daddr_v6"),
    "tcp_retransmit_skb": ("skbaddr", "state", "sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6"),
    "tcp_retransmit_synack": ("sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6"),
    "tcp_send_reset": ("state", "saddr", "daddr"),
    "tcp_receive_reset": ("sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6"),
}

# -D name -> (BTF member path, bytes the program reads there; None: only the offset is used).
_DROP_OFFSETS = {
    "FLOWTEL_OFF_SKB_HEAD": ("sk_buff.head", 8),
    "FLOWTEL_OFF_SKB_NETWORK_HEADER": ("sk_buff.network_header", 2),
    "FLOWTEL_OFF_SKB_LEN": ("sk_buff.len", 4),
    "FLOWTEL_OFF_SKB_IIF": ("sk_buff.skb_iif", 4),
    "FLOWTEL_OFF_SKB_DEV": ("sk_buff.dev", 8),
    "FLOWTEL_OFF_NETDEV_IFINDEX": ("net_device.ifindex", 4),
    "FLOWTEL_OFF_NETDEV_NET": ("net_device.nd_net.net", 8),
    "FLOWTEL_OFF_SKB_SK": ("sk_buff.sk", 8),
    "FLOWTEL_OFF_SOCK_NET": ("sock.__sk_common.skc_net.net", 8),
    "FLOWTEL_OFF_NET_INUM": ("net.ns.inum", 4),
}
# Members read as one block per struct (one bpf_probe_read_kernel each, not one per member).
_SKB_BLOCK = ("FLOWTEL_OFF_SKB_HEAD", "FLOWTEL_OFF_SKB_NETWORK_HEADER", "FLOWTEL_OFF_SKB_LEN",
              "FLOWTEL_OFF_SKB_IIF", "FLOWTEL_OFF_SKB_DEV", "FLOWTEL_OFF_SKB_SK")
_NETDEV_BLOCK = ("FLOWTEL_OFF_NETDEV_IFINDEX", "FLOWTEL_OFF_NETDEV_NET")
# Bytes of the program's stack a block may take (of 512; the packet, key and event need the rest).
MAX_BLOCK_BYTES = 256
# Drop reasons of the kernel's own enum are small; subsystem reasons (mac80211, openvswitch)
# carry the subsystem in bits 16 and up and are counted in a hash map instead of the array.
_SUBSYS_SHIFT = 16
_TCP_OFFSETS = {
    "FLOWTEL_OFF_SKB_CB": ("sk_buff.cb", None),
    "FLOWTEL_OFF_TCP_SKB_CB_GSO_SEGS": ("tcp_skb_cb.tcp_gso_segs", 2),
}
# TCP states the program compares against, by their names in inet_sock_set_state's format.
_TCP_STATE_MACROS = ("ESTABLISHED", "SYN_SENT", "SYN_RECV", "CLOSE", "LISTEN")
# Values of enum skb_drop_reason that are not drops; every kernel orders them first.
_NOT_DROPS = ("NOT_DROPPED_YET", "CONSUMED")

PAGE_SIZE = 4096
# A ring buffer record: struct kernel_event (88 bytes) and the kernel's 8-byte header.
RECORD_BYTES = 96
MAX_WAKEUP_EVERY = 64


def wakeup_every(ring_bytes: int, cpus: int) -> int:
    """Events a CPU submits between wake-ups of the reader: at most half the buffer can hold
    events no CPU announced yet, so a burst wakes the reader long before the buffer is full."""
    return max(1, min(MAX_WAKEUP_EVERY, ring_bytes // RECORD_BYTES // (2 * cpus)))


@dataclass(frozen=True, slots=True)
class KernelFacts:
    """What the programs need to know about the running kernel."""

    formats: dict[str, tracefs.TracepointFormat]  # by event name
    offsets: dict[str, int] = field(default_factory=dict)  # -D name -> byte offset
    drop_reasons: dict[int, str] = field(default_factory=dict)
    drop_reason_min: int = 0
    tcp_states: dict[int, str] = field(default_factory=dict)  # 1 -> "ESTABLISHED"
    reset_reasons: dict[int, str] = field(default_factory=dict)


def drop_reason_min(reasons: dict[int, str]) -> int:
    """The first value of ``enum skb_drop_reason`` that is a drop.

    ``SKB_NOT_DROPPED_YET`` and ``SKB_CONSUMED`` (frees after use) come before
    ``NOT_SPECIFIED`` on every kernel that has them; on 6.x the tracepoint's table leaves them
    out altogether and starts at ``NOT_SPECIFIED`` = 2.
    """
    if "NOT_SPECIFIED" in reasons.values():
        return min(v for v, n in reasons.items() if n == "NOT_SPECIFIED")
    not_drops = [v for v, n in reasons.items() if n in _NOT_DROPS]
    return max(not_drops) + 1 if not_drops else 0


def tcp_state_names(fmt: tracefs.TracepointFormat) -> dict[int, str]:
    table = fmt.symbols.get("newstate", {})
    return {v: n.removeprefix("TCP_") for v, n in table.items()}


def read_kernel_facts(config: KernelEventsConfig, tracefs_root: str | None = None,
                      btf: btf_mod.Btf | None = None) -> KernelFacts:
    """Read tracefs formats and BTF offsets for the enabled parts (raises with a remedy)."""
    programs = programs_for(config)
    formats: dict[str, tracefs.TracepointFormat] = {}
    root = tracefs_root or tracefs.tracefs_root()
    for category, event in programs.values():
        fmt = tracefs.read_format(category, event, root)
        fmt.require(*REQUIRED_FIELDS[event])
        formats[event] = fmt
    paths = {**(_DROP_OFFSETS if config.drops.enabled else {}), **(_TCP_OFFSETS if config.tcp.enabled else {})}
    offsets: dict[str, int] = {}
    if paths:
        btf = btf or btf_mod.load()
        offsets = {name: btf.offset(path, size) for name, (path, size) in paths.items()}
        if config.drops.enabled:  # fails here, with the other kernel facts, rather than at compile time
            read_block(offsets, _SKB_BLOCK, "FLOWTEL_SKB_BLOCK")
            read_block(offsets, _NETDEV_BLOCK, "FLOWTEL_NETDEV_BLOCK")
    facts = KernelFacts(formats=formats, offsets=offsets)
    if "kfree_skb" in formats:
        reasons = formats["kfree_skb"].symbols.get("reason", {})
        if not reasons:
            raise tracefs.TracefsError("skb:kfree_skb's format names no drop reasons; cannot name drops")
        facts = replace(facts, drop_reasons=reasons, drop_reason_min=drop_reason_min(reasons))
    if "inet_sock_set_state" in formats:
        states = tcp_state_names(formats["inet_sock_set_state"])
        missing = [s for s in _TCP_STATE_MACROS if s not in states.values()]
        if missing:
            raise tracefs.TracefsError(f"sock:inet_sock_set_state's format does not name TCP states {missing}")
        facts = replace(facts, tcp_states=states)
    if "tcp_send_reset" in formats:
        facts = replace(facts, reset_reasons=formats["tcp_send_reset"].symbols.get("reason", {}))
    return facts


def read_block(offsets: dict[str, int], members: tuple[str, ...], prefix: str) -> dict[str, int]:
    """``-D`` constants of one block read covering ``members`` (their offsets, from BTF, and
    sizes from ``_DROP_OFFSETS``): ``{prefix}_OFF`` and ``{prefix}_LEN``, a multiple of 8. Raises
    if this kernel's layout spreads them over more than ``MAX_BLOCK_BYTES``."""
    start = min(offsets[m] for m in members)
    end = max(offsets[m] + (_DROP_OFFSETS[m][1] or 0) for m in members)
    length = (end - start + 7) // 8 * 8
    if length > MAX_BLOCK_BYTES:
        raise btf_mod.BtfError(f"{prefix}: this kernel's members {', '.join(members)} span {length} bytes, "
                               f"more than the {MAX_BLOCK_BYTES} the drop program reads at once")
    return {f"{prefix}_OFF": start, f"{prefix}_LEN": length}


def drop_reason_slots(reasons: dict[int, str]) -> int:
    """Reasons the drop_reasons array indexes: the kernel's own enum, below the subsystem bits."""
    own = [v for v in reasons if v >> _SUBSYS_SHIFT == 0]
    return max(own) + 1 if own else 1


def ignored_reasons_expression(reasons: dict[int, str], ignore: list[str]) -> str:
    """A C expression of ``r``, true for the ignored reasons this kernel has.

    A name the running kernel does not define is skipped with a warning rather than failing:
    one config serves nodes on different kernels, whose reason lists differ."""
    by_name = {name: value for value, name in reasons.items()}
    missing = sorted(name for name in set(ignore) if name not in by_name)
    if missing:
        log.warning("drops.ignore_reasons: this kernel has no drop reason %s; ignoring the name(s)",
                    ", ".join(missing))
    values = sorted({by_name[name] for name in ignore if name in by_name})
    return "(" + " || ".join(f"(r) == {v}" for v in values) + ")" if values else "0"


def programs_for(config: KernelEventsConfig) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    if config.drops.enabled:
        out.update(DROP_PROGRAMS)
    if config.tcp.enabled:
        out.update(TCP_PROGRAMS)
    return out


def rtt_bucket_expression(bounds: tuple[float, ...] = TCP_HANDSHAKE_RTT_BOUNDS) -> str:
    """A C expression of ``ns``: the histogram bucket of an RTT of ``ns`` nanoseconds (bucket i
    holds bounds[i-1] < v <= bounds[i], as flowtel.histogram's), i.e. how many bounds it exceeds."""
    if len(bounds) + 1 > HEADER.KEV_RTT_BUCKETS:
        raise ValueError(f"{len(bounds)} RTT bounds do not fit FLOWTEL_KEV_RTT_BUCKETS")
    return "(" + " + ".join(f"((ns) > {round(b * 1e9)}ULL)" for b in bounds) + ")"


def conn_sets(max_connections: int) -> int:
    """Sets of the tcp_conns table: enough sets of FLOWTEL_CONN_WAYS ways for ``max_connections``
    sockets (the program maps a hash of the socket address onto any number of sets)."""
    return -(-max_connections // HEADER.CONN_WAYS)


def build(facts: KernelFacts, config: KernelEventsConfig, *, events: bool) -> tuple[str, list[str]]:
    """Program text (generated tracepoint structs + ``kernel_events.c``) and compiler flags.

    ``events`` false (nothing consumes records) compiles the event paths out and leaves the
    drop flow and connection flow maps one entry each: counters only. The handshake RTT histogram is counted in the kernel either way.
    """
    structs = [tracefs.c_struct(fmt, f"flowtel_tp_{name}") for name, fmt in facts.formats.items()]
    by_name = {name: value for value, name in facts.tcp_states.items()}
    by_reason = {name: value for value, name in facts.drop_reasons.items()}
    defines: dict[str, int | str] = {
        "FLOWTEL_DROPS": int(config.drops.enabled),
        "FLOWTEL_TCP": int(config.tcp.enabled),
        "FLOWTEL_DROP_FLOWS": int(events and config.drops.events),
        # Unused without drop flow records: the smallest maps (LRU maps are preallocated).
        "FLOWTEL_MAX_DROP_FLOWS": config.drops.max_flows if events and config.drops.events else 1,
        # Compiled in, not a map the loader writes: at the default (0) the sample path does not
        # exist and costs a drop nothing, and the rate only changes with the config (a restart).
        "FLOWTEL_DROP_SAMPLES": int(drop_samples(config, events=events)),
        "FLOWTEL_DROP_SAMPLE_COST_NS": drop_sample_cost_ns(config.drops.events_per_second),
        "FLOWTEL_DROP_SAMPLE_BUDGET_NS": drop_sample_cost_ns(config.drops.events_per_second) * config.drops.events_per_second,
        "FLOWTEL_TCP_EVENTS": int(events and config.tcp.events),
        "FLOWTEL_TCP_CONN_EVENTS": int(events and config.tcp.connection_events),
        "FLOWTEL_MAX_CONN_FLOWS": (config.tcp.max_connection_flows
                                   if events and config.tcp.connection_events else 1),
        "FLOWTEL_RINGBUF_PAGES": max(1, config.ring_buffer_kb * 1024 // PAGE_SIZE),
        "FLOWTEL_WAKEUP_EVERY": wakeup_every(config.ring_buffer_kb * 1024, os.cpu_count() or 1),
        "FLOWTEL_CONN_SETS": conn_sets(config.tcp.max_connections),
        "FLOWTEL_DROP_REASON_MIN": facts.drop_reason_min,
        "FLOWTEL_DROP_IGNORED(r)": ignored_reasons_expression(facts.drop_reasons, config.drops.ignore_reasons),
        "FLOWTEL_DROP_NO_SOCKET": (-1 if config.drops.report_unclaimed_echo_replies
                                   else by_reason.get("NO_SOCKET", -1)),
        "FLOWTEL_RTT_BUCKET(ns)": rtt_bucket_expression(),
        "FLOWTEL_DROP_REASONS": drop_reason_slots(facts.drop_reasons),
        **facts.offsets,
        **(read_block(facts.offsets, _SKB_BLOCK, "FLOWTEL_SKB_BLOCK")
           | read_block(facts.offsets, _NETDEV_BLOCK, "FLOWTEL_NETDEV_BLOCK") if config.drops.enabled else {}),
        **{f"FLOWTEL_TCPS_{s}": by_name.get(s, 0) for s in _TCP_STATE_MACROS},
    }
    return "\n".join(structs) + "\n" + bpf_sources.source(SOURCE), bpf_sources.cflags(**defines)


def drop_samples(config: KernelEventsConfig, *, events: bool) -> bool:
    """Whether the drop program emits drop samples: asked for, and something consumes records."""
    return events and config.drops.enabled and config.drops.events_per_second > 0


def drop_sample_cost_ns(events_per_second: int) -> int:
    """What one drop sample costs in the kernel's per-CPU token bucket: 1 s / rate rounded up,
    so that a CPU never exceeds the rate (0: off, never taken). The bucket holds ``rate`` times
    this (a burst of exactly ``rate`` samples, then ``rate`` a second at most)."""
    if events_per_second <= 0:
        return 0
    return -(-1_000_000_000 // events_per_second)


def attach(b: Any, programs: dict[str, tuple[str, str]]) -> None:
    """Attach each program of the loaded module ``b`` to its tracepoint (all or none)."""
    done: list[str] = []
    try:
        for fn, (category, event) in programs.items():
            b.attach_tracepoint(tp=f"{category}:{event}", fn_name=fn)
            done.append(f"{category}:{event}")
    except BaseException:
        for tp in done:
            try:
                b.detach_tracepoint(tp)
            except Exception:
                pass
        raise


def load_and_attach(text: str, cflags: list[str], programs: dict[str, tuple[str, str]]) -> Any:
    """Compile with bcc and attach each program to its tracepoint; the ``BPF`` object."""
    from bcc import BPF

    b = BPF(text=text, cflags=cflags)
    try:
        attach(b, programs)
    except BaseException:
        b.cleanup()
        raise
    return b
