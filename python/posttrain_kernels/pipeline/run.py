"""The main job: a multi-stage post-training pipeline, SFT -> preference (DPO) -> RL (GRPO) ->
distillation into a smaller student, on the fused losses, with each stage's first steps repeated on
the reference (materialized) losses to compare memory, time and the loss trajectory.

``run_pipeline(config)`` returns one :class:`StageResult` per stage; ``posttrain-kernels pipeline``
prints them as a table and writes ``summary.md``, ``summary.json``, each stage's
``metrics.jsonl`` and ``checkpoint.pt``, and the plots ``losses.png`` / ``rewards.png``.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..trainer import SFT, Distill, PolicyGradient, Preference, TrainConfig, Trainer
from ..trainer.batches import completion_mask, decode, prompt_batch
from .config import DATA_KINDS, PipelineConfig
from .task import answer_reward

_TRAIN_KEYS = {f for f in TrainConfig.__dataclass_fields__}
_METRIC = {"sft": "accuracy", "preference": "accuracy", "rl": "reward", "distill": "accuracy"}
_TITLES = {"sft": "SFT", "preference": "preference (DPO)", "rl": "RL (GRPO)", "distill": "distillation"}


@dataclass
class StageResult:
    """One stage: its evaluation before and after (``metric``: exact-match accuracy, or the mean
    reward for RL; both are in ``eval_before`` / ``eval_after``), the fused run's and the
    reference's median step time and largest peak extra memory over the compared steps, and the
    largest difference of their losses over those steps."""

    stage: str
    metric: str
    before: float
    after: float
    eval_before: Dict[str, float]
    eval_after: Dict[str, float]
    steps: int
    seconds: float
    fused_step_s: Optional[float] = None
    reference_step_s: Optional[float] = None
    fused_peak_mib: Optional[float] = None
    reference_peak_mib: Optional[float] = None
    max_loss_diff: Optional[float] = None
    history: List[Dict[str, Any]] = field(default_factory=list)


def answer_rewards(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **_) -> List[float]:
    """:func:`answer_reward` in TRL's reward-function convention (lists in, list out)."""
    return [answer_reward(c, a) for c, a in zip(completions, answer)]


# -- models, tokenizer, data -------------------------------------------------------------------
def _load_data(config: PipelineConfig) -> Dict[str, list]:
    from .data import load_default, load_jsonl

    out = {}
    for kind in DATA_KINDS:
        path = config.data.get(kind)
        out[kind] = load_jsonl(path, kind) if path else load_default(kind)
    return out


def _build_models(config: PipelineConfig):
    """``(tokenizer, policy, student, generation_kwargs)``."""
    from .tiny_models import build_policy, build_student, load_model
    from .tokenizer import default_tokenizer

    if config.model is None:
        tok = default_tokenizer()
        if config.tokenizer is not None:
            raise ValueError("tokenizer: the built-in models use the embedded character tokenizer; set model "
                             "as well to use another tokenizer")
        v = max(config.padded_vocab, tok.vocab_size)
        policy = build_policy(tok, seed=config.seed, vocab_size=v)
        student = build_student(tok, seed=config.seed + 1, vocab_size=v) if config.student is None \
            else load_model(config.student)
        # the padded ids are never sampled (the tokenizer has no text for them)
        gen = {"suppress_tokens": list(range(tok.vocab_size, v))} if v > tok.vocab_size else {}
        return tok, policy, student, gen
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    if config.student is None and "distill" in config.stages:
        raise ValueError("student: a pipeline on your own model needs a student model path for the "
                         "distillation stage (or leave 'distill' out of stages)")
    policy = load_model(config.model)
    student = load_model(config.student) if config.student else None
    return tok, policy, student, {}


def make_eval_fn(tokenizer, records: Sequence[dict], max_new_tokens: int, generation_kwargs: Dict[str, Any],
                 batch_size: int = 64) -> Callable[[torch.nn.Module], Dict[str, float]]:
    """``eval_fn(model) -> {"accuracy", "reward"}``: greedy completions of the records' prompts,
    scored against their ``answer`` by :func:`answer_reward`."""

    def eval_fn(model) -> Dict[str, float]:
        was = model.training
        model.eval()
        dev = next(model.parameters()).device
        rewards, exact = [], []
        with torch.no_grad():
            for i in range(0, len(records), batch_size):
                recs = records[i:i + batch_size]
                enc = prompt_batch(tokenizer, [r["prompt"] for r in recs])
                out = model.generate(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                                     do_sample=False, max_new_tokens=max_new_tokens,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     **generation_kwargs)
                comp = out[:, enc["input_ids"].shape[1]:].cpu()
                mask, _ = completion_mask(comp, tokenizer.eos_token_id)
                for r, row, m in zip(recs, comp, mask):
                    text = decode(tokenizer, row[m].tolist())
                    rewards.append(answer_reward(text, r["answer"]))
                    exact.append(float(rewards[-1] == 1.0))
        model.train(was)
        return {"accuracy": sum(exact) / len(exact), "reward": sum(rewards) / len(rewards)}

    return eval_fn


# -- stages ------------------------------------------------------------------------------------
def _split(stage: str, options: Dict[str, Any], config: PipelineConfig, out_dir: Optional[str],
           backend: str, **overrides) -> tuple:
    train = {k: v for k, v in options.items() if k in _TRAIN_KEYS}
    objective = {k: v for k, v in options.items() if k not in _TRAIN_KEYS}
    train.setdefault("seed", config.seed)
    train.update(backend=backend, out_dir=out_dir, **overrides)
    try:
        return TrainConfig.from_dict(train, where=stage), objective
    except ValueError as e:
        raise ValueError(f"{stage}: {e}") from None


def _objective(stage: str, options: Dict[str, Any], data, tok, gen_kwargs, max_new_tokens, teacher):
    cls = {"sft": SFT, "preference": Preference, "rl": PolicyGradient, "distill": Distill}[stage]
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in options if k not in params]
        if unknown:
            known = sorted(set(params) - {"self", "records", "tokenizer", "teacher", "reward_fns"} | _TRAIN_KEYS)
            raise ValueError(f"{stage}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    try:
        if stage == "sft":
            return SFT(data["sft"], tok, **options)
        if stage == "preference":
            return Preference(data["preference"], tok, **options)
        if stage == "rl":
            options = dict(options)
            options.setdefault("max_new_tokens", max_new_tokens)
            options["generation_kwargs"] = {**gen_kwargs, **options.get("generation_kwargs", {})}
            return PolicyGradient(data["rl"], tok, [answer_rewards], **options)
        return Distill(data["sft"], tok, teacher, **options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{stage}: {e}") from None


def _compare(stage, model, options, config, data, tok, gen, teacher) -> List[Dict[str, Any]]:
    """The stage's first ``compare_steps`` steps on the reference losses, from a copy of the model."""
    twin = copy.deepcopy(model)
    # the full run's config (so the learning rate of step k matches), stepped only compare_steps times
    tcfg, obj_opts = _split(stage, options, config, None, "reference", progress=False, log_every=0)
    trainer = Trainer(twin, _objective(stage, obj_opts, data, tok, gen, config.max_new_tokens, teacher), tcfg)
    records = [trainer.train_step() for _ in range(min(config.compare_steps, tcfg.steps))]
    del twin, trainer
    return records


def _median_step(records: Sequence[Dict[str, Any]]) -> Optional[float]:
    times = [r["time_s"] for r in records if "time_s" in r]
    if not times:
        return None
    return statistics.median(times[1:] if len(times) > 2 else times)  # the first step warms up


def _max_peak(records) -> Optional[float]:
    peaks = [r.get("peak_mem_mib") for r in records if r.get("peak_mem_mib") is not None]
    return max(peaks) if peaks else None


def run_stage(stage: str, model, config: PipelineConfig, data, tok, gen, eval_fn, teacher=None,
              log: Callable[[str], None] = print) -> StageResult:
    """One stage on ``model`` (trained in place); see :class:`StageResult`."""
    options = config.stage_options(stage)
    out_dir = os.path.join(config.out_dir, stage)
    ref_records = None
    if config.compare_reference:
        log(f"[{stage}] {config.compare_steps} steps on the reference losses, for comparison")
        ref_records = _compare(stage, model, options, config, data, tok, gen, teacher)
    tcfg, obj_opts = _split(stage, options, config, out_dir, config.backend)
    objective = _objective(stage, obj_opts, data, tok, gen, config.max_new_tokens, teacher)
    log(f"[{stage}] {tcfg.steps} steps on the fused losses (backend={config.backend})")
    t0 = time.perf_counter()
    trainer = Trainer(model, objective, tcfg, eval_fn=eval_fn, name=stage)
    history = trainer.train()
    seconds = time.perf_counter() - t0
    evals = [r for r in history if any(k.startswith("eval/") for k in r)]
    steps = [r for r in history if "loss" in r]
    before = {k[5:]: v for k, v in evals[0].items() if k.startswith("eval/")}
    after = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")}
    metric = _METRIC[stage]
    res = StageResult(stage, metric, before[metric], after[metric], before, after, trainer.step, seconds,
                      history=history)
    if ref_records:
        k = len(ref_records)
        res.fused_step_s, res.reference_step_s = _median_step(steps[:k]), _median_step(ref_records)
        res.fused_peak_mib, res.reference_peak_mib = _max_peak(steps[:k]), _max_peak(ref_records)
        res.max_loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(steps[:k], ref_records))
    return res


def run_pipeline(config: PipelineConfig, log: Callable[[str], None] = print) -> List[StageResult]:
    """Runs ``config.stages`` in order on one policy (the student for ``distill``, taught by the
    policy as it is then). Writes everything under ``config.out_dir``."""
    from ..benchmarks import measure  # noqa: F401 - pins glibc's mmap threshold: CPU peaks are then honest

    torch.manual_seed(config.seed)
    os.makedirs(config.out_dir, exist_ok=True)
    data = _load_data(config)
    tok, policy, student, gen = _build_models(config)
    eval_records = data["eval"][:config.eval_size]
    eval_fn = make_eval_fn(tok, eval_records, config.max_new_tokens, gen)
    for stage in config.stages:  # a bad option of a later stage fails now, before any stage trains
        _, obj_opts = _split(stage, config.stage_options(stage), config, None, config.backend)
        _objective(stage, obj_opts, data, tok, gen, config.max_new_tokens, policy)
    results = []
    for stage in config.stages:
        if stage == "distill":
            teacher = policy
            teacher_eval = eval_fn(teacher)
            log(f"[distill] teacher: accuracy {teacher_eval['accuracy']:.3f}, reward {teacher_eval['reward']:.3f}")
            res = run_stage(stage, student, config, data, tok, gen, eval_fn, teacher=teacher, log=log)
            res.eval_after["teacher_accuracy"] = teacher_eval["accuracy"]
            # the student was trained in place; the policy is left as the RL stage made it
        else:
            res = run_stage(stage, policy, config, data, tok, gen, eval_fn, log=log)
        results.append(res)
    write_summary(results, config)
    return results


# -- output ------------------------------------------------------------------------------------
def _fmt(x, spec=".3f", none="-"):
    return none if x is None else format(x, spec)


def summary_table(results: Sequence[StageResult]) -> str:
    """The summary as a Markdown table."""
    lines = ["| stage | steps | metric | before | after | time | step fused / reference | "
             "peak MiB fused / reference | max loss diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = "" if not (r.fused_step_s and r.reference_step_s) else \
            f" ({r.reference_step_s / r.fused_step_s:.2f}x)"
        mem = "" if not (r.fused_peak_mib and r.reference_peak_mib) else \
            f" ({r.fused_peak_mib / r.reference_peak_mib:.2f})"
        lines.append(
            f"| {_TITLES[r.stage]} | {r.steps} | {r.metric} | {r.before:.3f} | {r.after:.3f} | {r.seconds:.0f} s | "
            f"{_fmt(r.fused_step_s, '.3f')} / {_fmt(r.reference_step_s, '.3f')} s{ratio} | "
            f"{_fmt(r.fused_peak_mib, '.0f')} / {_fmt(r.reference_peak_mib, '.0f')}{mem} | "
            f"{_fmt(r.max_loss_diff, '.1e')} |")
    return "\n".join(lines)


def write_summary(results: Sequence[StageResult], config: PipelineConfig) -> None:
    out = config.out_dir
    table = summary_table(results)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"config": config.to_dict(),
                   "stages": [{k: v for k, v in asdict(r).items() if k != "history"} for r in results]},
                  f, indent=2)
    from .plots import write_plots

    write_plots(results, out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="posttrain-kernels pipeline", description=__doc__)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="a YAML or JSON file (keys: see posttrain_kernels.pipeline.config)")
    parser.add_argument("--out", help="output folder (overrides the config's out_dir)")
    parser.add_argument("--backend", help="the fused losses' backend (overrides the config)")
    parser.add_argument("--stages", help="comma-separated subset of sft,preference,rl,distill")
    parser.add_argument("--no-compare", action="store_true", help="skip the reference-loss comparison runs")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps per stage")


def run_cli(args) -> int:
    from .config import load_config

    try:
        config = load_config(args.config) if args.config else PipelineConfig()
        if args.out:
            config.out_dir = args.out
        if args.backend:
            config.backend = args.backend
        if args.stages:
            config = PipelineConfig.from_dict({**config.to_dict(), "stages": args.stages.split(",")}, "--stages")
        if args.no_compare:
            config.compare_reference = False
        if args.quick:  # a smoke run: every stage and output, a few small steps
            for stage in ("sft", "preference", "rl", "distill"):
                getattr(config, stage).update(steps=3, batch_size=8)
            config.rl.update(batch_size=4, num_generations=4)
            config.compare_steps, config.eval_size = 2, 16
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        results = run_pipeline(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(summary_table(results))
    print(f"\n{len(results)} stages in {time.perf_counter() - t0:.0f} s; wrote {config.out_dir}/summary.md, "
          f"summary.json, losses.png, rewards.png and each stage's metrics.jsonl")
    return 0
