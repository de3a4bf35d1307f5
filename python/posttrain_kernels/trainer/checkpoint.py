"""Checkpoints written atomically: the state goes to a temporary file in the same directory, which
is then renamed over the checkpoint (``os.replace`` is atomic on POSIX and Windows), so a crash
mid-write leaves the previous checkpoint intact."""
from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch


def rng_state() -> Dict[str, Any]:
    """The state of every random generator a training step can draw from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(state: Dict[str, Any], path: str) -> None:
    """``torch.save(state, path)`` through a temporary file and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no file {path}")
    # the checkpoint holds optimizer state, RNG states and Python objects of this library's own
    # making (not a model downloaded from elsewhere), so it is loaded whole
    return torch.load(path, map_location="cpu", weights_only=False)
