"""The pipeline's data files: JSONL schemas, a validating loader, and the shipped default data.

One JSON object per line (blank lines are skipped); every field named below is a string, other
fields are allowed and kept::

    kind "sft"         {"prompt": "bdfa=", "completion": "afdb"}
    kind "preference"  {"prompt": "bdfa=", "chosen": "afdb", "rejected": "afbd"}   (chosen != rejected)
    kind "rl"          {"prompt": "bdfa=", "answer": "afdb"}
    kind "eval"        {"prompt": "bdfa=", "answer": "afdb"}                       (same as "rl")

``prompt`` is the text the model continues and must be non-empty; ``completion`` / ``chosen`` /
``rejected`` are the texts after it, without bos/eos (the batch builders of
:mod:`posttrain_kernels.pipeline.tokenizer` add them); ``answer`` is the reference the reward
compares a generated completion with.

The default data of the embedded task ships in ``posttrain_kernels/pipeline/data/`` (package data,
so a non-editable install has it too): ``sft.jsonl`` (2000 records), ``preference.jsonl`` (1000),
``rl.jsonl`` (500), ``eval.jsonl`` (200, held-out strings only). :func:`default_records` rebuilds
them in memory from the task's generators (:data:`DEFAULT_SPECS` gives each file's generator,
count and seed) and :func:`write_default_data` rewrites them byte for byte::

    python -m posttrain_kernels.pipeline.data            # rewrite the shipped files
    python -m posttrain_kernels.pipeline.data --check    # exit 1 if they differ from the generators
    python -m posttrain_kernels.pipeline.data --out DIR  # write them elsewhere
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "DATA_DIR", "SCHEMAS", "DEFAULT_SPECS", "validate_record", "load_jsonl", "load_default", "default_path",
    "default_records", "dumps_jsonl", "write_jsonl", "write_default_data", "check_default_data",
    "main",
]

PathLike = Union[str, "os.PathLike[str]"]
Record = Dict[str, str]

#: Folder of the shipped default data (inside the installed package).
DATA_DIR = Path(__file__).resolve().parent / "data"

#: Required string fields of each kind of file, in the order the shipped files write them.
SCHEMAS: Dict[str, Tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "rl": ("prompt", "answer"),
    "eval": ("prompt", "answer"),
}

#: The shipped files: kind -> (file name, task generator name, number of records, seed).
DEFAULT_SPECS: Dict[str, Tuple[str, str, int, int]] = {
    "sft": ("sft.jsonl", "sft_examples", 2000, 0),
    "preference": ("preference.jsonl", "preference_pairs", 1000, 0),
    "rl": ("rl.jsonl", "rl_prompts", 500, 0),
    "eval": ("eval.jsonl", "eval_prompts", 200, 0),
}


def _check_kind(kind: str) -> Tuple[str, ...]:
    if kind not in SCHEMAS:
        raise ValueError(f"kind: expected one of {sorted(SCHEMAS)}, got {kind!r}")
    return SCHEMAS[kind]


def validate_record(obj, kind: str, where: str) -> Record:
    """Check one parsed line against the schema of ``kind``; ``where`` (``"file.jsonl:12"``)
    starts every error message. Returns ``obj`` (a dict). ``ValueError`` for a non-object, a
    missing field, a non-string field, an empty prompt or (preference) ``chosen == rejected``."""
    fields = _check_kind(kind)
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {list(fields)}, "
                         f"got {type(obj).__name__}")
    missing = [f for f in fields if f not in obj]
    if missing:
        raise ValueError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(f) for f in missing)} (a {kind!r} record needs "
                         f"{list(fields)})")
    for f in fields:
        if not isinstance(obj[f], str):
            raise ValueError(f"{where}: field {f!r} must be a string, got "
                             f"{type(obj[f]).__name__} ({json.dumps(obj[f])[:60]})")
    if not obj["prompt"]:
        raise ValueError(f"{where}: field 'prompt' is empty")
    if kind == "preference" and obj["chosen"] == obj["rejected"]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same text")
    return obj


def load_jsonl(path: PathLike, kind: str) -> List[Record]:
    """Read and validate a JSONL file of ``kind`` (``"sft"``, ``"preference"``, ``"rl"`` or
    ``"eval"``, see :data:`SCHEMAS`).

    Returns one dict per non-blank line, in file order. Raises ``ValueError`` with the file name
    and 1-based line number (``"sft.jsonl:7: ..."``) for a line that is not valid JSON, not an
    object, lacks a field, has a non-string field, an empty prompt, or (preference) identical
    chosen and rejected texts; and for a file without records. ``FileNotFoundError`` if the file
    does not exist.
    """
    _check_kind(kind)
    path = Path(path)
    records: List[Record] = []
    with open(path, "r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            records.append(validate_record(obj, kind, where))
    if not records:
        raise ValueError(f"{path}: no records (an empty {kind!r} file)")
    return records


def default_path(kind: str) -> Path:
    """Path of the shipped default file of ``kind`` (e.g. ``.../pipeline/data/sft.jsonl``)."""
    _check_kind(kind)
    return DATA_DIR / DEFAULT_SPECS[kind][0]


def load_default(kind: str) -> List[Record]:
    """:func:`load_jsonl` of the shipped default file of ``kind``."""
    return load_jsonl(default_path(kind), kind)


def default_records(kind: str) -> List[Record]:
    """The records of the shipped file of ``kind``, regenerated from the default task's generator
    (:data:`DEFAULT_SPECS`); equal to :func:`load_default` while the files are up to date."""
    from . import task

    _check_kind(kind)
    _, gen, n, seed = DEFAULT_SPECS[kind]
    fields = SCHEMAS[kind]
    return [{f: r[f] for f in fields} for r in getattr(task, gen)(n, seed)]


def dumps_jsonl(records: Sequence[Record]) -> str:
    """The JSONL text of ``records``: one ``json.dumps`` (ASCII, field order kept) per line, each
    ending in ``"\\n"``: the exact bytes of the shipped files."""
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)


def write_jsonl(path: PathLike, records: Sequence[Record]) -> Path:
    """Write ``records`` to ``path`` as :func:`dumps_jsonl` does (UTF-8, ``\\n`` line ends,
    parent folders created). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(dumps_jsonl(records))
    return path


def write_default_data(out_dir: Optional[PathLike] = None) -> Dict[str, Path]:
    """Regenerate every default file into ``out_dir`` (default: :data:`DATA_DIR`, the shipped
    copies). Deterministic: the same bytes on every run. Returns ``{kind: path}``."""
    out = Path(out_dir) if out_dir is not None else DATA_DIR
    return {kind: write_jsonl(out / DEFAULT_SPECS[kind][0], default_records(kind))
            for kind in DEFAULT_SPECS}


def check_default_data(data_dir: Optional[PathLike] = None) -> List[str]:
    """Kinds whose file in ``data_dir`` (default :data:`DATA_DIR`) is missing or differs from
    the regenerated text; an empty list when all are up to date."""
    d = Path(data_dir) if data_dir is not None else DATA_DIR
    stale = []
    for kind, (name, _, _, _) in DEFAULT_SPECS.items():
        p = d / name
        if not p.is_file() or p.read_bytes() != dumps_jsonl(default_records(kind)).encode("ascii"):
            stale.append(kind)
    return stale


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: rewrite (default), ``--check`` or ``--out DIR`` the default data files."""
    ap = argparse.ArgumentParser(prog="python -m posttrain_kernels.pipeline.data",
                                 description="Regenerate the pipeline's shipped default data.")
    ap.add_argument("--out", default=None, help=f"output folder (default: {DATA_DIR})")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a file differs from the generators")
    args = ap.parse_args(argv)
    if args.check:
        stale = check_default_data(args.out)
        for kind in stale:
            print(f"stale: {kind} ({DEFAULT_SPECS[kind][0]})", file=sys.stderr)
        return 1 if stale else 0
    for kind, path in write_default_data(args.out).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
