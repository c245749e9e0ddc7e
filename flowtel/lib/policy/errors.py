"""The one error type of the policy model."""
from __future__ import annotations


class PolicyError(ValueError):
    """A policy that cannot be enforced as written; the message names it and the key."""
