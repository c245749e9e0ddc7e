"""Factory of the ``fqdnpolicy`` receiver (bcc is imported only when one starts)."""
from __future__ import annotations

from flowtel.component import Consumer, CreateSettings, Factory, Kind, Receiver
from receiver.fqdnpolicy.config import FqdnPolicyReceiverConfig


def create(settings: CreateSettings, config: FqdnPolicyReceiverConfig, next_consumer: Consumer) -> Receiver:
    from receiver.fqdnpolicy.receiver import FqdnPolicyReceiver

    return FqdnPolicyReceiver(settings, config, next_consumer)


FACTORY = Factory(type="fqdnpolicy", kind=Kind.RECEIVER, config_class=FqdnPolicyReceiverConfig, create=create,
                  signals=("logs",))
