"""import-linter contract types that check the product's imports, not its tests'.

Tests live beside their component (``receiver/procfs/test_receiver.py``) and may use the
registry, the testbed or the CLI to drive it; a component's own modules may not. These
contracts drop test modules (``test_*``, ``conftest``) from the graph, then check as the
built-in ``layers`` and ``forbidden`` contracts do.
"""
from __future__ import annotations

import grimp
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract
from importlinter.domain.contract import ContractCheck


def is_test_module(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last.startswith("test_") or last == "conftest"


def product_only(graph: grimp.ImportGraph) -> grimp.ImportGraph:
    for module in [m for m in graph.modules if is_test_module(m)]:
        graph.remove_module(module)
    return graph


class ProductLayers(LayersContract):
    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        return super().check(product_only(graph), verbose)


class ProductForbidden(ForbiddenContract):
    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        return super().check(product_only(graph), verbose)
