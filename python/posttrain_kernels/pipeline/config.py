"""The pipeline's configuration: defaults for the embedded task, and YAML / JSON files that run the
same pipeline on a user's model and data.

A config file (``.yaml``, ``.yml`` or ``.json``) holds any of these keys; what it leaves out keeps
the default::

    out_dir: pipeline-out        # metrics.jsonl per stage, checkpoints, summary.md/json, plots
    seed: 0
    backend: auto                # the fused losses' backend
    compare_reference: true      # also run the first steps of each stage on the reference losses
    compare_steps: 4
    stages: [sft, preference, rl, distill]
    model: null                  # a causal LM directory (AutoModelForCausalLM); null: tiny built-in
    student: null                # the distillation student; null: tiny built-in (half size)
    tokenizer: null              # a tokenizer directory (AutoTokenizer); null: the model's, or the
                                 # embedded character tokenizer for the built-in models
    padded_vocab: 8192           # built-in models only: vocabulary rows (see below)
    data: {sft: file.jsonl, preference: ..., rl: ..., eval: ...}   # null: the embedded data
    eval_size: 200               # eval records used (greedy generation, exact match + reward)
    max_new_tokens: 12
    sft:        {steps: 200, batch_size: 32, lr: 0.001, schedule: constant, ...}
    preference: {steps: 40, batch_size: 32, lr: 0.0005, loss_type: sigmoid, beta: 0.1, nll_alpha: 1.0, ...}
    rl:         {steps: 40, batch_size: 16, lr: 0.0001, num_generations: 8, loss_type: dapo, beta: 0.04, ...}
    distill:    {steps: 300, batch_size: 32, lr: 0.003, warmup_steps: 10, divergence: forward_kl, ...}

A stage's keys are :class:`~posttrain_kernels.trainer.TrainConfig` fields (``steps``,
``batch_size``, ``grad_accum``, ``lr``, ``warmup_steps``, ``schedule``, ``max_grad_norm``,
``bf16``, ...) and the options of its objective (:class:`~posttrain_kernels.trainer.SFT`,
``Preference``, ``PolicyGradient``, ``Distill``). Data files are JSONL with the fields of
:mod:`posttrain_kernels.pipeline.data`.

``padded_vocab``: the embedded task needs 14 token ids; the built-in models get ``padded_vocab``
rows in their embedding and head, as real models pad their vocabularies, so that the head and the
loss weigh in the step what they weigh in a real LLM (``V / H = 64`` here; Llama-3-8B has
``128256 / 4096 = 31``) and the comparison with the reference losses means something. The extra
ids are never targets, and generation never samples them (``suppress_tokens``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

STAGES = ("sft", "preference", "rl", "distill")
DATA_KINDS = ("sft", "preference", "rl", "eval")

# Tuned on the embedded task (2-core CPU): SFT leaves exact match well below 1 (long strings still
# fail), so that the later stages have room; DPO gains most with the NLL term on the chosen
# completions (RPO); GRPO needs a low learning rate at this scale (at 2e-4 it lost 13 points of
# accuracy in 60 steps), 16 prompts x 8 samples and a small KL to the starting policy.
DEFAULT_STAGE_OPTIONS: Dict[str, Dict[str, Any]] = {
    "sft": {"steps": 200, "batch_size": 32, "lr": 1e-3, "schedule": "constant"},
    "preference": {"steps": 40, "batch_size": 32, "lr": 5e-4, "loss_type": "sigmoid", "beta": 0.1,
                   "nll_alpha": 1.0, "schedule": "constant"},
    "rl": {"steps": 40, "batch_size": 16, "lr": 1e-4, "num_generations": 8, "loss_type": "dapo",
           "beta": 0.04, "temperature": 1.0, "schedule": "constant"},
    "distill": {"steps": 300, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10,
                "divergence": "forward_kl"},
}


@dataclass
class PipelineConfig:
    """See the module docstring for every key."""

    out_dir: str = "pipeline-out"
    seed: int = 0
    backend: str = "auto"
    compare_reference: bool = True
    compare_steps: int = 4
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    model: Optional[str] = None
    student: Optional[str] = None
    tokenizer: Optional[str] = None
    padded_vocab: int = 8192
    data: Dict[str, Optional[str]] = field(default_factory=dict)
    eval_size: int = 200
    max_new_tokens: int = 12
    sft: Dict[str, Any] = field(default_factory=dict)
    preference: Dict[str, Any] = field(default_factory=dict)
    rl: Dict[str, Any] = field(default_factory=dict)
    distill: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise ValueError(f"stages: expected a non-empty list among {', '.join(STAGES)}, got {self.stages!r}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"stages: unknown stage(s) {', '.join(map(str, bad))}; known: {', '.join(STAGES)}")
        if not isinstance(self.data, dict):
            raise ValueError(f"data: expected a mapping of {', '.join(DATA_KINDS)} to JSONL paths, got {self.data!r}")
        bad = [k for k in self.data if k not in DATA_KINDS]
        if bad:
            raise ValueError(f"data: unknown kind(s) {', '.join(bad)}; known: {', '.join(DATA_KINDS)}")
        for name in ("compare_steps", "eval_size", "max_new_tokens", "padded_vocab"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        for stage in STAGES:
            opts = getattr(self, stage)
            if not isinstance(opts, dict):
                raise ValueError(f"{stage}: expected a mapping of options, got {opts!r}")
            merged = copy.deepcopy(DEFAULT_STAGE_OPTIONS[stage])
            merged.update(opts)
            setattr(self, stage, merged)

    def stage_options(self, stage: str) -> Dict[str, Any]:
        return dict(getattr(self, stage))

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], where: str = "config") -> "PipelineConfig":
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a mapping at the top level, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def load_config(path: str) -> PipelineConfig:
    """A :class:`PipelineConfig` from a ``.json``, ``.yaml`` or ``.yml`` file; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no file {path}")
    ext = os.path.splitext(path)[1].lower()
    with open(path) as f:
        text = f.read()
    if ext == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    elif ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"{path}: reading YAML needs PyYAML (pip install pyyaml, or the "
                              "'pipeline' extra); JSON needs nothing") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
        values = {} if values is None else values
    else:
        raise ValueError(f"config: expected a .json, .yaml or .yml file, got {path}")
    return PipelineConfig.from_dict(values, where=path)
