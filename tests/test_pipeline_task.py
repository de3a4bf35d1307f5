"""The pipeline's embedded task: generators, reward, tokenizer, batch tensors, data files, tiny models."""
import json
import zlib

import pytest
import torch

from posttrain_kernels.pipeline import data, task
from posttrain_kernels.pipeline import tokenizer as T
from posttrain_kernels.trainer import batches as B
from posttrain_kernels.pipeline.task import ReverseTask

GENERATORS = [task.sft_examples, task.preference_pairs, task.rl_prompts, task.eval_prompts]
FIELDS = {task.sft_examples: ("prompt", "completion"),
          task.preference_pairs: ("prompt", "chosen", "rejected"),
          task.rl_prompts: ("prompt", "answer"), task.eval_prompts: ("prompt", "answer")}


@pytest.fixture(scope="module")
def tok():
    return T.default_tokenizer()


def _held_out(prompt):
    return zlib.crc32(prompt[:-1].encode()) % 10 == 0


# ---------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("gen", GENERATORS, ids=lambda g: g.__name__)
def test_generators_deterministic_and_well_formed(gen):
    a, b = gen(300, 7), gen(300, 7)
    assert a == b
    assert gen(300, 8) != a
    assert gen(40, 7) == a[:40]  # prefix property
    assert gen(0, 7) == []
    for r in a:
        assert tuple(r) == FIELDS[gen]
        s = task.parse_prompt(r["prompt"])
        assert 3 <= len(s) <= 10 and set(s) <= set("abcdefghij")
        target = r.get("completion", r.get("answer", r.get("chosen")))
        assert target == s[::-1] == task.answer(r["prompt"])
        # the held-out split: eval prompts are held-out strings, the others never are
        assert _held_out(r["prompt"]) == (gen is task.eval_prompts)


def test_generators_use_independent_streams():
    assert [r["prompt"] for r in task.sft_examples(50, 0)] != [r["prompt"] for r in task.rl_prompts(50, 0)]


def test_eval_prompts_distinct():
    prompts = [r["prompt"] for r in task.eval_prompts(500, 3)]
    assert len(set(prompts)) == 500
    with pytest.raises(ValueError, match="held-out"):
        ReverseTask(letters="ab", min_len=3, max_len=3).eval_prompts(5, 0)


def test_preference_pairs_rejected_is_plausible_and_wrong():
    pairs = task.preference_pairs(400, 0)
    kinds = set()
    for r in pairs:
        assert r["rejected"] != r["chosen"] == task.answer(r["prompt"])
        assert task.reward(r["prompt"], r["chosen"]) == 1.0
        assert task.reward(r["prompt"], r["rejected"]) < 1.0
        c, w, s = r["chosen"], r["rejected"], task.parse_prompt(r["prompt"])
        if w == s:
            kinds.add("unreversed")
        elif len(w) == len(c) - 1:
            kinds.add("drop")
        elif len(w) == len(c) + 1:
            kinds.add("double")
        elif sorted(w) == sorted(c):
            kinds.add("swap")
        else:
            kinds.add("replace")
    assert kinds == {"unreversed", "drop", "double", "swap", "replace"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="n:"):
        task.sft_examples(-1, 0)
    with pytest.raises(TypeError, match="seed"):
        task.rl_prompts(3, "0")
    with pytest.raises(ValueError, match="min_len"):
        ReverseTask(min_len=5, max_len=4)
    with pytest.raises(ValueError, match="letters"):
        ReverseTask(letters="aA")


# ------------------------------------------------------------------------------------- reward
def test_reward_known_cases():
    p = "abcd="  # answer "dcba"
    assert task.answer(p) == "dcba"
    assert task.reward(p, "dcba") == 1.0
    assert task.reward(p, " dcba\n") == 1.0
    assert task.reward(p, "dcbx") == pytest.approx(0.375)
    assert task.reward(p, "dcb") == pytest.approx(0.375)
    assert task.reward(p, "dcbaa") == pytest.approx(0.4)
    assert task.reward(p, "dxxa") == pytest.approx(0.25)
    assert task.reward(p, "abcd") == 0.0
    assert task.reward(p, "") == 0.0
    assert task.reward(p, "dcba=j") < 1.0


def test_reward_partial_credit_ordering():
    p = "abcdefgh="
    good = task.answer(p)
    # one more wrong letter never scores more; every wrong completion scores below 0.5
    ladder = [good] + [good[:len(good) - k] + "j" * k for k in range(1, len(good) + 1)]
    scores = [task.reward(p, c) for c in ladder]
    assert scores[0] == 1.0
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert max(scores[1:]) < 0.5
    assert scores[-1] == 0.0


def test_accuracy_and_evaluate():
    prompts = ["abc=", "cab=", "jjb="]
    completions = ["cba", "bca", "bj"]
    assert task.exact_match("abc=", "cba") and not task.exact_match("cab=", "bca")
    assert task.accuracy(prompts, completions) == pytest.approx(1 / 3)
    assert task.rewards(prompts, completions)[0] == 1.0
    m = task.evaluate(prompts, completions)
    assert m["accuracy"] == pytest.approx(1 / 3) and m["n"] == 3
    assert m["reward"] == pytest.approx(sum(task.rewards(prompts, completions)) / 3)
    assert task.accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="as many completions"):
        task.accuracy(prompts, completions[:2])
    for bad in ["abc", "=", "abz=", "ABC="]:
        with pytest.raises(ValueError, match="not a prompt"):
            task.reward(bad, "cba")


# ---------------------------------------------------------------------------------- tokenizer
def test_tokenizer_vocab_and_round_trip(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.vocab_size == len(tok) == 14 == len(tok.get_vocab())
    assert tok.encode("bad=") == [4, 3, 6, 13]
    assert tok.encode("ab", add_bos=True, add_eos=True) == [1, 3, 4, 2]
    for r in task.sft_examples(50, 1):
        text = r["prompt"] + r["completion"]
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
    assert tok.decode([1, 6, 3, 4, 2, 7]) == "dab"  # skips bos, stops at eos
    assert tok.decode([6, 0, 3, 2, 7], stop_at_eos=False) == "dae"
    # the Hugging Face keywords, for code written against HF tokenizers
    assert tok.encode("ab", add_special_tokens=True) == [1, 3, 4]
    assert tok.encode("ab", add_special_tokens=False) == [3, 4]
    assert tok.decode([1, 3, 2, 4], skip_special_tokens=True) == "a"
    assert tok.decode([1, 3, 2, 4], skip_special_tokens=False) == "<bos>a"
    assert tok.decode([0, 3, 2, 4], skip_special_tokens=False, stop_at_eos=False) == "<pad>a<eos>b"
    assert tok.decode(torch.tensor([5, 5, 2])) == "cc"
    assert tok.batch_decode(torch.tensor([[3, 2, 3], [4, 4, 0]])) == ["a", "bb"]
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([14])


def test_tokenizer_hf_equivalent(tok):
    hf = tok.to_hf()
    assert hf.pad_token_id == tok.pad_token_id and hf.eos_token_id == tok.eos_token_id
    assert hf.bos_token_id == tok.bos_token_id and len(hf) == tok.vocab_size
    for r in task.sft_examples(20, 2):
        assert hf(r["prompt"])["input_ids"] == tok.encode(r["prompt"])
    assert hf.decode(tok.encode("abc=cba"), skip_special_tokens=True) == "abc=cba"


# ------------------------------------------------------------------------------------- batches
# The trainer's batch builders (posttrain_kernels.trainer.batches) with the task's tokenizer.
def test_sft_batch(tok):
    ex = [{"prompt": "abc=", "completion": "cba"}, {"prompt": "abcdefgh=", "completion": "hgfedcba"}]
    b = B.completion_batch(tok, [r["prompt"] for r in ex], [r["completion"] for r in ex])
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (2, 19)
    assert b["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == torch.long
    row0 = [1] + tok.encode("abc=") + tok.encode("cba") + [2]
    assert b["input_ids"][0].tolist() == row0 + [0] * (19 - len(row0))
    assert b["attention_mask"][0].tolist() == [1] * len(row0) + [0] * (19 - len(row0))
    assert b["labels"][0].tolist() == [-100] * 5 + tok.encode("cba") + [2] + [-100] * (19 - len(row0))
    assert b["labels"][1].tolist() == [-100] * 10 + tok.encode("hgfedcba") + [2]


def test_preference_batch_chosen_then_rejected(tok):
    pairs = [{"prompt": "abc=", "chosen": "cba", "rejected": "abc"},
             {"prompt": "abcd=", "chosen": "dcba", "rejected": "dcbaa"}]
    b = B.preference_batch(tok, pairs)
    assert b["input_ids"].shape == (4, 12)
    completion = b["labels"] != -100
    decoded = [tok.decode(r[m].tolist()) for r, m in zip(b["input_ids"], completion)]
    assert decoded == ["cba", "dcba", "abc", "dcbaa"]
    assert torch.equal(b["input_ids"][:2, :5], b["input_ids"][2:, :5])  # same prompts
    assert completion.sum(1).tolist() == [4, 5, 4, 6]  # completion + eos


def test_prompt_batch_left_padded_and_completion_mask(tok):
    g = B.prompt_batch(tok, ["abc=", "abcdef="])
    assert g["input_ids"].tolist() == [[0, 0, 0, 1] + tok.encode("abc="),
                                       [1] + tok.encode("abcdef=")]
    assert g["attention_mask"].tolist() == [[0, 0, 0] + [1] * 5, [1] * 8]
    # a fake generate() output: row 0 stops at eos (then pads), row 1 never does
    gen = torch.tensor([[6, 5, 2, 0], [8, 7, 6, 5]])
    mask, truncated = B.completion_mask(gen, tok.eos_token_id)
    assert mask.tolist() == [[True, True, True, False], [True] * 4]
    assert truncated.tolist() == [False, True]
    assert [B.decode(tok, r[m].tolist()) for r, m in zip(gen, mask)] == ["dc", "fedc"]


def test_batch_errors(tok):
    with pytest.raises(ValueError, match="alphabet"):
        B.completion_batch(tok, ["abc="], ["xyz"])


# ---------------------------------------------------------------------------------- data files
@pytest.mark.parametrize("kind", sorted(data.SCHEMAS))
def test_shipped_files_equal_regenerated(kind):
    path = data.default_path(kind)
    assert path.read_bytes() == data.dumps_jsonl(data.default_records(kind)).encode("ascii")
    records = data.load_default(kind)
    assert records == data.default_records(kind)
    assert len(records) == data.DEFAULT_SPECS[kind][2]


def test_write_default_data_reproduces_shipped(tmp_path):
    paths = data.write_default_data(tmp_path)
    for kind, p in paths.items():
        assert p.read_bytes() == data.default_path(kind).read_bytes()
    assert data.check_default_data(tmp_path) == []
    paths["rl"].write_text(paths["rl"].read_text()[:-40])
    assert data.check_default_data(tmp_path) == ["rl"]
    assert data.main(["--check", "--out", str(tmp_path)]) == 1


def test_shipped_eval_is_held_out():
    train = {r["prompt"] for k in ("sft", "preference", "rl") for r in data.load_default(k)}
    held_out = {r["prompt"] for r in data.load_default("eval")}
    assert not train & held_out


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


@pytest.mark.parametrize("kind,line,match", [
    ("sft", '{"prompt": "abc=", "completion": "cba"', r"invalid JSON"),
    ("sft", '["abc=", "cba"]', r"expected a JSON object"),
    ("sft", '{"prompt": "abc="}', r"missing field 'completion'"),
    ("preference", '{"prompt": "abc="}', r"missing fields 'chosen', 'rejected'"),
    ("rl", '{"prompt": "abc=", "answer": 7}', r"field 'answer' must be a string, got int"),
    ("sft", '{"prompt": null, "completion": "cba"}', r"field 'prompt' must be a string, got NoneType"),
    ("eval", '{"prompt": "", "answer": "x"}', r"'prompt' is empty"),
    ("preference", '{"prompt": "a=", "chosen": "a", "rejected": "a"}', r"the same text"),
])
def test_load_jsonl_errors_name_file_and_line(tmp_path, kind, line, match):
    good = json.dumps({f: "abc=" if f == "prompt" else ("x" if f == "rejected" else "cba")
                       for f in data.SCHEMAS[kind]})
    p = _write(tmp_path, f"my_{kind}.jsonl", [good, "", good, line, good])
    with pytest.raises(ValueError, match=match) as e:
        data.load_jsonl(p, kind)
    assert str(e.value).startswith(f"{p}:4: ")


def test_load_jsonl_accepts_blank_lines_and_extra_fields(tmp_path):
    p = _write(tmp_path, "sft.jsonl", ['{"prompt": "ab=", "completion": "ba", "id": 3}', "   ",
                                       '{"completion": "a", "prompt": "a="}'])
    assert data.load_jsonl(p, "sft") == [{"prompt": "ab=", "completion": "ba", "id": 3},
                                         {"completion": "a", "prompt": "a="}]
    with pytest.raises(ValueError, match="no records"):
        data.load_jsonl(_write(tmp_path, "empty.jsonl", [""]), "sft")
    with pytest.raises(ValueError, match="kind"):
        data.load_jsonl(p, "dpo")


# --------------------------------------------------------------------------------- tiny models
def test_tiny_models_generate_with_tokenizer_ids(tok):
    from posttrain_kernels.pipeline import tiny_models as M

    policy, student = M.build_policy(tok, seed=0), M.build_student(tok)
    for m in (policy, student):
        assert m.config.vocab_size == tok.vocab_size
        assert m.get_output_embeddings().weight.shape[0] == tok.vocab_size
        assert m.generation_config.eos_token_id == tok.eos_token_id
        assert m.generation_config.pad_token_id == tok.pad_token_id
    assert policy.config.num_hidden_layers == 4 and policy.config.hidden_size == 128
    assert student.config.num_hidden_layers == 3 and student.config.hidden_size == 96
    state = torch.random.get_rng_state()
    again = M.build_policy(tok, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), again.parameters()))
    assert not torch.equal(M.build_policy(tok, seed=1).lm_head.weight, policy.lm_head.weight)

    prompts = ["abc=", "abcdefghij="]
    g = B.prompt_batch(tok, prompts)
    policy.eval()
    with torch.no_grad():
        out = policy.generate(**g, **M.generation_kwargs(tok, 6))
        alone = policy.generate(**B.prompt_batch(tok, prompts[:1]), **M.generation_kwargs(tok, 6))
        sampled = policy.generate(**g, **M.generation_kwargs(tok, 6, do_sample=True, num_return_sequences=3))
    P = g["input_ids"].shape[1]
    assert out.shape[0] == 2 and P < out.shape[1] <= P + 6
    assert torch.equal(out[:, :P], g["input_ids"])
    # left padding does not change the greedy continuation of the short prompt
    n = min(alone.shape[1] - 5, out.shape[1] - P)
    assert torch.equal(out[0, P:P + n], alone[0, 5:5 + n])
    assert sampled.shape[0] == 6
    mask, _ = B.completion_mask(out[:, P:], tok.eos_token_id)
    texts = [B.decode(tok, r[m].tolist()) for r, m in zip(out[:, P:], mask)]
    assert len(texts) == 2 and len(task.rewards(prompts, texts)) == 2

    ex = task.sft_examples(4, 0)
    b = B.completion_batch(tok, [r["prompt"] for r in ex], [r["completion"] for r in ex])
    loss = policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    assert torch.isfinite(loss) and 2.0 < loss.item() < 3.5  # ~ log(14) at random init


def test_load_model_round_trip(tmp_path, tok):
    from posttrain_kernels.pipeline import tiny_models as M

    m = M.build_student(tok, seed=3)
    m.save_pretrained(tmp_path)
    loaded = M.load_model(str(tmp_path))
    assert loaded.training
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)
