"""A deterministic, resumable order over a data set's examples."""
from __future__ import annotations

from typing import Dict, List

import torch


class DataCursor:
    """Walks the examples ``0..n-1`` in epochs, each a fresh permutation drawn from
    ``(seed, epoch)``; its state is two integers, so a checkpoint resumes at the exact example.

    ``take(k)`` returns the next ``k`` indices (crossing into the next epoch when one ends).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        if n < 1:
            raise ValueError(f"n: expected a data set of at least one example, got {n}")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> List[int]:
        out: List[int] = []
        while len(out) < k:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            m = min(k - len(out), self.n - self.offset)
            out += self._order[self.offset:self.offset + m]
            self.offset += m
        return out

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"checkpoint: its data cursor walks {state['n']} examples, this data set has {self.n}")
        self.seed, self.epoch, self.offset = state["seed"], state["epoch"], state["offset"]
        self._order = self._permutation(self.epoch)
