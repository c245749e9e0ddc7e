"""Comparing wire forms of records built separately: equal records get distinct flow ids."""
from __future__ import annotations

from typing import Any
from unittest.mock import ANY


def any_uuid(flow_json: dict[str, Any]) -> dict[str, Any]:
    """A flow's JSON that matches the same flow with any ``uuid`` (each record has its own)."""
    return {**flow_json, "uuid": ANY}


def any_uuid_envelope(envelope: dict[str, Any]) -> dict[str, Any]:
    if "flow" not in envelope:
        return envelope
    return {**envelope, "flow": any_uuid(envelope["flow"])}
