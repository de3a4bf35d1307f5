"""posttrain_kernels.integrations.trl: TRL's own trainers, run a few steps on a tiny random Llama and
tiny in-memory datasets, once with TRL's kernels and once patched onto ours; every logged number
(loss and each metric the trainer logs) is compared step by step."""
import contextlib
import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from posttrain_kernels.integrations import trl as ptk_trl  # noqa: E402

WORDS = [f"w{i}" for i in range(56)]
# logged values that are not model outputs (time, learning rate, counters): not compared
NOT_COMPARED = {"epoch", "step", "learning_rate", "grad_norm", "train_runtime", "train_samples_per_second",
                "train_steps_per_second", "total_flos", "train_loss", "num_tokens", "step_time"}


def tiny_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<bos>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<bos>")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def sentences(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return out


def common_args(tmp_path, bf16=False):
    # plain SGD: Adam divides by the root of tiny second moments, which turns rounding-level
    # differences in near-zero gradient coordinates into visible ones within a few steps
    return dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=0.5,
                optim="sgd",
                logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                dataloader_num_workers=0, disable_tqdm=True, bf16=bf16)


def run_twice(make_trainer, kernel="fused_head_logprobs"):
    """The trainer's log history with TRL's kernels and with ours (same seeds, fresh model); checks
    that the patched run really went through ours (``kernel``: the function counted)."""
    from posttrain_kernels.integrations import trl_divergence
    module = trl_divergence if kernel == "fused_divergence" else ptk_trl
    original, calls = getattr(module, kernel), []

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    assert not ptk_trl.is_patched()
    histories = []
    setattr(module, kernel, counted)
    try:
        for patched in (False, True):
            with (ptk_trl.fused_trl() if patched else contextlib.nullcontext()):
                trainer = make_trainer()
                trainer.train()
                histories.append([h for h in trainer.state.log_history if "loss" in h])
            if not patched:
                assert not calls, "TRL's own run went through our kernels"
    finally:
        setattr(module, kernel, original)
    assert calls, f"the patched run never called {kernel}"
    assert not ptk_trl.is_patched()
    return histories


def compare(theirs, ours, rtol, atol, must=()):
    assert len(theirs) == len(ours) and len(theirs) >= 3
    keys = set(theirs[0]) - NOT_COMPARED
    assert set(must) <= keys, sorted(keys)
    for step, (a, b) in enumerate(zip(theirs, ours)):
        assert set(a) == set(b)
        for k in sorted(keys):
            x, y = float(a[k]), float(b[k])
            assert math.isfinite(x) == math.isfinite(y), (step, k, x, y)
            if math.isfinite(x):
                assert abs(x - y) <= atol + rtol * abs(x), f"step {step} {k}: TRL {x} vs ours {y}"
    return keys


def test_patch_is_scoped_and_idempotent():
    from trl.trainer import utils
    original = utils._ChunkedLogProbFunction
    with ptk_trl.fused_trl():
        ptk_trl.patch_trl()
        assert utils._ChunkedLogProbFunction is ptk_trl.FusedHeadLogProbFunction
    assert utils._ChunkedLogProbFunction is original
    ptk_trl.patch_trl()
    ptk_trl.unpatch_trl()
    assert utils._ChunkedLogProbFunction is original


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap,scale,temperature", [(None, 1.0, 1.0), (30.0, 0.5, 0.7)])
def test_fused_head_equals_trl_function(dtype, softcap, scale, temperature):
    """Every output and every gradient of TRL's ChunkedLogProbFunction, from the same inputs."""
    from trl.kernels import ChunkedLogProbFunction
    torch.manual_seed(0)
    h = torch.randn(37, 64).to(dtype).requires_grad_(True)
    w = (torch.randn(501, 64) / 8).to(dtype).requires_grad_(True)
    b = torch.randn(501).to(dtype).requires_grad_(True)
    y = torch.randint(0, 501, (37,))
    outs = ("log_probs",) + ptk_trl.OPTIONAL_OUTPUTS
    up = torch.randn(2, 37)
    theirs = ChunkedLogProbFunction.apply(h, w, b, y, temperature, 128, softcap, scale, outs)
    ours = ptk_trl.fused_head_logprobs(h, w, b, y, temperature, 128, softcap, scale, outs)
    g_theirs = torch.autograd.grad(theirs[0] @ up[0] + theirs[1] @ up[1], (h, w, b))
    g_ours = torch.autograd.grad(ours[0] @ up[0] + ours[1] @ up[1], (h, w, b))
    # bf16: TRL's CPU path rounds the logits to bf16, ours multiplies in fp32 on CPUs without
    # bf16 matrix units: the two differ by bf16 rounding of the logits
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    for name, a, c in zip(outs, theirs, ours):
        assert c.shape == a.shape and c.dtype == a.dtype, name
        if a.dtype == torch.bool:
            assert (a == c).float().mean() >= (1.0 if dtype == torch.float32 else 0.9), name
        else:
            torch.testing.assert_close(c, a, atol=tol, rtol=tol, msg=name)
    for a, c in zip(g_theirs, g_ours):
        assert ((a.float() - c.float()).norm() / a.float().norm()) < (1e-5 if dtype == torch.float32 else 2e-2)
    # only what was asked for
    lp, ent, sq, mean, top1 = ptk_trl.fused_head_logprobs(h, w, b, y, temperature, 128, softcap, scale, ("log_probs",))
    assert ent is None and sq is None and mean is None and top1 is None
    with pytest.raises(ValueError, match="outputs"):
        ptk_trl.fused_head_logprobs(h, w, b, y, outputs=("log_probs", "logits"))


# TRL's configs default to bf16 autocast; there TRL's CPU path rounds each logit to bf16 while ours
# multiplies in fp32 (no bf16 matrix units here), so the two agree to bf16 rounding, not to fp32's
BF16 = [pytest.param(False, 2e-4, id="fp32"), pytest.param(True, 1e-2, id="bf16-autocast")]


@pytest.mark.parametrize("bf16,rtol", BF16)
def test_sft_trainer(tmp_path, bf16, rtol):
    from trl import SFTConfig, SFTTrainer
    data = datasets.Dataset.from_dict({"text": sentences(16, 4, 12, seed=1)})
    tok = tiny_tokenizer()

    def make():
        args = SFTConfig(**common_args(tmp_path, bf16), max_length=24)
        return SFTTrainer(model=tiny_model(), args=args, train_dataset=data, processing_class=tok)

    theirs, ours = run_twice(make)
    compare(theirs, ours, rtol=rtol, atol=1e-5, must=("loss", "entropy", "mean_token_accuracy"))


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo"], ["apo_zero", "sft"]], ids=lambda t: "+".join(t))
def test_dpo_trainer(tmp_path, loss_type):
    from trl import DPOConfig, DPOTrainer
    n = 16
    data = datasets.Dataset.from_dict({"prompt": sentences(n, 2, 6, seed=2), "chosen": sentences(n, 2, 6, seed=3),
                                       "rejected": sentences(n, 2, 6, seed=4)})
    tok = tiny_tokenizer()

    def make():
        args = DPOConfig(**common_args(tmp_path), beta=0.1, loss_type=loss_type, max_length=32,
                         loss_weights=[1.0] * len(loss_type) if len(loss_type) > 1 else None)
        return DPOTrainer(model=tiny_model(), ref_model=tiny_model(), args=args, train_dataset=data,
                          processing_class=tok)

    theirs, ours = run_twice(make)
    keys = compare(theirs, ours, rtol=5e-4, atol=2e-5, must=("loss",))
    assert any(k.startswith("rewards/") for k in keys) and any(k.startswith("logps/") for k in keys), keys


def _length_reward(completions, **_):
    return [float(len(c.split())) / 8.0 for c in completions]


@pytest.mark.parametrize("loss_type,beta", [("dapo", 0.04), ("grpo", 0.0)])
def test_grpo_trainer(tmp_path, loss_type, beta):
    from trl import GRPOConfig, GRPOTrainer
    data = datasets.Dataset.from_dict({"prompt": sentences(16, 2, 5, seed=5)})
    tok = tiny_tokenizer()
    # a saved model: with beta > 0 GRPOTrainer loads its reference model from the policy's path
    path = tmp_path / "model"
    tiny_model().save_pretrained(path)
    tok.save_pretrained(path)

    def make():
        args = GRPOConfig(**common_args(tmp_path), num_generations=2, max_completion_length=6,
                          loss_type=loss_type, beta=beta, temperature=0.9)
        return GRPOTrainer(model=str(path), reward_funcs=_length_reward, args=args, train_dataset=data,
                           processing_class=tok)

    theirs, ours = run_twice(make)
    keys = compare(theirs, ours, rtol=5e-4, atol=2e-5, must=("loss", "entropy", "reward") + (("kl",) if beta else ()))
    assert any(k.startswith("clip_ratio") for k in keys), keys


def test_fused_divergence_equals_trl_function():
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    torch.manual_seed(0)
    for beta in (0.0, 0.5, 1.0, 0.1):
        for cap, scale in ((None, 1.0), (20.0, 0.7)):
            hs = torch.randn(29, 48, requires_grad=True)
            ws = (torch.randn(301, 48) / 7).requires_grad_(True)
            bs = torch.randn(301, requires_grad=True)
            ht, wt = torch.randn(29, 64), torch.randn(301, 64) / 8
            args = (beta, 0.8, scale, cap, 1.2, None)
            theirs = ChunkedDivergenceFunction.apply(hs, ws, bs, ht, wt, None, *args)
            ours = ptk_trl.fused_divergence(hs, ws, bs, ht, wt, None, *args)
            up = torch.randn(29)
            g_theirs = torch.autograd.grad(theirs[0] @ up, (hs, ws, bs))
            g_ours = torch.autograd.grad(ours[0] @ up, (hs, ws, bs))
            torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=1e-5)
            assert ours[1].grad_fn is None
            for a, c in zip(g_theirs, g_ours):
                assert (a - c).norm() <= 1e-5 * a.norm(), beta
    with pytest.raises(ValueError, match="beta"):
        ptk_trl.fused_divergence(hs, ws, bs, ht, wt, None, 1.5)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_distillation_trainer(tmp_path, beta):
    from trl import DistillationConfig, DistillationTrainer
    data = datasets.Dataset.from_dict({"prompt": sentences(16, 2, 5, seed=6)})
    tok = tiny_tokenizer()

    def make():
        args = DistillationConfig(**common_args(tmp_path), beta=beta, max_completion_length=6, temperature=0.9)
        return DistillationTrainer(model=tiny_model(0), teacher_model=tiny_model(1), args=args, train_dataset=data,
                                   processing_class=tok)

    theirs, ours = run_twice(make, kernel="fused_divergence")
    compare(theirs, ours, rtol=5e-4, atol=2e-5, must=("loss",))


def test_kto_trainer(tmp_path):
    from trl import KTOConfig, KTOTrainer
    n = 16
    data = datasets.Dataset.from_dict({"prompt": sentences(n, 2, 6, seed=7), "completion": sentences(n, 2, 6, seed=8),
                                       "label": [i % 2 == 0 for i in range(n)]})
    tok = tiny_tokenizer()

    def make():
        args = KTOConfig(**common_args(tmp_path), beta=0.1, max_length=32)
        return KTOTrainer(model=tiny_model(), ref_model=tiny_model(), args=args, train_dataset=data,
                          processing_class=tok)

    theirs, ours = run_twice(make)
    compare(theirs, ours, rtol=5e-4, atol=2e-5, must=("loss",))


def test_rloo_trainer(tmp_path):
    from trl import RLOOConfig, RLOOTrainer
    data = datasets.Dataset.from_dict({"prompt": sentences(16, 2, 5, seed=9)})
    tok = tiny_tokenizer()
    path = tmp_path / "model"
    tiny_model().save_pretrained(path)
    tok.save_pretrained(path)

    def make():
        args = RLOOConfig(**common_args(tmp_path), num_generations=2, max_completion_length=6, beta=0.05,
                          temperature=0.9)
        return RLOOTrainer(model=str(path), reward_funcs=_length_reward, args=args, train_dataset=data,
                           processing_class=tok)

    theirs, ours = run_twice(make)
    compare(theirs, ours, rtol=5e-4, atol=2e-5, must=("loss", "reward"))


def test_fused_head_fp32_hidden_bf16_head():
    """GRPO's cast_lm_head_to_fp32: fp32 hidden states, a bf16 head, autocast off: an fp32 GEMM."""
    from trl.kernels import ChunkedLogProbFunction
    torch.manual_seed(1)
    h = torch.randn(19, 32, requires_grad=True)
    w = (torch.randn(97, 32) / 6).bfloat16().requires_grad_(True)
    y = torch.randint(0, 97, (19,))
    outs = ("log_probs", "entropy")
    theirs = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 64, None, 1.0, outs)
    ours = ptk_trl.fused_head_logprobs(h, w, None, y, 1.0, 64, None, 1.0, outs)
    for a, c in zip(theirs[:2], ours[:2]):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
    up = torch.randn(19)
    ga = torch.autograd.grad(theirs[0] @ up + theirs[1].sum(), (h, w))
    gc = torch.autograd.grad(ours[0] @ up + ours[1].sum(), (h, w))
    assert gc[1].dtype == torch.bfloat16
    for a, c in zip(ga, gc):
        assert (a.float() - c.float()).norm() <= 1e-2 * a.float().norm()
