"""Config of the ``procfs`` receiver."""
from __future__ import annotations

from typing import Literal

import os
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import CollectionInterval, InterfaceGlobs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StatisticMetricSettings(_Strict):
    """A family with a ``statistic_name`` label: on/off and which statistics it reports."""

    enabled: bool = True
    # Regular expressions matched against the whole statistic name (re.fullmatch).
    include_statistics: list[str] = Field(default_factory=list)
    exclude_statistics: list[str] = Field(default_factory=list)

    @field_validator("include_statistics", "exclude_statistics")
    @classmethod
    def _regexes_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return value


class MetricSettings(_Strict):
    enabled: bool = True


class TcpStateSettings(MetricSettings):
    # "proc" reads /proc/net/tcp{,6} (about 9 ms for 5,000 sockets); "netlink" asks
    # NETLINK_SOCK_DIAG through pyroute2's DiagSocket, which also sees sockets that are only
    # bound (as CLOSE) but costs about 270 ms for 5,000 sockets (pyroute2 decodes every
    # record through asyncio). Measured on a 2-vCPU VM; see README.md.
    source: Literal["proc", "netlink"] = "proc"


class ProcfsMetrics(_Strict):
    """One entry per metric family, named as the metric without ``networkobservability_``."""

    tcp_connection_stats: StatisticMetricSettings = Field(default_factory=StatisticMetricSettings)
    ip_connection_stats: StatisticMetricSettings = Field(default_factory=StatisticMetricSettings)
    udp_connection_stats: StatisticMetricSettings = Field(default_factory=StatisticMetricSettings)
    interface_stats: StatisticMetricSettings = Field(default_factory=StatisticMetricSettings)
    tcp_state: TcpStateSettings = Field(default_factory=TcpStateSettings)
    # Retina's single address="AllIPs" series: TCP sockets with a remote address (all of them).
    tcp_connection_remote: MetricSettings = Field(default_factory=MetricSettings)
    udp_active_sockets: MetricSettings = Field(default_factory=MetricSettings)


class ProcfsReceiverConfig(ComponentConfig):
    collection_interval: CollectionInterval = 10.0
    metrics: ProcfsMetrics = Field(default_factory=ProcfsMetrics)
    # interface_stats only: globs of interface names to report, and globs to leave out.
    interfaces: InterfaceGlobs = Field(default_factory=lambda: ["*"])
    exclude_interfaces: InterfaceGlobs = Field(default_factory=lambda: ["lo"])
    # Further network namespaces: a name under /run/netns, or a path such as /proc/<pid>/ns/net.
    netns: list[str] = Field(default_factory=list)
    # Directory whose net/ is read as the node's own namespace ("/host/proc/1" reads the host's
    # through a hostPath mount of /proc when the agent does not run with hostNetwork).
    proc_path: str = "/proc"



    @field_validator("netns")
    @classmethod
    def _netns_names_or_paths(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not entry or (not os.path.isabs(entry) and "/" in entry) or entry in (".", ".."):
                raise ValueError(
                    f"netns entries are names under /run/netns or absolute paths such as "
                    f"/proc/<pid>/ns/net; got {entry!r}"
                )
        if len(set(value)) != len(value):
            raise ValueError("netns lists the same namespace twice")
        return value

    @field_validator("proc_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not os.path.isabs(value):
            raise ValueError(f"proc_path must be an absolute path; got {value!r}")
        return value

    def netns_path(self, entry: str) -> str:
        """The namespace file of a ``netns`` entry."""
        return entry if os.path.isabs(entry) else os.path.join("/run/netns", entry)
