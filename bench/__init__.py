"""Benchmarks: what `mixer-label bench` and `make bench-pipeline` run, outside the product.

- model_bench.py: model-only speed of every backend and precision against the hardware limit
  (`mixer-label bench`); measure.py: its kernels (timing, GEMM peaks, agreement, memory);
- pipeline_bench.py: end to end through the local S3 API server against model-only and a plain
  Ray Data script (raydata_baseline.py);
- gpu_variants.py, gpu_profile.py, gpu_session.sh: the scripts run on a lent GPU machine.

Nothing in models/, pipeline/ or flows/ imports this package (an import-linter contract), so
editing a benchmark never changes what a trained model's code fingerprint covers.
"""
