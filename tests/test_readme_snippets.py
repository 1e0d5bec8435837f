"""The README's examples and the training guide (docs/training.md) run as written.

Every ```python block between a page's section markers is executed on its own, in a fresh
namespace and an empty working directory; a block that imports transformers is skipped
when it is not installed (it is in the `test` extra).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# (page, section): the README's examples (a plain loop, Hugging Face, the linear head) and the
# guide's (a plain loop, gradient accumulation, Hugging Face).
SECTIONS = [("README.md", "training"), ("docs/training.md", "training")]


def _snippets(page: str, section: str) -> list[str]:
    text = (ROOT / page).read_text(encoding="utf-8")
    begin, end = f"<!-- section: {section} -->", f"<!-- /section: {section} -->"
    body = text[text.index(begin) + len(begin) : text.index(end)]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.DOTALL | re.MULTILINE)


SNIPPETS = [(page, i, code) for page, section in SECTIONS for i, code in enumerate(_snippets(page, section))]


@pytest.mark.parametrize("page, index, code", SNIPPETS, ids=[f"{p}-{i}" for p, i, _ in SNIPPETS])
def test_readme_snippet_runs(page, index, code, tmp_path, monkeypatch):
    if re.search(r"^\s*(from|import) transformers\b", code, flags=re.MULTILINE):
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # a snippet may write files (a Trainer's output_dir)
    exec(compile(code, f"{page}, snippet {index}", "exec"), {"__name__": "__readme__"})  # noqa: S102


@pytest.mark.parametrize("page, section", SECTIONS)
def test_readme_section_has_runnable_snippets(page, section):
    # Three examples a page: a lost block must not pass silently.
    assert len(_snippets(page, section)) >= 3
