"""Parser of ``/proc/net/dev``: the kernel's per-interface counters, one line per interface.

One file for every interface costs one read, where ``/sys/class/net/*/statistics`` costs
one open and read per interface *and* statistic (a node with a hundred pod veths would
need over a thousand), and it is also readable for another network namespace through
``/proc/<pid>/net/dev`` or ``/proc/thread-self/net/dev``.

Column names come from the file's own header, so a kernel that appends columns is read
correctly; they are renamed to the ``rtnl_link_stats64`` style (``rx_dropped``,
``tx_carrier_errors``) that ``ip -s -s link`` and ``/sys/class/net/*/statistics`` use. Three
columns are sums in the kernel's own ``dev_seq_printf_stats``, and keep that meaning here:

- ``rx_dropped``        = rx_dropped + rx_missed_errors
- ``rx_frame_errors``   = rx_length_errors + rx_over_errors + rx_crc_errors + rx_frame_errors
- ``tx_carrier_errors`` = tx_carrier_errors + tx_aborted_errors + tx_window_errors + tx_heartbeat_errors
"""
from __future__ import annotations

from receiver.procfs.snmp import to_int

# /proc/net/dev header words -> statistic name suffix (after "rx_" / "tx_").
_WORDS = {
    "errs": "errors",
    "drop": "dropped",
    "fifo": "fifo_errors",
    "frame": "frame_errors",
    "colls": "collisions",
    "carrier": "carrier_errors",
}

# The layout every kernel since 2.6 prints, used when the header cannot be read.
_DEFAULT_COLUMNS = (
    "rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "rx_fifo_errors", "rx_frame_errors",
    "rx_compressed", "rx_multicast",
    "tx_bytes", "tx_packets", "tx_errors", "tx_dropped", "tx_fifo_errors", "tx_collisions",
    "tx_carrier_errors", "tx_compressed",
)


def _columns(header: str) -> tuple[str, ...] | None:
    parts = header.split("|")
    if len(parts) != 3 or not parts[0].strip().endswith("face"):
        return None
    rx = [f"rx_{_WORDS.get(w, w)}" for w in parts[1].split()]
    tx = [f"tx_{_WORDS.get(w, w)}" for w in parts[2].split()]
    return tuple(rx + tx) if rx and tx else None


def parse_net_dev(text: str) -> tuple[dict[str, dict[str, int]], int]:
    """Counters by interface name, and the number of lines that could not be used.

    An interface line with fewer values than the header has columns is skipped whole
    (positions can no longer be trusted); values beyond the header's columns are ignored.
    """
    lines = text.splitlines()
    errors = 0
    columns: tuple[str, ...] | None = None
    start = 0
    # Two header lines: "Inter-|   Receive …|  Transmit" and " face |bytes packets …|bytes …".
    for i, line in enumerate(lines[:2]):
        if "|" in line:
            start = i + 1
            columns = _columns(line) or columns
    if columns is None:
        errors += 1
        columns = _DEFAULT_COLUMNS
    out: dict[str, dict[str, int]] = {}
    width = len(columns)
    for line in lines[start:]:
        if not line.strip():
            continue
        # Interface names cannot contain ':' (dev_valid_name), so the first one ends the name.
        name, colon, rest = line.partition(":")
        name = name.strip()
        values = rest.split()
        if not colon or not name or len(values) < width:
            errors += 1
            continue
        stats: dict[str, int] = {}
        for column, raw in zip(columns, values):
            value = to_int(raw)
            if value is None:
                break
            stats[column] = value
        else:
            out[name] = stats
            continue
        errors += 1
    return out, errors
