"""posttrain_kernels.trainer on tiny random Llama models of the embedded task: each objective
improves its metric in a short run; the fused backends give the reference's loss trajectory;
checkpoint-resume gives the parameters of an uninterrupted run; gradient accumulation normalizes
over the whole window; bad configs fail clearly."""
import json
import math
import os

import pytest
import torch

pytest.importorskip("transformers")

from posttrain_kernels.dispatch import live_backends  # noqa: E402
from posttrain_kernels.pipeline import task  # noqa: E402
from posttrain_kernels.pipeline.run import answer_rewards, make_eval_fn  # noqa: E402
from posttrain_kernels.pipeline.tiny_models import build_policy, build_student  # noqa: E402
from posttrain_kernels.pipeline.tokenizer import default_tokenizer  # noqa: E402
from posttrain_kernels.trainer import SFT, Distill, PolicyGradient, Preference, TrainConfig, Trainer  # noqa: E402
from posttrain_kernels.trainer import checkpoint as ckpt  # noqa: E402
from posttrain_kernels.trainer.cursor import DataCursor  # noqa: E402
from posttrain_kernels.trainer.loop import CHECKPOINT_FILE, METRICS_FILE, lr_lambda  # noqa: E402

TOK = default_tokenizer()
# a few thousand parameters: each step takes milliseconds on one CPU thread
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4)
SFT_RECORDS = task.sft_examples(64, seed=0)
PREF_RECORDS = task.preference_pairs(64, seed=0)
RL_RECORDS = task.rl_prompts(64, seed=0)
FUSED = [b for b in ("cpu", "torch") if live_backends()[b]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add synchronization (the CPU has 2 shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def policy(seed=0):
    return build_policy(TOK, seed=seed, **SMALL)


def teacher():
    """A teacher with a peaked next-token distribution (a random head scaled up), so that the
    student has something to learn."""
    t = build_policy(TOK, seed=7, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
    with torch.no_grad():
        t.lm_head.weight.mul_(40.0)
    return t


def cfg(**kw):
    base = dict(progress=False, log_every=0, schedule="constant", backend="cpu" if "cpu" in FUSED else "torch")
    base.update(kw)
    return TrainConfig(**base)


def count_a(prompts, completions, **_):
    """An easy reward: the share of the letter ``a`` in a 6-token completion."""
    return [c.count("a") / 6 for c in completions]


# objective name -> (model builder, objective builder, config overrides)
def make(kind, model=None):
    if kind == "sft":
        return model or policy(), SFT(SFT_RECORDS, TOK)
    if kind == "preference":
        return model or policy(), Preference(PREF_RECORDS, TOK, beta=0.5)
    if kind == "pg":
        return model or policy(), PolicyGradient(RL_RECORDS, TOK, [count_a], num_generations=4, max_new_tokens=6)
    if kind == "pg2":
        return model or policy(), PolicyGradient(RL_RECORDS, TOK, [answer_rewards], num_generations=2,
                                                 max_new_tokens=5, num_iterations=2)
    if kind == "distill":
        return model or build_student(TOK, seed=1, **SMALL), Distill(SFT_RECORDS, TOK, teacher())
    raise KeyError(kind)


def steps(history):
    return [r for r in history if "loss" in r]


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


# -- each objective improves its metric ------------------------------------------------------
def test_sft_loss_drops_and_eval_improves():
    model, obj = make("sft")
    recs = SFT_RECORDS[:4]
    obj = SFT(recs, TOK)
    eval_fn = make_eval_fn(TOK, [{"prompt": r["prompt"], "answer": r["completion"]} for r in recs], 12, {})
    hist = Trainer(model, obj, cfg(steps=30, batch_size=4, lr=1e-2), eval_fn=eval_fn).train()
    losses = [r["loss"] for r in steps(hist)]
    assert len(losses) == 30
    assert mean(losses[-3:]) < 0.2 * mean(losses[:3]), losses
    # greedy completions of the (memorized) training prompts: from random to mostly exact
    evals = [r for r in hist if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 30]
    assert evals[0]["eval/accuracy"] == 0.0 and evals[0]["eval/reward"] < 0.2, evals
    assert evals[-1]["eval/accuracy"] >= 0.75 and evals[-1]["eval/reward"] > 0.8, evals
    # every step's record holds the loop's fields
    for k in ("lr", "grad_norm", "tokens", "tokens_per_s", "time_s", "peak_mem_mib"):
        assert k in hist[1], k


def test_preference_margin_and_accuracy_rise():
    model = policy()
    obj = Preference(PREF_RECORDS[:16], TOK, beta=0.5)
    hist = steps(Trainer(model, obj, cfg(steps=12, batch_size=16, lr=1e-2)).train())
    first, last = hist[0], hist[-1]
    # step 1 runs at the reference: margin 0, loss log 2
    assert abs(first["loss"] - math.log(2)) < 1e-4 and abs(first["rewards/margins"]) < 1e-4
    assert last["loss"] < 0.5 * math.log(2), [r["loss"] for r in hist]
    assert last["rewards/margins"] > 1.0, [r["rewards/margins"] for r in hist]
    assert mean(r["rewards/accuracies"] for r in hist[-3:]) >= 0.9
    assert last["rewards/chosen"] > last["rewards/rejected"]


def test_policy_gradient_reward_rises():
    model, obj = make("pg")
    hist = steps(Trainer(model, obj, cfg(steps=20, batch_size=4, lr=1e-2, seed=0)).train())
    rewards = [r["reward"] for r in hist]
    # a random policy says "a" about 1 time in 14 (0.07); the trained one nearly always
    assert mean(rewards[:3]) < 0.2, rewards
    assert mean(rewards[-3:]) > 0.6, rewards
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in hist)
    assert all(r["tokens"] > 0 and 0 < r["completion_len"] <= 6 for r in hist)


def test_policy_gradient_is_deterministic():
    runs = []
    for _ in range(2):
        model, obj = make("pg")
        hist = steps(Trainer(model, obj, cfg(steps=3, batch_size=2, lr=1e-2, seed=3)).train())
        runs.append(([r["reward"] for r in hist], [r["loss"] for r in hist], model.lm_head.weight.detach().clone()))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][2], runs[1][2])


def test_distill_loss_drops():
    model, obj = make("distill")
    hist = steps(Trainer(model, obj, cfg(steps=25, batch_size=16, lr=1e-2)).train())
    losses = [r["loss"] for r in hist]
    assert losses[0] > 0.5, losses  # the peaked teacher is far from the random student
    assert mean(losses[-3:]) < 0.5 * mean(losses[:3]), losses


# -- fused backends against the reference --------------------------------------------------
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["sft", "preference", "pg", "distill"])
def test_fused_matches_reference_trajectory(kind, backend):
    out = {}
    for b in ("reference", backend):
        model, obj = make(kind)
        hist = steps(Trainer(model, obj, cfg(steps=3, batch_size=4, lr=1e-2, backend=b)).train())
        out[b] = hist
    ref, got = out["reference"], out[backend]
    assert len(ref) == len(got) == 3
    for r, g in zip(ref, got):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-5), (kind, backend, ref, got)
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3, abs=1e-5)
        if "reward" in r:  # the same rollouts were sampled
            assert g["reward"] == r["reward"]


# -- checkpoint-resume -------------------------------------------------------------------------
def _crash_after(objective, n_steps):
    """The objective raises when asked for the batches of step ``n_steps + 1``."""
    orig, calls = objective.step_batches, [0]

    def step_batches(model):
        calls[0] += 1
        if calls[0] > n_steps:
            raise RuntimeError("simulated crash")
        return orig(model)

    objective.step_batches = step_batches


def _read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("kind", ["sft", "pg2", "preference"])
def test_resume_equals_uninterrupted(kind, tmp_path):
    n = 6
    config = dict(steps=n, batch_size=3, lr=1e-2, schedule="cosine", warmup_steps=2, checkpoint_every=3)

    model_a, obj_a = make(kind)
    Trainer(model_a, obj_a, cfg(out_dir=str(tmp_path / "a"), **config)).train()

    # crash in step 5: the checkpoint is the one of step 3, metrics.jsonl already holds step 4
    out_b = str(tmp_path / "b")
    model_b, obj_b = make(kind)
    _crash_after(obj_b, 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(model_b, obj_b, cfg(out_dir=out_b, **config)).train()
    assert [r["step"] for r in _read_metrics(os.path.join(out_b, METRICS_FILE))] == [1, 2, 3, 4]
    if kind == "pg2":  # step 3 used its rollouts once: step 4 must reuse them from the checkpoint
        assert ckpt.load(os.path.join(out_b, CHECKPOINT_FILE))["objective"]["uses"] == 1

    model_c, obj_c = make(kind)  # a fresh process: the model as built, a new objective
    hist = Trainer(model_c, obj_c, cfg(out_dir=out_b, **config)).train(resume=True)

    for (name, pa), (_, pc) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(pa, pc), name
    metrics_a = _read_metrics(tmp_path / "a" / METRICS_FILE)
    metrics_b = _read_metrics(os.path.join(out_b, METRICS_FILE))
    assert [r["step"] for r in metrics_b] == list(range(1, n + 1))
    assert [r["step"] for r in hist] == list(range(1, n + 1))
    assert [r["loss"] for r in metrics_b] == [r["loss"] for r in metrics_a]
    assert [r["lr"] for r in metrics_b] == [r["lr"] for r in metrics_a]
    assert sorted(os.listdir(out_b)) == [CHECKPOINT_FILE, METRICS_FILE]  # no temporary file left
    assert ckpt.load(os.path.join(out_b, CHECKPOINT_FILE))["step"] == n


def test_checkpoint_save_failure_keeps_previous(tmp_path, monkeypatch):
    model, obj = make("sft")
    trainer = Trainer(model, obj, cfg(steps=2, batch_size=2, out_dir=str(tmp_path)))
    trainer.train()
    path = tmp_path / CHECKPOINT_FILE
    before = path.read_bytes()
    trainer.train_step()

    def failing_save(obj, f, *a, **kw):
        f.write(b"partial checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_FILE, METRICS_FILE]
    assert ckpt.load(str(path))["step"] == 2
    trainer.save_checkpoint()
    assert ckpt.load(str(path))["step"] == 3
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_FILE, METRICS_FILE]


def test_resume_errors(tmp_path):
    model, obj = make("sft")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        Trainer(model, obj, cfg(steps=2, out_dir=str(tmp_path))).train(resume=True)
    with pytest.raises(ValueError, match="out_dir"):
        Trainer(model, SFT(SFT_RECORDS, TOK), cfg(steps=1)).save_checkpoint()
    # a checkpoint of another data set
    Trainer(model, SFT(SFT_RECORDS, TOK), cfg(steps=1, batch_size=2, out_dir=str(tmp_path))).train()
    with pytest.raises(ValueError, match="data cursor"):
        Trainer(policy(), SFT(SFT_RECORDS[:10], TOK), cfg(steps=2, out_dir=str(tmp_path))).train(resume=True)


def test_data_cursor_resumes_and_covers_epochs():
    c = DataCursor(5, seed=1)
    first = c.take(3)
    state = c.state_dict()
    rest = c.take(7)
    d = DataCursor(5, seed=1)
    d.load_state_dict(state)
    assert d.take(7) == rest
    assert sorted(first + rest[:2]) == list(range(5))  # epoch 0 is a permutation
    assert sorted(rest[2:7]) == list(range(5))  # and so is epoch 1
    assert DataCursor(4, shuffle=False).take(6) == [0, 1, 2, 3, 0, 1]


def test_lr_schedule():
    f = lr_lambda(TrainConfig(steps=10, warmup_steps=2, schedule="linear"))
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0] and f(10) == 0.0 and f(6) == pytest.approx(0.5)
    g = lr_lambda(TrainConfig(steps=10, warmup_steps=0, schedule="cosine"))
    assert g(0) == 1.0 and g(5) == pytest.approx(0.5) and g(10) == pytest.approx(0.0)


# -- gradient accumulation ---------------------------------------------------------------------
def _step_grads(model, objective, **config):
    """The gradients the optimizer sees in one step, and the step's record."""
    trainer = Trainer(model, objective, cfg(steps=1, max_grad_norm=None, **config))
    grads = {}

    def hook(optimizer, args, kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(hook)
    record = trainer.train_step()
    return grads, record


@pytest.mark.parametrize("kind", ["sft", "preference", "distill", "pg"])
def test_grad_accum_equals_larger_batch(kind):
    b = 3
    # the cursor draws take(b) twice or take(2b) once from the same permutation: the same examples,
    # split into micro-batches of different lengths (different token counts)
    if kind in ("sft", "distill"):
        probe = SFT(SFT_RECORDS, TOK)
        probe.bind(policy(), cfg(steps=1, batch_size=b, grad_accum=2))
        counts = [int((x["labels"][:, 1:] != -100).sum()) for x in probe.step_batches(None)]
        assert counts[0] != counts[1], counts  # else a per-micro-batch mean would pass as well
    g1, r1 = _step_grads(*make(kind), batch_size=b, grad_accum=2)
    g2, r2 = _step_grads(*make(kind), batch_size=2 * b, grad_accum=1)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5, abs=1e-6)
    assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=1e-4)
    if "tokens" in r1:
        assert r1["tokens"] == r2["tokens"]
    for k in ("rewards/margins", "rewards/accuracies", "reward"):
        if k in r1:
            assert r1[k] == pytest.approx(r2[k], rel=1e-5, abs=1e-6), k


# -- bad configs and inputs --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(grad_accum=True), "grad_accum"),
    (dict(schedule="exponential"), "schedule"),
    (dict(lr=0.0), "lr"),
    (dict(lr=-1e-3), "lr"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
])
def test_train_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        TrainConfig(**kwargs)


def test_train_config_from_dict():
    assert TrainConfig.from_dict({"steps": 3, "lr": 0.1}).steps == 3
    with pytest.raises(ValueError, match=r"sft: unknown option\(s\) stepz"):
        TrainConfig.from_dict({"stepz": 3}, where="sft")
    assert TrainConfig.from_dict(TrainConfig(steps=4).to_dict()) == TrainConfig(steps=4)


def test_objective_errors():
    with pytest.raises(ValueError, match="loss_type"):
        Preference(PREF_RECORDS, TOK, loss_type="dpo_unknown")
    with pytest.raises(ValueError, match="loss_type"):
        Preference(PREF_RECORDS, TOK, loss_type="kto")  # unpaired: not for pairs
    with pytest.raises(ValueError, match="num_generations"):
        PolicyGradient(RL_RECORDS, TOK, [count_a], num_generations=1)
    with pytest.raises(ValueError, match="reward_fns"):
        PolicyGradient(RL_RECORDS, TOK, [])
    with pytest.raises(ValueError, match="reward_weights"):
        PolicyGradient(RL_RECORDS, TOK, [count_a], reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="max_new_tokens"):
        PolicyGradient(RL_RECORDS, TOK, [count_a], max_new_tokens=0)
    with pytest.raises(ValueError, match="records"):
        SFT([], TOK)
    # options the loss does not take: named at construction, not at the first step
    with pytest.raises(ValueError, match="foo"):
        Preference(PREF_RECORDS, TOK, foo=1)
    with pytest.raises(ValueError, match="foo"):
        PolicyGradient(RL_RECORDS, TOK, [count_a], foo=1)
    Preference(PREF_RECORDS, TOK, label_smoothing=0.1)  # an option of preference_loss
    Preference(PREF_RECORDS, TOK, loss_type="simpo", gamma=0.3)  # of simpo_loss
    PolicyGradient(RL_RECORDS, TOK, [count_a], epsilon_high=0.28)  # of policy_loss


def test_bad_records_and_rewards_fail_clearly():
    model = policy()
    with pytest.raises(KeyError, match="completion"):
        Trainer(model, SFT([{"prompt": "ab="}], TOK), cfg(steps=1, batch_size=1)).train()

    def short(prompts, completions, **_):
        return [0.0]

    obj = PolicyGradient(RL_RECORDS, TOK, [short], num_generations=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="returned 1 rewards for 4 completions"):
        Trainer(policy(), obj, cfg(steps=1, batch_size=2)).train()


def test_bf16_autocast_trains():
    """``bf16=True``: the model runs under bfloat16 autocast (the losses accumulate in fp32): its
    loss trajectory follows the fp32 one within bf16 rounding, and falls."""
    runs = {}
    for bf16 in (False, True):
        model, objective = make("sft")
        history = Trainer(model, objective, cfg(steps=12, batch_size=8, lr=3e-3, bf16=bf16)).train()
        runs[bf16] = [r["loss"] for r in steps(history)]
        assert all(math.isfinite(x) for x in runs[bf16]), runs[bf16]
    fp32, bf16 = runs[False], runs[True]
    assert bf16[0] != fp32[0], "bf16=True did not change the computation (no autocast?)"
    assert mean(bf16[-3:]) < mean(bf16[:3]) - 0.05, bf16
    assert abs(bf16[0] - fp32[0]) < 0.02 * fp32[0], (fp32[0], bf16[0])
    assert abs(mean(bf16[-3:]) - mean(fp32[-3:])) < 0.05 * mean(fp32[-3:]), (fp32, bf16)
