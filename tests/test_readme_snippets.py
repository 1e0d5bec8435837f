"""The README's "use it in your training loop" section runs as written.

Every ```python block between the section's markers is executed on its own, in a fresh
namespace and an empty working directory; a block that imports transformers is skipped
when it is not installed (it is in the `test` extra).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ["training"]


def _snippets(section: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    begin, end = f"<!-- section: {section} -->", f"<!-- /section: {section} -->"
    body = text[text.index(begin) + len(begin) : text.index(end)]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.DOTALL | re.MULTILINE)


SNIPPETS = [(section, i, code) for section in SECTIONS for i, code in enumerate(_snippets(section))]


@pytest.mark.parametrize("section, index, code", SNIPPETS, ids=[f"{s}-{i}" for s, i, _ in SNIPPETS])
def test_readme_snippet_runs(section, index, code, tmp_path, monkeypatch):
    if re.search(r"^\s*(from|import) transformers\b", code, flags=re.MULTILINE):
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # a snippet may write files (a Trainer's output_dir)
    exec(compile(code, f"README.md, section {section}, snippet {index}", "exec"), {"__name__": "__readme__"})  # noqa: S102


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_has_runnable_snippets(section):
    # Plain PyTorch, gradient accumulation, Hugging Face: a lost block must not pass silently.
    assert len(_snippets(section)) >= 3
