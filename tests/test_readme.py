"""The README's Python examples run as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    pytest.importorskip("transformers")
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - our own README
    assert scope["loss"].dtype.is_floating_point
    assert scope["logp5"].shape == (4, 128, 5)
    assert scope["model"].lm_head.weight.grad is not None
