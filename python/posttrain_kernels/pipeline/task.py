"""The embedded default task of the ``posttrain-kernels pipeline`` job: reverse a short string.

A prompt is a string of lowercase letters followed by ``"="``; the completion is the letters in
reverse order::

    "bdfa="  ->  "afdb"
    "jjcab=" ->  "bacjj"

Why this task: it is verifiable by a one-line rule, it needs no tokenizer beyond single
characters (a vocabulary of 14 ids), and a tiny transformer (4 layers, hidden 128) learns it on a
CPU in a few hundred steps, gradually: after ~100 SFT steps it reverses the short strings and
fails on the long ones, so exact-match accuracy sits between 0 and 1 long enough for preference
training (DPO) and RL (GRPO) to move it further. Its errors are the ones the rejected
completions imitate (a swapped, dropped, doubled or wrong letter, or the input copied unreversed),
and each output position is checkable on its own, so the reward has partial credit (one correct
letter more is worth more) and is informative for GRPO even when no sample is exactly right.
(Small-number addition, the other candidate, stays below 10% exact match after 300 steps at
this scale, too little for the later stages to work with.)

Everything is plain Python and deterministic: a generator called with the same ``(n, seed)``
returns the same records on every run, machine and Python version (``random.Random`` seeded with a
string), and the first ``k`` records of ``f(n, seed)`` are ``f(k, seed)``. Generators with
different names draw from independent streams.

Held-out split: a string whose CRC32 is divisible by 10 (about 10% of all strings) is an *eval*
string; :func:`sft_examples`, :func:`preference_pairs` and :func:`rl_prompts` never produce one,
:func:`eval_prompts` produces nothing else (and no duplicates), so evaluation measures
generalization, not memorization.

Record layouts (the JSONL schemas of :mod:`posttrain_kernels.pipeline.data`)::

    sft_examples      -> [{"prompt": "bdfa=", "completion": "afdb"}, ...]
    preference_pairs  -> [{"prompt": "bdfa=", "chosen": "afdb", "rejected": "afbd"}, ...]
    rl_prompts        -> [{"prompt": "bdfa=", "answer": "afdb"}, ...]
    eval_prompts      -> [{"prompt": "bdfa=", "answer": "afdb"}, ...]

Completions never contain the special tokens; the batching helpers of
:mod:`posttrain_kernels.pipeline.tokenizer` add bos before the prompt and eos after the
completion.

Scoring: :func:`reward` (1.0 exact, partial credit in ``[0, 0.5)`` otherwise), :func:`rewards`
(a list), :func:`exact_match`, :func:`accuracy`, :func:`evaluate` (both metrics at once).

The module-level functions are the methods of :data:`DEFAULT_TASK`; build another
:class:`ReverseTask` (other letters or lengths) for a harder or easier variant.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Dict, List, Sequence

__all__ = [
    "ReverseTask", "DEFAULT_TASK", "SEPARATOR", "PARTIAL_CREDIT_WEIGHT",
    "sft_examples", "preference_pairs", "rl_prompts", "eval_prompts",
    "make_prompt", "parse_prompt", "answer", "answer_reward", "reward", "rewards", "exact_match", "accuracy",
    "evaluate", "alphabet",
]

#: Ends every prompt (``"bdfa="``).
SEPARATOR = "="
#: A wrong completion scores ``PARTIAL_CREDIT_WEIGHT * (fraction of right letters)`` (< 0.5).
PARTIAL_CREDIT_WEIGHT = 0.5

Record = Dict[str, str]


def answer_reward(completion: str, answer: str) -> float:
    """The reward of ``completion`` against the correct ``answer``, in ``[0, 1]``: 1.0 when they
    are equal (surrounding whitespace ignored), 0.0 for an empty completion, else partial credit
    ``PARTIAL_CREDIT_WEIGHT * k / max(len(completion), len(answer))``, ``k`` the positions (from
    the left) where they agree. Written against the answer, so it scores any ``{"prompt",
    "answer"}`` data, not only this task's."""
    got, target = completion.strip(), answer.strip()
    if got == target:
        return 1.0
    if not got:
        return 0.0
    k = sum(1 for a, b in zip(got, target) if a == b)
    return PARTIAL_CREDIT_WEIGHT * k / max(len(got), len(target))


def _is_eval_string(s: str) -> bool:
    """The held-out rule: about 10% of strings, the same on every machine (CRC32, not ``hash``)."""
    return zlib.crc32(s.encode("ascii")) % 10 == 0


@dataclass(frozen=True)
class ReverseTask:
    """Reverse a string of ``min_len``..``max_len`` letters drawn from ``letters``.

    Fields:
        letters: the letters strings are drawn from (the tokenizer's alphabet is
            ``sorted(letters) + ["="]``, see :meth:`alphabet`).
        min_len, max_len: string lengths, drawn uniformly from ``[min_len, max_len]``.

    The defaults (10 letters, lengths 3..10; sequences of at most 1 + 11 + 10 + 1 = 23 tokens with
    bos and eos) are tuned so that the tiny policy of :mod:`.tiny_models` (4 layers, hidden 128)
    trained by SFT on the shipped ``sft.jsonl`` (AdamW, lr 1e-3, gradient clipping 1.0) is partly
    but not perfectly right for a few hundred steps. Greedy exact match on ``eval.jsonl``, measured
    on a CPU: batch 64: 6.5% after 50 steps, 27.5% after 100, 47.5% after 150, 56.5% after 200,
    73.5% after 300; batch 32: 14.5% / 25% / 54.5% / 66% after 100 / 150 / 200 / 300 steps. The
    short strings are learned first (after 150 steps at batch 32: 77% of the length-3 strings
    right, none of the length-8..10 ones).
    """

    letters: str = "abcdefghij"
    min_len: int = 3
    max_len: int = 10

    def __post_init__(self):
        if not self.letters or len(set(self.letters)) != len(self.letters):
            raise ValueError(f"letters: expected distinct characters, got {self.letters!r}")
        if not all(c.isascii() and c.isalpha() and c.islower() for c in self.letters):
            raise ValueError(f"letters: expected lowercase ASCII letters, got {self.letters!r}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"expected 1 <= min_len <= max_len, got min_len={self.min_len}, "
                             f"max_len={self.max_len}")

    # ----------------------------------------------------------------------------- the rule
    def alphabet(self) -> str:
        """Every character a prompt or completion can contain: the sorted letters, then ``"="``."""
        return "".join(sorted(self.letters)) + SEPARATOR

    def make_prompt(self, s: str) -> str:
        """The prompt asking to reverse ``s``: ``s + "="``."""
        return s + SEPARATOR

    def parse_prompt(self, prompt: str) -> str:
        """The string a prompt asks to reverse; ``ValueError`` if ``prompt`` is not ``letters + "="``
        with letters from this task (the trainer passes prompts it got from this task, so a bad one
        is a bug worth stopping on)."""
        if not isinstance(prompt, str) or not prompt.endswith(SEPARATOR):
            raise ValueError(f"not a prompt of this task (expected letters followed by "
                             f"{SEPARATOR!r}): {prompt!r}")
        s = prompt[:-len(SEPARATOR)]
        bad = sorted(set(s) - set(self.letters))
        if not s or bad:
            raise ValueError(f"not a prompt of this task (letters {self.letters!r} followed by "
                             f"{SEPARATOR!r}): {prompt!r}")
        return s

    def answer(self, prompt: str) -> str:
        """The correct completion of ``prompt`` (its letters reversed)."""
        return self.parse_prompt(prompt)[::-1]

    # ------------------------------------------------------------------------------ scoring
    def reward(self, prompt: str, completion: str) -> float:
        """Reward of one completion, in ``[0, 1]``: 1.0 for the exact answer, else partial credit.

        Partial credit is ``PARTIAL_CREDIT_WEIGHT * k / max(len(answer), len(completion))`` with
        ``k`` the number of positions ``i`` where ``completion[i] == answer[i]`` (compared from the
        left), so it is below 0.5 for every wrong completion, grows with each letter put right, and
        is lowered by missing or extra letters. Surrounding whitespace is ignored; an empty
        completion scores 0. Examples for the prompt ``"abcd="`` (answer ``"dcba"``)::

            "dcba" -> 1.0    "dcbx" -> 0.375    "dcb" -> 0.375    "dcbaa" -> 0.4
            "dxba" -> 0.375  "dxxa" -> 0.25     "abcd" -> 0.0     ""     -> 0.0
        """
        return answer_reward(completion, self.answer(prompt))

    def rewards(self, prompts: Sequence[str], completions: Sequence[str]) -> List[float]:
        """:meth:`reward` of each ``(prompt, completion)`` pair; the lists must be equally long."""
        _same_length(prompts, completions)
        return [self.reward(p, c) for p, c in zip(prompts, completions)]

    def exact_match(self, prompt: str, completion: str) -> bool:
        """Whether ``completion`` (whitespace stripped) is exactly the answer to ``prompt``."""
        return completion.strip() == self.answer(prompt)

    def accuracy(self, prompts: Sequence[str], completions: Sequence[str]) -> float:
        """Exact-match accuracy in ``[0, 1]``: the fraction of completions that are exactly right
        (0.0 for empty lists)."""
        _same_length(prompts, completions)
        if not prompts:
            return 0.0
        return sum(self.exact_match(p, c) for p, c in zip(prompts, completions)) / len(prompts)

    def evaluate(self, prompts: Sequence[str], completions: Sequence[str]) -> Dict[str, float]:
        """``{"accuracy": exact-match accuracy, "reward": mean reward, "n": count}`` of a set of
        completions (``prompts[i]`` answered by ``completions[i]``)."""
        r = self.rewards(prompts, completions)
        return {"accuracy": self.accuracy(prompts, completions),
                "reward": sum(r) / len(r) if r else 0.0, "n": float(len(r))}

    # ---------------------------------------------------------------------------- generators
    def _rng(self, stream: str, seed: int) -> random.Random:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        # A str seed goes through SHA-512: the same stream on every platform and Python version.
        return random.Random(f"posttrain_kernels.pipeline/{stream}/{seed}")

    def _draw(self, rng: random.Random) -> str:
        n = rng.randint(self.min_len, self.max_len)
        return "".join(rng.choice(self.letters) for _ in range(n))

    def _draw_train(self, rng: random.Random) -> str:
        while True:
            s = self._draw(rng)
            if not _is_eval_string(s):
                return s

    def sft_examples(self, n: int, seed: int = 0) -> List[Record]:
        """``n`` supervised examples ``{"prompt": "bdfa=", "completion": "afdb"}`` (training split;
        strings may repeat)."""
        rng = self._rng("sft", seed)
        out = []
        for _ in range(_count(n)):
            s = self._draw_train(rng)
            out.append({"prompt": self.make_prompt(s), "completion": s[::-1]})
        return out

    def preference_pairs(self, n: int, seed: int = 0) -> List[Record]:
        """``n`` preference pairs ``{"prompt": ..., "chosen": ..., "rejected": ...}``: ``chosen``
        is the correct answer, ``rejected`` a plausible wrong one, never equal to ``chosen``: one of
        the input copied unreversed, two neighbouring letters swapped, one letter replaced, one
        letter dropped, one letter doubled (drawn uniformly among those that differ from the
        answer). Training split."""
        rng = self._rng("preference", seed)
        out = []
        for _ in range(_count(n)):
            s = self._draw_train(rng)
            good = s[::-1]
            out.append({"prompt": self.make_prompt(s), "chosen": good,
                        "rejected": self._corrupt(good, s, rng)})
        return out

    def _corrupt(self, good: str, s: str, rng: random.Random) -> str:
        kinds = ["unreversed", "swap", "replace", "drop", "double"]
        while True:
            kind = rng.choice(kinds)
            if kind == "unreversed":
                bad = s
            elif kind == "swap":
                if len(good) < 2:
                    continue
                i = rng.randrange(len(good) - 1)
                bad = good[:i] + good[i + 1] + good[i] + good[i + 2:]
            elif kind == "replace":
                i = rng.randrange(len(good))
                others = [c for c in self.letters if c != good[i]]
                if not others:
                    continue
                bad = good[:i] + rng.choice(others) + good[i + 1:]
            elif kind == "drop":
                if len(good) < 2:
                    continue
                i = rng.randrange(len(good))
                bad = good[:i] + good[i + 1:]
            else:  # double
                i = rng.randrange(len(good))
                bad = good[:i + 1] + good[i:]
            if bad != good:
                return bad

    def rl_prompts(self, n: int, seed: int = 0) -> List[Record]:
        """``n`` RL prompts ``{"prompt": "bdfa=", "answer": "afdb"}`` (training split); score
        sampled completions with :meth:`reward`."""
        rng = self._rng("rl", seed)
        out = []
        for _ in range(_count(n)):
            s = self._draw_train(rng)
            out.append({"prompt": self.make_prompt(s), "answer": s[::-1]})
        return out

    def eval_prompts(self, n: int, seed: int = 0) -> List[Record]:
        """``n`` distinct held-out prompts ``{"prompt": "bdfa=", "answer": "afdb"}`` (eval split:
        never produced by the training generators). ``ValueError`` if the task has fewer than
        ``n`` held-out strings to offer."""
        rng = self._rng("eval", seed)
        seen, out = set(), []
        misses = 0
        while len(out) < _count(n):
            s = self._draw(rng)
            if not _is_eval_string(s) or s in seen:
                misses += 1
                if misses > 1000 * max(n, 1) + 100_000:
                    raise ValueError(f"eval_prompts: could not find {n} distinct held-out strings "
                                     f"(found {len(out)}); ask for fewer or use longer strings")
                continue
            seen.add(s)
            out.append({"prompt": self.make_prompt(s), "answer": s[::-1]})
        return out


def _count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    return n


def _same_length(prompts: Sequence, completions: Sequence) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"expected as many completions as prompts, got {len(completions)} "
                         f"completions for {len(prompts)} prompts")


#: The task the pipeline runs by default; the module-level functions are its methods.
DEFAULT_TASK = ReverseTask()

alphabet = DEFAULT_TASK.alphabet
make_prompt = DEFAULT_TASK.make_prompt
parse_prompt = DEFAULT_TASK.parse_prompt
answer = DEFAULT_TASK.answer
reward = DEFAULT_TASK.reward
rewards = DEFAULT_TASK.rewards
exact_match = DEFAULT_TASK.exact_match
accuracy = DEFAULT_TASK.accuracy
evaluate = DEFAULT_TASK.evaluate
sft_examples = DEFAULT_TASK.sft_examples
preference_pairs = DEFAULT_TASK.preference_pairs
rl_prompts = DEFAULT_TASK.rl_prompts
eval_prompts = DEFAULT_TASK.eval_prompts
