"""Factory of the ``ebpf`` receiver (bcc is imported only when one is created)."""
from __future__ import annotations

from flowtel.component import Consumer, CreateSettings, Receiver, ReceiverFactory
from receiver.ebpf.config import EbpfReceiverConfig
from receiver.ebpf.preflight import preflight


def create(settings: CreateSettings, config: EbpfReceiverConfig, next_consumer: Consumer) -> Receiver:
    from receiver.ebpf.receiver import EbpfReceiver

    return EbpfReceiver(settings, config, next_consumer)


FACTORY = ReceiverFactory(type="ebpf", config_class=EbpfReceiverConfig, create=create, signals=("logs", "metrics"), preflight=preflight)
