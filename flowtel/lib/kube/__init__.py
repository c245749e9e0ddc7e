"""Kubernetes API access shared by components: connect, informers, health and remedies."""
