"""Argument checking of the public API and of backend dispatch: every bad input gets a ValueError or
TypeError whose message starts with the name of the argument (and shows the value that came)."""
import math

import pytest
import torch
import torch.nn.functional as F

import posttrain_kernels as ptk
from posttrain_kernels import dispatch
from conftest import fused_backends

CPU = torch.device("cpu")


def tlp(logits, labels, **kw):
    return ptk.token_logprobs(logits, labels, **kw)


def ce(logits, labels, **kw):
    return ptk.cross_entropy(logits, labels, **kw)


FUNCS = [pytest.param(tlp, id="token_logprobs"), pytest.param(ce, id="cross_entropy")]


def good(rows=4, vocab=7):
    torch.manual_seed(0)
    return torch.randn(rows, vocab), torch.randint(0, vocab, (rows,))


# --------------------------------------------------------------------------------------------
# tensors


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_logits(fn, dtype):
    logits, labels = good()
    with pytest.raises(TypeError, match=r"^logits: .*got dtype " + str(dtype).replace(".", r"\.")):
        fn(logits.to(dtype), labels)


@pytest.mark.parametrize("fn", FUNCS)
def test_logits_not_a_tensor_or_0d(fn):
    logits, labels = good()
    with pytest.raises(TypeError, match=r"^logits: expected a torch\.Tensor, got list"):
        fn(logits.tolist(), labels)
    with pytest.raises(TypeError, match=r"^labels: expected a torch\.Tensor, got list"):
        fn(logits, labels.tolist())
    with pytest.raises(ValueError, match=r"^logits: expected at least 1 dimension"):
        fn(torch.tensor(1.0), torch.tensor(0))


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_non_integer_labels(fn, dtype):
    logits, labels = good()
    with pytest.raises(TypeError, match=r"^labels: expected an integer tensor"):
        fn(logits, labels.to(dtype))


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("bad", [7, 8, 1000, -1, -99, -101])
def test_label_out_of_range(fn, bad):
    logits, labels = good(vocab=7)
    labels[2] = bad
    with pytest.raises(ValueError, match=rf"^labels: expected values in \[0, 7\).*got {bad}\b"):
        fn(logits, labels)


@pytest.mark.parametrize("fn", FUNCS)
def test_label_range_respects_ignore_index(fn):
    logits, labels = good(vocab=7)
    labels[1] = -1
    fn(logits, labels, ignore_index=-1)  # fine
    labels[2] = -100  # the default ignore_index is not ignored any more
    with pytest.raises(ValueError, match=r"^labels: .*ignore_index=-1.*got -100"):
        fn(logits, labels, ignore_index=-1)


def test_label_out_of_range_k_labels():
    logits, _ = good(vocab=7)
    labels = torch.randint(0, 7, (4, 3))
    labels[3, 2] = 7
    with pytest.raises(ValueError, match=r"^labels: .*got 7"):
        ptk.token_logprobs(logits, labels)


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("shape", [(5,), (3,), (4, 7, 1), (2, 2), ()])
def test_labels_shape_mismatch(fn, shape):
    logits, _ = good(rows=4, vocab=7)
    labels = torch.zeros(shape, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^labels: expected shape \(4,\)"):
        fn(logits, labels)


@pytest.mark.parametrize("fn", FUNCS)
def test_labels_on_another_device(fn):
    logits, labels = good()
    with pytest.raises(ValueError, match=r"^labels: expected a tensor on cpu"):
        fn(logits, labels.to("meta"))


def test_k_labels_rejected_by_cross_entropy():
    logits, _ = good(rows=4, vocab=7)
    labels = torch.randint(0, 7, (4, 3))
    ptk.token_logprobs(logits, labels)  # K labels per row are fine here
    with pytest.raises(ValueError, match=r"^labels: expected shape \(4,\) \(one token per row\), got \(4, 3\)"):
        ptk.cross_entropy(logits, labels)


# --------------------------------------------------------------------------------------------
# scalars


@pytest.mark.parametrize("value", [0, 0.0, -1.0, -1e-9, math.nan, math.inf, -math.inf])
def test_bad_temperature(value):
    logits, labels = good()
    with pytest.raises(ValueError, match=r"^temperature: expected a finite number > 0, got"):
        ptk.token_logprobs(logits, labels, temperature=value)


@pytest.mark.parametrize("value", ["hot", None, [1.0]])
def test_temperature_not_a_number(value):
    logits, labels = good()
    with pytest.raises(TypeError, match=r"^temperature: "):
        ptk.token_logprobs(logits, labels, temperature=value)


@pytest.mark.parametrize("value", [-0.1, -1e-12, 1.0000001, 2.0, math.nan, math.inf])
def test_bad_label_smoothing(value):
    logits, labels = good()
    with pytest.raises(ValueError, match=r"^label_smoothing: expected a value in \[0\.0, 1\.0\]"):
        ptk.cross_entropy(logits, labels, label_smoothing=value)


def test_label_smoothing_bounds_accepted():
    logits, labels = good()
    for eps in (0.0, 1.0):
        torch.testing.assert_close(ptk.cross_entropy(logits, labels, label_smoothing=eps),
                                   F.cross_entropy(logits, labels, label_smoothing=eps))
    with pytest.raises(TypeError, match=r"^label_smoothing: "):
        ptk.cross_entropy(logits, labels, label_smoothing="a lot")


@pytest.mark.parametrize("value", [-1e-4, -1.0, math.nan, math.inf])
def test_bad_z_loss(value):
    logits, labels = good()
    with pytest.raises(ValueError, match=r"^z_loss: expected a value in \[0\.0, inf\)"):
        ptk.cross_entropy(logits, labels, z_loss=value)
    with pytest.raises(TypeError, match=r"^z_loss: "):
        ptk.cross_entropy(logits, labels, z_loss="big")


@pytest.mark.parametrize("value", [0, 0.0, -30.0, math.nan, math.inf])
def test_bad_softcap(value):
    logits, labels = good()
    with pytest.raises(ValueError, match=r"^softcap: expected a finite number > 0"):
        ptk.cross_entropy(logits, labels, softcap=value)


@pytest.mark.parametrize("value", ["avg", "MEAN", "", None, "batchmean"])
def test_bad_reduction(value):
    logits, labels = good()
    with pytest.raises(ValueError, match=r"^reduction: expected one of \('mean', 'sum', 'none'\)"):
        ptk.cross_entropy(logits, labels, reduction=value)


# --------------------------------------------------------------------------------------------
# backends


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("value", ["gpu", "Triton", "", None, "numpy"])
def test_unknown_backend(fn, value):
    logits, labels = good()
    with pytest.raises(ValueError, match=r"^backend: expected one of \('auto', "):
        fn(logits, labels, backend=value)


@pytest.mark.parametrize("fn", FUNCS)
def test_cuda_backend_on_cpu_tensors(fn):
    logits, labels = good()
    with pytest.raises(ValueError, match=r"^backend='cuda': expected CUDA tensors, got tensors on cpu"):
        fn(logits, labels, backend="cuda")


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton not installed")
@pytest.mark.parametrize("env", [None, "0", ""])
def test_triton_backend_on_cpu_without_interpreter(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", env)
    assert not dispatch.triton_interpreting()
    with pytest.raises(ValueError, match=r"^backend='triton': tensors on cpu need a CUDA device"):
        dispatch.resolve_backend("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_backend("triton", CPU) == "triton"


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("backend,device", fused_backends(include_triton=True))
def test_float64_rejected_by_fused_backends(fn, backend, device):
    logits, labels = good()
    with pytest.raises(TypeError, match=rf"^logits: backend '{backend}' takes float32, bfloat16 or float16, got float64"):
        fn(logits.double().to(device), labels.to(device), backend=backend)


@pytest.mark.parametrize("fn", FUNCS)
def test_float64_auto_on_cpu_is_rejected(fn):
    # auto resolves to a fused backend ("cpu" or "torch"), which takes no float64
    logits, labels = good()
    with pytest.raises(TypeError, match=r"^logits: backend '(cpu|torch)' takes .*got float64"):
        fn(logits.double(), labels)


def test_float64_accepted_by_reference():
    logits, labels = good()
    x = logits.double().requires_grad_(True)
    lp, h = ptk.token_logprobs(x, labels, return_entropy=True, backend="reference")
    assert lp.dtype == torch.float64 and h.dtype == torch.float64
    torch.testing.assert_close(lp, torch.log_softmax(x, -1).gather(-1, labels[:, None])[:, 0])
    loss = ptk.cross_entropy(x, labels, backend="reference")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, F.cross_entropy(x, labels))
    loss.backward()
    assert x.grad.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# the POSTTRAIN_KERNELS_BACKEND environment variable


def test_env_backend_overrides_auto(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.ENV_VAR == "POSTTRAIN_KERNELS_BACKEND"
    assert dispatch.resolve_backend("auto", CPU) == "torch"
    # an explicit backend wins over the environment
    assert dispatch.resolve_backend("reference", CPU) == "reference"
    # and the API runs through it: float64 is now refused naming the torch backend
    logits, labels = good()
    with pytest.raises(TypeError, match=r"^logits: backend 'torch' takes"):
        ptk.cross_entropy(logits.double(), labels)
    torch.testing.assert_close(ptk.cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.resolve_backend("auto", CPU) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.resolve_backend("auto", CPU) == ("cpu" if dispatch.live_backends()["cpu"] else "torch")


@pytest.mark.parametrize("value", ["gpus", "TORCH", " torch"])
def test_env_backend_bad_value(monkeypatch, value):
    monkeypatch.setenv(dispatch.ENV_VAR, value)
    with pytest.raises(ValueError, match=repr(value).replace("(", r"\(")):
        dispatch.resolve_backend("auto", CPU)
    logits, labels = good()
    with pytest.raises(ValueError):
        ptk.token_logprobs(logits, labels)
    # an explicit backend does not read the environment
    ptk.token_logprobs(logits, labels, backend="torch")


def test_env_backend_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="POSTTRAIN_KERNELS_BACKEND"):
        dispatch.resolve_backend("auto", CPU)
