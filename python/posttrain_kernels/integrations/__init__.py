"""Integrations with training frameworks (each an optional dependency, imported on demand):
``posttrain_kernels.integrations.trl``."""
