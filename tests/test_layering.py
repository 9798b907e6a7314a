"""boss_core stays pure: no pipeline frameworks, no config parsing, no hard-coded paths."""

import ast
from pathlib import Path

import pytest

FORBIDDEN = {"prefect", "mlflow", "dvc", "yaml", "tasks", "flows"}
CORE = Path(__file__).resolve().parents[1] / "boss_core"


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_no_pipeline_framework(path):
    assert not imported_roots(path) & FORBIDDEN


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import mlflow\nfrom prefect import flow\n")
    assert imported_roots(bad) & FORBIDDEN == {"mlflow", "prefect"}
