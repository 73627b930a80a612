"""The docs a clone reads link only to files the clone has (no ../shared, no dead paths)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [REPO / "README.md", REPO / "DEVELOPERS.md", REPO / "BENCHMARKS.md", *REPO.glob("docs/*.md")]
)
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
# A path named in backquotes that points outside the repo, e.g. `../shared/design.md`.
OUTSIDE = re.compile(r"`(\.\./[^`]+)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves_inside_the_repo(doc: Path):
    text = doc.read_text()
    bad = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+://|^#|^mailto:", target):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(REPO) or not path.exists():
            bad.append(target)
    for target in OUTSIDE.findall(text):
        if not (doc.parent / target).resolve().is_relative_to(REPO):
            bad.append(target)
    assert not bad, f"{doc.name} links to what a clone does not have: {bad}"


def test_the_readme_links_the_design_and_the_contracts():
    text = (REPO / "README.md").read_text()
    assert "](docs/design.md)" in text and "](docs/contracts.md)" in text
