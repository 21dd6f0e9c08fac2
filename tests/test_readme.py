"""The README stays a front door: short, its commands exist, its links lead somewhere. The manual is docs/
(tests/test_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_the_readme_is_a_front_door() -> None:
    assert len(README.splitlines()) <= 250, "the rest belongs in docs/ (mkdocs.yml's nav)"


def test_the_two_commands_are_the_makefile_targets_ci_runs() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "make run" in README and "make test" in README
    assert re.search(r"^run: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()


def test_the_readme_links_to_files_that_exist() -> None:
    """The README is read on the forge, not built by mkdocs: its relative links are checked here."""
    targets = {link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", README)}
    relative = sorted(target for target in targets if target and "://" not in target)
    assert any(target.startswith("docs/") for target in relative), "the README links to no page of the docs"
    assert [target for target in relative if not Path(REPO, target).exists()] == []
