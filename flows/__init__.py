"""Prefect: the nightly labeling flow, its deployment and its artifacts."""
