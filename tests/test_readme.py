"""The README's code runs, and its documentation links lead somewhere."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_quick_tour_runs():
    # The README's one python block is the quick tour: it must run as written (CPU, seconds).
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 1, "the README's quick tour is its one python block"
    exec(compile(blocks[0], "README.md (quick tour)", "exec"), {"__name__": "readme_tour"})


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    # Links to files of this repository (not the web, not anchors alone) name files that exist.
    text = doc.read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)]
    missing = [t for t in targets if t and not re.match(r"[a-z]+:", t) and not (doc.parent / t).exists()]
    assert not missing, f"{doc.name} links to files that do not exist: {missing}"
