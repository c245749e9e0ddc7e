"""The component model: receivers, processors, connectors and exporters, as in the Collector.

A component is created by its :class:`Factory` from a validated config object. Records
move in batches (lists) because per-record calls across stage boundaries cost more in
Python than the work itself.
"""
from __future__ import annotations

import abc
import builtins
import enum
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Generic, Literal, Protocol, Sequence, TypeVar, Union

from pydantic import BaseModel, ConfigDict

from flowtel.preflight import Requirement
from flowtel.records import Record


class Kind(enum.StrEnum):
    RECEIVER = "receivers"
    PROCESSOR = "processors"
    CONNECTOR = "connectors"
    EXPORTER = "exporters"
    EXTENSION = "extensions"


class Status(enum.StrEnum):
    """A component's health, named as the Collector's ``componentstatus`` names it.

    The Service reports STARTING, OK (or PERMANENT_ERROR when ``start`` raised), STOPPING and
    STOPPED; a running component reports RECOVERABLE_ERROR when it cannot do its work for a
    while (and OK once it can again), PERMANENT_ERROR when it never will without a restart.
    """

    STARTING = "StatusStarting"
    OK = "StatusOK"
    RECOVERABLE_ERROR = "StatusRecoverableError"
    PERMANENT_ERROR = "StatusPermanentError"
    FATAL_ERROR = "StatusFatalError"
    STOPPING = "StatusStopping"
    STOPPED = "StatusStopped"


@dataclass(frozen=True, slots=True)
class StatusEvent:
    status: Status
    error: str | None
    time_ns: int


class ComponentConfig(BaseModel):
    """Base of every component's config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Consumer(Protocol):
    """Takes batches; a batch holds records of one signal (metric points, or flows/events)."""

    def consume(self, batch: list[Record]) -> None: ...


def consumer_wants(consumer: Consumer, signal: str) -> bool:
    """Whether ``consumer`` feeds any pipeline of ``signal`` ("metrics" or "logs")."""
    wants = getattr(consumer, "wants", None)
    return True if wants is None else bool(wants(signal))


def wait_consumed(consumer: Consumer, timeout: float) -> bool:
    """Wait (at most ``timeout`` seconds) until every batch handed to ``consumer`` so far has
    gone through each stage it feeds: the pipelines' processors and their exporters' queues.

    A receiver that hands on a large drain in chunks calls this between them, so one chunk at
    a time is in flight instead of a whole interval's records. True once consumed; False on
    timeout (the caller goes on: the queues' own bounds then drop and count). A consumer that
    cannot tell (a test's list) is consumed at once.
    """
    wait = getattr(consumer, "wait_consumed", None)
    return True if wait is None else bool(wait(timeout))


@dataclass(slots=True)
class CreateSettings:
    """What every component gets at creation besides its own config."""

    id: str  # "type" or "type/name"
    node_name: str
    telemetry: "Telemetry"


class Component(abc.ABC):
    """Lifecycle shared by all components. ``start`` may raise a user-facing error."""

    component_kind: ClassVar[Kind]
    settings: CreateSettings

    def start(self) -> None:
        pass

    def report_status(self, status: Status, error: str | None = None) -> None:
        """Tell the agent (and so the health_check extension) how this component is doing."""
        self.settings.telemetry.report_status(self.component_kind, self.settings.id, status, error)

    def shutdown(self) -> None:
        pass


class Receiver(Component):
    component_kind = Kind.RECEIVER

    def __init__(self, settings: CreateSettings, next_consumer: Consumer) -> None:
        self.settings = settings
        self.next_consumer = next_consumer


class Processor(Component):
    component_kind = Kind.PROCESSOR

    def __init__(self, settings: CreateSettings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def process(self, batch: list[Record]) -> list[Record]:
        """Return the batch to pass on. Records are immutable: a processor that changes one
        returns a new record (``flowtel.records.replace``) in its place; the list itself may be
        the one it was given."""

    def flush(self) -> list[Record]:
        """Records still held (e.g. an open aggregation window). Called at shutdown after the
        input queues drained (again after connectors' last batches), never concurrently with
        ``process``; what it returns goes through the later processors to the exporters."""
        return []

    # Seconds between calls of ``tick``; None (the default): the pipeline never ticks it.
    tick_interval: float | None = None

    def tick(self) -> list[Record]:
        """Records that became due with time rather than with input (an aggregation window
        that ended while no flows arrived). With ``tick_interval`` set, the pipeline calls it
        about that often from its timer thread, never concurrently with ``process`` or
        ``flush``; what it returns goes through the later processors to the exporters."""
        return []


class Exporter(Component):
    component_kind = Kind.EXPORTER

    def __init__(self, settings: CreateSettings) -> None:
        self.settings = settings

    @abc.abstractmethod
    def consume(self, batch: list[Record]) -> None:
        """Take one batch; raising counts as an export failure for this batch only."""

    def flush(self) -> None:
        pass


class Connector(Component):
    """Exporter of one pipeline and receiver of another (e.g. flows → metrics)."""

    component_kind = Kind.CONNECTOR

    def __init__(self, settings: CreateSettings, next_consumer: Consumer) -> None:
        self.settings = settings
        self.next_consumer = next_consumer

    @abc.abstractmethod
    def consume(self, batch: list[Record]) -> None:
        """Take one batch; raising counts as an export failure for this batch only."""


class Extension(Component):
    """A service the agent offers people (the flow API, the UI).

    An extension that sets ``taps`` to signals (e.g. ``("logs",)``) and implements
    ``consume`` sees every batch that leaves the processors of each pipeline of those
    signals, like one more exporter with its own bounded queue: Hubble's observer ring.
    """

    component_kind = Kind.EXTENSION
    taps: tuple[str, ...] = ()

    def __init__(self, settings: CreateSettings) -> None:
        self.settings = settings

    def consume(self, batch: list[Record]) -> None:
        """Called with each batch of a tapped signal (only when ``taps`` is set)."""

    def ready(self) -> None:
        """Called once every component has started (the Collector's ``PipelineWatcher.Ready``)."""

    def not_ready(self) -> None:
        """Called when shutdown begins, before any component stops (``PipelineWatcher.NotReady``)."""


Signal = Literal["metrics", "logs"]
SIGNALS: tuple[Signal, ...] = ("metrics", "logs")

# The config class a factory validates and hands to its ``create`` (contravariant in the
# protocols: a create that takes a base config accepts a factory's subclass too).
C = TypeVar("C", bound=ComponentConfig)
C_contra = TypeVar("C_contra", bound=ComponentConfig, contravariant=True)


class CreateReceiver(Protocol[C_contra]):
    def __call__(self, settings: CreateSettings, config: C_contra, next_consumer: Consumer, /) -> Receiver: ...


class CreateProcessor(Protocol[C_contra]):
    def __call__(self, settings: CreateSettings, config: C_contra, /) -> Processor: ...


class CreateConnector(Protocol[C_contra]):
    def __call__(self, settings: CreateSettings, config: C_contra, next_consumer: Consumer, /) -> Connector: ...


class CreateExporter(Protocol[C_contra]):
    def __call__(self, settings: CreateSettings, config: C_contra, /) -> Exporter: ...


class CreateExtension(Protocol[C_contra]):
    def __call__(self, settings: CreateSettings, config: C_contra, /) -> Extension: ...


# What `flowtel doctor` must check before this component can start with ``config``: its
# factory declares it, so the doctor and the component cannot disagree (flowtel.preflight).
PreflightOf = Callable[[C], Sequence[Requirement]]


def _no_preflight(config: ComponentConfig) -> Sequence[Requirement]:
    return ()


@dataclass(frozen=True, slots=True)
class ReceiverFactory(Generic[C]):
    type: str
    config_class: builtins.type[C]
    create: CreateReceiver[C]
    # The pipeline signals ("metrics", "logs") this receiver may feed.
    signals: tuple[Signal, ...] = SIGNALS
    preflight: PreflightOf[C] = _no_preflight
    kind: ClassVar[Kind] = Kind.RECEIVER


@dataclass(frozen=True, slots=True)
class ProcessorFactory(Generic[C]):
    type: str
    config_class: builtins.type[C]
    create: CreateProcessor[C]
    signals: tuple[Signal, ...] = SIGNALS
    preflight: PreflightOf[C] = _no_preflight
    kind: ClassVar[Kind] = Kind.PROCESSOR


@dataclass(frozen=True, slots=True)
class ConnectorFactory(Generic[C]):
    """A connector is the exporter of a ``consumes`` pipeline and a receiver of an ``emits``
    one (the Collector's ``connector.Factory`` with one signal pair): the config refuses it in
    the other direction, since wired backwards it would start and produce nothing."""

    type: str
    config_class: builtins.type[C]
    create: CreateConnector[C]
    consumes: Signal
    emits: Signal
    preflight: PreflightOf[C] = _no_preflight
    kind: ClassVar[Kind] = Kind.CONNECTOR

    @property
    def signals(self) -> tuple[Signal, ...]:
        return (self.consumes,) if self.consumes == self.emits else (self.consumes, self.emits)


@dataclass(frozen=True, slots=True)
class ExporterFactory(Generic[C]):
    type: str
    config_class: builtins.type[C]
    create: CreateExporter[C]
    signals: tuple[Signal, ...] = SIGNALS
    preflight: PreflightOf[C] = _no_preflight
    kind: ClassVar[Kind] = Kind.EXPORTER


@dataclass(frozen=True, slots=True)
class ExtensionFactory(Generic[C]):
    type: str
    config_class: builtins.type[C]
    create: CreateExtension[C]
    # The signals the extension taps (its ``taps``); extensions sit in no pipeline.
    signals: tuple[Signal, ...] = ()
    preflight: PreflightOf[C] = _no_preflight
    kind: ClassVar[Kind] = Kind.EXTENSION


# Any component's factory; ``kind`` says which (and narrows the type with isinstance).
Factory = Union[
    ReceiverFactory[Any], ProcessorFactory[Any], ConnectorFactory[Any], ExporterFactory[Any], ExtensionFactory[Any]
]


class Telemetry:
    """The agent's own counters (records in/out/dropped per component, failures).

    Plain integers under one lock: updated once per batch, never per record.
    """

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str], int] = {}
        self._gauges: dict[tuple[str, str], Callable[[], float]] = {}
        self._statuses: dict[tuple[Kind, str], StatusEvent] = {}

    def add(self, component: str, name: str, value: int = 1) -> None:
        if value == 0:
            return
        with self._lock:
            key = (component, name)
            self._counters[key] = self._counters.get(key, 0) + value

    def get(self, component: str, name: str) -> int:
        with self._lock:
            return self._counters.get((component, name), 0)

    def register_gauge(self, component: str, name: str, fn: Callable[[], float]) -> None:
        with self._lock:
            self._gauges[(component, name)] = fn

    def snapshot(self) -> dict[tuple[str, str], float]:
        with self._lock:
            out: dict[tuple[str, str], float] = dict(self._counters)
            gauges = list(self._gauges.items())
        for key, fn in gauges:
            out[key] = fn()
        return out

    def report_status(self, kind: Kind, component: str, status: Status, error: str | None = None) -> None:
        """Record a component's latest status. A permanent error stays until the component
        stops: as in the Collector, only a restart clears it."""
        with self._lock:
            key = (kind, component)
            current = self._statuses.get(key)
            if (
                current is not None
                and current.status is Status.PERMANENT_ERROR
                and status not in (Status.STOPPING, Status.STOPPED, Status.FATAL_ERROR)
            ):
                return
            self._statuses[key] = StatusEvent(status, error, time.time_ns())

    def statuses(self) -> dict[tuple[Kind, str], StatusEvent]:
        with self._lock:
            return dict(self._statuses)
