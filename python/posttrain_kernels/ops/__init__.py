"""Autograd functions and ``torch.library`` custom ops (traceable by ``torch.compile(fullgraph=True)``)."""
