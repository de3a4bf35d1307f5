"""Same numbers as TRL's selective_log_softmax / selective_log_softmax_and_entropy (when installed)."""
import pytest
import torch

import posttrain_kernels as ptk
from conftest import fused_backends

trl_utils = pytest.importorskip("trl.trainer.utils")


@pytest.mark.parametrize("backend,device", fused_backends(include_triton=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_trl(backend, device, dtype, temperature):
    torch.manual_seed(0)
    logits = (torch.randn(3, 11, 257) * 3).to(dtype)
    index = torch.randint(0, 257, (3, 11))
    want = trl_utils.selective_log_softmax(logits.float(), index, temperature=temperature)
    got, ent = ptk.token_logprobs(logits, index, temperature=temperature, return_entropy=True, backend=backend)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    want_lp, want_ent = trl_utils.selective_log_softmax_and_entropy(logits.float(), index, temperature=temperature)
    torch.testing.assert_close(got, want_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent.float(), atol=2e-5, rtol=1e-5)
