"""One training step per loss family with ``backend="triton"``, for the ``triton_op`` tests: what
``torch.compile`` must see of our Triton kernels when the ops are ``torch.library.triton_op``s.

Each case: ``build(device) -> inputs``, ``step(backend) -> fn(*inputs) -> scalar loss``, the indices
of the inputs to differentiate, the kernels (names in ``posttrain_kernels.kernels``) that the
forward + backward graph must launch, and the ops of the package it must call opaquely instead. Used by ``triton_op_worker.py`` (the CPU trace, in a
subprocess without ``TRITON_INTERPRET``) and by ``test_triton_op.py`` on a GPU (inductor)."""
from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import torch

import posttrain_kernels as ptk

IGN = -100
TL_FWD, TL_BWD = "_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"
CE_FWD, CE_BWD, CE_FUSED = "_cross_entropy_fwd_kernel", "_cross_entropy_bwd_kernel", "_cross_entropy_fused_kernel"
DI_FWD, DI_BWD = "_distill_fwd_kernel", "_distill_bwd_kernel"
PO_FWD, PO_BWD = "_policy_fwd_kernel", "_policy_bwd_kernel"


@dataclass(frozen=True)
class Case:
    build: Callable[[str], Tuple]
    step: Callable[[str], Callable]
    grad_idx: Sequence[int]
    kernels: frozenset
    opaque: frozenset = frozenset()


def run_step(fn, inputs, grad_idx):
    """fn(*inputs) with the floating inputs at grad_idx differentiated: [loss, their gradients]."""
    xs = [x.detach().clone().requires_grad_(i in grad_idx) if x.is_floating_point() else x
          for i, x in enumerate(inputs)]
    loss = fn(*xs)
    loss.backward()
    return [loss.detach()] + [xs[i].grad for i in grad_idx]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(device, rows=6, vocab=37, seed=0):
    g = _gen(seed)
    x = torch.randn(rows, vocab, generator=g) * 3
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[1] = IGN
    return x.to(device), y.to(device)


def _linear(device, rows=7, d=8, vocab=37, seed=6):
    g = _gen(seed)
    h = torch.randn(rows, d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.5
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[1] = IGN
    return h.to(device), w.to(device), y.to(device)


def _token_logprobs(backend):
    def fn(x, y):
        logp, ent = ptk.token_logprobs(x, y, temperature=0.7, return_entropy=True, backend=backend)
        return logp.sum() + 0.1 * ent.sum()
    return fn


def _cross_entropy(backend):
    def fn(x, y):
        return ptk.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-4, backend=backend)
    return fn


def _distill(backend):
    def fn(s, t, y):
        return ptk.distill_loss(s, t, labels=y, divergence="jsd", beta=0.3, temperature=0.7, backend=backend)
    return fn


def _distill_inputs(device):
    s, y = _logits(device, seed=1)
    t, _ = _logits(device, seed=2)
    return s, t, y


def _policy_inputs(device, b=3, t=5):
    g = _gen(3)
    lp = -torch.rand(b, t, generator=g) * 3
    old = lp + torch.randn(b, t, generator=g) * 0.1
    ref = lp + torch.randn(b, t, generator=g) * 0.1
    ent = torch.rand(b, t, generator=g) * 2
    adv = torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    return tuple(v.to(device) for v in (lp, old, adv, mask, ref, ent))


def _policy(backend):
    def fn(lp, old, adv, mask, ref, ent):
        return ptk.policy_loss(lp, old, adv, mask, ref_logps=ref, entropy=ent, loss_type="dapo", beta=0.04,
                               entropy_coef=0.01, epsilon_high=0.28, backend=backend)[0]
    return fn


def _linear_ce(backend):
    def fn(h, w, y):
        return ptk.linear_cross_entropy(h, w, y, label_smoothing=0.1, chunk_size=4, backend=backend)
    return fn


def _linear_logprobs(backend):
    def fn(h, w, y):
        logp, ent = ptk.linear_token_logprobs(h, w, y, temperature=0.7, return_entropy=True, chunk_size=4,
                                              backend=backend)
        return logp.sum() + 0.1 * ent.sum()
    return fn


def _linear_distill_inputs(device):
    hs, ws, y = _linear(device, seed=9)
    ht, wt, _ = _linear(device, d=6, seed=10)
    return hs, ws, ht, wt, y


def _linear_distill(backend):
    def fn(hs, ws, ht, wt, y):
        return ptk.linear_distill_loss(hs, ws, ht, wt, labels=y, divergence="jsd", beta=0.3, temperature=0.7,
                                       hard_label_weight=0.2, chunk_size=4, backend=backend)
    return fn


def _linear_preference_inputs(device):
    g = _gen(7)
    h = torch.randn(4, 3, 8, generator=g)  # 2 pairs (chosen rows first), 3 tokens
    w = torch.randn(37, 8, generator=g) * 0.5
    y = torch.randint(0, 37, (4, 3), generator=g)
    y[:, 0] = IGN
    ref = -torch.rand(4, generator=g) * 5
    return h.to(device), w.to(device), y.to(device), ref.to(device)


def _linear_preference(backend):
    def fn(h, w, y, ref):
        return ptk.linear_preference_loss(h, w, y, ref_logps=ref, loss_type="sigmoid", beta=0.1, chunk_size=2,
                                          backend=backend)[0]
    return fn


def _linear_policy_inputs(device):
    g = _gen(8)
    h = torch.randn(2, 4, 8, generator=g)
    w = torch.randn(37, 8, generator=g) * 0.5
    y = torch.randint(0, 37, (2, 4), generator=g)
    old = -torch.rand(2, 4, generator=g) * 3
    adv = torch.randn(2, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    return tuple(v.to(device) for v in (h, w, y, old, adv, mask))


def _linear_policy(backend):
    def fn(h, w, y, old, adv, mask):
        return ptk.linear_policy_loss(h, w, y, old, adv, mask, loss_type="grpo", temperature=0.7, chunk_size=4,
                                      backend=backend)[0]
    return fn


CASES = {
    "token_logprobs": Case(_logits, _token_logprobs, (0,), frozenset({TL_FWD, TL_BWD})),
    "cross_entropy": Case(_logits, _cross_entropy, (0,), frozenset({CE_FWD, CE_BWD})),
    "distill_loss": Case(_distill_inputs, _distill, (0,), frozenset({DI_FWD, DI_BWD})),
    "policy_loss": Case(_policy_inputs, _policy, (0, 5), frozenset({PO_FWD, PO_BWD})),
    "linear_cross_entropy": Case(_linear, _linear_ce, (0, 1), frozenset({CE_FUSED})),
    "linear_token_logprobs": Case(_linear, _linear_logprobs, (0, 1), frozenset({TL_FWD, TL_BWD})),
    # (hard_label_weight: the cross-entropy term of the fused-linear distillation)
    "linear_distill_loss": Case(_linear_distill_inputs, _linear_distill, (0, 1),
                                frozenset({DI_FWD, DI_BWD, CE_FUSED})),
    # compiled, the preference losses launch their kernels from opaque ops (ops/linear_sequence_loss.py:
    # inductor gave them zero hidden-state gradients on an H200 with the kernels traced)
    "linear_preference_loss": Case(_linear_preference_inputs, _linear_preference, (0, 1), frozenset(),
                                   frozenset({"token_logprobs_forward_native", "token_logprobs_backward__native"})),
    # (the fused-linear policy loss computes its per-token terms in PyTorch, between the kernels)
    "linear_policy_loss": Case(_linear_policy_inputs, _linear_policy, (0, 1), frozenset({TL_FWD, TL_BWD})),
}

# the families whose compiled graphs (on the CPU) launch only the token log-prob and cross-entropy
# kernels, which triton_op_worker.py can emulate
EMULATED_CASES = ("token_logprobs", "cross_entropy", "linear_token_logprobs", "linear_cross_entropy",
                  "linear_policy_loss")
