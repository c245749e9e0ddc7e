"""Factory of the ``fqdnpolicy`` receiver (bcc is imported only when one starts)."""
from __future__ import annotations

from flowtel.component import Consumer, CreateSettings, Receiver, ReceiverFactory
from receiver.fqdnpolicy.config import FqdnPolicyReceiverConfig
from receiver.fqdnpolicy.preflight import preflight


def create(settings: CreateSettings, config: FqdnPolicyReceiverConfig, next_consumer: Consumer) -> Receiver:
    from receiver.fqdnpolicy.receiver import FqdnPolicyReceiver

    return FqdnPolicyReceiver(settings, config, next_consumer)


FACTORY = ReceiverFactory(type="fqdnpolicy", config_class=FqdnPolicyReceiverConfig, create=create,
                            signals=("logs",), preflight=preflight)
