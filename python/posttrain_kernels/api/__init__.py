"""Public functional API and ``nn.Module`` wrappers, one module per loss family."""
