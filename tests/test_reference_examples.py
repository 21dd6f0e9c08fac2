"""The API reference's own curl and Python examples, run as written against a real server.

Only the address (a free port instead of 8009) and the polling pauses (0.1 s instead of 5 s) change.
The Docker troubleshooting snippets are not examples of the API and are skipped.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, ServerProcess

REFERENCE = REPO / "docs" / "imagen-api-v2.md"
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def _examples() -> list[tuple[str, str, str]]:
    found = []
    for index, (language, code) in enumerate(BLOCK.findall(REFERENCE.read_text(encoding="utf-8"))):
        if "docker-compose" in code or "localhost:8009" not in code:
            continue
        first_comment = next((line for line in code.splitlines() if line.startswith("#")), "")
        found.append((f"{index:02d}-{language}-{first_comment[:40]}", language, code))
    return found


EXAMPLES = _examples()


@pytest.mark.parametrize(("name", "language", "code"), EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_reference_example_runs(
    make_server: Callable[..., ServerProcess], tmp_path: Path, name: str, language: str, code: str
) -> None:
    server = make_server()
    server.start()
    code = code.replace("localhost:8009", f"127.0.0.1:{server.port}")
    code = code.replace("time.sleep(5)", "time.sleep(0.1)").replace("sleep 5", "sleep 0.1")
    workdir = tmp_path / "client"
    workdir.mkdir()
    command = [sys.executable, "-c", code] if language == "python" else ["bash", "-c", code]
    completed = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=120)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    assert "❌" not in output or "Erreur HTTP 404" in output, output  # the polling script uses a made-up id
    assert "Internal Server Error" not in output and "Traceback" not in output, output
    if "/generate" in code:
        assert re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-", output) or "✅" in output, output
    for written in re.findall(r"open\(\"(\w+\.png)\", \"wb\"\)", code):
        assert (workdir / written).read_bytes().startswith(b"\x89PNG")


def test_examples_were_found() -> None:
    languages = [language for _, language, _ in EXAMPLES]
    assert languages.count("python") == 4
    assert languages.count("bash") >= 8
