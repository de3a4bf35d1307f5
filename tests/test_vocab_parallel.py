"""Vocab-parallel heads (posttrain_kernels.parallel).

* A world of one (torch.distributed not initialized, no group): every function equals its
  single-process counterpart of the package, values and gradients, for fp32 and bf16 logits, with
  ignored labels, every label ignored, temperature 0.7 and random upstream gradients; argument
  errors name the argument.
* 2 and 3 gloo CPU processes (tests/vocab_parallel_worker.py, one launch per world size running
  every case): vocabularies that divide evenly over the ranks and that do not (7 = 4+3, 11 = 4+4+3,
  4097), N = 13 rows with ignored labels, shards in rank order and in reverse order; each rank
  compares its outputs and its shard's gradients (logits: its slice of the full gradient; fused
  linear: its slice of the weight and bias gradients, and the full hidden gradient) with the
  unsplit functions run locally on the full inputs. Also: a group of one rank with
  torch.distributed initialized, a subgroup that is not the default group (3 ranks), and bad
  arguments on one rank (vocab_start, labels, a scalar that differs between ranks, a group of the
  wrong size) raising on every rank without a hang, the group still usable after.
"""
import os
import sys

import pytest
import torch

import posttrain_kernels as ptk
from posttrain_kernels.parallel import (vocab_parallel_cross_entropy, vocab_parallel_distill_loss,
                                        vocab_parallel_linear_cross_entropy,
                                        vocab_parallel_linear_token_logprobs,
                                        vocab_parallel_token_logprobs)

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "vocab_parallel_worker.py")
sys.path.insert(0, HERE)
import vocab_parallel_worker as W  # noqa: E402
from multiproc import launch  # noqa: E402

N, V, H = 13, 11, 8
# (outputs, gradients) tolerances (atol = rtol); bf16 gradients may differ by one bf16 rounding
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-5, 1e-2)}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _close(got, want, tol, what):
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got.float()).all(), f"{what}: non-finite values"
    scale = max(1.0, float(want.float().abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def _labels(all_ignored=False):
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    y[[0, 5, 6]] = -100
    return torch.full_like(y, -100) if all_ignored else y


def _logits(dtype, seed=0, shape=(N, V)):
    return (3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype).requires_grad_()


def _randn(shape, seed=100):
    """Upstream gradients: seeded, so that no test depends on the order the tests run in."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _grads(outs, ups, inputs):
    total = sum((o * u).sum() for o, u in zip(outs, ups) if o is not None)
    return torch.autograd.grad(total, inputs)


# -- a world of one ---------------------------------------------------------------------------------
@pytest.mark.parametrize("all_ignored", [False, True], ids=["some_ignored", "all_ignored"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_world_of_one(dtype, all_ignored):
    out_tol, grad_tol = TOL[dtype]
    x, y = _logits(dtype, shape=(1, N, V)), _labels(all_ignored).reshape(1, N)
    ups = (_randn((1, N), 1), _randn((1, N), 2))
    want = ptk.token_logprobs(x, y, temperature=0.7, return_entropy=True)
    got = vocab_parallel_token_logprobs(x, y, vocab_start=0, temperature=0.7, return_entropy=True)
    for g, w, what in zip(got, want, ("logp", "entropy")):
        _close(g, w, out_tol, what)
    got_grad = _grads(got, ups, [x])[0]
    _close(got_grad, _grads(want, ups, [x])[0], grad_tol, "grad")
    logp, entropy = vocab_parallel_token_logprobs(x, y, vocab_start=0)
    assert entropy is None and logp.dtype == torch.float32
    if all_ignored:
        assert not got[0].any() and not got[1].any() and not got_grad.any()


@pytest.mark.parametrize("all_ignored", [False, True], ids=["some_ignored", "all_ignored"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_world_of_one(dtype, all_ignored):
    out_tol, grad_tol = TOL[dtype]
    x, y = _logits(dtype), _labels(all_ignored)
    for eps in (0.0, 0.2):
        for reduction in ("mean", "sum", "none"):
            want = ptk.cross_entropy(x, y, label_smoothing=eps, reduction=reduction)
            got = vocab_parallel_cross_entropy(x, y, vocab_start=0, label_smoothing=eps, reduction=reduction)
            up = _randn(want.shape)
            _close(got, want, out_tol, f"loss {reduction} eps={eps}")
            got_grad = _grads([got], [up], [x])[0]
            _close(got_grad, _grads([want], [up], [x])[0], grad_tol, f"grad {reduction}")
            if all_ignored:
                assert not got.any() and not got_grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3),
                                             ("jsd", 0.0), ("jsd", 1.0)])
def test_distill_world_of_one(divergence, beta, dtype):
    out_tol, grad_tol = TOL[dtype]
    # a teacher near the student, as in distillation: the divergences are O(1) nats
    s = _logits(dtype, 2)
    t = (s.detach().float() + _randn((N, V), 3)).to(dtype)
    for labels in (_labels(), None, _labels(all_ignored=True)):
        for reduction in ("batchmean", "sum", "mean", "none"):
            kw = dict(divergence=divergence, beta=beta, temperature=0.7, labels=labels, reduction=reduction)
            want = ptk.distill_loss(s, t, **kw)
            got = vocab_parallel_distill_loss(s, t, vocab_start=0, **kw)
            up = _randn(want.shape)
            what = f"{reduction}, labels={'none' if labels is None else 'given'}"
            _close(got, want, out_tol, what)
            _close(_grads([got], [up], [s])[0], _grads([want], [up], [s])[0], grad_tol, "grad " + what)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_distill_far_apart_within_budget_of_fp64(divergence, beta):
    """Student and teacher far apart (divergences of ~10 nats, where the fp32 gradient loses digits
    to cancellation): against the fp64 reference, at most the error of the package's distill_loss
    (x2, + 1e-6)."""
    from budget import assert_within_budget
    from posttrain_kernels.reference import distill_loss_reference

    s, t = _logits(torch.float32, 2), _logits(torch.float32, 3).detach()
    s64 = s.detach().double().requires_grad_()
    kw = dict(divergence=divergence, beta=beta, temperature=0.7, reduction="none")
    up = _randn(N)
    oracle = distill_loss_reference(s64, t.double(), None, divergence, beta, 0.7, -100, "none")
    package = ptk.distill_loss(s, t, **kw)
    got = vocab_parallel_distill_loss(s, t, vocab_start=0, **kw)
    grads = [_grads([o], [u], [x])[0] for o, u, x in ((got, up, s), (package, up, s), (oracle, up.double(), s64))]
    assert_within_budget(got.detach(), package.detach(), oracle.detach(), atol=1e-6, what="divergence")
    assert_within_budget(*grads, atol=1e-6, what="gradient")


@pytest.mark.parametrize("all_ignored", [False, True], ids=["some_ignored", "all_ignored"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_world_of_one(dtype, all_ignored):
    out_tol, grad_tol = TOL[dtype]
    g = torch.Generator().manual_seed(4)
    h = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    w = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_()
    y = _labels(all_ignored)
    ups = (_randn(N, 1), _randn(N, 2))
    want = ptk.linear_token_logprobs(h, w, y, bias=b, temperature=0.7, return_entropy=True)
    got = vocab_parallel_linear_token_logprobs(h, w, y, vocab_start=0, bias_shard=b, temperature=0.7,
                                               return_entropy=True, chunk_size=4)
    for gg, ww, what in zip(got, want, ("logp", "entropy")):
        _close(gg, ww, out_tol, what)
    for gg, ww, what in zip(_grads(got, ups, [h, w, b]), _grads(want, ups, [h, w, b]), "hwb"):
        _close(gg, ww, grad_tol, f"grad {what}")
    # the head matmul in fp32 for a bf16 head, as linear_token_logprobs(fp32_logits=True) does
    want = ptk.linear_token_logprobs(h, w, y, bias=b, fp32_logits=True)[0]
    got = vocab_parallel_linear_token_logprobs(h, w, y, vocab_start=0, bias_shard=b, fp32_logits=True)[0]
    _close(got, want, out_tol, "logp fp32_logits")
    for reduction in ("mean", "sum", "none"):
        want = ptk.linear_cross_entropy(h, w, y, bias=b, reduction=reduction)
        got = vocab_parallel_linear_cross_entropy(h, w, y, vocab_start=0, bias_shard=b, reduction=reduction)
        up = _randn(want.shape)
        _close(got, want, out_tol, f"linear ce {reduction}")
        for gg, ww, what in zip(_grads([got], [up], [h, w, b]), _grads([want], [up], [h, w, b]), "hwb"):
            _close(gg, ww, grad_tol, f"linear ce {reduction} grad {what}")


def test_world_of_one_errors_name_the_argument():
    x, y = _logits(torch.float32), _labels()
    cases = [
        (dict(vocab_start=-1), ValueError, "vocab_start"),
        (dict(vocab_start=2), ValueError, "vocab_start"),       # a world of one holds [0, V)
        (dict(vocab_start=1.5), TypeError, "vocab_start"),
        (dict(vocab_start=0, vocab_size=V + 1), ValueError, "group"),
        (dict(vocab_start=0, temperature=0.0), ValueError, "temperature"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            vocab_parallel_token_logprobs(x, y, **kw)
    with pytest.raises(ValueError, match="vocab_size"):  # no handshake: the global V must be given
        vocab_parallel_token_logprobs(x, y, vocab_start=0, check_ranks=False)
    with pytest.raises(ValueError, match="vocab_start"):
        vocab_parallel_token_logprobs(x, y, vocab_start=0, check_ranks=False, vocab_size=V - 1)
    lp, _ = vocab_parallel_token_logprobs(x, y, vocab_start=0, check_ranks=False, vocab_size=V)
    torch.testing.assert_close(lp, vocab_parallel_token_logprobs(x, y, vocab_start=0)[0])
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_token_logprobs(x, y[:-1], vocab_start=0)
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_cross_entropy(x, torch.full((N,), V), vocab_start=0)
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_cross_entropy(x, y, vocab_start=0, reduction="batchmean")
    with pytest.raises(ValueError, match="divergence"):
        vocab_parallel_distill_loss(x, x.detach(), vocab_start=0, divergence="tvd")
    with pytest.raises(ValueError, match="teacher_shard"):
        vocab_parallel_distill_loss(x, x.detach()[:, :-1], vocab_start=0)
    with pytest.raises(ValueError, match="weight_shard"):
        vocab_parallel_linear_cross_entropy(torch.randn(N, H), torch.randn(V), y, vocab_start=0)
    with pytest.raises(ValueError, match="bias_shard"):
        vocab_parallel_linear_cross_entropy(torch.randn(N, H), torch.randn(V, H), y, vocab_start=0,
                                            bias_shard=torch.randn(V + 1))
    with pytest.raises(ValueError, match="group"):  # a group without torch.distributed initialized
        vocab_parallel_token_logprobs(x, y, vocab_start=0, group=object())


# -- several gloo processes -------------------------------------------------------------------------
def _distributed_ok() -> bool:
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_gloo_available()
    except Exception:  # noqa: BLE001
        return False


def _launch(world: int, out_dir) -> dict:
    return launch(WORKER, world, out_dir, timeout=150, what="vocab-parallel")


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = _launch(world, tmp_path_factory.mktemp(f"vp{world}"))
        return cache[world]
    return get


def _cases():
    return [pytest.param(world, name, id=f"world{world}-{name}") for world in (2, 3) for name in W.case_names(world)]


@pytest.mark.skipif(not _distributed_ok(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("world,case", _cases())
def test_matches_unsplit_on_every_rank(world_results, world, case):
    results = world_results(world)
    if case not in results:
        failed = {k: v for k, v in results.items() if isinstance(v, dict) and v["error"]}
        pytest.fail(f"{case}: not run (an earlier case failed and stopped the workers): {failed}")
    r = results[case]
    assert r["error"] is None, r["error"]
    assert r["max_err"] <= 1.0, f"{case}: error {r['max_err']:.3g} x the tolerance"
