"""Tests of deploy/ (image, Kustomize manifests, dashboards) and of config/collector-*.yaml."""
