"""The README's Python blocks: each runs on its own (no name from an earlier block) and is
followed by its expected output and time."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = list(re.finditer(r"```python\n(.*?)```\n", README.read_text(), re.S))


def undefined_names(code: str) -> set[str]:
    """Names a block reads but never binds (imports, assignments, defs, arguments, loops)."""
    tree = ast.parse(code)
    bound, loaded = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, (ast.Store, ast.Del)) else loaded).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound


def test_the_readme_has_its_python_blocks() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_each_python_block_runs_on_its_own_and_shows_output_and_time(i: int) -> None:
    block = BLOCKS[i]
    code = block.group(1)
    compile(code, f"README block {i + 1}", "exec")
    assert undefined_names(code) == set(), f"README block {i + 1} needs names from elsewhere"
    after = README.read_text()[block.end():].lstrip()
    note, fence, _ = after.partition("\n```text\n")
    assert note.startswith("Output (") and fence, "the expected output follows the block"
    assert "```" not in note and len(note) < 400
    assert re.search(r"\d+(\.\d+)?\s*(s|minutes?)\b", note), "the note says how long it takes"


def test_undefined_names_finds_a_name_from_an_earlier_block() -> None:
    # README block 2 used `model`, `x` and `y` from block 1 (issue 13)
    assert undefined_names("from biasshift import UnitFisher\nuf = UnitFisher(model)\n"
                           "uf.accumulate(x, y)\n") == {"model", "x", "y"}
    assert undefined_names("f = lambda model: model\nfor k in range(2):\n    print(k, f)\n") \
        == set()
