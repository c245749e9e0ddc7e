"""`make demo`'s job (`flowtel demo`), as a newcomer runs it: live flows with both ends named,
a real kernel drop, DNS exchanges, and a summary whose per-veth counts equal the kernel's."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]


def test_demo_prints_named_flows_a_drop_and_counts_equal_to_the_kernels() -> None:
    res = subprocess.run([sys.executable, "-m", "flowtel.cli", "demo", "--duration", "6"], cwd=REPO,
                         capture_output=True, text=True, timeout=240)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "counts equal the kernel's `ip -s link` counters exactly" in out, out[-3000:]
    # The datagram a round to a closed port: dropped by the server's kernel, named both ends.
    # Drops are aggregated in the kernel per drop flow and interval: a record may hold several.
    drops = re.findall(r"shop/frontend-\S+ \(ID:\d+\) <> shop/payments-0:9009 \(ID:\d+\) NO_SOCKET DROPPED "
                       r"\(UDP\)(?: pkts=(\d+))?", out)
    sent = int(re.search(r"(\d+) datagrams to a closed port", out).group(1))  # type: ignore[union-attr]
    assert sent >= 2 and sum(int(n or 1) for n in drops) == sent, out[-3000:]
    assert re.search(r"dns-response ebpf FORWARDED \(DNS Answer \"198\.18\.\d+\.\d+\" TTL: 60 \(Query server\.demo\.local\. A\)\)", out)
    assert "NXDOMAIN" in out or "Non-Existent Domain" in out
    assert "NO_SOCKET DROPPED (ICMPv4 EchoReply)" not in out  # a raw-socket ping's replies are not drops
