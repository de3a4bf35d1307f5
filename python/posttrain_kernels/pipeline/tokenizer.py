"""Character-level tokenizer of the embedded task.

Vocabulary (no files, no downloads): ``0 = <pad>``, ``1 = <bos>``, ``2 = <eos>``, then one id per
character of the alphabet in order (the default task: ``a``..``j`` = 3..12, ``=`` = 13, so
``vocab_size == 14``)::

    tok = default_tokenizer()
    tok.encode("bad=")            # [4, 3, 6, 13]
    tok.decode([1, 6, 3, 4, 2, 7]) # "dab"  (bos/pad skipped, stops at the first eos)

:class:`CharTokenizer` is a small pure-Python class rather than a ``transformers`` tokenizer so
that its behaviour cannot change with the ``transformers`` version (``decode`` stopping at eos,
``encode`` refusing characters outside the alphabet); ``model.generate`` needs only the ids, and
:meth:`CharTokenizer.to_hf` gives an equivalent ``PreTrainedTokenizerFast`` (same ids) for code
that wants one (TRL, ``save_pretrained``).

Batches of token ids are built by :mod:`posttrain_kernels.trainer.batches` (for any tokenizer
with ``encode`` / ``decode`` and the pad/bos/eos ids, this one included).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "CharTokenizer", "default_tokenizer", "IGNORE_INDEX",
]

#: Label value the losses skip (``labels`` on prompt and padding tokens).
IGNORE_INDEX = -100

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


class CharTokenizer:
    """One id per character of ``alphabet``, after the three special tokens.

    Attributes: ``pad_token_id = 0``, ``bos_token_id = 1``, ``eos_token_id = 2``,
    ``vocab_size = 3 + len(alphabet)`` (also ``len(tok)``), ``alphabet``, and the token strings
    ``pad_token``, ``bos_token``, ``eos_token``.
    """

    pad_token, bos_token, eos_token = PAD, BOS, EOS
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, alphabet: str):
        if not isinstance(alphabet, str) or not alphabet:
            raise ValueError(f"alphabet: expected a non-empty string, got {alphabet!r}")
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet: expected distinct characters, got {alphabet!r}")
        self.alphabet = alphabet
        self._tokens = [PAD, BOS, EOS] + list(alphabet)
        self._ids = {c: i for i, c in enumerate(self._tokens) if i >= 3}

    @property
    def vocab_size(self) -> int:
        """Number of ids (the model's embedding rows): 3 specials + one per character."""
        return len(self._tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(alphabet={self.alphabet!r}, vocab_size={self.vocab_size})"

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and other.alphabet == self.alphabet

    def __hash__(self) -> int:
        return hash(self.alphabet)

    def get_vocab(self) -> Dict[str, int]:
        """``{token: id}`` for every token, specials included."""
        return {t: i for i, t in enumerate(self._tokens)}

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               add_special_tokens: Optional[bool] = None) -> List[int]:
        """Ids of the characters of ``text`` (one each), optionally ``[bos] + ... + [eos]``.
        ``add_special_tokens`` is accepted for code written against Hugging Face tokenizers:
        ``True`` adds bos (as Llama's do), ``False`` adds nothing. ``ValueError`` naming the
        character for one outside the alphabet."""
        if add_special_tokens:
            add_bos = True
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        try:
            ids = [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} of {text!r} is not in the tokenizer's "
                             f"alphabet {self.alphabet!r}") from None
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids: Union[Sequence[int], torch.Tensor], *, stop_at_eos: bool = True,
               skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (a list or 1-D tensor): stops at the first eos (unless
        ``stop_at_eos=False``), and skips pad, bos (and eos) unless ``skip_special_tokens=False``,
        which writes them as ``<pad>``, ``<bos>``, ``<eos>`` (the Hugging Face keyword).
        ``ValueError`` for an id outside ``[0, vocab_size)``."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids: expected a 1-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i == self.eos_token_id and stop_at_eos:
                break
            if i >= 3 or not skip_special_tokens:
                out.append(self._tokens[i])
        return "".join(out)

    def batch_decode(self, rows: Union[Iterable[Sequence[int]], torch.Tensor], *,
                     stop_at_eos: bool = True, skip_special_tokens: bool = True) -> List[str]:
        """:meth:`decode` of each row of a 2-D tensor or of a list of id lists."""
        return [self.decode(r, stop_at_eos=stop_at_eos, skip_special_tokens=skip_special_tokens)
                for r in rows]

    def to_hf(self):
        """An equivalent ``transformers.PreTrainedTokenizerFast`` built in code (same ids and
        special tokens, left padding, no bos/eos added by ``__call__``). Its ``decode`` does not
        stop at eos: pass ``skip_special_tokens=True`` or cut at eos first."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        core = Tokenizer(models.WordLevel(self.get_vocab(), unk_token=None))
        core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        core.decoder = decoders.Fuse()
        return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS,
                                       eos_token=EOS, padding_side="left")


def default_tokenizer() -> CharTokenizer:
    """The tokenizer of the default task: alphabet ``"abcdefghij="``, ``vocab_size`` 14."""
    from .task import DEFAULT_TASK

    return CharTokenizer(DEFAULT_TASK.alphabet())
