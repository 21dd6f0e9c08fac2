"""The manual (docs/, built with mkdocs) stays true to the code: the settings table is what the code declares,
and the architecture page's tree lists every module of the package and nothing else."""

from __future__ import annotations

import re

import pytest

from imagen.cli import settings_table
from imagen.config import Settings
from tests.conftest import REPO

DOCS = REPO / "docs"
PACKAGE = REPO / "imagen"


def between(text: str, marker: str) -> str:
    """The text between ``<!-- marker:start -->`` and ``<!-- marker:end -->``."""
    return text.split(f"<!-- {marker}:start -->\n")[1].split(f"\n<!-- {marker}:end -->")[0]


def test_the_settings_table_is_what_imagen_settings_prints() -> None:
    """Names, defaults and descriptions: regenerate the table with `.venv/bin/imagen settings`."""
    table = between((DOCS / "configuration.md").read_text(encoding="utf-8"), "settings-table")
    assert table.splitlines() == settings_table().splitlines()


def test_every_setting_has_a_description() -> None:
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


# -- the architecture page's tree ------------------------------------------------------------------------
TREE_LINE = re.compile(r"^(?P<indent>(?:  )*)(?P<name>[A-Za-z0-9_.-]+/?)(?:\s{2,}(?P<what>\S.*))?$")


def tree_entries(block: str) -> list[tuple[str, str]]:
    """Each entry of the tree as (path from the repository root, its description). One entry a line, two spaces
    of indent per level, a folder's name ends with ``/``: the format the page keeps so that this test can read it."""
    lines = block.strip().removeprefix("```").removesuffix("```").strip("\n").splitlines()
    folders: list[str] = []
    entries: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        match = TREE_LINE.match(line)
        assert match, f"tree line {number} is not 'name  what it is': {line!r}"
        depth = len(match["indent"]) // 2
        assert depth <= len(folders), f"tree line {number} is indented under no folder: {line!r}"
        del folders[depth:]
        path = "".join(folders) + match["name"]
        entries.append((path, match["what"] or ""))
        if match["name"].endswith("/"):
            folders.append(match["name"])
    return entries


def package_modules() -> set[str]:
    """Every module file of the package, as a path from the repository root (packages are their folders)."""
    return {
        path.relative_to(REPO).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }


def architecture_tree() -> list[tuple[str, str]]:
    return tree_entries(between((DOCS / "architecture.md").read_text(encoding="utf-8"), "module-tree"))


def test_the_architecture_tree_lists_every_module_of_the_package() -> None:
    listed = {path for path, _ in architecture_tree() if path.endswith(".py")}
    assert sorted(package_modules() - listed) == [], "modules missing from docs/architecture.md's tree"


def test_the_architecture_tree_names_only_what_exists() -> None:
    entries = architecture_tree()
    assert entries[0][0] == "imagen/"
    assert [path for path, _ in entries if not (REPO / path).exists()] == []
    assert [path for path, what in entries if not what and path != "imagen/"] == [], "entries that say nothing"
    assert len({path for path, _ in entries}) == len(entries), "an entry listed twice"


def test_the_tree_reader_refuses_what_it_cannot_read() -> None:
    """The format the two tests above rely on: a path is built from its folders, and a loose line fails."""
    assert tree_entries("```\nimagen/\n  api/  the HTTP layer\n    app.py  wiring\n  cli.py  commands\n```") == [
        ("imagen/", ""), ("imagen/api/", "the HTTP layer"), ("imagen/api/app.py", "wiring"),
        ("imagen/cli.py", "commands"),
    ]
    for loose in ("imagen/\n  a.py b.py  two on one line", "imagen/\n      deep.py  under no folder"):
        with pytest.raises(AssertionError):
            tree_entries(loose)


def test_every_page_of_the_docs_folder_is_in_the_site() -> None:
    """mkdocs --strict fails on a page left out of the nav too; this says which page, without mkdocs."""
    nav = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
    assert [page for page in pages if f" {page}" not in nav] == []

