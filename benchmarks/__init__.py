"""Benchmark suite of posttrain_kernels (installed as ``posttrain_kernels.benchmarks``).

Run it with ``python -m posttrain_kernels bench``; results are committed under
``benchmarks/results/<device>/``.
"""
