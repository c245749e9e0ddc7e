"""The agent as the DaemonSet runs it, on the real kernel: `flowtel run` with exactly the
capabilities the manifest adds (every other one dropped), no_new_privs
(allowPrivilegeEscalation: false) and a read-only root filesystem, probed through the
health_check extension: 503 while it starts, 200 once it runs, refused after SIGTERM.
Each capability the manifest adds is shown to be needed by taking it away."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from testbed import Testbed, send_tcp
from tests.deploy.manifests import REPO, container, find, render

pytestmark = pytest.mark.kernel

# Bit numbers in /proc/<pid>/status Cap* masks (linux/capability.h).
CAP_BITS = {"NET_ADMIN": 12, "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39}


def daemonset_capabilities() -> list[str]:
    agent = container(find(render("base"), "DaemonSet", "flowtel"), "flowtel")
    sc = agent["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    return list(sc["capabilities"]["add"])


def bounding_set() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapBnd in /proc/self/status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConfinedAgent:
    """`flowtel run` in a private mount namespace whose root is read-only (only /tmp is
    writable, as the DaemonSet's emptyDir), with the given capabilities only."""

    def __init__(self, tmp: Path, glob: str, caps: list[str]) -> None:
        self.health = f"127.0.0.1:{free_port()}"
        self.flow_log = tmp / "flows.log"
        config = tmp / "flowtel.yaml"
        config.write_text(f"""
receivers:
  ebpf: {{interfaces: ["{glob}"], collection_interval: 1s}}
  procfs: {{collection_interval: 1s}}
exporters:
  file: {{path: {self.flow_log}}}
  prometheus: {{endpoint: "127.0.0.1:{free_port()}"}}
extensions:
  health_check: {{endpoint: "{self.health}"}}
service:
  extensions: [health_check]
  pipelines:
    logs: {{receivers: [ebpf], exporters: [file]}}
    metrics: {{receivers: [ebpf, procfs], exporters: [prometheus]}}
""")
        confine = ("mount --bind /tmp /tmp && mount -o remount,bind,ro / && "
                   "if touch /.flowtel-rootfs-probe 2>/dev/null; then echo 'root is writable' >&2; exit 99; fi; "
                   'exec "$@"')
        bounding = ",".join(["-all", *(f"+{c.lower()}" for c in caps)])
        self.stderr_path = tmp / "agent.stderr"
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", confine, "sh",
             "setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs",
             sys.executable, "-m", "flowtel.cli", "run", "--config", str(config)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.stderr_path.open("w"),
            env={**os.environ, "NODE_NAME": "test-node", "PYTHONDONTWRITEBYTECODE": "1"},
        )

    def get(self, path: str = "/") -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://{self.health}{path}", timeout=2) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def test_agent_runs_with_the_daemonsets_privileges_and_reports_health(bed: Testbed, tmp_path: Path) -> None:
    caps = daemonset_capabilities()
    available = [c for c in caps if bounding_set() >> CAP_BITS[c] & 1]
    # CAP_SYS_RESOURCE only matters on kernels < 5.11; some sandboxes cannot grant it.
    assert set(caps) - set(available) <= {"SYS_RESOURCE"}, f"this machine lacks {set(caps) - set(available)}"
    client, server = bed.add_pod("client"), bed.add_pod("server")
    agent = ConfinedAgent(tmp_path, bed.interface_glob, available)
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert agent.proc.poll() is None, f"agent exited {agent.proc.returncode}:\n{agent.stderr()[-3000:]}"
            try:
                code, body = agent.get("/")
            except OSError:
                time.sleep(0.05)
                continue
            seen.append(code)
            if code == 200:
                break
            assert code == 503 and body["status"] == "Server not available", body
            time.sleep(0.05)
        assert seen and seen[-1] == 200, f"not ready within 60 s: {seen[-5:]}\n{agent.stderr()[-3000:]}"
        assert set(seen[:-1]) <= {503}
        code, body = agent.get("/")
        assert body["status"] == "Server available"
        assert {k: v["status"] for k, v in body["components"]["receivers"].items()} == {
            "ebpf": "StatusOK", "procfs": "StatusOK"}
        assert agent.get("/livez")[0] == 200

        # It does its work under these privileges: flows of real traffic reach the file.
        bed.start_tcp_sink(server, 8080)
        send_tcp(client, server.ipv4, 8080, 100_000)
        def tcp_flow_logged() -> bool:
            # Other records (node-wide drops, lost events) may land first: wait for this one.
            if not agent.flow_log.exists():
                return False
            flows = [json.loads(line) for line in agent.flow_log.read_text().splitlines() if line.strip()]
            return any(f.get("flow", {}).get("l4", {}).get("TCP", {}).get("destination_port") == 8080 for f in flows)

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not tcp_flow_logged():
            time.sleep(0.2)
        assert tcp_flow_logged(), agent.stderr()[-3000:]

        assert agent.stop() == 0, agent.stderr()[-3000:]
        with pytest.raises(urllib.error.URLError) as info:
            agent.get("/")
        assert isinstance(info.value.reason, ConnectionRefusedError)
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()


@pytest.mark.parametrize("missing", ["BPF", "PERFMON", "NET_ADMIN"])
def test_each_added_capability_is_needed(bed: Testbed, tmp_path: Path, missing: str) -> None:
    caps = [c for c in daemonset_capabilities() if c != missing and bounding_set() >> CAP_BITS[c] & 1]
    agent = ConfinedAgent(tmp_path, bed.interface_glob, caps)
    try:
        code = agent.proc.wait(60)
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
    assert code == 1, f"started without CAP_{missing}:\n{agent.stderr()[-2000:]}"
    assert "flowtel: cannot start: ebpf:" in agent.stderr()
