"""The Kubernetes API side of k8sattributes: client set-up, informers, stripped objects."""
