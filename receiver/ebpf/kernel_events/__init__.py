"""Drops and TCP health from kernel tracepoints: a source the ``ebpf`` receiver hosts."""
from receiver.ebpf.kernel_events.config import DropsConfig, KernelEventsConfig, TcpConfig
from receiver.ebpf.kernel_events.decode import TcpConnection
from receiver.ebpf.kernel_events.source import KernelEvents

__all__ = ["DropsConfig", "KernelEvents", "KernelEventsConfig", "TcpConfig", "TcpConnection"]
