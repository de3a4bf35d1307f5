"""The ``posttrain-kernels pipeline`` job: SFT -> preference (DPO) -> RL (GRPO) -> distillation on an
embedded default task, on a CPU in minutes, with nothing downloaded.

Modules (import them directly; this ``__init__`` imports none of them, and only
:mod:`.tiny_models` imports ``transformers``, when its functions are called):

* :mod:`.task`: the default task (reverse a short string of letters), its seeded generators
  (``sft_examples``, ``preference_pairs``, ``rl_prompts``, ``eval_prompts``), ``reward`` (partial
  credit) and ``accuracy`` (exact match).
* :mod:`.tokenizer`: ``CharTokenizer`` (pad/bos/eos + one id per character).
* :mod:`.data`: JSONL schemas, ``load_jsonl(path, kind)`` (validating, errors name file and line),
  the shipped default files under ``data/`` and their regenerator.
* :mod:`.tiny_models`: tiny random-weight Llama policy/teacher and student sharing the tokenizer's
  vocabulary, ``generation_kwargs``, and ``load_model(path)`` for a user's model.
* :mod:`.config`: ``PipelineConfig`` and ``load_config`` (YAML / JSON).
* :mod:`.run`: ``run_pipeline``, the stages on :mod:`posttrain_kernels.trainer`, the summary
  table and the ``posttrain-kernels pipeline`` command; :mod:`.plots`: its PNGs.
"""
