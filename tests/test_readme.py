"""The README against the tree it describes: its Layout section names every package under src/llmaas, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_block() -> str:
    """The fenced block that follows the README's '## Layout' heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def test_readme_layout_lists_the_packages():
    block = layout_block()
    assert "\nsrc/llmaas/\n" in block
    listed = re.findall(r"^  (\w+)/ ", block, flags=re.MULTILINE)
    packages = sorted(p.parent.name for p in (ROOT / "src" / "llmaas").glob("*/__init__.py"))
    assert sorted(listed) == packages
    assert len(listed) == len(set(listed))  # each once
