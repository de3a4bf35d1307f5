"""Error-budget comparison: a fused backend may err against the fp64 oracle by at most a small
multiple of what the same-precision eager reference errs, plus a floor for rounding at the output."""
import torch


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.double()
    want = want.double()
    assert got.shape == want.shape, (got.shape, want.shape)
    same_inf = torch.isinf(got) & torch.isinf(want) & (torch.sign(got) == torch.sign(want))
    assert not torch.isnan(got).any(), "nan in result"
    diff = torch.where(same_inf, torch.zeros_like(got), (got - want).abs())
    if diff.numel() == 0:
        return 0.0
    return float(diff.max())


def assert_within_budget(got, ref_same_precision, oracle, *, atol: float, rtol: float = 0.0,
                         factor: float = 2.0, what: str = ""):
    """|got - oracle| <= factor * |ref - oracle| + atol + rtol * max|oracle|."""
    e_got = max_err(got, oracle)
    e_ref = max_err(ref_same_precision, oracle) if ref_same_precision is not None else 0.0
    finite = oracle.double()[torch.isfinite(oracle.double())]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    budget = factor * e_ref + atol + rtol * scale
    assert e_got <= budget, f"{what}: error {e_got:.3e} exceeds budget {budget:.3e} (reference error {e_ref:.3e})"
