"""A real Prometheus server (Debian's ``prometheus`` package) on loopback, scraping given targets."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.otlp_receiver import free_port

BINARY = "/usr/bin/prometheus"


class PrometheusServer:
    def __init__(self, workdir: Path, targets: list[str], scrape_interval: str = "1s") -> None:
        if shutil.which(BINARY) is None:
            raise RuntimeError(f"{BINARY} is missing: run `make setup` (scripts/setup.sh installs Debian's prometheus)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval},
            "scrape_configs": [{"job_name": "flowtel", "static_configs": [{"targets": targets}]}],
        }))
        self._log = (workdir / "prometheus.log").open("wb")
        self._process = subprocess.Popen(
            [BINARY, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self._logfile = workdir / "prometheus.log"

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self._logfile.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready after {timeout}s: {self._logfile.read_text()[-2000:]}")

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus API error: {body}")
        return body["data"]

    def query(self, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query's vector as {sorted labels (without job/instance): value}."""
        data = self.api("query", query=promql)
        out = {}
        for sample in data["result"]:
            labels = tuple(sorted((k, v) for k, v in sample["metric"].items() if k not in ("job", "instance")))
            out[labels] = float(sample["value"][1])
        return out

    def wait_query(self, promql: str, expected: dict[tuple[tuple[str, str], ...], float],
                   timeout: float = 10.0) -> dict[tuple[tuple[str, str], ...], float]:
        """Poll until the query returns ``expected`` (scrapes are periodic); returns the last result."""
        deadline = time.monotonic() + timeout
        result = self.query(promql)
        while result != expected and time.monotonic() < deadline:
            time.sleep(0.2)
            result = self.query(promql)
        return result

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()
