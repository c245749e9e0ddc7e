"""A Kubernetes API server stand-in with real list/watch semantics, for tests and benchmarks."""
from tests.kubeapi.server import RESOURCES, FakeApiServer, RequestRecord, rfc3339

__all__ = ["RESOURCES", "FakeApiServer", "RequestRecord", "rfc3339"]
