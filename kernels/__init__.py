"""Triton kernels and their typed launchers, one module per loss family (posttrain_kernels.kernels)."""
