"""The layers hold (issue 13, point 4): lint-imports with the contracts in pyproject.toml.

core < shared libraries < components (independent of each other) < registry/testbed <
applications; flow API clients use no component. The second test proves the contracts can
fail: the same contracts, on the real graph plus one component importing another, break.
"""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import grimp
from importlinter import configuration

from tests.contracts.product_contracts import ProductForbidden, ProductLayers

ROOT = Path(__file__).resolve().parents[2]


def _settings() -> dict[str, Any]:
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert isinstance(settings, dict)
    return settings


def test_lint_imports_keeps_every_contract() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _contract(options: dict[str, Any]) -> ProductLayers | ProductForbidden:
    configuration.configure()  # the timer and printer lint-imports sets up for contracts
    settings = _settings()
    session = {k: v for k, v in settings.items() if k != "contracts"}
    cls = ProductLayers if options["type"] == "product_layers" else ProductForbidden
    contract_options = {k: v for k, v in options.items() if k not in ("id", "name", "type")}
    return cls(options["name"], session, contract_options)


def _graph() -> grimp.ImportGraph:
    settings = _settings()
    return grimp.build_graph(*settings["root_packages"], include_external_packages=False,
                             exclude_type_checking_imports=True, cache_dir=None)


def test_the_contracts_break_on_a_component_importing_another_or_core_importing_up() -> None:
    contracts = {c["id"]: c for c in _settings()["contracts"]}
    layers = _contract(contracts["layers"])
    assert layers.check(_graph(), verbose=False).kept

    for importer, imported in (
        ("receiver.procfs.receiver", "processors.k8sattributes.processor"),  # component -> component
        ("flowtel.pipeline", "flowtel.registry"),  # core -> the registry (and so every component)
        ("flowtel.lib.kube.client", "processors.k8sattributes.config"),  # shared library -> component
        ("exporters.file.exporter", "testbed"),  # component -> test tooling
        ("extensions.ui.extension", "extensions.flows.extension"),  # component -> a sibling of its kind
        ("exporters.otlp.exporter", "exporters.otlphttp.transport"),
    ):
        graph = _graph()
        graph.add_import(importer=importer, imported=imported)
        assert not layers.check(graph, verbose=False).kept, f"{importer} -> {imported} was not refused"

    clients = _contract(contracts["clients"])
    graph = _graph()
    graph.add_import(importer="flowtel.observe", imported="processors.k8sattributes.processor")
    assert not clients.check(graph, verbose=False).kept


def _component_folders() -> set[str]:
    """Every component of the product: a folder with a factory, under a kind's folder (and the
    dnsproxy, a component of its own process)."""
    found = {"dnsproxy"}
    for kind in ("receiver", "processors", "connectors", "exporters", "extensions"):
        found |= {f"{kind}.{d.name}" for d in (ROOT / kind).iterdir() if (d / "factory.py").is_file()}
    return found


def test_the_components_layer_lists_every_component_folder_and_nothing_shared() -> None:
    # A new component folder not in the list would escape the independence check, and a
    # folder without a factory under a kind (shared code) belongs in flowtel/lib instead.
    layer = next(c for c in _settings()["contracts"] if c["id"] == "layers")["layers"][4]
    listed = {name.strip() for name in layer.split("|")}
    assert listed == _component_folders()
    for kind in ("receiver", "processors", "connectors", "exporters", "extensions"):
        shared = [d.name for d in (ROOT / kind).iterdir()
                  if d.is_dir() and d.name != "__pycache__" and not (d / "factory.py").is_file()]
        assert not shared, f"{kind}/{shared}: shared code lives in flowtel/lib, a component has a factory"


def test_tests_beside_a_component_may_drive_it_through_the_registry() -> None:
    contracts = {c["id"]: c for c in _settings()["contracts"]}
    graph = _graph()
    graph.add_module("receiver.procfs.test_extra")
    graph.add_import(importer="receiver.procfs.test_extra", imported="flowtel.registry")
    assert _contract(contracts["layers"]).check(graph, verbose=False).kept


def test_test_tooling_is_not_part_of_the_installed_product() -> None:
    import fnmatch

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert (ROOT / "testbed" / "__init__.py").is_file() and not (ROOT / "flowtel" / "testbed.py").exists()
    assert not any(fnmatch.fnmatch("testbed", pattern) for pattern in include), include
    assert any(fnmatch.fnmatch("flowtel.lib.kube", pattern) for pattern in include), include
