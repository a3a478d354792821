"""The house's layering (``[tool.importlinter]`` in ``pyproject.toml``), checked on every run.

* ``shared`` (the common library) imports nothing above it; ``services`` and
  ``evaluation`` import only ``shared``; ``umi`` (the command, ``umi up``) sits on top;
  ``scripts`` never import ``tests``.
* No service imports another.
* The gateway carries no LLM or tool code, directly or through another module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTRACTS = (
    "Dependencies point one way",
    "No service imports another",
    "The gateway carries no LLM or tool code",
)


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in CONTRACTS:
        assert f"{name}" in result.stdout, f"contract {name!r} is not checked:\n{result.stdout}"
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout, result.stdout


def test_a_backwards_import_breaks_the_contract(tmp_path: Path) -> None:
    """The check has teeth: a copy of the tree where ``shared`` imports a service fails it."""
    import shutil

    for name in ("shared", "services", "evaluation", "umi", "scripts", "tests", "pyproject.toml"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("data", "__pycache__"))
        else:
            shutil.copy(source, tmp_path / name)
    bad = tmp_path / "shared" / "pipeline.py"
    bad.write_text(bad.read_text() + "\nfrom services.tools import build_executor  # noqa\n")
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "shared.pipeline -> services.tools" in result.stdout, result.stdout
