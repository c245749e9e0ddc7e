"""Internals of the k8sattributes processor: nothing here is used outside its folder."""
