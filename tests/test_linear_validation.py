"""Bad input to the fused-linear functions: a ValueError / TypeError whose message starts with the
name of the argument."""
import pytest
import torch

import posttrain_kernels as ptk


def good(rows=4, h=8, vocab=11):
    torch.manual_seed(0)
    return torch.randn(rows, h), torch.randn(vocab, h), torch.randint(0, vocab, (rows,))


def ltl(hidden, weight, labels, **kw):
    return ptk.linear_token_logprobs(hidden, weight, labels, **kw)


def lce(hidden, weight, labels, **kw):
    return ptk.linear_cross_entropy(hidden, weight, labels, **kw)


FUNCS = [pytest.param(ltl, id="linear_token_logprobs"), pytest.param(lce, id="linear_cross_entropy")]


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("case,exc,pattern", [
    ("int hidden", TypeError, r"^hidden: "),
    ("int weight", TypeError, r"^weight: "),
    ("1-d weight", ValueError, r"^weight: "),
    ("3-d weight", ValueError, r"^weight: expected shape \(V, H\)"),
    ("hidden size", ValueError, r"^hidden: expected last dimension 9 \(weight is \(11, 9\)\)"),
    ("bias shape", ValueError, r"^bias: expected shape \(11,\)"),
    ("float labels", TypeError, r"^labels: "),
    ("labels shape", ValueError, r"^labels: expected shape"),
    ("label too large", ValueError, r"^labels: .*\[0, 11\)"),
    ("negative label", ValueError, r"^labels: "),
    ("mixed dtypes", TypeError, r"^hidden: expected the dtype of weight"),
    ("chunk 0", ValueError, r"^chunk_size: "),
    ("chunk float", ValueError, r"^chunk_size: "),
    ("softcap 0", ValueError, r"^softcap: "),
    ("logit_scale inf", ValueError, r"^logit_scale: "),
    ("logit_scale str", TypeError, r"^logit_scale: "),
    ("not a tensor", TypeError, r"^hidden: "),
])
def test_bad_input(fn, case, exc, pattern):
    h, w, y = good()
    kw = {}
    if case == "int hidden":
        h = h.long()
    elif case == "int weight":
        w = w.long()
    elif case == "1-d weight":
        w = w[:, 0]
    elif case == "3-d weight":
        w = w[None]
    elif case == "hidden size":
        w = torch.randn(11, 9)
    elif case == "bias shape":
        kw["bias"] = torch.randn(10)
    elif case == "float labels":
        y = y.float()
    elif case == "labels shape":
        y = y[:3]
    elif case == "label too large":
        y = y.clone()
        y[1] = 11
    elif case == "negative label":
        y = y.clone()
        y[1] = -3
    elif case == "mixed dtypes":
        w = w.bfloat16()
    elif case == "chunk 0":
        kw["chunk_size"] = 0
    elif case == "chunk float":
        kw["chunk_size"] = 2.5
    elif case == "softcap 0":
        kw["softcap"] = 0.0
    elif case == "logit_scale inf":
        kw["logit_scale"] = float("inf")
    elif case == "logit_scale str":
        kw["logit_scale"] = "big"
    elif case == "not a tensor":
        h = h.tolist()
    with pytest.raises(exc, match=pattern):
        fn(h, w, y, backend="torch", **kw)


@pytest.mark.parametrize("case,kw,pattern", [
    ("temperature", dict(temperature=0.0), r"^temperature: "),
    ("temperature nan", dict(temperature=float("nan")), r"^temperature: "),
])
def test_bad_logprobs_args(case, kw, pattern):
    h, w, y = good()
    with pytest.raises(ValueError, match=pattern):
        ptk.linear_token_logprobs(h, w, y, backend="torch", **kw)


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(reduction="avg"), ValueError, r"^reduction: "),
    (dict(label_smoothing=1.5), ValueError, r"^label_smoothing: "),
    (dict(label_smoothing=-0.1), ValueError, r"^label_smoothing: "),
    (dict(z_loss=-1.0), ValueError, r"^z_loss: "),
])
def test_bad_cross_entropy_args(kw, exc, pattern):
    h, w, y = good()
    with pytest.raises(exc, match=pattern):
        ptk.linear_cross_entropy(h, w, y, backend="torch", **kw)


def test_cross_entropy_takes_one_label_per_token():
    h, w, _ = good()
    with pytest.raises(ValueError, match=r"^labels: expected shape \(4,\) for hidden"):
        ptk.linear_cross_entropy(h, w, torch.zeros(4, 2, dtype=torch.long), backend="torch")


def test_inputs_never_mutated():
    h, w, y = good()
    b = torch.randn(11)
    h.requires_grad_(True)
    w.requires_grad_(True)
    b.requires_grad_(True)
    before = [t.detach().clone() for t in (h, w, b, y)]
    for red in ("mean", "none"):
        out = ptk.linear_cross_entropy(h, w, y, bias=b, reduction=red, chunk_size=3, backend="torch")
        out.sum().backward()
    lp, ent = ptk.linear_token_logprobs(h, w, y, bias=b, return_entropy=True, chunk_size=3, backend="torch")
    (lp.sum() + ent.sum()).backward()
    for t, t0 in zip((h, w, b, y), before):
        assert torch.equal(t.detach(), t0)
