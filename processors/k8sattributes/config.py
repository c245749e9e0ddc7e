"""Config of the ``k8sattributes`` processor, with its validation beside it."""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from flowtel.component import ComponentConfig
from flowtel.configtypes import Duration
from processors.k8sattributes.metadata import DEFAULT_METADATA, METADATA_KEYS

_GROUP_REF = re.compile(r"\$(?:(\d+)|\{(\w+)\})")


class FieldExtractRule(ComponentConfig):
    """One label or annotation to copy into attributes (the Collector's ``extract.labels[]``)."""

    key: str | None = Field(default=None, description="exact key to copy")
    key_regex: str | None = Field(default=None, description="regex the whole key must match")
    tag_name: str | None = Field(
        default=None,
        description="attribute name; default k8s.pod.labels.<key> (annotations, namespace: alike); "
        "with key_regex it may use the regex's groups as $1 or ${name}",
    )
    from_: Literal["pod", "namespace"] = Field(default="pod", alias="from", description="whose labels: pod or namespace")

    @model_validator(mode="after")
    def _one_key(self) -> "FieldExtractRule":
        if (self.key is None) == (self.key_regex is None):
            raise ValueError("set exactly one of key and key_regex")
        if self.key is not None and not self.key:
            raise ValueError("key must not be empty")
        if self.key_regex is not None:
            try:
                pattern = re.compile(self.key_regex)
            except re.error as exc:
                raise ValueError(f"key_regex {self.key_regex!r} is not a valid regular expression: {exc}") from None
            if self.tag_name:
                for m in _GROUP_REF.finditer(self.tag_name):
                    if m.group(1) is not None and int(m.group(1)) > pattern.groups:
                        raise ValueError(f"tag_name refers to ${m.group(1)}, but key_regex has {pattern.groups} group(s)")
                    if m.group(2) is not None and m.group(2) not in pattern.groupindex:
                        raise ValueError(f"tag_name refers to ${{{m.group(2)}}}, but key_regex has no group of that name")
        elif self.tag_name and _GROUP_REF.search(self.tag_name):
            raise ValueError("tag_name may refer to regex groups ($1) only together with key_regex")
        if self.tag_name is not None and not self.tag_name:
            raise ValueError("tag_name must not be empty")
        return self


class Extract(ComponentConfig):
    metadata: tuple[str, ...] = Field(default=DEFAULT_METADATA, description="which k8s.* attributes to add")
    labels: tuple[FieldExtractRule, ...] = ()
    annotations: tuple[FieldExtractRule, ...] = ()

    @field_validator("metadata")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [k for k in value if k not in METADATA_KEYS]
        if unknown:
            raise ValueError(f"unknown metadata {', '.join(unknown)}; supported: {', '.join(METADATA_KEYS)}")
        return value


class OwnerCache(ComponentConfig):
    size: int = Field(default=4096, ge=1, description="owners (ReplicaSets, Jobs, …) resolved and kept")
    ttl: Duration = Field(default=300.0, gt=0, description="how long a resolved owner is trusted")


class Backoff(ComponentConfig):
    initial_interval: Duration = Field(default=1.0, gt=0)
    max_interval: Duration = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Backoff":
        if self.max_interval < self.initial_interval:
            raise ValueError("max_interval must not be shorter than initial_interval")
        return self


class StaticSource(ComponentConfig):
    path: str = Field(description="YAML file mapping IPs and CIDRs to pods, services and nodes")


class K8sAttributesConfig(ComponentConfig):
    source: Literal["kubernetes", "static"] = Field(
        default="kubernetes", description="where metadata comes from: the Kubernetes API, or a static file")
    # None only with source static; filled with serviceAccount for kubernetes (see _defaults).
    auth_type: Literal["serviceAccount", "kubeConfig"] | None = None
    kubeconfig: str | None = Field(default=None, description="kubeconfig path for auth_type kubeConfig (default $KUBECONFIG, ~/.kube/config)")
    context: str | None = Field(default=None, description="kubeconfig context (default: its current-context)")
    mode: Literal["cluster", "node"] = Field(
        default="cluster", description="cluster: every pod is watched; node: only this node's pods (field selector)")
    cluster_name: str = Field(default="default", description="Hubble's cluster_name and io.cilium.k8s.policy.cluster label")
    deleted_pod_grace: Duration = Field(default=120.0, ge=0, description="how long a deleted pod's address still resolves to it")
    watch_replicasets: bool = True
    watch_jobs: bool = True
    extract: Extract = Extract()
    owner_cache: OwnerCache = OwnerCache()
    initial_sync_timeout: Duration = Field(default=5.0, ge=0, description="how long start waits for the first lists")
    request_timeout: Duration = Field(default=30.0, gt=0)
    watch_timeout: Duration = Field(default=300.0, ge=1, description="server-side length of one watch (timeoutSeconds)")
    page_size: int = Field(default=500, ge=1, le=10_000, description="objects per list page")
    backoff: Backoff = Backoff()
    static: StaticSource | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        # auth_type defaults to serviceAccount only where it means something, so that
        # `flowtel doctor` (which checks Kubernetes access for any auth_type) leaves
        # static configs alone.
        if isinstance(data, dict) and data.get("source", "kubernetes") == "kubernetes" and data.get("auth_type") is None:
            data = {**data, "auth_type": "serviceAccount"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "K8sAttributesConfig":
        if self.source == "static":
            if self.static is None:
                raise ValueError("source static needs static.path, the file of IPs/CIDRs and names")
            set_for_api = [k for k in ("auth_type", "kubeconfig", "context") if getattr(self, k) is not None]
            if set_for_api:
                raise ValueError(f"{', '.join(set_for_api)} apply to source kubernetes only")
        else:
            if self.static is not None:
                raise ValueError("static applies to source static only")
            if (self.kubeconfig or self.context) and self.auth_type != "kubeConfig":
                raise ValueError("kubeconfig and context apply to auth_type kubeConfig only")
        return self
