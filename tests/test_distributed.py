"""The fused losses and the trainer layer under torch.distributed: 2 CPU processes, gloo backend.

tests/distributed_worker.py runs every scenario on each of 2 ranks (launched here as
subprocesses with an env:// rendezvous on a free port) and compares with the single-process,
full-batch result:

* DDP: each rank's half of the batch, ``models.cross_entropy`` summed and divided by the *global*
  token count (or ``num_items_in_batch=`` that count; or ``models.token_logprobs`` with entropy),
  times the world size (DDP averages): the gradients and the summed loss equal the single
  process's. Negative control: each rank's own
  token mean (what a naive loop does) differs when the ranks hold different token counts.
* FSDP2 (``fully_shard`` on the decoder layers and the root, the head weight a sharded DTensor
  outside the forward; also with the head as its own FSDP group, resharded after its forward):
  ``models.cross_entropy`` and ``models.causal_lm_loss`` read the gathered ``(V, H)`` weight inside
  the forward, and the loss's backward re-gathers it; ``full_tensor()`` of each gradient equals
  the single-process gradient.
* Trainer + SFT under DDP and under FSDP2 for 2 steps (grad_accum 2, clipping, AdamW): the trainer
  splits each global batch over the ranks, sums the window's token count over them and scales
  each rank's loss by the world size, so the parameters, the logged losses and the gradient norms
  equal the single-process run (``distributed=False``) on the same global batches; likewise DPO
  (Preference, pairs split over the ranks) under DDP.
* Trainer + PolicyGradient (GRPO) under DDP: the ranks sample their own completions, so the check
  is that they stay one model (identical parameters) and log identical whole-batch metrics.
"""
import os

import pytest

from multiproc import launch

pytest.importorskip("transformers")

WORLD = 2
TOL = 1e-5
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")


def _distributed_ok() -> bool:
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_gloo_available()
    except Exception:  # noqa: BLE001
        return False


pytestmark = pytest.mark.skipif(not _distributed_ok(), reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch(WORKER, WORLD, tmp_path_factory.mktemp("dist"), timeout=240, what="distributed")


def _scenario(results, name):
    if name not in results:
        failed = {k: v for k, v in results.items() if isinstance(v, dict) and v["error"]}
        pytest.fail(f"{name}: not run (an earlier scenario failed): {failed}")
    return results[name]


def _backends():
    from posttrain_kernels.dispatch import live_backends

    return ["torch"] + (["cpu"] if live_backends()["cpu"] else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("scenario", [
    "ddp-sum", "ddp-num_items", "ddp-logprobs",
    "fsdp2-root", "fsdp2-head_group", "fsdp2-causal_lm_loss", "fsdp2-head_group-causal_lm_loss",
    "fsdp2-logprobs", "fsdp2-tied",
    "trainer-sft-ddp", "trainer-sft-fsdp2", "trainer-preference-ddp",
])
def test_matches_single_process(results, scenario, backend):
    r = _scenario(results, f"{scenario}-{backend}")
    assert r["error"] is None, r["error"]
    assert r["max_err"] <= TOL, f"{scenario}-{backend}: max error {r['max_err']:.3g} > {TOL}"


@pytest.mark.parametrize("backend", _backends())
def test_grpo_ranks_stay_one_model(results, backend):
    """GRPO under DDP: each rank samples its own completions (no single-process equivalent), the
    parameters stay identical across ranks and every rank logs the same whole-batch metrics."""
    r = _scenario(results, f"trainer-grpo-ddp-{backend}")
    assert r["error"] is None, r["error"]
    assert r["max_err"] <= TOL, f"ranks differ by {r['max_err']:.3g}"


@pytest.mark.parametrize("backend", _backends())
def test_local_token_mean_differs(results, backend):
    """The comparison has power: per-rank token means averaged by DDP are not the global mean."""
    r = _scenario(results, f"ddp-local_mean-{backend}")
    assert r["error"] is None, r["error"]
    assert r["max_err"] > 1e-3
