"""The examples in docs/ run as written."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _python_blocks(name: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(), flags=re.S)


@pytest.mark.parametrize("name", ["moe_layer.md"])
def test_first_example_runs(name):
    blocks = _python_blocks(name)
    assert blocks, f"{name} has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], f"docs/{name}", "exec"), namespace)
    moe = namespace["moe"]
    assert moe.last_stats.tokens_per_expert.sum().item() == 4 * 12 * 2  # 12 real tokens per row, top-2
