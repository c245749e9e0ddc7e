"""What the health endpoints answer, computed from component statuses (no I/O here).

Readiness (``path``) is the Collector's health_check: "Server available" once the Service
has started every component and while every receiver reports OK. Liveness
(``liveness_path``) only fails when restarting the agent is the remedy: a component in a
permanent or fatal error. A receiver that cannot work for a while (RECOVERABLE_ERROR) makes
the agent not ready, so nothing relies on it, without a restart that would recompile the
eBPF programs and lose the kernel's counters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from flowtel.component import Kind, Status, StatusEvent

AVAILABLE = "Server available"
NOT_AVAILABLE = "Server not available"
ALIVE = "Server alive"
NOT_ALIVE = "Server not alive"

# The zero time.Time the Collector prints for upSince before the pipelines are ready.
_NEVER = "0001-01-01T00:00:00Z"
_FAILED = (Status.PERMANENT_ERROR, Status.FATAL_ERROR)


@dataclass(frozen=True, slots=True)
class Answer:
    code: int
    body: dict[str, Any]


def rfc3339(time_ns: int) -> str:
    dt = datetime.fromtimestamp(time_ns / 1e9, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{time_ns % 1_000_000_000:09d}Z"


def go_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String`` prints it (``1h2m3.5s``), as the Collector does."""
    if seconds <= 0:
        return "0s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


def components(statuses: Mapping[tuple[Kind, str], StatusEvent]) -> dict[str, dict[str, dict[str, str]]]:
    """``{"receivers": {"ebpf": {"status": "StatusOK", "since": …, "error": …}}, …}``."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for (kind, cid), event in sorted(statuses.items()):
        entry = {"status": event.status.value, "since": rfc3339(event.time_ns)}
        if event.error:
            entry["error"] = event.error
        out.setdefault(kind.value, {})[cid] = entry
    return out


def unhealthy_receivers(statuses: Mapping[tuple[Kind, str], StatusEvent]) -> list[str]:
    return sorted(cid for (kind, cid), e in statuses.items() if kind is Kind.RECEIVER and e.status is not Status.OK)


def readiness(
    statuses: Mapping[tuple[Kind, str], StatusEvent], ready_since_ns: int | None, now_ns: int | None = None
) -> Answer:
    """200 when the Service is ready (``ready_since_ns`` set) and every receiver is OK."""
    now = time.time_ns() if now_ns is None else now_ns
    ok = ready_since_ns is not None and not unhealthy_receivers(statuses)
    body: dict[str, Any] = {
        "status": AVAILABLE if ok else NOT_AVAILABLE,
        "upSince": rfc3339(ready_since_ns) if ready_since_ns is not None else _NEVER,
        "uptime": go_duration((now - ready_since_ns) / 1e9) if ready_since_ns is not None else "",
        "components": components(statuses),
    }
    return Answer(200 if ok else 503, body)


def liveness(statuses: Mapping[tuple[Kind, str], StatusEvent]) -> Answer:
    """200 unless some component is in a permanent or fatal error (a restart is the fix)."""
    failed = sorted(f"{kind.value}/{cid}" for (kind, cid), e in statuses.items() if e.status in _FAILED)
    body: dict[str, Any] = {"status": NOT_ALIVE if failed else ALIVE, "components": components(statuses)}
    if failed:
        body["failed"] = failed
    return Answer(503 if failed else 200, body)
