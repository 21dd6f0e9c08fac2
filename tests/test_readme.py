"""The README stays true: every setting is documented, the commands it shows exist."""

from __future__ import annotations

import re

from imagen.cli import settings_table
from imagen.config import Settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_the_settings_table_is_what_imagen_settings_prints() -> None:
    """Names, defaults and descriptions: regenerate the table with `.venv/bin/imagen settings`."""
    table = README.split("<!-- settings-table:start -->\n")[1].split("\n<!-- settings-table:end -->")[0]
    assert table.splitlines() == settings_table().splitlines()


def test_every_setting_has_a_description() -> None:
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


def test_the_two_commands_are_the_makefile_targets_ci_runs() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "make run" in README and "make test" in README
    assert re.search(r"^run: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()
