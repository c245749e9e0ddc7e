"""The pipeline runtime: builds components from a config, wires them, runs and stops them.

Hand-offs between stages are bounded queues counted in records. When one is full the
batch is dropped and counted (never blocking the kernel-side reader, whose own buffers
would then overflow silently). Every exporter has its own queue and thread, so a slow or
failing exporter costs only its own data.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from flowtel.component import (
    Component,
    Connector,
    ConnectorFactory,
    Consumer,
    CreateSettings,
    Exporter,
    ExporterFactory,
    Extension,
    ExtensionFactory,
    Factory,
    Kind,
    Processor,
    ProcessorFactory,
    Receiver,
    ReceiverFactory,
    Status,
    Telemetry,
)
from flowtel.config import AgentConfig, PipelineSpec, component_type
from flowtel.records import LostEvents, Record, signal_of

log = logging.getLogger("flowtel.pipeline")

DEFAULT_QUEUE_RECORDS = 100_000
MAX_BATCH_RECORDS = 8192
DEFAULT_LOSS_REPORT_INTERVAL = 5.0
# Telemetry counters that mean "records that never reached an output", by what lost them.
_LOSS_COUNTERS = {"records_dropped": "QUEUE_FULL", "records_failed": "EXPORT_FAILED"}

# How often the agent returns the allocator's free pages to the kernel (see trim_heap).
HEAP_TRIM_INTERVAL_S = 60.0
_libc: Any = None


def trim_heap() -> None:
    """Give glibc's free heap pages back to the kernel (``malloc_trim(0)``).

    glibc returns freed memory to the kernel only from the top of the heap; what a burst
    frees inside it (a Kubernetes informer's initial lists, a flood's records, a bcc compile)
    stays resident until something trims. Measured on the shipped config with 10k pods from
    the API: 8 MB back, 2 ms at a 190 MB heap; once a minute that is nothing. Not glibc (or no
    libc found): nothing to do, the allocator decides.
    """
    global _libc
    if _libc is False:
        return
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        _libc = False


class BoundedQueue:
    """A FIFO of batches bounded by the total number of records it holds."""

    def __init__(self, owner: str, capacity: int, telemetry: Telemetry) -> None:
        self.owner = owner
        self.capacity = capacity
        self._telemetry = telemetry
        self._batches: deque[list[Record]] = deque()
        self._size = 0
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self._last_warning = 0.0
        # The queues this one's worker hands its batches to (a pipeline's exporter queues):
        # what "consumed" waits for beyond this queue (_FanOut.wait_consumed).
        self.downstream: list[BoundedQueue] = []
        telemetry.register_gauge(owner, "queue_size", lambda: self._size)

    def put(self, batch: list[Record]) -> bool:
        if not batch:
            return True
        n = len(batch)
        with self._cond:
            if self._closed or self._size + n > self.capacity:
                dropped = True
            else:
                self._batches.append(batch)
                self._size += n
                self._cond.notify()
                dropped = False
        if dropped:
            self._telemetry.add(self.owner, "records_dropped", n)
            now = time.monotonic()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning("%s: queue full (%d records), dropped a batch of %d (counted)", self.owner, self.capacity, n)
            return False
        return True

    def get(self, timeout: float = 0.5) -> list[Record] | None:
        with self._cond:
            if not self._batches:
                self._cond.wait(timeout)
            if not self._batches:
                return None
            batch = self._batches.popleft()
            self._size -= len(batch)
            self._busy = True
            return batch

    def task_done(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def join(self, timeout: float) -> bool:
        """Wait until every queued batch was taken and handled. Returns False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._batches or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            left = self._size
            self._batches.clear()
            self._size = 0
            self._cond.notify_all()
        if left:
            self._telemetry.add(self.owner, "records_dropped", left)
            log.warning("%s: %d records still queued at shutdown were dropped (counted)", self.owner, left)

    def __len__(self) -> int:
        return self._size


class _Worker:
    """One thread draining one queue into one function; errors are counted, not fatal."""

    def __init__(self, name: str, queue: BoundedQueue, fn: Callable[[list[Record]], None], telemetry: Telemetry) -> None:
        self.name = name
        self.queue = queue
        self._fn = fn
        self._telemetry = telemetry
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"flowtel-{name}", daemon=True)
        self._last_error_log = 0.0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self.queue.get()
            if batch is None:
                continue
            try:
                self._fn(batch)
            except Exception:  # one bad batch or backend must not stop the pipeline
                self._telemetry.add(self.name, "batches_failed")
                self._telemetry.add(self.name, "records_failed", len(batch))
                now = time.monotonic()
                if now - self._last_error_log > 10:
                    self._last_error_log = now
                    log.exception("%s: failed on a batch of %d records (counted)", self.name, len(batch))
            finally:
                self.queue.task_done()

    def drain(self, timeout: float) -> bool:
        return self.queue.join(timeout)

    def stop(self, timeout: float) -> None:
        self.queue.join(timeout)
        self._stop.set()
        self.queue.close()
        if self._thread.is_alive():
            self._thread.join(timeout)


class _FanOut:
    """What a receiver or connector sees as its next consumer: every pipeline it feeds.

    A batch holds records of one signal (metric points or flows/events); it goes to the
    pipelines of that signal only, so one receiver can feed metrics and logs pipelines.
    """

    def __init__(self) -> None:
        self.queues: dict[str, list[BoundedQueue]] = {}

    def add(self, signal_name: str, queue: BoundedQueue) -> None:
        self.queues.setdefault(signal_name, []).append(queue)

    def wants(self, signal_name: str) -> bool:
        """Whether any pipeline takes this signal (receivers skip work nobody consumes)."""
        return signal_name in self.queues

    def wait_consumed(self, timeout: float) -> bool:
        """Wait until every pipeline fed from here, and each exporter (or connector) queue of
        those pipelines, has handled what it was given (``flowtel.component.wait_consumed``).
        A connector's own output (aggregated metric points) is not waited for."""
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        for queues in self.queues.values():
            for q in queues:
                for stage in (q, *q.downstream):  # a pipeline's worker fills its exporter queues first
                    if id(stage) in seen:
                        continue
                    seen.add(id(stage))
                    if not stage.join(max(0.0, deadline - time.monotonic())):
                        return False
        return True

    def consume(self, batch: list[Record]) -> None:
        if not batch:
            return
        queues = self.queues.get(signal_of(batch[0]), ())
        # A huge batch (a ring buffer read during a flood) is split, so that a full queue
        # drops only the part that does not fit, never the whole batch.
        for start in range(0, len(batch), MAX_BATCH_RECORDS):
            part = batch if len(batch) <= MAX_BATCH_RECORDS else batch[start : start + MAX_BATCH_RECORDS]
            if len(queues) == 1:
                queues[0].put(part)
                continue
            for q in queues:
                q.put(list(part))


@dataclass
class _BuiltPipeline:
    spec: PipelineSpec
    queue: BoundedQueue
    processors: list[Processor]
    exporter_queues: list[BoundedQueue] = field(default_factory=list)
    # process() runs on the pipeline thread, flush() on the shutdown thread: never both at once.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def process(self, batch: list[Record]) -> None:
        with self.lock:
            for processor in self.processors:
                batch = processor.process(batch)
                if not batch:
                    return
            self._export(batch)

    def flush(self) -> None:
        """Hand what processors still hold downstream, each through the processors after it."""
        self._release(lambda processor: processor.flush())

    def tick(self) -> None:
        """Hand on what processors' timers made due (``Processor.tick``)."""
        self._release(lambda processor: processor.tick())

    def _release(self, held: Callable[[Processor], list[Record]]) -> None:
        with self.lock:
            batch: list[Record] = []
            for processor in self.processors:
                if batch:
                    batch = processor.process(batch)
                batch = [*(batch or ()), *held(processor)]
            if batch:
                self._export(batch)

    def _export(self, batch: list[Record]) -> None:
        if len(self.exporter_queues) == 1:
            self.exporter_queues[0].put(batch)
            return
        for q in self.exporter_queues:
            q.put(list(batch))


class Service:
    """A running set of pipelines built from an :class:`AgentConfig`."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        node_name: str,
        factories: Mapping[Kind, Mapping[str, Factory]] | None = None,
        queue_records: int = DEFAULT_QUEUE_RECORDS,
        loss_report_interval: float = DEFAULT_LOSS_REPORT_INTERVAL,
    ) -> None:
        if factories is None:
            factories = config.factories  # the ones the config was validated against
        self.config = config
        self.telemetry = Telemetry()
        self.node_name = node_name
        self._factories = factories
        self._queue_records = queue_records
        self._stopped = threading.Event()
        self.receivers: dict[str, Receiver] = {}
        self.processors: dict[tuple[str, str], Processor] = {}
        self.exporters: dict[str, Exporter] = {}
        self.connectors: dict[str, Connector] = {}
        self.extensions: dict[str, Extension] = {}
        self._pipelines: dict[str, _BuiltPipeline] = {}
        self._exporter_workers: dict[str, _Worker] = {}
        self._pipeline_workers: list[_Worker] = []
        self._started: list[Component] = []
        self._loss_report_interval = loss_report_interval
        self._loss_reported: dict[tuple[str, str], int] = {}
        self._loss_stop = threading.Event()
        self._loss_thread: threading.Thread | None = None
        self._tick_thread: threading.Thread | None = None
        self._build()

    def _settings(self, cid: str) -> CreateSettings:
        return CreateSettings(id=cid, node_name=self.node_name, telemetry=self.telemetry)

    def _factory(self, kind: Kind, cid: str) -> Factory:
        return self._factories[kind][component_type(cid)]

    def _create_processor(self, cid: str) -> Processor:
        factory = self._factory(Kind.PROCESSOR, cid)
        assert isinstance(factory, ProcessorFactory), factory  # registered under its kind
        return factory.create(self._settings(cid), self.config.component(Kind.PROCESSOR, cid))

    def _create_connector(self, cid: str, next_consumer: Consumer) -> Connector:
        factory = self._factory(Kind.CONNECTOR, cid)
        assert isinstance(factory, ConnectorFactory), factory
        return factory.create(self._settings(cid), self.config.component(Kind.CONNECTOR, cid), next_consumer)

    def _create_exporter(self, cid: str) -> Exporter:
        factory = self._factory(Kind.EXPORTER, cid)
        assert isinstance(factory, ExporterFactory), factory
        return factory.create(self._settings(cid), self.config.component(Kind.EXPORTER, cid))

    def _create_receiver(self, cid: str, next_consumer: Consumer) -> Receiver:
        factory = self._factory(Kind.RECEIVER, cid)
        assert isinstance(factory, ReceiverFactory), factory
        return factory.create(self._settings(cid), self.config.component(Kind.RECEIVER, cid), next_consumer)

    def _create_extension(self, cid: str) -> Extension:
        factory = self._factory(Kind.EXTENSION, cid)
        assert isinstance(factory, ExtensionFactory), factory
        return factory.create(self._settings(cid), self.config.component(Kind.EXTENSION, cid))

    def _build(self) -> None:
        cfg = self.config
        fanouts: dict[str, _FanOut] = {}

        def exporter_queue(cid: str, consume: Callable[[list[Record]], None]) -> BoundedQueue:
            worker = self._exporter_workers.get(cid)
            if worker is None:
                q = BoundedQueue(cid, self._queue_records, self.telemetry)
                worker = _Worker(cid, q, consume, self.telemetry)
                self._exporter_workers[cid] = worker
            return worker.queue

        for pid, spec in cfg.pipelines.items():
            q = BoundedQueue(f"pipeline/{pid}", self._queue_records, self.telemetry)
            procs: list[Processor] = []
            for proc_id in spec.processors:
                # Processors keep per-pipeline state, as in the Collector: one instance each.
                proc = self._create_processor(proc_id)
                self.processors[(pid, proc_id)] = proc
                procs.append(proc)
            self._pipelines[pid] = _BuiltPipeline(spec, q, procs)
            q.downstream = self._pipelines[pid].exporter_queues  # the same list, filled below
            for rid in spec.receivers:
                fanouts.setdefault(rid, _FanOut()).add(spec.signal, q)

        for pid, built in self._pipelines.items():
            for eid in built.spec.exporters:
                if eid in cfg.components[Kind.CONNECTOR]:
                    conn = self.connectors.get(eid)
                    if conn is None:
                        conn = self._create_connector(eid, fanouts.setdefault(eid, _FanOut()))
                        self.connectors[eid] = conn
                    built.exporter_queues.append(exporter_queue(eid, conn.consume))
                else:
                    exp = self.exporters.get(eid)
                    if exp is None:
                        exp = self._create_exporter(eid)
                        self.exporters[eid] = exp
                    built.exporter_queues.append(exporter_queue(eid, exp.consume))
            self._pipeline_workers.append(_Worker(f"pipeline/{pid}", built.queue, built.process, self.telemetry))

        for rid, fanout in fanouts.items():
            if rid in cfg.components[Kind.RECEIVER] and rid not in self.receivers:
                self.receivers[rid] = self._create_receiver(rid, fanout)
        for xid in cfg.extensions:
            ext = self._create_extension(xid)
            self.extensions[xid] = ext
            for built in self._pipelines.values():
                if built.spec.signal in ext.taps:
                    built.exporter_queues.append(exporter_queue(xid, ext.consume))

    def start(self) -> None:
        """Start in dependency order: extensions, exporters, connectors, processors, receivers.

        If any start fails, what was started is shut down and the error is raised.
        """
        try:
            for ext in self.extensions.values():
                self._start(ext)
            for worker in self._exporter_workers.values():
                worker.start()
            for exp in self.exporters.values():
                self._start(exp)
            for conn in self.connectors.values():
                self._start(conn)
            for proc in self.processors.values():
                self._start(proc)
            for worker in self._pipeline_workers:
                worker.start()
            for rec in self.receivers.values():
                self._start(rec)
            self._loss_thread = threading.Thread(target=self._report_losses_loop, name="flowtel-loss-report", daemon=True)
            self._loss_thread.start()
            intervals = [p.tick_interval for p in self.processors.values() if p.tick_interval]
            if intervals:
                self._tick_thread = threading.Thread(target=self._tick_loop, args=(min(intervals),),
                                                     name="flowtel-processor-ticks", daemon=True)
                self._tick_thread.start()
            for ext in self.extensions.values():
                ext.ready()
        except BaseException:
            self.shutdown()
            raise

    def _start(self, component: Component) -> None:
        component.report_status(Status.STARTING)
        try:
            component.start()
        except BaseException as exc:
            component.report_status(Status.PERMANENT_ERROR, f"start failed: {exc}")
            raise
        self._started.append(component)
        # A component may already have reported how it is doing while it started.
        kind, cid = component.component_kind, component.settings.id
        current = self.telemetry.statuses().get((kind, cid))
        if current is None or current.status is Status.STARTING:
            component.report_status(Status.OK)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop receivers (their last drain included), drain every queue, then stop the rest."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        started = set(map(id, self._started))
        for ext in self.extensions.values():
            if id(ext) in started:
                self._safe(ext.not_ready, ext)

        def stop(components: Mapping[Any, Component], *methods: str) -> None:
            for component in components.values():
                if id(component) in started:
                    component.report_status(Status.STOPPING)
                    for method in methods:
                        self._safe(getattr(component, method), component)
                    component.report_status(Status.STOPPED)

        stop(self.receivers, "shutdown")
        self._loss_stop.set()
        # Ticks stop with the receivers: from here on the shutdown flushes hand on what is held.
        for thread in (self._loss_thread, self._tick_thread):
            if thread is not None:
                thread.join(timeout)
        self._drain(timeout)
        # Losses that happened while draining are reported before the outputs close.
        self.report_losses()
        self._drain(timeout)
        # Processors that hold records (aggregation windows) hand them on before the
        # connectors stop, and again for what the connectors' last batches fed them.
        self._flush_processors()
        self._drain(timeout)
        # Connectors may emit a last batch (e.g. final metric points) into later pipelines.
        stop(self.connectors, "shutdown")
        self._drain(timeout)
        self._flush_processors()
        self._drain(timeout)
        for worker in [*self._pipeline_workers, *self._exporter_workers.values()]:
            worker.stop(timeout)
        stop(self.processors, "shutdown")
        stop(self.exporters, "flush", "shutdown")
        stop(self.extensions, "shutdown")

    def _flush_processors(self) -> None:
        for built in self._pipelines.values():
            try:
                built.flush()
            except Exception:
                log.exception("shutdown: flushing the processors of pipeline %s failed", built.spec.id)

    def _tick_loop(self, interval: float) -> None:
        # Every pipeline is ticked at the shortest interval asked for; a processor's tick
        # decides itself whether anything is due, so ticking more often only costs a lock.
        last_error_log = 0.0
        while not self._loss_stop.wait(interval):
            for built in self._pipelines.values():
                try:
                    built.tick()
                except Exception:  # one failing processor must not stop the others' timers
                    self.telemetry.add(f"pipeline/{built.spec.id}", "ticks_failed")
                    now = time.monotonic()
                    if now - last_error_log > 10:
                        last_error_log = now
                        log.exception("pipeline %s: a processor's tick failed (counted)", built.spec.id)

    def _report_losses_loop(self) -> None:
        # The first trim comes soon after start, once the informers' initial lists are parsed.
        next_trim = time.monotonic() + HEAP_TRIM_INTERVAL_S / 2
        while not self._loss_stop.wait(self._loss_report_interval):
            self.report_losses()
            if time.monotonic() >= next_trim:
                next_trim = time.monotonic() + HEAP_TRIM_INTERVAL_S
                trim_heap()

    def report_losses(self) -> None:
        """Turn new queue drops and export failures into ``LostEvents`` records in the logs
        pipelines, so a user reading flows can tell "nothing happened" from "we missed it".

        A report that cannot be queued (the queue is full too) stays pending and is retried,
        so losses are reported late rather than lost themselves.
        """
        inputs = [p.queue for p in self._pipelines.values() if p.spec.signal == "logs"]
        if not inputs:
            return
        now = time.time_ns()
        pending: list[tuple[tuple[str, str], int]] = []
        for (owner, name), value in self.telemetry.snapshot().items():
            kind = _LOSS_COUNTERS.get(name)
            if kind is None:
                continue
            delta = int(value) - self._loss_reported.get((owner, name), 0)
            if delta > 0:
                pending.append(((owner, name), delta))
        for key, delta in pending:
            record = LostEvents(now, f"{_LOSS_COUNTERS[key[1]]}:{key[0]}", delta, self.node_name)
            if all(q.put([record]) for q in inputs):
                self._loss_reported[key] = self._loss_reported.get(key, 0) + delta

    def _drain(self, timeout: float) -> None:
        """Wait until no queue holds data; connectors can refill pipelines, so loop."""
        deadline = time.monotonic() + timeout
        workers = [*self._pipeline_workers, *self._exporter_workers.values()]
        while time.monotonic() < deadline:
            if all(w.drain(max(0.0, deadline - time.monotonic())) for w in workers) and not any(
                len(w.queue) for w in workers
            ):
                return
        log.warning("shutdown: queues not drained within %.1fs; remaining records are dropped", timeout)

    @staticmethod
    def _safe(fn: Callable[[], None], component: Component) -> None:
        try:
            fn()
        except Exception:
            log.exception("error while stopping %s", type(component).__name__)

    def run_until_signal(
        self,
        *,
        duration: float | None = None,
        after_start: Callable[[], None] | None = None,
        before_shutdown: Callable[[], None] | None = None,
    ) -> None:
        """Start, wait for SIGINT/SIGTERM (or ``duration`` seconds), then shut down cleanly.

        ``after_start`` runs once every component has started and ``before_shutdown`` after
        the wait, before components stop: the demo runs its traffic between the two, so that
        every packet it sends is counted.
        """
        stop = threading.Event()

        def handler(signum: int, _frame: object) -> None:
            log.info("received %s, flushing and stopping", signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            if after_start is not None:
                after_start()
            stop.wait(duration)
        finally:
            try:
                if before_shutdown is not None:
                    before_shutdown()
            finally:
                try:
                    self.shutdown()
                finally:
                    for s, h in previous.items():
                        signal.signal(s, h)
