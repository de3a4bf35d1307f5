"""examples/train_distributed.py runs as its docstring says: torchrun, 2 CPU processes, DDP and FSDP2."""
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "train_distributed.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wrap", [[], ["--fsdp2"]], ids=["ddp", "fsdp2"])
def test_train_distributed_example(wrap):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), EXAMPLE, "--steps", "3", *wrap]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "final loss" in out.stdout and "on 2 ranks" in out.stdout, out.stdout[-2000:]
