"""The process group of a vocab-parallel head, its collectives, and the argument handshake.

Every vocab-parallel function starts with :func:`agree_on_shards`: each rank checks its own
arguments, then the ranks exchange one small record (one ``all_gather`` of a few float64 numbers)
saying whether their checks passed, where their shard starts, how wide it is, how many rows they
hold, a fingerprint of the labels and the scalar arguments. From that record every rank derives the
same verdict, so a bad argument on one rank raises on *every* rank, before any rank has entered the
collectives of the loss (a rank that raised alone would leave the others waiting in an all-reduce
until the group's timeout). The record also gives the global vocabulary size ``V`` (the sum of the
shards' widths), which label smoothing, the label range check and the distillation's ``"mean"``
reduction need.

``check_ranks=False`` (with ``vocab_size``) skips the exchange: no extra collective and no host
sync, for training steps whose layout is known to be right.

Without ``torch.distributed`` initialized and without a group, the functions run as a world of one:
no collective is issued and the shard is the whole vocabulary.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# The fixed part of the handshake record; the caller's scalar arguments follow it.
_OK, _START, _WIDTH, _ROWS, _BAD_NEG, _MAX_LABEL, _LABEL_SUM, _LABEL_KEPT = range(8)
_FIXED = 8


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def resolve_group(group) -> Tuple[object, int, int]:
    """``(group, rank in the group, group size)``; ``(None, 0, 1)`` for a world of one (no group and
    torch.distributed not initialized). Raises ValueError for a group this process cannot use."""
    dist = _dist()
    initialized = dist is not None and dist.is_initialized()
    if group is None:
        if not initialized:
            return None, 0, 1
        group = dist.group.WORLD
    elif not initialized:
        raise ValueError("group: got a process group, but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first, or pass group=None)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the "
                         "given process group")
    return group, rank, dist.get_world_size(group)


@dataclass(frozen=True)
class VocabShards:
    """This rank's place in the vocab-parallel layout, agreed on by every rank of the group.

    Rank ``rank`` of ``world`` holds the vocabulary columns ``[vocab_start, vocab_start + width)``
    of ``vocab_size`` in all.
    """

    group: object
    rank: int
    world: int
    vocab_start: int
    width: int
    vocab_size: int

    def all_reduce_max(self, t: Tensor) -> Tensor:
        """In place elementwise max over the ranks (no-op for a world of one)."""
        if self.world > 1:
            dist = _dist()
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """In place elementwise sum over the ranks (no-op for a world of one)."""
        if self.world > 1:
            dist = _dist()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


@dataclass
class LocalArgs:
    """What a rank's own checks found: its shard, its rows, its labels (``None`` for a function
    without labels) and its scalar arguments (which must be the same on every rank)."""

    vocab_start: int
    width: int
    n_rows: int
    labels: Optional[Tensor]
    ignore_index: int
    params: Sequence[float]
    labels_are_token_ids: bool = True  # False: labels only mask rows (distillation), no range check


def check_vocab_start(vocab_start) -> int:
    """Local check of ``vocab_start``: a non-negative Python integer (the upper bound is checked
    once the shards' widths are known)."""
    try:  # an int, a NumPy integer or a one-element integer tensor; never a bool or a float
        if isinstance(vocab_start, bool):
            raise TypeError
        vocab_start = operator.index(vocab_start)
    except TypeError:
        raise TypeError(f"vocab_start: expected an int (the first global vocabulary id of this rank's "
                        f"shard), got {type(vocab_start).__name__}") from None
    if vocab_start < 0:
        raise ValueError(f"vocab_start: expected a value >= 0 (the first global vocabulary id of this "
                         f"rank's shard), got {vocab_start}")
    return vocab_start


def _record(local: Optional[LocalArgs], n_params: int, device) -> Tensor:
    """The handshake record: float64 holds every id and count exactly up to 2**53."""
    f64 = dict(dtype=torch.float64, device=device)
    if local is None:  # this rank's checks failed: only the flag matters
        return torch.zeros(_FIXED + n_params, **f64)
    head = torch.tensor([1.0, local.vocab_start, local.width, local.n_rows], **f64)
    if local.labels is None or local.labels.numel() == 0:
        lab = torch.tensor([0.0, -1.0, 0.0, 0.0], **f64)
    else:
        y = local.labels.reshape(-1).to(torch.int64)
        kept = y != local.ignore_index
        # statistics computed on the labels' device: one transfer for the whole record
        lab = torch.stack([((y < 0) & kept).sum(), torch.where(kept, y, -1).max(),
                           torch.where(kept, y, 0).sum(), kept.sum()]).to(**f64)
    params = torch.tensor([float(p) for p in local.params], **f64)
    return torch.cat([head, lab, params])


def _gather(shards_group, world: int, record: Tensor) -> List[List[float]]:
    if world == 1:
        return [record.tolist()]
    dist = _dist()
    out = [torch.empty_like(record) for _ in range(world)]
    dist.all_gather(out, record, group=shards_group)
    return [r.tolist() for r in out]


def _raise_for_failed_ranks(fn: str, group, rank: int, world: int, rows, error: Optional[Exception]):
    """Some rank's own checks failed: every rank learns the messages and raises (the failing rank
    its own exception), so that none goes on into the loss's collectives."""
    failed = [r for r, rec in enumerate(rows) if rec[_OK] != 1.0]
    if not failed:
        return
    # (a world of one raised before the exchange; here world > 1)
    messages = [None] * world
    _dist().all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}",
                              group=group)
    if error is not None:
        raise error
    detail = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
    raise ValueError(f"{fn}: the arguments of another rank of the vocab-parallel group were rejected, "
                     f"so every rank stops here ({detail})")


def _check_same_everywhere(rows, index: int, name: str, what: str, quantity: str = "") -> None:
    values = [rec[index] for rec in rows]
    if any(v != values[0] and not (math.isnan(v) and math.isnan(values[0])) for v in values):
        per_rank = ", ".join(f"{_fmt(v)} on rank {r}" for r, v in enumerate(values))
        raise ValueError(f"{name}: expected {what} on every rank of the vocab-parallel group, got "
                         f"{quantity}{per_rank}")


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def _check_tiling(rows, vocab_size_expected: Optional[int]) -> int:
    """The shards, ordered by their start, must tile ``[0, V)`` with no gap and no overlap."""
    shards = sorted((int(rec[_START]), int(rec[_WIDTH]), r) for r, rec in enumerate(rows))
    layout = ", ".join(f"rank {r}: [{s}, {s + w})" for s, w, r in sorted(shards, key=lambda t: t[2]))
    end = 0
    for start, width, r in shards:
        if start != end:
            problem = (f"rank {r}'s shard starts at {start}, but columns [{end}, {start}) belong to no rank"
                       if start > end else f"rank {r}'s shard [{start}, {start + width}) overlaps the "
                       f"columns [{start}, {min(end, start + width)}) of another rank")
            raise ValueError(f"vocab_start: expected the ranks' shards to tile the vocabulary [0, V) "
                             f"contiguously; {problem} (shards: {layout})")
        end = start + width
    if vocab_size_expected is not None and end != vocab_size_expected:
        raise ValueError(f"group: expected the shards of the {len(rows)} rank(s) of the group to cover "
                         f"vocab_size={vocab_size_expected} columns, they cover {end} (shards: {layout}); "
                         "is this the tensor-parallel group the head was split over?")
    return end


def agree_on_shards(fn: str, group, device, check_local: Callable[[], LocalArgs],
                    param_names: Sequence[str], vocab_size: Optional[int] = None,
                    check_ranks: bool = True) -> VocabShards:
    """Run this rank's ``check_local`` (which raises ValueError/TypeError for a bad argument),
    exchange the handshake record, and return the agreed layout, or raise on every rank.

    Checks across ranks: same number of rows, same labels (fingerprint: count of kept labels and
    their sum), same scalar arguments ``param_names``, shards that tile ``[0, V)``, ``V`` equal to
    ``vocab_size`` when given, and every kept label in ``[0, V)``.
    """
    group, rank, world = resolve_group(group)
    if not check_ranks:
        return _trust_shards(group, rank, world, check_local, vocab_size)
    error, local = None, None
    try:
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size: expected a positive int or None, got {vocab_size!r}")
        local = check_local()
    except (ValueError, TypeError) as e:
        if world == 1:
            raise
        error = e
    rows = _gather(group, world, _record(local, len(param_names), device))
    _raise_for_failed_ranks(fn, group, rank, world, rows, error)
    _check_same_everywhere(rows, _ROWS, "labels", "the same number of rows (the rows are replicated, "
                           "only the vocabulary is split)", "")
    for i, name in enumerate(param_names):
        _check_same_everywhere(rows, _FIXED + i, name, "the same value")
    if local.labels is not None:
        for i, quantity in ((_LABEL_KEPT, "a number of non-ignored labels of "),
                            (_LABEL_SUM, "a sum of the non-ignored label ids of ")):
            _check_same_everywhere(rows, i, "labels", "the same labels (they are replicated, only the "
                                   "vocabulary is split)", quantity)
    v = _check_tiling(rows, vocab_size)
    # the worst label over the ranks, so that every rank reaches the same verdict even for labels
    # that differ but share the fingerprint
    bad_neg, max_label = max(rec[_BAD_NEG] for rec in rows), max(rec[_MAX_LABEL] for rec in rows)
    if local.labels is not None and local.labels_are_token_ids and (bad_neg > 0 or max_label >= v):
        bad = "a negative label" if bad_neg > 0 else f"label {int(max_label)}"
        raise ValueError(f"labels: expected global token ids in [0, {v}) (V = the sum of the shards' "
                         f"widths) or ignore_index={local.ignore_index}, got {bad}")
    return VocabShards(group, rank, world, local.vocab_start, local.width, v)


def _trust_shards(group, rank: int, world: int, check_local: Callable[[], LocalArgs],
                  vocab_size: Optional[int]) -> VocabShards:
    """``check_ranks=False``: this rank's own checks only, no exchange (no collective, no host
    sync: the hot path of a training step). The caller vouches that the ranks' shards tile
    ``[0, vocab_size)`` and that labels and arguments agree across ranks; label ids are not
    range-checked (that needs their values on the host)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected the global vocabulary size (a positive int) with "
                         f"check_ranks=False, got {vocab_size!r}")
    local = check_local()
    if local.vocab_start + local.width > vocab_size:
        raise ValueError(f"vocab_start: expected the shard [{local.vocab_start}, {local.vocab_start + local.width}) "
                         f"within [0, vocab_size={vocab_size})")
    return VocabShards(group, rank, world, local.vocab_start, local.width, vocab_size)
