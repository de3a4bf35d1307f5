"""The ``posttrain-kernels pipeline`` job: its configuration and data files fail clearly (the
message names the file, line, stage or option), and the command line runs every stage end to end
(fused and reference losses), writing the summary, the plots and each stage's metrics."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from posttrain_kernels.pipeline import run as R  # noqa: E402
from posttrain_kernels.pipeline import task  # noqa: E402
from posttrain_kernels.pipeline.config import DEFAULT_STAGE_OPTIONS, STAGES, PipelineConfig, load_config  # noqa: E402
from posttrain_kernels.pipeline.data import load_jsonl  # noqa: E402

# the embedded task on the built-in models with a small padded vocabulary and small batches: every
# stage's step takes milliseconds
SMALL = {"padded_vocab": 64, "eval_size": 8, "max_new_tokens": 6,
         "sft": {"batch_size": 4}, "preference": {"batch_size": 4},
         "rl": {"batch_size": 2, "num_generations": 2}, "distill": {"batch_size": 4}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add synchronization (the CPU has 2 shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write(path, text):
    path.write_text(text)
    return str(path)


def cli(*args):
    """``main(argv)`` in this process: the exit code."""
    return R.main([str(a) for a in args])


# -- the reward --------------------------------------------------------------------------------
def test_answer_reward_matches_task_reward():
    prompt = "abcd="
    for completion, want in [("dcba", 1.0), (" dcba\n", 1.0), ("dcbx", 0.375), ("dcb", 0.375), ("dcbaa", 0.4),
                             ("dxxa", 0.25), ("abcd", 0.0), ("", 0.0)]:
        assert R.answer_reward(completion, "dcba") == pytest.approx(want), completion
        assert R.answer_reward(completion, "dcba") == pytest.approx(task.reward(prompt, completion))
    assert R.answer_rewards(["abcd="] * 2, ["dcba", "x"], answer=["dcba", "dcba"]) == [1.0, 0.0]


# -- the configuration -------------------------------------------------------------------------
def test_config_defaults_and_merge():
    c = PipelineConfig(sft={"steps": 5})
    assert c.stages == list(STAGES)
    assert c.sft == {**DEFAULT_STAGE_OPTIONS["sft"], "steps": 5}
    assert c.preference == DEFAULT_STAGE_OPTIONS["preference"]
    assert PipelineConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("values, message", [
    ({"stages": ["sft", "ppo"]}, r"stages: unknown stage\(s\) ppo"),
    ({"stages": []}, "stages: expected a non-empty list"),
    ({"stages": "sft"}, "stages: expected a non-empty list"),
    ({"data": {"train": "x.jsonl"}}, r"data: unknown kind\(s\) train"),
    ({"data": ["x.jsonl"]}, "data: expected a mapping"),
    ({"sft": [1, 2]}, "sft: expected a mapping"),
    ({"compare_steps": 0}, "compare_steps: expected an integer >= 1"),
    ({"eval_size": True}, "eval_size: expected an integer >= 1"),
    ({"modle": "x"}, r"unknown key\(s\) modle"),
])
def test_config_errors(values, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig.from_dict(values, where="my.yaml")
    with pytest.raises(ValueError, match="^my.yaml: "):
        PipelineConfig.from_dict(values, where="my.yaml")


def test_load_config_files(tmp_path):
    pytest.importorskip("yaml")
    good = write(tmp_path / "c.yaml", "seed: 3\nstages: [sft, rl]\nsft:\n  steps: 7\n  label_smoothing: 0.1\n")
    c = load_config(good)
    assert c.seed == 3 and c.stages == ["sft", "rl"] and c.sft["steps"] == 7 and c.sft["label_smoothing"] == 0.1
    assert load_config(write(tmp_path / "empty.yml", "")) == PipelineConfig()
    assert load_config(write(tmp_path / "c.json", json.dumps({"seed": 4}))).seed == 4

    bad_yaml = write(tmp_path / "bad.yaml", "seed: 0\nsft:\n  steps: [1, 2\nrl: {}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid YAML at line \d+"):
        load_config(bad_yaml)
    bad_json = write(tmp_path / "bad.json", '{\n  "seed": 0,\n  "stages": [sft]\n}\n')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 3"):
        load_config(bad_json)
    with pytest.raises(ValueError, match=r"unknown\.json: unknown key\(s\) epochs"):
        load_config(write(tmp_path / "unknown.json", '{"epochs": 3}'))
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping at the top level, got list"):
        load_config(write(tmp_path / "list.yaml", "- sft\n- rl\n"))
    with pytest.raises(ValueError, match=r"expected a \.json, \.yaml or \.yml file"):
        load_config(write(tmp_path / "c.toml", "seed = 0\n"))
    with pytest.raises(FileNotFoundError, match="no file"):
        load_config(str(tmp_path / "missing.yaml"))


# -- data files --------------------------------------------------------------------------------
def test_load_jsonl_errors_name_file_and_line(tmp_path):
    good = '{"prompt": "ab=", "completion": "ba"}\n'
    p = write(tmp_path / "sft.jsonl", good + "\n" + good)
    assert len(load_jsonl(p, "sft")) == 2  # blank lines are skipped
    cases = [
        ("sft", good + "\n" + '{"prompt": "ab=", "completion": "ba"\n', r"sft\.jsonl:3: invalid JSON"),
        ("sft", good + '{"prompt": "ab="}\n', r"sft\.jsonl:2: missing field 'completion'"),
        ("sft", good + '{"prompt": "ab=", "completion": 5}\n', r"sft\.jsonl:2: field 'completion' must be a string"),
        ("sft", '[1, 2]\n', r"sft\.jsonl:1: expected a JSON object"),
        ("sft", '{"prompt": "", "completion": "x"}\n', r"sft\.jsonl:1: field 'prompt' is empty"),
        ("preference", '{"prompt": "ab=", "chosen": "ba", "rejected": "ba"}\n',
         r"sft\.jsonl:1: 'chosen' and 'rejected'"),
        ("rl", good, r"sft\.jsonl:1: missing field 'answer'"),
        ("sft", "\n\n", r"sft\.jsonl: no records"),
    ]
    for kind, text, message in cases:
        with pytest.raises(ValueError, match=message):
            load_jsonl(write(tmp_path / "sft.jsonl", text), kind)
    with pytest.raises(ValueError, match="kind"):
        load_jsonl(p, "dpo")
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "nope.jsonl", "sft")


# -- the command line: errors ------------------------------------------------------------------
def _config_file(tmp_path, **values):
    return write(tmp_path / "config.json", json.dumps({**SMALL, "out_dir": str(tmp_path / "out"), **values}))


@pytest.mark.parametrize("values, message", [
    # a bad option of a later stage fails before any stage trains
    ({"stages": ["sft", "distill"], "distill": {"foo": 1}}, r"distill: unknown option\(s\) foo"),
    ({"stages": ["sft", "preference"], "preference": {"foo": 1}}, r"preference: .*unknown option\(s\) foo"),
    ({"stages": ["sft", "rl"], "rl": {"epsilon_hgh": 0.3}}, r"rl: .*unknown option\(s\) epsilon_hgh"),
    ({"stages": ["sft", "rl"], "rl": {"num_generations": 1}}, "rl: num_generations: expected >= 2"),
    ({"stages": ["sft", "preference"], "preference": {"loss_type": "dpo"}}, "preference: loss_type"),
    ({"stages": ["preference", "sft"], "sft": {"steps": 0}}, "sft: steps: expected an integer >= 1"),
    ({"stages": ["sft", "rl"], "rl": {"schedule": "step"}}, "rl: schedule: expected one of"),
])
def test_cli_bad_stage_options(tmp_path, capsys, values, message):
    assert cli("--config", _config_file(tmp_path, **values)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not os.path.exists(tmp_path / "out" / "sft"), "a stage trained before the error"


def test_cli_bad_data_file(tmp_path, capsys):
    bad = write(tmp_path / "mine.jsonl", '{"prompt": "ab=", "completion": "ba"}\n{"prompt": "ab=", "answer": "ba"}\n')
    assert cli("--config", _config_file(tmp_path, data={"sft": bad}), "--stages", "sft") == 2
    err = capsys.readouterr().err
    assert "mine.jsonl:2: missing field 'completion'" in err, err


def test_cli_bad_arguments(tmp_path, capsys):
    assert cli("--stages", "sft,ppo", "--out", tmp_path) == 2
    assert "unknown stage(s) ppo" in capsys.readouterr().err
    assert cli("--config", tmp_path / "missing.yaml") == 2
    assert "no file" in capsys.readouterr().err


def test_cli_bad_config_subprocess(tmp_path):
    bad = write(tmp_path / "bad.json", '{\n  "seed": 0,\n  "sft": {"steps": 3,}\n}\n')
    p = subprocess.run([sys.executable, "-m", "posttrain_kernels", "pipeline", "--config", bad, "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "bad.json: invalid JSON at line 3" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# -- the command line: a whole run -------------------------------------------------------------
def test_cli_quick_run_all_stages(tmp_path):
    """``python -m posttrain_kernels pipeline --quick`` with the reference comparison, on small
    batches (the defaults' --quick takes over a minute on 2 CPU cores)."""
    out = tmp_path / "out"
    config = _config_file(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "posttrain_kernels", "pipeline", "--quick", "--config", config,
                        "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| SFT | 3 |" in p.stdout and "distillation" in p.stdout
    for name in ("summary.md", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        for name in ("losses.png", "rewards.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == list(STAGES)
    for s in summary["stages"]:
        assert s["steps"] == 3
        assert s["max_loss_diff"] is not None and s["max_loss_diff"] < 1e-4, s
        assert s["fused_step_s"] > 0 and s["reference_step_s"] > 0
    for stage in STAGES:
        records = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3], stage
        evals = [r for r in records if "eval/accuracy" in r]
        assert [r["step"] for r in evals] == [0, 3], stage
        assert (out / stage / "checkpoint.pt").is_file()


def test_run_pipeline_in_any_stage_order(tmp_path):
    """Distillation reads its teacher (the policy) without training it; a later stage still
    trains the policy."""
    config = PipelineConfig.from_dict({**SMALL, "out_dir": str(tmp_path), "compare_reference": False,
                                       "stages": ["distill", "sft"], "eval_size": 4,
                                       "distill": {"steps": 2, "batch_size": 2}, "sft": {"steps": 2, "batch_size": 2}})
    results = R.run_pipeline(config, log=lambda s: None)
    assert [r.stage for r in results] == ["distill", "sft"]
    assert all(r.steps == 2 and r.max_loss_diff is None for r in results)
    assert "teacher_accuracy" in results[0].eval_after
    assert (tmp_path / "summary.md").read_text().count("\n") == 4


def test_pipeline_on_saved_models_and_tokenizer(tmp_path):
    """The config's model / student / tokenizer paths: Hugging Face directories (AutoModelForCausalLM,
    AutoTokenizer), as a user's own model would be, here the tiny ones saved with save_pretrained
    and the task's tokenizer as a PreTrainedTokenizerFast."""
    from posttrain_kernels.pipeline.tiny_models import build_policy, build_student
    from posttrain_kernels.pipeline.tokenizer import default_tokenizer

    tok = default_tokenizer()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    build_policy(tok, seed=0, **small).save_pretrained(tmp_path / "policy")
    build_student(tok, seed=1, **small).save_pretrained(tmp_path / "student")
    tok.to_hf().save_pretrained(tmp_path / "tokenizer")
    config = PipelineConfig.from_dict({
        "out_dir": str(tmp_path / "out"), "model": str(tmp_path / "policy"), "student": str(tmp_path / "student"),
        "tokenizer": str(tmp_path / "tokenizer"), "stages": ["sft", "distill"], "compare_steps": 2,
        "eval_size": 4, "max_new_tokens": 6,
        "sft": {"steps": 3, "batch_size": 4}, "distill": {"steps": 2, "batch_size": 4}})
    results = R.run_pipeline(config, log=lambda s: None)
    assert [r.stage for r in results] == ["sft", "distill"]
    for r in results:
        assert r.max_loss_diff is not None and r.max_loss_diff < 1e-4, r
        assert all(math.isfinite(h["loss"]) for h in r.history if "loss" in h)
    with pytest.raises(ValueError, match="student"):
        R.run_pipeline(PipelineConfig.from_dict({"out_dir": str(tmp_path / "o2"), "model": str(tmp_path / "policy"),
                                                 "tokenizer": str(tmp_path / "tokenizer")}), log=lambda s: None)
