"""Comments, docstrings and docs point only at documents that exist in the repo."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

SOURCES = ("shared", "services", "evaluation", "umi", "scripts", "tests")
#: Pointers at documents that live outside the repo (a design note, a handbook, a sibling folder).
OUTSIDE = re.compile(r"design §|handbook|reference/\w+\.md|\.\./shared")


def _texts() -> list[Path]:
    code = [path for top in SOURCES for path in (REPO / top).rglob("*.py")]
    return [*code, REPO / "README.md", *(REPO / "docs").glob("*.md"), REPO / "shared" / "data" / "README.md"]


def test_every_document_a_file_names_exists() -> None:
    missing = []
    for path in _texts():
        text = path.read_text()
        for name in re.findall(r"[\w./-]+\.md\b", text):
            # A markdown link is relative to its file; a name in code is relative to the repo root.
            if not ((REPO / name).is_file() or (path.parent / name).is_file()):
                missing.append(f"{path.relative_to(REPO)}: {name}")
    assert missing == []


def test_no_pointer_at_documents_outside_the_repo() -> None:
    this = Path(__file__).resolve()
    found = [
        f"{path.relative_to(REPO)}: {match.group(0)}"
        for path in _texts()
        if path != this
        for match in OUTSIDE.finditer(path.read_text())
    ]
    assert found == []
