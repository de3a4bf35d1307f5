"""posttrain_kernels.models on tiny random transformers models of each family: the fused losses
equal the losses on the model's own logits (values and every parameter's gradient), also with a
PEFT LoRA adapter on the head, and under a simulation of ZeRO-3 parameter gathering."""
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from posttrain_kernels import models as M  # noqa: E402

VOCAB = 160
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

# id -> (config class, model class, config kwargs, expected (softcap, logit_scale), tied, bias)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, (None, 1.0), False, False),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), (None, 1.0),
                   True, False),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8), (None, 1.0), False, False),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, (None, 1.0), False, False),
    "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM",
                       dict(head_dim=8, final_logit_softcapping=1.5), (1.5, 1.0), True, False),
    "gemma3-softcap": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                       dict(head_dim=8, final_logit_softcapping=2.0, sliding_window=4),
                       (2.0, 1.0), True, False),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, (None, 1.0), False, False),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, (None, 1.0), False, False),
    "phi-bias": ("PhiConfig", "PhiForCausalLM", {}, (None, 1.0), False, True),
    "cohere-scale": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25), (None, 0.25),
                     True, False),
    "granite-scale": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0),
                      (None, 0.25), False, False),
}
BACKENDS = ["cpu", "reference", "torch"]
_CACHE = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add synchronization, which a loaded CPU turns into
    seconds per test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(family, dtype=torch.float32):
    key = (family, dtype)
    if key not in _CACHE:
        cfg_cls, model_cls, kwargs, *_ = FAMILIES[family]
        cfg = getattr(transformers, cfg_cls)(**{**COMMON, **kwargs})
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(cfg).eval()
        with torch.no_grad():  # logits of a few units, so that soft-caps and scales matter
            model.get_output_embeddings().weight.mul_(20.0)
            if model.get_output_embeddings().bias is not None:
                model.get_output_embeddings().bias.normal_()
        _CACHE[key] = model.to(dtype)
    return _CACHE[key]


def batch(seed=0, b=2, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a prompt
    return ids, mask, labels


def grads(model):
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(got, want, atol=1e-5, rtol=1e-4):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=rtol, msg=name)


def reference_logprobs(model, ids, mask, labels, temperature):
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float() / temperature
    target = M.next_token_labels(labels)
    valid = target != -100
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, target.clamp_min(0)[..., None])[..., 0] * valid
    ent = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, ent


# ---------------------------------------------------------------------------------------------
# every family: values and gradients equal those of the model's own logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cross_entropy_matches_hf_loss(family, backend):
    model = build(family)
    ids, mask, labels = batch()
    model.zero_grad(set_to_none=True)
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss  # HF's ForCausalLMLoss
    want.backward()
    want_g = grads(model)
    got = M.cross_entropy(model, ids, labels, mask, backend=backend)
    got.backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_same_grads(grads(model), want_g)
    assert "forward" not in model.get_output_embeddings().__dict__  # restored


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_token_logprobs_match_model_logits(family, backend):
    model = build(family)
    ids, mask, labels = batch(1)
    g = torch.Generator().manual_seed(5)
    w_lp, w_ent = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
    model.zero_grad(set_to_none=True)
    want_lp, want_ent = reference_logprobs(model, ids, mask, labels, 0.7)
    ((want_lp * w_lp).sum() + (want_ent * w_ent).sum()).backward()
    want_g = grads(model)
    lp, ent = M.token_logprobs(model, ids, mask, labels, temperature=0.7, return_entropy=True,
                               backend=backend)
    assert lp.shape == ent.shape == ids.shape and lp.dtype == torch.float32
    ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
    torch.testing.assert_close(lp, want_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, want_ent, atol=2e-5, rtol=1e-5)
    assert_same_grads(grads(model), want_g)
    assert (lp[:, -1] == 0).all() and (lp[0, :3] == 0).all()  # no next token / ignored


@pytest.mark.parametrize("family", FAMILIES)
def test_head_and_logit_transform_read_from_config(family):
    model = build(family)
    *_, (softcap, scale), tied, has_bias = FAMILIES[family]
    t = M.LogitTransform.from_model(model)
    assert (t.softcap, t.logit_scale) == (softcap, scale)
    ids, mask, _ = batch()
    seen = {}

    def loss_fn(hidden, head):
        seen["head"] = head
        return head.logits(hidden)

    with torch.no_grad():
        logits = M.causal_lm_loss(model, loss_fn, input_ids=ids, attention_mask=mask)
        want = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    head = seen["head"]
    assert head.weight is model.get_output_embeddings().weight
    assert (head.weight is model.get_input_embeddings().weight) == tied
    assert (head.bias is not None) == has_bias
    if softcap is not None or scale != 1.0:  # the transform matters for these logits
        raw = M.causal_lm_loss(model, loss_fn, logit_transform=M.LogitTransform(),
                               check_logits=False, input_ids=ids, attention_mask=mask)
        assert (raw - want).abs().max() > 0.1


def test_tied_head_gets_both_gradients():
    model = build("qwen2-tied")
    ids, mask, labels = batch(2)
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight is emb
    model.zero_grad(set_to_none=True)
    M.cross_entropy(model, ids, labels, mask, backend="cpu").backward()
    total = emb.grad.clone()
    model.zero_grad(set_to_none=True)
    # the head's share alone: the same loss with the body's hidden states detached
    M.causal_lm_loss(model, lambda h, head: M.Head(head.weight).logits(h.detach()).sum(),
                     input_ids=ids, attention_mask=mask).backward()
    head_only = emb.grad.clone()
    model.zero_grad(set_to_none=True)
    assert head_only.abs().sum() > 0 and (total - head_only).abs().sum() > 0  # embedding rows too


def test_reductions_and_num_items_in_batch_match_hf():
    model = build("llama")
    ids, mask, labels = batch(3)
    n = torch.tensor(37)
    want = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
    got = M.cross_entropy(model, ids, labels, mask, num_items_in_batch=n, backend="cpu")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    logits = model(input_ids=ids, attention_mask=mask).logits
    target = M.next_token_labels(labels)
    per_tok = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    for reduction in ("none", "sum"):
        got = M.cross_entropy(model, ids, labels, mask, reduction=reduction, backend="cpu")
        torch.testing.assert_close(got, per_tok if reduction == "none" else per_tok.sum(),
                                   atol=1e-5, rtol=1e-5)
    all_ignored = torch.full_like(labels, -100)
    zero = M.cross_entropy(model, ids, all_ignored, mask, backend="cpu")
    assert zero.item() == 0.0  # HF gives NaN here
    with pytest.raises(ValueError, match="num_items_in_batch"):
        M.cross_entropy(model, ids, labels, reduction="sum", num_items_in_batch=3)
    with pytest.raises(ValueError, match="labels"):
        M.cross_entropy(model, ids, labels[:, :-1])


def test_default_labels_are_input_ids_without_padding():
    model = build("mistral")
    ids, mask, _ = batch(4)
    lp, ent = M.token_logprobs(model, ids, mask, backend="cpu")
    assert ent is None
    want, _ = reference_logprobs(model, ids, mask, ids.masked_fill(mask == 0, -100), 1.0)
    torch.testing.assert_close(lp, want, atol=2e-5, rtol=1e-5)


def test_bfloat16_model():
    model = build("gemma2-softcap", torch.bfloat16)
    ids, mask, labels = batch(5)
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = M.cross_entropy(model, ids, labels, mask, backend="cpu")  # probe check passes in bf16
    torch.testing.assert_close(got, want.float(), atol=0.05, rtol=0.02)


def test_generic_loss_fn_with_pytree_result_and_outputs():
    model = build("cohere-scale")
    ids, mask, labels = batch(6)
    target = M.next_token_labels(labels)
    import posttrain_kernels as ptk

    def loss_fn(hidden, head):
        hidden, bias = head.fold_scale(hidden)
        lp, _ = ptk.linear_token_logprobs(hidden, head.weight, target, bias=bias, backend="cpu")
        return {"loss": -lp.sum(), "n": (target != -100).sum()}

    out, outputs = M.causal_lm_loss(model, loss_fn, return_outputs=True, input_ids=ids,
                                    attention_mask=mask)
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out["loss"] / out["n"], want, atol=1e-5, rtol=1e-5)
    assert outputs.logits.shape[-1] == 10  # the probe, not logits
    with pytest.raises(ValueError, match="softcap"):
        M.Head(model.lm_head.weight, softcap=2.0).fold_scale(ids.float())


def test_nested_text_config_of_multimodal_models():
    class Multimodal(nn.Module):  # a *ForConditionalGeneration's config, without its towers
        def __init__(self, config):
            super().__init__()
            self.config = config

        def get_output_embeddings(self):
            return None

    cfg = transformers.Gemma3Config(text_config=dict(final_logit_softcapping=3.0))
    assert M.LogitTransform.from_model(Multimodal(cfg)).softcap == 3.0
    cfg = transformers.GraniteConfig(logits_scaling=8.0)
    assert M.LogitTransform.from_model(Multimodal(cfg)).logit_scale == 0.125


def test_wrapped_models_hooks_and_checkpointing():
    import copy
    ids, mask, labels = batch(11)

    class DDPLike(nn.Module):  # DDP / FSDP1 / DeepSpeed engines keep the model in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kw):
            return self.module(**kw)

    model = copy.deepcopy(build("qwen3"))
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(M.cross_entropy(DDPLike(model), ids, labels, mask, backend="cpu"),
                               want, atol=1e-5, rtol=1e-5)
    hooks = pytest.importorskip("accelerate.hooks")
    hooks.add_hook_to_module(model.lm_head, hooks.ModelHook())  # device_map / offload hooks
    bound = model.lm_head._old_forward
    torch.testing.assert_close(M.cross_entropy(model, ids, labels, mask, backend="cpu"), want,
                               atol=1e-5, rtol=1e-5)
    assert model.lm_head._old_forward == bound
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    (enable or model.gradient_checkpointing_enable)()
    want.backward()
    want_g = grads(model)
    M.cross_entropy(model, ids, labels, mask, backend="cpu").backward()
    assert_same_grads(grads(model), want_g)


# ---------------------------------------------------------------------------------------------
# PEFT LoRA on the head


def lora_model(family, **lora_kwargs):
    peft = pytest.importorskip("peft")
    import copy
    base = copy.deepcopy(build(family))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], **lora_kwargs)
    model = peft.get_peft_model(base, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT initializes B = 0: no gradient for A to compare
                p.normal_(0, 0.5)
    return model


def _lora_run(model, fused, ids, mask, labels, seed):
    torch.manual_seed(seed)  # the same dropout masks on both paths
    if fused:
        loss = M.cross_entropy(model, ids, labels, mask, backend="cpu")
    else:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize("family,kwargs,train", [
    ("llama", dict(lora_dropout=0.0), False),
    ("llama", dict(lora_dropout=0.3), True),
    ("qwen2-tied", dict(lora_dropout=0.3), True),
    ("gemma2-softcap", dict(lora_dropout=0.0, lora_bias=True), False),
], ids=["llama", "llama-dropout", "qwen2-tied-dropout", "gemma2-lora-bias"])
def test_lora_on_head_gets_its_gradient(family, kwargs, train):
    model = lora_model(family, **kwargs)
    model.train(train)
    ids, mask, labels = batch(7)
    want, want_g = _lora_run(model, False, ids, mask, labels, 11)
    got, got_g = _lora_run(model, True, ids, mask, labels, 11)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert any("lm_head.lora_A" in n for n in want_g) and any("lm_head.lora_B" in n for n in want_g)
    assert all(g.abs().sum() > 0 for n, g in got_g.items() if "lm_head" in n)
    assert_same_grads(got_g, want_g)
    head = model.get_output_embeddings()
    assert "forward" not in head.__dict__ and "forward" not in head.base_layer.__dict__
    if train:  # a different dropout mask gives a different loss: dropout is really applied
        other, _ = _lora_run(model, True, ids, mask, labels, 12)
        assert not torch.allclose(other, got)


def test_lora_head_disabled_or_merged_uses_the_base_layer():
    model = lora_model("llama")
    ids, mask, labels = batch(8)
    with model.disable_adapter():
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = M.cross_entropy(model, ids, labels, mask, backend="cpu")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with_adapter = M.cross_entropy(model, ids, labels, mask, backend="cpu")
    assert abs(with_adapter.item() - got.item()) > 1e-4
    model.merge_adapter()
    torch.testing.assert_close(M.cross_entropy(model, ids, labels, mask, backend="cpu"),
                               with_adapter, atol=1e-4, rtol=1e-4)


def test_lm_head_in_modules_to_save():
    peft = pytest.importorskip("peft")
    import copy
    model = peft.get_peft_model(copy.deepcopy(build("phi-bias")),
                                peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                modules_to_save=["lm_head"]))
    ids, mask, labels = batch(9)
    want, want_g = _lora_run(model, False, ids, mask, labels, 0)
    got, got_g = _lora_run(model, True, ids, mask, labels, 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert any("modules_to_save" in n for n in got_g)
    assert_same_grads(got_g, want_g)


def test_lora_variant_on_head_is_refused():
    model = lora_model("llama", use_dora=True)
    ids, mask, labels = batch()
    with pytest.raises(M.UnsupportedModelError, match="LlamaForCausalLM.*DoraLinearVariant"):
        M.cross_entropy(model, ids, labels, mask, backend="cpu")
    model = lora_model("llama").eval()  # PEFT takes adapter_names in eval mode only
    with pytest.raises(M.UnsupportedModelError, match="LlamaForCausalLM.*adapter_names"):
        M.cross_entropy(model, ids, labels, mask, backend="cpu", adapter_names=["default"] * 2)
    assert "forward" not in model.get_output_embeddings().__dict__


# ---------------------------------------------------------------------------------------------
# ZeRO-3-style sharding: the head weight exists only inside the head's forward and its backward


class _Regather(torch.autograd.Function):
    """What ZeRO-3 / FSDP put on a module's outputs: gather its parameters before the gradient
    flows into the module."""

    @staticmethod
    def forward(ctx, shard, out):
        ctx.shard = shard
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.shard.gather()
        return None, grad


class _FakeZero3:
    def __init__(self, module):
        self.module, self.full = module, module.weight.data
        self.release()
        module.register_forward_pre_hook(lambda m, args: self.gather())
        module.register_forward_hook(lambda m, args, out: self.after_forward(out))

    def gather(self):
        self.module.weight.data = self.full

    def release(self):
        self.module.weight.data = torch.empty(0)

    def after_forward(self, out):
        self.release()
        return _Regather.apply(self, out) if out.requires_grad else out


def test_zero3_style_gathering():
    import copy
    model = copy.deepcopy(build("llama"))
    ids, mask, labels = batch(10)
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    want.backward()
    want_g = grads(model)
    _FakeZero3(model.lm_head)
    with pytest.raises(RuntimeError):  # the weight is not there outside the head's forward
        nn.functional.linear(torch.zeros(1, 32), model.lm_head.weight)
    got = M.cross_entropy(model, ids, labels, mask, backend="cpu")
    assert model.lm_head.weight.numel() == 0  # released after the forward
    got.backward()  # the loss's backward runs after the output hook re-gathered the weight
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_same_grads(grads(model), want_g)


# ---------------------------------------------------------------------------------------------
# restoration and errors


def test_forward_restored_after_exceptions():
    model = build("llama")
    head = model.lm_head
    ids, mask, labels = batch()

    def boom(hidden, head):
        raise KeyError("from loss_fn")

    with pytest.raises(KeyError, match="from loss_fn"):
        M.causal_lm_loss(model, boom, input_ids=ids)
    assert "forward" not in head.__dict__
    with pytest.raises(Exception):  # fails in the model's body, before the head
        M.cross_entropy(model, ids + 10 * VOCAB, labels, backend="cpu")
    assert "forward" not in head.__dict__
    with pytest.raises(ValueError, match="labels"):
        M.causal_lm_loss(model, lambda h, w: h.sum(), input_ids=ids, labels=labels)
    torch.testing.assert_close(model(input_ids=ids).logits.shape[-1], VOCAB)


def test_unsupported_models_raise_clear_errors():
    ids, mask, labels = batch()
    llama = build("llama")
    body = transformers.LlamaModel(llama.config)
    with pytest.raises(M.UnsupportedModelError, match="get_output_embeddings"):
        M.cross_entropy(body, ids, labels)
    with pytest.raises(M.UnsupportedModelError, match="get_output_embeddings"):
        M.cross_entropy(nn.Linear(3, 3), ids, labels)

    import copy
    odd = copy.deepcopy(llama)

    class ScaledHead(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    odd.lm_head = ScaledHead(32, VOCAB, bias=False)
    with pytest.raises(M.UnsupportedModelError, match="LlamaForCausalLM.*ScaledHead.forward"):
        M.cross_entropy(odd, ids, labels)
    odd.lm_head = nn.Sequential(nn.Linear(32, VOCAB))
    with pytest.raises(M.UnsupportedModelError, match="not an nn.Linear"):
        M.cross_entropy(odd, ids, labels)

    # a config value the model does not apply: caught by the probe, named in the error
    odd = copy.deepcopy(llama)
    odd.config.logit_scale = 0.5
    with pytest.raises(M.UnsupportedModelError, match=r"LlamaForCausalLM.*config.logit_scale"):
        M.cross_entropy(odd, ids, labels)
    assert "forward" not in odd.lm_head.__dict__

    # a wrong explicit transform: the error says which reading of the config fits
    granite = build("granite-scale")
    with pytest.raises(M.UnsupportedModelError, match=r"/ config.logits_scaling"):
        M.cross_entropy(granite, ids, labels, logit_transform=M.LogitTransform(logit_scale=4.0))

    # the model's code after the head fails on the placeholder: wrapped in a clear error
    odd = copy.deepcopy(llama)
    odd.lm_head.register_forward_hook(lambda m, a, out: out + torch.zeros(VOCAB))
    with pytest.raises(M.UnsupportedModelError, match="failed after its head"):
        M.cross_entropy(odd, ids, labels)
    assert "forward" not in odd.lm_head.__dict__

    class NoHeadCall(nn.Module):  # computes its logits without calling its head module
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, **kw):
            return (nn.functional.linear(self.emb(input_ids), self.head.weight),)

    with pytest.raises(M.UnsupportedModelError, match="never called"):
        M.cross_entropy(NoHeadCall(), ids, labels)


def test_import_does_not_import_transformers_or_peft():
    code = ("import sys, posttrain_kernels as p; p.models.causal_lm_loss; "
            "assert 'transformers' not in sys.modules and 'peft' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
