"""The Collector's exporter helper for flowtel: a bounded sending queue and retry_on_failure.

A request is one export call of the transport: a metrics request is one SDK
``MetricsData`` chunk (opentelemetry-exporter-otlp's ``OTLPMetricExporter`` encodes it on
each attempt), a logs request an already serialized ``ExportLogsServiceRequest`` (compact
while queued through an outage, and the same bytes on every attempt). One sender thread
drains the queue in order. One attempt (the transport's ``send``) is one SDK ``export``
call, bounded by the exporter's ``timeout``; the SDK's HTTP exporter may resend a transient
failure inside that bound (its gRPC exporter is set not to), and those resends count as
retries too.

Outcomes, each counted under the exporter's id (records are data points or log records):

- delivered: ``records_sent``, ``requests_sent`` (minus what the backend reports as
  rejected in a partial success, counted as failed); resends within an attempt add to
  ``send_retries``;
- transient failure (backend unavailable, throttled, timed out): retried with exponential
  backoff from ``initial_interval`` to ``max_interval`` (throttling hints from the backend
  win), ``send_retries`` counted; after ``max_elapsed_time`` the request is given up;
- permanent failure (the backend refused the request as malformed, unauthenticated, …) or
  given up: ``records_send_failed``, ``requests_failed``;
- queue full: ``send_queue_overflow`` (records);
- still queued when the agent stops after the drain deadline: counted as dropped.

Every loss also adds to ``records_dropped``. Gauges: ``send_queue_size`` (requests),
``send_queue_capacity``.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol, Union

from opentelemetry.sdk.metrics.export import MetricsData

from flowtel.lib.exporterhelper.otlp_config import QueueConfig, RetryConfig
from flowtel.component import Telemetry

log = logging.getLogger("flowtel.exporters.sending")


@dataclass(slots=True)
class Request:
    signal: str  # "metrics" or "logs"
    payload: Union[MetricsData, bytes]  # metrics: the SDK's MetricsData; logs: a serialized ExportLogsServiceRequest
    items: int  # data points or log records in it


@dataclass(slots=True)
class SendResult:
    ok: bool
    retryable: bool = False
    throttle: float | None = None  # seconds the backend asked us to wait
    rejected: int = 0  # items the backend refused in a partial success
    message: str = ""
    attempts: int = 1  # requests put on the wire (the SDK exporter resends transient failures within the timeout)


class Transport(Protocol):
    """Makes one attempt (bounded by ``timeout``) to send a request; never raises for backend or
    network errors."""

    def send(self, request: Request, timeout: float) -> SendResult: ...

    def close(self) -> None:
        """Release connections and end an attempt in progress; may be called twice."""


class SendingQueue:
    def __init__(
        self,
        owner: str,
        transport: Transport,
        *,
        timeout: float,
        retry: RetryConfig,
        queue: QueueConfig,
        telemetry: Telemetry,
    ) -> None:
        self.owner = owner
        self._transport = transport
        self._timeout = timeout
        self._retry = retry
        self._enabled = queue.enabled
        self.capacity = queue.queue_size
        self._telemetry = telemetry
        self._items: deque[Request] = deque()
        self._cond = threading.Condition()
        self._in_flight = False
        self._closing = False
        self._abort = threading.Event()  # cuts backoff waits short at the shutdown deadline
        self._send_lock = threading.Lock()  # without a queue, callers send one at a time
        self._thread: threading.Thread | None = None
        self._last_log: dict[str, float] = {}
        telemetry.register_gauge(owner, "send_queue_size", lambda: len(self._items))
        telemetry.register_gauge(owner, "send_queue_capacity", lambda: self.capacity if self._enabled else 0)

    def start(self) -> None:
        if self._enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"flowtel-{self.owner}-sender", daemon=True)
            self._thread.start()

    def submit(self, request: Request) -> bool:
        """Queue a request (or, without a queue, send it now). False if it was dropped."""
        if not self._enabled:
            with self._send_lock:
                return self._deliver(request)
        with self._cond:
            if self._closing or len(self._items) >= self.capacity:
                accepted = False
            else:
                self._items.append(request)
                self._cond.notify_all()
                accepted = True
        if not accepted:
            self._count_loss("send_queue_overflow", request)
            self._log(logging.WARNING, "%s: sending queue full (%d requests); dropped a request of %d %s "
                      "(counted as send_queue_overflow)", self.owner, self.capacity, request.items,
                      _unit(request))
        return accepted

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued was sent or given up. False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._items or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout: float) -> None:
        """Stop taking requests, send what is queued within ``timeout``, count the rest as dropped."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if not self.drain(timeout):
            self._abort.set()  # stop waiting between retries
            # ... and end an attempt in progress now: the SDK exporter's shutdown cuts its
            # in-call backoff short and closes its connection.
            self._transport.close()
        if self._thread is not None:
            self._thread.join(self._timeout + 1.0)
        with self._cond:
            left = list(self._items)
            self._items.clear()
        for request in left:
            self._count_loss("records_dropped_at_shutdown", request)
        if left:
            log.warning("%s: %d requests (%d records) still queued at shutdown were dropped (counted)",
                        self.owner, len(left), sum(r.items for r in left))
        self._transport.close()

    def __len__(self) -> int:
        return len(self._items)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items or self._abort.is_set():
                    return
                request = self._items.popleft()
                self._in_flight = True
            try:
                self._deliver(request)
            except Exception:  # a bug in a transport must not end the sender
                log.exception("%s: unexpected error sending a request (counted as failed)", self.owner)
                self._count_loss("records_send_failed", request)
                self._telemetry.add(self.owner, "requests_failed")
            finally:
                with self._cond:
                    self._in_flight = False
                    self._cond.notify_all()

    def _deliver(self, request: Request) -> bool:
        """Send with retries; True if the backend took it (a partial rejection is counted)."""
        started = time.monotonic()
        wait = self._retry.initial_interval
        while True:
            result = self._transport.send(request, self._timeout)
            if result.attempts > 1:
                self._telemetry.add(self.owner, "send_retries", result.attempts - 1)
            if result.ok:
                sent = request.items - result.rejected
                self._telemetry.add(self.owner, "requests_sent")
                self._telemetry.add(self.owner, "records_sent", sent)
                if result.rejected:
                    self._telemetry.add(self.owner, "records_send_failed", result.rejected)
                    self._telemetry.add(self.owner, "records_dropped", result.rejected)
                    self._log(logging.WARNING, "%s: backend rejected %d of %d %s: %s (counted)", self.owner,
                              result.rejected, request.items, _unit(request), result.message or "no reason given")
                return True
            elapsed = time.monotonic() - started
            delay = self._backoff(wait)
            if result.throttle is not None:
                delay = result.throttle
            max_elapsed = self._retry.max_elapsed_time
            if (
                not result.retryable
                or not self._retry.enabled
                or (max_elapsed and elapsed + delay > max_elapsed)
                or self._abort.is_set()
            ):
                why = "permanent error" if not result.retryable else (
                    "retries disabled" if not self._retry.enabled else
                    "shutting down" if self._abort.is_set() else f"gave up after {elapsed:.1f}s")
                self._count_loss("records_send_failed", request)
                self._telemetry.add(self.owner, "requests_failed")
                self._log(logging.ERROR, "%s: dropped a request of %d %s (%s): %s (counted as records_send_failed)",
                          self.owner, request.items, _unit(request), why, result.message)
                return False
            self._telemetry.add(self.owner, "send_retries")
            self._log(logging.WARNING, "%s: sending %s failed, retrying in %.1fs: %s", self.owner, request.signal,
                      delay, result.message)
            if self._abort.wait(delay):
                continue  # aborted: the loop's next failure gives the request up
            wait = min(wait * self._retry.multiplier, self._retry.max_interval)

    def _backoff(self, wait: float) -> float:
        jitter = self._retry.randomization_factor
        return wait * random.uniform(1 - jitter, 1 + jitter) if jitter else wait

    def _count_loss(self, counter: str, request: Request) -> None:
        self._telemetry.add(self.owner, counter, request.items)
        self._telemetry.add(self.owner, "records_dropped", request.items)

    def _log(self, level: int, msg: str, *args: object) -> None:
        # During an outage every request fails the same way: say each kind of thing every
        # 10 s, not every time, and never let one kind (retries) hide another (overflow).
        now = time.monotonic()
        if now - self._last_log.get(msg, -1e9) > 10:
            self._last_log[msg] = now
            log.log(level, msg, *args)


def _unit(request: Request) -> str:
    return "data points" if request.signal == "metrics" else "log records"
