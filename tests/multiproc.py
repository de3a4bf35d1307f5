"""Launching a test worker on several CPU processes (gloo, env:// rendezvous) and collecting its
verdicts: shared by tests/test_distributed.py and tests/test_vocab_parallel.py (test side,
:func:`launch`) and their workers (worker side, :func:`run_cases`)."""
from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from typing import Callable, Iterable, Tuple


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: str, world: int, out_dir, timeout: float, what: str) -> dict:
    """Run ``python worker <out_dir>/results.json`` on ``world`` ranks; the results it wrote (rank 0),
    with ``_elapsed_s``. Fails the calling test, with each rank's log tail, when none were written."""
    import pytest

    out = out_dir / "results.json"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    procs, logs = [], []
    t0 = time.perf_counter()
    for rank in range(world):
        log = open(out_dir / f"rank{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, worker, str(out)], env=dict(env, RANK=str(rank)),
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
    text = ""
    for rank, log in enumerate(logs):
        log.seek(0)
        text += f"--- rank {rank} (exit {procs[rank].returncode}) ---\n{log.read()[-4000:]}\n"
        log.close()
    if not out.exists():
        pytest.fail(f"the {what} workers (world {world}) wrote no results:\n{text}")
    res = json.loads(out.read_text())
    res["_elapsed_s"] = time.perf_counter() - t0
    return res


def run_cases(path: str, cases: Iterable[Tuple[str, Callable[[int, int], float]]], tol: float,
              barrier: bool = False) -> None:
    """Worker side: each case ``fn(rank, world) -> max error`` on every rank; a case passes when
    every rank's error is within ``tol``; rank 0 writes ``{name: verdict}`` to ``path``. A case that
    raised on any rank stops the run (the ranks' collectives may be out of step)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    results = {}
    for name, fn in cases:
        try:
            err = fn(rank, world)
            res = {"ok": err <= tol, "max_err": err, "error": None}
        except Exception as e:  # noqa: BLE001 - reported to the test
            res = {"ok": False, "max_err": None,
                   "error": f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
        verdicts = [None] * world
        dist.all_gather_object(verdicts, res)
        bad = [v for v in verdicts if not v["ok"]]
        results[name] = bad[0] if bad else max(verdicts, key=lambda v: v["max_err"])
        if any(v["error"] is not None for v in verdicts):
            break
        if barrier:
            dist.barrier()
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
