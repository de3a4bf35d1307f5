"""One rank of the distributed tests (tests/test_distributed.py launches WORLD_SIZE of them, gloo on
CPU, env:// rendezvous). Every scenario also computes the single-process result on each rank (the
tiny model is cheap) and compares; rank 0 writes ``{scenario: {"ok", "max_err", "error"}}`` as
JSON to the path in argv[1].

Not collected by pytest (no ``test_`` prefix). Run by hand::

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 WORLD_SIZE=2 RANK=0 python tests/distributed_worker.py out.json &
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 WORLD_SIZE=2 RANK=1 python tests/distributed_worker.py out.json
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import posttrain_kernels as ptk
from posttrain_kernels import models
from posttrain_kernels.dispatch import live_backends
from posttrain_kernels.models.head import is_dtensor
from posttrain_kernels.pipeline.task import DEFAULT_TASK
from posttrain_kernels.pipeline.tiny_models import build_policy
from posttrain_kernels.pipeline.tokenizer import default_tokenizer
from posttrain_kernels.trainer import SFT, TrainConfig, Trainer
from posttrain_kernels.trainer.batches import IGNORE, completion_batch

from multiproc import run_cases

TOL = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64)
BACKENDS = ["torch"] + (["cpu"] if live_backends()["cpu"] else [])

TOK = default_tokenizer()
RECORDS = DEFAULT_TASK.sft_examples(32, seed=0)


def tiny_model(tied=False):
    return build_policy(TOK, seed=0, tie_word_embeddings=tied, **TINY)


def global_batch(n=8):
    recs = RECORDS[:n]
    return completion_batch(TOK, [r["prompt"] for r in recs], [r["completion"] for r in recs])


def shard(batch, rank, world):
    """This rank's rows (same padded length T as the global batch: right padding keeps each row's
    tokens, positions and causal attention unchanged)."""
    return {k: v[rank::world] for k, v in batch.items()}


def n_tokens(batch):
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# Losses of (model, batch, n): the batch's share of a loss normalized by the global count n.
def ce_sum(model, b, n, backend):
    return models.cross_entropy(model, b["input_ids"], b["labels"], b["attention_mask"],
                                reduction="sum", backend=backend) / n


def ce_num_items(model, b, n, backend):  # HF's way: num_items_in_batch = the global token count
    return models.cross_entropy(model, b["input_ids"], b["labels"], b["attention_mask"],
                                num_items_in_batch=n, backend=backend)


def generic(model, b, n, backend):  # causal_lm_loss with a hand-written loss_fn
    target = models.next_token_labels(b["labels"])
    vocab = models.output_embeddings(model).out_features

    def fn(hidden, head):
        assert not is_dtensor(head.weight) and tuple(head.weight.shape) == (vocab, hidden.shape[-1])
        return ptk.linear_cross_entropy(hidden, head.weight, target, reduction="sum", backend=backend,
                                        **head.kwargs)

    return models.causal_lm_loss(model, fn, input_ids=b["input_ids"], attention_mask=b["attention_mask"]) / n


def logprobs(model, b, n, backend):  # token log-probs and entropy (the policy-gradient inputs)
    lp, ent = models.token_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"],
                                    return_entropy=True, backend=backend)
    return (0.1 * ent.sum() - lp.sum()) / n


LOSSES = {"sum": ce_sum, "num_items": ce_num_items, "causal_lm_loss": generic, "logprobs": logprobs}


def reference_grads(backend, batch, loss="sum", tied=False):
    """Single process, full batch: the loss and the gradients by name."""
    model = tiny_model(tied)
    value = LOSSES[loss](model, batch, n_tokens(batch), backend)
    value.backward()
    return value.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def compare(grads, ref, loss=None, ref_loss=None):
    errs = [0.0]
    for k, g in ref.items():
        if k not in grads or grads[k] is None:
            raise AssertionError(f"{k}: no gradient")
        errs.append((grads[k] - g).abs().max().item() / max(1.0, g.abs().max().item()))
    if loss is not None:
        errs.append(abs(float(loss) - float(ref_loss)))
    return max(errs)


def full(t):
    return t.full_tensor() if is_dtensor(t) else t


# -- scenarios -------------------------------------------------------------------------------------
def ddp(rank, world, backend, loss="sum"):
    batch = global_batch()
    ref_loss, ref = reference_grads(backend, batch, loss)
    model = DDP(tiny_model())
    value = LOSSES[loss](model, shard(batch, rank, world), n_tokens(batch), backend)
    (value * world).backward()  # DDP averages the gradients over the ranks; the losses add up
    total = value.detach().clone()
    dist.all_reduce(total)
    return compare({k: p.grad for k, p in model.module.named_parameters()}, ref, total, ref_loss)


def ddp_local_mean(rank, world, backend):
    """Negative control (the common mistake): each rank's own token mean, averaged by DDP, is not
    the global token mean when the ranks hold different numbers of loss tokens."""
    batch = global_batch()
    _, ref = reference_grads(backend, batch)
    model = DDP(tiny_model())
    local = shard(batch, rank, world)
    models.cross_entropy(model, local["input_ids"], local["labels"], local["attention_mask"],
                         backend=backend).backward()
    counts = [None] * world
    dist.all_gather_object(counts, n_tokens(local))
    assert len(set(counts)) > 1, f"the control needs unequal token counts per rank, got {counts}"
    return compare({k: p.grad for k, p in model.module.named_parameters()}, ref)


def fsdp2_model(tied=False, head_group=False):
    from torch.distributed.fsdp import fully_shard

    model = tiny_model(tied)
    for layer in model.model.layers:
        fully_shard(layer)
    if head_group:  # the head is its own FSDP group (resharded after its forward, re-gathered in backward)
        fully_shard(model.lm_head)
    fully_shard(model)
    w = model.lm_head.weight
    assert is_dtensor(w) and w.to_local().shape[0] < w.shape[0], "head weight not sharded"
    return model


def fsdp2(rank, world, backend, loss="sum", head_group=False, tied=False):
    batch = global_batch()
    ref_loss, ref = reference_grads(backend, batch, loss, tied)
    model = fsdp2_model(tied, head_group)
    value = LOSSES[loss](model, shard(batch, rank, world), n_tokens(batch), backend)
    (value * world).backward()  # FSDP2 reduce-scatters the average over the ranks
    total = value.detach().clone()
    dist.all_reduce(total)
    grads = {k: full(p.grad) for k, p in model.named_parameters()}
    return compare(grads, ref, total, ref_loss)


def trainer_sft(rank, world, backend, wrap="ddp"):
    cfg = dict(steps=2, batch_size=4, grad_accum=2, lr=1e-2, schedule="constant", max_grad_norm=1.0,
               backend=backend, progress=False)
    ref_model = tiny_model()
    ref_hist = Trainer(ref_model, SFT(RECORDS, TOK), TrainConfig(**cfg), distributed=False).train()
    model = DDP(tiny_model()) if wrap == "ddp" else fsdp2_model()
    hist = Trainer(model, SFT(RECORDS, TOK), TrainConfig(**cfg)).train()
    inner = model.module if wrap == "ddp" else model
    err = compare({k: full(p.detach()) for k, p in inner.named_parameters()},
                  {k: p.detach() for k, p in ref_model.named_parameters()})
    for r, h in zip(ref_hist, hist):
        # the trainer logs the whole batch's loss on every rank
        err = max(err, abs(h["loss"] - r["loss"]), abs(h["grad_norm"] - r["grad_norm"]))
    return err


def trainer_preference(rank, world, backend):
    """DPO (a frozen copy of the starting model as the reference) under DDP: the pairs split over
    the ranks, the window's pair count summed over them."""
    from posttrain_kernels.pipeline import task
    from posttrain_kernels.trainer import Preference

    pairs = task.preference_pairs(8, seed=0)
    # a small step: AdamW's first update is ~lr * sign(g), which turns the fp32 rounding of
    # near-zero gradient entries (summed in another order over the ranks) into parameter differences
    cfg = dict(steps=2, batch_size=4, grad_accum=2, lr=1e-4, schedule="constant", max_grad_norm=1.0,
               backend=backend, progress=False)
    ref_model = tiny_model()
    ref_hist = Trainer(ref_model, Preference(pairs, TOK, beta=0.5), TrainConfig(**cfg), distributed=False).train()
    model = DDP(tiny_model())
    hist = Trainer(model, Preference(pairs, TOK, beta=0.5), TrainConfig(**cfg)).train()
    err = compare({k: p.detach() for k, p in model.module.named_parameters()},
                  {k: p.detach() for k, p in ref_model.named_parameters()})
    for r, h in zip(ref_hist, hist):
        err = max(err, abs(h["loss"] - r["loss"]), abs(h["rewards/margins"] - r["rewards/margins"]),
                  abs(h["grad_norm"] - r["grad_norm"]))
    return err


def trainer_grpo(rank, world, backend):
    """GRPO (PolicyGradient: group-normalized advantages, 2 updates per generation) under DDP for 2
    steps. Each rank samples completions for its own share of the prompts, so no single-process
    run equals it; what must hold is that the ranks stay one model (identical parameters after every
    update) and log the same whole-batch metrics. The error is the largest difference between ranks."""
    from posttrain_kernels.trainer import PolicyGradient

    def length_reward(prompts, completions, **_):  # varies within a group: non-zero advantages
        return [len(c) / 4.0 for c in completions]

    torch.manual_seed(rank)  # the ranks' samples differ, as under torchrun
    cfg = dict(steps=2, batch_size=4, lr=1e-3, schedule="constant", max_grad_norm=1.0, backend=backend,
               progress=False)
    model = DDP(tiny_model())
    start = [p.detach().clone() for p in model.module.parameters()]
    objective = PolicyGradient(DEFAULT_TASK.rl_prompts(8, seed=0), TOK, [length_reward], num_generations=2,
                               max_new_tokens=4, num_iterations=2, loss_type="grpo")
    hist = Trainer(model, objective, TrainConfig(**cfg)).train()
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(model.module.parameters(), start))
    if not moved > 0:
        raise AssertionError("GRPO under DDP did not update the model")
    err = 0.0
    for p in model.module.parameters():
        copies = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(copies, p.detach().contiguous())
        err = max(err, max(float((c - copies[0]).abs().max()) for c in copies))
    logged = [None] * world
    dist.all_gather_object(logged, [(h["loss"], h["reward"]) for h in hist])
    for other in logged[1:]:
        err = max(err, max(abs(a - b) for x, y in zip(logged[0], other) for a, b in zip(x, y)))
    return err


def scenarios():
    out = []
    for b in BACKENDS:
        out += [(f"ddp-sum-{b}", ddp, dict(backend=b)),
                (f"ddp-num_items-{b}", ddp, dict(backend=b, loss="num_items")),
                (f"ddp-logprobs-{b}", ddp, dict(backend=b, loss="logprobs")),
                (f"ddp-local_mean-{b}", ddp_local_mean, dict(backend=b)),
                (f"fsdp2-root-{b}", fsdp2, dict(backend=b)),
                (f"fsdp2-head_group-{b}", fsdp2, dict(backend=b, head_group=True)),
                (f"fsdp2-causal_lm_loss-{b}", fsdp2, dict(backend=b, loss="causal_lm_loss")),
                (f"fsdp2-head_group-causal_lm_loss-{b}", fsdp2,
                 dict(backend=b, loss="causal_lm_loss", head_group=True)),
                (f"fsdp2-logprobs-{b}", fsdp2, dict(backend=b, loss="logprobs", head_group=True)),
                (f"fsdp2-tied-{b}", fsdp2, dict(backend=b, tied=True)),
                (f"trainer-sft-ddp-{b}", trainer_sft, dict(backend=b)),
                (f"trainer-sft-fsdp2-{b}", trainer_sft, dict(backend=b, wrap="fsdp2")),
                (f"trainer-preference-ddp-{b}", trainer_preference, dict(backend=b)),
                (f"trainer-grpo-ddp-{b}", trainer_grpo, dict(backend=b))]
    return out


def main(path):
    run_cases(path, [(name, (lambda f, kw: lambda r, w: f(r, w, **kw))(fn, kwargs)) for name, fn, kwargs in scenarios()],
              TOL, barrier=True)


if __name__ == "__main__":
    main(sys.argv[1])
