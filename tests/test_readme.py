"""The README stays true: every setting is documented, the commands it shows exist."""

from __future__ import annotations

import re

from imagen.config import Settings
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_in_the_readme_table() -> None:
    table = README.split("<!-- settings-table:start -->")[1].split("<!-- settings-table:end -->")[0]
    documented = set(re.findall(r"`(IMAGEN_[A-Z0-9_]+)`", table))
    assert documented == {f"IMAGEN_{name.upper()}" for name in Settings.model_fields}


def test_the_two_commands_are_the_makefile_targets_ci_runs() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "make run" in README and "make test" in README
    assert re.search(r"^run: ", makefile, re.M) and re.search(r"^test: ", makefile, re.M)
    assert "make test" in (REPO / ".ci" / "run").read_text()
