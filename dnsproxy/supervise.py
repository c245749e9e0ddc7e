"""Every long-running thread of the proxy, watched: a loop that dies is a failed liveness probe.

The UDP loop, the TCP DNS servers, the flow-log writer, the datapath's event poller and the
health and metrics servers each run on a thread. Before this, a thread killed by one bad
packet left the process up, ``/healthz`` green and every pod's DNS timing out. Now each is
started through :class:`Supervisor`: an exception that escapes it (or a return while the
proxy is not stopping) is logged with its traceback, recorded, and reported to
``on_death``; ``/healthz`` fails at once, and the proxy's main loop exits the process with
status 1 so the kubelet restarts it (enforcement is pinned in the kernel and continues).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger("flowtel.dnsproxy")


class Supervisor:
    def __init__(self, on_death: Callable[[str], None] | None = None) -> None:
        self.on_death = on_death
        self.stopping = False
        self._threads: dict[str, threading.Thread] = {}
        self._dead: dict[str, str] = {}
        self._lock = threading.Lock()

    def start(self, name: str, target: Callable[..., Any], *args: Any, **kwargs: Any) -> threading.Thread:
        def run() -> None:
            try:
                target(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - whatever ended it, the loop is gone
                log.exception("thread %s died; the proxy is not live any more and exits", name)
                self._died(name, f"{type(exc).__name__}: {exc}")
                return
            if not self.stopping:
                log.error("thread %s ended while the proxy was serving; the proxy is not live any more and exits", name)
                self._died(name, "returned")

        t = threading.Thread(target=run, name=name, daemon=True)
        with self._lock:
            self._threads[name] = t
        t.start()
        return t

    def _died(self, name: str, why: str) -> None:
        with self._lock:
            self._dead[name] = why
        if self.on_death is not None:
            self.on_death(name)

    def dead(self) -> dict[str, str]:
        """Threads that died (name -> why), and started ones that are no longer alive."""
        with self._lock:
            out = dict(self._dead)
            if not self.stopping:
                for name, t in self._threads.items():
                    if not t.is_alive() and name not in out:
                        out[name] = "not running"
            return out

    def threads(self) -> dict[str, threading.Thread]:
        with self._lock:
            return dict(self._threads)

    def check(self) -> tuple[bool, dict[str, object]]:
        """For /healthz: unhealthy while any supervised thread is dead, naming each."""
        dead = self.dead()
        return not dead, ({"dead_threads": dead} if dead else {})
