"""Factory of the ``procfs`` receiver."""
from __future__ import annotations

from flowtel.component import Consumer, CreateSettings, Receiver, ReceiverFactory
from receiver.procfs.config import ProcfsReceiverConfig
from receiver.procfs.preflight import preflight


def create(settings: CreateSettings, config: ProcfsReceiverConfig, next_consumer: Consumer) -> Receiver:
    from receiver.procfs.receiver import ProcfsReceiver

    return ProcfsReceiver(settings, config, next_consumer)


FACTORY = ReceiverFactory(type="procfs", config_class=ProcfsReceiverConfig, create=create, signals=("metrics",),
                          preflight=preflight)
