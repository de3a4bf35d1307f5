"""GPU probe (run by benchmarks/gpu_session.sh): where the CUDA distillation kernel's TVD loses the
exact zero gradient on identical student and teacher rows (tests/test_gpu.py marks it xfail).

For identical rows the sign of p - q must be 0 everywhere; any rounding difference between the
two rows' log-softmaxes flips it to +-1/2 and the gradient to +-p/2. This prints, per variant,
the two lse's of each row as the forward's stats hold them (their difference must be 0) and how
many gradient elements are not 0: the teacher as a copy or as the same tensor, temperature 1 or
not, a vocabulary whose rows are 16-byte aligned or not.

    python3 -m benchmarks.gpu_probe_tvd
"""
import torch

from posttrain_kernels.backends import native

TVD, IGNORE = 5, -100


def probe(vocab: int, inv_t: float, same: bool, backend) -> str:
    x = (torch.randn(4, vocab, generator=torch.Generator().manual_seed(5)) * 3).cuda()
    t = x if same else x.clone()
    loss, stats = backend.distill_forward(x, t, None, IGNORE, TVD, 0.5, inv_t)
    grad = backend.distill_backward(x, t, None, IGNORE, TVD, 0.5, inv_t, stats, torch.ones(4, device="cuda"))
    dl = (stats[:, 0] - stats[:, 1]).abs().max().item()
    nz = int((grad != 0).sum())
    return (f"vocab={vocab:5d} inv_t={inv_t} teacher={'same' if same else 'copy'}: max|lse_s - lse_t|={dl:.3g} "
            f"c={stats[:, 2].abs().max().item():.3g} loss={loss.abs().max().item():.3g} "
            f"nonzero grad {nz}/{grad.numel()} max {grad.abs().max().item():.3g}")


if __name__ == "__main__":
    for vocab in (1000, 1024, 1001):
        for inv_t in (0.7, 1.0):
            for same in (False, True):
                print("cuda  ", probe(vocab, inv_t, same, native.cuda))
