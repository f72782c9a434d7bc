"""The import layering of DESIGN.md, checked on the source: lower layers never import upward, and only the command
line imports the command line. Every import counts, also one inside a function (a lazy import is still a
dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llmaas"

# What each lower layer may import from llmaas (besides itself): the model and its kernels at the bottom, then the
# KV representation, and storage beside them, which knows records and nothing of the model (the kernels, at the
# bottom, also run its hot loops over a read's pieces).
ALLOWED = {
    "kernels": {"errors", "paths"},
    "model": {"errors", "kernels", "paths"},
    "kv": {"errors", "kernels", "model", "paths"},
    "storage": {"errors", "kernels", "paths", "records"},
    "tlm": {"errors", "paths"},  # the tiny LM: a model of its own, beside the LLM
}


def imports_of(path: Path) -> set[str]:
    """The llmaas subpackages or modules a file imports (the part after `llmaas.`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        found |= {n.split(".")[1] for n in names if n.startswith("llmaas.")}
    return found


def package_imports(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): imports_of(p) - {package} for p in (PACKAGE / package).rglob("*.py")}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_lower_layers_never_import_upward(package):
    upward = {f: sorted(i - ALLOWED[package]) for f, i in package_imports(package).items() if i - ALLOWED[package]}
    assert not upward, f"{package}/ imports from layers above it: {upward}"


def test_only_the_command_line_imports_the_command_line():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "cli" in imports_of(p) and p.parent.name != "cli" and p.name != "__main__.py"]
    assert not offenders, f"these import llmaas.cli: {offenders}"


def test_the_product_never_imports_the_benchmarks():
    # check/ is a benchmark-style command (it measures the service from outside, as the benchmarks do)
    product = [p for p in PACKAGE.rglob("*.py") if p.parent.name not in ("bench", "check", "cli")]
    offenders = [str(p.relative_to(PACKAGE)) for p in product if "bench" in imports_of(p)]
    assert not offenders, f"these import llmaas.bench: {offenders}"
