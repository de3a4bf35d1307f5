"""The in-place chunk launchers of the fused-linear losses: backward with ``out=logits`` and the
fused cross-entropy forward+backward give exactly what the out-of-place launchers give."""
import pytest
import torch

from posttrain_kernels.dispatch import launchers
from posttrain_kernels.ops import token_logprobs as ops
from conftest import fused_backends


def _logits(n, v, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * scale
    x[0, : min(v, 3)] = 40.0  # a peaked row
    return x.to(dtype)


def _labels(n, v, k, mask, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, v, (n, k), generator=g)
    if k > 1:
        y[:, 1] = y[:, 0]  # duplicate labels: their upstream gradients add up
    if mask == "some":
        y[::3] = -100
        y[1, 0] = -100  # a row with some labels ignored
    elif mask == "all":
        y[:] = -100
    return y


def _tol(dtype):
    return dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("backend,device", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [1, 7, 4097])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mask", ["none", "some", "all"])
@pytest.mark.parametrize("entropy", [False, True])
def test_token_logprobs_backward_in_place(backend, device, dtype, v, k, mask, entropy):
    n = 6
    L = launchers(backend)
    x = _logits(n, v, dtype).to(device)
    y = _labels(n, v, k, mask).to(device)
    inv_t = 1 / 0.7
    _, ent, lse = L.token_logprobs_forward(x, y, inv_t, -100, entropy)
    g = torch.Generator().manual_seed(5)
    glogp = torch.randn(n, k, generator=g).to(device)
    gent = torch.randn(n, generator=g).to(device) if entropy else None
    want = L.token_logprobs_backward(x, y, lse, ent, glogp, gent, inv_t, -100)
    buf = x.clone()
    ops.token_logprobs_backward_(buf, y, lse, ent, glogp, gent, inv_t, -100, backend)
    torch.testing.assert_close(buf.float(), want.float(), **_tol(dtype))
    if mask == "all":
        assert (buf == 0).all()


@pytest.mark.parametrize("backend,device", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [1, 7, 4097])
@pytest.mark.parametrize("mask", ["none", "some", "all"])
@pytest.mark.parametrize("eps,z_loss,softcap", [(0.0, 0.0, 0.0), (0.1, 1e-4, 0.0), (0.0, 0.0, 5.0)])
def test_cross_entropy_backward_in_place_and_fused(backend, device, dtype, v, mask, eps, z_loss, softcap):
    n = 6
    L = launchers(backend)
    x = _logits(n, v, dtype).to(device)
    y = _labels(n, v, 1, mask)[:, 0].contiguous().to(device)
    g = torch.Generator().manual_seed(7)
    gloss = torch.randn(n, generator=g).to(device)
    loss, lse = L.cross_entropy_forward(x, y, -100, eps, z_loss, softcap)
    want = L.cross_entropy_backward(x, y, lse, gloss, -100, eps, z_loss, softcap)

    buf = x.clone()
    ops.cross_entropy_backward_(buf, y, lse, gloss, -100, eps, z_loss, softcap, backend)
    torch.testing.assert_close(buf.float(), want.float(), **_tol(dtype))

    buf = x.clone()
    loss2, lse2 = ops.cross_entropy_fused_(buf, y, gloss, -100, eps, z_loss, softcap, backend)
    torch.testing.assert_close(loss2, loss, atol=0, rtol=0)
    torch.testing.assert_close(lse2, lse, atol=0, rtol=0)
    torch.testing.assert_close(buf.float(), want.float(), **_tol(dtype))
    assert torch.isfinite(buf.float()).all()


@pytest.mark.parametrize("backend,device", fused_backends())
def test_fused_cross_entropy_broadcast_grad(backend, device):
    """The mean reduction passes one scale for every row as a broadcast (stride-0) view."""
    n, v = 5, 33
    L = launchers(backend)
    x = _logits(n, v, torch.float32).to(device)
    y = _labels(n, v, 1, "some")[:, 0].contiguous().to(device)
    scale = torch.full((), 0.25, device=device)
    buf = x.clone()
    ops.cross_entropy_fused_(buf, y, scale.expand(n), -100, 0.0, 0.0, 0.0, backend)
    _, lse = L.cross_entropy_forward(x, y, -100, 0.0, 0.0, 0.0)
    want = L.cross_entropy_backward(x, y, lse, scale.expand(n).contiguous(), -100, 0.0, 0.0, 0.0)
    torch.testing.assert_close(buf, want, atol=0, rtol=0)


def test_triton_out_must_match():
    from conftest import LIVE
    if not LIVE["triton"]:
        pytest.skip("triton not live")
    L = launchers("triton")
    x = _logits(4, 9, torch.float32)
    y = _labels(4, 9, 1, "none")[:, 0].contiguous()
    _, lse = L.cross_entropy_forward(x, y, -100, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="out: expected a contiguous"):
        L.cross_entropy_backward(x, y, lse, torch.ones(4), -100, 0.0, 0.0, 0.0,
                                 out=torch.empty(4, 9, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------
# Column blocks (the vocabulary-blocked backward): the gradient of a block of columns, from the
# full rows' lse / entropy and labels shifted into the block, equals that block of the full
# rows' gradient.


def _column_blocks(v):
    return [(0, min(v, 5)), (min(v, 5), v)] if v > 5 else [(0, v)]


@pytest.mark.parametrize("backend,device", fused_backends())
@pytest.mark.parametrize("v", [7, 300])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mask", ["none", "some"])
def test_token_logprobs_backward_column_blocks(backend, device, v, k, mask):
    from posttrain_kernels.ops.linear_vocab_blocks import IGNORED, block_labels
    n = 6
    L = launchers(backend)
    x = _logits(n, v, torch.float32).to(device)
    y = _labels(n, v, k, mask).to(device)
    _, ent, lse = L.token_logprobs_forward(x, y, 1.3, -100, True)
    g = torch.Generator().manual_seed(5)
    glogp, gent = torch.randn(n, k, generator=g).to(device), torch.randn(n, generator=g).to(device)
    want = L.token_logprobs_backward(x, y, lse, ent, glogp, gent, 1.3, -100)
    for c0, c1 in _column_blocks(v):
        buf = x[:, c0:c1].contiguous()
        ops.token_logprobs_backward_(buf, block_labels(y, c0, c1, -100), lse, ent, glogp, gent, 1.3,
                                     IGNORED, backend)
        torch.testing.assert_close(buf, want[:, c0:c1], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend,device", fused_backends())
@pytest.mark.parametrize("v", [7, 300])
@pytest.mark.parametrize("opts", [(0.0, 0.0, 0.0), (0.2, 1e-3, 5.0)], ids=["plain", "smooth-z-cap"])
def test_cross_entropy_backward_column_blocks(backend, device, v, opts):
    from posttrain_kernels.ops.linear_vocab_blocks import IGNORED, block_labels
    eps, z, cap = opts
    n = 6
    L = launchers(backend)
    x = _logits(n, v, torch.float32).to(device)
    y = _labels(n, v, 1, "some")[:, 0].contiguous().to(device)
    _, lse = L.cross_entropy_forward(x, y, -100, eps, z, cap)
    gl = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(device)
    want = L.cross_entropy_backward(x, y, lse, gl, -100, eps, z, cap)
    for c0, c1 in _column_blocks(v):
        buf = x[:, c0:c1].contiguous()
        ops.cross_entropy_backward_(buf, block_labels(y, c0, c1, -100), lse, gl, IGNORED, eps, z, cap,
                                    backend, v)
        torch.testing.assert_close(buf, want[:, c0:c1], atol=1e-6, rtol=1e-5)
