"""The docs hold together: every relative link in the README and docs/ points at a file that
exists, and the README stays a front page (the reference lives in docs/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    targets = [t for t in LINK.findall(page.read_text()) if not t.startswith(("http://", "https://", "mailto:"))]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name}: links to missing files {missing}"


def test_the_readme_is_a_front_page() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for doc in (
        "running",
        "suites",
        "policies",
        "metrics-and-detectors",
        "mlflow-review",
        "pytest-plugin",
        "real-weights",
        "performance",
        "development",
    ):
        assert f"(docs/{doc}.md)" in text, doc
