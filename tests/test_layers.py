"""The package layers: ocd_core (the method) <- training (offline) and ocd_core <- service (HTTP).
training and service never import each other, not even lazily inside a function or by naming the
other's module in a string (``python -m training.cli``), and the production packages carry no
test or bench helpers (httpx is a dev dependency)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "ocd_core": {"training", "service", "ocd_cli", "bench", "tests"},
    "training": {"service", "ocd_cli", "bench", "tests", "httpx"},
    "service": {"training", "ocd_cli", "bench", "tests", "httpx"},
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, top-level name) for every import in the file, at any depth, and every string
    constant that names a module of another layer (``"training.cli"``, ``"-m service..."``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            head = node.value.split(".")[0]
            if "." in node.value and " " not in node.value and head in {"training", "service", "ocd_core"}:
                found.append((node.lineno, head))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_downwards(package):
    bad = [
        f"{p.relative_to(ROOT)}:{line} -> {name}"
        for p in sorted((ROOT / package).rglob("*.py"))
        for line, name in imports_of(p)
        if name in FORBIDDEN[package]
    ]
    assert bad == []


def test_the_checker_sees_lazy_imports_and_module_strings(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from training.cli import main\n    return ['-m', 'service.cli']\n")
    assert imports_of(f) == [(2, "training"), (3, "service")]
