"""README's table of bundled filters names every filter file and links pages that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _table() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("* Bundled filters")
    return text[start : text.index("\n* ", start + 1)]


def test_every_bundled_filter_is_in_the_readme_table():
    table = _table()
    named = set(re.findall(r"`([a-z0-9_/*]+)`", table))
    stems = {p.stem for p in (REPO / "filters").glob("*.sql")}
    assert stems - named == set()
    assert "tic/*" in named and any((REPO / "filters" / "tic").glob("*.sql"))


def test_the_table_links_existing_pages():
    links = re.findall(r"\]\((docs/[^)]+)\)", _table())
    assert len(links) >= 5
    assert [p for p in links if not (REPO / p).is_file()] == []
