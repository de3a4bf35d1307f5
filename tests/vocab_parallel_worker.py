"""One rank of the vocab-parallel tests (tests/test_vocab_parallel.py launches WORLD_SIZE of them,
gloo on CPU, env:// rendezvous). Every case builds the full (unsplit) inputs from a fixed seed on
every rank, gives each rank its shard, and compares the rank's outputs and its shard's gradients
with the single-process functions of the package run on the full inputs locally. Rank 0 writes
``{case: {"ok", "max_err", "error"}}`` as JSON to the path in argv[1]; ``max_err`` is the largest
``|got - want| / (atol + rtol |want|)`` over the case's checks (ok: <= 1).

Not collected by pytest (no ``test_`` prefix). Run by hand::

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 WORLD_SIZE=2 RANK=0 python tests/vocab_parallel_worker.py out.json &
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 WORLD_SIZE=2 RANK=1 python tests/vocab_parallel_worker.py out.json
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

import posttrain_kernels as ptk
from posttrain_kernels.parallel import (vocab_parallel_cross_entropy, vocab_parallel_distill_loss,
                                        vocab_parallel_linear_cross_entropy,
                                        vocab_parallel_linear_token_logprobs,
                                        vocab_parallel_token_logprobs)

from multiproc import run_cases

N, H, IGNORE = 13, 16, -100
# (atol, rtol) of the outputs (fp32 math on the same inputs: only the summation order differs) and
# of the gradients (bf16 gradients may differ by one rounding of the fp32 value)
TOLS = {torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5)), torch.bfloat16: ((5e-5, 5e-5), (1e-2, 1e-2))}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shard_layout(vocab: int, world: int, reverse: bool = False) -> List[Tuple[int, int]]:
    """``[(vocab_start, width)]`` per rank: widths as even as possible, the first ranks wider
    (V=11 over 3: 4, 4, 3); ``reverse``: rank 0 holds the last shard (any order must work)."""
    widths = [vocab // world + (1 if r < vocab % world else 0) for r in range(world)]
    order = list(range(world))[::-1] if reverse else list(range(world))
    starts, s = {}, 0
    for r in order:
        starts[r] = s
        s += widths[r]
    return [(starts[r], widths[r]) for r in range(world)]


def err(got: Optional[torch.Tensor], want: Optional[torch.Tensor], tol: Tuple[float, float],
        scale_atol: bool = False) -> float:
    """max |got - want| / (atol + rtol |want|); ``scale_atol``: atol relative to max |want|."""
    if got is None or want is None:
        if got is None and want is None:
            return 0.0
        raise AssertionError(f"one of got/want is None: {got is None}, {want is None}")
    got, want = got.detach().double(), want.detach().double()
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError("non-finite values in the result")
    if got.numel() == 0:
        return 0.0
    atol, rtol = tol
    if scale_atol:
        atol *= max(1.0, float(want.abs().max()))
    return float(((got - want).abs() / (atol + rtol * want.abs())).max())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_labels(vocab: int, seed: int, shape=(N,)) -> torch.Tensor:
    y = torch.randint(0, vocab, shape, generator=gen(seed))
    y.view(-1)[[1, 6, 7]] = IGNORE  # some ignored rows
    return y


def full_logits(vocab: int, dtype, seed: int, shape=(N,)) -> torch.Tensor:
    return (3 * torch.randn(*shape, vocab, generator=gen(seed))).to(dtype)


def my_shard(full: torch.Tensor, layout, rank: int) -> torch.Tensor:
    start, width = layout[rank]
    return full[..., start:start + width].detach().clone().requires_grad_(full.requires_grad)


def grad_of(out, upstream, *inputs):
    """Gradients of ``sum(out * upstream)`` (several outputs: zip) with respect to inputs."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    ups = upstream if isinstance(upstream, (tuple, list)) else (upstream,)
    total = sum((o * u).sum() for o, u in zip(outs, ups) if o is not None)
    return torch.autograd.grad(total, inputs)


# -- cases -----------------------------------------------------------------------------------------
def case_token_logprobs(rank, world, vocab, dtype, reverse=False, shape=(N,), group=None, grank=None, **extra):
    out_tol, grad_tol = TOLS[dtype]
    layout = shard_layout(vocab, world, reverse)
    r = rank if grank is None else grank
    full = full_logits(vocab, dtype, 1, shape).requires_grad_()
    labels = make_labels(vocab, 2, shape)
    g = gen(3)
    ups = (torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    errs = []
    for entropy in (True, False):
        want = ptk.token_logprobs(full, labels, temperature=0.7, return_entropy=entropy)
        (want_grad,) = grad_of(want, ups, full)
        x = my_shard(full, layout, r)
        got = vocab_parallel_token_logprobs(x, labels, vocab_start=layout[r][0], group=group,
                                            temperature=0.7, return_entropy=entropy, **extra)
        (got_grad,) = grad_of(got, ups, x)
        start, width = layout[r]
        errs += [err(got[0], want[0], out_tol), err(got[1], want[1], out_tol),
                 err(got_grad, want_grad[..., start:start + width], grad_tol, scale_atol=True)]
    return max(errs)


def case_cross_entropy(rank, world, vocab, dtype, reverse=False):
    out_tol, grad_tol = TOLS[dtype]
    layout = shard_layout(vocab, world, reverse)
    start, width = layout[rank]
    full = full_logits(vocab, dtype, 4).requires_grad_()
    labels = make_labels(vocab, 5)
    errs = []
    for eps in (0.0, 0.1):
        for reduction in ("mean", "sum", "none"):
            want = ptk.cross_entropy(full, labels, label_smoothing=eps, reduction=reduction)
            up = torch.randn(want.shape, generator=gen(6))
            (want_grad,) = grad_of(want, up, full)
            x = my_shard(full, layout, rank)
            got = vocab_parallel_cross_entropy(x, labels, vocab_start=start, label_smoothing=eps,
                                               reduction=reduction)
            (got_grad,) = grad_of(got, up, x)
            errs += [err(got, want, out_tol),
                     err(got_grad, want_grad[:, start:start + width], grad_tol, scale_atol=True)]
    return max(errs)


def case_distill(rank, world, vocab, dtype, reverse=False):
    out_tol, grad_tol = TOLS[dtype]
    layout = shard_layout(vocab, world, reverse)
    start, width = layout[rank]
    student = full_logits(vocab, dtype, 7).requires_grad_()
    # a teacher near the student (O(1) nats apart, as in distillation): two fp32 computations of a
    # divergence of ~10 nats differ by more than 1e-5 in its gradient (cancellation), see
    # test_distill_far_apart_within_budget_of_fp64
    teacher = (student.detach().float() + torch.randn(student.shape, generator=gen(8))).to(dtype)
    labels = make_labels(vocab, 9)
    errs = []
    for divergence, beta in (("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0)):
        for reduction, lab in (("batchmean", labels), ("none", labels), ("mean", None), ("sum", None),
                               ("batchmean", None)):
            kw = dict(divergence=divergence, beta=beta, temperature=0.7, labels=lab, reduction=reduction)
            want = ptk.distill_loss(student, teacher, **kw)
            up = torch.randn(want.shape, generator=gen(10))
            (want_grad,) = grad_of(want, up, student)
            s, t = my_shard(student, layout, rank), my_shard(teacher, layout, rank)
            got = vocab_parallel_distill_loss(s, t, vocab_start=start, **kw)
            (got_grad,) = grad_of(got, up, s)
            errs += [err(got, want, out_tol),
                     err(got_grad, want_grad[:, start:start + width], grad_tol, scale_atol=True)]
    return max(errs)


def _linear_inputs(vocab, dtype, seed):
    g = gen(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, H, generator=g) / H ** 0.5 * 2).to(dtype).requires_grad_()
    bias = (0.5 * torch.randn(vocab, generator=g)).to(dtype).requires_grad_()
    return hidden, weight, bias


def _linear_shards(weight, bias, layout, rank):
    start, width = layout[rank]
    w = weight[start:start + width].detach().clone().requires_grad_()
    b = bias[start:start + width].detach().clone().requires_grad_()
    return w, b


def _linear_errs(got_grads, want_grads, start, width, grad_tol):
    (gh, gw, gb), (wh, ww, wb) = got_grads, want_grads
    return [err(gh, wh, grad_tol, scale_atol=True),  # hidden: the full gradient (all-reduced)
            err(gw, ww[start:start + width], grad_tol, scale_atol=True),
            err(gb, wb[start:start + width], grad_tol, scale_atol=True)]


def case_linear_token_logprobs(rank, world, vocab, dtype, reverse=False, **extra):
    out_tol, grad_tol = TOLS[dtype]
    layout = shard_layout(vocab, world, reverse)
    start, width = layout[rank]
    hidden, weight, bias = _linear_inputs(vocab, dtype, 11)
    labels = make_labels(vocab, 12)
    g = gen(13)
    ups = (torch.randn(N, generator=g), torch.randn(N, generator=g))
    want = ptk.linear_token_logprobs(hidden, weight, labels, bias=bias, temperature=0.7, return_entropy=True)
    want_grads = grad_of(want, ups, hidden, weight, bias)
    w, b = _linear_shards(weight, bias, layout, rank)
    got = vocab_parallel_linear_token_logprobs(hidden, w, labels, vocab_start=start, bias_shard=b,
                                               temperature=0.7, return_entropy=True, chunk_size=5, **extra)
    got_grads = grad_of(got, ups, hidden, w, b)
    return max([err(got[0], want[0], out_tol), err(got[1], want[1], out_tol)]
               + _linear_errs(got_grads, want_grads, start, width, grad_tol))


def case_linear_cross_entropy(rank, world, vocab, dtype, reverse=False):
    out_tol, grad_tol = TOLS[dtype]
    layout = shard_layout(vocab, world, reverse)
    start, width = layout[rank]
    hidden, weight, bias = _linear_inputs(vocab, dtype, 14)
    labels = make_labels(vocab, 15)
    errs = []
    for eps, reduction in ((0.0, "mean"), (0.1, "none"), (0.0, "sum")):
        want = ptk.linear_cross_entropy(hidden, weight, labels, bias=bias, label_smoothing=eps,
                                        reduction=reduction)
        up = torch.randn(want.shape, generator=gen(16))
        want_grads = grad_of(want, up, hidden, weight, bias)
        w, b = _linear_shards(weight, bias, layout, rank)
        got = vocab_parallel_linear_cross_entropy(hidden, w, labels, vocab_start=start, bias_shard=b,
                                                  label_smoothing=eps, reduction=reduction, chunk_size=4)
        got_grads = grad_of(got, up, hidden, w, b)
        errs += [err(got, want, out_tol)] + _linear_errs(got_grads, want_grads, start, width, grad_tol)
    return max(errs)


def case_all_ignored(rank, world, vocab, dtype):
    """Every label ignored: zero losses and log-probs, zero gradients, nothing non-finite."""
    layout = shard_layout(vocab, world)
    start, width = layout[rank]
    labels = torch.full((N,), IGNORE)
    x = my_shard(full_logits(vocab, dtype, 17).requires_grad_(), layout, rank)
    hidden, weight, bias = _linear_inputs(vocab, dtype, 18)
    w, b = _linear_shards(weight, bias, layout, rank)
    outs = [vocab_parallel_cross_entropy(x, labels, vocab_start=start),
            vocab_parallel_token_logprobs(x, labels, vocab_start=start, return_entropy=True)[0],
            vocab_parallel_linear_cross_entropy(hidden, w, labels, vocab_start=start, bias_shard=b),
            vocab_parallel_distill_loss(x, x.detach() + 1, vocab_start=start, labels=labels)]
    grads = torch.autograd.grad(sum(o.sum() for o in outs), (x, hidden, w, b))
    zeros = [err(t, torch.zeros_like(t), (1e-30, 0.0)) for t in outs + list(grads)]
    return max(zeros)


def case_singleton_group(rank, world, vocab, dtype):
    """torch.distributed initialized, a group of one rank: the shard is the whole vocabulary."""
    group, _ = dist.new_subgroups(group_size=1)
    return case_token_logprobs(0, 1, vocab, dtype, group=group, grank=0)


def case_subgroup(rank, world, vocab, dtype):
    """A group that is not the default one (ranks 1..world-1): shards by the rank *in the group*."""
    group = dist.new_group(list(range(1, world)))  # every rank must create it
    if rank == 0:
        return 0.0
    return case_token_logprobs(rank, world - 1, vocab, dtype, group=group, grank=rank - 1)


# -- errors: every rank raises, none hangs, and the group stays usable -------------------------------
def _expect_error_everywhere(rank, world, call: Callable[[], object], must_mention: str) -> float:
    try:
        call()
    except (ValueError, TypeError) as e:
        if must_mention not in str(e):
            raise AssertionError(f"the error does not mention {must_mention!r}: {e}") from None
    else:
        raise AssertionError("no error raised on this rank")
    # the ranks are still in step: a valid call right after gives the right numbers
    return case_token_logprobs(rank, world, 7, torch.float32)


def _error_call(kind: str, rank: int, world: int):
    vocab = 11
    layout = shard_layout(vocab, world)
    start, width = layout[rank]
    last = rank == world - 1
    x = my_shard(full_logits(vocab, torch.float32, 19).requires_grad_(), layout, rank)
    labels = make_labels(vocab, 20)
    kw = dict(vocab_start=start)
    if kind == "negative_vocab_start" and last:
        kw["vocab_start"] = -1
    if kind == "vocab_start_out_of_range" and last:
        kw["vocab_start"] = vocab + 5
    if kind == "overlap" and last:
        kw["vocab_start"] = 0
    if kind == "wrong_group_size":
        kw["vocab_size"] = vocab + 4  # the shards of this group cover 11, the head has 15 (another group)
    if kind == "labels_shape" and rank == 0:
        labels = labels[:-1]
    if kind == "label_out_of_range":
        labels = labels.clone()
        labels[0] = vocab
    if kind == "labels_differ" and last:
        labels = labels.clone()
        labels[0] = (labels[0] + 1) % vocab
    temperature = 0.5 if (kind == "temperature_differs" and last) else 1.0
    if kind == "linear_bad_vocab_start":
        hidden, weight, bias = _linear_inputs(vocab, torch.float32, 21)
        w, _ = _linear_shards(weight, bias, layout, rank)
        return lambda: vocab_parallel_linear_token_logprobs(
            hidden, w, labels, vocab_start=-3 if last else start)
    if kind == "distill_teacher_shape":
        teacher = x.detach() if not last else x.detach()[:, :-1]
        return lambda: vocab_parallel_distill_loss(x, teacher, vocab_start=start)
    return lambda: vocab_parallel_token_logprobs(x, labels, temperature=temperature, **kw)


ERROR_CASES = {
    "negative_vocab_start": "vocab_start",
    "vocab_start_out_of_range": "vocab_start",
    "overlap": "vocab_start",
    "wrong_group_size": "group",
    "labels_shape": "labels",
    "label_out_of_range": "labels",
    "labels_differ": "labels",
    "temperature_differs": "temperature",
    "linear_bad_vocab_start": "vocab_start",
    "distill_teacher_shape": "teacher_shard",
}


def case_names(world: int) -> List[str]:
    return list(cases(world))


def cases(world: int) -> Dict[str, Callable[[int, int], float]]:
    vocabs = {2: (7, 8, 4097), 3: (11, 12, 4097)}[world]
    out: Dict[str, Callable[[int, int], float]] = {}
    values = {
        "token_logprobs": case_token_logprobs, "cross_entropy": case_cross_entropy, "distill": case_distill,
        "linear_token_logprobs": case_linear_token_logprobs,
        "linear_cross_entropy": case_linear_cross_entropy,
    }
    for fn_name, fn in values.items():
        for vocab in vocabs:
            for dname, dtype in DTYPES.items():
                if vocab == 4097 and dtype == torch.bfloat16:
                    continue
                out[f"{fn_name}-V{vocab}-{dname}"] = (lambda f, v, d: lambda r, w: f(r, w, v, d))(fn, vocab, dtype)
        # a layout whose ranks are not in vocabulary order (rank 0 holds the last columns)
        out[f"{fn_name}-V{vocabs[0]}-fp32-reversed"] = (
            lambda f, v: lambda r, w: f(r, w, v, torch.float32, reverse=True))(fn, vocabs[0])
    # no handshake (check_ranks=False, the hot path): the same numbers
    off = dict(check_ranks=False, vocab_size=vocabs[0])
    out["token_logprobs-no_handshake"] = lambda r, w: case_token_logprobs(r, w, vocabs[0], torch.float32, **off)
    out["linear_token_logprobs-no_handshake"] = lambda r, w: case_linear_token_logprobs(
        r, w, vocabs[0], torch.float32, **off)
    out["token_logprobs-leading_dims"] = lambda r, w: case_token_logprobs(r, w, vocabs[0], torch.float32,
                                                                          shape=(1, N))
    for dname, dtype in DTYPES.items():
        out[f"all_ignored-{dname}"] = (lambda d: lambda r, w: case_all_ignored(r, w, vocabs[0], d))(dtype)
    out["singleton_group"] = lambda r, w: case_singleton_group(r, w, vocabs[0], torch.float32)
    if world >= 3:
        out["subgroup"] = lambda r, w: case_subgroup(r, w, vocabs[0], torch.float32)
    for kind, mention in ERROR_CASES.items():
        out[f"error-{kind}"] = (lambda k, m: lambda r, w: _expect_error_everywhere(
            r, w, _error_call(k, r, w), m))(kind, mention)
    return out


def main(path: str) -> None:
    # errors are normalized by their tolerances (err): a case passes at <= 1
    run_cases(path, cases(int(os.environ["WORLD_SIZE"])).items(), tol=1.0)


if __name__ == "__main__":
    main(sys.argv[1])
