"""``http``, ``httpV2``, ``kafka``: Hubble families of L7 protocols flowtel does not parse.

A metric string Hubble users already have (Cilium's documented example enables ``http``)
must not stop the agent, and must not pretend either: the string is validated with Hubble's
grammar (context options, ``httpV2``'s ``exemplars``), the family declares no series, and the
agent logs once, at start, that it has none (connectors/hubblemetrics/README.md).
"""
from __future__ import annotations

from typing import Callable

from connectors.hubblemetrics.handler import Handler
from connectors.hubblemetrics.options import ContextOptions, OptionError

NAMES = ("http", "httpV2", "kafka")
_WHAT = {"http": "HTTP", "httpV2": "HTTP", "kafka": "Kafka"}


class UnobservedHandler(Handler):
    """Declares no metrics and counts nothing: flowtel sees no such L7 flows."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.notice = (f"{family!r} has no series: flowtel does not parse {_WHAT[family]} traffic "
                       "(only DNS at L7); remove it from metrics to silence this")


def _take_exemplars(options: dict[str, str], family: str) -> None:
    for key in list(options):
        if key.lower() == "exemplars":
            value = options.pop(key)
            if value.lower() not in ("true", "false"):
                raise OptionError(f"{family}: exemplars={value!r} is not true or false")


def factory(family: str) -> Callable[[dict[str, str], ContextOptions], Handler]:
    def create(options: dict[str, str], ctx: ContextOptions) -> Handler:
        if family == "httpV2":
            _take_exemplars(options, family)
        return UnobservedHandler(family)

    return create
