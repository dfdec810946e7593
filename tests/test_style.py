"""The shape every file keeps: lines of at most 100 characters (ruff's line-length; CI runs only
pytest), and no function in a numbered script longer than a screenful."""

import ast

import pytest
from conftest import ROOT

SOURCES = sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py"))
SCRIPTS = sorted(ROOT.glob("0[0-9]_*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_lines_are_at_most_100_characters(path):
    long = [i for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 100]
    assert not long, f"{path.name}: lines {long[:10]} are longer than 100 characters"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_no_function_in_a_script_is_over_60_lines(path):
    tree = ast.parse(path.read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1})" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert not long, f"{path.name}: {', '.join(long)} over 60 lines"
