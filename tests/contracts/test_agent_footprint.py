"""What the agent process costs for the shipped config (issue 17, point 6), in the real process.

`flowtel run` with config/flowtel.yaml (pointed at no interface, temporary paths and free
ports) runs in a fresh interpreter that counts every bcc ``BPF()`` construction and, once the
pipeline has started, reports which heavy packages it imported:

- one bcc module for the whole agent: the tc programs, the DNS capture and the kernel-event
  tracepoints compile together (one LLVM run), and the fqdnpolicy receiver compiles nothing
  (it reads the proxy's pinned map with layouts from bpf/flowtel.h's text);
- no Kubernetes client (nor its urllib3/oauthlib) and no OpenTelemetry SDK without a component
  that needs them (the shipped config has no k8sattributes, no OTLP exporter, no Hubble peers);

How much memory that is, bench/memory.py measures (DESIGN: memory is measured, not asserted).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
# Packages no component of the shipped config uses: each costs MB in every agent if imported.
# (dnspython and pyroute2 are used: the ebpf receiver decodes DNS names and attaches tc with them.)
UNUSED_BY_SHIPPED_CONFIG = ("kubernetes", "opentelemetry", "urllib3", "google.auth", "oauthlib", "requests")

_AGENT = r"""
import json, os, signal, sys, threading
import bcc

constructed = []
_init = bcc.BPF.__init__
def counted(self, *args, **kwargs):
    constructed.append(len(kwargs.get("text") or (args[2] if len(args) > 2 else b"") or b""))
    _init(self, *args, **kwargs)
bcc.BPF.__init__ = counted

import flowtel.pipeline
report = {}
_start = flowtel.pipeline.Service.start
def start(self):
    _start(self)
    mods = set(sys.modules)
    report["imported"] = sorted(m for m in mods)
    report["bpf_modules"] = len(constructed)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
flowtel.pipeline.Service.start = start

from flowtel.cli import main
code = main(["run", "--config", sys.argv[1]])
print("REPORT " + json.dumps(report), flush=True)
sys.exit(code)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _shipped_config(tmp: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "config" / "flowtel.yaml").read_text())
    cfg["receivers"]["ebpf"]["interfaces"] = [f"ftfoot{os.getpid() % 10000}x*"]  # matches nothing
    cfg["receivers"]["fqdnpolicy"]["pin_dir"] = str(tmp / "no-proxy")
    cfg["exporters"]["file"]["path"] = str(tmp / "flows.log")
    cfg["exporters"]["prometheus"]["endpoint"] = f"127.0.0.1:{_free_port()}"
    for name in cfg["service"].get("extensions", []):
        ext = cfg["extensions"].get(name) or {}
        if "endpoint" in ext:
            ext["endpoint"] = f"127.0.0.1:{_free_port()}"
        cfg["extensions"][name] = ext
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def agent_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("footprint")
    proc = subprocess.run([sys.executable, "-c", _AGENT, str(_shipped_config(tmp))], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")), None)
    assert proc.returncode == 0 and line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    report: dict[str, object] = json.loads(line[len("REPORT "):])
    assert report, "the pipeline never started: " + proc.stderr[-3000:]
    return report


@pytest.mark.kernel
def test_the_shipped_agent_compiles_exactly_one_bcc_module(agent_report: dict[str, object]) -> None:
    assert agent_report["bpf_modules"] == 1


@pytest.mark.kernel
def test_the_shipped_agent_imports_no_package_it_does_not_use(agent_report: dict[str, object]) -> None:
    imported = agent_report["imported"]
    assert isinstance(imported, list)
    found = sorted({m for m in imported for p in UNUSED_BY_SHIPPED_CONFIG if m == p or m.startswith(p + ".")})
    assert found == []
