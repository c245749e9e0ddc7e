"""Errors a user can cause and must fix: raised once at the edge, printed with a remedy."""
from __future__ import annotations


class StartError(Exception):
    """A component cannot start on this node (kernel, permissions, headers, …)."""

    def __init__(self, component: str, problem: str, remedy: str) -> None:
        self.component = component
        self.problem = problem
        self.remedy = remedy
        super().__init__(f"{component}: {problem}\n  fix: {remedy}")


class UsageError(Exception):
    """A command-line problem: printed as ``flowtel <command>: …``, exit status ``code``
    (2: the arguments are wrong, 1: what they point at failed)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
